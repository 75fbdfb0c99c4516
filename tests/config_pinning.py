"""The resolved contents of every shipped config, as plain JSON (``tests/data/resolved_configs.json``).

    python tests/config_pinning.py > tests/data/resolved_configs.json    # from the repo root

LazyConfig files are loaded with detectron2's ``LazyConfig.load`` and turned into a container;
callables and classes (``_target_`` and any value that is one) become ``"module.qualname"``
strings. yacs files are merged onto ``add_convmae_config`` defaults and dumped. The pinning test
(``tests/test_config_pinning.py``) compares the configs of the working tree with the file; a
``module.qualname`` string may differ when both name the same object (a function that moved
and is still importable from its old place).
"""

from __future__ import annotations

import functools
import glob
import json
import os
import sys
from typing import Any, Dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# fragments that are not configs of a run (imported by the others)
_NOT_RUNNABLE = ("configs/common/",)


def shipped_configs() -> list:
    """Every runnable config under ``configs/``, relative to the repo root."""
    paths = glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)
    paths += glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
    rel = sorted(os.path.relpath(p, ROOT) for p in paths)
    return [p for p in rel if not p.startswith(_NOT_RUNNABLE) and "__init__" not in p]


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, functools.partial):
        return {
            "partial": _plain(value.func),
            "args": _plain(list(value.args)),
            "keywords": _plain(dict(value.keywords)),
        }
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{value.__module__}.{value.__qualname__}"
    return repr(value)


def resolve(path: str) -> Dict[str, Any]:
    """The resolved config at ``path`` (relative to the repo root) as plain JSON values."""
    full = os.path.join(ROOT, path)
    if path.endswith(".py"):
        from detectron2.config import LazyConfig
        from omegaconf import OmegaConf

        cfg = LazyConfig.load(full)
        return _plain(OmegaConf.to_container(cfg, resolve=True))
    from detectron2.config import get_cfg

    from convmae_det.config import add_convmae_config, merge_config_file_safely

    cfg = get_cfg()
    add_convmae_config(cfg)
    merge_config_file_safely(cfg, full)
    return _plain(cfg)


def main() -> None:
    sys.path.insert(0, ROOT)
    import convmae_det  # noqa: F401  (compatibility fixes)

    json.dump({p: resolve(p) for p in shipped_configs()}, sys.stdout, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
