"""The main job on its embedded default: the whole pipeline on a tiny real-image dataset, CPU only.

Stages: the embedded digits written as ImageNet-22K-style per-synset tars -> `data_prep shard` (shuffled
train shards, a per-class val hold-out, DALI index files, manifest) -> `data_prep verify` -> a "1K" shard set
(5 of the classes plus a synset the pretraining never saw, in a declared layout) -> pretraining of the tiny
Swin with DeepSpeed ZeRO-2 on 2 CPU processes through launch/pretrain_22k.sh -> fine-tuning at a larger
size and window (bias tables resized bicubic, head rows mapped by synset) through launch/finetune_1k_384.sh
-> both registered in MLflow (MLFLOW_TRACKING_URI, else a local store in the runs folder), the fine-tuned one as
`candidate` -> `python -m pipeline.evaluate` scores it on the "1K" val split and promotes it to `champion` when it
beats the version `champion` names -> the champion pulled back by alias in a fresh process (`python -m
pipeline.predict models:/tiny_22kto1k@champion`) and run on held-out images; the `mlflow models serve` command
that serves it is printed.

Expected failures end in one line, `error: ...` (a training stage's own error line among them), with a non-zero
exit; `--debug` shows their traceback. Every URI it prints is redacted (no password or token).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Mapping
from pathlib import Path

from data_prep.shardset.store import open_store
from pipeline.tracking.store import ENV_VAR, Store, resolve_store, ui_address
from swin_common.cli import ArgumentParser, CommandError, command, configure_logging, exit_process

REPO = Path(__file__).resolve().parents[1]
FINETUNE_DIGITS = (1, 3, 5, 7, 9)
UNSEEN_SYNSET = "n09999999"  # in the "1K" layout, absent from the "22K" one (as n04399382 is from fall11)
STAGES = 8
MODEL_1K = "tiny_22kto1k"


def stage(n: int, text: str) -> None:
    print(f"\n[{n}/{STAGES}] {text}", flush=True)


def prep(*given: object) -> str:
    """Runs `python -m data_prep ARGS` as a user would; returns its stdout. Its log is shown once it ends; a
    failure ends the main job with prep's own error line."""
    args = [str(a) for a in given]
    print(f"  $ python -m data_prep {' '.join(args)}", flush=True)
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    for line in proc.stderr.splitlines():
        if not line.startswith("error: "):
            print("  " + line, file=sys.stderr)
    if proc.returncode != 0 and not (args[0] == "verify" and proc.returncode == 1):  # verify: 1 = problems found
        raise CommandError(
            f"data_prep {args[0]} failed (exit {proc.returncode}){last_error(proc.stderr)}",
            exit_code=proc.returncode if proc.returncode > 0 else 1,
        )
    return proc.stdout


def verified(shards: str, workers: int) -> bool:
    """`data_prep verify`: prints what it found; True when the set is intact."""
    out = prep("verify", shards, "--workers", workers).splitlines()
    for line in out:
        print("  " + line)
    return bool(out) and out[-1].endswith(": OK")


def write_1k_source(source_22k: Path, work: Path) -> tuple[Path, Path]:
    """The "1K" source: links to 5 of the synset tars, and its layout file (those 5 plus an unseen synset)."""
    source = work / "source_1k_tars"
    source.mkdir(parents=True, exist_ok=True)
    synsets = sorted(p.stem for p in source_22k.glob("*.tar"))  # the digits' synsets, digit d is the d-th
    for digit in FINETUNE_DIGITS:
        link = source / f"{synsets[digit]}.tar"
        if not link.exists():
            link.symlink_to((source_22k / link.name).resolve())
    layout = work / "layout_1k.txt"
    layout.write_text("".join(f"{synsets[d]}\n" for d in FINETUNE_DIGITS) + f"{UNSEEN_SYNSET}\n")
    return source, layout


