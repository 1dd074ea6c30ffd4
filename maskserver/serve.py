"""`mimpipe maskserver`: the socket shell around MaskServer (server.py) and the command.

One thread owns the ROUTER socket (zmq sockets are not thread-safe): it receives, hands each frame
list to `MaskServer.handle`, sends what `MaskServer.ready` releases, and writes stats; it never
blocks longer than a poll.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import torch
import zmq

from mimpipe.maskserver import protocol as P
from mimpipe.maskserver.server import MaskServer, ServerConfig
from mimpipe.maskserver.strategies import STRATEGIES
from mimpipe.pipeline.plan import add_plan_arguments, plan_config_from_args
from mimpipe.tools.argtypes import float_range, nonneg_int, positive_float, positive_int

log = logging.getLogger("mimpipe.maskserver")


# ---- the socket shell ----
RCVHWM = 256  # messages queued per peer: a weights upload (a few dozen chunks) fits, a flood does not


def make_socket(ctx: zmq.Context, bind: str, curve_dir: str | None, frame_limit: int = P.MAX_ARRAY_BYTES):
    """The ROUTER, bound; with CURVE, only the public keys in curve_dir/clients may connect.

    frame_limit (MaskServer.frame_limit) is ZMQ_MAXMSGSIZE: libzmq buffers every frame of a
    multipart message before the serve loop can count them, so the largest frame a peer may send
    is what a teacher of this size implies, and a bigger one disconnects its sender unread."""
    auth = None
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, frame_limit)
    sock.setsockopt(zmq.RCVHWM, RCVHWM)
    sock.setsockopt(zmq.SNDHWM, 1000)
    try:
        if curve_dir:
            from zmq.auth.thread import ThreadAuthenticator
            from mimpipe.maskserver.keys import KeyList, server_keys
            clients = Path(curve_dir) / "clients"
            if not clients.is_dir():
                raise ValueError(f"--curve {curve_dir}: no clients/ folder of public keys (run `mimpipe keys`)")
            sock.curve_publickey, sock.curve_secretkey = server_keys(curve_dir)
            auth = ThreadAuthenticator(ctx)
            auth.start()
            auth.configure_curve_callback(domain="*", credentials_provider=KeyList(clients))
            sock.curve_server = True
        try:
            sock.bind(bind)
        except zmq.ZMQError as e:  # port in use, no such interface, not an address
            raise ValueError(f"--bind {bind}: {e.strerror}") from None
    except BaseException:
        sock.close(linger=0)
        if auth is not None:
            auth.stop()
        raise
    return sock, auth


def _user(frame: zmq.Frame) -> str | None:
    """The CURVE key (z85) the ZAP handler authenticated this message's sender with."""
    try:
        return frame.get("User-Id") or None
    except zmq.ZMQError:
        return None


