"""Checkpoints that a killed job never leaves half-picked, that prove they are whole, and resume that is exact.

Invariants: `resume: auto` only ever loads a checkpoint whose files still have the sizes and checksums its marker
recorded (or, for a marker without them, that open as the archives they should be); one that does not is set
aside under a name it never picks again, and the run resumes from the newest one that passes (never silently from
scratch). A save that storage refuses (full, over quota, an I/O error) leaves nothing that looks like a
checkpoint and never touches the older ones.

Layout: `<run>/checkpoints/step_00001000/` holds DeepSpeed's own files (module, optimizer partitions,
loss scaler, step counters), one `rank_NNNNN.pt` per rank (torch/numpy/python RNG states, which DeepSpeed does
not keep and drop path draws from, and the loader's position; tensors and plain values, loaded with
`weights_only=True`), the run's `config.yaml`, its label layout `synsets.txt`, and `COMPLETE`,
written last, after every other file is written: it records each file's size and checksum (`files`, see
`file_checksums`; each rank hashes the files it wrote, read back once from the page cache). Everything is
written under `.tmp-step_...` and renamed by rank 0 once all ranks are done, so a job killed mid-write leaves
only a temporary folder, which `resume: auto` never picks and the next save removes.
Checkpoints must be on storage every rank sees (shared file system).
"""

from __future__ import annotations

import errno
import hashlib
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
import zipfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
CHECKSUM = "sha256 of the sha256 digests of its 64 MiB blocks"  # the marker's name for how `files` were hashed
BLOCK = 64 << 20  # blocks hashed in parallel (hashlib releases the GIL), so a big file uses every core of its rank
READ = 8 << 20
DAMAGED = ".damaged-"  # step_N.damaged-<reason>: set aside by a failed check; TAG never matches it


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


@dataclass
class Damage:
    """What is wrong with a checkpoint: the file (relative to it), a one-word reason, and what was found."""

    checkpoint: Path
    file: str
    reason: str  # missing | size | checksum | unreadable | marker | load: the suffix of the name it is set aside as
    detail: str

    def line(self) -> str:
        return f"{self.checkpoint / self.file if self.file else self.checkpoint}: {self.detail}"


class CheckpointDamaged(CheckpointError):
    """A checkpoint whose files are not the ones its marker recorded, or that does not load: named, with why."""


@dataclass
class ResumeChoice:
    """The checkpoint a run resumes from (None: a fresh start) and the damaged ones set aside on the way."""

    path: Path | None
    set_aside: list[str] = field(default_factory=list)  # one line each: the checkpoint, what was wrong, its new name
    verified: bool = False  # its files matched their checksums (False: a marker without them, accepted as it is)


def find_resume(cfg: RunConfig, rank: int = 0, world: int = 1) -> ResumeChoice:
    """The checkpoint this run resumes from, checked; every rank calls it and gets the same answer.

    `resume: auto`: the newest complete checkpoint in the run's folder that passes its check (`check_checkpoint`,
    each rank checking a share of its files); each newer one that fails is set aside (`set_aside`) and named in
    the log. Refused (CheckpointDamaged) when checkpoints existed and none passes, so a run never silently starts
    over. An explicit path must pass its check too (it is not renamed: it may be another run's)."""
    how = cfg.checkpoint.resume
    if how == "none":
        return ResumeChoice(None)
    if how != "auto":
        path = Path(how)
        if not (path / MARKER).is_file():
            raise FileNotFoundError(f"checkpoint.resume={how}: not a complete checkpoint (no {MARKER} marker)")
        damage, verified = agreed_check(path, rank, world)
        if damage is not None:
            raise CheckpointDamaged(f"checkpoint.resume={how} is damaged: {damage.line()}: give another checkpoint")
        return ResumeChoice(path, verified=verified)
    root = cfg.run_dir / "checkpoints"
    choice = ResumeChoice(None)
    for path in reversed(complete_checkpoints(root)):
        damage, verified = agreed_check(path, rank, world)
        if damage is None:
            choice.path, choice.verified = path, verified
            break
        choice.set_aside.append(set_aside(damage, rank))
    if choice.set_aside:
        barrier()  # rank 0 renamed them: every rank sees the folder as it now is
    damaged = sorted(p.name for p in root.glob(f"step_*{DAMAGED}*")) if root.is_dir() else []
    if choice.path is None and damaged:
        raise CheckpointDamaged(
            f"no checkpoint in {root} passes its check (set aside: {', '.join(damaged)}; "
            f"{'; '.join(choice.set_aside) or 'by an earlier job'}): "
            f"copy an intact one back as step_NNNNNNNN, or start over with checkpoint.resume=none"
        )
    if choice.set_aside and rank == 0:
        log.warning(
            "resuming from %s, the newest checkpoint that passed its check (set aside: %s)",
            choice.path,
            "; ".join(choice.set_aside),
        )
    return choice


