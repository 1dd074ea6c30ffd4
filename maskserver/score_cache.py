"""The score cache: one teacher forward per image serves many epochs (docs/methods.md 8).

For gpa, idm and attmask the teacher's part of a mask is a deterministic per-patch score (the
strategy's `score`, strategies/__init__.py); the rest (soft-to-hard, PLB + top-k, AttMask's modes)
is a cheap stochastic step. The plan knows every crop box in advance, so the score of an image is
computed once, on its reference view (the whole stored image resized to the teacher's S x S, a
G x G patch grid), stored in float16, and for each epoch's crop (x, y, w, h, flip) resampled onto
the crop's own g x g patch grid: bilinear at each crop patch's centre (crops are never larger than
the image, so this only ever upsamples). The strategy's stochastic step then runs on the resampled
scores exactly as on the exact path, with the same noise.

Refresh: an entry computed in epoch s is fresh in epoch e until one of its image's refresh epochs
lies in (s, e]; image i's refresh epochs are those with (e + phase_i) % k == 0, phase_i a hash of
i, so after the first epoch about 1/k of the images are recomputed each epoch instead of all of
them every k-th. A frozen teacher's entries never expire. An entry records the weights (version,
step) that computed it; `invalidate` (a new run or launch: its masks must come only from weights
it sent) empties the cache.

Storage: in memory, or memory-mapped files in a folder (ImageNet scale). A folder is reloaded by a
restarted server when its key (model, strategy, block, score options, image size, interpolation,
the data's checksums, the frozen teacher's file digest) matches and the teacher is frozen; a
momentum or online teacher's entries belong to a launch, and start over.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mimpipe.maskserver.strategies import STRATEGIES, Masked, get_strategy
from mimpipe.pipeline.plan import hash_u64

log = logging.getLogger("mimpipe.maskserver")
FORMAT = "mimpipe.score_cache"
VERSION = 1
STREAM_PHASE = 3   # hash stream of the refresh phases (the plan uses 1 and 2)
MEMORY_LIMIT = 4 << 30   # bytes of scores held in memory; more needs a folder (memory-mapped)


# ---- pure functions: geometry and refresh ----
def patch_centres(crop: np.ndarray, flip: np.ndarray, W: np.ndarray, H: np.ndarray, g: int) -> Tensor:
    """Where each crop patch's centre lies on the whole image, as grid_sample coordinates.

    crop [n, 4] x, y, w, h in stored pixels; flip [n] bool (the crop is mirrored after cropping);
    W, H [n] the stored sizes; g the crop's patch grid. -> [n, g, g, 2] float32 (x, y) in [-1, 1],
    align_corners=False: -1 and 1 are the image's outer edges, so the reference grid's cell
    centres sit where the teacher's patches of the whole image had theirs."""
    crop = np.asarray(crop, np.float64)
    t = (np.arange(g) + 0.5) / g   # patch centres in [0, 1] of the crop
    x0, y0, w, h = (crop[:, i:i + 1] for i in range(4))
    flip = np.asarray(flip, bool)[:, None]
    X = np.where(flip, x0 + w - t * w, x0 + t * w)   # [n, g] columns
    Y = y0 + t * h                                   # [n, g] rows
    xn = 2 * X / np.asarray(W, np.float64)[:, None] - 1
    yn = 2 * Y / np.asarray(H, np.float64)[:, None] - 1
    grid = np.stack(np.broadcast_arrays(xn[:, None, :], yn[:, :, None]), axis=-1)
    return torch.from_numpy(grid.astype(np.float32))


