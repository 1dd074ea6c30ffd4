"""The deterministic plan: which samples, with which crops, in batch (epoch, step) of rank r.

Trainer and mask server never ship images to each other; both compute this plan and so decode
the same pixels. Everything here is a pure function of (manifest, PlanConfig, epoch, rank, step).
Randomness is a counter-based hash (SplitMix64) of (seed, epoch, stream, sample id, draw), not a
stateful generator, so a sample's crop does not depend on batch size, thread count, process,
machine or numpy version.

Remainder policy: `pad` (default) gives every rank ceil(N / (world*batch)) steps and fills the last
global batch with samples from the start of the epoch's order, marked `valid=False` so metrics and
PLB statistics count every sample exactly once; `drop` gives floor(...) steps and leaves the tail
of the epoch's (shuffled, so different every epoch) order out.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from mimpipe.tools.argtypes import nonneg_int, positive_int, unit_float

PLAN_VERSION = 1
MASK64 = (1 << 64) - 1
STREAM_ORDER, STREAM_VIEW = 1, 2   # independent hash streams


@dataclass(frozen=True)
class ViewConfig:
    """One augmented view. crop: `rrc` (RandomResizedCrop, MAE), `src` (simple random crop of
    DeiT III, what LUT uses), `center` (eval: the central 224/256 of the shorter side)."""
    crop: str = "rrc"
    scale: tuple[float, float] = (0.2, 1.0)          # MAE's RRC scale
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    color: bool = False                              # LUT's ColorAug (docs/methods.md 2.1)

    def __post_init__(self):
        if self.crop not in CROPS:
            raise ValueError(f"unknown crop {self.crop!r}; choose from {', '.join(CROPS)}")


@dataclass(frozen=True)
class PlanConfig:
    seed: int = 0
    batch_size: int = 64          # per rank
    world_size: int = 1
    img_size: int = 224
    # MAE resizes crops bicubic; torchvision's RandomResizedCrop default (bilinear) is ~1.4x
    # cheaper in DALI's CPU resize. Part of the plan: it changes the pixels both ends see.
    interpolation: str = "bicubic"
    remainder: str = "pad"        # or "drop"
    views: tuple[ViewConfig, ...] = field(default_factory=lambda: (ViewConfig(),))

    def __post_init__(self):
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation {self.interpolation!r}: choose bicubic or bilinear")
        if self.remainder not in ("pad", "drop"):
            raise ValueError(f"remainder {self.remainder!r}: choose pad or drop")
        if self.batch_size < 1 or self.world_size < 1 or not self.views:
            raise ValueError(f"bad plan config: {self}")


@dataclass(frozen=True)
class View:
    crop: np.ndarray            # [B, 4] int32: x, y, w, h in stored-image pixels
    flip: np.ndarray            # [B] bool
    color: np.ndarray | None    # [B, 7] float32 (see color_params), None if the view has no color aug


@dataclass(frozen=True)
class PlannedBatch:
    epoch: int
    step: int
    rank: int
    sample_ids: np.ndarray      # [B] int64, rows of the manifest table
    valid: np.ndarray           # [B] bool: False = padding, a repeat of a sample counted elsewhere
    views: tuple[View, ...]


# -- counter-based randomness -------------------------------------------------------------------

def _mix(x):
    """SplitMix64 finalizer, vectorized over uint64 arrays (wrap-around is the point)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _key(*parts: int) -> np.uint64:
    k = np.uint64(0x9E3779B97F4A7C15)
    for p in parts:
        k = _mix(k ^ np.uint64(p & MASK64))
    return k


def hash_u64(seed: int, epoch: int, stream: int, ids: np.ndarray, draws: int) -> np.ndarray:
    """[len(ids), draws] uint64, a pure function of every argument."""
    base = _mix(_key(seed, epoch, stream) ^ np.asarray(ids, np.uint64))
    with np.errstate(over="ignore"):
        return _mix(base[:, None] + np.arange(1, draws + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))


