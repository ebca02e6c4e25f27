import pytest
import torch
from safetensors.torch import load_file

import medpeft
from medpeft.config import TrainConfig, config_from_dict
from medpeft.engine.assemble import build_model
from medpeft.engine.loop import build_scheduler
from medpeft.train.components import build_optimizer


def lora_model(run_config):
    return build_model(config_from_dict(run_config)).model


def group_of(optimizer, model, suffix):
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if names[id(p)].endswith(suffix):
                return group
    raise AssertionError(f"no trainable parameter ends with {suffix}")


def test_layer_decay_scales_lr_by_depth_through_the_peft_wrapper(run_config):
    model = lora_model(run_config)
    optimizer = build_optimizer(model, TrainConfig(layer_decay=0.5, lr=1.0))
    # 2 blocks: layers are stem 0, blocks 1-2, head 3 -> scales 0.5**2, 0.5**1, 1
    assert group_of(optimizer, model, "blocks.0.attn.qkv.lora_A.default.weight")["lr_scale"] == 0.25
    assert group_of(optimizer, model, "blocks.1.attn.qkv.lora_A.default.weight")["lr_scale"] == 0.5
    assert group_of(optimizer, model, "head.modules_to_save.default.weight")["lr_scale"] == 1.0
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable


def test_no_weight_decay_for_norms_biases_and_embeddings(run_config):
    run_config["method"] = {"name": "full"}
    model = lora_model(run_config)
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.05))
    for name in ("pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "head.bias"):
        assert group_of(optimizer, model, name)["weight_decay"] == 0.0, name
    for name in ("blocks.0.attn.qkv.weight", "head.weight", "patch_embed.proj.weight"):
        assert group_of(optimizer, model, name)["weight_decay"] == 0.05, name


def test_schedule_warms_up_linearly_then_decays_by_cosine(run_config):
    model = lora_model(run_config)
    cfg = TrainConfig(lr=1.0, min_lr=0.0, warmup_epochs=1, epochs=3)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=10)
    lrs = []
    for step in range(1, 31):
        scheduler.step_update(step)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[4] == pytest.approx(0.5) and lrs[9] == pytest.approx(1.0)
    assert lrs[19] == pytest.approx(0.5, abs=1e-6) and lrs[29] == pytest.approx(0.0, abs=1e-6)


def test_gradient_accumulation_matches_one_larger_batch(run_config, tmp_path):
    run_config["method"] = {"name": "full"}
    run_config["model"]["drop_path_rate"] = 0.0
    run_config["train"].update(epochs=1, batch_size=8, warmup_epochs=0)
    medpeft.train(config_from_dict(run_config), quiet=True)
    run_config["train"].update(batch_size=4, grad_accum_steps=2)
    run_config["output_dir"] = str(tmp_path / "accumulated")
    medpeft.train(config_from_dict(run_config), quiet=True)
    one = load_file(str(tmp_path / "run" / "weights" / "adapter.safetensors"))
    two = load_file(str(tmp_path / "accumulated" / "weights" / "adapter.safetensors"))
    for name, value in one.items():  # Adam moves each weight by ~lr = 3e-3 a step; float noise stays below 1% of it
        torch.testing.assert_close(two[name], value, rtol=1e-4, atol=3e-5)
    initial = build_model(config_from_dict(run_config)).model.state_dict()
    moved = sum(not torch.equal(initial[n], v) for n, v in one.items())
    assert moved > len(one) // 2  # the step really changed the weights
