"""Numbers written out by hand: each test pins a value that a plausible one-token mistake in
slime.py (or attention.py) changes while the other test files still pass (but for resize's
antialiasing, see its test).

Each test states the mistake it catches. Every expected value is derived in the test's comments from
the definition (the paper, the release, OpenCV, VOC) on inputs small enough to do by hand; none is
computed by the function under test. No checkpoint is loaded: the model-facing pieces
(fit, validation_miou, noisy_patches) run with stubs in place of the networks.

Proves: an image's mIoU averages over the classes in its ground truth only (255 and absent classes
are not scored); fit keeps the later of tied validations and always saves the first; the 64x64
training mask takes pixel (8i, 8j); a patch is cropped at (y0, x0); a class whose cross-attention
peak equals the threshold votes; the blur pads reflect-101; bf16 attention maps are the fp32 softmax
of the scores; emb.pt's colours are checked at load; and (slime's own choices) patch origins step by
floor division, the bilinear resize does not antialias when it shrinks, the background's WAS seed
keeps only pixels strictly above its mean, validation averages the images' mIoUs, fit validates
every --val-every epochs and after the last, the overlay's tint rounds down, and parts without a
colour take VOC's colour of their index.

    python -m pytest -q tests/test_values.py
"""

import math
from types import SimpleNamespace

import pytest
import torch

import slime
from attention import attention

CPU = SimpleNamespace(
    device=torch.device("cpu"), dtype=torch.float32
)  # what fit and noised read of `sd`


# ----------------------------------------------------------------------------- scores
def test_an_image_miou_averages_only_the_classes_in_its_ground_truth():
    """image_miou divides by the classes present in the image's ground truth, not by every class: a
    perfect prediction on a ground truth holding 2 of 3 classes scores 1.0 (dividing by 3 gives
    0.667)."""
    gt = torch.tensor([[0, 0, 2, 2], [0, 0, 2, 2]])
    assert slime.image_miou(gt.clone(), gt, 3) == pytest.approx(1.0)


def test_iou_is_scored_per_ground_truth_class_with_255_ignored():
    """iou_per_class scores the classes of the ground truth only (class 1 is predicted but absent:
    not scored) and drops the 255 pixels from both sides (their predictions 1 and 2 count
    nowhere)."""
    gt = torch.tensor([[0, 0, 2, 2], [255, 255, 2, 0]])
    pred = torch.tensor([[0, 1, 2, 2], [1, 2, 2, 0]])
    # the 6 valid pixels: (gt, pred) = (0,0) (0,1) (2,2) (2,2) (2,2) (0,0)
    # class 0: both at 2 pixels, either at 3 -> 2/3; class 2: both at 3, either at 3 -> 1 (0.75 if
    # the 255 pixel predicted 2 counted); class 1: absent from gt -> no entry
    ious = slime.iou_per_class(pred, gt, 3)
    assert ious.keys() == {0, 2}
    assert ious[0] == pytest.approx(2 / 3) and ious[2] == pytest.approx(1.0)
    assert slime.image_miou(pred, gt, 3) == pytest.approx(
        5 / 6
    )  # (2/3 + 1) / 2; over 3 classes: 5/9


