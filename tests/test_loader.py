"""pipeline.data.loader on CPU: both backends, the batch contract, ranks, epochs, exact resume, bad samples."""

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import run_prep
from pipeline.data.loader import DataError, LoaderConfig, create_loader


def config(shards, **kw) -> LoaderConfig:
    base = {"shards": str(shards), "batch_size": 32, "image_size": 64, "workers": 2}
    return LoaderConfig(**{**base, **kw})


def take(loader, n=None):
    out = []
    for i, batch in enumerate(loader):
        out.append(batch)
        if n is not None and i + 1 == n:
            break
    return out


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_batch_contract(shards, backend):
    loader = create_loader(config(shards, backend=backend))
    batches = take(loader)
    assert len(batches) == len(loader) == (1797 - 100) // 32
    images, labels = batches[0]
    assert images.shape == (32, 3, 64, 64) and images.dtype == torch.float32
    assert labels.shape == (32,) and labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 10
    assert -2.2 < images.min() < -1.5 and 1.5 < images.max() < 2.7  # normalised with ImageNet mean/std
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 0


def test_both_backends_read_the_same_samples_with_the_same_crops(shards):
    a = take(create_loader(config(shards, backend="torch")), 5)
    b = take(create_loader(config(shards, backend="dali")), 5)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(ya, yb)
        assert (xa - xb).abs().mean() < 0.05  # same crop and flip; decoders and resizers differ slightly


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_gets_the_same_number_of_batches(shards, world):
    counts = [
        len(take(create_loader(config(shards, backend="torch", workers=0), rank=r, world=world))) for r in range(world)
    ]
    assert counts == [(1697 // world) // 32] * world


def test_each_epoch_is_shuffled_afresh(shards):
    loader = create_loader(config(shards, backend="torch", workers=0))
    first = torch.cat([y for _, y in take(loader)])
    second = torch.cat([y for _, y in take(loader)])
    assert loader.epoch == 2 and not torch.equal(first, second)
    assert len(first) == len(second) == (1697 // 32) * 32
    assert sum((Counter(first.tolist()) - Counter(second.tolist())).values()) <= 1697 % 32


@pytest.mark.parametrize(
    "backend,extra",
    [
        ("torch", {"rand_augment": "rand-m9-mstd0.5-inc1", "mixup": 0.8, "cutmix": 1.0, "random_erasing": 0.25}),
        ("dali", {"mixup": 0.8, "cutmix": 1.0, "random_erasing": 0.25}),
        ("dali", {"rand_augment": "rand-m9-mstd0.5-inc1"}),  # DALI's RNG state rides in the loader state
    ],
)
def test_resume_mid_epoch_yields_exactly_the_same_batches(shards, backend, extra):
    cfg = config(shards, backend=backend, seed=3, **extra)
    whole = take(create_loader(cfg))
    loader = create_loader(cfg)
    take(loader, 7)
    state = json.loads(json.dumps(loader.state_dict()))  # what a checkpoint stores
    assert state["position"] == 7
    resumed = take(create_loader(cfg, state=state))
    assert len(resumed) == len(whole) - 7
    for (xa, ya), (xb, yb) in zip(whole[7:], resumed, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_on_cuda_yields_exactly_the_same_batches(shards):
    """DALI's mixed decode (nvJPEG) and RandAugment on the GPU, batches on the GPU: the same exact resume."""
    cfg = config(
        shards,
        backend="dali",
        device="cuda",
        seed=3,
        rand_augment="rand-m9-mstd0.5-inc1",
        mixup=0.8,
        random_erasing=0.25,
    )
    whole = take(create_loader(cfg))
    assert whole[0][0].is_cuda
    loader = create_loader(cfg)
    take(loader, 7)
    resumed = take(create_loader(cfg, state=json.loads(json.dumps(loader.state_dict()))))
    assert len(resumed) == len(whole) - 7
    for (xa, ya), (xb, yb) in zip(whole[7:], resumed, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_torch_backend_in_process_puts_batches_on_the_gpu_and_seeds_its_erasing(shards):
    """workers=0 on a GPU: batches on the GPU like the workers' (pinned, then copied), and RandomErasing's noise,
    drawn on the GPU, seeded per batch: two loaders give the same batches, a resumed one too."""
    cfg = config(shards, backend="torch", device="cuda", workers=0, random_erasing=1.0, seed=5)
    first, second = take(create_loader(cfg), 3), take(create_loader(cfg), 3)
    assert first[0][0].is_cuda and first[0][1].is_cuda
    for (xa, ya), (xb, yb) in zip(first, second, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    loader = create_loader(cfg)
    take(loader, 1)
    resumed = take(create_loader(cfg, state=loader.state_dict()), 2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first[1:], resumed, strict=True))


def test_dali_reads_the_shards_in_its_feeder_thread_not_the_training_thread(shards, monkeypatch):
    """The external source's shard reads and crop planning run in the feeder thread, ahead of pipe.run(), so
    they overlap the GPU's work; the batches are the same as ever (the exact-resume tests compare them)."""
    import threading

    from pipeline.data.samples import BatchSource

    threads, real = [], BatchSource.read_batch

    def recording(self, order, b):
        threads.append(threading.current_thread().name)
        return real(self, order, b)

    monkeypatch.setattr(BatchSource, "read_batch", recording)
    batches = take(create_loader(config(shards, backend="dali")), 6)
    assert len(batches) == 6 and threads and set(threads) == {"dali-feeder"}, Counter(threads)
    assert not [t for t in threading.enumerate() if t.name == "dali-feeder"]  # stopped with the iteration


@pytest.mark.parametrize(
    "backend,extra",
    [
        ("torch", {"rand_augment": "rand-m9-mstd0.5-inc1", "mixup": 0.8, "cutmix": 1.0, "random_erasing": 0.25}),
        ("dali", {"mixup": 0.8, "random_erasing": 0.25}),
    ],
)
def test_a_micro_batch_is_the_same_on_any_number_of_ranks_and_resumes_on_another(shards, backend, extra):
    """Rank r of 2 reads the micro batches in slots r, r+2, ... of the epoch's sequence, with the draws of those
    slots: exactly what a world of one reads in those slots. A world of one resumes where two ranks stopped."""
    cfg = config(shards, backend=backend, seed=4, **extra)
    alone = take(create_loader(cfg, 0, 1))
    pair = [create_loader(cfg, r, 2) for r in range(2)]
    taken = [take(loader, 5) for loader in pair]
    for r in range(2):
        for b, (x, y) in enumerate(taken[r]):
            assert torch.equal(x, alone[2 * b + r][0]) and torch.equal(y, alone[2 * b + r][1]), (r, b)
    state = json.loads(json.dumps(pair[0].state_dict()))
    assert state["consumed"] == 5 * 2 * 32
    resumed = take(create_loader(cfg, 0, 1, state=state))
    assert len(resumed) == len(alone) - 10
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(alone[10:], resumed, strict=True))
    with pytest.raises(ValueError, match="not a whole number of 3 ranks x 32"):
        create_loader(cfg, 0, 3, state=state)  # 320 samples are not whole steps of 3 x 32


def test_mixup_cutmix_give_smoothed_soft_targets(shards):
    images, targets = take(create_loader(config(shards, backend="torch", mixup=0.8, cutmix=1.0)), 1)[0]
    assert targets.shape == (32, 10) and torch.allclose(targets.sum(1), torch.ones(32))
    assert targets.min() >= 0.1 / 10 - 1e-6  # label smoothing 0.1 spreads 0.01 to every class


def test_eval_is_deterministic_and_covers_the_split(shards):
    cfg = config(shards, split="val", train=False, backend="dali")
    a, b = take(create_loader(cfg)), take(create_loader(cfg))
    assert sum(len(y) for _, y in a) == 100 and all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b, strict=True))
    torch_eval = take(create_loader(config(shards, split="val", train=False, backend="torch")))
    assert torch.equal(torch.cat([y for _, y in a]), torch.cat([y for _, y in torch_eval]))


@pytest.fixture
def one_bad_jpeg(shards, tmp_path) -> tuple[Path, str]:
    """A copy of the set where one sample's jpg is no JPEG at all (same length, so tar and index still agree)."""
    out = Path(shutil.copytree(shards, tmp_path / "set"))
    idx = (out / "train/shard-000001.idx").read_text().splitlines()
    fields = idx[4].split(" ")  # 4th sample: cls offset size name jpg offset size name ...
    parts = {fields[i]: (int(fields[i + 1]), int(fields[i + 2]), fields[i + 3]) for i in range(0, len(fields), 4)}
    offset, size, name = parts["jpg"]
    tar = out / "train/shard-000001.tar"
    data = bytearray(tar.read_bytes())
    data[offset : offset + size] = b"\0" * size
    tar.write_bytes(bytes(data))
    return out, name.rsplit(".", 1)[0]


def test_torch_backend_skips_and_counts_an_undecodable_sample(one_bad_jpeg):
    out, _key = one_bad_jpeg
    loader = create_loader(config(out, backend="torch", train=False, workers=0))
    total = sum(len(y) for _, y in take(loader))
    assert loader.skipped == 1 and total == 1697 - 1


def test_dali_backend_names_shard_sample_and_verify(one_bad_jpeg):
    out, key = one_bad_jpeg
    with pytest.raises(DataError) as err:
        take(create_loader(config(out, backend="dali", train=False)))
    text = str(err.value)
    assert "train/shard-000001.tar" in text and key in text and f"python -m data_prep verify {out}" in text


def test_dali_rand_augment_changes_the_images(shards):
    plain = take(create_loader(config(shards, backend="dali")), 2)
    augmented = take(create_loader(config(shards, backend="dali", rand_augment="rand-m9-mstd0.5-inc1")), 2)
    for (x, y), (xa, ya) in zip(plain, augmented, strict=True):
        assert torch.equal(y, ya) and x.shape == xa.shape
        changed = [(x[i] - xa[i]).abs().mean() > 1e-3 for i in range(len(x))]
        assert sum(changed) / len(changed) > 0.8  # two ops per image, identity is one of 14


@pytest.mark.s3
@pytest.mark.parametrize(
    "backend,device",
    [
        ("torch", "cpu"),
        ("dali", "cpu"),
        pytest.param(
            "dali",
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
        ),
    ],
)
def test_an_s3_shard_set_gives_the_batches_of_the_local_one(s3_in_env, shards, tmp_path, backend, device, caplog):
    """Through the node's cache and read-ahead (DALI: its feeder thread reads the pinned copies, batches ahead of
    the loader, and the read-ahead lets go of what the feeder has passed)."""
    s3_server = s3_in_env
    bucket = s3_server.create_bucket()
    s3_server.upload_dir(shards, bucket, "set")
    biggest = max(p.stat().st_size for p in shards.glob("train/*.tar"))
    # a shuffle window of one shard: at most three shards are read at once (a batch across two windows); the
    # budget holds them and the read-ahead, but not the set, so evictions happen
    local = config(shards, backend=backend, device=device, workers=0, shuffle_window=250)
    remote = config(
        shards,
        backend=backend,
        device=device,
        workers=0,
        cache_dir=str(tmp_path / "cache"),
        cache_bytes=4 * biggest,
        shuffle_window=250,
    )
    remote.shards = f"s3://{bucket}/set"
    a = take(create_loader(remote))
    b = take(create_loader(local))
    assert len(a) == len(b) and all(
        torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b, strict=True)
    )
    cached = [p.stat().st_size for p in (tmp_path / "cache").rglob("*.tar")]
    assert cached and sum(cached) <= 4 * biggest and len(cached) < 7
    assert "over its budget" not in caplog.text  # never over it, not even while it ran


SAME_PROCESS = """
import gc, os, sys
from pipeline.data.loader import LoaderConfig, create_loader
from pipeline.data.dali_backend import _build
from pipeline.data.order import epoch_order
cfg = LoaderConfig(shards=sys.argv[1], batch_size=32, image_size=64, workers=2, backend="dali")
dali = create_loader(cfg)
next(iter(dali))                      # a DALI epoch, abandoned after one batch
pipe = _build(cfg, "cpu", (0, 0), lambda info: None, True)
cycle = [pipe]
cycle.append(cycle)                   # a live pipeline only the garbage collector can free
del pipe, cycle
gc.disable()                          # not collected before the DataLoader forks its workers ...
os.register_at_fork(after_in_child=gc.collect)  # ... but the workers collect at once
for _ in range(2):
    cfg.backend = "torch"
    print(sum(1 for _ in create_loader(cfg)))
"""


def test_a_torch_loader_after_a_dali_one_in_the_same_process(shards):
    """Forked DataLoader workers must not finalise a DALI pipeline they inherit: its __del__ hangs there."""
    import subprocess
    import sys

    from conftest import REPO

    try:
        proc = subprocess.run(
            [sys.executable, "-c", SAME_PROCESS, str(shards)], cwd=REPO, capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the torch loader hung: a forked worker finalised the inherited DALI pipeline")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [str(1697 // 32)] * 2


def test_predict_sees_the_pixels_the_eval_loader_gives(tmp_path):
    """pipeline.predict preprocesses a file exactly as the torch backend's val batches do (one function, timm's eval
    transform): non-square photos, where flooring and rounding the resize differ (600x400 at 64/0.875: 109 vs 110)."""
    from PIL import Image

    from conftest import jpeg, photos
    from pipeline.data.order import epoch_order
    from pipeline.predict import preprocess

    source = tmp_path / "photos"
    for i, (name, pixels) in enumerate(sorted(photos().items())):
        folder = source / f"n0000000{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.JPEG").write_bytes(jpeg(Image.fromarray(pixels).convert("RGB")))
    out = tmp_path / "set"
    run_prep("shard", "--source", source, "--out", out, "--holdout-per-class", 2)
    loader = create_loader(config(out, split="val", train=False, batch_size=1, backend="torch", workers=0))
    order = epoch_order(loader.reader.sizes, 0, 0, 0, 1, shuffle=False)
    meta = {
        "img_size": 64,
        "preprocessing": {"crop_pct": 0.875, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    }
    sizes = set()
    for n, (images, _labels) in enumerate(loader):
        jpg, _ = loader.reader.read(int(order.shard[n]), int(order.sample[n]))
        path = tmp_path / f"sample{n}.jpg"
        path.write_bytes(jpg)
        sizes.add(Image.open(path).size)
        assert torch.equal(preprocess(str(path), meta), images[0]), f"sample {n} ({Image.open(path).size})"
    assert n + 1 == 4 and any(w != h for w, h in sizes)
