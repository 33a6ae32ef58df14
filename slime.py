"""slime: Segment Like Me (SLiMe, ICLR 2024), from scratch on an original Stable Diffusion checkpoint.

    python slime.py fit ref.png ref_mask.png --parts background,body,wheel -o emb.pt
    python slime.py predict emb.pt folder/ -o out/
    python slime.py info weights/v2-1_512-ema-pruned.safetensors

This file reads top to bottom: loading the checkpoint, then the method, then the command line.
The method is specified in METHOD.md-style comments that cite the paper's equations (Eq. 3-8).
  paper:   https://arxiv.org/abs/2309.03179
  release: https://github.com/aliasgharkhani/SLiMe
"""
import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
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


def fingerprint(path, sample=1 << 20):
    """A cheap identity of the weights: SHA-256 of the safetensors header (every name, dtype, shape and
    offset) and of the first and last MiB of tensor data. Not the file's SHA-256 (that reads 5 GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        h.update(f.read(n))
        h.update(f.read(sample))
        f.seek(max(8 + n, os.path.getsize(path) - sample))
        h.update(f.read(sample))
    return h.hexdigest()[:16]


# Release files whose SHA-256 several independent public sources agree on (README "Weights"). No hash
# of an SD 2.1-base fp16 re-save is published, so such a file loads but is reported as unknown.
KNOWN_FILES = {
    "df955bdf6b682338ea9b55dfc0d8f3475aadf4836e204893d28b82355e0956d2":
        "v2-1_512-ema-pruned.safetensors (SD 2.1-base, the weights of SLiMe's paper and release)",
    "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa": "v1-5-pruned-emaonly.safetensors (SD 1.5)",
    "e9476a13728cd75d8279f6ec8bad753a66a1957ca375a1464dc63b37db6e3916":
        "v1-5-pruned-emaonly-fp16.safetensors (SD 1.5, fp16 re-save)",
    "dcd690123cfc64383981a31d955694f6acf2072a80537fdb612c8e58ec87a8ac":
        "v2-1_768-ema-pruned.safetensors (SD 2.1-v at 768 px, a v-prediction model: it loads, but SLiMe "
        "assumes the eps-prediction 2.1-base at 512 px, so expect worse masks)",
}


def file_sha256(path):
    """The file's SHA-256 (5 GB take ~4 s), remembered per path, size and mtime in ~/.cache/slime/sha256.json."""
    st = os.stat(path)
    key = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "slime", "sha256.json")
    try:
        with open(cache) as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    if key not in known:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        known[key] = h.hexdigest()
        try:  # a cache we cannot write only costs the hashing next time
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            write_text(cache, json.dumps(known, indent=0))
        except OSError:
            pass
    return known[key]


def known_file(path, family):
    """What the weights are: the name of a known release file, or that they are not one."""
    digest = file_sha256(path)
    return KNOWN_FILES.get(digest, f"an SD {family[-1]}.x checkpoint that is not a known release file "
                                   f"(SHA-256 {digest[:12]}...; fine for fine-tunes and re-saves)")


class StableDiffusion:
    """What `load_models` returns: the three frozen networks, the tokenizer and the noise schedule."""

    def __init__(self, family, unet, vae, text_encoder, path):
        self.family, self.unet, self.vae, self.text_encoder, self.path = family, unet, vae, text_encoder, path
        self.alphas_cumprod = alphas_cumprod().to(next(unet.parameters()).device)
        self.fingerprint = fingerprint(path)

    def tokenize(self, texts):
        pad = (TextConfig.sd15() if self.family == "sd1" else TextConfig.sd21()).pad_token
        return clip_text.tokenize(texts, pad)


def load_models(path, device="cpu", dtype=torch.float32, text_encoder=True):
    """Load an original single-file SD 1.x / 2.x checkpoint (.safetensors; fp32, fp16 or bf16 storage).

    The modules are built on the meta device and each tensor is read once, cast, and assigned, so only
    the weights slime keeps are ever materialised (never the VAE decoder). text_encoder=False skips the
    text encoder (predict reads its context from emb.pt); the file is still checked in full.
    """
    with open_checkpoint(path) as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        family, modules, ignored = build_models(shapes, path)
        check_keys(shapes, modules, ignored, path)
        for prefix, module in list(modules.items())[:3 if text_encoder else 2]:
            state = {k: f.get_tensor(prefix + k).to(device=device, dtype=dtype) for k in module.state_dict()}
            module.load_state_dict(state, strict=True, assign=True)
            module.eval().requires_grad_(False)
    unet, vae, text = modules.values()
    return StableDiffusion(family, unet, vae, text if text_encoder else None, str(path))


# ----------------------------------------------------------------------------- the method (paper Sec. 4, Figs. 3-4)
# The release's layers (METHOD.md section 0), as checkpoint paths. diffusers names in the release:
# up_blocks[1].attentions[0,1,2] and up_blocks[2].attentions[0,1] (attn2); up_blocks[3].attentions[0,1,2] (attn1).
CROSS_LAYERS = tuple(f"output_blocks.{i}.1.transformer_blocks.0.attn2" for i in (3, 4, 5, 6, 7))  # 16x16, 32x32
SELF_LAYERS = tuple(f"output_blocks.{i}.1.transformer_blocks.0.attn1" for i in (9, 10, 11))  # 64x64
IGNORE = 255  # mask value that no loss and no score looks at
SIZE = 512  # the model always sees 512x512 crops, i.e. a 64x64 latent
MAP = 64  # train_mask_size: the grid of the cross-attention and WAS maps


def prompt_contexts(sd, num_classes):
    """Sec. 4.1 / METHOD.md section 1: the text encoder's OUTPUT for "part part ... part" (K words) and for "".

    Positions 1..K-1 of the first are the vectors SLiMe learns; position 0 (<start-of-text>) stands for
    the background and is never learned.
    """
    with torch.no_grad():
        tokens = sd.tokenize([" ".join(["part"] * num_classes), ""]).to(sd.alphas_cumprod.device)
        cond, uncond = sd.text_encoder(tokens).float().split(1)
    return cond, uncond


def with_learned(learned, cond):
    """The conditional context with the learned vectors (K-1, D) at token positions 1..K-1."""
    return torch.cat([cond[:, :1], learned[None].to(cond.dtype), cond[:, 1 + len(learned):]], dim=1)


def noisy_latent(sd, images, t, gen):
    """images (B, 3, 512, 512) in [0, 1] -> x_t = sqrt(a_t) z + sqrt(1 - a_t) eps (DDIM add_noise), and eps.

    z is a posterior SAMPLE, as in the release (METHOD.md section 3.5), drawn with the seeded generator.
    """
    with torch.no_grad():
        z = sd.vae.encode(images, sample=True, generator=gen)
    noise = torch.randn(z.shape, generator=gen, device=z.device)
    a = sd.alphas_cumprod[t].view(-1, 1, 1, 1)
    return a.sqrt() * z + (1 - a).sqrt() * noise, noise


