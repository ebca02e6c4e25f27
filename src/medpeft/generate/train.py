"""``medpeft generate train``: fine-tune a text-to-image diffusion model on image + prompt pairs with one
generative method.

Objective (as diffusers' text-to-image training): images (in [-1, 1]; through the VAE and its scaling
factor for a latent model) get Gaussian noise at a uniformly drawn timestep of the model's DDPM
schedule; the UNet, given the prompt's text-encoder states (the empty prompt with probability
``diffusion.prompt_dropout``, for classifier-free guidance), predicts the noise or the velocity; the
loss is the per-image mean squared error, optionally Min-SNR weighted, averaged over the batch.

The run directory is a fine-tuning run's (config.yaml, split.csv, log.jsonl, checkpoint.pt after each
epoch for resume, metrics.json written last) with the method's trained parameters in ``adapter/`` (the
EMA weights when ``diffusion.ema_decay`` is set). The noise, timesteps and dropped prompts of a batch are
drawn from a generator seeded by (seed, epoch, batch), so a resumed run trains as an uninterrupted one.
Trains on 'train', reports the loss on 'val' (fixed draws) each epoch, never reads 'test'.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack, nullcontext
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from torch import nn

from medpeft.config import dump_config
from medpeft.data import read_split_dataset
from medpeft.data.images import check_images
from medpeft.engine import rundir
from medpeft.engine.loaders import image_cache, make_loader
from medpeft.engine.loop import Stepper, begin_epoch, build_scheduler, run_epoch
from medpeft.engine.distributed import Processes
from medpeft.engine.runtime import autocast, session
from medpeft.errors import DataError, RunDirError
from medpeft.files import locked, write_json_atomic
from medpeft.generate.config import GenerateConfig
from medpeft.generate.methods import count_parameters, trainable_state_dict
from medpeft.generate.model import encode_prompts
from medpeft.generate.runs import ADAPTER, load_source, prepare


def prompts_of(table: pd.DataFrame, config: GenerateConfig) -> list[str]:
    """Each row's prompt: its text column, or the template filled with its positive labels' names."""
    if config.prompt.column is not None:
        return table[f"meta:{config.prompt.column}"].fillna("").astype(str).tolist()
    labels = config.data.labels
    names = [label.replace("_", " ") for label in labels]
    positive = table[labels].to_numpy() == 1
    return [config.prompt.template.format(findings=", ".join(n for n, p in zip(names, row) if p)
                                          or config.prompt.no_finding) for row in positive]


def loader_view(config: GenerateConfig, size: int) -> SimpleNamespace:
    """What the image loaders (engine.loaders) read of a run config, with the images' side `size`."""
    return SimpleNamespace(model=SimpleNamespace(img_size=size), data=config.data, augment=config.augment,
                           train=config.train)


def generate_train(config: GenerateConfig, quiet: bool = False) -> dict:
    """Train as `config` says, write the run directory (the first process holds its lock throughout),
    return its metrics. Under a launcher (torchrun, ``--devices N``) every process trains its part of each
    global batch (torch DDP), as ``medpeft train`` does."""
    with (session(config.train) as (procs, device),
          locked(config.output_dir, RunDirError) if procs.main else nullcontext()):
        recipe = DiffusionTrain(config, procs, device, Console(quiet=quiet or not procs.main))
        recipe.setup()
        recipe.train()
        return recipe.finish()


