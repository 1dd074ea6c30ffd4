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


class WeightAssembler:
    """Collects WEIGHTS chunks (any order, duplicates ignored) into state dicts.

    `add` returns a `Weights` only when every chunk of a version newer than `version` is in and the
    sha256 matches; a partial upload never yields, a corrupt one raises ProtocolError(WEIGHTS) and
    is dropped. A chunk of a newer version abandons the upload in progress; chunks of older or
    already applied versions are counted in `ignored`. Memory grows only with chunks received.
    """

    def __init__(self, *, version: int = -1, max_bytes: int = MAX_WEIGHTS_BYTES):
        self.version, self.max_bytes, self.ignored = version, max_bytes, 0
        self._reset(None)

    def _reset(self, key: tuple | None) -> None:
        self._key, self._chunks, self._table = key, {}, None

    def add(self, msg: Message) -> Weights | None:
        if msg.type != WEIGHTS:
            raise ProtocolError(E_TYPE, f"WeightAssembler takes {WEIGHTS!r} messages, got {msg.type!r}")
        f = msg.fields
        key = tuple(f[k] for k in ("version", "step", "n_chunks", "chunk_bytes", "total_bytes", "sha256"))
        stale = f["version"] <= self.version or (self._key is not None and f["version"] < self._key[0])
        if stale or (key == self._key and f["chunk"] in self._chunks):
            self.ignored += 1
            return None
        if f["total_bytes"] > self.max_bytes:
            raise ProtocolError(E_WEIGHTS, f"weights version {f['version']}: total_bytes {f['total_bytes']} > "
                                           f"limit {self.max_bytes}")
        if self._key is None or key[0] > self._key[0]:
            self._reset(key)
        elif key != self._key:
            self._reset(None)
            raise ProtocolError(E_WEIGHTS, f"weights version {f['version']} chunk {f['chunk']}: {brief(key[1:])} "
                                           f"disagrees with the upload in progress; upload dropped")
        self._chunks[f["chunk"]] = bytes(msg.arrays["data"])  # own copy: the caller may reuse the frame
        if f["chunk"] == 0:
            self._table = f["tensors"]
        return self._finish() if len(self._chunks) == f["n_chunks"] else None

    def _finish(self) -> Weights:
        (version, step, n, _, total, sha), chunks, table = self._key, self._chunks, self._table
        self._reset(None)
        buf = bytearray().join(chunks[i] for i in range(n))  # one copy; the tensors are views of it
        got = hashlib.sha256(buf).hexdigest()
        if len(buf) != total or got != sha:
            raise ProtocolError(E_WEIGHTS, f"weights version {version}: sha256 {got[:16]}... != declared "
                                           f"{sha[:16]}...; upload dropped")
        self.version = version
        state = {}
        for e in table:
            dt, count = TORCH_DTYPES[e["dtype"]], math.prod(e["shape"])
            state[e["name"]] = (torch.frombuffer(buf, dtype=dt, count=count, offset=e["offset"])
                                .reshape(e["shape"]) if count else torch.empty(e["shape"], dtype=dt))
        return Weights(version, step, state)
