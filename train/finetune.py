"""`mimpipe finetune`: MAE's end-to-end fine-tuning recipe (main_finetune.py, FINETUNE.md) on our
plan and loader, with timm's parts.

- Model: timm's VisionTransformer of the encoder's dims (tools/export.py timm_spec) with
  global_pool='avg' + fc_norm, as MAE's models_vit (norm dropped, mean of the patch tokens, then
  fc_norm and head), drop_path; the encoder's tensors load under timm's names (the same ones),
  head trunc_normal(std 2e-5) as MAE. `--init none`: timm's own random init (seeded).
- Optimizer: AdamW (0.9, 0.999) over MAE's layer-wise lr decay groups (util/lr_decay.py:
  embeddings layer 0, block i layer i + 1, fc_norm/head layer depth + 1, scale
  layer_decay^(depth + 1 - layer); no weight decay for 1-D tensors, pos_embed, cls_token), lr =
  blr x effective batch / 256 on warm-up + cosine (train/optim.py lr_at) set every iteration.
- Data: the plan's RandomResizedCrop(0.08-1, bicubic) + flip for train (remainder drop, as MAE's
  drop_last), the centre crop for val; then per batch, on the loader's tensors: RandAugment,
  RandomErasing, Mixup/CutMix with label smoothing (timm.data.Mixup, SoftTargetCrossEntropy).
- Validation: top-1/top-5 on `--val-shards`, or the held-out fifth of `--shards` (every
  `--holdout`-th sample id, as `mimpipe eval`) when not given, through evaluate.extract, on rank 0.
- DDP as the trainer (setup_distributed), checkpoints (train/checkpoint.py) at epoch ends and every
  --ckpt-every iterations; `--resume` continues exactly (every random draw is a function of the batch).

What differs from MAE: RandAugment is torchvision's v2 RandAugment on the uint8 crop (MAE: timm's
rand-m9-mstd0.5-inc1 on the PIL crop before ToTensor): 2 ops at magnitude 9 of 10 (bins 11,
timm's scale), but without the magnitude noise (mstd0.5) and with torchvision's op list; random
erasing is torchvision's (value='random' = timm's mode 'pixel', one box, same area/aspect
ranges). torchvision, timm's Mixup (numpy) and DropPath draw from the global RNGs, so each step
runs under `seeded(batch_seed(seed, epoch, step, rank))`, which forks torch's RNG and saves and
restores numpy's and Python's: the draws depend on the batch alone, not on what ran before.
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mimpipe.pipeline.decode import IMAGENET_MEAN, IMAGENET_STD
from mimpipe.pipeline.loader import Loader
from mimpipe.pipeline.manifest import load_manifest
from mimpipe.pipeline.plan import PlanConfig, ViewConfig, batch_seed, crop_scale
from mimpipe.tools.argtypes import (float_range, int_range, nonneg_float, nonneg_int, positive_float, positive_int,
                                    unit_float)
from mimpipe.tools.config import write_config
from mimpipe.tools.export import timm_spec, timm_state_dict
from mimpipe.train.checkpoint import load_checkpoint, save_checkpoint
from mimpipe.train.device import DEVICES, choose_device
from mimpipe.train.evaluate import encoder_from_checkpoint, extract, split
from mimpipe.train.model import MODELS
from mimpipe.train.optim import Schedule, lr_at
from mimpipe.train.trainer import setup_distributed

log = logging.getLogger("mimpipe.finetune")
CKPT_VERSION = 1
RUN_CONFIG = "config.yaml"   # OUT/config.yaml, read back by `--resume` (tools/cli.py)


@dataclass(frozen=True)
class FinetuneConfig:
    shards: str
    val_shards: str | None = None    # default: every holdout-th sample of shards
    out: str = "runs/finetune"
    init: str = "none"               # a `mimpipe train` (or MAE / timm) checkpoint, or none
    part: str = "model"
    model: str | None = None         # default: the checkpoint's
    epochs: int = 100
    max_steps: int | None = None
    batch_size: int = 32             # per rank
    blr: float = 5e-4
    lr: float | None = None
    min_lr: float = 1e-6
    warmup_epochs: float = 5.0
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    drop_path: float = 0.1
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    randaug_ops: int = 2
    randaug_magnitude: int = 9
    reprob: float = 0.25
    crop_scale: str = "0.08,1.0"
    holdout: int = 5
    seed: int = 0
    device: str = "auto"
    decoder: str = "dali"
    threads: int = 2
    ckpt_every: int = 0
    eval_every: int = 1              # epochs between validations (0: only after the last)


def layer_decay_groups(model, weight_decay: float, layer_decay: float) -> list[dict]:
    """MAE's param_groups_lrd: {params, weight_decay, lr_scale} per (layer, decay) pair."""
    skip = model.no_weight_decay()
    n_layers = len(model.blocks) + 1
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = 0.0 if p.ndim == 1 or name in skip else weight_decay
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = n_layers
        g = groups.setdefault(f"{layer}_{decay}", {"params": [], "weight_decay": decay,
                                                  "lr_scale": layer_decay ** (n_layers - layer)})
        g["params"].append(p)
    return list(groups.values())


