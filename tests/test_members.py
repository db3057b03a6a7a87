"""data_prep.shardset.members: webdataset's sample rule, checked against webdataset itself on tars written by its
TarWriter, by Python's tarfile (folders, dotted folder names, png/webp, metadata) and by GNU tar; and the header
sniffer for image sizes."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from data_prep.shardset.members import (
    ImageSizeError,
    group_samples,
    image_size,
    split_member,
    tar_members,
)


def webdataset_samples(path: Path) -> list[tuple[str, list[str]]]:
    """(key, sorted suffixes) of every sample webdataset reads from the tar."""
    ds = wds.WebDataset([str(path)], shardshuffle=False, empty_check=False)
    return [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in ds]


def our_samples(path: Path) -> list[tuple[str, list[str]]]:
    with tarfile.open(path) as tar:
        samples = list(group_samples(tar_members(tar)))
    assert all(s.bad is None for s in samples)
    return [(s.key, sorted(s.members)) for s in samples]


def add(tar: tarfile.TarFile, name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        if kind == tarfile.SYMTYPE:
            info.linkname = "a/x1.jpg"
        tar.addfile(info)


def picture(fmt: str, size=(37, 23), mode="RGB", **kw) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, "red" if mode != "L" else 128).save(buf, fmt, **kw)
    return buf.getvalue()


def test_split_member_is_webdatasets_rule():
    assert split_member("n01/x_1.jpg") == ("n01/x_1", "jpg")
    assert split_member("a.b/c.d/x.seg.PNG") == ("a.b/c.d/x", "seg.PNG")  # first dot of the last component
    assert split_member("./x.cls") == ("./x", "cls")
    assert split_member("a.b/noext") is None and split_member("README") is None
    assert split_member("ключ/образ.jpg") == ("ключ/образ", "jpg")


def test_tarwriter_sets_group_as_webdataset_reads_them(tmp_path):
    path = tmp_path / "w.tar"
    with wds.TarWriter(str(path)) as w:
        for i in range(4):
            w.write({"__key__": f"folder/s{i:03d}", "jpg": b"j" * i, "cls": str(i).encode(), "json": b"{}"})
        w.write({"__key__": "folder/only_png", "png": b"p", "cls": b"1"})
    assert our_samples(path) == webdataset_samples(path)
    assert our_samples(path)[-1] == ("folder/only_png", ["cls", "png"])


def test_tarfile_sets_with_folders_metadata_and_odd_names(tmp_path):
    path = tmp_path / "t.tar"
    webp, png = picture("WEBP"), picture("PNG")
    with tarfile.open(path, "w") as tar:
        add(tar, "__meta__", b"{}")  # skipped: metadata
        add(tar, "__info__/x.json", b"{}")  # skipped: metadata folder
        add(tar, "a", kind=tarfile.DIRTYPE)  # skipped: a folder
        add(tar, "a/x1.jpg", b"j")
        add(tar, "a/x1.cls", b"3")
        add(tar, "a/x1.JSON", b"{}")  # the suffix is lower-cased
        add(tar, "a/README", b"no dot")  # skipped, and it does not end the sample x2 is not part of
        add(tar, "a/x2.webp", webp)
        add(tar, "a/link.jpg", kind=tarfile.SYMTYPE)  # skipped: not a regular file
        add(tar, "a/x2.cls", b"4")
        add(tar, "v1.2.data/x3.png", png)  # a dotted folder: the key keeps it
        add(tar, "v1.2.data/x3.seg.png", b"mask")  # suffix "seg.png": not an image
        add(tar, "v1.2.data/x3.cls", b"5")
        add(tar, "dir.d/noext", b"skipped")
        add(tar, "ünï/cödé.jpg", b"j")  # non-ASCII keys
        add(tar, "ünï/cödé.cls", b"6")
        add(tar, "a/x1.txt", b"a key seen before, not adjacent: a new sample")
    ours = our_samples(path)
    assert ours == webdataset_samples(path)
    assert ours == [
        ("a/x1", ["cls", "jpg", "json"]),
        ("a/x2", ["cls", "webp"]),
        ("v1.2.data/x3", ["cls", "png", "seg.png"]),
        ("ünï/cödé", ["cls", "jpg"]),
        ("a/x1", ["txt"]),
    ]
    with tarfile.open(path) as tar:
        samples = list(group_samples(tar_members(tar)))
    images = [s.image() for s in samples]
    assert [i[0] if i else None for i in images] == ["jpg", "webp", "png", "jpg", None]
    x2 = images[1][1]  # type: ignore[index]
    assert path.read_bytes()[x2.offset : x2.offset + x2.size] == webp


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
def test_gnu_tar_of_a_folder_keeps_its_dot_slash_keys(tmp_path):
    src = tmp_path / "src"
    (src / "sub.d").mkdir(parents=True)
    for i in range(3):
        (src / f"k{i}.jpg").write_bytes(b"j" * (i + 1))
        (src / f"k{i}.cls").write_text(str(i))
    (src / "sub.d" / "deep.png").write_bytes(b"p")
    path = tmp_path / "g.tar"
    subprocess.run(["tar", "--sort=name", "-C", str(src), "-cf", str(path), "."], check=True)
    ours = our_samples(path)
    assert ours == webdataset_samples(path)
    assert ("./k0", ["cls", "jpg"]) in ours and ("./sub.d/deep", ["png"]) in ours


def test_a_repeated_suffix_makes_the_sample_bad_where_webdataset_raises(tmp_path):
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("x.jpg", "x.cls", "x.JPG", "y.jpg"):
            add(tar, name)
    with pytest.raises(ValueError, match="duplicate file name"):
        webdataset_samples(path)
    with tarfile.open(path) as tar:
        x, y = group_samples(tar_members(tar))
    assert x.key == "x" and x.bad and "x.JPG" in x.bad and x.members["jpg"].name == "x.jpg"
    assert y.key == "y" and y.bad is None


@pytest.mark.parametrize(
    "fmt,mode,kw",
    [
        ("JPEG", "RGB", {}),
        ("JPEG", "L", {}),
        ("PNG", "RGB", {}),
        ("PNG", "RGBA", {}),
        ("PNG", "L", {}),
        ("WEBP", "RGB", {}),  # VP8 (lossy)
        ("WEBP", "RGB", {"lossless": True}),  # VP8L
        ("WEBP", "RGBA", {}),  # VP8X (alpha)
    ],
)
def test_image_size_reads_headers_like_pil(fmt, mode, kw):
    for size in ((37, 23), (1, 1), (640, 481)):
        data = picture(fmt, size, mode, **kw)
        assert image_size(data) == Image.open(io.BytesIO(data)).size == size


def test_image_size_refuses_other_bytes_clearly():
    for data in (b"", b"<html>", picture("GIF"), picture("BMP"), picture("PNG")[:20], picture("WEBP")[:20]):
        with pytest.raises(ImageSizeError):
            image_size(data)
    with pytest.raises(ImageSizeError, match="not a JPEG, PNG or WebP image"):
        image_size(b"GIF89a....")
    with pytest.raises(ImageSizeError, match="JPEG"):
        image_size(picture("JPEG")[:40])
