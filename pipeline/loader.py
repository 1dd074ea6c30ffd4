"""The iterator trainers and the mask server share: plan -> reader -> decoder -> Batch.

A background thread runs ahead by `prefetch` batches; the reads of batch k+1 are in flight while
batch k decodes. Each Batch carries its (epoch, step), sample ids and the time it spent waiting
for bytes and decoding, for profiling.

Image tensors are recycled, as with DALIGenericIterator, but one batch later: batch k stays valid
while batch k+1 is taken and used (the "prefetch the next batch during this step" pattern), and is
overwritten after that. `.clone()` (or move to the GPU) what must live longer.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from mimpipe.pipeline.decode import MAX_DECODE_PIXELS, DecodeError, check_decodable, make_decoder
from mimpipe.pipeline.plan import Plan, PlanConfig, PlannedBatch
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
    decode_s: float = 0.0
    replaced: int = 0             # bad samples replaced in this batch (on_error='skip')


class Loader:
    def __init__(self, manifest, cfg: PlanConfig, rank: int = 0, *, decoder: str = "dali",
                 threads: int = 2, prefetch: int = 2, device: str = "auto",
                 device_id: int | None = None, on_error: str = "raise",
                 max_pixels: int | None = MAX_DECODE_PIXELS):
        """on_error: what a bad sample (bytes failing their checksum, an image over `max_pixels`,
        bytes that do not decode) does: "raise" a DecodeError naming shard and key, or "skip":
        replace it by the next sample id that passes (the same in every process, given the same
        max_pixels). max_pixels: the most pixels (stored width x height, from the table) a
        sample may have to be decoded; None = no cap."""
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error {on_error!r}: choose raise or skip")
        if max_pixels is not None and max_pixels < 1:
            raise ValueError(f"max_pixels {max_pixels}: must be at least 1 (or None: no cap)")
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
        self.decoder = make_decoder(decoder, img_size=cfg.img_size, n_views=len(cfg.views),
                                    color_views=color, batch_size=cfg.batch_size, threads=threads,
                                    interpolation=cfg.interpolation, device=device, device_id=device_id,
                                    buffers=prefetch + 3)   # see the module docstring
        self.replaced = 0
        self._running: set = set()   # producers of unfinished epoch() iterators

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
            while (item := q.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._halt((stop, t, q))

    def _halt(self, producer) -> None:
        stop, t, q = producer
        stop.set()
        while t.is_alive():   # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.01)
        self._running.discard(producer)

    def _produce(self, epoch: int, start: int, q: queue.Queue, stop: threading.Event) -> None:
        try:
            planned = self.plan.batches(epoch, start)
            nxt = next(planned, None)
            pending = self.reader.prefetch(nxt.sample_ids) if nxt is not None else None
            while nxt is not None and not stop.is_set():
                cur, cur_pending = nxt, pending
                nxt = next(planned, None)
                t0 = time.perf_counter()
                encoded = cur_pending.results()   # a ChecksumError stands in for damaged bytes
                t1 = time.perf_counter()
                # prefetch the next batch's bytes while this one decodes
                pending = self.reader.prefetch(nxt.sample_ids) if nxt is not None else None
                batch = self._decode(cur, encoded)
                batch.read_s, batch.decode_s = t1 - t0, time.perf_counter() - t1
                q.put(batch)
            q.put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            q.put(e)

    def _decode(self, pb: PlannedBatch, encoded: list) -> Batch:
        replaced = 0
        # what must never reach the decoder: bytes that fail their checksum (DALI can crash the
        # process on hostile bytes) and images over the pixel cap (memory)
        for j in range(len(encoded)):
            if (why := self._screen(int(pb.sample_ids[j]), encoded[j])) is not None:
                pb = self._bad(pb, encoded, j, why)
                replaced += 1
        while True:
            try:
                views = self.decoder.decode(encoded, pb.views)
                break
            except DecodeError as e:   # find the culprit(s): the decoder may not say which
                bad = [(j, cause) for j, data in enumerate(encoded) if (cause := check_decodable(data))]
                if not bad:
                    raise DecodeError(f"rank {pb.rank}: epoch {pb.epoch} step {pb.step}: decoder "
                                      f"failed, yet every sample decodes with PIL: {e}") from e
                for j, cause in bad:
                    pb = self._bad(pb, encoded, j,
                                   f"{self.m.where(int(pb.sample_ids[j]))}: cannot decode: {cause}")
                    replaced += 1
        self.replaced += replaced
        ids = torch.from_numpy(pb.sample_ids)
        return Batch(views[0], ids, torch.from_numpy(self.m.table["label"][pb.sample_ids].astype(np.int64)),
                     torch.from_numpy(pb.valid.copy()), pb.epoch, pb.step,
                     views[1] if len(views) > 1 else None, replaced=replaced)

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

    def close(self) -> None:
        """Stop producers of iterators not run to the end (a thread left inside DALI at exit
        aborts the interpreter), then close the shards."""
        for producer in list(self._running):
            self._halt(producer)
        self.reader.close()
