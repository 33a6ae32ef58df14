"""The method's arithmetic, each piece of slime.py against a slow re-computation from its
definition.

Proves that attention_maps (Eq. 3, Eq. 5), was_map (Eq. 6), class_weights and segmentation_losses
(Eq. 4, Eq. 7) compute what the paper (Sec. 4) and the release (aliasgharkhani/SLiMe at 9de06f1,
src/slime.py#L90-L152, #L188-L279) define; that training_step's loss on head-averaged
log-probabilities equals the release's loss on averaged logits (README, Faithfulness: CE input);
Eq. 8's total and its SD loss by hand; the noise schedule, x_t and the VAE's input range and
0.18215; that class_scores is the release's patched masking (classes below the threshold skipped per
patch); that segment upsamples scores, not labels; the mIoU averaging; the training step's gradient
against finite differences; OpenCV's small blur kernels; that the augmentations keep the mask on the
image (flip, the crop that favours a part, rotation); that fit trains on the colour order it
records; and, for --window, the window layout (covering the image, overlapping, flush with its
border, small images), the padded crops and fit's views, the banded upsampling of the window grid,
and that window_segment is the release's rule over the windows. The maps come from stand-in UNets
(FakeUNet, ScoreUNet, Eq8UNet) or the tiny random checkpoint.

    python -m pytest -q tests/test_method.py
"""

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import slime
from attention import attention


def bilinear_slow(img, out):
    """align_corners=False bilinear resize of a (h, w) map, written out pixel by pixel
    (in Python floats)."""
    h, w = img.shape
    v, res = img.tolist(), [[0.0] * out for _ in range(out)]
    for Y in range(out):
        for X in range(out):
            y = min(max((Y + 0.5) * h / out - 0.5, 0), h - 1)
            x = min(max((X + 0.5) * w / out - 0.5, 0), w - 1)
            y0, x0 = int(math.floor(y)), int(math.floor(x))
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            fy, fx = y - y0, x - x0
            res[Y][X] = (1 - fy) * ((1 - fx) * v[y0][x0] + fx * v[y0][x1]) + fy * (
                (1 - fx) * v[y1][x0] + fx * v[y1][x1]
            )
    return torch.tensor(res)


class FakeUNet:
    """Returns given maps (and records its calls), so the map arithmetic can be checked on known
    values."""

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
            "V",
            (),
            {"encode": lambda self, x, sample, generator: torch.zeros(x.shape[0], 4, 64, 64)},
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
        FakeSD(FakeUNet([maps])),
        torch.zeros(1, 4, 64, 64),
        torch.tensor([5]),
        None,
        K,
        log_space=False,
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
    # n = (bg ignored, 3, 1, 0): w_c = (3 + 1) / n_c for present parts, 0 for absent ones,
    # background 1
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
    assert math.isclose(
        loss_ce, nll / w[mask].sum(), rel_tol=1e-4
    )  # weighted mean (F.cross_entropy)
    W = torch.einsum("kj,qj->kq", A.softmax(0).flatten(1), S).view(K, 64, 64)
    onehot = torch.stack([(mask == k).float() for k in range(K)])
    assert math.isclose(
        loss_mse, ((W - onehot) ** 2).mean() * K, rel_tol=1e-4
    )  # the release: mean x K


class ScoreUNet:
    """A UNet whose cross-attention layers have known per-head scores q_h k_h^T / sqrt(d)
    (4 heads, 77 keys).

    It hands back what attention.attention makes of them: head-averaged log-probabilities for the
    layers asked for in log_attn_layers, head-averaged probabilities for attn_layers; the
    self-attention layers all return one fixed map (or its log)."""

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
        """The release's cross-attention logits of layer n: the raw scores averaged over heads
        (N, 77)."""
        q, k = (x[0].unflatten(-1, (self.heads, -1)).transpose(0, 1) for x in self.qk[n])
        return (q @ k.transpose(1, 2) / q.shape[-1] ** 0.5).mean(0)

    def __call__(self, x, t, context, attn_layers=(), log_attn_layers=()):
        maps = {}
        for n, want in [(n, "probs") for n in attn_layers] + [
            (n, "log_probs") for n in log_attn_layers
        ]:
            if n in slime.SELF_LAYERS:
                maps[n] = self.self_map if want == "probs" else self.self_map.log()
            else:
                q, k = self.qk[n]
                maps[n] = attention(q, k, k, self.heads, want=want)[1]
        return torch.zeros_like(x), maps


