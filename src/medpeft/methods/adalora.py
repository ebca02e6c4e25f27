"""AdaLoRA (Zhang et al. 2023) through HF peft: LoRA in SVD form (B diag(E) A) whose rank budget is
moved during training to the layers that matter, by pruning the least important singular values.

AdaLoRA acts during training, so it uses the recipe's training hooks: the run's number of optimiser
steps fixes the budget schedule (``total_step``, filled in by ``medpeft train`` and saved with the
resolved config), the orthogonality penalty on A and B is added to the loss (peft adds it only for
models that return a ``.loss``, which timm models do not), the rank allocation runs after every
optimiser step, and the allocator's importance averages are checkpointed so a resumed run equals an
uninterrupted one. The saved adapter is in peft's format with its final ``rank_pattern``: pruned
ranks are dropped from the file and a fresh model is resized to them on load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import peft
import torch

from medpeft.config import option
from medpeft.errors import CheckpointError, ConfigError
from medpeft.methods import _peft
from medpeft.methods.registry import MethodSpec, TrainingHooks, register_method


@dataclass
class AdaLoraConfig(_peft.PeftConfig):
    search_space = {"method.target_r": ("categorical", [4, 8]), "method.alpha": ("int", 4, 64, True),
                    "method.dropout": ("float", 0.0, 0.2)}
    init_r: int = option(12, "Starting rank of every targeted layer.", gt=0)
    target_r: int = option(8, "Average rank per layer left after pruning (the budget); at most init_r.", gt=0)
    alpha: int = option(16, "Scaling numerator (alpha / r).", gt=0)
    dropout: float = option(0.0, "Dropout on the update's input.", ge=0, lt=1)
    targets: list[str] = _peft.targets_option(["qkv"])
    warmup_fraction: float = option(0.1, "Share of the optimiser steps trained at init_r before pruning starts "
                                    "(peft's tinit).", ge=0, lt=1)
    final_fraction: float = option(0.2, "Share of the last steps trained with the final ranks fixed (peft's "
                                   "tfinal).", ge=0, lt=1)
    interval: int = option(1, "Optimiser steps between two rank allocations (peft's deltaT).", gt=0)
    beta1: float = option(0.85, "Smoothing of the importance (sensitivity).", ge=0, lt=1)
    beta2: float = option(0.85, "Smoothing of the importance's uncertainty.", ge=0, lt=1)
    orth_reg_weight: float = option(0.5, "Weight of the penalty ||A A^T - I|| + ||B^T B - I|| added to the loss.",
                                    ge=0)
    total_step: int | None = option(None, "Optimiser steps of the run; medpeft train fills it in.", gt=0)

    def validate(self) -> None:
        super().validate()
        if self.target_r > self.init_r:
            raise ConfigError(f"method.target_r must be in (0, init_r={self.init_r}], got {self.target_r}")
        if self.warmup_fraction + self.final_fraction >= 1:
            raise ConfigError("method.warmup_fraction and final_fraction must sum to < 1 (the steps in between "
                              "allocate the ranks)")

    def schedule(self) -> tuple[int, int]:
        """(tinit, tfinal) in optimiser steps."""
        return round(self.warmup_fraction * self.total_step), round(self.final_fraction * self.total_step)

    def peft_config(self) -> peft.AdaLoraConfig:
        if self.total_step is None:
            raise ConfigError("method.total_step is unset: AdaLoRA's rank schedule needs the run's number of "
                              "optimiser steps (medpeft train sets it)")
        tinit, tfinal = self.schedule()
        if tinit >= self.total_step - tfinal:
            raise ConfigError(f"method: {self.total_step} optimiser steps leave no rank-allocation phase "
                              f"between warmup ({tinit}) and final ({tfinal}) steps; train longer")
        return peft.AdaLoraConfig(
            init_r=self.init_r, target_r=self.target_r, lora_alpha=self.alpha, lora_dropout=self.dropout,
            tinit=tinit, tfinal=tfinal, deltaT=self.interval, beta1=self.beta1, beta2=self.beta2,
            orth_reg_weight=self.orth_reg_weight, total_step=self.total_step)


def load(model: peft.PeftModel, directory: Path) -> None:
    """Resize to the saved rank pattern (if allocation had finished), then load like any peft adapter."""
    path = Path(directory) / "adapter_config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # missing, not UTF-8, not JSON
        raise CheckpointError(f"{path}: not a readable adapter config ({e})") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: expected a JSON object (peft's adapter config)")
    model.peft_config["default"].rank_pattern = saved.get("rank_pattern")
    _peft.load(model, directory)


# ----------------------------------------------------------------------------- training hooks
def configure(config: AdaLoraConfig, total_steps: int) -> AdaLoraConfig:
    return config if config.total_step is not None else replace(config, total_step=total_steps)


def orthogonality_penalty(model: peft.PeftModel) -> torch.Tensor:
    """Mean over A and B of ||P P^T - I||_F (rows of A, columns of B), times the configured weight."""
    terms = []
    for name, p in model.named_parameters():
        if p.requires_grad and (".lora_A." in name or ".lora_B." in name):
            cov = p @ p.T if ".lora_A." in name else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(len(cov), device=cov.device)))
    return model.peft_config["default"].orth_reg_weight * torch.stack(terms).mean()


def after_step(model: peft.PeftModel, step: int) -> None:
    """Update the importance scores and the rank mask; call after optimizer.step(), before zero_grad()."""
    model.base_model.update_and_allocate(step)


_ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def state_dict(model: peft.PeftModel) -> dict:
    allocator = model.base_model.rankallocator
    state = {key: {n: t.detach().cpu().clone() for n, t in getattr(allocator, key).items()} for key in _ALLOCATOR_STATE}
    pattern = model.peft_config["default"].rank_pattern
    return {**state, "rank_pattern": {n: [bool(b) for b in torch.as_tensor(v).view(-1)] for n, v in (pattern or {}).items()}}


def load_state_dict(model: peft.PeftModel, state: dict) -> None:
    allocator = model.base_model.rankallocator
    device = next(model.parameters()).device
    for key in _ALLOCATOR_STATE:
        setattr(allocator, key, {n: t.to(device) for n, t in state[key].items()})
    model.peft_config["default"].rank_pattern = state["rank_pattern"] or None


register_method(MethodSpec(
    name="adalora", config_cls=AdaLoraConfig, apply=_peft.apply, save=_peft.save, load=load, merge=_peft.merge,
    hooks=TrainingHooks(configure=configure, loss=orthogonality_penalty, after_step=after_step,
                        state_dict=state_dict, load_state_dict=load_state_dict),
    description="AdaLoRA: SVD-form LoRA whose rank budget moves to the important layers during training (HF peft).",
    reference="Zhang et al. 2023, arXiv 2303.10512"))
