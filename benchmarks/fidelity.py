"""How far a reduced precision (bf16, fp16) moves slime's numbers from fp32: what decides --dtype's
default.

    python benchmarks/fidelity.py --device cpu --dtype bf16
    python benchmarks/fidelity.py --device cuda --dtype bf16 --part sdlike

Not a test (pytest does not collect it). Each part runs the same method on identical inputs (same
weights, same timestep, same noise) once in fp32 and once in --dtype, and prints what moved:

full    full SD 2.1-base, random weights (benchmarks/benchmark.py's): one training step (each loss
        term's relative difference, the gradient's cosine to fp32's), the Eq. 3 cross-attention map
        and the Eq. 6 WAS map (relative L2 difference), and one 400x2 patched prediction (the share
        of pixels whose class agrees; threshold 0, since random weights never reach 0.2 and every
        pixel would be background).
sdlike  the SD-like tiny checkpoint of tests/conftest.py (its attention follows colour regions and
        peaks as real SD's does, where rounding matters most): fit on a synthetic scene (10 epochs,
        lr 0.3, no SD loss, as tests/test_cli.py), then predict the scene and a moved, mirrored
        copy: mIoU in each precision, and the share of pixels that agree.
"""

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]
import slime  # noqa: E402
from benchmark import K, build, synthetic_pair  # noqa: E402
from conftest import synthetic_scene, write_sdlike_checkpoint  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def rel(a, b):
    """||a - b|| / ||a||: the relative L2 difference of b from the fp32 reference a."""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / a.norm().clamp_min(1e-30)).item()


def full_part(device, dtype, tiny):
    """One training step, its maps, and one prediction, in fp32 and in dtype, on the full random
    model."""
    image, mask = synthetic_pair()
    mask64 = slime.resize(mask[None], (slime.MAP, slime.MAP), "nearest")[0].to(device)
    s = replace(slime.Settings(), patch_size=400, patches_per_side=2, threshold=0.0)
    sd32 = build(tiny, device, torch.float32)
    cond, uncond = slime.prompt_contexts(
        sd32, K
    )  # the same fp32 prompt for both: only the UNet differs
    out = {}
    for name, sd in (("fp32", sd32), ("low", None)):
        if sd is None:  # the same random weights, cast
            for net in (sd32.unet, sd32.vae, sd32.text_encoder):
                net.to(dtype)
            sd = sd32
        learned = cond[0, 1:K].clone().requires_grad_(True)
        gen = torch.Generator(device).manual_seed(0)
        t0 = time.perf_counter()
        loss, terms = slime.training_step(
            sd, learned, cond, uncond, image.to(device), mask64, s, gen
        )
        loss.backward()
        gen = torch.Generator(device).manual_seed(
            0
        )  # again: the same t and noise, for the maps alone
        t = torch.randint(s.t_min, s.t_max + 1, (1,), generator=gen, device=device)
        x_t, _ = slime.noisy_latent(sd, image[None].to(device), t, gen)
        with torch.no_grad():
            A_ca, A_sa, _ = slime.attention_maps(
                sd, x_t, t, slime.with_learned(learned, cond), K, log_space=True
            )
            was = slime.was_map(A_ca.softmax(0), A_sa)
            labels = slime.segment(
                sd, slime.with_learned(learned.detach(), cond), image.to(device), K, s
            )
        out[name] = dict(
            terms=terms,
            grad=learned.grad.flatten().double().cpu(),
            ca=A_ca,
            was=was,
            labels=labels,
            secs=time.perf_counter() - t0,
        )
    a, b = out["fp32"], out["low"]
    rows = [
        (
            f"loss {k}",
            f"{a['terms'][k]:.6g}",
            f"{b['terms'][k]:.6g}",
            f"{abs(b['terms'][k] - a['terms'][k]) / max(abs(a['terms'][k]), 1e-30):.2e} relative",
        )
        for k in a["terms"]
    ]
    rows.append(
        (
            "gradient cosine",
            "1",
            "",
            f"{torch.nn.functional.cosine_similarity(a['grad'], b['grad'], 0):.6f}",
        )
    )
    rows.append(
        (
            "Eq. 3 cross-attention map (log space)",
            "",
            "",
            f"{rel(a['ca'], b['ca']):.2e} relative L2",
        )
    )
    rows.append(("Eq. 6 WAS map", "", "", f"{rel(a['was'], b['was']):.2e} relative L2"))
    rows.append(
        (
            "400x2 mask, pixels that agree",
            "",
            "",
            f"{(a['labels'] == b['labels']).double().mean():.4%}",
        )
    )
    rows.append(("seconds (step + maps + predict)", f"{a['secs']:.1f}", f"{b['secs']:.1f}", ""))
    return rows


def sdlike_part(device, dtype, tiny=None):
    """fit then predict on the SD-like checkpoint in fp32 and in dtype: mIoU and agreement."""
    s = replace(
        slime.Settings(),
        epochs=10,
        lr=0.3,
        val_every=5,
        beta=0.0,
        patch_size=512,
        patches_per_side=1,
    )
    scenes = {"same": synthetic_scene(), "moved": synthetic_scene(shift=40, flip=True, seed=1)}
    tensors = {
        k: (torch.from_numpy(im).permute(2, 0, 1).float() / 255, torch.from_numpy(m).long())
        for k, (im, m) in scenes.items()
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = write_sdlike_checkpoint(os.path.join(tmp, "sdlike.safetensors"))
        out = {}
        for name, dt in (("fp32", torch.float32), ("low", dtype)):
            sd = slime.load_models(path, device=device, dtype=dt)
            t0 = time.perf_counter()
            context = slime.fit(sd, [tensors["same"]], 3, s)
            labels = {
                k: slime.segment(sd, context, im.to(device), 3, s).cpu()
                for k, (im, _) in tensors.items()
            }
            out[name] = dict(
                labels=labels,
                secs=time.perf_counter() - t0,
                miou={k: slime.image_miou(labels[k], tensors[k][1], 3) for k in tensors},
            )
    a, b = out["fp32"], out["low"]
    rows = [
        (
            f"mIoU, {k} scene",
            f"{a['miou'][k]:.4f}",
            f"{b['miou'][k]:.4f}",
            f"{b['miou'][k] - a['miou'][k]:+.4f}; pixels that agree "
            f"{(a['labels'][k] == b['labels'][k]).double().mean():.4%}",
        )
        for k in tensors
    ]
    rows.append(("seconds (fit + 2 predictions)", f"{a['secs']:.1f}", f"{b['secs']:.1f}", ""))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--part", choices=("full", "sdlike", "both"), default="both")
    ap.add_argument(
        "--tiny", action="store_true", help="the full part at tiny widths, to check the script"
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    gpu = f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""
    print(
        f"device {args.device}{gpu}; {os.cpu_count()} cores; torch {torch.__version__}; "
        f"fp32 vs {args.dtype}\n"
    )
    print(f"| measure | fp32 | {args.dtype} | difference |\n|---|---|---|---|")
    parts = ["full", "sdlike"] if args.part == "both" else [args.part]
    for part in parts:
        rows = (full_part if part == "full" else sdlike_part)(
            args.device, DTYPES[args.dtype], args.tiny
        )
        for row in rows:
            print(f"| {part}: " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