def attention_maps(sd, x_t, t, context, num_classes, log_space):
    """One UNet pass -> (A_ca (K, 64, 64) Eq. 3, A_sa (4096 queries, 4096 keys) Eq. 5, eps).

    A_ca: the cross-attention of tokens 0..K-1, each layer bilinearly resized to 64x64, averaged over
    heads and layers. log_space=True (training) averages log-probabilities; False (inference) probabilities.
    """
    eps, maps = sd.unet(x_t, t, context, attn_layers=SELF_LAYERS + (() if log_space else CROSS_LAYERS),
                        log_attn_layers=CROSS_LAYERS if log_space else ())
    resized = []
    for name in CROSS_LAYERS:
        m = maps[name][0, :, :num_classes]  # (N, K): the K tokens' columns, after the softmax over all 77
        side = int(m.shape[0] ** 0.5)
        m = m.T.reshape(1, num_classes, side, side)
        resized.append(F.interpolate(m, size=(MAP, MAP), mode="bilinear", align_corners=False)[0])
    A_ca = sum(resized) / len(resized)
    A_sa = sum(maps[name][0] for name in SELF_LAYERS) / len(SELF_LAYERS)  # row q: P(query q -> key j)
    return A_ca, A_sa, eps


def was_map(P, A_sa):
    """Eq. 6, the Weighted Accumulated Self-attention map: S_WAS[k, q] = sum_j P[k, j] * A_sa[q, j].

    P (K', 64, 64) weights the self-attention of every key pixel j; one (K', 4096) x (4096, 4096) matmul.
    """
    return (P.flatten(1) @ A_sa.T).view(P.shape)


def class_weights(mask, num_classes):
    """METHOD.md section 3.1: w_c = #foreground / #pixels of c for parts present, 0 for absent parts, w_0 = 1."""
    n = torch.bincount(mask[mask != IGNORE].flatten(), minlength=num_classes)[:num_classes].float()
    n[0] = 0
    w = torch.where(n > 0, n.sum() / (n + 1e-6), torch.zeros_like(n))
    w[0] = 1
    return w


def segmentation_losses(A_ca, A_sa, mask, num_classes):
    """Eq. 4 and Eq. 7 on a (64, 64) mask: cross-entropy of A_ca, and MSE of the WAS maps vs the one-hot mask."""
    loss_ce = F.cross_entropy(A_ca[None], mask[None], weight=class_weights(mask, num_classes), ignore_index=IGNORE)
    P = A_ca.softmax(0)  # softmax over the K classes (the release: of the averaged logits; identical, see README)
    S_was = was_map(P, A_sa)
    valid = mask != IGNORE
    onehot = F.one_hot(mask.clamp(max=num_classes - 1), num_classes).permute(2, 0, 1).float()
    # the release: mean over classes and pixels, times K == per-pixel sum over classes, mean over pixels
    loss_mse = ((S_was - onehot) ** 2).sum(0)[valid].mean()
    return loss_ce, loss_mse


# ----------------------------------------------------------------------------- training data (METHOD.md section 2)
def resize(x, size, mode):
    """(C, H, W) -> (C, *size). Bilinear without antialiasing (cv2.INTER_LINEAR), or nearest (INTER_NEAREST)."""
    if mode == "nearest":
        return F.interpolate(x[None].float(), size=size, mode="nearest")[0].to(x.dtype)
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]