def test_eq4_log_space_equals_the_release_logits():
    """README, Faithfulness, "CE input": slime trains on head-averaged log-probabilities where the
    release averaged the raw logits; the per-pixel logsumexp is constant over the K classes, so
    after the softmax over them Eq. 4 and Eq. 7 are unchanged. training_step's loss terms against
    the release's, computed by hand from the same per-head scores. Averaging probabilities instead
    (log_space=False) would fail."""
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
    layers = [
        unet.logits(n)[:, :K].T for n in slime.CROSS_LAYERS
    ]  # (K, N) each, N = 16x16 or 32x32
    logits = sum(
        F.interpolate(
            x.reshape(1, K, int(x.shape[1] ** 0.5), -1),
            size=(64, 64),
            mode="bilinear",
            align_corners=False,
        )[0]
        for x in layers
    ) / len(layers)
    valid = mask != slime.IGNORE
    n = torch.tensor([float((mask == c).sum()) for c in range(K)])
    w = torch.cat([torch.ones(1), n[1:].sum() / n[1:]])  # every part present in this mask
    logp = logits.log_softmax(0)
    nll = sum(
        -w[mask[y, x]] * logp[mask[y, x], y, x] for y in range(64) for x in range(64) if valid[y, x]
    )
    assert math.isclose(terms["ce"], nll / w[mask[valid]].sum(), rel_tol=1e-4)
    W = torch.einsum("kj,qj->kq", logits.softmax(0).flatten(1), S).view(K, 64, 64)
    onehot = torch.stack([(mask == k).float() for k in range(K)])
    assert math.isclose(terms["mse"], ((W - onehot) ** 2).sum(0)[valid].mean(), rel_tol=1e-4)


class Eq8UNet:
    """A UNet with known outputs: eps = context[0, 1, 0] at every latent entry (for the conditional
    context that is the first learned vector's first entry, for the unconditional one the ""
    prompt's), the cross-attention log-probabilities log_softmax(v) at every pixel of every layer,
    and a uniform self-attention map. It records (x_t, t, context) of each call."""

    def __init__(self, v):
        lp = torch.tensor(v + [0.0] * (77 - len(v))).log_softmax(
            0
        )  # tokens 0, 1, ...: logits v; the rest 0
        side = {n: 16 if n in slime.CROSS_LAYERS[:3] else 32 for n in slime.CROSS_LAYERS}
        self.maps = {n: lp.expand(1, side[n] ** 2, 77) for n in slime.CROSS_LAYERS}
        self.maps.update({n: torch.full((1, 4096, 4096), 1 / 4096) for n in slime.SELF_LAYERS})
        self.calls = []

    def __call__(self, x, t, context, attn_layers=(), log_attn_layers=()):
        self.calls.append((x, t, context))
        eps = context[0, 1, 0] * torch.ones_like(x)
        return eps, {n: self.maps[n] for n in (*attn_layers, *log_attn_layers)}


def stub_sd(unet, alphas_cumprod):
    """An `sd` around `unet` whose VAE encodes any image to z = 0.5 + 0.1 N(0, I), drawing its
    N(0, I) from the generator as the real VAE's posterior sample does (one randn of the latent's
    shape)."""

    def encode(images, sample, generator):
        assert sample  # training and noisy_latent encode a posterior sample, not the mean
        return 0.5 + 0.1 * torch.randn(len(images), 4, 64, 64, generator=generator)

    vae = SimpleNamespace(encode=encode)
    cpu, fp32 = torch.device("cpu"), torch.float32
    return SimpleNamespace(
        unet=unet, vae=vae, alphas_cumprod=alphas_cumprod, device=cpu, dtype=fp32
    )


