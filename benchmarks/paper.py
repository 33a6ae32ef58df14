"""The paper's protocol, one command per table row: SLiMe (arXiv 2309.03179), Sec. 5, Tables 2-4.

    python benchmarks/paper.py DATADIR/car --shots 1 --seeds 0,1,2 [--ckpt FILE] -o paper-car-1/
    # a quick look
    python benchmarks/paper.py DATADIR/horse --shots 10 -o paper-horse-10/ --epochs 20
    python benchmarks/paper.py DATADIR/celeba --embeddings TRAINED/ -o paper-celeba-authors/

DATADIR holds the authors' data as it ships (the link at release/README.md#L75, the release being
https://github.com/aliasgharkhani/SLiMe/tree/9de06f1a1e9ca83bd900a0b68646ce4885485f68): per dataset
train_1/, train_10/, val/ and test/, each image NAME.png beside its mask NAME.npy. The folder's name
picks slime's preset (car, horse, celeba: the release README's parts, crop ratio and patching); any
other folder needs --parts, and gets no published row. For each seed: `slime.py fit` on train_1
validated on train_1 (1-shot, as the release's README runs it) or on train_10 validated on val
(10-shot), then `slime.py predict` on test with its ground truth, at the release's 512x512
(--out-size 512). --embeddings FOLDER skips the fit and evaluates the authors' trained
`embedding_{i}.pth` (examples/release_embeddings.py); the seeds then vary predict's noise. Every
other flag goes to fit (--epochs 20, --dtype bf16, ...), or with --embeddings to predict.

The table, as the paper's: a column per part in the paper's order and names, then Background and
Average (the mean of the columns); a part's IoU is the mean over the test images that hold it (the
release's rule, slime.miou_table); each in percent, mean ± std (population, ddof 0) over the seeds;
under it the paper's published SLiMe row ("conducted three times with different initializations",
Sec. 5).

Writes to -o: table.md and table.json (the command and the settings beside the numbers),
paper-run.json (what a rerun must match), emb.pt with --embeddings, and per seed seed{N}/emb.pt,
seed{N}/test/ (predict's own layout, so the table can be recomputed from the masks) and
seed{N}/ious.json. Resumable: a seed whose ious.json is there is done, a finished emb.pt is not
fitted again, an unfinished one goes on (fit --resume), and predict resumes by its run record;
Ctrl-C loses at most the image or the epoch in progress. Not a test.
"""

import json
import os
import signal
import sys
import time
from types import SimpleNamespace

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples")]
import release_embeddings  # noqa: E402
import slime  # noqa: E402

# folder name -> (slime's preset, the paper's table, "release part:paper column" in the paper's
# column order)
DATASETS = {
    "car": ("pascal-car", "Table 2", "body:Body light:Light plate:Plate wheel:Wheel window:Window"),
    "horse": ("pascal-horse", "Table 3", "head:Head leg:Leg neck+torso:Neck+Torso tail:Tail"),
    "celeba": ("celeba", "Table 4", "cloth:Cloth brow:Eyebrow ear:Ear eye:Eye hair:Hair "
               "mouth:Mouth neck:Neck nose:Nose skin:Face"),
}  # fmt: skip
# The paper's SLiMe rows, copied from its Tables 2-4: mean and std per column (the parts,
# Background, Average)
PUBLISHED = {
    ("car", 10): "81.5 1.0  56.8 1.2  54.8 2.7  68.3 0.1  70.3 0.9  78.4 1.6  68.3 1.0",
    ("car", 1): "79.6 0.4  37.5 5.4  46.5 2.6  65.0 1.4  65.6 1.6  75.7 3.1  61.6 0.5",
    ("horse", 10): "63.8 0.7  59.5 2.1  68.1 4.4  45.4 2.4  79.6 2.5  63.3 2.4",
    ("horse", 1): "61.5 1.0  50.3 0.7  55.7 1.1  40.1 2.9  74.4 0.6  56.4 0.8",
    ("celeba", 10): "63.1 1.6  62.0 1.6  64.2 1.9  65.5 3.0  85.3 0.4  82.1 1.6  79.4 2.2"
                    "  79.1 1.4  88.8 0.2  87.1 0.0  75.7 0.4",
    ("celeba", 1): "52.6 1.4  44.2 2.1  57.1 3.6  61.3 4.6  80.9 0.5  74.8 2.9  78.9 1.3"
                   "  77.5 1.8  86.8 0.3  81.6 0.8  69.6 0.3",
}  # fmt: skip
RECORD = "paper-run.json"


class Stopped(Exception):
    """slime's fit, predict or the converter ended with this exit status; it has said why."""


