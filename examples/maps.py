"""See what SD sees: the paper's Figure 2 for your own image, and the curve of your fit.

    python examples/maps.py emb.pt image.png -o maps.png [--patch N] [--pixel X,Y] [--ckpt FILE]
    python examples/maps.py emb.pt --curve -o curve.png    (either: --overwrite replaces any PNG)

The first draws, per part (background included), what SLiMe (arXiv 2309.03179, Sec. 4) reads a
mask from, out of `slime.py predict`'s one UNet pass per patch: the cross-attention map A_ca
(Eq. 3); the WAS map (Eq. 6), where the part votes (A_ca peaks >= --threshold) the one it votes
with (patch_votes': of A_ca, the first voter's kept above its mean only, rescaled onto A_ca's
range), else was_map of A_ca as it is; each on its own viridis scale; and the score, the mean of
its votes, on one scale for all parts, as the mask, their argmax, compares them. Above: SD's input,
the mask, and with --pixel where it looks (A_sa, Eq. 5). The patches' average, or with --patch
that patch. The second draws the fit's losses and validation mIoUs kept in emb.pt. A worked
example of slime's API; the model runs in fp32, on cuda when present.
"""

import argparse
import io
import math
import os
import sys
import warnings

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # slime.py's folder
import slime  # noqa: E402

SIZE, MAP = slime.SIZE, slime.MAP  # SD's input side (512) and the maps' grid (64)


# ------------------------------------------------------------------ the maps, from predict's passes
def cell(at, y0, x0, side):  # (v, u) in the 512x512 image -> (row, col) in a patch's 64x64 grid
    row, col = math.floor((at[0] - y0) * MAP / side), math.floor((at[1] - x0) * MAP / side)
    return (row, col) if 0 <= row < MAP and 0 <= col < MAP else None


def locate(s, size, patch=None, pixel=None):
    """--patch, --pixel checked for an image (H, W) -> (patches shown, --pixel's (v, u) at 512)."""
    grid, side = slime.patch_origins(s.patch_size, s.patches_per_side), s.patch_size
    if patch is not None and not 0 <= patch < len(grid):
        raise slime.SlimeError(f"--patch {patch} is outside the grid: patches 0..{len(grid) - 1}")
    shown = [patch] if patch is not None else list(range(len(grid)))
    if pixel is None:
        return shown, None
    (x, y), (h, w) = pixel, size
    if not (0 <= x < w and 0 <= y < h):
        raise slime.SlimeError(f"--pixel {x},{y} is outside the image of {w}x{h} pixels")
    at = ((y + 0.5) * SIZE / h, (x + 0.5) * SIZE / w)
    if not any(cell(at, *grid[n], side) for n in shown):
        (y0, x0), where = grid[shown[0]], "every patch"
        if patch is not None:
            where = f"patch {patch} (from y {y0}, x {x0} of the 512x512 image)"
        raise slime.SlimeError(f"--pixel {x},{y} is outside {where}")
    return shown, at


def average(views, side):
    """[(y0, x0, maps (C, 64, 64))] -> (C, 512, 512): each resized onto its footprint, averaged."""
    total, count = torch.zeros(len(views[0][2]), SIZE, SIZE), torch.zeros(SIZE, SIZE)
    for y0, x0, m in views:
        total[:, y0 : y0 + side, x0 : x0 + side] += slime.resize(m, (side, side), "bilinear")
        count[y0 : y0 + side, x0 : x0 + side] += 1
    return total / count.clamp(min=1)


