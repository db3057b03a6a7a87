"""The DALI backend: decodes only each planned crop window, then resizes, flips and normalises.

The DALI backend: JPEG bytes and the planned crops come in through an external source; DALI decodes just the
crop window (fn.decoders.image_slice: on the GPU as device 'mixed', in DALI's CPU-only mode otherwise), resizes,
flips and normalises.

DALI cannot skip a sample it fails to decode: the loader then stops with an error naming the shard and sample
(found by decoding that batch's samples on the host) and the `data_prep verify` command to run.
"""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import simplejpeg
import torch

from pipeline.config import ConfigError

from .augment_params import eval_resize
from .samples import MEAN, STD, DataError


class DaliBackend:
    """The DALI pipeline of the current epoch, and the checkpoint of its operators' RNG.

    Holds the running pipeline and, when DALI's own operators draw (RandAugment), the DALI checkpoint that
    resumes their RNG mid-epoch.

    A pipeline is built per epoch (and per evaluation) on purpose: its operators' seed is a function of (seed,
    epoch, rank, first batch), which exact resume on any world size relies on, and DALI cannot reseed a built
    pipeline. The build is cheap next to an epoch (docs/performance.md, "Figures behind the code")."""

    name = "dali"
    reads_ahead_here = True  # its feeder thread reads batches ahead of the ones handed out

    def __init__(self, cfg, device: str):
        self.cfg, self.device = cfg, device
        if device == "cuda":
            check_dali_gpu()
        self.pipe = None  # the epoch's running pipeline
        self._checkpoint: bytes | None = None  # DALI's state to resume from, when it draws

    def draws(self) -> bool:
        """Whether DALI's own random operators (RandAugment) shape the batches."""
        return self.cfg.train and bool(self.cfg.rand_augment)

    def batches(self, source, order, epoch: int, start: int, end: int):
        return _dali_batches(self, source, order, epoch, start, end)

    def state_dict(self, position: int) -> dict:
        if position == 0 or not self.draws():
            return {}
        checkpoint = self.pipe.checkpoint() if self.pipe is not None else self._checkpoint
        return {"dali_checkpoint": base64.b64encode(checkpoint).decode()} if checkpoint is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if "dali_checkpoint" in state:
            self._checkpoint = base64.b64decode(state["dali_checkpoint"])

    def new_epoch(self) -> None:
        self._checkpoint = None

    def keep_state(self, pipe) -> None:
        """Called when iteration stops mid-epoch: the state to resume from, before the pipeline goes."""
        self._checkpoint = pipe.checkpoint() if self.draws() else None

    def take_checkpoint(self, start: int) -> bytes | None:
        """The DALI state to resume from, once: a later epoch starts fresh."""
        checkpoint, self._checkpoint = self._checkpoint, None
        return checkpoint if start > 0 else None


def check_dali_gpu() -> None:
    """Stops with one line when the installed DALI has no kernels for this rank's GPU.

    Stops with one line when the installed DALI wheel has no kernels for this rank's GPU (a CUDA 13 DALI on a
    V100): DALI itself would fail at the first GPU operator of the first batch."""
    from swin_common.gpu import check_dali_kernels, current_gpu, dali_package

    found = dali_package()
    if found is not None:
        check_dali_kernels(current_gpu(), *found)


def rand_augment_args(policy: str) -> tuple[int, int]:
    """(n, m) of a timm RandAugment string such as 'rand-m9-mstd0.5-inc1' (n defaults to 2, as in timm)."""
    parts = policy.split("-")
    if parts[0] != "rand":
        raise ConfigError(f"data.rand_augment: not a RandAugment policy: {policy!r}")
    args = {p[0]: p[1:] for p in parts[1:] if p and p[0] in "nm" and not p.startswith("mstd")}
    return int(args.get("n", 2)), int(float(args.get("m", 9)))