def test_eq8_total_loss_and_the_sd_loss_by_hand():
    """Eq. 8, loss = CE + alpha MSE + beta SD, with every term plain arithmetic on a stub UNet's
    known outputs: CE (Eq. 4) and MSE (Eq. 7) of constant maps, and SD = mean((eps_u + g
    (eps_c - eps_u) - noise)^2) with eps_c = 0.5, eps_u = -0.25 and the noise noisy_latent added,
    replayed from the seed. alpha, beta and the guidance g are distinct and none is its default, so
    swapping alpha and beta, dropping the guidance, using eps_c alone or another target than the
    added noise each changes the loss (checked below). Only the conditional branch depends on the
    learned vectors: the gradient is beta g mean(2 (eps - noise)) on the entry eps_c is read from, 0
    elsewhere (a detached eps_c in the SD loss: no gradient at all)."""
    K, v = 3, [2.0, 0.5, -1.0]  # the logits of tokens 0, 1, 2: background, part 1, part 2
    unet = Eq8UNet(v)
    # a_t = 0.64 at every t: sqrt(a_t) = 0.8, sqrt(1 - a_t) = 0.6
    sd = stub_sd(unet, torch.full((1000,), 0.64))
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, 77, 4, generator=gen), torch.randn(1, 77, 4, generator=gen)
    learned = torch.randn(K - 1, 4, generator=gen)
    learned[0, 0], uncond[0, 1, 0] = 0.5, -0.25  # eps_c, eps_u
    learned.requires_grad_(True)
    mask = torch.zeros(64, 64, dtype=torch.long)
    mask[:16], mask[16:24] = 1, 2  # 2560 background pixels, 1024 of part 1, 512 of part 2
    s = slime.Settings(alpha=0.6, beta=0.25, guidance=3.0)
    d = slime.Settings()
    assert len({s.alpha, s.beta, s.guidance, d.alpha, d.beta, d.guidance}) == 6  # all distinct
    image = torch.zeros(3, 512, 512)
    loss, terms = slime.training_step(
        sd, learned, cond, uncond, image, mask, s, torch.Generator().manual_seed(5)
    )
    assert loss.requires_grad, (
        "only the SD loss can reach the learned vectors here, and it does not"
    )
    loss.backward()

    # the generator's draws replayed in training_step's order: the timestep, the VAE's sample, the
    # noise
    replay = torch.Generator().manual_seed(5)
    t = torch.randint(5, 101, (1,), generator=replay)  # t_min = 5 .. t_max = 100, inclusive
    z = 0.5 + 0.1 * torch.randn(1, 4, 64, 64, generator=replay)
    noise = torch.randn(1, 4, 64, 64, generator=replay).double()
    (x_c, t_c, _), (x_u, t_u, context_u) = (
        unet.calls
    )  # the conditional pass, then the unconditional one
    assert context_u is uncond and t_c == t and t_u == t and torch.equal(x_c, x_u)
    assert torch.allclose(x_c, 0.8 * z + 0.6 * noise.float(), atol=1e-6)  # float32 rounding only

    # Eq. 4: the softmax over the K tokens; the weights are #foreground / #part: 1536 / 1024 and
    # 1536 / 512
    p = [math.exp(x) / sum(math.exp(y) for y in v) for x in v]
    w = [1.0, 1.5, 3.0]
    n = [2560, 1024, 512]
    ce = sum(-w[c] * n[c] * math.log(p[c]) for c in range(K)) / sum(w[c] * n[c] for c in range(K))
    # Eq. 6 and 7: a uniform self-attention map averages the constant map, S_WAS[k] = p_k at every
    # pixel; a pixel of class c adds sum_k (p_k - [k == c])^2 = sum_k p_k^2 - 2 p_c + 1
    mse = sum(n[c] * (sum(x * x for x in p) - 2 * p[c] + 1) for c in range(K)) / 4096
    eps = -0.25 + 3.0 * (0.5 - -0.25)  # eps_u + g (eps_c - eps_u) = 2.0
    sd_loss = ((eps - noise) ** 2).mean().item()
    total = ce + 0.6 * mse + 0.25 * sd_loss
    # rel 1e-5: float32 rounding of the code's sums; each wrong reading below is over 1e-3 away
    assert math.isclose(terms["ce"], ce, rel_tol=1e-5) and math.isclose(
        terms["mse"], mse, rel_tol=1e-5
    )
    assert math.isclose(terms["sd"], sd_loss, rel_tol=1e-5)
    assert math.isclose(loss.item(), total, rel_tol=1e-5)

    def sd_term(eps, target):
        return 0.25 * ((eps - target) ** 2).mean().item()

    wrong = {  # the loss if training_step computed ...
        "alpha and beta swapped": ce + 0.25 * mse + 0.6 * sd_loss,
        "no guidance, or eps_c alone": ce + 0.6 * mse + sd_term(0.5, noise),
        "the guidance the other way": ce + 0.6 * mse + sd_term(0.5 + 3.0 * (-0.25 - 0.5), noise),
        "the latent as the target": ce + 0.6 * mse + sd_term(eps, z.double()),
        "another N(0, I) draw as the target": ce
        + 0.6 * mse
        + sd_term(eps, (z.double() - 0.5) / 0.1),
    }
    assert all(abs(x - total) > 1e-3 * total for x in wrong.values()), wrong

    grad = torch.zeros(K - 1, 4, dtype=torch.float64)
    grad[0, 0] = (
        0.25 * 3.0 * (2 * (eps - noise)).mean()
    )  # beta * d SD / d eps_c, and d eps / d eps_c = g
    assert torch.allclose(
        learned.grad.double(), grad, rtol=1e-5, atol=1e-7
    )  # float32 rounding only


