"""The evidence table of README "Small parts in big photos": the release's squash path against
--window, through the command line, on the SD-like test checkpoint (tests/conftest.py: real layout,
hand-set weights whose attention follows colour regions). It shows the mechanism, not quality on
real photos.

    python benchmarks/window_evidence.py          # every row: about 15 minutes on 2 CPU cores
    python benchmarks/window_evidence.py --quick  # the 32 px disc only (the rows CI's test checks)

Part 1: one emb.pt is fitted on the 512x512 synthetic scene (the suite's SD-like fit: 10 epochs, lr
0.3, one 512 patch, beta 0); then a 2048x1536 synthetic photo (conftest.synthetic_photo: a large
striped rectangle and a plain disc) is segmented with and without --window.
Part 2 (not with --quick): fit on the photo itself (16 px disc), 40 epochs, validated on a 640x512
crop holding the disc, once squashed as the release and once with --window 256 (views at the photo's
own scale); each emb.pt then segments the photo and a copy with other noise (seed 1) the way it was
fitted. The IoUs are read back from each run's summary.json. Not a test: pytest does not collect it.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from conftest import synthetic_photo, synthetic_scene, write_sdlike_checkpoint  # noqa: E402

FIT = "--epochs 10 --lr 0.3 --val-every 5 --beta 0 --patch-size 512 --patches-per-side 1 -q".split()
PARTS = ["--parts", "background,square,disc"]
# part 2: more steps, each sees one view of the big photo
FIT_PHOTO = (
    "--epochs 40 --lr 0.3 --val-every 10 --beta 0 --patch-size 512 --patches-per-side 1 -q".split()
)
ROWS = [
    (8, 0),
    (8, 256),
    (16, 0),
    (16, 512),
]  # (disc radius in px, --window; 0 = the release's squash)


def slime(*args):
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "slime.py"), *map(str, args)],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        sys.exit(r.stderr)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the 32 px disc (radius 16)")
    quick = ap.parse_args().quick
    rows = [r for r in ROWS if r[0] == 16] if quick else ROWS
    d = tempfile.mkdtemp(prefix="slime-evidence-")

    def at(name):  # a file in the run's folder
        return os.path.join(d, name)

    ckpt = write_sdlike_checkpoint(at("sdlike.safetensors"))
    img, mask = synthetic_scene()
    Image.fromarray(img).save(at("scene.png"))
    Image.fromarray(mask).save(at("scene_mask.png"))
    emb = at("scene.pt")
    slime("fit", at("scene.png"), at("scene_mask.png"), "--ckpt", ckpt, "-o", emb, *PARTS, *FIT)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, fp32; photo 2048x1536")
    print(
        "| disc | path | UNet passes | large part IoU | disc IoU | predict time |\n"
        "|---|---|---|---|---|---|"
    )
    for radius, window in rows:
        path = f"`--window {window}`" if window else "release's squash"
        predict(
            at(f"r{radius}w{window}"), emb, ckpt, radius, 0, window, f"{2 * radius} px | {path}"
        )
    if quick:
        return
    print(
        "\nfit on the photo itself (16 px disc, 40 epochs), then predict the photo (seed 0) "
        "and a copy with other noise (seed 1)\n"
    )
    print(
        "| fit and predict | photo | UNet passes | large part IoU | disc IoU | predict time |\n"
        "|---|---|---|---|---|---|"
    )
    img, mask = synthetic_photo()
    h, w = mask.shape
    y, x = h * 4 // 5, w * 3 // 4  # the disc's centre: the validation crop holds it
    crop = (slice(y - 256, y + 256), slice(x - 320, x + 320))
    for name, array in (
        ("photo.png", img),
        ("photo_mask.png", mask),
        ("val.png", img[crop]),
        ("val_mask.png", mask[crop]),
    ):
        Image.fromarray(array).save(at(name))
    for window in (0, 256):
        fitted = at(f"photo_w{window}.pt")
        val = ["--val", at("val.png"), at("val_mask.png")]
        options = ["--ckpt", ckpt, "-o", fitted, *PARTS, "--window", window, *FIT_PHOTO]
        slime("fit", at("photo.png"), at("photo_mask.png"), *val, *options)
        for seed in (0, 1):
            path = f"`--window {window}`" if window else "release's squash"
            predict(
                at(f"photo_w{window}_s{seed}"),
                fitted,
                ckpt,
                8,
                seed,
                window,
                f"{path} | seed {seed}",
            )


def predict(run, emb, ckpt, radius, seed, window, row):
    """Segment the synthetic photo (disc `radius`, noise `seed`) with --window (0: squash) and print
    the row."""
    for sub in ("in", "gt"):
        os.makedirs(os.path.join(run, sub))
    img, mask = synthetic_photo(radius=radius, seed=seed)
    Image.fromarray(img).save(os.path.join(run, "in", "photo.png"))
    Image.fromarray(mask).save(os.path.join(run, "gt", "photo.png"))
    t0 = time.time()
    r = slime(
        "predict",
        emb,
        os.path.join(run, "in"),
        "-o",
        os.path.join(run, "out"),
        "--masks",
        os.path.join(run, "gt"),
        "--ckpt",
        ckpt,
        "--window",
        window,
    )
    seconds = time.time() - t0
    iou = json.load(open(os.path.join(run, "out", "summary.json")))["iou"]
    said = [line for line in r.stderr.splitlines() if line.startswith("--window")]
    passes = said[0].split(": ")[1].split(" window")[0] if said else "1"
    print(
        f"| {row} | {passes} | {float(iou['square']):.4f} | {float(iou['disc']):.4f} "
        f"| {seconds:.1f} s |",
        flush=True,
    )


if __name__ == "__main__":
    main()
