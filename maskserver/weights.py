"""Teacher weights on the wire: a snapshot travels as WEIGHTS chunks (protocol.py checks each
one); the receiver assembles them and applies a state dict only when complete and verified, so a
duplicate, partial or corrupt upload never changes the teacher."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from mimpipe.maskserver.protocol import (DEFAULT_CHUNK_BYTES, DTYPES, E_ARRAY, E_TYPE, E_WEIGHTS, MAX_WEIGHTS_BYTES,
                                 TORCH_DTYPES, TORCH_TAGS, WEIGHT_ALIGN, WEIGHTS, Message, ProtocolError,
                                 brief, encode)


def weight_chunks(state: dict[str, torch.Tensor], version: int, step: int,
                  chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[list]:
    """Snapshot `state` now and return an iterator of WEIGHTS messages (frame lists), chunk 0 first.

    The snapshot is one copy into a private buffer, taken at call time: the trainer keeps updating
    its parameters while zmq sends the frames with copy=False, so live tensors must not be on the
    wire. Tensors are laid out at WEIGHT_ALIGN-byte offsets; sha256 covers the whole buffer.
    """
    table, parts, pos = [], [], 0
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        if t.dtype not in TORCH_TAGS:
            raise ProtocolError(E_ARRAY, f"tensor {name!r}: dtype {t.dtype} not allowed; "
                                         f"choose from {', '.join(DTYPES)}")
        pos = -(-pos // WEIGHT_ALIGN) * WEIGHT_ALIGN
        table.append({"name": name, "dtype": TORCH_TAGS[t.dtype], "shape": list(t.shape), "offset": pos,
                      "nbytes": t.numel() * t.element_size()})
        parts.append(t)
        pos += table[-1]["nbytes"]
    buf = np.zeros(pos, np.uint8)
    for e, t in zip(table, parts):
        if e["nbytes"]:
            buf[e["offset"]:e["offset"] + e["nbytes"]] = t.reshape(-1).view(torch.uint8).numpy()
    common = {"version": version, "step": step, "n_chunks": max(1, -(-pos // chunk_bytes)),
              "chunk_bytes": chunk_bytes, "total_bytes": pos, "sha256": hashlib.sha256(buf).hexdigest()}
    return iter([encode(WEIGHTS, {**common, "chunk": i, **({"tensors": table} if i == 0 else {})},
                        {"data": buf[i * chunk_bytes:(i + 1) * chunk_bytes]})
                 for i in range(common["n_chunks"])])


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


FLOAT_TAGS = ("float16", "bf16", "float32")


def brief_list(text: str, limit: int = 1000) -> str:
    """An error naming many tensors, cut to `limit` characters (a peer may send 4096 names)."""
    return text if len(text) <= limit else text[:limit - 3] + "..."
