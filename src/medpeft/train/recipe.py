"""The training recipe, top to bottom: data, model, method, optimiser, loop, evaluation, run directory.

``train(config)`` resumes an interrupted run in the same output_dir from its last epoch checkpoint
and ends with the same metrics as an uninterrupted run (CPU, same seed): data order and augmentation
are seeded per epoch and sample, and the RNG state is checkpointed with the weights.
"""

from __future__ import annotations

import ctypes
import functools
import math
import platform
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medpeft import __version__
from medpeft.backbones import LoadReport, count_parameters, create_backbone
from medpeft.backbones.build import family
from medpeft.backbones.layers import use_onednn_linear
from medpeft.config import RunConfig, TrainConfig, dump_config, load_config
from medpeft.data.cache import ImageCache, build_cache
from medpeft.data.dataset import ImageDataset, build_transform
from medpeft.data.images import check_images
from medpeft.data.readers import read_dataset, read_split_dataset
from medpeft.errors import ConfigError, DataError, RunDirError, TrainingError
from medpeft.methods import MethodSpec, get_method, unwrap
from medpeft.methods.registry import (load_running_stats, load_trainable_state_dict, load_weights, running_stats,
                                     save_weights, trainable_state_dict)
from medpeft.metrics import classification_metrics
from medpeft.metrics.thresholds import YOUDEN, select_thresholds
from medpeft.train import rundir
from medpeft.train.prefix import HEAD, Suffix, frozen_prefix, prefix
from medpeft.train.recompute import apply_recompute
from medpeft.train.distributed import SINGLE, BatchPlan, Processes, check_launcher_precision, start, stop


# ----------------------------------------------------------------------------- data
def prepare_table(config: RunConfig) -> pd.DataFrame:
    """Read the dataset and its split, check every used image can be opened, check val can select a model."""
    table = check_images(read_split_dataset(config.data), config.data.on_missing, config.data.csv)
    val = table.loc[table["split"] == "val", config.data.labels].to_numpy()
    if not any(0 < np.nansum(column) < np.isfinite(column).sum() for column in val.T):
        raise DataError(f"{config.data.csv}: the validation split has no label with both classes; "
                        f"AUROC cannot select a model (more patients or a larger val_fraction?)")
    return table


def image_cache(table: pd.DataFrame, config: RunConfig, progress: bool = False) -> ImageCache | None:
    """The decode-once cache of the table's images at the training size, if data.cache_dir is set."""
    if not config.data.cache_dir:
        return None
    return build_cache(table["image_id"].tolist(), table["path"].tolist(), config.model.img_size,
                       config.data.cache_dir, workers=max(1, config.data.num_workers), progress=progress)


def make_loader(table: pd.DataFrame, split: str, config: RunConfig, train: bool,
                cache: ImageCache | None = None, procs: Processes = SINGLE,
                features: torch.Tensor | None = None) -> DataLoader:
    """This process's batches of one split: training takes its part of each shuffled global batch,
    evaluation its share of whole batches in dataset order (see ``BatchPlan``). With `features` (the
    split's cached frozen-prefix outputs, in table order), their batches instead of the images'."""
    rows = table[table["split"] == split]
    targets = rows[config.data.labels].to_numpy()
    if features is not None:
        dataset = TensorDataset(features, torch.tensor(targets, dtype=torch.float32))
    else:
        transform = build_transform(config.model.img_size, config.data.mean, config.data.std,
                                    config.augment if train else None)
        dataset = ImageDataset(rows["path"].tolist(), targets, transform, seed=config.train.seed,
                               random=train and config.augment.enabled, cache=cache,
                               image_ids=rows["image_id"].tolist())
    generator = torch.Generator()
    plan = BatchPlan(len(dataset), config.train.batch_size if train else config.train.eval_batch_size,
                     shuffle=train, generator=generator, procs=procs, split=train)
    return DataLoader(dataset, batch_sampler=plan, num_workers=config.data.num_workers, generator=generator,
                      pin_memory=torch.cuda.is_available())


# ----------------------------------------------------------------------------- model
@dataclass
class Built:
    model: nn.Module
    """The model to train and call (the method may wrap the backbone)."""
    spec: MethodSpec
    load_report: LoadReport | None
    backbone_parameters: int
    trainable_parameters: int


