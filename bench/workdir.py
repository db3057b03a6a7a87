"""The benches' scratch folder: `--workdir DIR` keeps what a bench writes there (and lets a rerun reuse the
inputs it made), otherwise a new folder in the system temp dir, deleted when the bench ends, even on an error."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def add_workdir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", help="default: a folder in the system temp dir, deleted afterwards")


@contextmanager
def bench_workdir(workdir: str | None, prefix: str) -> Iterator[Path]:
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    finally:
        if not workdir:
            shutil.rmtree(work, ignore_errors=True)
