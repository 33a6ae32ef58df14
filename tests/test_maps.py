"""examples/maps.py: its arrays are slime's (A_ca Eq. 3, A_sa Eq. 5, the WAS map Eq. 6, the patches'
votes), its picture grows by a row per part and never cuts a name, fit's history survives the round
trip into emb.pt and --curve draws it, and every bad input ends in one `error:` line, exit status 2.

The networks are the cost on 2 CPU cores (the VAE 3 s a 512 image, the UNet 1 s). In the module's
`grid`, each patch's attention is computed once (a memo): maps.py and the references below are
handed the same tensors, so what is compared is what maps.py makes of them; a wrong input (another
patch, t or context) would miss the memo and differ. Its noisy patches stand in for the VAE's
(tests/test_method.py tests those).
"""

import hashlib
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import slime
from conftest import ROOT, synthetic_scene

sys.path.insert(0, os.path.join(ROOT, "examples"))
import maps  # noqa: E402

SIZE, MAP = slime.SIZE, slime.MAP
PARTS = ["background", "square", "disc"]


def digest(*values):  # a key for the memo: tensors by their bytes, the rest by repr
    h = hashlib.sha256()
    for v in values:
        h.update(
            v.contiguous().numpy().tobytes() if isinstance(v, torch.Tensor) else repr(v).encode()
        )
    return h.hexdigest()


REAL_ATTENTION = slime.attention_maps


def stand_ins(mp, memo):
    """slime.attention_maps through the memo (vote_sums calls it through slime's module too), and
    noisy patches at predict's origins, each x_t seeded by what noisy_patches reads."""

    def attention_maps(sd, x_t, t, context, num_classes, log_space):
        key = digest(x_t, t, context, num_classes, log_space)
        if key not in memo:
            memo[key] = REAL_ATTENTION(sd, x_t, t, context, num_classes, log_space)
        return tuple(x.clone() for x in memo[key])

    def noisy_patches(sd, image, s):
        seed = digest(image, s.patch_size, s.patches_per_side, s.seed, s.test_t, s.bgr)
        g = torch.Generator().manual_seed(int(seed[:12], 16))
        origins = slime.patch_origins(s.patch_size, s.patches_per_side)
        return [(y0, x0, torch.randn(1, 4, MAP, MAP, generator=g)) for y0, x0 in origins]

    mp.setattr(slime, "attention_maps", attention_maps)
    mp.setattr(slime, "noisy_patches", noisy_patches)


@pytest.fixture(scope="module")
def grid_emb(tiny_ckpt, tmp_path_factory):
    """predict's default grid (400 px, 2 per side: 4 patches) on the tiny random SD 2 checkpoint, a
    384x512 image (squashed, as SD sees it) -> (sd, emb, image, memo). The threshold: the lowest
    A_ca peak at which the first class to vote (whose below-mean pixels patch_votes zeroes) is the
    background in one patch and a part in another."""
    memo = {}
    torch.set_flush_denormal(
        True
    )  # as maps.main and slime.main do: denormals slow the CPU's UNet 1.5x
    sd = slime.load_models(tiny_ckpt("sd2"))
    cond, _ = slime.prompt_contexts(sd, len(PARTS))
    image = (
        torch.from_numpy(synthetic_scene()[0][64:448]).permute(2, 0, 1).float() / 255
    )  # (3, 384, 512)
    s, t = slime.Settings(), torch.tensor([slime.Settings().test_t])  # 400 px, 2 per side
    with pytest.MonkeyPatch.context() as mp:
        stand_ins(mp, memo)
        A_cas = [
            slime.attention_maps(sd, x_t, t, cond, 3, False)[0]
            for *_, x_t in slime.noisy_patches(sd, image, s)
        ]
    for threshold in sorted(A_ca[k].max().item() for A_ca in A_cas for k in range(len(PARTS))):
        first = {
            votes[0] for votes in (inference_input(A_ca, threshold)[1] for A_ca in A_cas) if votes
        }
        if 0 in first and len(first) > 1:  # the background first in a patch, a part in another
            break
    else:
        pytest.fail(
            "no threshold lets the background vote first in one patch and a part in another"
        )
    path = tmp_path_factory.mktemp("grid") / "emb.pt"
    slime.save_embeddings(path, cond, PARTS, sd, slime.Settings(threshold=threshold))
    return sd, slime.load_embeddings(path), image, memo


