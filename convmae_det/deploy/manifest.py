"""The ``manifest.json`` of an exported model folder: what the runner needs besides the graph.

An exported folder holds the graph (``model.ts`` or ``model.onnx``) and ``manifest.json``::

    {
      "export_format_version": 1,            # bumped when the folder layout or meaning changes
      "format": "onnx",                      # or "torchscript"
      "task": "instances",                   # or "sem_seg"
      "config_kind": "lazy",                 # or "yacs"
      "config_file": "configs/toy/mask_rcnn_convvitdet_toy.py",
      "config_opts": [],                     # the overrides given with it
      "weights": "output/toy/model_final.pth",
      "input_format": "RGB",                 # channel order the graph expects
      "size_divisibility": 64,               # the graph pads to multiples of this itself
      "square_size": 0,                      # > 0: every input is padded to this square
      "min_image_side": 0,                   # smallest side the model accepts (after resize)
      "test_resize": {"short_edge_length": [800], "max_size": 1333, "sample_style": "choice",
                      "interp": 2},           # detectron2 ResizeShortestEdge, or null
      "class_names": ["circle", ...],
      "num_classes": 5,
      "inputs": ["image"],                   # (3, H, W) float32, 0..255, after the resize
      "outputs": ["pred_boxes", "pred_classes", "pred_masks", "scores"],
      "sem_seg": {"mode": "slide", "crop_size": [128, 128], "stride": [85, 85]},  # segmenters
      "traced_size": [192, 192],
      "opset": 18,                           # ONNX only
      "files": {"model": {"path": "model.onnx", "bytes": 123, "sha256": "..."}},
      "versions": {"convmae_det": "0.1.0", "torch": "...", "onnx": "..."}
    }

:func:`read_manifest` checks the version and that every listed file is there, whole, and raises
:class:`ExportedModelError` with one line otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

__all__ = [
    "EXPORT_FORMAT_VERSION",
    "FORMATS",
    "MANIFEST_NAME",
    "MODEL_FILES",
    "ExportedModelError",
    "Manifest",
    "file_entry",
    "read_manifest",
    "write_manifest",
]

EXPORT_FORMAT_VERSION = 1
"""Version of the exported folder's layout and manifest; folders of another version are refused."""

FORMATS = ("torchscript", "onnx")
MANIFEST_NAME = "manifest.json"
MODEL_FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}
TASKS = ("instances", "sem_seg")


class ExportedModelError(ValueError):
    """An exported folder that cannot be used (missing, of another version, incomplete)."""


@dataclass
class Manifest:
    """The contents of ``manifest.json`` (see the module docstring for the meaning of fields)."""

    format: str
    task: str
    config_kind: str
    config_file: str
    weights: str
    input_format: str
    size_divisibility: int
    square_size: int
    min_image_side: int
    test_resize: Optional[Dict[str, Any]]
    class_names: List[str]
    num_classes: int
    inputs: List[str]
    outputs: List[str]
    traced_size: List[int]
    files: Dict[str, Dict[str, Any]]
    sem_seg: Optional[Dict[str, Any]] = None
    config_opts: List[str] = field(default_factory=list)
    opset: Optional[int] = None
    versions: Dict[str, str] = field(default_factory=dict)
    export_format_version: int = EXPORT_FORMAT_VERSION

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def model_path(self, folder: str) -> str:
        """Absolute path of the graph file inside ``folder``."""
        return os.path.join(folder, self.files["model"]["path"])


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(folder: str, name: str) -> Dict[str, Any]:
    """``{"path", "bytes", "sha256"}`` of ``folder/name`` for the manifest."""
    path = os.path.join(folder, name)
    return {"path": name, "bytes": os.path.getsize(path), "sha256": _sha256(path)}


def write_manifest(folder: str, manifest: Manifest) -> str:
    """Write ``folder/manifest.json``; returns its path."""
    path = os.path.join(folder, MANIFEST_NAME)
    with open(path, "w") as f:
        json.dump(manifest.to_dict(), f, indent=2)
        f.write("\n")
    return path


def read_manifest(folder: str, *, check_files: bool = True) -> Manifest:
    """Read and check ``folder/manifest.json``.

    Args:
        check_files: also check that every listed file exists with the recorded size and
            SHA-256 (a truncated or replaced graph is refused).
    Raises:
        ExportedModelError: one line naming the folder and what is wrong.
    """
    if not os.path.isdir(folder):
        raise ExportedModelError(f"{folder}: no such exported model folder")
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise ExportedModelError(
            f"{folder}: no {MANIFEST_NAME}; not a folder written by tools/export_model.py"
        )
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ExportedModelError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(data, dict):
        raise ExportedModelError(f"{path}: unreadable manifest (not a JSON object)")
    version = data.get("export_format_version")
    if version != EXPORT_FORMAT_VERSION:
        raise ExportedModelError(
            f"{folder}: export format version {version!r}, this convmae_det reads version "
            f"{EXPORT_FORMAT_VERSION}; export the model again with tools/export_model.py"
        )
    known = set(Manifest.__dataclass_fields__)
    missing = sorted(
        k for k, f in Manifest.__dataclass_fields__.items() if k not in data and _required(f)
    )
    if missing:
        raise ExportedModelError(f"{path}: incomplete manifest, missing {', '.join(missing)}")
    manifest = Manifest(**{k: v for k, v in data.items() if k in known})
    if manifest.format not in FORMATS:
        raise ExportedModelError(f"{path}: format {manifest.format!r}; expected one of {FORMATS}")
    if manifest.task not in TASKS:
        raise ExportedModelError(f"{path}: task {manifest.task!r}; expected one of {TASKS}")
    if "model" not in manifest.files:
        raise ExportedModelError(f"{path}: no model file listed under 'files'")
    if check_files:
        for entry in manifest.files.values():
            _check_file(folder, entry)
    return manifest


def _required(f: Any) -> bool:
    from dataclasses import MISSING

    return f.default is MISSING and f.default_factory is MISSING


def _check_file(folder: str, entry: Dict[str, Any]) -> None:
    name = str(entry.get("path", ""))
    path = os.path.join(folder, name)
    if not name or os.path.isabs(name) or os.path.normpath(name).startswith(".."):
        raise ExportedModelError(f"{folder}: manifest lists a file outside the folder: {name!r}")
    if not os.path.isfile(path):
        raise ExportedModelError(f"{folder}: missing file {name} (listed in {MANIFEST_NAME})")
    size = os.path.getsize(path)
    if "bytes" in entry and size != entry["bytes"]:
        raise ExportedModelError(
            f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)"
        )
    if "sha256" in entry and _sha256(path) != entry["sha256"]:
        raise ExportedModelError(f"{path}: content differs from the manifest's SHA-256")
