"""The Stable Diffusion components, from the checkpoint file to the attention maps.

Proves that every tensor of the real SD 1.5 and SD 2.1-base files (tests/layouts/) has a slot of its
shape in unet.py / vae.py / clip_text.py or is knowingly ignored; that the norms, the timestep
embedding and the VAE's padding follow ldm; that attention() returns head-averaged probabilities and
log-probabilities equal to a per-head loop; that tiny checkpoints in the real layout
(fp32, fp16, bf16) load and run, return the attention maps asked for (probabilities, or
log-probabilities) and pass gradients to the text context only; that broken checkpoint files are
refused with one sentence naming the file; that the plan reads only a checkpoint's header; and that
the hand-set SD-like checkpoint of conftest.py attends like real SD.

    python -m pytest -q tests/test_models.py
"""

import math
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import slime
from attention import GroupNorm32, LayerNorm32, attention
from conftest import (
    PEAK_MEMORY,
    ROOT,
    real_layout,
    state_digest,
    synthetic_scene,
    write_layout_only,
    write_tiny_checkpoint,
)
from unet import UNetModel, timestep_embedding
from vae import Downsample

# The ignored tensors, counted in the real layouts (tests/layouts/*.json):
# decoder 138 + post_quant_conv 2 + schedule 12 + model_ema 2, plus SD1's position_ids, or SD2's
# resblocks.23 (12 tensors), text_projection and logit_scale.
IGNORED_COUNT = {"sd1": 138 + 2 + 12 + 2 + 1, "sd2": 138 + 2 + 12 + 2 + 12 + 2}
SLIME_LAYERS = ["output_blocks.%d.1.transformer_blocks.0.attn2" % i for i in (3, 4, 5, 6, 7)] + [
    "output_blocks.%d.1.transformer_blocks.0.attn1" % i for i in (9, 10, 11)
]


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_real_layout_maps_onto_the_models(tmp_path, family):
    """Every tensor of the real release file has a module slot of its shape, or is on the ignore
    list: read_header (which refuses missing, unexpected and mis-shaped tensors) accepts the real
    header."""
    shapes = real_layout(family)
    got_family, modules = slime.read_header(
        write_layout_only(tmp_path / "real.safetensors", family)
    )
    assert got_family == family
    _, _, ignored = slime.build_models(shapes, "layout")
    used = {p + k for p, m in modules.items() for k in m.state_dict()}
    skipped = {k for k in shapes if any(p.match(k) for p in ignored)}
    assert used | skipped == set(shapes) and not used & skipped
    assert len(skipped) == IGNORED_COUNT[family]
    # widths that only real weights would catch if wrong
    unet = modules[slime.UNET_PREFIX]
    heads = {n: m.heads for n, m in unet.named_modules() if n.endswith("attn2")}
    assert heads["output_blocks.3.1.transformer_blocks.0.attn2"] == (8 if family == "sd1" else 20)
    assert heads["output_blocks.9.1.transformer_blocks.0.attn2"] == (8 if family == "sd1" else 5)
    text = modules[slime.TEXT_PREFIX[family]]
    assert text.cfg.layers == (12 if family == "sd1" else 23) and text.cfg.heads == (
        12 if family == "sd1" else 16
    )


