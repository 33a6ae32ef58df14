"""The method's arithmetic, each piece of slime.py against a slow re-computation from its definition.

Proves that attention_maps (Eq. 3, Eq. 5), was_map (Eq. 6), class_weights and segmentation_losses
(Eq. 4, Eq. 7) compute what the paper (Sec. 4) and the release (aliasgharkhani/SLiMe at 9de06f1,
src/slime.py#L90-L152, #L188-L279) define; that training_step's loss on head-averaged log-probabilities
equals the release's loss on averaged logits (README, Faithfulness: CE input); that class_scores is
the release's patched masking (classes below the threshold skipped per patch); that segment upsamples
scores, not labels; the mIoU averaging; OpenCV's small blur kernels; the training step's gradient
against finite differences; that fit trains on the colour order it records; and, for --window, the
window layout (covering the image, overlapping, flush with its border, small images), the padded crops
and fit's views, the banded upsampling of the window grid, and that native_scores is the release's rule
over the windows. The maps come from stand-in UNets (FakeUNet, ScoreUNet) or the tiny random checkpoint.

    python -m pytest -q tests/test_method.py
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import slime
from attention import attention


def bilinear_slow(img, out):
    """align_corners=False bilinear resize of a (h, w) map, written out pixel by pixel."""
    h, w = img.shape
    res = torch.zeros(out, out)
    for Y in range(out):
        for X in range(out):
            y = min(max((Y + 0.5) * h / out - 0.5, 0), h - 1)
            x = min(max((X + 0.5) * w / out - 0.5, 0), w - 1)
            y0, x0 = int(math.floor(y)), int(math.floor(x))
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            fy, fx = y - y0, x - x0
            res[Y, X] = (1 - fy) * ((1 - fx) * img[y0, x0] + fx * img[y0, x1]) + fy * (
                (1 - fx) * img[y1, x0] + fx * img[y1, x1]
            )
    return res


class FakeUNet:
    """Returns given maps (and records its calls), so the map arithmetic can be checked on known values."""

    def __init__(self, maps_per_call):
        self.maps_per_call, self.calls = maps_per_call, 0

    def __call__(self, x, t, context, attn_layers=(), log_attn_layers=()):
        maps = self.maps_per_call[self.calls % len(self.maps_per_call)]
        self.calls += 1
        return torch.zeros_like(x), {n: maps[n] for n in list(attn_layers) + list(log_attn_layers)}


class FakeSD:
    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self, unet):
        self.unet, self.alphas_cumprod = unet, slime.alphas_cumprod()
        self.vae = type(
            "V", (), {"encode": lambda self, x, sample, generator: torch.zeros(x.shape[0], 4, 64, 64)}
        )()


def random_maps(K, seed):
    g = torch.Generator().manual_seed(seed)
    maps = {}
    for n in slime.CROSS_LAYERS:
        side = 16 if n in slime.CROSS_LAYERS[:3] else 32
        maps[n] = torch.rand(1, side * side, 77, generator=g).softmax(-1)
    for n in slime.SELF_LAYERS:
        maps[n] = (3 * torch.rand(1, 4096, 4096, generator=g)).softmax(-1)
    return maps


def test_eq3_cross_attention_average_and_eq5_self_attention_average():
    K, maps = 3, random_maps(3, 0)
    A_ca, A_sa, _ = slime.attention_maps(
        FakeSD(FakeUNet([maps])), torch.zeros(1, 4, 64, 64), torch.tensor([5]), None, K, log_space=False
    )
    for k in range(K):
        want = (
            sum(
                bilinear_slow(maps[n][0, :, k].view(int(maps[n].shape[1] ** 0.5), -1), 64)
                for n in slime.CROSS_LAYERS
            )
            / 5
        )
        assert torch.allclose(A_ca[k], want, atol=1e-6)
    assert torch.allclose(A_sa, sum(maps[n][0] for n in slime.SELF_LAYERS) / 3)


def test_eq6_was_map():
    g = torch.Generator().manual_seed(1)
    P, S = torch.rand(2, 3, 3, generator=g), torch.rand(9, 9, generator=g)
    W = slime.was_map(P, S)
    for k in range(2):
        for q in range(9):  # S_WAS[k, q] = sum over key pixels j of P[k, j] * S[q, j]
            assert math.isclose(
                W[k].flatten()[q], sum(P[k].flatten()[j] * S[q, j] for j in range(9)), rel_tol=1e-5
            )


def test_class_weights_follow_the_release():
    mask = torch.tensor([[0, 0, 0, 1], [1, 1, 2, 255], [0, 0, 0, 0], [0, 0, 0, 0]])
    w = slime.class_weights(mask, 4)
    # n = (bg ignored, 3, 1, 0): w_c = (3 + 1) / n_c for present parts, 0 for absent ones, background 1
    assert torch.allclose(w, torch.tensor([1.0, 4 / 3, 4.0, 0.0]), rtol=1e-5)


def test_eq4_cross_entropy_and_eq7_mse():
    g = torch.Generator().manual_seed(2)
    K = 3
    A = torch.randn(K, 64, 64, generator=g)
    S = torch.rand(4096, 4096, generator=g).softmax(-1)
    mask = torch.randint(0, K, (64, 64), generator=g)
    loss_ce, loss_mse = slime.segmentation_losses(A, S, mask, K)
    w = slime.class_weights(mask, K)
    logp = A.log_softmax(0)
    nll = sum(-w[mask[y, x]] * logp[mask[y, x], y, x] for y in range(0, 64) for x in range(0, 64))
    assert math.isclose(loss_ce, nll / w[mask].sum(), rel_tol=1e-4)  # weighted mean (F.cross_entropy)
    W = torch.einsum("kj,qj->kq", A.softmax(0).flatten(1), S).view(K, 64, 64)
    onehot = torch.stack([(mask == k).float() for k in range(K)])
    assert math.isclose(loss_mse, ((W - onehot) ** 2).mean() * K, rel_tol=1e-4)  # the release: mean x K


class ScoreUNet:
    """A UNet whose cross-attention layers have known per-head scores q_h k_h^T / sqrt(d) (4 heads, 77 keys).

    It hands back what attention.attention makes of them: head-averaged log-probabilities for the layers
    asked for in log_attn_layers, head-averaged probabilities for attn_layers; the self-attention layers
    all return one fixed map (or its log)."""

    def __init__(self, seed, self_map, heads=4, dim=32):
        g = torch.Generator().manual_seed(seed)
        self.heads, self.self_map, self.qk = heads, self_map, {}
        for n in slime.CROSS_LAYERS:
            side = 16 if n in slime.CROSS_LAYERS[:3] else 32
            self.qk[n] = (
                2 * torch.randn(1, side * side, dim, generator=g),
                torch.randn(1, 77, dim, generator=g),
            )

    def logits(self, n):
        """The release's cross-attention logits of layer n: the raw scores averaged over heads (N, 77)."""
        q, k = (x[0].unflatten(-1, (self.heads, -1)).transpose(0, 1) for x in self.qk[n])
        return (q @ k.transpose(1, 2) / q.shape[-1] ** 0.5).mean(0)

    def __call__(self, x, t, context, attn_layers=(), log_attn_layers=()):
        maps = {}
        for n, want in [(n, "probs") for n in attn_layers] + [(n, "log_probs") for n in log_attn_layers]:
            if n in slime.SELF_LAYERS:
                maps[n] = self.self_map if want == "probs" else self.self_map.log()
            else:
                q, k = self.qk[n]
                maps[n] = attention(q, k, k, self.heads, want=want)[1]
        return torch.zeros_like(x), maps


