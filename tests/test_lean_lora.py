"""The lean LoRA forward (medpeft.accel.lean_lora) against peft's own: equal outputs and gradients for
every target, under bf16 autocast too, peft's adapter format and merging unchanged, peft's path where
the adapter is not plain LoRA, and less memory kept for backward and allocated."""

import contextlib
import copy

import peft
import pytest
import torch
from peft.tuners.lora.layer import Linear as PeftLinear
from safetensors.torch import load_file
from timm.layers import Mlp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from medpeft.backbones import create_backbone, split_qkv
from medpeft.backbones.layers import row_blocks
from medpeft.accel.lean_lora import LeanLinear, LeanMlp, LeanSplitQKV, make_lean
from medpeft.config import ModelConfig
from medpeft.methods import get_method, method_config_from_dict
from medpeft.methods._peft import PEFT_WEIGHTS, SPLIT_TARGETS

from conftest import TINY_VIT

TARGETS = [["qkv"], ["q"], ["k"], ["v"], ["q", "v"], ["proj"], ["fc1"], ["fc2"], ["mlp"], ["all_linear"]]


def backbone(targets=()):
    torch.manual_seed(0)
    model = create_backbone(ModelConfig(**{**TINY_VIT, "drop_path_rate": 0.0}), num_classes=3)[0]
    with torch.no_grad():  # norms as trained ones are, not 1 and 0 (lean backward uses their weights and biases)
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.normal_(1, 0.3)
                module.bias.normal_(0, 0.3)
    return split_qkv(model) if SPLIT_TARGETS & set(targets) else model


def applied(targets, lean=True, name="lora", std=0.3, **settings):
    """The tiny ViT with LoRA; every trainable parameter random (lora_B too, so the update matters)."""
    spec = get_method(name)
    config = method_config_from_dict({"name": name, "r": 4, "alpha": 8, "targets": targets, **settings})
    model = spec.apply(backbone(), config)
    if lean:  # else peft's own layers, as get_peft_model made them
        make_lean(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=std)
    return model


def graph_nodes(output):
    """Every autograd node that the graph of `output` went through."""
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack += [n for n, _ in node.next_functions]
    return seen


def lean_nodes(output):
    """The lean autograd functions that the graph of `output` went through, as what each recomputes its
    input from (``layer_norm``, ``gelu``; None: the input itself was saved)."""
    return [node.source for node in graph_nodes(output) if type(node).__name__.startswith("LoraLinear")]


# What each target's input is recomputed from in a timm ViT block (None: saved)
SOURCES = {"qkv": "layer_norm", "q": "layer_norm", "k": "layer_norm", "v": "layer_norm", "proj": None,
           "fc1": "layer_norm", "fc2": "gelu", "mlp": "layer_norm gelu", "all_linear": "layer_norm None gelu"}


def lean_sites(model):
    """Lean modules that each run one function: a LeanSplitQKV, or a LeanLinear not inside one."""
    inner = {id(c) for m in model.modules() if isinstance(m, LeanSplitQKV) for c in m.children()}
    return sum(isinstance(m, LeanSplitQKV) or (isinstance(m, LeanLinear) and id(m) not in inner)
               for m in model.modules())


def outputs_and_grads(model, x, autocast=False):
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    y.float().square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return y, x.grad, grads, lean_nodes(y)


