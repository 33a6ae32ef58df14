"""Shared test fixtures: tiny random Stable Diffusion checkpoints in the real key layout.

tests/layouts/*.json are copies of the tensor names and shapes of the real release files
(v1-5-pruned-emaonly.safetensors, v2-1_512-ema-pruned.safetensors). A tiny checkpoint keeps every
one of those names and shrinks only the widths (UNet 32 or 64 channels, VAE 32, text 64), so it
goes through exactly the loading code a real file does.

Not a test file: pytest loads it for every file under tests/. The whole suite:

    python -m pytest -q tests
"""

import hashlib
import json
import math
import os
import re
import sys

import pytest
import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import slime  # noqa: E402

LAYOUTS = os.path.join(ROOT, "tests", "layouts")
LAYOUT_FILE = {"sd1": "sd15.json", "sd2": "sd21-base.json"}
TINY_UNET = {"sd1": 32, "sd2": 64}  # SD2 heads are 64 channels wide, so its UNet needs >= 64
TINY_TEXT = 64


def real_layout(family):
    with open(os.path.join(LAYOUTS, LAYOUT_FILE[family])) as f:
        return {k: tuple(v) for k, v in json.load(f).items()}


def random_tensor(key, shape, gen):
    """Every value random (nothing exactly 0 or 1), scaled like a trained network so activations
    stay sane."""
    leaf = key.rsplit(".", 1)[-1]
    x = torch.randn(shape, generator=gen)
    if "embedding" in key:
        return x * 0.02
    if len(shape) >= 2:
        return x / math.sqrt(math.prod(shape[1:]))
    return 1 + 0.05 * x if leaf == "weight" else 0.02 * x


def tiny_state_dict(family, seed=0):
    shapes = real_layout(family)
    u, v, t = slime.UNET_PREFIX, slime.VAE_PREFIX, slime.TEXT_PREFIX[family]
    shapes[u + "input_blocks.0.0.weight"] = (TINY_UNET[family], 4, 3, 3)
    shapes[u + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] = (
        TINY_UNET[family],
        TINY_TEXT,
    )
    shapes[v + "encoder.conv_in.weight"] = (32, 3, 3, 3)
    token_embedding = (
        "embeddings.token_embedding.weight" if family == "sd1" else "token_embedding.weight"
    )
    shapes[t + token_embedding] = (49408, TINY_TEXT)
    _, modules, ignored = slime.build_models(shapes)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, module in modules.items():
        for k, p in module.state_dict().items():
            state[prefix + k] = random_tensor(k, tuple(p.shape), gen)
    # A random VAE gives latents of std ~0.1 and a posterior std of ~0.2 (after x 0.18215), so the
    # sampled noise would drown the image. The real VAE gives latents of about unit std and a narrow
    # posterior: rescale quant_conv's mean half and push its logvar half down so the tiny model sees
    # the image too.
    q = v + "quant_conv."
    state[q + "weight"][:4] *= 10
    state[q + "weight"][4:] *= 0.01
    state[q + "bias"][4:] = -12.0
    for k in shapes:  # the tensors slime ignores: present, as in a real file, but small
        if k not in state:
            if k == t + "embeddings.position_ids":
                state[k] = torch.arange(77)[None]
            elif k.startswith(
                t + "transformer.resblocks."
            ):  # SD2's unused last text block, tiny width
                state[k] = torch.randn(2, generator=gen)
            else:
                state[k] = torch.randn(
                    shapes[k] if math.prod(shapes[k]) <= 1000 else (2,), generator=gen
                )
    assert set(state) == set(real_layout(family))
    return state


