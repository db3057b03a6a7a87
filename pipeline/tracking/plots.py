"""Training curves people look at, drawn from a run's metrics.jsonl: loss, LR, val accuracy (PNG)."""

from __future__ import annotations

import json
from pathlib import Path


def training_curves(metrics_file: Path, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_file.is_file():
        return None
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_top1" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = [
        (axes[0], train, ["loss"], "train loss"),
        (axes[1], train, ["lr"], "learning rate"),
        (axes[2], evals, ["val_top1", "val_top5"], "val accuracy (%)"),
    ]
    for ax, data, keys, title in panels:
        for key in keys:
            points = [(r["step"], r[key]) for r in data if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="." if len(points) < 50 else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
