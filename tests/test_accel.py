"""medpeft's speed-ups behind one switch (train.accel): training is the same without them, and with a
torch that lacks the private APIs they use, each falls back to the public path by itself."""

import numpy as np
import pandas as pd
import pytest
import torch
from peft.tuners.lora.layer import Linear as PeftLinear
from timm.layers import Mlp

import medpeft
from medpeft import accel
from medpeft.accel import lean_lora, onednn
from medpeft.accel.lean_lora import LeanLinear, LeanMlp
from medpeft.accel.onednn import OneDNNLinear
from medpeft.config import config_from_dict
from medpeft.engine.assemble import build_model

PROBES = (onednn.available, lean_lora.norm_inputs_available, lean_lora.gelu_backward_in_place_available)


@pytest.fixture
def missing_private_apis():
    """A torch without oneDNN's linear op, the autograd internals lean LoRA reads and aten's in-place GELU
    backward. The capability probes (cached per process) run again inside the test and after it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
        patch.delattr(torch._C._autograd, "_top_saved_tensors_default_hooks")
        patch.setattr(torch.ops.aten, "gelu_backward", None)
        for probe in PROBES:
            probe.cache_clear()
        yield
    for probe in PROBES:
        probe.cache_clear()
        probe()


def lora_all(run_config, tmp_path, name, **train):
    return {**run_config, "method": {"name": "lora", "r": 4, "alpha": 8, "targets": ["all_linear"]},
            "train": {**run_config["train"], **train}, "output_dir": str(tmp_path / name)}


def probabilities(run_dir) -> np.ndarray:
    table = pd.read_csv(run_dir / "predictions.csv")
    return table[[c for c in table.columns if c.startswith("prob:")]].to_numpy()


def kinds(model) -> set[type]:
    return {type(m) for m in model.modules()}


@pytest.mark.accel
def test_accel_off_builds_the_plain_modules_and_trains_to_the_same_predictions(run_config, tmp_path):
    on, off = (build_model(config_from_dict(lora_all(run_config, tmp_path, "x", accel=flag))).model
               for flag in (True, False))
    assert {LeanLinear, LeanMlp} <= kinds(on) and (OneDNNLinear in kinds(on)) == onednn.available()
    assert not {LeanLinear, LeanMlp, OneDNNLinear} & kinds(off) and {PeftLinear, Mlp} <= kinds(off)
    for name, flag in (("on", True), ("off", False)):
        medpeft.train(config_from_dict(lora_all(run_config, tmp_path, name, accel=flag)), quiet=True)
    np.testing.assert_allclose(probabilities(tmp_path / "off"), probabilities(tmp_path / "on"), atol=1e-4)


@pytest.mark.accel
def test_without_the_private_apis_every_speed_up_falls_back_and_training_runs(
        run_config, tmp_path, missing_private_apis):
    assert accel.capabilities() == {"onednn_linear": False, "lean_lora_norm_inputs": False,
                                    "gelu_backward_in_place": False,
                                    "glibc_allocator": accel.memory.available()}
    model = build_model(config_from_dict(lora_all(run_config, tmp_path, "x"))).model
    assert LeanLinear in kinds(model) and not {OneDNNLinear, LeanMlp} & kinds(model)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    model(x).sum().backward()  # lean LoRA saves its inputs itself instead of reading the LayerNorm's
    assert x.grad is not None and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    medpeft.train(config_from_dict(lora_all(run_config, tmp_path, "fallback")), quiet=True)
    medpeft.train(config_from_dict(lora_all(run_config, tmp_path, "off", accel=False)), quiet=True)
    np.testing.assert_allclose(probabilities(tmp_path / "fallback"), probabilities(tmp_path / "off"), atol=1e-4)


@pytest.mark.accel
def test_the_attention_kernel_is_the_users_choice_or_accels(run_config, tmp_path):
    def fused(precision, attention, flag):
        config = lora_all(run_config, tmp_path, "x", precision=precision, attention=attention, accel=flag)
        return {m.fused_attn for m in build_model(config_from_dict(config)).model.modules() if hasattr(m, "fused_attn")}

    assert fused("bf16", "auto", True) == {False} and fused("fp32", "auto", True) == {True}
    assert fused("bf16", "fused", False) == {True} and fused("fp32", "math", False) == {False}
    assert fused("bf16", "auto", False) == {True}  # timm's own default
