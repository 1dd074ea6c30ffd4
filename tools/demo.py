"""`mimpipe demo` (what `make demo` runs): the whole system on the embedded sample dataset.

Builds the sample dataset, starts `mimpipe maskserver` (sbam) as its own process on core 1,
trains a tiny ViT against it on core 0 (separate cores stand for separate GPUs), stops the server
cleanly, then reports images/s, the mask-wait share, teacher staleness, loss start -> end and the
k-NN accuracy against a randomly initialized encoder. Writes runs/demo/: metrics.jsonl,
masks.png (what the trained teacher masks), loss.png.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from mimpipe.tools import sample
from mimpipe.tools.procs import cli, pinned, placement, start_server, stop


def add_arguments(p) -> None:
    p.add_argument("--shards", type=Path, default=Path("shards/sample"))
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--model", default="mae_vit_tiny_patch8_64")
    p.add_argument("--strategy", default="sbam")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--blr", type=float, default=4e-3, help="lr = blr * batch / 256: 1e-3 at batch 64")
    p.add_argument("--port", type=int, default=5555)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cpu: trainer and server on their own core; cuda: trainer on GPU 0, server on the last GPU")


def run(args) -> dict:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    sample.ensure(args.shards)
    endpoint = f"tcp://127.0.0.1:{args.port}"
    plan = ["--batch-size", args.batch_size, "--seed", 0]
    where = placement(args.device)
    server = start_server(["--shards", args.shards, "--strategy", args.strategy, "--model", args.model,
                           "--bind", endpoint, "--threads", 1, "--stats-file", out / "maskserver.json",
                           "--epochs", args.epochs, *plan, *where["server"]], out / "maskserver.log", core=where["server_core"])
    try:
        t0 = time.perf_counter()
        subprocess.run(cli("train", "--shards", args.shards, "--out", out, "--overwrite", "--model", args.model,
                           "--masks", endpoint, "--strategy", args.strategy, "--epochs", args.epochs,
                           "--blr", args.blr, "--warmup-epochs", 1, "--threads", 1,
                           "--mask-policy", "random", *plan, *where["train"]), check=True,
                       **pinned(where["train_core"]))
        wall = time.perf_counter() - t0
    finally:
        server_rc = stop(server)   # clean stop: BYE to the trainer, stats written
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return summarize(args, rows, wall, server_rc)


def summarize(args, rows: list[dict], wall: float, server_rc) -> dict:
    from mimpipe.pipeline.manifest import load_manifest
    from mimpipe.train.evaluate import evaluate, load_encoder
    m = load_manifest(args.shards)
    step_s = sum(r["data_wait"] + r["mask_wait"] + r["compute"] for r in rows)
    stale = [r["staleness"] for r in rows if r["staleness"] is not None]
    trained = evaluate(load_encoder(args.model, str(args.out / "checkpoint.pt")), m)
    fresh = evaluate(load_encoder(args.model, None), m)
    _masks_picture(args)
    return {
        "steps": len(rows), "images_s": sum(r["images"] for r in rows) / wall,
        "mask_wait_share": sum(r["mask_wait"] for r in rows) / step_s,
        "data_wait_share": sum(r["data_wait"] for r in rows) / step_s,
        "staleness_mean": sum(stale) / max(len(stale), 1), "staleness_max": max(stale, default=None),
        "fallbacks": sum(r["fallback"] for r in rows), "loss_start": rows[0]["loss"],
        "loss_end": sum(r["loss"] for r in rows[-10:]) / len(rows[-10:]),
        "knn": trained["knn"], "knn_random_init": fresh["knn"], "server_exit": server_rc, "out": str(args.out),
        "recall": [r["mask_recall"] for r in rows if r.get("mask_recall") is not None],
    }


def _masks_picture(args) -> None:
    """What the trained teacher masks (the trainer drew loss.png itself)."""
    import argparse

    from mimpipe.tools import viz
    p = argparse.ArgumentParser()
    viz.add_arguments(p)
    viz.run(p.parse_args([str(args.shards), "--model", args.model, "--weights", str(args.out / "checkpoint.pt"),
                          "--recall-images", "256", "--out", str(args.out / "masks.png")]))


def table(r: dict) -> str:
    return "\n".join([
        f"demo: {r['steps']} steps, trainer fed by a mask server process (separate cores)",
        f"  images/s                 {r['images_s']:.1f}",
        f"  mask wait share          {100 * r['mask_wait_share']:.1f}% of step time "
        f"(data wait {100 * r['data_wait_share']:.1f}%)",
        f"  teacher staleness        mean {r['staleness_mean']:.1f}, max {r['staleness_max']} steps; "
        f"{r['fallbacks']} fallback batches",
        f"  loss                     {r['loss_start']:.3f} -> {r['loss_end']:.3f} (mean of the last 10)",
        f"  k-NN accuracy            {r['knn']:.3f} (randomly initialized encoder: {r['knn_random_init']:.3f})",
        f"  object recall of masks   first epoch {r['recall'][0]:.3f}, last {r['recall'][-1]:.3f} (random: 0.75)"
        if r["recall"] else "  object recall of masks   not measured",
        f"  mask server exit code    {r['server_exit']}",
        f"  wrote {r['out']}/: metrics.jsonl, loss.png, masks.png, maskserver.log, maskserver.json"])


def main(args) -> int:
    print(table(run(args)))
    return 0
