"""Does resizing the relative position bias tables matter when a model moves to a larger size and window?

The fine-tuning recipe loads a model trained at 224/window 7 at 384/window 12, its bias tables resized bicubic
(13x13 -> 23x23 per head). This measures, at CPU scale, what the resizing buys over zero tables:

1. Sources are trained on the embedded digits (swin_nano at 64x64, window 4) with a plain loop and
   random-resized crops, three kinds of them:
   - `usual`: timm's init and LR; a few CPU minutes leave the tables near their init (mean |b| ~0.05);
   - `table-lr-x20`: the tables' learning rate x20, so they move far from init (mean |b| ~1);
   - `locality-prior`: the tables start as a smooth locality pattern, -a_h * (dy^2 + dx^2) per head with slopes
     a_h = 2^-h (ALiBi-like), then train as usual: a source that leans on its tables, as real Swin does (the
     paper's Table 4: with the bias term alone and no query-key term Swin-T still reaches 79.3% top-1).
2. Each is asked how much it leans on its tables: the same model at 64 with zero tables (top-1 agreement with
   itself).
3. Each is loaded with `pipeline.model.transfer.initialise` at 96x96, window 6 (tables 7x7 -> 11x11, the analogue of
   224/7 -> 384/12), once with bicubic tables and once with zero tables; its predictions on the images upsampled
   to 96 are compared with the source's on the 64x64 originals: top-1 agreement and KL(source || transferred).

Last line: `agreement_gain_bicubic_vs_zeros: X.XXX`, the mean over seeds for the last kind of source listed
(`locality-prior` by default).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.embedded import digit_jpegs, synset_of
from pipeline.model import create_model
from pipeline.model.transfer import SourceModel, initialise

MEAN, STD = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
SYNSETS = [synset_of(d) for d in range(10)]
TABLE = "relative_position_bias_table"


def digit_images() -> tuple[list[Image.Image], torch.Tensor]:
    images, labels = [], []
    for synset, _name, data in digit_jpegs(64):
        images.append(Image.open(io.BytesIO(data)).convert("RGB"))
        labels.append(SYNSETS.index(synset))
    return images, torch.tensor(labels)


def to_batch(images: list[Image.Image], size: int) -> torch.Tensor:
    """Normalised tensors, resized bicubic to size x size (the upsampling of the 224 -> 384 check)."""

    def one(image):
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        return (torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1) - MEAN) / STD

    return torch.stack([one(image) for image in images])


def random_resized_crops(x: torch.Tensor, rng: np.random.Generator, min_area: float = 0.3) -> torch.Tensor:
    """Square crops of 30-100% of the area, resized back: the source sees digits at up to 1.8x scale."""
    size = x.shape[-1]
    out = []
    for image in x:
        side = int(size * np.sqrt(rng.uniform(min_area, 1.0)))
        top, left = rng.integers(0, size - side + 1, 2)
        crop = image[None, :, top : top + side, left : left + side]
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0])
    return torch.stack(out)


SOURCES = {"usual": 1.0, "table-lr-x20": 20.0, "locality-prior": 1.0}  # kind -> the tables' LR scale


def locality_prior(table: torch.Tensor) -> torch.Tensor:
    """-a_h * (dy^2 + dx^2) over the (2M-1)^2 rows of a table, slope a_h = 2^-h for head h (row-major offsets,
    as timm indexes them)."""
    side = int(round(table.shape[0] ** 0.5))
    offsets = torch.arange(side, dtype=table.dtype) - (side - 1) // 2
    squared = (offsets[:, None] ** 2 + offsets[None, :] ** 2).reshape(-1, 1)
    slopes = 2.0 ** -torch.arange(table.shape[1], dtype=table.dtype)
    return -squared * slopes[None, :]


def train_source(
    x: torch.Tensor, y: torch.Tensor, kind: str, epochs: int, seed: int = 0, lr: float = 2e-3, batch: int = 64
) -> torch.nn.Module:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = create_model("swin_nano", 64, 4, len(SYNSETS))
    table_lr_scale = SOURCES[kind]
    if kind == "locality-prior":
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(TABLE):
                    p.copy_(locality_prior(p))
    tables = [p for n, p in model.named_parameters() if n.endswith(TABLE)]
    others = [p for n, p in model.named_parameters() if not n.endswith(TABLE)]
    optimizer = torch.optim.AdamW(
        [{"params": others, "weight_decay": 0.05}, {"params": tables, "weight_decay": 0.0, "lr": lr * table_lr_scale}],
        lr=lr,
    )
    steps_per_epoch = len(x) // batch
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[lr, lr * table_lr_scale], total_steps=epochs * steps_per_epoch, pct_start=0.05
    )
    model.train()
    for _epoch in range(epochs):
        order = torch.from_numpy(rng.permutation(len(x)))
        for step in range(steps_per_epoch):
            idx = order[step * batch : (step + 1) * batch]
            loss = F.cross_entropy(model(random_resized_crops(x[idx], rng)), y[idx], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@dataclass
class Agreement:
    top1: float  # share of images where the transferred model's top-1 class is the source's
    kl: float  # mean KL(source || transferred) of the class distributions


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(chunk) for chunk in x.split(256)])


def agreement(reference: torch.Tensor, out: torch.Tensor) -> Agreement:
    kl = F.kl_div(out.log_softmax(1), reference.log_softmax(1), log_target=True, reduction="batchmean")
    return Agreement((out.argmax(1) == reference.argmax(1)).float().mean().item(), kl.item())


def transferred(source: torch.nn.Module, img_size: int, window: int, bias_tables: str) -> torch.nn.Module:
    state = SourceModel(source.state_dict(), SYNSETS, "the trained source")
    model = create_model("swin_nano", img_size, window, len(SYNSETS))
    initialise(model, state, SYNSETS, bias_tables=bias_tables)
    return model.eval()


def measure(source: torch.nn.Module, images: list[Image.Image], img_size: int = 96, window: int = 6) -> dict:
    x64, x_up = to_batch(images, 64), to_batch(images, img_size)
    reference = logits(source, x64)
    tables = [p.abs().mean().item() for n, p in source.named_parameters() if n.endswith(TABLE)]
    return {
        "mean_abs_table": float(np.mean(tables)),
        "own_size_zero_tables": agreement(reference, logits(transferred(source, 64, 4, "zeros"), x64)),
        "bicubic": agreement(reference, logits(transferred(source, img_size, window, "bicubic"), x_up)),
        "zeros": agreement(reference, logits(transferred(source, img_size, window, "zeros"), x_up)),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument(
        "--sources",
        nargs="+",
        choices=list(SOURCES),
        default=list(SOURCES),
        help="kinds of source to train (see above); the last line is for the last one",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="a source per seed and kind")
    args = p.parse_args()
    images, labels = digit_images()
    held_out = torch.arange(len(images)) % 10 == 0  # for the sources' own accuracy
    x = to_batch(images, 64)
    print(
        f"{len(images)} digits; sources: swin_nano 64/w4, {args.epochs} epochs; transferred to 96/w6; "
        "agreement with the source on all images (upsampled to 96)"
    )
    print(
        f"{'seed':>4s} {'source':>14s} {'val top1':>8s} {'mean|b|':>8s} {'64, zero tables':>16s} "
        f"{'96 bicubic: agree / KL':>23s} {'96 zeros: agree / KL':>21s}"
    )
    gains = []
    for seed, kind in ((seed, kind) for kind in args.sources for seed in args.seeds):
        t0 = time.perf_counter()
        source = train_source(x[~held_out], labels[~held_out], kind, args.epochs, seed)
        val_top1 = (logits(source, x[held_out]).argmax(1) == labels[held_out]).float().mean().item()
        m = measure(source, images)
        b, z = m["bicubic"], m["zeros"]
        print(
            f"{seed:4d} {kind:>14s} {val_top1:8.3f} {m['mean_abs_table']:8.3f} "
            f"{m['own_size_zero_tables'].top1:16.3f} {b.top1:14.3f} / {b.kl:5.3f} {z.top1:12.3f} / {z.kl:5.3f}"
            f"   ({time.perf_counter() - t0:.0f}s)"
        )
        if kind == args.sources[-1]:
            gains.append(b.top1 - z.top1)
    print(f"agreement_gain_bicubic_vs_zeros: {float(np.mean(gains)):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