# --------------------------------------------------------------------- fit: best epoch, validations
def stubbed_fit(monkeypatch, mious, epochs, val_every=1):
    """slime.fit with the networks stubbed out: contexts of zeros (width 4, so 2 learned vectors for
    K = 3), no augmentation, a training_step whose loss pulls the vectors towards 1
    (so each step moves them), and validation_miou -> the next of `mious`.
    -> (fit's return, [(the context validated, its mIoU)], validation events, epoch events)."""
    zeros = torch.zeros(1, 77, 4)
    validated, events = [], []

    def validation(sd, context, val_pairs, val_inputs, num_classes, s):
        validated.append((context, mious[len(validated)]))
        return validated[-1][1]

    monkeypatch.setattr(slime, "prompt_contexts", lambda sd, K: (zeros, zeros))
    monkeypatch.setattr(slime, "noisy_patches", lambda sd, image, s: None)
    monkeypatch.setattr(slime, "training_view", lambda image, mask, part, s, gen: (image, mask))
    monkeypatch.setattr(
        slime, "training_step", lambda sd, learned, *a: (((learned - 1) ** 2).sum(), {})
    )
    monkeypatch.setattr(slime, "validation_miou", validation)
    mask = torch.zeros(8, 8, dtype=torch.long)
    mask[4:, :4], mask[4:, 4:] = 1, 2
    s = slime.Settings(epochs=epochs, val_every=val_every, lr=0.1)
    out = slime.fit(CPU, [(torch.rand(3, 8, 8), mask)], 3, s, progress=events.append)
    val = [e for e in events if e["event"] == "validation"]
    return out, validated, val, [e for e in events if e["event"] == "epoch"]


def test_fit_gives_a_tie_to_the_later_epoch(monkeypatch):
    """A new best on >= (release/src/slime.py#L281-L330): validations 0.2, 0.5, 0.5, 0.4 make epochs
    1, 2 and 3 the best in turn, and the fit returns epoch 3's context, not epoch 2's (a strict >
    keeps epoch 2)."""
    out, validated, val, epochs = stubbed_fit(monkeypatch, [0.2, 0.5, 0.5, 0.4], 4)
    assert [e["best"] for e in val] == [True, True, True, False]
    assert out is validated[2][0]  # epoch 3's
    assert [e["state"]["best_context"] is validated[2][0] for e in epochs] == [
        False,
        False,
        True,
        True,
    ]
    assert epochs[-1]["state"]["best"] == 0.5


def test_fit_saves_the_first_validation_even_at_zero(monkeypatch):
    """best starts at 0.0 and a tie wins, so the first validation always saves: a fit whose
    validations are all 0.0 (nothing found yet) still hands back its last epoch's vectors, not the
    untrained prompt."""
    out, validated, val, epochs = stubbed_fit(monkeypatch, [0.0, 0.0, 0.0], 3)
    assert [e["best"] for e in val] == [True, True, True]
    assert out is validated[2][0] and not torch.equal(
        out, torch.zeros(1, 77, 4)
    )  # trained: moved off 0
    assert epochs[0]["state"]["best_context"] is validated[0][0]  # saved at the first epoch's end


def test_fit_validates_every_val_every_epochs_and_after_the_last(monkeypatch):
    """--val-every 2 over 5 epochs validates after epochs 2 and 4, each a multiple of 2, and after
    epoch 5, the last, which is always validated (3 validations, -(-5 // 2)), so the fit ends on a
    validated best. The suite's other fits run a multiple of their --val-every, where dropping the
    last-epoch rule changes nothing; counting epochs from 0 instead would validate 1, 3, 5
    (test_paper's fit notices that one too)."""
    _, validated, val, _ = stubbed_fit(monkeypatch, [0.1, 0.2, 0.3], 5, val_every=2)
    assert [e["epoch"] for e in val] == [2, 4, 5] and len(validated) == 3


def test_validation_averages_the_images_miou(monkeypatch):
    """validation_miou is the mean over the validation images of each image's mIoU, segmented at the
    release's 512 (segment stubbed: it hands back the prediction kept as the image's inputs)."""
    sizes = []

    def segment(sd, context, image, num_classes, s, out_size=None, inputs=None, progress=None):
        sizes.append(out_size)
        return inputs

    monkeypatch.setattr(slime, "segment", segment)
    gt1, gt2 = torch.tensor([[0, 1], [1, 1]]), torch.tensor([[0, 0], [1, 1]])
    pred = torch.tensor([[0, 1], [1, 1]])
    # image 1: perfect, 1.0. Image 2: class 0 both 1 / either 2 = 1/2, class 1 both 2 / either
    # 3 = 2/3, so 7/12. The mean: (1 + 7/12) / 2 = 19/24. (Their sum is 19/12; pooling both images'
    # pixels gives 3/4.)
    pairs = [(torch.zeros(3, 2, 2), gt1), (torch.zeros(3, 2, 2), gt2)]
    miou = slime.validation_miou(CPU, None, pairs, [pred, pred], 2, slime.Settings())
    assert miou == pytest.approx(19 / 24) and sizes == [512, 512]


