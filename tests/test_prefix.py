"""train.frozen_prefix_cache: the frozen part runs once per image, the run ends as an uncached one does,
and methods without a frozen prefix (or augmentation) are refused before anything is written."""

import pytest
import torch

import medpeft
from medpeft.config import config_from_dict
from medpeft.errors import ConfigError
from medpeft.methods import get_method, method_config_from_dict
from medpeft.train.prefix import HEAD, frozen_prefix

from conftest import TINY_VIT, split_scores


def counted_run(config: dict, monkeypatch) -> tuple[dict, int]:
    """The run's metrics and how many images went through the patch embedding (or the CNN stem)."""
    import timm.layers

    seen = []
    original = timm.layers.PatchEmbed.forward

    def counting(self, x):
        seen.append(len(x))
        return original(self, x)

    monkeypatch.setattr(timm.layers.PatchEmbed, "forward", counting)
    metrics = medpeft.train(config_from_dict(config), quiet=True)
    monkeypatch.setattr(timm.layers.PatchEmbed, "forward", original)
    return metrics, sum(seen)


@pytest.mark.parametrize("method", [{"name": "linear_probe"}, {"name": "partial", "blocks": 1}],
                         ids=["linear_probe", "partial"])
def test_a_cached_prefix_runs_once_per_image_and_trains_as_without(run_config, tmp_path, monkeypatch, method):
    run_config.update(method=method, augment={"enabled": False})
    run_config["model"]["drop_path_rate"] = 0.0
    run_config["train"]["epochs"] = 3
    plain, plain_images = counted_run(run_config, monkeypatch)
    run_config["train"]["frozen_prefix_cache"] = True
    run_config["output_dir"] = str(tmp_path / "cached")
    cached, cached_images = counted_run(run_config, monkeypatch)

    n = sum(cached["split_sizes"].values())
    assert cached_images == n  # the prefix, once per image
    assert plain_images > 3 * cached["split_sizes"]["train"]
    for split in ("val", "test"):  # features from eval batches vs training batches: float noise at most
        assert cached[split]["mean_auroc"] == pytest.approx(plain[split]["mean_auroc"], abs=0.02)
    # The saved weights on the whole model (no cache) give the metrics the cached run computed.
    assert split_scores(medpeft.evaluate(tmp_path / "cached", "test")) == cached["test"]


def test_where_the_frozen_prefix_ends():
    from medpeft.backbones import create_backbone
    from medpeft.config import ModelConfig

    def applied(method):
        torch.manual_seed(0)
        model, _ = create_backbone(ModelConfig(**TINY_VIT), num_classes=2)
        return get_method(method["name"]).apply(model, method_config_from_dict(method))

    depth = TINY_VIT["kwargs"]["depth"]
    assert frozen_prefix(applied({"name": "linear_probe"})) == HEAD
    assert frozen_prefix(applied({"name": "partial", "blocks": 1})) == depth - 1
    for method in ({"name": "lora"}, {"name": "full"}, {"name": "vpt_deep"}, {"name": "vpt_shallow"},
                   {"name": "ssf"}, {"name": "norm"}):
        with pytest.raises(ConfigError, match="trains the model from its first block"):
            frozen_prefix(applied(method))


def test_the_cache_is_refused_with_augmentation_or_without_a_frozen_prefix(run_config, tmp_path):
    run_config["train"]["frozen_prefix_cache"] = True
    with pytest.raises(ConfigError, match="augment.enabled: false"):
        medpeft.train(config_from_dict({**run_config, "method": {"name": "linear_probe"}}), quiet=True)
    with pytest.raises(ConfigError, match="first block"):
        medpeft.train(config_from_dict({**run_config, "augment": {"enabled": False}}), quiet=True)  # LoRA
    assert not (tmp_path / "run").exists()


def test_a_cnn_linear_probe_trains_its_head_on_cached_features(run_config, tmp_path):
    from test_cnn_methods import CNNS

    run_config.update(method={"name": "linear_probe"}, augment={"enabled": False})
    run_config["model"] = {"name": "resnet50", "weights": "random", "img_size": 32, "drop_path_rate": 0.0,
                           "kwargs": CNNS["resnet50"]}
    run_config["train"]["frozen_prefix_cache"] = True
    cached = medpeft.train(config_from_dict(run_config), quiet=True)
    assert split_scores(medpeft.evaluate(tmp_path / "run", "test")) == cached["test"]
