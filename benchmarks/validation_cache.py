"""What fit's validation saves by making each validation image's noisy patches once per fit: one
validation from scratch (VAE encode + UNet per patch, as before) against one with the patches kept
(UNet only), on the full SD 2.1-base architecture with random weights (speed does not depend on the
values), 400 px x 2 per side, K = 6, fp32, threshold 0 (random weights never reach 0.2).

    # writes a random checkpoint first (5.2 GB, once)
    python benchmarks/validation_cache.py
    # any SD 2.1-base file, e.g. the real weights
    python benchmarks/validation_cache.py CHECKPOINT

Without CHECKPOINT it writes the same random checkpoint as benchmarks/cli_epoch.py (its
write_checkpoint: every tensor name and shape of v2-1_512-ema-pruned.safetensors, from
tests/layouts/sd21-base.json) into --folder, reusing one already there, and loads it with
slime.load_models as the command line does. Not a test: pytest does not collect it.
"""

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]
import slime  # noqa: E402
from cli_epoch import write_checkpoint  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "checkpoint",
        nargs="?",
        help="an SD 2.1-base .safetensors; default: a random one in --folder",
    )
    ap.add_argument(
        "--folder",
        default="/tmp/slime-cli-epoch",
        help="where the random checkpoint goes "
        "(default: cli_epoch.py's, so the two share one file)",
    )
    args = ap.parse_args()
    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = os.path.join(args.folder, "sd21-random.safetensors")
        if not os.path.exists(ckpt):
            os.makedirs(args.folder, exist_ok=True)
            print(f"writing {ckpt} ...", file=sys.stderr, flush=True)
            write_checkpoint(ckpt)
    torch.set_flush_denormal(True)
    sd = slime.load_models(ckpt)
    K, s = 6, slime.Settings(threshold=0.0)
    image, gt = (
        torch.rand(3, 512, 512, generator=torch.Generator().manual_seed(0)),
        torch.zeros(512, 512, dtype=torch.long),
    )
    cond, _ = slime.prompt_contexts(sd, K)
    kept = [slime.noisy_patches(sd, image, s)]  # as fit makes them: once, before its loop
    slime.validation_miou(sd, cond, [(image, gt)], kept, K, s)  # warm-up
    for label in ("from scratch", "patches kept", "from scratch", "patches kept"):
        t0 = time.perf_counter()
        if label == "from scratch":
            slime.segment(sd, cond, image, K, s, slime.SIZE)
        else:
            slime.validation_miou(sd, cond, [(image, gt)], kept, K, s)
        print(f"one validation, {label}: {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