def test_norm_eps_and_timestep_embedding_match_ldm():
    unet = UNetModel(slime.UNetConfig.sd21(model_channels=64, context_dim=64))
    group_norms = {n: m for n, m in unet.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    layer_norms = {n: m for n, m in unet.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    transformer_norms = [n for n in group_norms if n.endswith(".norm")]
    # 16 transformers
    assert len(transformer_norms) == 16 and len(group_norms) > 16 and len(layer_norms) == 3 * 16
    for name, m in group_norms.items():
        assert isinstance(m, GroupNorm32)
        assert m.eps == (1e-6 if name in transformer_norms else 1e-5), (
            name
        )  # SpatialTransformer.norm: 1e-6
    assert all(isinstance(m, LayerNorm32) and m.eps == 1e-5 for m in layer_norms.values())
    vae = slime.AutoencoderKL(slime.VAEConfig(ch=32))
    vae_norms = [m for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert vae_norms and all(m.eps == 1e-6 for m in vae_norms)
    t = torch.tensor([0, 7, 999])
    freqs = [math.exp(-math.log(10000) * i / 160) for i in range(160)]
    want = torch.tensor(
        [[math.cos(s * f) for f in freqs] + [math.sin(s * f) for f in freqs] for s in (0, 7, 999)]
    )
    assert torch.allclose(timestep_embedding(t, 320), want, atol=1e-4)  # cos first


def test_vae_downsample_pads_right_and_bottom_only():
    down = Downsample(1)
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 0, 0] = 1  # picks the top-left input of each 3x3 window
        down.conv.bias.zero_()
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(
        down(x), x[:, :, ::2, ::2]
    )  # symmetric padding would shift this by one pixel


def test_attention_maps_equal_a_per_head_loop():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 5, 12), torch.randn(2, 7, 12), torch.randn(2, 7, 12)
    out, probs = attention(q, k, v, heads=3, want="probs")
    _, logp = attention(q, k, v, heads=3, want="log_probs")
    fast, none = attention(q, k, v, heads=3)
    per_head, outs = [], []
    for h in range(3):  # head h owns channels 4h..4h+3
        s = q[..., 4 * h : 4 * h + 4] @ k[..., 4 * h : 4 * h + 4].transpose(1, 2) / 2.0
        per_head.append(s.softmax(-1))
        outs.append(per_head[-1] @ v[..., 4 * h : 4 * h + 4])
    assert none is None
    assert torch.allclose(probs, torch.stack(per_head).mean(0), atol=1e-6)
    assert torch.allclose(logp, torch.stack(per_head).log().mean(0), atol=1e-5)
    assert torch.allclose(out, torch.cat(outs, -1), atol=1e-5) and torch.allclose(
        fast, out, atol=1e-5
    )


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_tiny_checkpoint_runs_and_returns_maps(tiny_ckpt, family):
    m = slime.load_models(tiny_ckpt(family))
    assert m.family == family and m.alphas_cumprod.shape == (1000,)
    tokens = m.tokenize(["part part part", "a photo"])
    assert tokens.shape == (2, 77) and tokens[0, 0] == 49406 and tokens[0, 4] == 49407
    assert tokens[0, 5] == (49407 if family == "sd1" else 0)
    ctx = m.text_encoder(tokens)
    assert ctx.shape == (2, 77, 64) and torch.isfinite(ctx).all()
    img = torch.rand(2, 3, 64, 64)
    lat = m.vae.encode(img)
    assert lat.shape == (2, 4, 8, 8) and torch.isfinite(lat).all()
    g = torch.Generator().manual_seed(0)
    assert not torch.equal(m.vae.encode(img, sample=True, generator=g), lat)
    t = torch.tensor([10, 500])
    eps, maps = m.unet(
        lat, t, ctx, attn_layers=SLIME_LAYERS[:-1], log_attn_layers=SLIME_LAYERS[-1:]
    )
    assert eps.shape == lat.shape and torch.isfinite(eps).all()
    assert set(maps) == set(SLIME_LAYERS)
    assert maps["output_blocks.3.1.transformer_blocks.0.attn2"].shape == (
        2,
        4,
        77,
    )  # 2x2 query grid at 1/4
    assert maps["output_blocks.9.1.transformer_blocks.0.attn1"].shape == (2, 64, 64)
    for name, p in maps.items():
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
        if name != SLIME_LAYERS[-1]:  # probabilities: a distribution over the keys
            assert (p >= 0).all() and torch.allclose(
                p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-5
            ), name
    # the log layer holds the head average of log-probabilities: by Jensen <= the log of the
    # head-averaged probability (so at most 1 in total over the keys), equal to it with one head,
    # below it where heads differ
    logp, probs = (
        maps[SLIME_LAYERS[-1]],
        m.unet(lat, t, ctx, attn_layers=SLIME_LAYERS[-1:])[1][SLIME_LAYERS[-1]],
    )
    assert (logp <= probs.log() + 1e-5).all() and (logp.logsumexp(-1) <= 1e-5).all()
    if (
        dict(m.unet.named_modules())[SLIME_LAYERS[-1]].heads == 1
    ):  # SD2's 64-channel heads at tiny width
        assert torch.allclose(logp, probs.log(), atol=1e-5)
    else:  # SD1: 8 heads. The log of the averaged probabilities would be equal here
        assert (logp < probs.log() - 1e-3).any()
    eps_fast, none = m.unet(lat, torch.tensor([10, 500]), ctx)
    assert none == {} and torch.allclose(eps_fast, eps, atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention layers"):
        m.unet(lat, torch.tensor([10, 500]), ctx, attn_layers=["up_blocks.1.attentions.0"])


def test_gradients_reach_the_context_through_the_maps(tiny_ckpt):
    m = slime.load_models(tiny_ckpt("sd2"))
    ctx = m.text_encoder(m.tokenize(["part part"])).clone().requires_grad_(True)
    x = torch.randn(1, 4, 16, 16)
    _, maps = m.unet(
        x, torch.tensor([50]), ctx, attn_layers=SLIME_LAYERS[5:], log_attn_layers=SLIME_LAYERS[:5]
    )
    loss = sum((p * torch.randn_like(p)).sum() for p in maps.values())
    loss.backward()
    assert (
        ctx.grad is not None and torch.isfinite(ctx.grad).all() and ctx.grad[0, 1].abs().sum() > 0
    )
    assert all(p.grad is None for p in m.unet.parameters())  # the networks stay frozen


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_load(tmp_path, dtype):
    path = write_tiny_checkpoint(tmp_path / "half.safetensors", "sd1", dtype=dtype)
    m32 = slime.load_models(path)  # stored in half, computed in fp32
    assert next(m32.unet.parameters()).dtype == torch.float32
    stored = load_file(path)
    for prefix, net in [(slime.UNET_PREFIX, m32.unet), (slime.VAE_PREFIX, m32.vae)]:
        # the file's values, upcast
        for k, p in net.state_dict().items():
            assert stored[prefix + k].dtype == dtype and torch.equal(
                p, stored[prefix + k].float()
            ), k
    ctx = m32.text_encoder(m32.tokenize(["part"]))
    mb = slime.load_models(path, dtype=torch.bfloat16)
    assert next(mb.unet.parameters()).dtype == torch.bfloat16
    eps, maps = mb.unet(
        torch.randn(1, 4, 8, 8), torch.tensor([5]), ctx, attn_layers=SLIME_LAYERS[:1]
    )
    assert eps.dtype == torch.float32 and torch.isfinite(eps).all()
    assert maps[SLIME_LAYERS[0]].dtype == torch.float32


def write_bytes(path, data):
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", r": No such file or directory$"),
        ("directory", r": Is a directory$"),
        ("pickle", r" is no \.safetensors file; slime never unpickles \.ckpt files$"),
        ("truncated", r": Error while deserializing header: invalid header length$"),
        ("garbage", r": Error while deserializing header: invalid JSON in header: "),
        ("empty", r": Error while deserializing header: header too small$"),
        ("lora", r" is no SD 1\.x or 2\.x checkpoint: it lacks a text encoder$"),
        ("sdxl", r" is no SD 1\.x or 2\.x checkpoint: it lacks a text encoder$"),
        ("notext", r" is no SD 1\.x or 2\.x checkpoint: it lacks a text encoder$"),
        ("vae", r" is no SD 1\.x or 2\.x checkpoint: it lacks a text encoder$"),
        (
            "novae",
            r" is no SD 1\.x or 2\.x checkpoint: "
            r"it lacks first_stage_model\.encoder\.conv_in\.weight$",
        ),
        (
            "incomplete",
            r" lacks tensors for sd1: model\.diffusion_model\.out\.2\.bias \(1 in all\)$",
        ),
        (
            "shaped",
            r" has wrongly shaped tensors for sd2: "
            r"model\.diffusion_model\.out\.2\.bias \(1 in all\)$",
        ),
        (
            "integer",
            r" has non-float tensors for sd2: model\.diffusion_model\.out\.2\.bias \(1 in all\)$",
        ),
        (
            "nan",
            r": the tensor model\.diffusion_model\.out\.2\.bias holds nan or inf values; "
            r"the file is damaged$",
        ),
    ],
)
def test_bad_checkpoint_files_say_what_is_wrong(tmp_path, tiny_ckpt, case, message):
    """`<path><message>`, one line: the OS's or safetensors' reason, or what makes it no SD 1.x /
    2.x file."""
    from safetensors.torch import save_file

    out = "model.diffusion_model.out.2.bias"
    path = {
        "missing": lambda: str(tmp_path / "nope.safetensors"),
        "directory": lambda: (
            (tmp_path / "d.safetensors").mkdir(),
            str(tmp_path / "d.safetensors"),
        )[1],
        "pickle": lambda: (
            torch.save({"state_dict": {}}, tmp_path / "sd.ckpt"),
            str(tmp_path / "sd.ckpt"),
        )[1],
        "truncated": lambda: write_bytes(
            tmp_path / "t.safetensors", open(tiny_ckpt("sd1"), "rb").read()[:100000]
        ),
        "garbage": lambda: write_bytes(tmp_path / "g.safetensors", b"\x00" * 64),
        "empty": lambda: write_bytes(tmp_path / "e.safetensors", b""),
        "lora": lambda: (
            save_file(
                {"lora_unet_down.lora_up.weight": torch.zeros(2)}, tmp_path / "l.safetensors"
            ),
            str(tmp_path / "l.safetensors"),
        )[1],
        "sdxl": lambda: (
            save_file(
                {
                    "conditioner.embedders.0.transformer.x": torch.zeros(2),
                    "model.diffusion_model.out.2.bias": torch.zeros(2),
                },
                tmp_path / "x.safetensors",
            ),
            str(tmp_path / "x.safetensors"),
        )[1],
        "notext": lambda: (
            save_file(
                {"model.diffusion_model.out.2.bias": torch.zeros(2)}, tmp_path / "u.safetensors"
            ),
            str(tmp_path / "u.safetensors"),
        )[1],
        "vae": lambda: _edited(
            tmp_path, tiny_ckpt("sd1"), lambda k, v: v if k.startswith(slime.VAE_PREFIX) else None
        ),
        "novae": lambda: _edited(
            tmp_path, tiny_ckpt("sd2"), lambda k, v: None if k.startswith(slime.VAE_PREFIX) else v
        ),
        "incomplete": lambda: _without(tmp_path, tiny_ckpt("sd1"), out),
        "shaped": lambda: _edited(
            tmp_path, tiny_ckpt("sd2"), lambda k, v: torch.zeros(len(v) + 1) if k == out else v
        ),
        "integer": lambda: _edited(
            tmp_path, tiny_ckpt("sd2"), lambda k, v: v.int() if k == out else v
        ),
        "nan": lambda: _edited(
            tmp_path, tiny_ckpt("sd2"), lambda k, v: v * math.nan if k == out else v
        ),
    }[case]()
    with pytest.raises(slime.SlimeError) as e:
        slime.load_models(path)
    assert str(e.value).startswith(path) and "\n" not in str(e.value)
    assert re.fullmatch(re.escape(path) + message + ".*", str(e.value)), str(e.value)


