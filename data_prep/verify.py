"""`verify`: re-reads a finished shard set and checks it against its manifest, sample by sample."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import simplejpeg
from tqdm import tqdm

from .foreign import verify_index
from .shardset.index import parse_index
from .shardset.layout import parse_layout
from .shardset.manifest import FORMAT, MANIFEST_NAME, ManifestError, read_manifest
from .shardset.members import split_member
from .shardset.store import open_store

REQUIRED = ("cls", "jpg", "json")


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_shard(url: str, entry: dict, synsets: list[str], decode: bool) -> tuple[int, list[str]]:
    out = open_store(url)
    name = entry["name"]
    problems: list[str] = []
    try:
        data = out.read(name)
    except Exception as e:  # noqa: BLE001  (verify reports whatever it finds wrong and goes on)
        return 0, [f"{name}: cannot be read: {e}"]
    if len(data) != entry["bytes"]:
        problems.append(f"{name}: {len(data)} bytes, manifest says {entry['bytes']}")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        problems.append(f"{name}: sha256 differs from the manifest")
    samples: dict[str, dict[str, tuple[tarfile.TarInfo, bytes]]] = {}  # key -> ext -> (member, its bytes)
    order: list[str] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for m in tar:
                key, ext = split_member(m.name) or (m.name, "")  # webdataset's rule (a name without one: odd)
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                samples[key][ext] = (m, data[m.offset_data : m.offset_data + m.size])
    except tarfile.TarError as e:
        return 0, problems + [f"{name}: not a readable tar: {e}"]
    if len(samples) != entry["samples"]:
        problems.append(f"{name}: {len(samples)} samples, manifest says {entry['samples']}")
    expected_index: list[list[tuple[str, int, int, str]]] = []
    for key in order:
        parts = samples[key]
        expected_index.append([(ext, m.offset_data, m.size, m.name) for ext, (m, _b) in parts.items()])
        where = f"{name}: sample {key}"
        if sorted(parts) != sorted(REQUIRED):
            problems.append(f"{where}: has {sorted(parts)}, expected {list(REQUIRED)}")
            continue
        try:
            label = int(parts["cls"][1])
            meta = json.loads(parts["json"][1])
        except ValueError as e:
            problems.append(f"{where}: unreadable cls/json: {e}")
            continue
        if not 0 <= label < len(synsets):
            problems.append(f"{where}: label {label} outside 0..{len(synsets) - 1}")
        elif meta.get("synset") != synsets[label]:
            problems.append(f"{where}: label {label} is {synsets[label]} but json says {meta.get('synset')}")
        if decode:
            problems += _check_jpeg(where, parts["jpg"][1], meta)
    try:
        index = parse_index(out.read(entry["index"]).decode())
        if index != expected_index:
            problems.append(f"{entry['index']}: does not match the tar's members")
    except Exception as e:  # noqa: BLE001  (verify reports whatever it finds wrong and goes on)
        problems.append(f"{entry['index']}: {e}")
    return len(samples), problems


def _check_jpeg(where: str, jpg: bytes, meta: dict) -> list[str]:
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(jpg)
        if colorspace != "YCbCr":
            return [f"{where}: jpg is {colorspace}, not an RGB JPEG"]
        simplejpeg.decode_jpeg(jpg, strict=True)
    except ValueError as e:
        return [f"{where}: jpg does not decode: {e}"]
    if (width, height) != (meta.get("width"), meta.get("height")):
        return [f"{where}: jpg is {width}x{height}, json says {meta.get('width')}x{meta.get('height')}"]
    return []


def verify(url: str, workers: int = 1, decode: bool = True) -> VerifyReport:
    out = open_store(url)
    manifest = read_manifest(out)
    if manifest.get("source", {}).get("kind") == "webdataset":  # indexed in place: re-index and compare
        with tqdm(total=len(manifest["shards"]), desc="verifying", unit=" shards") as bar:
            indexed = verify_index(out, manifest, bar.update)
        return VerifyReport(*indexed)
    if manifest["format"] != FORMAT:
        raise ManifestError(
            f"{url}/{MANIFEST_NAME} has format {manifest['format']}: verify checks sets `data_prep shard` writes "
            f"({FORMAT}) and sets `data_prep index` wrote"
        )
    synsets = manifest["label_layout"]["synsets"]
    report = VerifyReport()
    try:
        if parse_layout(out.read("synsets.txt").decode(), "synsets.txt") != synsets:
            report.problems.append("synsets.txt differs from the manifest's label layout")
    except Exception as e:  # noqa: BLE001  (verify reports whatever it finds wrong and goes on)
        report.problems.append(f"synsets.txt: {e}")
    listed = {s["name"] for s in manifest["shards"]}
    for split in manifest["totals"]:
        for rel, _size in out.list(split):
            if rel.endswith(".tar") and rel not in listed:
                report.problems.append(f"{rel}: a shard on storage that the manifest does not list")
    for split, totals in manifest["totals"].items():
        shards = [s for s in manifest["shards"] if s["split"] == split]
        if sum(s["samples"] for s in shards) != totals["samples"]:
            report.problems.append(f"{split}: shard sample counts do not add up to the manifest's total")
    entries = manifest["shards"]
    with tqdm(total=len(entries), desc="verifying", unit=" shards") as bar:
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                futures = [pool.submit(check_shard, url, entry, synsets, decode) for entry in entries]
                results: list[tuple[int, list[str]]] = []
                for f in futures:
                    results.append(f.result())
                    bar.update()
        else:
            results = []
            for entry in entries:
                results.append(check_shard(url, entry, synsets, decode))
                bar.update()
    for samples, problems in results:
        report.shards += 1
        report.samples += samples
        report.problems += problems
    return report
