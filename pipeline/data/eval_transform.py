"""Evaluation preprocessing, the same for val batches and `pipeline.predict`: timm's eval transform.

Evaluation preprocessing, one function for the torch backend's val batches and `pipeline.predict`: timm's
eval transform (resize the shorter side to floor(size / crop_pct), bicubic; centre crop; normalise), so a
registered model sees at prediction exactly the pixels it was evaluated on."""

from __future__ import annotations

from timm.data import create_transform

from .samples import MEAN, STD


def eval_transform(image_size: int, crop_pct: float, mean=MEAN, std=STD):
    """PIL RGB image -> normalised float CHW tensor."""
    return create_transform(
        image_size, is_training=False, crop_pct=crop_pct, interpolation="bicubic", mean=tuple(mean), std=tuple(std)
    )
