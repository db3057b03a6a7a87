"""The shard sets are webdataset's format: a user's own loader reads them with the `webdataset` package itself."""

import json
import warnings
from pathlib import Path

import pytest
import webdataset
from PIL import Image

from conftest import run_prep


@pytest.fixture(scope="module")
def shard_set(digits_tars, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wds") / "set"
    run_prep("shard", "--source", digits_tars, "--out", out, "--max-samples", 400, "--holdout-per-class", 5)
    return out


@pytest.mark.parametrize("split", ["train", "val"])
def test_webdataset_reads_every_sample_with_the_label_of_its_synset(shard_set, split):
    manifest = json.loads((shard_set / "manifest.json").read_text())
    synsets = (shard_set / "synsets.txt").read_text().split()
    urls = [str(shard_set / s["name"]) for s in manifest["shards"] if s["split"] == split]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # webdataset 1.0 asks for an explicit shardshuffle
        samples = list(webdataset.WebDataset(urls).decode("pil").to_tuple("jpg", "cls", "json"))
    assert len(samples) == manifest["totals"][split]["samples"] == (1797 - 50 if split == "train" else 50)
    for image, label, meta in samples:
        assert isinstance(image, Image.Image) and image.size == (meta["width"], meta["height"])
        assert label == synsets.index(meta["synset"])  # the label is the synset's line in synsets.txt
    assert len({label for _i, label, _m in samples}) == 10
