"""Hostile input: every mistake ends in one sentence `slime: error: ...` naming the file or flag,
exit status 2, no traceback, and the folders exactly as they were; writes are whole or absent;
outputs never mix with inputs; predict's run record (slime-run.json) resumes the same run and
refuses another; an image that cannot be read is named, skipped and counted (exit 1) while the
others are done.

    python -m pytest -q tests/test_errors.py

The table runs slime.main in-process (no interpreter start-up per case); signals, kills and a full
disk run slime.py as a real process.
"""

import contextlib
import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import slime
from conftest import PEAK_MEMORY, ROOT, synthetic_scene, tiny_state_dict, write_tiny_checkpoint

FAST = (
    "--epochs 1 --beta 0 --threshold 0 --patch-size 512 --patches-per-side 1 --dtype fp32".split()
)
SLIME = [sys.executable, os.path.join(ROOT, "slime.py")]  # slime.py as a program


def cli(*args, cwd=None, **kw):
    return subprocess.run(
        [*SLIME, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd, **kw
    )


def main(*args):  # slime's command line in this process, its arguments as paths or strings
    return slime.main([str(a) for a in args])


def assert_refused(r, fragment):
    assert r.returncode == 2, r.stderr
    assert fragment in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("slime: error: ") == 1
    assert r.stderr.splitlines()[-1].startswith(
        "slime: error: "
    )  # notices may come first; the error ends it


LOAD_MODELS = (
    slime.load_models
)  # the real loader: the tests' own emb.pt files are made with it, unwatched


class Loads(list):
    """The checkpoints slime.load_models was asked for in this test, in order. While `refusing`
    (from the start), a call also fails the test on the spot: pytest.fail raises a BaseException,
    which neither named() nor main() catches (they catch Exception subclasses and
    KeyboardInterrupt); and since the call is recorded first, a handler that swallowed even that
    would still fail the test's own check of the list."""

    refusing = True

    def plan_refuses(
        self, run, *args, **kwargs
    ):  # run(...) -> its result, which the plan gives: no load
        n, self.refusing = len(self), True
        try:
            result = run(*args, **kwargs)
        finally:
            self.refusing = False
        assert self[n:] == [], "the model loaded before the plan refused"
        return result


@pytest.fixture
def no_load(monkeypatch):
    """slime.load_models watched (Loads): "checked before the model loads" as a fact, not as a
    folder left unchanged, which a check made after the load (or after a fit) would leave unchanged
    too."""
    loads = Loads()

    def watched(path, *args, **kwargs):
        loads.append(str(path))
        if loads.refusing:
            pytest.fail(f"the model loaded before the plan refused ({path})", pytrace=False)
        return LOAD_MODELS(path, *args, **kwargs)

    monkeypatch.setattr(slime, "load_models", watched)
    return loads


@pytest.fixture
def segment_once(monkeypatch):
    """slime.load_models and slime.segment memoized on their arguments, for tests of what predict
    does with its labels (files, renames, resumes) that make the same segmentation over and over:
    each distinct one runs once, the model loads once. The labels are a function of these arguments
    alone (the noise is seeded per image), so every file is what the unmemoized run writes; only the
    progress lines of a repeat are not shown."""
    load, segment, memo = slime.load_models, slime.segment, {}

    def loaded(*args, **kwargs):
        key = ("load", repr(args), repr(sorted(kwargs.items())))
        memo[key] = memo[key] if key in memo else load(*args, **kwargs)
        return memo[key]

    def segmented(sd, context, image, *args, progress=None, **kwargs):
        key = (
            id(sd),
            context.cpu().numpy().tobytes(),
            image.numpy().tobytes(),
            repr(args),
            repr(kwargs),
        )
        memo[key] = (
            memo[key]
            if key in memo
            else segment(sd, context, image, *args, progress=progress, **kwargs)
        )
        return memo[key].clone()

    monkeypatch.setattr(slime, "load_models", loaded)
    monkeypatch.setattr(slime, "segment", segmented)


def listing(folder):
    return sorted(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
    )


RUN_FILES = [
    "ImageSets/Segmentation/default.txt",
    "labelmap.txt",
    "slime-run.json",
    "summary.json",
]  # once per run


def outputs(out, stems=None):
    """predict's files under `out` (hidden ones aside), or the ones it writes for these image
    stems."""
    if stems is not None:
        return sorted(
            RUN_FILES + [f"{d}/{s}.png" for s in stems for d in ("SegmentationClass", "overlays")]
        )
    return sorted(
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    )


def images_made(out):
    """{relative path: mtime} of the masks and overlays under `out`."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*.png")}


@pytest.fixture(scope="module")
def emb(tmp_path_factory, tiny_ckpt):
    """An emb.pt for the tiny SD2 checkpoint, made without fitting (the initial vectors)."""
    path = tmp_path_factory.mktemp("emb") / "emb.pt"
    make_emb(path, tiny_ckpt("sd2"))
    return path


def make_emb(path, ckpt, change=None, **settings):
    sd = LOAD_MODELS(ckpt, text_encoder=True)
    cond, _ = slime.prompt_contexts(sd, 3)
    s = slime.Settings(threshold=0, patch_size=512, patches_per_side=1, **settings)
    slime.save_embeddings(path, cond, ["background", "square", "disc"], sd, s)
    if change:
        e = torch.load(path, weights_only=True)
        change(e)
        torch.save(e, path)
    return path


def scene_files(d, size=512, name="a"):
    img, mask = synthetic_scene(size=size)
    Image.fromarray(img).save(d / f"{name}.png")
    Image.fromarray(mask).save(d / f"{name}_mask.png")
    return d / f"{name}.png", d / f"{name}_mask.png"


def nan_checkpoint(
    d, family="sd2", key="model.diffusion_model.out.2.bias", value=float("nan"), dtype=None
):
    state = tiny_state_dict(family)
    state[key] = state[key].to(dtype) if dtype else state[key].clone()
    if value is not None:
        state[key].view(-1)[1] = value
    save_file(state, str(d / "odd.safetensors"))
    return d / "odd.safetensors"


# -------------------------------------------------------------------- fit: one row per hostile case
def fit_case(d, ckpt, case):
    """Build the files of one case in d; return the fit arguments (with -o) that use them."""
    img, mask = scene_files(d)
    pair, args = [img, mask], ["--ckpt", ckpt, "-o", d / "emb.pt"]
    if case == "output is a folder":
        (d / "emb.pt").mkdir()
    elif case == "output is the image":
        args[-1] = img
    elif case == "output is the mask":
        args[-1] = mask
    elif case == "output is the checkpoint":
        args[-1] = ckpt
    elif case == "output is a symlink to the image":
        os.symlink(img, d / "link.pt")
        args[-1] = d / "link.pt"
    elif case == "output is a hard link to the mask":
        os.link(mask, d / "hard.pt")
        args[-1] = d / "hard.pt"
    elif case == "output below a file":
        args[-1] = img / "emb.pt"
    elif case == "jpeg mask":
        Image.open(mask).save(d / "m.jpg", quality=95)
        pair[1] = d / "m.jpg"
    elif case == "jpeg mask named .png":
        Image.open(mask).convert("RGB").save(d / "m2.png", format="JPEG", quality=100)
        pair[1] = d / "m2.png"
    elif case == "lossy webp mask":
        Image.open(mask).convert("RGB").save(d / "m.webp", quality=90)
        pair[1] = d / "m.webp"
    elif case == "nan pixel in a float tiff":
        Image.fromarray(np.full((64, 64), np.nan, np.float32)).save(d / "f.tif")
        Image.fromarray(np.ones((64, 64), np.uint8)).save(d / "f_mask.png")
        pair = [d / "f.tif", d / "f_mask.png"]
    elif case == "nan weight":
        args[1] = nan_checkpoint(d)
    elif case == "inf weight in the text encoder":
        args[1] = nan_checkpoint(
            d, key="cond_stage_model.model.ln_final.weight", value=float("inf")
        )
    elif case == "integer weight":
        args[1] = nan_checkpoint(
            d, key="model.diffusion_model.out.2.bias", value=None, dtype=torch.int32
        )
    elif case in ("ckpt truncated", "ckpt .ckpt"):
        name = "cut.safetensors" if case == "ckpt truncated" else "sd.ckpt"
        (d / name).write_bytes(open(ckpt, "rb").read(4000))
        args[1] = d / name
    elif case == "image not an image":
        img.write_text("hello")
    elif case == "image 0 bytes":
        img.write_bytes(b"")
    elif case == "image truncated jpeg":
        Image.open(img).save(d / "a.jpg", quality=95)
        (d / "a.jpg").write_bytes((d / "a.jpg").read_bytes()[:600])
        pair[0] = d / "a.jpg"
    elif case in ("npy float", "npy rank"):
        m = np.array(Image.open(mask))
        np.save(d / "m.npy", m.astype(np.float32) if case == "npy float" else m[..., None])
        pair[1] = d / "m.npy"
    elif case == "float tiff mask with a fraction":
        m = np.array(Image.open(mask)).astype(np.float32)
        m[100, 100] = 1.5
        Image.fromarray(m).save(d / "m.tif")
        pair[1] = d / "m.tif"
    elif case == "antialiased colours":
        m = np.array(Image.open(mask))
        rgb = np.zeros(m.shape + (3,), np.uint8)
        rgb[m == 1], rgb[m == 2] = (200, 0, 0), (0, 200, 0)
        edge = m[:, 1:] != m[:, :-1]
        rgb[:, 1:][edge] = (100, 100, 0)  # a blended colour on the boundary
        rgb[:, 1:][edge & (m[:, 1:] == 0)] = (100, 0, 0)
        Image.fromarray(rgb).save(mask)
        args += ["--parts", "background,square,disc"]
    elif case == "mask of another size":
        Image.fromarray(np.zeros((100, 80), np.uint8)).save(d / "small.png")
        pair[1] = d / "small.png"
    elif case in ("background-only mask", "a 0/255 binary mask"):  # 255: VOC's ignore, not a part
        m = np.zeros((512, 512), np.uint8)
        m[100:300, 100:300] = 255 if case[0] == "a" else 0
        Image.fromarray(m).save(mask)
    elif case == "odd number of paths":
        pair = [img]
    elif case == "empty part name":
        args += ["--parts", "background,square,disc,"]
    elif case == "repeated part name":
        args += ["--parts", "background,disc,disc"]
    elif case in (
        "a pipe as the mask",
        "a pipe as the image",
        "a pipe as the checkpoint",
        "a pipe as -o",
    ):
        special = (
            d
            / {"mask": "p.png", "image": "p.png", "checkpoint": "p.safetensors", "-o": "p.pt"}[
                case.split()[-1]
            ]
        )
        os.mkfifo(special)  # opened for reading, a pipe waits for a writer: forever
        where = {"mask": (pair, 1), "image": (pair, 0), "checkpoint": (args, 1), "-o": (args, 3)}[
            case.split()[-1]
        ]
        where[0][where[1]] = special
    elif case == "a socket as the mask":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(d / "s.png"))
        pair[1] = d / "s.png"
    elif case == "/dev/zero as the mask":
        pair[1] = "/dev/zero"
    elif case == "a pipe as the labelmap":
        os.mkfifo(d / "labels.txt")
        args += ["--labelmap", d / "labels.txt"]
    elif case == "an .npz named .npy as the mask":
        np.savez(d / "m.npz", mask=np.array(Image.open(mask)))
        os.replace(d / "m.npz", d / "m.npy")
        pair[1] = d / "m.npy"
    elif case == "huge value in a .npy mask":
        m = np.array(Image.open(mask)).astype(np.uint64)
        m[0, 0] = 2**63
        np.save(d / "m.npy", m)
        pair[1] = d / "m.npy"
    elif case == "a finished emb.pt, no --overwrite":
        slime.save_embeddings(
            d / "emb.pt",
            torch.zeros(1, 77, 64),
            ["background", "disc"],
            SimpleNamespace(family="sd2", fingerprint=None, dtype=torch.float32),
            slime.Settings(),
        )
    elif case == "image and mask swapped":
        pair = [mask, img]
    elif case == "the mask as the image too":  # fit mask.png mask.png
        pair = [mask, mask]
    elif case == "a grey photo as the mask":
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512), dtype=np.uint8)).save(
            mask
        )
    elif case == "output is a file fit did not write":
        (d / "notes.txt").write_text("my notes")
        args[-1] = d / "notes.txt"
    elif case in (
        "--parts against the labelmap",
        "a mask colour the labelmap lacks",
        "a broken --labelmap",
    ):
        (d / "labelmap.txt").write_text("background:0,0,0::\nsquare:128,0,0::\ndisc:0,128,0::\n")
        if case == "--parts against the labelmap":
            args += ["--parts", "background,disc,square"]
        elif case == "a mask colour the labelmap lacks":
            Image.fromarray(
                np.array([(0, 0, 0), (128, 0, 0), (9, 9, 9)], np.uint8)[np.array(Image.open(mask))]
            ).save(mask)
        else:
            (d / "mine.txt").write_text("background:0,0,0::\nsquare:128,0::\n")
            args += ["--labelmap", d / "mine.txt"]
    return pair + args


SPECIAL = "is no regular file (a pipe, socket or device): slime reads only files"
FIT_CASES = [
    # a special file where a file is read: refused before any read, which would block
    ("a pipe as the mask", f"{{d}}/p.png {SPECIAL}"),
    ("a pipe as the image", f"{{d}}/p.png {SPECIAL}"),
    ("a pipe as the checkpoint", f"{{d}}/p.safetensors {SPECIAL}"),
    ("a pipe as -o", "{d}/p.pt is no slime emb.pt: choose another -o"),
    ("a socket as the mask", f"{{d}}/s.png {SPECIAL}"),
    ("/dev/zero as the mask", f"/dev/zero {SPECIAL}"),
    ("a pipe as the labelmap", f"{{d}}/labels.txt {SPECIAL}"),
    (
        "an .npz named .npy as the mask",
        "{d}/m.npy: a mask is a 2-D array of labels 0..255, not an .npz",
    ),
    (
        "--parts against the labelmap",
        "--parts background,disc,square differs from the labels of {d}/labelmap.txt: "
        "leave --parts out",
    ),
    (
        "a mask colour the labelmap lacks",
        "{d}/a_mask.png has colours that are not in {d}/labelmap.txt, e.g. (9, 9, 9)",
    ),
    ("a broken --labelmap", "mine.txt, line 2: 'square:128,0::' is not `name:r,g,b::`, a new name"),
    ("output is a folder", "-o {d}/emb.pt is a folder; give a file path such as {d}/emb.pt/emb.pt"),
    # fit replaces only an emb.pt, so an output that names an input (through a link too) is refused
    ("output is the image", "{d}/a.png is no slime emb.pt: choose another -o"),
    ("output is the mask", "{d}/a_mask.png is no slime emb.pt: choose another -o"),
    ("output is the checkpoint", "tiny-sd2.safetensors is no slime emb.pt: choose another -o"),
    ("output is a symlink to the image", "{d}/link.pt is no slime emb.pt: choose another -o"),
    ("output is a hard link to the mask", "{d}/hard.pt is no slime emb.pt: choose another -o"),
    ("output below a file", "{d}/a.png: File exists"),
    ("jpeg mask", "{d}/m.jpg is stored lossily (JPEG); save the mask as PNG or .npy"),
    ("jpeg mask named .png", "m2.png is stored lossily (JPEG)"),
    ("lossy webp mask", "m.webp is stored lossily (WEBP)"),
    ("nan pixel in a float tiff", "f.tif holds nan or inf pixel values"),
    (
        "nan weight",
        "odd.safetensors: the tensor model.diffusion_model.out.2.bias holds nan or inf values",
    ),
    (
        "inf weight in the text encoder",
        "the tensor cond_stage_model.model.ln_final.weight holds nan or inf",
    ),
    (
        "integer weight",
        "odd.safetensors has non-float tensors for sd2: "
        "model.diffusion_model.out.2.bias (1 in all)",
    ),
    # the library's checkpoint messages are tested in test_models.py; two rows prove they reach the
    # user whole
    ("ckpt truncated", "{d}/cut.safetensors: Error while deserializing header"),
    ("ckpt .ckpt", "sd.ckpt is no .safetensors file; slime never unpickles .ckpt files"),
    # the one boundary of file errors: the file, then the library's own words
    ("image not an image", "slime: error: {d}/a.png: cannot identify image file\n"),
    ("image 0 bytes", "slime: error: {d}/a.png: cannot identify image file\n"),
    ("image truncated jpeg", "slime: error: {d}/a.jpg: "),
    ("npy float", "m.npy: a mask is a 2-D array of labels 0..255, not float32 (512, 512)"),
    ("npy rank", "m.npy: a mask is a 2-D array of labels 0..255, not uint8 (512, 512, 1)"),
    (
        "float tiff mask with a fraction",
        "m.tif: a float mask must hold labels 0..255, not fractions, nan or inf",
    ),
    (
        "antialiased colours",
        "a_mask.png has 2 colours only along the edges between others (anti-aliasing): "
        "save it unsmoothed, or name its colours in a labelmap.txt",
    ),
    ("mask of another size", "small.png is (80, 100), its image (512, 512) (w, h)"),
    (
        "background-only mask",
        "a_mask.png has no part, only background 0 or ignore 255: label parts 1, 2, ...",
    ),
    (
        "a 0/255 binary mask",
        "a_mask.png has no part, only background 0 or ignore 255: label parts 1, 2, ...",
    ),
    ("odd number of paths", "fit takes image/mask pairs or folders, but {d}/a.png has no partner"),
    ("output is a file fit did not write", "notes.txt is no slime emb.pt: choose another -o"),
    (
        "empty part name",
        "--parts background,square,disc,: the names must be non-empty and distinct",
    ),
    (
        "repeated part name",
        "--parts background,disc,disc: the names must be non-empty and distinct",
    ),
    (
        "huge value in a .npy mask",
        "m.npy: a mask is a 2-D array of labels 0..255, not uint64 (512, 512)",
    ),
    (
        "a finished emb.pt, no --overwrite",
        "emb.pt already holds fitted embeddings; pass --overwrite, or choose another -o",
    ),
    (
        "image and mask swapped",
        "a_mask.png has only 3 colours, like a mask: give each image first, its mask second",
    ),
    (
        "the mask as the image too",
        "a_mask.png has only 3 colours, like a mask: give each image first",
    ),
    (
        "a grey photo as the mask",
        "a_mask.png holds 256 distinct values, so it is a photo, not a mask",
    ),
]
# refused by load_models itself, as it reads each tensor: a weight's value is no header's; every
# other row is the plan's (the "integer weight" row too: a tensor's dtype is in the header)
FIT_AT_LOAD = {"nan weight", "inf weight in the text encoder"}


@pytest.mark.parametrize("case, fragment", FIT_CASES, ids=[c for c, _ in FIT_CASES])
def test_fit_refuses_hostile_input_leaving_the_folder_as_it_was(
    tmp_path, tiny_ckpt, capsys, no_load, case, fragment
):
    """Each case ends in its one line, exit 2, the folder as it was, and (but FIT_AT_LOAD's) before
    the model loads; FIT_AT_LOAD's are refused by the load itself, of their checkpoint."""
    args = fit_case(tmp_path, tiny_ckpt("sd2"), case)
    before = listing(tmp_path)
    no_load.refusing = case not in FIT_AT_LOAD
    assert main("fit", *map(str, args), *FAST, "-q") == 2
    err = capsys.readouterr().err
    fragment = fragment.replace(
        "{d}", str(tmp_path)
    )  # the case's folder, where a message names a file in it
    assert fragment in err and err.startswith("slime: error: ") and err.count("\n") == 1, err
    assert listing(tmp_path) == before  # no emb.pt, no temp file, nothing touched
    assert no_load == ([str(args[args.index("--ckpt") + 1])] if case in FIT_AT_LOAD else [])


def test_fit_replaces_an_emb_pt_only_with_overwrite(
    tmp_path, tiny_ckpt, capsys, monkeypatch, no_load
):
    """Without --overwrite an emb.pt stays byte for byte, refused by the plan; with it, emb.pt is
    the new fit's: its parts, settings, and the vectors and epoch the fit reported, not the old
    file's. (The fit itself is a stand-in that reports one best and its end at once: what is tested
    is where its result goes.)"""
    img, mask = scene_files(tmp_path)
    ckpt, path = tiny_ckpt("sd2"), tmp_path / "emb.pt"
    sd = SimpleNamespace(
        family="sd2", fingerprint=None, dtype=torch.float32
    )  # fit's format, without a model
    slime.save_embeddings(
        path, torch.zeros(1, 77, 64), ["background", "square", "disc"], sd, slime.Settings()
    )
    raw, best = (
        path.read_bytes(),
        torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(5)),
    )

    def fit(
        sd, pairs, k, s, val, progress, state
    ):  # one validation, the best, then the last epoch's end
        progress(dict(event="validation", epoch=7, miou=0.5, best=True, seconds=0.0))
        progress(dict(event="epoch", epoch=s.epochs, state=dict(best_context=best)))

    monkeypatch.setattr(slime, "fit", fit)
    flags = "--parts background,red,green --seed 1 -q".split()
    args = ["fit", img, mask, "--ckpt", ckpt, "-o", path, *FAST, *flags]
    assert main(*args) == 2 and path.read_bytes() == raw and no_load == []
    assert capsys.readouterr().err == (
        f"slime: error: {path} already holds fitted embeddings; "
        "pass --overwrite, or choose another -o\n"
    )
    no_load.refusing = False
    assert main(*args, "--overwrite") == 0 and no_load == [ckpt]
    new = slime.load_embeddings(path)
    assert torch.equal(new["context"], best) and new["parts"] == ["background", "red", "green"]
    assert (new["epoch"], new["val_miou"], new["settings"].seed, new["settings"].epochs) == (
        7,
        0.5,
        1,
        1,
    )
    assert sorted(os.listdir(tmp_path)) == ["a.png", "a_mask.png", "emb.pt"]  # and no temp file


OPTION_CASES = [
    (["--epochs", "abc"], "argument --epochs: must be an integer in [1, 100000], not 'abc'"),
    (["--epochs", "0"], "argument --epochs: must be an integer in [1, 100000], not '0'"),
    (["--epochs", "2.5"], "argument --epochs: must be an integer"),
    (["--lr", "nan"], "argument --lr: must be a number in [1e-06, 100.0], not 'nan'"),
    (["--lr", "inf"], "argument --lr: must be a number in [1e-06, 100.0], not 'inf'"),
    (["--lr", "0"], "argument --lr: must be a number in [1e-06, 100.0], not '0'"),
    (["--alpha", "-1"], "argument --alpha: must be a number in [0.0, 1000000.0], not '-1'"),
    (["--beta", "nan"], "argument --beta: must be a number"),
    (["--min-crop-ratio", "0"], "argument --min-crop-ratio: must be a number in [0.05, 1.0]"),
    (["--rotation", "1e9"], "argument --rotation: must be a number in [0.0, 180.0]"),
    (["--threshold", "1.5"], "argument --threshold: must be a number in [0.0, 1.0]"),
    (["--patch-size", "600"], "argument --patch-size: must be an integer in [8, 512]"),
    (["--patches-per-side", "0"], "argument --patches-per-side: must be an integer in [1, 16]"),
    (["--test-t", "1000"], "argument --test-t: must be an integer in [1, 999]"),
    (
        ["--out-size", "256"],
        "argument --out-size: must be a multiple of 512 in [0, 512], not '256'",
    ),
    (["--seed", "-1"], "argument --seed: must be an integer in [0, "),
    (["--t-min", "100", "--t-max", "5"], "the command line: t_min 100 exceeds t_max 5"),
    (["--preset", "coco"], "argument --preset: invalid choice: 'coco'"),
    (["--dtype", "fp64"], "argument --dtype: invalid choice: 'fp64'"),
    (["--frobnicate"], "slime.py: unrecognized arguments: --frobnicate\n"),
    (["--epoch", "5"], "slime.py: unrecognized arguments: --epoch 5\n"),  # no abbreviations
    (
        ["--val_every", "1"],
        "slime.py: unrecognized arguments: --val_every 1; --val_every is --val-every in slime\n",
    ),
    # the release's flags (release/src/arguments.py): slime's name, or what slime does instead
    (
        ["--min_crop_ratio", "0.6"],
        "--min_crop_ratio 0.6; --min_crop_ratio is --min-crop-ratio in slime\n",
    ),
    (["--num_patchs_per_side", "1"], "--num_patchs_per_side is --patches-per-side in slime\n"),
    (["--part_names", "a", "b"], "--part_names a b; --part_names is --parts a,b,c in slime\n"),
    (
        ["--train_data_dir", "x"],
        "--train_data_dir is fit FOLDER (its NAME.png and NAME.npy pairs) in slime\n",
    ),
    (
        ["--batch_size", "1"],
        "slime.py: unrecognized arguments: --batch_size 1\n",
    ),  # no such thing in slime
    (["--lr=0.1", "--parts-names", "a,b"], "unrecognized arguments: --parts-names a,b\n"),
    (
        ["--device", "banana"],
        "--device banana: not a device slime knows; use cpu, cuda, cuda:N or mps",
    ),
    (["--device", "cuda:7"], "--device cuda:7: not available on this machine; leave --device out"),
    (
        ["--device", "cpu", "--dtype", "fp16"],
        "--dtype fp16: a CPU emulates fp16, which takes minutes per image",
    ),
    (
        ["--parts", ",".join(["background"] + [f"p{i}" for i in range(77)])],
        "78 classes are more than SD's 77",
    ),
    (
        ["--parts", "background,square"],
        "a_mask.png has class values [2] outside 0..1 (['background', 'square'])",
    ),
]


@pytest.mark.parametrize(
    "flags, fragment", OPTION_CASES, ids=[" ".join(f)[:40] for f, _ in OPTION_CASES]
)
def test_option_errors_are_one_line(tmp_path, tiny_ckpt, capsys, no_load, flags, fragment):
    """Each ends in its one line, exit 2, the folder as it was, before the model loads (no_load)."""
    img, mask = scene_files(tmp_path)
    before = listing(tmp_path)
    assert (
        main("fit", img, mask, "--ckpt", tiny_ckpt("sd2"), "-o", tmp_path / "e.pt", "-q", *flags)
        == 2
    )
    err = capsys.readouterr().err
    assert fragment in err and err.startswith("slime: error: ") and err.count("\n") == 1, err
    assert listing(tmp_path) == before and no_load == []


def test_options_are_checked_before_anything_is_read(capsys, no_load):
    """An option error wins over missing files: it is the first thing the user has to fix."""
    assert main("fit", "nothing.png", "nothing_mask.png", "--lr", "nan") == 2
    assert "argument --lr" in capsys.readouterr().err and no_load == []


def first_line(capsys, monkeypatch, *flags, native=True):
    """device_and_dtype on the CPU, with or without bf16 instructions -> (dtype, its line)."""
    monkeypatch.setattr(slime, "cpu_has_bf16", lambda: native)
    dtype = slime.device_and_dtype(
        slime.build_parser().parse_args(["predict", "emb.pt", "in", *flags]), slime.Console(False)
    )[1]
    return dtype, capsys.readouterr().err


def test_dtype_auto_is_fp32_and_names_bf16_where_the_cpu_has_it(capsys, monkeypatch):
    """--dtype auto (the default) is fp32, the release's format, whatever the machine's speed: the
    same command makes the same masks. A CPU with bf16 instructions gets the hint. The first line
    names the choice and why."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    n, line = (
        torch.get_num_threads(),
        lambda *flags, **kw: first_line(capsys, monkeypatch, *flags, **kw),
    )
    cpu, gpu = (
        f"running on the CPU ({n} thread{'s' * (n != 1)}), ",
        "; no GPU found, so each image takes minutes\n",
    )
    assert line(native=False) == (torch.float32, cpu + "fp32: the release's format" + gpu)
    hint = "fp32: the release's format; this CPU has bf16 instructions: --dtype bf16 may be faster"
    assert line() == (torch.float32, cpu + hint + gpu)
    assert line("--device", "cpu") == (torch.float32, cpu + hint + "\n")
    # an explicit format is used as given; bf16 where the CPU would emulate it is named for its cost
    assert line("--dtype", "fp32", "--device", "cpu") == (
        torch.float32,
        cpu + "fp32: as --dtype says\n",
    )
    assert line("--dtype", "bf16", "--device", "cpu") == (
        torch.bfloat16,
        cpu + "bf16: as --dtype says\n",
    )
    assert line("--dtype", "bf16", "--device", "cpu", native=False)[1] == (
        cpu
        + "bf16: as --dtype says, though this CPU has no bf16 instructions: 25x to 100x slower\n"
    )
    with pytest.raises(
        slime.SlimeError, match="^--dtype fp16: a CPU emulates fp16, which takes minutes per image"
    ):
        line("--dtype", "fp16", "--device", "cpu")  # refused: fp16 is emulated on every CPU


# ---------------------------------------------------------------- predict: one row per hostile case
def predict_case(d, ckpt, emb, case):
    """Build the files of one case in d; return the predict arguments."""
    (d / "in").mkdir()
    (d / "gt").mkdir()
    img, mask = scene_files(d / "in", size=64)
    os.replace(mask, d / "gt" / "a.png")
    args = [emb, d / "in", "--ckpt", ckpt, "-o", d / "out"]
    if case == "outputs over the ground truth":
        args += ["--masks", d / "out" / "SegmentationClass"]
        (d / "out" / "SegmentationClass").mkdir(parents=True)
        os.replace(d / "gt" / "a.png", d / "out" / "SegmentationClass" / "a.png")
    elif case == "two images, one output name":
        Image.open(img).save(d / "in" / "a.jpg")
    elif case == "the user's labelmap.txt in the output folder":
        (d / "out").mkdir()
        (d / "out" / "labelmap.txt").write_text(
            "# label:color_rgb:parts:actions\nbackground:0,0,0::\ncat:9,9,9::\n"
        )
    elif case == "the user's image list in the output folder":
        (d / "out" / "ImageSets" / "Segmentation").mkdir(parents=True)
        (d / "out" / "ImageSets" / "Segmentation" / "default.txt").write_text("cat1\ncat2\n")
    elif case in (
        "the user's summary.json in the output folder",
        "the user's file where the run record goes",
    ):
        (d / "out").mkdir()
        (d / "out" / ("summary.json" if "summary" in case else "slime-run.json")).write_text(
            '{"mine": 1}\n'
        )
    elif case == "output folder is the image folder":
        args[-1] = d / "in"
    elif case == "output folder holds the ground truth":
        args[-1] = d / "gt"
        args += ["--masks", d / "gt"]
    elif case == "a damaged run record":
        (d / "out").mkdir()
        (d / "out" / "slime-run.json").write_text('{"run": "0123')
    elif case == "a colour ground truth in other colours":
        labels = np.zeros((64, 64), np.uint8)
        labels[10:20, 10:20], labels[30:40, 30:40] = 1, 2
        Image.fromarray(np.array([[0, 0, 0], [9, 0, 0], [0, 9, 0]], np.uint8)[labels]).save(
            d / "gt" / "a.png"
        )
        args += ["--masks", d / "gt"]
    elif case == "output folder is a file":
        (d / "out").write_text("a file")
    elif case == "output folder under a file":
        args[-1] = img / "out"
    elif case in (
        "emb.pt of another width",
        "emb.pt with a nan",
        "emb.pt without parts",
        "emb.pt with parts and vectors disagreeing",
        "emb.pt from a newer slime",
        "emb.pt with a setting out of range",
        "emb.pt with a setting of the wrong type",
        "emb.pt with a repeated part",
        "emb.pt of other layers",
    ):
        changes = {
            "emb.pt of another width": lambda e: e.update(
                context=e["context"][..., :32], learned=e["learned"][:, :32]
            ),
            "emb.pt with a nan": lambda e: e["context"].view(-1).__setitem__(100, float("nan")),
            "emb.pt without parts": lambda e: e.pop("parts"),
            "emb.pt with parts and vectors disagreeing": lambda e: e["parts"].append("wheel"),
            "emb.pt with a setting of the wrong type": lambda e: e["settings"].update(epochs=True),
            "emb.pt with a repeated part": lambda e: e["parts"].__setitem__(2, "square"),
            "emb.pt from a newer slime": lambda e: e["settings"].update(native_scale=2.0),
            "emb.pt with a setting out of range": lambda e: e["settings"].update(threshold=7.0),
            "emb.pt of other layers": lambda e: e["self_layers"].pop(),
        }
        args[0] = make_emb(d / "odd.pt", ckpt, changes[case])
    elif case == "--parts with an emb.pt":
        args += ["--parts", "a,b,c"]
    elif case == "jpeg ground truth":
        os.remove(d / "gt" / "a.png")
        Image.fromarray(synthetic_scene(size=64)[1]).save(d / "gt" / "a.jpg", quality=95)
        args += ["--masks", d / "gt"]
    elif case == "ground truth of another size":
        Image.fromarray(np.zeros((32, 64), np.uint8)).save(d / "gt" / "a.png")
        args += ["--masks", d / "gt"]
    elif case == "ground truth with unknown classes":
        Image.fromarray(np.full((64, 64), 9, np.uint8)).save(d / "gt" / "a.png")
        args += ["--masks", d / "gt"]
    elif case == "nan weight":
        args[3] = nan_checkpoint(d)
    elif case == "checkpoint of the other family":
        args[3] = write_tiny_checkpoint(d / "sd1.safetensors", "sd1")
    elif case == "corrupt emb.pt":
        (d / "bad.pt").write_bytes(b"\x80\x04garbage")
        args[0] = d / "bad.pt"
    elif case == "foreign torch file":
        torch.save({"weights": torch.zeros(2)}, d / "other.pt")
        args[0] = d / "other.pt"
    elif case == "no emb.pt":
        args[0] = d / "nothing.pt"
    elif case == "device cuda without a GPU":
        args += ["--device", "cuda"]
    elif case == "ground truth in the image folder":
        Image.fromarray(synthetic_scene(size=64)[1]).save(d / "in" / "b_mask.png")
        args += ["--masks", d / "in"]
    elif case == "no ground-truth folder":
        args += ["--masks", d / "nowhere"]
    elif case == "the user's photo where a mask goes":
        (d / "out" / "SegmentationClass").mkdir(parents=True)
        Image.open(img).save(d / "out" / "SegmentationClass" / "a.png")
    elif case == "fp16 on the CPU":
        args += ["--device", "cpu", "--dtype", "fp16"]
    elif case == "a folder as the emb.pt":
        args[0] = d / "in"
    elif case == "no ground truth for any image":
        os.rename(d / "gt" / "a.png", d / "gt" / "other.png")
        args += ["--masks", d / "gt"]
    return args


IN_THE_WAY = (
    "is in the way of {}, and no slime-run.json says whose it is; "
    "pass --overwrite, or choose another -o"
)
PREDICT_CASES = [
    # outputs never mix with inputs: a labelmap.txt written there would be read as the inputs' next
    # time
    (
        "outputs over the ground truth",
        "-o {d}/out holds inputs of this run ({d}/out/SegmentationClass); choose another -o",
    ),
    (
        "output folder is the image folder",
        "-o {d}/in holds inputs of this run ({d}/in); choose another -o",
    ),
    (
        "output folder holds the ground truth",
        "-o {d}/gt holds inputs of this run ({d}/gt); choose another -o",
    ),
    (
        "two images, one output name",
        "{d}/in/a.jpg and {d}/in/a.png would both be {d}/out/SegmentationClass/a.png; rename one",
    ),
    # files at slime's output paths with no run record: whose they are cannot be told
    (
        "the user's labelmap.txt in the output folder",
        "{d}/out/labelmap.txt " + IN_THE_WAY.format("this run's labelmap.txt"),
    ),
    (
        "the user's image list in the output folder",
        "default.txt " + IN_THE_WAY.format("this run's ImageSets/Segmentation/default.txt"),
    ),
    (
        "the user's summary.json in the output folder",
        "out/summary.json " + IN_THE_WAY.format("this run's summary.json"),
    ),
    (
        "the user's photo where a mask goes",
        "{d}/out/SegmentationClass/a.png is in the way of the mask or overlay of",
    ),
    (
        "the user's file where the run record goes",
        "{d}/out/slime-run.json is not slime's run record; pass --overwrite, or choose another -o",
    ),
    (
        "a damaged run record",
        "slime: error: {d}/out/slime-run.json: not slime's run record; pass --overwrite, or "
        "choose another -o",
    ),
    (
        "a colour ground truth in other colours",
        "gt/a.png has colours that are not in the parts' colours, e.g. (0, 9, 0), (9, 0, 0)",
    ),
    ("output folder is a file", "-o {d}/out: {d}/out is no folder slime may write in"),
    (
        "output folder under a file",
        "-o {d}/in/a.png/out: {d}/in/a.png is no folder slime may write in",
    ),
    ("emb.pt of another width", "odd.pt was fitted on another kind of checkpoint than"),
    (
        "emb.pt with a nan",
        "odd.pt is not a usable emb.pt: its context holds nan, inf or non-float values",
    ),
    (
        "emb.pt without parts",
        "odd.pt is not a usable emb.pt: its parts None are not 2 to 77 distinct names",
    ),
    (
        "emb.pt with parts and vectors disagreeing",
        "odd.pt is not a usable emb.pt: its 4 parts do not match its learned vectors",
    ),
    (
        "emb.pt from a newer slime",
        "has settings this slime does not know (native_scale); update slime",
    ),
    (
        "emb.pt with a setting out of range",
        "the setting threshold must be a number in [0.0, 1.0], not 7.0",
    ),
    (
        "emb.pt with a setting of the wrong type",
        "the setting epochs must be an integer in [1, 100000], not True",
    ),
    (
        "emb.pt with a repeated part",
        "odd.pt is not a usable emb.pt: its parts ['background', 'square', 'square'] are "
        "not 2 to 77 distinct names",
    ),
    (
        "emb.pt of other layers",
        "it was fitted on another model or other attention layers than this slime reads",
    ),
    ("--parts with an emb.pt", "slime.py: unrecognized arguments: --parts a,b,c"),
    ("jpeg ground truth", "gt/a.jpg is stored lossily (JPEG)"),
    ("ground truth of another size", "gt/a.png is (64, 32), its image (64, 64) (w, h)"),
    ("ground truth with unknown classes", "gt/a.png has class values [9] outside 0..2"),
    ("nan weight", "the tensor model.diffusion_model.out.2.bias holds nan or inf values"),
    (
        "checkpoint of the other family",
        "emb.pt was fitted on another kind of checkpoint than {d}/sd1.safetensors (sd1)",
    ),
    (
        "corrupt emb.pt",
        "{d}/bad.pt: damaged, not a torch file, or holds pickled code, which slime never runs",
    ),
    ("foreign torch file", "other.pt is not a usable emb.pt: no 'slime-embeddings/1' format tag"),
    ("no emb.pt", "{d}/nothing.pt: No such file or directory"),
    ("a folder as the emb.pt", "{d}/in: Is a directory"),
    ("device cuda without a GPU", "--device cuda: not available on this machine"),
    (
        "fp16 on the CPU",
        "--dtype fp16: a CPU emulates fp16, which takes minutes per image; use bf16 or fp32",
    ),
    (
        "ground truth in the image folder",
        "--masks {d}/in holds no mask of {d}/in/a.png but itself: keep the ground truth apart",
    ),
    ("no ground-truth folder", "--masks {d}/nowhere: no such folder"),
    (
        "no ground truth for any image",
        "--masks {d}/gt holds no mask for any image (found by file stem: a.jpg -> a.png)",
    ),
]


PREDICT_AT_LOAD = {
    "nan weight"
}  # refused by load_models itself, as it reads each tensor (see FIT_AT_LOAD)


@pytest.mark.parametrize("case, fragment", PREDICT_CASES, ids=[c for c, _ in PREDICT_CASES])
def test_predict_refuses_hostile_input_leaving_the_folders_as_they_were(
    tmp_path, tiny_ckpt, emb, capsys, no_load, case, fragment
):
    """Each case ends in its one line, exit 2, the folders as they were, and (but PREDICT_AT_LOAD's)
    before the model loads; PREDICT_AT_LOAD's are refused by the load itself, of their checkpoint,
    before the record."""
    if case == "device cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = predict_case(tmp_path, tiny_ckpt("sd2"), emb, case)
    before = listing(tmp_path)
    no_load.refusing = case not in PREDICT_AT_LOAD
    assert main("predict", *map(str, args), "-q") == 2
    err = capsys.readouterr().err
    fragment = fragment.replace("{d}", str(tmp_path))
    assert fragment in err and err.startswith("slime: error: ") and err.count("\n") == 1, err
    assert listing(tmp_path) == before
    assert no_load == ([str(args[args.index("--ckpt") + 1])] if case in PREDICT_AT_LOAD else [])


# ----------------------------------------------------------------------------- the run record
def test_the_same_run_resumes_and_another_is_refused(
    tmp_path, tiny_ckpt, emb, capsys, no_load, segment_once
):
    """out/slime-run.json says what made the masks. The same run skips the images whose mask and
    overlay are both there and redoes a half pair; another emb.pt or other settings are refused
    naming --overwrite, by the plan (before the model loads); --overwrite redoes every image and
    deletes nothing else; without a record, files at slime's paths are refused, since nobody can
    tell whose they are."""
    ckpt, no_load.refusing = tiny_ckpt("sd2"), False
    (tmp_path / "in").mkdir()
    for name in ("p", "q"):
        Image.fromarray(synthetic_scene(seed=len(name))[0]).resize((96, 64)).save(
            tmp_path / "in" / f"{name}.png"
        )
    out = tmp_path / "out"

    def predict(*flags, e=emb):  # -> (exit status, the last line)
        code = main("predict", str(e), str(tmp_path / "in"), "-o", str(out), "--ckpt", ckpt, *flags)
        return code, capsys.readouterr().err.splitlines()[-1]

    assert predict() == (0, f"wrote masks and overlays of 2 images to {out}")
    assert outputs(out) == outputs(out, ["p", "q"])
    record = json.loads((out / "slime-run.json").read_text())
    assert (
        record["dtype"] == "float32"
        and record["embeddings"] == str(emb)
        and len(record["run"]) == 16
    )
    made = images_made(out)
    assert predict() == (
        0,
        f"wrote masks and overlays of 0 images to {out}; "
        "skipped 2 already done (--overwrite redoes them)",
    )
    assert images_made(out) == made
    other = make_emb(
        tmp_path / "other.pt", ckpt, lambda e: (e["context"].add_(0.01), e["learned"].add_(0.01))
    )
    refused = f"slime: error: {out} holds outputs of another run ({{}}); pass --overwrite, or -o"
    code, line = no_load.plan_refuses(
        predict, e=other
    )  # the record names what differs: here the vectors
    differs = "embeddings [0-9a-f]{16} there, [0-9a-f]{16} here"
    assert code == 2 and re.fullmatch(re.escape(refused).replace(r"\{\}", differs), line), line
    assert images_made(out) == made
    assert no_load.plan_refuses(predict, "--threshold", "0.5") == (
        2,
        refused.format("threshold 0.0 there, 0.5 here"),
    )
    assert no_load.plan_refuses(predict, "--seed", "1") == (
        2,
        refused.format("seed 0 there, 1 here"),
    )
    os.remove(
        out / "overlays" / "p.png"
    )  # an interrupted pair: its mask alone does not count as done
    assert predict() == (
        0,
        f"wrote masks and overlays of 1 image to {out}; "
        "skipped 1 already done (--overwrite redoes them)",
    )
    assert (
        images_made(out)["SegmentationClass/p.png"] != made["SegmentationClass/p.png"]
    )  # redone, both files
    assert images_made(out)["SegmentationClass/q.png"] == made["SegmentationClass/q.png"]
    (out / "notes.txt").write_text("mine")
    assert predict("--overwrite", e=other) == (0, f"wrote masks and overlays of 2 images to {out}")
    assert (
        out / "notes.txt"
    ).read_text() == "mine"  # --overwrite replaces slime's paths, nothing else
    assert json.loads((out / "slime-run.json").read_text())["embeddings"] == str(other)
    assert predict(e=other)[1].endswith(
        "skipped 2 already done (--overwrite redoes them)"
    )  # the new run resumes
    os.remove(out / "slime-run.json")
    assert no_load.plan_refuses(predict, e=other) == (
        2,
        f"slime: error: {out / 'labelmap.txt'} is in the way of this run's labelmap.txt, "
        "and no slime-run.json says whose it is; pass --overwrite, or choose another -o",
    )


def test_an_interrupted_overwrite_never_passes_the_other_runs_pairs_off_as_its_own(
    tmp_path, tiny_ckpt, emb, capsys, monkeypatch, segment_once
):
    """--overwrite stopped after its first image, then resumed: the images the old run made are
    redone, since --overwrite took its masks and overlays, and a pair counts as done only whole. A
    record whose run made no outputs yet (one stopped at its first image) does not stand in the way
    of another run."""
    ckpt = tiny_ckpt("sd2")
    (tmp_path / "in").mkdir()
    for name in ("p", "q"):
        Image.fromarray(synthetic_scene(seed=len(name))[0]).resize((64, 64)).save(
            tmp_path / "in" / f"{name}.png"
        )
    out = tmp_path / "out"
    args = ["predict", str(emb), str(tmp_path / "in"), "-o", str(out), "--ckpt", ckpt]
    assert slime.main(args) == 0
    old_q = (out / "SegmentationClass" / "q.png").read_bytes()
    other = make_emb(
        tmp_path / "other.pt", ckpt, lambda e: (e["context"].add_(0.01), e["learned"].add_(0.01))
    )
    write, calls = slime.segment_and_write, []

    def stopped_at_the_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt(signal.SIGTERM)
        return write(*a, **k)

    monkeypatch.setattr(slime, "segment_and_write", stopped_at_the_second)
    args[1] = str(other)
    assert slime.main(args + ["--overwrite"]) == 128 + signal.SIGTERM
    assert not (out / "overlays" / "q.png").exists()  # q's pair was the old run's: gone
    assert not (out / "SegmentationClass" / "q.png").exists()
    monkeypatch.undo()
    capsys.readouterr()
    assert slime.main(args) == 0  # the same run (other.pt) resumes: p is done, q is redone
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"wrote masks and overlays of 1 image to {out}; "
        "skipped 1 already done (--overwrite redoes them)"
    )
    assert (out / "SegmentationClass" / "q.png").read_bytes() != old_q
    for f in [f for f in out.rglob("*") if f.is_file() and f.name != "slime-run.json"]:
        f.unlink()  # what a run stopped at its first image leaves: its record alone
    assert (
        main("predict", str(emb), str(tmp_path / "in"), "-o", str(out), "--ckpt", ckpt, "-q") == 0
    )


def hidden_files(folder):  # what a commit leaves when it fails to clean up: its .NAME.PID.tmp files
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


def pair_bytes(out, stem):
    return [(out / d / f"{stem}.png").read_bytes() for d in ("SegmentationClass", "overlays")]


# slime.interrupt ignores the signals after the first: this process's handlers come back
@contextlib.contextmanager
def handlers_kept():
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def test_after_the_first_signal_the_next_ones_are_ignored():
    """Ctrl-C, SIGTERM and SIGHUP end a run once: a second one, while the first's cleanup runs (temp
    files, the run's files), must not raise inside it (it did: a traceback after the interrupt
    line)."""
    with handlers_kept(), pytest.raises(KeyboardInterrupt) as e:
        slime.interrupt(signal.SIGTERM, None)
    assert e.value.args == (signal.SIGTERM,)
    with handlers_kept():
        with pytest.raises(KeyboardInterrupt):
            slime.interrupt(signal.SIGHUP, None)
        assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)] == [
            signal.SIG_IGN
        ] * 3


def test_device_strings_torch_takes(capsys):
    """cpu:0 is a device torch takes: so does slime (it said "not a device slime knows")."""
    for name in ("cpu", "cpu:0"):
        args = SimpleNamespace(device=name, dtype="fp32")
        assert slime.device_and_dtype(args, slime.Console(True)) == (
            torch.device(name),
            torch.float32,
        )


def test_a_pair_interrupted_between_its_renames_is_redone_whole(
    tmp_path, tiny_ckpt, emb, capsys, monkeypatch, segment_once
):
    """Ctrl-C after the mask's rename, before the overlay's (the second of the pair): exit 130, the
    mask alone and no temp file; the rerun redoes the image, so the pair on disk is byte for byte an
    uninterrupted run's. The same with another run's pairs in the folder and --overwrite stopped
    there by SIGTERM (slime's handler): exit 143, and the resumed pair is the new run's, never the
    new mask with the old overlay."""
    ckpt = tiny_ckpt("sd2")
    (tmp_path / "in").mkdir()
    Image.fromarray(synthetic_scene(seed=1)[0]).resize((128, 128)).save(tmp_path / "in" / "p.png")
    # other colours: another run, whose mask (its palette) and overlay (its legend's swatches)
    # differ in bytes
    other = make_emb(
        tmp_path / "other.pt", ckpt, lambda e: e.update(colors=[[0, 0, 0], [9, 99, 9], [99, 9, 9]])
    )

    def predict(e, out, *flags):
        return main("predict", e, tmp_path / "in", "-o", out, "--ckpt", ckpt, "-q", *flags)

    fresh = {}  # each emb.pt's pair from an uninterrupted run into a fresh folder
    for e in (emb, other):
        assert predict(e, tmp_path / f"fresh_{e.stem}") == 0
        fresh[e] = pair_bytes(tmp_path / f"fresh_{e.stem}", "p")
    assert fresh[emb][0] != fresh[other][0] and fresh[emb][1] != fresh[other][1]
    out, real_replace = tmp_path / "out", os.replace
    mask, overlay = out / "SegmentationClass" / "p.png", out / "overlays" / "p.png"

    def stopped_at_the_overlay(
        stop,
    ):  # os.replace, stopped where it would rename the overlay into place
        def replace(src, dst):
            if str(dst) == str(overlay):
                stop()
            return real_replace(src, dst)

        return replace

    def ctrl_c():
        raise KeyboardInterrupt  # as Python's own SIGINT handler raises it

    def sigterm():
        with handlers_kept():
            slime.interrupt(signal.SIGTERM, None)  # slime's handler of SIGTERM (and SIGHUP)

    for e, flags, stop, sig in (
        (emb, [], ctrl_c, signal.SIGINT),
        (other, ["--overwrite"], sigterm, signal.SIGTERM),
    ):
        capsys.readouterr()
        with monkeypatch.context() as m:
            m.setattr(os, "replace", stopped_at_the_overlay(stop))
            assert predict(e, out, *flags) == 128 + sig
        assert (
            capsys.readouterr().err == f"slime: interrupted by {sig.name}; finished outputs kept\n"
        )
        # stopped at the pair's second rename: this run's mask is in place, the overlay is not, no
        # temp file
        assert mask.read_bytes() == fresh[e][0] and not overlay.exists() and hidden_files(out) == []
        assert predict(e, out) == 0  # the same run resumes: the mask alone is no finished image
        assert capsys.readouterr().err == ""
        assert pair_bytes(out, "p") == fresh[e] and hidden_files(out) == []


def test_bmp_images_and_masks_are_read(tmp_path):
    """PIL keeps a BMP's compression as a number: no string test may trip on it."""
    img, mask = synthetic_scene(size=64)
    Image.fromarray(img).save(tmp_path / "a.bmp")
    Image.fromarray(mask).save(tmp_path / "m.bmp")
    assert torch.equal(
        slime.read_image(tmp_path / "a.bmp"), torch.from_numpy(img).permute(2, 0, 1).float() / 255
    )
    assert np.array_equal(slime.read_mask(tmp_path / "m.bmp"), mask)


def test_the_run_covers_the_weights_and_the_number_format(
    tmp_path, tiny_ckpt, emb, capsys, no_load
):
    """Other weights in a file of the same size and header (a merged LoRA) or another dtype are
    another run, refused by the plan (before the model loads)."""
    ckpt, no_load.refusing = tiny_ckpt("sd2"), False
    raw = bytearray(open(ckpt, "rb").read())
    raw[len(raw) // 2] ^= 1  # one bit in the middle, where a LoRA merged into the UNet lands
    (tmp_path / "tuned.safetensors").write_bytes(bytes(raw))
    img, _ = scene_files(tmp_path, size=64)
    args = ["predict", str(emb), str(img), "-o", str(tmp_path / "out"), "-q"]
    assert slime.main(args + ["--ckpt", ckpt]) == 0
    tuned, dtype = (
        ["--ckpt", str(tmp_path / "tuned.safetensors")],
        ["--ckpt", ckpt, "--dtype", "bf16"],
    )
    for flags, differs in (
        (tuned, r"checkpoint [0-9a-f]{16} there, [0-9a-f]{16} here"),
        (dtype, "dtype float32 there, bfloat16 here"),
    ):
        assert no_load.plan_refuses(slime.main, args + flags) == 2
        assert re.search(f"holds outputs of another run \\({differs}\\)", capsys.readouterr().err)
    assert slime.main(args + ["--ckpt", ckpt]) == 0  # the same run resumes


def test_auto_resumes_in_the_number_format_of_the_outputs_it_continues(
    tmp_path, tiny_ckpt, emb, capsys, monkeypatch, no_load
):
    """emb.pt and the run record keep the format used. auto takes the record's format, so a resume
    neither refuses nor redoes what an earlier run made; an explicit other --dtype is another
    run."""
    (tmp_path / "in").mkdir()
    Image.fromarray(synthetic_scene(size=64)[0]).save(tmp_path / "in" / "a.png")
    args = ["predict", emb, tmp_path / "in", "-o", tmp_path / "out", "--ckpt", tiny_ckpt("sd2")]
    no_load.refusing = False
    assert main(*args) == 0  # auto: fp32
    assert slime.load_embeddings(emb)["dtype"] == "float32"
    assert json.loads((tmp_path / "out" / "slime-run.json").read_text())["dtype"] == "float32"
    capsys.readouterr()
    assert main(*args) == 0
    err = capsys.readouterr().err
    assert (
        "fp32: the number format of the outputs it resumes" in err
        and "skipped 1 already done" in err
    )
    assert no_load.plan_refuses(main, *args, "--dtype", "bf16") == 2
    assert (
        "holds outputs of another run (dtype float32 there, bfloat16 here)"
        in capsys.readouterr().err
    )
    e = torch.load(
        emb, weights_only=True
    )  # an emb.pt saved in bf16 is read as fit saves it, in fp32
    e["context"], e["learned"] = e["context"].bfloat16(), e["learned"].bfloat16()
    torch.save(e, tmp_path / "bf16.pt")
    assert slime.load_embeddings(tmp_path / "bf16.pt")["context"].dtype == torch.float32


# ----------------------------------------------------------------------------- one bad image
def test_an_unreadable_image_is_named_and_skipped_and_the_others_are_done(
    tmp_path, tiny_ckpt, emb, capsys
):
    """Found when its turn comes: a truncated PNG, an empty file, a float TIFF with nan. Each is
    named in one line and skipped, -q or not (a script must know), and summary.json lists it with
    the reason; the good image is done; the last line counts them; exit status 1. A rerun
    resumes."""
    (tmp_path / "in").mkdir()
    Image.fromarray(synthetic_scene(size=64)[0]).save(tmp_path / "in" / "good.png")
    Image.fromarray(synthetic_scene(size=64)[0]).save(tmp_path / "in" / "cut.png")
    (tmp_path / "in" / "cut.png").write_bytes((tmp_path / "in" / "cut.png").read_bytes()[:300])
    (tmp_path / "in" / "empty.png").write_bytes(b"")
    Image.fromarray(np.full((64, 64), np.nan, np.float32)).save(tmp_path / "in" / "nan.tif")
    out, d = tmp_path / "out", tmp_path / "in"
    args = ["predict", str(emb), str(d), "-o", str(out), "--ckpt", tiny_ckpt("sd2")]
    assert slime.main(args) == 1
    lines = capsys.readouterr().err.splitlines()
    assert [line for line in lines if line.startswith("skipped ")] == [
        f"skipped {d}/cut.png: image file is truncated",
        f"skipped {d}/empty.png: cannot identify image file",
        f"skipped {d}/nan.tif holds nan or inf pixel values",
    ]
    assert lines[-1] == f"wrote masks and overlays of 1 image to {out}; could not read 3 images"
    assert outputs(out) == outputs(None, ["good"])
    assert [r["image"] for r in json.loads((out / "summary.json").read_text())["images"]] == [
        str(d / "good.png")
    ]
    assert (
        slime.main(args + ["-q"]) == 1
    )  # the good one is done; the bad ones are still bad, and said
    skipped = [line for line in lines if line.startswith("skipped ")]
    assert capsys.readouterr().err.splitlines() == skipped
    unread = json.loads((out / "summary.json").read_text())["unread"]
    assert [f"skipped {u['reason']}" for u in unread] == skipped
    assert (
        main("predict", str(emb), str(d / "good.png"), "-o", str(out), "--ckpt", tiny_ckpt("sd2"))
        == 0
    )


def test_another_checkpoint_of_the_same_kind_is_said(tmp_path, emb, capsys, monkeypatch):
    """emb.pt keeps the fingerprint of the weights it was fitted on: other weights of the same kind
    (a fine-tune, an edited copy) are used, as they may be meant, with one warning line naming both
    files."""
    other = tmp_path / "other.safetensors"
    write_tiny_checkpoint(other, "sd2", seed=1)
    Image.fromarray(synthetic_scene(size=64)[0]).save(tmp_path / "a.png")
    # the plan said it: stop
    stop = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)  # noqa: E731
    monkeypatch.setattr(slime, "load_models", stop)
    out = tmp_path / "out"
    assert (
        main("predict", emb, tmp_path / "a.png", "-o", out, "--ckpt", other, "--dtype", "fp32")
        == 130
    )
    warning = f"warning: {emb} was fitted on another checkpoint than {other} (a fine-tune, a copy?)"
    assert warning in capsys.readouterr().err.splitlines()


def test_an_image_that_looks_like_a_mask_is_named(tmp_path, tiny_ckpt, emb, capsys):
    """The reverse of the photo given as a mask: a mask in a folder of photos is segmented, with a
    warning."""
    (tmp_path / "in").mkdir()
    Image.fromarray(synthetic_scene(size=64)[0]).save(tmp_path / "in" / "a.png")
    Image.fromarray(synthetic_scene()[1]).resize((64, 64), Image.NEAREST).save(
        tmp_path / "in" / "a_mask.png"
    )
    assert (
        main("predict", emb, tmp_path / "in", "-o", tmp_path / "out", "--ckpt", tiny_ckpt("sd2"))
        == 0
    )
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert warned == [f"warning: {tmp_path / 'in' / 'a_mask.png'} has only 3 colours, like a mask"]


def test_the_same_image_named_twice_is_segmented_once(tmp_path, tiny_ckpt, emb, capsys):
    img, _ = scene_files(tmp_path, size=64)
    alias, out = tmp_path / "alias.png", tmp_path / "out"
    os.symlink(img, alias)
    assert main("predict", emb, img, img, alias, "-o", out, "--ckpt", tiny_ckpt("sd2")) == 0
    assert "wrote masks and overlays of 1 image to" in capsys.readouterr().err
    assert outputs(out) == outputs(None, ["a"])


def test_colour_ground_truth_in_the_parts_colours_scores_as_labels(
    tmp_path, tiny_ckpt, emb, capsys, segment_once
):
    """emb.pt fitted on label masks colours its parts as VOC does; ground truth saved in those
    colours (as predict writes its masks), one of which lacks a class, scores exactly as the label
    masks do."""
    ckpt = tiny_ckpt("sd2")
    for d in ("in", "gt_labels", "gt_colours"):
        (tmp_path / d).mkdir()
    img, mask = synthetic_scene()
    other = mask[:, ::-1].copy()
    other[other == 1] = 0  # b's ground truth has no class 1
    for name, image, labels in (("a", img, mask), ("b", img[:, ::-1].copy(), other)):
        Image.fromarray(image).save(tmp_path / "in" / f"{name}.png")
        Image.fromarray(labels).save(tmp_path / "gt_labels" / f"{name}.png")
        Image.fromarray(slime.VOC_PALETTE[labels]).save(tmp_path / "gt_colours" / f"{name}.png")
    tables = []
    for gt in ("gt_labels", "gt_colours"):
        args = ["predict", emb, tmp_path / "in", "-o", tmp_path / f"out_{gt}", "--ckpt", ckpt]
        assert main(*args, "--masks", tmp_path / gt, "-q") == 0
        tables.append(capsys.readouterr().out)
    assert tables[0] == tables[1] and "mIoU" in tables[0]


def test_an_all_ignore_ground_truth_scores_nothing_instead_of_zero(
    tmp_path, tiny_ckpt, emb, capsys
):
    (tmp_path / "in").mkdir()
    (tmp_path / "gt").mkdir()
    Image.fromarray(synthetic_scene(size=64)[0]).save(tmp_path / "in" / "a.png")
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(tmp_path / "gt" / "a.png")
    args = ["predict", emb, tmp_path / "in", "-o", tmp_path / "out", "--ckpt", tiny_ckpt("sd2")]
    assert main(*args, "--masks", tmp_path / "gt") == 0
    out = capsys.readouterr()
    assert (
        "mIoU" not in out.out
        and "nothing was scored: every ground-truth mask is all 'ignore' (255)" in out.err
    )
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["miou"] is None


# ----------------------------------------------------------------------------- whole or absent
def test_a_full_disk_leaves_no_half_pair_and_says_which_file(tmp_path, tiny_ckpt, emb):
    """RLIMIT_FSIZE makes every write past 20 kB fail (EFBIG) as a full disk would (ENOSPC): the
    small mask PNG fits, the overlay does not, and neither may appear without the other."""
    import resource

    (tmp_path / "in").mkdir()
    Image.fromarray(synthetic_scene(size=256)[0]).save(tmp_path / "in" / "a.png")

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    out = tmp_path / "out"
    r = cli(
        "predict",
        emb,
        tmp_path / "in",
        "-o",
        out,
        "--ckpt",
        tiny_ckpt("sd2"),
        "-q",
        preexec_fn=limit,
    )
    assert_refused(r, f"slime: error: {out / 'overlays' / 'a.png'}: File too large\n")
    # the small run record fits; no mask without its overlay, no temp file
    assert sorted(str(p.relative_to(tmp_path)) for p in out.rglob("*") if p.is_file()) == [
        "out/slime-run.json"
    ]


# Ctrl-C to fit: tests/test_resume.py, which resumes the stopped fit; SIGTERM (whose handler SIGHUP
# shares) to predict: test_a_stopped_predict_exits_128_plus_the_signal_keeping_whole_pairs
def test_a_killed_fit_leaves_a_whole_emb_pt(tmp_path, tiny_ckpt):
    """kill -9 ends fit with nothing at all, and emb.pt is the last epoch's save, whole: every write
    goes to a temp file that is renamed over it."""
    img, mask = scene_files(tmp_path)
    out = tmp_path / "emb.pt"
    args = ["fit", img, mask, "--ckpt", tiny_ckpt("sd2"), *FAST, "--epochs", "50", "-o", out, "-q"]
    proc = subprocess.Popen([*SLIME, *args], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not out.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert out.exists(), "fit never wrote emb.pt"
    time.sleep(0.5)  # stop it mid-run, possibly mid-write of an epoch's emb.pt
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=120)
    assert (
        proc.returncode == -signal.SIGKILL
    )  # a killed write may leave a temp file, never a half emb.pt
    assert slime.load_embeddings(out)["resume"]["epoch"] >= 1


def test_predict_killed_then_rerun_finishes_every_image(emb, tmp_path, tiny_ckpt, capsys):
    (tmp_path / "in").mkdir()
    for i in range(4):
        Image.fromarray(synthetic_scene(seed=i)[0]).resize((64, 64)).save(
            tmp_path / "in" / f"s{i}.png"
        )
    out = tmp_path / "out"
    args = [
        "predict",
        str(emb),
        str(tmp_path / "in"),
        "-o",
        str(out),
        "--ckpt",
        tiny_ckpt("sd2"),
        "-q",
    ]
    proc = subprocess.Popen(SLIME + args, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "overlays" / "s0.png").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "overlays" / "s3.png").exists(), "predict finished before it was killed"
    assert slime.main(args[:-1]) == 0  # the rerun, in this process
    assert (
        " already done (--overwrite redoes them)" in capsys.readouterr().err.splitlines()[-1]
    )  # finished ones kept
    assert outputs(out) == outputs(
        None, [f"s{i}" for i in range(4)]
    )  # a kill mid-write may leave a hidden temp file
    for f in outputs(out):
        if f.endswith(".png"):
            Image.open(out / f).load()  # every output complete


def test_a_stopped_predict_exits_128_plus_the_signal_keeping_whole_pairs(emb, tmp_path, tiny_ckpt):
    """SIGTERM to a real predict once its first image is written: exit 143 and one line; the images
    finished are kept as whole pairs, the one in progress leaves nothing, no temp file remains.
    (SIGINT, exit 130, and slime's own SIGTERM handler are run in-process by
    test_a_pair_interrupted_between_its_renames_...)"""
    (tmp_path / "in").mkdir()
    stems = [f"s{i}" for i in range(4)]
    for i, stem in enumerate(stems):
        Image.fromarray(synthetic_scene(seed=i)[0]).resize((64, 64)).save(
            tmp_path / "in" / f"{stem}.png"
        )
    out = tmp_path / "out"
    args = ["predict", emb, tmp_path / "in", "-o", out, "--ckpt", tiny_ckpt("sd2"), "-q"]
    proc = subprocess.Popen(SLIME + list(map(str, args)), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while (
        not (out / "overlays" / "s0.png").exists()
        and time.time() < deadline
        and proc.poll() is None
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (
        128 + signal.SIGTERM,
        "slime: interrupted by SIGTERM; finished outputs kept\n",
    )
    assert not (out / "overlays" / "s3.png").exists(), "predict finished before it was stopped"
    made = {
        d: [s for s in stems if (out / d / f"{s}.png").exists()]
        for d in ("SegmentationClass", "overlays")
    }
    masks, done = made["SegmentationClass"], made["overlays"]
    assert masks == stems[: len(masks)] and done[:1] == [
        "s0"
    ]  # in order; how many is the timing's (1 to 3)
    # whole pairs; the one mask alone this lets through is the last, from a signal between its
    # pair's two renames (a window of microseconds; the resume redoes it, see
    # test_a_pair_interrupted_between_...)
    assert done in (masks, masks[:-1])
    # the pairs, the run record and the run's files, which list the images done; no hidden temp file
    # either
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(
        ["slime-run.json", *slime.RUN_FILES]
        + [f"{d}/{s}.png" for d, made_there in made.items() for s in made_there]
    )
    assert (out / slime.RUN_FILES[1]).read_text().split() == done
    for d, made_there in made.items():
        for s in made_there:
            Image.open(out / d / f"{s}.png").load()  # complete files


def test_a_diverging_loss_stops_fit_naming_the_likely_cause(
    tmp_path, tiny_ckpt, capsys, monkeypatch
):
    """The weights are checked finite at load, so a non-finite loss is the optimisation's: the
    message says so."""
    img, mask = scene_files(tmp_path)
    step, calls = slime.training_step, []

    def diverging(*a, **kw):
        calls.append(1)
        loss, terms = step(*a, **kw)
        return (loss * float("nan"), terms) if len(calls) == 2 else (loss, terms)

    monkeypatch.setattr(slime, "training_step", diverging)
    out = tmp_path / "emb.pt"
    assert (
        main("fit", img, mask, "--ckpt", tiny_ckpt("sd2"), *FAST, "--epochs", "3", "-o", out, "-q")
        == 2
    )
    err = capsys.readouterr().err
    assert (
        "the loss became nan at step 2" in err
        and "the learning rate is the likely cause (the weights were "
        "checked finite at load): try a lower --lr; the best emb.pt so far is kept"
        in err
    ), err
    kept = slime.load_embeddings(out)  # epoch 1 was validated before the loss diverged
    assert (
        kept["epoch"] == 1 and torch.isfinite(kept["context"]).all()
    )  # counted from 1, as the console says


# ----------------------------------------------------------------------------- inputs that work
def test_half_precision_checkpoints_work_through_the_cli(emb, tmp_path):
    img, _ = scene_files(tmp_path, size=64)
    for dtype in (torch.float16, torch.bfloat16):
        ckpt = write_tiny_checkpoint(tmp_path / f"{dtype}.safetensors", "sd2", dtype=dtype)
        assert main("predict", emb, img, "-o", tmp_path / str(dtype), "--ckpt", ckpt, "-q") == 0
        assert (tmp_path / str(dtype) / "SegmentationClass" / "a.png").exists()


def test_names_with_spaces_and_unicode(emb, tmp_path, tiny_ckpt):
    (tmp_path / "în pùt").mkdir()
    Image.fromarray(synthetic_scene(size=64)[0]).save(tmp_path / "în pùt" / "my imäge ✓.png")
    out = tmp_path / "öut put"
    assert (
        main("predict", emb, tmp_path / "în pùt", "-o", out, "--ckpt", tiny_ckpt("sd2"), "-q") == 0
    )
    assert outputs(out) == outputs(None, ["my imäge ✓"])


def test_the_progress_eta_comes_from_steady_state_times(monkeypatch):
    """fit's ETA: the steps left at the pace of the last 5 steps, and the validations left at the
    time of the last one (the first one also encodes the validation patches, once per fit); none
    before the first validation."""
    lines, clock = (
        [],
        iter([0.0, 10, 10, 20, 20, 20, 170, 180, 180]),
    )  # each step reads the clock twice
    monkeypatch.setattr(slime.time, "time", lambda: next(clock))
    con = SimpleNamespace(progress=lambda text, eta=None, force=False: lines.append((text, eta)))
    progress = slime.fit_progress(
        con, slime.Settings(epochs=4, val_every=2), 2
    )  # 8 steps, 2 validations
    step = dict(event="step", steps=8, epoch=1, ce=1, mse=2, sd=3)
    for e in (
        dict(step, step=1),
        dict(step, step=2),
        dict(event="validating", epoch=1),
        dict(event="validation", epoch=1, miou=0.5, best=True, seconds=150),
        dict(step, step=3, epoch=2),
    ):
        progress(e)
    assert lines[0] == (
        "epoch 1/4  step 1/8  ce 1.0000  mse 2.0000  sd 3.0000",
        None,
    )  # no validation timed yet
    assert lines[2] == ("epoch 1/4  validating", None)
    assert lines[3] == (
        "epoch 1/4  validation mIoU 0.5000, the best so far: saved",
        6 * 10 + 1 * 150,
    )  # 6 steps left
    assert lines[4][1] == 5 * 10 + 1 * 150  # 5 steps left at 10 s, 1 validation at 150 s


def test_an_empty_result_is_said_with_its_likely_cause(tmp_path, tiny_ckpt, emb, capsys):
    img, _ = scene_files(tmp_path, size=64)
    assert (
        main(
            "predict",
            emb,
            img,
            "-o",
            tmp_path / "out",
            "--ckpt",
            tiny_ckpt("sd2"),
            "--threshold",
            "1",
        )
        == 0
    )
    assert capsys.readouterr().err.splitlines()[-2:] == [
        "warning: 1 of 1 image got no part; a lower --threshold helps",
        f"wrote masks and overlays of 1 image to {tmp_path / 'out'}",
    ]


def test_a_part_without_pixels_warns_and_fit_goes_on(tmp_path, tiny_ckpt, capsys):
    img, mask = scene_files(tmp_path)
    parts = ["--parts", "background,square,disc,wheel"]
    assert (
        main("fit", img, mask, *parts, "--ckpt", tiny_ckpt("sd2"), *FAST, "-o", tmp_path / "e.pt")
        == 0
    )
    assert (
        "warning: part 3 (wheel) has no pixels in any training mask: not learned"
        in capsys.readouterr().err
    )
    assert slime.load_embeddings(tmp_path / "e.pt")["parts"] == [
        "background",
        "square",
        "disc",
        "wheel",
    ]


def test_cuda_out_of_memory_says_what_to_try(monkeypatch, capsys, tmp_path):
    def oom(args, con):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(slime, "cmd_fit", oom)
    assert main("fit", *map(str, scene_files(tmp_path, size=64))) == 2
    err = capsys.readouterr().err
    assert (
        err == "slime: error: the GPU ran out of memory: try --dtype bf16, --patches-per-side 1\n"
    )


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_predict_never_runs_pickled_code(tmp_path, tiny_ckpt):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": "slime-embeddings/1", "x": Evil()}, f)
    img, _ = scene_files(tmp_path, size=64)
    r = cli(
        "predict",
        tmp_path / "evil.pt",
        img,
        "-o",
        tmp_path / "out",
        "--ckpt",
        tiny_ckpt("sd2"),
        cwd=tmp_path,
    )
    assert_refused(
        r, "evil.pt: damaged, not a torch file, or holds pickled code, which slime never runs"
    )
    assert not (tmp_path / "pwned").exists()


def test_empty_folders_and_skipped_files(emb, tmp_path, tiny_ckpt, capsys, no_load):
    """A folder of no images is the plan's refusal, before the model loads; what it skipped is named
    first."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    ckpt = ["--ckpt", tiny_ckpt("sd2")]
    assert main("predict", str(emb), str(tmp_path / "empty"), *ckpt) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-2:] == [
        "skipped 1 non-image file: notes.txt",
        f"slime: error: {tmp_path / 'empty'} holds no images "
        "(.png, .jpg, .jpeg, .webp, .bmp, .gif, .tif, .tiff)",
    ]
    (tmp_path / "void").mkdir()
    assert main("predict", str(emb), str(tmp_path / "void"), *ckpt) == 2
    assert "void holds no images" in capsys.readouterr().err and no_load == []


def test_exif_rotated_photo_pairs_with_a_mask_of_its_displayed_size(tmp_path, tiny_ckpt, capsys):
    """A phone photo stored 64x32 with EXIF orientation 6 shows as 32x64; its mask is drawn on what
    shows."""
    img, mask = synthetic_scene()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    photo, labels, e = tmp_path / "phone.jpg", tmp_path / "phone_mask.png", tmp_path / "e.pt"
    Image.fromarray(img).resize((32, 64)).transpose(Image.Transpose.ROTATE_90).save(
        photo, exif=exif.tobytes(), quality=95
    )
    Image.fromarray(mask).resize((32, 64), Image.NEAREST).save(labels)
    assert main("fit", photo, labels, "--ckpt", tiny_ckpt("sd2"), *FAST, "-o", e, "-q") == 0
    (tmp_path / "gt").mkdir()
    os.replace(labels, tmp_path / "gt" / "phone.png")  # and scores against it in predict
    flags = ["--masks", tmp_path / "gt", "--ckpt", tiny_ckpt("sd2"), "-q"]
    assert main("predict", e, photo, "-o", tmp_path / "out", *flags) == 0
    assert Image.open(tmp_path / "out" / "SegmentationClass" / "phone.png").size == (32, 64)
    # a mask drawn on the file as stored (64x32) fits no image as shown: the refusal names EXIF
    Image.fromarray(mask).resize((64, 32), Image.NEAREST).save(labels)
    assert (
        main("fit", photo, labels, "--ckpt", tiny_ckpt("sd2"), "-o", tmp_path / "f.pt", "-q") == 2
    )
    assert capsys.readouterr().err == (
        f"slime: error: {labels} is (64, 32), its image (32, 64) (w, h); "
        "its EXIF orientation turns it as shown: turn the mask too\n"
    )
    os.replace(labels, tmp_path / "gt" / "phone.png")  # predict's ground truth too
    assert main("predict", e, photo, "-o", tmp_path / "out2", *flags) == 2
    assert "its EXIF orientation turns it as shown: turn the mask too" in capsys.readouterr().err


@pytest.mark.skipif(
    any(f.endswith(".safetensors") for f in os.listdir(os.path.join(ROOT, "weights"))),
    reason="a real checkpoint is in weights/",
)
def test_no_checkpoint_in_weights(tmp_path, capsys, no_load):
    assert main("fit", *map(str, scene_files(tmp_path, size=64))) == 2 and no_load == []
    assert (
        "weights holds 0 checkpoints: see weights/README.md, or pass --ckpt"
        in capsys.readouterr().err
    )


def test_tiny_and_odd_images_are_segmented_at_their_own_size(emb, tmp_path, tiny_ckpt):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "in" / "tiny.png")
    Image.fromarray((np.arange(70 * 50) % 65536).reshape(50, 70).astype(np.uint16)).save(
        tmp_path / "in" / "gray16.png"
    )
    assert (
        main(
            "predict",
            emb,
            tmp_path / "in",
            "-o",
            tmp_path / "out",
            "--ckpt",
            tiny_ckpt("sd2"),
            "-q",
        )
        == 0
    )
    assert Image.open(tmp_path / "out" / "SegmentationClass" / "tiny.png").size == (16, 16)
    assert Image.open(tmp_path / "out" / "SegmentationClass" / "gray16.png").size == (70, 50)


def test_an_image_over_slimes_pixel_limit_is_refused_by_the_plan(
    tmp_path, tiny_ckpt, emb, capsys, monkeypatch, no_load
):
    """The header's size against slime.MAX_PIXELS, before the model loads: in predict's plan for
    every image listed, in fit's as it reads its images. Here the limit is 3,000 pixels and the
    images are 64x64."""
    img, mask = scene_files(tmp_path, size=64)
    monkeypatch.setattr(slime, "MAX_PIXELS", 3000)
    line = (
        f"slime: error: {img} has 0.0041 megapixels, over slime's limit of 0.003 "
        "(as float32 it alone takes 12 bytes a pixel): shrink it\n"
    )
    before = listing(tmp_path)
    assert (
        main("predict", emb, tmp_path, "-o", tmp_path / "out", "--ckpt", tiny_ckpt("sd2"), "-q")
        == 2
    )
    assert capsys.readouterr().err == line and no_load == [] and listing(tmp_path) == before
    assert main("fit", img, mask, "--ckpt", tiny_ckpt("sd2"), "-o", tmp_path / "e.pt", "-q") == 2
    assert capsys.readouterr().err == line and no_load == [] and listing(tmp_path) == before


def test_a_12000x9000_photo_is_segmented_at_full_size_in_bounded_memory(
    emb, tmp_path, tiny_ckpt, monkeypatch
):
    """108 MP: no bomb warning (PIL's limit is off; slime's own is MAX_PIXELS, 250 MP), and a peak
    of ~3 GB (the image alone is 1.3 GB as float32); whole-image float temporaries took 11 GB."""
    (tmp_path / "in").mkdir()
    h, w = 9000, 12000
    ramp = (
        np.arange(w, dtype=np.uint16)[None] * 255 // w
        + np.arange(h, dtype=np.uint16)[:, None] * 255 // h
    ) // 2
    Image.fromarray(np.repeat(ramp.astype(np.uint8)[..., None], 3, -1)).save(
        tmp_path / "in" / "huge.jpg", quality=80
    )
    code = (
        PEAK_MEMORY
        + "import sys, slime; rc = slime.main(sys.argv[1:]); print(peak_memory()); sys.exit(rc)"
    )
    out = tmp_path / "out"
    args = ["predict", emb, tmp_path / "in", "-o", out, "--ckpt", tiny_ckpt("sd2")]
    r = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert r.returncode == 0, r.stderr
    assert (
        r.stderr.splitlines()[-1] == f"wrote masks and overlays of 1 image to {out}"
        and "Warning" not in r.stderr
    )
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # no bomb warning for the test's own check
    assert (
        Image.open(out / "SegmentationClass" / "huge.png").size
        == (w, h)
        == Image.open(out / "overlays" / "huge.png").size
    )
    assert int(r.stdout.split()[1]) < 4.5e6  # VmHWM in kB


def test_every_terminal_line_is_whole(tmp_path, tiny_ckpt):
    """fit on a terminal (a pty): the progress line updates in place (\\r, then \\x1b[K clears what
    a longer line left), and every notice starts a line of its own, so what the user sees is whole
    lines only."""
    import pty

    img, mask = tmp_path / "a.png", tmp_path / "a_mask.png"
    Image.fromarray(synthetic_scene(size=128)[0]).save(img)
    colours = np.zeros((128, 128, 3), np.uint8)
    colours[10:60, 10:60], colours[70:120, 50:110] = (200, 0, 0), (0, 200, 0)
    Image.fromarray(colours).save(mask)
    leader, follower = pty.openpty()
    args = ["fit", img, mask, "--ckpt", tiny_ckpt("sd2"), *FAST, "--epochs", "1"]
    args += ["-o", tmp_path / "emb.pt"]
    proc = subprocess.Popen([*SLIME, *args], stderr=follower, stdout=follower)
    os.close(follower)
    raw = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the pty
            break
        if not chunk:
            break
        raw += chunk
    assert proc.wait(timeout=300) == 0, raw
    shown = [
        line.split("\r")[-1].replace("\x1b[K", "")
        for line in raw.decode().replace("\r\n", "\n").split("\n")
    ]
    starts = (
        "running on the CPU",
        "loading ",
        "fitting 2 parts",
        "mask colours -> parts: (0, 0, 0) background, (0, 200, 0) part1, (200, 0, 0) part2",
        "fit finished: ",
        "next: ",
        "epoch ",
    )
    for line in filter(None, shown):
        assert line.startswith(starts) and sum(line.count(s.strip()) for s in starts[:-1]) <= 1, (
            shown
        )
    assert "fitting 2 parts ['part1', 'part2'] on 1 image: 1 epoch of 1 step, 1 validation" in shown
    stages = (
        raw.decode().replace("\r\n", "\n").replace("\r", "\n")
    )  # every state of the progress line, too
    for stage in (
        "loading " + str(tiny_ckpt("sd2")),
        "epoch 1/1  step 1/1  ce ",
        "epoch 1/1  validating",
        "epoch 1/1  validation mIoU ",
    ):
        assert stage in stages, stages
    assert shown[-3].startswith(
        f"fit finished: {tmp_path / 'emb.pt'} holds epoch 1 (validation mIoU "
    ), shown
    emb = tmp_path / "emb.pt"
    curve = f"(the fit's curve: python examples/maps.py {emb} --curve -o curve.png)"
    assert shown[-2] == f"next: python slime.py predict {emb} IMAGES/ -o out/ {curve}", shown


def test_a_long_stage_keeps_its_line_moving(capsys, monkeypatch):
    """A stage with no event of its own (a UNet pass, a model load) is never silent: on a terminal
    the ticker redraws the stage line every second with its clock moving; a notice ends the line,
    and nothing follows it."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    con = slime.Console(False)
    try:
        con.progress("loading x.safetensors", force=True)
        time.sleep(3.3)  # no progress() call meanwhile: only the ticker draws
        con.say("a notice")
        time.sleep(1.5)
    finally:
        con.done.set()
    err = capsys.readouterr().err
    drawn, after = err.split("\na notice\n")
    # at least 2 redraws after the first, and the clock moved (a slow machine may skip a second)
    clocks = re.findall(r"\rloading x\.safetensors  (\d+) s elapsed", drawn)
    assert len(clocks) >= 3 and len(set(clocks)) >= 2, err
    assert after == "", err  # the stage ended with the notice: the ticker draws no stale line
