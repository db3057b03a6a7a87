"""The interface a loader backend implements, and the factory that picks one.

A backend turns batches [start, end) of an epoch order into (batch index, images, labels, skipped) on the
loader's device; it reads samples only through a BatchSource. Whatever state it needs to resume exactly
mid-epoch (DALI's RNG checkpoint when its own operators draw) it keeps itself and hands over in state_dict().
"""

from __future__ import annotations

import typing
from collections.abc import Iterator
from typing import Protocol

import torch

from pipeline.config import Backend as BackendName


class Backend(Protocol):
    name: str
    reads_ahead_here: bool  # reads batches ahead of those it hands out, in the loader's process (a feeder thread)

    def batches(
        self, source, order, epoch: int, start: int, end: int
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, int]]: ...

    def state_dict(self, position: int) -> dict: ...  # extra resume state at this position of the epoch

    def load_state_dict(self, state: dict) -> None: ...

    def new_epoch(self) -> None: ...  # forget mid-epoch state: the next batches start an epoch


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401

        return True
    except ImportError:
        return False


def create_backend(name: BackendName, cfg, device: str) -> Backend:
    """`auto` is DALI where it imports, else PyTorch."""
    if name == "auto":
        name = "dali" if dali_available() else "torch"
    if name == "dali":
        from .dali_backend import DaliBackend

        return DaliBackend(cfg, device)
    if name == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend(cfg, device)
    raise ValueError(f"data.backend must be one of {', '.join(typing.get_args(BackendName))}, not {name!r}")
