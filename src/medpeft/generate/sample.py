"""Sampling a text-to-image diffusion model with classifier-free guidance, step for step as diffusers'
Stable Diffusion pipeline does (so the same seed gives the same images), in pixel or latent space.

    images = sample(model, ["chest x-ray, pneumonia"] * 4, steps=50, guidance=7.5, seed=0)   # (4, C, H, W) in [0, 1]
"""

from __future__ import annotations

import torch

SCHEDULERS = ("ddim", "dpm")


def encode_prompts(model, prompts: list[str]) -> torch.Tensor:
    """The text encoder's last hidden states (N, L, D) of the prompts, padded to the tokenizer's length."""
    tokens = model.tokenizer(prompts, padding="max_length", max_length=model.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
    device = next(model.text_encoder.parameters()).device
    return model.text_encoder(tokens.input_ids.to(device))[0]


def make_scheduler(model, name: str):
    """The model's noise schedule with the sampler `name`: 'ddim' (DDIM, eta 0) or 'dpm' (DPM-Solver++)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    cls = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}[name]
    return cls.from_config(model.scheduler.config)


@torch.no_grad()
def sample(model, prompts: list[str], steps: int = 50, guidance: float = 7.5, seed: int = 0,
           scheduler: str = "ddim", negative_prompt: str = "") -> torch.Tensor:
    """Images (N, C, H, W) in [0, 1] for the prompts: Gaussian noise from a CPU generator seeded with
    `seed`, denoised in `steps` steps; with `guidance` > 1 the noise estimate is
    uncond + guidance * (cond - uncond), uncond that of `negative_prompt`."""
    unet = model.unet
    device, dtype = unet.device, unet.dtype
    embeddings = encode_prompts(model, prompts)
    guided = guidance > 1
    if guided:
        embeddings = torch.cat([encode_prompts(model, [negative_prompt] * len(prompts)), embeddings])
    steps_of = make_scheduler(model, scheduler)
    steps_of.set_timesteps(steps, device=device)
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    latents = torch.randn((len(prompts), unet.config.in_channels, size, size), generator=generator, dtype=dtype)
    latents = latents.to(device) * steps_of.init_noise_sigma
    extra = {"eta": 0.0, "generator": generator} if scheduler == "ddim" else {}
    for t in steps_of.timesteps:
        x = steps_of.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
        noise = unet(x, t, encoder_hidden_states=embeddings.to(dtype)).sample
        if guided:
            uncond, cond = noise.chunk(2)
            noise = uncond + guidance * (cond - uncond)
        latents = steps_of.step(noise, t, latents, **extra).prev_sample
    images = latents if model.vae is None else model.vae.decode(latents / model.vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1)
