"""The pieces the three networks (unet.py, vae.py, clip_text.py) share: multi-head attention that
can hand back its probabilities, and the norms computed in fp32.

One attention function serves the UNet, the VAE and the text encoders. Layers whose maps nobody
asked for take the fast path (`F.scaled_dot_product_attention`); a layer whose maps are wanted
computes the scores explicitly in fp32, like Stability's ldm/modules/attention.py ("force cast to
fp32 to avoid overflowing") and whisper's qk path, and returns them averaged over heads.
  https://github.com/Stability-AI/stablediffusion/blob/cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf/ldm/modules/attention.py
  https://github.com/openai/whisper/blob/main/whisper/model.py (qkv_attention)
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the weights' dtype (ldm's GroupNorm32)."""

    def forward(self, x):
        y = F.group_norm(
            x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps
        )
        return y.to(x.dtype)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the weights' dtype."""

    def forward(self, x):
        y = F.layer_norm(
            x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps
        )
        return y.to(x.dtype)


def attention(q, k, v, heads, want=None, causal=False):
    """q (B, Nq, C), k and v (B, Nk, C) -> (output (B, Nq, C), map (B, Nq, Nk) float32 or None).

    want=None: fast path, no map. want="probs": softmax(QK^T / sqrt(d)) averaged over heads.
    want="log_probs": log_softmax of the same scores averaged over heads (computed from the
    scores, never as log(probs), so a probability that underflows to 0 cannot give -inf).
    """
    # split heads: (B, N, heads * d) -> (B, heads, N, d); channels are head-major, as in ldm's
    # rearrange
    q, k, v = (x.unflatten(-1, (heads, -1)).transpose(1, 2) for x in (q, k, v))
    if want is None:
        out, amap = F.scaled_dot_product_attention(q, k, v, is_causal=causal), None
    else:
        # (B, heads, Nq, Nk)
        scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        if causal:
            scores = scores.masked_fill(
                torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf")
            )
        probs = scores.softmax(-1)
        out = probs.to(v.dtype) @ v
        amap = (scores.log_softmax(-1) if want == "log_probs" else probs).mean(1)
    return out.transpose(1, 2).flatten(2), amap


class AttentionMaps:
    """What one UNet call was asked to record ({layer name: "probs" | "log_probs"}) and what it
    got."""

    def __init__(self, wanted):
        self.wanted, self.maps = dict(wanted), {}


class CrossAttention(nn.Module):
    """ldm's CrossAttention: self-attention when context is None (attn1), else cross-attention
    (attn2)."""

    def __init__(self, query_dim, context_dim, heads, dim_head):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        # slot 1: ldm's Dropout
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Identity())
        self.name = ""  # the checkpoint module path, set by UNetModel so maps can be keyed by it

    def forward(self, x, context=None, record=None):
        ctx = x if context is None else context
        want = record.wanted.get(self.name) if record is not None else None
        out, amap = attention(self.to_q(x), self.to_k(ctx), self.to_v(ctx), self.heads, want)
        if amap is not None:
            record.maps[self.name] = amap
        return self.to_out(out)
