"""Training curves from detectron2's ``metrics.json`` (one JSON dict per line) or the pretraining
``metrics.jsonl``: losses, learning rate and evaluation metrics (box / mask AP, mIoU) against the
iteration, written as PNGs with matplotlib's Agg backend."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence, Tuple

__all__ = ["read_metrics", "plot_metrics", "EVAL_KEYS"]

EVAL_KEYS = ("bbox/AP", "segm/AP", "bbox/AP50", "segm/AP50", "sem_seg/mIoU", "sem_seg/pACC")
Series = Dict[str, List[Tuple[float, float]]]


def read_metrics(path: str) -> Series:
    """``{metric name: [(iteration, value), ...]}`` from a metrics file (or the
    ``metrics.json`` / ``metrics.jsonl`` inside a folder). Non-numeric values are skipped."""
    if os.path.isdir(path):
        for name in ("metrics.json", "metrics.jsonl"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"{path}: no metrics.json or metrics.jsonl in this folder")
    series: Series = {}
    with open(path) as f:
        for n, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n + 1}: not a JSON line ({exc})") from None
            it = rec.get("iteration", rec.get("step", n))
            for key, value in rec.items():
                if key in ("iteration", "step") or isinstance(value, bool):
                    continue
                if isinstance(value, (int, float)):
                    series.setdefault(key, []).append((float(it), float(value)))
    return series


def _panels(series: Series) -> List[Tuple[str, List[str]]]:
    losses = sorted(k for k in series if "loss" in k and "/" not in k)
    lrs = sorted(k for k in series if k == "lr" or k.endswith("/lr") or k.startswith("lr"))
    evals = [k for k in EVAL_KEYS if k in series]
    panels = [("losses", losses), ("learning rate", lrs), ("evaluation", evals)]
    return [(title, keys) for title, keys in panels if keys]


def plot_metrics(path: str, output_dir: str, *, prefix: str = "", dpi: int = 100) -> List[str]:
    """Write ``{prefix}curves.png`` (all panels side by side) plus one PNG per panel
    (``{prefix}losses.png``, ``{prefix}lr.png``, ``{prefix}eval.png``). Returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(path)
    panels = _panels(series)
    if not panels:
        raise ValueError(f"{path}: no loss, lr or evaluation values to plot")
    os.makedirs(output_dir, exist_ok=True)
    names = {"losses": "losses", "learning rate": "lr", "evaluation": "eval"}

    def draw(ax, title: str, keys: Sequence[str]) -> None:
        for key in keys:
            xs, ys = zip(*series[key])
            style = "o-" if len(xs) < 20 else "-"
            ax.plot(xs, ys, style, label=key, linewidth=1.2, markersize=4)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if title == "losses" and all(v > 0 for k in keys for _, v in series[k]):
            ax.set_yscale("log")
        ax.legend(fontsize=7)

    paths = []
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        draw(ax, title, keys)
    fig.tight_layout()
    out = os.path.join(output_dir, f"{prefix}curves.png")
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    paths.append(out)
    for title, keys in panels:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        draw(ax, title, keys)
        fig.tight_layout()
        out = os.path.join(output_dir, f"{prefix}{names[title]}.png")
        fig.savefig(out, dpi=dpi)
        plt.close(fig)
        paths.append(out)
    return paths
