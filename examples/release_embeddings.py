r"""Turn the authors' trained embeddings (a folder of embedding_0.pth ...) into a slime emb.pt.

    python examples/release_embeddings.py FOLDER --parts background,body,light,plate,wheel,window \
        -o emb.pt
    python examples/release_embeddings.py FOLDER --preset pascal-car [--ckpt FILE] [-o emb.pt] \
        [--overwrite]
    python slime.py predict emb.pt images/ -o out/

The release (https://github.com/aliasgharkhani/SLiMe at 9de06f1a1e9ca83bd900a0b68646ce4885485f68,
cited as release/<file>#L<line>) fits SD 2.1 base (release/src/slime.py#L31-L34). For K classes its
vectors are (1, 1, D) slices 1..K-1 of the text encoder's output for "part" repeated K times, cloned
to be learned (release/src/slime.py#L61-L64), saved as embedding_0.pth .. embedding_{K-2}.pth
(release/src/slime.py#L327-L330); at test time that output with positions 1..K-1 replaced by the
loaded vectors is the context (release/src/slime.py#L341-L357). That context is what slime's emb.pt
holds, and what this script writes, from the checkpoint given (whose text width must be D).

The settings written are the release's defaults, which differ from slime's in three: bgr=True (the
release read its images with cv2, in BGR order, release/src/dataset.py#L58, so the authors' vectors
were fitted on BGR), out_size=512 (its 512x512 masks, release/src/arguments.py#L91) and
cycle_parts=False (its crops favour the background in effect); then --preset's values over them.
Each file is read with torch.load(weights_only=True): no code is ever unpickled.
"""

import argparse
import os
import re
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # slime.py's folder
import slime  # noqa: E402

RELEASE = dict(
    bgr=True, out_size=512, cycle_parts=False
)  # the release's settings where slime's differ
NAME = re.compile(r"embedding_(0|[1-9][0-9]*)\.pth")


def read_vectors(folder, num_parts, width, ckpt):
    """embedding_0.pth .. embedding_{num_parts-2}.pth, each checked -> (num_parts - 1, width)
    float32."""
    with slime.named(
        folder
    ):  # the release counts every .pth as a part (release/src/slime.py#L40-L49)
        files = sorted(
            f for f in os.listdir(folder) if f.endswith(".pth") and f[0] != "."
        )  # no ._ files
    stray = [f for f in files if not NAME.fullmatch(f)]
    if stray:
        raise slime.SlimeError(f"{os.path.join(folder, stray[0])} is not named embedding_<i>.pth")
    n = len(files)
    # the release loads embedding_0 .. embedding_{K-2} (release/src/slime.py#L344-L348)
    missing = next((i for i in range(n) if f"embedding_{i}.pth" not in files), None)
    if missing is not None:
        raise slime.SlimeError(
            f"{os.path.join(folder, f'embedding_{missing}.pth')} is missing: a gap"
        )
    if n != num_parts - 1:  # one vector per part after the background, which keeps <start-of-text>
        have = slime.count(n, "embedding file")
        raise slime.SlimeError(
            f"{folder} holds {have}, but {num_parts} classes take {num_parts - 1}"
        )
    vectors = []
    for i in range(n):
        path = os.path.join(folder, f"embedding_{i}.pth")
        with slime.named(path, "not a torch file, or holds pickled code, which is never unpickled"):
            x = torch.load(
                path, map_location="cpu", weights_only=True
            )  # weights_only: runs no code
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise slime.SlimeError(f"{path} holds a {what}, not a float tensor")
        if (
            x.ndim == 0 or x.numel() != x.shape[-1]
        ):  # the release's are (1, 1, D) (release/src/slime.py#L62)
            raise slime.SlimeError(
                f"{path} holds a tensor of shape {tuple(x.shape)}, not (1, 1, {width})"
            )
        if x.shape[-1] != width:
            raise slime.SlimeError(
                f"{path} is {x.shape[-1]} wide, but {ckpt}'s text width is {width}"
            )
        if not torch.isfinite(x).all():
            raise slime.SlimeError(f"{path} holds nan or inf values")
        vectors.append(x.detach().reshape(width).float())
    return torch.stack(vectors)


def convert(folder, parts, ckpt=None, preset=None):
    """The release's folder -> (context (1, 77, D), settings, sd): the emb.pt's contents, and the
    CPU fp32 model they were made with (slime.save_embeddings records its family and fingerprint).
    ckpt None: the one file in weights/."""
    values = {k: v for k, v in slime.PRESETS.get(preset, {}).items() if k != "parts"}
    s = slime.settings_from(
        values, f"--preset {preset}", slime.settings_from(RELEASE, "the release")
    )
    ckpt, _, modules = slime.checkpoint(
        SimpleNamespace(ckpt=ckpt)
    )  # the header alone: no weights yet
    vectors = read_vectors(folder, len(parts), modules[slime.UNET_PREFIX].cfg.context_dim, ckpt)
    sd = slime.load_models(ckpt)  # CPU, fp32, text encoder included
    cond, _ = slime.prompt_contexts(sd, len(parts))  # "part" K times (release/src/slime.py#L68-L76)
    # positions 1..K-1 replaced, the rest the prompt's (release/src/slime.py#L349-L356)
    return slime.with_learned(vectors, cond), s, sd


class Parser(argparse.ArgumentParser):  # a mistake in the flags: one line, exit 2 (through main)
    def error(self, message):
        raise slime.SlimeError(message)


def main(argv=None):
    torch.set_flush_denormal(
        True
    )  # as slime.main: the text encoder's tiny values would be slow denormals
    ap = Parser(
        prog="release_embeddings.py", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    ap.add_argument("folder", help="the release's checkpoint folder of embedding_<i>.pth files")
    ap.add_argument("--parts", help="class names, background first; default --preset's")
    ap.add_argument("--preset", choices=sorted(slime.PRESETS), help="the release README's settings")
    ap.add_argument(
        "--ckpt", help="SD checkpoint (.safetensors); default: the one file in weights/"
    )
    ap.add_argument("-o", "--output", default="emb.pt", help="the emb.pt to write; default emb.pt")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing -o")
    try:  # the one error boundary: a mistake ends in one line and exit status 2
        args = ap.parse_args(argv)
        text = args.parts or slime.PRESETS.get(args.preset, {}).get("parts")
        if not text:
            raise slime.SlimeError("give --parts (background first) or --preset")
        parts = slime.part_names(text)
        slime.check_output(
            args.output, args.overwrite
        )  # as fit's: a new file, or an emb.pt with --overwrite
        context, s, sd = convert(args.folder, parts, args.ckpt, args.preset)
        slime.save_embeddings(args.output, context, parts, sd, s)
        where = f"--preset {args.preset}" if args.preset else "the release's defaults"
        n = slime.count(len(parts) - 1, "part")
        print(f"wrote {args.output}: {n} from {args.folder}, settings of {where}")
        return 0
    except slime.SlimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