@torch.no_grad()
def maps(sd, emb, image, patch=None, pixel=None, progress=lambda n, of: None):
    """image (3, H, W) in [0, 1] -> the arrays drawn: `image` (512, 512, 3) uint8; per part `A_ca`,
    `was` (K, h, w), `score` (K, h', w'), `voted` (in how many patches); `labels` (h', w'): the
    mask; `pixel_row` (h, w) at `pixel_at` (row, col), or None. (h, w) = (h', w') = (512, 512); with
    --patch (64, 64), its grid, and (h', w') its footprint. One UNet pass a patch: vote_sums';
    progress(n, of) after each."""
    s, K, side = emb["settings"], len(emb["parts"]), emb["settings"].patch_size
    shown, at = locate(s, image.shape[1:], patch, pixel)
    patches = slime.noisy_patches(sd, image, s)  # [(y0, x0, x_t)]: predict's inputs, its noise too
    views, rows, voted = [], [], torch.zeros(K, dtype=torch.long)  # views: (y0, x0, A_ca and WAS)

    def look(n, of, A_ca, A_sa):  # vote_sums' progress: patch n's maps, from its UNet pass
        progress(n, of)
        y0, x0 = patches[shown[n - 1]][:2]
        # Eq. 6 of each A_ca; a voter's, the map it votes with (on the 64x64 grid)
        seen, votes = slime.patch_votes(A_ca, A_sa, s.threshold, MAP)
        was = slime.was_map(A_ca, A_sa)
        if len(seen):
            was[seen] = votes
        views.append((y0, x0, torch.cat([A_ca, was]).cpu()))
        voted[seen.cpu()] += 1
        # A_sa, Eq. 5: row q is where query pixel q looks (its keys)
        if at and (q := cell(at, y0, x0, side)):
            rows.append((y0, x0, A_sa[q[0] * MAP + q[1]].view(1, MAP, MAP).cpu()))

    context, inputs = emb["context"].to(sd.device), [patches[n] for n in shown]
    scores, votes = slime.vote_sums(sd, context, inputs, K, s, (SIZE, SIZE), side, look)
    score = (scores / votes).cpu()  # the votes' sum over their number: segment takes its argmax
    if patch is None:  # the average over the patches, on the 512x512 image
        A_ca, was = average(views, side).split(K)
        pixel_row = average(rows, side)[0] if rows else None
        pixel_at = (int(at[0]), int(at[1])) if at else None
    else:  # one patch: its maps on its own 64x64 grid, its score on its footprint
        y0, x0, stacked = views[0]
        A_ca, was = stacked.split(K)
        score = score[:, y0 : y0 + side, x0 : x0 + side]
        pixel_row, pixel_at = (rows[0][2][0], cell(at, y0, x0, side)) if at else (None, None)
    squashed = slime.resize(image, (SIZE, SIZE), "bilinear").clamp(0, 1).mul(255).round().byte()
    out = dict(A_ca=A_ca, was=was, score=score, voted=voted, labels=score.argmax(0).byte())
    out.update(image=squashed.permute(1, 2, 0), pixel_row=pixel_row, pixel_at=pixel_at)
    out.update(patches=len(patches), box=None if patch is None else (y0, x0, side))
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in out.items()}


# ----------------------------------------------------------------------------------------- drawing
FONT = ImageFont.load_default(size=14)
PAD, PANEL, BAR, LINE = 8, 176, 12, 18  # LINE: one line of text
NUMBERS = int(FONT.getlength("-0.000e-00")) + PAD  # a panel's max and min, beside its colour bar
CELL = PANEL + PAD + BAR + PAD // 2 + NUMBERS  # one column: a panel, its colour bar and its numbers
HEADER = 2 * PAD + 4 * LINE + PANEL  # caption, legend, header titles, its panels, columns' titles
ROW = PANEL + PAD  # one part: the picture is HEADER + K * ROW pixels high
TEXT_X = PAD + LINE + PAD // 2  # a part's name, after its colour swatch
LEGEND = "score: a part's WAS maps (rescaled onto its A_ca's range) averaged over the patches it"
LEGEND += " voted in; mask: the argmax; one scale for all parts"
# viridis (perceptually uniform; matplotlib's default) at 8 even stops, linearly interpolated
VIRIDIS = np.array([[68, 1, 84], [70, 51, 126], [54, 92, 141], [39, 127, 142], [31, 161, 135],
                    [74, 193, 109], [159, 218, 58], [253, 231, 37]], float)  # fmt: skip
BLACK, GREY, WHITE, RED = (0, 0, 0), (110, 110, 110), (255, 255, 255), (214, 39, 40)


def viridis(unit):  # values in [0, 1] -> (..., 3) uint8 colours
    rgb = [np.interp(unit, np.linspace(0, 1, len(VIRIDIS)), VIRIDIS[:, c]) for c in range(3)]
    return np.stack(rgb, -1).round().astype(np.uint8)


