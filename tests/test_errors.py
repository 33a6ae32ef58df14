"""Mistakes a user makes: one sentence naming the file and what to do, exit status 2, no traceback,
and no half-written output."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import PEAK_MEMORY, ROOT, synthetic_scene, write_tiny_checkpoint
from PIL import Image
from safetensors.torch import save_file

import slime


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "slime.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=cwd)


def assert_refused(r, fragment):
    assert r.returncode == 2, r.stderr
    assert fragment in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def emb(tmp_path_factory, tiny_ckpt):
    """An emb.pt for the tiny SD2 checkpoint, made without fitting (the initial vectors)."""
    sd = slime.load_models(tiny_ckpt("sd2"))
    cond, _ = slime.prompt_contexts(sd, 3)
    path = tmp_path_factory.mktemp("emb") / "emb.pt"
    s = slime.Settings(threshold=0, patch_size=512, patches_per_side=1)
    slime.save_embeddings(path, cond, ["background", "square", "disc"], sd, s)
    return path


@pytest.fixture
def scene(tmp_path):
    img, mask = synthetic_scene()
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(mask).save(tmp_path / "a_mask.png")
    return tmp_path / "a.png", tmp_path / "a_mask.png"


def listing(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


def bad_inputs(tmp_path, tiny_ckpt, case):
    """Write the bad file of one matrix row into tmp_path; return the fit arguments that use it."""
    img, mask = synthetic_scene()
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(mask).save(tmp_path / "a_mask.png")
    pair, ckpt = [tmp_path / "a.png", tmp_path / "a_mask.png"], tiny_ckpt("sd2")
    if case == "ckpt directory":
        return pair + ["--ckpt", tmp_path]
    if case in ("ckpt truncated", "ckpt .ckpt"):
        name = "cut.safetensors" if case == "ckpt truncated" else "sd.ckpt"
        (tmp_path / name).write_bytes(open(ckpt, "rb").read(4000))
        return pair + ["--ckpt", tmp_path / name]
    if case in ("ckpt lora", "ckpt sdxl"):
        keys = (["lora_unet_down_blocks_0.alpha"] if case == "ckpt lora" else
                ["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                 "model.diffusion_model.input_blocks.0.0.weight"])
        save_file({k: torch.zeros(2) for k in keys}, str(tmp_path / "other.safetensors"))
        return pair + ["--ckpt", tmp_path / "other.safetensors"]
    if case == "image not an image":
        (tmp_path / "a.png").write_text("hello")
    elif case == "image 0 bytes":
        (tmp_path / "a.png").write_bytes(b"")
    elif case == "image truncated jpeg":
        Image.fromarray(img).save(tmp_path / "a.jpg", quality=95)
        (tmp_path / "a.jpg").write_bytes((tmp_path / "a.jpg").read_bytes()[:600])
        return [tmp_path / "a.jpg", tmp_path / "a_mask.png", "--ckpt", ckpt]
    elif case in ("npy float", "npy rank"):
        np.save(tmp_path / "m.npy", mask.astype(np.float32) if case == "npy float" else mask[..., None])
        return [tmp_path / "a.png", tmp_path / "m.npy", "--ckpt", ckpt]
    elif case == "antialiased colours":
        rgb = np.zeros(mask.shape + (3,), np.uint8)
        rgb[mask == 1], rgb[mask == 2] = (200, 0, 0), (0, 200, 0)
        edge = (mask[:, 1:] != mask[:, :-1])
        rgb[:, 1:][edge] = (100, 100, 0)  # a blended colour on the boundary
        rgb[:, 1:][edge & (mask[:, 1:] == 0)] = (100, 0, 0)
        Image.fromarray(rgb).save(tmp_path / "a_mask.png")
        return pair + ["--parts", "background,square,disc", "--ckpt", ckpt]
    return pair + ["--ckpt", ckpt]


@pytest.mark.parametrize("case, fragment", [
    ("ckpt directory", "is a directory; give the path of a single .safetensors checkpoint file"),
    ("ckpt truncated", "cut.safetensors cannot be read as .safetensors (truncated or corrupt download?)"),
    ("ckpt .ckpt", "slime never unpickles .ckpt files, download the .safetensors release instead"),
    ("ckpt lora", "holds no model.diffusion_model.* tensors, so it is not a full Stable Diffusion checkpoint"),
    ("ckpt sdxl", "is an SDXL checkpoint; slime needs a Stable Diffusion 1.x or 2.x file"),
    ("image not an image", "a.png is not an image file PIL can read"),
    ("image 0 bytes", "a.png is empty (0 bytes)"),
    ("image truncated jpeg", "a.jpg is truncated or corrupt"),
    ("npy float", "m.npy holds float32 values; save integer class labels"),
    ("npy rank", "m.npy has shape (512, 512, 1); a mask must be a 2-D"),
    ("antialiased colours", "the colour masks hold 5 colours (black included) but --parts names 3 classes; "
                            "the 2 unknown colours are usually anti-aliased edges"),
])
def test_bad_files_refused_through_the_cli_leaving_the_folder_as_it_was(tmp_path, tiny_ckpt, case, fragment):
    args = bad_inputs(tmp_path, tiny_ckpt, case)
    before = listing(tmp_path)
    assert_refused(cli("fit", *args, "-o", tmp_path / "emb.pt", cwd=tmp_path), fragment)
    assert listing(tmp_path) == before  # no emb.pt, no temp file, nothing touched


def test_checkpoint_errors_reach_the_user_as_one_sentence(tmp_path, scene):
    assert_refused(cli("fit", *scene, "--ckpt", tmp_path / "none.safetensors"), "none.safetensors: no such file")
    (tmp_path / "sd.ckpt").write_bytes(b"not really a pickle")
    assert_refused(cli("fit", *scene, "--ckpt", tmp_path / "sd.ckpt"), "slime never unpickles .ckpt files")


def test_half_precision_checkpoints_work_through_the_cli(emb, tmp_path, scene):
    for dtype in (torch.float16, torch.bfloat16):
        ckpt = write_tiny_checkpoint(tmp_path / f"{dtype}.safetensors", "sd2", dtype=dtype)
        r = cli("predict", emb, scene[0], "-o", tmp_path / str(dtype), "--ckpt", ckpt, "-q")
        assert r.returncode == 0 and (tmp_path / str(dtype) / "a.png").exists(), r.stderr


def test_output_folder_that_cannot_be_made_or_written(emb, tmp_path, scene, tiny_ckpt):
    assert_refused(cli("predict", emb, scene[0], "-o", scene[0] / "out", "--ckpt", tiny_ckpt("sd2")),
                   "cannot create the output folder (Not a directory)")
    if os.geteuid() == 0:
        pytest.skip("root writes to read-only folders; the permission check cannot be shown")
    (tmp_path / "ro").mkdir(mode=0o555)
    assert_refused(cli("predict", emb, scene[0], "-o", tmp_path / "ro", "--ckpt", tiny_ckpt("sd2")),
                   "the output folder is not writable; choose another with -o")


def test_names_with_spaces_and_unicode(emb, tmp_path, tiny_ckpt):
    (tmp_path / "în pùt").mkdir()
    Image.fromarray(synthetic_scene(size=64)[0]).save(tmp_path / "în pùt" / "my imäge ✓.png")
    r = cli("predict", emb, tmp_path / "în pùt", "-o", tmp_path / "öut put", "--ckpt", tiny_ckpt("sd2"))
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "öut put")) == ["my imäge ✓.png", "my imäge ✓_overlay.png"]


def test_a_part_without_pixels_warns_and_fit_goes_on(tmp_path, scene, tiny_ckpt):
    r = cli("fit", *scene, "--parts", "background,square,disc,wheel", "--ckpt", tiny_ckpt("sd2"), "--epochs", "1",
            "--beta", "0", "--threshold", "0", "--patch-size", "512", "--patches-per-side", "1", "-o", tmp_path / "e.pt")
    assert r.returncode == 0, r.stderr
    assert "warning: part 3 (wheel) has no pixels in any training mask; it cannot be learned" in r.stderr
    assert slime.load_embeddings(tmp_path / "e.pt")["parts"] == ["background", "square", "disc", "wheel"]


def test_cuda_out_of_memory_says_what_to_try(monkeypatch, capsys, scene):
    def oom(args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(slime, "cmd_fit", oom)
    assert slime.main(["fit", *map(str, scene)]) == 2
    err = capsys.readouterr().err
    assert "the GPU ran out of memory; try --dtype fp16" in err and "--patches-per-side 1" in err and "--device cpu" in err


def test_mask_of_another_size(tmp_path, scene, tiny_ckpt):
    Image.fromarray(np.zeros((100, 80), np.uint8)).save(tmp_path / "small.png")
    assert_refused(cli("fit", scene[0], tmp_path / "small.png", "--ckpt", tiny_ckpt("sd2")),
                   "small.png is 80x100 but its image")
    assert "a.png is 512x512; a mask must have its image's size" in cli("fit", scene[0], tmp_path / "small.png").stderr


def test_mask_values_outside_the_parts(scene, tiny_ckpt):
    assert_refused(cli("fit", *scene, "--parts", "background,square", "--ckpt", tiny_ckpt("sd2")),
                   "has class values [2] outside 0..1 for the 2 parts")


def test_background_only_mask(tmp_path, scene, tiny_ckpt):
    Image.fromarray(np.zeros((512, 512), np.uint8)).save(tmp_path / "empty.png")
    assert_refused(cli("fit", scene[0], tmp_path / "empty.png", "--ckpt", tiny_ckpt("sd2")),
                   "holds only background (class 0); nothing to learn")


@pytest.mark.parametrize("flags, fragment", [
    (["--epochs", "0"], "--epochs: must be a positive integer"),
    (["--lr", "-1"], "--lr: must be > 0"),
    (["--threshold", "1.5"], "--threshold: must be in [0, 1]"),
    (["--patch-size", "600"], "--patch-size: must be an integer in 1..512"),
    (["--patches-per-side", "0"], "--patches-per-side: must be a positive integer"),
    (["--preset", "coco"], "invalid choice: 'coco'"),
    (["--epochs", "-1"], "--epochs: must be a positive integer"),
    (["--lr", "0"], "--lr: must be > 0"),
    (["--threshold", "-0.1"], "--threshold: must be in [0, 1]"),
])
def test_bad_options(scene, flags, fragment):
    assert_refused(cli("fit", *scene, *flags), fragment)


def test_predict_refuses_embeddings_of_the_other_family(emb, tmp_path, scene, tiny_ckpt):
    assert_refused(cli("predict", emb, scene[0], "-o", tmp_path / "out", "--ckpt", tiny_ckpt("sd1")),
                   "was fitted on an sd2 checkpoint but")
    assert not os.listdir(tmp_path / "out")


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_predict_never_runs_pickled_code(tmp_path, scene, tiny_ckpt):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": "slime-embeddings/1", "x": Evil()}, f)
    r = cli("predict", tmp_path / "evil.pt", scene[0], "-o", tmp_path / "out", "--ckpt", tiny_ckpt("sd2"), cwd=tmp_path)
    assert_refused(r, "is not a readable slime emb.pt")
    assert not (tmp_path / "pwned").exists()


def test_corrupt_and_foreign_embeddings(tmp_path, scene):
    (tmp_path / "bad.pt").write_bytes(b"\x80\x04garbage")
    assert_refused(cli("predict", tmp_path / "bad.pt", scene[0]), "bad.pt is not a readable slime emb.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    assert_refused(cli("predict", tmp_path / "other.pt", scene[0]), "other.pt is a torch file but not a slime emb.pt")


def test_output_folder_may_not_be_the_input_folder(emb, scene, tiny_ckpt):
    folder = scene[0].parent
    before = listing(folder)
    assert_refused(cli("predict", emb, folder, "-o", folder, "--ckpt", tiny_ckpt("sd2")), "holds input images")
    assert listing(folder) == before


def test_duplicate_stems_and_empty_folders(emb, tmp_path, tiny_ckpt):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "in" / "x.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "in" / "x.jpg")
    assert_refused(cli("predict", emb, tmp_path / "in", "-o", tmp_path / "out", "--ckpt", tiny_ckpt("sd2")),
                   "share the name 'x'")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    assert_refused(cli("predict", emb, tmp_path / "empty"), "holds no images")
    assert "skipped notes.txt" in cli("predict", emb, tmp_path / "empty").stderr
    (tmp_path / "void").mkdir()
    assert_refused(cli("predict", emb, tmp_path / "void"), "holds no images")


def test_predict_skips_finished_images_unless_overwrite(emb, tmp_path, tiny_ckpt):
    (tmp_path / "in").mkdir()
    for name in ("p", "q"):
        Image.fromarray(synthetic_scene(seed=len(name))[0]).resize((96, 64)).save(tmp_path / "in" / f"{name}.png")
    out = tmp_path / "out"
    assert cli("predict", emb, tmp_path / "in", "-o", out, "--ckpt", tiny_ckpt("sd2"), "-q").returncode == 0
    assert sorted(os.listdir(out)) == ["p.png", "p_overlay.png", "q.png", "q_overlay.png"]  # no temp files left
    assert Image.open(out / "p.png").size == (96, 64)  # each image's own size
    os.remove(out / "q.png")
    before = os.path.getmtime(out / "p.png")
    assert cli("predict", emb, tmp_path / "in", "-o", out, "--ckpt", tiny_ckpt("sd2"), "-q").returncode == 0
    assert os.path.getmtime(out / "p.png") == before and (out / "q.png").exists()
    os.remove(out / "q_overlay.png")  # killed between its two writes: q is not finished
    assert cli("predict", emb, tmp_path / "in", "-o", out, "--ckpt", tiny_ckpt("sd2"), "-q").returncode == 0
    assert (out / "q_overlay.png").exists() and os.path.getmtime(out / "p.png") == before
    assert cli("predict", emb, tmp_path / "in", "-o", out, "--ckpt", tiny_ckpt("sd2"), "-q", "--overwrite").returncode == 0
    assert os.path.getmtime(out / "p.png") > before


def test_exif_rotated_photo_pairs_with_a_mask_of_its_displayed_size(tmp_path, tiny_ckpt):
    """A phone photo stored 64x32 with EXIF orientation 6 shows as 32x64; its mask is drawn on what shows."""
    img, mask = synthetic_scene()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(img).resize((32, 64)).transpose(Image.Transpose.ROTATE_90).save(
        tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    Image.fromarray(mask).resize((32, 64), Image.NEAREST).save(tmp_path / "phone_mask.png")
    r = cli("fit", tmp_path / "phone.jpg", tmp_path / "phone_mask.png", "--ckpt", tiny_ckpt("sd2"), "--epochs", "1",
            "--beta", "0", "--threshold", "0", "--patch-size", "512", "--patches-per-side", "1", "-o", tmp_path / "e.pt", "-q")
    assert r.returncode == 0, r.stderr
    assert slime.read_image(tmp_path / "phone.jpg").shape == (3, 64, 32)


def test_predict_killed_then_rerun_finishes_every_image(emb, tmp_path, tiny_ckpt):
    import signal
    import time
    (tmp_path / "in").mkdir()
    for i in range(6):
        Image.fromarray(synthetic_scene(seed=i)[0]).resize((64, 64)).save(tmp_path / "in" / f"s{i}.png")
    out = tmp_path / "out"
    args = [sys.executable, os.path.join(ROOT, "slime.py"), "predict", str(emb), str(tmp_path / "in"), "-o", str(out),
            "--ckpt", tiny_ckpt("sd2"), "-q"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "s0_overlay.png").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "s5_overlay.png").exists(), "predict finished before it was killed"
    assert subprocess.run(args, capture_output=True, timeout=300).returncode == 0
    finished = sorted(f for f in os.listdir(out) if not f.startswith("."))  # a kill mid-write may leave a temp file
    assert finished == sorted([f"s{i}.png" for i in range(6)] + [f"s{i}_overlay.png" for i in range(6)])
    for f in finished:
        Image.open(out / f).load()  # every output complete


@pytest.mark.skipif(any(f.endswith(".safetensors") for f in os.listdir(os.path.join(ROOT, "weights"))),
                    reason="a real checkpoint is in weights/")
def test_no_checkpoint_in_weights(scene):
    assert_refused(cli("fit", *scene), "holds no .safetensors checkpoint; put v2-1_512-ema-pruned.safetensors there")


def test_t_range_order(scene):
    assert_refused(cli("fit", *scene, "--t-range", "100", "5"), "the first timestep must not exceed the second")


@pytest.mark.parametrize("how", ["ctrl-c", "kill -9"])
def test_interrupted_fit_keeps_the_best_embeddings(tmp_path, scene, tiny_ckpt, how):
    """Ctrl-C ends with a message and exit 130; kill -9 ends with nothing at all. Either way emb.pt is the
    last complete best, because every write goes to a temp file that is then renamed over it."""
    import signal
    import time
    out = tmp_path / "emb.pt"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "slime.py"), "fit", *map(str, scene), "--ckpt",
                             tiny_ckpt("sd2"), "--epochs", "50", "--beta", "0", "--threshold", "0", "--patch-size",
                             "512", "--patches-per-side", "1", "-o", str(out), "-q"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not out.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert out.exists(), "fit never wrote emb.pt"
    time.sleep(2)  # interrupt mid-run, possibly mid-write of a new best
    proc.send_signal(signal.SIGINT if how == "ctrl-c" else signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    if how == "ctrl-c":
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
        assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp.pt")]
    else:
        assert proc.returncode == -signal.SIGKILL  # a killed write may leave .emb.pt.tmp.pt, never a half emb.pt
    emb = slime.load_embeddings(out)
    assert emb["parts"] == ["background", "part1", "part2"] and emb["epoch"] >= 0


def test_more_parts_than_tokens(scene, tiny_ckpt):
    parts = ",".join(["background"] + [f"p{i}" for i in range(77)])
    assert_refused(cli("fit", *scene, "--parts", parts, "--ckpt", tiny_ckpt("sd2")),
                   "78 classes are more than SD's 77 tokens allow")


def test_tiny_and_odd_images_are_segmented_at_their_own_size(emb, tmp_path, tiny_ckpt):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "in" / "tiny.png")
    Image.fromarray((np.arange(70 * 50) % 65536).reshape(50, 70).astype(np.uint16)).save(tmp_path / "in" / "gray16.png")
    r = cli("predict", emb, tmp_path / "in", "-o", tmp_path / "out", "--ckpt", tiny_ckpt("sd2"), "-q")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "out" / "tiny.png").size == (16, 16)
    assert Image.open(tmp_path / "out" / "gray16.png").size == (70, 50)


def test_a_12000x9000_photo_is_segmented_at_full_size_in_bounded_memory(emb, tmp_path, tiny_ckpt, monkeypatch):
    """108 MP: PIL's bomb warning silenced (it refuses only above 179 MP), a line saying what slime does,
    and a peak of ~3 GB (the image alone is 1.3 GB as float32); whole-image float temporaries took 11 GB."""
    (tmp_path / "in").mkdir()
    h, w = 9000, 12000
    ramp = (np.arange(w, dtype=np.uint16)[None] * 255 // w + np.arange(h, dtype=np.uint16)[:, None] * 255 // h) // 2
    Image.fromarray(np.repeat(ramp.astype(np.uint8)[..., None], 3, -1)).save(tmp_path / "in" / "huge.jpg", quality=80)
    code = PEAK_MEMORY + "import sys, slime; rc = slime.main(sys.argv[1:]); print(peak_memory()); sys.exit(rc)"
    r = subprocess.run([sys.executable, "-c", code, "predict", str(emb), str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                        "--ckpt", tiny_ckpt("sd2")], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "huge.jpg is 12000x9000: segmented at 512x512 like every image" in r.stderr and "Warning" not in r.stderr
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # no bomb warning for the test's own check
    assert Image.open(tmp_path / "out" / "huge.png").size == (w, h) == Image.open(tmp_path / "out" / "huge_overlay.png").size
    assert int(r.stdout.split()[1]) < 4.5e6  # VmHWM in kB


def test_a_diverging_loss_stops_fit_with_a_clear_message(scene, tiny_ckpt, tmp_path):
    r = cli("fit", *scene, "--ckpt", tiny_ckpt("sd2"), "--lr", "1e30", "--epochs", "3", "--beta", "0", "--threshold", "0",
            "--patch-size", "512", "--patches-per-side", "1", "-o", tmp_path / "emb.pt", "-q")
    assert_refused(r, "the loss became nan at step")
    assert "try a lower --lr" in r.stderr
    kept = slime.load_embeddings(tmp_path / "emb.pt")  # epoch 1 was validated before step 2 diverged
    assert kept["epoch"] == 0 and torch.isfinite(kept["context"]).all()


def test_release_embedding_folder(tmp_path, tiny_ckpt):
    """The authors' format: embedding_{i}.pth, one (1, 1, D) tensor per part; BGR and 512x512 by default."""
    rel = tmp_path / "release"
    rel.mkdir()
    for i in range(2):
        torch.save(torch.randn(1, 1, 64), rel / f"embedding_{i}.pth")
    Image.fromarray(synthetic_scene()[0]).resize((96, 64)).save(tmp_path / "img.png")
    r = cli("predict", rel, tmp_path / "img.png", "--parts", "background,square,disc", "-o", tmp_path / "out",
            "--ckpt", tiny_ckpt("sd2"), "-q")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "out" / "img.png").size == (512, 512)  # the release's output size
    assert_refused(cli("predict", rel, tmp_path / "img.png", "--parts", "background,square", "-o", tmp_path / "o2",
                       "--ckpt", tiny_ckpt("sd2")), "holds 2 part embeddings, so --parts needs 3 names")
    os.rename(rel / "embedding_1.pth", rel / "embedding_2.pth")
    assert_refused(cli("predict", rel, tmp_path / "img.png", "-o", tmp_path / "o3", "--ckpt", tiny_ckpt("sd2")),
                   "lacks embedding_1.pth")
