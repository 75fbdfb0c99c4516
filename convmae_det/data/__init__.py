"""Datasets (registered with detectron2 on import), mappers and toy-data generators."""

from . import datasets  # noqa: F401  (registers the builtin and toy datasets)