def assert_same(lean, reference, x, lean_used):
    """Equal outputs and gradients (input, every trainable parameter) in fp32; the lean path taken or not.
    The matmuls sum in another order than peft's, so elements differ by fp32 rounding. Measured against
    the same model run in float64, over these tests: peft's largest error is 4.7e-5 of the tensor's largest
    value, lean's 4.5e-5; each tensor here must be within 1e-4 of its scale of both."""
    y, gx, grads, nodes = outputs_and_grads(lean, x)
    y_ref, gx_ref, grads_ref, _ = outputs_and_grads(reference, x)
    y64, gx64, grads64, _ = outputs_and_grads(copy.deepcopy(reference).double(), x.double())
    assert len(nodes) == (lean_sites(lean) if lean_used else 0)
    assert grads.keys() == grads_ref.keys()
    for name, (actual, expected, exact) in {"output": (y, y_ref, y64), "input gradient": (gx, gx_ref, gx64),
                                            **{n: (grads[n], grads_ref[n], grads64[n]) for n in grads}}.items():
        atol = 1e-4 * exact.abs().max().item()
        torch.testing.assert_close(actual, expected, atol=atol, rtol=0, msg=name)
        torch.testing.assert_close(actual.double(), exact, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("name", ["lora", "rslora"])
@pytest.mark.parametrize("targets", TARGETS, ids="+".join)
def test_lean_equals_peft_in_outputs_and_every_gradient(targets, name):
    lean, reference = applied(targets, name=name), applied(targets, lean=False, name=name)
    assert lean_sites(lean) > 0 and not any(isinstance(m, LeanLinear) for m in reference.modules())
    assert all(type(m) is LeanLinear for m in lean.modules() if isinstance(m, PeftLinear))
    assert_same(lean, reference, torch.randn(4, 3, 32, 32), lean_used=True)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    expected = {s if s != "None" else None for t in targets for s in str(SOURCES[t]).split()}
    assert set(lean_nodes(lean(x))) == expected  # LayerNorm and GELU outputs are recomputed, not saved
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # as checkpointing packs them
        assert set(lean_nodes(lean(x))) == {"gelu" if s == "gelu" else None for s in expected}


@pytest.mark.parametrize("hooks", [False, True])
@pytest.mark.parametrize("targets", [["q", "v"], ["all_linear"]], ids="+".join)
def test_lean_equals_peft_over_many_tokens(targets, hooks):
    """36 images, 612 tokens: backward takes B's gradients (and A's) as a batched matmul over 8 runs of 76
    tokens plus the 4 left; A's after a LayerNorm over its input (over the saved x under saved-tensor hooks)."""
    lean, reference = applied(targets), applied(targets, lean=False)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t) if hooks else contextlib.nullcontext():
        assert_same(lean, reference, torch.randn(36, 3, 32, 32), lean_used=True)


@pytest.mark.parametrize("hooks", [False, True])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_fc2_after_a_gelu_takes_its_input_and_returns_the_gradient_through_it(approximate, hooks):
    """fc2 of timm's Mlp saves fc1's output (which the GELU keeps anyway), not the GELU's, and does the
    GELU's backward itself; under saved-tensor hooks (checkpointing) too."""
    models = []
    for lean in (True, False):
        torch.manual_seed(0)
        mlp = Mlp(16, 64, act_layer=lambda: nn.GELU(approximate))
        model = peft.get_peft_model(mlp, peft.LoraConfig(r=4, target_modules=["fc2"]))
        nn.init.normal_(mlp.fc2.lora_B["default"].weight)
        assert not lean or (make_lean(model) == 1 and type(mlp) is LeanMlp)
        models.append(model)
    x = torch.randn(8, 5, 16)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t) if hooks else contextlib.nullcontext():
        (y, gx, grads, nodes), (y_ref, gx_ref, grads_ref, _) = (outputs_and_grads(m, x) for m in models)
        names = {type(n).__name__ for n in graph_nodes(models[0](x.requires_grad_()))}
    assert nodes == ["gelu"] and "GeluBackward0" not in names
    for actual, expected in [(y, y_ref), (gx, gx_ref), *((grads[n], grads_ref[n]) for n in grads_ref)]:
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets", [["q", "v"], ["all_linear"]], ids="+".join)
def test_lean_under_bf16_autocast_matches_peft_with_fp32_gradients(targets):
    x = torch.randn(4, 3, 32, 32)
    y, gx, grads, nodes = outputs_and_grads(lean := applied(targets, std=0.05), x, autocast=True)
    y_ref, gx_ref, grads_ref, _ = outputs_and_grads(applied(targets, lean=False, std=0.05), x, autocast=True)
    assert len(nodes) == lean_sites(lean) and "layer_norm" in nodes
    assert y.dtype == torch.bfloat16 and gx.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in grads.values())

    def relative_error(a, b):  # bf16 rounding differs elementwise: compare in norm (measured 0.1% - 3%)
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    assert relative_error(y, y_ref) < 0.03 and relative_error(gx, gx_ref) < 0.03
    assert all(relative_error(grads[n], grads_ref[n]) < 0.05 for n in grads)


