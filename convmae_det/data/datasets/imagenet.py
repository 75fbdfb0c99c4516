"""ImageNet-1K classification in the usual folder layout, and a generic image-folder registration.

The layout is the one torchvision's ``ImageFolder`` reads::

    $DETECTRON2_DATASETS/imagenet/       (default root: ``datasets``, like detectron2's builtins)
      train/<wnid>/*.JPEG                 1000 class folders, 1,281,167 images
      val/<wnid>/*.JPEG                   the 50,000 validation images, sorted into the same folders

Registered names (detectron2 ``DatasetCatalog``, loaded lazily): ``imagenet_train`` and
``imagenet_val``. Each record is ``{"file_name": absolute path, "image_id": running index,
"label": class index, "class_name": folder name}``. Class indices are the positions of the class
folders in sorted order (torchvision's order); ``imagenet_val`` takes its class list from
``train/`` when that folder exists, so the two splits agree on every label (its class folders
must then be exactly those of ``train/``). Hidden files and folders (names starting with ".")
and files without an image extension (:data:`IMAGE_EXTENSIONS`) are ignored.

Metadata: ``image_root`` (so that a missing folder is named before a run starts),
``dataset_root``, ``evaluator_type="classification"`` and, after the first load (or at
registration when given), ``classes``.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from detectron2.data import MetadataCatalog

from .registration import register_dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "is_image_file",
    "find_class_folders",
    "load_image_folder",
    "register_image_folder_dataset",
    "register_imagenet",
    "imagenet_root",
]

IMAGE_EXTENSIONS: Tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
)  # fmt: skip
_MAX_NAMED = 10  # folders listed in one error message


class _ClassMismatchError(ValueError):
    """The class folders of a split differ from the expected class list."""


def imagenet_root() -> str:
    """``$DETECTRON2_DATASETS/imagenet`` (default ``datasets/imagenet``), like detectron2 builtins."""
    return os.path.join(
        os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "imagenet"
    )


def _layout(split_root: str) -> str:
    return f"`{split_root}/<class>/*.JPEG` (one sub-folder of images per class)"


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMED])
    more = len(names) - _MAX_NAMED
    return shown + (f", ... ({more} more)" if more > 0 else "") if names else "none"


def is_image_file(name: str) -> bool:
    """Whether ``name`` ends with one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def find_class_folders(split_root: str) -> List[str]:
    """Sorted names of the class sub-folders of ``split_root`` (hidden ones skipped).

    Raises:
        FileNotFoundError: ``split_root`` is not a folder.
        ValueError: it has no class sub-folders.
    """
    if not os.path.isdir(split_root):
        raise FileNotFoundError(
            f"image folder {split_root} not found; expected the layout {_layout(split_root)}"
        )
    with os.scandir(split_root) as entries:
        names = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise ValueError(
            f"no class folders in {split_root}; expected the layout {_layout(split_root)}"
        )
    return names


