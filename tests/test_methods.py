import pytest
import torch
from peft import PeftModel

from medpeft.backbones import SplitQKV, create_backbone
from medpeft.config import ModelConfig
from medpeft.errors import ConfigError
from medpeft.methods import get_method, method_config_from_dict

from conftest import TINY_VIT


def tiny():
    return create_backbone(ModelConfig(**TINY_VIT), num_classes=3)[0]


def applied(method: dict):
    model = tiny()
    config = method_config_from_dict(method)
    return get_method(config.name).apply(model, config)


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_full_fine_tuning_trains_every_parameter():
    model = applied({"name": "full"})
    assert trainable_names(model) == {n for n, _ in model.named_parameters()}


def test_linear_probe_trains_the_head_only():
    assert trainable_names(applied({"name": "linear_probe"})) == {"head.weight", "head.bias"}


def test_lora_on_fused_qkv_trains_lora_factors_and_head_only():
    names = trainable_names(applied({"name": "lora", "r": 4}))
    expected = {f"base_model.model.blocks.{b}.attn.qkv.lora_{ab}.default.weight" for b in (0, 1) for ab in "AB"}
    expected |= {f"base_model.model.head.modules_to_save.default.{w}" for w in ("weight", "bias")}
    assert names == expected


def test_lora_q_v_only_leaves_key_projection_frozen():
    model = applied({"name": "lora", "r": 4, "targets": ["q", "v"]})
    names = trainable_names(model)
    assert any(".attn.qkv.q.lora_A." in n for n in names)
    assert any(".attn.qkv.v.lora_B." in n for n in names)
    assert not any(".attn.qkv.k." in n for n in names)
    assert isinstance(model.get_base_model().blocks[0].attn.qkv, SplitQKV)


def test_lora_proj_target_does_not_hit_patch_embedding_projection():
    model = applied({"name": "lora", "targets": ["proj", "mlp"]})
    names = trainable_names(model)
    assert not any("patch_embed" in n for n in names)
    assert sum(".attn.proj.lora_A." in n for n in names) == 2
    assert sum(".mlp.fc2.lora_B." in n for n in names) == 2


def test_lora_with_zero_initialised_b_gives_the_base_model_outputs():
    torch.manual_seed(1)
    base = tiny().eval()
    x = torch.randn(4, 3, 32, 32)
    expected = base(x)
    for targets in (["qkv"], ["q", "v"], ["all_linear"]):
        config = method_config_from_dict({"name": "lora", "r": 4, "targets": targets})
        model = get_method("lora").apply(tiny_copy(base), config).eval()
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)


def tiny_copy(model):
    clone = tiny()
    clone.load_state_dict(model.state_dict())
    return clone


def perturb_lora(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("targets", [["qkv"], ["q", "v"], ["all_linear"]])
def test_saved_lora_adapter_reloads_through_peft_to_the_same_outputs(tmp_path, targets):
    spec = get_method("lora")
    config = method_config_from_dict({"name": "lora", "r": 4, "targets": targets})
    torch.manual_seed(2)
    base = tiny()
    model = spec.apply(tiny_copy(base), config).eval()
    perturb_lora(model)
    x = torch.randn(3, 3, 32, 32)
    expected = model(x)
    spec.save(model, tmp_path)
    fresh = tiny_copy(base)
    if "q" in targets:  # the adapter targets the split projections that medpeft builds
        from medpeft.backbones import split_qkv
        split_qkv(fresh)
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path)).eval()
    torch.testing.assert_close(reloaded(x), expected, rtol=1e-5, atol=1e-6)  # lean LoRA: x (W + s B A)^T in fp32


def test_lora_merge_gives_the_same_outputs_and_the_backbone_structure():
    spec = get_method("lora")
    model = spec.apply(tiny(), method_config_from_dict({"name": "lora", "targets": ["q", "v"]})).eval()
    perturb_lora(model)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    merged = spec.merge(model)
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)
    assert [n for n, _ in merged.named_modules()] == [n for n, _ in tiny().named_modules()]


def test_unknown_method_and_target_are_config_errors():
    with pytest.raises(ConfigError, match="method.name 'lorax' is not a known method"):
        method_config_from_dict({"name": "lorax"})
    with pytest.raises(ConfigError, match=r"method.targets \['query'\]"):
        method_config_from_dict({"name": "lora", "targets": ["query"]})
    with pytest.raises(ConfigError, match="config key 'method.rank' does not exist"):
        method_config_from_dict({"name": "lora", "rank": 4})