def panel(canvas, x, y, values, marker=None, scale=None):
    """values (h, w) at (x, y), coloured from lo to hi: scale's, or the values' own min and max; the
    colour bar and the two numbers beside."""
    lo, hi = scale or (float(values.min()), float(values.max()))
    d, right = ImageDraw.Draw(canvas), x + PANEL + PAD
    im = Image.fromarray(viridis((values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)))
    fit = Image.NEAREST if im.width < PANEL else Image.BOX  # blocks up, averages down
    canvas.paste(im.resize((PANEL, PANEL), fit), (x, y))
    canvas.paste(Image.fromarray(viridis(np.linspace([1] * BAR, 0, PANEL))), (right, y))
    d.text((right + BAR + PAD // 2, y), f"{hi:.3g}", BLACK, FONT)
    d.text((right + BAR + PAD // 2, y + PANEL - LINE), f"{lo:.3g}", BLACK, FONT)
    if marker:  # a white cross on the pixel's cell
        cy, cx = (o + (m + 0.5) * PANEL / n for o, m, n in zip((y, x), marker, values.shape))
        d.line([(cx - 6, cy), (cx + 6, cy)], WHITE, 2)
        d.line([(cx, cy - 6), (cx, cy + 6)], WHITE, 2)


def label_width(texts):  # the label column: the swatch, then the longest name or note, never cut
    return math.ceil(TEXT_X + max(FONT.getlength(t) for t in texts) + PAD)


def draw(arrays, parts, colors, title=""):
    """The picture: a header row (SD's input, the mask, --pixel's A_sa row), then one row per part:
    A_ca and WAS map each on its own scale, the score on all parts' (the argmax compares them)."""
    n, voted = arrays["patches"], arrays["voted"]
    where = "the patch" if arrays["box"] or n == 1 else f"{{}} of {n} patches"
    notes = [f"voted in {where.format(v)}" if v else "no vote: A_ca < threshold" for v in voted]
    label = label_width([*parts, *notes])
    width = max(label + 3 * CELL, label_width([title, LEGEND]))
    canvas = Image.new("RGB", (width, HEADER + len(parts) * ROW), WHITE)
    d, y = ImageDraw.Draw(canvas), PAD + 3 * LINE  # y: the header's panels, under 3 lines of text
    d.text((PAD, PAD), title, BLACK, FONT)
    d.text((PAD, PAD + LINE), LEGEND, GREY, FONT)
    for i, head in enumerate(["SD's input (squashed to 512x512)", "mask: the scores' argmax"]):
        d.text((label + i * CELL, y - LINE), head, BLACK, FONT)
    canvas.paste(Image.fromarray(arrays["image"]).resize((PANEL, PANEL), Image.BOX), (label, y))
    mask = slime.mask_image(arrays["labels"], colors).convert("RGB")
    canvas.paste(mask.resize((PANEL, PANEL), Image.NEAREST), (label + CELL, y))
    if arrays["box"]:  # --patch: its footprint on SD's input
        y0, x0, side = (v * PANEL / SIZE for v in arrays["box"])
        d.rectangle([label + x0, y + y0, label + x0 + side - 2, y + y0 + side - 2], None, WHITE, 2)
    if arrays["pixel_row"] is not None:
        d.text((label + 2 * CELL, y - LINE), "where --pixel looks: A_sa, Eq. 5", BLACK, FONT)
        panel(canvas, label + 2 * CELL, y, arrays["pixel_row"], arrays["pixel_at"])
    for i, head in enumerate(["cross-attention A_ca, Eq. 3", "WAS map, Eq. 6", "score"]):
        d.text((label + i * CELL, HEADER - LINE), head, BLACK, FONT)
    scales = dict(A_ca=None, was=None, score=(arrays["score"].min(), arrays["score"].max()))
    for k, name in enumerate(parts):
        y = HEADER + k * ROW
        d.rectangle([PAD, y, PAD + LINE - 4, y + LINE - 4], tuple(colors[k]), BLACK)
        d.text((TEXT_X, y), name, BLACK, FONT)
        d.text((TEXT_X, y + LINE), notes[k], GREY, FONT)
        for i, key in enumerate(scales):
            panel(canvas, label + i * CELL, y, arrays[key][k], scale=scales[key])
    return canvas


# ----------------------------------------------------------------------------- the fit's curve
def ticks(hi, n=5):  # 0 and round steps (1, 2 or 5 times a power of 10) up to the first >= hi
    unit = 10.0 ** math.floor(math.log10(max(hi, 1e-12) / n))
    step = next(m * unit for m in (1, 2, 5, 10) if m * unit >= hi / n)
    return step * np.arange(math.ceil(hi / step - 1e-9) + 1)


def history(emb, path):
    """emb.pt's curve -> (steps (n, 4): epoch and Eq. 8's weighted terms, validations (m, 2), the
    steps' x: the n steps of epoch e at e - 1 + 1/n, ..., e)."""
    history, s = emb.get("history") or {}, emb["settings"]
    if not history.get("step") and not history.get("validation"):
        raise slime.SlimeError(f"{path} has no fit history (fitted before slime kept one)")
    try:
        steps = np.array(history.get("step") or [], float).reshape(-1, 4)
        steps *= [1, 1, s.alpha, s.beta]
        vals = np.asarray(history.get("validation") or [], float).reshape(-1, 2)
    except (TypeError, ValueError):
        why = "its history is not fit's [[epoch, ce, mse, sd], ...]"
        raise slime.SlimeError(f"{path}: {why}") from None
    x = steps[:, 0].copy()
    for e in np.unique(x):
        i = steps[:, 0] == e
        x[i] += np.arange(1, i.sum() + 1) / i.sum() - 1
    return steps, vals, x


def curve(emb, path):
    """Eq. 8's terms as it weighs them (ce Eq. 4, alpha * mse Eq. 7, beta * SD's loss) at each step
    and the validation mIoUs against the epoch, and the epoch emb.pt kept."""
    (steps, vals, x), s = history(emb, path), emb["settings"]
    W, H, L, R, T, B = 960, 540, 72, 888, 44, 452  # the canvas and the plot's box
    xt = ticks(max(x.max(initial=1), vals[:, 0].max(initial=1)))
    xt = xt if xt[1] >= 1 else np.arange(int(xt[-1]) + 1)  # whole epochs
    yt = ticks(steps[:, 1:].max(initial=0) or 1)
    px = lambda e: L + (R - L) * e / xt[-1]  # noqa: E731
    py = lambda v, top=yt[-1]: B - (B - T) * v / top  # noqa: E731
    canvas = Image.new("RGB", (W, H), WHITE)
    d = ImageDraw.Draw(canvas)
    d.text((L, 12), f"{path}: {len(steps)} steps, {len(vals)} validations", BLACK, FONT)
    d.rectangle([L, T, R, B], None, BLACK)
    for e in xt:  # the axes: epochs below, the losses left, the mIoU right
        d.line([(px(e), B), (px(e), B + 4)], BLACK)
        d.text((px(e), B + 6), f"{e:g}", BLACK, FONT, "ma")
    for v in yt:
        d.text((L - 6, py(v)), f"{v:g}", BLACK, FONT, "rm")
    for v in np.linspace(0, 1, 6):
        d.text((R + 6, py(v, 1)), f"{v:.1f}", BLACK, FONT, "lm")
    d.text(((L + R) / 2, B + 26), "epoch", BLACK, FONT, "ma")
    d.text((L - 6, T - 6), "loss", BLACK, FONT, "rd")
    d.text((R + 6, T - 6), "mIoU", BLACK, FONT, "ld")
    if emb.get("epoch", -1) > 0:  # the epoch emb.pt kept: a dashed line, labelled on the roomy side
        at = px(emb["epoch"])
        for y in range(T, B, 10):
            d.line([(at, y), (at, min(y + 5, B))], GREY, 2)
        miou = f", mIoU {emb['val_miou']:.4f}" if emb.get("val_miou") is not None else ""
        label, left = f"emb.pt: epoch {emb['epoch']}{miou}", at > (L + R) / 2
        d.text((at - 4 if left else at + 4, T + 4), label, GREY, FONT, "ra" if left else "la")
    series = [(1, "ce (Eq. 4)", (31, 119, 180)), (2, f"{s.alpha:g} x mse (Eq. 7)", (255, 127, 14))]
    series += [(3, f"{s.beta:g} x sd (SD's loss)", (44, 160, 44))]
    for c, _, color in series:
        d.line([(px(e), py(v)) for e, v in zip(x, steps[:, c])], color, 2)
    d.line([(px(e), py(v, 1)) for e, v in vals], RED, 2)
    for e, v in vals:
        d.ellipse([px(e) - 3, py(v, 1) - 3, px(e) + 3, py(v, 1) + 3], RED)
    x0 = L
    for _, name, color in [*series, (0, "validation mIoU (right axis)", RED)]:  # the legend, below
        d.line([(x0, H - 30), (x0 + 24, H - 30)], color, 3)
        d.text((x0 + 30, H - 30), name, BLACK, FONT, "lm")
        x0 += 30 + FONT.getlength(name) + 24
    return canvas


# -------------------------------------------------------------------------------- command line
MARK = ("Software", "slime examples/maps.py")  # a text chunk in its PNGs: the files -o may replace


def check_output(path, overwrite):
    """-o: a new NAME.png or a picture maps.py made; another PNG with --overwrite; no folder."""
    if os.path.isdir(path):
        raise slime.SlimeError(f"-o {path} is a folder; give a picture's file path")
    if not path.lower().endswith(".png"):  # a .jpg holding a PNG would mislead
        raise slime.SlimeError(f"-o {path}: maps.py draws PNG pictures; give a NAME.png")
    if os.path.lexists(path) and not overwrite:
        try:  # as a PNG only: another format saved as .png is not maps.py's
            with Image.open(path, formats=["PNG"]) as im:
                ours = im.info.get(MARK[0]) == MARK[1]  # a text chunk before the pixels
        except Exception:  # unreadable, not an image, not a PNG
            ours = False
        if not ours:
            why = "exists and is not a picture maps.py made; pass --overwrite, or choose another -o"
            raise slime.SlimeError(f"{path} {why}")


class Parser(argparse.ArgumentParser):  # a mistake in the flags: one line, exit 2 (through main)
    def error(self, message):
        raise slime.SlimeError(message)


def xy(text):  # "X,Y" -> (x, y)
    try:
        x, y = (int(v) for v in text.split(","))
    except ValueError:
        why = f"must be X,Y in the image's pixels, not {text!r}"
        raise argparse.ArgumentTypeError(why) from None
    return x, y


def figure(args, emb):  # the maps' picture of args.image; a wrong flag is refused before the model
    s, image = emb["settings"], slime.read_image(args.image)
    if s.window:
        raise slime.SlimeError(f"{args.emb} predicts with --window; maps.py draws squashed patches")
    locate(s, image.shape[1:], args.patch, args.pixel)
    ckpt, family, _ = slime.checkpoint(args)
    if emb["family"] != family:
        raise slime.SlimeError(f"{args.emb} was fitted on another kind of checkpoint than {ckpt}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # slime's stage line on stderr, its clock moving while the model loads and each patch runs
    con = slime.Console(False)
    try:
        con.progress(f"loading {ckpt}", force=True)
        sd = slime.load_models(ckpt, device, text_encoder=False)
        con.progress("the first patch's UNet pass", force=True)
        done = lambda n, of: con.progress(f"patch {n}/{of} done", force=True)  # noqa: E731
        arrays = maps(sd, emb, image, args.patch, args.pixel, done)
    finally:
        con.done.set()
        if con.open:  # a terminal's stage line ends before the next line
            print(file=sys.stderr)
    what = f"patch {args.patch} of {arrays['patches']}" if arrays["box"] else "patches' average"
    where = f", pixel {args.pixel[0]},{args.pixel[1]}" if args.pixel else ""
    title = f"{args.emb} on {args.image}: t = {s.test_t}, {what} ({s.patch_size} px){where}"
    return draw(arrays, emb["parts"], slime.part_colors(emb), title)


def main(argv=None):
    torch.set_flush_denormal(True)  # as slime.main: peaked attention's exp() makes slow denormals
    ap = Parser(prog="maps.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("emb", help="emb.pt written by slime.py fit")
    ap.add_argument("image", nargs="?", help="the image whose maps to draw")
    ap.add_argument("-o", "--output", help="the picture (PNG); default maps.png, or curve.png")
    ap.add_argument("--ckpt", help="SD checkpoint (.safetensors); default: the one in weights/")
    ap.add_argument("--patch", type=int, help="one patch (0..patches_per_side**2 - 1), not all")
    ap.add_argument("--pixel", type=xy, metavar="X,Y", help="add where this pixel looks (A_sa)")
    ap.add_argument("--curve", action="store_true", help="draw the fit's losses and mIoU instead")
    ap.add_argument("--overwrite", action="store_true", help="replace -o, whoever made it")
    try:  # the one error boundary: a mistake ends in one line and exit status 2
        args = ap.parse_args(argv)
        if bool(args.image) == args.curve:
            raise slime.SlimeError("give an IMAGE, or --curve (without one)")
        output = args.output or ("curve.png" if args.curve else "maps.png")
        emb = slime.load_embeddings(args.emb)
        check_output(output, args.overwrite)  # before the model loads: a wrong -o costs seconds
        picture = curve(emb, args.emb) if args.curve else figure(args, emb)
        info, buffer = PngInfo(), io.BytesIO()
        info.add_text(*MARK)
        picture.save(buffer, format="PNG", pnginfo=info)
        slime.commit({output: buffer.getvalue()})  # whole or absent: a temp file beside it, renamed
        print(f"wrote {output}", file=sys.stderr)
        return 0
    except slime.SlimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    warnings.showwarning = lambda m, *_: print(f"warning: {m}", file=sys.stderr)  # one line each
    sys.exit(main())
