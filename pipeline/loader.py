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

from mimpipe.pipeline.decode import DecodeError, check_decodable, make_decoder
from mimpipe.pipeline.plan import Plan, PlanConfig, PlannedBatch
from mimpipe.pipeline.reader import ShardReader

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
    replaced: int = 0             # undecodable samples replaced in this batch (on_error='skip')


class Loader:
    def __init__(self, manifest, cfg: PlanConfig, rank: int = 0, *, decoder: str = "dali",
                 threads: int = 2, prefetch: int = 2, device: str = "auto",
                 device_id: int | None = None, on_error: str = "raise"):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error {on_error!r}: choose raise or skip")
        self.m, self.plan, self.on_error, self.prefetch = manifest, Plan(manifest, cfg, rank), on_error, prefetch
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
                encoded = cur_pending.result()
                t1 = time.perf_counter()
                # prefetch the next batch's bytes while this one decodes
                pending = self.reader.prefetch(nxt.sample_ids) if nxt is not None else None
                batch = self._decode(cur, encoded)
                batch.read_s, batch.decode_s = t1 - t0, time.perf_counter() - t1
                q.put(batch)
            q.put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            q.put(e)

    def _decode(self, pb: PlannedBatch, encoded: list[np.ndarray]) -> Batch:
        replaced = 0
        while True:
            try:
                views = self.decoder.decode(encoded, pb.views)
                break
            except DecodeError as e:   # find the culprit(s): the decoder may not say which
                bad = [j for j, data in enumerate(encoded) if check_decodable(data)]
                if not bad:
                    raise DecodeError(f"rank {pb.rank}: epoch {pb.epoch} step {pb.step}: decoder "
                                      f"failed, yet every sample decodes with PIL: {e}") from e
                for j in bad:
                    sid = int(pb.sample_ids[j])
                    cause = check_decodable(encoded[j])
                    if self.on_error == "raise":
                        raise DecodeError(f"{self.m.where(sid)}: cannot decode: {cause}") from None
                    new = self._replacement(sid)
                    log.warning("%s: cannot decode (%s); replaced by sample %d", self.m.where(sid), cause, new)
                    ids = pb.sample_ids.copy()
                    ids[j] = new
                    pb = replace(pb, sample_ids=ids, views=self.plan.views(pb.epoch, ids))
                    encoded[j] = self.reader.read_one(new)
                    replaced += 1
        self.replaced += replaced
        ids = torch.from_numpy(pb.sample_ids)
        return Batch(views[0], ids, torch.from_numpy(self.m.table["label"][pb.sample_ids].astype(np.int64)),
                     torch.from_numpy(pb.valid.copy()), pb.epoch, pb.step,
                     views[1] if len(views) > 1 else None, replaced=replaced)

    def _replacement(self, sample_id: int) -> int:
        """The next sample id (cyclically) that decodes: a function of the data alone, so every
        process that reads these shards picks the same replacement."""
        n = len(self.m)
        for k in range(1, n):
            cand = (sample_id + k) % n
            if check_decodable(self.reader.read_one(cand)) is None:
                return cand
        raise DecodeError(f"{self.m.root}: no sample decodes")

    def close(self) -> None:
        """Stop producers of iterators not run to the end (a thread left inside DALI at exit
        aborts the interpreter), then close the shards."""
        for producer in list(self._running):
            self._halt(producer)
        self.reader.close()
