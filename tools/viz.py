"""`mimpipe viz`: what each strategy masks, as a PNG grid, and how much of the object it hides.

Per image: the crop the model sees, then per strategy the teacher's score map and the mask. On
the sample dataset (known foreground) it also prints each strategy's object recall: the fraction
of foreground patches masked. Random masking scores the ratio itself; a score-based strategy that
finds objects scores above it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mimpipe.maskserver.strategies import (STRATEGIES, get_strategy, gpa_scores, head_recall, len_keep_for,
                                   sbam_salience, select_head)
from mimpipe.maskserver.strategies.gpa import gpa_per_head
from mimpipe.maskserver.teacher import Teacher, block_for, strategy_options
from mimpipe.pipeline.decode import IMAGENET_MEAN, IMAGENET_STD
from mimpipe.pipeline.loader import Loader
from mimpipe.pipeline.manifest import load_manifest
from mimpipe.pipeline.plan import PlanConfig, ViewConfig
from mimpipe.tools.sample import fg_patches
from mimpipe.train.model import create_model, model_config


def add_arguments(p) -> None:
    p.add_argument("shards", nargs="?", type=Path, default=Path("shards/sample"))
    p.add_argument("--model", default="mae_vit_tiny_patch8_64")
    p.add_argument("--weights", help="teacher checkpoint (MAE {'model': sd} or timm state dict); "
                                     "default: a freshly initialized encoder (seeded)")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--ratio", type=float, default=0.75)
    p.add_argument("--n", type=int, default=6, help="images in the picture")
    p.add_argument("--recall-images", type=int, default=512, help="images scored for recall")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/viz.png"))
    p.add_argument("--gpa-shots", type=int, default=0,
                   help="also pick GPA's (block, head) by few-shot recall on this many labeled images "
                        "(docs/methods.md 3.3; the sample dataset's foreground masks are the labels)")


def score_map(teacher: Teacher, images, name: str) -> torch.Tensor:
    """[N, L] in [0, 1]: the quantity the strategy ranks patches by (zeros for random)."""
    s = get_strategy(name)
    inp = teacher.mask_inputs(images, name)
    if s.needs == "embed":
        x = sbam_salience(inp.embed)
    elif s.needs == "qk":
        x = gpa_scores(inp.q, inp.k, head=strategy_options("gpa", teacher.cfg)["head"])
    elif s.needs == "cls_attn":
        x = inp.cls_attn.mean(1)
    else:
        return torch.zeros(inp.N, inp.L)
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    return ((x - lo) / (hi - lo + 1e-12)).float().cpu()


def few_shot_head(teacher: Teacher, images, fg, ratio: float) -> dict:
    """GPA's few-shot head selection: every block's per-head GPA on labeled images, the (block,
    head) whose top n_mask patches recall the most foreground."""
    per_block = []
    for b in range(teacher.cfg.depth):
        inp = teacher.mask_inputs(images, "gpa", block=b)
        per_block.append(gpa_per_head(inp.q, inp.k))          # [n', H, L]
    scores = torch.stack(per_block, 1)                         # [n', blocks, H, L]
    n_mask = teacher.cfg.num_patches - len_keep_for(teacher.cfg.num_patches, ratio)
    recall = head_recall(scores, fg, n_mask)
    block, head = select_head(scores, fg, n_mask)
    return {"block": block, "head": head, "recall": round(float(recall[block, head]), 4),
            "shots": len(images)}


def make_teacher(args) -> Teacher:
    if args.weights:
        return Teacher(args.model, f"frozen:{args.weights}")
    t = Teacher(args.model, "momentum", projector_hidden=None)
    with torch.random.fork_rng():   # seeded init without touching the caller's global RNG
        torch.manual_seed(args.seed)
        t.load_state(create_model(args.model, encoder_only=True).state_dict(), version=0, step=0)
    return t


def run(args) -> dict:
    cfg = model_config(args.model)
    m = load_manifest(args.shards)
    names = [n.strip() for n in args.strategies.split(",") if n.strip()]
    for n in names:
        get_strategy(n)   # fail on a typo before any work
    teacher = make_teacher(args)
    plan = PlanConfig(seed=args.seed, batch_size=64, img_size=cfg.img_size, views=(ViewConfig(crop="center"),))
    loader = Loader(m, plan, decoder="dali", device="cpu")   # the teacher here runs on the CPU
    gen = torch.Generator().manual_seed(args.seed)
    hit, total, shown, few_shot = {n: 0.0 for n in names}, 0, None, None
    try:
        for batch in loader.epoch(0):
            pb = loader.plan.batch(batch.epoch, batch.step)
            fg = torch.from_numpy(np.stack([
                fg_patches(json.loads(loader.reader.read_one(int(i), meta=True).tobytes()),
                           pb.views[0].crop[j], bool(pb.views[0].flip[j]), cfg.img_size, cfg.patch_size)
                for j, i in enumerate(pb.sample_ids)]))
            keep = batch.valid & (fg.sum(1) > 0)
            masks = {}
            for n in names:
                masks[n] = teacher.compute(batch.images, n, ratio=args.ratio, generator=gen).mask
                rec = (masks[n] & fg).sum(1).float() / fg.sum(1).clamp(min=1)
                hit[n] += float(rec[keep].sum())
            if args.gpa_shots and few_shot is None:
                k = keep.nonzero()[:args.gpa_shots, 0]
                few_shot = few_shot_head(teacher, batch.images[k], fg[k], args.ratio)
            if shown is None:
                k = slice(0, args.n)
                shown = (batch.images[k].clone(), fg[k],
                         {n: (score_map(teacher, batch.images[k], n), masks[n][k]) for n in names})
            total += int(keep.sum())
            if total >= args.recall_images:
                break
    finally:
        loader.close()
    recall = {n: round(hit[n] / max(total, 1), 4) for n in names}
    draw(args.out, *shown, cfg)
    return {"images": total, "ratio": args.ratio, "recall": recall, "png": str(args.out),
            **({"gpa_few_shot": few_shot} if args.gpa_shots else {}),
            "teacher": args.weights or f"fresh {args.model} (seed {args.seed})",
            "gpa": {"block": block_for(get_strategy("gpa"), cfg.depth), **strategy_options("gpa", cfg)}}


def draw(path: Path, images, fg, per_strategy: dict, cfg) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    g = cfg.img_size // cfg.patch_size
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    cols = 1 + 2 * len(per_strategy)
    fig, axes = plt.subplots(len(images), cols, figsize=(1.3 * cols, 1.4 * len(images)), squeeze=False)
    for r, img in enumerate(images):
        rgb = (img * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        axes[r, 0].imshow(rgb)
        axes[r, 0].contour(np.kron(fg[r].view(g, g).numpy(), np.ones((cfg.patch_size,) * 2)),
                           levels=[0.5], colors="yellow", linewidths=0.6)
        for c, (name, (score, mask)) in enumerate(per_strategy.items()):
            axes[r, 1 + 2 * c].imshow(score[r].view(g, g).numpy(), cmap="magma")
            shown = rgb * (1 - 0.75 * np.kron(mask[r].view(g, g).numpy(), np.ones((cfg.patch_size,) * 2)))[..., None]
            axes[r, 2 + 2 * c].imshow(shown)
            if r == 0:
                axes[r, 1 + 2 * c].set_title(f"{name} score", fontsize=7)
                axes[r, 2 + 2 * c].set_title(f"{name} mask", fontsize=7)
    axes[0, 0].set_title("crop (object)", fontsize=7)
    for a in axes.flat:
        a.set_axis_off()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(r: dict) -> str:
    rows = [f"object recall on {r['images']} images, mask ratio {r['ratio']}, teacher: {r['teacher']}",
            f"{'strategy':<10}{'recall':>8}{'recall / ratio':>16}"]
    rows += [f"{n:<10}{v:>8.3f}{v / r['ratio']:>16.2f}" for n, v in r["recall"].items()]
    if "gpa_few_shot" in r:
        f = r["gpa_few_shot"]
        rows.append(f"gpa few-shot head ({f['shots']} shots): block {f['block']}, head {f['head']}, "
                    f"recall {f['recall']:.3f}")
    if "attmask" in r["recall"]:
        rows.append("(attmask leaves an image unmasked with probability 1 - masking_prob = 0.5, "
                    "AttMask's default)")
    return "\n".join(rows + [f"picture: {r['png']}"])


def main(args) -> int:
    print(table(run(args)))
    return 0
