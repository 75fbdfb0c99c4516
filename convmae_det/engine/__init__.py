"""Training helpers shared by the tools: LazyConfig setup, AMP trainer, optimizer groups, loops."""

from .config import (
    OverrideTypeError,
    check_datasets,
    check_override_keys,
    check_override_types,
    dataset_names_in_config,
    default_lazy_setup,
    load_lazy_config,
)
from .lazy import (
    build_checkpointer,
    datasets_to_check,
    lazy_eval_only,
    lazy_test,
    lazy_train,
    load_weights,
)
from .optim import NORM_MODULE_TYPES, get_param_groups
from .trainer import (
    AMP_DTYPES,
    MixedPrecisionTrainer,
    build_trainer,
    count_parameters,
    resolve_device,
)

__all__ = [
    "AMP_DTYPES",
    "MixedPrecisionTrainer",
    "NORM_MODULE_TYPES",
    "OverrideTypeError",
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
]