# -------------------------------------------------------------------- training mask, patches, votes
def test_the_training_mask_takes_pixel_8i_8j(monkeypatch):
    """The 64x64 training mask is the 512x512 mask resized nearest, as cv2.INTER_NEAREST and the
    release take it: cell (i, j) is pixel (8i, 8j), not the cell's centre (8i + 4, 8j + 4). The
    mask's value is its pixel's position, y * 512 + x (exact through resize's float32: below 2^24),
    so each cell names the pixel it took."""
    # no flip, blur, crop or turn: the view is the mask as given
    monkeypatch.setattr(slime, "augment", lambda image, mask, part, s, gen: (image, mask))
    yy, xx = torch.meshgrid(torch.arange(512), torch.arange(512), indexing="ij")
    _, m = slime.training_view(torch.zeros(3, 512, 512), yy * 512 + xx, 1, slime.Settings(), None)
    assert m.shape == (64, 64) and m.dtype == torch.long
    # (0, 0) -> pixel (0, 0); (0, 1) -> (0, 8); (1, 0) -> (8, 0); (1, 1) -> (8, 8);
    # (63, 63) -> (504, 504). The centres would give 2052 = 4 * 512 + 4 at (0, 0)
    assert (
        m[0, 0] == 0
        and m[0, 1] == 8
        and m[1, 0] == 4096
        and m[1, 1] == 4104
        and m[63, 63] == 258552
    )
    i = torch.arange(64)
    assert torch.equal(m, (8 * i)[:, None] * 512 + 8 * i[None, :])


def test_patches_are_cropped_at_y0_x0(monkeypatch):
    """noisy_patches crops each patch at its origin (y0, x0), rows first, where vote_sums puts its
    votes. With patch 256, 2 per side, the origins are (0, 0), (0, 256), (256, 0), (256, 256), and
    each crop is one quadrant of an image whose four quadrants differ: (0, 256) is the top-right one
    (0.5), which a crop at (x0, y0) would take from the bottom-left (0.75). noisy_latent is stubbed
    to record what it is given."""
    image = torch.empty(3, 512, 512)
    image[:, :256, :256], image[:, :256, 256:] = 0.25, 0.5  # top-left, top-right
    image[:, 256:, :256], image[:, 256:, 256:] = 0.75, 1.0  # bottom-left, bottom-right
    given = []

    def noisy_latent(sd, images, t, gen):
        given.append(images)
        return images, None

    monkeypatch.setattr(slime, "noisy_latent", noisy_latent)
    s = slime.Settings(patch_size=256, patches_per_side=2)
    patches = slime.noisy_patches(CPU, image, s)
    assert [(y0, x0) for y0, x0, _ in patches] == [(0, 0), (0, 256), (256, 0), (256, 256)]
    # each crop zoomed 2x (bilinear: a constant stays that constant, exactly, for these values)
    for crop, value in zip(given, (0.25, 0.5, 0.75, 1.0), strict=True):
        assert crop.shape == (1, 3, 512, 512) and torch.equal(crop, torch.full_like(crop, value)), (
            value
        )


def test_patch_origins_step_by_floor_division():
    """release/src/utils.py#L19-L20: the step between patches is (512 - patch) // (per_side - 1),
    rounded down. 401, 3 per side: 111 // 2 = 55 (55.5 rounded would be 56), so the last patch ends
    at 110 + 401 = 511 and pixel 511 gets no vote. 300, 4 per side: 212 // 3 = 70
    (70.67 rounded: 71)."""
    assert slime.patch_origins(401, 3) == [(y, x) for y in (0, 55, 110) for x in (0, 55, 110)]
    assert slime.patch_origins(300, 4) == [
        (y, x) for y in (0, 70, 140, 210) for x in (0, 70, 140, 210)
    ]


