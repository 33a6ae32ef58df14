"""examples/release_embeddings.py: the authors' folder of embedding_<i>.pth files -> a slime emb.pt.

    python -m pytest -q tests/test_release_embeddings.py

The folders are written as the release writes them (release/src/slime.py#L61-L64, #L327-L330): each
vector a (1, 1, D) slice, cloned, requires_grad_(True), torch.save'd. Every refusal is one line,
exit 2, no output, and comes before the model loads.
"""

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import slime
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "examples"))
import release_embeddings  # noqa: E402

CAR = slime.PRESETS["pascal-car"]["parts"].split(",")  # 6 classes: 5 files


class Thing:  # a pickled object of the test's own class: torch.load(weights_only=True) refuses it
    pass


def write_release(folder, text_embedding, n):
    """embedding_0.pth .. embedding_{n-1}.pth as the release saves them: slices 1..n of
    (1, 77, D)."""
    os.makedirs(folder, exist_ok=True)
    for i in range(1, n + 1):
        embedding = text_embedding[:, i : i + 1].clone()
        embedding.requires_grad_(True)
        torch.save(embedding, os.path.join(folder, f"embedding_{i - 1}.pth"))


@pytest.fixture(scope="module")
def cond(
    tiny_ckpt,
):  # the tiny SD 2 model's text encoder output for "part" x 6 (6 = the car's classes)
    return slime.prompt_contexts(slime.load_models(tiny_ckpt("sd2")), len(CAR))[0]


def test_a_release_folder_becomes_the_emb_pt_fit_would_write_and_predict_reads(
    tiny_ckpt, cond, tmp_path, capsys
):
    ckpt, folder, emb, K = (
        tiny_ckpt("sd2"),
        str(tmp_path / "release"),
        str(tmp_path / "emb.pt"),
        len(CAR),
    )
    fitted = cond + torch.randn(
        cond.shape, generator=torch.Generator().manual_seed(0)
    )  # "trained" vectors
    write_release(folder, fitted, K - 1)
    torch.save(dict(format=slime.EMB_FORMAT), emb)  # --overwrite replaces an existing emb.pt
    argv = [folder, "--preset", "pascal-car", "--ckpt", ckpt, "-o", emb, "--overwrite"]
    assert release_embeddings.main(argv) == 0
    assert (
        capsys.readouterr().out
        == f"wrote {emb}: 5 parts from {folder}, settings of --preset pascal-car\n"
    )
    e = slime.load_embeddings(emb)
    # the release's test-time context (release/src/slime.py#L349-L356), written out by hand
    want = torch.cat([cond[:, :1], fitted[:, 1:K], cond[:, K:]], dim=1)
    assert torch.equal(e["context"], want)
    assert torch.equal(e["context"], slime.with_learned(fitted[0, 1:K], cond))  # as fit builds it
    assert (
        e["parts"] == CAR and e["family"] == "sd2" and e["fingerprint"] == slime.fingerprint(ckpt)
    )
    s = e["settings"]
    assert s.bgr and s.out_size == 512 and not s.cycle_parts  # the release's, not slime's defaults
    assert (s.patch_size, s.patches_per_side, s.min_crop_ratio, s.rotation) == (512, 1, 0.6, 30.0)
    # predict reads it: one 64x64 image, one patch, and the release's 512x512 mask
    image, out = str(tmp_path / "car.png"), str(tmp_path / "out")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(image)
    flags = ["--patches-per-side", "1", "--patch-size", "512", "--dtype", "fp32", "-q"]
    assert slime.main(["predict", emb, image, "-o", out, "--ckpt", ckpt, *flags]) == 0
    assert Image.open(os.path.join(out, "SegmentationClass", "car.png")).size == (512, 512)


def write_bad(kind, folder, ckpt):
    """A release folder for --parts background,a,b (2 vectors) with one thing wrong; -> the expected
    error."""
    ok = torch.randn(1, 1, 64)
    path = lambda i: os.path.join(folder, f"embedding_{i}.pth")  # noqa: E731
    files = {0: ok, 1: ok}
    if kind == "pickled object":
        files[0] = Thing()
        why = f"{path(0)}: not a torch file, or holds pickled code, which is never unpickled"
    elif kind == "dict":
        files[1] = {"embedding": ok}
        why = f"{path(1)} holds a dict, not a float tensor"
    elif kind == "nan":
        files[1] = torch.full((1, 1, 64), float("nan"))
        why = f"{path(1)} holds nan or inf values"
    elif kind == "width":  # 32 wide, against the tiny checkpoint's 64
        files = {0: torch.randn(1, 1, 32), 1: torch.randn(1, 1, 32)}
        why = f"{path(0)} is 32 wide, but {ckpt}'s text width is 64"
    elif kind == "gap":
        files = {0: ok, 2: ok}
        why = f"{path(1)} is missing: a gap"
    elif kind == "fewer":
        files = {0: ok}
        why = f"{folder} holds 1 embedding file, but 3 classes take 2"
    elif kind == "more":
        files = {0: ok, 1: ok, 2: ok}
        why = f"{folder} holds 3 embedding files, but 3 classes take 2"
    os.makedirs(folder)
    for i, x in files.items():
        torch.save(x, path(i))
    return why


@pytest.mark.parametrize(
    "kind", ["pickled object", "dict", "nan", "width", "gap", "fewer", "more", "exists"]
)
def test_refusals_are_one_line_before_the_model_loads_and_write_nothing(
    kind, tiny_ckpt, tmp_path, capsys, monkeypatch
):
    ckpt, folder, emb = tiny_ckpt("sd2"), str(tmp_path / "release"), str(tmp_path / "emb.pt")
    monkeypatch.setattr(slime, "load_models", lambda *a, **k: pytest.fail("the model loaded"))
    if kind == "exists":
        write_bad("nan", folder, ckpt)  # never read: the existing -o is refused first
        with open(emb, "wb") as f:
            f.write(b"keep")
        # as fit: --overwrite replaces only an emb.pt
        why = f"{emb} is no slime emb.pt: choose another -o"
    else:
        why = write_bad(kind, folder, ckpt)
    argv = [folder, "--parts", "background,a,b", "--ckpt", ckpt, "-o", emb] + ["--overwrite"] * (
        kind == "exists"
    )
    assert release_embeddings.main(argv) == 2
    assert capsys.readouterr() == ("", f"error: {why}\n")
    if kind == "exists":
        with open(emb, "rb") as f:
            assert f.read() == b"keep"
    else:
        assert not os.path.exists(emb)
    assert sorted(os.listdir(tmp_path)) == ["emb.pt"] * (kind == "exists") + [
        "release"
    ]  # no temp files
