"""python -m pipeline.predict MODEL IMAGE [IMAGE ...]

Top-5 classes per image. MODEL is models:/NAME@ALIAS, models:/NAME/VERSION (MLflow registry at --tracking-uri,
else MLFLOW_TRACKING_URI) or an exported model folder. Preprocessing is the eval loader's (timm's eval transform) with
the model's metadata: resize the shorter side to floor(size / crop_pct) (bicubic), centre crop, normalise.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.tracking.store import reading_store
from swin_common.cli import command, exit_process

if TYPE_CHECKING:
    import torch  # at run time imported once needed: `--help` and argument errors answer without it


def preprocess(path: str, meta: dict) -> torch.Tensor:
    """The pixels the model was evaluated on: the eval loader's own transform (timm's), with the model's size,
    crop_pct, mean and std."""
    from PIL import Image

    from pipeline.data.eval_transform import eval_transform

    pre = meta["preprocessing"]
    with Image.open(path) as image:
        return eval_transform(meta["img_size"], pre["crop_pct"], pre["mean"], pre["std"])(image.convert("RGB"))


def predict(model, meta: dict, paths: list[str], k: int = 5) -> list[list[tuple[str, int, float]]]:
    """Per image: the top-k (synset, class index, probability)."""
    import torch  # here, not at the top: `--help` and argument errors answer without it

    batch = torch.stack([preprocess(p, meta) for p in paths])
    with torch.no_grad():
        probs = model(batch).softmax(dim=1)
    top = probs.topk(min(k, probs.shape[1]), dim=1)
    return [
        [(meta["synsets"][i], i, p) for p, i in zip(row_p.tolist(), row_i.tolist(), strict=True)]
        for row_p, row_i in zip(top.values, top.indices, strict=True)
    ]


def load(model_ref: str, tracking_uri: str | None = None):
    """(model, metadata) of an exported model folder, or of a models:/ URI pulled from the store `tracking_uri`
    names (--tracking-uri), else MLFLOW_TRACKING_URI."""
    if model_ref.startswith("models:/"):
        from pipeline.tracking.registry import pull

        return pull(model_ref, reading_store(tracking_uri, os.environ, Path.cwd()))
    from pipeline.engine.model_export import load_exported

    return load_exported(model_ref)


@command()
def main(argv: list[str] | None = None) -> int:
    from swin_common.cli import ArgumentParser, error_context

    p = ArgumentParser(
        prog="python -m pipeline.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION or an exported model folder")
    p.add_argument("images", nargs="+")
    p.add_argument("-k", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--tracking-uri", help="the MLflow store of a models:/ URI (default: MLFLOW_TRACKING_URI)")
    args = p.parse_args(argv)
    check_images(args.images)  # before fetching the model: a typo fails at once
    with error_context(args.model):
        model, meta = load(args.model, args.tracking_uri)
    for path, top in zip(args.images, predict(model, meta, args.images, args.k), strict=True):
        print(path)
        for synset, index, prob in top:
            name = (meta.get("label_descriptions") or [""] * (index + 1))[index]
            print(f"  {prob:7.2%}  {synset}  (class {index}){'  ' + name if name else ''}")
    sys.stdout.flush()
    return 0


def check_images(paths: list[str]) -> None:
    """Each path is a file that PIL recognises as an image; else one clear error naming it."""
    from PIL import Image, UnidentifiedImageError

    from swin_common.cli import CommandError

    for path in paths:
        if os.path.isdir(path):
            inside = sorted(os.listdir(path))
            raise CommandError(
                f"{os.path.abspath(path)} is a folder ({len(inside)} entries), not an image: give "
                f"image files, e.g. {os.path.join(path, '*.jpg')} (the shell expands it)"
            )
        if not os.path.isfile(path):
            raise CommandError(f"image not found: {os.path.abspath(path)} (check the path)")
        try:
            with Image.open(path):
                pass
        except (UnidentifiedImageError, OSError) as e:
            raise CommandError(f"{path}: not an image PIL can read ({e}): give a JPEG, PNG, ... file") from e


if __name__ == "__main__":
    exit_process(main())
