"""MaskClient: a trainer rank's end of the mask stream (DEALER). docs/design.md "Transport".

    client = MaskClient("tcp://127.0.0.1:5555", rank=r, world_size=W, plan_hash=loader.plan.hash,
                        cursor=(epoch, step), num_patches=L, ratio=0.75, seed=cfg.seed)
    mb = client.get(epoch, step, batch.sample_ids)   # MaskBatch: mask [N, L] bool, True = masked

A background I/O thread owns the socket (zmq sockets are not thread-safe), so heartbeats go on
while the trainer computes; public methods talk to it through a command queue plus a wake-up pipe.
The I/O thread grants credits (one per batch handed out or dropped), notices a lost server (no
traffic for 3 heartbeat intervals, a new server_id, a BYE) and recreates the socket with capped
exponential backoff, re-sending HELLO with its cursor (the next batch it has not handed out);
batches it already holds are kept and duplicates are dropped.

What ends the stream reaches `get` as MaskServerError naming the cause: a refusal (PLAN, VERSION,
REPLACED), an I/O thread that failed (a bad endpoint, an unreadable key), a rank worker of the
server that failed twice with no batch handed out in between (the first failure is answered with
a HELLO, which restarts it), a failed CURVE handshake (maskserver/link.py). A weight upload the
server refused (ERROR WEIGHTS) is raised once, by the next get: the stream goes on for a caller
that catches it. BUSY (the rank is held by another run) is retried: `wait` waits for
the rank, `fail` and `random` act after mask_timeout as for a silent server.

run_id names the run (every rank, kept across --resume) and restart_id this launch of it (every
rank, new at each start): the server hands a live rank over only within its run and masks a
launch only with weights that launch sent (maskserver/server.py).

Liveness: the server is "down" once 3 heartbeat intervals pass without a word from it (or before
it ever answered). Then `random` falls back at once instead of waiting --mask-timeout per batch,
and takes served masks again when a server welcomes it back (stats: fallback_down, recovered).
With other servers listed (`others`), a rank whose server has been silent for half of
mask_timeout moves to the next one that serves it, with the same cursor: the same plan batches,
none lost or repeated; the wait for a batch restarts at the switch, so `fail` does not fire
while another server can answer. HELLO carries the run's description (`run`: strategy, model,
source, ratio, lut, targets, epochs), which the server compares with its own.
"""
from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import torch
import zmq

from mimpipe.maskserver import protocol as P
from mimpipe.maskserver.link import Link, LinkError
from mimpipe.maskserver.snapshot import Snapshot, take_snapshot
from mimpipe.maskserver.strategies import random_mask, unpack_mask
from mimpipe.pipeline.plan import batch_generator

log = logging.getLogger("mimpipe.maskclient")
POLICIES = ("wait", "random", "fail")
BACKOFF_MIN, BACKOFF_MAX = 0.1, 2.0  # seconds between socket re-creations (capped exponential)


class MaskServerError(RuntimeError):
    """The server refused this rank (plan or protocol mismatch) or sent an inconsistent batch."""


class MaskWaitInterrupted(Exception):
    """get's should_stop() turned true while it waited for masks (the trainer got SIGTERM/SIGINT)."""


@dataclass
class MaskBatch:
    mask: torch.Tensor  # [N, L] bool, True = masked
    len_keep: torch.Tensor  # [N] long
    targets: dict[str, torch.Tensor] = field(default_factory=dict)  # gpa_target, lut_t1/t2, heads
    teacher_version: int = -1
    teacher_step: int = -1
    fallback: bool = False  # True: the client's random masks, the server did not answer in time


def _masks_to_batch(msg: P.Message) -> MaskBatch:
    f = msg.fields
    mask = unpack_mask(msg.tensor("mask").clone(), f["num_patches"])
    targets = {k: msg.tensor(k).clone() for k in msg.arrays if k not in ("mask", "len_keep")}
    return MaskBatch(mask, msg.tensor("len_keep").long(), targets, f["teacher_version"], f["teacher_step"])


