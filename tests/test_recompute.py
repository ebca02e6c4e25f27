"""train.recompute: the same outputs and gradients, with whole blocks or (selective) all but the
qkv, attention and fc2 recomputed in backward."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import medpeft
from medpeft.backbones import create_backbone
from medpeft.config import ModelConfig, config_from_dict
from medpeft.errors import ConfigError
from medpeft.methods import get_method, method_config_from_dict
from medpeft.accel.lean_lora import make_lean
from medpeft.train.recompute import apply_recompute

from conftest import TINY_VIT, assert_metrics_close

METHODS = [{"name": "full"}, {"name": "lora", "targets": ["all_linear"]}, {"name": "lora", "targets": ["q", "v"]},
           {"name": "lora", "targets": ["qkv"], "dropout": 0.1}, {"name": "vpt_deep", "tokens": 2}]


def build(method: dict, mode: str, fused_attn: bool = True):
    torch.manual_seed(0)
    model, _ = create_backbone(ModelConfig(**TINY_VIT), num_classes=3)  # drop path 0.1: random masks
    model = get_method(method["name"]).apply(model, method_config_from_dict(method))
    make_lean(model)  # as medpeft.accel does (train.accel)
    for block in model.modules():
        if hasattr(block, "fused_attn"):
            block.fused_attn = fused_attn
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.3)
    apply_recompute(model, mode)
    return model.train()


class Ops(TorchDispatchMode):
    """Counts the aten ops that run; addmm (or oneDNN's linear with a bias) also as "addmm in x out"."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] += 1
        if name == "addmm":
            self.counts["addmm {} x {}".format(*args[2].shape)] += 1
        if name == "_linear_pointwise" and args[2] is not None:  # oneDNN's x W^T + b (medpeft.backbones.layers)
            self.counts["addmm {1} x {0}".format(*args[1].shape)] += 1
        return func(*args, **(kwargs or {}))


def forward_backward(model, x):
    torch.manual_seed(5)
    y = model(x)
    with Ops() as ops:
        y.square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), grads, ops.counts


@pytest.mark.parametrize("fused_attn", [True, False], ids=["fused-attention", "math-attention"])
@pytest.mark.parametrize("method", METHODS, ids=lambda m: "-".join(map(str, m.values())))
def test_recomputation_gives_the_same_outputs_and_gradients(method, fused_attn):
    x = torch.randn(4, 3, 32, 32)
    y, grads, ops = forward_backward(build(method, "none", fused_attn), x)
    depth, width = TINY_VIT["kwargs"]["depth"], TINY_VIT["kwargs"]["embed_dim"]
    assert ops["native_layer_norm"] == 0 and ops["bmm"] == (0 if fused_attn else 4 * depth)  # 2 per matmul
    for mode in ("selective", "blocks"):
        y2, grads2, ops2 = forward_backward(build(method, mode, fused_attn), x)
        torch.testing.assert_close(y2, y, rtol=0, atol=1e-6)
        for name, grad in grads.items():
            # to fp32 rounding: lean LoRA's A gradient after a LayerNorm sums over the norm's input, and
            # under checkpointing (saved-tensor hooks) over its output
            torch.testing.assert_close(grads2[name], grad, rtol=0, atol=1e-6 * grad.abs().max().item(),
                                       msg=f"{mode} {name}")
        assert ops2["native_layer_norm"] == 2 * depth  # both norms of every block recomputed in backward
        assert ops2[f"addmm {width} x {4 * width}"] == depth  # the MLP's first matmul
        kept = ops2[f"addmm {width} x {3 * width}"] + ops2[f"addmm {4 * width} x {width}"]  # qkv, fc2
        kept += ops2["_scaled_dot_product_flash_attention_for_cpu"] + ops2["bmm"] - ops["bmm"]  # attention
        assert (kept == 0) if mode == "selective" else (kept > 0)
        if mode == "selective":  # proj recomputed; q, k, v (where split, also width x width) kept
            assert ops2[f"addmm {width} x {width}"] == depth



def test_recomputation_needs_a_vit_and_trains_like_none(run_config, tmp_path):
    from test_cnn_methods import CNNS

    resnet = ModelConfig(name="resnet50", weights="random", img_size=32, kwargs=CNNS["resnet50"])
    with pytest.raises(ConfigError, match="train.recompute 'selective' needs a ViT"):
        apply_recompute(create_backbone(resnet, num_classes=2)[0], "selective")
    with pytest.raises(ConfigError, match="train.recompute"):
        config_from_dict({**run_config, "train": {"recompute": "some"}})

    plain = medpeft.train(config_from_dict(run_config), quiet=True)
    run_config["train"]["recompute"] = "selective"
    run_config["output_dir"] = str(tmp_path / "selective")
    selective = medpeft.train(config_from_dict(run_config), quiet=True)
    assert_metrics_close((selective["val"], selective["test"]), (plain["val"], plain["test"]))
    assert selective["test"]["per_label"] == plain["test"]["per_label"]


@pytest.mark.parametrize("targets", [["all_linear"], ["q", "v"]], ids="+".join)
def test_selective_keeps_lean_loras_activations_not_its_merged_weight(monkeypatch, targets):
    """In fp32 lean LoRA computes with W + s B A: selective keeps the base matmul and x A^T of qkv and fc2
    (token-sized), not the weight-sized matmuls that make W + s B A."""
    from torch.utils.checkpoint import CheckpointPolicy

    from medpeft.train import recompute

    kept, policy = Counter(), recompute._policy

    def recording(ctx, op, *args, **kwargs):
        decision = policy(ctx, op, *args, **kwargs)
        if decision == CheckpointPolicy.MUST_SAVE and op not in recompute._kept_ops()[1] and ctx.is_recompute is False:
            kept[op.overloadpacket.__name__] += 1
        return decision

    monkeypatch.setattr(recompute, "_policy", recording)
    model = build({"name": "lora", "targets": targets}, "selective")
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    depth = TINY_VIT["kwargs"]["depth"]  # qkv and fc2 (base addmm, and x A^T of each adapter of theirs)
    # (in fp32 on the CPU both oneDNN's _linear_pointwise, else addmm and mm)
    assert sum(kept.values()) == 4 * depth and not kept.keys() - {"addmm", "mm", "_linear_pointwise"}