def run(main, argv):
    status = main(argv)
    if (
        status
    ):  # 130 and 143: Ctrl-C and SIGTERM; 1: predict could not read a test image; 2: a mistake
        raise Stopped(status)


def plan(args, passed):
    """Everything checked before any model loads -> (parts, columns {part: column}, splits,
    published row)."""
    data, name = os.path.normpath(args.data), args.name
    if not os.path.isdir(data):
        raise slime.SlimeError(
            f"{args.data}: no such folder (DATADIR comes first, the flags for slime after it)"
        )
    preset, table, names = DATASETS.get(name, (None, None, ""))
    names = dict(pair.split(":") for pair in names.split())
    if not (preset or args.parts):
        raise slime.SlimeError(
            f"{args.data}: no preset for '{name}' ({', '.join(DATASETS)}); give --parts"
        )
    parts = slime.part_names(args.parts or slime.PRESETS[preset]["parts"])
    ours = preset and parts == slime.part_names(
        slime.PRESETS[preset]["parts"]
    )  # the paper's columns and row
    columns = {p: names[p] for p in names} if ours else {p: p for p in parts[1:]}
    columns[parts[0]] = "Background"
    train = "train_1" if args.shots == 1 else "train_10"
    splits = dict(test="test") | (
        {} if args.embeddings else dict(train=train, val={1: train, 10: "val"}[args.shots])
    )
    splits = {k: os.path.join(data, v) for k, v in splits.items()}
    pairs = {}
    for (
        split,
        folder,
    ) in splits.items():  # each image with its mask, or one line naming the one without
        if not os.path.isdir(folder):
            raise slime.SlimeError(
                f"{folder}: no such folder (the authors' layout: train_1, train_10, val, test)"
            )
        pairs[split] = slime.folder_pairs(folder)
    # the test split's ground truth checked now as predict will check it (sizes, labels), not after
    # the fits; fit's plan checks the training and validation masks before its model loads
    jobs = [SimpleNamespace(image=image, mask=image) for image in pairs["test"][0::2]]
    slime.find_ground_truth(jobs, splits["test"], dict(parts=parts, colors=[]), slime.Console(True))
    # the flags for slime, checked by slime's parser; the seed, preset and splits are paper.py's to
    # set
    mode = ["predict", "emb.pt", "test"] if args.embeddings else ["fit", "image", "mask"]
    given = vars(slime.build_parser().parse_args([*mode, *passed]))
    taken = [
        k
        for k in ("seed", "preset", "val", "masks", "overwrite", "resume")
        if given.get(k) not in (None, False)
    ]
    if taken:
        raise slime.SlimeError(
            f"--{taken[0]} is paper.py's to set (--seeds, the folder's preset, its splits)"
        )
    seeds = args.seeds.split(",")
    if not all(s.isdecimal() for s in seeds) or len({int(s) for s in seeds}) < len(seeds):
        raise slime.SlimeError(
            f"--seeds {args.seeds}: distinct whole numbers, comma-separated, such as 0,1,2"
        )
    row = (
        PUBLISHED.get((name, args.shots)) if ours else None
    )  # --embeddings: --shots names the authors' row
    published = row and dict(
        zip([*columns.values(), "Average"], np.array(row.split(), float).reshape(-1, 2))
    )
    record = dict(data=os.path.abspath(data), shots=args.shots, parts=parts, passed=passed)
    record.update(embeddings=args.embeddings and os.path.abspath(args.embeddings), ckpt=args.ckpt)
    record.update(device=args.device, dtype=args.dtype)
    path = os.path.join(args.output, RECORD)
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise slime.SlimeError(f"-o {args.output} is a file; give a folder for the table")
    # the same folder, the same table (only --seeds may grow), once any seed has begun
    if os.path.exists(path) and set(os.listdir(args.output)) != {RECORD}:
        with slime.named(path), open(path) as f:
            old = json.load(f)
        differs = [k for k in record if old.get(k) != record[k]]
        if differs:
            raise slime.SlimeError(
                f"-o {args.output} holds a table made with another {differs[0]}; choose another -o"
            )
    slime.commit({path: (json.dumps(record, indent=2) + "\n").encode()})
    return parts, columns, splits, [int(s) for s in seeds], (table, published)


def seed_ious(summary_path, parts):
    """predict's summary.json -> {part: IoU}, a part's IoU the mean over the images that hold it."""
    with slime.named(summary_path), open(summary_path) as f:
        images = json.load(f)["images"]
    per_class, _ = slime.miou_table(
        [{parts.index(k): v for k, v in r["iou"].items()} for r in images if "iou" in r], len(parts)
    )
    return {p: v for p, v in zip(parts, per_class) if v is not None}


