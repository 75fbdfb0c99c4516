"""The performance targets, which benchmark rows answer them, and the markdown table of the check.

``tools/perf_suite.sh`` runs its rows (``OUT/<suite>_<row>.json``, written by
``tools/benchmark.py --output``) and ends with ``tools/perf_targets.py OUT``, which loads them
with :func:`load_results` / :func:`load_row_status`, checks them with :func:`evaluate` and prints
:func:`markdown_table`:

    from convmae_det.benchmark.targets import evaluate, markdown_table
    print(markdown_table(evaluate({"backbone_fast": result_dict})))

A target lists candidate rows in order of preference; it is PASS when one of them meets every
check, FAIL when at least one was measured and none does, NOT RUN when none produced a result
(the reason comes from the suite's ``rows.tsv``: timeout, failure, skipped). A row measured in
another setting than the target's (device, card, batch, size, dtype) still gets a status, marked
``*``: it is then no evidence for the target (the ``tiny`` suite checks the plumbing this way).

This module uses the standard library only, so that the table can be printed without torch.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "Check",
    "Target",
    "Evaluation",
    "TARGETS",
    "SUITE_PREFIXES",
    "STATUSES",
    "row_key",
    "load_results",
    "load_row_status",
    "evaluate",
    "markdown_table",
]

SUITE_PREFIXES = ("gpu", "tiny", "cpu")
STATUSES = ("PASS", "FAIL", "NOT RUN")
GB = 1e9  # the targets are in GB (10^9 bytes); the benchmark tables print GiB


def row_key(path_or_name: str) -> str:
    """The row name of a result file: ``OUT/gpu_backbone_fast.json`` -> ``backbone_fast``."""
    stem = os.path.splitext(os.path.basename(path_or_name))[0]
    for prefix in SUITE_PREFIXES:
        if stem.startswith(prefix + "_"):
            return stem[len(prefix) + 1 :]
    return stem


# ------------------------------------------------------------------------------------ metrics
def _mfu(result: Mapping[str, Any], baseline: Optional[Mapping[str, Any]]) -> Optional[float]:
    return result.get("mfu")


def _gb_per_img(
    result: Mapping[str, Any], baseline: Optional[Mapping[str, Any]]
) -> Optional[float]:
    value = result.get("peak_mem_per_img_bytes")
    return None if value is None else value / GB


def _ms_per_img(
    result: Mapping[str, Any], baseline: Optional[Mapping[str, Any]]
) -> Optional[float]:
    return result.get("ms_per_img")


def _speedup(result: Mapping[str, Any], baseline: Optional[Mapping[str, Any]]) -> Optional[float]:
    if baseline is None or not result.get("img_per_s") or not baseline.get("img_per_s"):
        return None
    return result["img_per_s"] / baseline["img_per_s"]


def _fmt_mfu(value: float, result: Mapping[str, Any], baseline: Any) -> str:
    peak = result.get("peak_tflops")
    return f"MFU {100 * value:.1f}%" + (f" of {peak:.0f} TFLOP/s" if peak else "")


def _fmt_speedup(value: float, result: Mapping[str, Any], baseline: Mapping[str, Any]) -> str:
    return f"{value:.2f}x ({result['img_per_s']:.1f} vs {baseline['img_per_s']:.1f} img/s)"


# name -> (value of a result, given the baseline result; formatted value; unit of the threshold)
METRICS: Dict[str, Tuple[Callable[..., Optional[float]], Callable[..., str], str]] = {
    "mfu": (_mfu, _fmt_mfu, ""),
    "gb_per_img": (_gb_per_img, lambda v, r, b: f"{v:.2f} GB/img", " GB/img"),
    "ms_per_img": (_ms_per_img, lambda v, r, b: f"{v:.1f} ms/img", " ms/img"),
    "speedup": (_speedup, _fmt_speedup, "x"),
}


@dataclass(frozen=True)
class Check:
    """``metric op threshold``, e.g. ``Check("ms_per_img", "<=", 35.0)``; MFU is a fraction."""

    metric: str
    op: str
    threshold: float

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric {self.metric!r}; expected one of {sorted(METRICS)}")
        if self.op not in ("<=", ">="):
            raise ValueError(f"op {self.op!r}; expected '<=' or '>='")

    def passes(self, value: float) -> bool:
        return value <= self.threshold if self.op == "<=" else value >= self.threshold

    def text(self) -> str:
        if self.metric == "mfu":
            return f"{self.op} {100 * self.threshold:g}% MFU"
        return f"{self.op} {self.threshold:g}{METRICS[self.metric][2]}"


@dataclass(frozen=True)
class Target:
    """A performance target: ``checks`` on one of ``rows`` (in order of preference), measured in
    ``setting`` (keys: device, card, batch_size, image_size, dtype). With ``baseline_row`` the
    checks compare against that row (metric ``speedup``)."""

    key: str
    title: str
    rows: Tuple[str, ...]
    checks: Tuple[Check, ...]
    setting: Mapping[str, Any] = field(default_factory=dict)
    baseline_row: Optional[str] = None
    note: str = ""

    @property
    def requirement(self) -> str:
        return " and ".join(c.text() for c in self.checks)


_CARD = ("H100", "H200")
_B4_1024 = dict(device="cuda", card=_CARD, batch_size=4, image_size=[1024, 1024], dtype="bf16")

# The targets of the performance issue (H100 / H200 class card).
TARGETS: Tuple[Target, ...] = (
    Target(
        "backbone_train",
        "paper backbone train step (ConvViTDet-B fwd+bwd, batch 4, 1024x1024, bf16)",
        rows=("backbone_fast", "backbone_fast_ckpt1", "backbone_fast_compiled"),
        checks=(Check("mfu", ">=", 0.35), Check("gb_per_img", "<=", 5.0)),
        setting=_B4_1024,
        note="one configuration must meet both; MFU = model FLOPs (no recomputation) / time "
        "against the bf16 matmul peak measured in the same run; memory = peak CUDA "
        "max_memory_allocated over the timed steps (weights, gradients, activations) / batch",
    ),
    Target(
        "detector_train",
        "paper detector train step (Mask R-CNN ConvViTDet-B, batch 4, 1024x1024, bf16)",
        rows=("maskrcnn_train",),
        checks=(Check("ms_per_img", "<=", 35.0),),
        setting=_B4_1024,
        note="synthetic instances (8 polygons per image), losses, backward, AdamW step",
    ),
    Target(
        "detector_inference",
        "paper detector inference (Mask R-CNN ConvViTDet-B, batch 1, 1024x1024, bf16)",
        rows=("maskrcnn_infer",),
        checks=(Check("ms_per_img", "<=", 25.0),),
        setting=dict(_B4_1024, batch_size=1),
        note="post-processing included, 100 detections with masks pasted per image",
    ),
    Target(
        "pretrain",
        "FastConvMAE-B pretraining step (batch 64, 224x224)",
        rows=("pretrain_fast",),
        baseline_row="pretrain_official",
        checks=(Check("speedup", ">=", 2.0),),
        setting=dict(device="cuda", card=_CARD, batch_size=64, image_size=[224, 224]),
        note="baseline = the official settings on our model, measured in the same run "
        "(explicit attention, fp16 autocast, NCHW, no compile; no GradScaler, which would only "
        "slow the baseline): the official code itself is not run here",
    ),
    Target(
        "segmentation_backbone",
        "segmentation backbone train step (UperNet ConvMAE-B backbone fwd+bwd, batch 8, 512x512, "
        "bf16)",
        rows=("seg_backbone_train",),
        checks=(Check("ms_per_img", "<=", 4.0),),
        setting=dict(device="cuda", card=_CARD, batch_size=8, image_size=[512, 512], dtype="bf16"),
        note="the backbone of configs/ADE20K/upernet_convmae_b_512_160k.yaml, forward + backward "
        "without the UperNet head (the row upernet_train times the whole step); batch 8 on one "
        "card for throughput (the recipe's total batch is 16)",
    ),
)


# ------------------------------------------------------------------------------------ loading
def load_results(paths: Iterable[str]) -> Dict[str, Dict[str, Any]]:
    """Benchmark results by row name (:func:`row_key`) from JSON files; files that are not
    benchmark results (no ``fast_paths`` / ``speedup``) or not JSON are ignored. Directories
    are searched for ``*.json``."""
    files: List[str] = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".json"))
        else:
            files.append(path)
    out: Dict[str, Dict[str, Any]] = {}
    for path in files:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and ("fast_paths" in data or "speedup" in data):
            out[row_key(path)] = data
    return out


def load_row_status(path: str) -> Dict[str, Dict[str, str]]:
    """Row outcomes from a suite's ``rows.tsv`` (name, status, rc, seconds, limit, reason) by
    row name; {} when the file is missing."""
    out: Dict[str, Dict[str, str]] = {}
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2 or parts[0] == "name" or line.startswith("#"):
                continue
            parts += [""] * (6 - len(parts))
            name, status, rc, seconds, limit, reason = parts[:6]
            out[row_key(name)] = dict(
                status=status, rc=rc, seconds=seconds, limit=limit, reason=reason
            )
    return out


# --------------------------------------------------------------------------------- evaluation
@dataclass
class Evaluation:
    """The outcome of one target: ``status`` in :data:`STATUSES`, the ``row`` it rests on,
    ``measured`` (formatted values), ``differs`` (how that row's setting differs from the
    target's), ``notes`` (other candidate rows, reasons for NOT RUN)."""

    target: Target
    status: str
    row: Optional[str] = None
    measured: List[str] = field(default_factory=list)
    differs: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    values: Dict[str, Optional[float]] = field(default_factory=dict)

    @property
    def marked_status(self) -> str:
        return self.status + ("*" if self.differs and self.status != "NOT RUN" else "")


def _not_run_reason(row: str, status: Mapping[str, Mapping[str, str]]) -> str:
    info = status.get(row)
    if info is None:
        return f"{row}: no result"
    text = info.get("status", "?")
    if info.get("reason"):
        text += f" ({info['reason']})"
    return f"{row}: {text}"


def _setting_differences(target: Target, result: Mapping[str, Any]) -> List[str]:
    want, out = target.setting, []
    device = str(result.get("device", ""))
    if "device" in want and not device.startswith(want["device"]):
        out.append(f"device {device or '?'} (target: {want['device']})")
    card = str(result.get("device_name", ""))
    if "card" in want and not any(c in card for c in want["card"]):
        out.append(f"card {card or '?'} (target: {'/'.join(want['card'])})")
    if "batch_size" in want and result.get("batch_size") != want["batch_size"]:
        out.append(f"batch {result.get('batch_size')} (target: {want['batch_size']})")
    size = list(result.get("image_size") or [])
    if "image_size" in want and size != list(want["image_size"]):
        have = "x".join(map(str, size)) or "?"
        out.append(f"size {have} (target: {'x'.join(map(str, want['image_size']))})")
    dtype = (result.get("fast_paths") or {}).get("dtype")
    if "dtype" in want and dtype != want["dtype"]:
        out.append(f"dtype {dtype} (target: {want['dtype']})")
    return out


def _describe(row: str, result: Mapping[str, Any]) -> str:
    size = "x".join(map(str, result.get("image_size") or [])) or "?"
    paths = result.get("fast_paths") or {}
    flags = [paths.get("dtype", "?"), f"attn {paths.get('attn', '?')}"]
    flags += ["channels-last"] if paths.get("channels_last") else []
    if paths.get("act_checkpoint"):
        flags += ["ckpt " + ",".join(map(str, paths["act_checkpoint"]))]
    flags += ["compiled"] if paths.get("compile") else []
    return (
        f"`{row}`: {result.get('name', '?')}, {result.get('device_name', '?')}, "
        f"batch {result.get('batch_size', '?')}, {size}, {' '.join(flags)}"
    )


def evaluate(
    results: Mapping[str, Mapping[str, Any]],
    row_status: Optional[Mapping[str, Mapping[str, str]]] = None,
    targets: Sequence[Target] = TARGETS,
) -> List[Evaluation]:
    """Check every target against ``results`` (row name -> result dict of tools/benchmark.py)."""
    row_status = row_status or {}
    out = []
    for target in targets:
        baseline = results.get(target.baseline_row) if target.baseline_row else None
        candidates = []  # (checks passed, -preference, row, values, formatted)
        reasons = []
        for rank, row in enumerate(target.rows):
            result = results.get(row)
            if result is None:
                reasons.append(_not_run_reason(row, row_status))
                continue
            if target.baseline_row and baseline is None:
                reasons.append(f"baseline {_not_run_reason(target.baseline_row, row_status)}")
                continue
            values, shown, passed = {}, [], 0
            for check in target.checks:
                compute, fmt, _ = METRICS[check.metric]
                value = compute(result, baseline)
                values[check.metric] = value
                if value is None:
                    shown.append(f"{check.metric}: not measured")
                    continue
                shown.append(fmt(value, result, baseline))
                passed += check.passes(value)
            if any(v is None for v in values.values()):
                reasons.append(f"{row}: {', '.join(s for s in shown if 'not measured' in s)}")
                continue
            candidates.append((passed, -rank, row, values, shown))
        if not candidates:
            out.append(Evaluation(target, "NOT RUN", notes=reasons))
            continue
        winners = [c for c in candidates if c[0] == len(target.checks)]
        best = winners[0] if winners else max(candidates)
        _, _, row, values, shown = best
        others = [f"{c[2]}: {'; '.join(c[4])}" for c in candidates if c[2] != row]
        ev = Evaluation(
            target,
            "PASS" if winners else "FAIL",
            row=row,
            measured=shown,
            differs=_setting_differences(target, results[row]),
            notes=others + reasons,
            values=values,
        )
        out.append(ev)
    return out


def _cell(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("|", "\\|")).strip()


MARKDOWN_HEADER = (
    "| target | requirement | status | measured | row (setting) | notes |\n"
    "|---|---|---|---|---|---|"
)


def markdown_table(evaluations: Sequence[Evaluation], results: Optional[Mapping] = None) -> str:
    """The targets table: one line per target, then footnotes (the ``*`` marker, each target's
    note on what is measured)."""
    lines = [MARKDOWN_HEADER]
    for ev in evaluations:
        row = "-"
        if ev.row is not None and results is not None and ev.row in results:
            row = _describe(ev.row, results[ev.row])
        elif ev.row is not None:
            row = f"`{ev.row}`"
        if ev.target.baseline_row and results is not None and ev.target.baseline_row in results:
            row += (
                f"; baseline {_describe(ev.target.baseline_row, results[ev.target.baseline_row])}"
            )
        notes = list(ev.notes)
        if ev.differs:
            notes.insert(0, "setting differs: " + ", ".join(ev.differs))
        cells = [
            ev.target.title,
            ev.target.requirement,
            f"**{ev.marked_status}**",
            "; ".join(ev.measured) or "-",
            row,
            "; ".join(notes) or "-",
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if any(ev.differs and ev.status != "NOT RUN" for ev in evaluations):
        lines.append("")
        lines.append(
            "\\* measured in another setting than the target's (see notes): the status shows "
            "the check works, it is no evidence for the target."
        )
    lines.append("")
    for ev in evaluations:
        if ev.target.note:
            lines.append(f"- {ev.target.title}: {ev.target.note}.")
    return "\n".join(lines)