def test_the_noise_schedule_is_sd_scaled_linear():
    """alphas_cumprod: 1000 betas evenly spaced in sqrt from sqrt(0.00085) to sqrt(0.012),
    a_t = prod over i <= t of (1 - beta_i); a_0 and a_999 recomputed with Python floats and written
    out."""
    a = slime.alphas_cumprod()
    lo, hi = 0.00085**0.5, 0.012**0.5
    prod, by_hand = 1.0, []
    for i in range(1000):
        prod *= 1 - (lo + (hi - lo) * i / 999) ** 2
        by_hand.append(prod)
    assert len(a) == 1000
    # the literals: by_hand[0] and by_hand[999] printed (0.99915, 0.004660098513...), to 6
    # significant digits. rel 1e-6 lets through float32 storage (4e-8 here); betas linear in beta
    # give a_999 = 0.00158, 1001 steps 0.00464, a_998 for a_999 0.00472
    for t, literal in ((0, 0.99915), (999, 0.00466010)):
        assert math.isclose(a[t].item(), by_hand[t], rel_tol=1e-6)
        assert math.isclose(a[t].item(), literal, rel_tol=1e-6)


def test_noisy_latent_is_sqrt_a_z_plus_sqrt_1_minus_a_noise():
    """x_t = sqrt(a_t) z + sqrt(1 - a_t) eps, each image at its own t, with the eps returned: drawn
    from the same generator right after the VAE's sample. A schedule with a_10 = 0.64 and
    a_900 = 0.36 makes the two square roots 0.8 and 0.6, so swapping them or taking another t's a
    fails."""
    a = torch.full((1000,), 0.5)
    a[10], a[900] = 0.64, 0.36
    sd = stub_sd(None, a)
    x_t, eps = slime.noisy_latent(
        sd, torch.zeros(2, 3, 512, 512), torch.tensor([10, 900]), torch.Generator().manual_seed(3)
    )
    replay = torch.Generator().manual_seed(3)
    z = 0.5 + 0.1 * torch.randn(2, 4, 64, 64, generator=replay)  # the stub VAE's z
    assert torch.equal(eps, torch.randn(2, 4, 64, 64, generator=replay))
    assert torch.allclose(x_t[0], 0.8 * z[0] + 0.6 * eps[0], atol=1e-6)  # float32 rounding only
    assert torch.allclose(x_t[1], 0.6 * z[1] + 0.8 * eps[1], atol=1e-6)


def test_the_vae_encodes_2x_minus_1_and_scales_the_posterior_by_0_18215():
    """vae.encode maps [0, 1] to SD's [-1, 1] (2 x - 1) before the encoder and multiplies the
    posterior's mean (and its sample, mean + std N(0, I)) by 0.18215, on a tiny random
    AutoencoderKL: by its parts, then with the encoder replaced by one with known moments, against
    written-out numbers."""
    from vae import AutoencoderKL, VAEConfig

    vae = AutoencoderKL(VAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, num_groups=4)).eval()
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        by_parts = (
            0.18215 * vae.quant_conv(vae.encoder(2 * x - 1))[:, :4]
        )  # the mean half of the moments
        assert torch.allclose(
            vae.encode(x), by_parts, rtol=1e-5, atol=1e-7
        )  # float32 rounding only

    seen = []

    class KnownMoments(torch.nn.Module):
        """mean = the input's (R, G, B, R); logvar = log 0.04, a std of 0.2."""

        def forward(self, h):
            seen.append(h)
            return torch.cat([h, h[:, :1], torch.full_like(h, math.log(0.04))[:, [0, 0, 0, 0]]], 1)

    vae.encoder = KnownMoments()
    with torch.no_grad():
        vae.quant_conv.weight.copy_(torch.eye(8)[:, :, None, None])  # quant_conv: the identity
        vae.quant_conv.bias.zero_()
    image = torch.tensor([0.75, 0.25, 1.0]).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    mean = vae.encode(image)
    # allclose's rtol 1e-5 here and below: float32 rounding only
    assert torch.allclose(seen[0], torch.tensor([0.5, -0.5, 1.0]).view(1, 3, 1, 1))  # 2 x - 1
    want = torch.tensor([0.091075, -0.091075, 0.18215, 0.091075])  # 0.18215 * (0.5, -0.5, 1.0, 0.5)
    assert torch.allclose(mean, want.view(1, 4, 1, 1).expand(1, 4, 8, 8))
    sample = vae.encode(image, sample=True, generator=torch.Generator().manual_seed(0))
    n = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(sample, want.view(1, 4, 1, 1) + 0.18215 * 0.2 * n)


