"""The typed run config: recipes load, overrides apply with types checked, typos are errors, dumps round-trip."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import ConfigError, dump_config, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_recipe_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_overrides_are_typed_and_dotted():
    cfg = load_config(
        None,
        [
            "train.zero_stage=3",
            "optim.base_lr=5e-4",
            "data.rand_augment=null",
            "optim.betas=[0.9, 0.95]",
            "schedule.epochs=30",
            "name=x",
        ],
    )
    assert cfg.train.zero_stage == 3 and cfg.optim.base_lr == 5e-4 and cfg.data.rand_augment is None
    assert cfg.optim.betas == (0.9, 0.95) and isinstance(cfg.schedule.epochs, float) and cfg.name == "x"
    assert cfg.run_dir == Path("runs/x")


def test_an_empty_override_is_an_empty_string_and_null_is_none():
    cfg = load_config(None, ["data.val_split=", "data.rand_augment=null"])
    assert cfg.data.val_split == "" and cfg.data.rand_augment is None


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.zero_stag=3", r"unknown key\(s\) train.zero_stag"),
        ("trian.zero_stage=3", r"unknown key\(s\) trian"),
        ("train.zero_stage=two", r"train.zero_stage: expected int, got 'two'"),
        ("train.zero_stage=1.5", r"train.zero_stage: expected int"),
        ("model.fused_attn=maybe", r"model.fused_attn: expected bool"),
        ("optim.betas=0.9", r"optim.betas: expected a list of 2 values"),
        ("train=3", r"train: expected a section"),
        ("novalue", r"is not key=value"),
    ],
)
def test_mistakes_are_errors_that_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.backend=dal", r"data.backend: expected one of auto, dali, torch, got 'dal'"),
        ("schedule.decay=step", r"schedule.decay: expected one of cosine, linear, constant, got 'step'"),
        ("train.precision=fp8", r"train.precision: expected one of auto, bf16, fp16, fp32, got 'fp8'"),
        ("train.zero_stage=4", r"train.zero_stage: expected one of 0, 1, 2, 3, got 4"),
        ("train.zero_stage=true", r"train.zero_stage: expected int, got True"),
        ("transfer.head=new", r"transfer.head: expected one of map, fresh, got 'new'"),
        ("transfer.bias_tables=null", r"transfer.bias_tables: expected one of bicubic, zeros, got None"),
    ],
)
def test_choice_fields_take_only_their_choices(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_every_choice_of_a_choice_field_loads():
    cfg = load_config(
        None,
        [
            "data.backend=torch",
            "schedule.decay=constant",
            "train.precision=bf16",
            "train.zero_stage=0",
            "transfer.head=fresh",
            "transfer.bias_tables=zeros",
        ],
    )
    assert (
        cfg.data.backend,
        cfg.schedule.decay,
        cfg.train.precision,
        cfg.train.zero_stage,
        cfg.transfer.head,
        cfg.transfer.bias_tables,
    ) == ("torch", "constant", "bf16", 0, "fresh", "zeros")


CHECK_BACKEND = """
import sys
from pipeline.train import main

code = main(["--config", "configs/tiny_22k.yaml", "data.backend=dal", "--check"])
print(code, "torch" in sys.modules)
"""


def test_a_bad_choice_is_refused_by_check_before_torch_loads():
    """`python -m pipeline.train ... data.backend=dal --check`: one line naming the key, the value and the choices,
    exit 2, from the config alone: torch is never imported (the loader's own check came after it, at the run)."""
    repo = Path(__file__).resolve().parents[1]
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", CHECK_BACKEND], cwd=repo, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["2", "False"], (proc.stdout, proc.stderr[-3000:])
    assert proc.stderr.strip() == "error: data.backend: expected one of auto, dali, torch, got 'dal'", proc.stderr
    assert time.time() - t0 < 30  # about a second; a loaded machine may take several


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("recipe,arch", [("swin_base_22k", "swin_base"), ("swin_large_22k", "swin_large")])
def test_22k_recipes_hold_the_official_facts_and_the_paper_is_one_override_away(recipe, arch):
    from pipeline.engine.optim import scaled_lr

    path = Path(__file__).resolve().parents[1] / "configs" / f"{recipe}.yaml"
    cfg = load_config(path)
    assert (cfg.model.arch, cfg.model.img_size, cfg.model.window_size, cfg.model.drop_path) == (arch, 224, 7, 0.2)
    assert cfg.train.global_batch == 4096 and scaled_lr(cfg, cfg.optim.base_lr) == pytest.approx(1e-3)
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs, cfg.schedule.decay) == (90, 5, "cosine")
    assert cfg.optim.weight_decay == 0.05 and cfg.optim.grad_clip == 5.0
    d = cfg.data
    assert (d.rand_augment, d.mixup, d.cutmix, d.label_smoothing, d.random_erasing) == (
        "rand-m9-mstd0.5-inc1",
        0.8,
        1.0,
        0.1,
        0.25,
    )
    paper = load_config(path, ["schedule.epochs=60", "schedule.decay=linear", "optim.weight_decay=0.01"])
    assert (paper.schedule.epochs, paper.schedule.decay, paper.optim.weight_decay) == (60, "linear", 0.01)


def test_every_relative_path_is_the_launch_folders(tmp_path, monkeypatch):
    """resolve_at_launch (every entry point: the launch and Slurm scripts pass --launch-dir, the others run where
    they were started): each relative path key becomes absolute against the launch folder, as typed (symlinks
    kept); absolute paths, URLs and models:/ URIs stay; the recipe's own relative defaults count too."""
    from pipeline.train import resolve_at_launch

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(
        Path(__file__).parents[1] / "configs" / "tiny_22kto1k.yaml",
        [
            "data.cache_dir=cache",
            "checkpoint.resume=../other/runs/x/checkpoints/step_00000004",
            "tracking.uri=sqlite:///mlflow.db",
            "tracking.artifact_location=art",
        ],
    )
    resolve_at_launch(cfg, str(tmp_path))
    assert cfg.out_dir == str(tmp_path / "runs") and cfg.init_from == str(tmp_path / "runs" / "tiny_22k" / "model")
    assert cfg.data.shards == str(tmp_path / "runs" / "demo" / "shards_1k")  # the recipe's own default
    assert cfg.data.cache_dir == str(tmp_path / "cache")
    assert cfg.checkpoint.resume == str(tmp_path.parent / "other" / "runs" / "x" / "checkpoints" / "step_00000004")
    assert cfg.tracking.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert cfg.tracking.artifact_location == str(tmp_path / "art")
    kept = load_config(
        overrides=[
            "data.shards=s3://bucket/set",
            "init_from=models:/m@champion",
            "out_dir=/abs",
            "checkpoint.resume=auto",
        ]
    )
    resolve_at_launch(kept, str(tmp_path))
    assert (kept.data.shards, kept.init_from, kept.out_dir, kept.checkpoint.resume) == (
        "s3://bucket/set",
        "models:/m@champion",
        "/abs",
        "auto",
    )
    timm_name = load_config(overrides=["init_from=timm:swin_base_patch4_window7_224.ms_in22k"])
    resolve_at_launch(timm_name, str(tmp_path))
    assert timm_name.init_from == "timm:swin_base_patch4_window7_224.ms_in22k"  # a name, not a relative path
