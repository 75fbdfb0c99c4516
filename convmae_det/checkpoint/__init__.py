"""Checkpoint reading (safe by default), format detection, explicit key mapping and writing."""

from .checkpointer import ConvMAECheckpointer
from .convert import (
    MIN_ENCODER_COVERAGE,
    CheckpointReport,
    convert_checkpoint,
    detect_format,
    encoder_coverage,
    extract_encoder,
    find_encoder_prefix,
    register_key_mapper,
    unwrap_checkpoint,
)
from .io import (
    CheckpointError,
    CheckpointWriteError,
    load_checkpoint_file,
    save_checkpoint_atomic,
    write_text_atomic,
)
from . import mmseg as _mmseg  # noqa: F401  (registers the official mmseg head names -> ours)

__all__ = [
    "CheckpointError",
    "CheckpointReport",
    "CheckpointWriteError",
    "ConvMAECheckpointer",
    "MIN_ENCODER_COVERAGE",
    "convert_checkpoint",
    "detect_format",
    "encoder_coverage",
    "extract_encoder",
    "find_encoder_prefix",
    "load_checkpoint_file",
    "register_key_mapper",
    "save_checkpoint_atomic",
    "unwrap_checkpoint",
    "write_text_atomic",
]
