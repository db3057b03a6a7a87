"""`verify` finds what is wrong with a shard set; `map` maps one label layout onto another."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from conftest import run_prep
from data_prep.embedded import synset_of


@pytest.fixture(scope="module")
def good_set(digits_tars, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "good"
    run_prep("shard", "--source", digits_tars, "--out", out, "--max-samples", 400, "--holdout-per-class", 2)
    return out


@pytest.fixture
def copy(good_set, tmp_path) -> Path:
    return Path(shutil.copytree(good_set, tmp_path / "set"))


def rewrite_shard(path: Path, change) -> None:
    """Rebuilds a shard with `change(name, bytes) -> bytes` applied to each member; keeps manifest consistent."""
    members = []
    with tarfile.open(path) as tar:
        for m in tar:
            members.append((m.name, change(m.name, tar.extractfile(m).read())))
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def fix_manifest(root: Path, name: str) -> None:
    import hashlib

    manifest = json.loads((root / "manifest.json").read_text())
    for entry in manifest["shards"]:
        if entry["name"] == name:
            data = (root / name).read_bytes()
            entry["sha256"], entry["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (root / "manifest.json").write_text(json.dumps(manifest))


def verify(root):
    return run_prep("verify", root, "--workers", 2, check=False)


def test_a_good_set_verifies(good_set):
    proc = verify(good_set)
    assert proc.returncode == 0 and "OK" in proc.stdout and "1797 samples" in proc.stdout


def test_a_flipped_byte_fails_the_checksum(copy):
    shard = copy / "train/shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[3000] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = verify(copy)
    assert proc.returncode == 1 and "train/shard-000001.tar: sha256 differs" in proc.stdout


def test_an_undecodable_jpg_is_named(copy):
    name = "train/shard-000002.tar"
    rewrite_shard(copy / name, lambda n, d: d[: len(d) // 2] if n.endswith(".jpg") else d)
    fix_manifest(copy, name)
    proc = verify(copy)
    assert proc.returncode == 1 and "jpg does not decode" in proc.stdout and name in proc.stdout


def test_a_label_out_of_range_is_named(copy):
    name = "val/shard-000000.tar"
    rewrite_shard(copy / name, lambda n, d: b"10" if n.endswith(".cls") else d)
    fix_manifest(copy, name)
    proc = verify(copy)
    assert proc.returncode == 1 and "label 10 outside 0..9" in proc.stdout


def test_a_stale_index_file_is_named(copy):
    idx = copy / "train/shard-000000.idx"
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join([lines[0], *lines[2:], lines[1]]) + "\n")
    proc = verify(copy)
    assert proc.returncode == 1 and "train/shard-000000.idx: does not match" in proc.stdout


def test_missing_and_unlisted_shards_are_named(copy):
    (copy / "train/shard-000003.tar").rename(copy / "train/shard-000099.tar")
    proc = verify(copy)
    assert proc.returncode == 1
    assert "train/shard-000003.tar: cannot be read" in proc.stdout
    assert "train/shard-000099.tar: a shard on storage that the manifest does not list" in proc.stdout


def test_verify_without_a_manifest_says_so(tmp_path):
    proc = verify(tmp_path)
    assert proc.returncode == 2 and "no manifest.json" in proc.stderr


def test_map_22k_to_1k_rows_and_missing(tmp_path):
    in22k = ["n01440764", "n00000001", "n01443537", "n99999999"]
    in1k = ["n01443537", "n01440764", "n04399382"]  # teddy bear is not in fall11
    (tmp_path / "22k.txt").write_text("\n".join(in22k) + "\n")
    (tmp_path / "1k.txt").write_text("\n".join(f"{s} some name" for s in in1k) + "\n")
    out = tmp_path / "map.json"
    proc = run_prep("map", "--from", tmp_path / "22k.txt", "--to", tmp_path / "1k.txt", "--out", out)
    doc = json.loads(out.read_text())
    assert doc["source_index"] == [2, 0, -1] and doc["missing"] == ["n04399382"]
    assert doc["source_layout"]["num_classes"] == 4 and doc["target_layout"]["num_classes"] == 3
    assert "2 of 3 target synsets found" in proc.stdout and "n04399382" in proc.stdout
    strict = run_prep(
        "map", "--from", tmp_path / "22k.txt", "--to", tmp_path / "1k.txt", "--out", out, "--strict", check=False
    )
    assert strict.returncode == 1


def test_map_reads_a_shard_folder_as_a_layout(good_set, tmp_path):
    sub = [synset_of(k) for k in (9, 3)]
    (tmp_path / "sub.txt").write_text("\n".join(sub) + "\n")
    run_prep("map", "--from", good_set, "--to", tmp_path / "sub.txt", "--out", tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text())["source_index"] == [9, 3]


def test_a_layout_listing_a_synset_twice_is_refused(tmp_path):
    (tmp_path / "dup.txt").write_text("n1\nn2\nn1\n")
    proc = run_prep(
        "map", "--from", tmp_path / "dup.txt", "--to", tmp_path / "dup.txt", "--out", tmp_path / "m.json", check=False
    )
    assert proc.returncode == 2 and "n1 is listed twice (lines 1 and 3)" in proc.stderr