def uniforms(seed: int, epoch: int, stream: int, ids: np.ndarray, draws: int) -> np.ndarray:
    """[len(ids), draws] float64 in [0, 1)."""
    return (hash_u64(seed, epoch, stream, ids, draws) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def batch_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """The seed of batch (epoch, step, rank)'s mask noise: the same in the trainer, the in-loop
    teacher, the mask server and its client's random fallback, and independent of timing, threads,
    process or what ran before (resume, restarts)."""
    key = np.array([seed, epoch, step, rank], dtype="<i8").tobytes()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def batch_generator(seed: int, epoch: int, step: int, rank: int, device="cpu"):
    """A torch.Generator on `device` seeded with batch_seed."""
    import torch   # the plan itself is numpy; the generator is for the mask strategies
    g = torch.Generator(device=device)
    g.manual_seed(batch_seed(seed, epoch, step, rank))
    return g


# -- crops ---------------------------------------------------------------------------------------

def rrc_boxes(u: np.ndarray, W: np.ndarray, H: np.ndarray, scale, ratio) -> np.ndarray:
    """torchvision RandomResizedCrop.get_params, vectorized: 10 attempts of (area, log-ratio), the
    first that fits wins, else the central crop clamped to `ratio`. u: [n, 22]. -> [n, 4] x,y,w,h."""
    area = (W * H)[:, None].astype(np.float64)
    target = area * (scale[0] + u[:, 0:10] * (scale[1] - scale[0]))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(lo + u[:, 10:20] * (hi - lo))
    w = np.round(np.sqrt(target * aspect))   # round half to even, like Python's round()
    h = np.round(np.sqrt(target / aspect))
    fits = (w > 0) & (h > 0) & (w <= W[:, None]) & (h <= H[:, None])
    first = fits.argmax(1)
    rows = np.arange(len(u))
    w, h = w[rows, first], h[rows, first]
    in_ratio = W / H
    fw = np.where(in_ratio < ratio[0], W, np.where(in_ratio > ratio[1], np.round(H * ratio[1]), W))
    fh = np.where(in_ratio < ratio[0], np.round(W / ratio[0]), H)
    ok = fits.any(1)
    w, h = np.where(ok, w, fw), np.where(ok, h, fh)
    x = np.where(ok, np.floor(u[:, 20] * (W - w + 1)), (W - w) // 2)
    y = np.where(ok, np.floor(u[:, 21] * (H - h + 1)), (H - h) // 2)
    return np.stack([x, y, w, h], 1).astype(np.int32)


def src_boxes(u: np.ndarray, W: np.ndarray, H: np.ndarray, img_size: int, pad: int = 4) -> np.ndarray:
    """DeiT III's simple random crop: Resize(shorter side) -> RandomCrop(S, padding=4, reflect).
    A crop box cannot hold reflected pixels, so the 4-px jitter is kept by shrinking the square
    by 2*pad (scaled to source pixels) instead: a 1.04x zoom at 224 px, no padding content."""
    side = np.minimum(W, H)
    p = np.round(pad * side / img_size)
    c = np.maximum(side - 2 * p, 1)
    x = np.floor(u[:, 0] * (W - c + 1))
    y = np.floor(u[:, 1] * (H - c + 1))
    return np.stack([x, y, c, c], 1).astype(np.int32)


def center_boxes(u: np.ndarray, W: np.ndarray, H: np.ndarray, img_size: int) -> np.ndarray:
    """Eval crop: Resize(S/0.875) -> CenterCrop(S), i.e. the central 87.5% of the shorter side."""
    c = np.maximum(np.round(np.minimum(W, H) * 0.875), 1)
    return np.stack([(W - c) // 2, (H - c) // 2, c, c], 1).astype(np.int32)


CROPS = {"rrc": 22, "src": 2, "center": 0}   # crop kind -> uniforms it draws


def color_params(u: np.ndarray) -> np.ndarray:
    """LUT's ColorAug per sample (docs/methods.md 2.1): with p=0.8 ColorJitter(0.4, 0.4, 0.2, 0.1), then
    exactly one of grayscale / solarize / blur(sigma ~ U(0.1, 2)). -> [n, 7] float32 columns:
    jitter on, brightness, contrast, saturation, hue (fraction of a turn), op (0 gray, 1 solarize,
    2 blur), sigma. Jitter is applied in this fixed order (torchvision shuffles it)."""
    on = (u[:, 0] < 0.8).astype(np.float64)
    b = 1 + on * 0.4 * (2 * u[:, 1] - 1)
    c = 1 + on * 0.4 * (2 * u[:, 2] - 1)
    s = 1 + on * 0.2 * (2 * u[:, 3] - 1)
    h = on * 0.1 * (2 * u[:, 4] - 1)
    op = np.floor(u[:, 5] * 3)
    sigma = 0.1 + 1.9 * u[:, 6]
    return np.stack([on, b, c, s, h, op, sigma], 1).astype(np.float32)


def view_params(v: ViewConfig, img_size: int, seed: int, epoch: int, index: int,
                ids: np.ndarray, W: np.ndarray, H: np.ndarray) -> View:
    """Augmentation of view `index` for these samples: depends on (seed, epoch, index, id) only."""
    u = uniforms(seed, epoch, STREAM_VIEW + 16 * index, ids, CROPS[v.crop] + 1 + 7)
    W, H = W.astype(np.float64), H.astype(np.float64)
    boxes = {"rrc": lambda: rrc_boxes(u, W, H, v.scale, v.ratio),
             "src": lambda: src_boxes(u, W, H, img_size),
             "center": lambda: center_boxes(u, W, H, img_size)}[v.crop]()
    k = CROPS[v.crop]
    return View(boxes, u[:, k] < v.flip, color_params(u[:, k + 1:]) if v.color else None)


# -- order and batches ---------------------------------------------------------------------------

def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """A permutation of range(n), different every epoch."""
    return np.argsort(hash_u64(seed, epoch, STREAM_ORDER, np.arange(n), 1)[:, 0], kind="stable")


def steps_per_epoch(n: int, cfg: PlanConfig, offset: int = 0) -> int:
    """Global batches in an epoch of n samples whose first `offset` positions are done already."""
    g, rest = cfg.batch_size * cfg.world_size, n - offset
    return -(-rest // g) if cfg.remainder == "pad" else rest // g


def rank_slots(order: np.ndarray, cfg: PlanConfig, rank: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """-> (ids [steps, B], valid [steps, B]) for one rank: global batch s holds positions
    [offset + s*W*B, offset + (s+1)*W*B) of the epoch order, rank r the r-th block of B. offset: the
    positions an earlier launch consumed (elastic resume); padding past the end repeats the order's
    start, valid=False."""
    if not 0 <= rank < cfg.world_size:
        raise ValueError(f"rank {rank} outside world size {cfg.world_size}")
    steps, g = steps_per_epoch(len(order), cfg, offset), cfg.batch_size * cfg.world_size
    pos = offset + np.arange(steps * g).reshape(steps, cfg.world_size, cfg.batch_size)[:, rank]
    return order[pos % len(order)], pos < len(order)


class Plan:
    """The plan of one rank; caches the current epoch's order (an argsort of N hashes)."""

    def __init__(self, manifest, cfg: PlanConfig, rank: int = 0):
        self.cfg, self.rank = cfg, rank
        self.n = len(manifest)
        if self.n == 0:
            raise ValueError(f"{manifest.root}: empty dataset")
        self.W, self.H = manifest.table["width"], manifest.table["height"]
        self.steps = steps_per_epoch(self.n, cfg)
        if self.steps == 0:
            raise ValueError(f"{self.n} samples < one global batch of {cfg.batch_size}x"
                             f"{cfg.world_size} with remainder=drop")
        self.hash = plan_hash(manifest, cfg)
        self.data_hash = plan_hash(manifest, cfg, layout=False)
        self._epoch, self._slots = None, None
        self.resumed: tuple[int, int] | None = None   # (epoch, positions done) of an elastic resume

    def resume_at(self, epoch: int, consumed: int) -> None:
        """Elastic resume: `epoch` continues after the first `consumed` positions of its order,
        whatever world size and batch consumed them, in this plan's global batches; the next
        epochs are whole. The order and every crop depend on neither, so no sample of the epoch
        is lost or repeated."""
        if not 0 <= consumed <= self.n:
            raise ValueError(f"rank {self.rank}: resume cursor {consumed} outside epoch of {self.n} samples")
        self.resumed, self._epoch = (epoch, consumed), None

    def offset(self, epoch: int) -> int:
        return self.resumed[1] if self.resumed and self.resumed[0] == epoch else 0

    def steps_in(self, epoch: int) -> int:
        return steps_per_epoch(self.n, self.cfg, self.offset(epoch))

    def progress(self, epoch: int, step: int) -> float:
        """Fractional epoch at global batch `step` (MAE sets the lr from it every iteration):
        epoch + step / steps, measured in positions where an elastic resume changed the layout."""
        off, g = self.offset(epoch), self.cfg.batch_size * self.cfg.world_size
        return epoch + (off + step * g) / (off + self.steps_in(epoch) * g)

    def consumed(self, epoch: int, steps_done: int) -> int:
        """Positions of `epoch`'s order consumed after `steps_done` of its global batches."""
        return min(self.n, self.offset(epoch) + steps_done * self.cfg.batch_size * self.cfg.world_size)

    def batch(self, epoch: int, step: int) -> PlannedBatch:
        if not 0 <= step < self.steps_in(epoch):
            raise IndexError(f"rank {self.rank}: step {step} outside epoch of {self.steps_in(epoch)} steps")
        if epoch != self._epoch:
            self._slots = rank_slots(epoch_order(self.cfg.seed, epoch, self.n), self.cfg, self.rank,
                                     self.offset(epoch))
            self._epoch = epoch
        ids = self._slots[0][step].astype(np.int64)
        return PlannedBatch(epoch, step, self.rank, ids, self._slots[1][step], self.views(epoch, ids))

    def views(self, epoch: int, ids: np.ndarray) -> tuple[View, ...]:
        """Augmentation of each configured view for these samples in this epoch."""
        return tuple(view_params(v, self.cfg.img_size, self.cfg.seed, epoch, i, ids,
                                 self.W[ids], self.H[ids]) for i, v in enumerate(self.cfg.views))

    def batches(self, epoch: int, start_step: int = 0):
        """The rest of `epoch` from the cursor (epoch, start_step)."""
        for step in range(start_step, self.steps_in(epoch)):
            yield self.batch(epoch, step)


def plan_hash(manifest, cfg: PlanConfig, *, layout: bool = True) -> str:
    """What both ends compare at connect time: the dataset (keys, labels, stored sizes) and every
    setting that changes a batch. Not the rank: each rank has its own slice of the same plan.
    layout=False leaves out world size and batch size: what an elastic resume must keep (the
    order and the crops of every sample depend on neither)."""
    t = manifest.table
    h = hashlib.sha256()
    for col in ("key", "label", "width", "height"):
        h.update(np.ascontiguousarray(t[col]).tobytes())
    settings = asdict(cfg)
    if not layout:
        del settings["world_size"], settings["batch_size"]
    h.update(json.dumps({"plan": PLAN_VERSION, **settings}, sort_keys=True).encode())
    return h.hexdigest()[:32]


def add_plan_arguments(p: argparse.ArgumentParser, *, world_size: bool = True) -> None:
    """The PlanConfig options; the trainer adds the same ones (its world size comes from torchrun),
    so both ends build the same plan."""
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=64, help="per rank")
    if world_size:
        p.add_argument("--world-size", type=positive_int, default=1)
    p.add_argument("--img-size", "--input_size", type=positive_int, default=None,
                   help="default: the model's; another size builds the model for it (MAE's --input_size)")
    p.add_argument("--interpolation", default="bicubic", choices=("bicubic", "bilinear"))
    p.add_argument("--remainder", default="pad", choices=("pad", "drop"))
    p.add_argument("--views", default="rrc", help="comma list of CROP[+color], CROP in "
                   f"{', '.join(CROPS)}; e.g. 'src,src+color' for LUT")
    p.add_argument("--crop-scale", type=crop_scale, default="0.2,1.0", help="rrc scale range LO,HI with "
                   "0 < LO <= HI <= 1 (MAE: 0.2,1.0)")
    p.add_argument("--flip", type=unit_float, default=0.5, help="horizontal flip probability")


def crop_scale(text: str) -> str:
    """--crop-scale LO,HI checked (the plan parses the string)."""
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected two numbers LO,HI, e.g. 0.2,1.0") from None
    if not 0 < lo <= hi <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0 < LO <= HI <= 1")
    return text


def plan_config_from_args(args: argparse.Namespace, img_size: int | None = None) -> PlanConfig:
    """The one place a PlanConfig is built from the command line (trainer and mask server)."""
    lo, hi = (float(x) for x in args.crop_scale.split(","))
    views = []
    for spec in args.views.split(","):
        crop, _, extra = spec.strip().partition("+")
        if extra not in ("", "color"):
            raise ValueError(f"--views {args.views!r}: {spec!r}: expected CROP or CROP+color")
        views.append(ViewConfig(crop=crop, scale=(lo, hi), flip=args.flip, color=extra == "color"))
    size = args.img_size if args.img_size is not None else img_size
    if size is None:
        raise ValueError("--img-size is required (no model to take it from)")
    return PlanConfig(seed=args.seed, batch_size=args.batch_size, world_size=args.world_size, img_size=size,
                      interpolation=args.interpolation, remainder=args.remainder, views=tuple(views))
