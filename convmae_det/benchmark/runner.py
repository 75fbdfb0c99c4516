"""Run a benchmark end to end and report it as a JSON-ready dict and a one-line summary.

    from convmae_det.benchmark import BenchmarkConfig, run_benchmark
    result = run_benchmark(BenchmarkConfig(preset="toy", mode="backbone_train", iters=5))
    print(result["ms_per_img"], result["mfu"])

Order of work: build the model, apply the fast paths (except compile), count FLOPs on one step
(activation checkpointing off, so FLOPs are model FLOPs without recomputation, as MFU is usually
defined), compile if asked, warm up, reset the peak memory, time ``iters`` steps.
"""

from __future__ import annotations

import copy
import datetime
import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..fast_paths import (
    DTYPES,
    FastPaths,
    act_checkpoint_disabled,
    apply_fast_paths,
    fast_path_coverage,
)
from .measure import (
    count_flops,
    device_name,
    measure_matmul_peak,
    peak_memory,
    reset_peak_memory,
    summarize_times,
    time_steps,
)
from .subjects import (
    BACKBONE_PRESETS,
    DEFAULT_SIZES,
    MODES,
    PRETRAIN_PRESETS,
    BenchmarkSetupError,
    build_preset,
    make_step,
)

logger = logging.getLogger(__name__)

__all__ = [
    "BenchmarkConfig",
    "RESULT_FIELDS",
    "build_subject",
    "run_benchmark",
    "run_ab",
    "format_summary",
    "MARKDOWN_HEADER",
    "markdown_row",
    "AB_MARKDOWN_HEADER",
    "markdown_ab_row",
]

# Every key a result dict carries (values may be None where a quantity does not apply).
RESULT_FIELDS = (
    "name",
    "config_file",
    "preset",
    "mode",
    "device",
    "device_name",
    "torch_version",
    "date",
    "num_threads",
    "batch_size",
    "image_size",
    "fast_paths",
    "fast_path_coverage",
    "warmup",
    "iters",
    "params",
    "ms_per_img",
    "ms_per_img_stats",
    "cpu_ms_per_img",
    "img_per_s",
    "peak_mem_bytes",
    "peak_mem_per_img_bytes",
    "baseline_mem_bytes",
    "step_mem_bytes",
    "mem_kind",
    "flops_per_img",
    "flops_by_op",
    "saved_activation_bytes_per_img",
    "tflops_per_s",
    "peak_tflops",
    "peak_source",
    "mfu",
    "detections_per_img",
    "load_avg",
)


@dataclass
class BenchmarkConfig:
    """What to benchmark and how.

    Exactly one of ``config_file`` (LazyConfig ``.py`` / yacs ``.yaml``, with ``opts`` overrides)
    and ``preset`` (see ``BACKBONE_PRESETS`` / ``PRETRAIN_PRESETS``). ``image_size`` defaults to the
    preset's size or 1024x1024. ``peak_tflops`` None: measured; 0: not measured (no MFU).
    """

    config_file: Optional[str] = None
    preset: Optional[str] = None
    opts: List[str] = field(default_factory=list)
    mode: str = "backbone_train"
    batch_size: int = 1
    image_size: Optional[Tuple[int, int]] = None
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    paths: FastPaths = field(default_factory=FastPaths)
    warmup: Optional[int] = None
    iters: Optional[int] = None
    peak_tflops: Optional[float] = None
    count_flops: bool = True
    num_instances: int = 8
    mask_format: str = "polygon"
    full_detections: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.config_file is None) == (self.preset is None):
            raise BenchmarkSetupError("give exactly one of config_file and preset")
        if self.mode not in MODES:
            raise BenchmarkSetupError(f"mode={self.mode!r}; expected one of {MODES}")
        if self.preset is not None:
            if self.mode == "pretrain" and self.preset not in PRETRAIN_PRESETS:
                raise BenchmarkSetupError(
                    f"mode 'pretrain' needs a pretraining preset {PRETRAIN_PRESETS}, "
                    f"got {self.preset!r}"
                )
            if self.mode != "pretrain" and self.preset not in BACKBONE_PRESETS:
                raise BenchmarkSetupError(
                    f"preset {self.preset!r} with mode {self.mode!r}: expected a backbone preset "
                    f"{sorted(BACKBONE_PRESETS)} (pretraining presets go with mode 'pretrain')"
                )
            if self.mode in ("train", "inference"):
                raise BenchmarkSetupError(
                    f"mode {self.mode!r} runs a full detector: give --config-file, not a preset"
                )
        if self.batch_size < 1:
            raise BenchmarkSetupError(f"batch_size={self.batch_size}; expected >= 1")

    @property
    def resolved_size(self) -> Tuple[int, int]:
        if self.image_size is not None:
            return tuple(self.image_size)
        return DEFAULT_SIZES.get(self.preset or "", (1024, 1024))

    @property
    def resolved_warmup(self) -> int:
        if self.warmup is not None:
            return self.warmup
        return 10 if torch.device(self.device).type == "cuda" else 2

    @property
    def resolved_iters(self) -> int:
        if self.iters is not None:
            return self.iters
        return 50 if torch.device(self.device).type == "cuda" else 5

    @property
    def name(self) -> str:
        if self.preset is not None:
            return self.preset
        return os.path.splitext(os.path.basename(self.config_file))[0]


