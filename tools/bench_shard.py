"""shard throughput: `mimpipe shard` (--workers 1 and 2) vs a plain webdataset.ShardWriter loop.

The baseline only copies bytes; ours also decodes every image to validate it, journals, and
fsyncs each shard, so a ratio below 1 at one worker is the price of validation."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import webdataset as wds

from mimpipe.tools.sample import SampleItem
from mimpipe.tools.shard import ShardConfig, scan_folder, shard_items


def add_arguments(p) -> None:
    p.add_argument("--n", type=int, default=2000, help="sample images (default 2000)")
    p.add_argument("--size", type=int, default=96, help="image side (default 96, the sample's)")
    p.add_argument("--samples-per-shard", type=int, default=250)


def make_folder(root: Path, n: int, size: int) -> int:
    """The sample dataset as an ImageNet-style folder of JPEG files; returns total bytes."""
    total = 0
    for i in range(n):
        item = SampleItem(0, i, size)
        data, _ = item.read()
        path = root / item.class_name / item.relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        total += len(data)
    return total


def baseline(items, out: Path, per_shard: int) -> None:
    with wds.ShardWriter(str(out / "base-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for it in items:
            sink.write({"__key__": Path(it.relpath).stem, "jpg": it.read()[0], "cls": it.label})


def run(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="mimpipe-bench-") as tmp:
        tmp = Path(tmp)
        nbytes = make_folder(tmp / "src", args.n, args.size)
        items, classes, _ = scan_folder(tmp / "src")
        for it in items:   # same page-cache state for every contender
            it.read()
        res = {"images": len(items), "mb": round(nbytes / 1e6, 2)}
        for name, fn in {
            "baseline": lambda o: baseline(items, o, args.samples_per_shard),
            "workers1": lambda o: shard_items(items, classes, o, ShardConfig(
                shard_bytes=None, samples_per_shard=args.samples_per_shard, workers=1), progress=False),
            "workers2": lambda o: shard_items(items, classes, o, ShardConfig(
                shard_bytes=None, samples_per_shard=args.samples_per_shard, workers=2), progress=False),
        }.items():
            (tmp / name).mkdir()
            t0 = time.perf_counter()
            fn(tmp / name)
            dt = time.perf_counter() - t0
            res[f"{name}_img_s"] = round(len(items) / dt, 1)
            res[f"{name}_mb_s"] = round(nbytes / 1e6 / dt, 2)
    for w in ("workers1", "workers2"):
        res[f"ratio_{w}"] = round(res[f"{w}_img_s"] / res["baseline_img_s"], 3)
    return res


def table(r: dict) -> str:
    rows = [f"shard bench: {r['images']} images, {r['mb']} MB (sample data)",
            f"{'path':<28}{'images/s':>10}{'MB/s':>8}{'vs baseline':>13}"]
    for name, label in (("baseline", "webdataset.ShardWriter"), ("workers1", "mimpipe shard --workers 1"),
                        ("workers2", "mimpipe shard --workers 2")):
        ratio = r.get(f"ratio_{name}", 1.0)
        rows.append(f"{label:<28}{r[name + '_img_s']:>10.0f}{r[name + '_mb_s']:>8.1f}{ratio:>12.2f}x")
    return "\n".join(rows)
