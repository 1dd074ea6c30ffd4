"""A trainer's weight snapshot for the mask server, taken without stalling the training step.

    pool = SnapshotPool()                                # bf16 on the wire; the server casts
    snap = pool.take(ema.state_dict(), version=it, step=it)   # main thread: fill + async copy only
    client.send_snapshot(snap)                           # its I/O thread hashes, chunks and sends

The main thread fills one preallocated flat buffer, laid out as the wire's tensor table
(weights.layout), with one `copy_` per tensor on the tensors' own device, floats cast to `dtype`
(bf16: half the bytes of fp32; the mask server casts to its teacher's dtype as before). On CUDA a
side stream then copies the flat buffer into pinned host memory and records an event, so the
host never waits for the GPU: the client's I/O thread polls the event between socket turns and
reads the bytes only once it has passed. On the CPU the same path fills the host buffer directly
and there is no event. Hashing (about 0.2 s per 170 MB on this CPU), chunking and sending are
the I/O thread's (maskserver/client.py). Per-tensor copy_ rather than torch.cat(out=): cat with a
dtype cast measured 4-8x slower on this CPU, and torch._foreach_copy_ is not public API.

Buffers: `buffers` host buffers (pinned on CUDA) rotate, because zmq sends with copy=False and
holds a buffer until its trackers say done. A snapshot is `queued` from `take` until the I/O
thread `claim`s it, then `sending` until `release`. A newer snapshot reuses the buffer of a
queued one (which is superseded: never more than one waits); with every buffer on the wire,
`take` returns None and counts it in `skipped` (the link is slower than --sync-every; the next
sync tries again).
"""
from __future__ import annotations

import hashlib
import threading
from typing import Iterator, Mapping

import numpy as np
import torch

from mimpipe.maskserver.protocol import DEFAULT_CHUNK_BYTES
from mimpipe.maskserver.weights import encode_chunks, layout

FREE, FILLING, QUEUED, SENDING = "free", "filling", "queued", "sending"


def sha256_hex(buf: np.ndarray) -> str:
    """The snapshot's digest (hashlib releases the GIL over large buffers)."""
    return hashlib.sha256(buf).hexdigest()


