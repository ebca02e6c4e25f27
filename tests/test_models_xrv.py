"""torchxrayvision's DenseNet-121 and ResNet-50 (xrv-densenet121-all, xrv-resnet50-all) as its authors
publish them: tiny models built with torchxrayvision, saved as its release files are (a whole pickled
DenseNet module, torch's legacy format; a torchvision ResNet state_dict) and loaded back by
torchxrayvision's own classes; medpeft loads them without torchxrayvision and gives its features on the
same gray pixels; a file that holds any other class is refused without running it; LoRA and linear probe
train a step; another layout is refused naming the key; the full-size keys and shapes match timm's."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import timm
import torch
from model_checks import pooled_features, train_one_step
from torch import nn

from medpeft.backbones import create_backbone
from medpeft.backbones.layouts import LAYOUTS
from medpeft.config import config_from_dict
from medpeft.errors import CheckpointError

xrv = pytest.importorskip("torchxrayvision", reason="the models extra (torchxrayvision) is not installed")
torchvision = pytest.importorskip("torchvision", reason="torchxrayvision's ResNet is torchvision's")
Bottleneck = torchvision.models.resnet.Bottleneck

TINY_DENSENET = {"growth_rate": 8, "block_config": (2, 2), "num_init_features": 16}
TINY = {  # the timm kwargs of the same tiny architectures
    "xrv-densenet121-all": {"img_size": 64, "kwargs": {"growth_rate": 8, "block_config": [2, 2]}},
    "xrv-resnet50-all": {"img_size": 64, "kwargs": {"layers": [1, 1, 1, 1], "base_width": 16}},
}
METHODS = {"lora": {"name": "lora", "targets": ["convs"], "r": 4, "alpha": 8}, "linear_probe": {"name": "linear_probe"}}


def xrv_config(run_config, name, weights, method="linear_probe"):
    """`run_config` naming the catalogue entry `name` at its tiny size, with `method` (LoRA on the convolutions)."""
    return config_from_dict({**run_config, "model": {"name": name, "weights": str(weights), **TINY[name]},
                             "method": METHODS[method]})


def randomised(model: nn.Module, features) -> nn.Module:
    """Seeded random weights whose BatchNorms are not the identity: random affine terms and running
    statistics of a few train-mode passes (`features`) over gray images in [-1024, 1024]."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # the cumulative average of the passes
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.normal_(module.bias, std=0.2)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            features(torch.rand(4, 1, 64, 64) * 2048 - 1024)
    return model.eval()


def tiny_resnet50(num_classes=18, weights=None):
    """torchvision's resnet50 at a tiny size (one block per stage, narrow bottlenecks)."""
    return torchvision.models.ResNet(Bottleneck, [1, 1, 1, 1], num_classes=num_classes, width_per_group=16)


def published_densenet(path: Path, monkeypatch, resaved: bool = False):
    """A tiny DenseNet saved as torchxrayvision's release files are (``torch.save(model)`` by torch < 1.6:
    the legacy format), then loaded by ``xrv.models.DenseNet(weights=...)`` itself; with `resaved`, that
    loaded model (its op_threshs set) saved again by today's torch. Returns the loaded model."""
    source = xrv.models.DenseNet(**TINY_DENSENET)
    randomised(source, source.features2)
    torch.save(source, path, _use_new_zipfile_serialization=False)
    monkeypatch.setattr(xrv.models, "get_weights", lambda weights, cache_dir=None: str(path))
    model = xrv.models.DenseNet(weights="densenet121-res224-all", **TINY_DENSENET)
    if resaved:
        torch.save(model, path)
    return model


def published_resnet(path: Path, monkeypatch):
    """A tiny ResNet-50 saved as torchxrayvision's release file is (the state_dict of torchvision's
    resnet50 with a 1-channel conv1), then loaded by ``xrv.models.ResNet(weights=...)`` itself, which
    builds it at the tiny size. Returns the loaded model."""
    source = tiny_resnet50()
    source.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    randomised(source, source)
    torch.save(source.state_dict(), path)
    monkeypatch.setattr(xrv.models, "get_weights", lambda weights, cache_dir=None: str(path))
    monkeypatch.setattr(torchvision.models, "resnet50", tiny_resnet50)
    return xrv.models.ResNet(weights="resnet50-res512-all")