def serve(server: MaskServer, sock: zmq.Socket, stop: threading.Event, *, stats_every: float = 10.0,
          stats_file: str | None = None, curve: bool = False, until_done: bool = False) -> None:
    """The serve loop: receive, handle, send what is ready; never blocks longer than a poll.
    until_done: also return once every rank served has finished its plan (MaskServer.done)."""
    poll_ms = max(1, int(min(0.05, server.cfg.heartbeat / 4) * 1000))
    t_stats, sent_before = time.monotonic(), 0
    while not stop.is_set() and not (until_done and server.done()):
        now = time.monotonic()
        for _ in range(100) if sock.poll(poll_ms) else ():  # bounded burst, then send
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            if len(frames) >= 2:  # [identity, *message]; anything else has no sender to answer
                server.handle(frames[0].bytes, [f.buffer for f in frames[1:]], now,
                              _user(frames[1]) if curve else None)
            else:
                server.counts["bad_frames"] += 1
        for identity, frames in server.ready(time.monotonic()):
            try:
                sock.send_multipart([identity, *frames], flags=zmq.NOBLOCK, copy=False)
            except zmq.ZMQError:  # peer gone or its pipe full: heartbeats/credits recover
                server.counts["send_dropped"] += 1
        if now - t_stats >= stats_every:
            rate = (server.counts["batches"] - sent_before) / (now - t_stats)
            report(server.stats(now, rate), stats_file)
            t_stats, sent_before = now, server.counts["batches"]
    for identity, frames in server.bye():
        try:
            sock.send_multipart([identity, *frames], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
    report(server.stats(time.monotonic(), 0.0), stats_file)


def report(stats: dict, path: str | None) -> None:
    ranks = " ".join(f"r{r}:q{v['queue']}/c{v['credits']}/s{v['staleness']}" for r, v in stats["ranks"].items())
    log.info("%.1f batches/s, teacher v%d, ranks %s, bad frames %d, freed %d", stats["batches_per_s"],
             stats["teacher_version"], ranks or "-", stats["bad_frames"], len(stats["freed"]))
    if path and str(path).endswith(".jsonl"):   # a timeline: one snapshot per period
        with open(path, "a") as f:
            f.write(json.dumps(stats) + "\n")
    elif path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(stats, f)
        os.replace(tmp, path)  # readers never see a half-written file


# ---- the command ----
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, help="shard folder with manifest.json")
    p.add_argument("--strategy", required=True, choices=tuple(STRATEGIES))
    p.add_argument("--model", required=True, help="teacher architecture, e.g. mae_vit_base_patch16")
    p.add_argument("--source", default=None, help="online | momentum | frozen:PATH (default: the "
                   "strategy's paper choice; momentum for gpa without a checkpoint)")
    p.add_argument("--ratio", type=float_range(0.0, 1.0, hi_open=True), default=0.75)
    p.add_argument("--block", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--decoder", default="dali", choices=("dali", "pil"))
    p.add_argument("--threads", type=positive_int, default=1, help="decoder threads per rank")
    p.add_argument("--bind", default="tcp://127.0.0.1:5555")
    p.add_argument("--ranks", type=rank_list, default=None,
                   help="ranks served: a comma list of ranks and ranges, e.g. 0-7 or 0-3,6 (default: all)")
    p.add_argument("--max-ahead", type=positive_int, default=4, help="batches queued per rank")
    p.add_argument("--epochs", type=positive_int, default=100, help="for progress = epoch / epochs (gpa)")
    p.add_argument("--lut", action="store_true", help="send LUT targets (momentum teacher, 2 views)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="strategy option, repeatable (e.g. head=1 for gpa on a 2-head model)")
    p.add_argument("--stats-file", default=None,
                   help="JSON snapshot of the stats; a .jsonl name appends one line per period instead")
    p.add_argument("--stats-every", type=positive_float, default=10.0, help="seconds")
    p.add_argument("--curve", default=None, help="key folder from `mimpipe keys`: CURVE auth on")
    p.add_argument("--heartbeat", type=positive_float, default=1.0, help="seconds; 3 silent intervals = dead")
    p.add_argument("--score-cache", type=nonneg_int, default=0, metavar="K",
                   help="gpa, idm, attmask: cache each image's teacher score on its whole view and resample it "
                        "onto every epoch's crop, refreshed every K epochs (a frozen teacher: never); 0 = off, "
                        "the exact path (docs/methods.md 8)")
    p.add_argument("--score-cache-dir", default=None, metavar="DIR",
                   help="keep the score cache memory-mapped in DIR (ImageNet scale); a restarted server "
                        "reloads a frozen teacher's entries from it")
    p.add_argument("--keep-alive", action="store_true", help="keep serving after every rank finished its plan "
                   "(default: exit 0 with a summary once each rank that registered said BYE at its last epoch)")
    add_plan_arguments(p)


def rank_list(text: str) -> tuple[int, ...]:
    """'0-3,6' -> (0, 1, 2, 3, 6): comma-separated ranks and inclusive ranges, in order, no repeats."""
    ranks: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi if sep else lo)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: {part.strip()!r} is not a rank or a range "
                                             f"like 0-7") from None
        if a < 0 or b < a:
            raise argparse.ArgumentTypeError(f"{text!r}: {part.strip()!r} is not a rank >= 0 or a range lo-hi "
                                             f"with lo <= hi")
        ranks += [r for r in range(a, b + 1) if r not in ranks]
    return tuple(ranks)


