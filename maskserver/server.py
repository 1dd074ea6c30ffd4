"""The mask server's core: per-rank state, workers and message handling, no socket (that shell and
the `mimpipe maskserver` command are maskserver/serve.py). docs/design.md "Mask server", "Transport".

Threads (zmq sockets are not thread-safe, so exactly one thread touches the socket):
    socket thread   `serve`: the ROUTER; decodes every frame list (protocol.decode), hands it to
                    `MaskServer.handle`, sends queued MASKS to ranks holding credits, heartbeats,
                    declares silent ranks dead, writes stats. Never blocks without a timeout.
    rank workers    one per served rank (`MaskServer._work`): runs the rank's Loader from its cursor
                    (the Loader's own thread decodes ahead), computes masks on the shared teacher
                    (one lock, so weights are swapped between batches), packs and encodes MASKS and
                    puts them on the rank's bounded queue (`--max-ahead`).
A rank's HELLO with a cursor bumps its `generation`: the worker restarts there and queued
batches of older generations are dropped. A worker whose loader or teacher fails queues ERROR
WORKER behind the batches it made (sent again at every heartbeat) and waits: the rank's next
HELLO restarts it with a new loader.

Runs (HELLO's run_id, restart_id = one launch of the run; protocol.py): the server serves one run
at a time, because its teacher is shared. The teacher's weights belong to one launch (`session`):
the first HELLO of a new run or of a new launch of the same run (a restart, --resume) resets the
teacher to no weights (version -1, random masks) and its version counter, so no launch is masked
with weights it did not send, and only that launch's uploads count. A live rank passes to another
peer only with the same run_id (and, under CURVE, the same client key): a restarted trainer takes
its rank back at once, anyone else gets ERROR BUSY (logged) until the rank is freed; a replaced
launch gets ERROR REPLACED. Mask noise comes from `batch_generator(seed, epoch,
step, rank)`, so masks do not depend on timing. Until an online/momentum teacher has weights
(version -1) the server sends random masks stamped teacher_version -1.
Staleness = the rank's latest reported global step (epoch * steps + step) - the teacher's step:
the trainer sends weights stamped with its global step.
"""
from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
import uuid
from contextlib import closing
from dataclasses import dataclass, field

import numpy as np
import torch

from mimpipe.maskserver import protocol as P
from mimpipe.maskserver.weights import AssemblyThread, WeightAssembler, snapshot_limit
from mimpipe.maskserver.client import batch_generator
from mimpipe.maskserver.strategies import get_strategy, pack_mask, plb_update, random_mask

log = logging.getLogger("mimpipe.maskserver")
MAX_ERROR_REPLIES = 100  # per peer: a rogue sender is not answered forever (amplification)
MAX_RETIRED = 64  # replaced launches remembered (REPLACED instead of a fight over the rank)


# ---- configuration shared with the trainer ----
@dataclass(frozen=True)
class ServerConfig:
    strategy: str
    ratio: float = 0.75
    block: int | None = None
    ranks: tuple[int, ...] = (0,)
    max_ahead: int = 4
    heartbeat: float = 1.0
    epochs: int = 100  # progress = epoch / epochs (gpa's soft-to-hard schedule)
    lut: bool = False  # also send LUT targets (momentum teacher, two views)
    options: tuple[tuple[str, object], ...] = ()  # strategy keyword options, e.g. (("head", 1),)
    model: str | None = None  # the teacher architecture, compared with the trainer's --model at HELLO

    def __post_init__(self):
        # queue.Queue(0) is unbounded: --max-ahead 0 would let a worker run a whole epoch ahead
        if self.max_ahead < 1 or self.heartbeat <= 0 or self.epochs < 1 or not 0 <= self.ratio < 1:
            raise ValueError(f"server config out of range: max_ahead {self.max_ahead} (>= 1), heartbeat "
                             f"{self.heartbeat} (> 0), epochs {self.epochs} (>= 1), ratio {self.ratio} (in [0, 1))")


