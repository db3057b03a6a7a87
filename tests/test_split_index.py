"""data_prep.shardset.split_index: samples by webdataset's rule (UTF-8 keys up to the first dot of the last
component, the image the first of IMAGE_EXTS), version 1 exactly as before, version 2 with an int32 label column;
round trips through the npz bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest

from data_prep.shardset.index import IndexFileError, format_index
from data_prep.shardset.split_index import VERSION, VERSION_LABELS, SampleTable


def index_text(keys_and_exts):
    offset, samples_ = 512, []
    for key, exts in keys_and_exts:
        components = []
        for ext in exts:
            components.append((ext, offset, 10, f"{key}.{ext}"))
            offset += 1024
        samples_.append(components)
    return format_index(samples_)


def test_split_index_version_1_round_trip_with_foreign_keys():
    texts = [
        index_text([("ünï/cödé", ["cls", "PNG"]), ("a.b/x", ["webp", "cls", "seg.png"])]),
        index_text([("./k", ["jpeg", "cls", "jpg"])]),
    ]
    table = SampleTable.from_index_texts(["s/a.tar", "s/b.tar"], texts)
    assert table.label is None and table.version == VERSION
    assert [table.key(r) for r in range(3)] == ["ünï/cödé", "a.b/x", "./k"]
    # the PNG (suffix compared lower-cased), the webp (seg.png is no image), the jpg (before jpeg in IMAGE_EXTS)
    assert table.jpg_offset.tolist() == [512 + 1024, 512 + 2048, 512 + 2048]
    data = table.to_bytes()
    with np.load(io.BytesIO(data)) as z:
        assert sorted(z.files) == sorted(
            ["version", "names", "starts", "jpg_offset", "jpg_size", "cls_offset", "cls_size", "key_blob", "key_starts"]
        )
    back = SampleTable.from_bytes(data, "here")
    assert back.key(0) == "ünï/cödé" and back.label is None and back.to_bytes() == data
    with pytest.raises(IndexFileError, match="without cls"):
        SampleTable.from_index_texts(["s/c.tar"], [index_text([("x", ["jpg"])])])
    with pytest.raises(IndexFileError, match="without an image"):
        SampleTable.from_index_texts(["s/c.tar"], [index_text([("x", ["cls", "seg.png"])])])


def test_split_index_version_2_carries_its_labels():
    texts = [index_text([("a", ["jpg"]), ("b", ["png"])]), index_text([("c", ["webp", "json"])])]
    labels = [np.array([3, 1], np.int64), np.array([4], np.int16)]
    table = SampleTable.from_index_texts(["x.tar", "y.tar"], texts, labels)
    assert table.version == VERSION_LABELS and table.label.dtype == np.int32 and table.label.tolist() == [3, 1, 4]
    assert table.cls_size.tolist() == [0, 0, 0] and table.ends().tolist() == [1024 + 512 + 10, 512 + 10]
    back = SampleTable.from_bytes(table.to_bytes(), "here")
    assert back.label.tolist() == [3, 1, 4] and back.to_bytes() == table.to_bytes()
    assert table.select([1, 0]).label.tolist() == [4, 3, 1] and table.select([1]).key(0) == "c"
    with pytest.raises(IndexFileError, match="labels for its 2 indexed samples"):
        SampleTable.from_index_texts(["x.tar"], texts[:1], [np.array([1])])
