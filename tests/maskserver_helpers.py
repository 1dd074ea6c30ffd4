"""Helpers for tests/test_maskserver.py: start a mask server process, run a trainer-like client.

Run as a script, it is a client process: `python tests/maskserver_helpers.py ENDPOINT SHARDS OUT
--rank R --world-size W --batch-size B --epochs E [--hold]` writes one JSON line per batch handed
out (flushed), so a test can read what a killed client got, and OUT.stats (the client's stats) at
the end. --announce sends the run's epochs in HELLO (the server may then exit when it is done);
--stop-on-term makes SIGTERM stop a waiting get (exit 3, "interrupted" in OUT.stats); --others
lists servers to fail over to.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from mimpipe.tools import procs

ROOT = Path(__file__).resolve().parents[1]
MODEL = "mae_vit_micro_patch8_64"
L = 64
WORLD, B = 2, 4
RUN, LAUNCH = "test-run", "launch-1"   # the test run's identity; start_client's processes default to it


def plans(ds):
    """The plan of every rank of the test layout."""
    from mimpipe.pipeline.manifest import load_manifest
    from mimpipe.pipeline.plan import Plan, PlanConfig
    m = load_manifest(ds)
    return [Plan(m, PlanConfig(seed=0, batch_size=B, world_size=WORLD, img_size=64), r) for r in range(WORLD)]


def client(endpoint, plan, **kw):
    """A rank of the test run (every rank of one launch shares run_id and restart_id, as a trainer's)."""
    from mimpipe.maskserver.client import MaskClient
    kw = {"num_patches": L, "ratio": 0.75, "seed": 0, "heartbeat": 0.5, "mask_timeout": 30.0,
          "policy": "fail", "run_id": RUN, "restart_id": LAUNCH, **kw}
    return MaskClient(endpoint, rank=plan.rank, world_size=WORLD, plan_hash=plan.hash, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(shards, endpoint: str, log_path, *, world_size=2, batch_size=4, strategy="sbam",
                 extra=(), ready_timeout=60.0) -> subprocess.Popen:
    """The server as its own process; returns once it printed 'ready' (or raises, having killed it)."""
    return procs.start_server(["--shards", shards, "--strategy", strategy, "--model", MODEL, "--bind", endpoint,
                               "--world-size", world_size, "--batch-size", batch_size, "--seed", 0, *extra],
                              Path(log_path), timeout=ready_timeout, cwd=ROOT)


def kill(proc: subprocess.Popen | None, sig=signal.SIGKILL) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def start_client(endpoint, shards, out, *, rank, world_size=2, batch_size=4, epochs=1, hold=False,
                 extra=()) -> subprocess.Popen:
    cmd = [sys.executable, __file__, endpoint, str(shards), str(out), "--rank", str(rank), "--world-size",
           str(world_size), "--batch-size", str(batch_size), "--epochs", str(epochs),
           *(["--hold"] if hold else []), *map(str, extra)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(f"{out}.log", "wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


def read_lines(path) -> list[dict]:
    p = Path(path)
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def record(mb, epoch, step, ids) -> dict:
    from mimpipe.maskserver.protocol import checksum
    return {"epoch": epoch, "step": step, "checksum": checksum(ids), "fallback": mb.fallback,
            "version": mb.teacher_version, "len_keep": mb.len_keep.tolist(),
            "visible": (~mb.mask).sum(1).tolist(), "shape": list(mb.mask.shape)}


def _main() -> None:
    sys.path.insert(0, str(ROOT))
    from mimpipe.maskserver.client import MaskClient, MaskWaitInterrupted
    from mimpipe.pipeline.manifest import load_manifest
    from mimpipe.pipeline.plan import Plan, PlanConfig
    ap = argparse.ArgumentParser()
    ap.add_argument("endpoint")
    ap.add_argument("shards")
    ap.add_argument("out")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--policy", default="fail")
    ap.add_argument("--mask-timeout", type=float, default=30.0)
    ap.add_argument("--hold", action="store_true", help="after the last batch, stay connected")
    ap.add_argument("--run-id", default=RUN)
    ap.add_argument("--restart-id", default=LAUNCH)
    ap.add_argument("--start", type=int, default=0, help="first iteration, epoch * steps + step (a restart)")
    ap.add_argument("--heartbeat", type=float, default=0.5)
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds per batch (a trainer step)")
    ap.add_argument("--announce", action="store_true", help="HELLO carries the run's epochs")
    ap.add_argument("--stop-on-term", action="store_true")
    ap.add_argument("--others", default="", help="comma list of servers to fail over to")
    a = ap.parse_args()
    stop = []
    if a.stop_on_term:
        signal.signal(signal.SIGTERM, lambda *_: stop.append(time.monotonic()))
    plan = Plan(load_manifest(a.shards), PlanConfig(seed=0, batch_size=a.batch_size, world_size=a.world_size,
                                                     img_size=64), a.rank)
    client = MaskClient(a.endpoint, rank=a.rank, world_size=a.world_size, plan_hash=plan.hash,
                        num_patches=L, ratio=0.75, seed=0, policy=a.policy, mask_timeout=a.mask_timeout,
                        heartbeat=a.heartbeat, run_id=a.run_id, restart_id=a.restart_id,
                        cursor=divmod(a.start, plan.steps), run={"epochs": a.epochs} if a.announce else None,
                        others=tuple(x for x in a.others.split(",") if x))
    print("ready", flush=True)
    try:
        with open(a.out, "w") as f:
            for it in range(a.start, a.epochs * plan.steps):
                e, s = divmod(it, plan.steps)
                ids = plan.batch(e, s).sample_ids
                f.write(json.dumps(record(client.get(e, s, ids, should_stop=lambda: bool(stop)), e, s, ids)) + "\n")
                f.flush()
                time.sleep(a.sleep)
        while a.hold:
            time.sleep(0.1)
    except MaskWaitInterrupted:
        Path(f"{a.out}.stats").write_text(json.dumps({"interrupted": time.monotonic() - stop[0]}))
        client.close()
        sys.exit(3)
    client.close()
    Path(f"{a.out}.stats").write_text(json.dumps(client.stats))


if __name__ == "__main__":
    _main()