def identity_self_attention():
    """A_sa = I (each pixel attends to itself only): Eq. 6's WAS map of a class is then its own
    input map."""
    return torch.eye(64 * 64)


def test_a_class_whose_peak_equals_the_threshold_votes():
    """patch_votes: a class votes when its cross-attention peak is >= the threshold (release/src/
    slime.py#L233): the background peaks at exactly 0.25 = the threshold and votes. With A_sa = I,
    side 64 (no resize): background: 0.05 on the left half, 0.25 on the right; mean 0.15, so its WAS
    seed keeps the right half (0.25) and zeroes the left. Its WAS range [0, 0.25] maps onto its
    cross-attention's [0.05, 0.25] (per_unit 0.25 / 0.2 = 1.25): 0.05 on the left, 0.25 on the
    right. Part 1: 0.5 left, 0.1 right; its WAS map is itself, already on its range."""
    A_ca = torch.empty(2, 64, 64)
    A_ca[0, :, :32], A_ca[0, :, 32:] = 0.05, 0.25
    A_ca[1, :, :32], A_ca[1, :, 32:] = 0.5, 0.1
    seen, votes = slime.patch_votes(A_ca, identity_self_attention(), 0.25, 64)
    assert seen.tolist() == [
        0,
        1,
    ]  # > would drop the background, and part 1 would be seeded as it is
    want = torch.empty(2, 64, 64)
    want[0, :, :32], want[0, :, 32:] = 0.05, 0.25  # 0 / 1.25 + 0.05 and 0.25 / 1.25 + 0.05
    want[1, :, :32], want[1, :, 32:] = 0.5, 0.1
    assert torch.allclose(votes, want)  # float32 rounding of the rescale only


def test_the_background_seed_keeps_only_pixels_strictly_above_its_mean():
    """The release zeroes the background's pixels at or below its mean (Ap[0][Ap[0] <= mean] = 0).
    Background rows 0-15 at 0, rows 16-47 at 0.5, rows 48-63 at 1: the mean is exactly 0.5
    ((32 * 0.5 + 16) / 64), so the 0.5 rows are zeroed too. With A_sa = I its WAS map is 0 there and
    1 on rows 48-63; range [0, 1] onto [0, 1]: unchanged. Keeping pixels >= the mean would leave 0.5
    on rows 16-47."""
    A_ca = torch.zeros(2, 64, 64)
    A_ca[0, 16:48], A_ca[0, 48:] = 0.5, 1.0
    A_ca[1, :32] = 0.3
    seen, votes = slime.patch_votes(A_ca, identity_self_attention(), 0.0, 64)
    assert seen.tolist() == [0, 1]
    assert (votes[0, :48] == 0).all() and (votes[0, 48:] == 1).all()


# ----------------------------------------------------------------------------- image arithmetic
def test_the_blur_pads_reflect_101_as_opencv():
    """cv2.GaussianBlur's default border is BORDER_REFLECT_101: pixel -1 is pixel 1 (not pixel 0,
    which replicate and BORDER_REFLECT take; not 0, which zero padding takes). An impulse at (1, 1)
    blurs to a[y] * a[x] (separable), with a the 1-D response of x = [0, 1, 0, 0, 0, 0, 0],
    x[-1] = x[1] = 1:
      k = 3, [1, 2, 1] / 4: a[0] = (x[-1] + 2 x[0] + x[1]) / 4 = 2/4, a[1] = 2/4, a[2] = 1/4,
      then 0;
      k = 5, [1, 4, 6, 4, 1] / 16 (x[-2] = x[2] = 0): a[0] = (4 + 4) / 16, a[1] = (1 + 6) / 16,
      a[2] = 4/16, a[3] = 1/16, then 0.
    Replicate or zero padding give a[0] = 1/4 (k = 3) and 4/16 (k = 5): the corner 1/16 instead of
    1/4."""
    image = torch.zeros(3, 7, 7)
    image[:, 1, 1] = 1
    for k, a in ((3, [0.5, 0.5, 0.25, 0, 0, 0, 0]), (5, [8 / 16, 7 / 16, 4 / 16, 1 / 16, 0, 0, 0])):
        out = slime.gaussian_blur(image, k)
        a = torch.tensor(a)
        assert torch.allclose(out, torch.outer(a, a).expand(3, 7, 7), atol=1e-7), k
    assert slime.gaussian_blur(image, 3)[0, 0, 0] == pytest.approx(0.25)  # cv2's corner