def agreed_check(path: Path, rank: int, world: int) -> tuple[Damage | None, bool]:
    """`check_checkpoint` shared among the ranks (a collective): the first damage any rank found, on every rank,
    and whether the checkpoint had checksums to check."""
    found = all_gather_object(check_checkpoint(path, rank, world))
    damage = next((d for d, _ in found if d is not None), None)
    return damage, all(verified for _, verified in found)


def check_checkpoint(path: Path, rank: int = 0, world: int = 1) -> tuple[Damage | None, bool]:
    """What is wrong with share `rank` of `world` of the checkpoint's files (None: nothing), and whether its marker
    had checksums to check.

    Every file the marker lists must have its size and checksum; a marker written before checksums were kept is
    accepted when each of its `.pt` files opens as the zip archive torch writes (a truncated one does not), with a
    warning that it could not be verified. Reads each file of the share once (seconds per GB: docs/performance.md)."""
    try:
        meta = checkpoint_meta(path)
    except (OSError, ValueError) as e:
        return Damage(path, MARKER, "marker", f"its {MARKER} marker is unreadable ({e})"), False
    files = meta.get("files")
    if not isinstance(files, dict):
        if rank == 0:
            log.warning("%s was saved without checksums: it cannot be verified, only opened", path)
        return _probe_archives(path, sorted(p.name for p in path.glob("*.pt"))[rank::world]), False
    mine = _shares({name: entry["size"] for name, entry in files.items()}, world)[rank]
    for name in mine:
        try:
            size = (path / name).stat().st_size
        except FileNotFoundError:
            return Damage(path, name, "missing", "missing"), True
        except OSError as e:
            return Damage(path, name, "unreadable", f"unreadable ({e.strerror})"), True
        if size != files[name]["size"]:
            return Damage(path, name, "size", f"{size} bytes, its marker says {files[name]['size']}"), True
    try:
        sums = file_checksums([path / name for name in mine])
    except OSError as e:
        name = Path(e.filename or "").name
        return Damage(path, name, "unreadable", f"unreadable ({e.strerror})"), True
    for name in mine:
        if sums[path / name]["checksum"] != files[name]["checksum"]:
            return Damage(path, name, "checksum", "its checksum differs from its marker's: the file was changed"), True
    return None, True


def verify_checkpoint(path: Path) -> bool:
    """Raises CheckpointDamaged naming the file and what is wrong, unless the whole checkpoint passes its check
    (in this process: for readers that run on one rank, the export and the universal conversion); whether it had
    checksums to check."""
    damage, verified = check_checkpoint(path)
    if damage is not None:
        raise CheckpointDamaged(f"checkpoint {path} is damaged: {damage.line()}")
    return verified


def set_aside(damage: Damage, rank: int) -> str:
    """Rank 0 renames a damaged checkpoint `<name>.damaged-<reason>` (kept for a look, never picked again) and
    drops its universal copy; a line saying so."""
    path = damage.checkpoint
    if rank != 0:
        return f"{path.name}: {damage.line()}"
    new = path.with_name(f"{path.name}{DAMAGED}{damage.reason}")
    n = 1
    while new.exists():
        n += 1
        new = path.with_name(f"{path.name}{DAMAGED}{damage.reason}-{n}")
    os.replace(path, new)
    shutil.rmtree(path.with_name(path.name + ".universal"), ignore_errors=True)
    _fsync_dir(path.parent)
    log.warning("checkpoint %s is damaged: %s; set aside as %s", path, damage.line(), new.name)
    return f"{damage.line()} (set aside as {new.name})"


def _probe_archives(path: Path, names: list[str]) -> Damage | None:
    """The first of `names` that does not open as a zip archive (torch.save's format), or None."""
    for name in names:
        try:
            with zipfile.ZipFile(path / name):
                pass
        except (OSError, zipfile.BadZipFile) as e:
            return Damage(path, name, "unreadable", f"does not open as torch's zip archive ({e})")
    return None


def _shares(sizes: dict[str, int], world: int) -> list[list[str]]:
    """The files split among `world` ranks by size (largest first, each to the least loaded), the same on every
    rank."""
    shares: list[list[str]] = [[] for _ in range(world)]
    loads = [0] * world
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        least = loads.index(min(loads))
        shares[least].append(name)
        loads[least] += sizes[name]
    return shares


