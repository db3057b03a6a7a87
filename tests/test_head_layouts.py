"""The invariant of pipeline/model/head_layouts.py, tested on itself: a released Swin head's rows get their real
synsets, never sorted fall11 read into Microsoft's 22K head."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.model.head_layouts import (
    GOOGLE_EMPTY,
    HeadLayoutError,
    fall11_sorted,
    head_layout,
    imagenet_1k,
    microsoft_22k,
    readable_names,
)

# rows of Microsoft's own data/map22kto1k.txt (the 1K classes' rows in its 22K head; tests/data/README.md)
MICROSOFT_MAP = Path(__file__).parent / "data" / "map22kto1k.txt"
MICROSOFT_MAP_SPOTS = {"n01440764": 359, "n03042490": 5676, "n15075141": 21817}
TEDDY_BEAR = "n04399382"  # the one 1K class absent from 22K


def test_microsofts_own_map_agrees_for_999_of_the_1000_classes():
    """Each 1K class's row in Microsoft's map holds that class's synset in the layout read here, except teddy bear,
    which 22K lacks and the map points at a garment (n03013580, "chemise, shimmy, shift, slip, teddy")."""
    rows = [int(line) for line in MICROSOFT_MAP.read_text().split()]
    ms, one = microsoft_22k(), imagenet_1k()
    wrong = {one[i]: ms[row] for i, row in enumerate(rows) if ms[row] != one[i]}
    assert len(rows) == 1000 and wrong == {TEDDY_BEAR: "n03013580"}
    # read as sorted fall11, the head would give 281 of the 999 classes it holds a wrong row
    fall11 = {s: i for i, s in enumerate(fall11_sorted())}
    assert sum(fall11[s] != row for s, row in zip(one, rows, strict=True) if s != TEDDY_BEAR) == 281


def test_microsoft_22k_is_google_order_with_the_empty_classes_replaced():
    rows = microsoft_22k()
    assert len(rows) == len(set(rows)) == 21841
    assert [rows[i] for i in GOOGLE_EMPTY] == ["n15102455", "n15102894"]
    assert {r: rows.index(r) for r in MICROSOFT_MAP_SPOTS} == MICROSOFT_MAP_SPOTS
    assert set(rows) == set(fall11_sorted())  # the same synsets as fall11 ...
    differ = sum(a != b for a, b in zip(rows, fall11_sorted(), strict=True))
    assert differ == 12636  # ... in another order from row 9205 on
    assert all(a == b for a, b in zip(rows[:9205], fall11_sorted()[:9205], strict=True))
    assert fall11_sorted().index("n15075141") == 21815  # what reading it as fall11 would give
    assert [s for s in imagenet_1k() if s not in set(rows)] == [TEDDY_BEAR]


def test_a_head_is_read_in_the_layout_of_its_row_count():
    assert head_layout(21841).synsets == list(microsoft_22k())
    assert head_layout(21841).name == "microsoft-22k"
    assert head_layout(1000).synsets == list(imagenet_1k())
    with pytest.raises(HeadLayoutError, match="a head of 500 rows and says nothing of their labels.*--labels"):
        head_layout(500, origin="w.pth")


def test_declared_labels_are_checked_against_the_known_layouts(tmp_path):
    ms = list(microsoft_22k())
    # transformers' id2label: WordNet's words, sometimes only the first lemma
    words = [name.split(",")[0] for name in readable_names(ms)]
    assert head_layout(21841, declared=words).name == "microsoft-22k"
    as_fall11 = [name.split(",")[0] for name in readable_names(fall11_sorted())]
    with pytest.raises(HeadLayoutError, match="matches no known layout"):
        head_layout(21841, declared=as_fall11)  # words in sorted fall11 order: refused, never guessed
    # synsets declared in sorted fall11 for a 21,841-row head: timm's assumption, read in Microsoft's order
    assert head_layout(21841, declared=list(fall11_sorted())).name == "microsoft-22k"
    assert head_layout(3, declared=["n01440764", "n03042490", TEDDY_BEAR]).synsets[-1] == TEDDY_BEAR
    assert head_layout(1000, declared=[f"LABEL_{i}" for i in range(1000)]).name == "imagenet-1k"  # says nothing
    with pytest.raises(HeadLayoutError, match="declares 2 labels for a head of 3 rows"):
        head_layout(3, declared=["n01440764", "n03042490"])


def test_a_labels_file_overrides_and_must_fit(tmp_path):
    layout = tmp_path / "layout.txt"
    layout.write_text("n01440764\nn03042490\n")
    assert head_layout(2, labels_file=layout).synsets == ["n01440764", "n03042490"]
    with pytest.raises(HeadLayoutError, match=f"--labels {layout} lists 2 synsets but w.pth has a head of 1000"):
        head_layout(1000, labels_file=layout, origin="w.pth")


def test_readable_names_are_wordnet_words():
    assert readable_names(["n01440764", TEDDY_BEAR, "n00000003"]) == ["tench, Tinca tinca", "teddy, teddy bear", ""]
