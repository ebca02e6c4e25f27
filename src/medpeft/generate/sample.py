"""Sampling a text-to-image diffusion model with classifier-free guidance, step for step as diffusers'
Stable Diffusion pipeline does (so the same seed gives the same images), in pixel or latent space.

    images = sample(model, ["chest x-ray, pneumonia"] * 4, steps=50, guidance=7.5, seed=0)   # (4, C, H, W) in [0, 1]
"""

from __future__ import annotations

import shutil
from pathlib import Path

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


def write_samples(source: str, prompts: list[str], n: int, out: str | Path, steps: int = 50, guidance: float = 7.5,
                  seed: int = 0, scheduler: str = "ddim") -> int:
    """Sample `n` images of each prompt (prompt i's batch seeded with seed + i) from a run or model `source`
    into the new folder `out`: NNNN.png (8-bit grey, or RGB for a 3-channel model) and prompts.csv (file,
    prompt, seed). The folder appears whole (written beside it, then renamed). Returns the image count."""
    import pandas as pd
    from PIL import Image

    from medpeft.errors import ConfigError
    from medpeft.files import write_text_atomic
    from medpeft.generate.runs import load_source

    out = Path(out)
    if out.exists():
        raise ConfigError(f"--out {out}: exists; choose a new folder")
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
    model = load_source(source)
    for module in model.modules().values():
        module.eval()
    scratch = out.with_name(f".{out.name}.partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    rows = []
    for i, prompt in enumerate(prompts):
        images = sample(model, [prompt] * n, steps=steps, guidance=guidance, seed=seed + i, scheduler=scheduler)
        pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for image in pixels:
            name = f"{len(rows):04d}.png"
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(scratch / name)
            rows.append({"file": name, "prompt": prompt, "seed": seed + i})
    write_text_atomic(scratch / "prompts.csv", pd.DataFrame(rows).to_csv(index=False))
    scratch.rename(out)
    return len(rows)