def test_patch_origins():
    assert slime.patch_origins(400, 2) == [(0, 0), (0, 112), (112, 0), (112, 112)]
    assert slime.patch_origins(512, 1) == [(0, 0)]


def patched_masking_slow(calls, K, s, out):
    """The release's get_patched_masks (src/slime.py#L188-L279 at 9de06f1), literally, with Python
    loops over classes. -> (scores, the classes that passed the threshold in each patch)."""
    Facc, passed_per_patch = torch.zeros(K, out, out), []
    C = torch.zeros(K, out, out) + 1e-7
    ratio, m = 512 // out, s.patch_size // (512 // out)
    for (y0, x0), maps in zip(
        slime.patch_origins(s.patch_size, s.patches_per_side), calls, strict=True
    ):
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
            W = F.interpolate(W[None, None], size=(m, m), mode="bilinear", align_corners=False)[
                0, 0
            ]
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
    # the class maps peak at 0.0162-0.0175: at threshold 0.017 some classes fail in a patch, class 0
    # is not always the first that passes, and no class passes in the third patch (it adds nothing)
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
    """Labels at the image's size are the argmax of the class scores upsampled bilinearly to that
    size, computed band by band of rows."""
    scores = torch.rand(4, 512, 512, generator=torch.Generator().manual_seed(h))
    monkeypatch.setattr(slime, "vote_sums", lambda *a, **k: (scores, torch.ones(())))
    got = slime.segment(FakeSD(FakeUNet([{}])), None, torch.rand(3, h, w), 4, slime.Settings())
    assert torch.equal(slime.upsampled_argmax(scores, h, w, band=band), got)  # bands change nothing
    want = F.interpolate(scores[None], size=(h, w), mode="bilinear", align_corners=False)[0].argmax(
        0
    )
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
    """Eq. 8's gradient through the tiny real UNet into the learned vectors is the loss's central
    difference along a random direction: no branch of the loss is detached on its way to the
    vectors. At the default settings, on this checkpoint, the directional derivative (-0.0163) is CE
    -0.0165 + MSE -0.0257 + SD +0.0259 (alpha and beta included): detaching any one branch changes
    it by over 100%."""
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
    # rel 1e-2: float32 rounding makes the difference 0.3% off here. Lets through a detached branch
    # worth under 1% of the derivative, i.e. none of this checkpoint's three
    assert math.isclose((learned.grad * direction).sum().item(), fd.item(), rel_tol=1e-2)


def test_blur_uses_opencv_small_kernels():
    img = torch.zeros(3, 9, 9)
    img[:, 4, 4] = 1
    out = slime.gaussian_blur(img, 3)
    assert torch.allclose(
        out[0, 3:6, 4], torch.tensor([0.25, 0.5, 0.25]) * 0.5
    )  # outer product of [1,2,1]/4
    out = slime.gaussian_blur(img, 5)
    assert torch.allclose(out[0, 4, 2:7], torch.tensor([1, 4, 6, 4, 1]) / 16 * 6 / 16)


def labelled_scene():
    """A (512, 512) mask of a rectangle (1), a disc (2) and a bar (3) within 130 px of the centre,
    background 0 around them, and its image: channel c is 1 where the label is c + 1, so the
    background is 0 in all three, as are the corners a rotation brings in. Even where a blur, a zoom
    or a turn mixes labels, read_labels reads each pixel's label back: the one with the largest
    share (the background's is 1 - the sum)."""
    yy, xx = torch.meshgrid(torch.arange(512), torch.arange(512), indexing="ij")
    mask = torch.zeros(512, 512, dtype=torch.long)
    mask[(yy - 220) ** 2 + (xx - 300) ** 2 < 70**2] = 2
    mask[180:300, 150:260] = 1
    mask[300:340, 230:330] = 3
    return mask, F.one_hot(mask, 4).permute(2, 0, 1)[1:].float()


def read_labels(image):
    best, labels = (
        1 - image.sum(0),
        torch.zeros(image.shape[1:], dtype=torch.long),
    )  # the background's share
    for c in range(
        3
    ):  # an argmax over the 4 shares, written out (argmax over dim 0 is slow on CPU)
        more = image[c] > best
        best, labels = torch.where(more, image[c], best), torch.where(more, c + 1, labels)
    return labels


def one_label_around(mask, ys, xs, r):
    """For each pixel (ys[i], xs[i]): whether the (2r + 1) x (2r + 1) square around it holds a
    single label."""
    d = range(-r, r + 1)
    around = torch.stack(
        [mask[(ys + dy).clamp(0, 511), (xs + dx).clamp(0, 511)] for dy in d for dx in d]
    )
    return (around == around[0]).all(0)


