"""What the finite check costs at load: load_models with and without slime.finite, alternating, then
the check alone against torch.isfinite, on a full-size checkpoint (random weights are fine: the cost
does not depend on the values). The first load also pulls the file into the page cache, so read the
later ones.

    python benchmarks/load_cost.py weights/v2-1_512-ema-pruned.safetensors
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import slime

path = sys.argv[1]
check = slime.finite
for label in ("with the check", "without", "with the check", "without"):
    slime.finite = check if label == "with the check" else (lambda t, name, p: t)
    t0 = time.perf_counter()
    sd = slime.load_models(path)
    n = sum(p.numel() for m in (sd.unet, sd.vae, sd.text_encoder) for p in m.parameters())
    print(
        f"load_models {label}: {time.perf_counter() - t0:.2f} s ({n / 1e9:.3f} G values kept)",
        flush=True,
    )
kept = [p for m in (sd.unet, sd.vae, sd.text_encoder) for p in m.parameters()]
t0 = time.perf_counter()
for t in kept:
    check(t, "", path)
print(f"slime.finite over every kept tensor: {time.perf_counter() - t0:.2f} s")
t0 = time.perf_counter()
for t in kept:
    torch.isfinite(t).all()
print(f"torch.isfinite(t).all() over every kept tensor: {time.perf_counter() - t0:.2f} s")
