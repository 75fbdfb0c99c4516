"""The import contracts of ``.importlinter`` (layers, a runner without model code, no cycles) hold
for the package, and ``lint-imports`` fails on a copy of it that breaks one of them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Dict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lint_imports_command() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    found = beside if os.path.isfile(beside) else shutil.which("lint-imports")
    assert found, "lint-imports (PyPI: import-linter) is not installed: run `make install`"
    return found


def lint_imports(repo: str) -> subprocess.CompletedProcess:
    """Run ``lint-imports`` on the ``.importlinter`` and the ``convmae_det`` of ``repo``."""
    env = dict(os.environ, PYTHONPATH=repo)  # the package of `repo`, not the installed one
    return subprocess.run(
        [_lint_imports_command(), "--no-cache", "--no-logo"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_the_package_keeps_its_import_contracts():
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "Contracts: 3 kept, 0 broken." in proc.stdout, proc.stdout[-3000:]


# (file, text appended to it or its whole text when new, what lint-imports must report)
BREAKS: Dict[str, tuple] = {
    "upward import": (
        "convmae_det/data/annotation_checks.py",
        "\nfrom convmae_det.engine.config import load_lazy_config  # noqa: E402,F401\n",
        "convmae_det.data is not allowed to import convmae_det.engine",
    ),
    "upward import inside a function": (
        "convmae_det/utils/precision.py",
        "\n\ndef _probe():\n    from ..modeling.convvit import ConvViT\n\n    return ConvViT\n",
        "convmae_det.utils is not allowed to import convmae_det.modeling",
    ),
    "import between independent siblings": (
        "convmae_det/solver/lr_decay.py",
        "\n\ndef _probe():\n    from ..evaluation import coco_backend\n\n    return coco_backend\n",
        "convmae_det.solver is not allowed to import convmae_det.evaluation",
    ),
    "model code in the exported-model runner": (
        "convmae_det/deploy/runner.py",
        "\n\ndef _probe():\n    from ..fast_paths import set_fused_attn\n\n    return set_fused_attn\n",
        "convmae_det.deploy.runner is not allowed to import convmae_det.fast_paths",
    ),
    "a cycle inside a layer": (
        "convmae_det/data/toy_ade20k.py",
        "\n\ndef _probe():\n    from .datasets.ade20k import datasets_root\n\n"
        "    return datasets_root\n",
        "No cycles are allowed in convmae_det.data",
    ),
    "a top-level module in no layer": (
        "convmae_det/helpers.py",
        '"""A new top-level module that no layer lists."""\n',
        "convmae_det.helpers",
    ),
}


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_lint_imports_fails_on_a_copy_that_breaks_a_contract(tmp_path, case):
    path, text, report = BREAKS[case]
    repo = str(tmp_path)
    shutil.copy(os.path.join(ROOT, ".importlinter"), repo)
    shutil.copytree(
        os.path.join(ROOT, "convmae_det"),
        os.path.join(repo, "convmae_det"),
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    assert lint_imports(repo).returncode == 0  # the copy is as good as the original
    with open(os.path.join(repo, path), "a", encoding="utf-8") as f:
        f.write(text)
    proc = lint_imports(repo)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "BROKEN" in proc.stdout and report in proc.stdout, proc.stdout[-6000:]
