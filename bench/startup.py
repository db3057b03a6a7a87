"""How fast the commands answer when they have little to do, each against the bare imports it needs, in one run.

    python bench/startup.py [--repeats 5] [--workdir DIR]

Every case is a fresh process, timed from its start to its exit, `--repeats` times; the table gives medians. The
baselines are the imports alone (`python -c "import torch, timm"`, `import mlflow.tracking`, an empty
interpreter), measured in the same run, so the ratios and differences hold on any machine. The goals (a new
user's first hour): every `--help` under 1 s; config and path errors under 2 s, also through the launch script;
`pull` within 1.5 s of importing MLflow's client; `predict` of a cached model within 2 s of importing torch + timm.
A registered model for `pull` and `predict` is made here: a tiny random export in a local sqlite store.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.workdir import add_workdir_option, bench_workdir  # noqa: E402

PY = sys.executable
TINY = str(REPO / "configs" / "tiny_22k.yaml")
LAUNCH = str(REPO / "launch" / "pretrain_22k.sh")


def timed(cmd: list[str], env: dict, cwd: Path, repeats: int, ok: tuple[int, ...]) -> float:
    """Median seconds of `cmd` from start to exit; its exit status must be one of `ok`."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if proc.returncode not in ok:
            raise SystemExit(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    return statistics.median(times)


def registered_model(work: Path) -> tuple[str, Path]:
    """(tracking URI, an image): models:/bench@candidate, a tiny random export, in a sqlite store in `work`
    (made only when a chosen case reads the registry)."""
    from mlflow.tracking import MlflowClient
    from PIL import Image
    from safetensors.torch import save_file

    from pipeline.config import RunConfig
    from pipeline.engine.model_export import model_metadata, write_timm_config
    from pipeline.model import create_model
    from pipeline.tracking.registry import register

    uri = f"sqlite:///{work / 'mlflow.db'}"
    export = work / "export"
    if not (export / "config.json").is_file():
        cfg = RunConfig()
        cfg.model.arch, cfg.model.img_size, cfg.model.window_size = "swin_nano", 64, 4
        model = create_model("swin_nano", 64, 4, 10)
        export.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(export / "model.safetensors"))
        meta = model_metadata(cfg, [f"n{i:08d}" for i in range(10)])
        (export / "model.json").write_text(json.dumps(meta))
        write_timm_config(model, export, meta)
        client = MlflowClient(uri)
        experiment = client.create_experiment("bench", artifact_location=(work / "artifacts").as_uri())
        register(client, client.create_run(experiment).info.run_id, export, "bench", ["candidate"])
    image = work / "digit.jpg"
    Image.new("RGB", (64, 64), (90, 160, 30)).save(image)
    return uri, image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="runs of each case (default 5; the median is shown)")
    p.add_argument("--only", default="", help="only the cases whose name holds this text (e.g. help)")
    add_workdir_option(p)
    args = p.parse_args()
    with bench_workdir(args.workdir, "swin-startup-bench-") as work:
        base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env = {**base, "PYTHON": PY, "PYTHONPATH": str(REPO), "SWIN_MODEL_CACHE": str(work / "cache")}
        r = args.repeats
        baselines = {
            "python": [PY, "-c", "pass"],
            "import mlflow.tracking": [PY, "-c", "import mlflow.tracking"],
            "import torch, timm": [PY, "-c", "import torch, timm"],
        }
        image = work / "digit.jpg"
        cases = [  # (case, command, ok statuses, baseline, goal: (kind, seconds))
            ("train --help", [PY, "-m", "pipeline.train", "--help"], (0,), "python", ("under", 1.0)),
            ("predict --help", [PY, "-m", "pipeline.predict", "--help"], (0,), "python", ("under", 1.0)),
            ("evaluate --help", [PY, "-m", "pipeline.evaluate", "--help"], (0,), "python", ("under", 1.0)),
            ("pull --help", [PY, "-m", "pipeline.pull", "--help"], (0,), "python", ("under", 1.0)),
            ("launch script --help", ["bash", LAUNCH, "--help"], (0,), "python", ("under", 1.0)),
            (
                "config typo (train)",
                [PY, "-m", "pipeline.train", "--config", TINY, "nosuch.key=1"],
                (2,),
                "python",
                ("under", 2.0),
            ),
            (
                "config typo (launch script)",
                ["bash", LAUNCH, "--config", TINY, "nosuch.key=1"],
                (2,),
                "python",
                ("under", 2.0),
            ),
            (
                "missing shard set (launch script)",
                ["bash", LAUNCH, "--config", TINY, "data.shards=/nonexistent"],
                (2,),
                "python",
                ("under", 2.0),
            ),
            (
                "pull (cached)",
                [PY, "-m", "pipeline.pull", "models:/bench@candidate"],
                (0,),
                "import mlflow.tracking",
                ("within", 1.5),
            ),
            (
                "bad alias (pull)",
                [PY, "-m", "pipeline.pull", "models:/bench@nope"],
                (2,),
                "import mlflow.tracking",
                ("within", 1.5),
            ),
            (
                "predict 1 image (cached)",
                [PY, "-m", "pipeline.predict", "models:/bench@candidate", str(image)],
                (0,),
                "import torch, timm",
                ("within", 2.0),
            ),
        ]
        cases = [c for c in cases if args.only in c[0]]
        if any("models:/" in " ".join(c[1]) for c in cases):  # a registered model, and the cache predict reads
            env["MLFLOW_TRACKING_URI"], _ = registered_model(work)
            subprocess.run(
                [PY, "-m", "pipeline.pull", "models:/bench@candidate"],
                env=env,
                cwd=work,
                check=True,
                capture_output=True,
            )
        # only the baselines the chosen cases are measured against
        base_s = {
            name: timed(baselines[name], env, work, r, (0,))
            for name in baselines
            if name == "python" or any(c[3] == name for c in cases)
        }
        print(f"startup: medians of {r} runs each, this machine ({os.cpu_count()} cores)")
        print("  baselines: " + ", ".join(f"{name} {t:.2f} s" for name, t in base_s.items()))
        print(f"{'case':36s} {'median s':>9s}  {'baseline':22s} {'minus base':>10s}  goal")
        for name, cmd, ok, base_name, (kind, goal) in cases:
            t = timed(cmd, env, work, r, ok)
            met = t < goal if kind == "under" else t - base_s[base_name] < goal
            print(
                f"{name:36s} {t:9.2f}  {base_name:22s} {t - base_s[base_name]:+10.2f}  "
                f"{kind} {goal:.1f} s: {'met' if met else 'NOT met'}"
            )


if __name__ == "__main__":
    main()
