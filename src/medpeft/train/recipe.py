"""``medpeft train``: fine-tune a backbone with a method, as one recipe read top to bottom.

    recipe = FineTune(config, procs, device, console)
    recipe.setup()            # data and split, run directory (or the checkpoint to resume), model, optimiser
    recipe.train()            # the epochs: the shared loop (medpeft.engine.loop), validation, best weights
    metrics = recipe.finish() # the best weights on val and test: predictions, thresholds, calibration, metrics

An interrupted run resumes in the same output_dir from its last epoch checkpoint and ends with the same
metrics as an uninterrupted run (CPU, same seed): data order and augmentation are seeded per epoch and
sample, and the RNG state is checkpointed with the weights.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from rich.console import Console
from torch import nn

from medpeft import accel
from medpeft.config import RunConfig, dump_config
from medpeft.engine import rundir
from medpeft.engine.assemble import build_model
from medpeft.engine.distributed import Processes
from medpeft.engine.evaluation import (
    evaluate_split,
    fit_calibration,
    prediction_rows,
    split_metrics,
    split_outputs,
)
from medpeft.engine.loaders import image_cache, make_loader, to_device
from medpeft.engine.loop import Stepper, begin_epoch, build_scheduler, run_epoch
from medpeft.engine.runtime import autocast, session
from medpeft.errors import ConfigError, RunDirError
from medpeft.files import atomic_directory, locked, write_json_atomic, write_text_atomic
from medpeft.methods.registry import (load_running_stats, load_trainable_state_dict, load_weights, running_stats,
                                     save_weights, trainable_state_dict)
from medpeft.metrics.display import format_score
from medpeft.train.components import (build_optimizer, decision_rule, loss_function, prefix_features,
                                      prepare_table, resolve_method)
from medpeft.train.prefix import HEAD, Suffix, frozen_prefix
from medpeft.train.recompute import apply_recompute
from medpeft.version import __version__

OnEpoch = Callable[[int, float], None]
"""Called after an epoch's validation: (epoch, 0-based; val mean AUROC)."""


def train(config: RunConfig, quiet: bool = False, on_epoch: OnEpoch | None = None) -> dict:
    """Fine-tune as `config` says, write the run directory, return its metrics (also in metrics.json).

    Started by a launcher (torchrun, accelerate launch, ``medpeft train --devices N``), every process
    runs this with torch DDP (see ``medpeft.engine.distributed``); rank 0 alone writes and prints, and
    holds the run directory's lock throughout (another process training there is refused).
    `on_epoch` is called on rank 0 after each validated epoch's checkpoint (every ``train.eval_every``-th
    and the last), with the epoch (0-based) and its val mean AUROC; an exception it raises stops the run
    there, resumable (medpeft.train.tune).
    """
    with (session(config.train) as (procs, device),
          locked(config.output_dir, RunDirError) if procs.main else nullcontext()):
        recipe = FineTune(config, procs, device, Console(quiet=quiet or not procs.main), on_epoch)
        recipe.setup()
        recipe.train()
        return recipe.finish()