def medpeft_features(model, config, gray: torch.Tensor) -> torch.Tensor:
    """Pooled features of `gray` pixels in [0, 1] repeated into 3 channels and normalised by the run's
    data.mean / data.std (the entry's defaults)."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (config.data.mean, config.data.std))
    return pooled_features(model, (gray.repeat(1, 3, 1, 1) - mean) / std)


def load_without_torchxrayvision(monkeypatch, config):
    for name in ("torchxrayvision", "torchxrayvision.models"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it would fail
    return create_backbone(config.model, num_classes=2)


@pytest.mark.parametrize("resaved", [False, True], ids=["release-file", "resaved"])
def test_a_densenet_file_gives_torchxrayvisions_features_without_it(run_config, tmp_path, monkeypatch, resaved):
    source = published_densenet(tmp_path / "densenet.pt", monkeypatch, resaved)
    config = xrv_config(run_config, "xrv-densenet121-all", tmp_path / "densenet.pt")
    model, report = load_without_torchxrayvision(monkeypatch, config)
    gray = torch.rand(2, 1, 224, 224)  # xrv resizes to its input_resolution, 224
    with torch.no_grad():
        expected = source.features2(gray * 2048 - 1024)
    torch.testing.assert_close(medpeft_features(model, config, gray), expected, atol=1e-4, rtol=0)
    assert report.ignored == (["op_threshs"] if resaved else [])
    assert report.head_skipped == ["classifier.weight", "classifier.bias"] == report.fresh


def test_a_resnet_file_gives_torchxrayvisions_features(run_config, tmp_path, monkeypatch):
    source = published_resnet(tmp_path / "resnet.pt", monkeypatch)
    config = xrv_config(run_config, "xrv-resnet50-all", tmp_path / "resnet.pt")
    model, report = load_without_torchxrayvision(monkeypatch, config)
    gray = torch.rand(2, 1, 512, 512)  # xrv's ResNet.features resizes to 512
    with torch.no_grad():
        expected = source.features(gray * 2048 - 1024)
    torch.testing.assert_close(medpeft_features(model, config, gray), expected, atol=1e-4, rtol=0)
    assert report.head_skipped == ["fc.weight", "fc.bias"] == report.fresh and not report.ignored


def write_marker(path):
    Path(path).write_text("code from the checkpoint ran")


class Payload:
    """Pickled as the call `reduce` names: unpickling it runs that call."""

    def __init__(self, reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
@pytest.mark.parametrize("call", ["system", "function"])
def test_a_file_holding_another_class_is_refused_naming_it_and_nothing_runs(run_config, tmp_path, legacy, call):
    marker = tmp_path / "marker"
    reduce, name = {"system": ((os.system, (f"touch {marker}",)), f"{os.system.__module__}.system"),
                    "function": ((write_marker, (str(marker),)), f"{write_marker.__module__}.write_marker")}[call]
    doctored = xrv.models.DenseNet(**TINY_DENSENET)
    doctored.extra = Payload(reduce)
    torch.save(doctored, tmp_path / "doctored.pt", _use_new_zipfile_serialization=not legacy)
    config = xrv_config(run_config, "xrv-densenet121-all", tmp_path / "doctored.pt")
    with pytest.raises(CheckpointError, match=rf"doctored.pt: refused to unpickle {name}: a torchxrayvision file "
                                              r"holds only") as error:
        create_backbone(config.model, num_classes=2)
    assert "\n" not in str(error.value) and not marker.exists()
    torch.load(tmp_path / "doctored.pt", weights_only=False)  # plain unpickling would have run it
    assert marker.exists()


def test_a_truncated_densenet_file_is_one_error_naming_it(run_config, tmp_path, monkeypatch):
    published_densenet(tmp_path / "densenet.pt", monkeypatch)
    data = (tmp_path / "densenet.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    config = xrv_config(run_config, "xrv-densenet121-all", tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match=r"cut.pt: not a readable torch checkpoint \(\w+") as error:
        create_backbone(config.model, num_classes=2)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("method", ["lora", "linear_probe"])
def test_lora_and_linear_probe_train_a_step(run_config, tmp_path, monkeypatch, name, method):
    published = published_densenet if name == "xrv-densenet121-all" else published_resnet
    published(tmp_path / "weights.pt", monkeypatch)
    train_one_step(xrv_config(run_config, name, tmp_path / "weights.pt", method))


@pytest.mark.parametrize("name, key, first", [("xrv-densenet121-all", "features.conv0.weight", "cls_token"),
                                              ("xrv-resnet50-all", "conv1.weight", "features.conv0.weight")])
def test_a_checkpoint_of_another_model_is_refused_naming_the_key(run_config, tmp_path, name, key, first):
    other = ({"cls_token": torch.zeros(1, 1, 32), "patch_embed.proj.weight": torch.zeros(32, 3, 16, 16)}
             if first == "cls_token" else xrv.models.DenseNet(**TINY_DENSENET).state_dict())
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=rf"other.pt: not in the expected layout xrv-.* no key '{key}' \(its "
                                              rf"first key is '{first}'\)") as error:
        create_backbone(xrv_config(run_config, name, tmp_path / "other.pt").model, num_classes=2)
    assert "\n" not in str(error.value)


def shapes(state_dict: dict) -> dict:
    return {key: tuple(value.shape) for key, value in state_dict.items()}


def test_full_size_densenet121_converts_onto_timms_keys_and_shapes():
    with torch.device("meta"):
        source = xrv.models.DenseNet(**xrv.models.get_densenet_params("densenet121"), op_threshs=torch.zeros(18))
        target = timm.create_model("densenet121", num_classes=18)
    converted, dropped = LAYOUTS["xrv-module"].convert(source.state_dict())
    assert dropped == ["op_threshs"] and source.features.conv0.weight.shape[1] == 1
    assert shapes(converted) == shapes(target.state_dict())


def test_full_size_resnet50_converts_onto_timms_keys_and_shapes():
    with torch.device("meta"):  # as xrv.models.ResNet builds it
        source = torchvision.models.resnet50(num_classes=18, weights=None)
        source.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        target = timm.create_model("resnet50", num_classes=18)
    converted, dropped = LAYOUTS["xrv-resnet"].convert(source.state_dict())
    assert dropped == [] and shapes(converted) == shapes(target.state_dict())



def test_operating_points_that_are_not_finite_do_not_stop_the_backbone_loading(run_config, tmp_path):
    """xrv re-saves of some weights hold NaN op_threshs (labels a dataset lacks): dropped, not loaded."""
    state = timm.create_model("resnet50", num_classes=18, in_chans=1, **TINY["xrv-resnet50-all"]["kwargs"]).state_dict()
    torch.save({**{f"model.{k}": v for k, v in state.items()}, "op_threshs": torch.full((18,), float("nan"))},
               tmp_path / "resave.pt")
    model, report = create_backbone(xrv_config(run_config, "xrv-resnet50-all", tmp_path / "resave.pt").model, 2)
    assert "op_threshs" in report.ignored
