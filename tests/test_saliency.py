"""Grad-CAM saliency: on a CNN trained to find phantom nodules the map peaks on the nodule; CNN maps are CAM;
ViT maps (through LoRA, with VPT prompts) peak on the learned square; overlay files and their table, forced
labels, unreadable inputs, multiclass; no hook, gradient or requires_grad change left behind."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import THREADS
from PIL import Image
from torch import nn

import medpeft
from medpeft.config import config_from_dict
from medpeft.data.images import load_grayscale
from medpeft.data.phantoms import generate_phantoms
from medpeft.errors import ConfigError
from medpeft.inference import UnreadableInputWarning
from medpeft.inference.saliency import saliency_map, target_layer, upsample
from medpeft.methods.registry import unwrap

SIZE = 128
"""Phantom and input size: at 128 px a nodule (radius 2 to 3.5 px) stands out from the lung markings."""
NEAR = 12
"""Pixels from the nodule centre that count as on target: about 4 nodule radii, 1.5 cells of the 16 x 16 map."""
CNN = {"name": "resnet18", "weights": "random", "img_size": SIZE, "drop_path_rate": 0.0, "global_pool": "avg",
       "kwargs": {"output_stride": 8, "layers": [1, 1, 1, 1], "channels": [16, 32, 32, 32], "stem_width": 16}}


@pytest.fixture(scope="module")
def nodules(tmp_path_factory):
    """A small ResNet trained from scratch on phantoms (half with a nodule) to call 'nodule', and its test
    images (columns file, nodule, nodule_x, nodule_y)."""
    torch.set_num_threads(THREADS)  # before the tests' own setting: module fixtures come first
    root = tmp_path_factory.mktemp("nodules")
    csv = generate_phantoms(root / "phantoms", n_patients=600, images_per_patient=(1, 1), size=SIZE,
                            prevalence={"nodule": 0.5}, difficulty=0.0, seed=0)
    medpeft.train(config_from_dict({
        "model": CNN,
        "data": {"csv": str(csv), "patient_column": "patient_id", "labels": ["nodule"],
                 # The figures below were measured on the plain patient shuffle; on the stratified draw's
                 # split the maps peak on target less often (26%), another sign of how much they vary.
                 "split": {"val_fraction": 0.15, "test_fraction": 0.25, "seed": 0, "stratify": False}},
        "method": {"name": "full"}, "augment": {"enabled": False},
        "train": {"epochs": 12, "batch_size": 32, "lr": 6e-3, "warmup_epochs": 1},
        "output_dir": str(root / "run")}), quiet=True)
    run = medpeft.load_run(root / "run")
    split = pd.read_csv(root / "run" / "split.csv").set_index("image_id")["split"]
    table = pd.read_csv(csv)
    table["file"] = [str(csv.parent / p) for p in table["path"]]
    return run, table[table["path"].map(split) == "test"].reset_index(drop=True)


def called(run, files) -> np.ndarray:
    return run.predict(list(files))["pred:nodule"].to_numpy(dtype=float) == 1


def peak(run, file: str) -> tuple[int, int]:
    """(x, y) of the maximum of the 'nodule' map upsampled to the image."""
    image = load_grayscale(file)
    cam = upsample(saliency_map(run, run.transform()(image), 0), (image.height, image.width))
    y, x = np.unravel_index(cam.argmax(), cam.shape)
    return int(x), int(y)


@pytest.mark.slow  # the nodule model trains for 30-60 s
def test_map_for_a_phantom_nodule_peaks_on_the_nodule(nodules):
    run, test = nodules
    with_nodule = test[test["nodule"] == 1]
    found = with_nodule[called(run, with_nodule["file"])]
    assert len(found) >= 0.7 * len(with_nodule), "the model does not detect nodules: nothing to explain"
    assert called(run, test.loc[test["nodule"] == 0, "file"]).mean() <= 0.3
    peaks = np.array([peak(run, f) for f in found["file"]])
    centres = found[["nodule_x", "nodule_y"]].to_numpy()
    on_target = np.hypot(*(peaks - centres).T) <= NEAR
    elsewhere = np.hypot(*(peaks - np.roll(centres, 1, axis=0)).T) <= NEAR  # another image's nodule
    # Measured (600 patients, 12 epochs, AVX-512 CPU): one thread, phantom seeds 0, 1, 2: 99% on target, 13-19%
    # at another image's nodule, 94-100% of nodules found; two threads (seed 0): 95%, 15%, 99%. The maps vary
    # with the CPU's kernels and threads: earlier settings gave 46-87% on target on AVX2 and AVX-512 CPUs.
    assert on_target.mean() >= 0.4, f"{on_target.sum()} of {len(found)} maps peak within {NEAR} px of the nodule"
    assert elsewhere.mean() <= 0.25 and on_target.mean() >= 3 * elsewhere.mean()


def assert_class_activation_map(run, x: torch.Tensor) -> int:
    """With average pooling and a linear head, Grad-CAM is CAM: ReLU of the head's weights applied to the
    last feature map at each position (Selvaraju et al. 2017, section 3.1). Checked on every label whose
    CAM is not all zero (there must be one)."""
    model = unwrap(run.model)
    with torch.no_grad():
        features = model.forward_features(x[None])[0]
        cams = torch.relu(torch.einsum("kc,chw->khw", model.get_classifier().weight, features))
    checked = [k for k, cam in enumerate(cams) if cam.max() > 0]
    for k in checked:
        torch.testing.assert_close(torch.from_numpy(saliency_map(run, x, k)), cams[k] / cams[k].max())
    return len(checked)


@pytest.mark.slow  # the nodule model trains for 30-60 s
def test_cnn_map_is_the_class_activation_map(nodules):
    run, test = nodules
    # An image with a nodule: the CAM of a negative image can be zero everywhere.
    x = run.transform()(load_grayscale(test.loc[test["nodule"] == 1, "file"].iloc[0]))
    assert assert_class_activation_map(run, x) == 1
    assert saliency_map(run, x, 0).shape == (SIZE // 8, SIZE // 8)


def test_cnn_map_through_a_peft_wrapper_is_the_class_activation_map(run_config):
    # no output_stride here: peft's LoRA convs do not copy a dilated conv's dilation
    run_config["model"] = {"name": "resnet50", "weights": "random", "img_size": 64, "drop_path_rate": 0.0,
                           "kwargs": {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8,
                                      "base_width": 16}}
    run_config["method"] = {"name": "lora", "r": 2, "targets": ["convs"]}
    run_config["train"]["epochs"] = 1
    medpeft.train(config_from_dict(run_config), quiet=True)
    run = medpeft.load_run(run_config["output_dir"])
    assert run.model is not unwrap(run.model)
    images = [run.transform()(Image.open(Path(run_config["data"]["csv"]).parent / f"img{i:03d}.png")) for i in range(8)]
    assert sum(assert_class_activation_map(run, x) for x in images) > 0  # a map that is not all zero was checked
    x = images[0]
    assert saliency_map(run, x, 1).shape == (2, 2)


def hooks_and_grads(model: nn.Module) -> tuple:
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()]
    return hooks, [(n, p.requires_grad, p.grad is None) for n, p in model.named_parameters()]


@pytest.mark.slow  # the nodule model trains for 30-60 s
def test_explain_writes_overlays_named_by_image_and_label(nodules, tmp_path):
    run, test = nodules
    positive = test.loc[(test["nodule"] == 1) & called(run, test["file"]), "file"].iloc[0]
    negative = test.loc[(test["nodule"] == 0) & ~called(run, test["file"]), "file"].iloc[0]
    (tmp_path / "other").mkdir()
    twin = shutil.copy(positive, tmp_path / "other")  # the same stem as `positive`
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    before = hooks_and_grads(run.model)
    with pytest.warns(UnreadableInputWarning, match="1 of 5 inputs"):
        table = run.explain([positive, negative, twin, broken, Image.open(positive)], tmp_path / "maps")
    assert hooks_and_grads(run.model) == before
    assert list(table.columns) == ["input", "label", "probability", "file", "error"]
    assert table["input"].tolist() == [positive, negative, str(twin), str(broken), "<image 4>"]
    stem = Path(positive).stem
    names = [f"{stem}_0__nodule.png", None, f"{stem}_2__nodule.png", None, "image4__nodule.png"]
    assert [Path(f).name if isinstance(f, str) else None for f in table["file"]] == names
    assert table["label"].tolist()[::2] == ["nodule"] * 3 and table["label"][[1, 3]].isna().all()
    assert (table["probability"][::2] >= run.thresholds["nodule"]).all()
    assert "broken.png" in table["error"][3] and (table["error"].drop(3) == "").all()
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == sorted(n for n in names if n)
    overlay = Image.open(table["file"][0])
    assert overlay.mode == "RGB" and overlay.size == (SIZE, SIZE)
    pixels = np.asarray(overlay, dtype=int)
    assert np.abs(pixels[..., 0] - pixels[..., 2]).max() > 50  # coloured by the heatmap, not plain gray


@pytest.mark.slow  # the nodule model trains for 30-60 s
def test_explain_with_labels_maps_them_at_the_original_size(nodules, tmp_path):
    run, test = nodules
    negative = test.loc[(test["nodule"] == 0) & ~called(run, test["file"]), "file"].iloc[0]
    wide = tmp_path / "wide.png"
    Image.open(negative).resize((200, 150)).save(wide)
    table = run.explain([wide], tmp_path / "maps", labels=["nodule"])
    assert table["label"].tolist() == ["nodule"] and table["probability"][0] < run.thresholds["nodule"]
    assert Image.open(table["file"][0]).size == (200, 150)
    assert table["file"][0] == str(tmp_path / "maps" / "wide__nodule.png")
    with pytest.raises(ConfigError, match="'mass' is not a label"):
        run.explain([wide], tmp_path / "maps", labels=["mass"])


@pytest.mark.slow  # the nodule model trains for 30-60 s
def test_a_failed_map_leaves_no_hook_behind(nodules):
    run, test = nodules
    x = run.transform()(load_grayscale(test["file"][0]))
    before = hooks_and_grads(run.model)
    with pytest.raises(IndexError):
        saliency_map(run, x, 1)  # the run has one label
    assert hooks_and_grads(run.model) == before


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4}, {"name": "vpt_shallow", "tokens": 3}])
def test_vit_map_peaks_on_the_bright_square(run_config, method):
    """ViT maps through the method's wrapper or prompts: the patch tokens entering the last block (after the
    class and prompt tokens) on the 4 x 4 grid. The 'bright' square covers the top-left 2 x 2 patches."""
    run_config.update(method=method, augment={"enabled": False})
    run_config["model"]["drop_path_rate"] = 0.0
    run_config["train"]["epochs"] = 10
    medpeft.train(config_from_dict(run_config), quiet=True)
    run = medpeft.load_run(run_config["output_dir"])
    vit = unwrap(run.model)
    layer, to_grid = target_layer(vit)
    assert layer is vit.blocks[-1].norm1
    tokens = torch.arange(20.0).reshape(1, 20, 1)  # class token, 3 prompt tokens, 16 patch tokens
    assert to_grid(tokens).flatten().tolist() == list(range(4, 20))

    frame = pd.read_csv(run_config["data"]["csv"])
    before = hooks_and_grads(run.model)
    maps = [saliency_map(run, run.transform()(Image.open(Path(run_config["data"]["csv"]).parent / path)), 0)
            for path in frame.loc[frame["bright"] == 1, "path"]]
    assert hooks_and_grads(run.model) == before
    assert all(cam.shape == (4, 4) and cam.min() >= 0 and cam.max() == pytest.approx(1.0) for cam in maps)
    rows, cols = np.unravel_index([cam.argmax() for cam in maps], (4, 4))
    assert ((rows <= 1) & (cols <= 1)).mean() >= 0.9


def test_multiclass_run_explains_its_arg_max_class(squares_csv, tmp_path):
    frame = pd.read_csv(squares_csv)
    frame["path"] = [str(squares_csv.parent / p) for p in frame["path"]]
    frame["kind"] = np.where(frame["bright"] == 1, "bright", "plain")
    frame.to_csv(tmp_path / "kinds.csv", index=False)
    medpeft.train(config_from_dict({
        "model": {"name": "vit_tiny_patch16_224", "weights": "random", "img_size": 32,
                  "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8}},
        "data": {"csv": str(tmp_path / "kinds.csv"), "patient_column": "patient", "label_column": "kind",
                 "task": "multiclass", "labels": ["plain", "bright"], "negative_names": []},
        "method": {"name": "full"}, "train": {"epochs": 1, "batch_size": 16},
        "output_dir": str(tmp_path / "run")}), quiet=True)
    run = medpeft.load_run(tmp_path / "run")
    files = frame["path"][:4].tolist()
    table = run.explain(files, tmp_path / "maps")
    assert table["label"].tolist() == run.predict(files)["pred"].tolist()
    assert [Path(f).name for f in table["file"]] == [f"{Path(f).stem}__{label}.png" for f, label in
                                                     zip(files, table["label"])]
