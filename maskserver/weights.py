"""Teacher weights on the wire: a snapshot travels as WEIGHTS chunks (protocol.py checks each
one); the receiver assembles them and applies a state dict only when complete and verified, so a
duplicate, partial or corrupt upload never changes the teacher."""
from __future__ import annotations

import hashlib
import math
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from mimpipe.maskserver.protocol import (DEFAULT_CHUNK_BYTES, DTYPES, E_ARRAY, E_INTERNAL, E_TYPE, E_WEIGHTS,
                                 MAX_WEIGHTS_BYTES,
                                 TORCH_DTYPES, TORCH_TAGS, WEIGHT_ALIGN, WEIGHTS, Message, ProtocolError,
                                 brief, encode)


def layout(specs) -> tuple[list[dict], int]:
    """The tensor table of a snapshot of `specs` [(name, dtype, shape)], in order, each tensor at a
    WEIGHT_ALIGN-byte offset, and the snapshot's total bytes (what chunk 0 carries)."""
    table, pos = [], 0
    for name, dtype, shape in specs:
        if dtype not in TORCH_TAGS:
            raise ProtocolError(E_ARRAY, f"tensor {name!r}: dtype {dtype} not allowed; "
                                         f"choose from {', '.join(DTYPES)}")
        pos = -(-pos // WEIGHT_ALIGN) * WEIGHT_ALIGN
        table.append({"name": name, "dtype": TORCH_TAGS[dtype], "shape": list(shape), "offset": pos,
                      "nbytes": math.prod(shape) * dtype.itemsize})
        pos += table[-1]["nbytes"]
    return table, pos


def encode_chunks(table: list[dict], buf: np.ndarray, version: int, step: int, sha256: str,
                  chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[list]:
    """The WEIGHTS messages (frame lists) of snapshot `buf` (uint8 [total_bytes], laid out as
    `table`), chunk 0 first, each made when asked for; every data frame is a view of `buf`."""
    common = {"version": version, "step": step, "n_chunks": max(1, -(-len(buf) // chunk_bytes)),
              "chunk_bytes": chunk_bytes, "total_bytes": len(buf), "sha256": sha256}
    for i in range(common["n_chunks"]):
        yield encode(WEIGHTS, {**common, "chunk": i, **({"tensors": table} if i == 0 else {})},
                     {"data": buf[i * chunk_bytes:(i + 1) * chunk_bytes]})


def weight_chunks(state: dict[str, torch.Tensor], version: int, step: int,
                  chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[list]:
    """Snapshot `state` now, in its own dtypes, hash it and return an iterator of its WEIGHTS
    messages: the synchronous form, for tests and tools (the trainer's is maskserver/snapshot.py).

    The snapshot is one copy into a private buffer, taken at call time: the caller may change its
    tensors while zmq sends the frames with copy=False, so live tensors must not be on the wire."""
    parts = [(k, t.detach().cpu().contiguous()) for k, t in state.items()]
    table, total = layout((k, t.dtype, tuple(t.shape)) for k, t in parts)
    buf = np.zeros(total, np.uint8)
    for e, (_, t) in zip(table, parts):
        if e["nbytes"]:
            buf[e["offset"]:e["offset"] + e["nbytes"]] = t.reshape(-1).view(torch.uint8).numpy()
    return iter(list(encode_chunks(table, buf, version, step, hashlib.sha256(buf).hexdigest(), chunk_bytes)))


@dataclass(frozen=True)
class Weights:
    version: int
    step: int  # the trainer step the snapshot was taken at (for staleness)
    state: dict[str, torch.Tensor]  # original dtypes; all views of one private buffer


def snapshot_limit(expect: dict[str, tuple[tuple[int, ...], bool]]) -> int:
    """The largest snapshot `expect` ({name: (shape, is_float)}) can travel as: float tensors at
    4 bytes (float32), integer buffers at 8 (int64), each at a WEIGHT_ALIGN offset."""
    return sum(-(-math.prod(shape) * (4 if is_float else 8) // WEIGHT_ALIGN) * WEIGHT_ALIGN
               for shape, is_float in expect.values())


class WeightAssembler:
    """Collects WEIGHTS chunks (any order, duplicates ignored) into state dicts.

    `add` returns a `Weights` only when every chunk of a version newer than `version` is in, the
    sha256 matches and every float is finite; a partial upload never yields, a corrupt one raises
    ProtocolError(WEIGHTS) and is dropped. With `expect` ({name: (shape, is_float)}, the teacher's
    own tensors) chunk 0's table must name exactly those tensors with those shapes, floats as a
    float dtype and integers as an integer one, or the upload is dropped at once; `version` counts
    only a snapshot that passed every check. A chunk of a newer version abandons the upload in
    progress; chunks of older or already applied versions are counted in `ignored`. Memory: one
    buffer of the declared total_bytes (at most max_bytes), allocated at the upload's first chunk,
    which every chunk is copied into once; the tensors of the result are views of it.
    """

    def __init__(self, *, version: int = -1, max_bytes: int = MAX_WEIGHTS_BYTES,
                 expect: dict[str, tuple[tuple[int, ...], bool]] | None = None):
        self.version, self.max_bytes, self.expect, self.ignored = version, max_bytes, expect, 0
        self._reset(None)

    def reset(self, version: int = -1) -> None:
        """Forget the upload in progress and every version seen (a new run owns the teacher)."""
        self.version = version
        self._reset(None)

    def _reset(self, key: tuple | None) -> None:
        self._key, self._buf, self._got, self._table = key, None, None, None

    def add(self, msg: Message) -> Weights | None:
        if msg.type != WEIGHTS:
            raise ProtocolError(E_TYPE, f"WeightAssembler takes {WEIGHTS!r} messages, got {msg.type!r}")
        f = msg.fields
        key = tuple(f[k] for k in ("version", "step", "n_chunks", "chunk_bytes", "total_bytes", "sha256"))
        stale = f["version"] <= self.version or (self._key is not None and f["version"] < self._key[0])
        if stale or (key == self._key and self._got[f["chunk"]]):
            self.ignored += 1
            return None
        if f["total_bytes"] > self.max_bytes:
            raise ProtocolError(E_WEIGHTS, f"weights version {f['version']}: total_bytes {f['total_bytes']} > "
                                           f"limit {self.max_bytes}")
        if self._key is None or key[0] > self._key[0]:
            self._reset(key)
            self._buf, self._got = np.empty(f["total_bytes"], np.uint8), np.zeros(f["n_chunks"], bool)
        elif key != self._key:
            self._reset(None)
            raise ProtocolError(E_WEIGHTS, f"weights version {f['version']} chunk {f['chunk']}: {brief(key[1:])} "
                                           f"disagrees with the upload in progress; upload dropped")
        if f["chunk"] == 0:
            try:
                self._check_table(f["version"], f["tensors"])
            except ProtocolError:
                self._reset(None)
                raise
            self._table = f["tensors"]
        at = f["chunk"] * f["chunk_bytes"]
        self._buf[at:at + len(msg.arrays["data"])] = msg.arrays["data"]  # own copy: the frame is reused
        self._got[f["chunk"]] = True
        return self._finish() if self._got.all() else None

    def _check_table(self, version: int, table: list[dict]) -> None:
        if self.expect is None:
            return
        got = {e["name"]: e for e in table}
        missing = sorted(self.expect.keys() - got.keys())
        unexpected = sorted(got.keys() - self.expect.keys())
        bad = [f"{k} {got[k]['dtype']}{got[k]['shape']} vs {'float' if is_float else 'int'}{list(shape)}"
               for k, (shape, is_float) in sorted(self.expect.items()) if k in got
               and (tuple(got[k]["shape"]) != tuple(shape) or (got[k]["dtype"] in FLOAT_TAGS) != is_float)]
        if missing or unexpected or bad:
            raise ProtocolError(E_WEIGHTS, brief_list(f"weights version {version} do not fit the teacher: "
                                                      f"missing {missing}; unexpected {unexpected}; "
                                                      f"shape/dtype {bad}"))

    def _finish(self) -> Weights:
        (version, step, n, _, total, sha), buf, table = self._key, self._buf, self._table
        self._reset(None)
        got = hashlib.sha256(buf).hexdigest()
        if got != sha:
            raise ProtocolError(E_WEIGHTS, f"weights version {version}: sha256 {got[:16]}... != declared "
                                           f"{sha[:16]}...; upload dropped")
        state = {}
        for e in table:
            dt, count = TORCH_DTYPES[e["dtype"]], math.prod(e["shape"])
            t = (torch.frombuffer(buf, dtype=dt, count=count, offset=e["offset"]).reshape(e["shape"])
                 if count else torch.empty(e["shape"], dtype=dt))
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ProtocolError(E_WEIGHTS, f"weights version {version}: tensor {e['name']!r} holds NaN or "
                                               f"inf; upload dropped")
            state[e["name"]] = t
        self.version = version  # counts only now: every check passed
        return Weights(version, step, state)


class AssemblyThread:
    """A WeightAssembler on a thread of its own: the server's socket loop only `submit`s chunks, so
    copying an upload into place and hashing it (0.3 s for a ViT-B) never stall heartbeats,
    credits or MASKS. Chunks are added in arrival order; `done(tag, weights, error)` is called on
    this thread for each completed snapshot and each rejected chunk. At most `max_waiting` bytes of
    chunks wait (a peer cannot queue more than one teacher-sized upload); past that, `submit`
    refuses. The thread starts at a reset (a new launch) or a chunk and ends after IDLE_S without
    either, so an idle server holds none."""
    IDLE_S = 60.0

    def __init__(self, assembler: WeightAssembler, done: Callable, max_waiting: int):
        self.assembler, self.done, self.max_waiting = assembler, done, max_waiting
        self.waiting = 0  # bytes submitted and not yet added
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards waiting and _thread; held only for a few statements
        self._thread: threading.Thread | None = None

    def submit(self, tag, msg: Message) -> bool:
        """Queue one decoded WEIGHTS chunk; False (nothing queued) when max_waiting would be passed."""
        n = len(msg.arrays["data"])
        with self._lock:
            if self.waiting + n > self.max_waiting:
                return False
            self.waiting += n
            self._put((tag, msg))
        return True

    def reset(self, version: int = -1) -> None:
        """WeightAssembler.reset, in order after every chunk submitted before it. It starts the thread
        too: a new launch's first upload then does not wait for a thread to start."""
        with self._lock:
            self._put((_RESET, version))

    def _put(self, item) -> None:  # with self._lock held
        self._q.put(item)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mimpipe-weights", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                tag, msg = self._q.get(timeout=self.IDLE_S)
            except queue.Empty:
                with self._lock:  # submit and reset look at _thread under the same lock
                    if self._q.empty():
                        self._thread = None
                        return
                continue
            if tag is _RESET:
                self.assembler.reset(msg)
                continue
            w = err = None
            try:
                w = self.assembler.add(msg)
            except ProtocolError as e:
                err = e
            except Exception as e:  # noqa: BLE001 - a bug must not end the thread: later uploads still count
                err = ProtocolError(E_INTERNAL, f"weights assembly failed: {e!r}")
            finally:
                with self._lock:
                    self.waiting -= len(msg.arrays["data"])
            del msg  # the chunk's zmq frame is freed here, not at the next chunk
            if w is not None or err is not None:
                self.done(tag, w, err)


_RESET = object()  # AssemblyThread's queue marker: reset the assembler


FLOAT_TAGS = ("float16", "bf16", "float32")


def brief_list(text: str, limit: int = 1000) -> str:
    """An error naming many tensors, cut to `limit` characters (a peer may send 4096 names)."""
    return text if len(text) <= limit else text[:limit - 3] + "..."
