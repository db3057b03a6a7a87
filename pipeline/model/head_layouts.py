"""The synset of every row of a released Swin's classifier head, so that no head is ever read in the wrong order.

The invariant: Microsoft's 22K head (21,841 rows; the same tensors in timm's `ms_in22k` weights and in Hugging
Face's `microsoft/swin-*-in22k`) is Google's 21,843-synset list (timm's `imagenet21k_goog_synsets.txt`) cut to
its first 21,841 positions, with its two image-less classes (positions 9205 and 15027) holding the list's last two
synsets (n15102455, n15102894); it is *not* sorted fall11 (timm's `imagenet22k_synsets.txt`, which 12,636 of its
rows differ from, nor `imagenet22k_ms_synsets.txt`, FocalNet's). This is the order Microsoft's own
`data/map22kto1k.txt` indexes (its 1K classes' rows: n01440764 -> 359, n03042490 -> 5676, n15075141 -> 21817).
1K heads (`_22kto1k`, `ms_in1k`, `ms_in22k_ft_in1k`) are in the standard sorted 1K order (`imagenet_synsets.txt`).

`head_layout` decides a head's layout once, in this order: a layout file the user gives; the labels the source
itself declares (synsets as they are; transformers' readable `id2label` texts matched, all of them, against the
readable names of a known layout of the same length); the known layout of that many rows; otherwise refused.
Sources: ../shared/research/released-weights-and-shard-sets.md, section 1 "The 22K head and map22kto1k.txt".
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import timm.data

from data_prep.shardset.layout import read_layout
from swin_common.errors import UserError

log = logging.getLogger(__name__)
INFO = Path(timm.data.__file__).parent / "_info"  # the label files timm ships
GOOGLE_EMPTY = (9205, 15027)  # Google's image-less classes: n03931044, n09859684
MICROSOFT_22K_ROWS = 21841
SYNSET = re.compile(r"n\d{8}")


class HeadLayoutError(UserError, ValueError):
    """A head whose rows no known layout, declared label or layout file explains."""


@dataclass(frozen=True)
class HeadLayout:
    """The synsets of a head's rows, what the layout is called and why it was chosen."""

    synsets: list[str]
    name: str  # "microsoft-22k", "imagenet-1k", "declared by the source", "file PATH"
    why: str  # one clause for the log and model.json


def _timm_list(name: str) -> list[str]:
    return (INFO / name).read_text().split()


@functools.cache
def microsoft_22k() -> tuple[str, ...]:
    """Microsoft's 22K head order (the invariant above)."""
    google = _timm_list("imagenet21k_goog_synsets.txt")
    rows = google[:MICROSOFT_22K_ROWS]
    for position, synset in zip(GOOGLE_EMPTY, google[MICROSOFT_22K_ROWS:], strict=True):
        rows[position] = synset
    return tuple(rows)


@functools.cache
def imagenet_1k() -> tuple[str, ...]:
    """The standard 1K order (sorted synsets), which every released 1K Swin head uses."""
    return tuple(_timm_list("imagenet_synsets.txt"))


@functools.cache
def fall11_sorted() -> tuple[str, ...]:
    """Sorted fall11 (21,841 synsets): what timm assumes for a 21,841-row head, wrongly for Swin's."""
    return tuple(_timm_list("imagenet22k_synsets.txt"))


KNOWN = {"microsoft-22k": microsoft_22k, "imagenet-1k": imagenet_1k}


@functools.cache
def _lemmas() -> dict[str, str]:
    lines = (INFO / "imagenet_synset_to_lemma.txt").read_text().splitlines()
    return dict(line.split("\t", 1) for line in lines if "\t" in line)


def readable_names(synsets: list[str] | tuple[str, ...]) -> list[str]:
    """WordNet's words for each synset (timm's imagenet_synset_to_lemma.txt), "" for one it does not know."""
    lemmas = _lemmas()
    return [lemmas.get(s, "") for s in synsets]


def head_layout(
    num_classes: int,
    *,
    declared: list[str] | None = None,
    labels_file: str | Path | None = None,
    origin: str = "the weights",
) -> HeadLayout:
    """The layout of a head of `num_classes` rows (the module docstring's order); HeadLayoutError naming `origin`
    when nothing explains it."""
    if labels_file is not None:
        synsets = read_layout(labels_file)
        if len(synsets) != num_classes:
            raise HeadLayoutError(
                f"--labels {Path(labels_file).absolute()} lists {len(synsets)} synsets but {origin} has a head of "
                f"{num_classes} rows"
            )
        return HeadLayout(synsets, f"file {Path(labels_file).absolute()}", "the layout file given")
    known = {name: list(rows()) for name, rows in KNOWN.items() if len(rows()) == num_classes}
    if declared and not _placeholders(declared):
        if len(declared) != num_classes:
            raise HeadLayoutError(f"{origin} declares {len(declared)} labels for a head of {num_classes} rows")
        if all(SYNSET.fullmatch(label) for label in declared):
            if num_classes == MICROSOFT_22K_ROWS and declared == list(fall11_sorted()):
                log.warning(
                    "%s declares sorted fall11 for its 21,841-row head, timm's assumption for Swin's 22K weights, "
                    "which is wrong for them: its rows are read in Microsoft's order (give --labels to override)",
                    origin,
                )
                return HeadLayout(known["microsoft-22k"], "microsoft-22k", "Swin's 22K release order")
            return HeadLayout(list(declared), "declared by the source", "the synsets the source declares")
        for name, synsets in known.items():
            if _same_words(declared, readable_names(synsets)):
                return HeadLayout(synsets, name, "the source's label names are this layout's, row for row")
        raise HeadLayoutError(
            f"{origin} names its {num_classes} rows ({', '.join(declared[:3])}, ...) in an order that matches no "
            f"known layout ({', '.join(KNOWN)}): give --labels FILE, a synset per line in the head's order"
        )
    if len(known) == 1:
        name, synsets = next(iter(known.items()))
        return HeadLayout(synsets, name, f"the released layout of a {num_classes}-row Swin head")
    raise HeadLayoutError(
        f"{origin} has a head of {num_classes} rows and says nothing of their labels; no released Swin has that "
        f"many ({', '.join(f'{name}: {len(rows())}' for name, rows in KNOWN.items())}): give --labels FILE, a synset "
        f"per line in the head's order"
    )


def _placeholders(labels: list[str]) -> bool:
    """transformers' default id2label (LABEL_0, LABEL_1, ...) says nothing."""
    return all(label == f"LABEL_{i}" for i, label in enumerate(labels))


def _same_words(declared: list[str], names: list[str]) -> bool:
    """Row by row, the same words (case, spaces and punctuation apart): transformers' id2label texts are WordNet's
    lemmas, sometimes cut to the first one."""

    def words(text: str) -> list[str]:
        return re.findall(r"[a-z0-9']+", text.lower())

    return all(
        bool(w) and (w == n or w == n[: len(w)])
        for w, n in ((words(d), words(full)) for d, full in zip(declared, names, strict=True))
    )