def test_augment_keeps_the_mask_on_the_image():
    """After each augmentation (flip, blur, part crop and zoom, rotation; 12 seeds, each part
    favoured), the label the image shows at a pixel is the mask's label there. The crop keeps the
    objects inside the image and the turn keeps them inside its inscribed circle, so every
    difference is at a label boundary."""
    mask, image = labelled_scene()
    s = slime.Settings()
    for seed in range(12):
        img, m = slime.augment(image, mask, seed % 4, s, torch.Generator().manual_seed(seed))
        wrong = read_labels(img) != m
        # off the boundaries, none: no pixel whose 5x5 square holds one label of the mask reads
        # another label. 5x5, as the mask's nearest zoom (cv2's INTER_NEAREST, as the release's)
        # lags the bilinear image by half a pixel and the turn rounds, so a boundary pixel may read
        # 2 px off
        assert not one_label_around(m, *wrong.nonzero(as_tuple=True), r=2).any(), seed
        # at the boundaries: 0.15-0.38% of the pixels here (up to 36% of those on a boundary). 0.4%
        # lets through a mask one source pixel off (the lag is of that size) or turned 0.3 degrees
        # more than the image; 2 px off (0.41-0.66%, every seed) or 1 degree fails
        assert wrong.float().mean() < 0.004, seed


def test_augment_flips_the_image_and_the_mask_together():
    """The horizontal flip turns both or neither: a part on the left of the image stays on the
    mask's side."""
    mask = torch.zeros(512, 512, dtype=torch.long)
    mask[200:300, 40:140] = 1  # on the left: centre x = 89.5
    image = F.one_hot(mask, 4).permute(2, 0, 1)[1:].float()
    s = slime.Settings(
        min_crop_ratio=1.0, rotation=0.0
    )  # the whole image, unturned: only flip and blur act
    flips = []
    for seed in range(8):
        img, m = slime.augment(image, mask, 1, s, torch.Generator().manual_seed(seed))
        flips.append(torch.equal(m, mask.flip(-1)))
        assert flips[-1] or torch.equal(m, mask)
        x = (img[0].sum(0) * torch.arange(512)).sum() / img[
            0
        ].sum()  # the image's part: its centre x
        # 0.01 px: float32 sums; the blur is symmetric and keeps the centre. A one-pixel shift would
        # fail
        assert abs(x - (511 - 89.5 if flips[-1] else 89.5)) < 0.01, seed
    assert any(flips) and not all(flips)  # both cases occurred


def test_part_crop_keeps_more_than_30_percent_of_the_favoured_part():
    """The crop that favours a part keeps more than 30% of its pixels, also for a part in a corner,
    which most crops of the same sizes keep less of; and crops that keep barely more are taken (the
    bar is 30%, not more). A part absent from the mask accepts the first crop drawn."""
    mask = torch.zeros(512, 512, dtype=torch.long)
    mask[:40, :40] = 1  # 1600 px in the top-left corner

    def kept(crop):
        y0, x0, side = crop
        assert 0.8 * 512 - 1 < side <= 512 and 0 <= y0 <= 512 - side and 0 <= x0 <= 512 - side
        return (mask[y0 : y0 + side, x0 : x0 + side] == 1).sum().item() / 1600

    gen = torch.Generator().manual_seed(0)
    favoured = [kept(slime.part_crop(mask, 1, 0.8, gen)) for _ in range(40)]
    assert min(favoured) > 0.3 and min(favoured) < 0.4
    # part 2 is absent: any first draw is accepted, so these are the crops drawn before the bar.
    # Half of them keep 30% or less, some between 10% and 30%: a bar of 10% would have let such
    # crops through above
    drawn = [kept(slime.part_crop(mask, 2, 0.8, gen)) for _ in range(40)]
    assert sum(k <= 0.3 for k in drawn) >= 20 and sum(0.1 < k <= 0.3 for k in drawn) >= 3
    # at once: the crop is the first one the generator gives (side, then the origin)
    replay, gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    side = int((0.8 + 0.2 * torch.rand(1, generator=replay).item()) * 512)
    y0, x0 = torch.randint(0, 512 - side + 1, (2,), generator=replay).tolist()
    assert slime.part_crop(mask, 2, 0.8, gen) == (y0, x0, side)


