"""teacher + strategy throughput: mimpipe's truncated teacher vs a full forward that stores every map.

ours: `Teacher.compute`, which runs only what the strategy reads (sbam/amr: patch_embed + pos, no
block; gpa: up to block b's q, k; idm/attmask: up to the last block's q, k, then the cls row).
naive: the way AttMask/GPA-style code captures attention: the whole encoder with the manual
(non-fused) attention in every block and forward hooks storing every block's full [N, H, T, T]
softmax map (and q, k), then the same strategy on the stored tensors: idm/attmask read the last
map's cls row, gpa sums the raw T x T logits of its block over the queries (the official form),
sbam/amr take the stored input embedding with the full L x L affinity (the official SBAM code).
'random' reads no teacher in either path. Input is random: throughput does not depend on content."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from mimpipe.maskserver.strategies import STRATEGIES, Masked, MaskInputs, gpa_mask, gpa_target
from mimpipe.maskserver.teacher import DEFAULT_SOURCE, Teacher, block_for
from mimpipe.train.model import attention_logits, create_model, model_config

RATIO, PROGRESS, SEED = 0.75, 0.5, 0
CONFIGS = {"tiny": ("mae_vit_tiny_patch8_64", 64), "vit_b": ("mae_vit_base_patch16", 8)}  # model, batch
EPS = 1e-6  # as gpa_scores' min-max
READS = {"none": "nothing", "embed": "embedding", "qk": "block {b} q,k", "cls_attn": "block {b} cls row"}


def add_arguments(p) -> None:
    p.add_argument("--batches", type=int, default=10,
                   help="timed batches per strategy, tiny config at 64 px, batch 64 (default 10)")
    p.add_argument("--vit-b-batches", type=int, default=2,
                   help="timed batches per strategy, ViT-B/16 at 224 px, batch 8 (default 2; 0 skips it)")
    p.add_argument("--threads", type=int, default=1, choices=(1, 2),
                   help="torch threads for both paths (default 1: the cores are shared)")


def bench_options(name: str, depth: int, heads: int) -> dict:
    """Keyword arguments of Teacher.compute: gpa keeps its defaults (block 9, head 11) where the
    model has them, else the last block / head (the tiny model has 4 blocks and 3 heads)."""
    if name != "gpa":
        return {}
    return {"block": min(STRATEGIES["gpa"].block, depth - 1), "options": {"head": min(11, heads - 1)}}


class NaiveCapture:
    """Forward hooks on every block: the input embedding, each block's q, k and full softmax map."""

    def __init__(self, model):
        self.model, self.maps, self.qk = model, [], []
        for blk in model.blocks:
            blk.attn.fused_attn = False  # the manual path materializes attn, as the map-returning code does
            blk.attn.attn_drop.register_forward_hook(lambda m, a, out: self.maps.append(out))
            blk.attn.qkv.register_forward_hook(lambda m, a, out, blk=blk: self.qk.append(self._qk(blk, out)))
        model.blocks[0].register_forward_pre_hook(lambda m, a: setattr(self, "embed", a[0][:, 1:]))

    @staticmethod
    def _qk(blk, out):
        n, t, _ = out.shape
        qkv = out.reshape(n, t, 3, blk.attn.num_heads, blk.attn.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1]

    @torch.no_grad()
    def __call__(self, images):
        self.maps, self.qk = [], []
        self.model.norm(self.model.forward_features_until(images, len(self.model.blocks)))
        return self


@torch.no_grad()
def naive(capture: NaiveCapture, images, name: str, *, block=None, options=None):
    """The strategy on maps stored by a full forward; same masks as ours up to float rounding."""
    strategy, g = STRATEGIES[name], torch.Generator().manual_seed(SEED)
    N, L = images.shape[0], capture.model.cfg.num_patches
    if strategy.needs == "none":
        return strategy(MaskInputs(N, L), RATIO, generator=g)
    c = capture(images)
    if strategy.needs == "embed":  # chunk=None: the official [N, L, L] affinity
        return strategy(MaskInputs(N, L, embed=c.embed), RATIO, generator=g, chunk=None)
    b = block_for(strategy, len(c.maps), block)
    if strategy.needs == "cls_attn":
        return strategy(MaskInputs(N, L, cls_attn=c.maps[b][:, :, 0, 1:]), RATIO, generator=g)
    head = options["head"]  # gpa: sum the raw T x T logits over the query axis, keep patch keys
    a = attention_logits(*c.qk[b])[:, head].sum(dim=1)[:, 1:]
    a_min, a_max = a.amin(dim=1, keepdim=True), a.amax(dim=1, keepdim=True)
    score = (a - a_min) / (a_max - a_min + EPS)
    mask = gpa_mask(score, RATIO, PROGRESS, generator=g)
    return Masked(mask, (~mask).sum(dim=1), {"gpa_target": gpa_target(score)})


