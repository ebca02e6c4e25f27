"""Generative PEFT: text-to-image diffusion models fine-tuned with parameter-efficient methods."""
