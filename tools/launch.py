"""`mimpipe launch`: one command per node starts that node's mask servers and trainer ranks from
one set of flags, and stops the servers when the trainers end.

    mimpipe launch --nproc-per-node 8 --servers 1 -- --config configs/sbam_amr_vit_large.yaml \\
        --shards /data/in1k --out runs/sbam

The trainer flags after `--` (a `--config` among them included) are parsed once, here, as
`mimpipe train` parses them; each server gets the
plan flags, model, strategy and ratio from them, so the two ends cannot disagree. Ranks are torchrun's
(its rendezvous spans the nodes); server i of node k serves the node's ranks that `server_of` maps to
it, the same mapping every trainer applies to the `--masks` list this command builds (node-major,
`--servers` per node, ports from `--server-port` up). With CUDA the trainers take the node's first
`--nproc-per-node` GPUs and server i the next ones (`--server-devices` to choose).
"""
from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
from pathlib import Path

from mimpipe.tools.argtypes import nonneg_int, positive_int
from mimpipe.tools.procs import cli, start_server, stop

log = logging.getLogger("mimpipe.launch")

# train flags a server needs, spelled as the server spells them
PLAN_FLAGS = ("seed", "batch_size", "img_size", "interpolation", "remainder", "views", "crop_scale", "flip")


def add_arguments(p) -> None:
    p.add_argument("--nproc-per-node", type=positive_int, default=1, help="trainer ranks on this node")
    p.add_argument("--nnodes", type=positive_int, default=1)
    p.add_argument("--node-rank", type=nonneg_int, default=0, help="this node's index (SLURM: $SLURM_NODEID)")
    p.add_argument("--hosts", default="127.0.0.1", help="every node's address, comma-separated, node order; "
                   "servers bind to their node's")
    p.add_argument("--master-addr", default=None, help="torchrun's rendezvous host (default: the first of --hosts)")
    p.add_argument("--master-port", type=positive_int, default=29500)
    p.add_argument("--servers", type=nonneg_int, default=1, help="mask servers per node; 0: the trainer "
                   "flags' own --masks (random or inloop) and no server")
    p.add_argument("--server-port", type=positive_int, default=5555, help="server i listens on PORT + i")
    p.add_argument("--server-devices", default=None, help="one per server, e.g. cuda:6,cuda:7 or cpu "
                   "(default: the GPUs after the trainers', or cpu)")
    p.add_argument("--server-threads", type=positive_int, default=2, help="decoder threads per server rank")
    p.add_argument("--score-cache", type=nonneg_int, default=0, metavar="K",
                   help="the servers' score cache (mimpipe maskserver --score-cache K; 0 = exact)")
    p.add_argument("--score-cache-dir", default=None, metavar="DIR",
                   help="the servers' cache folders: DIR/nodeN-serverI (memory-mapped, reloaded by a requeued "
                        "job for a frozen teacher)")
    p.add_argument("train", nargs=argparse.REMAINDER, help="-- then `mimpipe train` flags")


def server_ranks(node: int, server: int, per_node: int, servers: int, nnodes: int) -> list[int]:
    """The global ranks server `server` of node `node` serves: those whose endpoint index
    (trainer.server_of over the node-major list of nnodes * servers endpoints) is its own."""
    from mimpipe.train.trainer import server_of
    world, n = nnodes * per_node, nnodes * servers
    return [r for r in range(world) if server_of(r, n, world) == node * servers + server]


def server_devices(args, cuda: bool) -> list[str]:
    if args.server_devices:
        devs = [d.strip() for d in args.server_devices.split(",")]
        if len(devs) != args.servers:
            raise ValueError(f"--server-devices {args.server_devices!r}: {len(devs)} devices for {args.servers} "
                             f"servers")
        return devs
    return [f"cuda:{args.nproc_per_node + i}" if cuda else "cpu" for i in range(args.servers)]


def server_argv(t, ranks: list[int], world: int, bind: str, device: str, threads: int,
                score_cache: int = 0, cache_dir: str | None = None) -> list:
    argv = ["--shards", t.shards, "--strategy", t.strategy, "--model", t.model, "--ratio", t.mask_ratio,
            "--world-size", world, "--ranks", ",".join(map(str, ranks)), "--bind", bind, "--device", device,
            "--epochs", t.epochs, "--heartbeat", t.heartbeat, "--threads", threads, "--decoder", t.decoder]
    for name in PLAN_FLAGS:
        if getattr(t, name) is not None:
            argv += ["--" + name.replace("_", "-"), getattr(t, name)]
    if t.teacher_source:
        argv += ["--source", t.teacher_source]
    if score_cache:
        argv += ["--score-cache", score_cache, *(["--score-cache-dir", cache_dir] if cache_dir else [])]
    return argv + (["--lut"] if t.server_lut else [])


def main(args) -> int:
    import torch

    from mimpipe.tools.cli import parse_args
    train_argv = args.train[1:] if args.train[:1] == ["--"] else args.train
    t = parse_args(["train", *train_argv])
    hosts = [h.strip() for h in args.hosts.split(",")]
    if len(hosts) != args.nnodes:
        raise ValueError(f"--hosts {args.hosts!r}: {len(hosts)} addresses for --nnodes {args.nnodes}")
    if args.node_rank >= args.nnodes:
        raise ValueError(f"--node-rank {args.node_rank} outside --nnodes {args.nnodes}")
    world = args.nnodes * args.nproc_per_node
    out = Path(t.out)
    out.mkdir(parents=True, exist_ok=True)
    servers = []
    try:
        if args.servers:
            endpoints = [f"tcp://{h}:{args.server_port + i}" for h in hosts for i in range(args.servers)]
            for i, device in enumerate(server_devices(args, torch.cuda.is_available())):
                ranks = server_ranks(args.node_rank, i, args.nproc_per_node, args.servers, args.nnodes)
                bind = endpoints[args.node_rank * args.servers + i]
                logfile = out / f"maskserver-node{args.node_rank}-{i}.log"
                cache_dir = args.score_cache_dir and f"{args.score_cache_dir}/node{args.node_rank}-server{i}"
                servers.append(start_server(server_argv(t, ranks, world, bind, device, args.server_threads,
                                                        args.score_cache, cache_dir), logfile))
                log.info("mask server %d on %s, %s, ranks %s (log %s)", i, device, bind, ranks, logfile)
            train_argv = [*train_argv, "--masks", ",".join(endpoints)]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc_per_node),
                    "--nnodes", str(args.nnodes), "--node_rank", str(args.node_rank),
                    "--master_addr", args.master_addr or hosts[0], "--master_port", str(args.master_port),
                    *cli("train", *train_argv)[1:]]
        proc = subprocess.Popen(torchrun)
        # a SIGTERM to launch (SLURM's preemption) goes to torchrun, which passes it to every rank
        signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
        rc = proc.wait()
    finally:
        codes = [stop(s) for s in servers]
    log.info("trainers exited %d; mask servers %s", rc, codes)
    return rc
