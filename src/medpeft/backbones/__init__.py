"""Backbones: build a timm model by name and load foreign checkpoints into it."""

from medpeft.backbones.build import create_backbone, count_parameters
from medpeft.backbones.checkpoint import LoadReport, load_checkpoint, read_state_dict
from medpeft.backbones.layers import SplitQKV, fuse_qkv, split_qkv

__all__ = [
    "LoadReport", "SplitQKV", "count_parameters", "create_backbone", "fuse_qkv", "load_checkpoint",
    "read_state_dict", "split_qkv",
]
