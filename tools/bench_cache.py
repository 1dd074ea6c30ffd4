"""score cache (#17): how close cached masks come to exact ones, and what a mask costs each way.

Fidelity, on the sample set: per batch of the plan, the exact path (the teacher on the decoded
crop, Teacher.compute) against the cached one (the teacher's score of the whole image, resampled
onto the crop's patch grid, then the same stochastic step with the same noise: CachedMasks), for
a trained teacher (the demo run's EMA) and a fresh one. gpa is reported at progress 1.0 (half the
masked patches are its top-k: the most score-dependent setting) and at 0.0 (soft + random).
Cost, on one core with one torch thread: images/s of the exact path, of the cached path in
steady state (resample + stochastic step), of a refresh (whole image + teacher score + store), and
amortized over refreshes every k epochs (momentum) or once per run (frozen, E epochs):
1 / (1/cached + 1/(k * refresh)); "feeds" = mask images/s over the student's training images/s."""
from __future__ import annotations

import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mimpipe.tools.argtypes import nonneg_int, positive_int

RATIO = 0.75
STRATEGIES = ("gpa", "idm", "attmask")
# (label, strategy, progress); progress is read only by gpa
CASES = (("gpa t=1", "gpa", 1.0), ("gpa t=0", "gpa", 0.0), ("idm", "idm", 0.0), ("attmask", "attmask", 0.0))
AREA_BINS = ((0.0, 0.4, "<0.4"), (0.4, 0.7, "0.4-0.7"), (0.7, math.inf, ">=0.7"))
KS = (1, 2, 4, 8)                 # momentum: every image refreshed once per k epochs
FROZEN_EPOCHS = (12, 800)         # the demo's run, MAE's recipe
IMAGENET = 1_281_167
VIT_B = ("mae_vit_base_patch16", 8)   # model, batch
TIMING_PROGRESS = 0.5             # gpa draws both its hard and its soft part


def add_arguments(p) -> None:
    p.add_argument("--shards", type=Path, default=Path("shards/sample"))
    p.add_argument("--model", default="mae_vit_tiny_patch8_64")
    p.add_argument("--checkpoint", type=Path, default=Path("runs/demo/checkpoint.pt"),
                   help="the trained teacher: this checkpoint's 'ema' (default runs/demo/checkpoint.pt)")
    p.add_argument("--epochs", type=positive_int, default=2, help="fidelity epochs (default 2)")
    p.add_argument("--steps", type=positive_int, default=8, help="fidelity batches of 64 per epoch (default 8)")
    p.add_argument("--batches", type=positive_int, default=5,
                   help="timed batches per path, --model at batch 64 (default 5)")
    p.add_argument("--served-epochs", type=nonneg_int, default=3,
                   help="epochs a real mask server process serves exact and cached gpa masks to a client that "
                        "takes them as fast as it can (default 3; 0 skips)")
    p.add_argument("--vit-b-batches", type=nonneg_int, default=2,
                   help="timed batches per path, ViT-B/16 at 224 px, batch 8 (default 2; 0 skips it)")