@dataclass
class RankState:
    rank: int
    identity: bytes
    run_id: str
    restart_id: str  # the launch
    user: str | None  # the peer's CURVE key (z85) under CURVE, else None
    cursor: tuple[int, int]  # next batch to send (socket thread)
    credits: int
    last_seen: float
    start: tuple[int, int] = (0, 0)  # where the worker (re)starts; set by HELLO
    generation: int = 0
    queue: "queue.Queue" = field(default_factory=queue.Queue)
    seq: int = 0
    sent: int = 0
    reported: tuple[int, int] = (0, 0)
    last_sent: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)
    worker: threading.Thread | None = None
    failed: str | None = None  # the worker's failure, until a HELLO restarts it
    held: tuple | None = None  # the queue's next item, taken out while it waits for a credit
    epochs: int | None = None  # the run's length, from HELLO (None: an older client, never "finished")


class MaskServer:
    """The core: message handling and the per-rank workers. No socket here (see `serve`)."""

    def __init__(self, cfg: ServerConfig, teacher, make_loader, plan_hash: str, steps: int, seed: int,
                 world_size: int, scores=None):
        """make_loader(rank) -> a Loader of that rank (called in the rank's worker thread).
        scores: a score_cache.CachedMasks (--score-cache), or None: the exact path."""
        self.cfg, self.teacher, self.make_loader, self.world_size = cfg, teacher, make_loader, world_size
        self.scores = scores
        self.plan_hash, self.steps, self.seed = plan_hash, steps, seed
        self.server_id = uuid.uuid4().hex[:16]
        self.num_patches = teacher.cfg.num_patches
        self.ranks: dict[int, RankState] = {}
        self.workers: list[threading.Thread] = []  # joined at shutdown (a thread inside DALI at exit aborts)
        self.by_identity: dict[bytes, int] = {}
        self.lock = threading.Lock()  # the teacher, pending weights, PLB state
        self.session: tuple[str, str] | None = None  # (run_id, restart_id) the teacher's weights belong to
        self.retired: dict[tuple[str, str], None] = {}  # launches replaced by a newer one of their run
        # every peer-driven allocation is bounded by the teacher: an upload by its own size, a frame
        # (serve.py sets ZMQ_MAXMSGSIZE to frame_limit) by a header, a weights chunk or a feedback
        expect = teacher.held_spec() if teacher.kind != "frozen" else {}
        limit = snapshot_limit(expect)
        self.frame_limit = max(P.MAX_HEADER_BYTES, min(P.DEFAULT_CHUNK_BYTES, limit))
        # uploads are copied into place and hashed on a thread of their own, not the socket thread
        self.assembler = AssemblyThread(WeightAssembler(version=teacher.version, max_bytes=limit, expect=expect),
                                        self._assembled, max_waiting=max(limit, self.frame_limit))
        self.pending = None  # Weights waiting for the next batch boundary
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()  # (identity, frames) from workers
        self.feedback_seen: set[tuple[int, int, int]] = set()
        self.plb_epoch, self.plb_sum, self.plb_count, self.plb_prev = None, None, None, None
        self.head_probs = None
        self.counts = {"batches": 0, "bad_frames": 0, "rejected": 0, "errors_sent": 0, "send_dropped": 0,
                       "weights_applied": 0, "feedback": 0, "feedback_dup": 0, "feedback_stale": 0,
                       "hello_refused": 0, "worker_failures": 0, "weights_dropped": 0}
        self.freed: list[dict] = []
        self.peer_errors: dict[bytes, int] = {}
        self.served: set[int] = set()  # ranks that registered here
        self.finished: set[int] = set()  # ranks that said BYE at the end of their plan

    # ---- inbound ----
    def handle(self, identity: bytes, frames: list, now: float, user: str | None = None) -> None:
        """One message from `identity` (CURVE key `user`); replies go to self.outbox. Never raises
        on peer input."""
        try:
            msg = P.decode(frames)
        except P.ProtocolError as e:
            self.counts["bad_frames"] += 1
            log.debug("peer %s: %s", identity.hex(), e)
            return self._error(identity, e.code, e.message)
        rank = self.by_identity.get(identity)
        st = self.ranks.get(rank) if rank is not None else None
        if st is not None:
            st.last_seen = now
        if msg.type == P.HELLO:
            return self._hello(identity, msg.fields, now, user)
        if st is None:
            return self._error(identity, P.E_STATE, f"{msg.type} from an unregistered peer; send HELLO")
        if msg.type in (P.CREDIT, P.FEEDBACK) and msg.fields["rank"] != st.rank:
            return self._error(identity, P.E_STATE, f"rank {st.rank}: message names rank {msg.fields['rank']}")
        if msg.type == P.CREDIT:
            st.credits = min(P.MAX_CREDITS, st.credits + msg.fields["n"])
        elif msg.type == P.WEIGHTS:
            self._weights(identity, st, msg)
        elif msg.type == P.FEEDBACK:
            self._feedback(identity, st, msg)
        elif msg.type == P.BYE:
            self._bye(st, msg.fields)
        elif msg.type in (P.HEARTBEAT, P.ERROR):
            if msg.type == P.ERROR:
                log.warning("rank %d says: %s: %s", st.rank, msg.fields["code"], msg.fields["message"])
        else:
            self._error(identity, P.E_TYPE, f"rank {st.rank}: a server does not take {msg.type!r}")

    def _error(self, identity: bytes, code: str, message: str) -> None:
        """Reject a message: count it, log the first few per peer, answer up to MAX_ERROR_REPLIES."""
        self.counts["rejected"] += 1
        n = self.peer_errors.get(identity, 0) + 1
        if len(self.peer_errors) > 10000:  # bounded memory under a flood of new identities
            self.peer_errors.clear()
        self.peer_errors[identity] = n
        if n <= 3:
            log.warning("peer %s: rejected: %s: %s", identity.hex()[:16], code, message[:200])
        if n <= MAX_ERROR_REPLIES:
            self.counts["errors_sent"] += 1
            self.outbox.put((identity, P.ProtocolError(code, message).frames()))

    def _hello(self, identity: bytes, f: dict, now: float, user: str | None) -> None:
        rank = f["rank"]
        if f["plan_hash"] != self.plan_hash or f["world_size"] != self.world_size:
            log.warning("rank %d: plan mismatch: trainer %s (world %d), server %s (world %d)", rank,
                        f["plan_hash"], f["world_size"], self.plan_hash, self.world_size)
            return self._error(identity, P.E_PLAN, f"rank {rank}: plan hash {f['plan_hash']} (world size "
                               f"{f['world_size']}) != mask server's {self.plan_hash} (world size "
                               f"{self.world_size}): check dataset, seed, batch size, views, img size")
        # E_PLAN: a configuration error the trainer cannot fix by retrying (E_STATE means "send HELLO")
        differs = self._differs(f)
        if differs:
            log.warning("rank %d: refused: %s", rank, differs)
            return self._error(identity, P.E_PLAN, f"rank {rank}: the trainer and this mask server disagree on "
                               f"what makes the masks: {differs}")
        if rank not in self.cfg.ranks:  # RANKS: a trainer with other servers listed tries the next one
            return self._error(identity, P.E_RANKS, f"rank {rank}: this server serves ranks {list(self.cfg.ranks)}")
        epoch, step = f["cursor"]
        if step > self.steps:
            return self._error(identity, P.E_PLAN, f"rank {rank}: plan cursor {f['cursor']} > epoch length "
                               f"{self.steps}")
        if step == self.steps:
            epoch, step = epoch + 1, 0
        run, launch = f.get("run_id", f["restart_id"]), f["restart_id"]
        if (run, launch) in self.retired:
            return self._error(identity, P.E_REPLACED, f"rank {rank}: this launch of the run was replaced by "
                               f"a newer one (a restarted trainer holds the rank now); stop this process")
        refused = self._refuse(rank, run, user, identity, now)
        if refused:
            self.counts["hello_refused"] += 1
            return self._error(identity, P.E_BUSY, f"rank {rank}: HELLO refused: {refused}")
        if self.session != (run, launch):
            self._new_session(run, launch)
        st = self.ranks.get(rank)
        if st is None:
            st = self.ranks[rank] = RankState(rank, identity, run, launch, user, (epoch, step), 0, now,
                                              queue=queue.Queue(self.cfg.max_ahead))
            what = "registered"
        else:
            what = "restarted trainer" if launch != st.restart_id else "re-registered"
        self.by_identity.pop(st.identity, None)
        st.identity, st.restart_id, st.cursor, st.last_seen = identity, launch, (epoch, step), now
        st.credits, st.seq, st.reported = f["credits"], 0, (epoch, step)
        st.start, st.failed, st.epochs = (epoch, step), None, f.get("epochs")
        self.served.add(rank)
        self.finished.discard(rank)
        st.generation += 1  # after start: the worker reads generation first
        _drain(st.queue)
        st.held = None
        self.by_identity[identity] = rank
        self.peer_errors.pop(identity, None)
        log.info("rank %d: %s at cursor (%d, %d), %d credits (run %s)", rank, what, epoch, step, st.credits,
                 _fingerprint(run))
        self.outbox.put((identity, P.encode(P.WELCOME, {
            "server_id": self.server_id, "plan_hash": self.plan_hash, "teacher_version": self.teacher.version,
            "strategy": self.cfg.strategy, "num_patches": self.num_patches, "cursor": [epoch, step]})))
        # after WELCOME: a worker that fails at once reports it after the WELCOME it belongs to
        if st.worker is None or not st.worker.is_alive():
            st.worker = threading.Thread(target=self._work, args=(st,), name=f"mimpipe-mask-r{rank}", daemon=True)
            st.worker.start()
            self.workers = [w for w in self.workers if w.is_alive()] + [st.worker]

    def _differs(self, f: dict) -> str:
        """What in HELLO's run description (protocol.py) would make this server's masks wrong for the
        trainer, both values named; '' if nothing (an absent field is not compared)."""
        ours = {"strategy": self.cfg.strategy, "model": self.cfg.model, "source": self.teacher.kind,
                "ratio": self.cfg.ratio, "lut": self.cfg.lut}
        if self.cfg.strategy == "gpa":
            ours["epochs"] = self.cfg.epochs  # GPA's schedule: progress = epoch / epochs
        flags = {"strategy": "--strategy", "model": "--model", "source": "--source / --teacher-source",
                 "lut": "--lut / --server-lut", "ratio": "--ratio / --mask-ratio", "epochs": "--epochs"}
        bad = [f"{k} ({flags[k]}): trainer {f[k]!r}, mask server {v!r}" for k, v in ours.items()
               if k in f and v is not None and (abs(f[k] - v) > 1e-9 if k == "ratio" else f[k] != v)]
        sends = {"gpa_target": self.cfg.strategy == "gpa"}  # --mam's target
        bad += [f"targets: trainer needs {t} (--mam), mask server (--strategy {self.cfg.strategy}) sends "
                f"none" for t in f.get("targets", ()) if not sends.get(t)]
        return "; ".join(bad)

    def _bye(self, st: RankState, f: dict) -> None:
        """BYE: the rank is done here; at or past its plan's end (cursor >= [epochs, 0]) it finished."""
        epoch, step = f.get("cursor", (0, 0))
        if step >= self.steps:
            epoch, step = epoch + 1, 0
        if st.epochs is not None and "cursor" in f and (epoch, step) >= (st.epochs, 0):
            self.finished.add(st.rank)
        self.free(st.rank, "bye" + (" (finished its plan)" if st.rank in self.finished else ""))

    def done(self) -> bool:
        """Every rank that registered here finished its plan and none is live: the run is over.
        (Ranks of a DDP job move in lock step, so one cannot finish before another registers.)"""
        return bool(self.served) and not self.ranks and self.served <= self.finished

    def _refuse(self, rank: int, run: str, user: str | None, identity: bytes, now: float) -> str | None:
        """Why a HELLO for `rank` from run `run` may not have it now, or None. The run_id is the proof
        (the server never shows it: logs carry a fingerprint), under CURVE the client key too."""
        others = sorted(r for r, st in self.ranks.items() if st.run_id != run)
        if others:
            return (f"this server serves another run (ranks {others}) until its ranks say BYE or fall "
                    f"silent for {3 * self.cfg.heartbeat:g}s")
        st = self.ranks.get(rank)
        if st is not None and st.identity != identity and st.user != user:
            return f"rank {rank} is held by another CURVE key (heard from {now - st.last_seen:.1f}s ago)"
        return None

    def _new_session(self, run: str, launch: str) -> None:
        """The first HELLO of a new run, or of a new launch of this one: no weights it did not send."""
        old = self.session
        with self.lock:
            self.session = (run, launch)
            self.teacher.reset()
            if self.scores is not None:
                self.scores.reset()
            self.assembler.reset(self.teacher.version)
            self.pending = None
            self.feedback_seen, self.plb_epoch, self.plb_sum, self.plb_count = set(), None, None, None
            if old is None or old[0] != run:  # PLB's p belongs to the run: a restart keeps it
                self.head_probs = self.plb_prev = None
        if old is not None and old[0] == run:
            self.retired[old] = None
            while len(self.retired) > MAX_RETIRED:
                self.retired.pop(next(iter(self.retired)))
        log.warning("run %s, launch %s: %s; teacher at v%d until this launch sends weights", _fingerprint(run),
                    launch, "a new run" if old is None or old[0] != run else "the run restarted",
                    self.teacher.version)

    def _position(self, st: RankState) -> int:
        """The furthest global step (epoch * steps + step) this server knows rank st to be at."""
        return max(e * self.steps + s for e, s in (st.cursor, st.reported))

    def _weights(self, identity: bytes, st: RankState, msg: P.Message) -> None:
        f = msg.fields
        if (st.run_id, st.restart_id) != self.session:
            return self._error(identity, P.E_STATE, f"rank {st.rank}: weights from a launch that no longer owns "
                               f"the teacher; dropped")
        bound = self._position(st) + self.steps  # an epoch of slack: a trainer on fallback masks runs ahead
        if max(f["version"], f["step"]) > bound:
            return self._error(identity, P.E_WEIGHTS, f"rank {st.rank}: weights version {f['version']} step "
                               f"{f['step']} > its position {bound - self.steps} + one epoch ({self.steps})")
        if not self.assembler.submit((self.session, identity, st.rank), msg):
            # no ERROR: the trainer's next snapshot replaces this one, which can no longer complete
            self.counts["weights_dropped"] += 1
            if self.counts["weights_dropped"] % 64 == 1:  # an upload is ~40 chunks: a line per upload or so
                log.warning("rank %d: weights v%d chunk %d dropped (%d so far): %d bytes of chunks wait for "
                            "assembly already", st.rank, f["version"], f["chunk"], self.counts["weights_dropped"],
                            self.assembler.waiting)

    def _assembled(self, tag: tuple, w, err: P.ProtocolError | None) -> None:
        """The AssemblyThread's result, on its thread: an upload's error goes to its sender, a complete
        snapshot of the launch that still owns the teacher waits for the next batch boundary."""
        session, identity, rank = tag
        if err is not None:
            return self._error(identity, err.code, f"rank {rank}: {err.message}")
        with self.lock:
            if session != self.session:  # a new launch took the teacher while this one was assembled
                return
            self.pending = w
        log.info("rank %d: weights v%d (step %d) complete; applied before the next batch", rank, w.version, w.step)

    def _feedback(self, identity: bytes, st: RankState, msg: P.Message) -> None:
        """PLB feedback of a batch this server sent the rank, for the teacher's heads, counted once."""
        f = msg.fields
        key, M, H = (f["epoch"], f["step"]), len(msg.arrays["head_loss_sum"]), self.teacher.cfg.num_heads
        if M != H:
            return self._error(identity, P.E_VALUE, f"rank {st.rank}: feedback for {M} heads; the teacher has {H}")
        if f["step"] >= self.steps or key >= st.cursor:
            return self._error(identity, P.E_VALUE, f"rank {st.rank}: feedback for batch {list(key)}, which this "
                               f"server has not sent it (next {list(st.cursor)}, {self.steps} steps per epoch)")
        if self.plb_epoch is not None and f["epoch"] < self.plb_epoch:
            self.counts["feedback_stale"] += 1  # its epoch's PLB update is done
            return
        if key + (st.rank,) in self.feedback_seen:
            self.counts["feedback_dup"] += 1
            return
        self.feedback_seen.add(key + (st.rank,))  # only epochs >= plb_epoch: pruned at each epoch end
        st.reported = max(st.reported, key)
        s = torch.from_numpy(msg.arrays["head_loss_sum"].astype(np.float64))
        c = torch.from_numpy(msg.arrays["head_count"].astype(np.int64))
        with self.lock:
            if self.plb_epoch is not None and f["epoch"] > self.plb_epoch:
                self._plb_epoch_end()
            self.plb_epoch = f["epoch"]
            self.plb_sum = s if self.plb_sum is None else self.plb_sum + s
            self.plb_count = c if self.plb_count is None else self.plb_count + c
        self.counts["feedback"] += 1

    def _plb_epoch_end(self) -> None:
        """PLB (docs/methods.md 5.3): p <- plb_update at the end of each epoch; idm samples heads from p."""
        M = len(self.plb_sum)
        p = self.head_probs if self.head_probs is not None else torch.full((M,), 1.0 / M, dtype=torch.float64)
        try:
            self.head_probs, self.plb_prev = plb_update(p, self.plb_sum, self.plb_count, self.plb_prev)
            log.info("PLB after epoch %d: p = %s", self.plb_epoch, np.round(self.head_probs.numpy(), 4).tolist())
        except ValueError as e:
            log.warning("PLB update after epoch %d skipped: %s", self.plb_epoch, e)
        self.feedback_seen = {k for k in self.feedback_seen if k[0] > self.plb_epoch}
        self.plb_sum = self.plb_count = None

    def free(self, rank: int, why: str) -> None:
        st = self.ranks.pop(rank, None)
        if st is None:
            return
        self.by_identity.pop(st.identity, None)
        st.stop.set()
        _drain(st.queue)
        self.freed.append({"rank": rank, "why": why, "time": time.time()})
        log.warning("rank %d: %s; its producer and queue are freed", rank, why)

    # ---- outbound (socket thread) ----
    def ready(self, now: float):
        """(identity, frames) to send now: worker replies, MASKS for ranks with credit, heartbeats."""
        while True:
            try:
                yield self.outbox.get_nowait()
            except queue.Empty:
                break
        for st in list(self.ranks.values()):
            if now - st.last_seen > 3 * self.cfg.heartbeat:
                self.free(st.rank, f"silent for {now - st.last_seen:.1f}s (> 3 heartbeats)")
                continue
            while True:
                if st.held is None:
                    try:
                        st.held = st.queue.get_nowait()
                    except queue.Empty:
                        break
                gen, epoch, step, fields, arrays = st.held
                if gen != st.generation:
                    st.held = None
                    continue
                if epoch is None:  # the worker's failure: after the batches it made before it, no credit
                    st.held, st.last_sent = None, now
                    yield st.identity, P.ProtocolError(P.E_WORKER, fields).frames()
                    continue
                if st.credits <= 0:
                    break
                st.held = None
                st.credits -= 1
                st.sent += 1
                st.cursor = (epoch, step + 1)
                self.counts["batches"] += 1
                yield st.identity, P.encode(P.MASKS, {**fields, "seq": st.seq}, arrays, check=False)
                st.seq += 1
                st.last_sent = now
            if now - st.last_sent > self.cfg.heartbeat:  # a failed worker is reported again, until a HELLO
                st.last_sent = now
                failed = st.failed if st.held is None and st.queue.empty() else None
                yield st.identity, (P.ProtocolError(P.E_WORKER, failed).frames() if failed else
                                    P.encode(P.HEARTBEAT, {"restart_id": self.server_id}))

    def bye(self):
        for st in list(self.ranks.values()):
            yield st.identity, P.encode(P.BYE, {})
            self.free(st.rank, "server shutting down")

    # ---- the rank worker ----
    def _work(self, st: RankState) -> None:
        """The rank's producer. A failure (a damaged shard, the teacher) is reported to the rank and
        the worker waits for its next HELLO, then starts again with a new loader."""
        loader = None
        try:
            while not st.stop.is_set():
                # read generation before start: HELLO writes start before it bumps generation
                gen = st.generation
                try:
                    loader = loader or self.make_loader(st.rank)
                    self._produce(st, loader, gen)
                except Exception as e:  # noqa: BLE001 - a data/teacher failure of one rank must reach it
                    log.exception("rank %d: mask worker failed", st.rank)
                    self.counts["worker_failures"] += 1
                    if loader is not None:
                        loader.close()
                        loader = None
                    st.failed = f"rank {st.rank}: mask server worker failed: {e!r}"[:P.MAX_STR - 100]
                    self._put(st, gen, (gen, None, None, st.failed, None))  # in order, after its batches
                # failed, or done with the run's last epoch: nothing to make until a HELLO moves the cursor
                while gen == st.generation and not st.stop.is_set():
                    st.stop.wait(0.1)
        finally:
            if loader is not None:
                loader.close()

    def _produce(self, st: RankState, loader, gen: int) -> None:
        """Generation `gen`'s batches from st.start on, until stopped or a HELLO starts another."""
        epoch, step = st.start
        # cached scores need only the plan's crop boxes: nothing is decoded but the reference views
        # of entries due (LUT's targets still need the views)
        plan_only = self.scores is not None and not self.cfg.lut
        # past the run's last epoch (from HELLO) no batch will be asked for
        while not st.stop.is_set() and gen == st.generation and (st.epochs is None or epoch < st.epochs):
            with closing(loader.plan.batches(epoch, step) if plan_only else loader.epoch(epoch, step)) as batches:
                for batch in batches:
                    if st.stop.is_set() or gen != st.generation:
                        return
                    self._put(st, gen, (gen, batch.epoch, batch.step, *self._masks(st.rank, batch, loader)))
            epoch, step = epoch + 1, 0

    @staticmethod
    def _put(st: RankState, gen: int, item: tuple) -> None:
        """Onto the rank's queue (at most --max-ahead items ahead), unless stopped or superseded."""
        while not (st.stop.is_set() or gen != st.generation):
            try:
                st.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def _masks(self, rank: int, batch, loader=None) -> tuple[dict, dict]:
        """One batch (a Loader's, or with cached scores a PlannedBatch) -> MASKS fields and arrays
        (pure apart from the teacher)."""
        g = batch_generator(self.seed, batch.epoch, batch.step, rank, self.teacher.device)
        ids = np.asarray(batch.sample_ids)
        n = len(ids)
        whole = None
        if self.scores is not None:
            whole = loader.whole_images
            if self.teacher.version >= 0:
                # the reference views of the cache entries due, decoded outside the teacher's lock (first
                # weights swapped in under it still work: those entries are decoded there)
                whole = self.scores.prefetch(ids, batch.epoch, whole)
        with self.lock:
            w = self.pending
            if w is not None and w.version > self.teacher.version:
                try:
                    if self.teacher.load_state(w.state, w.version, w.step):
                        self.counts["weights_applied"] += 1
                        log.info("teacher now at weights v%d (step %d)", w.version, w.step)
                except ValueError as e:
                    log.error("weights v%d rejected: %s", w.version, e)
                    for st in list(self.ranks.values()):  # the uploader must know, not only this log
                        self.outbox.put((st.identity, P.ProtocolError(P.E_WEIGHTS, f"weights v{w.version} "
                                                                      f"rejected by the teacher: {e}").frames()))
                self.pending = None
            version = self.teacher.version
            tstep = self.teacher.step
            strategy = get_strategy(self.cfg.strategy)
            if version < 0 and strategy.needs != "none":
                # no weights yet: random masks from CPU noise, the draws of the client's own fallback
                cpu_g = batch_generator(self.seed, batch.epoch, batch.step, rank)
                mask = random_mask(n, self.num_patches, self.cfg.ratio, generator=cpu_g)
                out_mask, len_keep, extras = mask, (~mask).sum(1), {}
            else:
                head_probs = None if self.head_probs is None else self.head_probs.float()
                if self.scores is None:
                    out = self.teacher.compute(batch.images, self.cfg.strategy, ratio=self.cfg.ratio, generator=g,
                                               progress=batch.epoch / self.cfg.epochs, block=self.cfg.block,
                                               head_probs=head_probs, options=dict(self.cfg.options))
                else:
                    view = loader.plan.views(batch.epoch, ids)[0]
                    out, version, tstep = self.scores.masks(ids, view.crop, view.flip, batch.epoch,
                                                            ratio=self.cfg.ratio, generator=g,
                                                            progress=batch.epoch / self.cfg.epochs,
                                                            head_probs=head_probs, whole_images=whole)
                out_mask, len_keep, extras = out.mask, out.len_keep, dict(out.extras)
                if self.cfg.lut and batch.view2 is not None and version >= 0:
                    extras["lut_t1"], extras["lut_t2"] = self.teacher.lut_targets(batch.images, batch.view2)
        arrays = {"mask": pack_mask(out_mask.cpu()).numpy(), "len_keep": len_keep.cpu().to(torch.int32).numpy()}
        for k, v in extras.items():
            v = v.detach().cpu()
            arrays[k] = v.to(torch.int64) if k == "heads" else v.to(torch.float16)
        fields = {"rank": rank, "epoch": batch.epoch, "step": batch.step,
                  "checksum": P.checksum(ids), "n": n, "num_patches": self.num_patches,
                  "teacher_version": version, "teacher_step": -1 if tstep is None else tstep}   # -1: no step
        return fields, arrays

    # ---- stats ----
    def stats(self, now: float, rate: float) -> dict:
        tstep = self.teacher.step if self.teacher.step is not None else -1
        ranks = {}
        for r, st in self.ranks.items():
            e, s = st.reported
            ranks[str(r)] = {"queue": st.queue.qsize(), "credits": st.credits, "sent": st.sent,
                             "cursor": list(st.cursor), "last_seen_s": round(now - st.last_seen, 3),
                             "staleness": e * self.steps + s - tstep if tstep >= 0 else None}
        return {"server_id": self.server_id, "time": time.time(), "batches_per_s": round(rate, 2),
                "teacher_version": self.teacher.version, "teacher_step": tstep, "ranks": ranks,
                "freed": self.freed, "plb_epoch": self.plb_epoch, "feedback_pending": len(self.feedback_seen),
                **({"score_cache": self.scores.cache.stats()} if self.scores is not None else {}), **self.counts}



def _fingerprint(run_id: str) -> str:
    """What logs show of a run_id: it is the proof that takes a live rank, so never the id itself."""
    return hashlib.blake2b(run_id.encode(), digest_size=4).hexdigest()


def _drain(q: queue.Queue) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return
