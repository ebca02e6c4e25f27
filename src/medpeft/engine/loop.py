"""The epoch loop that fine-tuning and MAE pretraining share: batches -> loss -> backward, gradient
accumulation, clipping, (scaled) optimiser steps, the per-step learning-rate schedule, step records in
log.jsonl and a progress bar."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from rich.console import Console
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader

from medpeft.config import TrainConfig
from medpeft.console import progress_bar
from medpeft.engine import rundir
from medpeft.engine.distributed import SINGLE, Processes


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> CosineLRScheduler:
    """Per optimiser step: linear warmup from min_lr to lr, then cosine decay to min_lr."""
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    return CosineLRScheduler(
        optimizer, t_initial=max(1, cfg.epochs * steps_per_epoch - warmup_steps), lr_min=cfg.min_lr,
        warmup_t=warmup_steps, warmup_lr_init=cfg.min_lr, warmup_prefix=True, t_in_epochs=False)


def begin_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Seed an epoch's shuffle and augmentation from (seed, epoch): a resumed run draws what an
    uninterrupted one would."""
    loader.dataset.epoch = epoch
    loader.generator.manual_seed(seed * 7919 + epoch)


@dataclass
class Stepper:
    """Optimiser steps over accumulated gradients: unscale and clip, step, update the loss scale, call
    `after_step(step)` (before the gradients are cleared), advance the schedule."""

    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    cfg: TrainConfig
    parameters: list[torch.nn.Parameter]
    """The trained parameters (clipped together)."""
    scaler: torch.amp.GradScaler | None = None
    after_step: Callable[[int], None] | None = None

    def backward(self, objective: torch.Tensor) -> None:
        objective = objective / self.cfg.grad_accum_steps
        (self.scaler.scale(objective) if self.scaler is not None else objective).backward()

    def step(self, state: dict) -> None:
        if self.cfg.grad_clip:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.parameters, self.cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.after_step is not None:
            self.after_step(state["step"])
        self.optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        self.scheduler.step_update(state["step"])


BatchLoss = Callable[[int, tuple], tuple[torch.Tensor, float, int]]
"""(index, batch) -> (the objective to back-propagate, this process's share of the batch's mean loss,
images in the global batch)."""


def run_epoch(loader: DataLoader, epoch: int, batch_loss: BatchLoss, stepper: Stepper, state: dict,
              run_dir: Path, console: Console, procs: Processes = SINGLE,
              no_sync: Callable[[], object] | None = None) -> tuple[float, int, float]:
    """One pass over `loader`; returns (mean loss over its batches, images seen, seconds). A step record
    (loss of the batch that ends the step, lr, images per second) goes to log.jsonl every
    ``log_every_steps`` steps. Under DDP, `no_sync` is the context that skips the gradient all-reduce of a
    batch that does not end a step, and every process must reach each step together."""
    cfg, losses, seen, start = stepper.cfg, [], 0, time.perf_counter()
    with progress_bar(console, "loss {task.fields[loss]:.4f}  {task.fields[ips]:.0f} img/s") as progress:
        bar = progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(loader), loss=0.0, ips=0.0)
        for i, batch in enumerate(loader):
            stepping = (i + 1) % cfg.grad_accum_steps == 0 or i + 1 == len(loader)
            with no_sync() if no_sync is not None and not stepping else nullcontext():
                objective, share, images = batch_loss(i, batch)
                stepper.backward(objective)
            if stepping:
                stepper.step(state)
                if state["step"] % cfg.log_every_steps == 0:
                    loss = procs.sum(share)  # every process reaches this step together
                    if procs.main:
                        rundir.append_log(run_dir, {
                            "event": "step", "epoch": epoch, "step": state["step"], "loss": loss,
                            "lr": stepper.optimizer.param_groups[0]["lr"],
                            "images_per_s": seen / (time.perf_counter() - start)})
            losses.append(share)
            seen += images
            progress.update(bar, advance=1, loss=procs.world * float(np.mean(losses[-20:])),
                            ips=seen / (time.perf_counter() - start))
    return procs.sum(float(np.sum(losses))) / len(losses), seen, time.perf_counter() - start
