"""Speed and memory of slime vs the authors' release way of computing, on the full SD 2.1-base
architecture.

    # full size, random weights: CPU, and CUDA when present
    python benchmarks/benchmark.py
    # small widths, to check the script (minutes on 2 cores)
    python benchmarks/benchmark.py --tiny
    python benchmarks/benchmark.py --device cpu --only fit --repeats 2
    # formats side by side
    python benchmarks/benchmark.py --device cpu --dtype fp32,bf16 --no-release
    # the default against fp32
    python benchmarks/benchmark.py --device cpu --dtype fp32,auto --no-release

Run from anywhere (it finds slime.py one folder up). Not a test: pytest does not collect it, and a
full run takes about 16 minutes on 2 CPU cores.

No checkpoint is needed: the three networks are built with random weights (timing does not depend on
the values). K = 6 classes (PASCAL-Part car), a synthetic 512x512 image and mask, fixed seeds.
Each measurement runs in a fresh subprocess (`--one MODE`), 1 warm-up then --repeats timed runs
(median), with fp32 denormals flushed to zero as slime's command line does (from 2026-12-02; earlier
tables did not). Peak memory: CPU = peak RSS of that subprocess while the operation runs
(VmHWM, reset right after the models are built), shown as working memory (peak minus the RSS after
the build) and total; CUDA = torch.cuda.max_memory_allocated, likewise minus what was allocated
after the build.

slime   = slime.fit's inner loop (augment + training_step + backward + Adam step) and slime.segment.
release = a BASELINE built here from slime's own functions, computing as the release did (README,
          Faithfulness; aliasgharkhani/SLiMe at 9de06f1, src/slime.py and src/stable_difusion.py): a
          CFG batch of 2 [uncond; cond] in every UNet call, with grad through both halves in
          training; the attention probabilities of EVERY UNet attention layer materialised
          (no SDPA fast path); and, in every training step, the patched inference (the patch votes
          at out=64, CFG batch) that the release ran only to log a training IoU.
Every patched inference uses threshold 0: with random weights no class reaches 0.2, and a class
that does not pass skips its per-class work, which would flatter both sides.
"""

import argparse
import copy
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import clip_text  # noqa: E402
import slime  # noqa: E402
import unet as unet_mod  # noqa: E402
import vae as vae_mod  # noqa: E402

K = 6  # PASCAL-Part car: background body light plate wheel window
# mode prefix -> table row
OPS = {
    "fit": "fit step",
    "val": "validation inside fit, 400x2 (patches kept)",
    "p400x2": "predict 400x2",
    "p512x1": "predict 512x1",
}
# slime's default patches; the PASCAL preset's
PATCHES = {"val": (400, 2), "p400x2": (400, 2), "p512x1": (512, 1)}
EPOCHS = (
    200  # the release's default 1-shot fit: 200 epochs of 1 step, each followed by a validation
)


# ----------------------------------------------------------------------- models with random weights
class RandomSD(slime.StableDiffusion):
    """slime.StableDiffusion (its tokenizer and properties), without a checkpoint file to
    fingerprint."""

    def __init__(self, unet, vae, text_encoder, device):
        self.family, self.path, self.fingerprint = "sd2", None, "random-weights"
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.device, self.dtype = torch.device(device), next(unet.parameters()).dtype
        self.alphas_cumprod = slime.alphas_cumprod().to(device)


@torch.no_grad()
def randomize(module, gen):
    """Matrices ~ N(0, 1/fan_in) (variance-preserving, so 1.3 B random weights keep activations
    finite), embeddings ~ N(0, 0.02), norm weights 1, biases 0. Covers OpenCLIPText's torch.empty
    parameters."""
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            std = 0.02 if "embedding" in name else 1 / math.sqrt(math.prod(p.shape[1:]))
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        else:
            p.fill_(1.0 if name.endswith("weight") else 0.0)


def build(tiny, device, dtype):
    gen = torch.Generator().manual_seed(0)
    if tiny:  # the widths of tests/conftest.py's tiny checkpoints
        cfgs = (
            unet_mod.UNetConfig.sd21(model_channels=64, context_dim=64),
            vae_mod.VAEConfig(ch=32),
            clip_text.TextConfig.sd21(width=64),
        )
    else:
        cfgs = unet_mod.UNetConfig.sd21(), vae_mod.VAEConfig(), clip_text.TextConfig.sd21()
    nets = [
        unet_mod.UNetModel(cfgs[0]),
        vae_mod.AutoencoderKL(cfgs[1]),
        clip_text.OpenCLIPText(cfgs[2]),
    ]
    for net in nets:
        randomize(net, gen)
        net.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return RandomSD(*nets, device)


