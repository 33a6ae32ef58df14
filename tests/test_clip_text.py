"""Parity of clip_text.py against open_clip's own text towers (random weights, fp32).

Proves that
* `OpenCLIPText(TextConfig.sd21())` loads an open_clip ViT-H-14 text tower's state_dict (minus the
  last resblock and text_projection) with strict=True and reproduces the "penultimate" feature of
  ldm's FrozenOpenCLIPEmbedder (blocks 0..22 with open_clip's causal mask, then ln_final);
* `CLIPTextModel(TextConfig.sd15())` loads an open_clip ViT-L-14-quickgelu text tower renamed to
  Hugging Face names (in_proj split into q/k/v) and reproduces ln_final(all 12 blocks), and its
  activation really is quick_gelu (exact GELU gives a different output);
* `tokenize` matches `open_clip.tokenize` (pad 0), truncation keeps EOS at position 76, and
  pad_token=49407 only changes the padding positions; it works where `import open_clip` fails.

Uses open_clip's model code with random weights; nothing is downloaded.

    python -m pytest -q tests/test_clip_text.py
"""

import builtins
import importlib.metadata
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clip_text
from clip_text import BOS, EOS, CLIPTextModel, OpenCLIPText, TextConfig, tokenize


def installed(
    dist,
):  # a distribution's version from its metadata, without importing it (None: absent)
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# open_clip imports torchvision, which fails to import where it was built for another torch
# (installed from two indexes: "operator torchvision::nms does not exist"). That is the machine's
# problem, not clip_text's: this module is skipped with one line naming the pair, and the rest of
# the suite runs (a collection error would stop it all). Any exception: a mismatched pair raises
# RuntimeError, AttributeError or ImportError by version
try:
    import open_clip
    from open_clip.model import _build_text_tower
except Exception as e:
    why, vision = " ".join(str(e).split()), installed("torchvision")
    pytest.skip(
        f"open_clip does not import ({type(e).__name__}: {why}); torch {torch.__version__} "
        f"and torchvision {vision or 'absent'} are not a matching pair: "
        "pip install matching versions",
        allow_module_level=True,
    )

PROMPTS = ["a photo of a dog!~", "A Cat &amp; a  HORSE, sitting on the grass."]
LONG = " ".join(["an extremely long prompt about a red bicycle"] * 12)  # > 77 tokens


def random_tower(name, seed):
    """open_clip's text tower for `name` (no visual tower), every parameter re-drawn away from
    0/1."""
    cfg = open_clip.get_model_config(name)
    with torch.device("meta"):  # no memory and no initialisation: every value is drawn below
        tower = _build_text_tower(
            cfg["embed_dim"], cfg["text_cfg"], quick_gelu=cfg.get("quick_gelu", False)
        )
    tower = tower.to_empty(device="cpu")
    tower.attn_mask = tower.build_causal_mask()  # the one buffer, open_clip's own causal mask
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in tower.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if n == "token_embedding.weight":
                p.copy_(0.02 * r)
            elif n == "positional_embedding":
                p.copy_(0.01 * r)
            elif p.ndim == 2:
                p.copy_(r / p.shape[1] ** 0.5)  # N(0, 1/fan_in)
            elif "ln" in n and n.endswith("weight"):
                p.copy_(1 + 0.05 * r)
            else:
                p.copy_(0.02 * r)  # biases
    return tower.eval()


def run_blocks(tower, tokens, n_blocks):
    """ldm FrozenOpenCLIPEmbedder.encode_with_transformer, with open_clip's own modules and mask."""
    x = tower.token_embedding(tokens) + tower.positional_embedding
    if not tower.transformer.batch_first:  # older open_clip (as in ldm) ran blocks sequence-first
        x = x.transpose(0, 1)
    for block in tower.transformer.resblocks[:n_blocks]:
        x = block(x, attn_mask=tower.attn_mask)
    if not tower.transformer.batch_first:
        x = x.transpose(0, 1)
    return tower.ln_final(x)


def assert_close(ours, ref):
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert ours.shape == ref.shape and err <= 1e-5 * scale, (
        f"max abs err {err:.3g} vs max |ref| {scale:.3g}"
    )


@pytest.fixture(scope="module")
def tokens():
    return tokenize(PROMPTS, pad_token=0)