class Snapshot:
    """One snapshot: its wire table, its host bytes and `event`, the CUDA event after which they may
    be read (None on the CPU). sha256 stays None until the I/O thread hashes it (`chunks`)."""

    def __init__(self, pool: "SnapshotPool", slot: "_Slot", version: int, step: int, event):
        self.version, self.step, self.table = version, step, pool.table
        self.payload_bytes = pool.total
        self.sha256: str | None = None
        self._pool, self._slot, self.event = pool, slot, event

    def ready(self) -> bool:
        """The device-to-host copy has finished (always, on the CPU); never waits."""
        return self.event is None or self.event.query()

    def claim(self) -> bool:
        """For the I/O thread: take it for sending; False if a newer snapshot took its buffer."""
        return self._pool._move(self, QUEUED, SENDING)

    def release(self) -> None:
        """Its buffer may be reused: zmq is done with it, or it will never be sent."""
        self._pool._move(self, None, FREE)

    def chunks(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[list]:
        """Hash the bytes (after ready()), then its WEIGHTS messages, views of the host buffer."""
        data = self._slot.host.numpy()
        if self.sha256 is None:
            self.sha256 = sha256_hex(data)
        return encode_chunks(self.table, data, self.version, self.step, self.sha256, chunk_bytes)


class _Slot:
    def __init__(self, host: torch.Tensor, views: list[torch.Tensor] | None):
        self.host, self.views = host, views  # views: per-tensor views of host (CPU path only)
        self.state, self.owner = FREE, None


class SnapshotPool:
    """Preallocated snapshot buffers for one set of tensors (names, shapes, dtypes, one device),
    fixed by the first `take`."""

    def __init__(self, dtype: torch.dtype | None = torch.bfloat16, buffers: int = 2):
        """dtype: the wire dtype of floating tensors (None: their own); others travel as they are."""
        self.dtype, self.buffers, self.skipped = dtype, buffers, 0
        self.specs: list[tuple] | None = None
        self._lock = threading.Lock()  # slot states; held for a few statements only

    def take(self, state: Mapping[str, torch.Tensor], version: int, step: int) -> Snapshot | None:
        """Snapshot `state` as it is now, in stream order on its device; None if every buffer is
        on the wire (counted in `skipped`). Never waits for the device or the network."""
        specs = [(k, self._wire_dtype(t), tuple(t.shape), t.device) for k, t in state.items()]
        if self.specs is None:
            self._setup(specs)
        elif specs != self.specs:
            raise ValueError("weight snapshot: the tensors changed since the first snapshot (names, shapes, "
                             "dtypes or device); a SnapshotPool serves one set")
        with self._lock:
            slot = (next((s for s in self._slots if s.state == FREE), None)
                    or next((s for s in self._slots if s.state == QUEUED), None))  # supersede the waiting one
            if slot is None:
                self.skipped += 1
                return None
            slot.state, slot.owner = FILLING, None
        event = self._fill(slot, state.values())
        snap = Snapshot(self, slot, version, step, event)
        with self._lock:
            slot.state, slot.owner = QUEUED, snap
        return snap

    def _wire_dtype(self, t: torch.Tensor) -> torch.dtype:
        return self.dtype if self.dtype is not None and t.is_floating_point() else t.dtype

    def _setup(self, specs: list[tuple]) -> None:
        devices = {d for *_, d in specs}
        if len(devices) != 1:
            raise ValueError(f"weight snapshot: tensors on {sorted(map(str, devices))}; one device expected")
        self.specs, self.device = specs, devices.pop()
        self.table, self.total = layout((k, dt, shape) for k, dt, shape, _ in specs)
        cuda = self.device.type == "cuda"
        # zeros: the alignment padding is hashed and sent, so it must not carry stale memory
        hosts = [torch.zeros(self.total, dtype=torch.uint8, pin_memory=cuda) for _ in range(self.buffers)]
        if cuda:
            self._dev = torch.zeros(self.total, dtype=torch.uint8, device=self.device)
            self._dev_views = self._views(self._dev)
            self._stream, self._copied = torch.cuda.Stream(self.device), None
        self._slots = [_Slot(h, None if cuda else self._views(h)) for h in hosts]

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[e["offset"]:e["offset"] + e["nbytes"]].view(dt).view(shape)
                for e, (_, dt, shape, _) in zip(self.table, self.specs)]

    @torch.no_grad()
    def _fill(self, slot: _Slot, tensors) -> "torch.cuda.Event | None":
        if self.device.type != "cuda":
            for v, t in zip(slot.views, tensors):
                v.copy_(t)
            return None
        main = torch.cuda.current_stream(self.device)
        if self._copied is not None:
            main.wait_event(self._copied)  # the last copy to the host has read the flat buffer (GPU-side wait)
        for v, t in zip(self._dev_views, tensors):
            v.copy_(t)  # on the main stream: after this step's update, before the next one
        self._stream.wait_stream(main)
        with torch.cuda.stream(self._stream):
            slot.host.copy_(self._dev, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record(self._stream)
        return self._copied

    def _move(self, snap: Snapshot, frm: str | None, to: str) -> bool:
        """Move snap's slot to `to` if snap still owns it (and it is in `frm`, unless None)."""
        with self._lock:
            slot = snap._slot
            if slot.owner is not snap or (frm is not None and slot.state != frm):
                return False
            slot.state = to
            if to == FREE:
                slot.owner = None
            return True


def take_snapshot(state: Mapping[str, torch.Tensor], version: int, step: int,
                  dtype: torch.dtype | None = None) -> Snapshot:
    """A one-off snapshot (its own buffer; dtype None keeps every tensor's dtype)."""
    return SnapshotPool(dtype, buffers=1).take(state, version, step)