def test_eq4_log_space_equals_the_release_logits():
    """README, Faithfulness, "CE input": slime trains on head-averaged log-probabilities where the release
    averaged the raw logits; the per-pixel logsumexp is constant over the K classes, so after the softmax
    over them Eq. 4 and Eq. 7 are unchanged. training_step's loss terms against the release's, computed by
    hand from the same per-head scores. Averaging probabilities instead (log_space=False) would fail."""
    K = 3
    g = torch.Generator().manual_seed(3)
    S = (4 * torch.rand(4096, 4096, generator=g)).softmax(-1)
    unet = ScoreUNet(4, S[None])
    mask = torch.randint(0, K, (64, 64), generator=g)
    mask[:3] = slime.IGNORE
    cond = torch.randn(1, 77, 32, generator=g)
    s = slime.Settings()
    _, terms = slime.training_step(
        FakeSD(unet),
        cond[0, 1:K],
        cond,
        cond,
        torch.rand(3, 512, 512),
        mask,
        s,
        torch.Generator().manual_seed(0),
    )
    # the release: average the logits over heads, resize each layer to 64x64, average the layers
    layers = [unet.logits(n)[:, :K].T for n in slime.CROSS_LAYERS]  # (K, N) each, N = 16x16 or 32x32
    logits = sum(
        F.interpolate(
            x.reshape(1, K, int(x.shape[1] ** 0.5), -1), size=(64, 64), mode="bilinear", align_corners=False
        )[0]
        for x in layers
    ) / len(layers)
    valid = mask != slime.IGNORE
    n = torch.tensor([float((mask == c).sum()) for c in range(K)])
    w = torch.cat([torch.ones(1), n[1:].sum() / n[1:]])  # every part present in this mask
    logp = logits.log_softmax(0)
    nll = sum(-w[mask[y, x]] * logp[mask[y, x], y, x] for y in range(64) for x in range(64) if valid[y, x])
    assert math.isclose(terms["ce"], nll / w[mask[valid]].sum(), rel_tol=1e-4)
    W = torch.einsum("kj,qj->kq", logits.softmax(0).flatten(1), S).view(K, 64, 64)
    onehot = torch.stack([(mask == k).float() for k in range(K)])
    assert math.isclose(terms["mse"], ((W - onehot) ** 2).sum(0)[valid].mean(), rel_tol=1e-4)


