"""Checkpoints that a killed job never leaves half-picked, and resume that is exact.

Layout: `<run>/checkpoints/step_00001000/` holds DeepSpeed's own files (module, optimizer partitions,
loss scaler, step counters), one `rank_NNNNN.pt` per rank (torch/numpy/python RNG states, which DeepSpeed does
not keep and drop path draws from, and the loader's position; tensors and plain values, loaded with
`weights_only=True`), the run's `config.yaml`, its label layout `synsets.txt`, and `COMPLETE`,
written last. Everything is written under `.tmp-step_...` and renamed by rank 0 once all ranks are done, so a
job killed mid-write leaves only a temporary folder, which `resume: auto` never picks and the next save removes.
Checkpoints must be on storage every rank sees (shared file system).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

import numpy as np
import torch

from pipeline.config import RunConfig, dump_config
from pipeline.engine.distributed import all_gather_object, barrier, broadcast_object, wait_for_main
from swin_common.errors import UserError

log = logging.getLogger(__name__)
MARKER = "COMPLETE"
UNIVERSAL_MARKER = "UNIVERSAL_COMPLETE"
TAG = re.compile(r"^step_(\d{8})$")


class SharedStorageError(UserError, RuntimeError):
    """Ranks that do not see the run folder rank 0 writes into."""


SHARED_RUN_DIR_FILES = (".ranks-see-this", ".ranks-see-this.tmp")  # check_shared_run_dir's token, staged


class CheckpointError(UserError, RuntimeError):
    """A checkpoint this run cannot resume from (or convert for another world size), named, with what to do."""


def check_shared_run_dir(run_dir: Path, rank: int) -> None:
    """Fails on every rank unless every rank sees the same run folder.

    Rank 0 writes a token into the run folder and every rank reads it back: checkpoints and the export are
    written there by every rank, so they must all see the same folder. Fails on every rank, naming the ranks
    and the path, when some do not (a node-local disk, another mount, a relative out_dir resolved elsewhere)."""
    token_file = run_dir / SHARED_RUN_DIR_FILES[0]
    token = None
    if rank == 0:
        token = os.urandom(8).hex()
        staged = token_file.with_name(token_file.name + ".tmp")
        staged.write_text(token)
        os.replace(staged, token_file)
    token = broadcast_object(token)  # sent once rank 0 has written it
    try:
        seen = token_file.read_text() == token
    except OSError:
        seen = False
    blind = [r for r, ok in enumerate(all_gather_object(seen)) if not ok]
    if blind:
        raise SharedStorageError(
            f"rank(s) {', '.join(map(str, blind))} do not see {token_file}, which rank 0 wrote: every rank writes "
            f"checkpoints into {run_dir}, so out_dir must be on storage every node sees (a shared file system), "
            f"given as the same absolute path on every node"
        )


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := TAG.match(p.name)) and (p / MARKER).is_file()]
    return [p for _step, p in sorted(found, key=lambda f: f[0])]


def find_resume(cfg: RunConfig) -> Path | None:
    """The checkpoint this run resumes from: `resume: auto` = the newest complete one in the run's folder."""
    how = cfg.checkpoint.resume
    if how == "none":
        return None
    if how == "auto":
        found = complete_checkpoints(cfg.run_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(how)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"checkpoint.resume={how}: not a complete checkpoint (no {MARKER} marker)")
    return path


