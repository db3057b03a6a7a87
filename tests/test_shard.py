"""`data_prep shard` on local sources: format, labels, shuffle, hold-out, limits, bad input, determinism."""

import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from conftest import EXPECTED_BAD, EXPECTED_CONVERTED, read_samples, read_tree, run_prep
from data_prep.embedded import synset_of
from data_prep.shard import ShardOptions, run_shard

SYNSETS = [synset_of(k) for k in range(10)]


@pytest.fixture(scope="module")
def tars_set(digits_tars, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sets") / "from_tars"
    run_prep("shard", "--source", digits_tars, "--out", out, "--max-samples", 200, "--holdout-per-class", 7)
    return out


def all_samples(root: Path, split: str) -> dict[str, dict[str, bytes]]:
    samples = {}
    for shard in sorted((root / split).glob("*.tar")):
        samples.update(read_samples(shard))
    return samples


def test_layout_of_the_shard_set(tars_set):
    names = sorted(
        str(p.relative_to(tars_set))
        for p in tars_set.rglob("*")
        if p.is_file() and not str(p.relative_to(tars_set)).startswith("_")
    )
    train = [n for n in names if n.startswith("train/")]
    assert names[:1] == ["manifest.json"] and "synsets.txt" in names
    assert "train/shard-000000.tar" in train and "train/shard-000000.idx" in train
    assert len([n for n in train if n.endswith(".tar")]) == len([n for n in train if n.endswith(".idx")]) == 9
    assert (tars_set / "synsets.txt").read_text().split() == SYNSETS


def test_every_sample_has_key_jpg_cls_json(tars_set, digits_tars):
    samples = all_samples(tars_set, "train")
    assert len(samples) == 1797 - 70
    for key, parts in samples.items():
        assert sorted(parts) == ["cls", "jpg", "json"] and "." not in key
        meta = json.loads(parts["json"])
        label = int(parts["cls"].decode("ascii"))
        assert meta["synset"] == SYNSETS[label]
        assert meta["source"].startswith(f"{meta['synset']}.tar/")
        assert (meta["width"], meta["height"]) == (64, 64)
    # the original bytes of the source JPEG, untouched
    key, parts = next(iter(samples.items()))
    meta = json.loads(parts["json"])
    tar_name, member = meta["source"].split("/", 1)
    with tarfile.open(digits_tars / tar_name) as tar:
        assert tar.extractfile(member).read() == parts["jpg"]


def test_tar_members_have_fixed_metadata(tars_set):
    with tarfile.open(tars_set / "train/shard-000000.tar") as tar:
        for m in tar:
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o444)


def test_shards_mix_classes(tars_set):
    for shard in sorted((tars_set / "train").glob("*.tar")):
        labels = Counter(int(s["cls"]) for s in read_samples(shard).values())
        assert len(labels) == 10, f"{shard.name} holds only classes {sorted(labels)}"
        assert max(labels.values()) < 0.3 * sum(labels.values())


def test_holdout_is_per_class_and_disjoint(tars_set):
    train, val = all_samples(tars_set, "train"), all_samples(tars_set, "val")
    assert Counter(int(s["cls"]) for s in val.values()) == dict.fromkeys(range(10), 7)
    assert not set(train) & set(val)
    sources = [json.loads(s["json"])["source"] for s in [*train.values(), *val.values()]]
    assert len(sources) == len(set(sources)) == 1797