def _build(cfg, device: str, seed_key: tuple[int, ...], source, train: bool, checkpoint: bytes | None = None):
    """The DALI pipeline; `seed_key` is (epoch, rank, first batch)."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.auto_aug import rand_augment

    gpu = device == "cuda"
    size = cfg.image_size
    augment = train and cfg.rand_augment
    # DALI's own random operators (RandAugment) get a seed per (seed, epoch, rank, first batch); their state at a
    # batch is what DALI's checkpoint holds, so the loader stores it for an exact resume on as many ranks. On
    # another number of ranks the checkpoint does not apply (DALI: a changed num_shards is undefined), and a
    # pipeline starting mid-epoch draws from the seed of where it starts.
    seed = int(np.random.default_rng([cfg.seed, *seed_key]).integers(0, 2**31))

    # workers=0 (the DataLoader's 'in this process') is one DALI thread: DALI needs at least one to run
    @pipeline_def(
        batch_size=cfg.batch_size,
        num_threads=max(1, cfg.workers),
        # None: no GPU (DALI's Pipeline takes device_id=None; pipeline_def's overload stub says int only)
        device_id=torch.cuda.current_device() if gpu else None,  # type: ignore[arg-type]
        seed=seed,
        prefetch_queue_depth=2,
        enable_conditionals=bool(augment),
        enable_checkpointing=bool(augment),
        checkpoint=checkpoint,
    )
    def pipe():
        decoder = "mixed" if gpu else "cpu"
        if train:
            jpegs, labels, anchors, shapes, mirror = fn.external_source(
                source=source,
                num_outputs=5,
                batch=True,
                batch_info=True,
                dtype=[types.UINT8, types.INT64, types.FLOAT, types.FLOAT, types.INT32],
            )
            images = fn.decoders.image_slice(
                jpegs,
                anchors,
                shapes,
                device=decoder,
                output_type=types.RGB,
                normalized_anchor=False,
                normalized_shape=False,
            )
            # antialiased linear (DALI's default filter): 25% less CPU than antialiased cubic, which is what PIL's
            # bicubic in the torch backend does; the crops and flips themselves are the same
            images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=True)
            if augment:
                n, m = rand_augment_args(cfg.rand_augment)
                # DALI's policy, not timm's: see docs/loading.md "RandAugment on DALI" for the differences
                images = rand_augment.rand_augment(
                    images, n=n, m=m, num_magnitude_bins=11, max_translate_abs=int(0.45 * size), fill_value=128
                )
            images = fn.crop_mirror_normalize(
                images,
                mirror=mirror,
                dtype=types.FLOAT,
                output_layout="CHW",
                mean=[255 * m for m in MEAN],
                std=[255 * s for s in STD],
            )
        else:
            jpegs, labels = fn.external_source(
                source=source, num_outputs=2, batch=True, batch_info=True, dtype=[types.UINT8, types.INT64]
            )
            images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
            images = fn.resize(
                images, resize_shorter=eval_resize(size, cfg.crop_pct), interp_type=types.INTERP_CUBIC, antialias=True
            )
            images = fn.crop_mirror_normalize(
                images,
                crop=(size, size),
                dtype=types.FLOAT,
                output_layout="CHW",
                mean=[255 * m for m in MEAN],
                std=[255 * s for s in STD],
            )
        return images, labels.gpu() if gpu else labels

    p = pipe()
    p.build()
    return p


class _Source:
    """DALI's external source: batch start+i on the i-th call (DALI asks in order, a few batches ahead).

    A feeder
    thread reads the shards and plans the crops of the next `ahead` batches, so that work (file or cache reads,
    numpy) overlaps the GPU's instead of running inside pipe.run() in the training thread."""

    def __init__(self, source, order, epoch: int, start: int, end: int, ahead: int = 4):
        self.source, self.order, self.epoch, self.next, self.end = source, order, epoch, start, end
        self.refs: dict[int, list[tuple[int, int]]] = {}
        self._ready: dict[int, object] = {}
        self._ahead, self._closed = ahead, False
        self._cond = threading.Condition()
        self._feeder = threading.Thread(target=self._feed, args=(start,), name="dali-feeder", daemon=True)
        self._feeder.start()

    def _feed(self, start: int) -> None:
        for b in range(start, self.end):
            with self._cond:
                while len(self._ready) >= self._ahead and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            try:
                item = self._make(b)
            except BaseException as e:  # noqa: BLE001  (raised in DALI's call for that batch)
                item = e
            with self._cond:
                self._ready[b] = item
                self._cond.notify_all()
            if isinstance(item, BaseException):
                return

    def _make(self, b: int):
        source = self.source
        refs, data, labels = source.read_batch(self.order, b)
        jpegs, labels = [np.frombuffer(jpg, np.uint8) for jpg in data], [np.array([lab]) for lab in labels]
        if not source.cfg.train:
            return refs, (jpegs, labels)
        boxes, flip = source.crops(self.epoch, self.order.slot(b), data)
        return refs, (
            jpegs,
            labels,
            [box[:2].astype(np.float32) for box in boxes],
            [box[2:].astype(np.float32) for box in boxes],
            [np.array(f, np.int32) for f in flip],
        )

    def __call__(self, info):
        b = self.next  # our own count: a pipeline restored from a checkpoint counts its iterations on
        if b >= self.end:
            raise StopIteration
        self.next += 1
        with self._cond:
            while b not in self._ready:
                self._cond.wait()
            item = self._ready.pop(b)
            self._cond.notify_all()
        if isinstance(item, BaseException):
            raise item
        self.refs[b], batch = item
        return batch

    def close(self) -> None:
        """Stops the feeder (before the main thread reads shards itself, or when the epoch's iteration ends)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._feeder.join()


def _dali_batches(backend: DaliBackend, batch_source, order, epoch: int, start: int, end: int):
    if start >= end:
        return
    source = _Source(batch_source, order, epoch, start, end)
    checkpoint = backend.take_checkpoint(start)
    try:
        pipe = _build(
            backend.cfg, backend.device, (epoch, batch_source.rank, start), source, backend.cfg.train, checkpoint
        )
    except BaseException:
        source.close()
        raise
    backend.pipe = pipe
    gpu = backend.device == "cuda"
    handed = start
    try:
        for b in range(start, end):
            try:
                images, labels = pipe.run()
            except StopIteration:
                return
            except RuntimeError as e:
                source.close()
                raise _name_the_bad_sample(batch_source, source.refs.get(b, []), e) from None
            source.refs.pop(b, None)
            handed = b + 1  # before the yield: a consumer that stops here has taken batch b
            yield b, _to_torch(images, gpu), _to_torch(labels, gpu).view(-1), 0
    finally:
        source.close()
        if handed < end and pipe is backend.pipe:  # stopped mid-epoch: keep DALI's state to resume
            backend.keep_state(pipe)
        backend.pipe = None  # the pipeline and its threads go now, not at some later garbage collection
        del pipe


def _to_torch(batch, gpu: bool) -> torch.Tensor:
    """A copy of DALI's output as a torch tensor (DALI reuses its buffers on the next run)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    tensor = batch.as_tensor()
    dtype = torch.float32 if tensor.dtype.name == "FLOAT" else torch.int64
    out = torch.empty(tensor.shape(), dtype=dtype, device="cuda" if gpu else "cpu")
    feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream() if gpu else None)
    return out


def _name_the_bad_sample(source, refs, error: Exception) -> DataError:
    culprits = []
    for shard, sample in refs:
        jpg, _label = source.reader.read(shard, sample)
        why = _why_it_does_not_decode(jpg)
        if why is not None:
            culprits.append(f"{source.name(shard, sample)}: {why}")
    where = (
        "; ".join(culprits)
        or f"one of the batch's samples ({len(refs)} from shards "
        f"{sorted({source.reader.shard_name(s) for s, _ in refs})})"
    )
    return DataError(
        f"DALI could not decode {where}. DALI cannot skip a sample: run "
        f"`python -m data_prep verify {source.url}` and re-shard what it reports. "
        f"(DALI said: {str(error).splitlines()[0] if str(error) else error!r})"
    )


def _why_it_does_not_decode(data: bytes) -> str | None:
    """None when the image decodes: a JPEG by simplejpeg (strict), any other image (PNG, WebP) by PIL."""
    if data[:3] == b"\xff\xd8\xff":
        try:
            simplejpeg.decode_jpeg(data, strict=True)
        except ValueError as e:
            return str(e)
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as e:  # noqa: BLE001  (PIL raises many kinds for bad bytes; each is this sample's fault)
        return f"{type(e).__name__}: {e}"
    return None
