"""fp32 linear layers on the CPU through oneDNN (medpeft.accel.onednn): nn.Linear's results, gradients
and state dict, with the kernel actually in use."""

from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from medpeft.accel import onednn as layers
from medpeft.accel.lean_lora import LeanLinear
from medpeft.accel.onednn import OneDNNLinear, linear, token_product, use_onednn_linear
from medpeft.config import config_from_dict

pytestmark = pytest.mark.skipif(not layers.available(), reason="this torch has no usable oneDNN linear op")


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        self.counts[str(func)] += 1  # with the overload: mkldnn._linear_pointwise.binary
        return func(*args, **(kwargs or {}))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 40))


def forward_backward(model, x):
    x = x.clone().requires_grad_()
    with Ops() as ops:
        y = model(x)
        y.backward(torch.randn_like(y, generator=torch.Generator().manual_seed(1)))
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads, ops.counts


def test_onednn_linear_gives_nn_linears_outputs_and_gradients_through_onednn():
    x = torch.randn(4, 50, 48)
    reference, fast = mlp(), mlp()
    assert use_onednn_linear(fast) == 2 and all(type(m) is OneDNNLinear for m in fast if not isinstance(m, nn.GELU))
    assert fast.state_dict().keys() == reference.state_dict().keys()
    y, grad_x, grads, ops = forward_backward(reference, x)
    y2, grad_x2, grads2, ops2 = forward_backward(fast, x)
    assert ops2["_linear_pointwise"] == 2 + 2 + 2 and ops2["addmm"] == ops2["mm"] == 0  # forward, grad x, grad W
    assert ops["_linear_pointwise"] == 0
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_x2, grad_x, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        assert grads2[name].shape == grad.shape
        torch.testing.assert_close(grads2[name], grad, rtol=1e-5, atol=1e-5, msg=name)
    again = mlp()
    use_onednn_linear(again)
    y3, grad_x3, grads3, _ = forward_backward(again, x)  # deterministic: bit for bit
    assert torch.equal(y3, y2) and torch.equal(grad_x3, grad_x2)
    assert all(torch.equal(grads3[n], g) for n, g in grads2.items())


def test_frozen_weights_get_no_gradient_and_a_trained_bias_alone_gets_its_own():
    x = torch.randn(2, 10, 48)
    reference, fast = mlp(), mlp()
    use_onednn_linear(fast)
    for model in (reference, fast):
        model.requires_grad_(False)
        model[2].bias.requires_grad_(True)
    _, grad_x, grads, _ = forward_backward(reference, x)
    _, grad_x2, grads2, ops2 = forward_backward(fast, x)
    assert set(grads2) == {"2.bias"} and fast[0].weight.grad is None and fast[2].weight.grad is None
    assert ops2["_linear_pointwise"] == 2 + 2  # forward, and the input gradients only
    torch.testing.assert_close(grads2["2.bias"], grads["2.bias"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_x2, grad_x, rtol=1e-5, atol=1e-5)


def test_under_bf16_autocast_it_is_nn_linear():
    x = torch.randn(2, 10, 48)
    reference, fast = mlp(), mlp()
    use_onednn_linear(fast)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, grad_x, grads, _ = forward_backward(reference, x)
        y2, grad_x2, grads2, ops2 = forward_backward(fast, x)
    assert y2.dtype == torch.bfloat16 and ops2["_linear_pointwise"] == 0  # torch's own bf16 path
    assert torch.equal(y2, y) and torch.equal(grad_x2, grad_x)


@pytest.mark.parametrize("widths", [(8, 96), (96, 8)], ids=["narrow-first", "narrow-second"])
def test_token_product_and_linear_take_transposed_and_sliced_operands(widths):
    torch.manual_seed(0)
    p, q = torch.randn(300, widths[0]), torch.randn(300, 2 * widths[1])[:, ::2]  # q: strided columns
    expected = p.double().t() @ q.double()
    torch.testing.assert_close(token_product(p, q).double(), expected, rtol=1e-5, atol=1e-4)
    wide = torch.randn(40, 130)
    weight = wide[:, 2:66]  # a column slice: neither contiguous nor a transpose of a contiguous tensor
    x = torch.randn(30, 64)
    torch.testing.assert_close(linear(x, weight), x @ weight.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear(x, wide.t()[2:66].t()), x @ weight.t(), rtol=1e-5, atol=1e-5)


def test_a_wide_weights_gradient_sums_token_chunks_in_the_matmuls_epilogue():
    torch.manual_seed(0)
    tokens = 3 * layers.TOKEN_CHUNK + 17  # three chunks
    p, q = torch.randn(tokens, 96), torch.randn(tokens, 72)
    with Ops() as ops:
        product = token_product(p, q)
    torch.testing.assert_close(product.double(), p.double().t() @ q.double(), rtol=1e-5, atol=1e-3)
    assert ops.counts["mkldnn._linear_pointwise.default"] == 1 and ops.counts["mkldnn._linear_pointwise.binary"] == 2
    assert torch.equal(token_product(p, q), product)  # a fixed order of sums: bit for bit
    torch.testing.assert_close(token_product(q, p), product.t(), rtol=1e-5, atol=1e-3)
    with Ops() as ops:  # a rank-8 factor's gradient: one call over every token
        token_product(p[:, :8], q)
    assert ops.counts["mkldnn._linear_pointwise.default"] == 1 and not ops.counts["mkldnn._linear_pointwise.binary"]


@pytest.mark.accel
def test_training_builds_its_linear_layers_on_onednn_and_lean_lora_still_applies(run_config, monkeypatch):
    from medpeft.train import recipe

    converted = []

    def recording(model):
        n = use_onednn_linear(model)
        converted.append((model, n))
        return n

    monkeypatch.setattr(layers, "use_onednn_linear", recording)
    config = {**run_config, "method": {"name": "lora", "targets": ["all_linear"]},
              "train": {**run_config["train"], "epochs": 1}}
    recipe.train(config_from_dict(config), quiet=True)
    (model, n), = converted
    assert n > 0 and not any(type(m) is nn.Linear for m in model.modules())
    lean = [m for m in model.modules() if isinstance(m, LeanLinear)]
    assert lean and all(m.lean_adapter() is not None for m in lean)  # a OneDNNLinear base counts as frozen
    with Ops() as ops:
        model.train()(torch.randn(2, 3, 32, 32)).sum().backward()
    assert ops.counts["_linear_pointwise"] > 0 and not ops.counts["addmm"]
