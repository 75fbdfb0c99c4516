"""Load a LazyConfig (``.py``) or yacs (``.yaml``) config and build its model, with errors that
name the file and the offending override. Shared by the conversion, demo and benchmark tools.

Files are read through :func:`convmae_det.config.load_lazy_config_safely` and
:func:`convmae_det.config.merge_config_file_safely`: a YAML file never runs code (a LazyConfig
``.py`` is Python code by design)."""

from __future__ import annotations

import os
from typing import Any, List, Optional, Sequence, Tuple

import torch.nn as nn

from .config import ConfigError, load_lazy_config_safely, merge_config_file_safely

__all__ = ["ConfigError", "load_any_config", "build_model_from_config", "config_kind"]


def config_kind(path: str) -> str:
    """ "lazy" for ``.py`` files, "yacs" for ``.yaml`` / ``.yml``."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".py":
        return "lazy"
    if ext in (".yaml", ".yml"):
        return "yacs"
    raise ConfigError(
        f"{path}: unknown config type {ext!r}; expected a LazyConfig .py or a yacs .yaml"
    )


def load_any_config(path: str, opts: Optional[Sequence[str]] = None) -> Tuple[Any, str]:
    """Load ``path`` and apply ``opts`` (``key=value`` for LazyConfig, ``KEY VALUE`` pairs or
    ``KEY=VALUE`` for yacs). Unknown keys and values of the wrong type are refused as the
    trainers refuse them (:func:`convmae_det.engine.config.check_override_keys` /
    ``check_override_types``, :func:`convmae_det.engine.yacs_overrides.check_overrides`), with
    one :class:`ConfigError` line. Returns (cfg, kind)."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file")
    kind = config_kind(path)
    opts = list(opts or [])
    if kind == "lazy":
        from detectron2.config import LazyConfig

        from .engine.config import check_override_keys, check_override_types

        cfg = load_lazy_config_safely(path)
        for opt in opts:
            if "=" not in opt:
                raise ConfigError(f"override {opt!r} for {path}: expected key=value")
        try:  # an unknown key (a typo) or a value of the wrong type is refused, as in training
            check_override_keys(cfg, opts, source=path)
            check_override_types(cfg, opts, source=path)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(exc.args[0] if exc.args else str(exc)) from None
        for opt in opts:
            key = opt.split("=", 1)[0]
            try:
                cfg = LazyConfig.apply_overrides(cfg, [opt])
            except (KeyError, AttributeError, ValueError) as exc:
                raise ConfigError(
                    f"override {opt!r} for {path}: key {key!r} cannot be set ({exc})"
                ) from None
        return cfg, kind

    from detectron2.config import get_cfg

    from .config import add_convmae_config

    cfg = get_cfg()
    add_convmae_config(cfg)
    cfg.set_new_allowed(False)
    try:
        merge_config_file_safely(cfg, path)
    except ConfigError:
        raise
    except (KeyError, ValueError, AssertionError) as exc:  # yacs: unknown key, value type
        raise ConfigError(f"{path}: {exc}") from None
    pairs: List[str] = []
    for opt in opts:
        pairs += opt.split("=", 1) if "=" in opt else [opt]
    if len(pairs) % 2:
        raise ConfigError(f"overrides {opts} for {path}: expected KEY VALUE pairs")
    from .engine.yacs_overrides import merge_checked_overrides

    try:  # unknown keys ("did you mean ...?") and wrong types named in one line
        merge_checked_overrides(cfg, pairs)
    except (KeyError, AssertionError, ValueError) as exc:
        raise ConfigError(f"overrides for {path}: {exc.args[0] if exc.args else exc}") from None
    return cfg, kind


def build_model_from_config(cfg: Any, kind: str, *, device: Optional[str] = None) -> nn.Module:
    """Instantiate the model of a loaded config (on ``device`` if given)."""
    if kind == "lazy":
        from detectron2.config import instantiate

        model = instantiate(cfg.model)
    else:
        from detectron2.modeling import build_model

        if device is not None:
            cfg = cfg.clone()
            cfg.defrost()
            cfg.MODEL.DEVICE = device
        model = build_model(cfg)
    if device is not None:
        model = model.to(device)
    return model