def resample(ref: Tensor, grid: Tensor) -> Tensor:
    """Reference scores [n, C, G, G] at the points `grid` [n, g, g, 2] -> [n, C, g*g] float32
    (row-major, the patch order of the crop)."""
    out = F.grid_sample(ref.float(), grid.to(ref.device), mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out.flatten(2)


def refresh_phase(seed: int, ids: np.ndarray, every: int) -> np.ndarray:
    """phase_i in [0, every): which epochs refresh image i (a hash of seed and id, no state)."""
    return (hash_u64(seed, 0, STREAM_PHASE, ids, 1)[:, 0] % np.uint64(every)).astype(np.int64)


def due(stamp: np.ndarray, epoch: int, every: int | None, phase: np.ndarray | None) -> np.ndarray:
    """bool [n]: entries to (re)compute in `epoch`. stamp: the epoch each was computed (-1 =
    never); every: epochs between refreshes, None = never again (a frozen teacher)."""
    stamp = np.asarray(stamp, np.int64)
    if every is None:
        return stamp < 0
    last = epoch - (epoch + phase) % every   # image i's latest refresh epoch <= epoch
    return (stamp < 0) | (stamp < last)


# ---- storage ----
def score_channels(strategy: str, cfg) -> int:
    """C of a strategy's stored score: idm keeps every head (PLB draws one per image), gpa and
    attmask one map."""
    return cfg.num_heads if strategy == "idm" else 1


def bytes_per_image(channels: int, grid: int) -> int:
    """C x G x G float16 scores, then the int32 epoch and int64 version and step of the entry."""
    return channels * grid * grid * 2 + 4 + 8 + 8


@dataclass(frozen=True)
class CacheKey:
    """What the stored scores depend on besides the weights."""
    model: str
    strategy: str
    block: int | None
    options: tuple
    img_size: int
    interpolation: str
    data: str        # a digest of the sample table (ids, sizes, checksums of the bytes)
    teacher: str     # 'frozen:<sha256 of the file>' or the source kind

    def doc(self) -> dict:
        """As JSON reads it back (tuples become lists), so a stored key compares equal."""
        return json.loads(json.dumps(self.__dict__))


def data_digest(table: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(table).tobytes(), digest_size=16).hexdigest()


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class ScoreCache:
    """Scores [n, C, G, G] float16 per image with the epoch and weights that computed them."""

    def __init__(self, n: int, channels: int, grid: int, *, key: CacheKey, every: int | None,
                 seed: int = 0, folder: str | os.PathLike | None = None, reload: bool = False):
        """every: epochs between refreshes (None: never, a frozen teacher). folder: keep the
        arrays memory-mapped there. reload: take a folder's entries if its key matches (only for
        a frozen teacher: other weights belong to a launch)."""
        if every is not None and every < 1:
            raise ValueError(f"score cache: refresh every {every} epochs; must be >= 1 (or never)")
        self.n, self.C, self.G, self.every, self.key = n, channels, grid, every, key
        self.bytes_per_image = bytes_per_image(channels, grid)
        total = n * self.bytes_per_image
        if folder is None and total > MEMORY_LIMIT:
            raise ValueError(f"score cache: {n} images x {self.bytes_per_image} B = {total / 2**30:.1f} GiB, more "
                             f"than {MEMORY_LIMIT >> 30} GiB in memory; pass --score-cache-dir DIR (memory-mapped)")
        self.phase = None if every is None else refresh_phase(seed, np.arange(n), every)
        self.folder = None if folder is None else Path(folder)
        self.loaded = 0
        if self.folder is None:
            self.scores = np.zeros((n, channels, grid, grid), np.float16)
            self.stamp = np.full(n, -1, np.int32)
            self.version = np.full(n, -1, np.int64)
            self.step = np.full(n, -1, np.int64)
        else:
            self._open(reload)
        self.counts = {"forwards": 0, "hits": 0, "invalidated": 0}
        log.info("score cache: %d images x %d B (%s) = %.1f MiB %s; refresh %s", n, self.bytes_per_image,
                 f"{channels}x{grid}x{grid} float16", total / 2**20,
                 f"in {self.folder}" if self.folder else "in memory",
                 "never (frozen teacher)" if every is None else f"every {every} epoch(s), staggered")

    def _open(self, reload: bool) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        meta_path = self.folder / "meta.json"
        doc = {"format": FORMAT, "version": VERSION, "n": self.n, "channels": self.C, "grid": self.G,
               "key": self.key.doc()}
        old = None
        if meta_path.exists():
            try:
                old = json.loads(meta_path.read_text())
            except ValueError as e:
                log.warning("score cache %s: unreadable meta.json (%s); starting over", meta_path, e)
        keep = reload and old == doc
        if old is not None and not keep:
            log.warning("score cache %s: %s; starting over", self.folder,
                        "written for another teacher, data or configuration" if old != doc else
                        "the teacher's weights belong to a launch (not frozen)")
        mode = "r+" if keep else "w+"
        shapes = {"scores": ((self.n, self.C, self.G, self.G), np.float16), "stamp": ((self.n,), np.int32),
                  "version": ((self.n,), np.int64), "step": ((self.n,), np.int64)}
        for name, (shape, dtype) in shapes.items():
            path = self.folder / f"{name}.bin"
            if keep and (not path.exists() or path.stat().st_size != math.prod(shape) * np.dtype(dtype).itemsize):
                raise ValueError(f"score cache {path}: size does not match meta.json; delete {self.folder}")
            setattr(self, name, np.memmap(path, dtype=dtype, mode=mode, shape=shape))
        if not keep:
            self.stamp[:] = -1
            self.version[:] = -1
            self.step[:] = -1
            self.stamp.flush()
            tmp = meta_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, meta_path)
        self.loaded = int((self.stamp >= 0).sum()) if keep else 0
        if self.loaded:
            log.info("score cache %s: reloaded %d of %d entries", self.folder, self.loaded, self.n)

    def due(self, ids: np.ndarray, epoch: int) -> np.ndarray:
        return due(self.stamp[ids], epoch, self.every, None if self.phase is None else self.phase[ids])

    def put(self, ids: np.ndarray, scores: Tensor, epoch: int, version: int, step: int) -> None:
        """scores [m, C, G*G] of distinct ids, computed in `epoch` by weights (version, step)."""
        self.scores[ids] = scores.reshape(len(ids), self.C, self.G, self.G).to(torch.float16).numpy()
        self.version[ids], self.step[ids] = version, step
        self.stamp[ids] = epoch   # last: an entry counts only once it is whole
        self.counts["forwards"] += len(ids)

    def get(self, ids: np.ndarray) -> Tensor:
        self.counts["hits"] += len(ids)
        return torch.from_numpy(np.asarray(self.scores[ids]))

    def invalidate(self) -> None:
        """Every entry void: the weights that computed them belong to another run or launch."""
        if (self.stamp >= 0).any():
            self.counts["invalidated"] += 1
        self.stamp[:] = -1

    def stats(self) -> dict:
        filled = self.stamp >= 0
        return {"every": self.every, "images": self.n, "filled": int(filled.sum()),
                "bytes_per_image": self.bytes_per_image, "bytes": self.n * self.bytes_per_image,
                "oldest_epoch": int(self.stamp[filled].min()) if filled.any() else None,
                "oldest_version": int(self.version[filled].min()) if filled.any() else None,
                "loaded": self.loaded, "folder": str(self.folder) if self.folder else None, **self.counts}


