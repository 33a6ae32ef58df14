"""Golden values for tests/test_models.py::test_the_models_match_diffusers_golden_values, made by an independent
reference: diffusers' and transformers' own models, loaded through diffusers' own single-file converters
(diffusers.loaders.single_file_utils) from the tests' tiny random checkpoint in the real key layout.

    pip install diffusers==0.42.1 transformers==5.25.0   # any Python; the tests never import them
    python tests/data/make_goldens.py                     # writes tests/data/goldens-sd1.safetensors, -sd2

Each file holds the inputs (tokens, an image, a latent and a timestep) and the reference's outputs: the text
context, the VAE latent (posterior mean x 0.18215), the UNet's eps, and the head-averaged attention
probabilities of the 8 layers SLiMe reads. Every weight is random and nonzero (conftest.tiny_state_dict):
no branch of the networks is switched off, so each one shows in the outputs.
"""

import os
import sys

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
sys.path[:0] = [os.path.dirname(TESTS), TESTS]
import slime  # noqa: E402
from conftest import TINY_TEXT, TINY_UNET, state_digest, tiny_state_dict  # noqa: E402


def reference_models(family, state):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    ch, vae_ch = TINY_UNET[family], 32
    unet_cfg = dict(
        sample_size=8, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        block_out_channels=[ch, 2 * ch, 4 * ch, 4 * ch], layers_per_block=2, norm_num_groups=32,
        cross_attention_dim=TINY_TEXT,
        # SD1: 8 heads everywhere; SD2: 64-wide heads (diffusers' SD2 configs give head counts here)
        attention_head_dim=8 if family == "sd1" else [ch // 64 * m for m in (1, 2, 4, 4)],
        use_linear_projection=family == "sd2",
    )  # fmt: skip
    vae_cfg = dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[vae_ch, 2 * vae_ch, 4 * vae_ch, 4 * vae_ch], scaling_factor=0.18215,
    )  # fmt: skip
    text_cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=TINY_TEXT, intermediate_size=4 * TINY_TEXT, num_attention_heads=1,
        num_hidden_layers=12 if family == "sd1" else 23, max_position_embeddings=77,
        hidden_act="quick_gelu" if family == "sd1" else "gelu", layer_norm_eps=1e-5,
    )  # fmt: skip
    unet, vae = UNet2DConditionModel(**unet_cfg), AutoencoderKL(**vae_cfg)
    text = CLIPTextModel(text_cfg)
    ckpt = dict(state)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(ckpt, unet_cfg), strict=True)
    # the encoder side only: the tiny checkpoint's decoder tensors are placeholders (SLiMe never decodes)
    encoder = {k: v for k, v in sfu.convert_ldm_vae_checkpoint(ckpt, vae_cfg).items() if "decoder" not in k}
    missing, unexpected = vae.load_state_dict(
        {k: v for k, v in encoder.items() if "post_quant" not in k}, strict=False
    )
    assert not unexpected and all(k.startswith(("decoder.", "post_quant_conv.")) for k in missing), missing
    if family == "sd1":
        te = sfu.convert_ldm_clip_checkpoint(ckpt)
    else:  # SD2's last text block is not run (the penultimate output): tiny placeholders in the checkpoint
        ckpt = {k: v for k, v in ckpt.items() if ".resblocks.23." not in k}
        # the converter takes the text width from text_projection's shape (a placeholder here; unused)
        ckpt["cond_stage_model.model.text_projection"] = torch.zeros(TINY_TEXT, TINY_TEXT)
        te = sfu.convert_open_clip_checkpoint(text, ckpt, prefix="cond_stage_model.model.")
    if not hasattr(text, "text_model"):  # transformers >= 5.6 has no .text_model wrapper
        te = {k.removeprefix("text_model."): v for k, v in te.items()}
    te = {k: v for k, v in te.items() if not k.endswith("position_ids")}  # a buffer, not a weight
    text.load_state_dict(te, strict=True)
    return unet.eval(), vae.eval(), text.eval()


def capture(store, name):
    """An attention processor that computes plain attention and keeps the head-averaged probabilities."""

    def processor(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
        b, n, _ = q.shape
        q, k, v = (x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2) for x in (q, k, v))
        probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
        store[name] = probs.mean(1)
        return attn.to_out[1](attn.to_out[0]((probs @ v).transpose(1, 2).reshape(b, n, -1)))

    return processor


def ldm_name(name):  # diffusers' up_blocks.1.attentions.0.transformer_blocks.0.attn2 -> output_blocks.3.1...
    p = name.split(".")
    if p[0] != "up_blocks":
        return None
    return ".".join([f"output_blocks.{3 * int(p[1]) + int(p[3])}.1"] + p[4:])


@torch.no_grad()
def goldens(family):
    import diffusers
    import transformers
    from open_clip.tokenizer import SimpleTokenizer

    state = tiny_state_dict(family)
    unet, vae, text = reference_models(family, state)
    g = torch.Generator().manual_seed(0)
    # tokens built by hand: <start-of-text>, the BPE ids, <end-of-text>, then SD1's pad (end-of-text) or SD2's 0
    ids = [49406] + SimpleTokenizer().encode("part part part") + [49407]
    tokens = torch.tensor([ids + [49407 if family == "sd1" else 0] * (77 - len(ids))])
    image = torch.rand(1, 3, 48, 64, generator=g)  # [0, 1]; not square, so a swapped height and width shows
    x_t, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([57])
    context = text(input_ids=tokens).last_hidden_state
    latent = vae.encode(2 * image - 1).latent_dist.mean * 0.18215
    store, processors = {}, {}
    for key in unet.attn_processors:
        name = ldm_name(key.removesuffix(".processor"))
        processors[key] = capture(store, name) if name in slime.CROSS_LAYERS + slime.SELF_LAYERS else None
    unet.set_attn_processor(
        {k: p or diffusers.models.attention_processor.AttnProcessor() for k, p in processors.items()}
    )
    eps = unet(x_t, t, encoder_hidden_states=context).sample
    out = dict(tokens=tokens, image=image, x_t=x_t, t=t, context=context, latent=latent, eps=eps)
    out.update({f"attn:{k}": v[0] for k, v in store.items()})
    meta = dict(
        command="python tests/data/make_goldens.py",
        reference=f"diffusers {diffusers.__version__}, transformers {transformers.__version__}",
        checkpoint=f"conftest.tiny_state_dict({family!r}), sha256 {state_digest(state)}",
    )
    path = os.path.join(HERE, f"goldens-{family}.safetensors")
    save_file({k: v.contiguous() for k, v in out.items()}, path, metadata=meta)
    print(path, meta, {k: tuple(v.shape) for k, v in out.items()})


if __name__ == "__main__":
    for family in ("sd1", "sd2"):
        goldens(family)
