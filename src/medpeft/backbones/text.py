"""Zero-shot classifiers from the text towers of vision-language catalogue models (BiomedCLIP, CheXzero,
SigLIP / MedSigLIP), installed as the classifier of the timm vision model (``model.head_init: text``).

With f the model's pooled feature (D), P the published vision projection (E x D; none for SigLIP, whose
pooled feature is its image embedding), t(.) the text tower's unit-length embedding (E) and s its learnt
logit scale, the logit of label k is

    multi-label:  s * <P f / |P f|, t(prompt_k) - t(negative_prompt_k)>   (CheXzero's softmax over the
                                                                          pair, written as a sigmoid)
    multiclass:   s * <P f / |P f|, t(prompt_k)>                          (CLIP's zero-shot softmax)

P and the normalisation replace the model's ``fc_norm`` (an identity in these models) as a fixed buffer;
the classifier stays an ``nn.Linear`` (E -> K) that every method trains as any head. The text towers run
once, in their original libraries (open_clip, transformers: ``pip install 'medpeft[models]'``).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medpeft.backbones.checkpoint import read_state_dict
from medpeft.config import ModelConfig
from medpeft.errors import CheckpointError, ConfigError


class ProjectNormalize(nn.Module):
    """Pooled features (B, D) -> unit-length image embeddings (B, E) through a fixed projection (E, D)."""

    def __init__(self, projection: torch.Tensor | None):
        super().__init__()
        self.register_buffer("projection", projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.projection is not None:
            x = F.linear(x, self.projection.to(x.dtype))
        return F.normalize(x, dim=-1)


def install_text_head(model: nn.Module, config: ModelConfig, labels: list[str], multiclass: bool) -> None:
    """Replace `model`'s pooled-feature norm and classifier by the zero-shot classifier of the catalogue
    model `config` names, read from ``config.weights`` (its published file or folder)."""
    if not isinstance(getattr(model, "fc_norm", None), nn.Identity):
        raise ConfigError(f"model.head_init 'text' needs {config.name}'s own pooling (fc_norm unused): leave "
                          f"model.global_pool unset")
    layout = config.entry.layouts[0]
    texts = [config.prompt.format(label=label.replace("_", " ")) for label in labels]
    if not multiclass:
        texts += [config.negative_prompt.format(label=label.replace("_", " ")) for label in labels]
    with torch.no_grad():
        embeddings, projection, scale = _ENCODERS[layout](Path(config.weights), texts)
    embeddings = F.normalize(embeddings.float(), dim=-1)
    weight = embeddings if multiclass else embeddings[:len(labels)] - embeddings[len(labels):]
    model.fc_norm = ProjectNormalize(None if projection is None else projection.float())
    model.head = nn.Linear(weight.shape[1], len(labels))
    with torch.no_grad():
        model.head.weight.copy_(float(scale) * weight)
        model.head.bias.zero_()


def _library(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ConfigError(f"model.head_init 'text' runs the text tower in {name}: pip install "
                          f"'medpeft[models]'") from None


def _openai_clip(path: Path, texts: list[str]):
    """CheXzero / OpenAI CLIP: the state_dict file holds both towers; CLIP's BPE tokenizer ships with open_clip."""
    open_clip = _library("open_clip")
    state_dict = read_state_dict(path)
    model = open_clip.model.build_model_from_openai_state_dict(dict(state_dict)).float()
    model.load_state_dict(state_dict, strict=False)  # again, in fp32: the builder rounds through fp16
    tokens = open_clip.tokenizer.tokenize(texts, context_length=model.context_length)
    return model.encode_text(tokens), state_dict["visual.proj"].T, state_dict["logit_scale"].exp()


def _open_clip(path: Path, texts: list[str]):
    """BiomedCLIP: the published folder (open_clip_config.json + weights), through open_clip's local-dir."""
    open_clip = _library("open_clip")
    folder = path if path.is_dir() else path.parent
    try:
        model = open_clip.create_model(f"local-dir:{folder}").eval()
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{folder}: open_clip could not load the text tower ({str(e).splitlines()[0]})") from None
    head = model.visual.head
    if getattr(head, "proj", None) is None or not isinstance(head.proj, nn.Linear) or head.proj.bias is not None:
        raise CheckpointError(f"{folder}: expected a linear vision projection without bias (visual.head.proj)")
    return model.encode_text(tokenizer(texts)), head.proj.weight, model.logit_scale.exp()


def _siglip(path: Path, texts: list[str]):
    """SigLIP / MedSigLIP: the published transformers folder (SiglipModel + its tokenizer files)."""
    transformers = _library("transformers")
    folder = path if path.is_dir() else path.parent
    try:
        model = transformers.SiglipModel.from_pretrained(folder).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: transformers could not load the SiglipModel and its tokenizer "
                              f"({str(e).splitlines()[0]})") from None
    inputs = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt")
    features = model.get_text_features(input_ids=inputs["input_ids"])
    features = getattr(features, "pooler_output", features)  # transformers 5 returns an output object
    return features, None, model.logit_scale.exp()


_ENCODERS = {"openai-clip": _openai_clip, "open-clip-timm": _open_clip, "hf-siglip": _siglip}
