"""Whether a weights file from outside is safetensors, checked without torch and unpickling nothing.

Weights from outside (an export, a registry version, an init_from file) are safetensors: this checks that a
file is one by reading its header only, without torch and without unpickling anything. A pickle named
`model.safetensors` could run code when loaded; it is refused, naming the file."""

from __future__ import annotations

import hashlib
import io
import json
import pickletools
import zipfile
from pathlib import Path

from .errors import UserError


class UnsafeModelFile(UserError, ValueError):
    """A model file that is not the safetensors file its name says (a pickle, a zip archive, ...): never loaded."""


SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit


def check_safetensors(path: str | Path, origin: str | None = None) -> None:
    """Refuses, naming it, a file that is not safetensors (its header alone is read).

    Raises UnsafeModelFile, naming the file (and `origin`, e.g. a models:/ URI), unless `path` starts as a
    safetensors file does: an 8-byte little-endian header length, then that many bytes of one JSON object.
    Reads the header only and unpickles nothing: a model from outside (an export, a registry version, an
    init_from file) is weights + JSON, and a pickle named `model.safetensors` could run code when loaded."""
    path = Path(path)
    where = f"{path} (from {origin})" if origin else str(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        header = f.read(length) if 2 <= length <= min(size - 8, SAFETENSORS_MAX_HEADER) else b""
    if header[:1] == b"{":
        try:
            if isinstance(json.loads(header), dict):
                return
        except (UnicodeDecodeError, ValueError):
            pass
    if head.startswith(b"PK\x03\x04"):
        what = "a zip archive, as torch.save writes (a pickle inside)"
    elif head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        what = "a Python pickle (torch.save's legacy format, or pickle.dump)"
    elif size < 8:
        what = f"a file of {size} bytes"
    else:
        what = "a file without a safetensors header"
    raise UnsafeModelFile(
        f"{where} is not a safetensors file: it is {what}. Refused: models are loaded only "
        f"from safetensors weights + model.json (what `python -m pipeline.export` writes), "
        f"never unpickled"
    )


def tensor_shapes(path: str | Path) -> dict[str, list[int]]:
    """Each tensor's shape, from a checked safetensors file's header (no tensor is read)."""
    check_safetensors(path)
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {name: entry["shape"] for name, entry in header.items() if name != "__metadata__"}


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """The hex sha256 of a file, read in 4 MiB chunks (a Swin-L export, ~0.8 GB, in about half a second)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def pickled_strings(path: str | Path, limit: int = 64 << 20) -> set[str] | None:
    """The text strings of a torch.save file's pickles (its state-dict keys among them), read with pickletools'
    opcode walk: nothing is unpickled, imported or run. Reads the zip format's data.pkl, or the legacy format's
    leading pickles (magic number, protocol, system info, the object). None when the pickle cannot be walked (a
    damaged file: loading it says what is wrong)."""
    strings: set[str] = set()

    def walk(stream) -> None:
        for opcode, arg, _ in pickletools.genops(stream):
            if "UNICODE" in opcode.name and isinstance(arg, str):
                strings.add(arg)

    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [i for i in archive.infolist() if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
            if len(pickles) != 1 or pickles[0].file_size > limit:
                return None
            walk(io.BytesIO(archive.read(pickles[0])))
            return strings
    except zipfile.BadZipFile:
        pass
    try:
        with open(path, "rb") as f:
            for _ in range(4):  # the legacy format's four pickles; a plain pickle.dump file has one
                if not f.peek(1)[:1]:
                    break
                walk(f)
    except ValueError:
        return strings or None
    return strings