def synthetic_pair():
    """A smooth random image (3, 512, 512) in [0, 1] and a mask with all 6 car classes (512, 512)
    int64."""
    g = torch.Generator().manual_seed(1)
    image = F.interpolate(torch.rand(1, 3, 16, 16, generator=g), size=(512, 512), mode="bilinear")[
        0
    ]
    y, x = torch.meshgrid(torch.arange(512.0), torch.arange(512.0), indexing="ij")
    mask = torch.zeros(512, 512, dtype=torch.int64)
    mask[((x - 256) / 220) ** 2 + ((y - 280) / 110) ** 2 < 1] = 1  # body
    mask[(y > 190) & (y < 250) & (x > 170) & (x < 340)] = 5  # window
    mask[(y > 270) & (y < 300) & (x > 440) & (x < 475)] = 2  # light
    mask[(y > 300) & (y < 325) & (x > 40) & (x < 90)] = 3  # plate
    for cx in (140, 370):
        mask[(x - cx) ** 2 + (y - 380) ** 2 < 45**2] = 4  # wheels
    return image, mask


# --------------------------------------------------------------------------- release-style baseline
class ReleaseCFGUNet:
    """release-style baseline: stands in for sd.unet. Every call runs the CFG batch of 2 (x
    duplicated, context [uncond; cond]) and materialises the attention probabilities of EVERY UNet
    attention layer (the release computed explicit scores in all of them); returns the cond half,
    keeps the uncond eps. Not modelled: the release also materialised the VAE's attention scores,
    and computed every attention twice (scores + SDPA); slime's explicit path computes it once, so
    this baseline is if anything cheap."""

    def __init__(self, unet, uncond):
        self.unet, self.uncond, self.eps_uncond = unet, uncond, None

    def __getattr__(
        self, name
    ):  # anything else slime asks of sd.unet (parameters(), ...): the real UNet's
        return getattr(self.unet, name)

    def __call__(self, x, t, context, attn_layers=(), log_attn_layers=()):
        every = [n for n in self.unet.attention_layer_names() if n not in log_attn_layers]
        eps, maps = self.unet(
            torch.cat([x, x]),
            torch.cat([t, t]),
            torch.cat([self.uncond.to(context.dtype), context]),
            attn_layers=every,
            log_attn_layers=log_attn_layers,
        )
        self.eps_uncond = eps[
            :1
        ]  # in training it carries the graph: the release backpropagated both halves
        return eps[1:], {name: m[1:] for name, m in maps.items()}


def release_sd(sd, uncond):
    base = copy.copy(sd)
    base.unet = ReleaseCFGUNet(sd.unet, uncond)
    return base


def release_training_step(base, learned, cond, image, mask, s, gen):
    """release-style baseline of slime.training_step (release src/slime.py#L111-L152): same losses,
    release costs."""
    t = torch.randint(s.t_min, s.t_max + 1, (1,), generator=gen, device=gen.device)
    x_t, noise = slime.noisy_latent(base, image[None], t, gen)
    # steps 6-12: one CFG batch with grad through both halves, every attention layer materialised
    A_ca, A_sa, eps_cond = slime.attention_maps(
        base, x_t, t, slime.with_learned(learned, cond), K, log_space=True
    )
    loss_ce, loss_mse = slime.segmentation_losses(A_ca, A_sa, mask, K)
    eps_uncond = base.unet.eps_uncond
    loss_sd = F.mse_loss(eps_uncond + s.guidance * (eps_cond - eps_uncond), noise)
    loss = loss_ce + s.alpha * loss_mse + s.beta * loss_sd
    # step 14: patched inference (CFG batch, no grad) only to log a training IoU, at out = 64.
    # threshold 0: with random weights no class reaches 0.2 and the per-class work would be skipped.
    with torch.no_grad():
        ps = replace(s, threshold=0.0)
        # the release's output grid of 64: each patch on its 8x smaller footprint
        ratio = slime.SIZE // slime.MAP
        patches = [
            (y0 // ratio, x0 // ratio, x_t) for y0, x0, x_t in slime.noisy_patches(base, image, ps)
        ]
        scores, votes = slime.vote_sums(
            base,
            slime.with_learned(learned, cond),
            patches,
            K,
            ps,
            (slime.MAP,) * 2,
            ps.patch_size // ratio,
        )
        (scores / votes).argmax(0)
    return loss, {"ce": loss_ce.item(), "mse": loss_mse.item(), "sd": loss_sd.item()}


# --------------------------------------------------------------------- one measurement (subprocess)
def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def rss_kb(field):
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":")))