def paper_teacher(name: str, model: str, enc, frozen: Path, block: int | None) -> Teacher:
    """A teacher on the source `name`'s paper uses (online for random: it holds nothing), with enc's
    weights; frozen reads them from the file `frozen`."""
    source = DEFAULT_SOURCE.get(name, "online")
    if source == "frozen":
        return Teacher(model, f"frozen:{frozen}")
    teacher = Teacher(model, source, strategy=name, block=block, projector_hidden=None)
    sd = enc.state_dict()
    teacher.load_state({k: sd[k] for k in teacher.held}, version=0, step=0)
    return teacher


def measure(model: str, batch: int, batches: int, tmp: str) -> dict:
    """images/s of ours and naive for every strategy, from each path's fastest batch (as timeit
    advises: a neighbour on the shared cores only ever adds time); the paths alternate batch by batch."""
    cfg = model_config(model)
    torch.manual_seed(SEED)  # weights only; both paths get the same ones
    enc = create_model(model, encoder_only=True).eval()
    frozen = Path(tmp) / "frozen.pth"
    torch.save(enc.state_dict(), frozen)
    capture = NaiveCapture(enc)
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(SEED))
    res = {}
    for name, strategy in STRATEGIES.items():
        kw = bench_options(name, cfg.depth, cfg.num_heads)
        teacher = paper_teacher(name, model, enc, frozen, kw.get("block"))
        paths = {
            "ours": lambda x: teacher.compute(x, name, ratio=RATIO, progress=PROGRESS,
                                              generator=torch.Generator().manual_seed(SEED), **kw),
            "naive": lambda x: naive(capture, x, name, **kw),
        }
        warm = {path: fn(images[:2]) for path, fn in paths.items()}  # warm-up: first-call allocations
        best = dict.fromkeys(paths, float("inf"))
        for _ in range(batches):
            for path, fn in paths.items():
                t0 = time.perf_counter()
                fn(images)
                best[path] = min(best[path], time.perf_counter() - t0)
        b = block_for(strategy, cfg.depth, kw.get("block"))
        res[name] = {"source": "-" if strategy.needs == "none" else teacher.kind,
                     "reads": READS[strategy.needs].format(b=b),
                     **{f"{p}_img_s": round(batch / s, 1) for p, s in best.items()},
                     "ratio": round(best["naive"] / best["ours"], 2),
                     "same_mask": torch.equal(warm["ours"].mask, warm["naive"].mask)}
    return res


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    setup = {"threads": args.threads, "img_s": "batch / fastest batch time",
             "ratio": "naive time / ours time (ours images/s over naive)"}
    model, batch = CONFIGS["tiny"]
    setup["tiny"] = f"{model}, {batch} images x {args.batches} batches"
    with tempfile.TemporaryDirectory(prefix="mimpipe-bench-") as tmp:
        res = measure(model, batch, args.batches, tmp)
        if args.vit_b_batches > 0:
            model, batch = CONFIGS["vit_b"]
            setup["vit_b"] = f"{model}, {batch} images x {args.vit_b_batches} batches"
            res["vit_b"] = measure(model, batch, args.vit_b_batches, tmp)
    return {"setup": setup, **res}


def table(r: dict) -> str:
    rows = [f"teacher + strategy, CPU, torch threads {r['setup']['threads']}; naive = full forward "
            "storing every block's T x T map"]
    for key, results in (("tiny", r), ("vit_b", r.get("vit_b"))):
        if results is None:
            continue
        rows += ["", r["setup"][key], f"{'strategy':<10}{'source':<10}{'teacher reads':<18}{'ours img/s':>12}"
                 f"{'naive img/s':>13}{'speedup':>9}"]
        for name in STRATEGIES:
            x = results[name]
            rows.append(f"{name:<10}{x['source']:<10}{x['reads']:<18}{x['ours_img_s']:>12.1f}"
                        f"{x['naive_img_s']:>13.1f}{x['ratio']:>8.2f}x")
    rows.append("random reads no teacher: both paths are the same call, so its ratio is timer noise")
    return "\n".join(rows)