def build_model(config: RunConfig) -> Built:
    """Backbone with weights + the method applied. Seeds first: the new head's init is reproducible."""
    torch.manual_seed(config.train.seed)
    backbone, report = create_backbone(config.model, len(config.data.labels))
    _, backbone_parameters = count_parameters(backbone)
    spec = get_method(config.method.name)
    model = spec.apply(backbone, config.method).to(memory_format=memory_format(config))
    set_attention_kernel(model, config.train)
    use_onednn_linear(model)
    trainable, _ = count_parameters(model)
    return Built(model, spec, report, backbone_parameters, trainable)


def set_attention_kernel(model: nn.Module, cfg: TrainConfig) -> None:
    """Make timm's attention layers run as train.attention says. 'auto': torch's fused
    scaled_dot_product_attention, except under bf16 on the CPU, where torch's flash-attention kernel is
    3.8x slower (forward + backward, ViT-S shapes) than timm's matmul + softmax path (with
    reuse_freed_memory, bf16 ViT-S steps 1.3-1.5x faster: benchmarks/results/lora_costs_stock.md)."""
    fused = cfg.attention == "fused" or (
        cfg.attention == "auto" and not (cfg.precision == "bf16" and resolve_device(cfg.device).type == "cpu"))
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused


def memory_format(config: RunConfig) -> torch.memory_format:
    """Channels-last for CNNs (ResNet-50 train steps 1.1-1.5x faster on the CPU here; the layout GPUs'
    convolutions want), the default layout for ViTs."""
    return torch.channels_last if family(config.model.name) == "cnn" else torch.contiguous_format


def optimizer_steps(config: RunConfig, table: pd.DataFrame) -> int:
    """Optimiser steps of the whole run (the last batch of an epoch is kept, and ends an accumulation)."""
    batches = math.ceil(int((table["split"] == "train").sum()) / config.train.batch_size)
    return config.train.epochs * math.ceil(batches / config.train.grad_accum_steps)


def resolve_method(config: RunConfig, table: pd.DataFrame) -> RunConfig:
    """The config with what the method derives from the run filled in (e.g. AdaLoRA's step count)."""
    hooks = get_method(config.method.name).hooks
    if hooks is None:
        return config
    return replace(config, method=hooks.configure(config.method, optimizer_steps(config, table)))


def cached_prefix_end(model: nn.Module, config: RunConfig) -> int | None:
    """Where the cached frozen prefix ends (see medpeft.train.prefix), or None without train.frozen_prefix_cache."""
    if not config.train.frozen_prefix_cache:
        return None
    if config.augment.enabled:
        raise ConfigError("train.frozen_prefix_cache needs augment.enabled: false (an augmented image gives a "
                          "new prefix output every epoch)")
    return frozen_prefix(model)


def prefix_features(model: nn.Module, end: int, table: pd.DataFrame, config: RunConfig, device: torch.device,
                    cache: ImageCache | None, procs: Processes) -> dict[str, torch.Tensor]:
    """The frozen prefix's output for every image of each split (table order), computed once, in eval mode."""
    model.eval()
    return {split: gathered(lambda x: prefix(model, x, end).float(),
                            make_loader(table, split, config, train=False, cache=cache, procs=procs),
                            device, config, procs)[0]
            for split in ("train", "val", "test") if (table["split"] == split).any()}


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """timm's optimiser factory on the unwrapped timm model, over trainable parameters only: no weight
    decay for 1-D parameters (norms, biases) and the model's no_weight_decay() set (pos_embed,
    cls_token); layer-wise lr decay from the model's block structure (lr_scale per group). AdamW is fused
    (one kernel for all parameters: 4.7x faster steps than for-each for ViT-B on the CPU here)."""
    return create_optimizer_v2(
        unwrap(model), opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay,
        **({"momentum": cfg.momentum} if cfg.optimizer == "sgd" else {"fused": True}))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> CosineLRScheduler:
    """Per optimiser step: linear warmup from min_lr to lr, then cosine decay to min_lr."""
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    return CosineLRScheduler(
        optimizer, t_initial=max(1, cfg.epochs * steps_per_epoch - warmup_steps), lr_min=cfg.min_lr,
        warmup_t=warmup_steps, warmup_lr_init=cfg.min_lr, warmup_prefix=True, t_in_epochs=False)


