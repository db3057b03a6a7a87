"""DALI's webdataset index files (the format `wds2idx` writes, version v1.2).

First line 'v1.2 <samples>'; then one line per sample with, for each of its files in tar order,
'<ext> <data offset> <size> <member name>'. With them fn.readers.webdataset needs no scan of the shards.
"""
from __future__ import annotations

VERSION = "v1.2"


def format_index(samples: list[list[tuple[str, int, int, str]]]) -> str:
    lines = [f"{VERSION} {len(samples)}"]
    for components in samples:
        lines.append(" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in components))
    return "\n".join(lines) + "\n"


def parse_index(text: str) -> list[list[tuple[str, int, int, str]]]:
    lines = text.splitlines()
    if not lines:
        raise ValueError("empty index file")
    version, _, count = lines[0].partition(" ")
    if version != VERSION:
        raise ValueError(f"index version {version!r}, expected {VERSION}")
    samples = []
    for line in lines[1:]:
        fields = line.split(" ")
        if len(fields) % 4:
            raise ValueError(f"malformed index line: {line[:100]!r}")
        samples.append([(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                        for i in range(0, len(fields), 4)])
    if len(samples) != int(count):
        raise ValueError(f"index header says {count} samples, lines give {len(samples)}")
    return samples
