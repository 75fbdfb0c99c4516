"""One way to (re-)register a dataset: the dataset modules of this package call
:func:`register_dataset` (this module registers nothing itself)."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["register_dataset"]


def register_dataset(
    name: str,
    load: Callable[[], List[dict]],
    *,
    keep_if: Optional[Tuple[str, Any]] = None,
    **metadata: Any,
) -> bool:
    """Register ``load`` as dataset ``name`` with ``metadata``, replacing an earlier
    registration of that name (its metadata too).

    Args:
        keep_if: ``(metadata key, value)``: an existing registration whose metadata has that
            value is kept as it is (e.g. the same ``image_root``: registered already).
    Returns:
        True when (re-)registered, False when an existing registration was kept.
    """
    if name in DatasetCatalog.list():
        if keep_if is not None and MetadataCatalog.get(name).get(keep_if[0]) == keep_if[1]:
            return False
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(**metadata)
    return True
