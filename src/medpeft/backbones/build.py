"""Build a timm backbone with a classification head for a task, with weights from where the config says."""

from __future__ import annotations

import timm
from timm.layers import PatchEmbed
from torch import nn

from medpeft.backbones.checkpoint import LoadReport, load_checkpoint
from medpeft.config import ModelConfig
from medpeft.errors import CheckpointError, ConfigError


def create_backbone(config: ModelConfig, num_classes: int) -> tuple[nn.Module, LoadReport | None]:
    """Create ``config.architecture`` with a fresh `num_classes` head and load its weights.

    ``weights='random'`` keeps timm's init (asked for explicitly), ``'timm'`` fetches timm /
    Hugging Face hub weights for the name (``hf-hub:org/repo`` names work), ``'hub'`` a catalogue
    model's published folder by its hub id; anything else is a local checkpoint file or folder, read in
    the catalogue model's layouts. Returns the model and, for a file, the load report.
    """
    pretrained = config.weights == "timm"
    kwargs = dict(num_classes=num_classes, **config.kwargs)
    if config.drop_path_rate:  # some CNNs (DenseNet) have no stochastic depth: 0 leaves it out
        kwargs["drop_path_rate"] = config.drop_path_rate
    if config.family == "vit":  # CNNs take any input size and have no img_size argument
        kwargs["img_size"] = config.img_size
    if config.global_pool is not None:
        kwargs["global_pool"] = config.global_pool
    try:
        model = timm.create_model(config.architecture, pretrained=pretrained, **kwargs)
    except TypeError as e:
        if "drop_path_rate" in str(e):
            raise ConfigError(f"{config.name} has no drop path: set model.drop_path_rate: 0") from None
        raise ConfigError(f"model.kwargs do not fit {config.name}: {e}") from None
    except (OSError, RuntimeError, ValueError, AssertionError) as e:  # timm asserts its arguments
        first = next(iter(str(e).splitlines()), type(e).__name__)
        if pretrained and not isinstance(e, AssertionError):
            raise CheckpointError(f"could not get timm weights for {config.name!r} ({first}); without a "
                                  f"network, give model.weights a local checkpoint file") from None
        raise ConfigError(f"model {config.name!r} could not be built: {first}") from None
    _check_whole_patches(model, config)
    for module in model.modules():  # Eva attention with q/v biases: call its qkv Linear (that methods wrap)
        if getattr(module, "q_bias", None) is not None and hasattr(module, "qkv_bias_separate"):
            module.qkv_bias_separate = True  # qkv(x) + bias, instead of F.linear on qkv.weight
    report = None
    if config.weights not in ("random", "timm"):
        entry = config.entry
        path = _hub_folder(entry.hub) if config.weights == "hub" else config.weights
        report = load_checkpoint(model, path, entry.layouts if entry is not None else None)
    return model, report


def _hub_folder(repo_id: str) -> str:
    """The local folder of a Hugging Face hub repository: downloaded, or from the cache when offline."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id)
    except Exception as e:  # network, authentication (gated models), or an offline miss
        first = next(iter(str(e).splitlines()), type(e).__name__)
        raise CheckpointError(f"could not get {repo_id} from the Hugging Face hub ({type(e).__name__}: {first}); "
                              f"without a network, download it elsewhere and give model.weights its folder") from None


def _check_whole_patches(model: nn.Module, config: ModelConfig) -> None:
    """A ViT's input is a whole number of patches: timm's patch embedding drops the rest silently."""
    embed = getattr(model, "patch_embed", None)
    if isinstance(embed, PatchEmbed) and not embed.dynamic_img_pad and config.img_size % embed.patch_size[0]:
        raise ConfigError(f"model.img_size {config.img_size} must be a multiple of {config.name}'s patch size "
                          f"{embed.patch_size[0]} (the rest of the image would be cut off)")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; ``Module.parameters`` yields a shared tensor once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
