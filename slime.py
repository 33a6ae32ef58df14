"""slime: Segment Like Me (SLiMe, ICLR 2024), from scratch on an original Stable Diffusion file.

    python slime.py fit ref.png ref_mask.png --parts background,body,wheel -o emb.pt
    python slime.py predict emb.pt folder/ -o out/

The file reads top to bottom: the settings; what `sd` holds; the method (paper Sec. 4, in the
order of Fig. 3), which stands alone; native resolution (--window, slime's); the checkpoint; files;
the plan of a run and its record; the command line.

  paper:   https://arxiv.org/abs/2309.03179 (Sec. 4, Eq. 3-8)
  release: https://github.com/aliasgharkhani/SLiMe/tree/9de06f1a1e9ca83bd900a0b68646ce4885485f68
           cited below as release/<file>#L<line> at that commit
"""

import argparse
import contextlib
import datetime
import functools
import glob
import hashlib
import io
import json
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps
from safetensors import safe_open

import clip_text
from clip_text import CLIPTextModel, OpenCLIPText, TextConfig
from unet import UNetConfig, UNetModel
from vae import AutoencoderKL, VAEConfig


class SlimeError(Exception):
    """A mistake the user can fix; its message is one sentence, printed without a traceback."""


# ----------------------------------------------------------------------------------------- settings
SIZE = 512  # the model always sees 512x512 images (a 64x64 latent), as in the release
MAP = 64  # the grid of the cross-attention and WAS maps (the release's train_mask_size)


def setting(default, lo=None, hi=None, help="", fit=False, step=None, flag=None):
    """A field of Settings: default, range (and step), --help text; fit=True: training only."""
    meta = dict(range=(lo, hi), step=step, help=help, fit=fit, flag=flag)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    """Every setting of a run: the release's defaults (release/src/arguments.py#L65-L91) unless
    marked slime's."""

    epochs: int = setting(200, 1, 100_000, "training epochs, one step per image each", fit=True)
    lr: float = setting(0.1, 1e-6, 100.0, "Adam's learning rate, no schedule", fit=True)
    t_min: int = setting(5, 1, 999, "smallest training timestep", fit=True)
    t_max: int = setting(100, 1, 999, "largest training timestep, inclusive", fit=True)
    alpha: float = setting(1.0, 0.0, 1e6, "Eq. 8 weight of the WAS-map loss (Eq. 7)", fit=True)
    beta: float = setting(0.005, 0.0, 1e6, "Eq. 8 weight of SD's loss (Eq. 1)", fit=True)
    guidance: float = setting(100.0, 0.0, 1e6, "guidance inside SD's loss", fit=True)
    min_crop_ratio: float = setting(0.8, 0.05, 1.0, "smallest training crop side", fit=True)
    rotation: float = setting(30.0, 0.0, 180.0, "largest training rotation, degrees", fit=True)
    cycle_parts: bool = setting(
        True, help="crops favour the background", fit=True, flag="--no-cycle"
    )
    val_every: int = setting(1, 1, 100_000, "epochs between validations, and the last", fit=True)
    patch_size: int = setting(400, 8, SIZE, "inference patch side, pixels of the 512 image")
    patches_per_side: int = setting(2, 1, 16, "inference patches per side")
    threshold: float = setting(0.2, 0.0, 1.0, "cross-attention peak a class needs in a patch")
    test_t: int = setting(100, 1, 999, "inference timestep")
    out_size: int = setting(0, 0, SIZE, "mask side: 0 the image's, 512 the release's", step=SIZE)
    bgr: bool = setting(False, help="feed the model BGR, as the release's cv2 did", flag="--bgr")
    seed: int = setting(0, 0, 2**63 - 1, "seed of every random draw")
    window: int = setting(0, 0, 16384, "slime's native resolution: window side", step=MAP)


# ------------------------------------------------------------------------- the model: what sd holds
def alphas_cumprod(n=1000, linear_start=0.00085, linear_end=0.012):
    """ldm's "linear" schedule (diffusers: scaled_linear), in float64 as ldm computes it, stored
    float32 (CompVis/stable-diffusion at 21f890f, ldm/modules/diffusionmodules/util.py)."""
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


class StableDiffusion:
    """The `sd` every method function takes, as load_models (below) returns it: the frozen UNet, VAE
    and text encoder, the tokenizer and the noise schedule."""

    def __init__(self, family, unet, vae, text_encoder, path):
        self.family, self.path = family, path
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.device, self.dtype = unet.out[2].weight.device, unet.out[2].weight.dtype
        self.alphas_cumprod = alphas_cumprod().to(self.device)

    @functools.cached_property
    def fingerprint(self):  # the weights' identity, read when fit saves emb.pt
        return fingerprint(self.path)

    def tokenize(self, texts):
        # SD1's HF tokenizer pads with <|endoftext|>, SD2's open_clip.tokenize with 0
        return clip_text.tokenize(texts, clip_text.EOS if self.family == "sd1" else 0)


# ---------------------------------------------------------------- the method (paper Sec. 4, Fig. 3)
# Each step cites the paper's equation or section, or is marked `release-only:` with the release's
# line where the paper is silent; slime's own choices are marked slime's. The release's layers
# (release/src/arguments.py#L6-L44) by checkpoint path; by its diffusers names, up_blocks[1]
# .attentions[0,1,2], up_blocks[2].attentions[0,1] (attn2), up_blocks[3].attentions[0,1,2] (attn1).
CROSS_LAYERS = tuple(f"output_blocks.{i}.1.transformer_blocks.0.attn2" for i in (3, 4, 5, 6, 7))
SELF_LAYERS = tuple(f"output_blocks.{i}.1.transformer_blocks.0.attn1" for i in (9, 10, 11))
IGNORE = 255  # mask value that no loss and no score looks at (PASCAL VOC's "void")


def prompt_contexts(sd, num_classes):
    """Sec. 4.1: the text encoder's OUTPUT for "part part ... part" (K words) and for "" (the SD
    loss's unconditional branch), release/src/slime.py#L59-L76."""
    # Positions 1..K-1 of the first are the vectors SLiMe learns. Position 0, <start-of-text>,
    # stands for the background and is never learned: the attention parks on it where no word fits.
    with torch.no_grad():
        tokens = sd.tokenize([" ".join(["part"] * num_classes), ""]).to(sd.device)
        # (cond, uncond) in fp32: Adam updates the vectors in place
        return sd.text_encoder(tokens).float().split(1)


def with_learned(learned, cond):
    """The conditional context with the learned vectors (K-1, D) at token positions 1..K-1."""
    # positions after K-1 (<end-of-text>, padding) keep the prompt's outputs: SD attends to them too
    after = cond[:, 1 + len(learned) :]
    return torch.cat([cond[:, :1], learned[None].to(cond.dtype), after], dim=1)


def noisy_latent(sd, images, t, gen):
    """Sec. 3 (LDM): images (B, 3, 512, 512) in [0, 1] -> x_t = sqrt(a_t) z + sqrt(1 - a_t) eps,
    and eps; z is a posterior SAMPLE of the VAE times 0.18215 (release/src/stable_difusion.py
    #L411-L418, DDIM add_noise)."""
    with torch.no_grad():
        z = sd.vae.encode(images, sample=True, generator=gen)
    # drawn after the VAE's sample from the same generator: part of what --seed repeats
    noise = torch.randn(z.shape, generator=gen, device=z.device)
    a = sd.alphas_cumprod[t].view(-1, 1, 1, 1)  # the signal's fraction of variance left at t
    return a.sqrt() * z + (1 - a).sqrt() * noise, noise


def attention_maps(sd, x_t, t, context, num_classes, log_space):
    """One UNet pass -> (cross, A_sa, eps). cross is Eq. 3's A_ca (K, 64, 64): tokens 0..K-1's
    cross-attention (after the softmax over all 77) averaged over heads and layers, each resized to
    64x64 (release/src/stable_difusion.py#L155-L264); with log_space, log A_ca (training's Eq. 4
    input). A_sa (4096 queries, 4096 keys), Eq. 5: the 64x64 layers' self-attention, averaged."""
    # only these 8 of the UNet's 32 attention layers materialise their maps (the rest run fast)
    prob_layers, log_layers = SELF_LAYERS + CROSS_LAYERS, ()
    if log_space:
        prob_layers, log_layers = SELF_LAYERS, CROSS_LAYERS
    eps, maps = sd.unet(x_t, t, context, attn_layers=prob_layers, log_attn_layers=log_layers)
    resized = []
    for name in CROSS_LAYERS:
        m = maps[name][0, :, :num_classes]  # (N pixels, K): the K tokens' columns
        side = int(m.shape[0] ** 0.5)  # 16 or 32: the layer's own grid
        m = m.T.reshape(1, num_classes, side, side)
        # bilinear, align_corners False, as the release (release/src/stable_difusion.py#L201-L214)
        resized.append(F.interpolate(m, size=(MAP, MAP), mode="bilinear", align_corners=False)[0])
    # every layer weighs the same, 16x16 or 32x32: the release's mean over its stack (#L250-L256)
    cross = sum(resized) / len(resized)
    # row q: P(query q -> key j)
    A_sa = sum(maps[name][0] for name in SELF_LAYERS) / len(SELF_LAYERS)
    return cross, A_sa, eps


def was_map(P, A_sa):
    """Eq. 6, the Weighted Accumulated Self-attention map: S[k, q] = sum_j P[k, j] A_sa[q, j]."""
    # A_sa.T puts the keys j on the rows, so one matmul sums over j; the release forms the same sum
    # as a broadcast product of K x 4096 x 4096 values (release/src/slime.py#L130-L133)
    return (P.flatten(1) @ A_sa.T).view(P.shape)


def class_weights(mask, num_classes):
    """release-only (release/src/slime.py#L90-L95; the paper's Eq. 4 has no weights): #foreground /
    #pixels of a part; absent 0, background 1."""
    n = torch.bincount(mask[mask != IGNORE].flatten(), minlength=num_classes)[:num_classes].float()
    n[0] = 0  # so n.sum() counts the foreground only
    w = torch.where(n > 0, n.sum() / (n + 1e-6), torch.zeros_like(n))  # 1e-6: the release's
    w[0] = 1  # a part weighs >= 1: the background, often most pixels, weighs no more
    return w


def segmentation_losses(log_A_ca, A_sa, mask, num_classes):
    """Eq. 4 and Eq. 7 on a (64, 64) mask: the cross-entropy of A_ca, and the squared error of the
    WAS maps against the one-hot mask (release/src/slime.py#L121-L143)."""
    # ignore_index: 255 pixels (VOC's void, --window's padding) are neither right nor wrong
    weight = class_weights(mask, num_classes)
    # log A_ca as the logits: their softmax over the K classes is A_ca renormalised over K
    loss_ce = F.cross_entropy(log_A_ca[None], mask[None], weight=weight, ignore_index=IGNORE)
    # Eq. 6 of the K-way softmax. The release takes it of the averaged raw logits, which differ from
    # log A_ca by a per-pixel constant: the same softmax
    S_was = was_map(log_A_ca.softmax(0), A_sa)
    # the clamp only keeps one_hot from failing on 255; those pixels are dropped below
    onehot = F.one_hot(mask.clamp(max=num_classes - 1), num_classes).permute(2, 0, 1).float()
    # the release: mean over classes and pixels, times K == per-pixel sum over classes, pixel mean
    loss_mse = ((S_was - onehot) ** 2).sum(0)[mask != IGNORE].mean()
    return loss_ce, loss_mse


def training_step(sd, learned, cond, uncond, image, mask, s, gen):
    """Fig. 3: encode, add noise, UNet, maps, losses. image (3, 512, 512), mask (64, 64) ->
    (loss, terms)."""
    num_classes = len(learned) + 1
    # small t: the image is barely noised, so the attention still follows it; t_max + 1: inclusive,
    # as the release draws it (release/src/stable_difusion.py#L297)
    t = torch.randint(s.t_min, s.t_max + 1, (1,), generator=gen, device=gen.device)
    x_t, noise = noisy_latent(sd, image[None], t, gen)
    context = with_learned(learned, cond)
    log_A_ca, A_sa, eps_cond = attention_maps(sd, x_t, t, context, num_classes, log_space=True)
    loss_ce, loss_mse = segmentation_losses(log_A_ca, A_sa, mask, num_classes)
    loss_sd = torch.zeros(())  # a tensor even when beta = 0 skips a whole UNet pass
    if s.beta:
        # Eq. 1's L_LDM keeps the vectors where SD can use them; release-only: with guidance 100
        # (release/src/stable_difusion.py#L340-L344). Only the cond branch depends on the vectors,
        # so the uncond one runs without a graph (the release: a CFG batch of 2; same gradient)
        with torch.no_grad():
            eps_uncond = sd.unet(x_t, t, uncond)[0]
        eps = eps_uncond + s.guidance * (eps_cond - eps_uncond)
        loss_sd = F.mse_loss(eps, noise)  # against the noise added: SD 2.1-base's eps objective
    loss = loss_ce + s.alpha * loss_mse + s.beta * loss_sd  # Eq. 8
    return loss, {"ce": loss_ce.item(), "mse": loss_mse.item(), "sd": loss_sd.item()}


# release-only: the training augmentations (release/src/dataset.py#L31-L91), in torch: flip, blur,
# a crop that favours one part, rotation. They let one annotated image stand for many views.
def resize(x, size, mode):
    """(C, H, W) -> (C, *size). Bilinear without antialiasing (cv2.INTER_LINEAR), or nearest."""
    if mode == "nearest":
        # interpolate takes no integer tensors: through float and back (exact up to 255)
        return F.interpolate(x[None].float(), size=size, mode="nearest")[0].to(x.dtype)
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]