def test_the_bilinear_resize_does_not_antialias_when_it_shrinks():
    """resize's bilinear is cv2.INTER_LINEAR: no antialiasing. Shrinking 8 -> 4 samples the input at
    (i + 0.5) * 2 - 0.5 = 2i + 0.5, the mean of pixels 2i and 2i + 1: an impulse at 3 gives
    [0, 0.5, 0, 0]. (Antialiased, the triangle widens to 4 taps: [0, 0.375, 0.125, 0].) Growing
    2 -> 4 samples at (i + 0.5) / 2 - 0.5 = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1):
    [a, 3a/4 + b/4, a/4 + 3b/4, b] (align_corners=True would give thirds). test_maps notices
    antialiasing too, but only through examples/maps.py's picture of the squashed image; this pins
    resize itself."""
    x = torch.zeros(1, 1, 8)
    x[0, 0, 3] = 1
    assert torch.allclose(slime.resize(x, (1, 4), "bilinear"), torch.tensor([[[0, 0.5, 0, 0]]]))
    grown = slime.resize(torch.tensor([[[4.0, 8.0]]]), (1, 4), "bilinear")
    assert torch.allclose(grown, torch.tensor([[[4.0, 5.0, 7.0, 8.0]]]))


def test_the_overlay_tints_half_and_half_rounded_down():
    """overlay_image: a part's pixel is (image + the part's colour) // 2 per channel, rounded down;
    the background keeps the image; the pixels whose label differs from the one below (or right) are
    white. Grey 101 under VOC's colour 1 (128, 0, 0): (229 // 2, 101 // 2, 101 // 2)
    = (114, 50, 50); rounding to nearest would give (115, 51, 51), which test_io's overlay check
    (within 1) lets through."""
    image = torch.full((3, 64, 64), 101 / 255)
    labels = torch.zeros(64, 64, dtype=torch.uint8)
    labels[32:] = 1  # background above, the part below: row 31 is the boundary
    out = slime.overlay_image(image, labels.numpy(), ["background", "wheel"])
    rgb = lambda y, x: out.getpixel((x, y))  # noqa: E731  (PIL takes (x, y))
    # the legend (6 px text, 2 lines: 18 px high) covers the top-left corner: the pixels read lie
    # below it
    assert rgb(63, 63) == rgb(40, 5) == (114, 50, 50)
    assert rgb(25, 60) == (101, 101, 101) and rgb(31, 5) == rgb(31, 63) == (255, 255, 255)


def test_parts_without_a_colour_take_vocs_colours_of_their_index():
    """part_colors: the parts emb.pt has colours for keep them; the rest take VOC's colour of their
    own index, as a VOC-coloured mask would show them: parts 2 and 3 of 4, with 2 colours given, are
    VOC 2 (0, 128, 0) and VOC 3 (128, 128, 0), not VOC 0 and 1 (black, then the colour of part 1 in
    VOC masks)."""
    emb = dict(parts=["background", "body", "wheel", "door"], colors=[[1, 2, 3], [4, 5, 6]])
    assert slime.part_colors(emb) == [[1, 2, 3], [4, 5, 6], [0, 128, 0], [128, 128, 0]]
    assert slime.part_colors(dict(parts=["a", "b"], colors=[])) == [[0, 0, 0], [128, 0, 0]]


