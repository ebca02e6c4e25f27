"""Run configuration: typed sections validated completely when loaded, with the key path in every error.

A reader's options are a DataConfig subclass registered under its ``data.format``; a method's are a
MethodConfig subclass registered under its ``method.name`` (both in the reader's or method's own file).
"""

from medpeft.config.run import (
    PRETRAIN_DEFAULTS, MAEConfig, PretrainConfig, RunConfig, config_from_dict, dump_config, load_config,
    load_data_config, load_pretrain_config, merge_dicts, parse_overrides, read_yaml_mapping, upgrade_saved,
)
from medpeft.config.schema import Registry, Section, build, explicit, option
from medpeft.config.sections import (
    DATA_FORMATS, IMAGENET_MEAN, IMAGENET_STD, METHODS, AugmentConfig, DataConfig, MethodConfig, ModelConfig,
    SplitConfig, TrainConfig, check_pattern, model_family,
)

__all__ = [
    "DATA_FORMATS", "IMAGENET_MEAN", "IMAGENET_STD", "METHODS", "PRETRAIN_DEFAULTS", "AugmentConfig", "DataConfig",
    "MAEConfig", "MethodConfig", "ModelConfig", "PretrainConfig", "Registry", "RunConfig", "Section", "SplitConfig",
    "TrainConfig", "build", "check_pattern", "config_from_dict", "dump_config", "explicit", "load_config",
    "load_data_config", "load_pretrain_config", "merge_dicts", "model_family", "option", "parse_overrides",
    "read_yaml_mapping", "upgrade_saved",
]