def measure_one(mode, args):
    op, who = mode.split("-")
    device = args.device
    # as slime's command line does (slime.main): fp32 denormals are slow on x86
    torch.set_flush_denormal(True)
    t0 = time.perf_counter()
    if args.dtype == "auto":
        # the command line's default (fp32 since 2026-12-08: no timing probe)
        auto = argparse.Namespace(device=device, dtype="auto")
        dtype = slime.device_and_dtype(auto, slime.Console(True))[1]
    else:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    choice_s = time.perf_counter() - t0
    torch.manual_seed(0)
    sd = build(args.tiny, device, dtype)
    s = slime.Settings()
    cond, uncond = slime.prompt_contexts(sd, K)
    base = release_sd(sd, uncond)
    image, mask = synthetic_pair()
    gen = torch.Generator(device).manual_seed(s.seed)
    if op == "fit":  # slime.fit's inner loop, one step
        aug_gen = torch.Generator().manual_seed(s.seed)  # as slime.fit: augmentations on the CPU
        learned = cond[0, 1:K].clone().requires_grad_(True)
        optimizer = torch.optim.Adam([learned], lr=s.lr)
        part = [0]

        def run():
            img, m = slime.augment(image, mask, part[0], s, aug_gen)
            part[0] = (part[0] + 1) % K
            m = slime.resize(m[None], (slime.MAP, slime.MAP), "nearest")[0].to(device)
            if who == "slime":
                loss, _ = slime.training_step(sd, learned, cond, uncond, img.to(device), m, s, gen)
            else:
                loss, _ = release_training_step(base, learned, cond, img.to(device), m, s, gen)
            assert torch.isfinite(loss), loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    else:
        # one image through slime.segment; threshold 0 so every class does its work in every patch
        size, per_side = PATCHES[op]
        ps = replace(s, patch_size=size, patches_per_side=per_side, threshold=0.0)
        context = slime.with_learned(cond[0, 1:K], cond)

        model = sd if who == "slime" else base
        # validation inside fit segments the same image every epoch from noisy patches made once
        # per fit
        # the release: not
        kept = slime.noisy_patches(model, image, ps) if op == "val" and who == "slime" else None

        def run():
            slime.segment(model, context, image, K, ps, inputs=kept)

    sync(device)
    if device == "cuda":
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = rss_kb("VmRSS") * 1024
        try:  # "5" resets this process's peak RSS (VmHWM), so the model build does not count
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            reset = True
        except OSError:
            reset = False
    times = []
    try:
        for i in range(1 + args.repeats):
            t0 = time.perf_counter()
            run()
            sync(device)
            times.append(time.perf_counter() - t0)
            print(
                f"  {mode} run {i} ({'warm-up' if i == 0 else 'timed'}): {times[-1]:.2f} s",
                file=sys.stderr,
                flush=True,
            )
    except Exception as e:  # e.g. CUDA out of memory: the table shows why
        print(
            "RESULT "
            + json.dumps(
                dict(mode=mode, error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
            )
        )
        return
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = (
            rss_kb("VmHWM") * 1024
            if reset
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
    print(
        "RESULT "
        + json.dumps(
            dict(
                mode=mode,
                times=times[1:],
                median=statistics.median(times[1:]),
                before=before,
                peak=peak,
                dtype=str(dtype)[6:],
                choice_s=choice_s,
            )
        ),
        flush=True,
    )


# ----------------------------------------------------------------------------- driver and table
def run_mode(mode, device, dtype, args):
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--one",
        mode,
        "--device",
        device,
        "--repeats",
        str(args.repeats),
        "--dtype",
        dtype,
    ]
    out = subprocess.run(cmd + (["--tiny"] if args.tiny else []), stdout=subprocess.PIPE, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:  # e.g. killed for memory
        return dict(error=f"exit status {out.returncode}, no result")
    return json.loads(lines[-1][7:])


def gb(r):
    return (
        "-"
        if "error" in r
        else f"{(r['peak'] - r['before']) / 2**30:.2f} GB (total {r['peak'] / 2**30:.2f})"
    )


def machine(device, dtype):
    with open("/proc/cpuinfo") as f:
        cpu = next(
            (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
            platform.processor(),
        )
    gpu = f", GPU {torch.cuda.get_device_name()}" if device == "cuda" else ""
    return (
        f"CPU {cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads){gpu}; "
        f"torch {torch.__version__}; device {device}; dtype {dtype}"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--device", choices=("cpu", "cuda"), help="default: cpu, then cuda when available"
    )
    ap.add_argument(
        "--repeats", type=int, help="timed runs after 1 warm-up (default: 2 on cpu, 5 on cuda)"
    )
    ap.add_argument(
        "--dtype",
        default="fp32",
        help="slime's number format(s), comma-separated, e.g. fp32,bf16 or "
        "fp32,auto (each measured side by side; auto: slime's default, its own choice); "
        "default fp32",
    )
    ap.add_argument(
        "--no-release", action="store_true", help="skip the release-style baseline (always fp32)"
    )
    ap.add_argument("--only", choices=("fit", "predict"))
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="small widths (tests/conftest.py's), to debug the script",
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one measurement in this process
    args = ap.parse_args()
    if args.one:
        return measure_one(args.one, args)
    dtypes = args.dtype.split(",")
    if not set(dtypes) <= {"fp32", "bf16", "fp16", "auto"}:
        ap.error(f"--dtype: fp32, bf16, fp16 or auto, comma-separated, not {args.dtype!r}")
    devices = (
        [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    )
    ops = [op for op in OPS if args.only is None or (op in ("fit", "val")) == (args.only == "fit")]
    who = [(d, "slime") for d in dtypes] + ([] if args.no_release else [("fp32", "release")])
    t_start = time.time()
    for device in devices:
        args.repeats = args.repeats or (2 if device == "cpu" else 5)
        results = {}
        for op in ops:
            for dtype, w in who:
                print(f"measuring {op}-{w} {dtype} on {device} ...", file=sys.stderr, flush=True)
                results[op, dtype, w] = run_mode(f"{op}-{w}", device, dtype, args)
        print(
            f"\n{machine(device, ', '.join(dtypes))}; "
            f"{'TINY widths' if args.tiny else 'full SD 2.1-base'}, random "
            f"weights, K={K}, 512x512 image, median of {args.repeats} after 1 warm-up\n"
        )
        table(ops, who, results)
        print(
            "\nthreshold 0 in every patched inference (random weights never reach 0.2, which "
            "would skip the per-class work); baseline fit step = CFG batch with grad + per-step "
            "logging inference (400x2, out 64); baseline validation = from scratch (the release "
            "kept no patches); VAE attention not materialised in the baseline"
        )
    print(f"\nwall time {time.time() - t_start:.0f} s", flush=True)


def table(ops, who, results):
    """One row per operation, one time and one peak memory per (dtype, who); the speed-ups against
    the first column; then the rows a user plans with: one fit epoch (step + validation) and the
    release's default 1-shot fit (200 of them), projected from the measured rows."""
    names = [f"{w} {d}" if w == "slime" else "release-style fp32" for d, w in who]
    print(
        "| operation | "
        + " | ".join(f"{n} s" for n in names)
        + " | "
        + " | ".join(f"{n} time / {names[0]}" for n in names[1:])
        + " | "
        + " | ".join(f"{n} peak" for n in names)
        + " |"
    )
    print("|---" * (1 + 2 * len(names) + len(names) - 1) + "|")
    seconds = {}
    for op in ops:
        rs = [results[op, d, w] for d, w in who]
        seconds[op] = [r.get("median") for r in rs]
        cells = [
            (
                f"{r['median']:.2f}" + (f" ({r['dtype']})" if d == "auto" else "")
                if "median" in r
                else f"failed ({r['error']})"
            )
            for r, (d, w) in zip(rs, who, strict=True)
        ]
        ratios = [
            f"{b / seconds[op][0]:.2f}x" if b and seconds[op][0] else "-" for b in seconds[op][1:]
        ]
        print(f"| {OPS[op]} | " + " | ".join(cells + ratios + [gb(r) for r in rs]) + " |")
    if "fit" in seconds and "val" in seconds:
        for label, n in (
            ("one fit epoch (step + validation)", 1),
            (f"1-shot fit, release defaults ({EPOCHS} epochs), projected", EPOCHS),
        ):
            total = [
                a + b if a and b else None
                for a, b in zip(seconds["fit"], seconds["val"], strict=True)
            ]
            cells = [
                (f"{n * t:.1f}" if n == 1 else f"{n * t / 60:.0f} min") if t else "-" for t in total
            ]
            ratios = [f"{b / total[0]:.2f}x" if b and total[0] else "-" for b in total[1:]]
            print(f"| {label} | " + " | ".join(cells + ratios + ["-"] * len(total)) + " |")
    for (
        d,
        w,
    ) in (
        who
    ):  # auto: what each measurement's own probe chose, and what choosing cost (once per run)
        if d == "auto":
            print(
                "\nauto chose "
                + ", ".join(
                    f"{results[op, d, w].get('dtype')} for {op} in "
                    f"{results[op, d, w].get('choice_s', 0):.2f} s"
                    for op in ops
                )
            )


if __name__ == "__main__":
    main()