# --------------------------------------------------------------------------- attention maps in bf16
def test_bf16_attention_maps_are_the_fp32_softmax_of_the_scores():
    """A bf16 model's maps are computed in fp32 (ldm's "force cast to fp32"): softmax of the bf16 q
    and k's scores, exact to fp32 rounding, not a bf16 softmax cast up (8 significant bits: about
    1e-3 off at 0.8).

    By hand: one head of width 1, q = 1, keys 0 and 1.5: scores 0 and 1.5, probabilities 1 /
    (1 + e^1.5) = 0.18242552 and e^1.5 / (1 + e^1.5) = 0.81757448 (bf16 would give 0.81640625). Then
    2 heads on random bf16 tensors against a float64 softmax of the same values."""
    q = torch.tensor([[[1.0]]], dtype=torch.bfloat16)
    k = torch.tensor([[[0.0], [1.5]]], dtype=torch.bfloat16)
    _, probs = attention(q, k, k, heads=1, want="probs")
    assert probs.dtype == torch.float32
    # 1e-6: fp32 rounding is a few 1e-8 here; the bf16 softmax is 1.2e-3 off (0.81640625)
    assert torch.allclose(probs, torch.tensor([[[0.18242552, 0.81757448]]]), rtol=0, atol=1e-6)
    _, log_probs = attention(q, k, k, heads=1, want="log_probs")
    # log(0.18242552) = -1.7014133, log(0.81757448) = -0.2014133 (they differ by the score gap, 1.5)
    assert torch.allclose(log_probs, torch.tensor([[[-1.7014133, -0.2014133]]]), rtol=0, atol=1e-6)

    g = torch.Generator().manual_seed(0)
    q, k = (3 * torch.randn(1, n, 2 * 8, generator=g).bfloat16() for n in (6, 77))
    _, probs = attention(q, k, k, heads=2, want="probs")
    heads = lambda x: x.double().view(1, -1, 2, 8).transpose(1, 2)  # noqa: E731  (1, 2 heads, N, 8)
    want = (heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(8)).softmax(-1).mean(1)
    # 1e-6: fp32 sums of exact bf16 products (1.1e-7 off here); a bf16 softmax is 7e-3 off on these
    assert (probs.double() - want).abs().max() < 1e-6


# ----------------------------------------------------------------------------- files
def emb_file(path, colors):
    """A hand-made emb.pt (what save_embeddings writes, without a checkpoint) with the given
    colours."""
    context = torch.zeros(1, 77, 8)
    emb = dict(
        format=slime.EMB_FORMAT,
        parts=["background", "wheel"],
        context=context,
        learned=context[0, 1:2],
    )
    emb.update(
        family="sd2", cross_layers=list(slime.CROSS_LAYERS), self_layers=list(slime.SELF_LAYERS)
    )
    emb.update(colors=colors, settings={})
    torch.save(emb, path)
    return path


@pytest.mark.parametrize(
    "colors",
    [
        [[0, 0, 0], [300, 0, 0]],
        [[0, 0, 0], [-1, 0, 0]],
        [[0, 0, 0], [255, 0]],
        [[0, 0, 0], [1.0, 0, 0]],
    ],
)
def test_emb_pt_colours_outside_0_255_are_refused_at_load(tmp_path, colors):
    """emb.pt's colours become a uint8 palette: 300 would end later in an OverflowError
    (or wrap to 44). They are checked at load, in one line; [0, 0, 0] and [255, 0, 0] are fine."""
    good = slime.load_embeddings(emb_file(tmp_path / "good.pt", [[0, 0, 0], [255, 0, 0]]))
    assert good["colors"] == [[0, 0, 0], [255, 0, 0]]
    path = emb_file(tmp_path / "odd.pt", colors)
    with pytest.raises(slime.SlimeError) as e:
        slime.load_embeddings(path)
    assert (
        str(e.value)
        == f"{path} is not a usable emb.pt: its colors are not [r, g, b] lists of 0..255"
    )