def gaussian_blur(image, k):
    """cv2.GaussianBlur(k, sigma=0) with reflect-101 borders: for k <= 7 OpenCV takes fixed binomial
    kernels (augment draws k in {3, 5})."""
    g = torch.tensor({3: [1, 2, 1], 5: [1, 4, 6, 4, 1]}[k], dtype=image.dtype)
    g = g / g.sum()
    pad = F.pad(image[None], (k // 2,) * 4, mode="reflect")  # OpenCV's REFLECT_101
    out = F.conv2d(pad, g.view(1, 1, 1, k).expand(3, 1, 1, k), groups=3)  # rows, then columns
    return F.conv2d(out, g.view(1, 1, k, 1).expand(3, 1, k, 1), groups=3)[0]


def rotate(x, degrees, mode):
    """Rotate (C, H, W) about its centre, same size, zeros outside (albumentations Rotate,
    BORDER_CONSTANT 0)."""
    a = torch.tensor(degrees * torch.pi / 180)
    # positive angles turn clockwise on screen (cv2's counter-clockwise); the angle is drawn
    # symmetric about 0, so the distribution of views is the release's
    theta = torch.tensor([[torch.cos(a), torch.sin(a), 0.0], [-torch.sin(a), torch.cos(a), 0.0]])
    grid = F.affine_grid(theta[None], (1, *x.shape), align_corners=False)
    out = F.grid_sample(x[None].float(), grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out[0].to(x.dtype)


def part_crop(mask, part, min_ratio, gen, tries=1000):
    """The crop that favours one part (release/src/dataset.py#L67-L83): side r * 512, r ~
    U(min_ratio, 1), accepted when it keeps over 30% of that part's pixels (always, if absent)."""
    total = (mask == part).sum()
    # the release loops until accepted; a cap keeps a 1-pixel part from hanging
    for _ in range(tries):
        r = min_ratio + (1 - min_ratio) * torch.rand(1, generator=gen).item()
        side = int(r * SIZE)  # release/src/utils.py#L38
        # a full-size crop draws no origin, as release/src/utils.py#L39-L44
        y0, x0 = 0, 0
        if side != SIZE:
            y0, x0 = torch.randint(0, SIZE - side + 1, (2,), generator=gen).tolist()
        if total == 0 or (mask[y0 : y0 + side, x0 : x0 + side] == part).sum() / total > 0.3:
            return y0, x0, side
    # the whole image keeps all of the part: the release's loop would accept it too
    return 0, 0, SIZE


def augment(image, mask, part, s, gen):
    """The release's train transforms on (3, 512, 512) and (512, 512): flip, blur, the part-aware
    crop, rotation."""
    rand = lambda: torch.rand(1, generator=gen).item()  # noqa: E731
    if rand() < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)  # horizontal: parts keep up and down
    if rand() < 0.5:  # A.GaussianBlur(blur_limit=(1, 5)) (release/src/dataset.py#L35)
        k = int(torch.randint(1, 6, (1,), generator=gen))
        # albumentations takes an even kernel to the next odd one: k in {1, 3, 5} at 20/40/40%
        k += 1 - k % 2
        image = gaussian_blur(image, k) if k > 1 else image
    y0, x0, side = part_crop(mask, part, s.min_crop_ratio, gen)
    # a zoom: parts look larger; the mask nearest, so no mixed labels
    image = resize(image[:, y0 : y0 + side, x0 : x0 + side], (SIZE, SIZE), "bilinear")
    mask = resize(mask[None, y0 : y0 + side, x0 : x0 + side], (SIZE, SIZE), "nearest")[0]
    # uniform in [-rotation, rotation], A.Rotate's limit (release/src/dataset.py#L38-L50)
    if rand() < 0.5:
        angle = (2 * rand() - 1) * s.rotation
        # the corners the turn brings in are 0 in both: black pixels, background labels
        image, mask = rotate(image, angle, "bilinear"), rotate(mask[None], angle, "nearest")[0]
    return image, mask


def fit(sd, pairs, num_classes, s, val_pairs=None, progress=lambda event: None, state=None):
    """Sec. 4.1 with the release's loop (release/src/slime.py#L111-L152, Adam at #L410-L416): learn
    K-1 text vectors from [(image (3, H, W) in [0, 1], mask (H, W) labels)], keep the best ->
    context (1, 77, D). progress(event) each step, validation and epoch; an epoch's `state`
    continues the fit as if it had never stopped."""
    pairs = as_pairs(pairs, num_classes, s)
    # no --val: the training pairs validate
    val_pairs = as_pairs(val_pairs, num_classes, s) if val_pairs else pairs
    # timesteps, VAE samples, noise on the device; augmentations on a CPU stream, alike anywhere
    gen = torch.Generator(sd.device).manual_seed(s.seed)
    aug_gen = torch.Generator().manual_seed(s.seed)
    cond, uncond = prompt_contexts(sd, num_classes)
    # the only parameters, starting as the word "part": SD itself stays frozen
    learned = cond[0, 1:num_classes].clone().requires_grad_(True)
    optimizer = torch.optim.Adam([learned], lr=s.lr)
    # the validation images never change: their noisy inputs are made once per fit
    val_inputs = [noisy_patches(sd, image, s) for image, _ in val_pairs]
    # best 0.0 with >=: the first validation always saves, as the release's (#L28)
    best, best_context, step = 0.0, cond, 0
    if state:  # a stopped fit goes on: its best, vectors, Adam's moments, random streams
        best, best_context, step = state["best"], state["best_context"], state["epoch"] * len(pairs)
        learned.data.copy_(state["learned"])
        optimizer.load_state_dict(state["adam"])
        gen.set_state(state["gen"])
        aug_gen.set_state(state["aug_gen"])
    for epoch in range(state["epoch"] if state else 0, s.epochs):
        # the release's DataLoader shuffles each epoch; seeded per epoch so a run can be repeated
        shuffle = torch.Generator().manual_seed(s.seed + epoch)
        for i in torch.randperm(len(pairs), generator=shuffle).tolist():
            step += 1
            terms = fit_step(sd, learned, optimizer, cond, uncond, pairs[i], step, s, gen, aug_gen)
            progress(
                dict(event="step", step=step, steps=s.epochs * len(pairs), epoch=epoch + 1, **terms)
            )
        # the last epoch is always validated
        if not (epoch + 1) % s.val_every or epoch == s.epochs - 1:
            progress(dict(event="validating", epoch=epoch + 1))
            t0, context = time.time(), with_learned(learned.detach(), cond)
            miou = validation_miou(sd, context, val_pairs, val_inputs, num_classes, s)
            # keep the best (release/src/slime.py#L281-L330); a tie goes to the later epoch
            if miou >= best:
                best, best_context = miou, context
            done = dict(miou=miou, best=best_context is context, seconds=time.time() - t0)
            progress(dict(event="validation", epoch=epoch + 1, **done))
        state = dict(
            epoch=epoch + 1, best=best, best_context=best_context, learned=learned.detach()
        )
        state.update(adam=optimizer.state_dict(), gen=gen.get_state(), aug_gen=aug_gen.get_state())
        progress(dict(event="epoch", epoch=epoch + 1, state=state))
    return best_context


def fit_step(sd, learned, optimizer, cond, uncond, pair, step, s, gen, aug_gen):
    """Adam's step number `step` on a view of one pair -> the loss terms."""
    # the part this crop favours. The release's counter (release/src/dataset.py#L89-L90) lives in 8
    # workers that restart each epoch at 0 (#L158-L161): in effect its crops favour the background,
    # as --no-cycle does
    part = (step - 1) % (len(learned) + 1) if s.cycle_parts else 0
    image, mask = training_view(*pair, part, s, aug_gen)
    image, mask = image.to(sd.device), mask.to(sd.device)
    loss, terms = training_step(sd, learned, cond, uncond, image, mask, s, gen)
    # before backward: one nan step would make Adam's moments nan
    if not torch.isfinite(loss):
        raise SlimeError(diverged(sd, loss, step, terms))
    optimizer.zero_grad()
    # through the frozen UNet into the K-1 vectors only
    loss.backward()
    optimizer.step()
    return terms


def validation_miou(sd, context, val_pairs, val_inputs, num_classes, s):
    """The mean image mIoU of the validation pairs, segmented as predict does, at the release's
    512; val_inputs: each pair's noisy patches."""
    total = 0.0
    for (image, gt), inputs in zip(val_pairs, val_inputs):
        labels = segment(sd, context, image, num_classes, s, SIZE, inputs)
        total += image_miou(labels, gt, num_classes)
    return total / len(val_pairs)


def diverged(sd, loss, step, terms):
    """Why a loss is not finite. The weights were checked finite at load: the optimisation, or the
    number format."""
    why = "the learning rate is the likely cause (the weights were checked finite at load)"
    why += ": try a lower --lr"
    if sd.dtype == torch.float16:
        why = "fp16 overflows easily: use --dtype bf16 or fp32"
    terms = ", ".join(f"{k} {v:.4g}" for k, v in terms.items())
    kept = "the best emb.pt so far is kept"
    return f"the loss became {loss.item()} at step {step} ({terms}); {why}; {kept}"


def training_view(image, mask, part, s, gen):
    """What one step sees of a pair: the release's augmentations (of a view at the image's own
    scale, with --window); the mask at 64x64."""
    if s.window:  # slime's native resolution, below the method
        image, mask = native_view(image, mask, part, s.window, gen)
    image, mask = augment(image, mask, part, s, gen)
    if s.bgr:
        # --bgr: the release fed cv2's BGR images (segment flips likewise)
        image = image.flip(0)
    # the release's nearest resize to train_mask_size 64 (release/src/dataset.py#L84-L88): it takes
    # pixel (8i, 8j)
    return image, resize(mask[None], (MAP, MAP), "nearest")[0]


def as_pairs(pairs, num_classes, s):
    """[(image, mask)] -> int64 masks, checked; both squashed to 512x512 as the release's cv2
    resizes them (image bilinear, mask nearest), or with --window kept at their own resolution."""
    out = []
    for n, (image, mask) in enumerate(pairs, 1):
        mask = torch.as_tensor(np.asarray(mask)).long()
        if mask.ndim == 3:
            raise SlimeError(
                f"mask {n} is a colour mask: make it labels with slime.colors_to_labels"
            )
        if tuple(mask.shape) != tuple(image.shape[1:]):
            shapes = f"{tuple(mask.shape)} does not match its image {tuple(image.shape)}"
            raise SlimeError(f"mask {n} of {shapes}")
        bad = sorted(set(mask.unique().tolist()) - set(range(num_classes)) - {IGNORE})
        if bad:  # cross_entropy would end in a bare IndexError
            raise SlimeError(f"mask {n} holds class values {bad[:8]} outside 0..{num_classes - 1}")
        if not s.window:
            image = resize(image, (SIZE, SIZE), "bilinear")
            mask = resize(mask[None], (SIZE, SIZE), "nearest")[0]
        out.append((image, mask))
    return out


def patch_origins(patch_size, per_side):
    """release-only (release/src/utils.py#L14-L31): the top-left corners of the inference patches,
    rows first."""
    # floor division, as release/src/utils.py#L19-L20: when per_side - 1 does not divide 512 -
    # patch_size, the last patch stops short of the border, and the pixels past it get no vote
    step = (SIZE - patch_size) // (per_side - 1) if per_side > 1 else 0
    return [(i * step, j * step) for i in range(per_side) for j in range(per_side)]


def noisy_patches(sd, image, s):
    """release-only (release/src/slime.py#L188-L229; the paper's Sec. 4.2 segments the whole image):
    the image squashed to 512x512 and cut into the patches -> [(y0, x0, x_t)]."""
    if s.window:  # slime's native resolution, below the method
        return noisy_windows(sd, image, s)
    x, side = resize(image.to(sd.device), (SIZE, SIZE), "bilinear"), s.patch_size
    crops = [
        (y0, x0, x[:, y0 : y0 + side, x0 : x0 + side])
        for y0, x0 in patch_origins(side, s.patches_per_side)
    ]
    return list(noised(sd, s, crops))


def noised(sd, s, views):
    """Sec. 4.2: (y0, x0, crop) -> (y0, x0, x_t): each crop zoomed to 512 (SD sees its parts
    larger), in the release's BGR order with --bgr, noised at test_t. Seeded per image, so an image
    gets the same noise in any order."""
    gen = torch.Generator(sd.device).manual_seed(s.seed)
    t = torch.tensor([s.test_t], device=sd.device)
    for y0, x0, crop in views:
        x = resize(crop.to(sd.device), (SIZE, SIZE), "bilinear")
        x = x.flip(0) if s.bgr else x
        yield y0, x0, noisy_latent(sd, x[None], t, gen)[0]


@torch.no_grad()
def vote_sums(sd, context, patches, num_classes, s, grid, side, progress=None):
    """release-only (release/src/slime.py#L188-L279): each patch adds its votes to the side x side
    cells from (y0, x0) -> (sum of votes, number of votes), (K, *grid) each.
    progress(n, of, A_ca, A_sa) after each patch, with its maps (examples/maps.py draws them)."""
    scores = torch.zeros(num_classes, *grid, device=sd.device)
    votes = torch.full((num_classes, *grid), 1e-7, device=sd.device)
    t = torch.tensor([s.test_t], device=sd.device)
    for n, (y0, x0, x_t) in enumerate(patches, 1):
        A_ca, A_sa, _ = attention_maps(sd, x_t, t, context, num_classes, log_space=False)
        seen, patch_scores = patch_votes(A_ca, A_sa, s.threshold, side)
        if progress:
            progress(n, len(patches), A_ca, A_sa)
        if patch_scores is None:
            continue  # no class was confident anywhere in this patch
        region = (seen, slice(y0, y0 + side), slice(x0, x0 + side))
        scores[region] += patch_scores
        # counted per class, as the release's aux_attention_map (#L271-L275): a class that one of
        # two overlapping patches saw is not halved where the other did not see it
        votes[region] += 1
    return scores, votes


def patch_votes(A_ca, A_sa, threshold, side):
    """One patch's vote: the classes it saw, and their WAS maps (Eq. 6) on their cross-attention's
    scale, (side, side). release-only (release/src/slime.py#L233-L264): the threshold, the
    background's above-mean rule and the min-max rescale, all on the 64x64 maps."""
    cross = A_ca.flatten(1)  # (K, 4096)
    peak, floor = cross.max(1).values, cross.min(1).values
    seen = (peak >= threshold).nonzero()[:, 0]  # a class votes only where it is confident
    if len(seen) == 0:
        return seen, None
    cross = cross[seen]
    # The FIRST class that passed (the background, whenever it passed) keeps only its above-mean
    # pixels: its cross-attention covers the whole image, and its WAS map would swallow the parts.
    cross[0] = torch.where(cross[0] > cross[0].mean(), cross[0], 0)
    was = was_map(cross.view(-1, MAP, MAP), A_sa)
    # onto the patch's footprint
    was = F.interpolate(was[None], size=(side, side), mode="bilinear", align_corners=False)[0]
    # Min-max rescale each WAS map from its own range [w_min, w_max] onto its class's
    # cross-attention range [floor, peak]: WAS maps of different classes live on different scales,
    # and the argmax should compare the classes' confidences. A line: w_min -> floor, w_max -> peak.
    w_min = was.flatten(1).min(1).values[:, None, None]
    w_max = was.flatten(1).max(1).values[:, None, None]
    floor, peak = floor[seen][:, None, None], peak[seen][:, None, None]
    per_unit = (w_max - w_min) / (peak - floor)  # WAS units per unit of cross-attention
    per_unit[torch.isnan(per_unit) | (per_unit == 0)] = 1e-7  # a flat map (0/0, 0) stays put
    # = floor + (was - w_min) / per_unit, in the release's order of operations (the same bits)
    return seen, was / per_unit + (floor - w_min / per_unit)


def class_scores(scores, votes, sd):
    """The votes' mean (K, *grid), on the CPU (where the argmax and the files work), checked."""
    scores = (scores / votes).cpu()
    if not torch.isfinite(scores).all():  # argmax would quietly pick class 0 everywhere
        fp16 = ", as fp16 overflows: use bf16 or fp32" if sd.dtype == torch.float16 else ""
        raise SlimeError(f"its class scores are not finite{fp16}")
    return scores


def segment(sd, context, image, num_classes, s, out_size=None, inputs=None, progress=None):
    """Sec. 4.2: image (3, H, W) in [0, 1] -> labels (H, W) uint8, or (out_size, out_size): the
    argmax of the class scores resized to the image. inputs: its noisy patches, when the caller
    keeps them; progress: vote_sums'."""
    if s.window:  # slime's native resolution, below the method
        return window_segment(sd, context, image, num_classes, s, inputs, progress)
    inputs = inputs or noisy_patches(sd, image, s)
    grid = (SIZE, SIZE)
    sums = vote_sums(sd, context, inputs, num_classes, s, grid, s.patch_size, progress)
    scores = class_scores(*sums, sd)
    # slime's: the SCORES, not the labels, are resized to the image's own size, the argmax taken
    # there (--out-size 512: the release's masks)
    size = out_size or s.out_size
    h, w = (size, size) if size else image.shape[1:]
    # at 512 the scores have the output size: the argmax directly (release/src/slime.py#L277-L278)
    if (h, w) == (SIZE, SIZE):
        return scores.argmax(0).byte()
    return upsampled_argmax(scores, h, w)


def upsampled_argmax(scores, h, w, extent=None, band=256):
    """The argmax over classes of the scores (K, gh, gw) bilinearly resized to extent (default
    (h, w)) and cut to their top-left (h, w) -> (h, w) uint8. `band` rows at a time, so that a
    12000x9000 photo never holds K full-size maps."""
    (gh, gw), (eh, ew) = scores.shape[1:], extent or (h, w)
    # bilinear is separable: one matrix per axis
    rows = linear_upsampling(gh, eh)[:h]  # (h, gh)
    cols = linear_upsampling(gw, ew)[:w]  # (w, gw)
    scores_w = scores @ cols.T  # (K, gh, w): columns first, at the grid's few rows
    labels = torch.empty(h, w, dtype=torch.uint8)
    for i in range(0, h, band):
        R = rows[i : i + band]
        used = R.any(0).nonzero()[:, 0]  # an output row mixes 2 score rows: skip the rest
        lo, hi = used.min().item(), used.max().item() + 1
        band_scores = torch.einsum("hr,krw->khw", R[:, lo:hi], scores_w[:, lo:hi])
        # max(0).indices = argmax(0), the first maximum, but 20x faster on CPU
        labels[i : i + band] = band_scores.max(0).indices
    return labels


def linear_upsampling(n, size):
    """The (size, n) matrix M of F.interpolate's 1-D linear resize from n to size samples
    (align_corners False): M @ v resizes v. Row i holds the weights of the n inputs in output i."""
    # built by resizing the identity: column j is input j alone (a unit impulse), resized
    eye = torch.eye(n)[None]
    return F.interpolate(eye, size=size, mode="linear", align_corners=False)[0].T


def iou_per_class(pred, gt, num_classes):
    """IoU of every class present in gt (255 = ignore): |pred & gt| / (|pred | gt| + 1e-7)
    (release/src/utils.py#L8-L11). Classes absent from gt are not scored, even where predicted."""
    valid = gt != IGNORE
    pred, gt = pred[valid], gt[valid]
    ious = {}
    for c in gt.unique().tolist():
        if c < num_classes:
            both, either = (pred == c) & (gt == c), (pred == c) | (gt == c)
            ious[c] = both.sum().item() / (either.sum().item() + 1e-7)
    return ious


def image_miou(pred, gt, num_classes):
    """Mean IoU over the classes in the image's ground truth (release/src/slime.py#L300-L320)."""
    ious = iou_per_class(pred, gt, num_classes)
    return sum(ious.values()) / max(len(ious), 1)


def miou_table(per_image, num_classes):
    """[{class: IoU}] -> (per-class IoU, mIoU) as the release reports a test set: a class's IoU is
    the mean over the images that hold it; the mIoU is the mean over classes seen in any image."""
    per_class = [[ious[c] for ious in per_image if c in ious] for c in range(num_classes)]
    per_class = [sum(v) / len(v) if v else None for v in per_class]
    seen = [v for v in per_class if v is not None]
    return per_class, sum(seen) / max(len(seen), 1)


# ---------------------------------------------------------- native resolution (--window, slime's)
# The release squashes every image to 512x512, so a part of a few pixels in a big photo falls below
# one latent pixel. --window N cuts the image, at its own resolution, into overlapping N x N
# windows, each resized to 512 and voting as a release patch does; fit trains on views at its scale.
# The method reaches it through one call each: training_view, noisy_patches and segment.
def window_crop(x, y0, x0, side, fill=None):
    """x[..., y0:y0 + side, x0:x0 + side], padded past the edge with its edge pixels (an image) or
    fill."""
    x = x[..., y0 : y0 + side, x0 : x0 + side]
    pad = (0, side - x.shape[-1], 0, side - x.shape[-2])
    if not any(pad):
        return x
    if fill is None:
        return F.pad(x[None], pad, mode="replicate")[0]
    return F.pad(x, pad, value=fill)


def native_view(image, mask, part, window, gen):
    """fit's view at predict's scale: a window x window crop holding a random pixel of the favoured
    part."""
    ys, xs = (mask == part).nonzero(as_tuple=True)
    pick = int(torch.randint(0, len(ys), (1,), generator=gen)) if len(ys) else None
    origin = []
    # the favoured part is in every view
    for found, n in ((ys, mask.shape[0]), (xs, mask.shape[1])):
        if pick is None:
            p = int(torch.randint(0, n, (1,), generator=gen))
        else:
            p = int(found[pick])
        # where in the view that pixel lands; the view lies inside the image where it fits
        offset = int(torch.randint(0, window, (1,), generator=gen))
        origin.append(min(max(p - offset, 0), max(n - window, 0)))
    image = resize(window_crop(image, *origin, window), (SIZE, SIZE), "bilinear")
    # the padding past a small image is nobody's part: no loss looks at it
    mask = window_crop(mask, *origin, window, IGNORE)
    return image, resize(mask[None], (SIZE, SIZE), "nearest")[0]


def window_layout(h, w, window):
    """Where the windows of an (h, w) image lie -> (cell, grid (gh, gw), origins [(y0, x0)], rows
    first). The scores' grid has cells of window/64 pixels (a pixel of a window's maps) and covers
    at least a window."""
    cell = window // MAP
    grid = tuple(max(MAP, -(-n // cell)) for n in (h, w))
    return cell, grid, [(y0, x0) for y0 in axis_origins(grid[0]) for x0 in axis_origins(grid[1])]


def axis_origins(n, side=MAP, stride=MAP * 3 // 4):
    """The fewest windows along n cells, first and last flush with the ends, at most `stride`
    apart."""
    count = 1 + -(-(n - side) // stride)
    if count == 1:
        return [0]
    return [round(i * (n - side) / (count - 1)) for i in range(count)]


def noisy_windows(sd, image, s):
    """noisy_patches at the image's own resolution: the windows -> [(y0, x0, x_t)]."""
    cell, _, origins = window_layout(*image.shape[1:], s.window)
    crops = ((y0, x0, window_crop(image, y0 * cell, x0 * cell, s.window)) for y0, x0 in origins)
    return list(noised(sd, s, crops))


def window_segment(sd, context, image, num_classes, s, windows=None, progress=None):
    """segment at the image's own resolution: the release's votes over the windows, on a grid of
    cells, resized to the grid's padded extent and cut to the image -> labels (H, W) uint8."""
    (h, w), window = image.shape[1:], s.window
    cell, grid, _ = window_layout(h, w, window)
    windows = windows or noisy_windows(sd, image, s)
    scores = class_scores(*vote_sums(sd, context, windows, num_classes, s, grid, MAP, progress), sd)
    return upsampled_argmax(scores, h, w, (grid[0] * cell, grid[1] * cell))


# ----------------------------------------------------------------------------- the checkpoint
# The prefixes of the original (ldm) single files. Each module copies the names below its prefix,
# so loading strips the prefix and assigns, with no table of names (README, "How the modules map").
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = {"sd1": "cond_stage_model.transformer.text_model.", "sd2": "cond_stage_model.model."}
# Tensors slime does not use; any other that no module takes is an error, as is any a module lacks.
IGNORED_KEYS = (
    r"first_stage_model\.(decoder|post_quant_conv)\.",  # the VAE decoder: SLiMe never decodes
    r"(betas|\w*alphas_cumprod\w*|posterior_\w+)$",  # the 12 schedule buffers: alphas_cumprod()
    r"model_ema\.",  # LitEma's decay / num_updates scalars left in the pruned EMA-only files
    r"cond_stage_model\.transformer\.text_model\.embeddings\.position_ids$",  # SD1: an arange(77)
    r"cond_stage_model\.model\.transformer\.resblocks\.{last}\.",  # SD2: the unused last block
    r"cond_stage_model\.model\.(text_projection|logit_scale)$",  # SD2: CLIP's contrastive head
)
WIDTHS = {  # the tensors that give the modules' widths; all others are checked against them
    "unet": (UNET_PREFIX + "input_blocks.0.0.weight", 0),
    "context": (UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", 1),
    "vae": (VAE_PREFIX + "encoder.conv_in.weight", 0),
    "sd1": (TEXT_PREFIX["sd1"] + "embeddings.token_embedding.weight", 1),
    "sd2": (TEXT_PREFIX["sd2"] + "token_embedding.weight", 1),
}


def build_models(shapes, path="checkpoint"):
    """{key: shape} -> (family, {prefix: meta module}, ignore patterns); widths from the shapes."""
    families = [f for f, p in TEXT_PREFIX.items() if any(k.startswith(p) for k in shapes)]
    family = families[0] if families else None
    parts = ("unet", "context", "vae", family)
    needed = [WIDTHS[k][0] for k in parts] if family else ["a text encoder"]
    missing = [k for k in needed if k not in shapes]
    sdxl = any(k.startswith("conditioner.") for k in shapes)  # SDXL's text encoders are there
    if missing or sdxl:
        raise SlimeError(f"{path} is no SD 1.x or 2.x checkpoint: it lacks {(missing + needed)[0]}")
    width = {k: shapes[key][dim] for k, (key, dim) in WIDTHS.items() if key in shapes}
    sd1 = family == "sd1"
    text = TEXT_PREFIX[family]
    unet_config = UNetConfig.sd15 if sd1 else UNetConfig.sd21
    unet_cfg = unet_config(model_channels=width["unet"], context_dim=width["context"])
    # the text depth is counted from the block names, as no header field states it
    block = r"encoder\.layers\.(\d+)\." if sd1 else r"transformer\.resblocks\.(\d+)\."
    blocks = [re.match(re.escape(text) + block, k) for k in shapes]
    depth = 1 + max([int(m[1]) for m in blocks if m], default=-1)
    # SD2 conditions on the penultimate layer (ldm's FrozenOpenCLIPEmbedder, "penultimate"): the
    # last block is never built, and its tensors are on the ignore list ({last})
    text_config = TextConfig.sd15 if sd1 else TextConfig.sd21
    text_cfg = text_config(width=width[family], layers=depth if sd1 else depth - 1)
    with torch.device("meta"):  # shapes without memory: the weights are assigned as they are read
        text_model = (CLIPTextModel if sd1 else OpenCLIPText)(text_cfg)
        vae = AutoencoderKL(VAEConfig(ch=width["vae"]))
        modules = {UNET_PREFIX: UNetModel(unet_cfg), VAE_PREFIX: vae, text: text_model}
    return family, modules, [re.compile(p.replace("{last}", str(depth - 1))) for p in IGNORED_KEYS]


def read_header(path):
    """The header alone -> (family, meta modules), every tensor's name, shape and dtype checked."""
    # unpickling a .ckpt runs whatever code it holds; a safetensors file is names, shapes, bytes
    if not str(path).endswith(".safetensors"):
        raise SlimeError(f"{path} is no .safetensors file; slime never unpickles .ckpt files")
    with named(path), open(path, "rb"), safe_open(str(path), framework="pt", device="cpu") as f:
        slices = {k: f.get_slice(k) for k in f.keys()}
    shapes = {k: tuple(v.get_shape()) for k, v in slices.items()}
    floats = {k for k, v in slices.items() if v.get_dtype() in ("F64", "F32", "F16", "BF16")}
    family, modules, ignored = build_models(shapes, path)
    wanted = {}
    for prefix, module in modules.items():
        wanted.update({prefix + k: tuple(v.shape) for k, v in module.state_dict().items()})
    kept = {k for k in shapes if not any(p.match(k) for p in ignored)}
    found = wanted.keys() & shapes.keys()
    # the shapes are the real test of the architecture: build_models read only a few widths.
    # An integer tensor would be cast to float silently and give garbage: a damaged or foreign file.
    problems = {
        "lacks": wanted.keys() - shapes.keys(),
        "has unexpected": kept - wanted.keys(),
        "has wrongly shaped": {k for k in found if shapes[k] != wanted[k]},
        "has non-float": found - floats,
    }
    for what, keys in problems.items():
        first = ", ".join(sorted(keys)[:4]) + (" ..." if len(keys) > 4 else "")
        if keys:
            raise SlimeError(f"{path} {what} tensors for {family}: {first} ({len(keys)} in all)")
    return family, modules


def fingerprint(path, chunk=1 << 24):
    """The weights' identity: SHA-256 of the SHA-256s of the 16 MiB chunks, which threads hash (3 s
    for 5.2 GB, 2 cores). Every byte counts: a LoRA merged into the UNet changes only the middle."""

    def chunk_sum(i):
        with open(path, "rb") as f:
            f.seek(i)
            return hashlib.sha256(f.read(chunk)).digest()

    with named(path), ThreadPoolExecutor() as pool:
        sums = pool.map(chunk_sum, range(0, os.path.getsize(path), chunk))
        return hashlib.sha256(b"".join(sums)).hexdigest()[:16]


def load_models(path, device="cpu", dtype=torch.float32, text_encoder=True):
    """An original (ldm) SD 1.x / 2.x file, each tensor read once, checked, cast and assigned."""
    family, modules = read_header(path)
    built = list(modules.items())[: 3 if text_encoder else 2]  # UNet, VAE, text encoder
    with named(path), safe_open(str(path), framework="pt", device="cpu") as f:
        for prefix, module in built:
            # cast per tensor as read: the file is never in memory whole, nor in two formats at once
            state = {}
            for k in module.state_dict():
                state[k] = finite(f.get_tensor(prefix + k), prefix + k, path).to(device, dtype)
            module.load_state_dict(state, strict=True, assign=True)  # replaces the meta tensors
            module.eval().requires_grad_(False)  # frozen: only the learned vectors get gradients
    unet, vae, text = modules.values()
    return StableDiffusion(family, unet, vae, text if text_encoder else None, str(path))


def finite(tensor, name, path):  # the tensor, if every value is finite; else one sentence naming it
    if not math.isfinite(tensor.sum(dtype=torch.float32)) and not torch.isfinite(tensor).all():
        raise SlimeError(f"{path}: the tensor {name} holds nan or inf values; the file is damaged")
    return tensor


# -------------------------------------------------------------------------- files: images and masks
MAX_CLASSES = 77  # one text token per class: <start-of-text> (background) + up to 76 parts
MAX_PIXELS = 250_000_000  # slime's limit on an image's pixels, checked from its header
Image.MAX_IMAGE_PIXELS = None  # off: PIL calls 179 MP a "bomb", and slime reads in bands
GRAY16 = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL's 16-bit (and 32-bit int) gray modes
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MASK_EXTS = (".png", ".npy") + IMAGE_EXTS[1:]  # JPEG masks are found, to be refused
file_stem = lambda path: os.path.splitext(os.path.basename(path))[0]  # noqa: E731  "a/b.png" -> "b"


@contextlib.contextmanager
def named(path, why=None):
    """The one boundary of file errors: failing on `path` -> `slime: error: <path>: <why>`."""
    # a pipe, say: open() would wait on it
    if os.path.exists(path) and not (os.path.isfile(path) or os.path.isdir(path)):
        what = "no regular file (a pipe, socket or device): slime reads only files"
        raise SlimeError(f"{path} is {what}")
    try:
        yield
    except SlimeError:
        raise
    except Exception as e:
        reason = getattr(e, "strerror", None) or why or " ".join(str(e).split())
        reason = reason.replace(f" {str(path)!r}", "") or type(e).__name__
        raise SlimeError(f"{path}: {reason}") from None


def open_image(path):
    """The first frame, decoded and turned by EXIF -> (image, its format if lossy else False)."""
    with named(path):
        shown_size(path)  # over MAX_PIXELS: refused before anything is decoded
        with Image.open(path) as im:  # closed: 10,000 photos must not run out of file handles
            im.seek(0)  # animated GIF / WebP / multi-page TIFF: the first frame
            im.load()  # decode now, so a truncated file fails here and not later
            # by content: a JPEG named .png is JPEG (MPO: a phone's); a WebP is lossless as VP8L
            jpeg = "jpeg" in str(im.info.get("compression"))
            lossy = im.format in ("JPEG", "MPO", "JPEG2000") or jpeg
            lossy = lossy or im.format == "WEBP" and b"VP8L" not in open(path, "rb").read(64)
            return ImageOps.exif_transpose(im), lossy and im.format


def shown_size(path):
    """(height, width) as shown (EXIF 5-8 swap them), from the header; None if PIL can't read it."""
    size = None
    with contextlib.suppress(Exception), Image.open(path) as im:
        # a PNG's getexif() decodes all pixels to seek an eXIf chunk after them (PIL puts it first)
        exif = {} if im.format == "PNG" and "exif" not in im.info else im.getexif()
        size = im.size if exif.get(0x0112) in (5, 6, 7, 8) else im.size[::-1]
    pixels = size[0] * size[1] if size else 0
    if pixels > MAX_PIXELS:
        over = f"{pixels / 1e6:.3g} megapixels, over slime's limit of {MAX_PIXELS / 1e6:.3g}"
        why = "as float32 it alone takes 12 bytes a pixel"
        raise SlimeError(f"{path} has {over} ({why}): shrink it")
    return size


def read_image(path, mask_like="a warning"):
    """An image file -> (3, H, W) float32 RGB in [0, 1], any alpha dropped; if it looks like a mask,
    a warning (predict: a folder may hold one) or, for fit's images, an error."""
    im, _ = open_image(path)
    if im.mode in GRAY16 + ("F",):  # 16-bit gray: full scale 65535; float TIFFs: 0..1
        gray = np.asarray(im, dtype=np.float32) / (1 if im.mode == "F" else 65535)
        if not np.isfinite(gray).all():
            raise SlimeError(f"{path} holds nan or inf pixel values")
        return torch.from_numpy(np.clip(gray, 0, 1))[None].repeat(3, 1, 1)
    # through RGBA, so that a palette's transparency converts right
    im = im.convert("RGBA") if im.mode in ("P", "PA", "LA", "La", "RGBa") else im
    im = im if im.mode == "RGB" else im.convert("RGB")
    colours = im.getcolors(MAX_CLASSES + 1)  # None when there are more
    if colours and len(colours) * 64 <= im.width * im.height:  # few flat colours: a mask's
        like = f"{path} has only {count(len(colours), 'colour')}, like a mask"
        if mask_like == "an error":
            raise SlimeError(f"{like}: give each image first, its mask second")
        warnings.warn(like, stacklevel=2)
    rgb = torch.from_numpy(np.array(im, dtype=np.uint8))
    return rgb.permute(2, 0, 1).float().div_(255)  # div_ in place: 1.3 GB at 12000x9000


def read_mask(path, colors=False):
    """A mask -> (H, W) int64 labels (index or grey value; 255: ignore), or (H, W, 3) colours."""
    if str(path).lower().endswith(".npy"):  # the release's format; never unpickled
        with named(path):
            m = np.load(path, allow_pickle=False)
        npz = not isinstance(m, np.ndarray)  # an .npz archive named .npy: refused
        what = "an .npz" if npz else f"{m.dtype} {m.shape}"
        m = np.zeros(()) if npz else m  # a stand-in that fails the test below
        if m.dtype.kind not in "biu" or m.ndim != 2 or m.size and (m.min() < 0 or m.max() > 255):
            raise SlimeError(f"{path}: a mask is a 2-D array of labels 0..255, not {what}")
        return m.astype(np.int64)
    im, lossy = open_image(path)
    if im.mode in ("P", "L", "1", "PA", "LA", "F") + GRAY16 and not (colors and im.mode == "P"):
        m = np.asarray(im)
        m = m[..., 0] if im.mode in ("PA", "LA") else m  # alpha is no label
    else:
        m = np.asarray(im if im.mode in ("RGB", "RGBA") else im.convert("RGB"))[..., :3]
        m = m[..., 0] if (m == m[..., :1]).all() else m  # grey: one channel
    if im.mode == "F" and not np.isin(m, np.arange(256)).all():
        raise SlimeError(f"{path}: a float mask must hold labels 0..255, not fractions, nan or inf")
    n = len(np.unique(pack_rgb(m) if m.ndim == 3 else m))
    limit = 1000 if m.ndim == 3 else MAX_CLASSES + 1
    # lossy: a mask, whatever colours compression invented at its edges (a photo: 1 per 50 pixels)
    if n > limit and not (lossy and n * 50 < m.shape[0] * m.shape[1]):
        what = "a photo, not a mask (or its edges are anti-aliased)"
        order = "give each image first, its mask second"
        raise SlimeError(f"{path} holds {n:,} distinct values, so it is {what}: {order}")
    if lossy:
        raise SlimeError(f"{path} is stored lossily ({lossy}); save the mask as PNG or .npy")
    return np.ascontiguousarray(m) if m.ndim == 3 else m.astype(np.int64)


# PASCAL VOC's colour map: bits 3b, 3b + 1, 3b + 2 of a class index set bit 7 - b of its r, g, b
VOC_PALETTE = sum(
    ((np.arange(256)[:, None] >> (3 * b + np.arange(3))) & 1) << (7 - b) for b in range(8)
).astype(np.uint8)
VOID = (224, 224, 192)  # VOC's colour of index 255, "ignore" (object borders, unlabelled pixels)


def pack_rgb(colors):
    """(..., 3) colours -> (...) int32 keys 0xRRGGBB, so colours compare as single numbers."""
    c = np.asarray(colors).astype(np.int32)
    return (c[..., 0] << 16) | (c[..., 1] << 8) | c[..., 2]


def edge_colors(keys):
    """The colours of (H, W) keys with no pixel whose 4 neighbours are all of its colour."""
    inner = keys[1:-1, 1:-1]
    whole = (inner == keys[:-2, 1:-1]) & (inner == keys[2:, 1:-1])
    whole &= (inner == keys[1:-1, :-2]) & (inner == keys[1:-1, 2:])
    solid = np.unique(inner[whole])
    # an edge lies between others: with one solid colour there is none
    return np.setdiff1d(keys, solid) if len(solid) > 1 else solid[:0]


def colors_to_labels(masks, palette=None, names=None, source="the palette"):
    """Colour masks -> (label masks, palette or None), ONE mapping for all: `palette` ([r, g, b] a
    class), or black -> 0, other colours sorted -> 1, 2, ...; VOC's void colour -> 255 (ignore)."""
    default = [f"mask {i + 1}" for i in range(len(masks))]
    names = default if names is None else [str(n) for n in names]
    keys = [np.unique(pack_rgb(m), return_inverse=True) if m.ndim == 3 else None for m in masks]
    if all(k is None for k in keys):  # label masks only
        return list(masks), None
    void = int(pack_rgb(VOID))
    # a drawing tool's smoothing: refused; a part that thin needs a labelmap.txt naming its colour
    for name, mask in zip(names, masks) if palette is None else ():
        slivers = np.setdiff1d(edge_colors(pack_rgb(mask)), void) if mask.ndim == 3 else []
        if len(slivers):
            what = f"{count(len(slivers), 'colour')} only along the edges between others"
            fix = "save it unsmoothed, or name its colours in a labelmap.txt"
            raise SlimeError(f"{name} has {what} (anti-aliasing): {fix}")
    # from ALL the masks: mapped one by one, a part absent from one would shift the rest
    if palette is None:
        colours = np.concatenate([k[0] for k in keys if k is not None])
        present = np.union1d(np.zeros(1, np.int32), colours)  # black first, even where absent
        present = present[present != void]  # void is no class
        if len(present) > MAX_CLASSES:  # more classes than SD has text tokens
            most = max(zip(keys, names), key=lambda kn: -1 if kn[0] is None else len(kn[0][0]))[1]
            many = f"{len(present)} classes, over 77"
            raise SlimeError(f"the colours of {most} and the others make {many}")
        palette = [[int(k) >> 16, (int(k) >> 8) & 255, int(k) & 255] for k in present]
    table = {k: i for i, k in enumerate(pack_rgb(np.array(palette)).tolist())}
    table.setdefault(void, IGNORE)  # void: ignore, in any palette without it
    out = []
    for name, mask, k in zip(names, masks, keys):
        colours = k[0].tolist() if k is not None else []
        unknown = [c for c in colours if c not in table]  # not guessed: often anti-aliasing
        if unknown:
            examples = ", ".join(str((c >> 16, (c >> 8) & 255, c & 255)) for c in unknown[:3])
            raise SlimeError(f"{name} has colours that are not in {source}, e.g. {examples}")
        if k is not None:
            mask = np.array([table[c] for c in colours], np.int64)[k[1].reshape(mask.shape[:2])]
        out.append(mask)
    return out, palette


# labelmap.txt names the colours, `name:r,g,b::` a line (CVAT's "Segmentation mask 1.1", VOC tools)
LABELMAP_HEADER = "# label:color_rgb:parts:actions"


def read_labelmap(path):
    """labelmap.txt -> (names, colours [[r, g, b]]), in its order: line i is class i."""
    with named(path), open(path, encoding="utf-8", errors="replace") as f:
        lines = [(n, s.strip()) for n, s in enumerate(f, 1) if s.strip() and s[0] != "#"]
    names, colors = [], []
    for n, line in lines:
        m = re.fullmatch(r"([^:]+):(\d+),(\d+),(\d+)(:.*)?", line)
        if not m or m[1].strip() in names or max(map(int, m.groups()[1:4])) > 255:
            raise SlimeError(f"{path}, line {n}: {line[:60]!r} is not `name:r,g,b::`, a new name")
        names.append(m[1].strip())
        colors.append([int(v) for v in m.groups()[1:4]])
    if not 2 <= len(names) <= MAX_CLASSES or len({tuple(c) for c in colors}) < len(colors):
        labels = count(len(names), "label")
        raise SlimeError(f"{path} lists {labels}; slime needs 2 to 77, each its colour")
    return names, colors


def find_labelmap(mask_paths, given=None):
    """--labelmap, else a labelmap.txt beside the masks or above a SegmentationClass/, or None."""
    found = set()
    for folder in {os.path.dirname(os.path.abspath(m)) for m in mask_paths} if not given else ():
        up = os.path.dirname(folder) if os.path.basename(folder) == "SegmentationClass" else folder
        here = [os.path.join(d, "labelmap.txt") for d in (folder, up)]
        found.update([p for p in here if os.path.isfile(p)][:1])
    # by content: one labelmap copied beside the training and the validation masks is no conflict
    if len({open(p, "rb").read() for p in found}) > 1:
        why = "the masks come with different labelmap.txt files: choose one with --labelmap"
        raise SlimeError(why)
    return given or min(found, default=None)


def check_labels(labels, mask_path, size, parts, image_path):  # against its image and the parts
    if tuple(labels.shape) != tuple(size):
        with Image.open(image_path) as im:
            exif = im.size == labels.shape[::-1]  # fits as stored: a phone's photo, shown turned
        turned = "; its EXIF orientation turns it as shown: turn the mask too" if exif else ""
        sizes = f"{labels.shape[::-1]}, its image {tuple(size)[::-1]} (w, h)"
        raise SlimeError(f"{mask_path} is {sizes}{turned}")
    bad = sorted(set(np.unique(labels).tolist()) - set(range(len(parts))) - {IGNORE})
    if bad:
        outside = f"outside 0..{len(parts) - 1} ({parts})"
        raise SlimeError(f"{mask_path} has class values {bad[:8]} {outside}")


# ----------------------------------------------------------------------- files: emb.pt, and outputs
# an emb.pt's tag: predict reads no other torch file, fit replaces no other
EMB_FORMAT = "slime-embeddings/1"
LAYERS = [list(CROSS_LAYERS), list(SELF_LAYERS)]


def save_embeddings(
    path, context, parts, sd, s, colors=None, epoch=-1, miou=None, history=None, resume=None
):
    """A self-describing file of plain types and CPU float32 tensors (torch.load weights_only=True).
    history: the fit's curve; resume: an unfinished fit's state at its last epoch's end, or None."""
    context = context.detach().float().cpu()  # whole: predict needs no text encoder
    learned = context[0, 1 : len(parts)]
    emb = dict(format=EMB_FORMAT, learned=learned, context=context, parts=list(parts))
    emb.update(family=sd.family, fingerprint=sd.fingerprint, dtype=str(sd.dtype)[6:])
    emb.update(cross_layers=list(CROSS_LAYERS), self_layers=list(SELF_LAYERS))
    emb.update(colors=[list(map(int, c)) for c in colors or []], epoch=epoch, val_miou=miou)
    history = history or dict(step=[], validation=[])
    emb.update(history=history, finished=resume is None, resume=resume)
    # window only when set, so that an older slime (no --window) reads it
    emb["settings"] = {k: v for k, v in asdict(s).items() if k != "window" or v}
    buffer = io.BytesIO()
    torch.save(emb, buffer)
    commit({path: buffer.getvalue()})  # a kill during the save leaves the previous best emb.pt


def load_embeddings(path):
    """emb.pt as fit wrote it, checked: an edited or damaged file ends in one line; runs no code."""
    with named(path, "damaged, not a torch file, or holds pickled code, which slime never runs"):
        emb = torch.load(path, map_location="cpu", weights_only=True)
    emb = emb if isinstance(emb, dict) else {}
    parts, context, colors, learned = map(emb.get, ("parts", "context", "colors", "learned"))
    layers = [emb.get("cross_layers"), emb.get("self_layers")]
    names = isinstance(parts, list) and all(isinstance(p, str) and p for p in parts)
    triples = isinstance(colors, list) and all(isinstance(c, list) and len(c) == 3 for c in colors)
    if emb.get("format") != EMB_FORMAT:  # a model, an optimizer state, ...
        bad = f"no '{EMB_FORMAT}' format tag"
    elif not names or not 2 <= len(set(parts)) == len(parts) <= MAX_CLASSES:
        bad = f"its parts {str(parts)[:60]} are not 2 to {MAX_CLASSES} distinct names"
    elif not isinstance(context, torch.Tensor) or context.ndim != 3 or context.shape[:2] != (1, 77):
        bad = "its context is not a (1, 77, width) tensor"
    elif not context.is_floating_point() or not torch.isfinite(context).all():
        bad = "its context holds nan, inf or non-float values"
    elif not isinstance(learned, torch.Tensor) or not learned.equal(context[0, 1 : len(parts)]):
        bad = f"its {len(parts)} parts do not match its learned vectors"
    elif emb.get("family") not in TEXT_PREFIX or layers != LAYERS:
        bad = "it was fitted on another model or other attention layers than this slime reads"
    elif not triples or not all(type(v) is int and 0 <= v < 256 for c in colors for v in c):
        bad = "its colors are not [r, g, b] lists of 0..255"
    elif not isinstance(emb.get("settings"), dict):
        bad = "its settings are not a dictionary"
    else:
        settings = settings_from(emb["settings"], path)
        return emb | {"context": context.float(), "settings": settings}
    raise SlimeError(f"{path} is not a usable emb.pt: {bad}")


def part_colors(emb):  # each part's colour: its masks' (labelmap or colour masks), else VOC's
    colors = emb["colors"][: len(emb["parts"])]
    return [list(c) for c in colors] + VOC_PALETTE[len(colors) : len(emb["parts"])].tolist()


def commit(files):
    """Outputs whole or absent: {path: bytes} to hidden temp files, renamed when all are written."""
    pid = os.getpid()
    temp = {p: os.path.join(os.path.dirname(p), f".{os.path.basename(p)}.{pid}.tmp") for p in files}
    try:
        for path, data in files.items():
            with named(path):
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                with open(temp[path], "wb") as f:
                    f.write(data)
                    # on disk before the rename: a power cut must not leave an empty file
                    f.flush()
                    os.fsync(f.fileno())
        for path in files:
            with named(path):
                # atomic within a folder: readers see the old file or the new
                os.replace(temp[path], path)
    finally:
        for tmp in filter(os.path.exists, temp.values()):
            os.remove(tmp)


def png(im, level=6):  # 6: PIL's default; 1 writes a big overlay several times faster
    buffer = io.BytesIO()
    im.save(buffer, format="PNG", compress_level=level)
    return buffer.getvalue()


def output_palette(colors=()):
    """Masks' and overlays' palette: the parts' colours first, VOC's for the rest (255: void)."""
    parts = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
    return np.concatenate([parts, VOC_PALETTE[len(colors) :]])


def mask_image(labels, colors=()):  # (H, W) classes -> an indexed PNG in the parts' colours
    im = Image.fromarray(np.asarray(labels).astype(np.uint8))
    im.putpalette(output_palette(colors).tobytes())  # an "L" image with a palette becomes "P"
    return im


def overlay_image(image, labels, part_names, colors=(), band=256):
    """The image tinted per part (half image, half its colour, rounded down), white edges, a legend;
    `band` rows at a time in int16 tensors (12000x9000 photo: 3.6 s; float64 numpy took 8.9 s)."""
    labels = torch.as_tensor(np.asarray(labels))
    palette = torch.from_numpy(output_palette(colors)).short()
    out = Image.new("RGB", labels.shape[::-1])
    counts = 0
    for i in range(0, labels.shape[0], band):
        lab = labels[i : i + band + 1].long() & 255  # one row more: the next band's boundary
        counts = counts + torch.bincount(lab[:band].flatten(), minlength=256)
        pixels = image[:, i : i + band].float().clamp(0, 1)
        rgb = (pixels * 255).round().short().permute(1, 2, 0).cpu()
        tinted = torch.where((lab[:band] != 0)[..., None], (rgb + palette[lab[:band]]) // 2, rgb)
        # boundary: unlike the pixel right or below
        edge = torch.zeros(lab.shape, dtype=torch.bool)
        edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
        edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
        tinted[edge[:band]] = 255
        out.paste(Image.fromarray(tinted.byte().numpy()), (0, i))
    # the legend: text 16 px at 512, at most 32, in at most a third of the image's height, else none
    size = max(6, min(32, min(out.size) // 32, out.height // (4 * len(part_names))))
    pad = max(2, size // 4)
    if pad + (size + pad) * len(part_names) <= out.height // 3:
        font = ImageFont.load_default(size=size)
        draw = ImageDraw.Draw(out)
        names = [name + ("" if counts[c] else " (none)") for c, name in enumerate(part_names)]
        x = 2 * pad + size
        width = x + pad + max(draw.textlength(n, font=font) for n in names)
        draw.rectangle([0, 0, width, pad + (size + pad) * len(names)], fill=(32, 32, 32))
        white = (255, 255, 255)
        for c, name in enumerate(names):
            y = pad + c * (size + pad)
            box = [pad, y, pad + size - 1, y + size - 1]
            draw.rectangle(box, tuple(map(int, palette[c])), white)
            draw.text((x, y), name, fill=white if counts[c] else (150, 150, 150), font=font)
    return out


# ----------------------------------------------------------------------------- the plan of a run
# A run's plan: every option, file it reads and path it writes, checked before the model loads
def made_of(s, parts, colors, ckpt, device):  # what makes a run's outputs, each by its name
    made = dict(asdict(s), parts=parts, colors=colors, checkpoint=fingerprint(ckpt))
    return made | dict(device=device[0].type, dtype=str(device[1])[6:])


def plan_fit(args, con):
    """fit's plan -> (settings, device, ckpt, train, val, parts, palette, identity, stopped fit)."""
    preset = {k: v for k, v in PRESETS.get(args.preset, {}).items() if k != "parts"}
    args.parts = args.parts or PRESETS.get(args.preset, {}).get("parts")  # flags win over a preset
    base = settings_from(preset, f"--preset {args.preset}")
    s = settings_from(given(args), "the command line", base)
    args.pairs = image_mask_pairs(args.pairs, "fit")
    args.val = image_mask_pairs(args.val or [], "--val")
    stopped = check_output(args.output, args.overwrite, args.resume)  # --resume: the stopped fit
    was = stopped["resume"]["identity"] if stopped else {}  # --dtype auto: the stopped fit's
    device = device_and_dtype(args, con, args.dtype == "auto" and was.get("dtype"))
    ckpt = checkpoint(args)[0]
    pairs = read_pairs(args, con)
    # all that --resume keeps: what makes the run, and the data
    identity = made_of(s, pairs[2], pairs[3], ckpt, device)
    identity["inputs"] = [fingerprint(p) for p in args.pairs + args.val]
    key = next((k for k, v in identity.items() if stopped and was.get(k) != v), None)
    if key:  # the first that differs
        what = f"ran with {key} {was.get(key)}, this command with {identity[key]}"
        if key == "inputs":
            what = "read other images or masks, or in another order"
        what = f"the stopped fit in {args.output} {what}; resume it with its command"
        raise SlimeError(f"fit --resume: {what}")
    folder = os.path.dirname(os.path.abspath(args.output))
    # the last step: a refused plan leaves the folder as it was; a temp file proves it takes files
    with named(folder):
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    return s, device, ckpt, *pairs, identity, stopped


def check_output(path, overwrite, resume=None):
    """emb.pt's -o: new, or an emb.pt that --overwrite replaces (no other file) -> stopped fit."""
    if os.path.isdir(path):
        raise SlimeError(f"-o {path} is a folder; give a file path such as {path}/emb.pt")
    if not os.path.exists(path):
        if resume:
            raise SlimeError(f"fit --resume: {path} does not exist; nothing to resume")
        return None
    emb = {}  # {}: a file that is no emb.pt
    with contextlib.suppress(Exception), named(path):  # weights_only: asking must not run it
        emb = torch.load(path, map_location="cpu", weights_only=True)
    emb = emb if isinstance(emb, dict) and emb.get("format") == EMB_FORMAT else {}
    stopped = isinstance(emb.get("resume"), dict) and emb["resume"]["epoch"]  # an epoch's end kept
    if resume and not stopped:
        why = "is a finished fit" if emb.get("finished") else "holds no stopped fit"
        raise SlimeError(f"fit --resume: {path} {why}; nothing to resume")
    if emb and (overwrite or resume):
        return emb if resume else None
    what = "already holds fitted embeddings; pass --overwrite, or" if emb else "is no slime emb.pt:"
    if stopped and resume is not None:
        what = f"holds a fit stopped after epoch {stopped}; pass --resume to go on,"
        what += " --overwrite to start again, or"
    raise SlimeError(f"{path} {what} choose another -o")


def image_mask_pairs(items, what):
    """fit's (or --val's) arguments -> [image, mask, ...]: files in pairs, folders by file stem."""
    out, files = [], []
    for item in items + [None]:  # None: the end, which closes the last run of files
        if item is not None and not os.path.exists(item):
            raise SlimeError(f"{item}: no such file or folder")
        if item is not None and not os.path.isdir(item):
            files.append(item)
            continue
        if len(files) % 2:
            lone = files[-1]
            raise SlimeError(f"{what} takes image/mask pairs or folders, but {lone} has no partner")
        for image, mask in zip(files[0::2], files[1::2]):
            # a .npy is never an image: a shell's `train/*` lists NAME.npy before NAME.png
            swap = image.lower().endswith(".npy") and file_stem(image) == file_stem(mask)
            out += [mask, image] if swap else [image, mask]
        out += folder_pairs(item) if item else []
        files = []
    return out


def folder_pairs(folder):
    """A folder's images and masks paired by stem -> [image, mask, ...]; unpaired files refused."""
    out = []
    for files in by_stem(folder).values():
        if len(files) != 2:
            why = "has no image" if files[0].lower().endswith(".npy") else "has no mask"
            if len(files) > 1:
                why = f"shares its stem with {count(len(files) - 1, 'other file')}"
            why += ": a folder holds NAME.png (the image) beside NAME.npy (its mask)"
            raise SlimeError(f"{files[0]} {why}")
        out += files
    if not out:
        raise SlimeError(f"{folder} holds no image/mask pairs (NAME.png beside NAME.npy)")
    return out


def by_stem(folder):
    """{stem: a folder's images and masks of that stem, the mask-like last}: fit's and --masks'."""
    with named(folder):  # hidden files, and files of other kinds (labelmap.txt), are not read
        names = sorted(os.listdir(folder))
    stems = {}
    for name in (n for n in names if n[0] != "." and n.lower().endswith(MASK_EXTS)):
        stems.setdefault(file_stem(name), []).append(os.path.join(folder, name))
    # the mask-like: the .npy (the release's), else a .png beside a photo of another kind
    for files in stems.values():
        files.sort(key=lambda f: (f.lower().endswith(".npy"), f.lower().endswith(".png")))
    return stems


def read_pairs(args, con):
    """fit's images and masks, checked -> (train, val, parts, palette): ONE colour mapping."""
    paths = args.pairs + (args.val or [])
    image_paths, mask_paths = paths[0::2], paths[1::2]
    labelmap = find_labelmap(mask_paths, args.labelmap)
    names, colors = read_labelmap(labelmap) if labelmap else (None, None)
    images = [read_image(p, mask_like="an error") for p in image_paths]
    masks = [read_mask(p, colors=bool(names)) for p in mask_paths]
    labels, palette = colors_to_labels(masks, colors, mask_paths, labelmap or "the palette")
    if names and args.parts and part_names(args.parts) != names:
        why = f"differs from the labels of {labelmap}: leave --parts out"
        raise SlimeError(f"--parts {args.parts} {why}")
    top = max(int(m[m != IGNORE].max(initial=0)) for m in labels)  # IGNORE is no class
    default = ",".join(["background"] + [f"part{i}" for i in range(1, top + 1)])
    parts = names or part_names(args.parts or default)
    for image, mask, mask_path, image_path in zip(images, labels, mask_paths, image_paths):
        check_labels(mask, mask_path, image.shape[1:], parts, image_path)
    if top == 0:
        why = "has no part, only background 0 or ignore 255: label parts 1, 2, ..."
        raise SlimeError(f"{mask_paths[0]} {why}")
    if palette is not None and not names:  # colours sorted by value: say which became which part
        which = ", ".join(f"{tuple(c)} {p}" for c, p in zip(palette, parts))
        con.say(f"mask colours -> parts: {which}")
    n = len(args.pairs) // 2  # the training pairs; --val's follow
    seen = set().union(*(np.unique(m).tolist() for m in labels[:n]))
    for c in sorted(set(range(1, len(parts))) - seen):
        why = "has no pixels in any training mask: not learned"
        warnings.warn(f"part {c} ({parts[c]}) {why}", stacklevel=2)
    pairs = list(zip(images, labels))
    return pairs[:n], pairs[n:], parts, colors or palette


RECORD = "slime-run.json"  # what made the masks in an output folder; written before the first image
RUN_FILES = ("labelmap.txt", os.path.join("ImageSets", "Segmentation", "default.txt"))
RUN_FILES += ("summary.json",)
OUT_DIRS = ("SegmentationClass", "overlays")  # each image's mask and overlay, NAME.png in each


def plan_predict(args, con):
    """predict's plan -> (emb, settings, (device, dtype), checkpoint, jobs, the run record)."""
    emb = load_embeddings(args.emb)
    folder = os.path.abspath(args.out)  # -o, or the nearest folder above it that will hold it
    while not os.path.lexists(folder):
        folder = os.path.dirname(folder)
    if not (os.path.isdir(folder) and os.access(folder, os.W_OK)):  # now, not after the load
        raise SlimeError(f"-o {args.out}: {folder} is no folder slime may write in")
    s = settings_from(given(args), "the command line", emb["settings"])
    path = os.path.join(args.out, RECORD)
    record = read_record(path) if os.path.exists(path) and not args.overwrite else None
    device = device_and_dtype(args, con, record and args.dtype == "auto" and record.get("dtype"))
    ckpt, family, modules = checkpoint(args)
    if emb["family"] != family or emb["context"].shape[2] != modules[UNET_PREFIX].cfg.context_dim:
        kind = f"another kind of checkpoint than {ckpt} ({family})"
        raise SlimeError(f"{args.emb} was fitted on {kind}")
    jobs, skipped = list_jobs(args, con)
    find_ground_truth(jobs, args.masks, emb, con)
    if skipped:  # the release's NAME.npy beside NAME.png: no image, but maybe ground truth
        truth = {os.path.realpath(job.gt) for job in jobs if job.gt}
        read = sum(os.path.realpath(p) in truth for p in skipped)
        con.say(skipped_line(skipped, f" ({read} read as ground truth)" if read else ""))
    # what makes the masks, kept in the record, so that a refusal names what differs
    vectors = hashlib.sha256(emb["context"].numpy().tobytes()).hexdigest()[:16]
    made = dict(embeddings=vectors, **made_of(s, emb["parts"], part_colors(emb), ckpt, device))
    if emb["fingerprint"] != made["checkpoint"]:  # same kind of model, other weights: maybe meant
        other = f"another checkpoint than {ckpt} (a fine-tune, a copy?)"
        con.say(f"warning: {args.emb} was fitted on {other}")
    run = hashlib.sha256(json.dumps(made).encode()).hexdigest()[:16]
    check_existing_outputs(args.out, jobs, record, made, run, args.overwrite)
    new = dict(run=run, dtype=made["dtype"], embeddings=args.emb, made_of=made)
    return emb, s, device, ckpt, jobs, new


def read_record(path):
    """-o's run record (what made the masks there), checked -> its dict."""
    why = "not slime's run record; pass --overwrite, or choose another -o"
    with named(path, why), open(path) as f:
        record = json.load(f)
    if not isinstance(record, dict) or not isinstance(record.get("run"), str):
        raise SlimeError(f"{path} is {why}")
    return record


def check_existing_outputs(out, jobs, record, made, run, overwrite):
    """predict's outputs already in -o: another's refused, this run's resumed (its jobs done)."""
    outputs = {os.path.join(out, n): f"this run's {n}" for n in RUN_FILES}
    for job in jobs:
        outputs[job.mask] = outputs[job.overlay] = f"the mask or overlay of {job.image}"
    first = next((p for p in outputs if os.path.exists(p)), None)
    if first and not record and not overwrite:  # the user's file, or an older slime's
        why = f"is in the way of {outputs[first]}, and no {RECORD} says whose it is"
        raise SlimeError(f"{first} {why}; pass --overwrite, or choose another -o")
    if first and record and record["run"] != run:
        was = record.get("made_of", {})
        differs = [k for k, v in made.items() if was and was.get(k) != v]
        key = differs[0] if differs else "emb.pt, settings, weights or dtype"
        why = f"{key} {was.get(key)} there, {made[key]} here" if differs else f"another {key}"
        raise SlimeError(f"{out} holds outputs of another run ({why}); pass --overwrite, or -o")
    for job in jobs:  # the same run resumes: an image is done when both its files are there
        job.done = bool(record) and os.path.isfile(job.mask) and os.path.isfile(job.overlay)


def list_jobs(args, con):
    """predict's images, each once, with their output paths -> (jobs, skipped files)."""
    jobs, skipped = {}, []
    # --masks in the images' own folder: its masks (each stem's mask-like file) are no images
    stems = by_stem(args.masks).values() if args.masks and os.path.isdir(args.masks) else []
    truth = {os.path.realpath(files[-1]) for files in stems if len(files) > 1}
    for p in args.inputs:
        if not os.path.exists(p):
            raise SlimeError(f"{p}: no such file or folder")
        files = [p]
        if os.path.isdir(p):  # hidden files (.DS_Store, temp files) are not listed
            files = sorted(os.path.join(p, n) for n in os.listdir(p) if n[0] != ".")
        for path in filter(os.path.isfile, files):
            tried = path == p and not path.lower().endswith(".npy")  # named: it may be an image
            if not (path.lower().endswith(IMAGE_EXTS) or tried) or os.path.realpath(path) in truth:
                skipped.append(path)
                continue
            mask, overlay = (os.path.join(args.out, d, file_stem(path) + ".png") for d in OUT_DIRS)
            job = SimpleNamespace(image=path, gt=None, done=False, mask=mask, overlay=overlay)
            jobs.setdefault(os.path.realpath(path), job)  # named twice: segmented once
            shown_size(path)  # over MAX_PIXELS: refused now, not after the model's load
    if not jobs:
        if skipped:
            con.say(skipped_line(skipped))
        raise SlimeError(f"{', '.join(args.inputs)} holds no images ({', '.join(IMAGE_EXTS)})")
    masks = {}
    for job in jobs.values():
        other = masks.setdefault(job.mask, job.image)
        if other != job.image:
            raise SlimeError(f"{other} and {job.image} would both be {job.mask}; rename one")
    # outputs never mix with inputs: a labelmap.txt beside them would be read as theirs next time
    outs = [os.path.join(args.out, d) for d in ("", *OUT_DIRS)]
    inputs = {os.path.dirname(os.path.abspath(j.image)) for j in jobs.values()} | {args.masks}
    for folder in (f for f in inputs - {None} if os.path.isdir(f)):
        if any(os.path.isdir(d) and os.path.samefile(folder, d) for d in outs):
            why = f"holds inputs of this run ({folder}); choose another -o"
            raise SlimeError(f"-o {args.out} {why}")
    return list(jobs.values()), skipped


def skipped_line(skipped, note=""):  # the line naming the files predict skipped
    names = ", ".join(map(os.path.basename, skipped[:5]))
    return f"skipped {count(len(skipped), 'non-image file')}{note}: {names}"


def find_ground_truth(jobs, masks, emb, con):
    """--masks: each image's ground truth by file stem, checked."""
    if not masks:
        return
    if not os.path.isdir(masks):
        raise SlimeError(f"--masks {masks}: no such folder")
    found = by_stem(masks)
    for job in jobs:
        # in the images' own folder (the release's layout), the mask is the stem's other file
        candidates = found.get(file_stem(job.image), [])[::-1]  # NAME.npy first, then NAME.png
        job.gt = next((p for p in candidates if not os.path.samefile(p, job.image)), None)
        if candidates and not job.gt:
            why = "but itself: keep the ground truth apart"
            raise SlimeError(f"--masks {masks} holds no mask of {job.image} {why}")
        if not job.gt:
            con.say(f"warning: no mask for {job.image} in {masks}; not scored")
        elif size := shown_size(job.image):  # None: a damaged image, skipped when its turn comes
            check_labels(ground_truth(job, emb), job.gt, size, emb["parts"], job.image)
    if not any(job.gt for job in jobs):  # an IoU table of nothing would read as a score of 0
        how = "found by file stem: a.jpg -> a.png"
        raise SlimeError(f"--masks {masks} holds no mask for any image ({how})")


def ground_truth(job, emb):  # as labels: label masks as they are, colours in the parts' colours
    masks = [read_mask(job.gt)]
    (gt,), _ = colors_to_labels(masks, part_colors(emb), [job.gt], "the parts' colours")
    return gt


# ------------------------------------------------------------------------- device and number format
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def device_and_dtype(args, con, resume=None):
    """--device and --dtype, checked and said in a line -> (device, dtype); auto: README, Speed."""
    default = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    name = args.device or default
    if not re.fullmatch(r"(cpu|mps)(:0)?|cuda(:\d+)?", name):
        raise SlimeError(f"--device {name}: not a device slime knows; use cpu, cuda, cuda:N or mps")
    device = torch.device(name)
    cpu = device.type == "cpu"
    cuda = device.type == "cuda" and (device.index or 0) < torch.cuda.device_count()
    if not (cpu or cuda or device.type == "mps" and torch.backends.mps.is_available()):
        raise SlimeError(f"--device {name}: not available on this machine; leave --device out")
    resume = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(resume)
    dtype = resume or args.dtype  # the outputs it resumes keep their number format
    if cpu and dtype == "fp16":
        msg = "--dtype fp16: a CPU emulates fp16, which takes minutes per image; use bf16 or fp32"
        raise SlimeError(msg)
    why = "the number format of the outputs it resumes" if resume else "as --dtype says"
    if cpu and dtype == "bf16" and not resume and not cpu_has_bf16():
        why += ", though this CPU has no bf16 instructions: 25x to 100x slower"
    elif dtype == "auto":  # the release's format; bf16 is the user's choice, never a timing's
        dtype = "fp32"
        why = "the release's format"
        if cpu and cpu_has_bf16():
            why += "; this CPU has bf16 instructions: --dtype bf16 may be faster"
    where = f"the CPU ({count(torch.get_num_threads(), 'thread')})" if cpu else str(device)
    slow = "; no GPU found, so each image takes minutes" if cpu and not args.device else ""
    con.say(f"running on {where}, {dtype}: {why}{slow}")
    return device, DTYPES[dtype]


def cpu_has_bf16():
    try:  # does oneDNN run bf16 natively (AVX512-BF16 or AMX)? A private probe: if absent, no
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def checkpoint(args):  # --ckpt, or the one .safetensors in weights/ -> (path, family, modules)
    found = sorted(glob.glob(os.path.join(glob.escape(HERE), "weights", "*.safetensors")))
    if not args.ckpt and len(found) != 1:
        what = "see weights/README.md" if not found else f"choose one of {len(found)}"
        held = count(len(found), "checkpoint")
        raise SlimeError(f"{HERE}/weights holds {held}: {what}, or pass --ckpt")
    return (args.ckpt or found[0], *read_header(args.ckpt or found[0]))


# ----------------------------------------------------------------------------- command line
HERE = os.path.dirname(os.path.abspath(__file__))
SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")  # each ends a run as Ctrl-C does: interrupt()
ONE_PATCH = dict(patch_size=512, patches_per_side=1)  # the whole image
FLAGS = {f.name: f.metadata["flag"] or "--" + f.name.replace("_", "-") for f in fields(Settings)}
PRESETS = {  # the release README's per-dataset settings (release/README.md#L79-L175)
    "pascal-car": dict(parts="background,body,light,plate,wheel,window", min_crop_ratio=0.6),
    "pascal-horse": dict(parts="background,head,neck+torso,leg,tail", min_crop_ratio=0.8),
    "celeba": dict(parts="background,skin,eye,mouth,nose,brow,ear,neck,cloth,hair"),
}
PRESETS["pascal-car"].update(ONE_PATCH)
PRESETS["pascal-horse"].update(ONE_PATCH)
PRESETS["celeba"].update(min_crop_ratio=0.6, rotation=10.0)


def check_setting(f, value):  # a value for the Settings field f -> the value, or ArgumentTypeError
    kind, (lo, hi), step = type(f.default), f.metadata["range"], f.metadata["step"]
    if kind is bool and type(value) is bool:
        return value
    if kind is bool:  # not bool(value): bool("false") is True; 1 is no switch
        raise argparse.ArgumentTypeError(f"must be true or false, not {value!r}")
    x = None
    with contextlib.suppress(ValueError):  # command-line text; an int where a float is due (JSON)
        x = kind(value) if isinstance(value, str) or type(value) is int else value
    # type(), not isinstance(): True is an int to Python, but no count of epochs; nan, inf fail
    if type(x) is not kind or not math.isfinite(x) or not lo <= x <= hi or step and x % step:
        what = f"a multiple of {step}" if step else {int: "an integer", float: "a number"}[kind]
        raise argparse.ArgumentTypeError(f"must be {what} in [{lo}, {hi}], not {value!r}")
    return x


def settings_from(values, source, base=None):  # values (emb.pt's, a preset's, the flags) over base
    known = {f.name: f for f in fields(Settings)}
    new = ", ".join(sorted(map(str, set(values) - set(known))))
    if new:  # made by a newer slime: update slime rather than guess what they mean
        raise SlimeError(f"{source} has settings this slime does not know ({new}); update slime")
    checked = {}
    for name, value in values.items():
        try:
            checked[name] = check_setting(known[name], value)
        except argparse.ArgumentTypeError as e:
            raise SlimeError(f"{source}: the setting {name} {e}") from None
    s = replace(base or Settings(), **checked)  # only what was given replaces the base
    if s.t_min > s.t_max:  # randint(t_min, t_max + 1) would otherwise fail at fit's first step
        raise SlimeError(f"{source}: t_min {s.t_min} exceeds t_max {s.t_max}")
    if s.window and s.out_size:  # --window writes each image's own size: refused, not ignored
        why = "--window makes masks of each image's own size; give --out-size 0"
        raise SlimeError(f"{source}: {why}")
    return s


def given(args):  # the settings given on the command line ({} for the ones left out)
    return {f.name: v for f in fields(Settings) if (v := vars(args).get(f.name)) is not None}


def part_names(text):  # "a,b,c" -> ["a", "b", "c"]: 2 to 77 names, not empty and not repeated
    parts = [p.strip() for p in text.split(",")]
    if not all(parts) or len(set(parts)) != len(parts):
        why = "the names must be non-empty and distinct, comma-separated"
        raise SlimeError(f"--parts {text}: {why}")
    if len(parts) > MAX_CLASSES:
        why = "classes are more than SD's 77 tokens allow (background + 76 parts)"
        raise SlimeError(f"{len(parts)} {why}")
    return parts


def count(n, noun):
    return f"{n} {noun}{'' if n == 1 else 's'}"


class Console:  # stderr: whole lines, and a stage line with an ETA that a ticker thread redraws
    def __init__(self, quiet, prefix=""):
        self.quiet, self.prefix = quiet, prefix
        self.t0 = time.time()
        self.line = None  # (the stage, when its ETA ends)
        self.open = False  # on a terminal: the stage line is drawn, with no newline yet
        self.shown = 0.0  # in a log: when the stage line was last printed
        self.lock = threading.Lock()
        self.done = threading.Event()  # set as main() ends: the ticker stops
        self.ticker = None

    def say(self, msg, always=False):
        if always or not self.quiet:
            with self.lock:
                print(("\n" if self.open else "") + self.prefix + msg, file=sys.stderr, flush=True)
                self.open, self.line = False, None  # drawn anew by the next progress()

    def progress(self, text, eta=None, force=False):
        self.line = (text, eta and time.time() + eta)
        if not (self.quiet or self.ticker):
            self.ticker = threading.Thread(target=self.tick, daemon=True)
            self.ticker.start()
        self.show(force)

    def tick(self):  # till main() ends, no stage is silent: its clock moves while a step runs
        while not self.done.wait(1):
            self.show()

    def show(self, force=False):
        with self.lock:
            if self.quiet or not self.line:
                return
            text, end = self.line
            line = f"{self.prefix}{text}  {duration(time.time() - self.t0)} elapsed"
            line += f", ETA {duration(max(end - time.time(), 0))}" if end else ""
            if sys.stderr.isatty():  # \x1b[K clears what a longer line left behind
                print(f"\r{line}\x1b[K", end="", file=sys.stderr, flush=True)
                self.open = True
            elif force or time.time() - self.shown >= 10:
                print(line, file=sys.stderr, flush=True)
                self.shown = time.time()


def duration(seconds):  # 12 s, 7.5 min, 3.2 h
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def note_resume(e, output, identity):  # how to go on, if output holds the stopped fit's state
    with contextlib.suppress(SlimeError):  # it holds none: no epoch's end was saved
        kept = check_output(output, False, resume=True)["resume"]
        how = "rerun with --resume (no --overwrite) to go on"
        if kept["identity"] == identity:
            e.add_note(f"; {output} holds epoch {kept['epoch']}: {how}")


def cmd_fit(args, con):  # plan (the data read and checked); load; fit, saving emb.pt each epoch
    s, device, ckpt, train, val, parts, palette, identity, stopped = plan_fit(args, con)
    out = args.output
    con.progress(f"loading {ckpt}", force=True)
    sd = load_models(ckpt, *device)
    # the curve, the best and the state: a new fit's, or (--resume) the stopped one's
    was = stopped or dict(history=dict(step=[], validation=[]), epoch=0, val_miou=None)
    history = was["history"]
    best = dict(epoch=was["epoch"], miou=was["val_miou"])
    state = dict(was["resume"], best_context=was["context"].to(sd.device)) if stopped else None
    vals = count(-(-s.epochs // s.val_every), "validation")  # the last epoch is always validated
    steps = f"{count(s.epochs, 'epoch')} of {count(len(train), 'step')}, {vals}"
    what = f"{count(len(parts) - 1, 'part')} {parts[1:]} on {count(len(train), 'image')}"
    con.say(f"fitting {what}: {steps}" + (", resumed" if state else ""))
    start = state["epoch"] if state else 0
    progress = fit_progress(con, s, len(train), start)
    setup = "setting up: the validation's noisy patches"
    con.progress(f"epoch {start + 1}/{s.epochs}  {setup}", force=True)

    def on_event(e):  # emb.pt's curve: per step [epoch, ce, mse, sd], per validation [epoch, mIoU]
        point = [e[k] for k in ("epoch", "ce", "mse", "sd", "miou") if k in e]
        if e["event"] in history:
            history[e["event"]].append(point)
        if e.get("best"):
            best.update(epoch=e["epoch"], miou=e["miou"])
        if e["event"] != "epoch":
            return progress(e)
        # emb.pt, whole, at each epoch's end: the best so far, and what resuming needs till the end
        context = e["state"].pop("best_context")
        resume = dict(e["state"], identity=identity) if e["epoch"] < s.epochs else None
        save_embeddings(out, context, parts, sd, s, palette, history=history, resume=resume, **best)

    try:
        fit(sd, train, len(parts), s, val or None, on_event, state)
    except KeyboardInterrupt as e:
        note_resume(e, out, identity)
        raise
    con.say(f"fit finished: {out} holds epoch {best['epoch']} (validation mIoU {best['miou']:.4f})")
    curve = f"python examples/maps.py {out} --curve -o curve.png"
    con.say(f"next: python slime.py predict {out} IMAGES/ -o out/ (the fit's curve: {curve})")


def fit_progress(con, s, steps_per_epoch, start=0):  # the stage line; an ETA from the recent pace
    vals = -(-s.epochs // s.val_every) - start // s.val_every  # validations left, the last too
    state = SimpleNamespace(last=time.time(), steps=[], val_t=None, vals=vals)

    def progress(e):
        what = "validating"
        if e["event"] == "step":
            state.steps.append(time.time() - state.last)
            losses = f"ce {e['ce']:.4f}  mse {e['mse']:.4f}  sd {e['sd']:.4f}"
            what = f"step {e['step']}/{e['steps']}  {losses}"
        elif e["event"] == "validation":
            state.val_t, state.vals = e["seconds"], state.vals - 1
            saved = ", the best so far: saved" if e["best"] else ""
            what = f"validation mIoU {e['miou']:.4f}{saved}"
        state.last = time.time()
        recent = state.steps[-5:]
        left = (s.epochs - start) * steps_per_epoch - len(state.steps)
        eta = left * sum(recent) / max(len(recent), 1) + state.vals * (state.val_t or 0)
        # before the first validation its cost is unknown: no ETA rather than one that leaves it out
        if state.val_t is None and state.vals:
            eta = None
        con.progress(f"epoch {e['epoch']}/{s.epochs}  {what}", eta, force=e["event"] != "step")

    return progress


def cmd_predict(args, con):
    """Plan, load, segment each image not done, report; torchrun: every WORLD_SIZE-th image each."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    emb, s, device, ckpt, jobs, run = plan_predict(args, con)
    if world > 1:  # all plan before the record changes (gloo: CPU objects only, waits long)
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        plans = [None] * world
        dist.all_gather_object(plans, (run, [job.image for job in jobs]))
        if plans != plans[:1] * world:  # the folder changed meanwhile
            raise SlimeError("the processes made different plans: keep the folders as they are")
    con.progress(f"loading {ckpt}", force=True)
    sd = load_models(ckpt, *device, text_encoder=False)  # emb.pt holds the whole context
    if rank == 0:  # after the load: a checkpoint that fails there leaves no trace
        if args.overwrite:  # one run per folder: its and the other run's files go, overlays first
            stems = {file_stem(r["mask"]) for r in listed_images(args.out)}
            stems |= {file_stem(job.mask) for job in jobs}
            paths = [os.path.join(args.out, d, f"{f}.png") for d in OUT_DIRS[::-1] for f in stems]
            for path in filter(os.path.exists, paths + [os.path.join(args.out, RUN_FILES[2])]):
                os.remove(path)
        commit({os.path.join(args.out, RECORD): (json.dumps(run, indent=2) + "\n").encode()})
    if world > 1:
        dist.barrier()
    records, unread, wrote = predict_images(args, con, sd, emb, s, jobs[rank::world], rank)
    if world > 1:  # everyone's results, to write the run files once (report sorts them)
        everyone = [None] * world
        dist.all_gather_object(everyone, (records, unread, wrote))
        records, unread, wrote = (sum(x, start) for x, start in zip(zip(*everyone), ([], [], 0)))
        dist.destroy_process_group()
    if rank == 0:
        report(args, con, emb, s, records, wrote, unread)
    return 1 if unread else 0


def predict_images(args, con, sd, emb, s, mine, rank):
    """Segment each of `mine` not done, or read its mask back -> (records, unread, written)."""
    records, unread, wrote = [], [], 0
    todo = sum(not job.done for job in mine)
    t0 = time.time()
    for n, job in enumerate(mine, 1):
        what = f"image {n}/{len(mine)}  {os.path.basename(job.image)}"
        eta = (time.time() - t0) / wrote * (todo - wrote) if wrote and not job.done else None
        con.progress(what, eta, not job.done)
        try:
            if job.done:  # read back (as images are: no bomb warning), for the IoUs and summary
                labels = torch.from_numpy(np.array(open_image(job.mask)[0]))
            else:
                try:
                    image = read_image(job.image)
                except SlimeError as e:  # a bad image: named, skipped and counted
                    con.say(f"skipped {e}", always=True)  # -q too: a script must know
                    unread.append(dict(image=job.image, mask=job.mask, reason=str(e)))
                    continue
                labels = segment_and_write(sd, emb, job, image, s, con, what)
                wrote += 1
            records.append(image_record(job, labels, emb))
        except KeyboardInterrupt:  # the run files keep what is done (torchrun: this process's)
            if rank == 0:
                report(args, con, emb, s, records, wrote, unread)
            raise
    return records, unread, wrote


def segment_and_write(sd, emb, job, image, s, con, what):
    """Segment one image (showing its windows' progress); write its mask and overlay, or neither."""
    t0 = time.time()
    parts, colors = emb["parts"], part_colors(emb)
    where = f"{what}  {'window' if s.window else 'patch'}"

    def progress(i, n, *maps):
        con.progress(f"{where} {i}/{n}", (time.time() - t0) / i * (n - i), i == n)

    try:
        labels = segment(sd, emb["context"].to(sd.device), image, len(parts), s, progress=progress)
    except SlimeError as e:  # its scores are not finite, say
        raise SlimeError(f"{job.image}: {e}") from None
    if image.shape[1:] != labels.shape:  # --out-size 512: the overlay is on the image resized
        image = resize(image, tuple(labels.shape), "bilinear")
    overlay = overlay_image(image, labels.numpy(), parts, colors)
    commit({job.mask: png(mask_image(labels.numpy(), colors)), job.overlay: png(overlay, level=1)})
    return labels


def image_record(job, labels, emb):
    """summary.json's entry of an image: its size, each part's area in pixels, its IoUs."""
    parts = emb["parts"]
    area = np.bincount(labels.numpy().ravel(), minlength=len(parts)).tolist()
    record = dict(image=job.image, mask=job.mask, overlay=job.overlay, written=not job.done)
    record.update(width=labels.shape[1], height=labels.shape[0], area=dict(zip(parts, area)))
    if job.gt:  # the GT nearest-resized to the mask's size, as the release does (at 512)
        gt = resize(torch.from_numpy(ground_truth(job, emb))[None], labels.shape, "nearest")[0]
        ious = iou_per_class(labels, gt, len(parts))
        record.update(ground_truth=job.gt, iou={parts[c]: v for c, v in ious.items()})
    return record


def listed_images(out):
    """The images out/summary.json lists: the run's whose record is there, or none."""
    path = os.path.join(out, RUN_FILES[2])
    with contextlib.suppress(Exception), named(path), open(path) as f:
        return [r for r in json.load(f)["images"] if isinstance(r["mask"], str)]
    return []


def report(args, con, emb, s, records, wrote, unread):
    """The run files of all this run's images in the folder (earlier calls' too); what was done."""
    parts, colors = emb["parts"], part_colors(emb)
    held = {}  # by stem: the run's earlier images whose files remain (--overwrite took others)
    for r in listed_images(args.out):
        stem = file_stem(r["mask"])
        if all(os.path.isfile(os.path.join(args.out, d, f"{stem}.png")) for d in OUT_DIRS):
            held[stem] = r
    held.update({file_stem(r["mask"]): r for r in records})
    listed = [held[stem] for stem in sorted(held)]  # as one run lists all
    scored = [{parts.index(k): v for k, v in r["iou"].items()} for r in listed if "iou" in r]
    per_class, miou = miou_table(scored, len(parts))
    rows = {name: v for name, v in zip(parts, per_class) if v is not None}
    summary = dict(written_by="slime predict", embeddings=args.emb, settings=asdict(s))
    summary["images"] = listed
    summary["parts"] = [dict(index=i, name=n, color=colors[i]) for i, n in enumerate(parts)]
    summary.update(iou=rows or None, miou=miou if rows else None, unread=unread)
    labelmap = "".join(f"{n}:{r},{g},{b}::\n" for n, (r, g, b) in zip(parts, colors))
    texts = [LABELMAP_HEADER + "\n" + labelmap, "".join(f"{stem}\n" for stem in sorted(held))]
    texts.append(json.dumps(summary, indent=2) + "\n")
    paths = [os.path.join(args.out, name) for name in RUN_FILES]
    commit({path: text.encode(errors="surrogateescape") for path, text in zip(paths, texts)})
    if rows:  # on stdout, unlike every notice: the table is the result, and -q keeps it
        table = "".join(f"{name:<16} {v:.4f}\n" for name, v in rows.items())
        print(f"{'part':<16} IoU\n{table}{'mIoU':<16} {miou:.4f}   ({count(len(scored), 'image')})")
    elif args.masks:  # every ground-truth pixel is 255: a table would read as a score of 0
        con.say("nothing was scored: every ground-truth mask is all 'ignore' (255); no IoU table")
    empty = sum(not any(list(r["area"].values())[1:]) for r in records)  # every pixel background
    if empty:  # no part reached --threshold in any patch: unlike images, or other weights?
        of = count(len(records), "image")
        con.say(f"warning: {empty} of {of} got no part; a lower --threshold helps")
    done = len(records) - wrote
    skipped = f"; skipped {done} already done (--overwrite redoes them)" if done else ""
    failed = f"; could not read {count(len(unread), 'image')}" if unread else ""
    con.say(f"wrote masks and overlays of {count(wrote, 'image')} to {args.out}{skipped}{failed}")


# The release's flags (release/src/arguments.py#L46-L91) that slime names otherwise; others: _ -> -
RELEASE_FLAGS = {
    "--part_names": "--parts a,b,c",
    "--num_patchs_per_side": "--patches-per-side",
    "--patch_threshold": "--threshold",
    "--self_attention_loss_coef": "--alpha",
    "--sd_loss_coef": "--beta",
    "--test_mask_size": "--out-size",
    "--train_t": "--t-min and --t-max",
    "--dataset_name": "--preset",
    "--gpu_id": "--device cuda:N",
    "--checkpoint_dir": "-o",
    "--train_data_dir": "fit FOLDER (its NAME.png and NAME.npy pairs)",
    "--val_data_dir": "--val FOLDER",
    "--test_data_dir": "predict EMB FOLDER --masks FOLDER",
}


class Parser(argparse.ArgumentParser):  # mistakes end in one line and exit 2
    def error(self, message):  # a flag spelt the release's way: the hint names slime's
        flag = re.search(r"unrecognized arguments: (--\w+)", message)
        dashed = flag and "--" + flag[1][2:].replace("_", "-")
        slimes = RELEASE_FLAGS.get(flag and flag[1]) or dashed in FLAGS.values() and dashed
        hint = f"; {flag[1]} is {slimes} in slime" if slimes else ""
        raise SlimeError(f"{self.prog}: {message}{hint}")


def build_parser():
    ap = Parser(prog="slime.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = ap.add_subparsers(dest="command", required=True)
    new = functools.partial(sub.add_parser, allow_abbrev=False)
    f = new("fit", help="learn a text vector per part from image/mask pairs")
    add = f.add_argument
    add("pairs", nargs="+", metavar="IMAGE MASK", help="image/mask pairs, or folders of them")
    add("-o", "--output", default="emb.pt", help="where the best embeddings go; default emb.pt")
    add("--val", nargs="+", metavar="IMAGE MASK", help="validation pairs/folders; default fit's")
    add("--preset", choices=sorted(PRESETS), help="the release README's per-dataset settings")
    add("--labelmap", help="labelmap.txt naming the colours; default one beside the masks")
    add("--parts", help="class names, background first; default the labelmap's, else part1,...")
    again = f.add_mutually_exclusive_group()  # fit: one of --resume and --overwrite
    how = "continue the fit stopped in -o (same command)"
    again.add_argument("--resume", action="store_true", help=how)
    p = new("predict", help="segment images; settings not given are emb.pt's")
    add = p.add_argument
    add("emb", help="emb.pt written by fit")
    add("inputs", nargs="+", help="image files and/or folders")
    add("-o", "--out", default="out", help="output folder, slime's alone; default out")
    add("--masks", help="folder of ground-truth masks (by file stem): print and save per-part IoU")
    redo = "replace emb.pt; predict: redo every image, drop the other run's"
    for stage, sp, group in (("fit", f, again), ("predict", p, p)):
        add = sp.add_argument
        add("--ckpt", help="SD checkpoint (.safetensors); default: the one file in weights/")
        add("--device", help="cpu, cuda, cuda:N or mps; default: cuda when present, else cpu")
        add("--dtype", choices=["auto", *DTYPES], default="auto", help="default auto (README)")
        group.add_argument("--overwrite", action="store_true", help=redo)
        add("-q", "--quiet", action="store_true", help="print only errors (and the IoU table)")
        default = "{}" if stage == "fit" else "emb.pt's (fit's default: {})"
        for fld in [x for x in fields(Settings) if stage == "fit" or not x.metadata["fit"]]:
            kw = dict(dest=fld.name, help=fld.metadata["help"])
            if type(fld.default) is bool:  # a switch flips the default; left out, emb.pt's stays
                kw.update(action="store_const", const=not fld.default)
            else:  # the same check as emb.pt's values
                kw.update(metavar=fld.name.upper(), type=functools.partial(check_setting, fld))
                kw["help"] += "; default " + default.format(fld.default)
            add(FLAGS[fld.name], **kw)
        sp.set_defaults(run=cmd_fit if stage == "fit" else cmd_predict)
    return ap


def interrupt(signum, frame):  # Ctrl-C, SIGTERM and SIGHUP end a run alike, once
    for name in SIGNALS:
        signal.signal(getattr(signal, name, signal.SIGINT), signal.SIG_IGN)
    raise KeyboardInterrupt(signum)


def main(argv=None):
    # CPU: exp() of peaked attention underflows into fp32 denormals, slow on x86 (fit: 2.4x as long)
    torch.set_flush_denormal(True)
    con = Console(True)
    with warnings.catch_warnings():  # a warning is one line, `warning: ...`, like every notice
        warnings.simplefilter("default")
        warnings.showwarning = lambda message, *_: con.say(f"warning: {message}")
        try:  # the one error boundary of the command line: one line, and the exit status
            args = build_parser().parse_args(argv)
            rank = int(os.environ.get("RANK", 0))  # torchrun: other processes' lines say whose
            con.quiet = args.quiet
            con.prefix = f"[process {rank}] " if rank else ""
            return args.run(args, con) or 0
        # OSError: a folder we may not list
        except (SlimeError, OSError, torch.cuda.OutOfMemoryError) as e:
            why = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else e
            if isinstance(e, torch.cuda.OutOfMemoryError):  # the remedies, not torch's traceback
                why = "the GPU ran out of memory: try --dtype bf16, --patches-per-side 1"
            con.say(f"slime: error: {why}", always=True)  # under the ticker's lock, ending its line
        except KeyboardInterrupt as e:  # Ctrl-C, and SIGTERM and SIGHUP through interrupt()
            signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
            on = "".join(getattr(e, "__notes__", []))  # fit's note: how to go on
            kept = f"slime: interrupted by {signal.Signals(signum).name}; finished outputs kept{on}"
            con.say(kept, always=True)
            return 128 + signum
        finally:
            con.done.set()  # the ticker stops
        return 2


if __name__ == "__main__":
    for name in SIGNALS:  # only when run as a program: importing slime leaves them alone
        signal.signal(getattr(signal, name, signal.SIGTERM), interrupt)
    sys.exit(main())