def test_fused_qkv_stays_a_view_when_the_model_moves():
    model = applied(["q", "v"])
    qkv = model.base_model.model.blocks[0].attn.qkv
    assert isinstance(qkv, LeanSplitQKV)

    def weights():
        return tuple(c.get_base_layer().weight if isinstance(c, LeanLinear) else c.weight for c in qkv.children())

    assert row_blocks(weights()) is not None
    pointer = weights()[0].data_ptr()
    model.to("cpu")  # converts nothing: the storage (and a backbone shared with other runs) is kept
    assert weights()[0].data_ptr() == pointer
    # Module.to(device or dtype) converts q, k, v each on its own; SplitQKV joins them into one tensor again.
    model.to(torch.float64).to(torch.float32)
    assert row_blocks(weights()) is not None
    assert all(isinstance(w, nn.Parameter) for w in weights())
    assert_same(model, applied(["q", "v"], lean=False), torch.randn(2, 3, 32, 32), lean_used=True)


@pytest.mark.parametrize("targets", [["qkv"], ["q", "v"], ["all_linear"]], ids="+".join)
def test_saved_adapter_is_peft_format_loads_with_peft_and_merges(targets, tmp_path):
    spec = get_method("lora")
    lean, reference = applied(targets), applied(targets, lean=False)
    spec.save(lean, tmp_path / "lean")
    spec.save(reference, tmp_path / "peft")
    saved, saved_ref = load_file(str(tmp_path / "lean" / PEFT_WEIGHTS)), load_file(str(tmp_path / "peft" / PEFT_WEIGHTS))
    assert saved.keys() == saved_ref.keys()
    assert all(torch.equal(saved[k], saved_ref[k]) for k in saved)
    if targets == ["q", "v"]:
        assert "base_model.model.blocks.0.attn.qkv.q.lora_A.weight" in saved

    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = lean.eval()(x)
        loaded = peft.PeftModel.from_pretrained(backbone(targets), str(tmp_path / "lean")).eval()
        torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(spec.merge(lean).eval()(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets", [["q", "v"], ["all_linear"]], ids="+".join)
def test_active_dropout_uses_peft_path_and_inactive_dropout_the_lean_one(targets):
    lean, reference = applied(targets, dropout=0.3), applied(targets, lean=False, dropout=0.3)
    x = torch.randn(2, 3, 32, 32)
    lean.train()
    reference.train()
    torch.manual_seed(2)
    y, _, grads, nodes = outputs_and_grads(lean, x)
    torch.manual_seed(2)
    y_ref, _, grads_ref, _ = outputs_and_grads(reference, x)
    assert nodes == []
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=1e-5)
    for model in (lean, reference):
        model.eval()
        model.zero_grad()
    assert_same(lean, reference, x, lean_used=True)


def test_dora_merged_and_disabled_adapters_use_peft_path():
    dora = applied(["q", "v"], name="dora", lean=False)
    assert not any(isinstance(m, LeanLinear) for m in dora.modules())  # the method is peft's alone
    reference = applied(["q", "v"], name="dora", lean=False)
    assert make_lean(dora) == 4  # q and v of 2 blocks, each falling back
    x = torch.randn(2, 3, 32, 32)
    assert_same(dora, reference, x, lean_used=False)

    lean, reference = applied(["all_linear"]), applied(["all_linear"], lean=False)
    with torch.no_grad():
        lean.merge_adapter()
        reference.merge_adapter()
        assert lean_nodes(lean(x)) == []
        torch.testing.assert_close(lean(x), reference(x), atol=1e-5, rtol=1e-5)
        lean.unmerge_adapter()
        with lean.disable_adapter():
            torch.testing.assert_close(lean(x), backbone()(x), atol=1e-5, rtol=1e-5)


def saved_for_backward(model, x, autocast):
    """Bytes of the distinct storages that one forward saves for backward, parameters aside (they are
    in memory anyway); and the tensors saved."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages, tensors = {}, []

    def pack(t):
        tensors.append(t)
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(x)
    return sum(storages.values()), tensors


class Allocations(TorchDispatchMode):
    """Bytes of the new tensors that ops create (in-place results and views aside)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.bytes += sum(t.untyped_storage().nbytes() for t in tree_leaves(out)
                          if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs)
        return out


def allocated(model, x):
    """Bytes allocated by forward and backward, with a dense output gradient (as a loss's backward gives
    a layer; ``sum()``'s is a broadcast, which the oneDNN kernels copy first), made outside the count."""
    x = x.detach().clone().requires_grad_()
    with Allocations() as allocations:
        out = model(x)
    grad = torch.randn_like(out)
    with allocations:
        out.backward(grad)
    return allocations.bytes


def single_linear(lean):
    torch.manual_seed(0)
    model = peft.get_peft_model(nn.Sequential(nn.Linear(64, 96)), peft.LoraConfig(r=4, target_modules=["0"]))
    if lean:
        assert make_lean(model) == 1
    return model


def weight_copies(model, tensors):
    """Saved tensors shaped like a LoRA layer's base weight (or its transpose) but not a parameter."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {s for m in model.modules() if isinstance(m, PeftLinear)
              for s in (m.get_base_layer().weight.shape, m.get_base_layer().weight.shape[::-1])}
    return [t for t in tensors if t.shape in shapes and t.untyped_storage().data_ptr() not in params]


def test_a_lean_lora_linear_saves_and_allocates_less_and_no_weight_sized_tensor():
    x = torch.randn(8, 64, 64, requires_grad=True)  # 8 tokens per input feature, as in ViT-S at batch 16
    lean, reference = single_linear(True), single_linear(False)
    # Measured: bf16 autocast 69,632 B lean vs 83,200 B peft (peft keeps bf16 copies of W, A and B);
    # fp32 139,264 B both (x and x A^T); allocated by forward + backward in fp32: 546,304 B vs 1,395,200 B
    # (lean's include W + s B A, made in forward and again in backward).
    saved, tensors = saved_for_backward(lean, x, autocast=True)
    saved_ref, tensors_ref = saved_for_backward(reference, x, autocast=True)
    assert saved < saved_ref
    assert not weight_copies(lean, tensors) and weight_copies(reference, tensors_ref)
    saved, tensors = saved_for_backward(lean, x, autocast=False)
    assert saved <= saved_for_backward(reference, x, autocast=False)[0] and not weight_copies(lean, tensors)
    assert allocated(lean, x) < allocated(reference, x) / 2


def test_the_tiny_vit_with_all_linear_saves_and_allocates_less():
    x = torch.randn(16, 3, 32, 32, requires_grad=True)  # 272 tokens, 8.5 per feature: ViT-S at batch 16 has 8
    lean, reference = applied(["all_linear"]), applied(["all_linear"], lean=False)
    # Measured: bf16 autocast 666,688 B lean vs 898,112 B peft saved; fp32 1,151,872 B vs 1,430,400 B
    # (the hooks that count them turn off recomputing inputs from LayerNorm and GELU);
    # allocated by forward + backward in fp32: 3,733,068 B vs 6,913,484 B (with a few weight-sized W + s B A).
    saved, tensors = saved_for_backward(lean, x, autocast=True)
    assert saved < saved_for_backward(reference, x, autocast=True)[0] and not weight_copies(lean, tensors)
    assert saved_for_backward(lean, x, autocast=False)[0] <= saved_for_backward(reference, x, autocast=False)[0]
    assert allocated(lean, x) < 0.6 * allocated(reference, x)


def peak_bytes(model, x):
    """The most memory that forward + backward hold at once beyond what lived before (the profiler's
    allocation events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(x).sum().backward()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_recomputing_layernorm_and_gelu_outputs_lowers_the_peak_below_peft_and_full_fine_tuning():
    x = torch.randn(32, 3, 32, 32)  # 544 tokens: oneDNN's scratchpad (~67 KB, not growing with tokens) aside
    lean, reference = applied(["all_linear"]), applied(["all_linear"], lean=False)
    full = get_method("full").apply(backbone(), method_config_from_dict({"name": "full"}))
    # Measured: 2,046,336 B lean, 2,870,988 B peft, 2,619,668 B full fine-tuning (gradients of all weights)
    assert peak_bytes(lean, x) < 0.8 * min(peak_bytes(reference, x), peak_bytes(full, x))
