"""`mimpipe viz`: what each strategy masks, as a PNG grid, and how much of the object it hides.

Per image: the crop the model sees, then per strategy the teacher's score map and the mask. Where
the shards carry a foreground (`fg` in KEY.json: the sample dataset) it also prints each
strategy's object recall: the fraction of foreground patches masked (random masking scores the
ratio itself; a strategy that finds objects scores above it). Any other data is drawn the same
way, without recall. `--gpa-shots N` picks GPA's (block, head) on N labeled images (docs/methods.md
3.3), scores the pick on the other images and prints the flags that run it. `--attention FILE...`
draws a trained model's last-block cls attention per head on the user's own images (DINO's
visualize_attention.py).
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
from mimpipe.tools.argtypes import float_range, nonneg_int, positive_int
from mimpipe.tools.sample import fg_patches
from mimpipe.train.evaluate import encoder_from_checkpoint
from mimpipe.train.model import MODELS, create_model

TITLE_PT = 11


def add_arguments(p) -> None:
    p.add_argument("shards", nargs="?", type=Path, default=Path("shards/sample"), help="dataset folder")
    p.add_argument("--model", default=None, choices=list(MODELS), metavar="NAME",
                   help="our variant; default: the --weights checkpoint's, else mae_vit_tiny_patch8_64")
    p.add_argument("--weights", help="teacher weights: a `mimpipe train` checkpoint (its model from its config), "
                   "an MAE or timm file (with --model); default: a freshly initialized encoder (seeded)")
    p.add_argument("--part", default="model", choices=["model", "ema"], help="student or EMA teacher of --weights")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma list of mask strategies")
    p.add_argument("--ratio", type=float_range(0, 1, lo_open=True, hi_open=True), default=0.75, help="mask ratio")
    p.add_argument("--n", type=positive_int, default=6, help="images in the picture")
    p.add_argument("--recall-images", type=positive_int, default=512, help="images scored for recall")
    p.add_argument("--seed", type=nonneg_int, default=0, help="crop order, mask noise and fresh-teacher seed")
    p.add_argument("--out", type=Path, default=Path("runs/viz.png"), help="the PNG")
    p.add_argument("--gpa-shots", type=nonneg_int, default=0,
                   help="pick GPA's (block, head) by recall on this many labeled images, score it on the rest")
    p.add_argument("--attention", nargs="+", type=Path, metavar="IMAGE",
                   help="instead: last-block cls attention per head on these image files")


def make_teacher(args) -> Teacher:
    """The teacher at the checkpoint's model (or --model), holding the encoder's weights."""
    if args.weights:
        enc, args.model = encoder_from_checkpoint(args.weights, args.part, args.model)
    else:
        args.model = args.model or "mae_vit_tiny_patch8_64"
        with torch.random.fork_rng():   # seeded init without touching the caller's global RNG
            torch.manual_seed(args.seed)
            enc = create_model(args.model, encoder_only=True)
    t = Teacher(args.model, "momentum", projector_hidden=None, img_size=enc.cfg.img_size)
    t.load_state(enc.state_dict(), version=0, step=0)
    return t


def score_map(teacher: Teacher, images, name: str) -> torch.Tensor | None:
    """[N, L] in [0, 1] (min-max per image): the quantity the strategy ranks patches by; None for random."""
    s = get_strategy(name)
    if s.needs == "none":
        return None
    inp = teacher.mask_inputs(images, name)
    if s.needs == "embed":
        x = sbam_salience(inp.embed)
    elif s.needs == "qk":
        x = gpa_scores(inp.q, inp.k, head=strategy_options("gpa", teacher.cfg)["head"])
    else:
        x = inp.cls_attn.mean(1)
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
    return {"block": block, "head": head, "shot_recall": round(float(recall[block, head]), 4),
            "shots": len(images)}


def run(args) -> dict:
    if args.attention:
        return attention_view(args)
    m = load_manifest(args.shards)
    names = [n.strip() for n in args.strategies.split(",") if n.strip()]
    for n in names:
        get_strategy(n)   # fail on a typo before any work
    teacher = make_teacher(args)
    cfg = teacher.cfg
    plan = PlanConfig(seed=args.seed, batch_size=64, img_size=cfg.img_size, views=(ViewConfig(crop="center"),))
    loader = Loader(m, plan, decoder="dali", device="cpu")   # the teacher here runs on the CPU
    gen = torch.Generator().manual_seed(args.seed)
    hit, total, shown, few_shot, has_fg = {}, 0, None, None, True
    try:
        for batch in loader.epoch(0):
            pb = loader.plan.batch(batch.epoch, batch.step)
            metas = [json.loads(loader.reader.read_one(int(i), meta=True).tobytes()) for i in pb.sample_ids]
            has_fg = has_fg and all("fg" in meta for meta in metas)
            fg = None if not has_fg else torch.from_numpy(np.stack([
                fg_patches(meta, pb.views[0].crop[j], bool(pb.views[0].flip[j]), cfg.img_size, cfg.patch_size)
                for j, meta in enumerate(metas)]))
            keep = batch.valid & (fg.sum(1) > 0) if has_fg else batch.valid.clone()
            if args.gpa_shots and few_shot is None and has_fg:
                shots = keep.nonzero()[:args.gpa_shots, 0]
                few_shot = few_shot_head(teacher, batch.images[shots], fg[shots], args.ratio)
                keep[shots] = False   # the pick is scored on images it did not see
            masks = {n: teacher.compute(batch.images, n, ratio=args.ratio, generator=gen).mask for n in names}
            if few_shot is not None:
                masks["gpa few-shot"] = teacher.compute(
                    batch.images, "gpa", ratio=args.ratio, generator=gen, block=few_shot["block"],
                    options={"head": few_shot["head"]}).mask
            if has_fg:
                for n, mk in masks.items():
                    rec = (mk & fg).sum(1).float() / fg.sum(1).clamp(min=1)
                    hit[n] = hit.get(n, 0.0) + float(rec[keep].sum())
            if shown is None:
                k = slice(0, args.n)
                shown = (batch.images[k].clone(), None if fg is None else fg[k],
                         {n: (score_map(teacher, batch.images[k], n), masks[n][k]) for n in names})
            total += int(keep.sum())
            if total >= args.recall_images or not has_fg:   # without a foreground only the picture is made
                break
    finally:
        loader.close()
    draw(args.out, *shown, cfg, args.ratio)
    r = {"images": total, "ratio": args.ratio, "png": str(args.out),
         "recall": {n: round(v / max(total, 1), 4) for n, v in hit.items()} if has_fg else None,
         "teacher": args.weights or f"fresh {args.model} (seed {args.seed})",
         "gpa": {"block": block_for(get_strategy("gpa"), cfg.depth), **strategy_options("gpa", cfg)}}
    if args.gpa_shots and not has_fg:
        r["gpa_few_shot"] = None   # no labels to pick by
    elif few_shot is not None:
        few_shot["held_out_recall"] = r["recall"].pop("gpa few-shot")
        few_shot["held_out_images"] = total
        r["gpa_few_shot"] = few_shot
    return r


def _panel_off(a) -> None:
    a.set_xticks([])
    a.set_yticks([])


def draw(path: Path, images, fg, per_strategy: dict, cfg, ratio: float) -> None:
    """Rows = images; columns = the crop, then per strategy its score map and its mask."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    g, p = cfg.img_size // cfg.patch_size, cfg.patch_size
    cols = 1 + 2 * len(per_strategy)
    fig, axes = plt.subplots(len(images), cols, figsize=(1.7 * cols + 1.2, 1.75 * len(images) + 1.1),
                             squeeze=False)
    im = None
    for r, img in enumerate(images):
        rgb = _rgb(img)
        axes[r, 0].imshow(rgb)
        if fg is not None:
            axes[r, 0].contour(np.kron(fg[r].view(g, g).numpy(), np.ones((p, p))), levels=[0.5], colors="yellow",
                               linewidths=1.2)
        for c, (name, (score, mask)) in enumerate(per_strategy.items()):
            a = axes[r, 1 + 2 * c]
            if score is None:
                a.text(0.5, 0.5, f"{name}:\nno score", ha="center", va="center", fontsize=10,
                       transform=a.transAxes)
            else:
                im = a.imshow(score[r].view(g, g).numpy(), cmap="magma", vmin=0, vmax=1)
            dim = 1 - 0.75 * np.kron(mask[r].view(g, g).float().numpy(), np.ones((p, p)))
            axes[r, 2 + 2 * c].imshow(rgb * dim[..., None])
            if r == 0:
                a.set_title(f"{name}\nscore", fontsize=TITLE_PT)
                axes[r, 2 + 2 * c].set_title(f"{name}\nmask", fontsize=TITLE_PT)
    axes[0, 0].set_title("crop" + (" (object\noutlined)" if fg is not None else ""), fontsize=TITLE_PT)
    for a in axes.flat:
        _panel_off(a)
    fig.tight_layout(rect=(0, 0.07, 0.93, 1))
    if im is not None:
        cax = fig.add_axes((0.945, 0.25, 0.012, 0.5))
        fig.colorbar(im, cax=cax).set_label("score (min-max per image)", fontsize=10)
    legend = (f"mask columns: dimmed patches are the masked ones (ratio {ratio:g}); score: what the strategy "
              f"ranks patches by" + ("; yellow outline: the object (foreground)" if fg is not None else ""))
    fig.text(0.01, 0.02, legend, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _rgb(img: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (img * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def load_images(paths: list[Path], size: int) -> torch.Tensor:
    """Image files -> [N, 3, S, S] normalized: shorter side to S / 0.875 (bicubic), centre crop S."""
    from PIL import Image, UnidentifiedImageError
    out = []
    for path in paths:
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"--attention {path}: not a readable image ({e})") from None
        s = round(size / 0.875)
        w, h = im.size
        im = im.resize((max(s, round(w * s / min(w, h))), max(s, round(h * s / min(w, h)))), Image.BICUBIC)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        a = torch.from_numpy(np.asarray(im.crop((left, top, left + size, top + size)), np.float32) / 255)
        mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
        out.append((a.permute(2, 0, 1) - mean) / std)
    return torch.stack(out)


def attention_view(args) -> dict:
    """Per image: the crop, then the last block's cls-token attention of each head (DINO)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    teacher = make_teacher(args)
    cfg = teacher.cfg
    x = load_images(args.attention, cfg.img_size)
    attn = teacher.mask_inputs(x, "attmask").cls_attn   # [N, H, L], softmax over 1 + L keys
    g, H = cfg.img_size // cfg.patch_size, attn.shape[1]
    fig, axes = plt.subplots(len(x), H + 1, figsize=(2.0 * (H + 1) + 1.0, 2.1 * len(x) + 0.8), squeeze=False)
    for r in range(len(x)):
        axes[r, 0].imshow(_rgb(x[r]))
        axes[r, 0].set_title(args.attention[r].name[:18], fontsize=10)
        for h in range(H):
            a = attn[r, h].view(g, g).numpy()
            im = axes[r, 1 + h].imshow(a, cmap="viridis", vmin=0, vmax=float(attn[r].max()))
            if r == 0:
                axes[r, 1 + h].set_title(f"head {h}", fontsize=TITLE_PT)
        fig.colorbar(im, ax=axes[r, 1:].tolist(), fraction=0.02, pad=0.01).ax.tick_params(labelsize=9)
    for a in axes.flat:
        _panel_off(a)
    who = "/".join(Path(args.weights).parts[-2:]) if args.weights else "fresh encoder"
    fig.suptitle(f"{args.model}: last block's cls-token attention per head ({who})", fontsize=TITLE_PT)
    fig.text(0.01, 0.01, "colour: attention weight of the cls query on each patch (one scale per image)", fontsize=10)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
    return {"attention": str(args.out), "images": len(x), "heads": H, "teacher": args.weights or "fresh"}


def table(r: dict) -> str:
    if "attention" in r:
        return f"cls attention of {r['heads']} heads on {r['images']} images: {r['attention']}"
    if r["recall"] is None:
        rows = ["no foreground (`fg`) in these shards: pictures only, no object recall"]
    else:
        rows = [f"object recall on {r['images']} images, mask ratio {r['ratio']}, teacher: {r['teacher']}",
                f"{'strategy':<10}{'recall':>8}{'recall / ratio':>16}"]
        rows += [f"{n:<10}{v:>8.3f}{v / r['ratio']:>16.2f}" for n, v in r["recall"].items()]
    f = r.get("gpa_few_shot")
    if f:
        d = r["gpa"]
        rows += [f"gpa few-shot pick ({f['shots']} shots): block {f['block']}, head {f['head']}: recall "
                 f"{f['shot_recall']:.3f} on the shots, {f['held_out_recall']:.3f} on {f['held_out_images']} "
                 f"held-out images (default block {d['block']}, head {d.get('head', 11)}, -1 = all heads: "
                 f"{r['recall'].get('gpa', float('nan')):.3f})",
                 f"  serve it: mimpipe maskserver --strategy gpa --block {f['block']} --option head={f['head']} ...",
                 "  (mimpipe train --masks inloop:gpa has no block/head flags yet: use a server)"]
    elif "gpa_few_shot" in r:
        rows.append("gpa few-shot pick skipped: it needs foreground labels (`fg`)")
    if r["recall"] and "attmask" in r["recall"]:
        rows.append("(attmask leaves an image unmasked with probability 1 - masking_prob = 0.5, AttMask's default)")
    return "\n".join(rows + [f"picture: {r['png']}"])


def main(args) -> int:
    print(table(run(args)))
    return 0
