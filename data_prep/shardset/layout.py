"""Label layouts: the ordered list of synsets that defines label i, and maps between two layouts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from swin_common.errors import UserError


class LayoutError(UserError, ValueError):
    """A label layout file that is missing, empty or lists a synset twice, or that misses synsets of the source."""


def parse_layout(text: str, origin: str = "layout") -> list[str]:
    """The synsets of a label-layout text, in order; an error for a synset listed twice.

    One synset per line (first whitespace-separated token, so 'n01440764 tench' works); blank lines and
    '#' comments are ignored; a synset listed twice is an error."""
    synsets: list[str] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        synset = line.split()[0]
        if synset in seen:
            raise LayoutError(f"{origin}: synset {synset} is listed twice (lines {seen[synset]} and {lineno})")
        seen[synset] = lineno
        synsets.append(synset)
    if not synsets:
        raise LayoutError(f"{origin}: no synsets in the layout")
    return synsets


def read_layout(path: str | Path) -> list[str]:
    """A layout file, or a shard folder holding synsets.txt."""
    path = Path(path)
    if path.is_dir():
        path = path / "synsets.txt"
    if not path.is_file():
        raise LayoutError(f"layout file not found: {path}")
    return parse_layout(path.read_text(), str(path))


def format_layout(synsets: list[str]) -> str:
    return "".join(s + "\n" for s in synsets)


def layout_sha256(synsets: list[str]) -> str:
    return hashlib.sha256(format_layout(synsets).encode()).hexdigest()


def check_covers(layout: list[str], found: list[str]) -> None:
    """Every synset present in the source must have a label."""
    known = set(layout)
    missing = [s for s in found if s not in known]
    if missing:
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise LayoutError(f"{len(missing)} synset(s) of the source are not in the label layout: {shown}")


def map_layouts(source: list[str], target: list[str]) -> tuple[list[int], list[str]]:
    """For each target synset, its row in the source layout, or -1 (and listed as missing) when absent."""
    position = {s: i for i, s in enumerate(source)}
    index = [position.get(s, -1) for s in target]
    missing = [s for s, i in zip(target, index, strict=True) if i < 0]
    return index, missing


def write_map(path: str | Path, source_path: str, target_path: str, source: list[str], target: list[str]) -> dict:
    index, missing = map_layouts(source, target)
    doc = {
        "source_layout": {"path": source_path, "num_classes": len(source), "sha256": layout_sha256(source)},
        "target_layout": {"path": target_path, "num_classes": len(target), "sha256": layout_sha256(target)},
        "source_index": index,  # target label i takes source row source_index[i]; -1: no such synset
        "missing": missing,
    }
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")
    return doc
