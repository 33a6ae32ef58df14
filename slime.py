"""slime: Segment Like Me (SLiMe, ICLR 2024), from scratch on an original Stable Diffusion checkpoint.

    python slime.py fit ref.png ref_mask.png --parts background,body,wheel -o emb.pt
    python slime.py predict emb.pt folder/ -o out/

This file reads top to bottom: loading the checkpoint, then the method, then the command line.
The method is specified in METHOD.md-style comments that cite the paper's equations (Eq. 3-8).
  paper:   https://arxiv.org/abs/2309.03179
  release: https://github.com/aliasgharkhani/SLiMe
"""
import os
import re

import torch
from safetensors import safe_open

import clip_text
from clip_text import CLIPTextModel, OpenCLIPText, TextConfig
from unet import UNetConfig, UNetModel
from vae import AutoencoderKL, VAEConfig


class SlimeError(Exception):
    """A mistake the user can fix; its message is one sentence, printed without a traceback."""


# ----------------------------------------------------------------------------- loading the checkpoint
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = {"sd1": "cond_stage_model.transformer.text_model.", "sd2": "cond_stage_model.model."}

# Tensors of the release files that slime deliberately does not use. Anything else that no module
# takes is an error, as is anything a module needs that the file lacks.
IGNORED_KEYS = (
    r"first_stage_model\.(decoder|post_quant_conv)\.",  # the VAE decoder: SLiMe never decodes latents
    r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance"
    r"|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2)$",  # schedule: recomputed below
    r"model_ema\.",  # LitEma's decay / num_updates scalars left in the pruned EMA-only files
    r"cond_stage_model\.transformer\.text_model\.embeddings\.position_ids$",  # SD1: an arange(77)
    r"cond_stage_model\.model\.transformer\.resblocks\.{last}\.",  # SD2: last text block (penultimate output)
    r"cond_stage_model\.model\.(text_projection|logit_scale)$",  # SD2: CLIP's contrastive head
)


def alphas_cumprod(n=1000, linear_start=0.00085, linear_end=0.012):
    """ldm's "linear" schedule (diffusers: scaled_linear), in float64 as ldm computes it, stored float32.
    https://github.com/CompVis/stable-diffusion/blob/21f890f9da3cfbeaba8e2ac3c425ee9e998d5229/ldm/modules/diffusionmodules/util.py
    """
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def detect_family(keys, path):
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise SlimeError(f"{path} is an SDXL checkpoint; slime needs a Stable Diffusion 1.x or 2.x file "
                         "(e.g. v2-1_512-ema-pruned.safetensors)")
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise SlimeError(f"{path} holds no {UNET_PREFIX}* tensors, so it is not a full Stable Diffusion checkpoint "
                         "(a LoRA, VAE or embedding file?); use v2-1_512-ema-pruned.safetensors or v1-5-pruned-emaonly.safetensors")
    for family, prefix in TEXT_PREFIX.items():
        if any(k.startswith(prefix) for k in keys):
            return family
    raise SlimeError(f"{path} has a UNet but no text encoder that slime knows "
                     f"({' or '.join(TEXT_PREFIX.values())}); is it a Stable Diffusion 1.x/2.x file?")


