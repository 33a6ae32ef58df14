"""What fit's validation saves by making each validation image's noisy patches once per fit: one
validation from scratch (VAE encode + UNet per patch, as before) against one with the patches kept
(UNet only), on the full SD 2.1-base architecture with random weights (speed does not depend on the
values), 400 px x 2 per side, K = 6, fp32, threshold 0 (random weights never reach 0.2).

    python benchmarks/validation_cache.py CHECKPOINT   (e.g. a random file: ../shared/tools/make_random_ckpt.py)
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import slime  # noqa: E402

torch.set_flush_denormal(True)
sd = slime.load_models(sys.argv[1])
K, s = 6, slime.Settings(threshold=0.0)
image, gt = torch.rand(3, 512, 512, generator=torch.Generator().manual_seed(0)), torch.zeros(512, 512, dtype=torch.long)
cond, _ = slime.prompt_contexts(sd, K)
kept = []  # validation_miou makes the noisy patches into it once
slime.validation_miou(sd, cond, [(image, gt)], kept, K, s)  # warm-up; makes the patches
for label in ("from scratch", "patches kept", "from scratch", "patches kept"):
    t0 = time.perf_counter()
    if label == "from scratch":
        slime.segment(sd, cond, image, K, s, slime.SIZE)
    else:
        slime.validation_miou(sd, cond, [(image, gt)], kept, K, s)
    print(f"one validation, {label}: {time.perf_counter() - t0:.1f} s", flush=True)