@pytest.fixture
def grid(grid_emb, monkeypatch):  # the stand-ins, for one test at a time
    stand_ins(monkeypatch, grid_emb[3])
    return grid_emb


def inference_input(A_ca, threshold):
    """What patch_votes feeds Eq. 6: A_ca, the first class whose A_ca peaks >= threshold zeroed at
    and below its mean -> (P, the classes that vote)."""
    votes = [k for k in range(len(A_ca)) if A_ca[k].max() >= threshold]
    P = A_ca.clone()
    if votes:
        P[votes[0]][P[votes[0]] <= P[votes[0]].mean()] = 0
    return P, votes


def was_column(A_ca, A_sa, threshold):
    """The WAS column of one patch, written out: a class that votes, Eq. 6 of inference's input
    min-max rescaled onto its A_ca's range (what it votes with); one that does not, Eq. 6 of its
    A_ca as it is."""
    P, votes = inference_input(A_ca, threshold)
    voting, shown = slime.was_map(P, A_sa), slime.was_map(A_ca, A_sa)
    for k in votes:
        w, a = voting[k], A_ca[k]
        shown[k] = a.min() + (w - w.min()) * (a.max() - a.min()) / (w.max() - w.min())
    return shown


def pixel_cell(pixel, hw, origin, side):
    """--pixel X,Y in the image's pixels -> (row, col) in the 64x64 grid of the patch at origin."""
    (x, y), (h, w) = pixel, hw
    v, u = (
        (y + 0.5) / h * SIZE - origin[0],
        (x + 0.5) / w * SIZE - origin[1],
    )  # its centre, squashed to 512
    return int(v // (side / MAP)), int(u // (side / MAP))


def test_the_average_over_patches_is_slimes(grid):
    """Without --patch: each patch's A_ca (attention_maps), WAS column (was_column) and --pixel's
    A_sa row, resized onto the patch's footprint and averaged where patches overlap; the score is
    vote_sums' ratio, and the mask its argmax, which is slime.segment's at 512."""
    sd, emb, image, memo = grid
    s, K, side, pixel = emb["settings"], len(PARTS), emb["settings"].patch_size, (50, 200)
    got = maps.maps(sd, emb, image, pixel=pixel)
    t, context = torch.tensor([s.test_t]), emb["context"]
    patches = slime.noisy_patches(sd, image, s)
    A, W, R = torch.zeros(K, SIZE, SIZE), torch.zeros(K, SIZE, SIZE), torch.zeros(SIZE, SIZE)
    n, n_pixel, voted = torch.zeros(SIZE, SIZE), torch.zeros(SIZE, SIZE), [0] * K

    def up(m):
        return F.interpolate(m[None], size=(side, side), mode="bilinear", align_corners=False)[0]

    for y0, x0, x_t in patches:
        A_ca, A_sa, _ = slime.attention_maps(sd, x_t, t, context, K, log_space=False)
        votes = inference_input(A_ca, s.threshold)[1]
        box = (slice(y0, y0 + side), slice(x0, x0 + side))
        A[:, box[0], box[1]] += up(A_ca)
        W[:, box[0], box[1]] += up(was_column(A_ca, A_sa, s.threshold))
        n[box] += 1
        row, col = pixel_cell(pixel, image.shape[1:], (y0, x0), side)
        if 0 <= row < MAP and 0 <= col < MAP:
            R[box] += up(A_sa[row * MAP + col].view(1, MAP, MAP))[0]
            n_pixel[box] += 1
        voted = [v + (k in votes) for k, v in enumerate(voted)]
    assert 0 < sum(voted) < K * len(patches)  # the threshold lets some votes through, not all
    assert got["voted"].tolist() == voted
    scores, votes = slime.vote_sums(sd, context, patches, K, s, (SIZE, SIZE), side)
    assert got["A_ca"].shape == got["was"].shape == got["score"].shape == (K, SIZE, SIZE)
    assert np.allclose(got["A_ca"], (A / n).numpy(), rtol=1e-5, atol=0)
    assert np.allclose(got["was"], (W / n).numpy(), rtol=1e-4, atol=1e-7)
    assert np.array_equal(got["score"], (scores / votes).numpy())
    assert 0 < n_pixel.max() < len(patches)  # the pixel lies in some patches only
    assert np.allclose(got["pixel_row"], (R / n_pixel.clamp(min=1)).numpy(), rtol=1e-5, atol=0)
    labels = slime.segment(sd, context, image, K, s, SIZE, inputs=patches)
    assert np.array_equal(got["labels"], labels.numpy())
    squashed = F.interpolate(image[None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[
        0
    ]
    assert np.array_equal(got["image"], (squashed * 255).round().byte().permute(1, 2, 0).numpy())
    assert len(memo) == len(patches)  # one UNet pass per patch: no other input reached it
    picture = maps.draw(got, PARTS, slime.part_colors(emb), "title")
    assert picture.height == maps.HEADER + K * maps.ROW


def test_one_patch_is_slimes_and_the_pixel_row_is_A_sa(grid):
    """--patch 2: the patch's own 64x64 A_ca and WAS column, unresized; its score is vote_sums of
    that patch alone on its footprint, its mask segment's of that patch alone; --pixel's row is
    A_sa's row of the pixel's cell (Eq. 5: where that query looks)."""
    sd, emb, image, _ = grid
    s, K, side, pixel = emb["settings"], len(PARTS), emb["settings"].patch_size, (6, 350)
    got = maps.maps(sd, emb, image, patch=2, pixel=pixel)
    y0, x0, x_t = slime.noisy_patches(sd, image, s)[2]
    assert (y0, x0) == (112, 0)  # rows first: patch 2 is the lower left
    A_ca, A_sa, _ = slime.attention_maps(
        sd, x_t, torch.tensor([s.test_t]), emb["context"], K, log_space=False
    )
    votes = inference_input(A_ca, s.threshold)[1]
    assert np.array_equal(got["A_ca"], A_ca.numpy())
    assert np.allclose(
        got["was"], was_column(A_ca, A_sa, s.threshold).numpy(), rtol=1e-4, atol=1e-7
    )
    assert votes and not np.allclose(got["was"], slime.was_map(A_ca, A_sa).numpy(), rtol=1e-3)
    assert got["voted"].tolist() == [int(k in votes) for k in range(K)]
    scores, n = slime.vote_sums(sd, emb["context"], [(y0, x0, x_t)], K, s, (SIZE, SIZE), side)
    assert np.array_equal(got["score"], (scores / n)[:, y0 : y0 + side, x0 : x0 + side].numpy())
    row, col = pixel_cell(pixel, image.shape[1:], (y0, x0), side)
    assert (
        got["pixel_at"] == (row, col) == (56, 1)
    )  # (350.5 / 384 * 512 - 112) / 6.25, 6.5 / 6.25: centres
    assert np.array_equal(got["pixel_row"], A_sa[row * MAP + col].view(MAP, MAP).numpy())
    assert not np.array_equal(got["pixel_row"], A_sa[row * MAP + col + 1].view(MAP, MAP).numpy())
    assert got["box"] == (112, 0, 400)
    alone = slime.segment(sd, emb["context"], image, K, s, SIZE, inputs=[(y0, x0, x_t)])
    assert np.array_equal(got["labels"], alone[y0 : y0 + side, x0 : x0 + side])


def test_one_unet_pass_per_patch(grid, monkeypatch):
    """maps() draws from vote_sums' own UNet passes: one per patch for the average of 4 patches, one
    for --patch 2, each on that patch's noisy input; --pixel adds none."""
    sd, emb, image, _ = grid
    patches, inputs, memoized = (
        slime.noisy_patches(sd, image, emb["settings"]),
        [],
        slime.attention_maps,
    )

    def counted(sd, x_t, *args, **kwargs):  # the memo's attention_maps, each call's x_t noted
        inputs.append(x_t)
        return memoized(sd, x_t, *args, **kwargs)

    monkeypatch.setattr(slime, "attention_maps", counted)
    cases = [(None, None, patches), (None, (50, 200), patches), (2, None, [patches[2]])]
    for patch, pixel, passes in [*cases, (2, (6, 350), [patches[2]])]:
        inputs.clear()
        maps.maps(sd, emb, image, patch=patch, pixel=pixel)
        assert len(inputs) == len(passes)
        assert all(torch.equal(got, x_t) for got, (*_, x_t) in zip(inputs, passes))


def fake_arrays(K):  # what maps() returns, to draw without a model
    g = np.random.default_rng(0)
    arrays = {key: g.random((K, SIZE, SIZE)) for key in ("A_ca", "was", "score")}
    arrays.update(
        image=g.integers(0, 255, (SIZE, SIZE, 3), np.uint8), labels=g.integers(0, K, (SIZE, SIZE))
    )
    arrays.update(
        voted=np.ones(K, int),
        pixel_row=g.random((SIZE, SIZE)),
        pixel_at=(10, 20),
        patches=4,
        box=None,
    )
    return arrays


def test_the_picture_has_a_row_per_part_and_never_cuts_a_name():
    """Height = header + K rows of a fixed height; at 8 parts still a readable picture; the label
    column starts the panels after the longest name as the same font measures it, and that name is
    drawn whole."""
    white = (255, 255, 255)
    for K in (2, 5, 8):
        names = ["background"] + [f"part {k}" for k in range(1, K)]
        names[-1] += " with a long name with a long name with a long name"
        colors = slime.part_colors(dict(parts=names, colors=[]))
        picture = maps.draw(fake_arrays(K), names, colors, "a title")
        assert picture.height == maps.HEADER + K * maps.ROW
        longest, y = (
            names[-1],
            maps.HEADER + (K - 1) * maps.ROW,
        )  # the last row holds the longest name
        pixels = np.asarray(picture)
        # the first panel's left edge: the first column that is colour all the way down the row's
        # panel
        solid = (pixels[y : y + maps.PANEL] != 255).any(-1).all(0)
        left = int(np.argmax(solid))
        assert left == maps.label_width(names) >= maps.TEXT_X + maps.FONT.getlength(longest)
        assert picture.width == left + 3 * maps.CELL
        # the name as the font draws it alone, at the same place: every pixel of it is in the
        # picture
        alone = Image.new("RGB", (left, maps.LINE), white)
        ImageDraw.Draw(alone).text((maps.TEXT_X, 0), longest, (0, 0, 0), maps.FONT)
        band = picture.crop((0, y, left, y + maps.LINE))
        assert np.array_equal(
            np.asarray(band)[:, maps.TEXT_X :], np.asarray(alone)[:, maps.TEXT_X :]
        )
    # readable at 8 parts: text at >= 12 px, panels >= 128 px, and under 2000 px high
    assert maps.FONT.size >= 12 and maps.PANEL >= 128 and picture.height < 2000
    assert picture.size == (left + 3 * maps.CELL, maps.HEADER + 8 * maps.ROW)


def test_the_scores_share_one_scale(monkeypatch):
    """The score column is coloured on one scale, the min to the max of every part's score, with
    those two numbers beside each score panel: the argmax compares one part's score with another's.
    A_ca and WAS: each panel on its own scale. The legend above says what a score is."""
    levels, drawn, real_text = [0.1, 0.2, 0.4], {}, ImageDraw.ImageDraw.text

    def text(d, xy, words, *args, **kwargs):  # each text drawn, by where
        drawn[tuple(xy)] = words
        return real_text(d, xy, words, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", text)
    arrays = fake_arrays(len(PARTS))
    for key in ("A_ca", "was", "score"):  # part k's maps: flat at levels[k]
        arrays[key] = np.stack([np.full((SIZE, SIZE), v) for v in levels])
    picture = maps.draw(arrays, PARTS, slime.part_colors(dict(parts=PARTS, colors=[])), "a title")
    pixels, left = np.asarray(picture), picture.width - 3 * maps.CELL
    assert drawn[(maps.PAD, maps.PAD + maps.LINE)] == maps.LEGEND
    for k, level in enumerate(levels):
        y = maps.HEADER + k * maps.ROW
        for i, (lo, hi) in enumerate([(level, level), (level, level), (0.1, 0.4)]):
            x = left + i * maps.CELL
            unit = (level - lo) / (hi - lo) if hi > lo else 0
            centre = pixels[y + maps.PANEL // 2, x + maps.PANEL // 2]
            assert np.array_equal(centre, maps.viridis(np.array(unit)))
            numbers = x + maps.PANEL + maps.PAD + maps.BAR + maps.PAD // 2
            assert drawn[(numbers, y)] == f"{hi:.3g}"
            assert drawn[(numbers, y + maps.PANEL - maps.LINE)] == f"{lo:.3g}"


# the flags of a fit on random tiny weights (tests/test_errors.py's FAST), 1 epoch validated on one
# image
FIT = (
    "--epochs 1 --val-every 1 --beta 0 --threshold 0 --patch-size 512 --patches-per-side 1 "
    "--dtype fp32"
).split()


def test_fit_keeps_its_history_and_curve_draws_it(tmp_path, tiny_ckpt, capsys):
    """A real fit, 2 images for 1 epoch: emb.pt's history has an [epoch, ce, mse, sd] per step (2
    steps in epoch 1: epochs, not step numbers) and an [epoch, mIoU] per validation, the mIoU fit
    printed; --curve draws it. An emb.pt without a history (an older slime's) still loads; --curve
    says it has none."""
    for name, flip in (("a", False), ("b", True)):
        img, mask = synthetic_scene(flip=flip)
        Image.fromarray(img).save(tmp_path / f"{name}.png")
        Image.fromarray(mask).save(tmp_path / f"{name}_mask.png")
    emb, ckpt = tmp_path / "emb.pt", tiny_ckpt("sd2")
    pairs = [tmp_path / f for f in ("a.png", "a_mask.png", "b.png", "b_mask.png")]
    args = [
        "fit",
        *pairs,
        "--val",
        *pairs[:2],
        "--parts",
        ",".join(PARTS),
        "-o",
        emb,
        "--ckpt",
        ckpt,
        *FIT,
    ]
    assert slime.main([str(a) for a in args]) == 0
    printed = [
        float(m)
        for m in re.findall(r"epoch 1/1  validation mIoU (\d\.\d{4})", capsys.readouterr().err)
    ]
    e = torch.load(emb, weights_only=True)
    steps, vals = e["history"]["step"], e["history"]["validation"]
    assert [row[0] for row in steps] == [1, 1] and [row[0] for row in vals] == [1]
    assert all(
        len(row) == 4 and row[1] > 0 and row[2] > 0 and row[3] == 0 for row in steps
    )  # --beta 0: sd 0
    assert [round(v, 4) for _, v in vals] == printed and len(printed) == 1
    assert [e["epoch"], e["val_miou"]] in vals  # the epoch emb.pt kept
    assert maps.main([str(emb), "--curve", "-o", str(tmp_path / "curve.png")]) == 0
    curve = np.asarray(Image.open(tmp_path / "curve.png"))
    assert (
        curve.shape == (540, 960, 3) and (curve == (214, 39, 40)).all(-1).any()
    )  # the mIoU line is there

    def kept(emb):
        return (np.asarray(maps.curve(emb, "emb.pt")) == maps.GREY).all(-1).sum()

    loaded = slime.load_embeddings(emb)
    assert (
        kept(loaded) > kept(dict(loaded, epoch=-1)) + 100
    )  # the kept epoch's dashed line and its label
    for history in (
        dict(step=[], validation=[]),
        "absent",
    ):  # the last, old.pt without a history, loads
        old = tmp_path / "old.pt"
        e.pop("history") if history == "absent" else e.update(history=history)
        torch.save(e, old)
        capsys.readouterr()
        assert maps.main([str(old), "--curve", "-o", str(tmp_path / "old.png")]) == 2
        assert (
            capsys.readouterr().err
            == f"error: {old} has no fit history (fitted before slime kept one)\n"
        )
        assert not os.path.exists(tmp_path / "old.png")
    assert torch.equal(slime.load_embeddings(old)["context"], e["context"])  # what predict reads


@pytest.fixture
def files(tmp_path):
    """An emb.pt (4 patches, as predict's default) and a 512x384 image, made without a model."""
    sd = SimpleNamespace(family="sd2", fingerprint="0" * 16, dtype=torch.float32)
    slime.save_embeddings(tmp_path / "emb.pt", torch.randn(1, 77, 64), PARTS, sd, slime.Settings())
    Image.fromarray(synthetic_scene()[0][64:448]).save(tmp_path / "a.png")
    return tmp_path


NOT_EMB = "a.png: damaged, not a torch file, or holds pickled code, which slime never runs"
BAD = {  # the arguments (a .pt or .png: in the fixture's folder) -> the line
    "pixel": (
        "emb.pt a.png --pixel 512,10",
        "--pixel 512,10 is outside the image of 512x384 pixels",
    ),
    "pixel-format": (
        "emb.pt a.png --pixel 10",
        "argument --pixel: must be X,Y in the image's pixels, not '10'",
    ),
    "patch": ("emb.pt a.png --patch 4", "--patch 4 is outside the grid: patches 0..3"),
    "pixel-patch": (
        "emb.pt a.png --patch 0 --pixel 500,380",
        "--pixel 500,380 is outside patch 0 (from y 0, x 0 of the 512x512 image)",
    ),
    "image": ("emb.pt nope.png", "{d}/nope.png: No such file or directory"),
    "emb": ("a.png a.png", "{d}/" + NOT_EMB),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_input_is_one_line(files, case, capsys, monkeypatch):
    """Each mistake: one `error:` line on stderr, exit status 2, no picture, and no model loaded."""
    monkeypatch.setattr(slime, "load_models", lambda *a, **k: pytest.fail("a model was loaded"))
    args, line = BAD[case]
    argv = [str(files / a) if a.endswith((".pt", ".png")) else a for a in args.split()]
    assert maps.main([*argv, "-o", str(files / "maps.png")]) == 2
    assert capsys.readouterr().err == "error: " + line.replace("{d}", str(files)) + "\n"
    assert not os.path.exists(files / "maps.png")


def test_the_script_ends_a_mistake_in_one_line(files):
    """As a program: the same line and exit status 2, no traceback."""
    cmd = [
        sys.executable,
        os.path.join(ROOT, "examples", "maps.py"),
        str(files / "a.png"),
        "--curve",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == f"error: {files}/{NOT_EMB}\n"


@pytest.fixture
def fitted(files):
    """The fixture's folder, its emb.pt given a fit's history (--curve draws it without a model),
    and photo.jpg: a real JPEG, someone's photo."""
    e = torch.load(files / "emb.pt", weights_only=True)
    e.update(history=dict(step=[[1, 0.9, 0.1, 0.0], [1, 0.7, 0.1, 0.0]], validation=[[1, 0.5]]))
    torch.save(e, files / "emb.pt")
    Image.fromarray(synthetic_scene()[0]).save(files / "photo.jpg")
    return files


REFUSED = "exists and is not a picture maps.py made; pass --overwrite, or choose another -o"


def test_a_file_maps_py_did_not_make_is_refused_before_any_work(fitted, capsys, monkeypatch):
    """-o a photo (a JPEG, or a PNG without maps.py's mark) or a file that is no image: one line
    naming it, exit 2, its bytes as they were; drawing maps, the refusal comes before the model
    loads."""
    monkeypatch.setattr(slime, "load_models", lambda *a, **k: pytest.fail("a model was loaded"))
    Image.open(fitted / "photo.jpg").save(fitted / "photo.png")
    (fitted / "notes.png").write_text("not a picture\n")  # a text file named .png
    for name in ("photo.jpg", "photo.png", "notes.png"):
        out, before = fitted / name, (fitted / name).read_bytes()
        for args in (["--curve"], [str(fitted / "a.png")]):
            assert maps.main([str(fitted / "emb.pt"), *args, "-o", str(out)]) == 2
            refused = (
                f"-o {out}: maps.py draws PNG pictures; give a NAME.png"
                if name.endswith(".jpg")
                else f"{out} {REFUSED}"
            )
            assert capsys.readouterr().err == f"error: {refused}\n"
            assert out.read_bytes() == before


def test_maps_py_replaces_its_own_picture(fitted, capsys):
    """--curve -o curve.png twice: the second run replaces the first's picture
    (its mark says whose), whole: a new file renamed over it, no temp file left."""
    out, inodes = fitted / "curve.png", []
    for _ in range(2):
        assert maps.main([str(fitted / "emb.pt"), "--curve", "-o", str(out)]) == 0
        assert capsys.readouterr().err == f"wrote {out}\n"
        inodes.append(os.stat(out).st_ino)
    assert inodes[0] != inodes[1] and not [f for f in os.listdir(fitted) if f.endswith(".tmp")]
    with Image.open(out) as im:
        assert im.info["Software"] == "slime examples/maps.py" and im.size == (960, 540)


def test_overwrite_replaces_any_png(fitted, capsys):
    """--overwrite: a PNG maps.py did not make (someone's photo) is replaced by the picture."""
    photo = fitted / "photo.png"
    Image.open(fitted / "photo.jpg").save(photo)
    assert maps.main([str(fitted / "emb.pt"), "--curve", "-o", str(photo), "--overwrite"]) == 0
    assert capsys.readouterr().err == f"wrote {photo}\n"
    with Image.open(photo) as im:
        assert im.format == "PNG" and im.size == (960, 540)


def test_a_folder_at_o_is_refused(fitted, capsys):
    """-o a folder: refused, naming it, --overwrite or not; the folder is left as it was."""
    folder = fitted / "pictures"
    folder.mkdir()
    for flags in ([], ["--overwrite"]):
        assert maps.main([str(fitted / "emb.pt"), "--curve", "-o", str(folder), *flags]) == 2
        assert (
            capsys.readouterr().err
            == f"error: -o {folder} is a folder; give a picture's file path\n"
        )
    assert os.listdir(folder) == []


def test_drawing_shows_the_stage_line_then_names_the_picture(fitted, tiny_ckpt, capsys):
    """The model's load and each patch's UNet pass show on slime's stage line (in a log, plain
    lines), then one line names the picture it wrote."""
    out, ckpt = fitted / "maps.png", tiny_ckpt("sd2")
    args = [str(fitted / "emb.pt"), str(fitted / "a.png"), "--ckpt", ckpt, "--patch", "0"]
    assert maps.main([*args, "-o", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"loading {ckpt}  ") and err[-1] == f"wrote {out}", err
    assert any(line.startswith("patch 1/1 done  ") for line in err), err