def build_subject(cfg: BenchmarkConfig) -> nn.Module:
    """The module a step runs: the preset, ``model.backbone`` of a config's model for the backbone
    modes, or the whole model."""
    if cfg.preset is not None:
        return build_preset(cfg.preset)
    from ..model_from_config import build_model_from_config, load_any_config

    loaded, kind = load_any_config(cfg.config_file, cfg.opts)
    model = build_model_from_config(loaded, kind)
    if cfg.mode in ("backbone", "backbone_train"):
        if not hasattr(model, "backbone"):
            raise BenchmarkSetupError(
                f"{cfg.config_file}: mode {cfg.mode!r} needs a model.backbone"
            )
        return model.backbone
    return model


def _saved_bytes_hooks(model: nn.Module, tally: Dict[str, int]):
    """Saved-tensor hooks that add up the distinct storages autograd keeps for backward
    (parameters excluded; the inputs a checkpointed region holds are included, since
    ``torch.utils.checkpoint`` saves them through these hooks). ``memory.SavedTensorCensus``
    counts the same storages and says which stage and tensor kind keeps them."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in param_ptrs and ptr not in seen and t.device.type != "meta":
            seen.add(ptr)
            tally["bytes"] += storage.nbytes()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def _load_avg() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def run_benchmark(cfg: BenchmarkConfig, *, model: Optional[nn.Module] = None) -> Dict[str, Any]:
    """Benchmark ``cfg``; ``model`` replaces the built subject (e.g. an already built module)."""
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchmarkSetupError("device 'cuda' requested but CUDA is not available")
    torch.manual_seed(cfg.seed)
    paths = cfg.paths
    model = model if model is not None else build_subject(cfg)
    model = model.to(device)
    training = cfg.mode in ("backbone_train", "train", "pretrain")
    apply_fast_paths(model, replace(paths, compile=False), device=device, training=training)
    coverage = fast_path_coverage(model)
    size = cfg.resolved_size
    b = cfg.batch_size
    step, info = make_step(
        model,
        cfg.mode,
        batch_size=b,
        image_size=size,
        paths=paths,
        device=device,
        num_instances=cfg.num_instances,
        mask_format=cfg.mask_format,
        full_detections=cfg.full_detections,
    )
    flops = None
    by_op: Dict[str, int] = {}
    if cfg.count_flops:
        with act_checkpoint_disabled(model):
            flops, by_op = count_flops(step)
    saved = None
    if cfg.mode in ("backbone_train", "train", "pretrain") and not paths.compile:
        # one untimed step with the configured paths (checkpointing included)
        tally = {"bytes": 0}
        with _saved_bytes_hooks(model, tally):
            step()
        saved = tally["bytes"] / b
    if paths.compile:
        getattr(model, "backbone", model).compile(dynamic=False)
    load_before = _load_avg() if device.type == "cpu" else None
    if load_before and load_before[0] > (os.cpu_count() or 1):
        logger.warning(
            "CPU load average %.1f exceeds the %d cores: wall times are inflated (with several "
            "threads, badly); compare cpu_ms_per_img, or use --threads 1",
            load_before[0],
            os.cpu_count(),
        )
    warmup, iters = cfg.resolved_warmup, cfg.resolved_iters
    for _ in range(warmup):
        step()
    base = reset_peak_memory(device)
    wall, cpu = time_steps(step, warmup=0, iters=iters, device=device)
    peak, mem_kind = peak_memory(device)
    if not base["peak_reset"]:
        mem_kind += "_not_reset"

    stats = summarize_times(wall, b)
    ms = stats["median"]
    peak_tflops, peak_source = cfg.peak_tflops, "given"
    if peak_tflops is None:
        peak_tflops = measure_matmul_peak(device, DTYPES[paths.dtype])
        peak_source = f"measured ({paths.dtype} matmul)"
    elif peak_tflops <= 0:
        peak_tflops, peak_source = None, None
    tflops = flops / b / (ms / 1000.0) / 1e12 if flops is not None else None
    result: Dict[str, Any] = {
        "name": cfg.name,
        "config_file": cfg.config_file,
        "preset": cfg.preset,
        "mode": cfg.mode,
        "device": str(device),
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "num_threads": torch.get_num_threads(),
        "batch_size": b,
        "image_size": list(size),
        "fast_paths": paths.to_dict(),
        "fast_path_coverage": coverage,
        "warmup": warmup,
        "iters": iters,
        "params": sum(p.numel() for p in model.parameters()),
        "ms_per_img": ms,
        "ms_per_img_stats": stats,
        "cpu_ms_per_img": summarize_times(cpu, b)["median"] if device.type == "cpu" else None,
        "img_per_s": 1000.0 / ms if ms > 0 else None,
        "peak_mem_bytes": peak,
        "peak_mem_per_img_bytes": peak / b,
        "baseline_mem_bytes": base["baseline_bytes"],
        "step_mem_bytes": (
            peak - base["baseline_bytes"] if base["baseline_bytes"] is not None else None
        ),
        "mem_kind": mem_kind,
        "flops_per_img": flops / b if flops is not None else None,
        "flops_by_op": {k: v / b for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
        "saved_activation_bytes_per_img": saved,
        "tflops_per_s": tflops,
        "peak_tflops": peak_tflops,
        "peak_source": peak_source,
        "mfu": tflops / peak_tflops if tflops is not None and peak_tflops else None,
        "detections_per_img": info.get("detections_per_img"),
        "load_avg": load_before,
    }
    assert set(result) == set(RESULT_FIELDS)
    return result


def run_ab(
    cfg: BenchmarkConfig, baseline: FastPaths, *, model: Optional[nn.Module] = None
) -> Dict[str, Any]:
    """Time ``cfg.paths`` against ``baseline`` with interleaved iterations (A, B, B, A, ...) on
    two copies of one model with the same weights, so that load from other processes hits both
    alike. Compile is not allowed here. Returns both timing summaries, ``speedup`` = baseline
    median / fast median, and on the CPU the same ratio of process CPU times."""
    if cfg.paths.compile or baseline.compile:
        raise BenchmarkSetupError("run_ab compares eager paths; compile is not supported here")
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = (model if model is not None else build_subject(cfg)).to(device)
    variants = {"fast": cfg.paths, "baseline": baseline}
    models = {"fast": model, "baseline": copy.deepcopy(model)}
    training = cfg.mode in ("backbone_train", "train", "pretrain")
    steps = {}
    for key, paths in variants.items():
        apply_fast_paths(models[key], paths, device=device, training=training)
        steps[key], _ = make_step(
            models[key],
            cfg.mode,
            batch_size=cfg.batch_size,
            image_size=cfg.resolved_size,
            paths=paths,
            device=device,
            num_instances=cfg.num_instances,
            mask_format=cfg.mask_format,
            full_detections=cfg.full_detections,
        )
    times: Dict[str, List[float]] = {k: [] for k in variants}
    cpu: Dict[str, List[float]] = {k: [] for k in variants}
    for i in range(cfg.resolved_warmup + cfg.resolved_iters):
        for key in ("fast", "baseline") if i % 2 == 0 else ("baseline", "fast"):
            wall, c = time_steps(steps[key], warmup=0, iters=1, device=device)
            if i >= cfg.resolved_warmup:
                times[key] += wall
                cpu[key] += c
    out: Dict[str, Any] = {
        "name": cfg.name,
        "mode": cfg.mode,
        "device": str(device),
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "batch_size": cfg.batch_size,
        "image_size": list(cfg.resolved_size),
        "iters": cfg.resolved_iters,
    }
    for key, paths in variants.items():
        out[key] = {
            "fast_paths": paths.to_dict(),
            "fast_path_coverage": fast_path_coverage(models[key]),
            "ms_per_img_stats": summarize_times(times[key], cfg.batch_size),
            "cpu_ms_per_img": summarize_times(cpu[key], cfg.batch_size)["median"],
        }
    fast = out["fast"]["ms_per_img_stats"]["median"]
    out["speedup"] = out["baseline"]["ms_per_img_stats"]["median"] / fast
    out["cpu_time_speedup"] = (
        out["baseline"]["cpu_ms_per_img"] / out["fast"]["cpu_ms_per_img"]
        if device.type == "cpu"
        else None
    )
    return out


AB_MARKDOWN_HEADER = (
    "| card | torch | model | mode | batch | size | fast paths | baseline | fast ms/img "
    "| baseline ms/img | speedup (wall) | speedup (CPU time) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def markdown_ab_row(result: Dict[str, Any]) -> str:
    """One row of the A/B table (see ``AB_MARKDOWN_HEADER``) from a :func:`run_ab` result."""
    h, w = result["image_size"]
    fast, base = result["fast"], result["baseline"]
    cpu = result.get("cpu_time_speedup")
    cells = [
        result["device_name"],
        result["torch_version"],
        result["name"],
        result["mode"],
        str(result["batch_size"]),
        f"{h}x{w}",
        " ".join(_flags(fast["fast_paths"], fast.get("fast_path_coverage"))),
        " ".join(_flags(base["fast_paths"], base.get("fast_path_coverage"))),
        f"{fast['ms_per_img_stats']['median']:.1f}",
        f"{base['ms_per_img_stats']['median']:.1f}",
        f"{result['speedup']:.2f}x",
        "-" if cpu is None else f"{cpu:.2f}x",
    ]
    return "| " + " | ".join(cells) + " |"


def _gb(n: Optional[float]) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def _flags(paths: Dict[str, Any], coverage: Optional[Dict[str, int]] = None) -> List[str]:
    attn = {"sdpa": "sdpa", "explicit": "explicit-attn", "auto": "auto-attn"}[paths["attn"]]
    if coverage is not None:
        n, fused = coverage["attention_modules"], coverage["sdpa_attention_modules"]
        attn = "other-attn" if n == 0 else "sdpa" if fused == n else "explicit-attn"
        attn += "(auto)" if paths["attn"] == "auto" and n else ""
    flags = [paths["dtype"], attn]
    flags += ["channels-last"] if paths["channels_last"] else []
    if paths["act_checkpoint"]:
        flags += [f"ckpt{''.join(map(str, paths['act_checkpoint']))}"]
    flags += ["compiled"] if paths["compile"] else []
    return flags


MARKDOWN_HEADER = (
    "| card | torch | date | model | mode | batch | size | paths | ms/img (p10-p90) | CPU ms/img "
    "| peak mem/img (+ step) | GFLOP/img | TFLOP/s | MFU (peak TFLOP/s) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def markdown_row(result: Dict[str, Any]) -> str:
    """One row of the table in docs/PERFORMANCE.md (see ``MARKDOWN_HEADER``)."""
    s = result["ms_per_img_stats"]
    h, w = result["image_size"]
    threads = f", {result['num_threads']} thr" if result["device"] == "cpu" else ""
    cells = [
        f"{result['device_name']}{threads}",
        result["torch_version"],
        result["date"].split()[0],
        result["name"],
        result["mode"],
        str(result["batch_size"]),
        f"{h}x{w}",
        " ".join(_flags(result["fast_paths"], result["fast_path_coverage"])),
        f"{result['ms_per_img']:.1f} ({s['p10']:.1f}-{s['p90']:.1f})",
        "-" if result["cpu_ms_per_img"] is None else f"{result['cpu_ms_per_img']:.1f}",
        _gb(result["peak_mem_per_img_bytes"])
        + (
            ""
            if result["step_mem_bytes"] is None
            else f" (+{result['step_mem_bytes'] / 2**30:.2f})"
        ),
        "-" if result["flops_per_img"] is None else f"{result['flops_per_img'] / 1e9:.1f}",
        "-" if result["tflops_per_s"] is None else f"{result['tflops_per_s']:.3f}",
        (
            "-"
            if result["mfu"] is None
            else f"{100 * result['mfu']:.1f}% ({result['peak_tflops']:.2f})"
        ),
    ]
    return "| " + " | ".join(cells) + " |"


def format_summary(result: Dict[str, Any]) -> str:
    """One line: name, mode, device, batch, size, dtype, ms/img (spread), img/s, memory, FLOPs,
    TFLOP/s, MFU."""
    flags = _flags(result["fast_paths"], result["fast_path_coverage"])
    h, w = result["image_size"]
    s = result["ms_per_img_stats"]
    parts = [
        f"{result['name']} {result['mode']} on {result['device']} bs{result['batch_size']} "
        f"{h}x{w} {'+'.join(flags)}",
        f"{result['ms_per_img']:.1f} ms/img (p10-p90 {s['p10']:.1f}-{s['p90']:.1f})",
        f"{result['img_per_s']:.2f} img/s",
        f"peak {_gb(result['peak_mem_bytes'])} ({_gb(result['peak_mem_per_img_bytes'])}/img)",
    ]
    if result["flops_per_img"] is not None:
        parts.append(f"{result['flops_per_img'] / 1e9:.1f} GFLOP/img")
        parts.append(f"{result['tflops_per_s']:.2f} TFLOP/s")
    if result["mfu"] is not None:
        parts.append(f"MFU {100 * result['mfu']:.1f}% of {result['peak_tflops']:.3g}")
    return parts[0] + " " + ", ".join(parts[1:])
