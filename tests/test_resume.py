"""Nothing lost: a stopped fit resumes to the very bytes of an uninterrupted one (`fit --resume`),
predict's run files list every image the folder holds for the run, `--overwrite` leaves one run in
the folder, and fit finds an -o it cannot write before the model loads.

    python -m pytest -q tests/test_resume.py
"""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import slime
from conftest import ROOT, synthetic_scene, write_tiny_checkpoint

# 2 epochs of one step on the random tiny checkpoint, each validated (the first's best is kept
# across the stop), fp32; lr 0.5 so the vectors move visibly
FLAGS = (
    "--epochs 2 --val-every 1 --lr 0.5 --beta 0 --threshold 0 --patch-size 512 "
    "--patches-per-side 1 -q"
)
FLAGS = FLAGS.split() + ["--dtype", "fp32"]


def main(*args):
    return slime.main([str(a) for a in args])


@pytest.fixture(scope="module")
def scene(tmp_path_factory, tiny_ckpt):
    """The files of one fit and the bytes of its emb.pt, run without a stop: (folder, fit's
    arguments, bytes)."""
    d = tmp_path_factory.mktemp("scene")
    img, mask = synthetic_scene()
    Image.fromarray(img).save(d / "a.png")
    Image.fromarray(mask).save(d / "a_mask.png")
    args = ["fit", d / "a.png", d / "a_mask.png", "--ckpt", tiny_ckpt("sd2"), *FLAGS]
    assert main(*args, "-o", d / "whole.pt") == 0
    save, err = slime.save_embeddings, io.StringIO()

    def stop_after_epoch_1(*a, resume=None, **k):  # Ctrl-C as the epoch's emb.pt lands
        save(*a, resume=resume, **k)
        if resume and resume["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as m, contextlib.redirect_stderr(err):
        m.setattr(slime, "save_embeddings", stop_after_epoch_1)
        assert main(*args, "-o", d / "stopped.pt") == 130
    return SimpleNamespace(
        args=args,
        whole=(d / "whole.pt").read_bytes(),
        stopped=d / "stopped.pt",
        line=err.getvalue(),
    )


def test_a_fit_stopped_between_epochs_resumes_to_the_uninterrupted_bytes(
    scene, tmp_path, monkeypatch, capsys
):
    """Stopped after epoch 1 of 2 (Ctrl-C as the epoch's emb.pt lands), resumed: the same emb.pt,
    byte for byte, its history every step once. The stop line, the refusal without --resume, and
    --resume once done."""
    args, whole, out = scene.args, scene.whole, tmp_path / "emb.pt"
    shutil.copy(scene.stopped, out)
    stopped = torch.load(out, weights_only=True)
    assert not stopped["finished"] and stopped["resume"]["epoch"] == 1 and stopped["epoch"] == 1
    assert [v[0] for v in stopped["history"]["validation"]] == [
        1
    ]  # the one that saved it, in its history
    assert scene.line == (
        f"slime: interrupted by SIGINT; finished outputs kept; {scene.stopped} holds epoch 1: "
        "rerun with --resume (no --overwrite) to go on\n"
    )
    assert main(*args, "-o", out) == 2
    assert capsys.readouterr().err == (
        f"slime: error: {out} holds a fit stopped after epoch 1; "
        "pass --resume to go on, --overwrite to start again, or choose another -o\n"
    )
    assert main(*args, "-o", out, "--resume") == 0
    assert out.read_bytes() == whole
    emb = torch.load(out, weights_only=True)
    assert emb["finished"] and emb["resume"] is None  # what only resuming needed is gone
    assert [s[0] for s in emb["history"]["step"]] == [1, 2]
    assert [v[0] for v in emb["history"]["validation"]] == [1, 2]
    capsys.readouterr()
    assert main(*args, "-o", out, "--resume") == 2
    assert (
        capsys.readouterr().err
        == f"slime: error: fit --resume: {out} is a finished fit; nothing to resume\n"
    )
    # --overwrite stopped before its first epoch's end: emb.pt is still the finished fit, and no
    # resume is offered
    monkeypatch.setattr(slime, "training_step", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(*args, "-o", out, "--overwrite") == 130 and out.read_bytes() == whole
    assert capsys.readouterr().err == "slime: interrupted by SIGINT; finished outputs kept\n"


def test_a_fit_stopped_by_sigint_in_a_real_process_resumes_to_the_same_bytes(scene, tmp_path):
    """Ctrl-C to a real fit as soon as its first epoch is saved, wherever it is then; --resume
    finishes it."""
    args, whole = scene.args, scene.whole
    out = tmp_path / "emb.pt"
    cmd = [sys.executable, os.path.join(ROOT, "slime.py"), *map(str, args), "-o", str(out)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not out.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    at = torch.load(out, weights_only=True)["resume"]["epoch"]  # stopped, not finished
    assert proc.returncode == 130 and f"holds epoch {at}: rerun with --resume" in err, err
    assert sorted(os.listdir(tmp_path)) == ["emb.pt"]  # no temp file
    assert main(*args, "-o", out, "--resume") == 0
    assert out.read_bytes() == whole


@pytest.fixture
def stopped(scene, tmp_path, monkeypatch):
    """A copy of the scene's fit stopped after its epoch 1; the model must not load from here on."""
    shutil.copy(scene.stopped, tmp_path / "emb.pt")
    monkeypatch.setattr(
        slime, "load_models", lambda *a, **k: pytest.fail("the model loaded before the refusal")
    )
    return tmp_path / "emb.pt"


def test_a_resume_of_another_fit_is_refused_naming_what_differs(scene, stopped, tmp_path, capsys):
    args = scene.args
    other_image = tmp_path / "b.png"
    Image.fromarray(synthetic_scene(seed=1)[0]).save(other_image)
    other_ckpt = tmp_path / "other.safetensors"
    write_tiny_checkpoint(other_ckpt, "sd2", seed=1)
    theirs = torch.load(stopped, weights_only=True)["resume"]["identity"]["checkpoint"]
    stop = f"slime: error: fit --resume: the stopped fit in {stopped}"
    cases = [
        (
            [*args, "--lr", "0.2"],
            f"{stop} ran with lr 0.5, this command with 0.2; resume it with its command",
        ),
        (
            [*args, "--seed", "1"],
            f"{stop} ran with seed 0, this command with 1; resume it with its command",
        ),
        (
            [*args, "--parts", "bg,a,b"],
            f"{stop} ran with parts ['background', 'part1', 'part2'], this command "
            "with ['bg', 'a', 'b']; resume it with its command",
        ),
        (
            [*args[:1], other_image, *args[2:]],
            f"{stop} read other images or masks, or in another order; resume it with its command",
        ),
        (
            [*args[:3], "--val", *args[1:3], *args[3:]],
            f"{stop} read other images or masks, or in another order; resume it with its command",
        ),
        (
            [*args, "--ckpt", other_ckpt],
            f"{stop} ran with checkpoint {theirs}, this command with "
            f"{slime.fingerprint(other_ckpt)}; resume it with its command",
        ),
        (
            [*args[:-3], "--dtype", "bf16", "-q"],
            f"{stop} ran with dtype float32, this command with bfloat16; "
            "resume it with its command",
        ),
    ]
    before = stopped.read_bytes()
    for argv, line in cases:
        assert main(*argv, "-o", stopped, "--resume") == 2
        assert capsys.readouterr().err == line + "\n"
    assert main(*args, "-o", stopped, "--resume", "--overwrite") == 2
    assert "argument --overwrite: not allowed with argument --resume" in capsys.readouterr().err
    assert main(*args, "-o", tmp_path / "none.pt", "--resume") == 2
    assert capsys.readouterr().err == (
        f"slime: error: fit --resume: {tmp_path / 'none.pt'} does not exist; nothing to resume\n"
    )
    assert stopped.read_bytes() == before


def test_fit_finds_an_unwritable_output_folder_before_the_model_loads(
    scene, tmp_path, monkeypatch, capsys
):
    """A temp file made and removed beside -o proves the folder takes files (chmod proves nothing as
    root, so the probe is made to fail as a read-only folder fails it); -o under a file fails the
    same way."""
    args = scene.args
    monkeypatch.setattr(slime, "load_models", lambda *a, **k: pytest.fail("the model loaded first"))
    read_only = tmp_path / "ro"

    def refused(*a, dir=None, **k):
        raise OSError(30, "Read-only file system", dir)

    monkeypatch.setattr(slime.tempfile, "TemporaryFile", refused)
    assert main(*args, "-o", read_only / "emb.pt") == 2
    assert capsys.readouterr().err == f"slime: error: {read_only}: Read-only file system\n"
    monkeypatch.undo()
    monkeypatch.setattr(slime, "load_models", lambda *a, **k: pytest.fail("the model loaded first"))
    (tmp_path / "file").write_text("")
    assert main(*args, "-o", tmp_path / "file" / "emb.pt") == 2
    assert capsys.readouterr().err == f"slime: error: {tmp_path / 'file'}: File exists\n"
    assert sorted(os.listdir(tmp_path)) == ["file", "ro"]


# -------------------------------------------------------------------- predict's records of a folder
@pytest.fixture
def images(tmp_path_factory, tiny_ckpt, monkeypatch):
    """Five 64x64 scenes with their ground truth, and an emb.pt: (input folder, masks folder,
    emb.pt, ckpt)."""
    d = tmp_path_factory.mktemp("images")
    (d / "in").mkdir()
    (d / "gt").mkdir()
    for i in range(5):
        img, mask = synthetic_scene(seed=i)
        Image.fromarray(img).resize((64, 64)).save(d / "in" / f"s{i}.png")
        Image.fromarray(mask).resize((64, 64), Image.NEAREST).save(d / "gt" / f"s{i}.png")
    ckpt = tiny_ckpt("sd2")
    sd = slime.load_models(ckpt)
    s = slime.Settings(threshold=0, patch_size=512, patches_per_side=1)
    slime.save_embeddings(
        d / "emb.pt", slime.prompt_contexts(sd, 3)[0], ["background", "square", "disc"], sd, s
    )

    # what is tested is the bookkeeping: a stand-in segmentation, each image's own
    # (its colours, quantised)
    def stand_in(sd, context, image, k, s, **kw):
        return (image.mean(0) * k).long().clamp(max=k - 1).byte()

    monkeypatch.setattr(slime, "segment", stand_in)
    monkeypatch.setattr(
        slime, "load_models", lambda *a, **k: SimpleNamespace(device=torch.device("cpu"))
    )
    return d / "in", d / "gt", d / "emb.pt", ckpt


def predict(images, out, *inputs, ok=0, extra=()):
    folder, gt, emb, ckpt = images
    named = [folder / f"{n}.png" for n in inputs] if inputs else [folder]
    flags = ["--masks", gt, "-o", out, "--ckpt", ckpt, "-q", "--dtype", "fp32", *extra]
    assert main("predict", emb, *named, *flags) == ok
    summary = json.loads((out / "summary.json").read_text())
    listed = (out / "ImageSets" / "Segmentation" / "default.txt").read_text().split()
    assert listed == [os.path.basename(r["mask"])[:-4] for r in summary["images"]]
    return summary


def scores(summary):  # what a run says of each image: area and IoUs, by image name
    return {os.path.basename(r["image"]): (r["area"], r["iou"]) for r in summary["images"]}


def test_the_run_files_list_every_image_the_folder_holds_for_the_run(
    images, tmp_path, monkeypatch, capsys
):
    """Three images, then one of them again, then two others: summary.json and default.txt list all
    five, with the areas and IoUs (and mIoU) of one run over all five. An interrupted run lists what
    it finished, and a rerun on fewer images keeps them; an image that cannot be read is listed with
    the reason."""
    single = predict(images, tmp_path / "single")
    out = tmp_path / "out"
    assert len(predict(images, out, "s0", "s1", "s2")["images"]) == 3
    assert scores(predict(images, out, "s1")) == {
        f"s{i}.png": scores(single)[f"s{i}.png"] for i in range(3)
    }
    summary = predict(images, out, "s3", "s4")
    assert scores(summary) == scores(single) and summary["miou"] == single["miou"]
    assert summary["iou"] == single["iou"]
    # interrupted at its third image, then run on the first one alone
    out, write, calls = tmp_path / "stopped", slime.segment_and_write, []

    def stop_at_the_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return write(*a, **k)

    monkeypatch.setattr(slime, "segment_and_write", stop_at_the_third)
    folder, gt, emb, ckpt = images
    flags = ["--masks", gt, "-o", out, "--ckpt", ckpt, "-q", "--dtype", "fp32"]
    assert main("predict", emb, folder, *flags) == 130
    monkeypatch.setattr(slime, "segment_and_write", write)  # the stand-ins stay
    assert sorted(scores(json.loads((out / "summary.json").read_text()))) == ["s0.png", "s1.png"]
    assert sorted(scores(predict(images, out, "s0"))) == ["s0.png", "s1.png"]
    # an unreadable image: listed with the reason, exit 1
    shutil.copytree(folder, tmp_path / "in2")
    (tmp_path / "in2" / "s2.png").write_bytes(b"not a png")
    main(
        "predict",
        emb,
        tmp_path / "in2",
        "--masks",
        gt,
        "-o",
        tmp_path / "bad",
        "--ckpt",
        ckpt,
        "-q",
        "--dtype",
        "fp32",
    )
    summary = json.loads((tmp_path / "bad" / "summary.json").read_text())
    assert [(u["image"], u["reason"][:40]) for u in summary["unread"]] == [
        (str(tmp_path / "in2" / "s2.png"), f"{tmp_path / 'in2' / 's2.png'}: cannot identify"[:40])
    ]
    assert len(summary["images"]) == 4
    capsys.readouterr()


def test_overwrite_with_fewer_images_leaves_one_run_in_the_folder(images, tmp_path):
    """a, b, c, then --overwrite with another setting on a alone: b's and c's masks and overlays go,
    the run files list a alone, and nothing that is not slime's output is touched (not even a PNG
    among the masks)."""
    out = tmp_path / "out"
    predict(images, out, "s0", "s1", "s2")
    (out / "notes.txt").write_text("mine")
    (out / "SegmentationClass" / "notes.txt").write_text("mine too")
    (out / "SegmentationClass" / "mine.png").write_bytes(
        (out / "SegmentationClass" / "s1.png").read_bytes()
    )
    summary = predict(images, out, "s0", extra=["--overwrite", "--test-t", "50"])
    assert [os.path.basename(r["image"]) for r in summary["images"]] == ["s0.png"]
    assert sorted(p.name for p in (out / "SegmentationClass").iterdir()) == [
        "mine.png",
        "notes.txt",
        "s0.png",
    ]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["s0.png"]
    assert (out / "notes.txt").read_text() == "mine"
    assert np.array(Image.open(out / "SegmentationClass" / "s0.png")).shape == (64, 64)