def _image_files(folder: str) -> List[str]:
    """Image files under ``folder`` (sub-folders included, links followed, as torchvision does),
    as paths relative to ``folder``, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, folder)
        for name in filenames:
            if not name.startswith(".") and is_image_file(name):
                found.append(name if rel_dir == "." else os.path.join(rel_dir, name))
    return sorted(found)


def _load(split_root: str, classes: Optional[Sequence[str]]) -> Tuple[List[dict], List[str]]:
    found = find_class_folders(split_root)
    if classes is None:
        class_list = found
    else:
        class_list = [str(c) for c in classes]
        duplicates = sorted(c for c, n in Counter(class_list).items() if n > 1)
        if duplicates:
            raise ValueError(f"the class list names some classes twice: {_listed(duplicates)}")
        found_set = set(found)
        missing = [c for c in class_list if c not in found_set]
        extra = sorted(found_set - set(class_list))
        if missing or extra:
            raise _ClassMismatchError(
                f"the class folders of {split_root} are not the expected {len(class_list)} "
                f"classes: missing folders: {_listed(missing)}; unexpected folders: "
                f"{_listed(extra)}. Expected the layout {_layout(split_root)}"
            )
    base = os.path.abspath(split_root)
    records: List[dict] = []
    empty: List[str] = []
    for label, class_name in enumerate(class_list):
        folder = os.path.join(base, class_name)
        files = _image_files(folder)
        if not files:
            empty.append(folder)
        for rel in files:
            records.append(
                {
                    "file_name": os.path.join(folder, rel),
                    "image_id": len(records),
                    "label": label,
                    "class_name": class_name,
                }
            )
    if empty:
        raise ValueError(
            f"{len(empty)} class folder(s) of {split_root} hold no images "
            f"({'/'.join(IMAGE_EXTENSIONS)}): {_listed(empty)}. Expected the layout "
            f"{_layout(split_root)}"
        )
    return records, class_list


def load_image_folder(split_root: str, *, classes: Optional[Sequence[str]] = None) -> List[dict]:
    """Records of an image-folder split ``split_root/<class>/<image>``.

    Args:
        split_root: the split folder, e.g. ``$DETECTRON2_DATASETS/imagenet/train``.
        classes: the class list (label = position in it); its folders must then be exactly the
            class folders of ``split_root``. None: the sorted class folders (torchvision's
            ``ImageFolder`` order).

    Returns:
        ``[{"file_name": absolute path, "image_id": int, "label": int, "class_name": str}]``
        sorted by (label, file name), ``image_id`` counting from 0 in that order.

    Raises:
        FileNotFoundError: ``split_root`` does not exist.
        ValueError: no class folders, class folders other than ``classes``, or a class folder
            without images; the message names the folders and the expected layout.
    """
    return _load(split_root, classes)[0]


def _loader(
    name: str,
    split_root: str,
    classes: Optional[Sequence[str]],
    reference_root: Optional[str],
) -> Callable[[], List[dict]]:
    def load() -> List[dict]:
        expected = classes
        from_reference = False
        try:
            if expected is None and reference_root is not None and os.path.isdir(reference_root):
                expected, from_reference = find_class_folders(reference_root), True
            records, class_list = _load(split_root, expected)
        except _ClassMismatchError as exc:
            hint = (
                f"; {split_root} must have the same class folders as {reference_root}"
                if from_reference
                else ""
            )
            raise ValueError(f"dataset '{name}': {exc}{hint}") from exc
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"dataset '{name}': {exc}") from exc
        except ValueError as exc:
            raise ValueError(f"dataset '{name}': {exc}") from exc
        meta = MetadataCatalog.get(name)
        if meta.get("classes") is None:
            meta.set(classes=list(class_list))
        return records

    return load


def register_image_folder_dataset(
    name: str,
    root: str,
    split: str,
    *,
    classes: Optional[Sequence[str]] = None,
    classes_from: Optional[str] = None,
) -> None:
    """Register the image-folder split ``root/split/<class>/*`` as ``name``.

    The records (:func:`load_image_folder`) are read when ``DatasetCatalog.get(name)`` is
    called. Metadata: ``image_root=root/split``, ``dataset_root=root``,
    ``evaluator_type="classification"``, and ``classes`` (set now when given, else after the
    first load). Registering a name again replaces its registration.

    Args:
        name: dataset name.
        root: dataset folder holding the split folders.
        split: split folder name under ``root`` (e.g. "train", "val").
        classes: the class list; None: the sorted class folders (see ``classes_from``).
        classes_from: another split folder under ``root`` (e.g. "train") whose sorted class
            folders are the class list when that folder exists, so that the labels of both
            splits agree; ``root/split`` must then have exactly those class folders.
    """
    split_root = os.path.join(root, split)
    reference_root = os.path.join(root, classes_from) if classes_from is not None else None
    class_list = None if classes is None else [str(c) for c in classes]
    metadata: Dict[str, object] = dict(
        image_root=split_root, dataset_root=root, evaluator_type="classification"
    )
    if class_list is not None:
        metadata["classes"] = class_list
    register_dataset(name, _loader(name, split_root, class_list, reference_root), **metadata)


def register_imagenet(root: Optional[str] = None) -> None:
    """Register ``imagenet_train`` / ``imagenet_val`` under ``root`` (default
    :func:`imagenet_root`, read now, as detectron2's builtins do); ``imagenet_val`` uses the
    class list of ``train/`` when that folder exists."""
    root = root or imagenet_root()
    register_image_folder_dataset("imagenet_train", root, "train")
    register_image_folder_dataset("imagenet_val", root, "val", classes_from="train")


register_imagenet()
