"""What every catalogue model's tests check, shared: a run config naming the entry (so its defaults
apply), the pooled features medpeft computes, and one training step of a method on the loaded model."""

from __future__ import annotations

import torch

from medpeft.config import config_from_dict
from medpeft.engine.assemble import build_model


def catalogue_config(run_config: dict, name: str, weights, method: str = "lora", **model) -> object:
    """`run_config` (the conftest fixture) with model.name `name` and `weights`, plus `model` keys (a tiny
    img_size and kwargs), loaded the way a user's config is."""
    config = dict(run_config)
    config["model"] = {"name": name, "weights": str(weights), **model}
    config["method"] = {"name": method, "r": 4, "alpha": 8} if method == "lora" else {"name": method}
    return config_from_dict(config)


def pooled_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The timm model's pooled, pre-classifier features (B, D), in eval mode."""
    model.eval()
    with torch.no_grad():
        return model.forward_head(model.forward_features(images), pre_logits=True)


def train_one_step(config) -> None:
    """Build the run's model (weights loaded, method applied), take one AdamW step on two random images,
    and assert that the loss is finite and every trainable tensor changed."""
    torch.manual_seed(0)
    model = build_model(config).model.train()
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "the method left nothing to train"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    size = config.model.img_size
    logits = model(torch.randn(2, 3, size, size))
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    after = dict(model.named_parameters())
    unchanged = [n for n, before in trainable.items() if torch.equal(before, after[n].detach())]
    assert not unchanged, f"not trained by the step: {unchanged[:3]}"