class DiffusionTrain:
    def __init__(self, config: GenerateConfig, procs: Processes, device: torch.device, console: Console):
        self.config, self.procs, self.device, self.console = config, procs, device, console
        self.run_dir = Path(config.output_dir)

    def setup(self) -> None:
        from diffusers import DDPMScheduler

        config, cfg, procs, device = self.config, self.config.train, self.procs, self.device
        table = check_images(read_split_dataset(config.data), config.data, progress=self.console.is_terminal)
        self.table = table = table[table["split"] != "test"].reset_index(drop=True)
        if not (table["split"] == "train").any():
            raise DataError(f"{config.data.csv}: no training images")
        checkpoint = rundir.check_run_dir(self.run_dir, config)
        procs.barrier()  # every process has checked the folder before the first writes into it
        torch.manual_seed(cfg.seed)
        self.model = model = prepare(load_source(config.model.source, config.model.seed), config)
        self.noise = DDPMScheduler.from_config(model.scheduler.config)
        for module in model.modules().values():
            module.to(device)
        self.parameters = [p for m in model.modules().values() for p in m.parameters() if p.requires_grad]
        counts = count_parameters(model)
        self.console.print(f"{config.method.name} on {config.model.source}: {counts['trainable']:,} trainable "
                           f"parameters ({counts['trainable_percent']:.3g}%), {model.image_size} px, "
                           f"{int((table['split'] == 'train').sum()):,} training images"
                           + (f", {procs.world} processes (DDP)" if procs.world > 1 else ""))
        if procs.main:
            rundir.start_run_dir(self.run_dir, dump_config(config), table, checkpoint)
        view = loader_view(config, model.image_size)
        cache = image_cache(table, view, progress=self.console.is_terminal)
        self.prompts = {split: prompts_of(table[table["split"] == split], config) for split in ("train", "val")}
        self.loaders = {split: make_loader(table, split, view, train=split == "train", cache=cache, procs=procs,
                                           targets=np.arange(len(self.prompts[split]))[:, None])
                        for split in ("train", "val") if self.prompts[split]}
        # the trained components as this process calls them: wrapped by DDP, which averages their gradients
        self.forward = model if procs.world == 1 else replace(model, **{
            name: nn.parallel.DistributedDataParallel(module) for name, module in model.modules().items()
            if any(p.requires_grad for p in module.parameters())})
        optimizer = torch.optim.AdamW(self.parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps_per_epoch = math.ceil(len(self.loaders["train"]) / cfg.grad_accum_steps)
        self.ema = None
        if config.diffusion.ema_decay is not None:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.parameters, decay=config.diffusion.ema_decay)
        self.stepper = Stepper(optimizer, build_scheduler(optimizer, cfg, steps_per_epoch), cfg, self.parameters,
                               after_step=None if self.ema is None else lambda step: self.ema.step(self.parameters))
        self.state = {"epoch": 0, "step": 0, "elapsed": 0.0, "history": []}
        if checkpoint is not None:
            self._resume(checkpoint)

    def _resume(self, checkpoint: dict) -> None:
        state = trainable_state_dict(self.model)
        missing = set(state) ^ set(checkpoint["trainable"])
        if missing:
            raise RunDirError(f"{self.run_dir / rundir.CHECKPOINT}: does not fit the method "
                              f"(e.g. {sorted(missing)[0]})")
        with torch.no_grad():
            for name, param in self._named_trainable():
                param.copy_(checkpoint["trainable"][name])
        self.stepper.optimizer.load_state_dict(checkpoint["optimizer"])
        self.stepper.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(checkpoint["ema"])
        rundir.restore_rng(checkpoint, self.device, self.run_dir, self.procs)
        self.console.print(f"resuming {self.run_dir} at epoch {checkpoint['state']['epoch'] + 1}")
        self.state = checkpoint["state"]

    def _named_trainable(self):
        for component, module in self.model.modules().items():
            for name, param in module.named_parameters():
                if param.requires_grad:
                    yield f"{component}.{name}", param

    def _draws(self, index: torch.Tensor, epoch: int, shape: tuple) -> tuple[torch.Tensor, ...]:
        """Each image's noise, timestep and prompt-dropout draw, from a generator seeded by (seed, epoch,
        the image's place in its split): the same whatever the batch, the process or a resume."""
        noise, steps, drops = [], [], []
        for i in index[:, 0].long().tolist():
            generator = torch.Generator().manual_seed((self.config.train.seed * 100_003 + epoch) * 1_000_003 + i)
            noise.append(torch.randn(shape, generator=generator))
            steps.append(torch.randint(0, self.noise.config.num_train_timesteps, (1,), generator=generator))
            drops.append(torch.rand(1, generator=generator))
        device = self.device
        return torch.stack(noise).to(device), torch.cat(steps).to(device), torch.cat(drops).to(device)

    def loss(self, images: torch.Tensor, index: torch.Tensor, split: str, epoch: int, dropout: float) -> torch.Tensor:
        """Per-image (weighted) noise-prediction loss (B,) of a batch."""
        model, forward, device = self.model, self.forward, self.device
        x = images[:, : model.channels].to(device, non_blocking=True)
        prompts = [self.prompts[split][int(i)] for i in index[:, 0]]
        with autocast(device, self.config.train.precision):
            if model.vae is not None:
                latent = model.vae.encode(x).latent_dist
                x = latent.mean * model.vae.config.scaling_factor  # plus the latent's own noise, drawn below
            noise, t, drawn = self._draws(index, epoch, tuple(x.shape[1:]) if model.vae is None else
                                          (2, *x.shape[1:]))
            if model.vae is not None:  # a sample of the latent distribution, then the diffusion noise
                x = x + latent.std * model.vae.config.scaling_factor * noise[:, 1].to(x.dtype)
                noise = noise[:, 0]
            noise = noise.to(x.dtype)
            prompts = ["" if drop else prompt for drop, prompt in zip((drawn < dropout).tolist(), prompts)]
            noisy = self.noise.add_noise(x, noise, t)
            target = noise if self.noise.config.prediction_type == "epsilon" else self.noise.get_velocity(x, noise, t)
            predicted = forward.unet(noisy, t, encoder_hidden_states=encode_prompts(forward, prompts)).sample
        loss = (predicted.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
        gamma = self.config.diffusion.snr_gamma
        if gamma is not None:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.noise, t)
            loss = loss * torch.clamp(snr, max=gamma) / (snr if self.noise.config.prediction_type == "epsilon"
                                                         else snr + 1)
        return loss

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        """The mean loss over the val images (fixed draws), every process's batches summed."""
        if "val" not in self.loaders:
            return None
        for module in self.model.modules().values():
            module.eval()
        total, count = 0.0, 0
        for x, index in self.loaders["val"]:
            loss = self.loss(x, index, "val", -1, 0.0)
            total, count = total + float(loss.sum()), count + len(loss)
        return self.procs.sum(total) / self.procs.sum(count)

    def _no_sync(self):
        """The context that skips the gradient all-reduce of every DDP-wrapped component."""
        stack = ExitStack()
        for module in self.forward.modules().values():
            if isinstance(module, nn.parallel.DistributedDataParallel):
                stack.enter_context(module.no_sync())
        return stack

    def train(self) -> None:
        cfg, state, procs = self.config.train, self.state, self.procs
        loader = self.loaders["train"]
        dropout = self.config.diffusion.prompt_dropout
        while state["epoch"] < cfg.epochs:
            epoch = state["epoch"]
            for module in self.model.modules().values():
                module.train(any(p.requires_grad for p in module.parameters()))
            begin_epoch(loader, cfg.seed, epoch)

            def batch_loss(i, batch):
                # this process's part of the global batch, weighted so that DDP's mean over the processes is
                # the whole batch's mean loss (weight 1 in one process)
                mine, total = loader.batch_sampler.share(i)
                loss = self.loss(*batch, "train", epoch, dropout).mean()
                return loss * (mine * procs.world / total), loss.item() * mine / total, total
            train_loss, _, seconds = run_epoch(loader, epoch, batch_loss, self.stepper, state, self.run_dir,
                                               self.console, procs, no_sync=self._no_sync if procs.world > 1 else None)
            val_loss = self.validation_loss()
            record = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss}
            state["history"].append(record)
            state["elapsed"] += seconds
            state["epoch"] += 1
            self.console.print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}"
                               + ("" if val_loss is None else f", val loss {val_loss:.4f}"))
            rng = rundir.rng_state(self.device, procs)  # gathered from every process
            if procs.main:
                rundir.append_log(self.run_dir, {"event": "epoch", **record})
                rundir.save_checkpoint({
                    "trainable": trainable_state_dict(self.model), "optimizer": self.stepper.optimizer.state_dict(),
                    "scheduler": self.stepper.scheduler.state_dict(), "state": state,
                    **({"ema": self.ema.state_dict()} if self.ema is not None else {}), **rng}, self.run_dir)

    def finish(self) -> dict:
        start = time.perf_counter()
        if self.ema is not None:
            self.ema.copy_to(self.parameters)
        metrics = {"method": self.config.method.name, "source": self.config.model.source,
                   "image_size": self.model.image_size, "parameters": count_parameters(self.model),
                   "processes": self.procs.world, "epochs_run": self.state["epoch"], "steps": self.state["step"],
                   "wall_time_s": self.state["elapsed"] + time.perf_counter() - start,
                   "split_sizes": self.table["split"].value_counts().to_dict(), "history": self.state["history"]}
        if self.procs.main:
            adapter = self.run_dir / ADAPTER
            adapter.mkdir(exist_ok=True)
            self.config.method.save(self.model, adapter)
            write_json_atomic(self.run_dir / rundir.METRICS, metrics)
            (self.run_dir / rundir.CHECKPOINT).unlink(missing_ok=True)
        self.procs.barrier()  # the run is complete for every process
        return metrics
