"""--dtype bf16 against the command line's default, fp32: one fit epoch of the full
SD 2.1-base architecture through `python slime.py fit`, each in a fresh process, side by side.

    python benchmarks/cli_epoch.py                 # about 8 minutes on 2 CPU cores, 5.2 GB of disk
    python benchmarks/cli_epoch.py --device cuda --epochs 10

It writes a checkpoint of random weights in the real file's layout (tests/layouts/sd21-base.json:
every tensor name and shape of v2-1_512-ema-pruned.safetensors, fp32, 5.2 GB; speed does not depend
on the values) and the benchmark's synthetic 512x512 image and 6-class mask, then runs the release's
defaults except --epochs, with --threshold 0 (random weights never reach 0.2, which would skip the
per-class work). Each stderr line is timestamped as it arrives. "first epoch": from the line
announcing the fit to the first validation's line (kernels set up, the validation patches encoded
once); "later epochs": the mean time between validation lines after it, what the rest of a 200-epoch
fit repeats; "command": the whole run, load included. Not a test: pytest does not collect it.
"""

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from benchmark import synthetic_pair  # noqa: E402


def write_checkpoint(path):
    """Random values scaled as tests/conftest.py's (activations stay sane), in the real names and
    shapes."""
    with open(os.path.join(ROOT, "tests", "layouts", "sd21-base.json")) as f:
        shapes = json.load(f)
    gen, state = torch.Generator().manual_seed(0), {}
    for key, shape in shapes.items():
        x = torch.randn(shape, generator=gen)
        state[key] = (
            x * 0.02
            if "embedding" in key
            else x / math.sqrt(math.prod(shape[1:]))
            if len(shape) >= 2
            else 1 + 0.05 * x
            if key.endswith("weight")
            else 0.02 * x
        )
    save_file(state, path)


def timed_fit(args, ckpt, image, mask, flags, out):
    """One `slime.py fit` -> (its first line, seconds of: the first epoch, a later epoch, a later
    step, a later validation, the command); "later" ones are means over the epochs after the
    first."""
    cmd = [
        sys.executable,
        os.path.join(ROOT, "slime.py"),
        "fit",
        image,
        mask,
        "--ckpt",
        ckpt,
        "-o",
        out,
        "--epochs",
        str(args.epochs),
        "--threshold",
        "0",
        "--overwrite",
        *flags,
    ] + (["--device", args.device] if args.device else [])
    t0, lines = time.time(), []
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        lines.append((time.time(), line.rstrip("\n")))
        print("   ", line, end="", file=sys.stderr, flush=True)
    if proc.wait():
        sys.exit(f"{' '.join(cmd)} failed: {lines[-1][1] if lines else proc.returncode}")
    start = next(t for t, text in lines if text.startswith("fitting "))
    vals = [t for t, text in lines if text.startswith("epoch ") and "validation mIoU" in text]
    steps = [t for t, text in lines if text.startswith("epoch ") and "  step " in text]

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    # each validation's line to the next step's
    later_steps = [b - a for a, b in zip(vals, steps[1:], strict=False)]
    later_vals = [b - a for a, b in zip(steps[1:], vals[1:], strict=False)]
    return (
        lines[0][1],
        vals[0] - start,
        mean([b - a for a, b in itertools.pairwise(vals)]),
        mean(later_steps),
        mean(later_vals),
        time.time() - t0,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--folder", default="/tmp/slime-cli-epoch", help="where the checkpoint and data go"
    )
    ap.add_argument(
        "--epochs", type=int, default=3, help="default 3: the first, and two later epochs"
    )
    ap.add_argument("--device", help="slime's --device; default: slime's (cuda when present)")
    args = ap.parse_args()
    os.makedirs(args.folder, exist_ok=True)
    ckpt, image, mask = (
        os.path.join(args.folder, n) for n in ("sd21-random.safetensors", "car.png", "car_mask.png")
    )
    if not os.path.exists(ckpt):
        print(f"writing {ckpt} ...", file=sys.stderr, flush=True)
        write_checkpoint(ckpt)
    img, m = synthetic_pair()
    Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(image)
    Image.fromarray(m.numpy().astype(np.uint8)).save(mask)
    rows = []
    for name, flags in (
        ("--dtype fp32", ["--dtype", "fp32"]),
        ("--dtype bf16", ["--dtype", "bf16"]),
    ):
        print(f"{name}:", file=sys.stderr, flush=True)
        rows.append(
            (name, *timed_fit(args, ckpt, image, mask, flags, os.path.join(args.folder, "emb.pt")))
        )
    print(
        f"\n{args.epochs} fit epoch(s), full SD 2.1-base (random weights), "
        f"torch {torch.__version__}\n"
    )
    print(
        "| run | first line | first epoch | later epochs, mean | their step | their validation "
        "| command |\n"
        "|---|---|---|---|---|---|---|"
    )
    for name, first, *seconds in rows:
        print(
            f"| {name} | `{first}` | "
            + " | ".join(
                f"{t:.1f} s ({t / t0:.2f}x)" for t, t0 in zip(seconds, rows[0][2:], strict=True)
            )
            + " |"
        )


if __name__ == "__main__":
    main()
