"""Sampling a text-to-image diffusion model with classifier-free guidance, step for step as diffusers'
Stable Diffusion pipeline does (so the same seed gives the same images), in pixel or latent space.

    images = sample(model, ["chest x-ray, pneumonia"] * 4, steps=50, guidance=7.5, seed=0)   # (4, C, H, W) in [0, 1]
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from medpeft.generate.model import encode_prompts

SCHEDULERS = ("ddim", "dpm")


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


def write_samples(source: str, prompts: list[str], out: str | Path, steps: int = 50, guidance: float = 7.5,
                  seed: int = 0, scheduler: str = "ddim", batch_size: int = 32, columns=None) -> int:
    """One image per prompt from a run or model `source` into the new folder `out`, batch b of `batch_size`
    prompts seeded with seed + b: NNNN.png (8-bit grey, or RGB for a 3-channel model) and prompts.csv
    (path, prompt, seed, and the `columns` frame's columns, one row per prompt). The folder appears
    whole (written beside it, then renamed). Returns the image count."""
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
    for b in range(0, len(prompts), batch_size):
        batch = prompts[b:b + batch_size]
        images = sample(model, batch, steps=steps, guidance=guidance, seed=seed + b // batch_size, scheduler=scheduler)
        pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for prompt, image in zip(batch, pixels):
            name = f"{len(rows):04d}.png"
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(scratch / name)
            rows.append({"path": name, "prompt": prompt, "seed": seed + b // batch_size})
    table = pd.DataFrame(rows)
    if columns is not None:
        table = pd.concat([table, columns.reset_index(drop=True)], axis=1)
    write_text_atomic(scratch / "prompts.csv", table.to_csv(index=False))
    scratch.rename(out)
    return len(rows)


def like_split(run: str | Path, split: str, n: int = 1):
    """Prompts and label columns for a synthetic copy of a generate run's split: each of its images' prompt
    `n` times, with its labels and a synthetic patient id per generated image (``synthetic-NNNN``), so
    that prompts.csv is a labels CSV that ``medpeft train`` reads (data.csv, path and patient_id columns)."""
    from medpeft.data import read_split_dataset
    from medpeft.errors import ConfigError
    from medpeft.generate.runs import load_run_config
    from medpeft.generate.train import prompts_of

    config = load_run_config(run)
    if config.prompt.column is not None:
        raise ConfigError(f"--like: {run} makes its prompts from a text column, not from labels")
    table = read_split_dataset(config.data)
    rows = table[table["split"] == split]
    if rows.empty:
        raise ConfigError(f"--like {split}: {run}'s data have no {split} images")
    rows = rows.loc[rows.index.repeat(n)].reset_index(drop=True)
    labels = rows[list(config.data.labels)].astype(int)
    labels.insert(0, "patient_id", [f"synthetic-{i:04d}" for i in range(len(rows))])
    return prompts_of(rows, config), labels
