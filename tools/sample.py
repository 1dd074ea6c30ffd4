"""`mimpipe sample OUT`: the embedded default dataset, generated, so a fresh machine runs the whole
system without a download.

Each image shows one object of one of 10 shape classes (the label), upright near the centre, on a
textured, cluttered background. The foreground is known exactly and travels with the sample in
KEY.json as a cell mask (`fg`: 4-px cells, row-major bits, hex), so a strategy's object recall can
be scored: any patch size that is a multiple of 4 pools it exactly. Everything is a pure function of
(seed, index); images go through the same sharding code as user data.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mimpipe.tools.argtypes import nonneg_int, positive_int
from mimpipe.tools.shard import ShardConfig, shard_items, summary

CLASSES = ("disk", "square", "triangle", "diamond", "cross", "ring", "star", "hexagon",
           "crescent", "bar")
CELL = 4
JPEG_QUALITY = 90
# recorded as the manifest's source: bump when render() or the dataset format changes, so `ensure`
# rebuilds older sets (v3: same images, dataset format 2 with per-sample checksums)
GENERATOR = "mimpipe sample v3"


def _polygon(u, v, n):
    ang = np.arctan2(v, u)
    sector = np.pi / n
    # distance to the nearest edge normal of a regular n-gon inscribed in the unit circle
    return np.hypot(u, v) * np.cos((ang + np.pi / 2) % (2 * sector) - sector) <= np.cos(sector)


SHAPES = {
    "disk": lambda u, v: u * u + v * v <= 1,
    "square": lambda u, v: np.maximum(abs(u), abs(v)) <= 0.8,
    "triangle": lambda u, v: _polygon(u, v, 3),
    "diamond": lambda u, v: abs(u) / 0.6 + abs(v) <= 1,
    "cross": lambda u, v: ((abs(u) <= 0.3) & (abs(v) <= 1)) | ((abs(v) <= 0.3) & (abs(u) <= 1)),
    "ring": lambda u, v: (u * u + v * v <= 1) & (u * u + v * v >= 0.55 ** 2),
    "star": lambda u, v: np.hypot(u, v) <= 0.4 + 0.6 * ((np.cos(5 * np.arctan2(v, u)) + 1) / 2) ** 2,
    "hexagon": lambda u, v: _polygon(u, v, 6),
    "crescent": lambda u, v: (u * u + v * v <= 1) & ((u - 0.45) ** 2 + v * v > 0.75 ** 2),
    "bar": lambda u, v: (abs(u) <= 1) & (abs(v) <= 0.28),
}
assert tuple(SHAPES) == CLASSES


def label_of(seed: int, index: int) -> int:
    return int(np.random.default_rng([seed, index]).integers(len(CLASSES)))


def render(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """-> (image [size, size, 3] uint8, foreground [size, size] bool, label)."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(len(CLASSES)))   # first draw: label_of() relies on it
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = _background(rng, xx, yy)
    # one upright object near the centre, like most ImageNet photos: a short MAE run learns to
    # tell its shapes apart (k-NN above a random encoder), which 1-3 small rotated objects in
    # full-contrast clutter did not allow (mean-pooled features of either encoder sat at chance)
    r = rng.uniform(0.28, 0.38)
    cx, cy = rng.uniform(0.4, 0.6, size=2)
    u, v = (xx - cx) / r, (yy - cy) / r
    fg = SHAPES[CLASSES[label]](u, v)
    color = rng.uniform(0, 1, 3)
    color[rng.integers(3)] = rng.uniform(0.85, 1.0)   # saturated: the object stands out of clutter
    shade = 0.8 + 0.2 * np.cos(2 * np.pi * rng.uniform(2, 6) * (u + v))[..., None]
    img = np.where(fg[..., None], color * shade, img)
    img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
    return (img * 255 + 0.5).astype(np.uint8), fg, label


def _background(rng, xx, yy) -> np.ndarray:
    img = np.zeros(xx.shape + (3,), np.float32)
    for _ in range(2):   # colored gratings of random frequency and direction
        f, a = rng.uniform(2, 12), rng.uniform(0, np.pi)
        wave = np.sin(2 * np.pi * f * (xx * np.cos(a) + yy * np.sin(a)) + rng.uniform(0, 6.3))
        img += 0.25 * (wave[..., None] * rng.uniform(-1, 1, 3))
    img += rng.uniform(0.25, 0.6, 3)
    for _ in range(int(rng.integers(3, 8))):   # low-contrast clutter blobs
        cx, cy, rx, ry = rng.uniform(0, 1, 2).tolist() + rng.uniform(0.05, 0.2, 2).tolist()
        blob = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        img = np.where(blob[..., None], 0.6 * img + 0.4 * rng.uniform(0.2, 0.7, 3), img)
    return 0.5 * img + 0.5 * img.mean((0, 1))   # half contrast: clutter, not the subject


