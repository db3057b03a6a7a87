"""The DALI backend: JPEG bytes and the planned crops come in through an external source; DALI decodes just the
crop window (fn.decoders.image_slice: on the GPU as device 'mixed', in DALI's CPU-only mode otherwise), resizes,
flips and normalises.

DALI cannot skip a sample it fails to decode: the loader then stops with an error naming the shard and sample
(found by decoding that batch's samples on the host) and the `data_prep verify` command to run.
"""
from __future__ import annotations

import numpy as np
import simplejpeg
import torch

from .augment_params import eval_resize
from .loader import MEAN, STD, DataError


def rand_augment_args(policy: str) -> tuple[int, int]:
    """(n, m) of a timm RandAugment string such as 'rand-m9-mstd0.5-inc1' (n defaults to 2, as in timm)."""
    parts = policy.split("-")
    if parts[0] != "rand":
        raise ValueError(f"not a RandAugment policy: {policy!r}")
    args = {p[0]: p[1:] for p in parts[1:] if p and p[0] in "nm" and not p.startswith("mstd")}
    return int(args.get("n", 2)), int(float(args.get("m", 9)))


def _build(loader, source, train: bool, checkpoint: bytes | None = None):
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.auto_aug import rand_augment

    cfg = loader.cfg
    gpu = loader.device == "cuda"
    size = cfg.image_size
    augment = train and cfg.rand_augment
    # DALI's own random operators (RandAugment) get a seed per (seed, epoch, rank); their state at a batch is
    # what DALI's checkpoint holds, so the loader stores it for an exact resume.
    seed = int(np.random.default_rng([cfg.seed, loader.epoch, loader.rank]).integers(0, 2**31))

    @pipeline_def(batch_size=cfg.batch_size, num_threads=cfg.workers,
                  device_id=torch.cuda.current_device() if gpu else None, seed=seed,
                  prefetch_queue_depth=2, enable_conditionals=bool(augment),
                  enable_checkpointing=bool(augment), checkpoint=checkpoint)
    def pipe():
        decoder = "mixed" if gpu else "cpu"
        if train:
            jpegs, labels, anchors, shapes, mirror = fn.external_source(
                source=source, num_outputs=5, batch=True, batch_info=True,
                dtype=[types.UINT8, types.INT64, types.FLOAT, types.FLOAT, types.INT32])
            images = fn.decoders.image_slice(jpegs, anchors, shapes, device=decoder, output_type=types.RGB,
                                             normalized_anchor=False, normalized_shape=False)
            # antialiased linear (DALI's default filter): 25% less CPU than antialiased cubic, which is what PIL's
            # bicubic in the torch backend does; the crops and flips themselves are the same
            images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR,
                               antialias=True)
            if augment:
                n, m = rand_augment_args(cfg.rand_augment)
                # DALI's policy, not timm's: see README "RandAugment on DALI" for the differences
                images = rand_augment.rand_augment(images, n=n, m=m, num_magnitude_bins=11,
                                                   max_translate_abs=int(0.45 * size), fill_value=128)
            images = fn.crop_mirror_normalize(images, mirror=mirror, dtype=types.FLOAT, output_layout="CHW",
                                              mean=[255 * m for m in MEAN], std=[255 * s for s in STD])
        else:
            jpegs, labels = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                                               dtype=[types.UINT8, types.INT64])
            images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=eval_resize(size, cfg.crop_pct),
                               interp_type=types.INTERP_CUBIC, antialias=True)
            images = fn.crop_mirror_normalize(images, crop=(size, size), dtype=types.FLOAT, output_layout="CHW",
                                              mean=[255 * m for m in MEAN], std=[255 * s for s in STD])
        return images, labels.gpu() if gpu else labels

    p = pipe()
    p.build()
    return p


class _Source:
    """DALI's external source: batch start+i on the i-th call (DALI asks in order, a few batches ahead)."""

    def __init__(self, loader, order, start: int, end: int):
        self.loader, self.order, self.next, self.end = loader, order, start, end
        self.refs: dict[int, list[tuple[int, int]]] = {}

    def __call__(self, info):
        b = self.next  # our own count: a pipeline restored from a checkpoint counts its iterations on
        if b >= self.end:
            raise StopIteration
        self.next += 1
        loader = self.loader
        refs, data, labels = loader.read_batch(self.order, b)
        self.refs[b] = refs
        jpegs, labels = [np.frombuffer(jpg, np.uint8) for jpg in data], [np.array([lab]) for lab in labels]
        if not loader.cfg.train:
            return jpegs, labels
        boxes, flip = loader.crops(b, data)
        return (jpegs, labels, [box[:2].astype(np.float32) for box in boxes],
                [box[2:].astype(np.float32) for box in boxes], [np.array(f, np.int32) for f in flip])


def _dali_batches(loader, order, start: int, end: int):
    if start >= end:
        return
    source = _Source(loader, order, start, end)
    checkpoint = loader.take_dali_checkpoint()
    pipe = _build(loader, source, loader.cfg.train, checkpoint)
    loader.dali_pipe = pipe
    gpu = loader.device == "cuda"
    try:
        for b in range(start, end):
            try:
                images, labels = pipe.run()
            except StopIteration:
                return
            except RuntimeError as e:
                raise _name_the_bad_sample(loader, source.refs.get(b, []), e) from None
            source.refs.pop(b, None)
            yield b, _to_torch(images, gpu), _to_torch(labels, gpu).view(-1), 0
    finally:
        if loader.position < end and pipe is loader.dali_pipe:  # stopped mid-epoch: keep DALI's state to resume
            loader.keep_dali_state(pipe)
        loader.dali_pipe = None  # the pipeline and its threads go now, not at some later garbage collection
        del pipe


def _to_torch(batch, gpu: bool) -> torch.Tensor:
    """A copy of DALI's output as a torch tensor (DALI reuses its buffers on the next run)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    tensor = batch.as_tensor()
    dtype = torch.float32 if tensor.dtype.name == "FLOAT" else torch.int64
    out = torch.empty(tensor.shape(), dtype=dtype, device="cuda" if gpu else "cpu")
    feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream() if gpu else None)
    return out


def _name_the_bad_sample(loader, refs, error: Exception) -> DataError:
    culprits = []
    for shard, sample in refs:
        jpg, _label = loader.reader.read(shard, sample)
        try:
            simplejpeg.decode_jpeg(jpg, strict=True)
        except ValueError as e:
            culprits.append(f"{loader.name(shard, sample)}: {e}")
    where = "; ".join(culprits) or f"one of the batch's samples ({len(refs)} from shards " \
        f"{sorted({loader.reader.shard_name(s) for s, _ in refs})})"
    return DataError(f"DALI could not decode {where}. DALI cannot skip a sample: run "
                     f"`python -m data_prep verify {loader.shard_set.url}` and re-shard what it reports. "
                     f"(DALI said: {str(error).splitlines()[0] if str(error) else error!r})")
