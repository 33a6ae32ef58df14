"""The paper's protocol on the authors' layout: `fit FOLDER`, `predict --masks` on the images' own
folder, and benchmarks/paper.py's table, checked against IoUs computed here by hand from the masks
predict wrote.

The authors ship each dataset as train_1/, train_10/, val/ and test/, each image NAME.png beside its
mask NAME.npy. synthetic_car below writes that layout with a "car" in flat colours (the car preset's
6 classes), which the SD-like checkpoint (attention follows colour) can learn in a few epochs.
"""

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import slime
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import paper  # noqa: E402

# test_cli's SD-like fit, shorter: 3 epochs at lr 0.5 (Average 70.4 for seed 0; at lr 0.3 only the
# body is learned in 3 epochs, 5 epochs cost 6 s more), validated once, no SD loss (its eps ignores
# the context), fp32
SDLIKE = "--epochs 3 --lr 0.5 --val-every 3 --beta 0 --dtype fp32".split()
LOAD_MODELS = slime.load_models  # before no_load_here replaces it
SPLITS = dict(train_1=1, train_10=2, val=1, test=2)  # the authors' folders, a few images each


def synthetic_car(seed, h=384, w=512):
    """A 'car' in flat colours and textures, moved a little per seed: body 1 (striped red), light 2
    (yellow), plate 3 (white), wheel 4 (black discs), window 5 (cyan), on a blue background."""
    rng = np.random.default_rng(seed)
    dy, dx = rng.integers(-30, 31, 2)
    yy, xx = np.mgrid[:h, :w]
    yy, xx = yy - dy, xx - dx
    img = np.zeros((h, w, 3), np.float32) + [0.15, 0.2, 0.7] + rng.normal(0, 0.08, (h, w, 3))
    mask = np.zeros((h, w), np.uint8)
    body = (yy > 150) & (yy < 280) & (xx > 80) & (xx < 430)
    regions = [
        (body, [0.9, 0.15, 0.1], 1),
        (body & ((yy // 8) % 2 == 0), [0.54, 0.09, 0.06], 1),
        ((yy > 100) & (yy <= 150) & (xx > 150) & (xx < 360), [0.2, 0.9, 0.9], 5),
        ((yy > 170) & (yy < 200) & (xx > 400) & (xx < 430), [1.0, 0.95, 0.1], 2),
        ((yy > 240) & (yy < 270) & (xx > 80) & (xx < 140), [0.97, 0.97, 0.97], 3),
        (
            ((yy - 290) ** 2 + (xx - 150) ** 2 < 1600) | ((yy - 290) ** 2 + (xx - 360) ** 2 < 1600),
            [0.05] * 3,
            4,
        ),
    ]
    for region, colour, label in regions:
        img[region], mask[region] = colour, label
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), mask


def authors_layout(root, splits=SPLITS, classes=6):
    """DATADIR/car as the authors ship it -> the dataset folder; classes: labels past it become the
    last."""
    seed = 0
    for split, n in splits.items():
        (root / split).mkdir(parents=True)
        for i in range(n):
            img, mask = synthetic_car(seed)
            Image.fromarray(img).save(root / split / f"{i:04d}.png")
            np.save(root / split / f"{i:04d}.npy", np.minimum(mask, classes - 1))
            seed += 1
    return root


def hand_ious(pred, gt):
    """{class: IoU} of the classes in gt, the ground truth first nearest-resized to the prediction's
    size."""
    rows = (np.arange(pred.shape[0]) * gt.shape[0] // pred.shape[0]).astype(
        int
    )  # nearest: floor(i * in / out)
    cols = (np.arange(pred.shape[1]) * gt.shape[1] // pred.shape[1]).astype(int)
    gt = gt[rows][:, cols]
    out = {}
    for c in np.unique(gt):
        inter, union = np.sum((pred == c) & (gt == c)), np.sum((pred == c) | (gt == c))
        out[int(c)] = inter / (union + 1e-7)
    return out


def calls(monkeypatch):
    """slime.main and slime.segment counted: [argv of each main], and how many images were
    segmented."""
    seen, main, segment = SimpleCount(), slime.main, slime.segment

    def counted_main(argv):
        seen.mains.append(list(argv))
        return main(argv)

    def counted_segment(*args, **kwargs):
        seen.segments += 1
        return segment(*args, **kwargs)

    monkeypatch.setattr(slime, "main", counted_main)
    monkeypatch.setattr(slime, "segment", counted_segment)
    return seen


class SimpleCount:
    def __init__(self):
        self.mains, self.segments = [], 0


def test_the_table_of_two_seeds_is_the_masks_ious_and_a_rerun_after_ctrl_c_resumes(
    tmp_path, sdlike_ckpt, monkeypatch, capsys
):
    """paper.py on the authors' layout: interrupted (Ctrl-C in seed 1's predict), rerun, then rerun
    again. The table equals IoUs computed here from the masks predict wrote and the .npy ground
    truth; std is 0 only where the seeds agree; the published row of Table 2 stands under it;
    nothing finished is done twice."""
    data, out = authors_layout(tmp_path / "car"), tmp_path / "paper"
    argv = [str(data), "--seeds", "0,1", "--ckpt", sdlike_ckpt, "-o", str(out), *SDLIKE]
    seen, segment = calls(monkeypatch), slime.segment

    def interrupted(*args, **kwargs):  # Ctrl-C while seed 1 segments its second test image
        if (
            seen.segments == 5
        ):  # seed 0: 1 validation, 2 test images; seed 1: 1 validation, 2 test images
            raise KeyboardInterrupt
        return segment(*args, **kwargs)

    monkeypatch.setattr(slime, "segment", interrupted)
    assert paper.main(argv) == 130
    err = capsys.readouterr().err
    assert "skipped 2 non-image files (2 read as ground truth): 0000.npy, 0001.npy" in err
    assert err.endswith("paper.py: stopped (exit status 130); the same command resumes\n")
    assert [m[0] for m in seen.mains] == ["fit", "predict", "fit", "predict"]

    seen = calls(monkeypatch)
    assert (
        paper.main(argv) == 0
    )  # seed 0 done, seed 1's fit finished: its predict resumes, 1 image to go
    assert [m[0] for m in seen.mains] == ["predict"] and seen.segments == 1
    printed = capsys.readouterr().out
    table = json.loads((out / "table.json").read_text())

    columns = ["Body", "Light", "Plate", "Wheel", "Window", "Background"]
    by_hand = {}
    for seed in (0, 1):
        per_class = {c: [] for c in range(6)}
        for stem in ("0000", "0001"):
            pred = np.array(
                Image.open(out / f"seed{seed}" / "test" / "SegmentationClass" / f"{stem}.png")
            )
            assert pred.shape == (512, 512)  # the release's protocol: masks and scores at 512x512
            for c, v in hand_ious(pred, np.load(data / "test" / f"{stem}.npy")).items():
                per_class[c].append(100 * v)
        row = {name: np.mean(per_class[c]) for c, name in zip([1, 2, 3, 4, 5, 0], columns)}
        by_hand[seed] = row | {"Average": np.mean(list(row.values()))}
    assert table["columns"] == columns + ["Average"]
    for c in table["columns"]:
        values = [by_hand[0][c], by_hand[1][c]]
        mean, std = table["slime"][c]
        assert mean == pytest.approx(np.mean(values), abs=1e-9) and std == pytest.approx(
            np.std(values), abs=1e-9
        )
        assert (std == 0) == (values[0] == values[1])
    assert (
        by_hand[0]["Average"] > 50
    )  # the SD-like model learns the car's colours: a table of real numbers
    assert table["paper"] == {
        "table": "Table 2",
        "row": dict(
            zip(
                table["columns"],
                [
                    [79.6, 0.4],
                    [37.5, 5.4],
                    [46.5, 2.6],
                    [65.0, 1.4],
                    [65.6, 1.6],
                    [75.7, 3.1],
                    [61.6, 0.5],
                ],
            )
        ),
    }
    md = (out / "table.md").read_text()
    lines = md.splitlines()
    assert lines[2] == "| | Body | Light | Plate | Wheel | Window | Background | Average |"
    assert (
        lines[5]
        == "| paper, Table 2 | 79.6 ± 0.4 | 37.5 ± 5.4 | 46.5 ± 2.6 | 65.0 ± 1.4 | 65.6 ± 1.6 "
        "| 75.7 ± 3.1 | 61.6 ± 0.5 |"
    )
    assert table["settings"]["out_size"] == 512 and table["settings"]["epochs"] == 3
    assert (
        table["settings"]["patch_size"] == 512 and table["settings"]["min_crop_ratio"] == 0.6
    )  # the car preset
    assert printed.endswith(md + "\n")  # after predict's own IoU tables, on stdout

    seen = calls(monkeypatch)
    assert (
        paper.main(argv) == 0 and seen.mains == []
    )  # all done: the table again, from the seeds' records
    assert capsys.readouterr().out == md + "\n"


PLAN_CASES = [
    ("no such folder", [], "paper.py: error: {d}/nowhere: no such folder"),
    (
        "a dataset without a preset",
        [],
        "paper.py: error: {d}/bike: no preset for 'bike' (car, horse, celeba); give --parts",
    ),
    (
        "a missing split",
        [],
        "paper.py: error: {d}/car/test: no such folder "
        "(the authors' layout: train_1, train_10, val, test)",
    ),
    (
        "an empty split",
        [],
        "paper.py: error: {d}/car/test holds no image/mask pairs (NAME.png beside NAME.npy)",
    ),
    (
        "an image without its mask",
        [],
        "paper.py: error: {d}/car/test/0001.png has no mask: a folder holds",
    ),
    (
        "a mask without its image",
        [],
        "paper.py: error: {d}/car/train_1/0000.npy has no image: a folder holds",
    ),
    ("bad seeds", ["--seeds", "0,00"], "paper.py: error: --seeds 0,00: distinct whole numbers"),
    (
        "a flag slime does not know",
        ["--epoch", "2"],
        "paper.py: error: slime.py: unrecognized arguments: --epoch 2",
    ),
    (
        "a flag of slime out of range",
        ["--lr", "0"],
        "paper.py: error: slime.py fit: argument --lr: must be a number in",
    ),
    (
        "a flag paper.py sets",
        ["--seed", "5"],
        "paper.py: error: --seed is paper.py's to set (--seeds, the folder's",
    ),
    (
        "ground truth with a class past the parts",
        [],
        "paper.py: error: {d}/car/test/0001.npy has class values [7]",
    ),
    (
        "another table in -o",
        ["--shots", "10"],
        "paper.py: error: -o {d}/out holds a table made with another shots",
    ),
]


@pytest.mark.parametrize("case, extra, line", PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_paper_refuses_in_one_line_before_any_model_loads(
    tmp_path, monkeypatch, capsys, case, extra, line
):
    data, out = authors_layout(tmp_path / "car", dict(train_1=1, test=2)), str(tmp_path / "out")
    folder = {
        "no such folder": tmp_path / "nowhere",
        "a dataset without a preset": tmp_path / "bike",
    }.get(case, data)
    if case == "a dataset without a preset":
        folder.mkdir()
    elif case in ("a missing split", "an empty split"):
        for f in (data / "test").iterdir():
            f.unlink()
        (data / "test").rmdir() if case == "a missing split" else None
    elif case == "ground truth with a class past the parts":  # found now, not after a fit
        np.save(data / "test" / "0001.npy", np.full((384, 512), 7, np.uint8))
    elif case == "an image without its mask":
        (data / "test" / "0001.npy").unlink()
    elif case == "a mask without its image":
        (data / "train_1" / "0000.png").unlink()
    elif case == "another table in -o":  # a 1-shot table begun, then a 10-shot one in the same -o
        (data / "train_10").symlink_to(data / "train_1")
        (data / "val").symlink_to(data / "train_1")
        monkeypatch.setattr(
            slime, "main", lambda argv: 2
        )  # fit's own plan refused it: nothing begun,
        assert paper.main([str(data), "-o", out, "--epochs", "3"]) == 2
        monkeypatch.setattr(
            slime, "main", lambda argv: 130
        )  # so another command may take the folder
        assert paper.main([str(data), "-o", out]) == 130
        (
            tmp_path / "out" / "seed0"
        ).mkdir()  # and once a seed has begun, the folder is that command's
    monkeypatch.setattr(
        slime, "main", lambda argv: pytest.fail("slime ran before the plan refused")
    )
    capsys.readouterr()
    assert paper.main([str(folder), "-o", out, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(line.replace("{d}", str(tmp_path))) and err.count("\n") == 1, err


def test_an_unfinished_fit_resumes_and_a_finished_one_is_not_fitted_again(
    tmp_path, monkeypatch, capsys
):
    """A seed whose emb.pt an interrupt left unfinished goes on (fit --resume), or starts again if
    an older slime kept no state to go on from (--overwrite); a finished one goes straight to
    predict. Watched through the argv paper.py hands slime (which stops at once with Ctrl-C's
    130)."""
    data = authors_layout(tmp_path / "car", dict(train_1=1, test=1))
    for n, (finished, resume, first, flag) in enumerate(
        [
            (False, dict(epoch=1), "fit", "--resume"),
            (False, None, "fit", "--overwrite"),
            (True, None, "predict", ""),
        ]
    ):
        out = tmp_path / f"out{n}"
        (out / "seed0").mkdir(parents=True)
        emb = dict(format=slime.EMB_FORMAT, finished=finished, resume=resume)
        monkeypatch.setattr(slime, "load_embeddings", lambda path, emb=emb: emb)
        argvs = []
        monkeypatch.setattr(slime, "main", lambda argv, argvs=argvs: argvs.append(argv) or 130)
        torch.save({}, out / "seed0" / "emb.pt")
        assert paper.main([str(data), "--seeds", "0", "-o", str(out)]) == 130
        assert argvs[0][0] == first and [
            a for a in argvs[0] if a in ("--resume", "--overwrite")
        ] == [flag] * bool(flag)
    capsys.readouterr()


def planned(*argv):
    """fit's plan of these arguments (files read and checked, no
    model) -> (train pairs, val pairs)."""
    args = slime.build_parser().parse_args(["fit", *map(str, argv), "--dtype", "fp32"])
    _, _, _, train, val, *_ = slime.plan_fit(args, slime.Console(True))
    return [m.tolist() for _, m in train], [m.tolist() for _, m in val]


def test_fit_takes_folders_pairs_and_the_shells_glob_in_any_mix(tmp_path, tiny_ckpt, no_load_here):
    """`fit FOLDER` pairs each image with the mask of its stem; folders and pairs mix, for fit and
    --val; a shell's `train_10/*` (NAME.npy before NAME.png) pairs as the folder does; a photo's
    mask may be a PNG."""
    data = authors_layout(tmp_path / "car")
    npy = lambda split, i: np.load(data / split / f"{i:04d}.npy").tolist()  # noqa: E731
    ckpt, o = ["--ckpt", tiny_ckpt("sd2")], ["-o", tmp_path / "emb.pt"]
    train_10, val = [npy("train_10", 0), npy("train_10", 1)], [npy("val", 0)]
    assert planned(data / "train_10", *ckpt, *o) == (train_10, [])
    assert planned(data / "train_10", "--val", data / "val", *ckpt, *o) == (train_10, val)
    pair = [data / "train_1" / "0000.png", data / "train_1" / "0000.npy"]
    both = (train_10 + [npy("train_1", 0)], [npy("train_1", 0)] + val)
    assert planned(data / "train_10", *pair, "--val", *pair, data / "val", *ckpt, *o) == both
    glob = sorted((data / "train_10").iterdir())  # 0000.npy, 0000.png, 0001.npy, 0001.png
    assert planned(*glob, *ckpt, *o) == (train_10, [])
    photo = tmp_path / "photos"
    photo.mkdir()
    img, mask = synthetic_car(7)
    Image.fromarray(img).save(photo / "a.jpg")
    Image.fromarray(mask).save(photo / "a.png")
    assert planned(photo, *ckpt, *o) == ([mask.tolist()], [])


FOLDER_CASES = [
    (
        "an image without its mask",
        "{d}/car/train_10/0001.png has no mask: a folder holds NAME.png (the image)",
    ),
    (
        "a mask without its image",
        "{d}/car/train_10/0000.npy has no image: a folder holds NAME.png (the image)",
    ),
    (
        "three files of one stem",
        "{d}/car/train_10/0000.jpg shares its stem with 2 other files: a folder holds",
    ),
    (
        "a folder of no pairs",
        "{d}/car/train_10 holds no image/mask pairs (NAME.png beside NAME.npy)",
    ),
    (
        "a file, then a folder",
        "fit takes image/mask pairs or folders, but {d}/car/val/0000.png has no partner",
    ),
    # NAME.npy first is swapped with NAME.png (a shell's glob), never with another stem's image
    ("a .npy, then another stem's image", "{d}/car/val/0000.npy: cannot identify image file"),
    ("a path that is not there", "{d}/car/nowhere: no such file or folder"),
]


@pytest.mark.parametrize("case, line", FOLDER_CASES, ids=[c for c, _ in FOLDER_CASES])
def test_fit_refuses_a_folder_with_an_unpaired_file_before_the_model_loads(
    tmp_path, tiny_ckpt, capsys, no_load_here, case, line
):
    data = authors_layout(tmp_path / "car", dict(train_10=2, val=1))
    folder, extra = data / "train_10", []
    if case == "an image without its mask":
        (folder / "0001.npy").unlink()
    elif case == "a mask without its image":
        (folder / "0000.png").unlink()
    elif case == "three files of one stem":
        Image.open(folder / "0000.png").save(folder / "0000.jpg")
    elif case == "a folder of no pairs":
        for f in folder.iterdir():
            f.unlink()
        (folder / "notes.txt").write_text("not an image")
    elif case == "a path that is not there":
        folder = data / "nowhere"
    elif case == "a .npy, then another stem's image":
        extra, folder = [data / "val" / "0000.npy"], folder / "0001.png"
    else:
        extra = [data / "val" / "0000.png"]
    argv = ["fit", *extra, folder, "--ckpt", tiny_ckpt("sd2"), "-o", tmp_path / "emb.pt", "-q"]
    assert slime.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("slime: error: " + line.replace("{d}", str(tmp_path)))
        and err.count("\n") == 1
    ), err
    assert not (tmp_path / "emb.pt").exists()


@pytest.fixture
def no_load_here(monkeypatch):
    monkeypatch.setattr(
        slime, "load_models", lambda *a, **k: pytest.fail("the model loaded before the plan")
    )


def test_the_authors_embeddings_are_evaluated_without_a_fit(
    tmp_path, tiny_ckpt, monkeypatch, capsys
):
    """--embeddings: the release's folder of embedding_{i}.pth becomes each seed's emb.pt (the
    release's settings: BGR, 512x512), predict runs with the seed, and the table carries the row of
    --shots."""
    ckpt = tiny_ckpt("sd2")
    data, trained = authors_layout(tmp_path / "car", dict(test=1)), tmp_path / "trained"
    trained.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(5):  # the car's 5 parts, each a (1, 1, D) vector as the release saves them
        torch.save(
            torch.randn(1, 1, 64, generator=gen).requires_grad_(True),
            trained / f"embedding_{i}.pth",
        )
    seen = calls(monkeypatch)
    argv = [
        str(data),
        "--embeddings",
        str(trained),
        "--shots",
        "10",
        "--seeds",
        "0,1",
        "--ckpt",
        ckpt,
    ]
    assert (
        paper.main([*argv, "-o", str(tmp_path / "out"), "--dtype", "fp32", "--threshold", "0"]) == 0
    )
    assert [m[0] for m in seen.mains] == ["predict", "predict"] and seen.segments == 2
    assert seen.mains[1][seen.mains[1].index("--seed") + 1] == "1"
    table = json.loads((tmp_path / "out" / "table.json").read_text())
    assert (
        table["settings"]["bgr"]
        and table["settings"]["out_size"] == 512
        and table["settings"]["threshold"] == 0
    )
    assert table["paper"]["table"] == "Table 2" and table["paper"]["row"]["Average"] == [68.3, 1.0]
    emb = slime.load_embeddings(tmp_path / "out" / "emb.pt")  # converted once, for every seed
    assert torch.equal(emb["learned"][2], torch.load(trained / "embedding_2.pth").detach()[0, 0])
    assert "SLiMe on car, 10-sample, the authors' embeddings" in capsys.readouterr().out


@pytest.mark.parametrize("row", sorted(paper.PUBLISHED), ids=lambda r: f"{r[0]}-{r[1]}")
def test_the_published_rows_are_copied_whole(row):
    """Each of the paper's SLiMe rows has a mean and a std per part column, Background and Average,
    and its Average is the mean of its columns to the paper's rounding: a dropped or swapped number
    shows."""
    values = np.array(paper.PUBLISHED[row].split(), float).reshape(-1, 2)
    columns = paper.DATASETS[row[0]][2].split()
    assert len(values) == len(columns) + 2 and len(columns) + 1 == len(
        slime.PRESETS[paper.DATASETS[row[0]][0]]["parts"].split(",")
    )
    assert abs(values[:-1, 0].mean() - values[-1, 0]) <= 0.05 + 1e-9


def test_the_readmes_six_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """README, "Reproduce the paper": each command, with $DATADIR set, plans its row and hands fit
    the split folders and preset of that row (slime stops it there, as Ctrl-C would)."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    commands = [
        line.split("#")[0].split()
        for line in readme.splitlines()
        if line.startswith("python benchmarks/paper.py")
    ]
    assert len(commands) == 6
    for name in ("car", "horse", "celeba"):
        classes = len(slime.PRESETS[paper.DATASETS[name][0]]["parts"].split(","))
        authors_layout(tmp_path / name, dict(train_1=1, train_10=1, val=1, test=1), classes)
    monkeypatch.chdir(tmp_path)
    for command in commands:
        argvs = []
        monkeypatch.setattr(slime, "main", lambda argv, argvs=argvs: argvs.append(argv) or 130)
        argv = [a.replace("$DATADIR", str(tmp_path)) for a in command[2:]]
        assert paper.main(argv) == 130
        name, shots = os.path.basename(argv[0]), argv[argv.index("--shots") + 1]
        fit = argvs[0]
        train, val = ("train_1", "train_1") if shots == "1" else ("train_10", "val")
        assert fit[:4] == ["fit", str(tmp_path / name / train), "--val", str(tmp_path / name / val)]
        assert fit[fit.index("--preset") + 1] == paper.DATASETS[name][0] and "--seed" in fit
    capsys.readouterr()


def test_a_dataset_without_a_preset_runs_with_its_parts_and_no_published_row(
    tmp_path, monkeypatch, capsys
):
    """Any other folder: fit gets --parts (no preset), the table's columns are its parts then
    Background, and no paper row is printed. slime stands in here: its predict writes a summary.json
    of known IoUs."""
    data = authors_layout(tmp_path / "bike", dict(train_1=1, test=1), classes=2)
    argvs = []

    def fake(argv):  # two test images' IoUs: wing on one of them only
        argvs.append(argv)
        if argv[0] == "predict":
            out = argv[argv.index("-o") + 1]
            os.makedirs(out)
            images = [dict(iou=dict(background=0.5, wing=0.25)), dict(iou=dict(background=0.75))]
            with open(os.path.join(out, "summary.json"), "w") as f:
                json.dump(dict(images=images, settings=dict(seed=0, threshold=0.2)), f)
            with open(os.path.join(out, slime.RECORD), "w") as f:
                json.dump(dict(dtype="float32"), f)
        return 0

    monkeypatch.setattr(slime, "main", fake)
    monkeypatch.setattr(
        slime, "load_embeddings", lambda path: dict(fingerprint="f" * 16, dtype="float32")
    )
    assert (
        paper.main(
            [str(data), "--parts", "background,wing", "--seeds", "0", "-o", str(tmp_path / "o")]
        )
        == 0
    )
    fit = argvs[0]
    assert fit[fit.index("--parts") + 1] == "background,wing" and "--preset" not in fit
    md = capsys.readouterr().out
    assert "| | wing | Background | Average |" in md and "paper," not in md
    assert (
        "| slime | 25.0 ± 0.0 | 62.5 ± 0.0 | 43.8 ± 0.0 |" in md
    )  # background: the mean over both images


def test_predict_finds_each_images_mask_in_its_own_folder_as_fit_pairs_them(
    tmp_path, tiny_ckpt, capsys, no_load_here
):
    """--masks on the images' folder: the mask is the other file of the stem (NAME.npy, any case of
    the extension; a PNG mask beside a JPEG photo), never itself an image; named files
    (a shell's glob) too."""
    ckpt, data = tiny_ckpt("sd2"), authors_layout(tmp_path / "car", dict(test=2))
    sd, emb = (
        LOAD_MODELS(ckpt),
        tmp_path / "emb.pt",
    )  # the model for emb.pt; predict's plan loads none
    slime.save_embeddings(
        emb,
        slime.prompt_contexts(sd, 6)[0],
        slime.PRESETS["pascal-car"]["parts"].split(","),
        sd,
        slime.Settings(),
    )
    test = data / "test"
    (test / "0001.png").rename(test / "0001.PNG")
    (test / "0001.npy").rename(test / "0001.NPY")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(synthetic_car(5)[0]).save(photos / "a.jpg")
    Image.fromarray(synthetic_car(5)[1]).save(photos / "a.png")

    def plan(*inputs, masks=None):  # predict's plan of these inputs -> [(image, its ground truth)]
        truth = ["--masks", str(masks)] if masks else []
        argv = [
            "predict",
            emb,
            *inputs,
            *truth,
            "--ckpt",
            ckpt,
            "-o",
            tmp_path / "out",
            "--dtype",
            "fp32",
        ]
        jobs = slime.plan_predict(
            slime.build_parser().parse_args(map(str, argv)), slime.Console(False)
        )[4]
        return [(os.path.basename(j.image), j.gt and os.path.basename(j.gt)) for j in jobs]

    pairs = [("0000.png", "0000.npy"), ("0001.PNG", "0001.NPY")]
    assert plan(test, masks=test) == pairs
    assert (
        "skipped 2 non-image files (2 read as ground truth): 0000.npy, 0001.NPY"
        in capsys.readouterr().err
    )
    assert (
        plan(*sorted(test.iterdir()), masks=test) == pairs
    )  # 0000.npy, 0000.png, 0001.NPY, 0001.PNG
    assert plan(photos, masks=photos) == [("a.jpg", "a.png")]
    assert plan(*sorted(test.iterdir())) == [
        ("0000.png", None),
        ("0001.PNG", None),
    ]  # a .npy is never an image
