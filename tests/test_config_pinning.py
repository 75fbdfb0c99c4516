"""Every shipped config resolves to the contents pinned in ``tests/data/resolved_configs.json``
(written by ``tests/config_pinning.py`` before the trainer, settings and parameter-group code were
unified): restructuring the code must not change a recipe. A dotted name may differ only when both
spellings name the same object (a function that moved and is still importable where it was)."""

from __future__ import annotations

import json
import os
import pydoc
from typing import Any, List

import pytest

from config_pinning import ROOT, resolve, shipped_configs

with open(os.path.join(ROOT, "tests", "data", "resolved_configs.json")) as f:
    PINNED = json.load(f)


def _same_object(a: str, b: str) -> bool:
    if "." not in a or "." not in b:
        return False
    found_a, found_b = pydoc.locate(a), pydoc.locate(b)
    return found_a is not None and found_a is found_b


def differences(pinned: Any, current: Any, where: str = "") -> List[str]:
    """Paths where ``current`` differs from ``pinned`` (dotted names of one object are equal)."""
    if isinstance(pinned, dict) and isinstance(current, dict):
        out = [f"{where}.{k}: only pinned" for k in pinned.keys() - current.keys()]
        out += [f"{where}.{k}: only current" for k in current.keys() - pinned.keys()]
        for key in pinned.keys() & current.keys():
            out += differences(pinned[key], current[key], f"{where}.{key}")
        return out
    if isinstance(pinned, list) and isinstance(current, list) and len(pinned) == len(current):
        return [
            d
            for i, (a, b) in enumerate(zip(pinned, current))
            for d in differences(a, b, f"{where}[{i}]")
        ]
    if pinned == current:
        return []
    if isinstance(pinned, str) and isinstance(current, str) and _same_object(pinned, current):
        return []
    return [f"{where}: {pinned!r} -> {current!r}"]


def test_every_shipped_config_is_pinned():
    assert sorted(PINNED) == shipped_configs()


@pytest.mark.parametrize("path", sorted(PINNED))
def test_resolved_config_is_unchanged(path):
    assert differences(PINNED[path], resolve(path)) == []


def test_the_comparison_can_fail():
    pinned = PINNED["configs/toy/mask_rcnn_convvitdet_toy.py"]
    changed = json.loads(json.dumps(pinned))
    changed["optimizer"]["lr"] *= 2
    changed["optimizer"]["params"]["_target_"] = "convmae_det.engine.optim.NORM_MODULE_TYPES"
    found = differences(pinned, changed)
    assert len(found) == 2 and any(".optimizer.lr" in d for d in found)
    assert differences(pinned, json.loads(json.dumps(pinned))) == []
