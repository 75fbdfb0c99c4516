"""Command-line ``KEY VALUE`` overrides of a yacs config, checked before they are merged.

yacs refuses an override of the wrong type (``SOLVER.MAX_ITER abc``) or an unknown key with an
``AssertionError`` / ``ValueError`` deep in a traceback. :func:`merge_checked_overrides` checks
every pair first and raises :class:`ConfigOverrideError` with one line that names the key, the
value given and the type expected (or, for an unknown key, the closest existing keys). An integer
given for a float key is accepted as that float (``SOLVER.BASE_LR 1`` means 1.0), which yacs
alone refuses.
"""

from __future__ import annotations

import difflib
from typing import Any, List, Sequence

from yacs.config import CfgNode as _YacsNode
from yacs.config import _check_and_coerce_cfg_value_type

__all__ = ["ConfigOverrideError", "check_overrides", "merge_checked_overrides"]


class ConfigOverrideError(ValueError):
    """A ``KEY VALUE`` override that cannot be applied; the message is one line."""


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _describe_expected(value: Any) -> str:
    if isinstance(value, bool):
        return f"a bool, True or False (current value {value})"
    if isinstance(value, (list, tuple)):
        inner = f" of {_type_name(value[0])}" if value else ""
        return f"a {type(value).__name__}{inner} (current value {list(value)})"
    return (
        f"{'an' if isinstance(value, int) else 'a'} {_type_name(value)} (current value {value!r})"
    )


def _resolve(cfg: _YacsNode, key: str) -> Any:
    node: Any = cfg
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, _YacsNode) or part not in node:
            parent = ".".join(parts[:depth])
            known = sorted(node.keys()) if isinstance(node, _YacsNode) else []
            close = difflib.get_close_matches(part, known, n=3, cutoff=0.6)
            hint = (
                f"did you mean {', '.join(f'{parent}.{c}'.lstrip('.') for c in close)}?"
                if close
                else f"'{parent or '<root>'}' has {len(known)} keys: {', '.join(known[:12])}"
                + (" ..." if len(known) > 12 else "")
            )
            raise ConfigOverrideError(f"unknown config key {key} in the overrides; {hint}")
        node = node[part]
    return node


def check_overrides(cfg: _YacsNode, opts: Sequence[Any]) -> List[Any]:
    """Check ``[KEY, VALUE, KEY, VALUE, ...]`` against ``cfg`` (not modified).

    Returns the list to pass to ``cfg.merge_from_list`` (integers for float keys written as
    floats). Raises :class:`ConfigOverrideError` naming the key, the value and the type expected.
    """
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigOverrideError(
            f"config overrides must be KEY VALUE pairs; {opts[-1]!r} has no value"
        )
    checked: List[Any] = []
    for key, raw in zip(opts[0::2], opts[1::2]):
        key = str(key)
        if cfg.key_is_deprecated(key):
            checked += [key, raw]
            continue
        if cfg.key_is_renamed(key):
            cfg.raise_key_rename_error(key)
        original = _resolve(cfg, key)
        if isinstance(original, _YacsNode):
            raise ConfigOverrideError(
                f"config key {key} is a group of keys ({', '.join(sorted(original.keys()))}); "
                "override its keys one by one"
            )
        value = _YacsNode._decode_cfg_value(raw)
        if type(value) is int and type(original) is float:
            value = float(value)
            raw = repr(value)
        try:
            _check_and_coerce_cfg_value_type(value, original, key.split(".")[-1], key)
        except ValueError:
            raise ConfigOverrideError(
                f"config key {key} expects {_describe_expected(original)}; got {raw!r} "
                f"({_type_name(value)})"
            ) from None
        checked += [key, raw]
    return checked


def merge_checked_overrides(cfg: _YacsNode, opts: Sequence[Any]) -> _YacsNode:
    """:func:`check_overrides` then ``cfg.merge_from_list`` (in place; ``cfg`` is returned)."""
    cfg.merge_from_list(check_overrides(cfg, opts))
    return cfg
