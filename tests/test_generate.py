"""Generative PEFT: diffusion models built with diffusers' own classes and saved in its folder layout load
through medpeft; each method trains exactly its parameters; methods that add parameters start as the base
model and merge exactly; a LoRA saved by medpeft loads into diffusers' pipeline and samples the same."""

import re

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from medpeft.config import build  # noqa: E402
from medpeft.errors import CheckpointError, ConfigError  # noqa: E402
from medpeft.generate.methods import GENERATIVE_METHODS, GenerativeMethodConfig, count_parameters  # noqa: E402
from medpeft.generate.model import DiffusionModel, character_tokenizer, encode_prompts, load_diffusion  # noqa: E402
from medpeft.generate.sample import sample  # noqa: E402

PROMPTS = ["chest x-ray, pneumonia", "no finding"]


def tiny_model(seed: int = 0, vae: bool = True) -> DiffusionModel:
    """A latent text-to-image model (16 px images, 8 px latents) of diffusers' and transformers' classes."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = character_tokenizer(32)
    channels = 4 if vae else 1
    unet = UNet2DConditionModel(
        sample_size=8 if vae else 16, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=32, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    autoencoder = AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return DiffusionModel(unet=unet.eval(), scheduler=scheduler, text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                          vae=autoencoder.eval() if vae else None)


def denoise(model: DiffusionModel, seed: int = 1) -> torch.Tensor:
    """The UNet's noise estimate for fixed noisy latents, timesteps and prompts."""
    generator = torch.Generator().manual_seed(seed)
    size, channels = model.unet.config.sample_size, model.unet.config.in_channels
    x = torch.randn(2, channels, size, size, generator=generator)
    with torch.no_grad():
        return model.unet(x, torch.tensor([10, 700]), encoder_hidden_states=encode_prompts(model, PROMPTS)).sample


def pipeline(model: DiffusionModel):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=model.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def method(name: str, **options) -> GenerativeMethodConfig:
    return build(GenerativeMethodConfig, {"name": name, **options})


def trainable(model: DiffusionModel) -> set[str]:
    return {f"{c}.{n}" for c, module in model.modules().items() for n, p in module.named_parameters()
            if p.requires_grad}


def test_a_pipeline_saved_by_diffusers_loads_and_denoises_the_same(tmp_path):
    model = tiny_model()
    pipeline(model).save_pretrained(tmp_path / "sd")  # the layout Stable Diffusion is published in
    loaded = load_diffusion(str(tmp_path / "sd"))
    assert (loaded.channels, loaded.image_size) == (1, 16)
    assert torch.equal(denoise(loaded), denoise(model))
    assert loaded.tokenizer(PROMPTS).input_ids == model.tokenizer(PROMPTS).input_ids

    pixel = tiny_model(vae=False)
    pixel.save(tmp_path / "pixel")
    assert load_diffusion(str(tmp_path / "pixel")).vae is None
    assert torch.equal(denoise(load_diffusion(str(tmp_path / "pixel"))), denoise(pixel))


def test_a_folder_without_the_layout_or_an_unknown_name_is_one_error(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(CheckpointError, match=f"{tmp_path}: not a diffusers model folder .*text_encoder"):
        load_diffusion(str(tmp_path))
    with pytest.raises(ConfigError, match="random:nope: unknown configuration"):
        load_diffusion("random:nope")
    (tmp_path / "sd").mkdir()
    for name in ("unet", "text_encoder", "tokenizer", "scheduler"):
        (tmp_path / "sd" / name).mkdir()
    with pytest.raises(CheckpointError, match="cannot load the diffusion model"):
        load_diffusion(str(tmp_path / "sd"))


def test_a_named_random_model_is_the_same_for_the_same_seed():
    a, b = load_diffusion("random:pixel-64"), load_diffusion("random:pixel-64")
    assert (a.channels, a.image_size) == (1, 64)
    assert all(torch.equal(p, q) for p, q in zip(a.unet.parameters(), b.unet.parameters()))


def test_a_pixel_model_samples_from_clean_image_estimates_clipped_to_the_pixel_range(monkeypatch):
    """As Ho et al.'s DDPM: every step's estimate of the clean image is clipped to [-1, 1] (an untrained model's
    estimates are far outside it), and an unclipped schedule gives other images."""
    from diffusers import DDIMScheduler

    from medpeft.generate.sample import sample

    model = load_diffusion("random:pixel-32-small")
    estimates, step = [], DDIMScheduler.step

    def recording(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        estimates.append(out.pred_original_sample)
        return out
    monkeypatch.setattr(DDIMScheduler, "step", recording)
    clipped = sample(model, ["chest x-ray"] * 2, steps=3, guidance=1.0)
    assert len(estimates) == 3 and all(e.abs().max() <= 1 for e in estimates)
    model.scheduler = DDIMScheduler.from_config(model.scheduler.config, clip_sample=False)
    unclipped = sample(model, ["chest x-ray"] * 2, steps=3, guidance=1.0)
    assert max(e.abs().max() for e in estimates[3:]) > 1 and not torch.allclose(clipped, unclipped)


def _attention_names(component: nn.Module) -> set[str]:
    """The attention projections found by module class, not by name pattern."""
    from diffusers.models.attention_processor import Attention
    from transformers.models.clip.modeling_clip import CLIPAttention

    found = set()
    for name, module in component.named_modules():
        if isinstance(module, Attention):
            layers = {"to_q": module.to_q, "to_k": module.to_k, "to_v": module.to_v, "to_out.0": module.to_out[0]}
        elif isinstance(module, CLIPAttention):
            layers = {n: getattr(module, n) for n in ("q_proj", "k_proj", "v_proj", "out_proj")}
        else:
            continue
        found |= {f"{name}.{layer}.{p}" for layer, m in layers.items() for p, _ in m.named_parameters()}
    return found


def _norm_names(component: nn.Module) -> set[str]:
    return {f"{name}.{p}" for name, m in component.named_modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))
            for p, _ in m.named_parameters()}