# ---- the path from a planned crop to a mask ----
def check_flags(every: int, folder) -> None:
    """--score-cache K / --score-cache-dir as the server and the trainer take them."""
    if folder and not every:
        raise ValueError("--score-cache-dir without --score-cache K: the cache is off")


class CachedMasks:
    """A teacher's masks through a ScoreCache: what the mask server and the in-loop trainer both use
    with --score-cache, so the two compare like for like."""

    def __init__(self, teacher, strategy: str, *, table: np.ndarray, every: int | None, block: int | None = None,
                 options: dict | None = None, interpolation: str = "bicubic", seed: int = 0,
                 folder: str | os.PathLike | None = None):
        """teacher: maskserver/teacher.py Teacher; table: the manifest's sample table (its width and
        height give the crops' geometry); every: --score-cache k (ignored for a frozen teacher: never)."""
        s = get_strategy(strategy)
        if not s.cacheable:
            raise ValueError(f"--score-cache: strategy {strategy!r} has no per-patch score to cache; it works "
                             f"for {', '.join(n for n, x in STRATEGIES.items() if x.cacheable)}")
        from mimpipe.maskserver.teacher import strategy_options
        self.teacher, self.strategy, self.block = teacher, strategy, block
        self.options = strategy_options(strategy, teacher.cfg, options)
        score_options, self.sample_options = s.split_options(self.options)
        self.W, self.H = table["width"].astype(np.int64), table["height"].astype(np.int64)
        cfg = teacher.cfg
        self.g = cfg.img_size // cfg.patch_size
        frozen = teacher.kind == "frozen"
        key = CacheKey(teacher.model, strategy, block, tuple(sorted(score_options.items())), cfg.img_size,
                       interpolation, data_digest(table),
                       f"frozen:{file_digest(teacher.source.partition(':')[2])}" if frozen else teacher.kind)
        self.cache = ScoreCache(len(table), score_channels(strategy, cfg), self.g, key=key,
                                every=None if frozen else every, seed=seed, folder=folder, reload=frozen)

    def reset(self) -> None:
        """A new run or launch took the teacher (Teacher.reset): entries of other weights go, a frozen
        teacher's stay."""
        if self.teacher.kind != "frozen":
            self.cache.invalidate()

    def _due(self, ids: np.ndarray, epoch: int) -> np.ndarray:
        """The distinct ids of the batch whose entries are due in `epoch`."""
        ids = np.asarray(ids, np.int64)
        return np.unique(ids[self.cache.due(ids, epoch)])

    def prefetch(self, ids: np.ndarray, epoch: int, whole_images):
        """Decode the reference views of the entries due now, before the caller takes the teacher's
        lock (a server's ranks then decode in parallel); -> a whole_images for `scores` that hands
        them out, or decodes whatever else is asked (entries emptied meanwhile by a new run)."""
        todo = self._due(ids, epoch)
        images = whole_images(todo) if len(todo) else None
        return lambda want: images if images is not None and np.array_equal(want, todo) else whole_images(want)

    def scores(self, ids: np.ndarray, crop: np.ndarray, flip: np.ndarray, epoch: int,
               whole_images) -> tuple[Tensor, int, int]:
        """The cached scores of a batch resampled onto its crops: ids [n], its first view's crop
        [n, 4] and flip [n]; whole_images(ids) -> [m, 3, S, S] reference views (Loader.whole_images),
        called for the entries due. Returns [n, C, L] on the teacher's device and the (version,
        step) of the oldest weights behind them (step None, as Teacher.step, where they have none:
        a frozen teacher)."""
        ids = np.asarray(ids, np.int64)
        todo = self._due(ids, epoch)
        if len(todo):
            scores = self.teacher.scores(whole_images(todo), self.strategy, block=self.block, options=self.options)
            step = -1 if self.teacher.step is None else self.teacher.step   # stored: -1 = none
            self.cache.put(todo, scores.cpu(), epoch, self.teacher.version, step)   # host sync (GPU teacher)
        # host to device: n x C x G x G float16 (gpa ViT-B, batch 256: 100 KB) from pageable memory,
        # a copy the host waits for, but no wait on queued GPU work
        ref = self.cache.get(ids).to(self.teacher.device)
        out = resample(ref, patch_centres(crop, flip, self.W[ids], self.H[ids], self.g))
        step = int(self.cache.step[ids].min())
        return out, int(self.cache.version[ids].min()), step if step >= 0 else None

    def masks(self, ids: np.ndarray, crop: np.ndarray, flip: np.ndarray, epoch: int, *, ratio: float,
              generator: torch.Generator, progress: float, head_probs: Tensor | None,
              whole_images) -> tuple[Masked, int, int]:
        """`scores`, then the strategy's stochastic step exactly as on the exact path: the masks and
        the (version, step) of the oldest weights behind them."""
        scores, version, step = self.scores(ids, crop, flip, epoch, whole_images)
        out = get_strategy(self.strategy).sample(scores, ratio, generator=generator, progress=progress,
                                                 head_probs=head_probs, **self.sample_options)
        return out, version, step
