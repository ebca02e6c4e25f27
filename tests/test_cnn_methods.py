"""The method contract on small CNNs of the three families the issue names (resnet, densenet, convnext)."""

import pytest
import torch

from medpeft.backbones import create_backbone
from medpeft.config import model_family as family
from medpeft.config import ModelConfig
from medpeft.methods import get_method, list_methods, method_config_from_dict

from conftest import split_scores

CNNS = {
    "resnet50": {"layers": (1, 1, 1, 1), "channels": (8, 16, 32, 64), "stem_width": 8, "base_width": 16},
    "densenet121": {"growth_rate": 8, "block_config": (1, 1, 1, 1), "bn_size": 2},
    "convnext_tiny": {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)},
}
CNN_METHODS = [m.name for m in list_methods() if "cnn" in m.families]
SETTINGS = {"lora": {"targets": ["convs"], "r": 2}}


def build(name):
    torch.manual_seed(0)
    return create_backbone(ModelConfig(name=name, weights="random", img_size=32, drop_path_rate=0.0,
                                       kwargs=CNNS[name]), num_classes=3)[0]


def applied(model_name, method):
    spec = get_method(method)
    return spec, spec.apply(build(model_name), method_config_from_dict({"name": method, **SETTINGS.get(method, {})}))


def test_the_six_cnn_methods_are_registered():
    assert sorted(CNN_METHODS) == ["bitfit", "full", "linear_probe", "lora", "norm", "ssf"]
    assert all(family(name) == "cnn" for name in CNNS) and family("vit_base_patch16_224") == "vit"


def expected_trainable(method, name, module_of, classifier):
    if method == "full":
        return True
    if name.startswith(classifier) or ".modules_to_save." in name:
        return True
    if method == "bitfit":
        return name.endswith(".bias")
    if method == "norm":
        return "norm" in type(module_of(name)).__name__.lower()
    if method == "lora":
        return ".lora_" in name
    if method == "ssf":
        return ".ssf_" in name
    return False  # linear_probe


@pytest.mark.parametrize("model_name", CNNS)
@pytest.mark.parametrize("method", CNN_METHODS)
def test_cnn_method_contract(model_name, method, tmp_path):
    spec, model = applied(model_name, method)
    classifier = build(model_name).pretrained_cfg["classifier"] + "."
    modules = dict(model.named_modules())

    def module_of(param_name):
        return modules[param_name.rsplit(".", 1)[0]]

    for name, param in model.named_parameters():
        assert param.requires_grad == expected_trainable(method, name, module_of, classifier), name

    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 2, (4, 3)).float()
    model.eval()  # BatchNorm statistics fixed: the loss change is the optimiser's alone
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = loss_fn(model(x), y)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = model(x)
        assert loss_fn(after, y) < before

    spec.save(model, tmp_path)
    _, fresh = applied(model_name, method)
    spec.load(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), after, rtol=0, atol=0)
        if spec.merge is not None:
            merged = spec.merge(model).eval()
            torch.testing.assert_close(merged(x), after, rtol=1e-5, atol=1e-5)
            reference = build(model_name)
            assert [type(m) for m in merged.modules()] == [type(m) for m in reference.modules()]
            assert {k: v.shape for k, v in merged.state_dict().items()} == \
                {k: v.shape for k, v in reference.state_dict().items()}


@pytest.mark.parametrize("method", [{"name": "linear_probe"}, {"name": "lora", "targets": ["convs"], "r": 2}])
def test_a_reloaded_cnn_run_has_its_batchnorm_statistics(run_config, tmp_path, method):
    """Training moves BatchNorm's running statistics even in a frozen backbone: the run must keep them."""

    import medpeft
    from medpeft.config import config_from_dict

    run_config["model"] = {"name": "resnet50", "weights": "random", "img_size": 32, "drop_path_rate": 0.0,
                           "kwargs": CNNS["resnet50"]}
    run_config["method"] = method
    metrics = medpeft.train(config_from_dict(run_config), quiet=True)
    assert (tmp_path / "run" / "weights" / "running_stats.safetensors").is_file()
    run = medpeft.load_run(tmp_path / "run")
    bn = run.model.get_submodule("base_model.model.bn1" if method["name"] == "lora" else "bn1")
    assert bn.running_var.abs().sub(1).abs().max() > 1e-3  # not the fresh statistics (mean 0, variance 1)
    assert split_scores(medpeft.evaluate(tmp_path / "run", "test")) == metrics["test"]
