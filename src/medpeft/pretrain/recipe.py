"""``medpeft pretrain``: masked-autoencoder pretraining of a timm ViT on unlabelled images.

The run directory is laid out like a fine-tuning run's (config.yaml, split.csv, log.jsonl, checkpoint.pt
for resume, metrics.json written last) plus:

    mae.pth      {'model': encoder + decoder keys, 'epoch': n}: the MAE checkpoint layout, loaded by
                 ``medpeft train`` with model.weights=<run>/mae.pth exactly like an MRM / medical MAE file
    previews/    epoch-NNNN.png: original / masked / reconstruction / reconstruction + visible patches

Trains on the 'train' split, reports the reconstruction loss on 'val' (hidden patches fixed by a seeded
generator, so epochs are comparable) and never reads 'test': with the same data.split as the later
fine-tuning runs, their test images stay unseen. Resuming gives the same weights as an uninterrupted run
on CPU (seeded per-sample augmentation, RNG state checkpointed).
"""

from __future__ import annotations

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

from medpeft.backbones import create_backbone
from medpeft.backbones.layers import use_onednn_linear
from medpeft.config import PretrainConfig, dump_config
from medpeft.data.images import check_images
from medpeft.data.readers import read_split_dataset
from medpeft.errors import DataError, TrainingError
from medpeft.pretrain.mae import MaskedAutoencoder
from medpeft.train import rundir
from medpeft.train.recipe import (
    _check_run_dir, _progress, autocast, begin_epoch, build_scheduler, image_cache, make_loader, resolve_device, resumed_state,
    reuse_freed_memory, rng_state, set_attention_kernel, start_run_dir)

MAE_CHECKPOINT = "mae.pth"
PREVIEWS = "previews"


def build_mae(config: PretrainConfig) -> MaskedAutoencoder:
    """The encoder as ``medpeft train`` will build it (no head, final norm kept) inside an MAE."""
    torch.manual_seed(config.train.seed)
    model_config = replace(config.model, global_pool="", kwargs={**config.model.kwargs, "fc_norm": False})
    encoder, report = create_backbone(model_config, num_classes=0)
    model = MaskedAutoencoder(encoder, config.mae, fixed_pos_embed=report is None)
    set_attention_kernel(model, config.train)
    use_onednn_linear(model)
    return model


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
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(rows).save(tmp, format="PNG")
    tmp.replace(path)


def prepare_table(config: PretrainConfig) -> pd.DataFrame:
    table = check_images(read_split_dataset(config.data), config.data.on_missing, config.data.csv)
    table = table[table["split"] != "test"].reset_index(drop=True)
    if not (table["split"] == "train").any():
        raise DataError(f"{config.data.csv}: no training images to pretrain on")
    return table


