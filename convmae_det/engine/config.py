"""Loading LazyConfig files with checked ``key=value`` overrides, and the run setup.

detectron2's ``LazyConfig.apply_overrides`` silently *adds* a key that does not exist, so a typo
(``train.max_iters=10``) trains with the default. :func:`load_lazy_config` refuses overrides of
unknown keys, naming the key and what exists there. A key may be new only if its parent is a
``LazyCall`` whose target accepts an argument of that name (``model.backbone.bottom_up.
use_act_checkpoint=True``) or if it is written ``+key=value`` (hydra's explicit "add").
:func:`check_override_types` refuses a value whose type differs from the value it replaces
(``train.max_iter=abc``, ``train.amp.enabled=maybe``), so that it fails before anything runs.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import shutil
from typing import Any, Iterable, List, Optional, Sequence, Tuple

from detectron2.config import LazyConfig
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_setup
from detectron2.utils.logger import setup_logger
from detectron2.utils import comm
from detectron2.utils.registry import locate
from omegaconf import DictConfig, ListConfig, OmegaConf

from ..config import load_lazy_config_safely

__all__ = [
    "load_lazy_config",
    "check_override_keys",
    "check_override_types",
    "OverrideTypeError",
    "dataset_names_in_config",
    "check_datasets",
    "check_datasets_of_config",
    "default_lazy_setup",
]

logger = logging.getLogger(__name__)
_ABSENT = object()


def _target_accepts(target: Any, name: str) -> bool:
    """Whether a LazyCall target accepts a keyword argument ``name`` (through its MRO for
    classes whose ``__init__`` forwards ``**kwargs``)."""
    if isinstance(target, str):
        try:
            target = locate(target)
        except Exception:
            return False
    callables = (
        [c.__init__ for c in inspect.getmro(target) if "__init__" in vars(c)]
        if (inspect.isclass(target))
        else [target]
    )
    forwards = False
    for fn in callables:
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            continue
        if name in params:
            return True
        forwards = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if not forwards:
            return False
    return forwards and not inspect.isclass(target)


def check_override_keys(cfg: DictConfig, overrides: Sequence[str], source: str = "") -> None:
    """Raise KeyError for an override whose key is neither in ``cfg`` nor a valid new argument."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key = item.split("=", 1)[0].strip()
        if key.startswith("+"):
            continue
        key = key.lstrip("~")
        if OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False) is not _ABSENT:
            continue
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key, default=_ABSENT) if parent_key else cfg
        if isinstance(parent, DictConfig) and "_target_" in parent:
            if _target_accepts(parent._target_, leaf):
                continue
        where = f" (config {source})" if source else ""
        if isinstance(parent, DictConfig):
            names = sorted(str(k) for k in parent.keys())
            close = difflib.get_close_matches(leaf, names, n=3, cutoff=0.6)
            hint = f"'{parent_key or '<root>'}' has: {', '.join(names)}"
            if close:
                guesses = ", ".join(f"{parent_key}.{c}".lstrip(".") for c in close)
                hint = f"did you mean {guesses}? {hint}"
        else:
            hint = f"'{parent_key}' does not exist either"
        raise KeyError(
            f"unknown config key '{key}' in override '{item}'{where}; {hint}. "
            "Use '+key=value' to add a new key on purpose."
        )


class OverrideTypeError(TypeError, ValueError):
    """An override whose value has the wrong type; the message names key, value and type."""


_TYPES = (("bool", bool), ("int", int), ("float", float), ("str", str),
          ("list", (ListConfig, list, tuple)), ("dict", (DictConfig, dict)))  # fmt: skip


def _expected_type(current: Any) -> Optional[str]:
    """The type name an override of ``current`` must have; None (anything goes) for None or
    an object such as a LazyCall target."""
    return next((name for name, types in _TYPES if isinstance(current, types)), None)


