"""DALI's webdataset index files (the format `wds2idx` writes, version v1.2).

First line 'v1.2 <samples>'; then one line per sample with, for each of its files in tar order,
'<ext> <data offset> <size> <member name>'. With them fn.readers.webdataset needs no scan of the shards.
"""

from __future__ import annotations

from swin_common.errors import UserError

VERSION = "v1.2"


class IndexFileError(UserError, ValueError):
    """An index file (a shard's .idx, a split's index.npz) that cannot be read as one."""


def format_index(samples: list[list[tuple[str, int, int, str]]]) -> str:
    lines = [f"{VERSION} {len(samples)}"]
    for components in samples:
        lines.append(" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in components))
    return "\n".join(lines) + "\n"


def parse_index(text: str) -> list[list[tuple[str, int, int, str]]]:
    lines = text.splitlines()
    if not lines:
        raise IndexFileError("empty index file")
    version, _, count = lines[0].partition(" ")
    if version != VERSION:
        raise IndexFileError(f"index version {version!r}, expected {VERSION}")
    samples = []
    for line in lines[1:]:
        fields = line.split(" ")
        try:  # a field short of a whole (ext, offset, size, name) group, or a number that is none
            sample = [
                (fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3]) for i in range(0, len(fields), 4)
            ]
        except (IndexError, ValueError):
            raise IndexFileError(f"malformed index line: {line[:100]!r}") from None
        samples.append(sample)
    if not count.isdigit() or len(samples) != int(count):
        raise IndexFileError(f"index header says {count} samples, lines give {len(samples)}")
    return samples
