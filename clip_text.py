"""The text encoders of Stable Diffusion and their tokenizer.

SD 1.x: OpenAI CLIP ViT-L/14 text model, stored with Hugging Face names under
`cond_stage_model.transformer.text_model.` (ldm FrozenCLIPEmbedder, output = last_hidden_state).
SD 2.x: OpenCLIP ViT-H/14 text tower, stored with open_clip names under `cond_stage_model.model.`
(ldm FrozenOpenCLIPEmbedder with layer="penultimate": the last resblock is skipped, then ln_final).
  https://github.com/CompVis/stable-diffusion/blob/21f890f9da3cfbeaba8e2ac3c425ee9e998d5229/ldm/modules/encoders/modules.py
  https://github.com/Stability-AI/stablediffusion/blob/cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf/ldm/modules/encoders/modules.py
  https://github.com/mlfoundations/open_clip/blob/main/src/open_clip/transformer.py
Each class copies its checkpoint's names, so both load with strict=True after stripping the prefix.
"""

import importlib.util
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import LayerNorm32, attention

BOS, EOS = 49406, 49407  # <|startoftext|>, <|endoftext|> in CLIP's BPE vocabulary
CONTEXT_LENGTH = 77


@dataclass
class TextConfig:
    width: int = 768
    layers: int = 12  # layers that run (SD2 stores 24 and runs 23: the "penultimate" output)
    vocab_size: int = 49408
    pad_token: int = (
        EOS  # SD1's HF tokenizer pads with <|endoftext|>; open_clip.tokenize pads with 0
    )

    @property
    def heads(self):
        return self.width // 64  # both towers use 64-dim heads (12 for ViT-L, 16 for ViT-H)

    @classmethod
    def sd15(cls, **kw):
        return cls(**{**dict(width=768, layers=12, pad_token=EOS), **kw})

    @classmethod
    def sd21(cls, **kw):
        return cls(**{**dict(width=1024, layers=23, pad_token=0), **kw})


_bpe = None


def tokenize(texts, pad_token):
    """list of str -> (B, 77) int64: BOS, up to 75 BPE tokens, EOS, then pad_token."""
    global _bpe
    if _bpe is None:
        # open_clip's BPE tokenizer (its vocabulary ships with it: offline), from its own file:
        # `import open_clip` would import its image models too, and with them torchvision, which the
        # text side never uses (and which fails outright when built for another torch)
        folder = importlib.util.find_spec("open_clip").submodule_search_locations[0]
        path = os.path.join(folder, "tokenizer.py")
        spec = importlib.util.spec_from_file_location("open_clip_tokenizer", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _bpe = module.SimpleTokenizer()
    out = torch.full((len(texts), CONTEXT_LENGTH), pad_token, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [BOS] + _bpe.encode(text)[: CONTEXT_LENGTH - 2] + [EOS]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)  # OpenAI CLIP's activation (hidden_act="quick_gelu")


# ----------------------------------------------------------------------------- SD 1.x (HF names)
class CLIPAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(width, width) for _ in range(4)
        )

    def forward(self, x):
        out, _ = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True)
        return self.out_proj(out)


class CLIPEncoderLayer(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm1, self.layer_norm2 = LayerNorm32(width), LayerNorm32(width)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp.fc2(quick_gelu(self.mlp.fc1(self.layer_norm2(x))))


def embedding(n, width):
    # nn.Embedding left empty, as the checkpoint fills it: its random init on the meta device
    # (where slime builds the models) imports torch._dynamo: 1.2 s of each fit's and predict's start
    return nn.Embedding(n, width, _weight=torch.empty(n, width))


class CLIPTextModel(nn.Module):
    """The modules under `cond_stage_model.transformer.text_model.`."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = embedding(cfg.vocab_size, cfg.width)
        self.embeddings.position_embedding = embedding(CONTEXT_LENGTH, cfg.width)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            CLIPEncoderLayer(cfg.width, cfg.heads) for _ in range(cfg.layers)
        )
        self.final_layer_norm = LayerNorm32(cfg.width)

    def forward(self, tokens):
        x = self.embeddings.token_embedding(tokens) + self.embeddings.position_embedding.weight
        for layer in self.encoder.layers:
            x = layer(x)
        return self.final_layer_norm(x)  # last_hidden_state


# ------------------------------------------------------------------------- SD 2.x (open_clip names)
class MultiheadAttention(nn.Module):
    """nn.MultiheadAttention's parameters: packed in_proj (rows q, k, v) and out_proj."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        out, _ = attention(q, k, v, self.heads, causal=True)
        return self.out_proj(out)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1, self.ln_2 = LayerNorm32(width), LayerNorm32(width)
        self.attn = MultiheadAttention(width, heads)
        self.mlp = nn.Module()
        self.mlp.c_fc, self.mlp.c_proj = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x))))  # exact (erf) GELU


class OpenCLIPText(nn.Module):
    """The modules under `cond_stage_model.model.` (the visual tower is not in SD's checkpoint)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(CONTEXT_LENGTH, cfg.width))
        self.transformer = nn.Module()
        # only the blocks that run: the stored last block is skipped ("penultimate" layer,
        # v2-inference.yaml)
        self.transformer.resblocks = nn.ModuleList(
            ResidualAttentionBlock(cfg.width, cfg.heads) for _ in range(cfg.layers)
        )
        self.ln_final = LayerNorm32(cfg.width)

    def forward(self, tokens):
        x = self.token_embedding(tokens) + self.positional_embedding
        for block in self.transformer.resblocks:
            x = block(x)
        return self.ln_final(x)
