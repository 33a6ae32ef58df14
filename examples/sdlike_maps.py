"""Remakes examples/maps-sdlike.png, the README's picture of examples/maps.py, on the tests' SD-like
model:

    python examples/sdlike_maps.py

That model is NOT Stable Diffusion: tests/conftest.py's write_sdlike_checkpoint is a tiny SD 2
checkpoint (the real layout, tiny widths) whose attention is set by hand so that it follows colour,
not meaning. The script writes it, fits on tests/conftest.py's synthetic scene (a striped red square
and a checkered green disc) with tests/test_cli.py's SDLIKE flags (5 epochs at lr 0.3, one 512
patch, no SD loss), then draws maps.py's picture of a moved copy of the scene, --pixel at the disc's
centre. About 30 s on 2 CPU cores.
"""

import os
import sys
import tempfile

import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [
    HERE,
    os.path.join(os.path.dirname(HERE), "tests"),
]  # maps.py (it finds slime), conftest.py
import maps  # noqa: E402

import slime  # noqa: E402
from conftest import synthetic_scene, write_sdlike_checkpoint  # noqa: E402

SDLIKE = (
    "--epochs 5 --lr 0.3 --val-every 5 --beta 0 --patch-size 512 --patches-per-side 1 -q "
    "--dtype fp32"
)
PARTS, SHIFT = ["background", "square", "disc"], 32  # the copy: both objects 32 px right and down
PIXEL = (350 + SHIFT, 370 + SHIFT)  # the disc's centre in the copy (x, y)
TITLE = (
    "the tests' SD-like model, NOT SD (its attention follows colour): "
    "a moved copy of the fitted scene"
)


def main():
    with tempfile.TemporaryDirectory() as d:
        ckpt, emb = (
            write_sdlike_checkpoint(os.path.join(d, "sdlike.safetensors")),
            os.path.join(d, "emb.pt"),
        )
        image, mask = synthetic_scene()
        pair = [os.path.join(d, "scene.png"), os.path.join(d, "scene_mask.png")]
        Image.fromarray(image).save(pair[0])
        Image.fromarray(mask).save(pair[1])
        if slime.main(
            ["fit", *pair, "--parts", ",".join(PARTS), "--ckpt", ckpt, "-o", emb, *SDLIKE.split()]
        ):
            sys.exit("the fit failed")
        emb = slime.load_embeddings(emb)
        sd = slime.load_models(
            ckpt, "cpu", text_encoder=False
        )  # the CPU: the same picture on any machine
    moved, moved_mask = synthetic_scene(shift=SHIFT)
    arrays = maps.maps(sd, emb, torch.from_numpy(moved).permute(2, 0, 1).float() / 255, pixel=PIXEL)
    title = f"{TITLE}, pixel {PIXEL[0]},{PIXEL[1]}"
    maps.draw(arrays, emb["parts"], slime.part_colors(emb), title).save(
        os.path.join(HERE, "maps-sdlike.png")
    )
    miou = slime.image_miou(
        torch.from_numpy(arrays["labels"]), torch.from_numpy(moved_mask).long(), len(PARTS)
    )
    print(
        f"wrote examples/maps-sdlike.png: fit kept epoch {emb['epoch']} "
        f"(validation mIoU {emb['val_miou']:.4f})"
    )
    print(f"the moved copy's mask at 512x512: mIoU {miou:.4f}")


if __name__ == "__main__":
    main()