def _declared_float(cfg: DictConfig, key: str) -> bool:
    """Whether the LazyCall target holding ``key`` declares it a float (``mlp_ratio=4``)."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, default=None) if parent_key else cfg
    if not (isinstance(parent, DictConfig) and "_target_" in parent):
        return False
    try:
        target = locate(parent._target_) if isinstance(parent._target_, str) else parent._target_
        param = inspect.signature(target).parameters.get(leaf)
    except Exception:
        return False
    return param is not None and (
        isinstance(param.default, float) or "float" in str(param.annotation)
    )


_ACCEPTS = {"bool": bool, "int": int, "float": (int, float), "str": str, "list": list, "dict": dict}


def _type_matches(expected: str, value: Any) -> bool:
    if value is None:  # clearing a path, a list or a sub-config is allowed; not a number or bool
        return expected not in ("bool", "int", "float")
    if isinstance(value, str) and value.startswith("${"):
        return True  # an interpolation, resolved later
    if isinstance(value, bool) != (expected == "bool"):  # bool is an int to Python
        return False
    if expected == "str" and isinstance(value, list):  # dataset names: one str or a list
        return all(isinstance(v, str) for v in value)
    return isinstance(value, _ACCEPTS[expected])


def _parse_overrides(overrides: Sequence[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    parsed = []
    for item in overrides:
        try:
            parsed.append(parser.parse_overrides([item])[0])
        except OverrideParseException as exc:
            first = str(exc).splitlines()[1:2] or [""]
            raise ValueError(f"cannot parse override {item!r}: {first[0]}") from None
    return parsed


def check_override_types(cfg: DictConfig, overrides: Sequence[str], source: str = "") -> None:
    """Raise :class:`OverrideTypeError` for an override of an existing key whose value has
    another type than the current one (an int is accepted for a float, any value for a key
    that is None now; ``+key=`` additions and new constructor arguments are not checked)."""
    for item, override in zip(overrides, _parse_overrides(overrides)):
        if item.strip().startswith(("+", "~")):
            continue
        key, value = override.key_or_group, override.value()
        current = OmegaConf.select(
            cfg, key, default=None, throw_on_missing=False, throw_on_resolution_failure=False
        )
        expected = _expected_type(current)
        if expected == "int" and isinstance(value, float) and _declared_float(cfg, key):
            expected = "float"
        if expected is None or _type_matches(expected, value):
            continue
        where = f" (config {source})" if source else ""
        shown = str(current) if OmegaConf.is_config(current) else repr(current)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        scalar = isinstance(value, (bool, int, float))
        hint = f" (write {key}='{value}' for a string)" if expected == "str" and scalar else ""
        raise OverrideTypeError(
            f"wrong type in override '{item}'{where}: '{key}' expects {expected} (now "
            f"{shown}), got {type(value).__name__} {value!r}{hint}"
        )


def load_lazy_config(path: str, overrides: Optional[Sequence[str]] = None) -> DictConfig:
    """``LazyConfig.load(path)`` followed by checked ``key=value`` overrides. The file is read by
    :func:`convmae_det.config.load_lazy_config_safely`: a ``.yaml`` (e.g. a run's saved
    ``config.yaml``) never runs code; a ``.py`` is Python code by design."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    cfg = load_lazy_config_safely(path)
    overrides = list(overrides or [])
    check_override_keys(cfg, overrides, source=path)
    check_override_types(cfg, overrides, source=path)
    return LazyConfig.apply_overrides(cfg, overrides)


def _collect_names(node: Any, path: str, out: List[tuple]) -> None:
    if isinstance(node, DictConfig):
        for k in node.keys():
            child = node._get_node(k)
            if child is None:
                continue
            value = node[k] if not OmegaConf.is_missing(node, k) else None
            if k == "names" and isinstance(value, (str, ListConfig, list, tuple)):
                names = [value] if isinstance(value, str) else list(value)
                out.extend((str(n), f"{path}.{k}".lstrip(".")) for n in names)
            else:
                _collect_names(value, f"{path}.{k}", out)
    elif isinstance(node, ListConfig):
        for i, v in enumerate(node):
            _collect_names(v, f"{path}[{i}]", out)


def dataset_names_in_config(cfg: DictConfig) -> List[tuple]:
    """[(dataset name, config key)] of every ``names=`` under ``cfg.dataloader``."""
    out: List[tuple] = []
    if "dataloader" in cfg:
        _collect_names(cfg.dataloader, "dataloader", out)
    return out


def check_datasets(names: Iterable[tuple]) -> None:
    """Fail early, naming the dataset and config key, when a dataset is unregistered or its
    annotation file / image folder is missing. Datasets generated on first use (the toy
    datasets: metadata ``generated_on_first_use``) are generated here."""
    names = list(names)
    registered = set(DatasetCatalog.list())
    root = os.getenv("DETECTRON2_DATASETS", "datasets")
    for name, key in names:  # all names first: a typo fails before any data is generated
        if name not in registered:
            raise KeyError(
                f"dataset '{name}' (config key {key}) is not registered. Registered datasets "
                f"include: {', '.join(sorted(registered)[:12])} ... See datasets/README.md."
            )
    for name, key in names:
        meta = MetadataCatalog.get(name)
        if meta.get("generated_on_first_use", False):
            DatasetCatalog.get(name)  # generate now, so that evaluators find the json file
            continue
        for attr in ("json_file", "image_root"):
            path = getattr(meta, attr, None)
            if path and not os.path.exists(path):
                raise FileNotFoundError(
                    f"dataset '{name}' (config key {key}): {attr} '{path}' does not exist. "
                    f"Datasets are looked up under $DETECTRON2_DATASETS (now '{root}'); "
                    "see datasets/README.md for the expected layout."
                )


def check_datasets_of_config(names: Sequence[Tuple[str, str]], kind: str) -> None:
    """:func:`check_datasets` for a config of either kind ("lazy" / "yacs"). The registered
    datasets of a yacs config are loaded first: the toy ADE20K is generated on that first load,
    and the ADE20K loader names a missing folder and its prepare script."""
    if kind == "yacs":
        registered = set(DatasetCatalog.list())
        for name, _ in names:
            if name in registered:
                DatasetCatalog.get(name)
    check_datasets(names)


def default_lazy_setup(cfg: DictConfig, args: Any) -> None:
    """detectron2's ``default_setup`` (logging, env info, ``config.yaml``) plus a copy of the
    source config file as ``config_source.py`` in ``train.output_dir``; our own ``convmae_det``
    loggers (checkpoint reports, ETA) write to the same ``log.txt``."""
    default_setup(cfg, args)
    output_dir = cfg.train.get("output_dir", "")
    setup_logger(output_dir or None, distributed_rank=comm.get_rank(), name="convmae_det")
    config_file = getattr(args, "config_file", "")
    if comm.is_main_process() and output_dir and config_file:
        os.makedirs(output_dir, exist_ok=True)
        shutil.copyfile(config_file, os.path.join(output_dir, "config_source.py"))
