"""The encoder half of Stable Diffusion's VAE (AutoencoderKL), the same in SD 1.x and SD 2.x.

Module names copy ldm's diffusionmodules/model.py Encoder and autoencoder.AutoencoderKL, so the
`first_stage_model.encoder.*` and `first_stage_model.quant_conv.*` tensors load with strict=True:
  https://github.com/CompVis/stable-diffusion/blob/21f890f9da3cfbeaba8e2ac3c425ee9e998d5229/ldm/modules/diffusionmodules/model.py
SLiMe only encodes images, so the decoder is never built (its tensors are skipped at load time).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import GroupNorm32, attention

# latent = 0.18215 * z: scale_factor in v1-inference.yaml / v2-inference.yaml
# https://github.com/CompVis/stable-diffusion/blob/21f890f9da3cfbeaba8e2ac3c425ee9e998d5229/configs/stable-diffusion/v1-inference.yaml
SCALE_FACTOR = 0.18215


def Normalize(channels, groups):
    # eps 1e-6 throughout the VAE (ldm model.py Normalize)
    return GroupNorm32(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels, groups):
        super().__init__()
        self.norm1 = Normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q, k, v, proj_out are 1x1 convs."""

    def __init__(self, channels, groups):
        super().__init__()
        self.norm = Normalize(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        # each (B, HW, C)
        q, k, v = (conv(y).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))
        out, _ = attention(q, k, v, heads=1)  # scale C^-0.5
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        # ldm: "no asymmetric padding in torch conv, must do it ourselves". Padding right and bottom
        # only; a symmetric padding=1 gives the same shapes but shifts the latent by half a pixel.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


@dataclass
class VAEConfig:
    """ddconfig of first_stage_config in v1/v2-inference.yaml (encoder side)."""

    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    z_channels: int = 4  # double_z: the encoder emits mean and logvar, 2 * z_channels
    embed_dim: int = 4
    num_groups: int = 32


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, ch = cfg.num_groups, cfg.ch
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        widths = [ch * m for m in (1,) + tuple(cfg.ch_mult)]
        for level in range(len(cfg.ch_mult)):
            stage = nn.Module()
            stage.block = nn.ModuleList(
                ResnetBlock(widths[level] if j == 0 else widths[level + 1], widths[level + 1], g)
                for j in range(cfg.num_res_blocks)
            )
            if level != len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(widths[level + 1])
            self.down.append(stage)
        c = widths[-1]
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = (
            ResnetBlock(c, c, g),
            AttnBlock(c, g),
            ResnetBlock(c, c, g),
        )
        self.norm_out = Normalize(c, g)
        self.conv_out = nn.Conv2d(c, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig | None = None):
        super().__init__()
        if cfg is None:  # SD's VAE; a fresh config per model, not one default shared by all
            cfg = VAEConfig()
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)

    def encode(self, images, sample=False, generator=None):
        """images (B, 3, H, W) RGB in [0, 1] -> latents (B, 4, H/8, W/8), already x 0.18215.

        sample=False: the posterior mean. sample=True: mean + std * N(0, I) drawn with `generator`.
        """
        dtype = self.quant_conv.weight.dtype
        moments = self.quant_conv(self.encoder((2 * images - 1).to(dtype))).float()
        mean, logvar = moments.chunk(2, dim=1)
        z = mean
        if sample:  # DiagonalGaussianDistribution: logvar clamped to [-30, 20]
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            z = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device)
        return SCALE_FACTOR * z