def reuse_freed_memory() -> None:
    """Make this process keep the memory that tensors free, for the next step's tensors.

    glibc hands blocks above its mmap threshold, and the free top of its heap, back to the system as soon
    as they are freed, so on the CPU every training step faults its activations in again page by page.
    This serves blocks up to 32 MB (the largest threshold glibc accepts) from the heap and never trims
    it: once the heap holds a step, a step faults in nothing (ViT-S fp32: 0 page faults per step instead of
    ~190,000) and runs 1.01-1.05x faster with the same peak memory (benchmarks/results/lora_costs_stock.md);
    the memory returns to the system when the process ends. Does nothing where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    trim_threshold, mmap_threshold = -1, -3  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD of malloc.h
    libc.mallopt(mmap_threshold, 32 * 2**20)
    libc.mallopt(trim_threshold, 2**31 - 1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_bf16_matmul() -> bool:
    """Whether torch runs bf16 matmuls on this CPU natively (oneDNN: AVX-512 and up). Without it they are
    emulated: 0.84 against 75 GFLOP/s in fp32 (1024 x 1024, 2 threads of an AVX2 EPYC), a ViT-S step 110 s."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


EMULATED_BF16 = "this CPU has no bf16 matmul instructions (AVX-512 and up): torch emulates them, ~90x slower than fp32"


@functools.cache
def _warn_emulated_bf16() -> None:
    warnings.warn(f"train.precision 'bf16': {EMULATED_BF16}; use 'fp32'", stacklevel=3)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    if precision == "bf16" and device.type == "cpu" and not cpu_bf16_matmul():
        _warn_emulated_bf16()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def loss_function(task: str):
    if task == "multiclass":
        return lambda logits, targets: nn.functional.cross_entropy(logits, targets.argmax(1))
    return masked_bce


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the known targets; NaN (e.g. an ignored uncertain label) is left out."""
    known = ~torch.isnan(targets)
    if known.all():
        return nn.functional.binary_cross_entropy_with_logits(logits, targets)
    # An all-unknown batch still gives a graph, with zero gradient.
    return nn.functional.binary_cross_entropy_with_logits(logits[known], targets[known]) if known.any() \
        else logits.sum() * 0.0


def to_device(x: torch.Tensor, device: torch.device, layout: torch.memory_format) -> torch.Tensor:
    """A batch on the device; images (4-D) in the model's memory layout."""
    return x.to(device, non_blocking=True, memory_format=layout) if x.dim() == 4 else x.to(device, non_blocking=True)


@torch.no_grad()
def gathered(fn, loader: DataLoader, device: torch.device, config: RunConfig, procs: Processes = SINGLE):
    """``fn(batch)`` (on the CPU) and the targets over the whole dataset, in dataset order: each process
    computes its batches of the loader's plan and the outputs of all processes are gathered."""
    outputs, targets = [], []
    layout = memory_format(config)
    for x, y in loader:
        with autocast(device, config.train.precision):
            outputs.append(fn(to_device(x, device, layout)).cpu())
        targets.append(y)
    indices = [i for batch in loader.batch_sampler for i in batch]
    mine = (indices, torch.cat(outputs), torch.cat(targets)) if outputs else None
    parts = [part for part in procs.all_gather(mine) if part is not None]
    order = torch.from_numpy(np.argsort(np.concatenate([part[0] for part in parts]), kind="stable"))
    return torch.cat([part[1] for part in parts])[order], torch.cat([part[2] for part in parts])[order]


def predict(model: nn.Module, loader: DataLoader, device: torch.device, config: RunConfig,
            procs: Processes = SINGLE):
    """Probabilities (N, K) and targets (N, K) as numpy arrays over the whole dataset, in dataset order."""
    model.eval()
    logits, targets = gathered(lambda x: model(x).float(), loader, device, config, procs)
    probs = logits.softmax(1) if config.data.task == "multiclass" else logits.sigmoid()
    return probs.numpy(), targets.numpy()


