"""Masked autoencoder (He et al. 2022) around a timm VisionTransformer encoder.

The encoder is an ordinary timm ViT, so what it learns loads into ``medpeft train`` as it is;
``mae_state_dict`` lays the weights out as the MAE / MRM / medical MAE checkpoints do: the encoder's
keys at the top level (``patch_embed.*``, ``cls_token``, ``pos_embed``, ``blocks.*``, ``norm.*``)
beside ``mask_token`` and the ``decoder_*`` keys. Position embeddings are fixed 2-D sin-cos, as in MAE.
"""

from __future__ import annotations

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from medpeft.config import MAEConfig
from medpeft.errors import ConfigError


def _sincos(grid: tuple[int, int], dim: int, prefix: int) -> torch.Tensor:
    """(1, prefix + H*W, dim): zeros for the prefix tokens, then 2-D sin-cos of each patch position."""
    patches = build_sincos2d_pos_embed(list(grid), dim)
    return torch.cat([torch.zeros(prefix, dim), patches]).unsqueeze(0)


class MaskedAutoencoder(nn.Module):
    """``forward(images, mask_ratio)`` returns (loss, predicted patches (B, N, p*p*C), mask (B, N): 1 = hidden)."""

    def __init__(self, encoder: nn.Module, config: MAEConfig, fixed_pos_embed: bool = True):
        super().__init__()
        if not isinstance(encoder, VisionTransformer) or encoder.pos_embed is None or encoder.dynamic_img_size:
            raise ConfigError("MAE pretraining needs a timm VisionTransformer with absolute position embeddings "
                              f"at a fixed image size, not {type(encoder).__name__}")
        self.encoder = encoder
        self.norm_pix_loss = config.norm_pix_loss
        patch = encoder.patch_embed.patch_size
        self.patch_size = patch[0]
        self.in_chans = encoder.patch_embed.proj.in_channels
        grid = encoder.patch_embed.grid_size
        # Prefix tokens (class, registers) that have their own position embedding rows.
        self.pos_prefix = 0 if encoder.no_embed_class else encoder.num_prefix_tokens
        if fixed_pos_embed:  # MAE's fixed sin-cos embedding; a loaded checkpoint keeps its own
            with torch.no_grad():
                encoder.pos_embed.copy_(_sincos(grid, encoder.embed_dim, self.pos_prefix))
        encoder.pos_embed.requires_grad_(False)

        dim, prefix = config.decoder_embed_dim, encoder.num_prefix_tokens
        self.decoder_embed = nn.Linear(encoder.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = nn.Parameter(_sincos(grid, dim, prefix), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(dim, config.decoder_num_heads, qkv_bias=True) for _ in range(config.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, patch[0] * patch[1] * self.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        for name, module in self.named_modules():
            if name.startswith("decoder") and isinstance(module, nn.Linear):  # MAE's decoder init
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token", *(f"encoder.{k}" for k in self.encoder.no_weight_decay())}

    def mae_state_dict(self) -> dict[str, torch.Tensor]:
        """Encoder keys at the top level plus the decoder's: the layout MAE checkpoints use under 'model'."""
        return {k.removeprefix("encoder."): v.detach().clone() for k, v in self.state_dict().items()}

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C), patches in row-major order, pixels (p, p, C) within a patch."""
        p, (b, c, h, w) = self.patch_size, images.shape
        x = images.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        p, c = self.patch_size, self.in_chans
        gh, gw = self.encoder.patch_embed.grid_size
        x = patches.reshape(patches.shape[0], gh, gw, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(patches.shape[0], c, gh * p, gw * p)

    def encode(self, images: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None):
        """Encode a random (1 - mask_ratio) share of each image's patches.

        Returns tokens (B, prefix + kept, D), mask (B, N) with 1 for hidden patches, and the
        permutation that puts shuffled patches back in order.
        """
        enc = self.encoder
        x = enc.patch_embed(images)
        b, n, d = x.shape
        x = x + enc.pos_embed[:, self.pos_prefix:]
        keep = max(1, int(n * (1 - mask_ratio)))
        noise = torch.rand(b, n, device=x.device, generator=generator)
        shuffle = noise.argsort(dim=1)
        restore = shuffle.argsort(dim=1)
        x = x.gather(1, shuffle[:, :keep, None].expand(-1, -1, d))
        mask = torch.ones(b, n, device=x.device)
        mask[:, :keep] = 0
        mask = mask.gather(1, restore)

        prefix = [t.expand(b, -1, -1) for t in (enc.cls_token, enc.reg_token) if t is not None]
        if prefix:
            prefix = torch.cat(prefix, dim=1)
            if self.pos_prefix:
                prefix = prefix + enc.pos_embed[:, :self.pos_prefix]
            x = torch.cat([prefix, x], dim=1)
        x = enc.norm_pre(enc.pos_drop(x))
        x = enc.norm(enc.blocks(x))
        return x, mask, restore

    def decode(self, tokens: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        prefix = self.encoder.num_prefix_tokens
        x = self.decoder_embed(tokens)
        b, n = restore.shape
        hidden = self.mask_token.expand(b, n - (x.shape[1] - prefix), -1)
        patches = torch.cat([x[:, prefix:], hidden], dim=1)
        patches = patches.gather(1, restore[..., None].expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :prefix], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, prefix:]

    def target(self, images: torch.Tensor) -> torch.Tensor:
        target = self.patchify(images)
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward(self, images: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None):
        tokens, mask, restore = self.encode(images, mask_ratio, generator)
        pred = self.decode(tokens, restore)
        per_patch = ((pred.float() - self.target(images)) ** 2).mean(-1)
        loss = (per_patch * mask).sum() / mask.sum()  # mean over hidden patches only
        return loss, pred, mask
