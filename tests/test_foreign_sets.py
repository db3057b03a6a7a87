"""The reader side of sets indexed in place (issue 35): png/webp images crop as their JPEG twins, split index
version 2 with a label column (round trips; version 1 unchanged), and shards in another folder or on S3 than the
index (`shards_root`, manifest format /2) giving the batches of a set kept together."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.shardset.manifest import ManifestError
from data_prep.shardset.reader import ShardSetError, open_shard_set
from data_prep.shardset.store import UnsafePath
from data_prep.verify import verify
from foreign_sets import encode, pictures, write_set
from pipeline.data.loader import LoaderConfig, create_loader
from pipeline.data.samples import BatchSource

SYNSETS = [f"n{i:08d}" for i in range(5)]
N = 24  # samples: three shards of eight


def samples(fmt_of=lambda i: "JPEG", keys=lambda i: f"folder.v1/img_{i:03d}"):
    """Three shards of eight samples: the same pictures, each in the format fmt_of(i) gives (JPEG ones as
    first made; PNG/WebP ones the lossless copy of the JPEG's decoded pixels)."""
    out = []
    for i, picture in enumerate(pictures(N)):
        jpeg = encode(picture, "JPEG")
        fmt = fmt_of(i)
        data = jpeg if fmt == "JPEG" else encode(Image.open(io.BytesIO(jpeg)).convert("RGB"), fmt)
        suffix = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
        out.append((keys(i), {suffix: data, "json": b"{}"}, i % len(SYNSETS)))
    return [out[0:8], out[8:16], out[16:24]]


def take(cfg: LoaderConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(create_loader(cfg))


def config(url, **kw) -> LoaderConfig:
    return LoaderConfig(**{"shards": str(url), "batch_size": 8, "image_size": 32, "workers": 0, **kw})


def same(a, b, tolerance: float = 0.0) -> bool:
    return len(a) == len(b) and all(
        torch.equal(ya, yb) and (xa - xb).abs().max() <= tolerance for (xa, ya), (xb, yb) in zip(a, b, strict=True)
    )


@pytest.fixture(scope="module")
def together(tmp_path_factory):
    root = tmp_path_factory.mktemp("together")
    write_set(root, root, {"train": samples()}, SYNSETS)
    return root


# -- 2: png/webp images are planned as their JPEG twins --------------------------------------------------------


def test_png_and_webp_images_get_the_crops_of_their_jpeg_twin():
    cfg = config("unused", train=True)
    source = BatchSource(cfg, None, 0)  # type: ignore[arg-type]  (crops read only the config)
    picture = pictures(1)[0]
    images = [encode(picture, f) for f in ("JPEG", "PNG", "WEBP")]
    boxes = [source.crops(3, 1, [image])[0] for image in images]
    assert all(np.array_equal(b, boxes[0]) for b in boxes)
    w, h = picture.size
    x, y, bw, bh = boxes[0][0]
    assert 0 <= x and x + bw <= w and 0 <= y and y + bh <= h and bw * bh > 1  # of the true size, not 1x1


@pytest.mark.parametrize("backend,tolerance", [("torch", 0.0), ("dali", 0.1)])
def test_a_set_of_png_and_webp_images_loads_as_its_jpeg_twin(together, tmp_path, backend, tolerance):
    """Torch: PIL decodes the JPEG to the very pixels the PNG/WebP hold, so the batches are equal; DALI decodes
    the JPEG itself (slightly differently), so they are close, with the same crops."""
    mixed = tmp_path / "mixed"
    write_set(mixed, mixed, {"train": samples(lambda i: ("PNG", "WEBP", "JPEG")[i % 3])}, SYNSETS)
    a = take(config(together, backend=backend))
    b = take(config(mixed, backend=backend))
    assert len(a) == N // 8 and same(a, b, tolerance)


# -- 3: labels as a column of the split index ----------------------------------------------------------------


def test_a_label_column_gives_the_labels_of_the_cls_members(together, tmp_path):
    root = tmp_path / "labels"
    manifest = write_set(root, root, {"train": samples()}, SYNSETS, label_column=True)
    assert manifest["format"] == "swin-pipeline-shards/2" and manifest["split_indexes"]["train"]["label_column"]
    with open(root / "wds-check.tar", "wb"):
        pass  # a stray file beside the tars is no sample
    shard_set = open_shard_set(str(root), "train")
    assert shard_set.table.label is not None and shard_set.table.cls_size.max() == 0  # no cls members at all
    assert same(take(config(together)), take(config(root)))
    # a damaged split index: the shards' .idx and labels files instead
    (root / "train/index.npz").write_bytes(b"damaged")
    assert same(take(config(together)), take(config(root)))


def test_a_label_outside_the_layout_leaves_its_shard_out(tmp_path):
    bad = samples()
    bad[1][5] = (bad[1][5][0], bad[1][5][1], len(SYNSETS))  # one past the last class
    write_set(tmp_path, tmp_path, {"train": bad}, SYNSETS, label_column=True)
    shard_set = open_shard_set(str(tmp_path), "train", max_bad_shards=1)
    assert [s.name for s in shard_set.shards] == ["train/wds-train-0000.tar", "train/wds-train-0002.tar"]
    assert shard_set.skipped == [("train/wds-train-0001.tar", "sample folder.v1/img_013 has label 5, outside 0..4")]


# -- 4: shards in another place than the index ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_an_index_apart_from_its_shards_reads_the_batches_of_the_set_together(together, tmp_path, backend):
    index, data = tmp_path / "index", tmp_path / "source"
    manifest = write_set(index, data, {"train": samples()}, SYNSETS, shards_root=str(data))
    assert manifest["format"] == "swin-pipeline-shards/2"
    assert not list(index.rglob("*.tar")) and not list(data.rglob("*.idx"))
    shard_set = open_shard_set(str(index), "train")
    assert shard_set.url == str(index) and shard_set.data_url == str(data)
    cfg = config(index, backend=backend)
    assert same(take(cfg), take(config(together, backend=backend)))
    source = BatchSource(cfg, create_loader(cfg).reader, 0)
    assert source.name(0, 1) == f"{data}/train/wds-train-0000.tar sample folder.v1/img_001"
    with pytest.raises(ManifestError, match="verify checks sets `data_prep shard` writes"):
        verify(str(index))


def test_shards_root_is_checked(together, tmp_path):
    def with_manifest(change) -> str:
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(together, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        change(manifest)
        (copy / "manifest.json").write_text(json.dumps(manifest))
        return str(copy)

    with pytest.raises(ManifestError, match=r"copy\d/manifest.json has format .*which need swin-pipeline-shards/2"):
        open_shard_set(with_manifest(lambda m: m.update(shards_root=str(together))))
    with pytest.raises(ManifestError, match=r"copy\d/manifest.json has format 'swin-pipeline-shards/9', expected"):
        open_shard_set(with_manifest(lambda m: m.update(format="swin-pipeline-shards/9")))
    two = {"format": "swin-pipeline-shards/2"}
    with pytest.raises(ShardSetError, match=r"manifest.json: shards_root 'rel/dir' is neither"):
        open_shard_set(with_manifest(lambda m: m.update(two, shards_root="rel/dir")))
    with pytest.raises(UnsafePath):
        open_shard_set(
            with_manifest(lambda m: (m.update(two, shards_root=str(together)), m["shards"][0].update(name="../x.tar")))
        )
    # /2 naming the set's own folder is the set together
    assert open_shard_set(with_manifest(lambda m: m.update(two, shards_root=str(together)))).num_samples == N


@pytest.mark.s3
def test_shards_on_s3_with_the_index_local_read_the_batches_of_the_set_together(s3_in_env, together, tmp_path):
    s3_server = s3_in_env
    bucket = s3_server.create_bucket()
    index, data = tmp_path / "index", tmp_path / "source"
    write_set(index, data, {"train": samples()}, SYNSETS, shards_root=f"s3://{bucket}/wds", label_column=True)
    s3_server.upload_dir(data, bucket, "wds")
    cfg = config(index, cache_dir=str(tmp_path / "cache"))
    assert same(take(cfg), take(config(together)))
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*.tar")) == [f"wds-train-000{i}.tar" for i in range(3)]