def pretrain(config: PretrainConfig, quiet: bool = False) -> dict:
    """Pretrain as `config` says, write the run directory, return its metrics (also in metrics.json)."""
    console = Console(quiet=quiet)
    run_dir = Path(config.output_dir)
    table = prepare_table(config)
    config_text = dump_config(config)
    resume = _check_run_dir(run_dir, config_text)
    cfg = config.train

    reuse_freed_memory()
    model = build_mae(config)
    encoder_parameters = sum(p.numel() for p in model.encoder.parameters())
    console.print(f"MAE pretraining of {config.model.name} ({encoder_parameters:,} encoder parameters), "
                  f"mask ratio {config.mae.mask_ratio}, {int((table['split'] == 'train').sum()):,} images")
    device = resolve_device(cfg.device)
    start_run_dir(run_dir, config_text, table, resuming=resume is not None)

    model.to(device)
    cache = image_cache(table, config, progress=console.is_terminal)
    train_loader = make_loader(table, "train", config, train=True, cache=cache)
    has_val = (table["split"] == "val").any()
    val_loader = make_loader(table, "val", config, train=False, cache=cache) if has_val else None
    preview_split = "val" if has_val else "train"
    preview_rows = table[table["split"] == preview_split].drop_duplicates("patient_id")  # one image per patient
    preview_loader = make_loader(preview_rows.head(config.mae.preview_images), preview_split, config,
                                 train=False, cache=cache)
    preview_images = next(iter(preview_loader))[0].to(device)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    betas=tuple(config.mae.adam_betas), fused=True)
    scheduler = build_scheduler(optimizer, cfg, math.ceil(len(train_loader) / cfg.grad_accum_steps))

    state = {"epoch": 0, "step": 0, "elapsed": 0.0, "history": []}
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        state = resumed_state(resume, device, run_dir, console)

    started = time.perf_counter() - state["elapsed"]
    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        begin_epoch(train_loader, cfg.seed, epoch)
        model.train()
        losses, seen, epoch_start = [], 0, time.perf_counter()
        with _progress(console) as progress:
            bar = progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(train_loader), loss=0.0, ips=0.0)
            for i, (x, _) in enumerate(train_loader):
                x = x.to(device, non_blocking=True)
                with autocast(device, cfg.precision):
                    loss, _, _ = model(x, config.mae.mask_ratio)
                if not torch.isfinite(loss):
                    raise TrainingError(f"{run_dir}: the reconstruction loss became {loss.item()} at epoch "
                                        f"{epoch + 1}: training diverged (lower train.lr)")
                (loss / cfg.grad_accum_steps).backward()
                if (i + 1) % cfg.grad_accum_steps == 0 or i + 1 == len(train_loader):
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                       cfg.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    state["step"] += 1
                    scheduler.step_update(state["step"])
                    if state["step"] % cfg.log_every_steps == 0:
                        rundir.append_log(run_dir, {"event": "step", "epoch": epoch, "step": state["step"],
                                                    "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]})
                losses.append(loss.item())
                seen += len(x)
                progress.update(bar, advance=1, loss=float(np.mean(losses[-20:])),
                                ips=seen / (time.perf_counter() - epoch_start))

        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
                  "val_loss": validation_loss(model, val_loader, config, device) if has_val else None}
        state["history"].append(record)
        state["epoch"] = epoch + 1
        state["elapsed"] = time.perf_counter() - started
        epoch_time = time.perf_counter() - epoch_start
        rundir.append_log(run_dir, {"event": "epoch", **record, "seconds": epoch_time})
        val_text = f"  val loss {record['val_loss']:.4f}" if has_val else ""
        console.print(f"epoch {epoch + 1}/{cfg.epochs}  loss {record['train_loss']:.4f}{val_text}  "
                      f"{seen / epoch_time:.0f} img/s  {epoch_time:.1f}s")
        every = config.mae.preview_every
        if every and ((epoch + 1) % every == 0 or epoch + 1 == cfg.epochs):
            write_preview(model, preview_images, config, run_dir / PREVIEWS / f"epoch-{epoch + 1:04d}.png")
        rundir.torch_save_atomic({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), **rng_state(device), "state": state,
        }, run_dir / rundir.CHECKPOINT)

    rundir.torch_save_atomic({"model": model.mae_state_dict(), "epoch": state["epoch"]}, run_dir / MAE_CHECKPOINT)
    metrics = {
        "model": config.model.name,
        "encoder_parameters": encoder_parameters,
        "epochs_run": state["epoch"],
        "steps": state["step"],
        "wall_time_s": time.perf_counter() - started,
        "split_sizes": {s: int((table["split"] == s).sum()) for s in ("train", "val")},
        "history": state["history"],
        "final_train_loss": state["history"][-1]["train_loss"],
        "final_val_loss": state["history"][-1]["val_loss"],
        "checkpoint": str(run_dir / MAE_CHECKPOINT),
    }
    rundir.write_json_atomic(run_dir / rundir.METRICS, metrics)
    (run_dir / rundir.CHECKPOINT).unlink(missing_ok=True)
    console.print(f"done: {run_dir / MAE_CHECKPOINT}; fine-tune it with model.name={config.model.name} "
                  f"model.weights={run_dir / MAE_CHECKPOINT} (same img_size and kwargs)")
    return metrics
