"""``medpeft pretrain``: masked-autoencoder pretraining of a timm ViT on unlabelled images.

The run directory is laid out like a fine-tuning run's (config.yaml, split.csv, log.jsonl, checkpoint.pt
for resume, metrics.json written last) plus:

    mae.pth      {'model': encoder + decoder keys, 'epoch': n}: the MAE checkpoint layout, loaded by
                 ``medpeft train`` with model.weights=<run>/mae.pth exactly like an MRM / medical MAE file
    previews/    epoch-NNNN.png: original / masked / reconstruction / reconstruction + visible patches

Trains on the 'train' split, reports the reconstruction loss on 'val' (hidden patches fixed by a seeded
generator, so epochs are comparable) and never reads 'test'. Later fine-tuning runs' test images stay
unseen only where they draw the same split: pretraining has no labels to stratify by, so both need
data.split.stratify false (a stratified fine-tuning split is another split). Resuming gives the same
weights as an uninterrupted run on CPU (seeded per-sample augmentation, RNG state checkpointed).
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from rich.console import Console
from timm.optim import create_optimizer_v2

from medpeft import accel
from medpeft.backbones import create_backbone
from medpeft.config import PretrainConfig, dump_config
from medpeft.data import read_split_dataset
from medpeft.data.images import check_images
from medpeft.engine import rundir
from medpeft.engine.loaders import image_cache, make_loader
from medpeft.engine.loop import Stepper, begin_epoch, build_scheduler, run_epoch
from medpeft.engine.runtime import autocast, resolve_device
from medpeft.errors import DataError, RunDirError, TrainingError
from medpeft.files import locked, write_bytes_atomic, write_json_atomic
from medpeft.pretrain.mae import MaskedAutoencoder

MAE_CHECKPOINT = "mae.pth"
PREVIEWS = "previews"


def build_mae(config: PretrainConfig, device: torch.device | None = None) -> MaskedAutoencoder:
    """The encoder as ``medpeft train`` will build it (no head, final norm kept) inside an MAE."""
    torch.manual_seed(config.train.seed)
    model_config = replace(config.model, global_pool="", kwargs={**config.model.kwargs, "fc_norm": False})
    encoder, report = create_backbone(model_config, num_classes=0)
    model = MaskedAutoencoder(encoder, config.mae, fixed_pos_embed=report is None)
    return accel.apply(model, "vit", config.train, device or resolve_device(config.train.device))


@torch.no_grad()
def validation_loss(model: MaskedAutoencoder, loader, config: PretrainConfig, device: torch.device) -> float:
    """Mean reconstruction loss over the loader, with the same hidden patches every time it is called."""
    model.eval()
    generator = torch.Generator(device).manual_seed(config.train.seed)
    total, count = 0.0, 0
    for x, _ in loader:
        x = x.to(device, non_blocking=True)
        with autocast(device, config.train.precision):
            loss, _, _ = model(x, config.mae.mask_ratio, generator)
        total, count = total + loss.item() * len(x), count + len(x)
    return total / count


@torch.no_grad()
def write_preview(model: MaskedAutoencoder, images: torch.Tensor, config: PretrainConfig, path: Path) -> None:
    """One row per image: original | masked | reconstruction | reconstruction with the visible patches."""
    model.eval()
    generator = torch.Generator(images.device).manual_seed(config.train.seed)
    with autocast(images.device, config.train.precision):
        _, pred, mask = model(images, config.mae.mask_ratio, generator)
    pred = pred.float()
    if model.norm_pix_loss:  # predictions are per-patch normalised: show them at the true patches' scale
        target = model.patchify(images)
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    hidden = model.unpatchify(mask[..., None].expand_as(pred))
    recon = model.unpatchify(pred)
    columns = [images, images * (1 - hidden), recon, images * (1 - hidden) + recon * hidden]
    mean = torch.tensor(config.data.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(config.data.std, device=images.device).view(1, -1, 1, 1)
    grid = torch.cat([(c * std + mean)[:, 0].clamp(0, 1) for c in columns], dim=2)  # (B, H, 4W)
    rows = (grid.reshape(-1, grid.shape[-1]).cpu().numpy() * 255).round().astype(np.uint8)
    path.parent.mkdir(exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(rows).save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())


def prepare_table(config: PretrainConfig, progress: bool = False) -> pd.DataFrame:
    table = check_images(read_split_dataset(config.data), config.data, progress=progress)
    table = table[table["split"] != "test"].reset_index(drop=True)
    if not (table["split"] == "train").any():
        raise DataError(f"{config.data.csv}: no training images to pretrain on")
    return table


def pretrain(config: PretrainConfig, quiet: bool = False) -> dict:
    """Pretrain as `config` says, write the run directory (holding its lock throughout), return its metrics
    (also in metrics.json)."""
    with locked(config.output_dir, RunDirError):
        recipe = PreTrain(config, Console(quiet=quiet))
        recipe.setup()
        recipe.train()
        return recipe.finish()


class PreTrain:
    """The MAE pretraining recipe: setup -> epochs (the shared loop, validation loss, previews) -> finish."""

    def __init__(self, config: PretrainConfig, console: Console):
        self.config, self.console, self.run_dir = config, console, Path(config.output_dir)

    def setup(self) -> None:
        config, cfg = self.config, self.config.train
        self.table = table = prepare_table(config, progress=self.console.is_terminal)
        checkpoint = rundir.check_run_dir(self.run_dir, config)
        accel.prepare_process(cfg)
        self.device = device = resolve_device(cfg.device)
        self.model = model = build_mae(config, device)
        self.encoder_parameters = sum(p.numel() for p in model.encoder.parameters())
        self.console.print(f"MAE pretraining of {config.model.name} ({self.encoder_parameters:,} encoder "
                           f"parameters), mask ratio {config.mae.mask_ratio}, "
                           f"{int((table['split'] == 'train').sum()):,} images")
        rundir.start_run_dir(self.run_dir, dump_config(config), table, checkpoint)
        model.to(device)
        self._setup_loaders(image_cache(table, config, progress=self.console.is_terminal))
        optimizer = create_optimizer_v2(model, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay,
                                        betas=tuple(config.mae.adam_betas), fused=True)
        steps_per_epoch = math.ceil(len(self.train_loader) / cfg.grad_accum_steps)
        self.stepper = Stepper(optimizer, build_scheduler(optimizer, cfg, steps_per_epoch), cfg,
                               [p for p in model.parameters() if p.requires_grad])
        self.state = {"epoch": 0, "step": 0, "elapsed": 0.0, "history": []}
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            self.stepper.scheduler.load_state_dict(checkpoint["scheduler"])
            rundir.restore_rng(checkpoint, device, self.run_dir)
            self.console.print(f"resuming {self.run_dir} at epoch {checkpoint['state']['epoch'] + 1}")
            self.state = checkpoint["state"]

    def _setup_loaders(self, cache) -> None:
        """Training batches, validation batches (if there is a val split) and the preview images."""
        table, config = self.table, self.config
        self.train_loader = make_loader(table, "train", config, train=True, cache=cache)
        has_val = (table["split"] == "val").any()
        self.val_loader = make_loader(table, "val", config, train=False, cache=cache) if has_val else None
        split = "val" if has_val else "train"
        rows = table[table["split"] == split].drop_duplicates("patient_id")  # one image per patient
        loader = make_loader(rows.head(config.mae.preview_images), split, config, train=False, cache=cache)
        self.preview_images = next(iter(loader))[0].to(self.device)

    def _batch_loss(self, i: int, batch) -> tuple[torch.Tensor, float, int]:
        x = batch[0].to(self.device, non_blocking=True)
        with autocast(self.device, self.config.train.precision):
            loss, _, _ = self.model(x, self.config.mae.mask_ratio)
        if not torch.isfinite(loss):
            raise TrainingError(f"{self.run_dir}: the reconstruction loss became {loss.item()} at epoch "
                                f"{self.state['epoch'] + 1}: training diverged (lower train.lr)")
        return loss, loss.item(), len(x)

    def train(self) -> None:
        cfg, state = self.config.train, self.state
        self.started = time.perf_counter() - state["elapsed"]
        while state["epoch"] < cfg.epochs:
            self._epoch(state["epoch"])

    def _epoch(self, epoch: int) -> None:
        config, cfg, state, model = self.config, self.config.train, self.state, self.model
        begin_epoch(self.train_loader, cfg.seed, epoch)
        model.train()
        train_loss, seen, seconds = run_epoch(self.train_loader, epoch, self._batch_loss, self.stepper, state,
                                              self.run_dir, self.console)
        val_loss = None if self.val_loader is None else validation_loss(model, self.val_loader, config, self.device)
        record = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss}
        state["history"].append(record)
        state.update(epoch=epoch + 1, elapsed=time.perf_counter() - self.started)
        rundir.append_log(self.run_dir, {"event": "epoch", **record, "seconds": seconds})
        val_text = "" if val_loss is None else f"  val loss {val_loss:.4f}"
        self.console.print(f"epoch {epoch + 1}/{cfg.epochs}  loss {train_loss:.4f}{val_text}  "
                           f"{seen / seconds:.0f} img/s  {seconds:.1f}s")
        every = config.mae.preview_every
        if every and ((epoch + 1) % every == 0 or epoch + 1 == cfg.epochs):
            write_preview(model, self.preview_images, config, self.run_dir / PREVIEWS / f"epoch-{epoch + 1:04d}.png")
        rundir.save_checkpoint({
            "model": model.state_dict(), "optimizer": self.stepper.optimizer.state_dict(),
            "scheduler": self.stepper.scheduler.state_dict(), **rundir.rng_state(self.device), "state": state,
        }, self.run_dir)

    def finish(self) -> dict:
        """Write mae.pth (the MAE checkpoint layout ``medpeft train`` loads) and, last, metrics.json."""
        config, state, run_dir = self.config, self.state, self.run_dir
        buffer = io.BytesIO()
        torch.save({"model": self.model.mae_state_dict(), "epoch": state["epoch"]}, buffer)
        write_bytes_atomic(run_dir / MAE_CHECKPOINT, buffer.getvalue())
        metrics = {
            "model": config.model.name, "encoder_parameters": self.encoder_parameters,
            "epochs_run": state["epoch"], "steps": state["step"], "wall_time_s": time.perf_counter() - self.started,
            "split_sizes": {s: int((self.table["split"] == s).sum()) for s in ("train", "val")},
            "history": state["history"], "final_train_loss": state["history"][-1]["train_loss"],
            "final_val_loss": state["history"][-1]["val_loss"], "checkpoint": str(run_dir / MAE_CHECKPOINT),
        }
        write_json_atomic(run_dir / rundir.METRICS, metrics)
        (run_dir / rundir.CHECKPOINT).unlink(missing_ok=True)
        self.console.print(f"done: {run_dir / MAE_CHECKPOINT}; fine-tune it with model.name={config.model.name} "
                           f"model.weights={run_dir / MAE_CHECKPOINT} (same img_size and kwargs)")
        return metrics
