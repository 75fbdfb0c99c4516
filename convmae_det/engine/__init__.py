"""Training shared by every job: config setup, run settings, the one trainer and its run,
optimizer groups."""

from .config import (
    OverrideTypeError,
    check_datasets,
    check_override_keys,
    check_override_types,
    dataset_names_in_config,
    default_lazy_setup,
    load_lazy_config,
)
from .lazy import build_checkpointer, datasets_to_check, lazy_eval_only, lazy_test, lazy_train
from .optim import NORM_MODULE_TYPES, get_param_groups
from .settings import RunSettings, resolve_device
from .trainer import ConvMAETrainer, build_trainer, count_parameters
from .training import load_weights, run_training

__all__ = [
    "ConvMAETrainer",
    "NORM_MODULE_TYPES",
    "OverrideTypeError",
    "RunSettings",
    "build_checkpointer",
    "build_trainer",
    "check_datasets",
    "check_override_keys",
    "check_override_types",
    "count_parameters",
    "dataset_names_in_config",
    "datasets_to_check",
    "default_lazy_setup",
    "get_param_groups",
    "lazy_eval_only",
    "lazy_test",
    "lazy_train",
    "load_lazy_config",
    "load_weights",
    "resolve_device",
    "run_training",
]