def evaluate_split(model, table, split, config, device, cache: ImageCache | None = None,
                   predictions: list | None = None, procs: Processes = SINGLE, features: dict | None = None
                   ) -> dict | None:
    """Metrics of `model` on one split (None if the split is empty); with `predictions`, also append a
    frame of the split's per-image probabilities and targets to it. Under DDP, pass the unwrapped model;
    with `features` (cached frozen-prefix outputs per split), pass the model's Suffix."""
    if not (table["split"] == split).any():
        return None
    loader = make_loader(table, split, config, train=False, cache=cache, procs=procs,
                         features=features[split] if features else None)
    probs, targets = predict(model, loader, device, config, procs)
    if not np.isfinite(probs).all():
        raise TrainingError(f"{config.output_dir}: the model gives non-finite outputs on the {split} split: "
                            f"training diverged (lower train.lr; on GPU prefer bf16 to fp16)")
    if predictions is not None:
        labels = config.data.labels
        predictions.append(pd.concat([
            pd.DataFrame({"image_id": table.loc[table["split"] == split, "image_id"].to_numpy(), "split": split}),
            pd.DataFrame(probs, columns=[f"prob:{label}" for label in labels]),
            pd.DataFrame(targets, columns=[f"target:{label}" for label in labels])], axis=1))
    return classification_metrics(targets, probs, config.data.labels, config.data.task)


# ----------------------------------------------------------------------------- run directory
def _check_run_dir(run_dir: Path, config_text: str) -> dict | None:
    """Refuse a complete run or another run's folder; return the checkpoint of a run to resume."""
    if rundir.is_complete(run_dir):
        raise RunDirError(f"{run_dir}: the run is complete already ({rundir.METRICS} exists); "
                          f"choose another output_dir")
    config_path = run_dir / rundir.CONFIG
    if config_path.is_file():
        if yaml.safe_load(config_path.read_text()) != yaml.safe_load(config_text):  # key order aside
            raise RunDirError(f"{run_dir}: holds an unfinished run of another config; "
                              f"choose another output_dir or delete it")
        checkpoint = run_dir / rundir.CHECKPOINT
        return torch.load(checkpoint, map_location="cpu", weights_only=True) if checkpoint.is_file() else None
    if run_dir.exists() and any(run_dir.iterdir()):
        raise RunDirError(f"{run_dir}: exists and is not a medpeft run directory")
    return None


def _split_frame(table: pd.DataFrame) -> pd.DataFrame:
    return table[["image_id", "patient_id", "split"]].reset_index(drop=True)


def start_run_dir(run_dir: Path, config_text: str, table: pd.DataFrame, resuming: bool) -> None:
    """Write config.yaml and split.csv; a resumed run must see the split it started with."""
    run_dir.mkdir(parents=True, exist_ok=True)
    split_path = run_dir / rundir.SPLIT
    if resuming and not _split_frame(table).equals(pd.read_csv(split_path, dtype=str, keep_default_na=False)):
        raise RunDirError(f"{split_path}: the data no longer give the split this run started with")
    rundir.write_text_atomic(run_dir / rundir.CONFIG, config_text)
    rundir.write_text_atomic(split_path, _split_frame(table).to_csv(index=False))


def rng_state(device: torch.device, procs: Processes = SINGLE) -> dict:
    """The RNG states of every process, which a checkpoint keeps so that a resumed run draws what an
    uninterrupted one would (dropout, drop-path)."""
    mine = {"cpu": torch.get_rng_state(),
            **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}
    return {"rng": procs.all_gather(mine)}


def resumed_state(resume: dict, device: torch.device, run_dir: Path, console: Console,
                  procs: Processes = SINGLE) -> dict:
    """Restore this process's RNG states from a checkpoint, log the resume, return its loop state."""
    states = resume["rng"]
    if len(states) != procs.world:
        raise RunDirError(f"{run_dir / rundir.CHECKPOINT}: the run was started on {len(states)} processes; "
                          f"resume it on as many (--devices {len(states)})")
    torch.set_rng_state(states[procs.rank]["cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[procs.rank]["cuda"], device)
    if procs.main:
        rundir.append_log(run_dir, {"event": "resume", "epoch": resume["state"]["epoch"]})
    console.print(f"resuming {run_dir} at epoch {resume['state']['epoch'] + 1}")
    return resume["state"]


def begin_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Seed an epoch's shuffle and augmentation from (seed, epoch): a resumed run draws what an uninterrupted one would."""
    loader.dataset.epoch = epoch
    loader.generator.manual_seed(seed * 7919 + epoch)


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}  {task.fields[ips]:.0f} img/s"),
                    TimeElapsedColumn(), console=console, disable=not console.is_terminal)