# ---- pure measures ----
def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks along the last axis, ties given their mean rank (O(L^2), L is small)."""
    a, b = x.unsqueeze(-1), x.unsqueeze(-2)   # [..., L, 1] vs [..., 1, L]
    less = (b < a).sum(-1).double()
    equal = (b == a).sum(-1).double()
    return less + (equal + 1) / 2


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rank correlation of a and b [..., L] along L -> [...]; nan where either is constant."""
    ra, rb = average_ranks(a.double()), average_ranks(b.double())
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / ((ra * ra).sum(-1) * (rb * rb).sum(-1)).sqrt()


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N, L] bool masks -> [N] IoU; nan where neither masks anything (attmask's unmasked images)."""
    union = (a | b).sum(1).double()
    return torch.where(union > 0, (a & b).sum(1).double() / union.clamp(min=1), torch.nan)


def amortized(cached: float, refresh: float, k: float) -> float:
    """Mask images/s when each image costs one cached step plus 1/k of a refresh."""
    return 1 / (1 / cached + 1 / (k * refresh))


def _mean(xs) -> float | None:
    xs = np.asarray(xs, np.float64)
    xs = xs[~np.isnan(xs)]
    return float(xs.mean()) if len(xs) else None


# ---- teachers ----
def seeded_model(model: str, **kw):
    """A model built under torch.manual_seed(0) without touching the caller's global generator."""
    from mimpipe.train.model import create_model
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return create_model(model, **kw)


def teacher(model: str, strategy: str, state: dict | None = None):
    """A momentum teacher holding `state`; None: its own init under seed 0 (timing only)."""
    from mimpipe.maskserver.teacher import Teacher
    with torch.random.fork_rng():
        torch.manual_seed(0)
        t = Teacher(model, "momentum", strategy=strategy, projector_hidden=None)
    state = t.encoder.state_dict() if state is None else state
    t.load_state({k: state[k] for k in t.held}, 0, 0)
    return t


def teacher_states(args) -> dict:
    from mimpipe.train.model import read_checkpoint
    out = {}
    if args.checkpoint.exists():
        out["trained"] = read_checkpoint(str(args.checkpoint), "ema")
    else:   # stderr: --json promises one object on stdout
        print(f"{args.checkpoint}: not found; measuring the fresh teacher only", file=sys.stderr)
    out["fresh"] = seeded_model(args.model, encoder_only=True).state_dict()
    return out


# ---- fidelity ----
def _add(a: dict, rho, exact, cached, valid, area, fg) -> None:
    """One batch's exact and cached masks into an accumulator (valid rows; fg: foreground())."""
    a["rho"] += rho[valid].tolist()
    a["iou"] += iou(exact, cached)[valid].tolist()
    a["area"] += area[valid.numpy()].tolist()
    if fg is not None:
        f, rows = torch.from_numpy(fg[0]), fg[1]
        a["hit_exact"] += int((exact[rows] & f).sum())
        a["hit_cached"] += int((cached[rows] & f).sum())
        a["fg"] += int(f.sum())


def _summary(a: dict) -> dict:
    area, rho, ious = np.asarray(a["area"]), np.asarray(a["rho"]), np.asarray(a["iou"])
    sel = {key: (area >= lo) & (area < hi) for lo, hi, key in AREA_BINS}
    bins = {key: {"images": int(x.sum()), "spearman": _mean(rho[x]), "iou": _mean(ious[x])} for key, x in sel.items()}
    return {"images": len(area), "masked_images": int((~np.isnan(ious)).sum()), "spearman": _mean(rho),
            "iou": _mean(ious), "recall_exact": a["hit_exact"] / a["fg"] if a["fg"] else None,
            "recall_cached": a["hit_cached"] / a["fg"] if a["fg"] else None, "by_area": bins}


def fidelity(args, m, cfg, states: dict) -> dict:
    from mimpipe.maskserver.score_cache import CachedMasks
    from mimpipe.pipeline.loader import Loader
    from mimpipe.pipeline.plan import PlanConfig, batch_generator
    from mimpipe.train.mask_quality import foreground
    loader = Loader(m, PlanConfig(seed=0, batch_size=64, img_size=cfg.img_size), 0, decoder="dali", threads=1)
    paths = {}
    for name, sd in states.items():
        for s in STRATEGIES:
            t = teacher(args.model, s, sd)
            paths[name, s] = t, CachedMasks(t, s, table=m.table, every=1)   # every=1: each epoch fresh
    acc = {(name, label): {"rho": [], "iou": [], "area": [], "hit_exact": 0, "hit_cached": 0, "fg": 0}
           for name in states for label, _, _ in CASES}
    W, H = m.table["width"].astype(np.float64), m.table["height"].astype(np.float64)
    try:
        for e in range(args.epochs):
            it = loader.epoch(e)
            try:
                for batch in itertools.islice(it, args.steps):
                    ids = batch.sample_ids.numpy()
                    view = loader.plan.views(e, ids)[0]
                    area = view.crop[:, 2] * view.crop[:, 3] / (W[ids] * H[ids])
                    fg = foreground(loader.reader, loader.plan, batch, cfg.img_size, cfg.patch_size, rows=len(ids))
                    for (name, s), (t, cm) in paths.items():
                        exact = t.scores(batch.images, s)
                        cached = cm.scores(ids, view.crop, view.flip, e, loader.whole_images)[0]
                        rho = spearman(exact, cached).nanmean(1)   # per image, over its channels
                        for label, _, p in (c for c in CASES if c[1] == s):
                            kw = dict(ratio=RATIO, progress=p)   # and a fresh generator of the same seed each
                            me = t.compute(batch.images, s, generator=batch_generator(0, e, batch.step, 0), **kw)
                            mc = cm.masks(ids, view.crop, view.flip, e, generator=batch_generator(0, e, batch.step, 0),
                                          head_probs=None, whole_images=loader.whole_images, **kw)[0]
                            _add(acc[name, label], rho, me.mask, mc.mask, batch.valid, area, fg)
            finally:
                it.close()   # its producer thread stops inside DALI before the next epoch's starts
    finally:
        loader.close()
    out = {}
    for (name, label), a in acc.items():
        out.setdefault(name, {})[label] = _summary(a)
    return out


# ---- cost ----
def fastest(fn, reps: int) -> float:
    """Seconds of the fastest of `reps` calls (a neighbour on the shared cores only ever adds time);
    the caller warms up first."""
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def student_img_s(model: str, batch: int, reps: int) -> float:
    """A MAE training step (random masks at RATIO, forward + backward + AdamW)."""
    from mimpipe.train.model import model_config
    S = model_config(model).img_size
    net = seeded_model(model)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    x = torch.randn(batch, 3, S, S, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)

    def step():
        loss, _, _ = net(x, mask_ratio=RATIO, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    step()   # warm-up: AdamW allocates its state
    return batch / fastest(step, reps)


def cost(model: str, batch: int, reps: int, table, ids, view, whole_images) -> dict:
    """img/s of the three paths per strategy, amortized settings, and the student they feed."""
    from mimpipe.maskserver.score_cache import CachedMasks
    from mimpipe.pipeline.plan import batch_generator
    from mimpipe.train.model import model_config
    S = model_config(model).img_size
    images = torch.randn(batch, 3, S, S, generator=torch.Generator().manual_seed(0))
    student = student_img_s(model, batch, reps)
    out = {"model": model, "batch": batch, "student_img_s": student, "strategies": {}}
    t = teacher(model, STRATEGIES[0])   # momentum: the whole encoder, whatever the strategy
    whole_images(ids[:2])   # warm-up: the whole-image decoder is built at first use
    for s in STRATEGIES:
        cm = CachedMasks(t, s, table=table, every=1)

        def exact(x=images):
            t.compute(x, s, ratio=RATIO, generator=batch_generator(0, 0, 0, 0), progress=TIMING_PROGRESS)

        def refresh():   # what CachedMasks.scores does for the entries due
            cm.cache.put(ids, t.scores(whole_images(ids), s, block=cm.block, options=cm.options), 0, t.version, 0)

        def cached():   # after a refresh in epoch 0 every entry is fresh in epoch 0
            cm.masks(ids, view.crop, view.flip, 0, ratio=RATIO, generator=batch_generator(0, 0, 0, 0),
                     progress=TIMING_PROGRESS, head_probs=None, whole_images=whole_images)
        exact(images[:2])   # warm-up, as bench_teacher: first-call allocations
        a, c = batch / fastest(exact, reps), batch / fastest(refresh, reps)
        forwards = cm.cache.counts["forwards"]
        cached()
        b = batch / fastest(cached, reps)
        assert cm.cache.counts["forwards"] == forwards, "steady state ran the teacher"
        settings = {"exact": (a, 1.0), "cached": (b, 0.0), "refresh": (c, None),
                    **{f"k={k}": (amortized(b, c, k), 1 / k) for k in KS},
                    **{f"E={E}": (amortized(b, c, E), 1 / E) for E in FROZEN_EPOCHS}}
        out["strategies"][s] = {
            "bytes_per_image": cm.cache.bytes_per_image,
            **{k: {"img_s": v, "forwards_per_image": f, "feeds": v / student, "vs_exact": v / a}
               for k, (v, f) in settings.items()}}
    return out


def storage(models) -> dict:
    """Bytes per image as ScoreCache allocates them, and for ImageNet-1k."""
    from mimpipe.maskserver.score_cache import bytes_per_image, score_channels
    from mimpipe.train.model import model_config
    out = {}
    for model in dict.fromkeys(models):
        cfg = model_config(model)
        G = cfg.img_size // cfg.patch_size
        out[model] = {s: {"bytes_per_image": (b := bytes_per_image(score_channels(s, cfg), G)),
                          "imagenet_bytes": b * IMAGENET} for s in STRATEGIES}
    return out


def run(args) -> dict:
    from mimpipe.pipeline.loader import Loader
    from mimpipe.pipeline.manifest import load_manifest
    from mimpipe.pipeline.plan import PlanConfig, ViewConfig, view_params
    from mimpipe.tools import sample
    from mimpipe.tools.profile import on_core
    from mimpipe.train.model import model_config
    sample.ensure(args.shards)
    m, cfg = load_manifest(args.shards), model_config(args.model)
    states = teacher_states(args)
    res = {"setup": {"model": args.model, "shards": str(args.shards), "epochs": args.epochs, "steps": args.steps,
                     "batch": 64, "ratio": RATIO, "teachers": list(states), "checkpoint": str(args.checkpoint)}}
    res["fidelity"] = fidelity(args, m, cfg, states)
    res["cost"] = {}
    with on_core(0):
        # a loader of its own, made on the core: its decoder threads are pinned with the rest
        loader = Loader(m, PlanConfig(seed=0, batch_size=64, img_size=cfg.img_size), 0, decoder="dali", threads=1)
        try:
            ids = loader.plan.batch(0, 0).sample_ids
            res["cost"]["tiny"] = cost(args.model, 64, args.batches, m.table, ids, loader.plan.views(0, ids)[0],
                                       loader.whole_images)
        finally:
            loader.close()
        if args.vit_b_batches:
            model, batch = VIT_B
            S = model_config(model).img_size
            table = np.zeros(batch, [("width", "<u4"), ("height", "<u4")])
            table["width"] = table["height"] = S
            ids = np.arange(batch)
            view = view_params(ViewConfig(), S, 0, 0, 0, ids, table["width"], table["height"])
            g = torch.Generator().manual_seed(3)
            res["cost"]["vit_b"] = cost(model, batch, args.vit_b_batches, table, ids, view,
                                        lambda i: torch.randn(len(i), 3, S, S, generator=g))
    if args.served_epochs:
        res["served"] = served(args, m, cfg)
    res["storage"] = storage((args.model, VIT_B[0]))
    return json.loads(json.dumps(res, allow_nan=False))


def served(args, m, cfg) -> dict:
    """A mask server process (core 1, one thread) with a frozen gpa teacher, exact and with
    --score-cache 1, feeding a MaskClient in this process that asks for every batch in turn: the
    whole server path, crop decoding (exact) or none (cached) included. img/s per epoch; epoch 0
    of the cached server computes every score."""
    import tempfile
    from mimpipe.maskserver.client import MaskClient
    from mimpipe.pipeline.plan import Plan, PlanConfig
    from mimpipe.tools.procs import free_port, start_server, stop
    plan = Plan(m, PlanConfig(seed=0, batch_size=64, img_size=cfg.img_size), 0)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.checkpoint   # its student ('model'), as frozen:PATH reads a mimpipe checkpoint
        if not weights.exists():
            weights = Path(tmp) / "fresh.pt"
            torch.save(seeded_model(args.model, encoder_only=True).state_dict(), weights)
        for name, extra in (("exact", []), ("cached", ["--score-cache", 1])):
            endpoint = f"tcp://127.0.0.1:{free_port()}"
            server = start_server(["--shards", args.shards, "--strategy", "gpa", "--model", args.model,
                                   "--source", f"frozen:{weights}", "--bind", endpoint, "--threads", 1,
                                   "--batch-size", 64, "--epochs", args.served_epochs, "--max-ahead", 8, *extra],
                                  Path(tmp) / f"{name}.log", core=1)
            client = MaskClient(endpoint, rank=0, world_size=1, plan_hash=plan.hash, num_patches=cfg.num_patches,
                                ratio=RATIO, seed=0, credits=8, mask_timeout=300, policy="fail", heartbeat=1.0,
                                run_id=f"bench-{name}", restart_id=name,
                                run={"strategy": "gpa", "model": args.model, "source": "frozen", "ratio": RATIO,
                                     "lut": False, "targets": [], "epochs": args.served_epochs})
            try:
                per = []
                for e in range(args.served_epochs):
                    t0 = time.perf_counter()
                    for step in range(plan.steps):
                        client.get(e, step, plan.batch(e, step).sample_ids)
                    per.append(plan.steps * 64 / (time.perf_counter() - t0))
            finally:
                client.close()
                stop(server)
            out[name] = per
    later = slice(1, None)
    out["ratio_after_first_epoch"] = (sum(out["cached"][later]) / sum(out["exact"][later])
                                      if args.served_epochs > 1 else None)
    return out


# ---- the table ----
def _f(v, spec: str = ".2f", width: int = 7) -> str:
    return f"{'-' if v is None else format(v, spec):>{width}}"


def table(r: dict) -> str:
    st = r["setup"]
    rows = [f"score cache: {st['model']} on {st['shards']}, {st['epochs']} epoch(s) x {st['steps']} batches of "
            f"{st['batch']}, rrc crops, ratio {st['ratio']}; cached = whole-image score resampled onto the crop, "
            "same noise as exact",
            f"{'teacher':<9}{'masks':<9}{'images':>7}{'masked':>7}{'spearman':>9}{'IoU':>7}{'recall':>8}{'cached':>7}"
            "  | by crop area: IoU / spearman (images)"]
    for name, cases in r["fidelity"].items():
        for label, x in cases.items():
            bins = "  ".join(f"{k} {_f(b['iou'], '.2f', 0)}/{_f(b['spearman'], '.2f', 0)} ({b['images']})"
                             for k, b in x["by_area"].items())
            rows.append(f"{name:<9}{label:<9}{x['images']:>7}{x['masked_images']:>7}{_f(x['spearman'], '.3f', 9)}"
                        f"{_f(x['iou'])}{_f(x['recall_exact'], '.3f', 8)}{_f(x['recall_cached'], '.3f')}  | {bins}")
    if "trained" not in r["fidelity"]:
        rows.append(f"(no trained teacher: {st['checkpoint']} not found)")
    rows += ["spearman: exact vs cached scores per image and channel; IoU: masks, over images either masks",
             "(attmask leaves about half unmasked); recall: masked foreground / foreground, exact then cached;",
             "gpa t=1: progress 1.0, half the masked patches are the top-k (the most score-dependent); t=0: soft + random"]
    cols = ["exact", "cached", "refresh", *(f"k={k}" for k in KS), *(f"E={E}" for E in FROZEN_EPOCHS)]
    fwd = ["1", "0", "-", *(f"1/{k}" for k in (*KS, *FROZEN_EPOCHS))]
    for c in r["cost"].values():
        gpa = c["strategies"]["gpa"]
        rows += ["", f"cost: {c['model']}, batch {c['batch']}, one core, one torch thread; student (MAE training "
                     f"step) {c['student_img_s']:.1f} img/s",
                 f"{'strategy':<9}{'':<8}" + "".join(f"{k:>9}" for k in cols),
                 f"{'':<9}{'fwd/img':<8}" + "".join(f"{f:>9}" for f in fwd)]
        for s, x in c["strategies"].items():
            rows += [f"{s:<9}{'img/s':<8}" + "".join(f"{x[k]['img_s']:>9.1f}" for k in cols),
                     f"{'':<9}{'feeds':<8}" + "".join(f"{x[k]['feeds']:>9.2f}" for k in cols),
                     f"{'':<9}{'x exact':<8}" + "".join(f"{x[k]['vs_exact']:>8.2f}x" for k in cols)]
        rows.append(f"frozen gpa over exact: E=12 {gpa['E=12']['vs_exact']:.1f}x, E=800 {gpa['E=800']['vs_exact']:.1f}x "
                    "(issue #17 target: >= 10x)")
    if r["cost"]:
        rows += ["exact: the teacher on crops already decoded (random input; the exact path also decodes each crop,",
                 "the cached one never does); refresh: decode of the whole image (tiny: real loader, ViT-B: random)",
                 "+ teacher score + store; k: momentum, each image refreshed once per k epochs; E: frozen, once in",
                 "E epochs; amortized = 1 / (1/cached + 1/(k or E x refresh)); feeds = img/s / student img/s"]
    if "served" in r:
        sv = r["served"]
        rows += ["", "served: a mask server process (one core, one thread), frozen gpa, batch 64, to a client taking "
                     "every batch in turn"]
        rows += [f"  {k:<7}" + "  ".join(f"epoch {e}: {v:,.0f} img/s" for e, v in enumerate(sv[k]))
                 for k in ("exact", "cached")]
        if sv["ratio_after_first_epoch"] is not None:
            rows.append(f"  cached / exact after the first epoch: {sv['ratio_after_first_epoch']:.1f}x (the exact "
                        f"server decodes every crop, the cached one none)")
    rows += ["", "cache size: C x G x G float16 + 20 B per image (gpa, attmask C = 1; idm C = heads)"]
    for model, per in r["storage"].items():
        rows.append(f"  {model:<24}" + "  ".join(
            f"{s} {x['bytes_per_image']} B ({x['imagenet_bytes'] / 2**30:.2f} GiB for {IMAGENET:,})"
            for s, x in per.items()))
    return "\n".join(rows)