def file_checksums(paths: Iterable[Path], threads: int = 0) -> dict[Path, dict]:
    """Each file's {"size", "checksum"} (CHECKSUM), its 64 MiB blocks hashed on `threads` threads (0: the rank's
    torch threads, its share of the node's cores)."""
    sizes = {path: path.stat().st_size for path in paths}
    blocks = [(path, offset) for path, size in sizes.items() for offset in range(0, max(size, 1), BLOCK)]
    with ThreadPoolExecutor(threads or max(1, torch.get_num_threads())) as pool:
        digests = list(pool.map(lambda block: _block_digest(*block), blocks))
    whole = {path: hashlib.sha256() for path in sizes}
    for (path, _offset), digest in zip(blocks, digests, strict=True):
        whole[path].update(digest)
    return {path: {"size": sizes[path], "checksum": whole[path].hexdigest()} for path in sizes}


def _block_digest(path: Path, offset: int) -> bytes:
    digest, left, buffer = hashlib.sha256(), BLOCK, bytearray(READ)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while left > 0:
            n = f.readinto(view[: min(READ, left)])
            if not n:
                break
            digest.update(view[:n])
            left -= n
    return digest.digest()


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


class SaveFailed(RuntimeError):
    """Storage refused a save (full, over quota, an I/O error) on some rank; raised on every rank alike.

    Nothing of the save is left (its temporary folder is removed) and older checkpoints are untouched."""

    def __init__(self, step: int, path: Path, why: str, free: int | None):
        super().__init__(f"checkpoint {path} not saved: {why} ({free_text(free)} free)")
        self.step, self.path, self.why, self.free = step, path, why, free

    def __reduce__(self):  # every rank raises rank 0's (broadcast_object pickles)
        return SaveFailed, (self.step, self.path, self.why, self.free)


STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO)
# what torch's and DeepSpeed's writers say when the file system refused a write (no errno in the message)
WRITER_FAILURES = ("PytorchStreamWriter failed", "iostream error", "file write failed", "unexpected pos")


def storage_failure(e: BaseException) -> str | None:
    """What a failed write says of the storage (ENOSPC, EDQUOT, EIO anywhere in its chain, or torch's writer's own
    words for a refused write anywhere in it), or None for any other error."""
    chain: list[BaseException] = []
    seen: BaseException | None = e
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for link in chain:
        if isinstance(link, OSError) and link.errno in STORAGE_ERRNOS:
            return os.strerror(link.errno).lower()
    for link in reversed(chain):  # the innermost says most ("basic_ios::clear: iostream error")
        text = str(link).strip()
        if isinstance(link, RuntimeError) and any(words in text for words in WRITER_FAILURES):
            return f"the file system refused a write (torch: {text.splitlines()[-1][:160]})"
    return None


def free_text(free: int | None) -> str:
    return "unknown space" if free is None else f"{free / 1e6:.1f} MB"


def free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


@dataclass
class _Attempt:
    """This rank's part of one save: the files it wrote, and the storage failure that stopped it, if any."""

    written: list[Path] = field(default_factory=list)
    failure: str | None = None

    def write(self, path: Path, write: Callable[[], object], checkpoint_file: bool = True) -> None:
        """Runs `write` (which writes `path`, one of the checkpoint's files unless `checkpoint_file` is False)
        unless an earlier write failed; a storage failure is kept, not raised, so that every rank reaches the same
        collectives and agrees."""
        if self.failure is not None:
            return
        try:
            write()
        except Exception as e:
            why = storage_failure(e)
            if why is None:
                raise
            self.failure = f"{why} writing {path}"
        else:
            if checkpoint_file:
                self.written.append(path)

    def checksums(self, paths: list[Path]) -> dict[Path, dict]:
        """`file_checksums` of what was written ({} after a failure); a read the storage refuses is kept as the
        failure, like a refused write."""
        if self.failure is not None:
            return {}
        try:
            return file_checksums(paths)
        except OSError as e:
            self.failure = f"{e.strerror or e} reading back {e.filename}"
            return {}


class _GuardedEngine:
    """DeepSpeed's writes of one save routed through an _Attempt: a refused write is kept, not raised, so that
    every rank still reaches DeepSpeed's own barriers (a rank raising out of them would leave the others waiting
    in a collective it never joins)."""

    def __init__(self, engine, attempt: _Attempt):
        self.engine, self.attempt = engine, attempt

    def __enter__(self):
        engine, attempt = self.engine, self.attempt
        save, copy_scripts = engine.checkpoint_engine.save, engine._copy_recovery_script

        def guarded_save(state_dict, path):
            attempt.write(Path(path), lambda: save(state_dict, path))

        def guarded_scripts(save_path):  # DeepSpeed's zero_to_fp32.py copies beside the checkpoints (rank 0)
            attempt.write(Path(save_path), lambda: copy_scripts(save_path), checkpoint_file=False)

        engine.checkpoint_engine.save, engine._copy_recovery_script = guarded_save, guarded_scripts
        return self

    def __exit__(self, *exc):
        del self.engine.checkpoint_engine.save, self.engine._copy_recovery_script  # the class's own again