def build_models(shapes, path="checkpoint"):
    """{key: shape} of a checkpoint -> (family, {prefix: module on the meta device}, ignore patterns).

    Only widths are read from the shapes (so the tests' tiny checkpoints load through the same code);
    the structure (blocks, heads, activations) is the family's.
    """
    family = detect_family(shapes, path)
    text = TEXT_PREFIX[family]

    def width(key, dim):
        if key not in shapes:
            raise SlimeError(f"{path} lacks the tensor {key}, so it is not a complete Stable Diffusion checkpoint")
        return shapes[key][dim]

    unet_cfg = (UNetConfig.sd15 if family == "sd1" else UNetConfig.sd21)(
        model_channels=width(UNET_PREFIX + "input_blocks.0.0.weight", 0),
        context_dim=width(UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", 1))
    vae_cfg = VAEConfig(ch=width(VAE_PREFIX + "encoder.conv_in.weight", 0))
    block = r"encoder\.layers\.(\d+)\." if family == "sd1" else r"transformer\.resblocks\.(\d+)\."
    stored = 1 + max([int(m.group(1)) for k in shapes if (m := re.match(re.escape(text) + block, k))], default=-1)
    if family == "sd1":
        text_cfg = TextConfig.sd15(width=width(text + "embeddings.token_embedding.weight", 1), layers=stored)
    else:
        text_cfg = TextConfig.sd21(width=width(text + "token_embedding.weight", 1), layers=stored - 1)
    with torch.device("meta"):
        modules = {UNET_PREFIX: UNetModel(unet_cfg), VAE_PREFIX: AutoencoderKL(vae_cfg),
                   text: (CLIPTextModel if family == "sd1" else OpenCLIPText)(text_cfg)}
    ignored = [re.compile(p.replace("{last}", str(stored - 1))) for p in IGNORED_KEYS]
    return family, modules, ignored


def check_keys(shapes, modules, ignored, path):
    """Every tensor a module needs is in the file with its shape; every other tensor is on the ignore list."""
    wanted = {prefix + k: tuple(v.shape) for prefix, m in modules.items() for k, v in m.state_dict().items()}
    missing = sorted(set(wanted) - set(shapes))
    unexpected = sorted(k for k in shapes if k not in wanted and not any(p.match(k) for p in ignored))
    wrong = sorted(k for k in wanted if k in shapes and tuple(shapes[k]) != wanted[k])
    for what, keys in (("lacks", missing), ("has unexpected", unexpected), ("has wrongly shaped", wrong)):
        if keys:
            raise SlimeError(f"{path} {what} tensors for a {'/'.join(modules)} checkpoint: "
                             f"{', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''} ({len(keys)} in all)")


def open_checkpoint(path):
    path = str(path)
    if not os.path.exists(path):
        raise SlimeError(f"{path}: no such file; put v2-1_512-ema-pruned.safetensors (see weights/README.md) there")
    if os.path.isdir(path):
        raise SlimeError(f"{path} is a directory; give the path of a single .safetensors checkpoint file")
    if not path.endswith(".safetensors"):
        raise SlimeError(f"{path} is not a .safetensors file; slime never unpickles .ckpt files, "
                         "download the .safetensors release instead (see weights/README.md)")
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:
        raise SlimeError(f"{path} cannot be read as .safetensors (truncated or corrupt download?): {e}") from None


class StableDiffusion:
    """What `load_models` returns: the three frozen networks, the tokenizer and the noise schedule."""

    def __init__(self, family, unet, vae, text_encoder, path):
        self.family, self.unet, self.vae, self.text_encoder, self.path = family, unet, vae, text_encoder, path
        self.alphas_cumprod = alphas_cumprod().to(next(unet.parameters()).device)

    def tokenize(self, texts):
        return clip_text.tokenize(texts, self.text_encoder.cfg.pad_token)


def load_models(path, device="cpu", dtype=torch.float32):
    """Load an original single-file SD 1.x / 2.x checkpoint (.safetensors; fp32, fp16 or bf16 storage).

    The modules are built on the meta device and each tensor is read once, cast, and assigned, so only
    the weights slime keeps are ever materialised (never the VAE decoder).
    """
    with open_checkpoint(path) as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        family, modules, ignored = build_models(shapes, path)
        check_keys(shapes, modules, ignored, path)
        for prefix, module in modules.items():
            state = {k: f.get_tensor(prefix + k).to(device=device, dtype=dtype) for k in module.state_dict()}
            module.load_state_dict(state, strict=True, assign=True)
            module.eval().requires_grad_(False)
    unet, vae, text = modules.values()
    return StableDiffusion(family, unet, vae, text, str(path))