def _edited(tmp_path, src, edit):  # each tensor -> edit(key, tensor): a tensor, or None to drop it
    from safetensors.torch import load_file, save_file

    state = {k: t for k, v in load_file(src).items() if (t := edit(k, v)) is not None}
    save_file(state, tmp_path / "edited.safetensors")
    return str(tmp_path / "edited.safetensors")


def _without(tmp_path, src, key):
    from safetensors.torch import load_file, save_file

    state = load_file(src)
    del state[key]
    save_file(state, tmp_path / "partial.safetensors")
    return str(tmp_path / "partial.safetensors")


def test_unexpected_tensor_is_named(tmp_path, tiny_ckpt):
    from safetensors.torch import load_file, save_file

    state = load_file(tiny_ckpt("sd2"))
    state["model.diffusion_model.extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "extra.safetensors")
    with pytest.raises(
        slime.SlimeError,
        match=re.escape("has unexpected tensors") + ".*model.diffusion_model.extra.weight",
    ):
        slime.load_models(tmp_path / "extra.safetensors")


def test_the_plan_reads_only_the_header_of_a_full_size_file(tmp_path):
    """A 2.6 GB file in the real SD 2.1-base layout (fp16, a sparse hole of zeros): read_header
    checks every name, shape and format without reading the tensors into memory."""
    path = write_layout_only(tmp_path / "v2-1_512-fp16.safetensors", "sd2")
    code = PEAK_MEMORY + (
        "import sys, slime; f, m = slime.read_header(sys.argv[1]); "
        "print(f, sum(len(x.state_dict()) for x in m.values())); "
        "print(peak_memory())"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, path], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert r.returncode == 0, r.stderr
    family, count = r.stdout.splitlines()[0].split(" ")
    # the 1242 tensors of the file: 1074 in the modules, the others on the ignore list
    assert (family, int(count)) == ("sd2", 1242 - IGNORED_COUNT["sd2"])
    # kB; the file is 2.6 GB, reading its tensors would show
    assert int(r.stdout.splitlines()[1].split()[1]) < 1.5e6


def test_the_fingerprint_sees_every_byte_of_the_checkpoint(tmp_path):
    """The run record's identity of the weights: one flipped bit anywhere (the header, the middle
    where a LoRA merged into the UNet lands, either end, across the 16 MiB chunks it hashes in
    threads) gives another fingerprint; the same bytes under another name and time give the same."""
    # a safetensors file's start, then 40 MiB of "tensors"
    header = b'{"__metadata__": {"format": "pt"}}'
    data = (
        torch.randint(0, 256, (40 << 20,), generator=torch.Generator().manual_seed(0))
        .byte()
        .numpy()
    )
    raw = bytearray(len(header).to_bytes(8, "little") + header + data.tobytes())
    (tmp_path / "a.safetensors").write_bytes(raw)
    seen = {slime.fingerprint(tmp_path / "a.safetensors")}
    for where in (0, 9, 1 << 24, len(raw) // 4, len(raw) // 2, 3 * len(raw) // 4, len(raw) - 1):
        raw[where] ^= 1
        (tmp_path / "b.safetensors").write_bytes(raw)
        seen.add(slime.fingerprint(tmp_path / "b.safetensors"))
        raw[where] ^= 1
    assert len(seen) == 8
    os.utime(tmp_path / "a.safetensors", (0, 0))
    (tmp_path / "c.safetensors").write_bytes(raw)
    assert slime.fingerprint(tmp_path / "a.safetensors") == slime.fingerprint(
        tmp_path / "c.safetensors"
    )


def test_the_sdlike_fixture_attends_like_sd(sdlike_ckpt):
    """What makes the end-to-end quality test meaningful: on the hand-set checkpoint <start-of-text>
    takes most of the cross-attention at every pixel (as in real SD), and self-attention stays
    within regions."""
    sd = slime.load_models(sdlike_ckpt)
    img, mask = synthetic_scene()
    image = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    cond, _ = slime.prompt_contexts(sd, 3)
    t = torch.tensor([100])
    x_t, _ = slime.noisy_latent(sd, image[None], t, torch.Generator().manual_seed(0))
    with torch.no_grad():
        A_ca, A_sa, _ = slime.attention_maps(sd, x_t, t, cond, 3, log_space=False)
    assert (
        A_ca[0].min() > 0.8
    )  # SOT's share of every pixel's attention, averaged over heads and layers
    labels = torch.from_numpy(mask).long()[4::8, 4::8].flatten()
    same_region = (A_sa * (labels[:, None] == labels[None])).sum(1)
    assert same_region.mean() > 0.95  # near-uniform attention would give about 0.6 here


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_the_models_match_diffusers_golden_values(tiny_ckpt, family):
    """Against an independent reference on identical weights where every branch carries signal (all
    random, none zeroed): tests/data/goldens-*.safetensors hold what diffusers' and transformers'
    own models compute on the tiny checkpoint. Each file's metadata holds the script that made them
    ("script": not kept as a file, since the project imports no diffusers), its command, and the
    versions. The tokens, the text context, the VAE latent (posterior mean x 0.18215 of 2
    x image - 1), the UNet's eps and the 8 attention maps SLiMe reads all match."""
    with safe_open(os.path.join(ROOT, "tests", "data", f"goldens-{family}.safetensors"), "pt") as f:
        gold, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    assert meta["checkpoint"].endswith(state_digest(load_file(tiny_ckpt(family)))), (
        f"the tiny checkpoint changed since the goldens were made: run `{meta['command']}`"
    )
    sd = slime.load_models(tiny_ckpt(family))
    layers = [k.removeprefix("attn:") for k in gold if k.startswith("attn:")]
    assert sorted(layers) == sorted(slime.CROSS_LAYERS + slime.SELF_LAYERS)
    assert torch.equal(sd.tokenize(["part part part"]), gold["tokens"])
    with torch.no_grad():  # each network on the reference's inputs, so an error is its own
        eps, maps = sd.unet(gold["x_t"], gold["t"], gold["context"], attn_layers=layers)
        ours = dict(
            context=sd.text_encoder(gold["tokens"]),
            latent=sd.vae.encode(gold["image"], sample=False),
        )
    ours.update(eps=eps, **{f"attn:{k}": maps[k][0] for k in layers})
    for name, value in ours.items():
        error = ((value - gold[name]).abs().max() / gold[name].abs().max()).item()
        # fp32 rounding gives ~1e-7; 1e-5 lets through only an error smaller than that in every
        # value, where a wrong norm eps, head split, scale or padding moves them by 1e-3 or more
        assert error <= 1e-5, (name, error)