def gaussian_blur(image, k):
    """cv2.GaussianBlur(k, sigma=0) with reflect-101 borders. For k <= 7 and sigma 0, OpenCV's
    getGaussianKernel takes fixed binomial kernels, not the 0.3((k-1)/2-1)+0.8 sigma rule."""
    g = torch.tensor({3: [1, 2, 1], 5: [1, 4, 6, 4, 1]}[k], dtype=image.dtype)
    g = g / g.sum()
    pad = F.pad(image[None], (k // 2,) * 4, mode="reflect")
    out = F.conv2d(pad, g.view(1, 1, 1, k).expand(3, 1, 1, k), groups=3)
    return F.conv2d(out, g.view(1, 1, k, 1).expand(3, 1, k, 1), groups=3)[0]


def rotate(x, degrees, mode):
    """Rotate (C, H, W) about its centre, same size, zeros outside (albumentations Rotate, BORDER_CONSTANT 0)."""
    a = torch.tensor(degrees * torch.pi / 180)
    theta = torch.tensor([[torch.cos(a), torch.sin(a), 0.0], [-torch.sin(a), torch.cos(a), 0.0]])[None]
    grid = F.affine_grid(theta, (1, *x.shape), align_corners=False)
    return F.grid_sample(x[None].float(), grid, mode=mode, padding_mode="zeros", align_corners=False)[0].to(x.dtype)


def part_crop(mask, part, min_ratio, gen, tries=1000):
    """The release's crop that favours one part: side r * 512, r ~ U(min_ratio, 1), accepted when it keeps
    more than 30% of that part's pixels (always, if the part is absent). Returns (y0, x0, side)."""
    total = (mask == part).sum()
    for _ in range(tries):  # the release loops until accepted; a cap keeps a 1-pixel part from hanging
        side = int((min_ratio + (1 - min_ratio) * torch.rand(1, generator=gen).item()) * SIZE)
        y0, x0 = (torch.randint(0, SIZE - side + 1, (2,), generator=gen).tolist() if side != SIZE else (0, 0))
        if total == 0 or (mask[y0:y0 + side, x0:x0 + side] == part).sum() / total > 0.3:
            return y0, x0, side
    return 0, 0, SIZE


def augment(image, mask, part, opts, gen):
    """image (3, 512, 512), mask (512, 512) -> the same, augmented as the release's train transforms:
    flip (p .5), blur (p .5), part-aware crop resized back to 512, rotation (p .5)."""
    rand = lambda: torch.rand(1, generator=gen).item()  # noqa: E731
    if rand() < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)
    if rand() < 0.5:
        k = int(torch.randint(1, 6, (1,), generator=gen))
        k += 1 - k % 2  # albumentations maps an even kernel to the next odd one: k in {1: 20%, 3: 40%, 5: 40%}
        image = gaussian_blur(image, k) if k > 1 else image
    y0, x0, side = part_crop(mask, part, opts.min_crop_ratio, gen)
    image = resize(image[:, y0:y0 + side, x0:x0 + side], (SIZE, SIZE), "bilinear")
    mask = resize(mask[None, y0:y0 + side, x0:x0 + side], (SIZE, SIZE), "nearest")[0]
    if rand() < 0.5:
        angle = (2 * rand() - 1) * opts.rotation
        image, mask = rotate(image, angle, "bilinear"), rotate(mask[None], angle, "nearest")[0]
    return image, mask


# ----------------------------------------------------------------------------- optimisation (Sec. 4.1, METHOD.md sections 3-4)
@dataclass
class Settings:
    """Every default is the release's (src/arguments.py; METHOD.md section 7) unless the comment says slime."""
    epochs: int = 200
    lr: float = 0.1  # Adam, default betas, no schedule
    t_min: int = 5  # --train_t 5 100, inclusive
    t_max: int = 100
    alpha: float = 1.0  # Eq. 8: weight of L_MSE (--self_attention_loss_coef)
    beta: float = 0.005  # Eq. 8: weight of L_SD (--sd_loss_coef)
    guidance: float = 100.0  # classifier-free guidance inside L_SD (train_step's default)
    min_crop_ratio: float = 0.8
    rotation: float = 30.0  # degrees; celeba: 10
    cycle_parts: bool = True  # slime: crops cycle through the parts (the release, in effect: background only)
    val_every: int = 1  # epochs between validations (the release: every epoch)
    patch_size: int = 400  # inference (METHOD.md section 5)
    patches_per_side: int = 2
    threshold: float = 0.2
    test_t: int = 100
    out_size: int = 0  # slime: 0 = each image's own size; the release: 512
    bgr: bool = False  # slime: RGB; the release fed cv2's BGR images to the VAE
    seed: int = 0  # slime: everything is seeded


def training_step(sd, learned, cond, uncond, image, mask, s, gen):
    """Fig. 3: encode, add noise, UNet, maps, losses. image (3, 512, 512), mask (64, 64) -> loss terms."""
    num_classes = len(learned) + 1
    t = torch.randint(s.t_min, s.t_max + 1, (1,), generator=gen, device=gen.device)
    x_t, noise = noisy_latent(sd, image[None], t, gen)
    A_ca, A_sa, eps_cond = attention_maps(sd, x_t, t, with_learned(learned, cond), num_classes, log_space=True)
    loss_ce, loss_mse = segmentation_losses(A_ca, A_sa, mask, num_classes)  # Eq. 4, Eq. 7
    loss_sd = torch.zeros(())
    if s.beta:
        # the SD loss with guidance. Only the cond branch depends on the learned vectors, so the uncond
        # branch runs without a graph (the release: one CFG batch of 2 with grad; same loss and gradient)
        with torch.no_grad():
            eps_uncond = sd.unet(x_t, t, uncond)[0]
        eps = eps_uncond + s.guidance * (eps_cond - eps_uncond)
        loss_sd = F.mse_loss(eps, noise)
    loss = loss_ce + s.alpha * loss_mse + s.beta * loss_sd  # Eq. 8
    return loss, {"ce": loss_ce.item(), "mse": loss_mse.item(), "sd": loss_sd.item()}


def fit(sd, pairs, num_classes, s, val_pairs=None, on_best=None, progress=None):
    """Optimise K-1 text vectors on pairs [(image (3, 512, 512) in [0, 1], mask (512, 512) int64)].

    One step per pair per epoch; after every `val_every` epochs the val pairs (default: the training
    pairs) are segmented and the vectors are kept when their mIoU is >= the best so far (ties: later).
    on_best(context (1, 77, D), epoch, miou) is called with each new best. Returns the best context.
    """
    device = sd.alphas_cumprod.device
    gen = torch.Generator(device).manual_seed(s.seed)  # timesteps, VAE samples, noise
    aug_gen = torch.Generator().manual_seed(s.seed)  # augmentations (on the CPU)
    cond, uncond = prompt_contexts(sd, num_classes)
    learned = cond[0, 1:num_classes].clone().requires_grad_(True)
    optimizer = torch.optim.Adam([learned], lr=s.lr)
    val_pairs = val_pairs or pairs
    best, best_context, part, step = 0.0, with_learned(learned.detach(), cond), 0, 0
    for epoch in range(s.epochs):
        for i in torch.randperm(len(pairs), generator=torch.Generator().manual_seed(s.seed + epoch)).tolist():
            image, mask = augment(pairs[i][0], pairs[i][1], part, s, aug_gen)
            if s.bgr:
                image = image.flip(0)  # --bgr: the release fed cv2's BGR images (segment flips likewise)
            part = (part + 1) % num_classes if s.cycle_parts else 0
            mask = resize(mask[None], (MAP, MAP), "nearest")[0]  # takes pixel (8i, 8j)
            loss, terms = training_step(sd, learned, cond, uncond, image.to(device), mask.to(device), s, gen)
            if not torch.isfinite(loss):
                raise SlimeError(f"the loss became {loss.item()} at step {step + 1} ({terms}); "
                                 "the best embeddings so far are kept; try a lower --lr")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if progress:
                progress(step, s.epochs * len(pairs), terms)
        if (epoch + 1) % s.val_every == 0 or epoch == s.epochs - 1:
            context = with_learned(learned.detach(), cond)
            score = sum(image_miou(segment(sd, context, img, num_classes, s, out_size=SIZE), gt, num_classes)
                        for img, gt in val_pairs) / len(val_pairs)
            if score >= best:
                best, best_context = score, context
                if on_best:
                    on_best(context, epoch, score)
    return best_context


# ----------------------------------------------------------------------------- inference (Sec. 4.2, METHOD.md section 5)
def patch_origins(patch_size, per_side):
    step = (SIZE - patch_size) // (per_side - 1) if per_side > 1 else 0
    return [(i * step, j * step) for i in range(per_side) for j in range(per_side)]


@torch.no_grad()
def class_scores(sd, context, image, num_classes, s, gen, out=SIZE):
    """The release's patched masking: image (3, 512, 512) -> per-class scores (K, out, out).

    Each patch is resized to 512 and segmented on its own; a class takes part in a patch only when
    its cross-attention peaks at >= threshold; its WAS map is min-max rescaled onto the range of its
    cross-attention map and averaged over the patches where it took part.
    """
    K, ratio = num_classes, SIZE // out
    m = s.patch_size // ratio  # the patch's side in the output grid
    scores = torch.zeros(K, out, out, device=image.device)
    counts = torch.full((K, out, out), 1e-7, device=image.device)
    for y0, x0 in patch_origins(s.patch_size, s.patches_per_side):
        patch = resize(image[:, y0:y0 + s.patch_size, x0:x0 + s.patch_size], (SIZE, SIZE), "bilinear")
        t = torch.tensor([s.test_t], device=image.device)
        x_t, _ = noisy_latent(sd, patch[None], t, gen)
        A_ca, A_sa, _ = attention_maps(sd, x_t, t, context, K, log_space=False)
        A = A_ca.flatten(1)
        hi, lo = A.max(1).values, A.min(1).values
        passed = (hi >= s.threshold).nonzero()[:, 0]
        if len(passed) == 0:
            continue
        A = A[passed]
        A[0] = torch.where(A[0] > A[0].mean(), A[0], 0)  # the FIRST passed class, thresholded at its mean
        W = was_map(A.view(-1, MAP, MAP), A_sa)  # Eq. 6
        W = F.interpolate(W[None], size=(m, m), mode="bilinear", align_corners=False)[0]
        w_hi, w_lo = W.flatten(1).max(1).values, W.flatten(1).min(1).values
        coef = (w_hi - w_lo) / (hi[passed] - lo[passed])
        coef = torch.where(torch.isnan(coef) | (coef == 0), torch.full_like(coef, 1e-7), coef)
        rescaled = W / coef[:, None, None] + (lo[passed] - w_lo / coef)[:, None, None]  # onto [lo_k, hi_k]
        region = (passed, slice(y0 // ratio, y0 // ratio + m), slice(x0 // ratio, x0 // ratio + m))
        scores[region] += rescaled
        counts[region] += 1
    return scores / counts


def interpolation_matrix(n_in, n_out):
    """(n_out, n_in) matrix M with M @ v == F.interpolate(v, n_out, mode="linear", align_corners=False)."""
    return F.interpolate(torch.eye(n_in)[None], size=n_out, mode="linear", align_corners=False)[0].T


def segment(sd, context, image, num_classes, s, out_size=None, band=256):
    """image (3, H, W) in [0, 1], any size -> labels (H, W) uint8 (at most 77 classes), or (out_size, out_size).

    The model sees the image squashed to 512x512 (as the release). slime then upsamples the class
    SCORES, not the labels, to the image's own size and takes the argmax there, band by band, so a
    12000x9000 photo never holds K full-size float maps at once.
    """
    device = sd.alphas_cumprod.device
    x = resize(image.to(device), (SIZE, SIZE), "bilinear")
    if s.bgr:
        x = x.flip(0)  # the release fed cv2's BGR channel order
    gen = torch.Generator(device).manual_seed(s.seed)  # per image: the same masks in any order, on any rank
    scores = class_scores(sd, context, x, num_classes, s, gen).cpu()
    out_size = out_size or s.out_size
    h, w = (out_size, out_size) if out_size else image.shape[1:]
    if (h, w) == (SIZE, SIZE):
        return scores.argmax(0).byte()
    rows, cols = interpolation_matrix(SIZE, h), interpolation_matrix(SIZE, w)
    scores_w = scores @ cols.T  # (K, 512, w)
    labels = torch.empty(h, w, dtype=torch.uint8)
    for i in range(0, h, band):
        R = rows[i:i + band]
        used = R.any(0).nonzero()[:, 0]  # each output row mixes 2 score rows: skip the zero columns of R
        lo, hi = used.min().item(), used.max().item() + 1
        band_scores = torch.einsum("hr,krw->khw", R[:, lo:hi], scores_w[:, lo:hi])
        labels[i:i + band] = band_scores.max(0).indices  # = argmax(0), the first maximum, but 20x faster on CPU
    return labels


# ----------------------------------------------------------------------------- scores (METHOD.md section 6)
def iou_per_class(pred, gt, num_classes):
    """IoU of every class present in gt (255 = ignore): {class: |pred & gt| / (|pred | gt| + 1e-7)}."""
    valid = gt != IGNORE
    pred, gt = pred[valid], gt[valid]
    return {c: ((pred == c) & (gt == c)).sum().item() / (((pred == c) | (gt == c)).sum().item() + 1e-7)
            for c in gt.unique().tolist() if c < num_classes}


def image_miou(pred, gt, num_classes):
    """METHOD.md section 4: the mean IoU over the classes present in this image's ground truth."""
    ious = iou_per_class(pred, gt, num_classes)
    return sum(ious.values()) / max(len(ious), 1)


def miou_table(per_image, num_classes):
    """per_image: [{class: IoU}] -> (per-class IoU, mIoU) with the release's averaging: a class's IoU is the
    mean over the images that contain it; the mIoU is the mean over classes seen in any image."""
    sums, counts = [0.0] * num_classes, [0] * num_classes
    for ious in per_image:
        for c, v in ious.items():
            sums[c] += v
            counts[c] += 1
    per_class = [sums[c] / counts[c] if counts[c] else None for c in range(num_classes)]
    seen = [v for v in per_class if v is not None]
    return per_class, sum(seen) / max(len(seen), 1)


# ----------------------------------------------------------------------------- emb.pt
EMB_FORMAT = "slime-embeddings/1"


def save_embeddings(path, context, parts, sd, s, colors=None, epoch=None, miou=None):
    """One self-describing file, written atomically; loads with torch.load(weights_only=True)."""
    payload = {
        "format": EMB_FORMAT,
        "learned": context[0, 1:len(parts)].detach().float().cpu(),  # the K-1 optimised vectors
        "context": context.detach().float().cpu(),  # the full conditional context: predict needs no text encoder
        "parts": list(parts),
        "family": sd.family,
        "fingerprint": sd.fingerprint,
        "cross_layers": list(CROSS_LAYERS),
        "self_layers": list(SELF_LAYERS),
        "colors": [list(map(int, c)) for c in colors or []],  # RGB colour of each class in RGB masks
        "settings": asdict(s),
        "epoch": -1 if epoch is None else int(epoch),
        "val_miou": -1.0 if miou is None else float(miou),
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def release_embeddings(folder, parts, sd):
    """The authors' checkpoint folder: embedding_0.pth ... embedding_{K-2}.pth, one (1, 1, 1024) vector per
    part, fitted with SD 2.1-base on BGR images at 512x512, so those are its defaults here too."""
    found = {int(m.group(1)): f for f in os.listdir(folder) if (m := re.fullmatch(r"embedding_(\d+)\.pth", f))}
    if not found:
        raise SlimeError(f"{folder} is a folder without embedding_0.pth ...; give an emb.pt or the release's folder")
    missing = [f"embedding_{i}.pth" for i in range(max(found) + 1) if i not in found]
    if missing:
        raise SlimeError(f"{folder} lacks {', '.join(missing[:4])}; the release writes embedding_0.pth to "
                         f"embedding_{{K-2}}.pth, one per part")
    try:
        learned = torch.cat([torch.load(os.path.join(folder, found[i]), map_location="cpu", weights_only=True)
                             .float().reshape(1, -1) for i in range(len(found))])
    except Exception as e:
        raise SlimeError(f"{folder}: cannot read its embedding_{{i}}.pth files as tensors ({e})") from None
    num_classes = len(found) + 1
    parts = parts.split(",") if parts else ["background"] + [f"part{i}" for i in range(1, num_classes)]
    if len(parts) != num_classes:
        raise SlimeError(f"{folder} holds {len(found)} part embeddings, so --parts needs {num_classes} names "
                         f"(background first), not {len(parts)}")
    cond, _ = prompt_contexts(sd, num_classes)
    if learned.shape[1] != cond.shape[2]:
        raise SlimeError(f"{folder} holds {learned.shape[1]}-d vectors but {sd.path} has {cond.shape[2]}-d text")
    return {"context": with_learned(learned.to(cond.device), cond), "parts": parts, "family": "sd2",
            "fingerprint": None, "colors": [], "settings": asdict(Settings(bgr=True, out_size=SIZE))}


def load_embeddings(path):
    path = str(path)
    if not os.path.isfile(path):
        raise SlimeError(f"{path}: no such file; make one with `python slime.py fit image.png mask.png -o {path}`")
    try:
        emb = torch.load(path, map_location="cpu", weights_only=True)  # never runs pickled code
    except Exception as e:
        raise SlimeError(f"{path} is not a readable slime emb.pt (corrupt, or not made by slime): "
                         f"{str(e).splitlines()[0][:200]}") from None
    if not isinstance(emb, dict) or emb.get("format") != EMB_FORMAT:
        raise SlimeError(f"{path} is a torch file but not a slime emb.pt (no '{EMB_FORMAT}' format tag)")
    return emb


# ----------------------------------------------------------------------------- reading images and masks
MAX_CLASSES = 77  # one text token per class: <start-of-text> (background) + up to 76 parts
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def check_file(path, what):
    """Fail early, in the user's words, on a path that is missing, a directory, or empty."""
    if not os.path.exists(path):
        raise SlimeError(f"{path}: no such file; check the path of the {what}")
    if os.path.isdir(path):
        raise SlimeError(f"{path} is a directory; give the path of a single {what} file")
    if os.path.getsize(path) == 0:
        raise SlimeError(f"{path} is empty (0 bytes); re-export or re-copy the {what}")


def open_image(path, what):
    """Open `path` with PIL: first frame, pixels loaded, EXIF orientation applied; user errors as SlimeError."""
    check_file(path, what)
    try:
        with warnings.catch_warnings():
            # PIL warns above 89 MP and refuses above 179 MP (2 x MAX_IMAGE_PIXELS); slime reads what PIL
            # does not refuse: predict takes big images through in bands (12000x9000 peaks at ~3 GB)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            im.seek(0)  # animated GIF / WebP / multi-page TIFF: the first frame
            im.load()  # decode now, so a truncated file fails here and not later
            return ImageOps.exif_transpose(im)  # a new image, rotated as a phone shows it
    except UnidentifiedImageError:
        raise SlimeError(f"{path} is not an image file PIL can read; give a PNG or JPEG {what}") from None
    except Image.DecompressionBombError:
        raise SlimeError(f"{path} has more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels, too many to be read "
                         f"safely; downscale the {what} first") from None
    except Exception as e:  # "image file is truncated", broken data stream, bad EXIF, ...
        reason = " ".join(str(e).split())
        raise SlimeError(f"{path} is truncated or corrupt ({reason}); re-export or re-download the {what}") from None


def read_image(path):
    """An image file as a (3, H, W) float32 RGB tensor in [0, 1]; any alpha channel is dropped."""
    path = str(path)
    im = open_image(path, "image")
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit gray (PNG opens as "I;16" or "I"): full scale is 65535
        gray = np.clip(np.asarray(im, dtype=np.float32) / 65535, 0, 1)
        return torch.from_numpy(gray)[None].repeat(3, 1, 1)
    if im.mode == "F":
        gray = np.clip(np.asarray(im, dtype=np.float32), 0, 1)
        return torch.from_numpy(gray)[None].repeat(3, 1, 1)
    if im.mode in ("P", "PA", "LA", "La", "RGBa"):
        # through RGBA so a palette's transparency entry is understood; then the alpha goes
        im = im.convert("RGBA")
    if im.mode != "RGB":
        im = im.convert("RGB")  # RGBA, L, 1, CMYK, YCbCr, ...
    rgb = torch.from_numpy(np.array(im, dtype=np.uint8))
    return rgb.permute(2, 0, 1).float().div_(255)  # in place: a 12000x9000 photo is 1.3 GB as float32


def read_mask(path):
    """A mask file (.npy or image) as (H, W) int64 labels, or as (H, W, 3) uint8 colours for colors_to_labels.

    Values are kept as they are, so 255 (PASCAL VOC's "ignore") survives.
    """
    path = str(path)
    if path.lower().endswith(".npy"):
        return read_npy_mask(path)
    im = open_image(path, "mask")
    if im.mode in ("P", "L", "1", "I", "I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(im).astype(np.int64)  # palette indices or gray values are the labels
    if im.mode in ("PA", "LA"):
        return np.asarray(im)[..., 0].astype(np.int64)  # the alpha channel is not a label
    if im.mode == "F":
        raise SlimeError(f"{path} holds floating-point values; save the mask as integer class labels "
                         "(an indexed or gray PNG)")
    rgb = np.asarray(im if im.mode in ("RGB", "RGBA") else im.convert("RGB"))[..., :3]
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return rgb[..., 0].astype(np.int64)  # a gray mask saved as RGB
    return np.ascontiguousarray(rgb)


def read_npy_mask(path):
    """A 2-D integer (or bool) .npy label array; never unpickles."""
    check_file(path, "mask")
    try:
        labels = np.load(path, allow_pickle=False)
    except Exception as e:  # object arrays, truncated files, not a .npy at all
        reason = " ".join(str(e).split())
        raise SlimeError(f"{path} cannot be read as a .npy array ({reason}); save the mask with numpy.save") from None
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "biu":
        raise SlimeError(f"{path} holds {getattr(labels, 'dtype', type(labels).__name__)} values; "
                         "save integer class labels instead (e.g. numpy.save(path, mask.astype(numpy.uint8)))")
    if labels.ndim != 2:
        raise SlimeError(f"{path} has shape {tuple(labels.shape)}; a mask must be a 2-D (height, width) array "
                         "of class labels")
    return labels.astype(np.int64)


# ----------------------------------------------------------------------------- colour masks to labels
def voc_palette(n=256):
    """PASCAL VOC's colour map: the bits of index i, interleaved as r, g, b, fill each channel from the top bit."""
    index = np.arange(n)
    palette = np.zeros((n, 3), np.int64)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
    return palette.astype(np.uint8)


VOC_PALETTE = voc_palette()


def pack_rgb(colors):
    """(..., 3) colours -> (...) int32 keys 0xRRGGBB, so colours compare and sort as single numbers."""
    c = np.asarray(colors).astype(np.int32)
    return (c[..., 0] << 16) | (c[..., 1] << 8) | c[..., 2]


def unpack_rgb(keys):
    return [[int(k) >> 16, (int(k) >> 8) & 255, int(k) & 255] for k in keys]


def lookup(keys, table):
    """Index in `table` of each key (the first one, if repeated), and whether it was found at all."""
    order = np.argsort(table, kind="stable")
    pos = np.clip(np.searchsorted(table[order], keys), 0, len(table) - 1)
    return order[pos], table[order][pos] == keys


def colors_to_labels(masks, palette=None, names=None):
    """Turn colour masks into label masks with ONE colour -> class mapping shared by all of them.

    The mapping is `palette` (a list of [r, g, b], index = class) if given; else PASCAL VOC's when every
    colour is a VOC colour; else black -> 0 and the other colours, sorted by (r, g, b), -> 1, 2, ...
    Label masks pass through. `names` (the mask paths) only go into error messages.
    Returns (label masks, the palette as a list of [r, g, b]; None for VOC or when no mask had colours).
    """
    names = [str(n) for n in names] if names is not None else [f"mask {i + 1}" for i in range(len(masks))]
    keys = [pack_rgb(m) if m.ndim == 3 else None for m in masks]
    if all(k is None for k in keys):
        return list(masks), None
    if palette is not None:
        table = np.asarray(palette, dtype=np.int64)
        if table.ndim != 2 or table.shape[1:] != (3,) or not len(table) or table.min() < 0 or table.max() > 255:
            raise SlimeError("the palette must be a list of [r, g, b] colours with values 0..255, "
                             "one per class in class order")
        used = table.tolist()
    else:
        # the distinct colours of all masks together; the class count is checked as they accumulate
        present = np.zeros(0, np.int32)
        for name, k in zip(names, keys):
            if k is not None:
                present = np.union1d(present, np.unique(k))
                if len(present) > MAX_CLASSES:
                    raise SlimeError(
                        f"{name} brings the number of distinct mask colours to {len(present)}, more classes than "
                        f"SD's {MAX_CLASSES} text tokens allow; anti-aliased edges (a smooth brush) are the usual "
                        "cause, so save the masks without anti-aliasing or as indexed PNGs")
        if np.isin(present, pack_rgb(VOC_PALETTE)).all():
            table, used = VOC_PALETTE, None  # VOC colours: the VOC index, so (224, 224, 192) -> 255 = ignore
        else:
            black = np.zeros(1, np.int32)
            table = np.array(unpack_rgb(np.union1d(black, present)))  # sorted keys = sorted (r, g, b), black first
            used = table.tolist()
    table_keys = pack_rgb(table)
    out = []
    for name, mask, k in zip(names, masks, keys):
        if k is None:
            out.append(mask)
            continue
        labels, found = lookup(k, table_keys)
        if not found.all():
            bad = unpack_rgb(np.unique(k[~found])[:3])
            examples = ", ".join(f"({r}, {g}, {b})" for r, g, b in bad)
            raise SlimeError(f"{name} has {int((~found).sum())} pixels whose colour is not in the palette "
                             f"(e.g. {examples}); add those colours to the palette or repaint the mask "
                             "without anti-aliasing")
        out.append(labels.astype(np.int64))
    return out, used


# ----------------------------------------------------------------------------- writing results
def atomic_write(path, write):
    """Call write(tmp) for a temp file beside `path`, then move it onto `path`: readers never see half a file.

    The temp name keeps the real suffix (out.png -> .out.png.tmp.png) so PIL picks the format from it.
    """
    path = str(path)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp{os.path.splitext(name)[1]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def write_index_png(path, labels):
    """Save (H, W) labels 0..255 as an indexed PNG: pixel value = class, shown in VOC colours."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"labels must be a 2-D array of values 0..255, got shape {labels.shape}")
    im = Image.fromarray(labels.astype(np.uint8))
    im.putpalette(VOC_PALETTE.tobytes())  # an "L" image with a palette becomes "P"
    atomic_write(path, im.save)


def write_overlay(path, image, labels, part_names, band=256):
    """Save the image with each non-background class tinted 50% in its VOC colour, white class
    boundaries, and a legend (swatch + name of each class present) in the top-left corner.
    Built `band` rows at a time, so a 12000x9000 photo never needs full-size float arrays."""
    labels = np.asarray(labels)
    if labels.shape != tuple(image.shape[1:]):
        raise ValueError(f"labels of shape {labels.shape} do not match an image of size {tuple(image.shape[1:])}")
    out, counts = Image.new("RGB", labels.shape[::-1]), np.zeros(256, np.int64)
    for i in range(0, labels.shape[0], band):
        lab = labels[i:i + band + 1].astype(np.int64)  # one row more: the boundary with the next band
        counts += np.bincount(lab[:band].ravel() & 255, minlength=256)
        rgb = (image[:, i:i + band].detach().float().clamp(0, 1) * 255).round().permute(1, 2, 0).cpu().numpy()
        tinted = np.where((lab[:band] != 0)[..., None], 0.5 * rgb + 0.5 * VOC_PALETTE[lab[:band] & 255], rgb)
        # a boundary pixel differs from its right or its lower neighbour
        edge = np.zeros(lab.shape, bool)
        edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
        edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
        tinted[edge[:band]] = 255
        out.paste(Image.fromarray(np.round(tinted).astype(np.uint8)), (0, i))
    draw_legend(out, np.flatnonzero(counts), part_names)  # the classes present
    atomic_write(path, out.save)


def draw_legend(im, classes, part_names):
    """A dark box with a colour swatch and the name of each class, sized to the image; PIL clips what falls off."""
    size = max(8, min(32, min(im.size) // 32))  # text height: 8 px on small images, 16 px at 512
    try:
        font = ImageFont.load_default(size=size)
    except ImportError:  # PIL built without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(im)
    names = [part_names[c] if 0 <= c < len(part_names) else "ignore" if c == 255 else f"class {c}"
             for c in classes]
    pad, line = max(2, size // 4), size + max(2, size // 4)
    width = max(draw.textlength(n, font=font) for n in names)
    draw.rectangle([0, 0, 3 * pad + size + width, pad + line * len(names)], fill=(32, 32, 32))
    for i, (c, name) in enumerate(zip(classes, names)):
        y = pad + i * line
        swatch = tuple(int(v) for v in VOC_PALETTE[c & 255])
        draw.rectangle([pad, y, pad + size - 1, y + size - 1], fill=swatch, outline=(255, 255, 255))
        draw.text((2 * pad + size, y), name, fill=(255, 255, 255), font=font)


# ----------------------------------------------------------------------------- command line
HERE = os.path.dirname(os.path.abspath(__file__))
PRESETS = {  # the release README's per-dataset settings (METHOD.md section 7)
    "pascal-car": dict(parts="background,body,light,plate,wheel,window", min_crop_ratio=0.6,
                       patch_size=512, patches_per_side=1, rotation=30.0),
    "pascal-horse": dict(parts="background,head,neck+torso,leg,tail", min_crop_ratio=0.8,
                         patch_size=512, patches_per_side=1, rotation=30.0),
    "celeba": dict(parts="background,skin,eye,mouth,nose,brow,ear,neck,cloth,hair", min_crop_ratio=0.6,
                   patch_size=400, patches_per_side=2, rotation=10.0),
}


class Progress:
    """One updating line on stderr: step/total, loss terms, elapsed, ETA."""

    def __init__(self, quiet, what):
        self.quiet, self.what, self.t0 = quiet, what, time.time()

    def __call__(self, step, total, terms=None):
        if self.quiet:
            return
        el = time.time() - self.t0
        eta = el / step * (total - step)
        extra = "  ".join(f"{k} {v:.4f}" for k, v in (terms or {}).items())
        sys.stderr.write(f"\r{self.what} {step}/{total}  {extra}  {el:.0f}s elapsed, ETA {eta:.0f}s ")
        if step == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def say(args, msg):
    if not args.quiet:
        print(msg, file=sys.stderr, flush=True)


def default_checkpoint():
    folder = os.path.join(HERE, "weights")
    found = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) if os.path.isdir(folder) else []
    if not found:
        raise SlimeError(f"{folder} holds no .safetensors checkpoint; put v2-1_512-ema-pruned.safetensors there "
                         "(see weights/README.md) or pass --ckpt")
    if len(found) > 1:
        raise SlimeError(f"{folder} holds {len(found)} checkpoints ({', '.join(found)}); choose one with --ckpt")
    return os.path.join(folder, found[0])


def distributed():
    """(rank, world size): under torchrun, join the process group (nccl on GPUs, gloo on CPUs); else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (torch.distributed.get_rank() if world > 1 else 0), world


def load_for(args, text_encoder=True):
    local = int(os.environ.get("LOCAL_RANK", "0"))  # torchrun: one GPU per rank
    device = args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp32" if device == "cpu" else "bf16" if torch.cuda.is_bf16_supported() else "fp16")]
    sd = load_models(args.ckpt or default_checkpoint(), device=device, dtype=dtype, text_encoder=text_encoder)
    if not args.quiet:  # the first hash of a 5 GB file takes seconds: only for a line someone reads
        say(args, f"weights: {sd.path}: {known_file(sd.path, sd.family)}")
    say(args, f"loaded {sd.family} on {device} ({str(dtype)[6:]})")
    return sd


def cmd_info(args):
    """What a checkpoint is, from its header alone (no tensor is read), and its SHA-256 against KNOWN_FILES."""
    with open_checkpoint(args.file) as f:
        slices = {k: f.get_slice(k) for k in f.keys()}
        shapes = {k: tuple(v.get_shape()) for k, v in slices.items()}
        dtypes = sorted({v.get_dtype() for v in slices.values()})
    family, modules, ignored = build_models(shapes, args.file)
    check_keys(shapes, modules, ignored, args.file)
    used = sum(len(m.state_dict()) for m in modules.values())
    digest = file_sha256(args.file)
    print(f"file      {args.file} ({os.path.getsize(args.file):,} bytes)\n"
          f"family    {family} (Stable Diffusion {family[-1]}.x; {'CLIP ViT-L/14' if family == 'sd1' else 'OpenCLIP ViT-H/14'}"
          f" text encoder, context width {modules[UNET_PREFIX].cfg.context_dim})\n"
          f"tensors   {len(shapes)} ({', '.join(dtypes)}), {sum(math.prod(v) for v in shapes.values()):,} values; "
          f"slime loads {used}, does not need the other {len(shapes) - used} (VAE decoder, schedule...)\n"
          f"sha256    {digest}\n"
          f"known     {KNOWN_FILES.get(digest, 'no: not a release file slime knows (a fine-tune or a re-save?)')}")


def prepared(image, mask):
    """Both squashed to 512x512 as the release does (image bilinear, mask nearest)."""
    return resize(image, (SIZE, SIZE), "bilinear"), resize(torch.from_numpy(mask)[None], (SIZE, SIZE), "nearest")[0]


def read_pairs(paths, what, palette=None):
    """[img, mask, img, mask, ...] -> ([(image, mask array)], palette) with masks checked against images."""
    if len(paths) % 2:
        raise SlimeError(f"{what} takes image/mask pairs, but got an odd number of paths ({len(paths)}): "
                         f"{paths[-1]} has no partner")
    images = [read_image(p) for p in paths[0::2]]
    labels, palette = colors_to_labels([read_mask(p) for p in paths[1::2]], palette, paths[1::2])
    for img, m, ip, mp in zip(images, labels, paths[0::2], paths[1::2]):
        if tuple(m.shape) != tuple(img.shape[1:]):
            raise SlimeError(f"{mp} is {m.shape[1]}x{m.shape[0]} but its image {ip} is "
                             f"{img.shape[2]}x{img.shape[1]}; a mask must have its image's size")
    return list(zip(images, labels, paths[1::2])), palette


def settings_from(args, base=None):
    s = base or Settings()
    given = {f.name: getattr(args, f.name) for f in fields(Settings) if getattr(args, f.name, None) is not None}
    return replace(s, **given)


def cmd_fit(args):
    preset = PRESETS[args.preset] if args.preset else {}
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.t_range:
        args.t_min, args.t_max = args.t_range
        if args.t_min > args.t_max:
            raise SlimeError(f"--t-range {args.t_min} {args.t_max}: the first timestep must not exceed the second")
    s = settings_from(args)
    train, palette = read_pairs(args.pairs, "fit")
    val, _ = read_pairs(args.val, "--val", palette) if args.val else (None, None)
    labels = [m for _, m, _ in train + (val or [])]
    parts = args.parts.split(",") if args.parts else None
    top = max(int(m[m != IGNORE].max(initial=0)) for m in labels)
    num_classes = len(parts) if parts else top + 1
    if parts is None:
        parts = ["background"] + [f"part{i}" for i in range(1, num_classes)]
    if num_classes > MAX_CLASSES:
        raise SlimeError(f"{num_classes} classes are more than SD's 77 tokens allow (background + 76 parts)")
    for _, m, path in train + (val or []):
        bad = sorted(set(np.unique(m).tolist()) - set(range(num_classes)) - {IGNORE})
        if bad and palette is not None:  # colour masks: more colours than --parts names
            raise SlimeError(f"the colour masks hold {len(palette)} colours (black included) but --parts names "
                             f"{num_classes} classes; the {len(palette) - num_classes} unknown colours are usually "
                             "anti-aliased edges, so save the masks without anti-aliasing or as indexed PNGs")
        if bad:
            raise SlimeError(f"{path} has class values {bad[:8]} outside 0..{num_classes - 1} "
                             f"for the {num_classes} parts {parts} (255 means ignore)")
    if num_classes < 2 or top == 0:
        raise SlimeError(f"{args.pairs[1]} holds only background (class 0); nothing to learn")
    present = set().union(*(np.unique(m).tolist() for _, m, _ in train))
    for c in range(1, num_classes):
        if c not in present:
            say(args, f"warning: part {c} ({parts[c]}) has no pixels in any training mask; it cannot be learned")
    sd = load_for(args)
    say(args, f"fitting {num_classes - 1} parts {parts[1:]} on {len(train)} image(s), {s.epochs} epochs")

    def on_best(context, epoch, miou):
        save_embeddings(args.output, context, parts, sd, s, palette, epoch, miou)
        say(args, f"\repoch {epoch + 1}: validation mIoU {miou:.4f} (best so far) -> saved {args.output}")

    fit(sd, [prepared(i, m) for i, m, _ in train], num_classes, s,
        [prepared(i, m) for i, m, _ in val] if val else None, on_best, Progress(args.quiet, "step"))


def list_images(inputs):
    """Folders and files -> image paths (sorted per folder); names of skipped non-image files."""
    found, skipped = [], []
    for p in inputs:
        if os.path.isdir(p):
            for f in sorted(os.listdir(p)):
                full = os.path.join(p, f)
                if os.path.isfile(full):
                    (found if f.lower().endswith(IMAGE_EXTS) else skipped).append(full)
        elif os.path.isfile(p):
            found.append(p)
        else:
            raise SlimeError(f"{p}: no such file or folder")
    if not found:
        raise SlimeError(f"{', '.join(inputs)} holds no images ({', '.join(IMAGE_EXTS)})"
                         + (f"; skipped {', '.join(os.path.basename(f) for f in skipped[:5])}" if skipped else ""))
    return found, skipped


def check_outputs(images, out):
    """Refuse what would overwrite an input or collide, and an output folder we cannot write to."""
    stems = {}
    for path in images:
        stems.setdefault(os.path.splitext(os.path.basename(path))[0], []).append(path)
    dup = [paths for paths in stems.values() if len(paths) > 1]
    if dup:
        raise SlimeError(f"{dup[0][0]} and {dup[0][1]} share the name {os.path.splitext(os.path.basename(dup[0][0]))[0]!r}, "
                         f"so their outputs would collide in {out}; rename one ({len(dup)} such names)")
    if os.path.realpath(out) in {os.path.dirname(os.path.realpath(p)) for p in images}:
        raise SlimeError(f"{out} holds input images, and outputs there would overwrite or mix with them; "
                         "choose another output folder with -o")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise SlimeError(f"{out}: cannot create the output folder ({e.strerror})") from None
    if not os.access(out, os.W_OK):
        raise SlimeError(f"{out}: the output folder is not writable; choose another with -o")


def find_mask(folder, stem):
    for ext in (".png", ".npy", ".bmp", ".webp"):
        if os.path.isfile(os.path.join(folder, stem + ext)):
            return os.path.join(folder, stem + ext)
    return None


def cmd_predict(args):
    rank, world = distributed()
    args.quiet = args.quiet or rank > 0  # rank 0 speaks for all
    release = os.path.isdir(args.emb)  # the authors' folder of embedding_{i}.pth
    emb = None if release else load_embeddings(args.emb)
    images, skipped = list_images(args.inputs)
    if skipped:
        say(args, f"skipped {len(skipped)} non-image file(s): {', '.join(os.path.basename(f) for f in skipped[:5])}")
    check_outputs(images, args.out)
    sd = load_for(args, text_encoder=release)  # emb.pt carries its context; a release folder needs the encoder
    emb = release_embeddings(args.emb, args.parts, sd) if release else emb
    s = settings_from(args, Settings(**emb["settings"]))
    parts, context = emb["parts"], emb["context"]
    if emb["family"] != sd.family:
        raise SlimeError(f"{args.emb} was fitted on an {emb['family']} checkpoint but {sd.path} is {sd.family}; "
                         "predict with the checkpoint the embeddings were fitted on")
    if emb["fingerprint"] not in (sd.fingerprint, None):
        say(args, f"warning: {args.emb} was fitted on other weights of the same family ({emb['fingerprint']})")
    context = context.to(sd.alphas_cumprod.device)
    per_image, progress = [], Progress(args.quiet, "image")
    mine = list(enumerate(images, 1))[rank::world]  # under torchrun each rank takes every world-th image
    for n, path in mine:
        stem = os.path.splitext(os.path.basename(path))[0]
        out_mask, out_overlay = (os.path.join(args.out, stem + suffix) for suffix in (".png", "_overlay.png"))
        gt_path = find_mask(args.masks, stem) if args.masks else None
        if args.masks and gt_path is None:
            say(args, f"warning: no mask for {path} in {args.masks}; not scored")
        if os.path.exists(out_mask) and os.path.exists(out_overlay) and not args.overwrite and not gt_path:
            progress(n, len(images))
            continue
        image = read_image(path)
        if max(image.shape[1:]) > 4 * SIZE:
            say(args, f"{path} is {image.shape[2]}x{image.shape[1]}: segmented at {SIZE}x{SIZE} like every image, "
                      "its class scores upsampled to full size in bands of rows")
        labels = segment(sd, context, image, len(parts), s)
        write_index_png(out_mask, labels.numpy())
        shown = image if tuple(image.shape[1:]) == tuple(labels.shape) else resize(image, tuple(labels.shape), "bilinear")
        write_overlay(out_overlay, shown, labels.numpy(), parts)
        if gt_path:
            (gt,), _ = colors_to_labels([read_mask(gt_path)], emb["colors"] or None, [gt_path])
            gt = resize(torch.from_numpy(gt)[None], tuple(labels.shape), "nearest")[0]
            per_image.append((n, iou_per_class(labels, gt, len(parts))))
        progress(n, len(images))
    if world > 1:  # every rank's scores to rank 0, in image order, so it prints what one process would
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, per_image)
        per_image = sorted(sum(gathered, []))
        torch.distributed.destroy_process_group()
    if rank > 0:
        return
    if args.masks:
        report(args, parts, [ious for _, ious in per_image])
    say(args, f"wrote {len(images)} masks and overlays to {args.out}")


def report(args, parts, per_image):
    per_class, miou = miou_table(per_image, len(parts))
    rows = [(name, v) for name, v in zip(parts, per_class) if v is not None]
    print(f"{'part':<16} IoU")
    for name, v in rows:
        print(f"{name:<16} {v:.4f}")
    print(f"{'mIoU':<16} {miou:.4f}   ({len(per_image)} images)")
    csv = os.path.join(args.out, "metrics.csv")
    write_text(csv, "part,iou\n" + "".join(f"{n},{v:.6f}\n" for n, v in rows) + f"mIoU,{miou:.6f}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only for real defaults; flags that default to None say their source in the text."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser():
    ap = argparse.ArgumentParser(prog="slime.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    d = Settings()

    def common(p):
        p.add_argument("--ckpt", help="SD checkpoint (.safetensors); default: the one file in weights/")
        p.add_argument("--device", help="default: cuda when present, else cpu")
        p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="default: fp32 on cpu, bf16 (or fp16) on cuda")
        p.add_argument("--seed", type=int, help=f"seed of every random draw (default {d.seed})")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
        p.add_argument("--patch-size", dest="patch_size", type=positive_int(SIZE),
                       help=f"inference patch side in px of the 512 image (release default {d.patch_size})")
        p.add_argument("--patches-per-side", dest="patches_per_side", type=positive_int(),
                       help=f"patches per side (release default {d.patches_per_side})")
        p.add_argument("--threshold", type=unit_float, help=f"cross-attention peak a class needs in a patch "
                       f"(release default {d.threshold}, calibrated on real SD)")
        p.add_argument("--test-t", dest="test_t", type=positive_int(999), help=f"inference timestep (release {d.test_t})")
        p.add_argument("--out-size", dest="out_size", type=int, choices=(0, SIZE),
                       help="0: masks at each image's own size (slime); 512: the release's 512x512")
        p.add_argument("--bgr", action="store_const", const=True, help="feed BGR like the release (cv2); default RGB")

    f = sub.add_parser("fit", help="learn part embeddings from annotated images",
                       formatter_class=HelpFormatter)
    f.add_argument("pairs", nargs="+", metavar="IMAGE MASK", help="one or more image/mask pairs")
    f.add_argument("--parts", help="comma-separated class names, background first (default: background,part1,...)")
    f.add_argument("-o", "--output", default="emb.pt", help="where the best embeddings are written")
    f.add_argument("--val", nargs="+", metavar="IMAGE MASK", help="validation pairs (default: the training pairs)")
    f.add_argument("--preset", choices=sorted(PRESETS), help="the release README's per-dataset settings")
    f.add_argument("--epochs", type=positive_int(), help=f"release: {d.epochs}")
    f.add_argument("--lr", type=positive_float, help=f"Adam learning rate (release: {d.lr})")
    f.add_argument("--t-range", dest="t_range", nargs=2, type=positive_int(999), metavar=("MIN", "MAX"),
                   help=f"training timesteps, inclusive (release: {d.t_min} {d.t_max})")
    f.add_argument("--alpha", type=float, help=f"Eq. 8 weight of the WAS MSE loss (release: {d.alpha})")
    f.add_argument("--beta", type=float, help=f"Eq. 8 weight of the SD loss (release: {d.beta})")
    f.add_argument("--guidance", type=float, help=f"CFG scale inside the SD loss (release: {d.guidance})")
    f.add_argument("--min-crop-ratio", dest="min_crop_ratio", type=unit_float,
                   help=f"smallest training crop side as a fraction of 512 (release: {d.min_crop_ratio})")
    f.add_argument("--rotation", type=float, help=f"max rotation in degrees (release: {d.rotation})")
    f.add_argument("--no-cycle", dest="cycle_parts", action="store_const", const=False,
                   help="crops always favour the background, as the release does in effect")
    f.add_argument("--val-every", dest="val_every", type=positive_int(), help="epochs between validations (release: 1)")
    common(f)
    f.set_defaults(run=cmd_fit)

    p = sub.add_parser("predict", help="segment images with fitted embeddings", formatter_class=HelpFormatter,
                       description="Inference settings not given here (patches, threshold, t, output size, "
                                   "colour order, seed) are the ones stored in emb.pt by fit.")
    p.add_argument("emb", help="emb.pt written by fit, or the release's folder of embedding_{i}.pth")
    p.add_argument("--parts", help="class names for a release folder, background first (default: background,part1,...)")
    p.add_argument("inputs", nargs="+", help="image files and/or folders")
    p.add_argument("-o", "--out", default="out", help="output folder")
    p.add_argument("--masks", help="folder of ground-truth masks (by file stem): print and save per-part IoU")
    p.add_argument("--overwrite", action="store_true", help="redo images whose outputs exist")
    common(p)
    p.set_defaults(run=cmd_predict)

    i = sub.add_parser("info", help="what a checkpoint is: family, dtype, tensors, SHA-256, known release file",
                       formatter_class=HelpFormatter)
    i.add_argument("file", help="a .safetensors checkpoint")
    i.set_defaults(run=cmd_info)
    return ap


def positive_int(upper=None):
    def parse(text):
        v = int(text)
        if v <= 0 or (upper and v > upper):
            raise argparse.ArgumentTypeError(f"must be an integer in 1..{upper}" if upper else "must be a positive integer")
        return v
    return parse


def positive_float(text):
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return v


def unit_float(text):
    v = float(text)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError("must be in [0, 1]")
    return v


def main(argv=None):
    args = build_parser().parse_args(argv)
    # CPU: fp32 values below 1.2e-38 become 0. exp() of sharply peaked attention underflows into such
    # denormals, which x86 computes slowly: fit took 2.4x as long on a sharp variant of the SD-like test model.
    torch.set_flush_denormal(True)
    try:
        args.run(args)
    except SlimeError as e:
        print(f"\nslime: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nslime: interrupted; finished outputs are kept", file=sys.stderr)
        return 130
    except torch.cuda.OutOfMemoryError:
        print("\nslime: error: the GPU ran out of memory; try --dtype fp16, fewer or smaller patches "
              "(--patches-per-side 1 --patch-size 512), or --device cpu", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
