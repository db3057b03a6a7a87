"""python -m pipeline.predict MODEL IMAGE [IMAGE ...]

Top-5 classes per image. MODEL is models:/NAME@ALIAS, models:/NAME/VERSION (MLflow registry at
MLFLOW_TRACKING_URI) or an exported model folder. Preprocessing follows the model's metadata: resize the
shorter side to size / crop_pct (bicubic), centre crop, normalise with its mean/std.
"""
from __future__ import annotations

import argparse
import sys

import torch


def preprocess(path: str, meta: dict) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    pre, size = meta["preprocessing"], meta["img_size"]
    image = Image.open(path).convert("RGB")
    scale = size / pre["crop_pct"] / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                         Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor(pre["mean"])[:, None, None], torch.tensor(pre["std"])[:, None, None]
    return (x - mean) / std


def predict(model, meta: dict, paths: list[str], k: int = 5) -> list[list[tuple[str, int, float]]]:
    """Per image: the top-k (synset, class index, probability)."""
    batch = torch.stack([preprocess(p, meta) for p in paths])
    with torch.no_grad():
        probs = model(batch).softmax(dim=1)
    top = probs.topk(min(k, probs.shape[1]), dim=1)
    return [[(meta["synsets"][i], i, p) for p, i in zip(row_p.tolist(), row_i.tolist(), strict=True)]
            for row_p, row_i in zip(top.values, top.indices, strict=True)]


def load(model_ref: str):
    if model_ref.startswith("models:/"):
        from pipeline.tracking.registry import pull

        return pull(model_ref)
    from pipeline.engine.model_export import load_exported

    return load_exported(model_ref)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION or an exported model folder")
    p.add_argument("images", nargs="+")
    p.add_argument("-k", type=int, default=5, help="classes per image (default 5)")
    args = p.parse_args(argv)
    model, meta = load(args.model)
    for path, top in zip(args.images, predict(model, meta, args.images, args.k), strict=True):
        print(path)
        for synset, index, prob in top:
            print(f"  {prob:7.2%}  {synset}  (class {index})")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