def rng_state() -> dict:
    """This process's RNG states, in a form that torch.load(weights_only=True) reads back.

    This process's python/numpy/torch(/cuda) RNG states as tensors and plain values, so that the rank file
    loads with torch.load(weights_only=True): python's and numpy's own states are tuples holding a 625-word
    tuple or a uint32 array, which only a full unpickler would rebuild."""
    version, words, gauss_next = random.getstate()
    # the legacy global RandomState (MT19937) gives its tuple; numpy's stubs type a bare call as the dict form
    algorithm, keys, pos, has_gauss, cached_gaussian = cast(
        tuple[str, np.ndarray, int, int, float], np.random.get_state()
    )
    state = {
        "python": {"version": int(version), "state": torch.tensor(words, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "algorithm": str(algorithm),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    np.random.set_state(
        (npy["algorithm"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    engine,
    cfg: RunConfig,
    step: int,
    rank: int,
    world: int,
    loader_state: dict,
    synsets: list[str],
    meta: dict | None = None,
) -> Path:
    """`meta`: more for the COMPLETE marker (a stop's signal; an evaluation the resumed run owes)."""
    root = cfg.run_dir / "checkpoints"
    tag = tag_for(step)
    tmp = root / f".tmp-{tag}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    # universal_checkpoint_info: what DeepSpeed's ds_to_universal needs to convert it for another world size
    engine.save_checkpoint(
        str(root),
        tag=tmp.name,
        save_latest=False,
        client_state={"step": step, "universal_checkpoint_info": {"universal_checkpoint_version": 0.2}},
    )
    rank_state = {"rng": rng_state(), "loader": loader_state}
    scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
    if scaler is not None:  # ZeRO-0 fp16's loss scale (autocast's GradScaler), which DeepSpeed does not save
        rank_state["grad_scaler"] = scaler.state_dict()
    _write_durable(tmp / f"rank_{rank:05d}.pt", lambda f: torch.save(rank_state, f))
    barrier()
    if rank == 0:
        dump_config(cfg, tmp / "config.yaml")
        (tmp / "synsets.txt").write_text("\n".join(synsets) + "\n")  # the label layout, for export
        _write_durable(
            tmp / MARKER,
            lambda f: f.write(
                json.dumps(
                    {
                        "step": step,
                        "world_size": world,
                        "zero_stage": cfg.train.zero_stage,
                        "time": time.time(),
                        "global_batch": cfg.train.global_batch,
                        "micro_batch": cfg.train.micro_batch,
                        **(meta or {}),
                    }
                ).encode()
            ),
        )
        final = root / tag
        if final.exists():  # the same step saved again (a resumed run that stopped at the same step)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _prune(root, cfg.checkpoint.keep_last)
        for stale in [*root.glob(".tmp-step_*"), *root.glob(".tmp-universal-*")]:  # left by a killed job
            shutil.rmtree(stale, ignore_errors=True)
        log.info("checkpoint %s", final)
    barrier()
    return root / tag


def checkpoint_meta(path: Path) -> dict:
    return json.loads((path / MARKER).read_text())


def needs_universal(path: Path, world: int) -> bool:
    """Whether resuming the checkpoint at `path` on `world` ranks goes through a universal checkpoint.

    A checkpoint of another world size with partitioned optimizer state (ZeRO 1-3): loaded through DeepSpeed's
    universal checkpoint (ZeRO-0 keeps the whole optimizer state in one file and loads as it is)."""
    meta = checkpoint_meta(path)
    return meta["world_size"] != world and meta["zero_stage"] > 0


def universal_copy(path: Path, rank: int) -> Path:
    """The checkpoint's universal copy beside it, made once by rank 0; its path, on every rank.

    `<checkpoint>.universal` beside the checkpoint: DeepSpeed's ds_to_universal run once, by rank 0, into a
    temporary folder renamed when complete (so a kill mid-conversion leaves nothing a rerun mistakes for
    complete); every rank waits for it and returns its path."""
    out = path.with_name(path.name + ".universal")
    if rank == 0 and not (out / UNIVERSAL_MARKER).is_file():
        tmp = path.with_name(f".tmp-universal-{path.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        log.info("converting %s for another world size (DeepSpeed's ds_to_universal) ...", path)
        t0 = time.time()
        # --inject_missing_state: checkpoints saved before universal_checkpoint_info was in their client state
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "deepspeed.checkpoint.ds_to_universal",
                "--input_folder",
                str(path),
                "--output_folder",
                str(tmp),
                "--num_extract_workers",
                "2",
                "--num_merge_workers",
                "2",
                "--inject_missing_state",
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tail = " | ".join(line.strip() for line in proc.stderr.strip().splitlines()[-3:])
            raise CheckpointError(
                f"converting {path} to a universal checkpoint failed (exit {proc.returncode}): {tail}"
            )
        size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        _write_durable(
            tmp / UNIVERSAL_MARKER,
            lambda f: f.write(
                json.dumps({"source": path.name, "seconds": round(time.time() - t0, 2), "bytes": size}).encode()
            ),
        )
        os.replace(tmp, out)
        _fsync_dir(path.parent)
        log.info("converted %s in %.1f s (%.0f MB) into %s", path.name, time.time() - t0, size / 1e6, out)
    wait_for_main(f"converting {path.name} for another world size")  # minutes for big models: not a barrier
    if not (out / UNIVERSAL_MARKER).is_file():
        raise CheckpointError(f"{out} is not a complete universal checkpoint (rank 0 did not finish converting it)")
    return out


def load_checkpoint(engine, path: Path, rank: int, world: int, seed: int = 0) -> tuple[int, dict, dict]:
    """Restores a checkpoint on this world size or another; its step, loader state and resume record.

    Restores engine, optimizer, loss scaler and RNG; returns (step, loader state, the resume record:
    what was loaded, from and to which world size, and the optimizer groups' weight decay).

    The same world size: DeepSpeed's own files and this rank's RNG, exactly. Another world size (an elastic
    resume): ZeRO 1-3 through the universal copy (the engine was built with checkpoint.load_universal), ZeRO-0
    with a plain load; then the optimizer's per-group settings are put back (a ZeRO-3 universal load copies group
    0's into every group, which would give norms, biases and bias tables weight decay), the RNG streams are derived
    from (seed, step, rank), and the loader resumes from the samples consumed (rank 0's loader state)."""
    meta = checkpoint_meta(path)
    elastic = meta["world_size"] != world
    if meta["zero_stage"] == 0:
        check_zero0_weights_dtype(path, next(engine.module.parameters()).dtype)
    load_from = universal_copy(path, rank) if needs_universal(path, world) else path
    groups = [{k: g[k] for k in GROUP_SETTINGS if k in g} for g in engine.optimizer.param_groups]
    loaded, client = engine.load_checkpoint(
        str(load_from.parent), tag=load_from.name, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load {load_from}")
    step = int(client["step"])
    if elastic:
        check_no_persistent_buffers(engine.module)
        for optimizer in {id(o): o for o in _optimizers(engine)}.values():
            for group, settings in zip(optimizer.param_groups, groups, strict=True):
                group.update(settings)
        seed_streams(seed, step, rank)
    rank_state = read_rank_file(path / f"rank_{(rank if not elastic else 0):05d}.pt")
    if not elastic:
        set_rng_state(rank_state["rng"])
    scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
    if scaler is not None and "grad_scaler" in rank_state:
        scaler.load_state_dict(rank_state["grad_scaler"])
    resumed = {
        "checkpoint": str(path),
        "step": step,
        "from_world": meta["world_size"],
        "to_world": world,
        "elastic": elastic,
        "universal": str(load_from) if load_from != path else None,
        "weight_decay": [g.get("weight_decay") for g in engine.optimizer.param_groups],
    }
    return step, rank_state["loader"], resumed


def check_zero0_weights_dtype(path: Path, engine_dtype: torch.dtype) -> None:
    """Refuses, saying what to do, a ZeRO-0 checkpoint of 16-bit weights that an fp32 engine cannot load.

    A ZeRO-0 checkpoint holds the module as the engine trained it. One with 16-bit weights comes from
    DeepSpeed's own ZeRO-0 bf16/fp16 (FP16_UnfusedOptimizer, before this project moved ZeRO-0 to autocast over
    fp32 weights): its optimizer state does not load into an fp32 engine, so say what to do instead."""
    states = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", mmap=True, weights_only=False)
    dtype = next((v.dtype for v in states["module"].values() if v.is_floating_point()), engine_dtype)
    if dtype in (torch.bfloat16, torch.float16) and engine_dtype == torch.float32:
        raise CheckpointError(
            f"{path} holds ZeRO-0 weights in {str(dtype).replace('torch.', '')}: it was written by "
            f"DeepSpeed's own ZeRO-0 16-bit optimizer, which this version replaces by autocast over "
            f"fp32 weights, and its optimizer state does not load here. Start from its weights with "
            f"init_from={path} checkpoint.resume=none (the optimizer starts afresh), or resume it "
            f"with the version that wrote it"
        )


GROUP_SETTINGS = (
    "weight_decay",
    "betas",
    "eps",
    "amsgrad",
    "maximize",
    "foreach",
    "capturable",
    "differentiable",
    "fused",
)  # what create_optimizer decides per group; the LR comes from the schedule


def _optimizers(engine):
    """The optimizer objects whose param_groups DeepSpeed reads: its wrapper and the torch optimizer inside."""
    outer = engine.optimizer
    inner = getattr(outer, "optimizer", None)
    return [outer] + ([inner] if inner is not None and hasattr(inner, "param_groups") else [])


def check_no_persistent_buffers(module) -> None:
    """Refuses a universal load for a model with persistent buffers, which the load would lose.

    A universal load restores parameters and optimizer state, never module buffers: a model with persistent
    buffers (timm's Swin has none: its index and mask buffers are rebuilt) would silently lose them."""
    buffers = {name for name, _ in module.named_buffers()}
    persistent = sorted(k for k in module.state_dict() if k in buffers)
    if persistent:
        raise CheckpointError(
            f"the model has persistent buffers ({', '.join(persistent[:5])}), which an elastic "
            f"resume through a universal checkpoint does not restore: resume on the original world "
            f"size"
        )


def seed_streams(seed: int, step: int, rank: int) -> None:
    """Fresh per-rank RNG streams for a new world: the old ranks' states do not map onto the new ranks."""
    derived = np.random.default_rng([seed, step, rank, 7]).integers(0, 2**31, 3)
    random.seed(int(derived[0]))
    np.random.seed(int(derived[1]))
    torch.manual_seed(int(derived[2]))  # drop path; on GPUs every device's generator too, as at the start


def read_rank_file(own_file: Path) -> dict:
    """A rank file's RNG states and loader position; refused if it holds more than tensors and plain values.

    A rank file's RNG states and loader position, loaded with weights_only=True; a file holding anything but
    tensors and plain values is refused with a RuntimeError naming the first object it would have unpickled."""
    try:  # tensors and plain values only (rng_state): nothing in it is unpickled as code
        return torch.load(own_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), "")
        why = why.split(" was not an allowed global")[0].replace("WeightsUnpickler error: ", "") or str(e)[:200]
        raise CheckpointError(
            f"{own_file} holds more than tensors and plain values ({why}), so it is not loaded: "
            f"not a rank file this project wrote, which holds only those"
        ) from None


def _prune(root: Path, keep: int) -> None:
    if keep > 0:
        for old in complete_checkpoints(root)[:-keep]:
            (old / MARKER).unlink()  # incomplete first, so a kill mid-delete never leaves it looking complete
            shutil.rmtree(old)
            shutil.rmtree(old.with_name(old.name + ".universal"), ignore_errors=True)


def _write_durable(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