def parse_option(text: str) -> tuple[str, object]:
    """'head=11' -> ('head', 11): JSON values (numbers, true/false), else the string itself."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise ValueError(f"--option {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def main(args: argparse.Namespace) -> int:
    from mimpipe.maskserver.teacher import Teacher, default_source
    from mimpipe.pipeline.loader import Loader
    from mimpipe.pipeline.manifest import load_manifest
    from mimpipe.pipeline.plan import Plan
    from mimpipe.train.model import model_config

    manifest = load_manifest(args.shards)
    plan_cfg = plan_config_from_args(args, model_config(args.model).img_size)
    ranks = tuple(range(args.world_size)) if args.ranks is None else args.ranks
    bad = [r for r in ranks if not 0 <= r < args.world_size]
    if bad:
        raise ValueError(f"--ranks: ranks {bad} outside world size {args.world_size}")
    cfg = ServerConfig(args.strategy, args.ratio, args.block, ranks, args.max_ahead, args.heartbeat,
                       args.epochs, args.lut, tuple(parse_option(o) for o in args.option), args.model)
    # LUT's projector travels only when LUT targets are served; otherwise the EMA encoder is all
    args.source = args.source or default_source(args.strategy)
    teacher = Teacher(args.model, args.source, strategy=args.strategy, block=args.block, device=args.device,
                      projector_hidden=4096 if args.lut else None, img_size=plan_cfg.img_size)
    plan = Plan(manifest, plan_cfg, ranks[0] if ranks else 0)
    # decode where the teacher runs (make_loader runs in a rank's worker thread, whose current
    # CUDA device is 0 whatever the main thread set: name the GPU)
    gpu = teacher.device.type == "cuda"
    gpu_id = (teacher.device.index if teacher.device.index is not None else torch.cuda.current_device()) \
        if gpu else None

    def make_loader(rank: int):
        return Loader(manifest, plan_cfg, rank, decoder=args.decoder, threads=args.threads, prefetch=2,
                      device="gpu" if gpu else "cpu", device_id=gpu_id)

    from mimpipe.maskserver.score_cache import CachedMasks, check_flags
    check_flags(args.score_cache, args.score_cache_dir)
    scores = None
    if args.score_cache:
        scores = CachedMasks(teacher, args.strategy, table=manifest.table, every=args.score_cache, block=args.block,
                             options=dict(cfg.options), interpolation=plan_cfg.interpolation, seed=plan_cfg.seed,
                             folder=args.score_cache_dir)
    server = MaskServer(cfg, teacher, make_loader, plan.hash, plan.steps, plan_cfg.seed, args.world_size, scores)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ctx = zmq.Context()
    try:
        sock, auth = make_socket(ctx, args.bind, args.curve, server.frame_limit)
    except BaseException:
        ctx.term()
        raise
    log.info("mask server %s: %s on %s, teacher %s (%s, v%d), ranks %s, plan %s, %d steps/epoch, "
             "%d patches", server.server_id, args.strategy, args.bind, args.model, args.source, teacher.version,
             list(ranks), plan.hash, plan.steps, server.num_patches)
    print(f"mimpipe maskserver: ready on {args.bind} (server_id {server.server_id}, plan {plan.hash})",
          flush=True)
    try:
        serve(server, sock, stop, stats_every=args.stats_every, stats_file=args.stats_file,
              curve=bool(args.curve), until_done=not args.keep_alive)
    finally:
        for st in list(server.ranks.values()):
            server.free(st.rank, "server shutting down")
        for w in server.workers:
            w.join(5.0)
        sock.close(linger=0)
        if auth is not None:
            auth.stop()
        ctx.term()
    log.info("mask server %s stopped", server.server_id)
    if server.done():
        c = server.counts
        print(f"mimpipe maskserver: run finished: ranks {sorted(server.finished)} done, {c['batches']} batches, "
              f"{c['weights_applied']} weight updates, {c['rejected']} messages rejected, {c['worker_failures']} "
              f"worker failures; exiting", flush=True)
    return 0