def state_digest(state):  # a checkpoint's identity: SHA-256 of every name and value, in name order
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode() + state[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_tiny_checkpoint(path, family, seed=0, dtype=torch.float32):
    state = {
        k: (x.to(dtype) if x.is_floating_point() else x)
        for k, x in tiny_state_dict(family, seed).items()
    }
    save_file(state, str(path), metadata={"format": "pt"})
    return str(path)


def write_sdlike_checkpoint(path, seed=0):
    """A tiny SD 2 checkpoint (real layout, tiny widths) whose attention behaves like real SD's.

    Random weights give near-uniform attention, from which no segmentation can be learned. Here the
    weights that matter are set by hand, everything else stays random:
    - VAE encoder: a pass-through (identity convs, zeroed residual branches, 2x2-average
      downsampling), so the latent is the image's colour averaged over 8x8 pixels (as SD's latent
      carries the image);
    - UNet: every residual branch and attention output zeroed, so each attention layer sees f, a
      fixed random projection of the 3x3-blurred latent, averaged down to its resolution;
    - self-attention (attn1): q = k = 2 LayerNorm(f), so pixels attend to pixels of similar colour;
    - cross-attention (attn2): q = 3 Q LayerNorm(f) with Q orthogonal per head, so a learned token's
      logit is a linear function of a pixel's colour; and <start-of-text> is the attention sink it
      is in real SD: a massive activation in its positional embedding makes its text output point
      along one dimension, norm2 gives every query the same component in 4 reserved channels, and
      to_k maps SOT onto that component, for a logit of +10 at every pixel.
    """
    state = tiny_state_dict("sd2", seed)
    g = torch.Generator().manual_seed(seed + 1)
    U, E, T = slime.UNET_PREFIX, slime.VAE_PREFIX + "encoder.", slime.TEXT_PREFIX["sd2"]

    def diagonal(w, taps):  # out channel c reads in channel c at the given kernel taps
        w, n = torch.zeros_like(w), min(w.shape[:2])
        for dy, dx in taps:
            w[torch.arange(n), torch.arange(n), dy, dx] = 1 / len(taps)
        return w

    for k, v in list(state.items()):
        if k.startswith(E):  # the VAE encoder
            if re.search(r"(conv2|proj_out)\.", k):
                state[k] = torch.zeros_like(v)
            elif re.search(r"(conv_in|conv_out|nin_shortcut)\.weight", k):
                state[k] = diagonal(v, [(v.shape[2] // 2, v.shape[3] // 2)])
            elif k.endswith("downsample.conv.weight"):
                # padded right and bottom: taps 0, 1 are pixels 2i, 2i+1
                state[k] = diagonal(v, [(0, 0), (0, 1), (1, 0), (1, 1)])
        elif k.startswith(U):
            if re.search(r"(out_layers\.3|proj_out|to_out\.0|ff\.net\.2)\.|^out\.2\.", k[len(U) :]):
                state[k] = torch.zeros_like(v)
            elif k.endswith(
                "input_blocks.0.0.weight"
            ):  # f = R latent, blurred 3x3; channels 60-63 reserved
                R = torch.randn(v.shape[0], 4, generator=g)
                R[torch.arange(v.shape[0]) % 64 >= 60] = 0
                state[k] = R[:, :, None, None].expand(v.shape) / 9
            elif k.endswith(
                "skip_connection.weight"
            ):  # take f from the last 64 input channels (the skip)
                w = torch.zeros(v.shape[:2])
                w[torch.arange(len(w)), v.shape[1] - 64 + torch.arange(len(w)) % 64] = 1
                state[k] = w.view(v.shape)
            elif k.endswith("op.weight"):  # Downsample: the 2x2 average
                state[k] = diagonal(v, [(1, 1), (1, 2), (2, 1), (2, 2)])
            elif re.search(r"output_blocks\.\d+\.\d\.conv\.weight", k):  # Upsample: nearest, as is
                state[k] = diagonal(v, [(1, 1)])
            elif re.search(r"attn1\.to_[qk]\.weight", k):
                state[k] = 2 * torch.eye(len(v))
            elif k.endswith("attn2.to_q.weight"):
                state[k] = 3 * torch.block_diag(
                    *[
                        torch.linalg.qr(torch.randn(64, 64, generator=g))[0]
                        for _ in range(len(v) // 64)
                    ]
                )
            elif k.endswith("norm2.weight"):
                reserved = torch.arange(len(v)) % 64 >= 60
                shared = torch.randn(4, generator=g).repeat(len(v) // 64) * 0.5
                state[k] = (~reserved).float()
                state[k.replace("weight", "bias")] = torch.zeros(len(v)).masked_scatter(
                    reserved, shared
                )
    q = (
        slime.VAE_PREFIX + "quant_conv."
    )  # latent = 8 x colour (about unit std after x 0.18215), logvar -12
    state[q + "weight"] = (
        8 * torch.eye(8)[:, :, None, None] * (torch.arange(8) < 4)[:, None, None, None]
    )
    state[q + "bias"] = torch.tensor([0.0] * 4 + [-12.0] * 4)
    state[E + "conv_out.bias"] = torch.tensor([0.0] * 4 + [-30.0] * 4)
    state[T + "positional_embedding"][0, 5] = 100.0  # SOT's massive activation
    save_file(state, str(path))
    sot = slime.prompt_contexts(slime.load_models(str(path)), 2)[0][
        0, 0
    ]  # the text encoder's SOT output
    for k in [k for k in state if k.endswith("attn2.to_k.weight")]:
        u = (
            state[k.replace("attn2.to_k", "attn2.to_q")]
            @ state[k.replace("attn2.to_k.weight", "norm2.bias")]
        )
        target = torch.cat(
            [10 * uh / uh.norm() ** 2 * 8 for uh in u.split(64)]
        )  # (q . k) / sqrt(64) = 10
        state[k] = state[k] + torch.outer(target - state[k] @ sot, sot) / sot.norm() ** 2
    save_file(state, str(path), metadata={"format": "pt"})
    return str(path)


# For a subprocess to print its own peak resident memory ("VmHWM:  123 kB"). Not ru_maxrss: Linux
# carries that high-water mark across exec from the forked parent, i.e. from pytest.
PEAK_MEMORY = (
    "def peak_memory():\n"
    "    return [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].strip()\n"
)


def write_layout_only(path, family, dtype="F16"):
    """A checkpoint with the real file's full header (every name and shape) whose data is a sparse
    hole of zeros: gigabytes in size, nothing on disk, for checks that must not read the tensors."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    size = {"F16": 2, "F32": 4}[dtype]
    for k, shape in sorted(real_layout(family).items()):
        n = math.prod(shape) * size
        header[k] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)
    return str(path)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """family -> path of a tiny fp32 checkpoint (written once per test session)."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = write_tiny_checkpoint(
                tmp_path_factory.mktemp("ckpt") / f"tiny-{family}.safetensors", family
            )
        return cache[family]

    return get


@pytest.fixture(scope="session")
def sdlike_ckpt(tmp_path_factory):
    """Path of the tiny SD 2 checkpoint whose attention behaves like real SD's
    (write_sdlike_checkpoint)."""
    return write_sdlike_checkpoint(tmp_path_factory.mktemp("sdlike") / "sdlike.safetensors")


def synthetic_scene(shift=0, flip=False, size=512, seed=0):
    """An image whose three regions differ in colour and texture, and its mask
    (0 bg, 1 square, 2 disc).

    shift moves both objects right/down by that many pixels; flip mirrors the scene left-right.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    yy, xx = yy - shift, (size - 1 - xx if flip else xx) - shift
    img = np.zeros((size, size, 3), np.float32) + [0.15, 0.2, 0.7]
    img += rng.normal(0, 0.08, img.shape)
    mask = np.zeros((size, size), np.uint8)
    square = (yy > 80) & (yy < 260) & (xx > 60) & (xx < 300)
    img[square] = [0.9, 0.15, 0.1]
    img[square & ((yy // 8) % 2 == 0)] *= 0.6  # stripes
    mask[square] = 1
    disc = (yy - 370) ** 2 + (xx - 350) ** 2 < 110**2
    img[disc] = [0.1, 0.85, 0.2]
    img[disc & (((yy // 16) + (xx // 16)) % 2 == 0)] *= 0.5  # checkerboard
    mask[disc] = 2
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), mask


def synthetic_photo(h=1536, w=2048, radius=8, seed=0):
    """A big photo in synthetic_scene's colours and its mask: a large striped red rectangle (1) and
    a plain green disc of `radius` px (2; 197 px at radius 8), which the squash to 512x512 shrinks
    below a latent pixel."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = np.zeros((h, w, 3), np.float32) + [0.15, 0.2, 0.7]
    img += rng.normal(0, 0.08, img.shape)
    mask = np.zeros((h, w), np.uint8)
    large = (yy > h // 5) & (yy < h * 3 // 4) & (xx > w // 10) & (xx < w // 2)
    img[large] = [0.9, 0.15, 0.1]
    img[large & ((yy // 8) % 2 == 0)] *= 0.6  # stripes
    mask[large] = 1
    disc = (yy - h * 4 // 5) ** 2 + (xx - w * 3 // 4) ** 2 <= radius**2
    img[disc] = [0.1, 0.85, 0.2]
    mask[disc] = 2
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), mask
