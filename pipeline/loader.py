"""The iterator trainers and the mask server share: plan -> reader -> decoder -> Batch.

A background thread runs ahead by `prefetch` batches; the reads of batch k+1 are in flight while
batch k decodes, and the decoder holds up to its depth of batches in flight (DALI: `dali_prefetch`
runs on its pipelined executor). Each Batch carries its (epoch, step), sample ids and the time it
spent waiting for bytes and decoding, for profiling.

Image tensors are recycled, as with DALIGenericIterator, but one batch later: batch k stays valid
while batch k+1 is taken and used (the "prefetch the next batch during this step" pattern); asking
for batch k+2 releases batch k, whose tensors may then be overwritten. `.clone()` (or move to the
GPU) what must live longer.

On a GPU, batches are handed over between CUDA streams without a host sync: the decoder works on
its own stream, and the consumer's current stream (on the decoder's device, in the thread that
iterates) waits on the batch's event when it is handed out; at release an event on that stream
marks the end of the consumer's use, and the decoder's stream waits on it before the tensors are
reused (decode.py OutputRing). A consumer must therefore queue its work on a batch on the stream
that is current when it takes the batch, or make that stream wait for its own.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from mimpipe.pipeline.decode import (HW_DECODER_LOAD, MAX_DECODE_PIXELS, DecodeError, Decoded,
                                     check_decodable, make_decoder)
from mimpipe.pipeline.plan import Plan, PlanConfig, PlannedBatch, View
from mimpipe.pipeline.reader import ChecksumError, ShardReader

log = logging.getLogger("mimpipe.loader")
_END = object()


@dataclass
class Batch:
    images: torch.Tensor          # [B, 3, S, S] float32, normalized (first view)
    sample_ids: torch.Tensor      # [B] int64
    labels: torch.Tensor          # [B] int64, -1 = unlabeled
    valid: torch.Tensor           # [B] bool, False = padding (see plan.py)
    epoch: int
    step: int
    view2: torch.Tensor | None = None
    read_s: float = 0.0           # waiting for bytes (after read-ahead)
    decode_s: float = 0.0         # submitting to the decoder and waiting for its output
    replaced: int = 0             # bad samples replaced in this batch (on_error='skip')
    _decoded: Decoded | None = field(default=None, repr=False)   # the decoder's, for release


@dataclass
class _InFlight:
    """A batch read and screened, submitted to the decoder and not yet collected."""
    pb: PlannedBatch
    encoded: list
    read_s: float
    replaced: int
    decode_s: float = 0.0


class Loader:
    def __init__(self, manifest, cfg: PlanConfig, rank: int = 0, *, decoder: str = "dali",
                 threads: int = 2, prefetch: int = 2, device: str = "auto",
                 device_id: int | None = None, on_error: str = "raise",
                 max_pixels: int | None = MAX_DECODE_PIXELS, dali_prefetch: int = 2,
                 hw_decoder_load: float = HW_DECODER_LOAD):
        """threads: DALI CPU threads of this rank's pipeline (one pipeline per rank, i.e. per
        GPU), and as many reader threads. prefetch: batches ready ahead of the consumer.
        dali_prefetch: batches DALI's executor has in flight (its prefetch_queue_depth).
        hw_decoder_load: the share of JPEGs nvJPEG's hardware decoder takes on A100/H100
        (ignored on the CPU).
        on_error: what a bad sample (bytes failing their checksum, an image over `max_pixels`,
        bytes that do not decode) does: "raise" a DecodeError naming shard and key, or "skip":
        replace it by the next sample id that passes (the same in every process, given the same
        max_pixels). max_pixels: the most pixels (stored width x height, from the table) a
        sample may have to be decoded; None = no cap."""
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error {on_error!r}: choose raise or skip")
        if max_pixels is not None and max_pixels < 1:
            raise ValueError(f"max_pixels {max_pixels}: must be at least 1 (or None: no cap)")
        if dali_prefetch < 1:
            raise ValueError(f"dali_prefetch {dali_prefetch}: must be at least 1")
        if not 0.0 <= hw_decoder_load <= 1.0:
            raise ValueError(f"hw_decoder_load {hw_decoder_load}: must be in [0, 1]")
        self.m, self.plan, self.on_error, self.prefetch = manifest, Plan(manifest, cfg, rank), on_error, prefetch
        self.max_pixels = max_pixels
        if max_pixels is not None and len(manifest):
            over = int((manifest.table["width"].astype(np.int64) * manifest.table["height"] > max_pixels).sum())
            if over:
                log.warning("%s: %d samples are larger than the decode cap of %d pixels; each will %s",
                            manifest.root, over, max_pixels,
                            "raise a DecodeError" if on_error == "raise" else "be replaced")
        self.reader = ShardReader(manifest, threads)
        color = [i for i, v in enumerate(cfg.views) if v.color]
        self._decoder_args = dict(name=decoder, img_size=cfg.img_size, batch_size=cfg.batch_size, threads=threads,
                                  interpolation=cfg.interpolation, device=device, device_id=device_id,
                                  hw_decoder_load=hw_decoder_load)
        self.decoder = make_decoder(**self._decoder_args, n_views=len(cfg.views), color_views=color,
                                    prefetch=dali_prefetch)
        self._whole = None   # the decoder of whole_images, built at first use
        self.replaced = 0
        self._running: set = set()   # producers of unfinished epoch() iterators
        self._handed: deque[Batch] = deque()   # handed out and not released, oldest first

    @property
    def steps(self) -> int:
        return self.plan.steps

    def epoch(self, epoch: int, start_step: int = 0):
        """Batches of `epoch` from the cursor (epoch, start_step) to its end."""
        q: queue.Queue = queue.Queue(self.prefetch)
        stop = threading.Event()
        t = threading.Thread(target=self._produce, args=(epoch, start_step, q, stop),
                             name=f"mimpipe-loader-r{self.plan.rank}", daemon=True)
        t.start()
        self._running.add((stop, t, q))
        try:
            while True:
                # the consumer asks for the next batch: it is done with all but the newest one
                # handed out (also across epochs)
                while len(self._handed) > 1:
                    self.decoder.release(self._handed.popleft()._decoded)
                if (item := q.get()) is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                self._hand_out(item)
                yield item
        finally:
            self._halt((stop, t, q))

    def _hand_out(self, batch: Batch) -> None:
        d = batch._decoded
        if d.ready is not None:
            stream = torch.cuda.current_stream(self.decoder.device)
            stream.wait_event(d.ready)   # queued on the consumer's stream, no host sync
            for t in d.views:   # the colour views are fresh allocations of the decoder's stream
                t.record_stream(stream)
        self._handed.append(batch)

    def _halt(self, producer) -> None:
        stop, t, q = producer
        stop.set()
        while t.is_alive() or not q.empty():   # unblock a producer waiting on a full queue
            try:
                item = q.get_nowait()
            except queue.Empty:
                t.join(0.01)
                continue
            if isinstance(item, Batch):   # never handed out: its tensors go straight back
                self.decoder.release(item._decoded, used=False)
        self._running.discard(producer)

    def _produce(self, epoch: int, start: int, q: queue.Queue, stop: threading.Event) -> None:
        window: deque[_InFlight] = deque()   # submitted to the decoder, oldest first
        try:
            planned = self.plan.batches(epoch, start)
            nxt = next(planned, None)
            pending = self.reader.prefetch(nxt.sample_ids) if nxt is not None else None
            while nxt is not None and not stop.is_set():
                cur, cur_pending = nxt, pending
                nxt = next(planned, None)
                t0 = time.perf_counter()
                try:
                    encoded = cur_pending.results()   # a ChecksumError stands in for damaged bytes
                    t1 = time.perf_counter()
                    # prefetch the next batch's bytes while this one decodes
                    pending = self.reader.prefetch(nxt.sample_ids) if nxt is not None else None
                    window.append(self._screened(cur, encoded, t1 - t0))
                except Exception:   # this batch cannot be had: the ones before it come first
                    while window:
                        q.put(self._collect(window))
                    raise
                self._submit(window)
                if len(window) == self.decoder.depth:
                    q.put(self._collect(window))
            while window and not stop.is_set():
                q.put(self._collect(window))
            q.put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            q.put(e)
        finally:
            self.decoder.discard()   # what a stopped or failed epoch left in flight

    def _screened(self, pb: PlannedBatch, encoded: list, read_s: float) -> _InFlight:
        """What must never reach the decoder replaced (or raised): bytes that fail their
        checksum (DALI can crash the process on hostile bytes) and images over the pixel cap
        (memory)."""
        replaced = 0
        for j in range(len(encoded)):
            if (why := self._screen(int(pb.sample_ids[j]), encoded[j])) is not None:
                pb = self._bad(pb, encoded, j, why)
                replaced += 1
        return _InFlight(pb, encoded, read_s, replaced)

    def _submit(self, window: deque[_InFlight]) -> None:
        w = window[-1]
        t0 = time.perf_counter()
        try:
            self.decoder.submit(w.encoded, w.pb.views)
        except DecodeError as e:
            self._recover(window, e)
        w.decode_s += time.perf_counter() - t0

    def _collect(self, window: deque[_InFlight]) -> Batch:
        t0 = time.perf_counter()
        while True:
            try:
                out = self.decoder.collect()
                break
            except DecodeError as e:
                self._recover(window, e)
        w = window.popleft()
        self.replaced += w.replaced
        pb = w.pb
        return Batch(out.views[0], torch.from_numpy(pb.sample_ids),
                     torch.from_numpy(self.m.table["label"][pb.sample_ids].astype(np.int64)),
                     torch.from_numpy(pb.valid.copy()), pb.epoch, pb.step,
                     out.views[1] if len(out.views) > 1 else None, read_s=w.read_s,
                     decode_s=w.decode_s + time.perf_counter() - t0, replaced=w.replaced, _decoded=out)

    def _recover(self, window: deque[_InFlight], err: DecodeError) -> None:
        """The decoder failed on a batch of `window` and holds none of them any more (a
        pipelined decoder may report a failure on another batch than the culprit's): find the
        culprits with PIL, raise or put replacements in place, and submit the window again,
        oldest first."""
        while True:
            bad = [(w, j, cause) for w in window for j, data in enumerate(w.encoded)
                   if (cause := check_decodable(data))]
            if not bad:
                first, last = window[0].pb, window[-1].pb
                raise DecodeError(f"rank {first.rank}: epoch {first.epoch} steps {first.step}-{last.step}: "
                                  f"decoder failed, yet every sample decodes with PIL: {err}") from err
            for w, j, cause in bad:
                where = self.m.where(int(w.pb.sample_ids[j]))
                w.pb = self._bad(w.pb, w.encoded, j, f"{where}: cannot decode: {cause}")
                w.replaced += 1
            try:
                for w in window:
                    self.decoder.submit(w.encoded, w.pb.views)
                return
            except DecodeError as e:
                err = e

    def _screen(self, sample_id: int, data) -> str | None:
        """Why this sample must not be decoded (a message naming shard and key), or None."""
        if isinstance(data, ChecksumError):
            return str(data)
        if self.max_pixels is not None:
            w, h = int(self.m.table["width"][sample_id]), int(self.m.table["height"][sample_id])
            if w * h > self.max_pixels:
                return (f"{self.m.where(sample_id)}: {w}x{h} = {w * h} pixels, more than the "
                        f"decode cap of {self.max_pixels} (Loader max_pixels; or re-shard with a "
                        f"smaller --max-pixels)")
        return None

    def _bad(self, pb: PlannedBatch, encoded: list, j: int, why: str) -> PlannedBatch:
        """Sample j of the batch is bad: raise, or put its replacement in place (in `encoded`
        and the returned batch)."""
        if self.on_error == "raise":
            raise DecodeError(why) from None
        new, data = self._replacement(int(pb.sample_ids[j]))
        log.warning("%s; replaced by sample %d", why, new)
        ids = pb.sample_ids.copy()
        ids[j] = new
        encoded[j] = data
        return replace(pb, sample_ids=ids, views=self.plan.views(pb.epoch, ids))

    def _replacement(self, sample_id: int) -> tuple[int, np.ndarray]:
        """The next sample id (cyclically) that passes its checksum and the pixel cap and decodes,
        with its bytes: a function of the data (and max_pixels) alone, so every process that reads
        these shards picks the same replacement."""
        n = len(self.m)
        for k in range(1, n):
            cand = (sample_id + k) % n
            try:
                data = self.reader.read_one(cand)
            except ChecksumError:
                continue
            if self._screen(cand, data) is None and check_decodable(data) is None:
                return cand, data
        raise DecodeError(f"{self.m.root}: no sample passes its checks and decodes")

    def whole_images(self, sample_ids: np.ndarray) -> torch.Tensor:
        """Each sample's whole stored image resized to the plan's S x S, normalized: [n, 3, S, S] on
        the decoder's device, ordered on the current stream (the score cache's reference views,
        maskserver/score_cache.py). Synchronous, on a decoder of its own (the epoch's keeps its
        pipeline); a bad sample raises DecodeError naming shard and key, whatever on_error says:
        a batch never holds a sample that on_error='skip' replaced, so none is asked for."""
        ids = np.asarray(sample_ids, np.int64)
        if self._whole is None:
            self._whole = make_decoder(**self._decoder_args, n_views=1, color_views=(), prefetch=1)
        out = []
        for a in range(0, len(ids), self.plan.cfg.batch_size):
            chunk = ids[a:a + self.plan.cfg.batch_size]
            encoded = self.reader.prefetch(chunk).results()
            for i, data in zip(chunk, encoded):
                if (why := self._screen(int(i), data)) is not None:
                    raise DecodeError(why)
            W, H = self.m.table["width"][chunk], self.m.table["height"][chunk]
            box = np.stack([np.zeros_like(W), np.zeros_like(H), W, H], axis=1).astype(np.int32)
            try:
                self._whole.submit(encoded, (View(box, np.zeros(len(chunk), bool), None),))
                d = self._whole.collect()
            except DecodeError as e:
                for i, data in zip(chunk, encoded):
                    if (cause := check_decodable(data)) is not None:
                        raise DecodeError(f"{self.m.where(int(i))}: cannot decode: {cause}") from e
                raise
            if d.ready is not None:
                torch.cuda.current_stream(self._whole.device).wait_event(d.ready)
            out.append(d.views[0].clone())
            self._whole.release(d)
        return torch.cat(out)

    def close(self) -> None:
        """Stop producers of iterators not run to the end (a thread left inside DALI at exit
        aborts the interpreter), then close the shards."""
        for producer in list(self._running):
            self._halt(producer)
        self.reader.close()