def run_seed(args, passed, parts, splits, seed, say):
    """One seed: fit (or convert the authors' embeddings), then predict the test
    split -> {part: IoU}."""
    folder, ckpt = (
        os.path.join(args.output, f"seed{seed}"),
        ["--ckpt", args.ckpt] if args.ckpt else [],
    )
    model = ckpt + [
        a for f in ("device", "dtype") if vars(args)[f] for a in (f"--{f}", vars(args)[f])
    ]
    emb, fitted = emb_path(args, seed), False
    preset = ["--preset", DATASETS[args.name][0]] if args.name in DATASETS else []
    if args.embeddings and not os.path.exists(emb):
        say(f"the authors' embeddings {args.embeddings} -> {emb}")
        run(
            release_embeddings.main,
            [args.embeddings, "--parts", ",".join(parts), "-o", emb, *ckpt, *preset],
        )
    elif not args.embeddings and not (
        os.path.exists(emb) and slime.load_embeddings(emb).get("finished")
    ):
        # an interrupted fit goes on from its last epoch; one an older slime stopped (no state kept)
        # starts again
        stopped = slime.load_embeddings(emb) if os.path.exists(emb) else {}
        again = ["--resume"] if stopped.get("resume") else ["--overwrite"] * bool(stopped)
        say(
            f"seed {seed}: fit on {splits['train']}, validated on {splits['val']}"
            + " (resumed)" * (again == ["--resume"])
        )
        size = (
            []
            if any(a.startswith(("--out-size", "--window")) for a in passed)
            else ["--out-size", "512"]
        )
        fit = [
            splits["train"],
            "--val",
            splits["val"],
            "-o",
            emb,
            "--seed",
            str(seed),
            *preset,
            *size,
        ]
        run(slime.main, ["fit", *fit, "--parts", ",".join(parts), *passed, *model] + again)
        fitted = True
    say(f"seed {seed}: predict {splits['test']}")
    out = os.path.join(folder, "test")
    extra = ["--seed", str(seed), *passed] if args.embeddings else []
    # a new fit makes the test folder's earlier masks another run's: --overwrite
    run(
        slime.main,
        ["predict", emb, splits["test"], "--masks", splits["test"], "-o", out, *model, *extra]
        + ["--overwrite"] * fitted,
    )
    ious = seed_ious(os.path.join(out, "summary.json"), parts)
    slime.commit({os.path.join(folder, "ious.json"): (json.dumps(ious, indent=2) + "\n").encode()})
    return ious


def emb_path(args, seed):  # each seed's fit, or the one conversion of the authors' embeddings
    return os.path.join(args.output, "emb.pt" if args.embeddings else f"seed{seed}/emb.pt")


