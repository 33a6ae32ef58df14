"""slime: Segment Like Me (SLiMe, ICLR 2024), from scratch on an original Stable Diffusion checkpoint.

    python slime.py fit ref.png ref_mask.png --parts background,body,wheel -o emb.pt
    python slime.py predict emb.pt folder/ -o out/
    python slime.py info weights/v2-1_512-ema-pruned.safetensors

The file reads top to bottom, the method first:
  settings        every setting with its default (the release's, unless it says slime) and its allowed values
  the method      paper Sec. 4 in the order of Fig. 3: prompt and context, noisy latent, the Eq. 3/5
                  attention maps, the Eq. 6 WAS map, the Eq. 4/7 losses, the Eq. 8 training step, the
                  training augmentations, fit with validation, patched inference (and its windows at
                  the image's own resolution, --window), mIoU
  the checkpoint  an original single-file SD 1.x/2.x .safetensors into unet.py, vae.py and clip_text.py
  files           images, masks, emb.pt, and outputs that are written whole or not at all
  the plan        every path a run reads or writes, and every value, checked before the long work
  command line    fit, predict, info

  paper:   https://arxiv.org/abs/2309.03179 (Sec. 4, Eq. 3-8)
  release: https://github.com/aliasgharkhani/SLiMe/tree/9de06f1a1e9ca83bd900a0b68646ce4885485f68
           cited below as release/<file>#L<line> at that commit
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps, PngImagePlugin, UnidentifiedImageError
from safetensors import safe_open

import clip_text
from clip_text import CLIPTextModel, OpenCLIPText, TextConfig
from unet import UNetConfig, UNetModel
from vae import AutoencoderKL, VAEConfig


class SlimeError(Exception):
    """A mistake the user can fix; its message is one sentence, printed without a traceback."""


# ----------------------------------------------------------------------------- settings
SIZE = 512  # the model always sees 512x512 images (a 64x64 latent), as in the release
MAP = 64  # the grid of the cross-attention and WAS maps (the release's train_mask_size)
MAX_WINDOW = 16384  # --window: a 16384 px window already shrinks 32x, more than the squash of most photos


def number(kind, lo, hi, lo_open=False):
    """The allowed values of a numeric setting, one parser for the command line and for emb.pt:
    "0.1" or 0.1 -> 0.1; text, nan, inf or a value out of range -> ArgumentTypeError saying what is allowed."""
    what = f"{'an integer' if kind is int else 'a number'} in {'(' if lo_open else '['}{lo}, {hi}]"

    def parse(value):
        try:  # text from the command line; an int where a float is due (emb.pt, JSON) is taken as it is
            x = kind(value) if isinstance(value, str) or (kind is float and type(value) is int) else value
        except ValueError:
            x = None
        # type() and not isinstance(): True is an int to Python, but not a number of epochs
        if type(x) is not kind or not math.isfinite(x) or not (lo < x if lo_open else lo <= x) or x > hi:
            raise argparse.ArgumentTypeError(f"must be {what}, not {value!r}")
        return x
    parse.__name__ = what  # argparse names a type by its function
    return parse


def boolean(value):
    # not bool(value): bool("false") is True, and an emb.pt setting edited to 1 must not pass for a switch
    if type(value) is not bool:
        raise argparse.ArgumentTypeError(f"must be true or false, not {value!r}")
    return value


def out_size(value):
    x = number(int, 0, SIZE)(value)
    # 512 is the release's test_mask_size (release/src/arguments.py#L91), 0 each image's own size (slime's); any
    # other side would be neither the release's masks nor the image's
    if x not in (0, SIZE):
        raise argparse.ArgumentTypeError(f"must be 0 (each image's own size) or {SIZE}, not {value!r}")
    return x


def window_side(value):
    x = number(int, 0, MAX_WINDOW)(value)
    # a window of N px gives N/64 image pixels to each cell of its 64x64 maps (window_layout): no fractional cells
    if x % MAP:
        raise argparse.ArgumentTypeError(f"must be 0 (squash to {SIZE}, as the release) or a multiple of {MAP} "
                                         f"up to {MAX_WINDOW}, not {value!r}")
    return x


def setting(default, check, help, stage="predict", flag=None):
    """A field of Settings: its default, its allowed values, its --help text and its flag, in one place.
    stage "fit": a training setting; "predict": used by inference too (fit stores it for predict)."""
    return field(default=default, metadata=dict(check=check, help=help, stage=stage, flag=flag))


# The ranges keep a run meaningful, not merely running: a crop under 5% of the side or a patch under 8 px
# is less than a few latent pixels; 16 patches per side already means 256 UNet passes per image; a
# timestep must index SD's 1000-step schedule. nan and inf are refused everywhere.
@dataclass(frozen=True)
class Settings:
    """Every setting of a run. The defaults are the release's (release/src/arguments.py#L65-L91) unless
    the help says slime. fit stores them all in emb.pt, so predict segments as fit validated."""
    epochs: int = setting(200, number(int, 1, 100_000), "training epochs, one step per image each", "fit")
    lr: float = setting(0.1, number(float, 0, 100, lo_open=True), "Adam's learning rate, no schedule", "fit")
    t_min: int = setting(5, number(int, 1, 999), "smallest training timestep", "fit")
    t_max: int = setting(100, number(int, 1, 999), "largest training timestep, inclusive", "fit")
    alpha: float = setting(1.0, number(float, 0, 1e6), "Eq. 8 weight of the WAS-map loss (Eq. 7)", "fit")
    beta: float = setting(0.005, number(float, 0, 1e6), "Eq. 8 weight of SD's noise-prediction loss", "fit")
    guidance: float = setting(100.0, number(float, 0, 1e6), "classifier-free guidance inside the SD loss", "fit")
    min_crop_ratio: float = setting(0.8, number(float, 0.05, 1), "smallest training crop, as a fraction of "
                                    "the side", "fit")
    rotation: float = setting(30.0, number(float, 0, 180), "largest training rotation in degrees", "fit")
    cycle_parts: bool = setting(True, boolean, "training crops favour the background, as the release's do in "
                                "effect; default: they cycle through the parts (slime's)", "fit", flag="--no-cycle")
    val_every: int = setting(1, number(int, 1, 100_000), "epochs between validations", "fit")
    patch_size: int = setting(400, number(int, 8, SIZE), "inference patch side, in pixels of the 512 image")
    patches_per_side: int = setting(2, number(int, 1, 16), "inference patches per side")
    threshold: float = setting(0.2, number(float, 0, 1), "cross-attention peak a class needs in a patch "
                               "(calibrated on real SD)")
    test_t: int = setting(100, number(int, 1, 999), "inference timestep")
    out_size: int = setting(0, out_size, "mask side in pixels: 0 = each image's own size (slime's), 512 = "
                            "512x512 (the release's)")
    bgr: bool = setting(False, boolean, "feed the model BGR, as the release's cv2 did; default: RGB", flag="--bgr")
    seed: int = setting(0, number(int, 0, 2 ** 63 - 1), "seed of every random draw")
    window: int = setting(0, window_side, "native resolution (slime's): the side, in the image's own pixels, "
                          f"that one {SIZE} window covers, a multiple of {MAP}; fit trains on views at that "
                          f"scale, predict cuts each image into overlapping windows; 0 = squash to {SIZE}")
    with_whole: bool = setting(False, boolean, "with --window: the squashed whole image votes too, for the "
                               "global context of large parts (slime's)", flag="--with-whole")


def settings_from(values, source, base=None):
    """Settings from {name: value} (emb.pt's, or the flags given), each value checked as --help says."""
    known = {f.name: f for f in fields(Settings)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SlimeError(f"{source} has settings this slime does not know ({', '.join(unknown)}): it was made "
                         "by a newer slime, so update slime rather than guess what they mean")
    checked = {}
    for name, value in values.items():  # emb.pt's values pass the same checks as typed flags
        try:
            checked[name] = known[name].metadata["check"](value)
        except argparse.ArgumentTypeError as e:
            raise SlimeError(f"{source}: the setting {name} {e}") from None
    # only what was given replaces the base: a flag left out keeps emb.pt's (or the preset's) value, so predict
    # segments as fit validated
    s = replace(base or Settings(), **checked)
    # checked in the plan: randint(t_min, t_max + 1) would otherwise fail at fit's first step, after the load
    if s.t_min > s.t_max:
        raise SlimeError(f"{source}: the training timesteps run from t_min {s.t_min} to t_max {s.t_max}; "
                         "t_min must not exceed t_max")
    if s.with_whole and not s.window:
        raise SlimeError(f"{source}: --with-whole adds the squashed image to the windows of --window; give "
                         "--window too")
    # segment ignores out_size on the window path: refused rather than quietly not applied
    if s.window and s.out_size:
        raise SlimeError(f"{source}: --window segments each image at its own resolution, so its masks have the "
                         f"image's own size; give --out-size 0 with it, not {s.out_size}")
    return s


def recorded(s):
    """The settings as emb.pt and the outputs' made-by hash record them: the native-resolution ones only
    when on, so an older slime still reads a default emb.pt and outputs made before them still count."""
    return {k: v for k, v in asdict(s).items() if k not in ("window", "with_whole") or v}


PRESETS = {  # the release README's per-dataset settings (release/README.md#L79-L175)
    "pascal-car": dict(parts="background,body,light,plate,wheel,window", min_crop_ratio=0.6,
                       patch_size=512, patches_per_side=1),
    "pascal-horse": dict(parts="background,head,neck+torso,leg,tail", min_crop_ratio=0.8,
                         patch_size=512, patches_per_side=1),
    "celeba": dict(parts="background,skin,eye,mouth,nose,brow,ear,neck,cloth,hair", min_crop_ratio=0.6,
                   rotation=10.0),
}


# ----------------------------------------------------------------------------- the method (paper Sec. 4, Fig. 3)
# The release's layers (release/src/arguments.py#L6-L44) as checkpoint paths. In its diffusers names:
# up_blocks[1].attentions[0,1,2] and up_blocks[2].attentions[0,1] (attn2), up_blocks[3].attentions[0,1,2] (attn1).
CROSS_LAYERS = tuple(f"output_blocks.{i}.1.transformer_blocks.0.attn2" for i in (3, 4, 5, 6, 7))  # 16x16, 32x32
SELF_LAYERS = tuple(f"output_blocks.{i}.1.transformer_blocks.0.attn1" for i in (9, 10, 11))  # 64x64
IGNORE = 255  # mask value that no loss and no score looks at (PASCAL VOC's "void")


def prompt_contexts(sd, num_classes):
    """Sec. 4.1: the text encoder's OUTPUT for "part part ... part" (K words) and for "" (the SD loss's
    unconditional branch). release/src/slime.py#L59-L76.

    Positions 1..K-1 of the first are the vectors SLiMe learns. Position 0, <start-of-text>, stands for
    the background and is never learned: SD's cross-attention parks on it wherever no word fits.
    """
    with torch.no_grad():
        # K words though only K-1 vectors are learned, as the release's prompt (release/src/slime.py#L70): position K
        # keeps a plain "part"; "" is the unconditional prompt of the SD loss's guidance (#L73-L76)
        tokens = sd.tokenize([" ".join(["part"] * num_classes), ""]).to(sd.device)
        cond, uncond = sd.text_encoder(tokens).float().split(1)  # fp32: Adam updates the vectors in place
    return cond, uncond


def with_learned(learned, cond):
    """The conditional context with the learned vectors (K-1, D) at token positions 1..K-1."""
    # positions after K-1 (<end-of-text>, padding) keep the prompt's outputs: SD attends to them too
    return torch.cat([cond[:, :1], learned[None].to(cond.dtype), cond[:, 1 + len(learned):]], dim=1)


def noisy_latent(sd, images, t, gen):
    """images (B, 3, 512, 512) in [0, 1] -> x_t = sqrt(a_t) z + sqrt(1 - a_t) eps (DDIM add_noise), and eps.

    z is a posterior SAMPLE of the VAE times 0.18215, as in release/src/stable_difusion.py#L411-L418,
    drawn with the seeded generator so a run can be repeated.
    """
    with torch.no_grad():
        z = sd.vae.encode(images, sample=True, generator=gen)  # the VAE is frozen: no graph needed
    # drawn after the VAE's sample from the same generator: the order of the draws is part of what --seed repeats
    noise = torch.randn(z.shape, generator=gen, device=z.device)
    a = sd.alphas_cumprod[t].view(-1, 1, 1, 1)  # the fraction of the signal's variance left at step t
    return a.sqrt() * z + (1 - a).sqrt() * noise, noise


def attention_maps(sd, x_t, t, context, num_classes, log_space):
    """One UNet pass -> (A_ca (K, 64, 64), Eq. 3; A_sa (4096 queries, 4096 keys), Eq. 5; eps).

    A_ca: the cross-attention of tokens 0..K-1 (after the softmax over all 77), each layer bilinearly
    resized to 64x64, averaged over heads and layers (release/src/stable_difusion.py#L155-L264).
    log_space=True (training) averages log-probabilities, the input of the Eq. 4 cross-entropy;
    False (inference) averages probabilities. A_sa: the 64x64 layers' self-attention, averaged.
    """
    # only these 8 of the UNet's 32 attention layers materialise their maps; the rest take the fast path
    eps, maps = sd.unet(x_t, t, context, attn_layers=SELF_LAYERS + (() if log_space else CROSS_LAYERS),
                        log_attn_layers=CROSS_LAYERS if log_space else ())
    resized = []
    for name in CROSS_LAYERS:
        m = maps[name][0, :, :num_classes]  # (N pixels, K): the K tokens' columns
        side = int(m.shape[0] ** 0.5)  # 16 or 32: the layer's own grid
        m = m.T.reshape(1, num_classes, side, side)
        # bilinear, align_corners False, as the release's F.interpolate (release/src/stable_difusion.py#L201-L214)
        resized.append(F.interpolate(m, size=(MAP, MAP), mode="bilinear", align_corners=False)[0])
    # every layer weighs the same, 16x16 or 32x32, as the release's mean over its stacked layers
    # (release/src/stable_difusion.py#L250-L256)
    A_ca = sum(resized) / len(resized)
    A_sa = sum(maps[name][0] for name in SELF_LAYERS) / len(SELF_LAYERS)  # row q: P(query q -> key j)
    return A_ca, A_sa, eps


def was_map(P, A_sa):
    """Eq. 6, the Weighted Accumulated Self-attention map: S_WAS[k, q] = sum_j P[k, j] * A_sa[q, j].

    Each class's cross-attention P (K', 64, 64) spreads along the self-attention: a pixel scores high
    when the pixels it attends to are the class's. One (K', 4096) x (4096, 4096) matmul.
    """
    # A_sa.T puts the keys j on the rows, so the matmul sums over j as Eq. 6 does. The release forms the same sum
    # as a broadcast product of K x 4096 x 4096 values (release/src/slime.py#L130-L133)
    return (P.flatten(1) @ A_sa.T).view(P.shape)


def class_weights(mask, num_classes):
    """Eq. 4's weights (release/src/slime.py#L90-L95): #foreground / #pixels of a part, so small parts
    count as much as large ones; 0 for a part absent from the mask; 1 for the background."""
    n = torch.bincount(mask[mask != IGNORE].flatten(), minlength=num_classes)[:num_classes].float()
    n[0] = 0  # so n.sum() counts the foreground only
    w = torch.where(n > 0, n.sum() / (n + 1e-6), torch.zeros_like(n))  # 1e-6: the release's
    # a part's weight #foreground / #part is >= 1 (up to the 1e-6), so the background, often most of the pixels,
    # weighs no more than any part
    w[0] = 1
    return w


def segmentation_losses(A_ca, A_sa, mask, num_classes):
    """Eq. 4 and Eq. 7 on a (64, 64) mask: the weighted cross-entropy of A_ca, and the squared error of
    the WAS maps against the one-hot mask (release/src/slime.py#L121-L143)."""
    # ignore_index: 255 pixels (VOC's void, the padding of --window views) count as neither right nor wrong
    loss_ce = F.cross_entropy(A_ca[None], mask[None], weight=class_weights(mask, num_classes), ignore_index=IGNORE)
    # softmax over the K classes. The release takes it of the averaged raw logits; here A_ca holds averaged
    # log-probabilities over all 77 tokens, which differ from those logits by a per-pixel constant: same softmax
    P = A_ca.softmax(0)
    S_was = was_map(P, A_sa)  # Eq. 6
    valid = mask != IGNORE
    # the clamp only keeps one_hot from failing on 255; those pixels are dropped by `valid` below
    onehot = F.one_hot(mask.clamp(max=num_classes - 1), num_classes).permute(2, 0, 1).float()
    # the release: mean over classes and pixels, times K == per-pixel sum over classes, mean over pixels
    loss_mse = ((S_was - onehot) ** 2).sum(0)[valid].mean()
    return loss_ce, loss_mse


def training_step(sd, learned, cond, uncond, image, mask, s, gen):
    """Fig. 3: encode, add noise, UNet, maps, losses. image (3, 512, 512), mask (64, 64) -> (loss, terms)."""
    num_classes = len(learned) + 1
    # small t: the image is barely noised, so the attention still follows it, yet differs from step to step
    # t_max + 1: inclusive, as the release draws it (release/src/stable_difusion.py#L297)
    t = torch.randint(s.t_min, s.t_max + 1, (1,), generator=gen, device=gen.device)
    x_t, noise = noisy_latent(sd, image[None], t, gen)
    A_ca, A_sa, eps_cond = attention_maps(sd, x_t, t, with_learned(learned, cond), num_classes, log_space=True)
    loss_ce, loss_mse = segmentation_losses(A_ca, A_sa, mask, num_classes)  # Eq. 4, Eq. 7
    # a tensor even when skipped: the terms' .item() and Eq. 8 need no case of their own for beta = 0
    loss_sd = torch.zeros(())
    if s.beta:  # beta = 0 skips a whole UNet pass
        # SD's own loss with guidance 100 keeps the vectors where SD can use them (release/src/
        # stable_difusion.py#L340-L344). Only the cond branch depends on the learned vectors, so the
        # uncond branch runs without a graph (the release: one CFG batch of 2; same loss and gradient)
        with torch.no_grad():
            eps_uncond = sd.unet(x_t, t, uncond)[0]
        eps = eps_uncond + s.guidance * (eps_cond - eps_uncond)
        # against the noise actually added: the eps-prediction objective SD 2.1-base was trained with
        loss_sd = F.mse_loss(eps, noise)
    loss = loss_ce + s.alpha * loss_mse + s.beta * loss_sd  # Eq. 8
    return loss, {"ce": loss_ce.item(), "mse": loss_mse.item(), "sd": loss_sd.item()}


# The release's training augmentations (release/src/dataset.py#L31-L91), in torch: flip, blur, a crop
# that favours one part, rotation. They let one annotated image stand for many views.
def resize(x, size, mode):
    """(C, H, W) -> (C, *size). Bilinear without antialiasing (cv2.INTER_LINEAR), or nearest (INTER_NEAREST)."""
    if mode == "nearest":
        # interpolate takes no integer tensors: through float and back (labels up to 255 are exact in float32)
        return F.interpolate(x[None].float(), size=size, mode="nearest")[0].to(x.dtype)
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]


def gaussian_blur(image, k):
    """cv2.GaussianBlur(k, sigma=0) with reflect-101 borders. For k <= 7 and sigma 0, OpenCV's
    getGaussianKernel takes fixed binomial kernels, not the 0.3((k-1)/2-1)+0.8 sigma rule."""
    # only 3 and 5 occur: augment draws k <= 5 and skips k = 1 (no blur)
    g = torch.tensor({3: [1, 2, 1], 5: [1, 4, 6, 4, 1]}[k], dtype=image.dtype)
    g = g / g.sum()
    pad = F.pad(image[None], (k // 2,) * 4, mode="reflect")  # torch's "reflect" is OpenCV's REFLECT_101
    # a separable blur: rows, then columns
    out = F.conv2d(pad, g.view(1, 1, 1, k).expand(3, 1, 1, k), groups=3)
    return F.conv2d(out, g.view(1, 1, k, 1).expand(3, 1, k, 1), groups=3)[0]


def rotate(x, degrees, mode):
    """Rotate (C, H, W) about its centre, same size, zeros outside (albumentations Rotate, BORDER_CONSTANT 0)."""
    a = torch.tensor(degrees * torch.pi / 180)
    # positive angles turn the image clockwise on screen (cv2's turn counter-clockwise); augment draws the
    # angle symmetric about 0, so the distribution of views is the release's
    theta = torch.tensor([[torch.cos(a), torch.sin(a), 0.0], [-torch.sin(a), torch.cos(a), 0.0]])[None]
    grid = F.affine_grid(theta, (1, *x.shape), align_corners=False)
    return F.grid_sample(x[None].float(), grid, mode=mode, padding_mode="zeros", align_corners=False)[0].to(x.dtype)


def part_crop(mask, part, min_ratio, gen, tries=1000):
    """The crop that favours one part (release/src/dataset.py#L67-L83): side r * 512, r ~ U(min_ratio, 1),
    accepted when it keeps more than 30% of that part's pixels (always, if the part is absent)."""
    total = (mask == part).sum()
    for _ in range(tries):  # the release loops until accepted; a cap keeps a 1-pixel part from hanging
        # int(): the release truncates the side too (release/src/utils.py#L38)
        side = int((min_ratio + (1 - min_ratio) * torch.rand(1, generator=gen).item()) * SIZE)
        # a full-size crop draws no origin, as release/src/utils.py#L39-L44
        y0, x0 = (torch.randint(0, SIZE - side + 1, (2,), generator=gen).tolist() if side != SIZE else (0, 0))
        if total == 0 or (mask[y0:y0 + side, x0:x0 + side] == part).sum() / total > 0.3:
            return y0, x0, side
    # after `tries` refusals, the whole image: it keeps all of the part, so the release's loop would accept it too
    return 0, 0, SIZE


def augment(image, mask, part, s, gen):
    """image (3, 512, 512), mask (512, 512) -> the same, as the release's train transforms: flip (p .5),
    blur (p .5), the part-aware crop resized back to 512, rotation (p .5)."""
    rand = lambda: torch.rand(1, generator=gen).item()  # noqa: E731
    if rand() < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)  # horizontal: parts keep their up and down
    if rand() < 0.5:
        # the release's A.GaussianBlur(blur_limit=(1, 5)) (release/src/dataset.py#L35)
        k = int(torch.randint(1, 6, (1,), generator=gen))
        k += 1 - k % 2  # albumentations maps an even kernel to the next odd one: k in {1: 20%, 3: 40%, 5: 40%}
        image = gaussian_blur(image, k) if k > 1 else image
    y0, x0, side = part_crop(mask, part, s.min_crop_ratio, gen)
    image = resize(image[:, y0:y0 + side, x0:x0 + side], (SIZE, SIZE), "bilinear")  # a zoom: parts look larger
    mask = resize(mask[None, y0:y0 + side, x0:x0 + side], (SIZE, SIZE), "nearest")[0]  # nearest: no mixed labels
    if rand() < 0.5:
        # uniform in [-rotation, rotation], A.Rotate's limit (release/src/dataset.py#L38-L50; celeba's 10 is its preset)
        angle = (2 * rand() - 1) * s.rotation
        # the corners the turn brings in are 0 in both: black pixels, and background labels, not ignore (the release's
        # mask_value=0)
        image, mask = rotate(image, angle, "bilinear"), rotate(mask[None], angle, "nearest")[0]
    return image, mask


def window_crop(x, y0, x0, side, fill=None):
    """x[..., y0:y0 + side, x0:x0 + side], padded to side x side where it runs past the image: with the
    edge pixels (fill None: an image) or with fill (a mask)."""
    x = x[..., y0:y0 + side, x0:x0 + side]
    pad = (0, side - x.shape[-1], 0, side - x.shape[-2])
    if not any(pad):
        return x
    # an image is padded with its edge pixels, not black, which would add an edge the photo does not have; a mask
    # with `fill` (IGNORE from native_view), so no loss reads the padding
    return F.pad(x[None], pad, mode="replicate")[0] if fill is None else F.pad(x, pad, value=fill)


def native_view(image, mask, part, window, gen):
    """--window (slime): fit's view of a pair at its own resolution, at the scale predict's windows see:
    a window x window crop holding a random pixel of the favoured part at a random place (any pixel, if
    the part is absent), resized to 512. augment then zooms and turns it as the release does its images."""
    ys, xs = (mask == part).nonzero(as_tuple=True)
    pick = int(torch.randint(0, len(ys), (1,), generator=gen)) if len(ys) else None
    origin = []
    # origin <= p < origin + window whatever the clamps below do: the favoured part is in every view
    for found, n in ((ys, mask.shape[0]), (xs, mask.shape[1])):
        p = int(found[pick]) if pick is not None else int(torch.randint(0, n, (1,), generator=gen))
        offset = int(torch.randint(0, window, (1,), generator=gen))  # where in the view that pixel lands
        origin.append(min(max(p - offset, 0), max(n - window, 0)))  # inside the image where the view fits
    image = resize(window_crop(image, *origin, window), (SIZE, SIZE), "bilinear")
    # the padding past a small image is nobody's part: no loss looks at it
    mask = resize(window_crop(mask, *origin, window, IGNORE)[None], (SIZE, SIZE), "nearest")[0]
    return image, mask


def fit(sd, pairs, num_classes, s, val_pairs=None, on_best=None, progress=None):
    """Optimise K-1 text vectors on pairs [(image (3, 512, 512) in [0, 1], mask (512, 512) int64)]; with
    --window, on pairs at their own resolution, through native_view.

    Sec. 4.1 with the release's loop (release/src/slime.py#L111-L152, Adam at #L410-L416): one augmented
    step per pair per epoch, then a validation that keeps the best vectors. Masks may be numpy or torch,
    images and masks of any (equal) size: they are squashed to 512x512 here, as the release does.
    on_best(context (1, 77, D), epoch, mIoU) is called with each new best (epochs count from 1);
    progress(event) after each step ({"event": "step", "step", "steps", "epoch", "epochs", and the loss
    terms}) and each validation ({"event": "validation", "epoch", "miou", "best", "seconds"}).
    Returns the best context.
    """
    pairs, val_pairs = as_pairs(pairs, s), as_pairs(val_pairs, s) if val_pairs else None
    gen = torch.Generator(sd.device).manual_seed(s.seed)  # timesteps, VAE samples, noise
    # a CPU stream of its own: the pairs stay on the CPU, gen lives on sd.device, and a CUDA generator cannot drive
    # CPU draws; so the views are the same on any device
    aug_gen = torch.Generator().manual_seed(s.seed)  # augmentations (on the CPU)
    cond, uncond = prompt_contexts(sd, num_classes)
    learned = cond[0, 1:num_classes].clone().requires_grad_(True)  # starts as the word "part"
    optimizer = torch.optim.Adam([learned], lr=s.lr)  # the only parameters: SD itself stays frozen
    # without --val the training pairs themselves, unaugmented, choose the best epoch
    keeper = KeepTheBest(sd, cond, num_classes, s, val_pairs or pairs, on_best)
    part, step = 0, 0
    for epoch in range(s.epochs):
        # the release's DataLoader shuffles each epoch; seeded per epoch so a run can be repeated
        for i in torch.randperm(len(pairs), generator=torch.Generator().manual_seed(s.seed + epoch)).tolist():
            image, mask = training_view(*pairs[i], part, s, aug_gen)
            # the release's counter (release/src/dataset.py#L89-L90) lives in 8 DataLoader workers that start each
            # epoch from a fresh copy at 0 (#L158-L161): in effect its crops favour the background, as --no-cycle does
            part = (part + 1) % num_classes if s.cycle_parts else 0  # the part the next crop favours
            loss, terms = training_step(sd, learned, cond, uncond, image.to(sd.device), mask.to(sd.device), s, gen)
            # before backward: one nan step would make Adam's moments nan, and every later vector with them
            if not torch.isfinite(loss):
                raise SlimeError(diverged(sd, loss, step + 1, terms))
            optimizer.zero_grad()
            loss.backward()  # through the frozen UNet into the K-1 vectors only
            optimizer.step()
            step += 1
            if progress:
                progress(dict(event="step", step=step, steps=s.epochs * len(pairs), epoch=epoch + 1,
                              epochs=s.epochs, **terms))
        if (epoch + 1) % s.val_every == 0 or epoch == s.epochs - 1:  # the last epoch is always validated
            t0 = time.time()
            miou, best = keeper.validate(learned.detach(), epoch + 1)
            if progress:
                progress(dict(event="validation", epoch=epoch + 1, miou=miou, best=best, seconds=time.time() - t0))
    return keeper.context


def training_view(image, mask, part, s, gen):
    """What one training step sees of a pair: (--window: a view at the image's own scale, native_view), the
    release's augmentations favouring `part`, -> image (3, 512, 512), mask (64, 64)."""
    image, mask = native_view(image, mask, part, s.window, gen) if s.window else (image, mask)
    image, mask = augment(image, mask, part, s, gen)
    if s.bgr:
        image = image.flip(0)  # --bgr: the release fed cv2's BGR images (segment flips likewise)
    # the release's nearest resize to train_mask_size 64 (release/src/dataset.py#L84-L88): takes pixel (8i, 8j)
    return image, resize(mask[None], (MAP, MAP), "nearest")[0]


def as_pairs(pairs, s):
    """[(image (3, H, W), mask (H, W) numpy or torch)] -> masks as int64 tensors, and both squashed to
    512x512 as the release's cv2 resizes them (image bilinear, mask nearest); with --window kept at their
    own resolution (native_view cuts fit's views from them)."""
    out = []
    for image, mask in pairs:
        # int64 whatever the file stored: cross_entropy's target type
        mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).long()
        if tuple(mask.shape) != tuple(image.shape[1:]):
            raise SlimeError(f"a mask of {tuple(mask.shape)} does not match its image of {tuple(image.shape[1:])}")
        if not s.window:
            image, mask = resize(image, (SIZE, SIZE), "bilinear"), resize(mask[None], (SIZE, SIZE), "nearest")[0]
        out.append((image, mask))
    return out


class KeepTheBest:
    """Validation and the keep-the-best rule (release/src/slime.py#L281-L330): segment the validation
    pairs as predict would, and keep the vectors whose mean image mIoU is at least the best so far
    (>=: a tie goes to the later epoch, as in the release)."""

    def __init__(self, sd, cond, num_classes, s, val_pairs, on_best):
        self.sd, self.cond, self.num_classes, self.s, self.val_pairs, self.on_best = \
            sd, cond, num_classes, s, val_pairs, on_best
        # 0.0 with >=: the first validation always saves, so a fit that reaches one leaves an emb.pt; the release
        # also starts at 0 (release/src/slime.py#L28)
        self.best, self.context, self.patches = 0.0, cond, None

    def validate(self, learned, epoch):
        context = with_learned(learned, self.cond)
        # the validation images never change: their noisy patches are made once, and the masks are
        # bit-identical to segmenting from scratch (tests/test_method.py)
        self.patches = self.patches or [noisy_inputs(self.sd, image, self.s) for image, _ in self.val_pairs]
        # at SIZE: the release validates at test_mask_size 512 (release/src/arguments.py#L91), against masks squashed
        # as as_pairs squashed them; with --window segment ignores it, and both are at the image's own size
        miou = sum(image_miou(segment(self.sd, context, image, self.num_classes, self.s, SIZE, patches), gt,
                              self.num_classes) for (image, gt), patches in zip(self.val_pairs, self.patches))
        miou /= len(self.val_pairs)
        best = miou >= self.best
        if best:
            self.best, self.context = miou, context
            if self.on_best:
                self.on_best(context, epoch, miou)
        return miou, best


def diverged(sd, loss, step, terms):
    """Why a loss is not finite, for the one line the user reads. The weights were checked finite at
    load, so the cause is the optimisation or the number format, not the checkpoint."""
    why = ("fp16 overflows easily: use --dtype bf16 or fp32" if sd.dtype == torch.float16 else
           "the learning rate is the likely cause (the weights were checked finite at load): try a lower --lr")
    terms = ", ".join(f"{k} {v:.4g}" for k, v in terms.items())
    return f"the loss became {loss.item()} at step {step} ({terms}); {why}; the best emb.pt so far is kept"


def patch_origins(patch_size, per_side):
    """Top-left corners of the inference patches, rows first (release/src/utils.py#L14-L31)."""
    # floor division, as release/src/utils.py#L19-L20: when per_side - 1 does not divide 512 - patch_size, the last
    # patch stops short of the border, and the pixels past it get no vote (score 0 for every class)
    step = (SIZE - patch_size) // (per_side - 1) if per_side > 1 else 0
    return [(i * step, j * step) for i in range(per_side) for j in range(per_side)]


@torch.no_grad()
def noisy_patches(sd, image, s):
    """Sec. 4.2's inputs (release/src/slime.py#L188-L229): image (3, H, W) squashed to 512x512 as in the
    release, cut into the patches, each resized to 512 and noised at test_t -> [(y0, x0, x_t)].

    Seeded per image, so an image gets the same patches in any order, on any rank. They do not depend
    on the learned vectors, so fit's validation computes them once for the whole fit (the VAE encode
    costs about as much as the UNet pass).
    """
    x = resize(image.to(sd.device), (SIZE, SIZE), "bilinear")
    if s.bgr:
        x = x.flip(0)  # the release fed cv2's BGR channel order
    gen = torch.Generator(sd.device).manual_seed(s.seed)
    t = torch.tensor([s.test_t], device=sd.device)
    patches = []
    for y0, x0 in patch_origins(s.patch_size, s.patches_per_side):
        # each patch is zoomed to 512, so SD sees its parts larger than in the whole image
        patch = resize(x[:, y0:y0 + s.patch_size, x0:x0 + s.patch_size], (SIZE, SIZE), "bilinear")
        patches.append((y0, x0, noisy_latent(sd, patch[None], t, gen)[0]))
    return patches


@torch.no_grad()
def class_scores(sd, context, patches, num_classes, s, out=SIZE):
    """Sec. 4.2, the release's patched inference (release/src/slime.py#L188-L279): noisy_patches ->
    per-class scores (K, out, out). Each patch is segmented on its own; each class's score at a pixel is
    the mean of its votes over the patches that saw it there.
    """
    ratio = SIZE // out  # 1 for predict; 8 when the release logged a 64x64 training IoU
    placed = ((y0 // ratio, x0 // ratio, x_t) for y0, x0, x_t in patches)  # in the output grid
    scores, votes = vote_sums(sd, context, placed, num_classes, s, (out, out), s.patch_size // ratio)
    return scores / votes


@torch.no_grad()
def vote_sums(sd, context, patches, num_classes, s, grid, side, progress=None):
    """The release's accumulation: each patch (y0, x0, x_t) adds its patch_votes to the side x side cells
    of the grid from (y0, x0). -> (sum of votes, number of votes) per class, (K, *grid) each; the number
    starts at the release's 1e-7, so no cell divides 0 by 0. progress(n) after each patch."""
    scores = torch.zeros(num_classes, *grid, device=sd.device)
    votes = torch.full((num_classes, *grid), 1e-7, device=sd.device)
    t = torch.tensor([s.test_t], device=sd.device)
    for n, (y0, x0, x_t) in enumerate(patches, 1):
        A_ca, A_sa, _ = attention_maps(sd, x_t, t, context, num_classes, log_space=False)
        seen, patch_scores = patch_votes(A_ca, A_sa, s.threshold, side)
        if progress:
            progress(n)
        if patch_scores is None:
            continue  # no class was confident anywhere in this patch
        region = (seen, slice(y0, y0 + side), slice(x0, x0 + side))
        scores[region] += patch_scores
        # counted per class, as the release's aux_attention_map (release/src/slime.py#L271-L275): a class that one
        # of two overlapping patches saw is not halved where the other did not see it
        votes[region] += 1
    return scores, votes


def patch_votes(A_ca, A_sa, threshold, side):
    """One patch's vote: the classes it saw, and their WAS maps on their cross-attention's scale, (side, side)."""
    cross = A_ca.flatten(1)  # (K, 4096)
    # on the 64x64 maps, before any resize: the threshold and the rescale use the release's values
    # (release/src/slime.py#L233-L237)
    peak, floor = cross.max(1).values, cross.min(1).values
    seen = (peak >= threshold).nonzero()[:, 0]  # a class votes only where its cross-attention is confident
    if len(seen) == 0:
        return seen, None
    cross = cross[seen]
    # The FIRST class that passed (the background, whenever it passed) keeps only its above-mean pixels:
    # its cross-attention covers the whole image, and its full WAS map would swallow the parts.
    cross[0] = torch.where(cross[0] > cross[0].mean(), cross[0], 0)
    was = was_map(cross.view(-1, MAP, MAP), A_sa)  # Eq. 6
    # to the patch's footprint in the output grid: patch_size pixels of the 512 image, or 64 cells of --window's grid
    was = F.interpolate(was[None], size=(side, side), mode="bilinear", align_corners=False)[0]
    # Min-max rescale each WAS map onto its class's cross-attention range [floor, peak]: WAS maps of
    # different classes live on different scales, and the argmax should compare the classes' confidences
    w_max, w_min = was.flatten(1).max(1).values, was.flatten(1).min(1).values
    shrink = (w_max - w_min) / (peak[seen] - floor[seen])
    shrink = torch.where(torch.isnan(shrink) | (shrink == 0), torch.full_like(shrink, 1e-7), shrink)  # flat maps
    return seen, was / shrink[:, None, None] + (floor[seen] - w_min / shrink)[:, None, None]


# Native resolution (--window, slime): the release squashes every image to 512x512, so a part of a few
# pixels in a big photo falls below one latent pixel. Instead the image is cut, at its own resolution,
# into overlapping windows of `window` pixels, each resized to 512 and voting as a release patch does.
def window_layout(h, w, window):
    """Where the windows of an (h, w) image lie -> (cell, grid (gh, gw), origins [(y0, x0)] rows first).

    Scores live on a grid whose cell is window/64 image pixels: one pixel of a window's 64x64 maps, so a
    window is 64x64 cells whatever its size, and a 12000x9000 photo needs no full-size float maps. The
    grid rounds the image up to whole cells and to at least one window; windows past the image are padded
    (window_crop) and their pixels cropped off the mask."""
    cell = window // MAP
    # ceil: a last partial cell still gets scores; max(MAP, ...): an image smaller than a window still fills one
    grid = tuple(max(MAP, -(-n // cell)) for n in (h, w))
    return cell, grid, [(y0, x0) for y0 in axis_origins(grid[0]) for x0 in axis_origins(grid[1])]


def axis_origins(n, side=MAP, stride=MAP * 3 // 4):
    """Evenly spaced origins of windows of `side` cells along n >= side cells, the first and the last flush
    with the ends, at most `stride` apart: neighbours overlap by at least a quarter, so a part that one
    window cuts, the next sees whole (the release's patches overlap too)."""
    # the fewest windows that keep neighbours at most `stride` apart: each extra window is one more UNet pass
    count = 1 + -(-(n - side) // stride)
    return [round(i * (n - side) / (count - 1)) for i in range(count)] if count > 1 else [0]


@torch.no_grad()
def noisy_windows(sd, image, s):
    """noisy_patches at the image's own resolution: each window of window_layout, resized to 512 and noised
    at test_t -> (y0, x0, x_t) with y0, x0 in grid cells. A generator: one window in memory at a time."""
    cell, _, origins = window_layout(*image.shape[1:], s.window)
    gen = torch.Generator(sd.device).manual_seed(s.seed)  # seeded per image, as noisy_patches
    t = torch.tensor([s.test_t], device=sd.device)
    for y0, x0 in origins:
        # cut at the image's own resolution where the image lies: only one window's pixels go to the device at a time
        x = resize(window_crop(image, y0 * cell, x0 * cell, s.window).to(sd.device), (SIZE, SIZE), "bilinear")
        yield y0, x0, noisy_latent(sd, (x.flip(0) if s.bgr else x)[None], t, gen)[0]


def noisy_inputs(sd, image, s):
    """Everything segment noises for an image, for a caller that keeps it: noisy_patches; with --window,
    (the noisy windows, and the squashed image's noisy_patches with --with-whole, else None)."""
    if not s.window:
        return noisy_patches(sd, image, s)
    return list(noisy_windows(sd, image, s)), noisy_patches(sd, image, s) if s.with_whole else None


def native_scores(sd, context, image, num_classes, s, inputs=None, progress=None):
    """--window: class scores (K, gh, gw) on the window grid, the release's rule over the windows; with
    --with-whole the squashed image's scores add one vote where that pass voted. -> (scores, cell).
    progress(n, windows) after each window."""
    cell, grid, origins = window_layout(*image.shape[1:], s.window)
    windows, whole = inputs or (noisy_windows(sd, image, s), noisy_patches(sd, image, s) if s.with_whole else None)
    on_window = progress and (lambda n: progress(n, len(origins)))
    scores, votes = vote_sums(sd, context, windows, num_classes, s, grid, MAP, on_window)
    if whole:
        w_scores, w_votes = vote_sums(sd, context, whole, num_classes, s, (SIZE, SIZE), s.patch_size)
        voted = (w_votes >= 1).float()  # a class the whole image never voted for must not pull scores to 0
        h, w = (-(-n // cell) for n in image.shape[1:])  # the cells the image covers
        # the whole image's 512x512 scores stretched over the cells the image covers, not the padded ones past it
        scores[:, :h, :w] += resize(w_scores / w_votes * voted, (h, w), "bilinear")
        votes[:, :h, :w] += resize(voted, (h, w), "bilinear")
    return scores / votes, cell


def segment(sd, context, image, num_classes, s, out_size=None, patches=None, progress=None):
    """image (3, H, W) in [0, 1], any size -> labels (H, W) uint8, or (out_size, out_size).

    The model sees the image squashed to 512x512, as in the release. slime then upsamples the class
    SCORES, not the labels, to the image's own size and takes the argmax there (--out-size 512: the
    release's 512x512 masks). patches: the image's noisy_inputs, when the caller keeps them. With
    --window the scores come from the windows (native_scores) and the labels are (H, W) always;
    progress(n, windows) after each window.
    """
    if s.window:
        scores, cell = native_scores(sd, context, image, num_classes, s, patches, progress)
    else:
        scores, cell = class_scores(sd, context, patches or noisy_patches(sd, image, s), num_classes, s), None
    # upsampled_argmax builds its interpolation matrices on the CPU, and the labels go to files from there
    scores = scores.cpu()
    if not torch.isfinite(scores).all():  # argmax would quietly pick class 0 everywhere
        raise SlimeError("its class scores are not finite" + (", as fp16 overflows: use --dtype bf16 or fp32"
                                                              if sd.dtype == torch.float16 else ""))
    if s.window:
        return upsampled_argmax(scores, *image.shape[1:], cell)
    h, w = (out_size or s.out_size,) * 2 if out_size or s.out_size else image.shape[1:]
    # at 512 the scores already have the output size: the argmax directly, as release/src/slime.py#L277-L278
    return scores.argmax(0).byte() if (h, w) == (SIZE, SIZE) else upsampled_argmax(scores, h, w)


def interpolation_matrix(n_in, n_out):
    """(n_out, n_in) matrix M with M @ v == F.interpolate(v, n_out, mode="linear", align_corners=False)."""
    # bilinear is separable: a matrix per axis gives F.interpolate's result as two matmuls, and lets upsampled_argmax
    # work a band of rows at a time
    return F.interpolate(torch.eye(n_in)[None], size=n_out, mode="linear", align_corners=False)[0].T


def upsampled_argmax(scores, h, w, cell=None, band=256):
    """argmax over classes of the bilinearly upsampled scores (K, 512, 512) -> (h, w) uint8, `band` rows
    at a time, so a 12000x9000 photo never holds K full-size float maps at once. cell: scores on --window's
    grid, cell x cell pixels each, which may reach past the image's bottom and right edges (cut off)."""
    (gh, gw), n = scores.shape[1:], cell or 1
    # with cell, the grid is upsampled to g * cell pixels (its padded extent) and cut to the image, so each cell is
    # exactly the cell x cell pixels its windows saw; without, the 512x512 scores stretch to (h, w)
    rows, cols = (interpolation_matrix(g, g * n if cell else m)[:m] for g, m in ((gh, h), (gw, w)))
    # columns first, at the grid's few rows: (K, rows, w) is small, and (K, h, w) never exists
    scores_w = scores @ cols.T  # (K, 512, w)
    labels = torch.empty(h, w, dtype=torch.uint8)
    for i in range(0, h, band):
        R = rows[i:i + band]
        used = R.any(0).nonzero()[:, 0]  # each output row mixes 2 score rows: skip the zero columns of R
        lo, hi = used.min().item(), used.max().item() + 1
        band_scores = torch.einsum("hr,krw->khw", R[:, lo:hi], scores_w[:, lo:hi])
        labels[i:i + band] = band_scores.max(0).indices  # = argmax(0), the first maximum, but 20x faster on CPU
    return labels


def iou_per_class(pred, gt, num_classes):
    """IoU of every class present in gt (255 = ignore): |pred & gt| / (|pred | gt| + 1e-7) (release/src/utils.py#L8-L11)."""
    valid = gt != IGNORE
    pred, gt = pred[valid], gt[valid]
    # classes absent from gt are not scored, even where predicted: the release's rule
    return {c: ((pred == c) & (gt == c)).sum().item() / (((pred == c) | (gt == c)).sum().item() + 1e-7)
            for c in gt.unique().tolist() if c < num_classes}


def image_miou(pred, gt, num_classes):
    """The mean IoU over the classes present in this image's ground truth (release/src/slime.py#L300-L320)."""
    ious = iou_per_class(pred, gt, num_classes)
    # an all-ignore ground truth has no class: it scores 0 rather than dividing by zero
    return sum(ious.values()) / max(len(ious), 1)


def miou_table(per_image, num_classes):
    """per_image: [{class: IoU}] -> (per-class IoU, mIoU) as the release reports a test set: a class's IoU
    is the mean over the images that contain it; the mIoU is the mean over classes seen in any image."""
    sums, counts = [0.0] * num_classes, [0] * num_classes
    for ious in per_image:
        for c, v in ious.items():
            sums[c] += v
            counts[c] += 1
    per_class = [sums[c] / counts[c] if counts[c] else None for c in range(num_classes)]
    seen = [v for v in per_class if v is not None]
    return per_class, sum(seen) / max(len(seen), 1)


# ----------------------------------------------------------------------------- the checkpoint
# The prefixes of the original (ldm) single-file checkpoints. Each module copies the names below its prefix, so
# loading strips the prefix and assigns, with no table of names to keep (README, "How the modules map").
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
# the storage formats a weight may have; integer or bool tensors mean a damaged or foreign file (check_keys)
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def alphas_cumprod(n=1000, linear_start=0.00085, linear_end=0.012):
    """ldm's "linear" schedule (diffusers: scaled_linear), in float64 as ldm computes it, stored float32.
    https://github.com/CompVis/stable-diffusion/blob/21f890f9da3cfbeaba8e2ac3c425ee9e998d5229/ldm/modules/diffusionmodules/util.py
    """
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def detect_family(keys, path):
    # SDXL first: it has a UNet under the same prefix, and would otherwise be reported as lacking a known text encoder
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise SlimeError(f"{path} is an SDXL checkpoint; slime needs a Stable Diffusion 1.x or 2.x file "
                         "(e.g. v2-1_512-ema-pruned.safetensors)")
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise SlimeError(f"{path} holds no {UNET_PREFIX}* tensors, so it is not a full Stable Diffusion checkpoint "
                         "(a LoRA, VAE or embedding file?); use v2-1_512-ema-pruned.safetensors or v1-5-pruned-emaonly.safetensors")
    # the text encoder's names tell the family (SD1: Hugging Face CLIP, SD2: OpenCLIP). The UNet's names are the
    # same in both, and no header field names the model, so names are what every such file reliably holds
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
    family = detect_family(shapes, path)  # from the tensor names: the user never says which
    text = TEXT_PREFIX[family]

    def width(key, dim):
        if key not in shapes:
            raise SlimeError(f"{path} lacks the tensor {key}, so it is not a complete Stable Diffusion checkpoint")
        return shapes[key][dim]

    unet_cfg = (UNetConfig.sd15 if family == "sd1" else UNetConfig.sd21)(
        model_channels=width(UNET_PREFIX + "input_blocks.0.0.weight", 0),
        context_dim=width(UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", 1))
    vae_cfg = VAEConfig(ch=width(VAE_PREFIX + "encoder.conv_in.weight", 0))
    # the text depth is counted from the block names, as no header field states it
    block = r"encoder\.layers\.(\d+)\." if family == "sd1" else r"transformer\.resblocks\.(\d+)\."
    stored = 1 + max([int(m.group(1)) for k in shapes if (m := re.match(re.escape(text) + block, k))], default=-1)
    if family == "sd1":
        text_cfg = TextConfig.sd15(width=width(text + "embeddings.token_embedding.weight", 1), layers=stored)
    else:
        # SD2 conditions on the penultimate layer (ldm's FrozenOpenCLIPEmbedder, layer "penultimate"): the last block
        # is never built, and its tensors are on the ignore list ({last} below)
        text_cfg = TextConfig.sd21(width=width(text + "token_embedding.weight", 1), layers=stored - 1)
    with torch.device("meta"):  # shapes without memory: the weights are assigned as they are read
        modules = {UNET_PREFIX: UNetModel(unet_cfg), VAE_PREFIX: AutoencoderKL(vae_cfg),
                   text: (CLIPTextModel if family == "sd1" else OpenCLIPText)(text_cfg)}
    ignored = [re.compile(p.replace("{last}", str(stored - 1))) for p in IGNORED_KEYS]
    return family, modules, ignored


def check_keys(shapes, modules, ignored, path, dtypes=None):
    """Every tensor a module needs is in the file with its shape, in a floating-point format; every other
    tensor is on the ignore list."""
    # run on the header alone (read_header): info and predict's plan refuse a wrong file before a tensor is read,
    # and load_state_dict(strict=True) later finds nothing to complain about
    wanted = {prefix + k: tuple(v.shape) for prefix, m in modules.items() for k, v in m.state_dict().items()}
    missing = sorted(set(wanted) - set(shapes))
    unexpected = sorted(k for k in shapes if k not in wanted and not any(p.match(k) for p in ignored))
    # the shapes are the real test of the architecture: build_models read only a few widths from the file
    wrong = sorted(k for k in wanted if k in shapes and tuple(shapes[k]) != wanted[k])
    for what, keys in (("lacks", missing), ("has unexpected", unexpected), ("has wrongly shaped", wrong)):
        if keys:
            raise SlimeError(f"{path} {what} tensors for a {'/'.join(modules)} checkpoint: "
                             f"{', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''} ({len(keys)} in all)")
    # an integer tensor would be cast to float silently and give garbage: a sign of a damaged or foreign file
    not_float = sorted(k for k in wanted if dtypes and dtypes[k] not in FLOAT_DTYPES)
    if not_float:
        raise SlimeError(f"{path}: the tensor {not_float[0]} is stored as {dtypes[not_float[0]]}, not as floating "
                         f"point ({len(not_float)} such tensors); the file is damaged or not a Stable Diffusion model")


def open_checkpoint(path):
    check_file(path, ".safetensors checkpoint", "check the path; weights/README.md says where to download "
               "v2-1_512-ema-pruned.safetensors")
    # .ckpt files are pickles, and unpickling runs whatever code the file holds; safetensors is names, shapes, bytes
    if not str(path).endswith(".safetensors"):
        raise SlimeError(f"{path} is not a .safetensors file; slime never unpickles .ckpt files, "
                         "download the .safetensors release instead (see weights/README.md)")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:
        raise SlimeError(f"{path} cannot be read as .safetensors (truncated or corrupt download?): {e}") from None


def read_header(path):
    """What a checkpoint is, from its header alone (no tensor is read): (family, modules on the meta
    device, {name: shape}, {name: dtype}), every name, shape and dtype checked."""
    with open_checkpoint(path) as f:  # get_slice reads a tensor's entry in the header, never its data
        slices = {k: f.get_slice(k) for k in f.keys()}
        shapes = {k: tuple(v.get_shape()) for k, v in slices.items()}
        dtypes = {k: v.get_dtype() for k, v in slices.items()}
    family, modules, ignored = build_models(shapes, path)
    check_keys(shapes, modules, ignored, path, dtypes)
    return family, modules, shapes, dtypes


def fingerprint(path, sample=1 << 20):
    """A cheap identity of the weights: SHA-256 of the safetensors header (every name, dtype, shape and
    offset) and of the first and last MiB of tensor data. Not the file's SHA-256 (that reads 5 GB)."""
    # cheap enough for every load; the file's full SHA-256 is for a line someone reads and predict's made-by hash
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")  # safetensors: an 8-byte header length, then the JSON header
        h.update(f.read(n))
        h.update(f.read(sample))
        # max(): with under 2 MiB of tensor data (the tests' files) the samples overlap instead of reading past the end
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
    # path, size and mtime: a re-download or an edit changes size or mtime, so a stale hash is never reused
    key = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "slime", "sha256.json")
    try:
        with open(cache) as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}  # a damaged cache only costs the hashing
    if key not in known:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            # 16 MiB at a time: the 5 GB file is never in memory
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        known[key] = h.hexdigest()
        try:  # a cache we cannot write only costs the hashing next time
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            write_text(cache, json.dumps(known, indent=0))
        except (OSError, SlimeError):
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
        self.alphas_cumprod = alphas_cumprod().to(self.device)
        self.fingerprint = fingerprint(path)

    @property
    def device(self):
        return next(self.unet.parameters()).device

    @property
    def dtype(self):
        return next(self.unet.parameters()).dtype

    def tokenize(self, texts):
        # SD1's HF tokenizer pads with <|endoftext|>, SD2's open_clip.tokenize with 0
        return clip_text.tokenize(texts, clip_text.EOS if self.family == "sd1" else 0)


def load_models(path, device="cpu", dtype=torch.float32, text_encoder=True):
    """Load an original single-file SD 1.x / 2.x checkpoint (.safetensors; fp32, fp16 or bf16 storage).

    The modules are built on the meta device and each tensor is read once, checked finite, cast and
    assigned, so only the weights slime keeps are ever materialised (never the VAE decoder).
    text_encoder=False skips the text encoder (predict reads its context from emb.pt).
    """
    family, modules, _, _ = read_header(path)
    with open_checkpoint(path) as f:
        for prefix, module in list(modules.items())[:3 if text_encoder else 2]:  # UNet, VAE, text encoder
            # cast per tensor as read: the file is never in memory whole, nor in two formats at once; assign=True puts
            # these tensors in place of the meta ones instead of copying them into allocated memory
            state = {k: finite(f.get_tensor(prefix + k), prefix + k, path).to(device=device, dtype=dtype)
                     for k in module.state_dict()}
            module.load_state_dict(state, strict=True, assign=True)
            module.eval().requires_grad_(False)  # frozen: only the learned vectors get gradients
    unet, vae, text = modules.values()
    return StableDiffusion(family, unet, vae, text if text_encoder else None, str(path))


def finite(tensor, name, path):
    """The tensor, if every value is finite; else one sentence naming it. A float32 sum is finite exactly
    when no value is nan or inf (an overflow of finite values is settled by the exact test). Measured on
    the 1.24 G values slime keeps of SD 2.1-base, 2-core CPU: 0.30 s, against 3.9 s for torch.isfinite;
    load_models 0.52 s instead of 0.31 s with the file in the page cache (benchmarks/load_cost.py)."""
    # one nan weight makes every attention map nan, and argmax of nan scores is class 0: an all-background
    # mask with exit status 0. Checked here, so the error names the tensor instead of blaming --lr
    if not math.isfinite(tensor.sum(dtype=torch.float32)) and not torch.isfinite(tensor).all():
        raise SlimeError(f"{path}: the tensor {name} holds nan or inf values, so every result would be wrong; "
                         "the file is damaged: download it again")
    return tensor


# ----------------------------------------------------------------------------- files: images and masks
MAX_CLASSES = 77  # one text token per class: <start-of-text> (background) + up to 76 parts
GRAY16 = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL's modes of 16-bit (and 32-bit int) gray images
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MASK_EXTS = (".png", ".npy", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".jpg", ".jpeg")  # JPEG: found, refused


def check_file(path, what, advice=None):
    """Fail early, in the user's words, on a path that is missing, a directory, or empty."""
    if not os.path.exists(path):
        raise SlimeError(f"{path}: no such file; {advice or f'check the path of the {what}'}")
    if os.path.isdir(path):
        raise SlimeError(f"{path} is a directory; give the path of a single {what} file")
    if os.path.getsize(path) == 0:
        raise SlimeError(f"{path} is empty (0 bytes); re-export or re-copy the {what}")


def open_image(path, what):
    """Open `path` with PIL: first frame, pixels loaded, EXIF orientation applied; user errors as SlimeError.
    Returns (image, its file format)."""
    check_file(path, what)
    try:
        with warnings.catch_warnings():
            # PIL warns above 89 MP and refuses above 179 MP (2 x MAX_IMAGE_PIXELS); slime reads what PIL
            # does not refuse: predict takes big images through in bands (12000x9000 peaks at ~3 GB)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:  # closes the file: a folder of 10,000 photos must not run out of file handles
            im.seek(0)  # animated GIF / WebP / multi-page TIFF: the first frame
            im.load()  # decode now, so a truncated file fails here and not later
            # by what the file IS, not by its name: a JPEG saved as .png is still JPEG (MPO: a phone's JPEG)
            lossy = im.format in ("JPEG", "MPO", "JPEG2000") or im.info.get("compression") in ("jpeg", "tiff_jpeg")
            # as shown: phones store photos sideways with an EXIF rotation, and masks are drawn on the image as shown
            return ImageOps.exif_transpose(im), "JPEG" if lossy else im.format
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
    im, _ = open_image(path, "image")
    if im.mode in GRAY16 + ("F",):
        # 16-bit gray (PNG opens as "I;16" or "I"): full scale is 65535; float TIFFs are taken as 0..1
        gray = np.asarray(im, dtype=np.float32) / (1 if im.mode == "F" else 65535)
        if not np.isfinite(gray).all():
            raise SlimeError(f"{path} holds nan or inf pixel values; save the image with finite values")
        return torch.from_numpy(np.clip(gray, 0, 1))[None].repeat(3, 1, 1)
    if im.mode in ("P", "PA", "LA", "La", "RGBa"):
        im = im.convert("RGBA")  # through RGBA so a palette's transparency entry is understood; then the alpha goes
    # RGBA, L, 1, CMYK, YCbCr, ... all become RGB; the alpha channel is not part of the picture
    rgb = torch.from_numpy(np.array(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8))
    return rgb.permute(2, 0, 1).float().div_(255)  # in place: a 12000x9000 photo is 1.3 GB as float32


def read_mask(path, colors=False):
    """A mask file (.npy or a lossless image) as (H, W) int64 labels, or as (H, W, 3) uint8 colours for
    colors_to_labels. Values are kept as they are, so 255 (PASCAL VOC's "ignore") survives.
    colors=True reads an indexed (palette) PNG as its colours: a labelmap names colours, not indices."""
    if str(path).lower().endswith(".npy"):
        return read_npy_mask(path)
    im, format = open_image(path, "mask")
    if format == "JPEG" or (format == "WEBP" and not webp_is_lossless(path)):
        raise SlimeError(f"{path} is stored lossily ({format}); compression invents colours and values at every "
                         "edge, which would become classes of their own: save the mask as PNG (or .npy)")
    if im.mode == "P" and colors:
        im = im.convert("RGB")
    # without a labelmap an index or gray value is the class: VOC's SegmentationClass PNGs are indexed that way
    if im.mode in ("P", "L", "1") + GRAY16:
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


def webp_is_lossless(path):
    """A WebP file holds a lossless image when its first image chunk is VP8L (VP8 is lossy)."""
    with open(path, "rb") as f:
        data = f.read()
    pos = 12  # after "RIFF", the size, "WEBP"; then chunks: a fourcc, a size, the data padded to even
    while pos + 8 <= len(data):
        tag, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if tag in (b"VP8 ", b"VP8L"):
            return tag == b"VP8L"
        pos += 8 + size + (size & 1)
    return False


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
    if labels.size and (labels.min() < 0 or labels.max() > 255):  # before int64 can wrap a uint64
        raise SlimeError(f"{path} holds values from {labels.min()} to {labels.max()}; class labels are 0..76, "
                         "and 255 means ignore")
    return labels.astype(np.int64)


def voc_palette(n=256):
    """PASCAL VOC's colour map: the bits of index i, interleaved as r, g, b, fill each channel from the top bit."""
    index = np.arange(n)
    palette = np.zeros((n, 3), np.int64)
    for bit in range(8):  # 3 bits of the index per round: 8 rounds fill the 8 bits of each channel
        for channel in range(3):
            palette[:, channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
    return palette.astype(np.uint8)


VOC_PALETTE = voc_palette()
VOID = (224, 224, 192)  # VOC's colour of index 255, "ignore" (object borders, unlabelled pixels)


def pack_rgb(colors):
    """(..., 3) colours -> (...) int32 keys 0xRRGGBB, so colours compare and sort as single numbers."""
    c = np.asarray(colors).astype(np.int32)
    return (c[..., 0] << 16) | (c[..., 1] << 8) | c[..., 2]


def unpack_rgb(keys):
    return [[int(k) >> 16, (int(k) >> 8) & 255, int(k) & 255] for k in keys]


def lookup(keys, table):
    """Index in `table` of each key (the first one, if repeated), and whether it was found at all."""
    order = np.argsort(table, kind="stable")  # a binary search per pixel instead of a dict lookup per pixel
    pos = np.clip(np.searchsorted(table[order], keys), 0, len(table) - 1)
    return order[pos], table[order][pos] == keys


def colors_to_labels(masks, palette=None, names=None, source="the palette"):
    """Turn colour masks into label masks with ONE colour -> class mapping shared by all of them.

    The mapping is `palette` (a list of [r, g, b], index = class) if given; else PASCAL VOC's when every
    colour is a VOC colour; else black -> 0 and the other colours, sorted by (r, g, b), -> 1, 2, ...
    Label masks pass through. `names` (the mask paths) and `source` (where the palette came from, e.g. a
    labelmap.txt) only go into error messages.
    Returns (label masks, the palette as a list of [r, g, b]; None for VOC or when no mask had colours).
    """
    names = [str(n) for n in names] if names is not None else [f"mask {i + 1}" for i in range(len(masks))]
    keys = [pack_rgb(m) if m.ndim == 3 else None for m in masks]  # None: a label mask
    if all(k is None for k in keys):
        return list(masks), None
    if palette is not None:
        table = np.asarray(palette, dtype=np.int64)
        if table.ndim != 2 or table.shape[1:] != (3,) or not len(table) or table.min() < 0 or table.max() > 255:
            raise SlimeError("the palette must be a list of [r, g, b] colours with values 0..255, "
                             "one per class in class order")
        used = table.tolist()
    else:
        # from ALL the masks at once: mapped mask by mask, a part absent from one mask would shift the classes of
        # the rest
        table, used = mask_palette(keys, names)
    table_keys = pack_rgb(table)
    out = []
    for name, mask, k in zip(names, masks, keys):
        if k is None:
            out.append(mask)
            continue
        labels, found = lookup(k, table_keys)
        void = ~found & (k == pack_rgb(VOID))  # VOC's void colour means ignore, in any palette without it
        labels[void], found[void] = IGNORE, True
        # refused, not guessed: a colour outside the palette is most often an anti-aliased edge, which no class owns
        if not found.all():
            bad = unpack_rgb(np.unique(k[~found])[:3])
            examples = ", ".join(f"({r}, {g}, {b})" for r, g, b in bad)
            raise SlimeError(f"{name} has {int((~found).sum())} pixels whose colour is not in {source} "
                             f"(e.g. {examples}); add those colours to {source} or repaint the mask "
                             "without anti-aliasing")
        out.append(labels.astype(np.int64))
    return out, used


def mask_palette(keys, names):
    """The colour table of colour masks that came without one: (table, palette to record, or None for VOC)."""
    present = np.zeros(0, np.int32)
    for name, k in zip(names, keys):  # the class count is checked as the colours accumulate
        if k is not None:
            present = np.union1d(present, np.unique(k))
            if len(present) > MAX_CLASSES:
                raise SlimeError(
                    f"{name} brings the number of distinct mask colours to {len(present)}, more classes than "
                    f"SD's {MAX_CLASSES} text tokens allow; anti-aliased edges (a smooth brush) are the usual "
                    "cause, so save the masks without anti-aliasing or as indexed PNGs")
    if np.isin(present, pack_rgb(VOC_PALETTE)).all():
        return VOC_PALETTE, None  # VOC colours: the VOC index, so (224, 224, 192) -> 255 = ignore
    present = present[present != pack_rgb(VOID)]  # void is ignore (colors_to_labels), not a class
    # black added even where absent, so it is class 0, the background, as in VOC's palette
    table = np.array(unpack_rgb(np.union1d(np.zeros(1, np.int32), present)))  # sorted keys: black first
    return table, table.tolist()


# A labelling tool's export names its colours: CVAT's "Segmentation mask 1.1" (and VOC-style tools) write
# labelmap.txt, one `name:r,g,b:parts:actions` line per label, background first, beside SegmentationClass/.
LABELMAP_HEADER = "# label:color_rgb:parts:actions"


def read_labelmap(path):
    """labelmap.txt -> (names, colours [[r, g, b]]), in its order: line i is class i."""
    check_file(path, "labelmap.txt")
    names, colors = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, _, rest = line.partition(":")
            rgb = rest.split(":")[0].split(",")
            try:
                color = [int(v) for v in rgb]
            except ValueError:
                color = []
            if not name.strip() or len(color) != 3 or not all(0 <= v <= 255 for v in color):
                raise SlimeError(f"{path}, line {n}: {line[:60]!r} is not `name:r,g,b::` with r, g, b in 0..255")
            # two labels of one colour could not be told apart in a mask, nor two of one name in emb.pt's parts
            if name.strip() in names or color in colors:
                raise SlimeError(f"{path}, line {n}: the label {name.strip()!r} or its colour {tuple(color)} is "
                                 "listed twice; each label needs a name and a colour of its own")
            names.append(name.strip())
            colors.append(color)
    if not 2 <= len(names) <= MAX_CLASSES:
        raise SlimeError(f"{path} lists {count(len(names), 'label')}; slime needs 2 to {MAX_CLASSES} (background first)")
    return names, colors


def find_labelmap(mask_paths, given=None):
    """The labelmap.txt that names these masks' colours: --labelmap, else one beside the masks, else the
    export's root above a SegmentationClass/ folder (CVAT's layout). None when there is none."""
    if given:
        return given
    found = set()
    for mask in mask_paths:
        folder = os.path.dirname(os.path.abspath(mask))
        for where in (folder, os.path.dirname(folder) if os.path.basename(folder) == "SegmentationClass" else None):
            if where and os.path.isfile(os.path.join(where, "labelmap.txt")):
                found.add(os.path.join(where, "labelmap.txt"))
                break
    # compared by content: the same labelmap copied beside the training and the validation masks is no conflict
    if len({open(p, "rb").read() for p in found}) > 1:
        raise SlimeError(f"the masks come with different labelmap.txt files ({', '.join(sorted(found)[:2])}); "
                         "give the one that names every mask's colours with --labelmap")
    return min(found) if found else None


def labelmap_text(parts, colors):
    """labelmap.txt in CVAT's format, for the classes `parts` in `colors` (CVAT imports it with the masks)."""
    # CVAT's header line, then slime's: run_file_is_slimes knows a labelmap slime wrote by that beginning
    return f"{LABELMAP_HEADER}\n# written by slime predict\n" + "".join(
        f"{name}:{r},{g},{b}::\n" for name, (r, g, b) in zip(parts, colors))


def part_colors(emb):
    """Each part's colour: the one its masks came with (labelmap or colour masks), else VOC's."""
    return [list(c) for c in emb["colors"][:len(emb["parts"])]] + \
        VOC_PALETTE[len(emb["colors"]):len(emb["parts"])].tolist()


# ----------------------------------------------------------------------------- files: emb.pt
# the tag fit writes and load_embeddings and is_embeddings look for: a file without it is neither read by
# predict nor replaced by fit
EMB_FORMAT = "slime-embeddings/1"


def save_embeddings(path, context, parts, sd, s, colors=None, epoch=None, miou=None):
    """One self-describing file, written whole or not at all; loads with torch.load(weights_only=True)."""
    # plain CPU float32 whatever --dtype and --device: a predict on another machine or in another format reads it
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
        "settings": recorded(s),  # plain types only, so weights_only loading can read it
        "epoch": -1 if epoch is None else int(epoch),  # counted from 1, as the console says it
        "val_miou": -1.0 if miou is None else float(miou),
    }
    # through commit: a kill during the save leaves the previous best emb.pt, never a truncated one
    commit({path: lambda f: torch.save(payload, f)})


def load_embeddings(path):
    """emb.pt as fit wrote it, checked against its schema (check_embeddings); never runs pickled code."""
    check_file(path, "emb.pt", f"make one with `python slime.py fit image.png mask.png -o {path}`")
    emb = safe_load(path, "a slime emb.pt")
    if not isinstance(emb, dict) or emb.get("format") != EMB_FORMAT:  # a model, an optimizer state, ...
        raise SlimeError(f"{path} is a torch file but not a slime emb.pt (no '{EMB_FORMAT}' format tag)")
    check_embeddings(emb, path)
    return emb


def is_embeddings(path):
    """Whether `path` is a file fit wrote (so another fit may replace it)."""
    # weights_only: asking what a file is must not run it; an unreadable file is not ours, so fit will not replace it
    try:
        return torch.load(path, map_location="cpu", weights_only=True).get("format") == EMB_FORMAT
    except Exception:
        return False


def check_embeddings(emb, path):
    """Every key predict reads, with shapes consistent with `parts` and finite values. Unknown keys are
    tolerated (they cannot change a mask); unknown settings are not (settings_from says why)."""
    def refuse(what):
        return SlimeError(f"{path} is not a usable emb.pt: {what}")
    for key, kind in (("context", torch.Tensor), ("learned", torch.Tensor), ("parts", list), ("family", str),
                      ("colors", list), ("settings", dict), ("cross_layers", list), ("self_layers", list)):
        if not isinstance(emb.get(key), kind):
            raise refuse(f"its {key!r} is {type(emb.get(key)).__name__}, not {kind.__name__}")
    parts, context, learned = emb["parts"], emb["context"], emb["learned"]
    if not 2 <= len(parts) <= MAX_CLASSES or not all(isinstance(p, str) and p for p in parts):
        raise refuse(f"its parts {parts[:4]} are not 2 to {MAX_CLASSES} names")
    if context.ndim != 3 or context.shape[:2] != (1, 77) or not context.is_floating_point():
        raise refuse(f"its context has shape {tuple(context.shape)} ({context.dtype}), not (1, 77, width)")
    if not torch.isfinite(context).all():
        raise refuse("its context holds nan or inf values")
    emb["context"], emb["learned"] = context, learned = context.float(), learned.float()  # as fit saves them
    # predict reads the context: learned must agree with it, or the file would say one thing and segment with another
    if tuple(learned.shape) != (len(parts) - 1, context.shape[2]) or not torch.equal(learned, context[0, 1:len(parts)]):
        raise refuse(f"its learned vectors {tuple(learned.shape)} are not the {len(parts) - 1} vectors of its "
                     f"{len(parts)} parts that its context holds")
    if emb["family"] not in TEXT_PREFIX:
        raise refuse(f"its family {emb['family']!r} is neither sd1 nor sd2")
    # vectors fitted to other layers' attention would be read through the wrong maps
    if tuple(emb["cross_layers"]) != CROSS_LAYERS or tuple(emb["self_layers"]) != SELF_LAYERS:
        raise refuse("it was fitted on other attention layers than the ones this slime reads")
    if not all(isinstance(c, list) and len(c) == 3 and all(type(v) is int and 0 <= v <= 255 for v in c)
               for c in emb["colors"]):
        raise refuse("its colors are not [r, g, b] lists of 0..255")
    # the same checks as a typed flag: an edited emb.pt cannot carry a setting the command line would refuse
    emb["settings"] = settings_from(emb["settings"], path)


def read_release_folder(folder, parts):
    """The authors' checkpoint folder (release/src/slime.py#L322-L357): embedding_0.pth ... embedding_{K-2}.pth,
    one (1, 1, 1024) vector per part, fitted with SD 2.1-base on BGR images at 512x512, so those are its
    defaults here too. Returns an emb.pt-like dict whose context predict completes with the text encoder."""
    found = {int(m.group(1)): f for f in os.listdir(folder) if (m := re.fullmatch(r"embedding_(\d+)\.pth", f))}
    if not found:
        raise SlimeError(f"{folder} is a folder without embedding_0.pth ...; give an emb.pt or the release's folder")
    # capped at 77: a stray embedding_99999.pth must not list 99999 missing names
    missing = [f"embedding_{i}.pth" for i in range(min(max(found) + 1, MAX_CLASSES)) if i not in found]
    if not missing and max(found) >= MAX_CLASSES - 1:
        raise SlimeError(f"{folder} holds embedding_{max(found)}.pth: more parts than SD's 77 tokens allow")
    if missing:
        raise SlimeError(f"{folder} lacks {', '.join(missing[:4])}; the release writes embedding_0.pth to "
                         f"embedding_{{K-2}}.pth, one per part")
    learned = [safe_load(os.path.join(folder, found[i]), "a tensor") for i in range(len(found))]
    if not all(isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() == learned[0].numel()
               for v in learned):
        raise SlimeError(f"{folder}: its embedding_{{i}}.pth files are not one vector each of the same width")
    learned = torch.cat([v.float().reshape(1, -1) for v in learned])
    if not torch.isfinite(learned).all():
        raise SlimeError(f"{folder}: its embedding_{{i}}.pth vectors hold nan or inf values")
    parts = part_names(parts, "--parts") if parts else default_parts(len(found) + 1)
    if len(parts) != len(found) + 1:
        raise SlimeError(f"{folder} holds {len(found)} part embeddings, so --parts needs {len(found) + 1} names "
                         f"(background first), not {len(parts)}")
    # sd2: the release fits SD 2.1-base only (release/src/slime.py#L31-L34); fingerprint None: the weights it used
    # are not known here, so predict warns of no mismatch
    return {"learned": learned, "parts": parts, "family": "sd2", "fingerprint": None, "colors": [],
            "settings": Settings(bgr=True, out_size=SIZE)}


def default_parts(num_classes):  # when no names are given: background, part1, part2, ...
    return ["background"] + [f"part{i}" for i in range(1, num_classes)]


def part_names(text, flag):
    """--parts a,b,c -> ["a", "b", "c"]: names that are not empty and not repeated (each labels a class)."""
    parts = [p.strip() for p in text.split(",")]
    if not all(parts) or len(set(parts)) != len(parts):
        raise SlimeError(f"{flag} {text}: the names must be non-empty and distinct, comma-separated, background first")
    return parts


def safe_load(path, what):
    """torch.load that never runs pickled code, and says so in one line instead of torch's advice to
    load with weights_only=False (which would run whatever a downloaded file holds)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise SlimeError(f"{path} cannot be read as {what}: it is damaged, not a torch file, or holds pickled "
                         "objects that slime never runs") from None


# ----------------------------------------------------------------------------- files: outputs, whole or not at all
def temp_name(path):
    """A temp file beside `path` (so the final rename cannot cross disks), unique to this process."""
    folder, name = os.path.split(str(path))
    # dot-prefixed: list_images skips hidden files, so a leftover temp file is never read as an image; the pid and
    # a random suffix keep two runs or ranks from sharing one
    return os.path.join(folder, f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def sync(path):
    """Flush a file, or a folder where the system allows it (so that a rename survives a power cut)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(writers):
    """Write {path: write(file object)} whole or not at all: each file goes to a temp file of its own
    beside its target and is flushed to disk; only when all are written are they renamed onto their
    targets. A full disk, an error or an interrupt while writing leaves every target as it was."""
    temps, current = {path: temp_name(path) for path in writers}, None  # current: the file a failure names
    try:
        for path, write in writers.items():
            current = path
            with open(temps[path], "wb") as f:
                write(f)
            sync(temps[path])  # on disk before the rename, or a power cut could leave an empty file
        # renames only after every file is written: a mask and its overlay appear together or not at all
        for path in writers:
            current = path
            os.replace(temps[path], path)  # atomic within a folder: readers see the old file or the new
        for folder in {os.path.dirname(os.path.abspath(p)) for p in writers}:
            sync(folder)  # the renames themselves
    except OSError as e:
        raise SlimeError(f"{current}: cannot be written ({e.strerror or e}); it and the files written with it "
                         "are left as they were") from None
    finally:  # also on Ctrl-C and SIGTERM, which arrive as KeyboardInterrupt
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)


def text_writer(text):
    """A commit() writer of `text` as UTF-8."""
    return lambda f: f.write(text.encode())


def write_text(path, text):
    commit({path: text_writer(text)})


def png_writer(im, made_by=None):
    """A commit() writer of `im` as PNG, with what made it in a text chunk (predict reads it back)."""
    # the made-by hash rides in the PNG itself: a copied or moved output still says what made it
    info = PngImagePlugin.PngInfo()
    if made_by:
        info.add_text("slime", made_by)
    return lambda f: im.save(f, format="PNG", pnginfo=info)


def made_by_of(path):
    """The text chunk png_writer wrote into `path`, or None (no file, not a PNG, not made by slime)."""
    try:
        with Image.open(path) as im:
            return im.info.get("slime")
    except Exception:
        return None


def output_palette(colors=()):
    """The 256-colour palette of masks and overlays: the parts' colours first, VOC's for the rest (255: void)."""
    palette = VOC_PALETTE.copy()
    palette[:len(colors)] = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
    return palette


def mask_image(labels, colors=()):
    """(H, W) labels 0..255 -> an indexed PNG image: pixel value = class, shown in the parts' colours
    (`colors`, class order; VOC's for the rest), so a labelling tool reads the classes by colour too."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"labels must be a 2-D array of values 0..255, got shape {labels.shape}")
    im = Image.fromarray(labels.astype(np.uint8))
    im.putpalette(output_palette(colors).tobytes())  # an "L" image with a palette becomes "P"
    return im


def overlay_image(image, labels, part_names, colors=(), band=256):
    """The image with each non-background class tinted 50% in its colour and striped in black or white
    (whichever contrasts with that colour, so a dark red part stays visible on a red object), white class
    boundaries, and a legend of every part in the top-left corner. Built `band` rows at a time, so a
    12000x9000 photo never needs full-size float arrays."""
    labels = np.asarray(labels)
    if labels.shape != tuple(image.shape[1:]):
        raise ValueError(f"labels of shape {labels.shape} do not match an image of size {tuple(image.shape[1:])}")
    palette = output_palette(colors).astype(np.float64)
    # luma with BT.601's weights (PIL's own conversion to L)
    stripe = np.where(palette @ [0.299, 0.587, 0.114] > 110, 0.0, 255.0)  # black on light colours, else white
    out, counts = Image.new("RGB", labels.shape[::-1]), np.zeros(256, np.int64)
    for i in range(0, labels.shape[0], band):
        lab = labels[i:i + band + 1].astype(np.int64) & 255  # one row more: the boundary with the next band
        counts += np.bincount(lab[:band].ravel(), minlength=256)
        rgb = (image[:, i:i + band].detach().float().clamp(0, 1) * 255).round().permute(1, 2, 0).cpu().numpy()
        part = lab[:band] != 0
        tinted = np.where(part[..., None], 0.5 * rgb + 0.5 * palette[lab[:band]], rgb)
        y, x = np.mgrid[i:i + len(rgb), :rgb.shape[1]]
        striped = part & ((x + y) % 12 < 2)  # thin diagonal stripes, 12 px apart
        tinted[striped] = stripe[lab[:band][striped], None]
        # a boundary pixel differs from its right or its lower neighbour
        edge = np.zeros(lab.shape, bool)
        edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
        edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
        tinted[edge[:band]] = 255
        out.paste(Image.fromarray(np.round(tinted).astype(np.uint8)), (0, i))
    # every part (absent ones marked), then any class found that is not a part (255: ignore)
    classes = list(range(len(part_names))) + [c for c in np.flatnonzero(counts) if c >= len(part_names)]
    draw_legend(out, classes, part_names, palette.astype(np.uint8), counts)
    return out


def draw_legend(im, classes, part_names, palette=VOC_PALETTE, counts=None):
    """A dark box with a colour swatch and the name of each class (", none" where counts says it is
    absent), sized to the image; PIL clips what falls off."""
    size = max(8, min(32, min(im.size) // 32))  # text height: 8 px on small images, 16 px at 512, at most 32
    try:
        font = ImageFont.load_default(size=size)
    except ImportError:  # PIL built without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(im)
    names = [(part_names[c] if 0 <= c < len(part_names) else "ignore" if c == IGNORE else f"class {c}")
             + (" (none)" if counts is not None and counts[c] == 0 else "") for c in classes]
    pad, line = max(2, size // 4), size + max(2, size // 4)
    width = max(draw.textlength(n, font=font) for n in names)
    draw.rectangle([0, 0, 3 * pad + size + width, pad + line * len(names)], fill=(32, 32, 32))
    for i, (c, name) in enumerate(zip(classes, names)):
        y = pad + i * line
        swatch = tuple(int(v) for v in palette[c & 255])
        draw.rectangle([pad, y, pad + size - 1, y + size - 1], fill=swatch, outline=(255, 255, 255))
        absent = counts is not None and counts[c] == 0
        draw.text((2 * pad + size, y), name, fill=(150, 150, 150) if absent else (255, 255, 255), font=font)


# ----------------------------------------------------------------------------- the plan: check everything first
# A run first makes a plan: every option, every path it reads and writes, every value, checked before
# any model is loaded, so that a mistake costs seconds, not a fit. Then it works, and commits each
# output whole (commit above). The plan's one mechanism for paths is check_plan; for values, the
# readers above (Settings, read_header/finite, check_embeddings, read_mask).
def file_key(path):
    """What identifies a file: its inode where it exists (so symlinks, hard links and case-insensitive
    disks are seen through), else its resolved path."""
    real = os.path.realpath(path)
    # an output not yet written has no inode: its resolved path, case-folded where normcase folds case (Windows)
    try:
        st = os.stat(real)
        return st.st_dev, st.st_ino
    except OSError:
        return os.path.normcase(real)


def check_plan(reads, writes, guarded=()):
    """Refuse an output that would destroy an input or another output, or that lands where it must not;
    reads only. reads: {path: what it is}; writes: [(path, what it is)]; guarded: [(folder, what it is,
    whether its subfolders count too)]. make_folders follows, once every check has passed."""
    inputs, outputs = {file_key(p): (p, what) for p, what in reads.items()}, {}
    for path, what in writes:
        key, where = file_key(path), os.path.dirname(os.path.realpath(path))
        if os.path.isdir(path):
            raise SlimeError(f"{path} is a folder, so the {what} cannot be written there; give a file path "
                             f"such as {os.path.join(path, 'emb.pt')}")
        for folder, role, below in guarded:  # a later run would read our outputs as inputs, or score itself
            top = os.path.realpath(folder)
            # + os.sep: out2/ is not inside out/
            if where == top or below and where.startswith(top + os.sep):
                raise SlimeError(f"{os.path.dirname(path) or '.'} is {role if where == top else 'inside ' + role}; "
                                 "outputs there would mix with what this run reads: choose another output folder with -o")
        if key in inputs:
            raise SlimeError(f"the {what} would be written over {inputs[key][0]}, the {inputs[key][1]} this run "
                             "reads; choose another output path with -o")
        if key in outputs:
            raise SlimeError(f"the {outputs[key]} and the {what} would both be {path}; rename one of the inputs")
        outputs[key] = what


def make_folders(writes):
    """Make each output folder and prove it writable by creating and removing a temp file there (os.access
    cannot tell: root, network disks, ACLs). -> the folders made, deepest first, to undo on failure."""
    created = []
    for folder in sorted({os.path.dirname(os.path.abspath(p)) for p, _ in writes}):
        # note the folders this run makes, so that a refused run removes them again (work, remove_empty)
        missing = folder
        while not os.path.exists(missing):
            created.append(missing)
            missing = os.path.dirname(missing)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            reason = "something that is not a folder has that name" if isinstance(e, FileExistsError) else e.strerror
            raise SlimeError(f"{folder}: cannot create the output folder ({reason})") from None
        probe = temp_name(os.path.join(folder, "probe"))
        try:
            open(probe, "wb").close()
            os.remove(probe)
        except OSError as e:
            raise SlimeError(f"{folder}: the output folder is not writable ({e.strerror}); choose another with -o") from None
    return sorted(created, key=len, reverse=True)  # a folder's subfolders before it


def lock(path, what):
    """Hold an exclusive lock on `path` while the run writes: a second run into the same place refuses at
    once, in one line. The OS drops the lock of a killed run; release() also removes the file. No-op on
    Windows (no fcntl)."""
    try:
        import fcntl
    except ImportError:
        return lambda: None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # flock, not a pid file: the OS drops it when the holder dies, kill -9 included, so no stale lock needs
            # clearing; LOCK_NB: a second run refuses at once instead of waiting hours behind a fit
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SlimeError(f"another slime run is writing {what} ({path} is locked); wait for it to finish "
                             "or choose another -o") from None
        try:  # the last holder may have removed the file between our open and our lock: then try again
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except OSError:
            pass
        os.close(fd)

    def release():
        if os.path.exists(path):  # someone may have removed it, or the whole folder, meanwhile
            os.remove(path)
        os.close(fd)
    return release


@contextlib.contextmanager
def work(created, release):
    """The work after a plan: whatever ends it, the lock is released; if it fails, the folders the plan
    made are removed when still empty, so a refused run leaves no trace."""
    done = False
    try:
        yield
        done = True
    finally:
        release()  # first: the lock file is in the folder
        remove_empty([] if done else created)


def remove_empty(folders):
    """Remove the folders (deepest first) that a refused or failed run made and left empty."""
    for folder in folders:
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)


def device_and_dtype(args, con):
    """--device and --dtype, checked against what this machine has, and --threads: -> (torch.device, torch.dtype)."""
    local = int(os.environ.get("LOCAL_RANK", "0"))  # torchrun: one GPU per rank
    name = args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SlimeError(f"--device {name}: not a device torch knows; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SlimeError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s) that torch "
                         "can use; leave --device out to run on the CPU")
    if device.type == "mps" and not torch.backends.mps.is_available() or device.type not in ("cpu", "cuda", "mps"):
        raise SlimeError(f"--device {name}: not available on this machine; leave --device out to run on the CPU")
    # fp32 everywhere, as the release computes. Measured (README, Speed and precision): on an H100, bf16
    # was slower than fp32 (fit step 0.17 s vs 0.13 s) though its masks agree 99.95%; on a CPU without
    # bf16 instructions torch emulates bf16 convolutions, 100x slower or worse
    dtype = args.dtype or "fp32"
    if args.threads:  # matmuls with few rows (the context's keys and values) and a VAE 1x1 conv split their sums
        torch.set_num_threads(args.threads)  # over threads: the count moves a result's last bits (README, torchrun)
    if device.type == "cpu" and not args.device:
        con.say(f"no GPU found: running on the CPU ({count(torch.get_num_threads(), 'thread')}), which takes "
                "minutes per image (see README, Speed)")
    if device.type == "cpu" and dtype == "fp16":  # x86 CPUs have no fp16 arithmetic: torch emulates it
        con.say("warning: fp16 on a CPU is about 25x slower than fp32; use --dtype fp32")
    if device.type == "cpu" and dtype == "bf16" and not cpu_has_bf16():
        con.say("warning: this CPU has no bf16 instructions, so bf16 runs 100x slower or worse; use --dtype fp32")
    return device, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def cpu_has_bf16():
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX); without, torch emulates it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private probe: assume the worst if this torch lacks it
        return False


def checkpoint_path(args):
    """--ckpt, or the one .safetensors file in weights/."""
    folder = os.path.join(HERE, "weights")
    found = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) if os.path.isdir(folder) else []
    if args.ckpt:
        return args.ckpt
    if not found:
        raise SlimeError(f"{folder} holds no .safetensors checkpoint; put v2-1_512-ema-pruned.safetensors there "
                         "(see weights/README.md) or pass --ckpt")
    # no guess between two files: fit and predict could each pick another one
    if len(found) > 1:
        raise SlimeError(f"{folder} holds {len(found)} checkpoints ({', '.join(found)}); choose one with --ckpt")
    return os.path.join(folder, found[0])


def plan_fit(args, con):
    """Options, paths and the output of a fit, checked: -> (settings, device, checkpoint, new folders, release)."""
    preset = dict(PRESETS.get(args.preset, {}))
    args.parts = args.parts or preset.get("parts")  # explicit flags win over a preset
    # parts is no Setting: it goes through --parts, not settings_from
    preset.pop("parts", None)
    # flags over the preset over the defaults: given() holds only the flags typed
    s = settings_from(given(args), "the command line", settings_from(preset, f"--preset {args.preset}"))
    device = device_and_dtype(args, con)
    paths = pair_paths(args.pairs, "fit") + pair_paths(args.val or [], "--val")
    ckpt = checkpoint_path(args)
    check_file(ckpt, ".safetensors checkpoint")
    args.labelmap = find_labelmap(paths[1::2], args.labelmap)
    reads = {ckpt: "checkpoint", **{p: "image or mask" for p in paths}, **({args.labelmap: "labelmap"} if args.labelmap else {})}
    check_plan(reads, [(args.output, "emb.pt")])
    if os.path.isfile(args.output) and not is_embeddings(args.output):  # a file fit did not write: the user's
        raise SlimeError(f"{args.output} exists and is not a slime emb.pt; fit would replace it: remove it or "
                         "choose another -o")
    # the plan's only write, after every check: a refused fit leaves nothing behind
    created = make_folders([(args.output, "emb.pt")])
    # the lock beside emb.pt and named after it: two fits into one folder with different -o may run side by side
    folder, name = os.path.split(os.path.abspath(args.output))
    try:
        return s, device, ckpt, created, lock(os.path.join(folder, f".{name}.lock"), args.output)
    except SlimeError:
        remove_empty(created)
        raise


def pair_paths(paths, what):
    """[img, mask, img, mask, ...], checked to be pairs of files."""
    if len(paths) % 2:
        raise SlimeError(f"{what} takes image/mask pairs, but got an odd number of paths ({len(paths)}): "
                         f"{paths[-1]} has no partner")
    for image, mask in zip(paths[0::2], paths[1::2]):
        check_file(image, "image")
        check_file(mask, "mask")
    return paths


def read_pairs(paths, labelmap=None):
    """[img, mask, img, mask, ...] -> ([(image, labels, mask path)], palette, the labelmap's names or None),
    masks checked against images. One colour mapping for all the masks: the labelmap's, if any."""
    images = [read_image(p) for p in paths[0::2]]
    names, colors = read_labelmap(labelmap) if labelmap else (None, None)
    labels, palette = colors_to_labels([read_mask(p, colors=bool(labelmap)) for p in paths[1::2]], colors, paths[1::2],
                                       str(labelmap) if labelmap else "the palette")
    for img, m, ip, mp in zip(images, labels, paths[0::2], paths[1::2]):
        if tuple(m.shape) != tuple(img.shape[1:]):
            raise SlimeError(f"{mp} is {m.shape[1]}x{m.shape[0]} but its image {ip} is "
                             f"{img.shape[2]}x{img.shape[1]}; a mask must have its image's size")
    return list(zip(images, labels, paths[1::2])), colors or palette, names


def check_classes(pairs, train, parts, palette, con, names=None, labelmap=None):
    """The class count, and every mask value within it: -> the part names (background first).
    names: the labelmap's, which --parts may repeat but not contradict."""
    if names and parts and part_names(parts, "--parts") != names:
        raise SlimeError(f"--parts {parts} differs from the labels of {labelmap} ({','.join(names)}); leave --parts "
                         "out: the labelmap names the parts")
    # IGNORE is no class: a mask of 0 and 255 alone holds only background
    top = max(int(m[m != IGNORE].max(initial=0)) for _, m, _ in pairs)
    num_classes = len(names or (part_names(parts, "--parts") if parts else [])) or top + 1  # before any list of it
    if num_classes > MAX_CLASSES:
        raise SlimeError(f"{num_classes} classes are more than SD's 77 tokens allow (background + 76 parts)")
    parts = names or (part_names(parts, "--parts") if parts else default_parts(top + 1))
    for _, m, path in pairs:
        bad = sorted(set(np.unique(m).tolist()) - set(range(len(parts))) - {IGNORE})
        if bad and palette is not None and not names:  # colour masks: more colours than --parts names
            raise SlimeError(f"the colour masks hold {len(palette)} colours (black included) but --parts names "
                             f"{len(parts)} classes; the {len(palette) - len(parts)} unknown colours are usually "
                             "anti-aliased edges, so save the masks without anti-aliasing or as indexed PNGs")
        if bad:
            raise SlimeError(f"{path} has class values {bad[:8]} outside 0..{len(parts) - 1} "
                             f"for the {len(parts)} parts {parts} (255 means ignore)")
    if len(parts) < 2 or top == 0:
        raise SlimeError(f"{pairs[0][2]} holds only background (class 0); nothing to learn")
    if palette is not None and not names:  # colours sorted by value: say which became which part
        con.say("mask colours -> parts: " + ", ".join(f"{tuple(c)} {name}" for c, name in zip(palette, parts))
                + " (a labelmap.txt beside the masks, or --labelmap, would name them)")
    present = set().union(*(np.unique(m).tolist() for _, m, _ in train))
    for c in range(1, len(parts)):
        if c not in present:  # Eq. 4 gives it weight 0 and Eq. 7 a target of 0: its vector learns nothing
            con.say(f"warning: part {c} ({parts[c]}) has no pixels in any training mask; it cannot be learned")
    return parts


@dataclass
class Job:
    """One image of a predict run: where it is, where its outputs go, its ground truth, what makes it."""
    image: str
    mask: str
    overlay: str
    gt: str = None
    made_by: str = ""  # a hash of the embeddings, parts, settings, checkpoint and the image's bytes
    done: bool = False  # both outputs exist and were made by exactly that


def plan_predict(args, con):
    """Options, embeddings, paths and outputs of a predict, checked: -> (emb, settings, device, checkpoint,
    jobs, new folders)."""
    device = device_and_dtype(args, con)
    if os.path.isdir(args.emb):
        emb = read_release_folder(args.emb, args.parts)
    elif args.parts:  # emb.pt names its parts; silently ignoring the flag would mislabel them
        raise SlimeError(f"--parts names the parts of the release's embedding folder; {args.emb} names its own")
    else:
        emb = load_embeddings(args.emb)
    s = settings_from(given(args), "the command line", emb["settings"])
    # the output folder is a CVAT "Segmentation mask 1.1" annotation of the images (see README, Labelling tools)
    jobs = [Job(p, *(os.path.join(args.out, folder, os.path.splitext(os.path.basename(p))[0] + ".png")
                     for folder in ("SegmentationClass", "overlays"))) for p in list_images(args.inputs, con)]
    ckpt = checkpoint_path(args)
    check_checkpoint_fits(emb, ckpt, args.emb)  # from the header: a wrong file costs no load
    labelmap = find_ground_truth(jobs, args.masks, emb, con, args.labelmap)
    reads = {**{j.image: "image" for j in jobs}, **{j.gt: "ground-truth mask" for j in jobs if j.gt},
             ckpt: "checkpoint", args.emb: "embeddings", **({labelmap: "labelmap"} if labelmap else {})}
    writes = [(j.mask, f"mask of {j.image}") for j in jobs] + [(j.overlay, f"overlay of {j.image}") for j in jobs]
    # masks written into --masks would be scored as ground truth; into an input folder, read as images
    guarded = [(args.masks, "the ground-truth folder", True)] if args.masks else []
    guarded += [(folder, "a folder of input images", False)
                for folder in {p if os.path.isdir(p) else os.path.dirname(p) or "." for p in args.inputs}]
    # the run's own files pass the same checks as the masks: a summary.json onto an input is refused too
    writes += [(os.path.join(args.out, name), what) for name, what in RUN_FILES.items()]
    check_plan(reads, writes, guarded)
    check_made_by(jobs, emb, s, ckpt, device, args)
    created = make_folders(writes)  # the plan's only write: after every check
    return emb, s, device, ckpt, jobs, created


# What predict writes once per run beside the masks, and how each begins when slime wrote it: a file
# that begins otherwise is the user's, and predict neither replaces nor removes it.
RUN_FILES = {"labelmap.txt": "labelmap", os.path.join("ImageSets", "Segmentation", "default.txt"): "image list",
             "summary.json": "summary", "metrics.csv": "IoU table"}
RUN_FILE_START = {"labelmap.txt": LABELMAP_HEADER + "\n# written by slime", "summary.json": '{\n  "written_by": "slime',
                  "metrics.csv": "part,iou\n"}


def list_images(inputs, con):
    """Folders and files -> image paths (sorted per folder, each file once, each checked not to be empty);
    non-image files in folders are named and skipped."""
    found, skipped = {}, []
    for p in inputs:
        if os.path.isdir(p):
            for f in sorted(os.listdir(p)):
                full = os.path.join(p, f)
                if os.path.isfile(full) and not f.startswith("."):  # hidden: .DS_Store, temp files
                    found.setdefault(file_key(full), full) if f.lower().endswith(IMAGE_EXTS) else skipped.append(full)
        elif os.path.isfile(p):
            found.setdefault(file_key(p), p)  # the same image named twice is segmented once
        else:
            raise SlimeError(f"{p}: no such file or folder")
    names = ", ".join(os.path.basename(f) for f in skipped[:5])
    if not found:
        raise SlimeError(f"{', '.join(inputs)} holds no images ({', '.join(IMAGE_EXTS)})"
                         + (f"; skipped {names}" if skipped else ""))
    if skipped:
        con.say(f"skipped {count(len(skipped), 'non-image file')}: {names}")
    for path in found.values():
        check_file(path, "image")
    return list(found.values())


def check_checkpoint_fits(emb, ckpt, name):
    """The checkpoint (from its header alone) is of the embeddings' family and text width."""
    family, modules, _, _ = read_header(ckpt)
    width = modules[UNET_PREFIX].cfg.context_dim
    if emb["family"] != family:
        raise SlimeError(f"{name} was fitted on an {emb['family']} checkpoint but {ckpt} is {family}; "
                         "predict with the checkpoint the embeddings were fitted on")
    # a width mismatch would otherwise fail inside the first UNet pass, after the load
    if emb["learned"].shape[1] != width:
        raise SlimeError(f"{name} holds {emb['learned'].shape[1]}-wide vectors but {ckpt} has {width}-wide text")


def find_ground_truth(jobs, masks, emb, con, labelmap=None):
    """With --masks: each image's ground truth (by file stem), lossless, of the image's size as shown,
    holding only the parts' classes. Read now, so a bad mask stops the run before any work.
    Returns the labelmap.txt that names the ground truth's colours (find_labelmap), or None."""
    if masks and not os.path.isdir(masks):
        raise SlimeError(f"--masks {masks}: no such folder; give the folder of ground-truth masks")
    for job in jobs if masks else []:
        stem = os.path.splitext(os.path.basename(job.mask))[0]
        job.gt = next((os.path.join(masks, stem + ext) for ext in MASK_EXTS
                       if os.path.isfile(os.path.join(masks, stem + ext))), None)
        if not job.gt:
            con.say(f"warning: no mask for {job.image} in {masks}; not scored")
        elif file_key(job.gt) == file_key(job.image):  # --masks is the image folder: same stems
            raise SlimeError(f"--masks {masks}: the mask found for {job.image} is the image itself; "
                             "keep the ground-truth masks in a folder of their own")
    scored = [job for job in jobs if job.gt]
    if masks and not scored:  # an IoU table of nothing would read as a score of 0
        raise SlimeError(f"--masks {masks} holds no mask for any of the {count(len(jobs), 'image')} (a mask is "
                         "found by its image's file stem, e.g. photo.jpg -> photo.png)")
    labelmap = find_labelmap([job.gt for job in scored], labelmap) if scored else None
    if labelmap:  # a labelling tool's export: its colours, in its order, which must be emb.pt's parts
        names, emb["gt_colors"] = read_labelmap(labelmap)
        emb["gt_labelmap"] = True  # indexed masks are read by colour too
        if names != emb["parts"]:
            raise SlimeError(f"{labelmap} names the labels {','.join(names)}, but the embeddings' parts are "
                             f"{','.join(emb['parts'])}; score with the labelmap the embeddings were fitted with")
    elif scored and not emb["colors"]:
        # fit saw label (or VOC) masks: colour ground truth gets ONE colour -> class mapping for the whole
        # folder, as fit gives its masks; mapped one by one, a class absent from a mask would shift the rest
        keys = [(job.gt, np.unique(pack_rgb(m))) for job in scored if (m := read_mask(job.gt)).ndim == 3]
        emb["gt_colors"] = mask_palette([k for _, k in keys], [n for n, _ in keys])[1] if keys else None
    for job in scored:
        gt = ground_truth(job, emb)
        h, w = shown_size(job.image)
        if gt.shape != (h, w):
            raise SlimeError(f"{job.gt} is {gt.shape[1]}x{gt.shape[0]} but its image {job.image} is {w}x{h}; "
                             "a mask must have its image's size")
        bad = sorted(set(np.unique(gt).tolist()) - set(range(len(emb["parts"]))) - {IGNORE})
        if bad:
            raise SlimeError(f"{job.gt} has class values {bad[:8]} outside 0..{len(emb['parts']) - 1} for the "
                             f"parts {emb['parts']} (255 means ignore)")
    return labelmap


def shown_size(path):
    """(height, width) of an image file as shown, from its header: EXIF orientations 5-8 swap the sides."""
    # the header only: the plan checks every ground truth's size without decoding a folder of photos
    with Image.open(path) as im:
        return im.size if im.getexif().get(0x0112) in (5, 6, 7, 8) else im.size[::-1]


def windows_of(sizes, s):
    """How many windows --window cuts images of these (height, width) sizes into: their UNet passes."""
    return sum(len(window_layout(h, w, s.window)[2]) for h, w in sizes)


def ground_truth(job, emb):
    """A ground-truth mask as labels, its colours mapped as fit mapped the training masks'."""
    palette = emb.get("gt_colors") or emb["colors"] or None
    (gt,), _ = colors_to_labels([read_mask(job.gt, colors=emb.get("gt_labelmap", False))], palette, [job.gt])
    return gt


def check_made_by(jobs, emb, s, ckpt, device, args):
    """Which images are done (both outputs made by this very emb.pt, settings, checkpoint, number format
    and image), and a refusal when anything else is in the way: files slime did not make, always;
    outputs of another run, unless --overwrite."""
    # everything a mask depends on: the vectors and emb.pt's full context, the parts, every setting, the
    # weights (the file's SHA-256, computed once per file), device and dtype; each image's bytes below
    run = hashlib.sha256()
    for tensor in (emb["learned"], emb.get("context", torch.zeros(0))):
        run.update(tensor.float().numpy().tobytes())
    # device type and dtype too: they move near-tie pixels, so masks made with others are not this run's
    run.update(json.dumps([emb["parts"], part_colors(emb), recorded(s), file_sha256(ckpt), device[0].type,
                           str(device[1])]).encode())
    foreign = []
    for job in jobs:
        h = run.copy()
        # the image's bytes, not its name or mtime: an edited photo is redone, a copied one is not
        with open(job.image, "rb") as f:
            h.update(f.read())
        job.made_by = h.hexdigest()[:16]  # 64 bits: no accidental match in any folder of photos
        marks = {p: made_by_of(p) if os.path.exists(p) else "absent" for p in (job.mask, job.overlay)}
        for path, mark in marks.items():
            if mark is None:  # the user's own file, e.g. a photo named like an output
                raise SlimeError(f"{path} exists and was not made by slime; predict will not replace it: move it "
                                 "or choose another -o")
        job.done = list(marks.values()) == [job.made_by] * 2 and not args.overwrite
        # a pair this configuration left half-done (a kill between the renames) is simply redone
        if not args.overwrite and any(m not in ("absent", job.made_by) for m in marks.values()):
            foreign.append(os.path.basename(job.image))
    for name in RUN_FILES:
        path = os.path.join(args.out, name)
        if os.path.isfile(path) and not run_file_is_slimes(args.out, name):
            raise SlimeError(f"{path} exists and was not written by slime; predict will not replace or remove it: "
                             "move it or choose another -o")
    if foreign:
        raise SlimeError(f"{args.out} already holds outputs for {count(len(foreign), 'image')} ({', '.join(foreign[:3])}"
                         f"{' ...' if len(foreign) > 3 else ''}) made by another emb.pt, other settings or another "
                         "version of the image; pass --overwrite to replace them, or choose another -o")


def run_file_is_slimes(out, name):
    """Whether out/name begins as slime writes it; the image list (no room for a mark) goes with the labelmap."""
    start = RUN_FILE_START.get(name)
    if start is None:
        return run_file_is_slimes(out, "labelmap.txt")
    try:
        with open(os.path.join(out, name), "rb") as f:
            return f.read(len(start.encode())) == start.encode()
    except OSError:
        return False


def given(args):
    """The settings given on the command line ({} for the ones left out)."""
    return {f.name: getattr(args, f.name) for f in fields(Settings) if getattr(args, f.name, None) is not None}


def count(n, noun):
    return f"{n} {noun}{'' if n == 1 else 's'}"


# ----------------------------------------------------------------------------- command line
HERE = os.path.dirname(os.path.abspath(__file__))


class Console:
    """What the user reads on stderr: whole lines, and one progress line that updates in place on a
    terminal (a notice first ends it, so nothing is glued to it; in a log it prints every 10 s)."""

    def __init__(self, quiet):
        self.quiet, self.open, self.shown, self.t0 = quiet, False, 0.0, time.time()

    def say(self, msg):
        if not self.quiet:
            self.end()
            print(msg, file=sys.stderr, flush=True)

    def end(self):
        if self.open:
            sys.stderr.write("\n")
            self.open = False

    def progress(self, what, step, total, detail="", eta=None, every=10):
        """One progress line: in place on a terminal; in a log, a whole line at most every `every` s."""
        if self.quiet:
            return
        elapsed = time.time() - self.t0
        line = f"{what}  {detail}  {duration(elapsed)} elapsed" + (f", ETA {duration(eta)}" if eta is not None else "")
        if sys.stderr.isatty():
            sys.stderr.write(f"\r{line}\x1b[K")  # \x1b[K clears what a longer line left behind
            self.open = True
        elif time.time() - self.shown >= every or step == total:
            print(line, file=sys.stderr)
            self.shown = time.time()
        sys.stderr.flush()


def load_for(args, con, ckpt, device, text_encoder=True):
    device, dtype = device
    sd = load_models(ckpt, device=device, dtype=dtype, text_encoder=text_encoder)
    if not con.quiet:  # the first hash of a 5 GB file takes seconds: only for a line someone reads
        con.say(f"weights: {sd.path}: {known_file(sd.path, sd.family)}")
    con.say(f"loaded {sd.family} on {device} ({str(dtype)[6:]})")
    return sd


def cmd_fit(args, con):
    """Plan; read and check the data; load; fit, saving emb.pt at each new best."""
    s, device, ckpt, created, release = plan_fit(args, con)
    with work(created, release):
        pairs, palette, names = read_pairs(args.pairs + (args.val or []), args.labelmap)  # one colour mapping
        train, val = pairs[:len(args.pairs) // 2], pairs[len(args.pairs) // 2:]
        # after reading, before loading: a bad mask costs seconds, not the checkpoint's load
        parts = check_classes(train + val, train, args.parts, palette, con, names, args.labelmap)
        if os.path.exists(args.output):
            con.say(f"{args.output} exists; the first validation of this run replaces it")
        sd = load_for(args, con, ckpt, device)
        con.say(f"fitting {count(len(parts) - 1, 'part')} {parts[1:]} on {count(len(train), 'image')}, "
                f"{count(s.epochs, 'epoch')} of {count(len(train), 'step')}, "
                f"{count(validations(s.epochs, s.val_every), 'validation')}")

        def on_best(context, epoch, miou):
            save_embeddings(args.output, context, parts, sd, s, palette, epoch, miou)
            con.say(f"epoch {epoch}: validation mIoU {miou:.4f}, the best so far: saved {args.output}")
        if s.window:  # fit takes its views at predict's scale from the pairs as they are (native_view)
            con.say(f"--window {s.window}: training views of {s.window} px; each validation segments "
                    f"{count(windows_of([i.shape[1:] for i, _, _ in val or train], s), 'window')}")
        fit(sd, [(i, m) for i, m, _ in train], len(parts), s, [(i, m) for i, m, _ in val] or None, on_best,
            FitProgress(con, s, len(train)))


def validations(epochs, every):
    """How many validations a fit makes: every `every` epochs, and always after the last."""
    return epochs // every + (epochs % every > 0)


class FitProgress:
    """fit's progress hook for the console: the progress line, with an ETA that counts the validations
    still to come at the time the last ones took, and an estimate of the whole fit once both are measured."""

    def __init__(self, con, s, steps_per_epoch):
        self.con, self.s, self.last, self.estimated = con, s, time.time(), False
        self.steps, self.vals = s.epochs * steps_per_epoch, validations(s.epochs, s.val_every)
        self.times = {"step": [], "validation": []}  # seconds each took

    def __call__(self, e):
        now = time.time()
        self.times[e["event"]].append(now - self.last)
        self.last = now
        step_t, val_t = (sum(t) / len(t) if t else None for t in self.times.values())
        steps_left, vals_left = self.steps - len(self.times["step"]), self.vals - len(self.times["validation"])
        # before the first validation its cost is unknown: no ETA rather than one that leaves it out
        eta = steps_left * step_t + vals_left * val_t if val_t is not None or not vals_left else None
        if e["event"] == "step":
            terms = "  ".join(f"{k} {e[k]:.4f}" for k in ("ce", "mse", "sd"))
            self.con.progress(f"epoch {e['epoch']}/{e['epochs']}", e["step"], e["steps"],
                              f"step {e['step']}/{e['steps']}  {terms}", eta=eta)
        elif not self.estimated and vals_left:  # once, when a step and a validation have been timed
            self.estimated = True
            total = lambda every: self.steps * step_t + validations(self.s.epochs, every) * val_t  # noqa: E731
            tip = f"; --val-every 10 would make it {duration(total(10))}" if self.s.val_every < 10 else ""
            self.con.say(f"estimate: {count(self.steps, 'step')} x {step_t:.1f} s + {count(self.vals, 'validation')}"
                         f" x {val_t:.1f} s = {duration(total(self.s.val_every))}{tip}")


def time_left(t0, done, total):
    """Seconds until `total` items are done, at the pace of the `done` ones since t0; None before the first."""
    return (time.time() - t0) / done * (total - done) if done else None


def duration(seconds):
    """12 s, 7.5 min, 3.2 h."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def cmd_predict(args, con):
    """Plan (on every rank, agreed); segment this rank's images not done yet; rank 0 reports for all."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():  # torchrun: nccl on GPUs, gloo on CPUs
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    con.quiet = con.quiet or rank > 0  # rank 0 speaks for all
    error, release, created = None, lambda: None, []
    try:  # every rank plans (the same files give the same plan); only rank 0 holds the folder's lock
        emb, s, device, ckpt, jobs, created = plan_predict(args, con)
        release = lock(os.path.join(args.out, ".slime.lock"), args.out) if rank == 0 else release
    except SlimeError as e:
        error = str(e)
    if world > 1:  # every rank stops when any rank's plan failed, or rank 0 found the folder locked
        errors = [None] * world
        torch.distributed.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        release()
        remove_empty(created if rank == 0 else [])  # rank 0 alone: the others' folders are the same ones
        raise SlimeError(error)
    with work(created, release):
        # round robin: each rank takes every world-th image; n keeps the order rank 0 reports in
        records, wrote = segment_jobs(args, con, emb, s, device, ckpt, list(enumerate(jobs, 1))[rank::world],
                                      len(jobs))
    if world > 1:  # every rank's records to rank 0, in image order, so it writes what one process would
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, (records, wrote))
        records = sorted(sum((g[0] for g in gathered), []), key=lambda r: r["n"])
        wrote = sum(g[1] for g in gathered)
        torch.distributed.destroy_process_group()
    if rank == 0:
        report(args, con, emb, s, records, wrote, len(jobs) - wrote)


def segment_jobs(args, con, emb, s, device, ckpt, jobs, total):
    """[(n, job)]: segment and write the images not done; score each with a ground truth.
    -> ([a summary record per image], how many were written)."""
    sd = load_for(args, con, ckpt, device, text_encoder="context" not in emb)  # a release folder needs it
    context = emb["context"] if "context" in emb else with_learned(emb["learned"], prompt_contexts(sd, len(emb["parts"]))[0])
    # a warning, not a refusal: the plan checked family and width, so the vectors fit; only the masks may differ
    if emb.get("fingerprint") not in (sd.fingerprint, None):
        con.say(f"warning: {args.emb} was fitted on other weights of the same family ({emb['fingerprint']})")
    context, parts, colors, records, wrote = context.to(sd.device), emb["parts"], part_colors(emb), [], 0
    todo_images = [job.image for _, job in jobs if not job.done]
    todo, t0 = len(todo_images), time.time()
    if s.window and todo:  # the cost grows with the windows: say so before the work
        windows, patches = windows_of(map(shown_size, todo_images), s), s.patches_per_side ** 2 * todo
        con.say(f"--window {s.window}: {count(windows, 'window')} in {count(todo, 'image')}, one UNet pass "
                f"each{', plus the squashed images' if s.with_whole else ''}; without --window, {patches}: "
                f"expect about {windows / patches + s.with_whole:.1f}x the time")
    for n, job in jobs:
        if job.done:  # its mask is read back, so the IoU table and the summary cover every image
            labels = torch.from_numpy(np.array(Image.open(job.mask)))
        else:
            con.progress(f"image {n}/{total}", n, total, os.path.basename(job.image), eta=time_left(t0, wrote, todo),
                         every=0)
            labels = segment_and_write(sd, context, job, s, parts, colors, con, f"image {n}/{total}")
            wrote += 1
        records.append(image_record(n, job, labels, parts, emb))
    con.end()
    return records, wrote



def segment_and_write(sd, context, job, s, parts, colors, con, what):
    """Segment one image (showing its windows' progress, if it has several) and write its mask and its
    overlay, both or neither. -> labels (H, W)."""
    image = read_image(job.image)
    if max(image.shape[1:]) > 4 * SIZE and not s.window:
        con.say(f"{job.image} is {image.shape[2]}x{image.shape[1]}: segmented at {SIZE}x{SIZE} like every "
                "image, its class scores upsampled to full size in bands of rows")
    windows, name = Console(con.quiet), os.path.basename(job.image)  # its own clock: the windows' ETA

    def on_window(i, n):
        if n > 1:
            windows.progress(f"{what} window {i}/{n}", i, n, name, eta=time_left(windows.t0, i, n))
    try:
        labels = segment(sd, context, image, len(parts), s, progress=on_window)
    except SlimeError as e:
        raise SlimeError(f"{job.image}: {e}") from None
    # --out-size 512 masks are drawn on the image resized to them; otherwise on the image itself
    shown = image if tuple(image.shape[1:]) == tuple(labels.shape) else resize(image, tuple(labels.shape), "bilinear")
    # both or neither: check_made_by counts an image done only when its mask and overlay carry the same hash
    commit({job.mask: png_writer(mask_image(labels.numpy(), colors), job.made_by),
            job.overlay: png_writer(overlay_image(shown, labels.numpy(), parts, colors), job.made_by)})
    return labels


def image_record(n, job, labels, parts, emb):
    """summary.json's entry for one image: its size, each part's area in pixels, and its IoUs with a ground truth."""
    area = np.bincount(labels.numpy().ravel(), minlength=len(parts))
    record = dict(n=n, image=job.image, mask=job.mask, overlay=job.overlay, written=not job.done,
                  width=labels.shape[1], height=labels.shape[0], area={name: int(a) for name, a in zip(parts, area)})
    if job.gt:  # at the mask's size: the image's own, or 512 (the release nearest-resizes its GT too)
        gt = resize(torch.from_numpy(ground_truth(job, emb))[None], tuple(labels.shape), "nearest")[0]
        record.update(ground_truth=job.gt, iou=iou_per_class(labels, gt, len(parts)))
    return record

def report(args, con, emb, s, records, wrote, skipped):
    """The IoU table (with --masks), the run's files (labelmap, image list, summary, IoU table) and the
    last line: what was written, what was skipped, and why."""
    parts, out = emb["parts"], args.out
    scored = [r["iou"] for r in records if "iou" in r]
    per_class, miou = miou_table(scored, len(parts))
    rows = [(name, v) for name, v in zip(parts, per_class) if v is not None]
    summary = {"written_by": "slime predict", "embeddings": args.emb, "settings": asdict(s),
               "parts": [dict(index=i, name=name, color=c) for i, (name, c) in enumerate(zip(parts, part_colors(emb)))],
               "images": [{**{k: v for k, v in r.items() if k not in ("n", "iou")},
                           **({"iou": {parts[c]: v for c, v in r["iou"].items()}} if "iou" in r else {})}
                          for r in records],
               "iou": dict(rows) if rows else None, "miou": miou if rows else None}
    files = {"labelmap.txt": labelmap_text(parts, part_colors(emb)),
             os.path.join("ImageSets", "Segmentation", "default.txt"):
                 "".join(os.path.splitext(os.path.basename(r["mask"]))[0] + "\n" for r in records),
             "summary.json": json.dumps(summary, indent=2) + "\n"}
    metrics = os.path.join(out, "metrics.csv")
    if args.masks and rows:
        # on stdout, unlike every notice on stderr: the table is the result, and -q keeps it
        print(f"{'part':<16} IoU\n" + "".join(f"{name:<16} {v:.4f}\n" for name, v in rows)
              + f"{'mIoU':<16} {miou:.4f}   ({count(len(scored), 'image')})")
        files["metrics.csv"] = "part,iou\n" + "".join(f"{n},{v:.6f}\n" for n, v in rows) + f"mIoU,{miou:.6f}\n"
    else:
        if args.masks:  # every ground-truth pixel is 255: a table would read as a score of 0
            con.say("nothing was scored: every ground-truth mask is all 'ignore' (255); no IoU table")
        if wrote and os.path.exists(metrics):  # slime's own (the plan checked): it scored replaced masks
            os.remove(metrics)
            con.say(f"removed {metrics}: it scored the masks this run replaced (pass --masks to score them)")
    commit({os.path.join(out, name): text_writer(text) for name, text in files.items()})  # all of them, or none
    con.say(f"wrote masks and overlays of {count(wrote, 'image')} to {out}" + (
        f"; skipped {skipped}, already made by this emb.pt with these settings (--overwrite redoes them)"
        if skipped else ""))


def cmd_info(args, con):
    """What a checkpoint is, from its header alone (no tensor is read), and its SHA-256 against KNOWN_FILES."""
    family, modules, shapes, dtypes = read_header(args.file)
    used = sum(len(m.state_dict()) for m in modules.values())
    digest = file_sha256(args.file)
    print(f"file      {args.file} ({os.path.getsize(args.file):,} bytes)\n"
          f"family    {family} (Stable Diffusion {family[-1]}.x; {'CLIP ViT-L/14' if family == 'sd1' else 'OpenCLIP ViT-H/14'}"
          f" text encoder, context width {modules[UNET_PREFIX].cfg.context_dim})\n"
          f"tensors   {len(shapes)} ({', '.join(sorted(set(dtypes.values())))}), "
          f"{sum(math.prod(v) for v in shapes.values()):,} values; "
          f"slime loads {used}, does not need the other {len(shapes) - used} (VAE decoder, schedule...)\n"
          f"sha256    {digest}\n"
          f"known     {KNOWN_FILES.get(digest, 'no: not a release file slime knows (a fine-tune or a re-save?)')}")


class Parser(argparse.ArgumentParser):
    """argparse, with its mistakes ending like every other: one line `slime: error: ...`, exit status 2
    (argparse's own error() prints the whole usage first)."""

    def error(self, message):
        raise SlimeError(f"{self.prog}: {message}")


def add_settings(p, stage):
    """One flag per field of Settings (the fit ones only for fit), its default and range from the field."""
    for f in fields(Settings):
        m = f.metadata
        if stage == "predict" and m["stage"] == "fit":
            continue
        default = f"emb.pt's (fit's default: {f.default})" if stage == "predict" else f.default
        flag = m["flag"] or "--" + f.name.replace("_", "-")
        if m["check"] is boolean:
            # a switch flips the default; left out it is None, so given() leaves emb.pt's value in place
            p.add_argument(flag, dest=f.name, action="store_const", const=not f.default, help=m["help"])
        else:
            # type=the setting's check: a typed value meets the same parser as emb.pt's (settings_from)
            p.add_argument(flag, dest=f.name, type=m["check"], metavar=f.name.upper(),
                           help=f"{m['help']}; default {default}")


def build_parser():
    ap = Parser(prog="slime.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p, stage):
        p.add_argument("--ckpt", help="SD checkpoint (.safetensors); default: the one file in weights/")
        p.add_argument("--device", help="cpu, cuda, cuda:N or mps; default: cuda when present, else cpu")
        p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="number format (default: fp32, as the release; bf16 or fp16 save GPU memory)")
        p.add_argument("--threads", type=number(int, 1, 1024), help="CPU threads per process; default: torch's, all "
                       "cores (torchrun: 1 per rank). Sums split over threads round differently: give one process "
                       "and torchrun the same --threads for byte-identical masks")
        p.add_argument("-q", "--quiet", action="store_true", help="print only errors (and predict's IoU table)")
        add_settings(p, stage)

    f = sub.add_parser("fit", help="learn part embeddings from annotated images",
                       description="Learn one text vector per part from image/mask pairs and write them to emb.pt "
                                   "(at each new best validation). Masks: class labels (gray or indexed PNG, .npy; "
                                   "255 = ignore) or colours, named by a labelmap.txt (CVAT, VOC) when there is one. "
                                   "Example: `python slime.py fit ref.png ref_mask.png --parts background,body,wheel`.")
    f.add_argument("pairs", nargs="+", metavar="IMAGE MASK", help="one or more image/mask pairs")
    f.add_argument("--parts", help="comma-separated class names, background first; default background,part1,...")
    f.add_argument("-o", "--output", default="emb.pt", help="where the best embeddings go; default emb.pt")
    f.add_argument("--val", nargs="+", metavar="IMAGE MASK", help="validation pairs; default: the training pairs")
    f.add_argument("--preset", choices=sorted(PRESETS), help="the release README's per-dataset settings")
    f.add_argument("--labelmap", help="labelmap.txt naming the mask colours (CVAT, VOC); default: one beside the "
                                      "masks, or at the export's root above SegmentationClass/")
    common(f, "fit")
    f.set_defaults(run=cmd_fit)

    p = sub.add_parser("predict", help="segment images with fitted embeddings",
                       description="Segment images with emb.pt into a folder CVAT imports as a segmentation-mask "
                                   "annotation (SegmentationClass/, labelmap.txt, ImageSets/), with overlays/ and "
                                   "summary.json. Settings not given here are the ones fit stored in emb.pt. "
                                   "Example: `python slime.py predict emb.pt photos/ -o out/`.")
    p.add_argument("emb", help="emb.pt written by fit, or the release's folder of embedding_{i}.pth")
    p.add_argument("inputs", nargs="+", help="image files and/or folders")
    p.add_argument("--parts", help="class names for a release folder, background first; default background,part1,...")
    p.add_argument("-o", "--out", default="out", help="output folder; default out")
    p.add_argument("--masks", help="folder of ground-truth masks (by file stem): print and save per-part IoU")
    p.add_argument("--overwrite", action="store_true", help="replace outputs made by anything else, and redo all")
    p.add_argument("--labelmap", help="labelmap.txt naming the colours of --masks; default: one beside them, or "
                                      "at the export's root above SegmentationClass/")
    common(p, "predict")
    p.set_defaults(run=cmd_predict)

    i = sub.add_parser("info", help="what a checkpoint is: family, dtype, tensors, SHA-256, known release file",
                       description="Read a checkpoint's header (no tensor is loaded) and print its family, dtypes, "
                                   "tensor count and SHA-256, and whether it is a release file slime knows. "
                                   "Example: `python slime.py info weights/v2-1_512-ema-pruned.safetensors`.")
    i.add_argument("file", help="a .safetensors checkpoint")
    # info has no -q, but main's Console reads the attribute
    i.set_defaults(run=cmd_info, quiet=False)
    return ap


def interrupt(signum, frame):
    raise KeyboardInterrupt(signum)  # SIGTERM and SIGHUP end a run as Ctrl-C does


def main(argv=None):
    # CPU: fp32 values below 1.2e-38 become 0. exp() of sharply peaked attention underflows into such
    # denormals, which x86 computes slowly: fit took 2.4x as long on a sharp variant of the SD-like test model.
    torch.set_flush_denormal(True)
    speak = int(os.environ.get("RANK", "0")) == 0  # under torchrun rank 0 speaks for all
    try:
        args = build_parser().parse_args(argv)
        args.run(args, Console(args.quiet))
    except SlimeError as e:
        print(f"slime: error: {e}", file=sys.stderr) if speak else None
        return 2
    except KeyboardInterrupt as e:
        signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
        print(f"\nslime: interrupted by {signal.Signals(signum).name}; finished outputs are kept, nothing is "
              "left half-written", file=sys.stderr) if speak else None
        return 128 + signum
    # not a SlimeError: it arises deep in torch, and one line with the remedies serves better than its traceback
    except torch.cuda.OutOfMemoryError:
        print("slime: error: the GPU ran out of memory; try --dtype bf16, fewer or smaller patches "
              "(--patches-per-side 1 --patch-size 512), or --device cpu", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # only when run as a program: importing slime leaves the caller's signal handlers alone
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), interrupt)
    sys.exit(main())
