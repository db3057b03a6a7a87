"""Initialising a model from one trained at another size/window/label layout (pipeline/model/transfer.py), and the
22K -> 1K fine-tuning run built on it."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
import torch.nn.functional as F

from pipeline.engine.model_export import load_source
from pipeline.model import create_model
from pipeline.model.transfer import SourceModel, TransferError, initialise, resize_bias_table, transfer_state
from runs import job_env
from servers import REPO, free_port, run_prep

SYNSETS = [f"n{i:08d}" for i in range(10)]


def trained_like(arch="swin_nano", size=64, window=4, synsets=SYNSETS, seed=0) -> SourceModel:
    """A source whose every weight, bias tables included, is distinct (not the fresh initialisation)."""
    torch.manual_seed(seed)
    model = create_model(arch, size, window, len(synsets))
    state = {k: v + torch.randn_like(v) for k, v in model.state_dict().items()}
    return SourceModel(state, list(synsets), "test source")


def test_resizing_to_the_same_size_is_the_identity():
    table = torch.randn(13 * 13, 4)
    same = resize_bias_table(table, 13)
    assert torch.equal(same, table) and same.data_ptr() != table.data_ptr()  # a copy: the source stays intact
    model = create_model("swin_nano", 64, 4, 10)
    source = trained_like()
    initialise(model, source, SYNSETS)
    for key, value in model.state_dict().items():
        if key in source.state:
            assert torch.equal(value, source.state[key]), key  # same size, window and layout: a plain copy


def test_13_to_23_is_bicubic_on_each_heads_grid():
    table = torch.randn(13 * 13, 4)
    out = resize_bias_table(table, 23)
    assert out.shape == (23 * 23, 4)
    half = resize_bias_table(table.bfloat16(), 23)  # computed in fp32, returned in the table's dtype
    assert half.dtype == torch.bfloat16 and torch.equal(
        half, resize_bias_table(table.bfloat16().float(), 23).bfloat16()
    )
    for h in range(4):
        grid = table[:, h].reshape(1, 1, 13, 13)
        expected = F.interpolate(grid, size=(23, 23), mode="bicubic", align_corners=False).flatten()
        assert torch.allclose(out[:, h], expected, atol=1e-6)
    # row r of a table is offset (dy, dx) = divmod(r, 2M-1) - (M-1): the centre (offset 0) maps to the centre
    assert out[(23 * 23) // 2].tolist() == pytest.approx(table[(13 * 13) // 2].tolist(), abs=1e-5)


def test_a_window_7_model_loads_into_window_12_at_384():
    source = trained_like("swin_tiny", 224, 7, SYNSETS)
    model = create_model("swin_tiny", 384, 12, 10)
    report = initialise(model, source, SYNSETS)
    tables = [k for k in model.state_dict() if k.endswith("relative_position_bias_table")]
    assert sorted(report.resized_tables) == sorted(tables) and len(tables) == 12
    block = model.layers[0].blocks[0].attn
    assert block.relative_position_bias_table.shape == (23 * 23, 3)
    assert int(block.relative_position_index.max()) == 23 * 23 - 1  # rebuilt for window 12, not copied
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 384, 384)).shape == (1, 10)


def test_head_rows_follow_the_synsets_and_missing_ones_start_fresh():
    source = trained_like()
    target = ["n00000007", "n00000002", "n09999999", "n00000005"]  # n09999999: never seen by the source
    torch.manual_seed(1)
    model = create_model("swin_nano", 96, 6, len(target))
    fresh_w = model.head.fc.weight.detach().clone()
    report = initialise(model, source, target)
    w, b = model.head.fc.weight.detach(), model.head.fc.bias.detach()
    for i, synset in enumerate(target):
        if synset in SYNSETS:
            row = SYNSETS.index(synset)
            assert torch.equal(w[i], source.state["head.fc.weight"][row]) and b[i] == source.state["head.fc.bias"][row]
        else:
            assert torch.equal(w[i], fresh_w[i]) and b[i] == 0
    assert report.fresh_synsets == ["n09999999"] and report.head_rows_mapped == 3


@pytest.mark.parametrize(
    "break_it,message",
    [
        (
            lambda s: s.__setitem__("layers.1.blocks.0.attn.relative_position_bias_table", torch.zeros(49, 3)),
            r"relative_position_bias_table: 3 heads in the source, 2 in",
        ),
        (
            lambda s: s.__setitem__("layers.0.blocks.0.mlp.fc1.weight", torch.zeros(64, 32)),
            r"layers.0.blocks.0.mlp.fc1.weight: shape \(64, 32\) in the source, \(128, 32\)",
        ),
        (lambda s: s.pop("norm.weight"), r"missing norm.weight"),
        (lambda s: s.__setitem__("layers.9.extra", torch.zeros(1)), r"unexpected layers.9.extra"),
    ],
)
def test_mismatches_are_errors_naming_the_key(break_it, message):
    source = trained_like()
    break_it(source.state)
    with pytest.raises(TransferError, match=message):
        transfer_state(create_model("swin_nano", 96, 6, 10), source, SYNSETS)


def test_another_architecture_is_refused():
    with pytest.raises(TransferError, match="does not fit this architecture"):
        transfer_state(create_model("swin_tiny", 224, 7, 10), trained_like(), SYNSETS)


def test_zeros_option_zeroes_every_table():
    model = create_model("swin_nano", 96, 6, 10)
    initialise(model, trained_like(), SYNSETS, bias_tables="zeros")
    tables = [v for k, v in model.state_dict().items() if k.endswith("relative_position_bias_table")]
    assert tables and all(not t.any() for t in tables)


def what_is_not_a_source(tmp_path):
    """Paths an init_from may name by mistake, each with the words its error must say."""
    from safetensors.torch import save_file

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "swin_base_patch4_window7_224_22k.pth").write_bytes(b"\x80\x02}q\x00.")  # a pickle
    resnet = tmp_path / "resnet"
    resnet.mkdir()
    save_file({"conv1.weight": torch.zeros(2, 3, 1, 1)}, str(resnet / "model.safetensors"))
    (resnet / "model.json").write_text(json.dumps({"synsets": SYNSETS}))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"w": torch.zeros(1)}, pickled / "model.safetensors")
    (pickled / "model.json").write_text(json.dumps({"synsets": SYNSETS}))
    alone = tmp_path / "alone"
    alone.mkdir()
    save_file(trained_like().state, str(alone / "model.safetensors"))
    return {
        tmp_path / "missing": "no such file or folder",
        tmp_path / "empty": "a folder without COMPLETE, model.json or config.json (it holds nothing)",
        run: "it is a run folder, start from its model/ or a checkpoint",
        tmp_path / "swin_base_patch4_window7_224_22k.pth": "holds no Swin weights (no patch_embed.proj.weight",
        resnet: "holds no Swin weights",
        pickled / "model.safetensors": "is not a safetensors file: it is a zip archive",
        alone / "model.safetensors": "no model.json beside it",
    }


def test_what_is_not_a_source_is_one_error_naming_it(tmp_path):
    """The pre-launch check (header reads, no torch) and the ranks' load_source refuse the same paths with the same
    words, each naming the absolute path; a real export passes both."""
    from pipeline.engine.init_source import check_init_source
    from swin_common.safe_weights import UnsafeModelFile

    for path, says in what_is_not_a_source(tmp_path).items():
        for check in (check_init_source, load_source):
            with pytest.raises((ValueError, UnsafeModelFile), match=re.escape(says)) as e:
                check(path)
            assert str(path.absolute()) in str(e.value), (check.__name__, str(e.value))
    from safetensors.torch import save_file

    export = tmp_path / "export"
    export.mkdir()
    save_file(trained_like().state, str(export / "model.safetensors"))
    (export / "model.json").write_text(json.dumps({"synsets": SYNSETS}))
    assert check_init_source(export) == f"exported model {export} (10 classes)"
    assert load_source(export).synsets == SYNSETS


# --- the fine-tuning run ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_finetune_22k_to_1k_at_a_larger_window(digits_tars, shards, tmp_path):
    """Pretrain the tiny model briefly at 64/window 4 on all 10 classes, then fine-tune at 96/window 6 with
    launch/finetune_1k_384.sh (2 ranks) on a "1K" set of 5 classes plus a synset the pretraining never saw:
    the tables are resized, 5 head rows mapped, 1 fresh, the accuracy before (step 0) and after is recorded."""
    env = job_env(port=False)
    odd = tmp_path / "src_1k"
    odd.mkdir()
    for d in (1, 3, 5, 7, 9):
        (odd / f"n{d:08d}.tar").symlink_to(digits_tars / f"n{d:08d}.tar")
    layout = tmp_path / "layout_1k.txt"
    layout.write_text("".join(f"n{d:08d}\n" for d in (1, 3, 5, 7, 9)) + "n09999999\n")
    shards_1k = tmp_path / "shards_1k"
    run_prep(
        "shard",
        "--source",
        odd,
        "--out",
        shards_1k,
        "--layout",
        layout,
        "--max-samples",
        200,
        "--holdout-per-class",
        10,
    )

    import subprocess

    common = [f"out_dir={tmp_path}", "data.workers=1", "train.log_every=1"]
    pre = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.train",
            "--config",
            REPO / "configs/tiny_22k.yaml",
            "name=pre",
            f"data.shards={shards}",
            "train.max_steps=20",
            "schedule.epochs=1",
            "eval.batch_size=50",
            *common,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert pre.returncode == 0, pre.stderr[-4000:]
    fine = subprocess.run(
        [
            "bash",
            REPO / "launch/finetune_1k_384.sh",
            "--config",
            REPO / "configs/tiny_22kto1k.yaml",
            "name=fine",
            f"init_from={tmp_path / 'pre' / 'model'}",
            f"data.shards={shards_1k}",
            "train.max_steps=16",
            "train.global_batch=32",
            "train.micro_batch=16",
            *common,
        ],
        cwd=REPO,
        env={**env, "MASTER_PORT": str(free_port())},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert fine.returncode == 0, fine.stderr[-6000:]
    run = tmp_path / "fine"
    init = json.loads((run / "init.json").read_text())
    assert init["fresh_synsets"] == ["n09999999"] and init["init_head_rows_mapped"] == 5
    assert len(init["resized_tables"]) == 8  # every block: 7x7 -> 11x11 (stage 4: 3x3 -> 5x5)
    head_map = json.loads((run / "head_map.json").read_text())
    assert head_map["source_index"] == [1, 3, 5, 7, 9, -1]
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_top1" in line]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 16 and evals[0]["val_samples"] == 50
    assert evals[-1]["val_top1"] > evals[0]["val_top1"], evals
    meta = json.loads((run / "model" / "model.json").read_text())
    assert (meta["img_size"], meta["window_size"], meta["synsets"][-1]) == (96, 6, "n09999999")
