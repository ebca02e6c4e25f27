"""Backbones: build a timm model by name and load foreign checkpoints into it."""

from medpeft.backbones.build import count_parameters, create_backbone
from medpeft.backbones.checkpoint import LoadReport, load_checkpoint, read_state_dict
from medpeft.backbones.layers import SplitQKV, classifier_name, fuse_qkv, split_qkv

__all__ = [
    "LoadReport", "SplitQKV", "classifier_name", "count_parameters", "create_backbone", "fuse_qkv",
    "load_checkpoint", "read_state_dict", "split_qkv",
]