def train(script: str, config: str, overrides: list[str], log_path: Path, store: Store) -> None:
    """Runs a launch script (2 gloo ranks), showing rank 0's progress lines and keeping the whole log."""
    cmd = ["bash", str(REPO / "launch" / script), "--config", str(REPO / "configs" / config), *overrides]
    print(f"  $ {' '.join(cmd)}\n  (full log: {log_path})", flush=True)
    env = {k: v for k, v in stage_env(store).items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.setdefault("PYTHON", sys.executable)
    with (
        open(log_path, "w") as log,
        subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc,
    ):
        assert proc.stdout is not None  # stdout=PIPE
        for line in proc.stdout:
            log.write(line)
            if "[rank 0] pipeline" in line and ("step=" in line or "resumed" in line or "initialised" in line):
                print("  " + line.split("] ", 1)[-1].split(" INFO ", 1)[-1].rstrip(), flush=True)
    if proc.returncode != 0:
        raise CommandError(
            f"{script} failed (exit {proc.returncode}){last_error(log_path.read_text())}; full log: {log_path}",
            exit_code=proc.returncode if proc.returncode > 0 else 1,
        )


def last_error(output: str) -> str:
    """`: <the last error line>` of a command's output (the one line an expected failure prints), or ''."""
    errors = [line.strip() for line in output.splitlines() if line.strip().startswith("error: ")]
    return f": {errors[-1][len('error: ') :]}" if errors else ""


def held_out_images(shards: str, out: Path, count: int) -> list[tuple[Path, str]]:
    """JPEG files of `count` val samples of a shard set (folder or S3), taken in turn from each class, with
    their synsets. A file is named after its sample's key; a key that is not [A-Za-z0-9_-] (from a crafted or
    foreign shard: `../x`, `a/b`, a NUL) is written under a sanitised name inside `out`, and said so."""

    def member_bytes(tar: tarfile.TarFile, name: str, member: tarfile.TarInfo) -> bytes:
        file = tar.extractfile(member)
        if file is None:  # a directory or a link under a sample's name (a crafted or foreign shard)
            raise CommandError(f"{name}: {member.name} is not a regular file")
        return file.read()

    store = open_store(shards)
    out.mkdir(parents=True, exist_ok=True)
    by_class: dict[str, list[Path]] = {}
    used: set[str] = set()
    for name in sorted(n for n, _ in store.list("val/") if n.endswith(".tar")):
        with tarfile.open(fileobj=io.BytesIO(store.read(name))) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for meta in sorted(n for n in members if n.endswith(".json")):
                key = meta[: -len(".json")]
                safe = re.sub(r"[^A-Za-z0-9_-]", "_", key)[:100] or "_"  # never a path: no '/', '.', NUL
                while safe in used:
                    safe += "_"
                used.add(safe)
                if safe != key:
                    print(f"  sample key {key!r} in {name} is not [A-Za-z0-9_-]: written as {safe}.jpg", flush=True)
                path = out / f"{safe}.jpg"
                path.write_bytes(member_bytes(tar, name, members[f"{key}.jpg"]))
                by_class.setdefault(json.loads(member_bytes(tar, name, members[meta]))["synset"], []).append(path)
    in_turn = itertools.chain.from_iterable(itertools.zip_longest(*by_class.values()))
    synset_of_path = {p: s for s, paths in by_class.items() for p in paths}
    return [(p, synset_of_path[p]) for p in in_turn if p is not None][:count]


def predict_held_out(shards: str, out: Path, store: Store, count: int) -> dict:
    images = held_out_images(shards, out, count)
    cmd = [
        sys.executable,
        "-m",
        "pipeline.predict",
        f"models:/{MODEL_1K}@champion",
        "-k",
        "1",
        *(str(p) for p, _ in images),
    ]
    print(f"  $ {ENV_VAR}={store.redacted} {' '.join(cmd[:5])} <{len(images)} images>", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=stage_env(store))
    if proc.returncode != 0:
        raise CommandError(
            f"predict failed (exit {proc.returncode}){last_error(proc.stderr)}",
            exit_code=proc.returncode if proc.returncode > 0 else 1,
        )
    lines = proc.stdout.splitlines()
    top1 = [lines[i + 1].split()[1] for i in range(0, len(lines), 2)]  # "path" then "  prob  synset  (class i)"
    for (path, truth), guess in list(zip(images, top1, strict=True))[:5]:
        print(f"  {path.name}: predicted {guess}, true {truth}")
    hits = sum(guess == truth for (_, truth), guess in zip(images, top1, strict=True))
    return {"images": len(images), "accuracy": 100 * hits / max(len(images), 1)}


def evaluate_and_promote(shards: str, store: Store, workers: int) -> int:
    """`python -m pipeline.evaluate` on the candidate: exit 0 promoted (or nothing to compare), 3 not better (the
    champion stays); both are outcomes, anything else a failure."""
    cmd = [
        sys.executable,
        "-m",
        "pipeline.evaluate",
        f"models:/{MODEL_1K}@candidate",
        "--shards",
        shards,
        "--promote",
        "champion",
        "--if-better-than",
        "champion",
        "--workers",
        str(workers),
    ]
    print(f"  $ {ENV_VAR}={store.redacted} {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=stage_env(store))
    if proc.returncode not in (0, 3):
        raise CommandError(
            f"evaluate failed (exit {proc.returncode}){last_error(proc.stderr)}",
            exit_code=proc.returncode if proc.returncode > 0 else 1,
        )
    for line in proc.stdout.splitlines():
        print("  " + line, flush=True)
    return proc.returncode


def evals(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if "val_top1" in m]


def tracking_store(runs: Path, launched_from: Path, env: Mapping[str, str]) -> Store:
    """The MLflow store the demo tracks to: env's MLFLOW_TRACKING_URI, a relative local store in it taken from the
    folder the demo was run from (its stages run in the repository), else a local sqlite store in the runs folder
    (the one training with out_dir=runs uses)."""
    return resolve_store("", runs, launched_from, env)


def stage_env(store: Store) -> dict[str, str]:
    """The environment of a stage's process (the training ranks, evaluate, predict): this one's, with the demo's
    store in MLFLOW_TRACKING_URI, which is how those commands are told their store; the absolute URI, since they
    run in the repository, not where the demo was started."""
    return {**os.environ, ENV_VAR: store.uri}


@command()
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m pipeline.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--workdir",
        default="runs/demo",
        help="where the sources, shards and runs go (default: runs/demo in the folder it is run from)",
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--shards-url",
        help="where the shard sets go (a folder or s3://bucket/prefix; default "
        "WORKDIR): SHARDS_URL/shards and SHARDS_URL/shards_1k",
    )
    p.add_argument("--fresh", action="store_true", help="delete the workdir first")
    p.add_argument("--prep-only", action="store_true", help="stop after the shard sets (no training)")
    p.add_argument("--pretrain-epochs", type=float, default=15, help="epochs of the tiny pretraining")
    p.add_argument("--finetune-epochs", type=float, default=8)
    p.add_argument("--predict-images", type=int, default=20, help="held-out images to predict at the end")
    args = p.parse_args(argv)
    configure_logging(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    work = Path(args.workdir).resolve()  # the user's folder's (run_demo.sh runs it there)
    store = tracking_store(work / "runs", Path.cwd(), os.environ)
    if args.fresh and work.exists():
        shutil.rmtree(work)
    t0 = time.time()

    stage(1, "embedded dataset: scikit-learn digits as ImageNet-22K-style per-synset tars")
    source = work / "source_22k_tars"
    if not source.exists():
        print(prep("embedded", "--out", source, "--format", "synset-tars").strip())
    print(f"  {source}: {len(list(source.glob('*.tar')))} synset tars")

    stage(2, "data_prep shard + verify: the 22K-style shard set")
    base = (args.shards_url or str(work)).rstrip("/")
    shards, shards_1k = f"{base}/shards", f"{base}/shards_1k"
    print(
        prep(
            "shard",
            "--source",
            source,
            "--out",
            shards,
            "--holdout-per-class",
            20,
            "--max-samples",
            256,
            "--workers",
            args.workers,
        ).rstrip()
    )
    ok = verified(shards, args.workers)
    if not ok:
        return 1

    stage(3, f"data_prep shard: the '1K' set (digits {FINETUNE_DIGITS} + unseen {UNSEEN_SYNSET}, declared layout)")
    source_1k, layout_1k = write_1k_source(source, work)
    prep(
        "shard",
        "--source",
        source_1k,
        "--out",
        shards_1k,
        "--layout",
        layout_1k,
        "--holdout-per-class",
        20,
        "--max-samples",
        256,
        "--workers",
        args.workers,
    )
    if not verified(shards_1k, args.workers):
        return 1
    manifest = json.loads(open_store(shards).read("manifest.json"))
    if args.prep_only:
        return finish(t0, shards, manifest, ok)

    runs = work / "runs"
    stage(4, "pretrain: tiny Swin, DeepSpeed ZeRO-2, 2 CPU ranks (launch/pretrain_22k.sh, configs/tiny_22k.yaml)")
    train(
        "pretrain_22k.sh",
        "tiny_22k.yaml",
        [f"out_dir={runs}", f"data.shards={shards}", f"schedule.epochs={args.pretrain_epochs}"],
        work / "pretrain.log",
        store,
    )
    pre = runs / "tiny_22k"

    stage(5, "fine-tune at 96x96 / window 6 on the '1K' set (launch/finetune_1k_384.sh, configs/tiny_22kto1k.yaml)")
    train(
        "finetune_1k_384.sh",
        "tiny_22kto1k.yaml",
        [
            f"out_dir={runs}",
            f"data.shards={shards_1k}",
            f"init_from={pre / 'model'}",
            "tracking.aliases=[candidate]",
            f"schedule.epochs={args.finetune_epochs}",
        ],
        work / "finetune.log",
        store,
    )
    fine = runs / "tiny_22kto1k"
    init = json.loads((fine / "init.json").read_text())

    stage(6, f"evaluate models:/{MODEL_1K}@candidate on the '1K' val split; promote it to champion if it beats it")
    promoted = evaluate_and_promote(shards_1k, store, args.workers) == 0

    stage(7, f"pull models:/{MODEL_1K}@champion from MLflow in a fresh process and predict held-out images")
    predicted = predict_held_out(shards_1k, work / "held_out", store, args.predict_images)
    print(f"  tracking URI: {store.redacted} ({f'from {ENV_VAR}' if os.environ.get(ENV_VAR) else 'local store'})")
    print(f"  top-1 on {predicted['images']} held-out images: {predicted['accuracy']:.1f}%")

    stage(8, "summary")
    pre_eval, fine_evals = evals(pre)[-1], evals(fine)
    print(f"  shards:     {shards} ({totals(manifest)}); '1K' set {shards_1k}")
    print(
        f"  pretrain:   {pre} - val top-1 {pre_eval['val_top1']:.1f}% on {pre_eval['val_samples']} held-out "
        f"images (10 classes, 64x64, window 4); checkpoints in {pre / 'checkpoints'}"
    )
    print(
        f"  fine-tune:  {fine} - val top-1 {fine_evals[0]['val_top1']:.1f}% before (step 0, transferred to "
        f"96x96 / window 6), {fine_evals[-1]['val_top1']:.1f}% after; {init['init_resized_bias_tables']} bias "
        f"tables resized, {init['init_head_rows_mapped']} head rows mapped, fresh: {init['init_fresh_synsets']}"
    )
    print(f"  models:     {pre / 'model'}, {fine / 'model'} (model.safetensors + model.json)")
    for run_dir in (pre, fine):
        record = run_dir / "mlflow_run.json"
        if record.is_file():
            tracked = json.loads(record.read_text())
            aliases = "candidate, " + ("champion" if promoted else "not champion") if run_dir == fine else "candidate"
            print(
                f"  MLflow:     run {tracked['run_id']} ({run_dir.name}), registered as models:/{run_dir.name} "
                f"({aliases})"
            )
    experiment = (
        json.loads((pre / "mlflow_run.json").read_text()).get("experiment_id")
        if (pre / "mlflow_run.json").is_file()
        else None
    )
    if experiment or (store.path is not None and store.path.exists()):
        print(f"  MLflow UI:  {ui_address(store, experiment)}")
    print(
        f"  serve it:   {ENV_VAR}={store.redacted} mlflow models serve -m models:/{MODEL_1K}@champion "
        f"--env-manager local -p 5001   (runs the version's code file: for registries you trust; "
        f"docs/mlflow.md has a curl request)"
    )
    return finish(t0, shards, manifest, ok)


def totals(manifest: dict) -> str:
    return ", ".join(f"{k}: {v['samples']} images in {v['shards']} shards" for k, v in manifest["totals"].items())


def finish(t0: float, shards: str, manifest: dict, ok: bool) -> int:
    print(f"\n  shards {shards} ({totals(manifest)}), verified: {'OK' if ok else 'FAILED'}")
    print(f"  took {time.time() - t0:.1f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    exit_process(main())