class FineTune:
    """The fine-tuning recipe for one process (one of several under DDP)."""

    def __init__(self, config: RunConfig, procs: Processes, device: torch.device, console: Console,
                 on_epoch: OnEpoch | None = None):
        self.config, self.procs, self.device, self.console = config, procs, device, console
        self.on_epoch = on_epoch
        self.run_dir = Path(config.output_dir)

    # ------------------------------------------------------------------------- setup
    def setup(self) -> None:
        config, procs = self.config, self.procs
        self.table = prepare_table(config, procs, progress=self.console.is_terminal)
        self.config = config = resolve_method(config, self.table)
        checkpoint = rundir.check_run_dir(self.run_dir, config)
        procs.barrier()  # every process has checked the folder before rank 0 writes into it
        if config.train.batch_size < procs.world:
            raise ConfigError(f"train.batch_size {config.train.batch_size} is the global batch: it must be at "
                              f"least the number of processes ({procs.world})")
        self.built = build_model(config)
        self.model = model = self.built.model
        self._announce()
        apply_recompute(model, config.train.recompute)
        prefix_end = frozen_prefix(model) if config.train.frozen_prefix_cache else None
        if procs.main:
            rundir.start_run_dir(self.run_dir, dump_config(config), self.table, checkpoint)
        if procs.world > 1:
            torch.manual_seed(config.train.seed * 1009 + procs.rank)  # each process draws its own dropout
            if self.device.type == "cuda":  # batch statistics over the global batch, as in one process
                self.model = model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.device)
        self.cache = image_cache(self.table, config, progress=self.console.is_terminal)
        self._setup_prefix_cache(prefix_end)
        self.train_loader = make_loader(self.table, "train", config, train=True, cache=self.cache, procs=procs,
                                        features=self.features["train"] if self.features else None)
        self._setup_optimisation()
        self.state = self._resume(checkpoint) if checkpoint is not None else {
            "epoch": 0, "step": 0, "best_score": -math.inf, "best_epoch": -1, "bad_epochs": 0,
            "stopped_early": False, "elapsed": 0.0}
        # DDP averages the gradients of the trainable parameters (frozen ones are not synchronised).
        self.forward = self.trained if procs.world == 1 else nn.parallel.DistributedDataParallel(
            self.trained, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if config.train.compile:
            self.forward = torch.compile(self.forward)

    def _announce(self) -> None:
        built, config = self.built, self.config
        if built.load_report is not None:
            self.console.print(f"[dim]{built.load_report.summary()}[/dim]")
        self.console.print(f"{config.model.name} + {built.spec.name}: {built.trainable_parameters:,} trainable "
                           f"parameters ({built.trainable_percent:.3f}% of {built.backbone_parameters:,})"
                           + (f", {self.procs.world} processes (DDP)" if self.procs.world > 1 else ""))

    def _setup_prefix_cache(self, end: int | None) -> None:
        """What training calls: the model, or with a cached frozen prefix the rest of it on cached features."""
        self.trained, self.features = self.model, None
        if end is None:
            return
        self.features = prefix_features(self.model, end, self.table, self.config, self.device, self.cache,
                                        self.procs)
        self.trained = Suffix(self.model, end)
        size = sum(f.numel() * f.element_size() for f in self.features.values()) / 2**20
        self.console.print(f"frozen prefix cached: {'pre-logits features' if end == HEAD else f'{end} blocks'}, "
                           f"{size:.0f} MB")

    def _setup_optimisation(self) -> None:
        cfg, hooks = self.config.train, self.built.spec.hooks
        self.optimizer = build_optimizer(self.model, cfg)
        scheduler = build_scheduler(self.optimizer, cfg, math.ceil(len(self.train_loader) / cfg.grad_accum_steps))
        self.stepper = Stepper(
            self.optimizer, scheduler, cfg, [p for p in self.model.parameters() if p.requires_grad],
            scaler=torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16"),
            after_step=None if hooks is None else lambda step: hooks.after_step(self.model, step))
        self.loss_fn = loss_function(self.config.data.task)
        self.layout = accel.memory_format(self.config.model.family, cfg)

    def _resume(self, checkpoint: dict) -> dict:
        """Load a checkpoint's trained weights and optimiser, scheduler, scaler, method and RNG states."""
        source, hooks = str(self.run_dir / rundir.CHECKPOINT), self.built.spec.hooks
        load_trainable_state_dict(self.model, checkpoint["trainable"], source)
        load_running_stats(self.model, checkpoint["running_stats"], source)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.stepper.scheduler.load_state_dict(checkpoint["scheduler"])
        self.stepper.scaler.load_state_dict(checkpoint["scaler"])
        if hooks is not None:
            hooks.load_state_dict(self.model, checkpoint["method_state"])
        rundir.restore_rng(checkpoint, self.device, self.run_dir, self.procs)
        self.console.print(f"resuming {self.run_dir} at epoch {checkpoint['state']['epoch'] + 1}")
        return checkpoint["state"]

    # ------------------------------------------------------------------------- the epochs
    def train(self) -> None:
        cfg, state = self.config.train, self.state
        self.started = time.perf_counter() - state["elapsed"]
        while state["epoch"] < cfg.epochs and not state["stopped_early"]:
            self._epoch(state["epoch"])

    def _batch_loss(self, i: int, batch) -> tuple[torch.Tensor, float, int]:
        x, y = to_device(batch[0], self.device, self.layout), batch[1].to(self.device, non_blocking=True)
        # This process's part of the global batch, weighted so that DDP's mean over processes is the whole
        # batch's mean loss (the weight is 1 in one process).
        mine, total = self.train_loader.batch_sampler.share(i)
        with autocast(self.device, self.config.train.precision):
            logits = self.forward(x)
        loss = self.loss_fn(logits.float(), y)
        objective = loss * (mine * self.procs.world / total)
        hooks = self.built.spec.hooks
        if hooks is not None:
            objective = objective + hooks.loss(self.model)
        return objective, loss.item() * (mine / total), total

    def _epoch(self, epoch: int) -> None:
        cfg, state, procs = self.config.train, self.state, self.procs
        begin_epoch(self.train_loader, cfg.seed, epoch)
        self.model.train()
        train_loss, seen, seconds = run_epoch(
            self.train_loader, epoch, self._batch_loss, self.stepper, state, self.run_dir, self.console, procs,
            no_sync=self.forward.no_sync if procs.world > 1 else None)
        procs.broadcast_buffers(self.model)
        validated = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
        val = evaluate_split(self.trained, self.table, "val", self.config, self.device, self.cache, procs=procs,
                             features=self.features) if validated else None
        improved = validated and val["mean_auroc"] > state["best_score"]
        if improved:
            state.update(best_score=val["mean_auroc"], best_epoch=epoch, bad_epochs=0)
            if procs.main:
                with atomic_directory(self.run_dir / rundir.WEIGHTS) as tmp:
                    save_weights(self.built.spec, self.model, tmp)
        elif validated:
            state["bad_epochs"] += 1  # validations without improvement
        patience = cfg.early_stopping_patience
        state.update(stopped_early=patience is not None and state["bad_epochs"] >= patience, epoch=epoch + 1,
                     elapsed=time.perf_counter() - self.started)
        shown = f"  val AUROC {format_score(val['mean_auroc'])}{'  *best' if improved else ''}" if validated else ""
        self.console.print(f"epoch {epoch + 1}/{cfg.epochs}  loss {train_loss:.4f}{shown}  "
                           f"{seen / seconds:.0f} img/s  {seconds:.1f}s")
        rng = rundir.rng_state(self.device, procs)  # gathered from every process
        if procs.main:
            record = {"val_mean_auroc": val["mean_auroc"], "val": val} if validated else {}
            rundir.append_log(self.run_dir, {"event": "epoch", "epoch": epoch, "train_loss": train_loss,
                                             **record, "seconds": seconds})
            self._save_checkpoint(rng)
            if self.on_epoch is not None and validated:
                self.on_epoch(epoch, val["mean_auroc"])

    def _save_checkpoint(self, rng: dict) -> None:
        hooks, stepper = self.built.spec.hooks, self.stepper
        rundir.save_checkpoint({
            "trainable": trainable_state_dict(self.model), "running_stats": running_stats(self.model),
            "optimizer": self.optimizer.state_dict(), "scheduler": stepper.scheduler.state_dict(),
            "scaler": stepper.scaler.state_dict(), **rng, "state": self.state,
            **({"method_state": hooks.state_dict(self.model)} if hooks is not None else {}),
        }, self.run_dir)

    # ------------------------------------------------------------------------- finish
    def finish(self) -> dict:
        """Evaluate the best weights, fit temperature scaling on val, write predictions.csv, thresholds.json,
        calibration.json and (last) metrics.json (with calibration and subgroup results)."""
        config, procs, state, built = self.config, self.procs, self.state, self.built
        procs.barrier()  # the best weights are on disk (output_dir is on a filesystem all processes share)
        load_weights(built.spec, self.model, self.run_dir / rundir.WEIGHTS)
        outputs = {split: split_outputs(self.trained, self.table, split, config, self.device, self.cache, procs,
                                        self.features) for split in ("val", "test")}
        temperatures, calibration = fit_calibration(outputs["val"], config)
        evaluated = {split: out and split_metrics(out, config, temperatures, evidence=True)
                     for split, out in outputs.items()}
        predictions = [prediction_rows(out, config) for out in outputs.values() if out is not None]
        metrics = {
            "medpeft_version": __version__, "method": built.spec.name, "model": config.model.name,
            "labels": list(config.data.labels), "task": config.data.task,
            "parameters": {"trainable": built.trainable_parameters, "backbone": built.backbone_parameters,
                           "trainable_percent": built.trainable_percent},
            "processes": procs.world, "best_epoch": state["best_epoch"] + 1, "epochs_run": state["epoch"],
            "stopped_early": state["stopped_early"], "wall_time_s": time.perf_counter() - self.started,
            "split_sizes": {s: int((self.table["split"] == s).sum()) for s in ("train", "val", "test")},
            **evaluated,
        }
        if procs.main:
            write_text_atomic(self.run_dir / rundir.PREDICTIONS, pd.concat(predictions).to_csv(index=False))
            write_json_atomic(self.run_dir / rundir.THRESHOLDS, decision_rule(predictions[0], config))
            write_json_atomic(self.run_dir / rundir.CALIBRATION, calibration)
            write_json_atomic(self.run_dir / rundir.METRICS, metrics)
            (self.run_dir / rundir.CHECKPOINT).unlink(missing_ok=True)
        procs.barrier()  # the run is complete for every process
        test = metrics["test"]["mean_auroc"] if metrics["test"] else None
        self.console.print(f"done: val AUROC {format_score(metrics['val']['mean_auroc'])}, test AUROC "
                           f"{format_score(test)} -> {self.run_dir}")
        return metrics