def test_rotate_turns_the_image_and_the_mask_by_the_same_angle_and_brings_in_zeros():
    """rotate turns a (bilinear) image and a (nearest) mask about the centre by the angle asked,
    clockwise on screen for positive angles: an off-centre square's centre lands where the turn by
    hand puts it, in both. The corners the turn brings in are 0 in both: black pixels, background
    labels."""
    mask = torch.zeros(512, 512, dtype=torch.long)
    mask[100:140, 300:340] = (
        3  # centre (119.5, 319.5): 150 px from the image's centre (255.5, 255.5)
    )
    image = (mask == 3).float().expand(3, 512, 512)
    yy, xx = torch.meshgrid(torch.arange(512.0), torch.arange(512.0), indexing="ij")

    def centre(w):
        return ((w * yy).sum() / w.sum()).item(), ((w * xx).sum() / w.sum()).item()

    for degrees in (20.0, -25.0):
        a, dy, dx = math.radians(degrees), 119.5 - 255.5, 319.5 - 255.5
        want = (
            255.5 + dx * math.sin(a) + dy * math.cos(a),
            255.5 + dx * math.cos(a) - dy * math.sin(a),
        )
        img, m = (
            slime.rotate(image, degrees, "bilinear"),
            slime.rotate(mask[None], degrees, "nearest")[0],
        )
        # 0.01 px (bilinear, 0.001 here) and 0.1 px (nearest rounds each pixel, 0.02 here): lets
        # through a turn off by under 0.04 degrees (0.1 degree moves the centre 0.26 px)
        assert all(abs(g - w) < 0.01 for g, w in zip(centre(img[0]), want)), degrees
        assert all(abs(g - w) < 0.1 for g, w in zip(centre((m == 3).float()), want)), degrees
        assert set(m.unique().tolist()) == {0, 3}
    img = slime.rotate(torch.ones(3, 512, 512), 30.0, "bilinear")
    m = slime.rotate(torch.full((1, 512, 512), 3), 30.0, "nearest")[0]
    for y, x in ((0, 0), (0, 511), (511, 0), (511, 511)):
        assert (img[:, y, x] == 0).all() and m[y, x] == 0
    assert (img[:, 256, 256] == 1).all() and m[256, 256] == 3
    # the zeros are the same region in both (15% of the image), to the pixel
    assert torch.equal(img[0] > 0.5, m == 3) and (m == 0).float().mean() > 0.15


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
    """fit's validation segments the same images with the same seeded noise every time: fit makes
    each validation image's noisy inputs once, before its loop (that every validation gets those:
    the next test), and no validation VAE-encodes again; its masks and mIoU equal segmenting from
    scratch."""
    from conftest import synthetic_scene

    sd = slime.load_models(tiny_ckpt("sd2"))
    img, mask = synthetic_scene()
    image, gt = torch.from_numpy(img).permute(2, 0, 1).float() / 255, torch.from_numpy(mask).long()
    s = slime.Settings(threshold=0, patch_size=512, patches_per_side=1)
    cond, _ = slime.prompt_contexts(sd, 3)
    encodes, encode = [], sd.vae.encode
    sd.vae.encode = lambda *a, **k: encodes.append(1) or encode(*a, **k)
    kept = [slime.noisy_patches(sd, image, s)]  # as fit makes them, once
    context = slime.with_learned(cond[0, 1:3] + 0.5, cond)
    miou = slime.validation_miou(sd, context, [(image, gt)], kept, 3, s)
    assert len(encodes) == 1  # the kept patches, not encoded again
    fresh = slime.segment(sd, context, image, 3, s, slime.SIZE)
    assert len(encodes) == 2  # segmenting from scratch encodes
    assert torch.equal(slime.segment(sd, context, image, 3, s, slime.SIZE, kept[0]), fresh)
    assert miou == slime.image_miou(fresh, gt, 3)  # the mIoU of the masks made from scratch


def test_fit_makes_the_validation_inputs_once_and_hands_the_same_to_every_validation(
    tiny_ckpt, monkeypatch
):
    """One noisy_patches per validation pair, before the first step; every validation gets those
    very ones."""
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

    monkeypatch.setattr(slime, "noisy_patches", inputs)
    monkeypatch.setattr(slime, "training_step", step)
    monkeypatch.setattr(slime, "validation_miou", validation)
    val = [(image, gt), (image.flip(-1), gt.flip(-1))]
    slime.fit(sd, [(image, gt)], 2, slime.Settings(epochs=3, val_every=1), val_pairs=val)
    assert [what for what, _ in calls] == ["inputs"] * 2 + ["step", "validation"] * 3
    made = [x for what, x in calls if what == "inputs"]
    given = [x for what, x in calls if what == "validation"]
    assert all(g is given[0] for g in given) and len(given[0]) == 2
    assert all(a is b for a, b in zip(given[0], made))


