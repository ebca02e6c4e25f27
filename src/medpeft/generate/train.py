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
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from rich.console import Console

from medpeft.config import dump_config
from medpeft.data import read_split_dataset
from medpeft.data.images import check_images
from medpeft.engine import rundir
from medpeft.engine.loaders import image_cache, make_loader
from medpeft.engine.loop import Stepper, begin_epoch, build_scheduler, run_epoch
from medpeft.engine.runtime import autocast, resolve_device
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


def generate_train(config: GenerateConfig, quiet: bool = False) -> dict:
    """Train as `config` says, write the run directory (holding its lock throughout), return its metrics."""
    with locked(config.output_dir, RunDirError):
        recipe = DiffusionTrain(config, Console(quiet=quiet))
        recipe.setup()
        recipe.train()
        return recipe.finish()


class DiffusionTrain:
    def __init__(self, config: GenerateConfig, console: Console):
        self.config, self.console, self.run_dir = config, console, Path(config.output_dir)

    def setup(self) -> None:
        from diffusers import DDPMScheduler

        config, cfg = self.config, self.config.train
        table = check_images(read_split_dataset(config.data), config.data, progress=self.console.is_terminal)
        self.table = table = table[table["split"] != "test"].reset_index(drop=True)
        if not (table["split"] == "train").any():
            raise DataError(f"{config.data.csv}: no training images")
        checkpoint = rundir.check_run_dir(self.run_dir, config)
        self.device = device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.model = model = prepare(load_source(config.model.source, config.model.seed), config)
        self.noise = DDPMScheduler.from_config(model.scheduler.config)
        for module in model.modules().values():
            module.to(device)
        self.parameters = [p for m in model.modules().values() for p in m.parameters() if p.requires_grad]
        counts = count_parameters(model)
        self.console.print(f"{config.method.name} on {config.model.source}: {counts['trainable']:,} trainable "
                           f"parameters ({counts['trainable_percent']:.3g}%), {model.image_size} px, "
                           f"{int((table['split'] == 'train').sum()):,} training images")
        rundir.start_run_dir(self.run_dir, dump_config(config), table, checkpoint)
        view = SimpleNamespace(model=SimpleNamespace(img_size=model.image_size), data=config.data,
                               augment=config.augment, train=config.train)  # what the image loaders read
        cache = image_cache(table, view, progress=self.console.is_terminal)
        self.prompts = {split: prompts_of(table[table["split"] == split], config) for split in ("train", "val")}
        self.loaders = {split: make_loader(table, split, view, train=split == "train", cache=cache,
                                           targets=np.arange(len(self.prompts[split]))[:, None])
                        for split in ("train", "val") if self.prompts[split]}
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
        rundir.restore_rng(checkpoint, self.device, self.run_dir)
        self.console.print(f"resuming {self.run_dir} at epoch {checkpoint['state']['epoch'] + 1}")
        self.state = checkpoint["state"]

    def _named_trainable(self):
        for component, module in self.model.modules().items():
            for name, param in module.named_parameters():
                if param.requires_grad:
                    yield f"{component}.{name}", param

    def loss(self, images: torch.Tensor, index: torch.Tensor, split: str, generator: torch.Generator,
             dropout: float) -> torch.Tensor:
        """Per-image (weighted) noise-prediction loss (B,) of a batch."""
        model, device = self.model, self.device
        x = images[:, : model.channels].to(device, non_blocking=True)
        prompts = [self.prompts[split][int(i)] for i in index[:, 0]]
        dropped = torch.rand(len(prompts), generator=generator, device=device) < dropout
        prompts = ["" if drop else prompt for drop, prompt in zip(dropped.tolist(), prompts)]
        with autocast(device, self.config.train.precision):
            if model.vae is not None:
                x = model.vae.encode(x).latent_dist.sample(generator) * model.vae.config.scaling_factor
            noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
            t = torch.randint(0, self.noise.config.num_train_timesteps, (len(x),), generator=generator, device=device)
            noisy = self.noise.add_noise(x, noise, t)
            target = noise if self.noise.config.prediction_type == "epsilon" else self.noise.get_velocity(x, noise, t)
            predicted = model.unet(noisy, t, encoder_hidden_states=encode_prompts(model, prompts)).sample
        loss = (predicted.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
        gamma = self.config.diffusion.snr_gamma
        if gamma is not None:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.noise, t)
            loss = loss * torch.clamp(snr, max=gamma) / (snr if self.noise.config.prediction_type == "epsilon"
                                                         else snr + 1)
        return loss

    def _generator(self, epoch: int, batch: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed((self.config.train.seed * 100_003 + epoch) * 1_000_003 + batch)

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        if "val" not in self.loaders:
            return None
        for module in self.model.modules().values():
            module.eval()
        losses = [self.loss(x, index, "val", self._generator(-1, i), 0.0) for i, (x, index) in
                  enumerate(self.loaders["val"])]
        return float(torch.cat(losses).mean())

    def train(self) -> None:
        cfg, state = self.config.train, self.state
        loader = self.loaders["train"]
        dropout = self.config.diffusion.prompt_dropout
        while state["epoch"] < cfg.epochs:
            epoch = state["epoch"]
            for module in self.model.modules().values():
                module.train(any(p.requires_grad for p in module.parameters()))
            begin_epoch(loader, cfg.seed, epoch)

            def batch_loss(i, batch):
                loss = self.loss(*batch, "train", self._generator(epoch, i), dropout).mean()
                return loss, loss.item(), len(batch[0])
            train_loss, _, seconds = run_epoch(loader, epoch, batch_loss, self.stepper, state, self.run_dir,
                                               self.console)
            val_loss = self.validation_loss()
            record = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss}
            state["history"].append(record)
            state["elapsed"] += seconds
            state["epoch"] += 1
            rundir.append_log(self.run_dir, {"event": "epoch", **record})
            self.console.print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}"
                               + ("" if val_loss is None else f", val loss {val_loss:.4f}"))
            rundir.save_checkpoint({
                "trainable": trainable_state_dict(self.model), "optimizer": self.stepper.optimizer.state_dict(),
                "scheduler": self.stepper.scheduler.state_dict(), "state": state,
                **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
                **rundir.rng_state(self.device)}, self.run_dir)

    def finish(self) -> dict:
        start = time.perf_counter()
        if self.ema is not None:
            self.ema.copy_to(self.parameters)
        adapter = self.run_dir / ADAPTER
        adapter.mkdir(exist_ok=True)
        self.config.method.save(self.model, adapter)
        metrics = {"method": self.config.method.name, "source": self.config.model.source,
                   "image_size": self.model.image_size, "parameters": count_parameters(self.model),
                   "epochs_run": self.state["epoch"], "steps": self.state["step"],
                   "wall_time_s": self.state["elapsed"] + time.perf_counter() - start,
                   "split_sizes": self.table["split"].value_counts().to_dict(), "history": self.state["history"]}
        write_json_atomic(self.run_dir / rundir.METRICS, metrics)
        (self.run_dir / rundir.CHECKPOINT).unlink(missing_ok=True)
        return metrics