def test_patch_origins():
    assert slime.patch_origins(400, 2) == [(0, 0), (0, 112), (112, 0), (112, 112)]
    assert slime.patch_origins(512, 1) == [(0, 0)]


def patched_masking_slow(calls, K, s, out):
    """The release's get_patched_masks (src/slime.py#L188-L279 at 9de06f1), literally, with Python loops
    over classes. -> (scores, the classes that passed the threshold in each patch)."""
    Facc, passed_per_patch = torch.zeros(K, out, out), []
    C = torch.zeros(K, out, out) + 1e-7
    ratio, m = 512 // out, s.patch_size // (512 // out)
    for (y0, x0), maps in zip(slime.patch_origins(s.patch_size, s.patches_per_side), calls, strict=True):
        A = (
            sum(
                torch.stack(
                    [
                        bilinear_slow(maps[n][0, :, k].view(int(maps[n].shape[1] ** 0.5), -1), 64)
                        for k in range(K)
                    ]
                )
                for n in slime.CROSS_LAYERS
            )
            / 5
        )
        S = sum(maps[n][0] for n in slime.SELF_LAYERS) / 3
        A = A.flatten(1)
        passed = [k for k in range(K) if A[k].max() >= s.threshold]
        passed_per_patch.append(passed)
        if not passed:
            continue
        Ap = A[passed].clone()
        Ap[0][Ap[0] <= Ap[0].mean()] = 0
        for i, k in enumerate(passed):
            W = (S @ Ap[i]).view(64, 64)  # W[q] = sum_j A'[k, j] S[q, j]
            W = F.interpolate(W[None, None], size=(m, m), mode="bilinear", align_corners=False)[0, 0]
            coef = (W.max() - W.min()) / (A[k].max() - A[k].min())
            if torch.isnan(coef) or coef == 0:
                coef = torch.tensor(1e-7)
            Facc[k, y0 // ratio : y0 // ratio + m, x0 // ratio : x0 // ratio + m] += W / coef + (
                A[k].min() - W.min() / coef
            )
            C[k, y0 // ratio : y0 // ratio + m, x0 // ratio : x0 // ratio + m] += 1
    return Facc / C, passed_per_patch


@pytest.mark.parametrize(
    "patch_size, per_side, out, passed",
    [
        (400, 2, 512, [[0, 2], [1, 2], [], [1]]),
        (512, 1, 512, [[0, 2]]),
    ],
)
def test_patched_masking_arithmetic(patch_size, per_side, out, passed):
    K = 3
    calls = [random_maps(K, seed) for seed in range(per_side**2)]
    # the class maps peak at 0.0162-0.0175: at threshold 0.017 some classes fail in a patch, class 0 is
    # not always the first that passes, and no class passes in the third patch (it adds nothing)
    s = slime.Settings(patch_size=patch_size, patches_per_side=per_side, threshold=0.017)
    sd = FakeSD(FakeUNet(calls))
    scores, votes = slime.vote_sums(
        sd, None, slime.noisy_patches(sd, torch.rand(3, 512, 512), s), K, s, (out, out), patch_size
    )
    got = scores / votes
    want, passed_per_patch = patched_masking_slow(calls, K, s, out)
    assert passed_per_patch == passed  # the cases above really occur
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("h, w, band", [(700, 300, 37), (16, 16, 256), (512, 900, 100)])
def test_segment_upsamples_scores_not_labels(monkeypatch, h, w, band):
    """Labels at the image's size are the argmax of the class scores upsampled bilinearly to that size,
    computed band by band of rows."""
    scores = torch.rand(4, 512, 512, generator=torch.Generator().manual_seed(h))
    monkeypatch.setattr(slime, "vote_sums", lambda *a, **k: (scores, torch.ones(())))
    got = slime.segment(FakeSD(FakeUNet([{}])), None, torch.rand(3, h, w), 4, slime.Settings())
    assert torch.equal(slime.upsampled_argmax(scores, h, w, band=band), got)  # bands change nothing
    want = F.interpolate(scores[None], size=(h, w), mode="bilinear", align_corners=False)[0].argmax(0)
    assert got.dtype == torch.uint8 and got.shape == (h, w)
    assert (got.long() != want).float().mean() < 1e-4  # equal up to float ties of two classes


def test_miou_uses_the_release_averaging():
    per_image = [{0: 0.5, 1: 1.0}, {0: 0.7, 2: 0.2}, {0: 0.9, 1: 0.0, 2: 0.4}]
    per_class, miou = slime.miou_table(per_image, 4)
    assert per_class == [pytest.approx(0.7), pytest.approx(0.5), pytest.approx(0.3), None]
    assert miou == pytest.approx((0.7 + 0.5 + 0.3) / 3)  # classes never in any GT are not averaged


def test_iou_per_class_ignores_255_and_absent_classes():
    gt = torch.tensor([[0, 0, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 2]])
    ious = slime.iou_per_class(pred, gt, 3)
    assert ious == {0: pytest.approx(0.5), 1: pytest.approx(0.5)}


def test_training_step_gradient_matches_finite_differences(tiny_ckpt):
    sd = slime.load_models(tiny_ckpt("sd2"))
    K = 3
    cond, uncond = slime.prompt_contexts(sd, K)
    image = torch.rand(3, 512, 512, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(64, 64, dtype=torch.long)
    mask[10:30, 10:40], mask[40:60, 5:60] = 1, 2
    s = slime.Settings()

    def loss_at(learned):
        return slime.training_step(
            sd, learned, cond, uncond, image, mask, s, torch.Generator().manual_seed(7)
        )[0]

    learned = cond[0, 1:K].clone().requires_grad_(True)
    loss_at(learned).backward()
    direction = torch.randn(learned.shape, generator=torch.Generator().manual_seed(1))
    h = 1e-2
    with torch.no_grad():
        fd = (loss_at(learned + h * direction) - loss_at(learned - h * direction)) / (2 * h)
    assert math.isclose((learned.grad * direction).sum().item(), fd.item(), rel_tol=2e-2)


def test_blur_uses_opencv_small_kernels():
    img = torch.zeros(3, 9, 9)
    img[:, 4, 4] = 1
    out = slime.gaussian_blur(img, 3)
    assert torch.allclose(out[0, 3:6, 4], torch.tensor([0.25, 0.5, 0.25]) * 0.5)  # outer product of [1,2,1]/4
    out = slime.gaussian_blur(img, 5)
    assert torch.allclose(out[0, 4, 2:7], torch.tensor([1, 4, 6, 4, 1]) / 16 * 6 / 16)


@pytest.mark.parametrize("bgr", [False, True])
def test_fit_feeds_the_colour_order_it_records(tiny_ckpt, monkeypatch, bgr):
    """--bgr must reach training too, not only inference (emb.pt records it and predict uses it)."""
    sd = slime.load_models(tiny_ckpt("sd2"))
    seen = []

    def record(sd, learned, cond, uncond, image, mask, s, gen):
        seen.append(image)
        raise KeyboardInterrupt

    monkeypatch.setattr(slime, "training_step", record)
    image = torch.zeros(3, 512, 512)
    image[0] = 1  # pure red
    s = slime.Settings(bgr=bgr, rotation=0, min_crop_ratio=1.0)
    with pytest.raises(KeyboardInterrupt):
        slime.fit(sd, [(image, torch.ones(512, 512, dtype=torch.long))], 2, s)
    channel = seen[0].flatten(1).mean(1).argmax().item()
    assert channel == (2 if bgr else 0)


def test_validation_reuses_its_noisy_patches_and_gets_bit_identical_masks(tiny_ckpt):
    """fit's validation segments the same images with the same seeded noise every time: fit makes each
    validation image's noisy inputs once, before its loop, and no validation VAE-encodes again; its masks and
    mIoU equal segmenting from scratch."""
    from conftest import synthetic_scene

    sd = slime.load_models(tiny_ckpt("sd2"))
    img, mask = synthetic_scene()
    image, gt = torch.from_numpy(img).permute(2, 0, 1).float() / 255, torch.from_numpy(mask).long()
    s = slime.Settings(threshold=0, patch_size=512, patches_per_side=1)
    cond, _ = slime.prompt_contexts(sd, 3)
    encodes, encode = [], sd.vae.encode
    sd.vae.encode = lambda *a, **k: encodes.append(1) or encode(*a, **k)
    kept = [slime.noisy_inputs(sd, image, s)]  # as fit makes them, once
    assert len(encodes) == 1
    for shift in (0.0, 0.5):
        context = slime.with_learned(cond[0, 1:3] + shift, cond)
        before = len(encodes)
        miou = slime.validation_miou(sd, context, [(image, gt)], kept, 3, s)
        assert len(encodes) == before  # the kept patches, not encoded again
        fresh = slime.segment(sd, context, image, 3, s, slime.SIZE)
        assert torch.equal(slime.segment(sd, context, image, 3, s, slime.SIZE, kept[0]), fresh)
        assert miou == slime.image_miou(fresh, gt, 3)  # the mIoU of the masks made from scratch
    assert len(encodes) == 1 + 2  # the validation's patch once; one for each segment from scratch


def test_fit_makes_the_validation_inputs_once_and_hands_the_same_to_every_validation(tiny_ckpt, monkeypatch):
    """One noisy_inputs per validation pair, before the first step; every validation gets those very ones."""
    sd = slime.load_models(tiny_ckpt("sd2"))
    image, gt = torch.rand(3, 64, 64), torch.zeros(64, 64, dtype=torch.long)
    gt[32:] = 1
    calls = []

    def inputs(sd, image, s):
        calls.append(("inputs", object()))
        return calls[-1][1]

    def step(sd, learned, cond, uncond, image, mask, s, gen):
        calls.append(("step", None))
        return (learned**2).sum(), {}

    def validation(sd, context, val_pairs, val_inputs, num_classes, s):
        calls.append(("validation", val_inputs))
        return 0.5

    monkeypatch.setattr(slime, "noisy_inputs", inputs)
    monkeypatch.setattr(slime, "training_step", step)
    monkeypatch.setattr(slime, "validation_miou", validation)
    val = [(image, gt), (image.flip(-1), gt.flip(-1))]
    slime.fit(sd, [(image, gt)], 2, slime.Settings(epochs=3, val_every=1), val_pairs=val)
    assert [what for what, _ in calls] == ["inputs"] * 2 + ["step", "validation"] * 3
    made = [x for what, x in calls if what == "inputs"]
    given = [x for what, x in calls if what == "validation"]
    assert all(g is given[0] for g in given) and len(given[0]) == 2
    assert all(a is b for a, b in zip(given[0], made))


# ----------------------------------------------------------------------------- native resolution (--window)
@pytest.mark.parametrize(
    "h, w, window",
    [
        (1536, 2048, 512),
        (1536, 2048, 1024),
        (1000, 3001, 448),
        (300, 200, 512),
        (512, 512, 512),
        (9000, 12000, 768),
    ],
)
def test_windows_cover_the_image_overlap_and_end_flush_with_its_border(h, w, window):
    cell, (gh, gw), origins = slime.window_layout(h, w, window)
    assert cell * slime.MAP == window
    # the grid is the image rounded up to whole cells, and at least one window
    assert (gh, gw) == tuple(max(slime.MAP, -(-n // cell)) for n in (h, w))
    for axis, n in ((0, gh), (1, gw)):
        starts = sorted({o[axis] for o in origins})
        assert starts[0] == 0 and starts[-1] + slime.MAP == n  # flush with both ends of the grid
        # overlap >= 1/4 window
        assert all(b - a <= slime.MAP * 3 // 4 for a, b in itertools.pairwise(starts))
    covered = torch.zeros(gh, gw, dtype=torch.bool)
    for y0, x0 in origins:
        covered[y0 : y0 + slime.MAP, x0 : x0 + slime.MAP] = True
    assert covered.all() and len(origins) == len(set(origins))
    if max(h, w) <= window:  # an image smaller than a window: one window, padded past the image
        assert origins == [(0, 0)] and (gh, gw) == (slime.MAP, slime.MAP)


def test_window_crops_pad_images_with_their_edge_and_masks_with_ignore():
    image, mask = torch.rand(3, 5, 7), torch.ones(5, 7, dtype=torch.long)
    crop = slime.window_crop(image, 2, 3, 8)
    assert crop.shape == (3, 8, 8) and torch.equal(crop[:, :3, :4], image[:, 2:, 3:])
    assert torch.equal(crop[:, 3:, :4], image[:, -1:, 3:].expand(3, 5, 4))  # the last row, repeated
    m = slime.window_crop(mask, 2, 3, 8, slime.IGNORE)
    assert (m[:3, :4] == 1).all() and (m[3:] == slime.IGNORE).all() and (m[:, 4:] == slime.IGNORE).all()
    assert slime.window_crop(image, 0, 0, 4).data_ptr() == image.data_ptr()  # inside: a view, no copy


def test_native_view_holds_the_favoured_part_at_predicts_scale():
    mask = torch.zeros(1536, 2048, dtype=torch.long)
    mask[1200:1214, 1500:1514] = 2  # a 14 px part
    image = torch.rand(3, 1536, 2048)
    gen = torch.Generator().manual_seed(0)
    seen = []
    for _ in range(20):
        view, view_mask = slime.native_view(image, mask, 2, 512, gen)
        assert view.shape == (3, 512, 512) and view_mask.shape == (512, 512)
        seen.append((view_mask == 2).sum().item())
    assert min(seen) > 0 and max(seen) == 14 * 14  # some of it always; whole, at scale 1 (window 512), mostly
    small, small_mask = slime.native_view(
        torch.rand(3, 100, 60), torch.ones(100, 60, dtype=torch.long), 1, 256, gen
    )
    assert small.shape == (3, 512, 512) and (small_mask[:200, :120] == 1).all()  # 2x, as a 256 window
    assert (small_mask[200:] == slime.IGNORE).all() and (small_mask[:, 120:] == slime.IGNORE).all()


@pytest.mark.parametrize("h, w, cell, band", [(1000, 700, 8, 37), (300, 200, 8, 256), (96, 130, 2, 50)])
def test_window_grid_scores_are_upsampled_band_by_band_and_cut_at_the_border(h, w, cell, band):
    gh, gw = max(64, -(-h // cell)), max(64, -(-w // cell))
    scores = torch.rand(3, gh, gw, generator=torch.Generator().manual_seed(h))
    got = slime.upsampled_argmax(scores, h, w, cell, band=band)
    # bands change nothing
    assert got.shape == (h, w) and torch.equal(got, slime.upsampled_argmax(scores, h, w, cell))
    full = F.interpolate(scores[None], size=(gh * cell, gw * cell), mode="bilinear", align_corners=False)[0]
    assert (got.long() != full[:, :h, :w].argmax(0)).float().mean() < 1e-4  # equal up to float ties


def test_native_scores_are_the_release_rule_over_the_windows():
    """Each window votes as a release patch (patch_votes, unchanged) on its 64x64 cells of the grid; where
    windows overlap, each class's score is the mean of its votes; a class below the threshold in a window
    does not vote there. With one window the image is that window."""
    K = 3
    calls = [random_maps(K, seed) for seed in range(2)]
    s = slime.Settings(window=512, threshold=0.017)
    image = torch.rand(3, 512, 896)  # grid 64 x 112 cells: windows at x = 0 and 48 cells, 16 shared
    got, cell = slime.native_scores(FakeSD(FakeUNet(calls)), None, image, K, s)
    assert cell == 8 and got.shape == (K, 64, 112)
    scores, votes = torch.zeros(K, 64, 112), torch.full((K, 64, 112), 1e-7)
    for x0, maps in zip((0, 48), calls, strict=True):
        A_ca, A_sa, _ = slime.attention_maps(
            FakeSD(FakeUNet([maps])), torch.zeros(1, 4, 64, 64), torch.tensor([100]), None, K, log_space=False
        )
        seen, v = slime.patch_votes(A_ca, A_sa, s.threshold, 64)
        scores[seen, :, x0 : x0 + 64] += v
        votes[seen, :, x0 : x0 + 64] += 1
    assert torch.allclose(got, scores / votes, atol=1e-6)
    # classes 0 and 2 pass in the first window, 1 and 2 in the second (test_patched_masking_arithmetic)
    assert votes[:, 0, 10].round().tolist() == [1, 0, 1] and votes[:, 0, 50].round().tolist() == [1, 1, 2]
    # one window on a 512 image: the squash path with one 512 patch, up to where bilinear steps land
    one = slime.segment(FakeSD(FakeUNet(calls[:1])), None, image[:, :, :512], K, s)
    squash = slime.segment(
        FakeSD(FakeUNet(calls[:1])),
        None,
        image[:, :, :512],
        K,
        slime.Settings(patch_size=512, patches_per_side=1, threshold=0.017),
    )
    assert (one == squash).float().mean() > 0.97
