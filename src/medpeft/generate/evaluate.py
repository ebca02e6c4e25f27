"""``medpeft generate evaluate``: how good, how diverse, how faithful to their prompts and how much copied
a generate run's images are, measured with a chest X-ray model the user names: a finished medpeft
classification run (its backbone gives the features, its head the label scores) or an MAE pretraining run
(its encoder gives the features; no label scores).

1. For each real test image (or `n` of them, drawn with `seed`), one image is generated from its prompt (so
   the generated set has the test set's findings), batch i seeded with seed + i.
2. Real train and test images are read at the generator's resolution, like the generated ones; all go to
   the classifier at its input size and normalisation (grey repeated to its channels).
3. Features: FID, KID, precision / recall of generated vs real test; memorisation against the real
   training images (threshold: the real test images' own distances). Label fidelity: the classifier's
   AUROC on the generated images against the findings their prompts named (labels both runs have, by
   name), beside its AUROC on the real test images.

Writes ``RUN/evaluations/generated/metrics.json`` (atomically) and returns it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medpeft.data import read_split_dataset
from medpeft.engine import rundir
from medpeft.engine.assemble import load_model
from medpeft.engine.loaders import make_loader
from medpeft.errors import ConfigError
from medpeft.files import write_json_atomic
from medpeft.generate.config import EVALUATION
from medpeft.generate.metrics import fid, kid, memorisation, precision_recall
from medpeft.generate.runs import load_run
from medpeft.generate.sample import sample
from medpeft.generate.train import loader_view, prompts_of
from medpeft.methods.registry import unwrap
from medpeft.metrics.classification import auroc
from medpeft.pretrain import MAE_CHECKPOINT



class Extractor:
    """A feature extractor and label scorer from a finished run: images (N, C, H, W) in [0, 1] at any size ->
    (features (N, D), label probabilities (N, K), or None). A classification run gives its backbone's
    pooled features and its head's probabilities; an MAE pretraining run (``medpeft pretrain``) its
    encoder's average-pooled features only."""

    def __init__(self, run_dir: str | Path):
        from dataclasses import replace

        run_dir = Path(run_dir)
        mae = run_dir / MAE_CHECKPOINT
        if mae.is_file():
            from medpeft.backbones import create_backbone
            from medpeft.config import PretrainConfig, build

            config = build(PretrainConfig, {**rundir.saved_config(run_dir), "output_dir": str(run_dir)})
            self.model = create_backbone(replace(config.model, weights=str(mae), global_pool="avg"), 0)[0].eval()
            self.labels, self.task = [], None
        else:
            config = rundir.finished_config(run_dir)
            self.model = load_model(run_dir, config).model
            self.labels, self.task = list(config.data.labels), config.data.task
        self.size = config.model.img_size
        self.mean = torch.tensor(config.data.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(config.data.std).view(1, -1, 1, 1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray | None]:
        timm_model, features, probs = unwrap(self.model), [], []
        for batch in images.split(batch_size):
            x = F.interpolate(batch.float(), size=(self.size, self.size), mode="bilinear", antialias=True,
                              align_corners=False).clamp(0, 1)
            x = (x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x) - self.mean
            pooled = timm_model.forward_head(timm_model.forward_features(x / self.std), pre_logits=True)
            features.append(pooled)
            if self.task is not None:
                logits = timm_model.get_classifier()(pooled)
                probs.append(logits.softmax(1) if self.task == "multiclass" else logits.sigmoid())
        return torch.cat(features).numpy(), torch.cat(probs).numpy() if probs else None


def real_images(config, table, split: str, size: int) -> torch.Tensor:
    """The split's images at the generator's side, in [0, 1], in table order (no augmentation)."""
    view = loader_view(config, size)
    rows = table[table["split"] == split]
    loader = make_loader(table, split, view, train=False, targets=np.zeros((len(rows), 1)))
    return torch.cat([x for x, _ in loader]) * 0.5 + 0.5


def generate_evaluate(run_dir: str | Path, extractor: str | Path, n: int | None = None, steps: int = 50,
                      guidance: float = 7.5, seed: int = 0, batch_size: int = 32) -> dict:
    run_dir = Path(run_dir)
    config, model = load_run(run_dir)
    for module in model.modules().values():
        module.eval()
    table = read_split_dataset(config.data)
    test = table[table["split"] == "test"]
    if test.empty:
        raise ConfigError(f"{run_dir}: its data have no test images to compare the generated images with")
    all_test = test
    if n is not None and n < len(test):  # a seeded sample: the file order may group the findings
        test = test.sample(n=n, random_state=seed).sort_index()
    chosen = all_test.index.get_indexer(test.index)
    prompts = prompts_of(test, config)
    generated = torch.cat([sample(model, prompts[i:i + batch_size], steps=steps, guidance=guidance,
                                  seed=seed + i // batch_size) for i in range(0, len(prompts), batch_size)])
    judge = Extractor(extractor)
    size = model.image_size
    real_test = real_images(config, table, "test", size)[torch.from_numpy(chosen)]
    features_g, probs_g = judge(generated)
    features_t, probs_t = judge(real_test)
    features_train, _ = judge(real_images(config, table, "train", size))

    distance = fid(features_t, features_g)
    kid_mean, kid_std = kid(features_t, features_g)
    precision, recall = precision_recall(features_t, features_g)
    result = {"run": str(run_dir), "extractor": str(extractor), "images": len(generated),
              "sampler": {"steps": steps, "guidance": guidance, "seed": seed},
              "fid": distance, "kid": kid_mean, "kid_std": kid_std, "precision": precision, "recall": recall,
              **memorisation(features_train, features_g, features_t, distance),
              "label_fidelity": _fidelity(test, config, judge.labels, probs_g, probs_t)}
    folder = run_dir / rundir.EVALUATIONS / EVALUATION
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / rundir.METRICS, result)
    return result


def _fidelity(test, config, judged: list[str], generated, real) -> dict | None:
    """Per label both runs have: the classifier's AUROC on generated images vs the prompted findings, and on
    the real test images vs their labels (the ceiling); None with prompts from a text column or an extractor
    without labels."""
    if config.prompt.column is not None or generated is None:
        return None
    shared = [label for label in config.data.labels if label in judged]
    per_label = {}
    for label in shared:
        y = test[label].to_numpy(dtype=float)
        j = judged.index(label)
        per_label[label] = {"generated": auroc(y, generated[:, j]), "real": auroc(y, real[:, j])}
    values = [v["generated"] for v in per_label.values() if v["generated"] is not None]
    return {"labels": per_label, "mean_generated": float(np.mean(values)) if values else None}
