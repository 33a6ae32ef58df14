"""Shared test fixtures: tiny random Stable Diffusion checkpoints in the real key layout.

tests/layouts/*.json are copies of the tensor names and shapes of the real release files
(v1-5-pruned-emaonly.safetensors, v2-1_512-ema-pruned.safetensors). A tiny checkpoint keeps every
one of those names and shrinks only the widths (UNet 32 or 64 channels, VAE 32, text 64), so it
goes through exactly the loading code a real file does.
"""
import json
import math
import os
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
    """Every value random (nothing exactly 0 or 1), scaled like a trained network so activations stay sane."""
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
    shapes[u + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] = (TINY_UNET[family], TINY_TEXT)
    shapes[v + "encoder.conv_in.weight"] = (32, 3, 3, 3)
    shapes[t + ("embeddings.token_embedding.weight" if family == "sd1" else "token_embedding.weight")] = (49408, TINY_TEXT)
    _, modules, ignored = slime.build_models(shapes)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, module in modules.items():
        for k, p in module.state_dict().items():
            state[prefix + k] = random_tensor(k, tuple(p.shape), gen)
    # A random VAE gives latents of std ~0.1 and a posterior std of ~0.2 (after x 0.18215), so the sampled
    # noise would drown the image. The real VAE gives latents of about unit std and a narrow posterior:
    # rescale quant_conv's mean half and push its logvar half down so the tiny model sees the image too.
    q = v + "quant_conv."
    state[q + "weight"][:4] *= 10
    state[q + "weight"][4:] *= 0.01
    state[q + "bias"][4:] = -12.0
    for k in shapes:  # the tensors slime ignores: present, as in a real file, but small
        if k not in state:
            if k == t + "embeddings.position_ids":
                state[k] = torch.arange(77)[None]
            elif k.startswith(t + "transformer.resblocks."):  # SD2's unused last text block, tiny width
                state[k] = torch.randn(2, generator=gen)
            else:
                state[k] = torch.randn(shapes[k] if math.prod(shapes[k]) <= 1000 else (2,), generator=gen)
    assert set(state) == set(real_layout(family))
    return state


def write_tiny_checkpoint(path, family, seed=0, dtype=torch.float32):
    state = {k: (x.to(dtype) if x.is_floating_point() else x) for k, x in tiny_state_dict(family, seed).items()}
    save_file(state, str(path), metadata={"format": "pt"})
    return str(path)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """slime remembers checkpoint SHA-256s in $XDG_CACHE_HOME; keep the tests' out of the user's cache."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))


# For a subprocess to print its own peak resident memory ("VmHWM:  123 kB"). Not ru_maxrss: Linux carries
# that high-water mark across exec from the forked parent, i.e. from pytest.
PEAK_MEMORY = "def peak_memory():\n    return [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].strip()\n"


def write_layout_only(path, family, dtype="F16"):
    """A checkpoint with the real file's full header (every name and shape) whose data is a sparse hole of
    zeros: gigabytes in size, nothing on disk, for checks that must not read the tensors."""
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
            cache[family] = write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / f"tiny-{family}.safetensors", family)
        return cache[family]
    return get


def synthetic_scene(shift=0, flip=False, size=512, seed=0):
    """An image whose three regions differ in colour and texture, and its mask (0 bg, 1 square, 2 disc).

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
    disc = (yy - 370) ** 2 + (xx - 350) ** 2 < 110 ** 2
    img[disc] = [0.1, 0.85, 0.2]
    img[disc & (((yy // 16) + (xx // 16)) % 2 == 0)] *= 0.5  # checkerboard
    mask[disc] = 2
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), mask
