"""The contract every registered method keeps, checked on a tiny ViT: exactly the intended parameters
train, one optimiser step lowers the loss, save -> load onto a fresh backbone reproduces the outputs,
and merge (where claimed) gives the same outputs with the backbone's exact module structure."""

import re

import pytest
import torch

from medpeft.backbones import create_backbone
from medpeft.config import ModelConfig
from medpeft.methods import get_method, list_methods, method_config_from_dict

from conftest import TINY_VIT

# What each method trains, by parameter name (of the applied model). A new method must add itself here.
HEAD = r"base_model\.model\.head\.modules_to_save\.default\.(weight|bias)"
INTENDED = {
    "full": r".*",
    "linear_probe": r"head\.(weight|bias)",
    "lora": r".*(lora_[AB]\.default\.weight|head\.modules_to_save\.default\.(weight|bias))",
    "rslora": r".*(lora_[AB]\.default\.weight|head\.modules_to_save\.default\.(weight|bias))",
    "dora": r".*(lora_[AB]\.default\.weight|lora_magnitude_vector\.default\.weight"
            r"|head\.modules_to_save\.default\.(weight|bias))",
    "partial": r"(blocks\.1\..*|norm\.(weight|bias)|head\.(weight|bias))",
    "bitfit": r".*\.bias|head\.weight",
    "norm": r"(blocks\.\d+\.norm[12]|norm|head)\.(weight|bias)",
    "ssf": r".*\.ssf_(scale|shift)|head\.(weight|bias)",
    "adalora": HEAD + r"|.*\.attn\.qkv\.lora_[ABE]\.default",
    "loha": HEAD + r"|.*\.attn\.qkv\.hada_w[12]_[ab]\.default",
    "lokr": HEAD + r"|.*\.attn\.qkv\.lokr_w[12]\.default",
    "ia3": HEAD + r"|.*\.(attn\.qkv|mlp\.fc2)\.ia3_l\.default",
    "vera": HEAD + r"|.*\.attn\.qkv\.vera_lambda_[bd]\.default",
    "oft": HEAD + r"|.*\.attn\.qkv\.oft_R\.default\.weight",
    "boft": HEAD + r"|.*\.attn\.qkv\.boft_[Rs]\.default",
    "fourierft": HEAD + r"|.*\.attn\.qkv\.fourierft_spectrum\.default",
    "adapter": r"blocks\.\d+\.(attn|mlp)\.adapter\.(down|up)\.(weight|bias)|head\.(weight|bias)",
    "adaptformer": r"blocks\.\d+\.mlp\.adapter\.(down|up)\.(weight|bias)|head\.(weight|bias)",
    "vpt_shallow": r"vpt_prompts|head\.(weight|bias)",
    "vpt_deep": r"vpt_prompts|head\.(weight|bias)",
    "fact_tt": r"fact_[uvc]|head\.(weight|bias)",
}
# Sizes for the tiny ViT (width 32).
SETTINGS = {"adalora": {"total_step": 10}, "partial": {"blocks": 1}, "vera": {"r": 8}, "oft": {"block_size": 8}, "fourierft": {"n_frequency": 100},
            "adapter": {"hidden": 8}, "adaptformer": {"hidden": 8}, "vpt_shallow": {"tokens": 4}, "vpt_deep": {"tokens": 2},
            "fact_tt": {"r": 4}}
METHODS = [spec.name for spec in list_methods()]


def backbone():
    torch.manual_seed(0)
    return create_backbone(ModelConfig(**{**TINY_VIT, "drop_path_rate": 0.0}), num_classes=3)[0]


def applied(name):
    spec = get_method(name)
    return spec, spec.apply(backbone(), method_config_from_dict({"name": name, **SETTINGS.get(name, {})}))


def test_every_registered_method_is_in_the_contract():
    assert set(METHODS) == set(INTENDED)


@pytest.mark.parametrize("name", METHODS)
def test_exactly_the_intended_parameters_are_trainable(name):
    _, model = applied(name)
    pattern = re.compile(INTENDED[name])
    for param_name, param in model.named_parameters():
        assert param.requires_grad == bool(pattern.fullmatch(param_name)), param_name
    assert any(p.requires_grad for p in model.parameters())


def one_step(model):
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 2, (8, 3)).float()
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.eval()
    before = loss_fn(model(x), y)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss_fn(model(x), y)
    return before.item(), after.item()


@pytest.mark.parametrize("name", METHODS)
def test_one_optimiser_step_lowers_the_loss(name):
    _, model = applied(name)
    before, after = one_step(model)
    assert after < before


@pytest.mark.parametrize("name", METHODS)
def test_save_then_load_onto_a_fresh_backbone_gives_identical_outputs(name, tmp_path):
    spec, model = applied(name)
    one_step(model)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(x)
    spec.save(model, tmp_path)
    _, fresh = applied(name)
    with torch.no_grad():
        assert not torch.equal(fresh.eval()(x), expected)
    spec.load(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", [n for n in METHODS if get_method(n).merge is not None])
def test_merge_gives_equal_outputs_and_the_backbone_structure(name):
    spec, model = applied(name)
    one_step(model)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(x)
        merged = spec.merge(model).eval()
        torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)
    reference = backbone()
    assert [(n, type(m)) for n, m in merged.named_modules()] == [(n, type(m)) for n, m in reference.named_modules()]
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert not any(m._forward_hooks for m in merged.modules())


@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_end_to_end_through_the_recipe(name, run_config):
    import medpeft
    from medpeft.config import config_from_dict

    run_config["method"] = {"name": name, **SETTINGS.get(name, {})}
    run_config["train"]["epochs"] = 1
    metrics = medpeft.train(config_from_dict(run_config), quiet=True)
    assert metrics["method"] == name and metrics["val"]["mean_auroc"] is not None
    assert 0 < metrics["parameters"]["trainable"] <= metrics["parameters"]["backbone"] + 10_000


def test_methods_command_lists_every_method():
    import json

    from typer.testing import CliRunner

    from medpeft.cli import app

    listed = json.loads(CliRunner().invoke(app, ["methods", "--json"]).output)
    assert [m["name"] for m in listed] == METHODS
    assert {m["name"]: m["merges"] for m in listed}["ssf"] is True
    assert {m["name"]: m["merges"] for m in listed}["full"] is True  # its own weights: nothing to fold
    assert {m["name"]: m["merges"] for m in listed}["vpt_deep"] is False


@pytest.mark.parametrize("name", ["ssf", "adapter", "adaptformer", "lora", "dora", "ia3", "fact_tt"])
def test_identity_initialised_methods_start_at_the_backbone_function(name):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = backbone().eval()(x)
        _, model = applied(name)
        torch.testing.assert_close(model.eval()(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["vpt_shallow", "vpt_deep"])
def test_vpt_prompts_reach_the_blocks_but_not_the_pooled_tokens(name):
    _, model = applied(name)
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda block, args: seen.append(args[0].shape[1]))
    tokens = model.forward_features(torch.randn(2, 3, 32, 32))
    prompts = SETTINGS[name]["tokens"]
    assert seen == [1 + 16 + prompts] and tokens.shape[1] == 1 + 16