def test_manifest_describes_the_set(tars_set):
    import hashlib

    m = json.loads((tars_set / "manifest.json").read_text())
    assert m["label_layout"]["synsets"] == SYNSETS and m["label_layout"]["num_classes"] == 10
    assert m["totals"]["train"]["samples"] == 1727 and m["totals"]["val"]["samples"] == 70
    assert m["totals"]["train"]["shards"] == 9 and m["totals"]["val"]["shards"] == 1
    for entry in m["shards"]:
        data = (tars_set / entry["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
        assert len(read_samples(tars_set / entry["name"])) == entry["samples"]
    assert sum(m["class_counts"]["val"].values()) == 70 and m["class_counts"]["val"]["n00000003"] == 7
    assert m["rejected"] == [] and m["options"]["seed"] == 0 and m["options"]["holdout_per_class"] == 7


def test_index_files_are_what_wds2idx_writes(tars_set, tmp_path):
    from wds2idx import IndexCreator  # shipped with DALI

    for shard in sorted(tars_set.rglob("*.tar")):
        ref = tmp_path / (shard.stem + ".idx")
        with IndexCreator(str(shard), str(ref), verbose=False) as creator:
            creator.create_index()
        assert shard.with_suffix(".idx").read_text() == ref.read_text(), shard


def test_dali_reads_the_shards_with_their_index_files(tars_set):
    from nvidia.dali import fn, pipeline_def

    tars = sorted(str(p) for p in (tars_set / "train").glob("*.tar"))

    @pipeline_def(batch_size=128, num_threads=1, device_id=None)  # DALI's CPU-only mode
    def pipe():
        jpg, cls = fn.readers.webdataset(
            paths=tars,
            index_paths=[t[:-4] + ".idx" for t in tars],
            ext=["jpg", "cls"],
            missing_component_behavior="error",
            name="shards",
        )
        return fn.decoders.image(jpg, device="cpu"), cls

    p = pipe()
    p.build()
    assert p.epoch_size("shards") == 1727
    images, labels = p.run()
    assert images.at(0).shape == (64, 64, 3)
    assert all(0 <= int(bytes(labels.at(i))) < 10 for i in range(len(labels)))


def test_imagefolder_and_synset_tars_give_the_same_samples(tars_set, digits_folder, tmp_path):
    out = tmp_path / "from_folder"
    run_prep("shard", "--source", digits_folder, "--out", out, "--max-samples", 200, "--holdout-per-class", 7)

    def content(root):
        return sorted((s["cls"], s["jpg"]) for split in ("train", "val") for s in all_samples(root, split).values())

    assert content(out) == content(tars_set)
    meta = json.loads(next(iter(all_samples(out, "train").values()))["json"])
    assert meta["source"].count("/") == 1 and meta["source"].endswith(".JPEG")


def test_layout_file_decides_the_labels(digits_tars, tmp_path):
    layout = tmp_path / "layout.txt"
    order = list(reversed(SYNSETS)) + ["n09999999"]  # a 22K-style layout may hold synsets the source lacks
    layout.write_text("# reversed digits\n" + "".join(f"{s} digit\n" for s in order))
    out = tmp_path / "set"
    run_prep("shard", "--source", digits_tars, "--out", out, "--layout", layout)
    assert (out / "synsets.txt").read_text().split() == order
    for s in all_samples(out, "train").values():
        assert order[int(s["cls"])] == json.loads(s["json"])["synset"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["label_layout"]["synsets"] == order and "n09999999" not in m["class_counts"]["train"]


def test_synset_missing_from_the_layout_is_an_error_naming_it(digits_tars, tmp_path):
    layout = tmp_path / "layout.txt"
    layout.write_text("\n".join(s for s in SYNSETS if s != "n00000004") + "\n")
    proc = run_prep("shard", "--source", digits_tars, "--out", tmp_path / "set", "--layout", layout, check=False)
    assert proc.returncode == 2
    assert "n00000004" in proc.stderr and "not in the label layout" in proc.stderr
    assert not (tmp_path / "set" / "train").exists()


def test_same_seed_same_bytes_other_seed_other_order(digits_tars, tmp_path):
    def shard(name, seed):
        run_shard(
            ShardOptions(
                source=str(digits_tars), out=str(tmp_path / name), seed=seed, max_samples=300, holdout_per_class=3
            )
        )
        return read_tree(tmp_path / name)

    a, b, c = shard("a", 1), shard("b", 1), shard("c", 2)
    assert a == b
    assert a["train/shard-000000.tar"] != c["train/shard-000000.tar"]
    assert sorted(all_samples(tmp_path / "a", "train")) != sorted(all_samples(tmp_path / "c", "train"))


def test_two_workers_write_the_same_bytes_as_one(digits_tars, tmp_path):
    run_prep("shard", "--source", digits_tars, "--out", tmp_path / "w1", "--max-samples", 150)
    run_prep("shard", "--source", digits_tars, "--out", tmp_path / "w2", "--max-samples", 150, "--workers", 2)
    assert read_tree(tmp_path / "w1") == read_tree(tmp_path / "w2")


def test_decode_threads_never_change_the_bytes(messy_folder, tmp_path):
    """Rejected, converted and plain images alike land in input order whatever the thread count."""
    runs = {t: tmp_path / f"t{t}" for t in (1, 3)}
    for threads, out in runs.items():
        run_prep("shard", "--source", messy_folder, "--out", out, "--max-samples", 300, "--threads", threads)
    assert read_tree(runs[1]) == read_tree(runs[3])
    assert json.loads((runs[3] / "manifest.json").read_text())["rejected"]


def test_max_bytes_bounds_the_source_bytes_per_shard(digits_tars, tmp_path):
    out = tmp_path / "set"
    run_prep("shard", "--source", digits_tars, "--out", out, "--max-samples", 0, "--max-bytes", "400KB")
    shards = sorted((out / "train").glob("*.tar"))
    assert len(shards) >= 5
    for shard in shards:
        jpgs = sum(len(s["jpg"]) for s in read_samples(shard).values())
        assert jpgs <= 400_000


def test_resize_shorter_on_real_photos(tmp_path):
    from conftest import jpeg, photos

    src = tmp_path / "photos"
    (src / "n01234567").mkdir(parents=True)
    for name, pixels in photos().items():
        img = Image.fromarray(pixels)
        if img.mode == "RGBA":  # the logo: PNG data under a .JPEG name
            img.save(src / "n01234567" / f"{name}.JPEG", "PNG")
        else:
            (src / "n01234567" / f"{name}.JPEG").write_bytes(jpeg(img))
    out = tmp_path / "set"
    run_prep("shard", "--source", src, "--out", out, "--resize-shorter", 300, "--jpeg-quality", 85)
    samples = {json.loads(s["json"])["source"]: s for s in all_samples(out, "train").values()}
    assert len(samples) == 6
    for s in samples.values():
        meta = json.loads(s["json"])
        img = Image.open(__import__("io").BytesIO(s["jpg"]))
        assert img.mode == "RGB" and img.size == (meta["width"], meta["height"])
        assert min(img.size) <= 300
    assert min(json.loads(samples["n01234567/coffee.JPEG"]["json"])[k] for k in ("width", "height")) == 300
    chelsea = samples["n01234567/chelsea.JPEG"]  # 451x300: not larger than 300, keeps its bytes
    assert chelsea["jpg"] == (src / "n01234567/chelsea.JPEG").read_bytes()
    m = json.loads((out / "manifest.json").read_text())
    assert sum(m["converted"].values()) == 5


def test_bad_inputs_in_an_imagefolder_are_listed_never_fatal(messy_folder, tmp_path):
    out = tmp_path / "set"
    proc = run_prep("shard", "--source", messy_folder, "--out", out, "--workers", 2, "--max-samples", 300)
    summary = json.loads(proc.stdout)
    assert summary["images_rejected"] == len(EXPECTED_BAD)
    m = json.loads((out / "manifest.json").read_text())
    assert {Path(r["source"]).name for r in m["rejected"]} == EXPECTED_BAD
    assert all(r["reason"] for r in m["rejected"])
    assert m["totals"]["train"]["samples"] == 1797 + 1 + len(EXPECTED_CONVERTED)
    assert sum(m["converted"].values()) == len(EXPECTED_CONVERTED)
    assert run_prep("verify", out).returncode == 0  # what is left all decodes as RGB JPEG


def test_corrupt_synset_tars_skip_what_cannot_be_read(messy_tars, tmp_path):
    out = tmp_path / "set"
    run_prep("shard", "--source", messy_tars, "--out", out)
    m = json.loads((out / "manifest.json").read_text())
    reasons = {r["source"]: r["reason"] for r in m["rejected"]}
    assert "corrupt tar" in reasons["n00000011.tar"] and "read 2 member(s)" in reasons["n00000011.tar"]
    assert "truncated" in reasons["n00000011.tar/n00000011_1.JPEG"]
    assert reasons["README.txt"] == "not a per-synset .tar"
    assert {f"n00000010.tar/{n}" for n in EXPECTED_BAD} <= set(reasons)
    assert m["class_counts"]["train"]["n00000011"] == 1  # the member before the cut survives
    assert m["class_counts"]["train"]["n00000010"] == 1 + len(EXPECTED_CONVERTED)
    assert run_prep("verify", out).returncode == 0


def test_rerun_with_other_options_is_refused(digits_tars, tmp_path):
    out = tmp_path / "set"
    run_prep("shard", "--source", digits_tars, "--out", out, "--max-samples", 500)
    proc = run_prep("shard", "--source", digits_tars, "--out", out, "--max-samples", 400, check=False)
    assert proc.returncode == 2 and "max_samples: 500 before, 400 now" in proc.stderr


def test_rerun_of_a_finished_set_writes_nothing(tars_set, digits_tars):
    before = {p: p.stat().st_mtime_ns for p in tars_set.rglob("*.tar")}
    proc = run_prep("shard", "--source", digits_tars, "--out", tars_set, "--max-samples", 200, "--holdout-per-class", 7)
    summary = json.loads(proc.stdout)
    assert summary["shards_written"] == 0 and summary["shards_skipped"] == 10
    assert before == {p: p.stat().st_mtime_ns for p in tars_set.rglob("*.tar")}


@pytest.mark.parametrize("command", [[], ["shard"], ["finalize"], ["verify"], ["map"], ["embedded"]])
def test_every_command_has_help(command):
    proc = run_prep(*command, "--help")
    assert proc.stdout.startswith("usage: python -m data_prep")


@pytest.mark.parametrize("name,size", [("a.jpg", 0), ("n00000001_0001.json", 12345), ("k" * 96 + ".cls", 8**11 - 1)])
def test_member_headers_are_the_ones_tarfile_writes(name, size):
    from data_prep.writer import ustar_header

    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "", ""
    assert ustar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT)


@pytest.mark.parametrize(
    "synset,source", [("n00000001", "n00000001/a_1.JPEG"), ("n\u00e9", 'we"ird\\path/\u00f1\u2603 x.jpg')]
)
def test_sample_json_is_what_json_dumps_writes(synset, source):
    from data_prep.writer import sample_json

    meta = {"synset": synset, "source": source, "width": 500, "height": 375}
    assert sample_json(synset, source, 500, 375) == json.dumps(meta, sort_keys=True).encode()