def build_model(cfg: FinetuneConfig, num_classes: int):
    """-> (timm ViT classifier, our model name); the encoder's weights loaded unless --init none."""
    import timm
    enc, name = (None, cfg.model) if cfg.init == "none" else encoder_from_checkpoint(cfg.init, cfg.part, cfg.model)
    if name is None:
        raise ValueError("--init none: pass --model (there is no checkpoint to take it from)")
    timm_name, kwargs = timm_spec(name, None if enc is None else enc.cfg.img_size)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, global_pool="avg",
                                  drop_path_rate=cfg.drop_path, **kwargs)
        if enc is not None:
            sd = {k: v for k, v in timm_state_dict(enc.state_dict()).items() if not k.startswith("norm.")}
            r = model.load_state_dict(sd, strict=False)   # MAE: norm is replaced by fc_norm
            if r.unexpected_keys or set(r.missing_keys) - {"head.weight", "head.bias", "fc_norm.weight",
                                                           "fc_norm.bias"}:
                raise ValueError(f"--init {cfg.init}: does not fit timm {timm_name}: missing {r.missing_keys}, "
                                 f"unexpected {r.unexpected_keys}")
            torch.nn.init.trunc_normal_(model.head.weight, std=2e-5)   # MAE main_finetune
    return model, name


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Global torch (forked), numpy and Python RNGs seeded for the block, restored after."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        np.random.seed(seed % 2 ** 32)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def augment(images: torch.Tensor, cfg: FinetuneConfig) -> torch.Tensor:
    """Normalized crops [B, 3, S, S] -> RandAugment (uint8, per image) -> RandomErasing (per image)."""
    from torchvision.transforms import v2
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    if cfg.randaug_ops:
        ra = v2.RandAugment(num_ops=cfg.randaug_ops, magnitude=cfg.randaug_magnitude, num_magnitude_bins=11,
                            interpolation=v2.InterpolationMode.BILINEAR)
        u8 = ((images * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
        u8 = torch.stack([ra(im) for im in u8])   # a batched call would apply one op draw to all
        images = (u8.float() / 255 - mean) / std
    if cfg.reprob:
        er = v2.RandomErasing(p=cfg.reprob, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), value="random")
        images = torch.stack([er(im) for im in images])
    return images


class Classifier:
    """Everything a checkpoint restores, built the same way for a fresh and a resumed run."""

    def __init__(self, cfg: FinetuneConfig, rank: int, world: int):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if choose_device(cfg.device) == "cuda" else torch.device("cpu")
        m = load_manifest(cfg.shards)
        if cfg.val_shards:
            self.train_m, self.val_m = m, load_manifest(cfg.val_shards)
        else:   # the held-out fifth, as `mimpipe eval`
            tr, te = split(len(m), cfg.holdout)
            self.train_m, self.val_m = _subset(m, tr.numpy()), _subset(m, te.numpy())
        self.train_m = _subset(self.train_m, self.train_m.table["label"] >= 0)
        self.val_m = _subset(self.val_m, self.val_m.table["label"] >= 0)
        for what, mm in (("--shards", self.train_m), ("validation", self.val_m)):
            if len(mm) == 0:
                raise ValueError(f"{what} {mm.root}: no labeled samples")
        self.num_classes = max(len(m.classes), int(self.train_m.table["label"].max()) + 1)
        self.model, self.name = build_model(cfg, self.num_classes)
        self.img_size = self.model.patch_embed.img_size[0]
        self.model.to(self.device)
        lo, hi = (float(x) for x in cfg.crop_scale.split(","))
        self.plan_cfg = PlanConfig(seed=cfg.seed, batch_size=cfg.batch_size, world_size=world,
                                   img_size=self.img_size, remainder="drop",
                                   views=(ViewConfig(crop="rrc", scale=(lo, hi)),))
        self.loader = Loader(self.train_m, self.plan_cfg, rank, decoder=cfg.decoder, threads=cfg.threads,
                             device="gpu" if self.device.type == "cuda" else "cpu", device_id=self.device.index)
        self.ddp = self.model if world == 1 else torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.opt = torch.optim.AdamW(layer_decay_groups(self.model, cfg.weight_decay, cfg.layer_decay), lr=0.0,
                                     fused=self.device.type == "cuda")
        eff = cfg.batch_size * world
        self.sched = Schedule(lr=cfg.lr if cfg.lr is not None else cfg.blr * eff / 256, epochs=cfg.epochs,
                              warmup_epochs=cfg.warmup_epochs, min_lr=cfg.min_lr)
        self.it = 0
        self.loss_sum = torch.zeros((), dtype=torch.float64)   # this epoch's losses so far (a resume keeps them)
        self.loss_n = 0
        if rank == 0:
            log.info("%s -> %d classes, %d train / %d val images, effective batch %d, peak lr %.3g, "
                     "%d steps/epoch",
                     self.name, self.num_classes, len(self.train_m), len(self.val_m), eff, self.sched.lr,
                     self.loader.steps)

    @property
    def ckpt_path(self) -> Path:
        return Path(self.cfg.out) / "checkpoint.pt"

    def save(self) -> None:
        if self.rank == 0:
            save_checkpoint({"version": CKPT_VERSION, "config": asdict(self.cfg), "it": self.it,
                             "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                             "plan_hash": self.loader.plan.hash, "loss_sum": self.loss_sum.cpu(),
                             "loss_n": self.loss_n}, self.ckpt_path)

    def load(self) -> None:
        state = load_checkpoint(self.ckpt_path)
        if state.get("version") != CKPT_VERSION or state.get("plan_hash") != self.loader.plan.hash:
            raise ValueError(f"{self.ckpt_path}: not this fine-tuning run's checkpoint (format "
                             f"{state.get('version')}, plan {state.get('plan_hash')}; this run: format "
                             f"{CKPT_VERSION}, plan {self.loader.plan.hash})")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.it = int(state["it"])
        self.loss_sum, self.loss_n = state["loss_sum"].to(self.device), int(state["loss_n"])

    def mixup(self):
        """timm's Mixup/CutMix with label smoothing (None when both are off) and MAE's criterion."""
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        c = self.cfg
        if c.mixup > 0 or c.cutmix > 0:
            return Mixup(mixup_alpha=c.mixup, cutmix_alpha=c.cutmix, prob=c.mixup_prob,
                         switch_prob=c.mixup_switch_prob, label_smoothing=c.smoothing,
                         num_classes=self.num_classes), SoftTargetCrossEntropy()
        return None, (LabelSmoothingCrossEntropy(c.smoothing) if c.smoothing else torch.nn.CrossEntropyLoss())

    @torch.no_grad()
    def validate(self) -> dict:
        """Top-1 / top-5 of the model on the validation images' centre crops."""
        self.model.eval()
        logits = extract(self.model, self.val_m, self.img_size, self.num_classes, batch_size=self.cfg.batch_size,
                         decoder=self.cfg.decoder, threads=self.cfg.threads, device=self.device, dtype=np.float32)
        self.model.train()
        y = torch.from_numpy(self.val_m.table["label"].astype(np.int64))
        top5 = torch.from_numpy(logits).topk(min(5, self.num_classes), dim=1).indices
        return {"top1": float((top5[:, 0] == y).float().mean()),
                "top5": float((top5 == y[:, None]).any(1).float().mean())}


def finetune(cfg: FinetuneConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """-> {it, history: [{epoch, loss, lr, top1?, top5?}], top1, top5} (the last validation)."""
    if cfg.batch_size % 2 and (cfg.mixup or cfg.cutmix):
        raise ValueError(f"--batch-size {cfg.batch_size}: Mixup/CutMix pairs images, it must be even")
    out = Path(cfg.out)
    if not (resume or overwrite) and out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out {out} holds an earlier run: pass --resume to continue it or --overwrite")
    rank, world = setup_distributed(cfg.device)
    out.mkdir(parents=True, exist_ok=True)
    run = Classifier(cfg, rank, world)
    steps = run.loader.steps
    if resume and run.ckpt_path.is_file():
        run.load()
        log.info("resumed from %s at iteration %d (epoch %d, step %d)", run.ckpt_path, run.it,
                 *divmod(run.it, steps))
    if rank == 0:
        write_config(out / RUN_CONFIG, asdict(cfg))
    history = _history(out / "log.jsonl", run.it // steps)
    mixup, criterion = run.mixup()
    total = cfg.epochs * steps if cfg.max_steps is None else min(cfg.epochs * steps, cfg.max_steps)
    run.loss_sum = run.loss_sum.to(run.device)
    run.model.train()
    while run.it < total:
        epoch, start = divmod(run.it, steps)
        batches = run.loader.epoch(epoch, start)
        for batch in batches:
            for g in run.opt.param_groups:
                g["lr"] = lr_at(run.it / steps, run.sched) * g["lr_scale"]
            with seeded(batch_seed(cfg.seed, epoch, batch.step, rank), run.device):
                x, y = augment(batch.images.to(run.device), cfg), batch.labels.to(run.device)
                if mixup is not None:
                    x, y = mixup(x, y)
                with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.device.type == "cuda"):
                    loss = criterion(run.ddp(x), y)
                run.opt.zero_grad(set_to_none=True)
                loss.backward()
                run.opt.step()
            run.loss_sum += loss.detach()
            run.loss_n += 1
            run.it += 1
            if (cfg.ckpt_every and run.it % cfg.ckpt_every == 0) or run.it >= total:
                break
        batches.close()
        if run.it % steps == 0 or run.it >= total:
            done = (run.it - 1) // steps + 1
            # sync point, once per epoch: the epoch's mean loss (of this rank's batches)
            row = {"epoch": done - 1, "loss": float(run.loss_sum) / max(run.loss_n, 1),
                   "lr": run.opt.param_groups[-1]["lr"] / run.opt.param_groups[-1]["lr_scale"]}
            if run.it % steps == 0:   # a --max-steps stop mid-epoch keeps the sums: a resume adds to them
                run.loss_sum.zero_()
                run.loss_n = 0
            if not np.isfinite(row["loss"]):
                raise RuntimeError(f"rank {rank}: epoch {row['epoch']}: non-finite loss {row['loss']}")
            if (cfg.eval_every and done % cfg.eval_every == 0) or run.it >= total:
                if rank == 0:
                    row.update(run.validate())
                if world > 1:
                    dist.barrier()   # the others wait for rank 0's validation
            history.append(row)
            if rank == 0:
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                log.info("epoch %d: %s", row["epoch"],
                         ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"))
        run.save()
    run.loader.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    last = next((r for r in reversed(history) if "top1" in r), {})
    return {"it": run.it, "history": history, "top1": last.get("top1"), "top5": last.get("top5")}


def _subset(m, rows: np.ndarray):
    """The manifest with only `rows` (bool mask or ids): its sample ids renumbered 0..n-1."""
    return replace(m, table=m.table[rows])


def _history(path: Path, epochs_done: int) -> list[dict]:
    """Rows of finished epochs; rows a killed run wrote past its checkpoint are dropped (they run again)."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    rows = [r for r in rows if r["epoch"] < epochs_done]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def add_arguments(p) -> None:
    d = FinetuneConfig(shards="")
    g = p.add_argument_group("data and run")
    g.add_argument("--shards", required=True, help="labeled training shards (`mimpipe shard`)")
    g.add_argument("--val-shards", default=None,
                   help="validation shards; default: every --holdout-th sample of --shards")
    g.add_argument("--holdout", type=int_range(2), default=d.holdout,
                   help="without --val-shards: every n-th sample id validates")
    g.add_argument("--out", default=d.out, help="run folder: checkpoint.pt, log.jsonl, config.yaml")
    g.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt with OUT/config.yaml's flags (fresh if there is none)")
    g.add_argument("--overwrite", action="store_true", help="start again in an OUT that holds an earlier run")
    g.add_argument("--init", default=d.init, metavar="CKPT|none", help="pre-trained encoder (`mimpipe train` "
                   "checkpoint, MAE or timm file with --model), or none: random init")
    g.add_argument("--part", default=d.part, choices=["model", "ema"], help="student or EMA teacher of --init")
    g.add_argument("--model", default=None, choices=list(MODELS), metavar="NAME",
                   help="our variant; default: the --init checkpoint's")
    g.add_argument("--epochs", type=positive_int, default=d.epochs, help="MAE ViT-B: 100")
    g.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many iterations "
                   "(the schedule still follows --epochs)")
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="per rank (even: Mixup pairs)")
    g.add_argument("--device", default=d.device, choices=DEVICES, help="auto: this rank's GPU where CUDA works")
    g.add_argument("--decoder", default=d.decoder, choices=["dali", "pil"], help="image decoder")
    g.add_argument("--threads", type=positive_int, default=d.threads, help="decoder threads per rank")
    g.add_argument("--ckpt-every", type=nonneg_int, default=d.ckpt_every, help="iterations; 0 = epoch ends only")
    g.add_argument("--eval-every", type=nonneg_int, default=d.eval_every, help="epochs between validations; "
                   "0 = after the last only")
    g.add_argument("--seed", type=nonneg_int, default=d.seed, help="plan, augmentation and init seed")
    g = p.add_argument_group("optimization (MAE FINETUNE.md)")
    g.add_argument("--blr", type=positive_float, default=d.blr, help="lr = blr x effective batch / 256")
    g.add_argument("--lr", type=positive_float, default=None, help="absolute peak lr (overrides --blr)")
    g.add_argument("--min-lr", type=nonneg_float, default=d.min_lr, help="cosine floor")
    g.add_argument("--warmup-epochs", type=nonneg_float, default=d.warmup_epochs, help="linear warm-up")
    g.add_argument("--layer-decay", type=float_range(0, 1, lo_open=True), default=d.layer_decay,
                   help="lr scale per layer from the top (ViT-B 0.65, ViT-L 0.75)")
    g.add_argument("--weight-decay", type=nonneg_float, default=d.weight_decay, help="AdamW weight decay")
    g.add_argument("--drop-path", type=unit_float, default=d.drop_path, help="stochastic depth rate")
    g = p.add_argument_group("augmentation")
    g.add_argument("--crop-scale", type=crop_scale, default=d.crop_scale, help="RandomResizedCrop scale LO,HI")
    g.add_argument("--randaug-ops", type=nonneg_int, default=d.randaug_ops,
                   help="RandAugment ops per image; 0 = off")
    g.add_argument("--randaug-magnitude", type=int_range(0, 10), default=d.randaug_magnitude,
                   help="RandAugment magnitude of 10 (MAE: m9)")
    g.add_argument("--reprob", type=unit_float, default=d.reprob, help="random erasing probability")
    g.add_argument("--mixup", type=nonneg_float, default=d.mixup, help="Mixup alpha; 0 = off")
    g.add_argument("--cutmix", type=nonneg_float, default=d.cutmix, help="CutMix alpha; 0 = off")
    g.add_argument("--mixup-prob", type=unit_float, default=d.mixup_prob,
                   help="probability of Mixup or CutMix per batch")
    g.add_argument("--mixup-switch-prob", type=unit_float, default=d.mixup_switch_prob,
                   help="probability of CutMix instead of Mixup when both are on")
    g.add_argument("--smoothing", type=unit_float, default=d.smoothing, help="label smoothing")


def main(args) -> int:
    cfg = FinetuneConfig(**{k: v for k, v in vars(args).items() if k in FinetuneConfig.__dataclass_fields__})
    r = finetune(cfg, resume=args.resume, overwrite=args.overwrite)
    if r["top1"] is None:   # ranks > 0: rank 0 validates and reports
        return 0
    print(f"fine-tuned {r['it']} iterations: top-1 {r['top1']:.3f}, top-5 {r['top5']:.3f} "
          f"(log {cfg.out}/log.jsonl)")
    return 0