def _expected(name: str, component: nn.Module) -> set[str]:
    names = {n for n, _ in component.named_parameters()}
    biases = {n for n in names if n.endswith(".bias")}
    return {"full": names, "attention": _attention_names(component), "bias": biases, "norm": _norm_names(component),
            "norm_bias_attention": _attention_names(component) | biases | _norm_names(component)}[name]


@pytest.mark.parametrize("name", ["full", "attention", "bias", "norm", "norm_bias_attention"])
@pytest.mark.parametrize("components", [["unet"], ["unet", "text_encoder"]])
def test_each_selective_method_trains_exactly_its_parameters(name, components):
    model = tiny_model()
    method(name, components=components).apply(model)
    expected = {f"{c}.{n}" for c in components for n in _expected(name, getattr(model, c))}
    assert trainable(model) == expected and expected
    assert not any(p.requires_grad for p in model.vae.parameters())


def test_added_parameters_are_exactly_the_methods_and_start_as_the_base_model():
    base = denoise(tiny_model())
    convolutions = {n for n, m in tiny_model().unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}

    model = tiny_model()
    method("svdiff").apply(model)
    assert trainable(model) == {f"unet.{n}.parametrizations.weight.0.delta" for n in convolutions}
    assert torch.allclose(denoise(model), base, atol=1e-6)

    model = tiny_model()
    method("difffit").apply(model)
    ends = {n for n in convolutions if re.search(r"(to_out\.0|ff\.net\.2|proj_out|conv2)$", n)}
    norms = _norm_names(model.unet)
    assert ends and trainable(model) == {f"unet.{n}" for n in _expected("bias", model.unet) | norms} | {
        f"unet.{n}.difffit_scale" for n in ends}
    assert torch.equal(denoise(model), base)

    model = tiny_model()
    method("lora", r=2, components=["unet", "text_encoder"]).apply(model)
    names = trainable(model)
    assert names and all(re.search(r"\.(to_q|to_k|to_v|to_out\.0|q_proj|k_proj|v_proj|out_proj)\.lora_[AB]\.default"
                                   r"\.weight$", n) for n in names)
    assert {n.split(".")[0] for n in names} == {"unet", "text_encoder"}
    assert torch.equal(denoise(model), base)  # B starts at zero


def _perturb(model: DiffusionModel, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules().values():
            for p in module.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("name", ["svdiff", "difffit", "lora"])
def test_merging_keeps_the_function_and_gives_the_base_architecture(name):
    model, config = tiny_model(), method(name, components=["unet", "text_encoder"])
    config.apply(model)
    _perturb(model)
    tuned = denoise(model)
    config.merge(model)
    assert torch.allclose(denoise(model), tuned, atol=1e-5)
    assert set(model.unet.state_dict()) == set(tiny_model().unet.state_dict())
    assert set(model.text_encoder.state_dict()) == set(tiny_model().text_encoder.state_dict())
    assert not torch.allclose(tuned, denoise(tiny_model()), atol=1e-3)


@pytest.mark.parametrize("name", ["bias", "svdiff", "difffit", "lora"])
def test_a_saved_adapter_loads_into_a_fresh_model(tmp_path, name):
    model, config = tiny_model(), method(name)
    config.apply(model)
    _perturb(model)
    config.save(model, tmp_path)
    fresh = tiny_model()
    config.apply(fresh)
    config.load(fresh, tmp_path)
    assert torch.equal(denoise(fresh), denoise(model))
    if name != "lora":  # an adapter of another method
        wrong = tiny_model()
        method("norm").apply(wrong)
        with pytest.raises(CheckpointError, match="does not fit the model"):
            method("norm").load(wrong, tmp_path)


def test_a_lora_saved_by_medpeft_loads_into_diffusers_and_samples_the_same(tmp_path):
    model, config = tiny_model(), method("lora", r=4, components=["unet", "text_encoder"])
    config.apply(model)
    _perturb(model)
    config.save(model, tmp_path)
    ours = sample(model, PROMPTS, steps=4, guidance=3.0, seed=7)

    theirs = pipeline(tiny_model())
    theirs.load_lora_weights(tmp_path)
    images = theirs(PROMPTS, num_inference_steps=4, guidance_scale=3.0, output_type="pt",
                    generator=torch.Generator().manual_seed(7)).images
    assert ours.shape == images.shape == (2, 1, 16, 16)
    assert torch.allclose(ours, images, atol=1e-5)
    assert not torch.allclose(ours, sample(tiny_model(), PROMPTS, steps=4, guidance=3.0, seed=7), atol=1e-3)


def test_parameter_counts_are_exact():
    model = tiny_model()
    method("bias").apply(model)
    counts = count_parameters(model)
    biases = sum(p.numel() for n, p in model.unet.named_parameters() if n.endswith(".bias"))
    total = sum(p.numel() for m in (model.unet, model.text_encoder, model.vae) for p in m.parameters())
    assert counts == {"trainable": biases, "total": total, "trainable_percent": 100 * biases / total}


def test_every_method_is_registered_with_a_description():
    assert set(GENERATIVE_METHODS.classes) == {"full", "attention", "bias", "norm", "norm_bias_attention", "lora",
                                              "svdiff", "difffit"}
    assert all(cls.description and cls.reference for cls in GENERATIVE_METHODS.classes.values())
    with pytest.raises(ConfigError, match="method.components"):
        method("lora", components=["vae"])