def fg_cells(fg: np.ndarray) -> dict:
    """Foreground as 4-px cells (a cell counts when at least a quarter of it is object)."""
    g = fg.shape[0] // CELL
    cells = fg[:g * CELL, :g * CELL].reshape(g, CELL, g, CELL).mean((1, 3)) >= 0.25
    return {"cell": CELL, "grid": [g, g], "bits": np.packbits(cells.ravel()).tobytes().hex()}


def decode_fg(meta: dict) -> np.ndarray:
    """Inverse of fg_cells: [g, g] bool."""
    g = meta["fg"]["grid"]
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(meta["fg"]["bits"]), np.uint8))
    return bits[:g[0] * g[1]].reshape(g).astype(bool)


@dataclass(frozen=True)
class SampleItem:
    seed: int
    index: int
    size: int

    @property
    def relpath(self) -> str:
        return f"sample-{self.index:06d}.jpg"

    @property
    def label(self) -> int:
        return label_of(self.seed, self.index)

    @property
    def class_name(self) -> str:
        return CLASSES[self.label]

    def read(self) -> tuple[bytes, dict]:
        img, fg, _ = render(self.seed, self.index, self.size)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=JPEG_QUALITY)
        return buf.getvalue(), {"fg": fg_cells(fg)}


def image_side(s: str) -> int:
    """--size: a multiple of CELL, at least 16 px (the foreground cells must tile the image)."""
    v = positive_int(s)
    if v % CELL or v < 16:
        raise argparse.ArgumentTypeError(f"{s!r} is not allowed: expected a multiple of {CELL}, at least 16")
    return v


def add_arguments(p) -> None:
    p.add_argument("out", type=Path, nargs="?", default=Path("shards/sample"),
                   help="output folder (default shards/sample)")
    p.add_argument("--n", type=positive_int, default=2000, help="number of images (default 2000)")
    p.add_argument("--size", type=image_side, default=96, help="image side in px, multiple of 4 (default 96)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--samples-per-shard", type=positive_int, default=250)
    p.add_argument("--workers", type=positive_int, default=1)
    p.add_argument("--resume", action="store_true")


def main(args) -> int:
    if args.size % CELL or args.size < 16:   # main() is also called with hand-made args
        raise SystemExit(f"--size {args.size}: must be a multiple of {CELL}, at least 16")
    items = [SampleItem(args.seed, i, args.size) for i in range(args.n)]
    cfg = ShardConfig(name="sample", shard_bytes=None, samples_per_shard=args.samples_per_shard,
                      workers=args.workers, seed=args.seed)
    report = shard_items(items, CLASSES, args.out, cfg, resume=args.resume,
                         source=f"{GENERATOR} --n {args.n} --size {args.size} --seed {args.seed}")
    print(summary(report, args.out))
    return 0


def ensure(out: Path) -> None:
    """The default sample set at `out` (what demo and profile run on): built if missing, rebuilt if
    an older generator made it. Only a folder whose manifest says `mimpipe sample` wrote it is
    replaced."""
    manifest = out / "manifest.json"
    if manifest.exists():
        source = json.loads(manifest.read_text()).get("source", "")
        if source.startswith(GENERATOR + " "):
            return
        if not source.startswith("mimpipe sample"):
            raise SystemExit(f"{out}: holds a dataset made by {source!r}, not a sample set; "
                             "pass another --shards")
        print(f"{out}: made by an older generator ({source!r}), rebuilding")
        shutil.rmtree(out)
    p = argparse.ArgumentParser()
    add_arguments(p)
    main(p.parse_args([str(out), "--workers", "2"]))


def fg_patches(meta: dict, box, flip: bool, img_size: int, patch: int) -> np.ndarray:
    """The sample's foreground as the model sees it: cells -> pixels -> the crop `box` (x, y, w, h)
    resized to img_size (area average) -> flipped -> a patch is foreground when half of it is.
    -> [L] bool, row-major patches."""
    cells = decode_fg(meta).astype(np.float32)
    pix = np.kron(cells, np.ones((meta["fg"]["cell"],) * 2, np.float32))
    x, y, w, h = (int(v) for v in box)
    crop = Image.fromarray(pix[y:y + h, x:x + w]).resize((img_size, img_size), Image.Resampling.BOX)
    a = np.asarray(crop)[:, ::-1] if flip else np.asarray(crop)
    g = img_size // patch
    return (a.reshape(g, patch, g, patch).mean((1, 3)) >= 0.5).ravel()