@pytest.fixture(scope="module")
def sd2(tokens):
    tower = random_tower("ViT-H-14", seed=0)
    last = len(tower.transformer.resblocks) - 1
    sd = tower.state_dict()
    dropped = {
        k
        for k in sd
        if k.startswith(f"transformer.resblocks.{last}.")
        or k in ("text_projection", "logit_scale", "attn_mask")
    }
    assert (
        "text_projection" in dropped and len(dropped) == 13
    )  # 12 tensors of the last block + projection
    ours = OpenCLIPText(TextConfig.sd21()).eval()
    ours.load_state_dict({k: v for k, v in sd.items() if k not in dropped}, strict=True)
    with torch.no_grad():
        return ours(tokens), run_blocks(tower, tokens, last)


def hf_state_dict(tower):
    """open_clip text-tower names -> Hugging Face CLIPTextModel (text_model.*) names."""
    out = {
        "embeddings.token_embedding.weight": tower.token_embedding.weight,
        "embeddings.position_embedding.weight": tower.positional_embedding,
        "final_layer_norm.weight": tower.ln_final.weight,
        "final_layer_norm.bias": tower.ln_final.bias,
    }
    for i, blk in enumerate(tower.transformer.resblocks):
        p = f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = getattr(blk.attn, f"in_proj_{kind}").chunk(3, dim=0)  # rows are q, k, v
            out.update(
                {
                    p + f"self_attn.q_proj.{kind}": q,
                    p + f"self_attn.k_proj.{kind}": k,
                    p + f"self_attn.v_proj.{kind}": v,
                    p + f"self_attn.out_proj.{kind}": getattr(blk.attn.out_proj, kind),
                    p + f"layer_norm1.{kind}": getattr(blk.ln_1, kind),
                    p + f"layer_norm2.{kind}": getattr(blk.ln_2, kind),
                    p + f"mlp.fc1.{kind}": getattr(blk.mlp.c_fc, kind),
                    p + f"mlp.fc2.{kind}": getattr(blk.mlp.c_proj, kind),
                }
            )
    return out


@pytest.fixture(scope="module")
def sd1(tokens):
    tower = random_tower("ViT-L-14-quickgelu", seed=1)
    ours = CLIPTextModel(TextConfig.sd15()).eval()
    ours.load_state_dict(hf_state_dict(tower), strict=True)
    with torch.no_grad():
        return ours, ours(tokens), run_blocks(tower, tokens, len(tower.transformer.resblocks))


def test_sd2_penultimate_matches_open_clip(sd2):
    assert_close(*sd2)


def test_sd1_matches_open_clip_quickgelu(sd1):
    _, ours, ref = sd1
    assert_close(ours, ref)


def test_sd1_activation_is_quick_gelu(sd1, tokens, monkeypatch):
    model, ours, _ = sd1
    monkeypatch.setattr(clip_text, "quick_gelu", F.gelu)
    with torch.no_grad():
        exact = model(tokens)
    assert (exact - ours).abs().max() > 1e-2 * ours.abs().max()


def test_tokenize_matches_open_clip():
    texts = PROMPTS + [LONG, ""]
    ours, ref = tokenize(texts, pad_token=0), open_clip.tokenize(texts)
    assert ours.dtype == torch.long and torch.equal(ours, ref)
    assert (
        ours[2, -1] == EOS and (ours[2] == EOS).sum() == 1
    )  # truncated: 75 text tokens, EOS at 76
    assert ours[3, :2].tolist() == [BOS, EOS] and (ours[3, 2:] == 0).all()


def test_tokenize_eos_padding_changes_only_padding():
    texts = PROMPTS + [LONG]
    ours, ref = tokenize(texts, pad_token=EOS), open_clip.tokenize(texts)
    assert (ours[:, 0] == BOS).all()
    for o, r in zip(ours, ref, strict=True):
        n = (
            int((r == EOS).nonzero()[0]) + 1
        )  # length incl. EOS ("!" is id 0, so don't count non-zeros)
        assert torch.equal(o[:n], r[:n]) and r[n - 1] == EOS
        assert (o[n:] == EOS).all() and (r[n:] == 0).all()
    assert 0 in ref[0, : int((ref[0] == EOS).nonzero()[0])]  # "!~" -> [0, 349]: a 0 inside the text


def test_tokenize_never_imports_the_open_clip_package(monkeypatch):
    """open_clip's package imports its image models and torchvision, which fails where torchvision
    was built for another torch (installed from two indexes). tokenize reads only open_clip's
    tokenizer file, so such a machine still fits (and starts 2 s sooner)."""
    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name.split(".")[0] == "open_clip":
            raise RuntimeError("operator torchvision::nms does not exist")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    monkeypatch.setattr(clip_text, "_bpe", None)  # loaded afresh, with the package unimportable
    assert tokenize(["part part"], 0)[0, :5].tolist() == [
        BOS,
        1551,
        1551,
        EOS,
        0,
    ]  # 1551: "part</w>"