def table(args, parts, columns, per_seed, paper, settings):
    """The paper's form -> (markdown, json): per column mean ± std (%) over the seeds, the published
    row below."""
    rows = {s: {columns[p]: 100 * v for p, v in ious.items()} for s, ious in per_seed.items()}
    for r in rows.values():  # the paper's Average: the mean of the columns
        r["Average"] = float(np.mean(list(r.values())))
    header = [c for c in [*columns.values(), "Average"] if any(c in r for r in rows.values())]
    stats = {
        c: [float(np.mean(v)), float(np.std(v))]
        for c in header
        if (v := [r[c] for r in rows.values() if c in r])
    }
    cell = lambda ms: f"{ms[0]:.1f} ± {ms[1]:.1f}" if ms is not None else "-"  # noqa: E731
    seeds = ", ".join(map(str, per_seed))
    what = f"{args.shots}-sample" + ", the authors' embeddings" * bool(args.embeddings)
    lines = [f"SLiMe on {args.name}, {what}: IoU (%), mean ± std over seeds {seeds}", ""]
    lines += ["| | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    lines += ["| slime | " + " | ".join(cell(stats.get(c)) for c in header) + " |"]
    if paper[1]:
        lines += [
            f"| paper, {paper[0]} | " + " | ".join(cell(paper[1].get(c)) for c in header) + " |"
        ]
    lines += [
        f"| seed {s} | " + " | ".join(f"{r[c]:.1f}" if c in r else "-" for c in header) + " |"
        for s, r in rows.items()
    ]
    command = "python benchmarks/paper.py " + " ".join(args.argv)
    lines += ["", f"made by `{command}`", f"settings: {json.dumps(settings)}", ""]
    record = dict(
        command=command, dataset=args.name, shots=args.shots, seeds=list(per_seed), columns=header
    )
    record.update(
        slime=stats,
        per_seed=rows,
        settings=settings,
        paper=paper[1] and dict(table=paper[0], row=paper[1]),
    )
    return "\n".join(lines), json.dumps(record, indent=2, default=lambda x: x.tolist()) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    epilog = (
        "Every other flag goes to slime.py fit (with --embeddings: to predict), "
        "e.g. --epochs 20 --dtype bf16."
    )
    ap = slime.Parser(
        prog="paper.py", description=__doc__.split("\n\n")[0], epilog=epilog, allow_abbrev=False
    )
    ap.add_argument(
        "data",
        help="a dataset folder of the authors' data: DATADIR/car, DATADIR/horse, DATADIR/celeba",
    )
    ap.add_argument(
        "--shots", type=int, choices=[1, 10], default=1, help="1-sample or 10-sample; default 1"
    )
    ap.add_argument(
        "--seeds",
        default="0,1,2",
        help="one fit and predict per seed; default 0,1,2 (the paper's 3 runs)",
    )
    ap.add_argument("--parts", help="class names, background first; default the dataset's preset")
    ap.add_argument(
        "--embeddings", help="a folder of the authors' trained embedding_{i}.pth: no fit"
    )
    ap.add_argument("-o", "--output", help="the table's folder; default paper-DATASET-SHOTS")
    for flag in ("--ckpt", "--device", "--dtype"):
        ap.add_argument(flag, help=f"slime's {flag}, for fit and predict")
    t0, say = time.time(), lambda msg: print(f"paper.py: {msg}", file=sys.stderr, flush=True)
    try:
        args, passed = ap.parse_known_args(argv)
        args.argv, args.name = argv, os.path.basename(os.path.abspath(args.data))
        args.output = args.output or f"paper-{args.name}-{args.shots}"
        parts, columns, splits, seeds, paper = plan(args, passed)
        per_seed, done_here = {}, 0
        for n, seed in enumerate(seeds, 1):
            ious_path = os.path.join(args.output, f"seed{seed}", "ious.json")
            if os.path.exists(ious_path):  # this seed's masks and IoUs are all there
                with slime.named(ious_path), open(ious_path) as f:
                    per_seed[seed] = json.load(f)
                continue
            eta = (time.time() - t0) / done_here * (len(seeds) - n + 1) if done_here else None
            say(
                f"seed {seed}, {n} of {len(seeds)}"
                + (f"; the table's ETA {slime.duration(eta)}" if eta else "")
            )
            per_seed[seed], done_here = (
                run_seed(args, passed, parts, splits, seed, say),
                done_here + 1,
            )
        first = os.path.join(
            args.output, f"seed{seeds[0]}"
        )  # the settings predict ran with, fit's included
        with slime.named(first), open(os.path.join(first, "test", "summary.json")) as f:
            settings = {k: v for k, v in json.load(f)["settings"].items() if k != "seed"}
        emb = slime.load_embeddings(emb_path(args, seeds[0]))  # and the weights and number formats
        with slime.named(first), open(os.path.join(first, "test", slime.RECORD)) as f:
            settings.update(
                checkpoint=emb["fingerprint"], fit_dtype=emb["dtype"], dtype=json.load(f)["dtype"]
            )
        settings["parts"] = parts
        md, js = table(args, parts, columns, per_seed, paper, settings)
        slime.commit(
            {
                os.path.join(args.output, "table.md"): md.encode(),
                os.path.join(args.output, "table.json"): js.encode(),
            }
        )
        print(md)
        say(
            f"wrote {os.path.join(args.output, 'table.md')} and table.json "
            f"in {slime.duration(time.time() - t0)}"
        )
        return 0
    except slime.SlimeError as e:  # (slime.Parser's own errors start with the program's name)
        print(f"paper.py: error: {str(e).removeprefix('paper.py: ')}", file=sys.stderr)
        return 2
    except Stopped as e:  # slime said why
        again = (
            "the same command resumes" if e.args[0] > 2 else "mend that, then run the command again"
        )
        say(f"stopped (exit status {e.args[0]}); {again}")
        return e.args[0]
    except (
        KeyboardInterrupt
    ) as e:  # between slime's runs: Ctrl-C, or SIGTERM and SIGHUP through slime.interrupt
        say("interrupted; the same command resumes")
        return 128 + (e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT)


if __name__ == "__main__":
    for name in slime.SIGNALS:  # each ends it once, as slime's own runs end
        signal.signal(getattr(signal, name), slime.interrupt)
    sys.exit(main())
