"""The Stable Diffusion UNet (SD 1.x and SD 2.x), with attention maps as return values.

Module names copy ldm's openaimodel.UNetModel, so the `model.diffusion_model.*` tensors of an
original single-file checkpoint load with strict=True after stripping that prefix:
  https://github.com/CompVis/stable-diffusion/blob/21f890f9da3cfbeaba8e2ac3c425ee9e998d5229/ldm/modules/diffusionmodules/openaimodel.py
  https://github.com/Stability-AI/stablediffusion/blob/cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf/ldm/modules/diffusionmodules/openaimodel.py
`unet(x_t, t, context, attn_layers=[...])` returns (eps, maps): maps[name] is the head-averaged
attention probability of that layer, keyed by its checkpoint path, e.g.
"output_blocks.6.1.transformer_blocks.0.attn2". The release's diffusers names map as:
down_blocks[i].attentions[j] = input_blocks.{3i+j+1}.1, mid_block.attentions[0] = middle_block.1,
up_blocks[i].attentions[j] = output_blocks.{3i+j}.1.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import AttentionMaps, CrossAttention, GroupNorm32, LayerNorm32


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding, cos first: ldm's diffusionmodules/util.py timestep_embedding (fp32)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ----------------------------------------------------------------------------- blocks
class ResBlock(nn.Module):
    def __init__(self, channels, emb_channels, out_channels, groups):
        super().__init__()
        # Sequential slots without parameters (SiLU, Dropout) keep their index so the keys read
        # in_layers.0/.2, emb_layers.1, out_layers.0/.3 as in the checkpoint. GroupNorm32: eps 1e-5
        # (ldm normalization()).
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels),
            nn.SiLU(),
            nn.Identity(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x, emb, context=None, record=None):
        h = self.in_layers(x)
        # added per channel (use_scale_shift_norm=False)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, context_dim, heads, dim_head):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head)  # self-attention
        self.ff = nn.Module()
        # slot 1 (nn.Identity): ldm's Dropout
        self.ff.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))
        # cross-attention to the text
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1, self.norm2, self.norm3 = LayerNorm32(dim), LayerNorm32(dim), LayerNorm32(dim)

    def forward(self, x, context, record=None):
        x = x + self.attn1(self.norm1(x), record=record)
        x = x + self.attn2(self.norm2(x), context, record=record)
        return x + self.ff.net(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, channels, context_dim, heads, dim_head, depth, use_linear, groups):
        super().__init__()
        self.norm = GroupNorm32(groups, channels, eps=1e-6)  # eps 1e-6 here, unlike the ResBlocks
        # SD1: 1x1 convs; SD2 (use_linear_in_transformer): Linear. Same maths, different weight
        # shapes.
        proj = (
            (lambda: nn.Linear(channels, channels))
            if use_linear
            else (lambda: nn.Conv2d(channels, channels, 1))
        )
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, context_dim, heads, dim_head) for _ in range(depth)
        )
        self.proj_out = proj()
        self.use_linear = use_linear

    def forward(self, x, emb, context, record=None):
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # (B, H*W, C): tokens in row-major pixel order
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, record)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(b, c, hgt, wid)
        if not self.use_linear:
            h = self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x, emb=None, context=None, record=None):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, emb=None, context=None, record=None):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Conv(nn.Conv2d):
    """input_blocks.0.0: a plain conv that accepts the block call signature."""

    def forward(self, x, emb=None, context=None, record=None):
        return super().forward(x)


class TimestepEmbedSequential(nn.ModuleList):
    """One input/middle/output block: its layers in order, each given (x, emb, context, record)."""

    def forward(self, x, emb, context, record):
        for layer in self:
            x = layer(x, emb, context, record)
        return x


# ----------------------------------------------------------------------------- config
@dataclass
class UNetConfig:
    """Field names follow v1-inference.yaml / v2-inference.yaml (unet_config.params)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple = (4, 2, 1)  # downsample factors that get a SpatialTransformer
    num_res_blocks: int = 2
    channel_mult: tuple = (1, 2, 4, 4)
    num_heads: int = 8  # used when num_head_channels == -1 (SD1)
    num_head_channels: int = -1  # SD2: 64, heads = channels // 64
    transformer_depth: int = 1
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    num_groups: int = 32  # GroupNorm groups (not in the yaml; 32 in ldm)

    def heads(self, channels):
        """(heads, dim_head) of a SpatialTransformer with `channels` (legacy: False)."""
        if self.num_head_channels == -1:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels

    @classmethod
    def sd15(cls, **kw):
        return cls(**{**dict(num_heads=8, context_dim=768, use_linear_in_transformer=False), **kw})

    @classmethod
    def sd21(cls, **kw):
        sd21 = dict(
            num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True
        )
        return cls(**{**sd21, **kw})


# ----------------------------------------------------------------------------- model
class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, g, emb_ch = cfg.model_channels, cfg.num_groups, cfg.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))

        def transformer(ch):
            return SpatialTransformer(
                ch,
                cfg.context_dim,
                *cfg.heads(ch),
                cfg.transformer_depth,
                cfg.use_linear_in_transformer,
                g,
            )

        # down path: remember every block's output width for the skip connections of the up path
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential([Conv(cfg.in_channels, mc, 3, padding=1)])]
        )
        skips, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_ch, mult * mc, g)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(layers))
                skips.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential([Downsample(ch)]))
                skips.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            [ResBlock(ch, emb_ch, ch, g), transformer(ch), ResBlock(ch, emb_ch, ch, g)]
        )
        # up path: each block consumes one skip; the last block of a level (but the top one)
        # upsamples
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), emb_ch, mult * mc, g)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(layers))
        self.out = nn.Sequential(
            GroupNorm32(g, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
        )
        for name, module in self.named_modules():
            if isinstance(module, CrossAttention):
                module.name = name

    def attention_layer_names(self):
        return [n for n, m in self.named_modules() if isinstance(m, CrossAttention)]

    def forward(self, x, t, context, attn_layers=(), log_attn_layers=()):
        """x (B, 4, h, w), t (B,) int, context (B, 77, D) -> (eps, {layer name: map (B, Nq, Nk)
        float32}).

        attn_layers: layers whose head-averaged attention probabilities are returned.
        log_attn_layers: layers whose head-averaged log-probabilities are returned instead (the
        cross-entropy of the method wants log-space values; README, Faithfulness, "CE input").
        """
        wanted = {**{n: "probs" for n in attn_layers}, **{n: "log_probs" for n in log_attn_layers}}
        unknown = sorted(set(wanted) - set(self.attention_layer_names()))
        if unknown:
            raise ValueError(
                f"unknown attention layers {unknown[:3]}; names look like "
                "'output_blocks.6.1.transformer_blocks.0.attn2'"
            )
        record = AttentionMaps(wanted)
        dtype = self.out[2].weight.dtype
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(dtype))
        h, context, hs = x.to(dtype), context.to(dtype), []
        for block in self.input_blocks:
            h = block(h, emb, context, record)
            hs.append(h)
        h = self.middle_block(h, emb, context, record)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context, record)
        return self.out(h).float(), record.maps