# ----------------------------------------------------------------------------- the recipe
def train(config: RunConfig, quiet: bool = False) -> dict:
    """Fine-tune as `config` says, write the run directory, return its metrics (also in metrics.json).

    Started by a launcher (torchrun, accelerate launch, ``medpeft train --devices N``), every process
    runs this with torch DDP (see ``medpeft.train.distributed``); rank 0 alone writes and prints.
    """
    cfg = config.train
    check_launcher_precision(cfg.precision)
    reuse_freed_memory()
    procs, device = start(resolve_device(cfg.device))
    try:
        return _train(config, procs, device, Console(quiet=quiet or not procs.main))
    finally:
        stop(procs)


def _train(config: RunConfig, procs: Processes, device: torch.device, console: Console) -> dict:
    run_dir = Path(config.output_dir)
    table = prepare_table(config)
    config = resolve_method(config, table)
    config_text = dump_config(config)
    resume = _check_run_dir(run_dir, config_text)
    procs.barrier()  # every process has checked the folder before rank 0 writes into it
    cfg = config.train
    if cfg.batch_size < procs.world:
        raise ConfigError(f"train.batch_size {cfg.batch_size} is the global batch: it must be at least the "
                          f"number of processes ({procs.world})")

    built = build_model(config)
    model, spec = built.model, built.spec
    if built.load_report is not None:
        console.print(f"[dim]{built.load_report.summary()}[/dim]")
    percent = 100.0 * built.trainable_parameters / built.backbone_parameters
    console.print(f"{config.model.name} + {spec.name}: {built.trainable_parameters:,} trainable parameters "
                  f"({percent:.3f}% of {built.backbone_parameters:,})"
                  + (f", {procs.world} processes (DDP)" if procs.world > 1 else ""))

    apply_recompute(model, cfg.recompute)
    prefix_end = cached_prefix_end(model, config)
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.precision 'fp16' needs a CUDA device, not {device}; use 'bf16'")

    if procs.main:
        start_run_dir(run_dir, config_text, table, resuming=resume is not None)

    if procs.world > 1:
        torch.manual_seed(cfg.seed * 1009 + procs.rank)  # each process draws its own dropout
        if device.type == "cuda":  # batch statistics over the global batch, as in one process
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    cache = image_cache(table, config, progress=console.is_terminal)
    # What training calls: the model, or with a cached frozen prefix the rest of it on cached features.
    trained, features = model, None
    if prefix_end is not None:
        features = prefix_features(model, prefix_end, table, config, device, cache, procs)
        trained = Suffix(model, prefix_end)
        console.print(f"frozen prefix cached: {'pre-logits features' if prefix_end == HEAD else f'{prefix_end} blocks'}"
                      f", {sum(f.numel() * f.element_size() for f in features.values()) / 2**20:.0f} MB")
    train_loader = make_loader(table, "train", config, train=True, cache=cache, procs=procs,
                               features=features["train"] if features else None)
    plan = train_loader.batch_sampler
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, math.ceil(len(train_loader) / cfg.grad_accum_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    loss_fn = loss_function(config.data.task)
    layout = memory_format(config)
    hooks = spec.hooks

    state = {"epoch": 0, "step": 0, "best_score": -math.inf, "best_epoch": -1, "bad_epochs": 0,
             "stopped_early": False, "elapsed": 0.0}
    if resume is not None:
        load_trainable_state_dict(model, resume["trainable"], str(run_dir / rundir.CHECKPOINT))
        load_running_stats(model, resume["running_stats"], str(run_dir / rundir.CHECKPOINT))
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        if hooks is not None:
            hooks.load_state_dict(model, resume["method_state"])
        state = resumed_state(resume, device, run_dir, console, procs)
    # DDP averages the gradients of the trainable parameters (frozen ones are not synchronised).
    forward = trained if procs.world == 1 else nn.parallel.DistributedDataParallel(
        trained, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        forward = torch.compile(forward)

    started = time.perf_counter() - state["elapsed"]
    while state["epoch"] < cfg.epochs and not state["stopped_early"]:
        epoch = state["epoch"]
        begin_epoch(train_loader, cfg.seed, epoch)
        model.train()
        losses, seen, epoch_start = [], 0, time.perf_counter()
        with _progress(console) as progress:
            bar = progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(train_loader), loss=0.0, ips=0.0)
            for i, (x, y) in enumerate(train_loader):
                x, y = to_device(x, device, layout), y.to(device, non_blocking=True)
                stepping = (i + 1) % cfg.grad_accum_steps == 0 or i + 1 == len(train_loader)
                # This process's part of the global batch, weighted so that DDP's mean over processes
                # is the whole batch's mean loss (the weight is 1 in one process).
                mine, total = plan.share(i)
                with forward.no_sync() if procs.world > 1 and not stepping else nullcontext():
                    with autocast(device, cfg.precision):
                        logits = forward(x)
                    loss = loss_fn(logits.float(), y)
                    objective = loss * (mine * procs.world / total)
                    if hooks is not None:
                        objective = objective + hooks.loss(model)
                    scaler.scale(objective / cfg.grad_accum_steps).backward()
                # This process's share of the global batch's mean loss (summed over processes when logged).
                share = loss.item() * (mine / total)
                if stepping:
                    if cfg.grad_clip:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    if hooks is not None:
                        hooks.after_step(model, state["step"])
                    optimizer.zero_grad(set_to_none=True)
                    state["step"] += 1
                    scheduler.step_update(state["step"])
                    if state["step"] % cfg.log_every_steps == 0:
                        step_loss = procs.sum(share)  # every process reaches this step together
                        if procs.main:
                            rundir.append_log(run_dir, {
                                "event": "step", "epoch": epoch, "step": state["step"], "loss": step_loss,
                                "lr": optimizer.param_groups[0]["lr"],
                                "images_per_s": seen / (time.perf_counter() - epoch_start)})
                losses.append(share)
                seen += total
                progress.update(bar, advance=1, loss=procs.world * float(np.mean(losses[-20:])),
                                ips=seen / (time.perf_counter() - epoch_start))

        train_loss = procs.sum(float(np.sum(losses))) / len(losses)

        procs.broadcast_buffers(model)
        val = evaluate_split(trained, table, "val", config, device, cache, procs=procs, features=features)
        score = val["mean_auroc"]
        improved = score > state["best_score"]
        if improved:
            state.update(best_score=score, best_epoch=epoch, bad_epochs=0)
            if procs.main:
                with rundir.atomic_directory(run_dir / rundir.WEIGHTS) as tmp:
                    save_weights(spec, model, tmp)
        else:
            state["bad_epochs"] += 1
        patience = cfg.early_stopping_patience
        state["stopped_early"] = patience is not None and state["bad_epochs"] >= patience
        state["epoch"] = epoch + 1
        state["elapsed"] = time.perf_counter() - started
        epoch_time = time.perf_counter() - epoch_start
        console.print(f"epoch {epoch + 1}/{cfg.epochs}  loss {train_loss:.4f}  "
                      f"val AUROC {_fmt(val['mean_auroc'])}{'  *best' if improved else ''}  "
                      f"{seen / epoch_time:.0f} img/s  {epoch_time:.1f}s")
        rng = rng_state(device, procs)  # gathered from every process
        if procs.main:
            rundir.append_log(run_dir, {"event": "epoch", "epoch": epoch, "train_loss": train_loss,
                                        "val_mean_auroc": val["mean_auroc"], "val": val, "seconds": epoch_time})
            rundir.torch_save_atomic({
                "trainable": trainable_state_dict(model), "running_stats": running_stats(model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), **rng, "state": state,
                **({"method_state": hooks.state_dict(model)} if hooks is not None else {}),
            }, run_dir / rundir.CHECKPOINT)

    procs.barrier()  # the best weights are on disk (output_dir is on a filesystem all processes share)
    load_weights(spec, model, run_dir / rundir.WEIGHTS)
    predictions: list[pd.DataFrame] = []
    metrics = {
        "medpeft_version": __version__,
        "method": spec.name,
        "model": config.model.name,
        "labels": list(config.data.labels),
        "task": config.data.task,
        "parameters": {"trainable": built.trainable_parameters, "backbone": built.backbone_parameters,
                       "trainable_percent": percent},
        "processes": procs.world,
        "best_epoch": state["best_epoch"] + 1,
        "epochs_run": state["epoch"],
        "stopped_early": state["stopped_early"],
        "wall_time_s": time.perf_counter() - started,
        "split_sizes": {s: int((table["split"] == s).sum()) for s in ("train", "val", "test")},
        "val": evaluate_split(trained, table, "val", config, device, cache, predictions, procs, features),
        "test": evaluate_split(trained, table, "test", config, device, cache, predictions, procs, features),
    }
    if procs.main:
        rundir.write_text_atomic(run_dir / rundir.PREDICTIONS, pd.concat(predictions).to_csv(index=False))
        rundir.write_json_atomic(run_dir / rundir.THRESHOLDS, decision_rule(predictions[0], config))
        rundir.write_json_atomic(run_dir / rundir.METRICS, metrics)
        (run_dir / rundir.CHECKPOINT).unlink(missing_ok=True)
    procs.barrier()  # the run is complete for every process
    console.print(f"done: val AUROC {_fmt(metrics['val']['mean_auroc'])}, test AUROC "
                  f"{_fmt(metrics['test']['mean_auroc'] if metrics['test'] else None)} -> {run_dir}")
    return metrics


def decision_rule(val: pd.DataFrame, config: RunConfig) -> dict:
    """What turns probabilities into decisions, chosen on the val predictions: arg-max for a multiclass
    task, else a per-label threshold by Youden's J."""
    if config.data.task == "multiclass":
        return {"rule": "argmax", "thresholds": None}
    return {"rule": YOUDEN, "thresholds": val_thresholds(val, list(config.data.labels), YOUDEN)}


def val_thresholds(val: pd.DataFrame, labels: list[str], rule: str) -> dict:
    """Per-label thresholds by `rule` from val rows of predictions.csv (prob:LABEL, target:LABEL columns)."""
    return select_thresholds(val[[f"target:{label}" for label in labels]].to_numpy(dtype=float),
                             val[[f"prob:{label}" for label in labels]].to_numpy(dtype=float), labels, rule)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# ----------------------------------------------------------------------------- a finished run
def check_finished(run_dir: Path) -> RunConfig:
    """The config of a complete run of this medpeft (or an older one); refuse any other folder."""
    from packaging.version import Version

    from medpeft import __version__

    if not (run_dir / rundir.CONFIG).is_file():
        raise RunDirError(f"{run_dir}: not a medpeft run directory (no {rundir.CONFIG})")
    if not rundir.is_complete(run_dir):
        raise RunDirError(f"{run_dir}: the run is incomplete (no {rundir.METRICS}); resume it with medpeft train")
    metrics = rundir.read_json(run_dir / rundir.METRICS)
    written_by = metrics.get("medpeft_version", "0")
    if Version(written_by) > Version(__version__):
        raise RunDirError(f"{run_dir}: written by medpeft {written_by}, newer than this medpeft {__version__}; "
                          f"upgrade medpeft to use it")
    config = load_config(run_dir / rundir.CONFIG)
    labels = list(config.data.labels)
    if labels != metrics["labels"]:
        raise RunDirError(f"{run_dir}: {rundir.CONFIG} names the labels {labels}, but the run was trained for "
                          f"{metrics['labels']} ({rundir.METRICS})")
    return config


def load_model(run_dir: str | Path) -> tuple[RunConfig, Built]:
    """The config of a finished run and its model with the best weights (eval mode, on the CPU)."""
    run_dir = Path(run_dir)
    config = check_finished(run_dir)
    built = build_model(config)
    load_weights(built.spec, built.model, run_dir / rundir.WEIGHTS)
    built.model.eval()
    return config, built


def run_table(run_dir: Path, config: RunConfig) -> pd.DataFrame:
    """The run's dataset with the run's own split (split.csv)."""
    table = read_dataset(config.data).drop(columns="split", errors="ignore")
    saved = pd.read_csv(run_dir / rundir.SPLIT, dtype=str, keep_default_na=False)
    table = table.merge(saved[["image_id", "split"]], on="image_id", how="inner")
    if len(table) != len(saved):
        raise DataError(f"{config.data.csv}: lacks {len(saved) - len(table)} images of the run's split "
                        f"({run_dir / rundir.SPLIT})")
    return table


def evaluate(run_dir: str | Path, split: str = "test") -> dict:
    """Metrics of a finished run's best weights on one split of its own data split (on every process
    of a launcher, each computing its share of the images)."""
    config, built = load_model(run_dir)
    table = run_table(Path(run_dir), config)
    reuse_freed_memory()
    procs, device = start(resolve_device(config.train.device))
    try:
        metrics = evaluate_split(built.model.to(device), table, split, config, device, image_cache(table, config),
                                 procs=procs)
    finally:
        stop(procs)
    if metrics is None:
        raise DataError(f"{run_dir}: the run's '{split}' split is empty")
    return metrics
