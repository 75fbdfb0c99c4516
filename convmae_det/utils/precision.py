"""The one table of floating-point precisions, for every key and flag that names one.

Training and inference name a precision in several places (``train.amp.precision="bf16"``,
``SOLVER.AMP.DTYPE="bfloat16"``, pretraining's ``train.amp_dtype="float16"``, ``--dtype bf16``);
all of them are read through :func:`parse_precision`, so every spelling is accepted everywhere and
a wrong one is refused with the same message naming the key.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

__all__ = ["PRECISIONS", "SHORT_NAMES", "parse_precision", "precision_name"]

PRECISIONS: Dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
"""Every accepted spelling of a precision -> its dtype."""

SHORT_NAMES: Dict[torch.dtype, str] = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
}


def parse_precision(name: str, *, key: str, allow_fp32: bool = True) -> torch.dtype:
    """The dtype of ``name`` (any spelling of :data:`PRECISIONS`).

    Args:
        key: the config key or flag that gave ``name``, named in the error.
        allow_fp32: False where only a reduced precision makes sense (an AMP dtype).
    Raises:
        ValueError: ``"<key>='fp8'; expected one of ['bf16', 'bfloat16', ...]"``.
    """
    choices = [k for k, v in PRECISIONS.items() if allow_fp32 or v != torch.float32]
    if str(name) not in choices:
        raise ValueError(f"{key}={name!r}; expected one of {choices}")
    return PRECISIONS[str(name)]


def precision_name(dtype: Optional[torch.dtype]) -> str:
    """ "fp32" / "bf16" / "fp16" (None is fp32)."""
    return SHORT_NAMES[dtype or torch.float32]