def test_lora_adapter_of_vit_base_is_well_under_5_mb(tmp_path):
    model = create_backbone(ModelConfig(name="vit_base_patch16_224", weights="random"), num_classes=14)[0]
    spec = get_method("lora")
    spec.save(spec.apply(model, method_config_from_dict({"name": "lora", "r": 8})), tmp_path)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert size < 1.5e6  # 12 blocks x r 8 x (768 + 2304) x 4 bytes + head = 1.2 MB


ADALORA = {"name": "adalora", "init_r": 4, "target_r": 2, "total_step": 6, "warmup_fraction": 0.0, "final_fraction": 0.5}


def train_with_hooks(model, hooks, steps, before_step=lambda step: None):
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 2, (8, 3)).float()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        before_step(step)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y) + hooks.loss(model)
        loss.backward()
        optimizer.step()
        hooks.after_step(model, step)
        optimizer.zero_grad()


def test_adalora_prunes_to_its_budget_and_reloads_at_the_pruned_ranks(tmp_path):
    spec = get_method("adalora")
    torch.manual_seed(0)
    model = applied(ADALORA)
    train_with_hooks(model, spec.hooks, 6)
    pattern = model.peft_config["default"].rank_pattern
    assert len(pattern) == 2 and sum(sum(kept) for kept in pattern.values()) == 2 * 2  # target_r x layers
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(x)
    spec.save(model, tmp_path)
    torch.manual_seed(0)
    fresh = applied(ADALORA)
    spec.load(fresh, tmp_path)
    ranks = [m.lora_E["default"].shape[0] for name, m in fresh.named_modules() if name.endswith("attn.qkv")]
    assert sum(ranks) == 4
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), expected, rtol=0, atol=1e-6)


def test_adalora_orthogonality_penalty_is_zero_for_orthonormal_factors():
    hooks = get_method("adalora").hooks
    model = applied(ADALORA)
    assert hooks.loss(model) > 0.1
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.copy_(torch.eye(*p.shape))
            elif ".lora_B." in name:
                p.copy_(torch.eye(*p.shape))
    assert hooks.loss(model).item() == pytest.approx(0.0, abs=1e-6)


def test_adalora_needs_a_rank_allocation_phase():
    with pytest.raises(ConfigError, match="no rank-allocation phase"):
        applied({**ADALORA, "total_step": 2, "warmup_fraction": 0.5, "final_fraction": 0.49})
    with pytest.raises(ConfigError, match="total_step is unset"):
        applied({**ADALORA, "total_step": None})


def test_adalora_training_state_round_trips_for_an_exact_resume():
    """The rank allocator's importance averages matter: restored, training continues exactly; reset, it does not."""
    hooks = get_method("adalora").hooks
    config = {**ADALORA, "init_r": 8, "total_step": 20, "final_fraction": 0.2}

    def train(resume: str):
        torch.manual_seed(0)
        model = applied(config)

        def interrupt(step):
            if step == 6 and resume != "none":
                state = hooks.state_dict(model)
                model.base_model.rankallocator.reset_ipt()
                model.peft_config["default"].rank_pattern = None
                if resume == "restored":
                    hooks.load_state_dict(model, state)

        train_with_hooks(model, hooks, 20, interrupt)
        return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])

    uninterrupted = train("none")
    assert torch.equal(train("restored"), uninterrupted)
    assert not torch.allclose(train("reset"), uninterrupted)


def test_boft_on_one_butterfly_factor_is_quiet_and_more_factors_need_the_cuda_extension(recwarn):
    """peft silently trains one butterfly factor when its CUDA extension cannot be built: refused here."""
    model = applied({"name": "boft", "block_size": 4})
    assert any("boft_R" in n for n in trainable_names(model))
    assert not [w for w in recwarn if "CUDA extension" in str(w.message)]
    built = all(m.fbd_cuda_available for m in model.modules() if hasattr(m, "fbd_cuda_available"))
    if built:
        pytest.skip("peft's BOFT CUDA extension builds on this machine")
    with pytest.raises(ConfigError, match="method.butterfly_factor 2: peft's BOFT trains more than one butterfly"):
        applied({"name": "boft", "block_size": 4, "butterfly_factor": 2})