# --------------------------------------------------------------------- native resolution (--window)
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
    assert (
        (m[:3, :4] == 1).all()
        and (m[3:] == slime.IGNORE).all()
        and (m[:, 4:] == slime.IGNORE).all()
    )
    assert (
        slime.window_crop(image, 0, 0, 4).data_ptr() == image.data_ptr()
    )  # inside: a view, no copy


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
    assert (
        min(seen) > 0 and max(seen) == 14 * 14
    )  # some of it always; whole, at scale 1 (window 512), mostly
    small, small_mask = slime.native_view(
        torch.rand(3, 100, 60), torch.ones(100, 60, dtype=torch.long), 1, 256, gen
    )
    assert (
        small.shape == (3, 512, 512) and (small_mask[:200, :120] == 1).all()
    )  # 2x, as a 256 window
    assert (small_mask[200:] == slime.IGNORE).all() and (small_mask[:, 120:] == slime.IGNORE).all()


@pytest.mark.parametrize(
    "h, w, cell, band", [(1000, 700, 8, 37), (300, 200, 8, 256), (96, 130, 2, 50)]
)
def test_window_grid_scores_are_upsampled_band_by_band_and_cut_at_the_border(h, w, cell, band):
    gh, gw = max(64, -(-h // cell)), max(64, -(-w // cell))
    scores = torch.rand(3, gh, gw, generator=torch.Generator().manual_seed(h))
    extent = (gh * cell, gw * cell)
    got = slime.upsampled_argmax(scores, h, w, extent, band=band)
    # bands change nothing
    assert got.shape == (h, w) and torch.equal(got, slime.upsampled_argmax(scores, h, w, extent))
    full = F.interpolate(
        scores[None], size=(gh * cell, gw * cell), mode="bilinear", align_corners=False
    )[0]
    assert (got.long() != full[:, :h, :w].argmax(0)).float().mean() < 1e-4  # equal up to float ties


def test_window_scores_are_the_release_rule_over_the_windows(monkeypatch):
    """Each window votes as a release patch (patch_votes, unchanged) on its 64x64 cells of the grid;
    where windows overlap, each class's score is the mean of its votes; a class below the threshold
    in a window does not vote there. With one window the image is that window."""
    K = 3
    calls = [random_maps(K, seed) for seed in range(2)]
    s = slime.Settings(window=512, threshold=0.017)
    image = torch.rand(3, 512, 896)  # grid 64 x 112 cells: windows at x = 0 and 48 cells, 16 shared
    upsampled = []
    with monkeypatch.context() as m:  # the scores and where window_segment resizes them
        m.setattr(slime, "upsampled_argmax", lambda *args: upsampled.append(args))
        slime.window_segment(FakeSD(FakeUNet(calls)), None, image, K, s)
    ((got, h, w, extent),) = upsampled
    # cells of 8 pixels: the grid's padded extent is the image here
    assert (h, w, extent) == (512, 896, (512, 896)) and got.shape == (K, 64, 112)
    scores, votes = torch.zeros(K, 64, 112), torch.full((K, 64, 112), 1e-7)
    for x0, maps in zip((0, 48), calls, strict=True):
        A_ca, A_sa, _ = slime.attention_maps(
            FakeSD(FakeUNet([maps])),
            torch.zeros(1, 4, 64, 64),
            torch.tensor([100]),
            None,
            K,
            log_space=False,
        )
        seen, v = slime.patch_votes(A_ca, A_sa, s.threshold, 64)
        scores[seen, :, x0 : x0 + 64] += v
        votes[seen, :, x0 : x0 + 64] += 1
    assert torch.allclose(got, scores / votes, atol=1e-6)
    # classes 0 and 2 pass in the first window, 1 and 2 in the second
    # (test_patched_masking_arithmetic)
    assert votes[:, 0, 10].round().tolist() == [1, 0, 1] and votes[:, 0, 50].round().tolist() == [
        1,
        1,
        2,
    ]
    # one window on a 512 image: the squash path with one 512 patch, up to where bilinear steps land
    one = slime.segment(FakeSD(FakeUNet(calls[:1])), None, image[:, :, :512], K, s)
    squash = slime.segment(
        FakeSD(FakeUNet(calls[:1])),
        None,
        image[:, :, :512],
        K,
        slime.Settings(patch_size=512, patches_per_side=1, threshold=0.017),
    )
    # 98.8% agree: the release rule rescales each class's WAS map by its min and max, which the
    # squash path takes after the 8x bilinear upsampling and the window path before it, so near-ties
    # of two classes move. 0.985 lets through a change confined to 1.5% of the pixels; masks a pixel
    # apart agree on 93.8%
    assert (one == squash).float().mean() > 0.985
