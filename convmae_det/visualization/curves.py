"""Training curves from detectron2's ``metrics.json`` (one JSON dict per line; every job writes
it) or the ``metrics.jsonl`` of pretraining runs of earlier versions: losses, learning rate and evaluation metrics (box / mask AP, mIoU) against the
iteration, written as PNGs with matplotlib's Agg backend.

A loss term equal to another at every point (``loss_pixel`` of a pretraining run whose ``loss`` is
that single term) is drawn once, labelled with both names (``loss (= loss_pixel)``)."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence, Tuple

__all__ = ["read_metrics", "plot_metrics", "curve_panels", "EVAL_KEYS", "METRICS_FILES"]

EVAL_KEYS = ("bbox/AP", "segm/AP", "bbox/AP50", "segm/AP50", "sem_seg/mIoU", "sem_seg/pACC")
METRICS_FILES = ("metrics.json", "metrics.jsonl")
_TOTALS = ("total_loss", "loss")  # drawn first; a term equal to them is folded into their line
Series = Dict[str, List[Tuple[float, float]]]


def read_metrics(path: str) -> Series:
    """``{metric name: [(iteration, value), ...]}`` from a metrics file (or the
    ``metrics.json`` / ``metrics.jsonl`` inside a folder). Non-numeric values are skipped."""
    if os.path.isdir(path):
        for name in METRICS_FILES:
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(
                f"{path}: no {' or '.join(METRICS_FILES)} in this folder (is it a training "
                "output folder? the metrics file is written at the first logging period)"
            )
    elif not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no such folder or file (give a training output folder with "
            f"{' or '.join(METRICS_FILES)}, or that file)"
        )
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


def curve_panels(series: Series) -> List[Tuple[str, List[Tuple[str, str]]]]:
    """What :func:`plot_metrics` draws: ``[(panel title, [(metric key, legend label), ...])]``.

    Losses start with the total (``total_loss`` / ``loss``); a loss whose points equal those of
    a line already drawn is not drawn again but named in that line's label."""
    out = []
    for title, keys in _panels(series):
        if title != "losses":
            out.append((title, [(k, k) for k in keys]))
            continue
        groups: List[Tuple[str, List[str]]] = []
        for key in sorted(keys, key=lambda k: (k not in _TOTALS, k)):
            same = next((g for g in groups if series[g[0]] == series[key]), None)
            if same is None:
                groups.append((key, []))
            else:
                same[1].append(key)
        lines = [(k, f"{k} (= {', '.join(dups)})" if dups else k) for k, dups in groups]
        out.append((title, lines))
    return out


def plot_metrics(path: str, output_dir: str, *, prefix: str = "", dpi: int = 100) -> List[str]:
    """Write ``{prefix}curves.png`` (all panels side by side) plus one PNG per panel
    (``{prefix}losses.png``, ``{prefix}lr.png``, ``{prefix}eval.png``). Returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(path)
    panels = curve_panels(series)
    if not panels:
        raise ValueError(f"{path}: no loss, lr or evaluation values to plot")
    os.makedirs(output_dir, exist_ok=True)
    names = {"losses": "losses", "learning rate": "lr", "evaluation": "eval"}

    def draw(ax, title: str, lines: Sequence[Tuple[str, str]]) -> None:
        for key, label in lines:
            xs, ys = zip(*series[key])
            style = "o-" if len(xs) < 20 else "-"
            ax.plot(xs, ys, style, label=label, linewidth=1.2, markersize=4)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if title == "losses" and all(v > 0 for k, _ in lines for _, v in series[k]):
            ax.set_yscale("log")
        ax.legend(fontsize=7)

    paths = []
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels):
        draw(ax, title, lines)
    fig.tight_layout()
    out = os.path.join(output_dir, f"{prefix}curves.png")
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    paths.append(out)
    for title, lines in panels:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        draw(ax, title, lines)
        fig.tight_layout()
        out = os.path.join(output_dir, f"{prefix}{names[title]}.png")
        fig.savefig(out, dpi=dpi)
        plt.close(fig)
        paths.append(out)
    return paths