def save_checkpoint(
    engine,
    cfg: RunConfig,
    step: int,
    rank: int,
    world: int,
    loader_state: dict,
    synsets: list[str],
    meta: dict | None = None,
    keep: Path | None = None,
    checksums: bool = True,
) -> Path:
    """A complete checkpoint at `step` (every rank calls it), or SaveFailed on every rank when storage refused it.

    `meta`: more for the COMPLETE marker (a stop's signal; an evaluation the resumed run owes). `keep`: a
    checkpoint pruning must not delete (the newest that passed a check). `checksums`: record each file's checksum
    (off only to measure what they cost: bench/checkpoint_integrity.py)."""
    root = cfg.run_dir / "checkpoints"
    tag = tag_for(step)
    tmp = root / f".tmp-{tag}"
    attempt = _Attempt()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    # universal_checkpoint_info: what DeepSpeed's ds_to_universal needs to convert it for another world size
    with _GuardedEngine(engine, attempt):
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
    own = tmp / f"rank_{rank:05d}.pt"
    attempt.write(own, lambda: _write_durable(own, lambda f: torch.save(rank_state, f)))
    if rank == 0:
        attempt.write(tmp / "config.yaml", lambda: dump_config(cfg, tmp / "config.yaml"))
        # the label layout, for export
        attempt.write(tmp / "synsets.txt", lambda: (tmp / "synsets.txt").write_text("\n".join(synsets) + "\n"))
    # each rank hashes what it wrote, read back once from the page cache (DeepSpeed's engine writes to a path)
    sums = attempt.checksums(attempt.written) if checksums else {}
    parts = all_gather_object((attempt.failure, {p.name: v for p, v in sums.items()}))
    failure = next((f"rank {r}: {why}" for r, (why, _) in enumerate(parts) if why is not None), None)
    if rank == 0 and failure is None:
        files = {name: entry for _, part in parts for name, entry in part.items()}
        if checksums:  # anything no rank named (files DeepSpeed writes outside its engine): hashed here
            rest = [p for p in sorted(tmp.iterdir()) if p.is_file() and p.name not in files]
            files.update({p.name: v for p, v in attempt.checksums(rest).items()})
        record = {
            "step": step,
            "world_size": world,
            "zero_stage": cfg.train.zero_stage,
            "time": time.time(),
            "global_batch": cfg.train.global_batch,
            "micro_batch": cfg.train.micro_batch,
            **(meta or {}),
            **({"checksum": CHECKSUM, "files": dict(sorted(files.items()))} if checksums else {}),
        }
        marker = tmp / MARKER
        attempt.write(marker, lambda: _write_durable(marker, lambda f: f.write(json.dumps(record).encode())))
        failure = attempt.failure
    if rank == 0 and failure is None:
        final = root / tag
        if final.exists():  # the same step saved again (a resumed run that stopped at the same step)
            shutil.rmtree(final)
        shutil.rmtree(final.with_name(final.name + ".universal"), ignore_errors=True)  # made from what it replaces
        os.replace(tmp, final)
        _fsync_dir(root)
        _prune(root, cfg.checkpoint.keep_last, keep)
        for stale in [*root.glob(".tmp-step_*"), *root.glob(".tmp-universal-*")]:  # left by a killed job
            shutil.rmtree(stale, ignore_errors=True)
        log.info("checkpoint %s", final)
    elif rank == 0:  # nothing a resume could take for a checkpoint, and the space back
        shutil.rmtree(tmp, ignore_errors=True)
    failure = broadcast_object(failure)  # rank 0's outcome, once it is done: every rank leaves alike
    if failure is not None:
        raise SaveFailed(step, root / tag, failure, free_bytes(root))
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
        verify_checkpoint(path)  # before ds_to_universal reads it (the others learn of a failure at the wait)
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


def _prune(root: Path, keep_last: int, keep: Path | None = None) -> None:
    """Deletes all but the newest `keep_last` complete checkpoints, and never `keep`."""
    if keep_last > 0:
        for old in complete_checkpoints(root)[:-keep_last]:
            if keep is not None and old.name == keep.name:
                continue
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