class MaskClient:
    Interrupted = MaskWaitInterrupted   # for callers that do not import this module (no pyzmq there)

    def __init__(self, endpoint: str, *, rank: int, world_size: int, plan_hash: str,
                 cursor: tuple[int, int] = (0, 0), credits: int = 4, mask_timeout: float = 30.0,
                 policy: str = "wait", heartbeat: float = 1.0, curve: tuple[str, str] | None = None,
                 num_patches: int, ratio: float = 0.75, seed: int = 0, run_id: str | None = None,
                 restart_id: str | None = None, others: tuple[str, ...] = (), run: dict | None = None):
        """run_id: the run's identity (default: a run of its own); restart_id: this launch's, the
        same on every rank of it (default: a fresh one). Both [A-Za-z0-9_.:-]{1,64}. others: servers
        to fail over to. run: HELLO's run description (protocol.py), e.g. {"strategy": "sbam",
        "epochs": 10}; "epochs" lets the server exit once every rank has finished."""
        if policy not in POLICIES:
            raise ValueError(f"unknown mask policy {policy!r}; choose from {', '.join(POLICIES)}")
        if not 1 <= credits <= P.MAX_CREDITS:
            raise ValueError(f"credits {credits} outside [1, {P.MAX_CREDITS}]")
        self.rank, self.world_size, self.plan_hash = rank, world_size, plan_hash
        self.credits, self.mask_timeout, self.policy, self.heartbeat = credits, mask_timeout, policy, heartbeat
        self.curve, self.num_patches, self.ratio, self.seed = curve, num_patches, ratio, seed
        self.run = dict(run or {})
        self._link = Link([endpoint, *others], rank, curve)
        self._welcomed = False  # by the current server, since the socket was last made
        self._down = False  # the server missed 3 heartbeats, or never answered yet (see get)
        self._heard = time.monotonic()  # the last message from a server (or the start)
        self._switched_at = 0.0  # when the rank last moved to another listed server
        self.restart_id = restart_id or uuid.uuid4().hex[:16]
        self.run_id = run_id or self.restart_id
        for name, v in (("run_id", self.run_id), ("restart_id", self.restart_id)):
            if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", v):
                raise ValueError(f"rank {rank}: {name} {v!r} must match [A-Za-z0-9_.:-]{{1,64}}")
        self._worker_failed_at: tuple[int, int] | None = None  # our cursor at the server worker's last failure
        self._restarting = False  # a HELLO that restarts the server's worker is on its way
        self._last_busy_log = 0.0
        self.fallbacks: list[tuple[int, int]] = []
        self.stats = {"received": 0, "dropped": 0, "reconnects": 0, "seq_gaps": 0, "errors": 0,
                      "send_dropped": 0, "fallback_down": 0, "recovered": 0, "failovers": 0}
        self.stats.update(weights_sent=0, weights_superseded=0)
        self._snapshot: Snapshot | None = None  # the newest snapshot not yet sent (I/O thread only)
        self._inflight: list[tuple[Snapshot, list]] = []  # sent snapshots and their zmq trackers (I/O thread)
        self.server_id: str | None = None
        self._cursor = tuple(cursor)  # next batch to hand out; guarded by _cv
        self._ready: dict[tuple[int, int], P.Message] = {}
        self._fatal: str | None = None
        self._rejected: list[str] = []  # the server's WEIGHTS errors, raised once by the next get
        self._cv = threading.Condition()
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._closed = False
        self._thread = threading.Thread(target=self._io, name=f"mimpipe-maskclient-r{rank}", daemon=True)
        self._thread.start()

    # ---- public API (any thread) ----
    @property
    def endpoint(self) -> str:
        """The server this rank talks to now (failover moves it along the listed ones)."""
        return self._link.endpoint

    def get(self, epoch: int, step: int, sample_ids, should_stop=None) -> MaskBatch:
        """Masks of batch (epoch, step) of this rank; verifies the sample-id checksum. The wait
        checks should_stop() every 0.2 s and raises MaskWaitInterrupted once it is true."""
        want = P.checksum(np.asarray(sample_ids))
        key = (epoch, step)
        with self._cv:
            if key != self._cursor:
                rollover = key == (self._cursor[0] + 1, 0) and self._cursor[1] > 0  # epoch end: the server
                self._cursor = key  # continues with (epoch + 1, 0) on its own
                kept = {k: v for k, v in self._ready.items() if k >= key}
                if len(kept) < len(self._ready):  # dropped batches give their credits back
                    self._command(("credit", len(self._ready) - len(kept)))
                self._ready = kept
                if not rollover:  # the trainer jumped (resume, skip): restart the stream there
                    self._command(("hello",))
            t0 = last_log = time.monotonic()
            while True:
                if self._rejected:  # raised once: a caller that catches it may go on
                    why, self._rejected = "; ".join(self._rejected), []
                    raise MaskServerError(f"rank {self.rank}: mask server {self.endpoint} rejected our "
                                          f"weights: {why}")
                if key in self._ready:
                    break
                if self._fatal:
                    raise MaskServerError(self._fatal)
                if not self._thread.is_alive():
                    raise MaskServerError(f"rank {self.rank}: mask client I/O thread ended")
                if should_stop is not None and should_stop():
                    raise MaskWaitInterrupted(f"rank {self.rank}: stopped while waiting for masks of epoch "
                                              f"{epoch} step {step} from {self.endpoint}")
                now = time.monotonic()
                start = max(t0, self._switched_at)  # a failover restarts the wait
                if self.policy == "random" and self._down:  # known dead: no --mask-timeout per batch
                    self.stats["fallback_down"] += 1
                    self._advance(key)
                    return self._random(epoch, step, len(sample_ids))
                if now - start >= self.mask_timeout:
                    if self.policy == "random":
                        self._advance(key)
                        return self._random(epoch, step, len(sample_ids))
                    if self.policy == "fail":
                        raise TimeoutError(f"rank {self.rank}: no masks for epoch {epoch} step {step} "
                                           f"within {self.mask_timeout}s: {self.diagnosis()}")
                    if now - last_log >= self.mask_timeout:
                        log.warning("rank %d: still waiting for masks of epoch %d step %d (%.0fs): %s",
                                    self.rank, epoch, step, now - t0, self.diagnosis())
                        last_log = now
                self._cv.wait(min(0.2, max(0.001, self.mask_timeout - (now - start))))
            msg = self._ready.pop(key)
            self._advance(key)
        self._command(("credit", 1))
        f = msg.fields
        if f["checksum"] != want:
            raise MaskServerError(f"rank {self.rank}: epoch {epoch} step {step}: mask server batch has "
                                  f"sample-id checksum {f['checksum']:016x}, this rank's plan {want:016x}")
        if f["n"] != len(sample_ids):
            raise MaskServerError(f"rank {self.rank}: epoch {epoch} step {step}: {f['n']} masks for "
                                  f"{len(sample_ids)} samples")
        return _masks_to_batch(msg)

    def send_weights(self, state_dict: dict, version: int, step: int) -> None:
        """Snapshot `state_dict` now, in its own dtypes, and send it (see send_snapshot)."""
        self.send_snapshot(take_snapshot(state_dict, version, step))

    def send_snapshot(self, snap: Snapshot) -> None:
        """Hand a snapshot (maskserver/snapshot.py) to the I/O thread, which hashes, chunks and sends
        it once its copy is done; it replaces a snapshot still waiting there (one waits at most)."""
        self._command(("snapshot", snap))

    def send_feedback(self, epoch: int, step: int, head_loss_sum, head_count) -> None:
        arrays = {"head_loss_sum": np.asarray(head_loss_sum, np.float32),
                  "head_count": np.asarray(head_count, np.int64)}
        self._command(("send", P.encode(P.FEEDBACK, {"rank": self.rank, "epoch": epoch, "step": step},
                                        arrays)))

    def diagnosis(self) -> str:
        """Why no masks come, in one line naming the endpoint."""
        if self._welcomed and not self._down:
            return f"mask server {self.endpoint} is up but sent no masks for this batch"
        if self.server_id is not None:
            return (f"mask server {self.endpoint} silent for {time.monotonic() - self._heard:.1f}s "
                    f"(heartbeats missed; was it stopped or killed?)")
        return self._link.diagnosis()

    def close(self, timeout: float = 2.0) -> None:
        """BYE with the cursor (the server knows whether this rank finished its plan), then stop."""
        if self._closed:
            return
        self._closed = True
        self._command(("close",))
        self._thread.join(timeout)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- helpers ----
    def _advance(self, key):
        self._cursor = (key[0], key[1] + 1)

    def _random(self, epoch: int, step: int, n: int) -> MaskBatch:
        g = batch_generator(self.seed, epoch, step, self.rank)
        mask = random_mask(n, self.num_patches, self.ratio, generator=g)
        self.fallbacks.append((epoch, step))
        if not self._down:  # while it is down the I/O thread logs the outage and the return instead
            log.warning("rank %d: epoch %d step %d: random fallback (%d so far): %s", self.rank, epoch, step,
                        len(self.fallbacks), self.diagnosis())
        return MaskBatch(mask, (~mask).sum(1), {}, -1, -1, fallback=True)

    def _command(self, cmd) -> None:
        self._cmds.put(cmd)
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # pipe full (already awake) or closed

    # ---- the I/O thread: the only code that touches the socket ----
    def _hello(self, sock: zmq.Socket) -> None:
        with self._cv:
            cursor = list(self._cursor)
        self._send(sock, P.encode(P.HELLO, {"rank": self.rank, "world_size": self.world_size,
                                            "plan_hash": self.plan_hash, "cursor": cursor,
                                            "restart_id": self.restart_id, "credits": self.credits,
                                            "run_id": self.run_id, **self.run}))

    def _send(self, sock: zmq.Socket, frames: list) -> None:
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            self._last_sent = time.monotonic()
        except zmq.Again:  # not connected / HWM: HELLO, CREDIT and heartbeats are re-sent on reconnect
            self.stats["send_dropped"] += 1
            log.warning("rank %d: could not send %s (server unreachable); dropped", self.rank,
                        bytes(frames[0][:40]))

    def _send_snapshot(self, sock: zmq.Socket) -> None:
        """The weights path of the I/O thread: free the buffers zmq is done with; once the waiting
        snapshot's copy is done, hash it, chunk it and queue every chunk (zero-copy, tracked)."""
        for snap, trackers in self._inflight:
            if all(t.done for t in trackers):
                snap.release()
        self._inflight = [(s, t) for s, t in self._inflight if not all(x.done for x in t)]
        snap = self._snapshot
        if snap is None or not snap.ready():
            return
        self._snapshot = None
        if not snap.claim():  # a newer snapshot took its buffer; it is on its way here
            return
        trackers = []
        for frames in snap.chunks():
            try:
                trackers.append(sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False, track=True))
            except zmq.Again:  # a partial upload never counts on the server; the next snapshot will
                self.stats["send_dropped"] += 1
                log.warning("rank %d: weights v%d: could not queue every chunk (server unreachable); dropped",
                            self.rank, snap.version)
                break
        else:
            self.stats["weights_sent"] += 1
        self._last_sent = time.monotonic()
        self._inflight.append((snap, trackers))

    def _io(self) -> None:
        ctx, link, sock = zmq.Context(), self._link, None
        try:  # everything: whatever ends this thread must reach get() as _fatal
            sock = link.open(ctx)
            poller = zmq.Poller()
            for s in (sock, link.monitor, self._wake_r):
                poller.register(s, zmq.POLLIN)
            self._hello(sock)
            last_recv, backoff, seq = time.monotonic(), BACKOFF_MIN, None
            last_hello = last_recv
            switch = False  # a server said RANKS: move on now
            while True:
                # a waiting snapshot's copy event and the zmq trackers of sent ones are polled
                timeout = 0.005 if self._snapshot is not None or self._inflight else self.heartbeat / 2
                events = dict(poller.poll(timeout * 1000))
                now = time.monotonic()
                if self._wake_r in events:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                link.events()  # raises LinkError (a ValueError) for a refused key or a CURVE mismatch
                while True:  # commands from the public methods
                    try:
                        cmd = self._cmds.get_nowait()
                    except queue.Empty:
                        break
                    if cmd[0] == "close":
                        with self._cv:
                            cursor = list(self._cursor)
                        self._send(sock, P.encode(P.BYE, {"cursor": cursor}))
                        # the BYE tells the server whether we finished; no wait for a server not there
                        link.close(linger=int(1000 * self.heartbeat) if self._welcomed and not self._down else 0)
                        sock = None
                        return
                    if cmd[0] == "credit":
                        self._send(sock, P.encode(P.CREDIT, {"rank": self.rank, "n": cmd[1]}))
                    elif cmd[0] == "hello":
                        self._hello(sock)
                    elif cmd[0] == "snapshot":
                        if self._snapshot is not None:  # never sent: the newer one replaces it
                            self._snapshot.release()
                            self.stats["weights_superseded"] += 1
                        self._snapshot = cmd[1]
                    else:
                        self._send(sock, cmd[1])
                self._send_snapshot(sock)
                while sock in events:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    last_recv = self._heard = now
                    action = self._on_message(frames, self._welcomed)
                    if action == "welcome":
                        self._welcomed, backoff, seq = True, BACKOFF_MIN, None
                        self._up()
                    elif action == "restart":  # the server's worker for this rank failed: HELLO restarts it
                        self._hello(sock)
                        last_hello = now
                    elif action == "rehello" and now - last_hello > self.heartbeat / 2:  # rate-limited
                        self._hello(sock)
                        last_hello = now
                    elif action == "lost":
                        last_recv = 0.0  # reconnect below
                    elif action == "ranks":  # this server does not serve us: the next listed one
                        link.refused.add(link.index)
                        if len(link.refused) == len(link.endpoints):
                            self._set_fatal(f"rank {self.rank}: none of the mask servers {link.endpoints} "
                                            f"serves this rank (each server's --ranks)")
                        last_recv, switch = 0.0, True
                    elif isinstance(action, tuple):  # ("masks", seq)
                        if seq is not None and action[1] != seq + 1:
                            self.stats["seq_gaps"] += 1
                            log.warning("rank %d: mask seq %d after %d: a MASKS message was lost",
                                        self.rank, action[1], seq)
                        seq = action[1]
                        if not action[2]:  # dropped: its credit goes back to the server
                            self._send(sock, P.encode(P.CREDIT, {"rank": self.rank, "n": 1}))
                if now - last_recv > 3 * self.heartbeat:  # the server is gone: new socket, re-HELLO
                    if self._fatal:
                        continue
                    self._lost(now)
                    gone = now - self._heard
                    if switch or (gone > self.mask_timeout / 2 and len(link.endpoints) > 1):
                        old = link.endpoint
                        if link.next_server():
                            self.stats["failovers"] += 1
                            self._switched_at, self._heard = now, now
                            backoff = BACKOFF_MIN
                            log.warning("rank %d: mask server %s %s; moving to %s at batch %s", self.rank, old,
                                        "does not serve this rank" if switch else f"silent for {gone:.1f}s",
                                        link.endpoint, list(self._cursor))
                    switch = False
                    for s in (sock, link.monitor):
                        poller.unregister(s)
                    link.close()
                    time.sleep(min(backoff, 0.2))  # sleep briefly; the rest of the backoff is in last_recv
                    sock = link.open(ctx)
                    for s in (sock, link.monitor):
                        poller.register(s, zmq.POLLIN)
                    self.stats["reconnects"] += 1
                    self._hello(sock)
                    self._welcomed = False
                    last_recv = time.monotonic() + backoff - min(backoff, 0.2)
                    backoff = min(2 * backoff, BACKOFF_MAX)
                elif time.monotonic() - self._last_sent > self.heartbeat:
                    self._send(sock, P.encode(P.HEARTBEAT, {"restart_id": self.restart_id}))
        except Exception as e:  # noqa: BLE001 - surfaced through get()
            why = str(e) if isinstance(e, LinkError) else \
                f"rank {self.rank}: mask client I/O thread failed: {e if isinstance(e, ValueError) else repr(e)}"
            if isinstance(e, ValueError):  # a bad endpoint or key file, a failed handshake: the message says it all
                self._set_fatal(why)
            else:
                log.exception("rank %d: mask client I/O thread failed", self.rank)
                with self._cv:
                    self._fatal = why
                    self._cv.notify_all()
        finally:
            link.close()
            ctx.term()

    def _lost(self, now: float) -> None:
        """No word from the server for 3 heartbeats (or none ever): it is down until a WELCOME."""
        if self._down:
            return
        with self._cv:
            self._down = True
            self._cv.notify_all()  # a `random` get waiting now falls back at once
        log.warning("rank %d: mask server %s down: %s%s", self.rank, self.endpoint, self.diagnosis(),
                    "; random masks until it answers" if self.policy == "random" else "")

    def _up(self) -> None:
        if self._down:
            self._down = False
            self.stats["recovered"] += 1
            log.warning("rank %d: mask server %s answers again: served masks from batch %s (%d random "
                        "fallbacks so far)", self.rank, self.endpoint, list(self._cursor), len(self.fallbacks))

    _last_sent = 0.0

    def _on_message(self, frames, welcomed: bool):
        """One message from the server -> None | 'welcome' | 'rehello' | 'lost' | ('masks', seq)."""
        try:
            msg = P.decode([f.buffer for f in frames])
        except P.ProtocolError as e:
            self.stats["errors"] += 1
            log.warning("rank %d: bad message from mask server: %s", self.rank, e)
            return None
        f = msg.fields
        if msg.type == P.WELCOME:
            if f["plan_hash"] != self.plan_hash:  # cannot happen with an honest server; be explicit
                self._set_fatal(f"rank {self.rank}: server plan {f['plan_hash']} != ours {self.plan_hash}")
            if self.server_id is not None and f["server_id"] != self.server_id:
                log.warning("rank %d: mask server restarted (%s -> %s)", self.rank, self.server_id, f["server_id"])
            self.server_id = f["server_id"]
            self._restarting = False
            return "welcome"
        if msg.type == P.HEARTBEAT:
            if self.server_id is not None and f["restart_id"] != self.server_id:
                return "rehello"  # a restarted server: register again with our cursor
            return None
        if msg.type == P.BYE:
            log.warning("rank %d: mask server said BYE", self.rank)
            return "lost"
        if msg.type == P.ERROR:
            if f["code"] == P.E_RANKS and len(self._link.endpoints) > 1:
                log.warning("rank %d: mask server %s: %s", self.rank, self.endpoint, f["message"])
                return "ranks"
            if f["code"] in (P.E_PLAN, P.E_VERSION, P.E_REPLACED, P.E_RANKS):
                self._set_fatal(f"rank {self.rank}: mask server {self.endpoint} refused us: {f['code']}: "
                                f"{f['message']}")
                return None
            if f["code"] == P.E_WEIGHTS:  # the teacher would go on with older weights: the trainer must know
                log.error("rank %d: mask server %s rejected our weights: %s", self.rank, self.endpoint, f["message"])
                with self._cv:
                    self._rejected.append(f["message"])
                    self._cv.notify_all()
                self.stats["errors"] += 1
                return None
            self.stats["errors"] += 1
            if f["code"] == P.E_WORKER:
                return self._worker_failed(f["message"])
            if f["code"] == P.E_BUSY:  # another run holds the rank (or its key differs): ask again later
                now = time.monotonic()
                if now - self._last_busy_log >= max(self.mask_timeout, 5 * self.heartbeat):
                    log.warning("rank %d: mask server: %s; asking again", self.rank, f["message"])
                    self._last_busy_log = now
                return "rehello"
            log.warning("rank %d: mask server error %s: %s", self.rank, f["code"], f["message"])
            return "rehello" if f["code"] == P.E_STATE else None
        if msg.type == P.MASKS:
            if f["rank"] != self.rank:
                self.stats["errors"] += 1
                return None
            key = (f["epoch"], f["step"])
            self.stats["received"] += 1
            with self._cv:
                keep = key >= self._cursor and key not in self._ready
                if keep:
                    self._ready[key] = msg
                    self._cv.notify_all()
            if not keep:  # a duplicate after a re-HELLO or a batch we already fell back on
                self.stats["dropped"] += 1
            return ("masks", f["seq"], keep)
        return None

    def _worker_failed(self, why: str):
        """ERROR WORKER: restart the server's worker with a HELLO, unless it failed already at this
        cursor (no batch handed out since): a failure that repeats is the trainer's error."""
        if self._restarting:
            return None  # the repeat of a failure our HELLO already answers
        with self._cv:
            cursor = self._cursor
        if cursor == self._worker_failed_at:
            self._set_fatal(f"rank {self.rank}: the mask server's worker for this rank failed again at "
                            f"batch {list(cursor)} after a restart: {why}")
            return None
        log.warning("rank %d: %s; restarting it at batch %s", self.rank, why, list(cursor))
        self._worker_failed_at, self._restarting = cursor, True
        return "restart"

    def _set_fatal(self, why: str) -> None:
        log.error(why)
        with self._cv:
            self._fatal = why
            self._cv.notify_all()
