"""Key mapping of the official (mmsegmentation) ConvMAE UperNet checkpoints onto our segmenter.

Official layout: ``{"state_dict": {"backbone.*", "decode_head.*", "auxiliary_head.*"}, "meta"}``.
The backbone keys already carry our names (``backbone.blocks3.0.attn.relative_position_bias_table``,
``backbone.fpn.0.weight``...) and are handled by the generic loader (which also drops the
``relative_position_index`` buffers). Our heads use mmseg's module names, so the heads map
by prefix only: ``decode_head.X`` -> ``sem_seg_head.X``, ``auxiliary_head.X`` -> ``auxiliary_head.X``.
Importing this module registers the mapping with :func:`register_key_mapper`; the checkpoint
package imports it, so every loader knows the official layout without importing the model.
"""

from __future__ import annotations

from typing import Optional

from .convert import register_key_mapper

__all__ = ["MMSEG_FORMAT", "mmseg_head_key", "HEAD_PREFIXES"]

MMSEG_FORMAT = "mmseg_upernet_convmae"
HEAD_PREFIXES = {"decode_head.": "sem_seg_head.", "auxiliary_head.": "auxiliary_head."}


def mmseg_head_key(key: str, source_format: str) -> Optional[str]:
    """Our name for a head key of an official segmenter file, None for anything else."""
    if source_format != MMSEG_FORMAT:
        return None
    for src, dst in HEAD_PREFIXES.items():
        if key.startswith(src):
            return dst + key[len(src) :]
    return None


register_key_mapper("mmseg_upernet_heads", mmseg_head_key)
