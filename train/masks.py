"""Where a trainer's masks come from: `random` (plain MAE), `inloop:<strategy>` (the teacher in
the trainer's own process: the baseline the decoupled design is measured against), or a mask
server (`tcp://...`, maskserver/client.py). All three answer `get(batch) -> Masks` for exactly the
batch (epoch, step) of this rank, and draw their noise from the plan's batch_seed, so the same
weights give the same masks on every path."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mimpipe.pipeline.plan import batch_generator
from mimpipe.maskserver.strategies import len_keep_for, random_mask
from mimpipe.maskserver.teacher import Teacher, default_source


@dataclass
class Masks:
    mask: torch.Tensor                 # [N, L] bool, True = masked
    extras: dict = field(default_factory=dict)   # gpa_target, heads, lut_t1/t2 ...
    teacher_version: int = -1
    teacher_step: int | None = None
    wait_s: float = 0.0                # time the trainer spent waiting for (or computing) them
    fallback: bool = False             # random masks because the server did not answer in time
    len_keep: int | None = None        # every image's kept count, where known without reading mask


class StopRequested(Exception):
    """A signal arrived while the trainer waited for its masks (ServerMasks.should_stop)."""


class RandomMasks:
    def __init__(self, num_patches: int, ratio: float, seed: int, rank: int):
        self.L, self.ratio, self.seed, self.rank = num_patches, ratio, seed, rank

    def get(self, batch) -> Masks:
        g = batch_generator(self.seed, batch.epoch, batch.step, self.rank)
        return Masks(random_mask(len(batch.sample_ids), self.L, self.ratio, generator=g),
                     len_keep=len_keep_for(self.L, self.ratio))

    def sync(self, step: int, student: torch.nn.Module, ema: torch.nn.Module) -> None:
        pass

    def close(self) -> None:
        pass


# strategies whose every image keeps len_keep_for(L, ratio) (amr's batch K and attmask's unmasked
# images depend on the data); tests/test_trainer.py holds each to it
FIXED_COUNT = ("random", "sbam", "gpa", "idm")


class InloopMasks:
    """The teacher runs here, between the trainer's steps: every batch pays for its forward."""

    def __init__(self, strategy: str, model: str, *, ratio: float, seed: int, rank: int,
                 source: str | None = None, block: int | None = None, options: dict | None = None,
                 device="cpu", epochs: int = 1, img_size: int | None = None, score_cache: int = 0,
                 score_cache_dir: str | None = None, loader=None):
        """score_cache: --score-cache K (0: the exact path), the mask server's cache in this process
        (maskserver/score_cache.py); it needs the trainer's `loader` for the crops' geometry and the
        reference views."""
        self.strategy, self.ratio, self.seed, self.rank = strategy, ratio, seed, rank
        self.block, self.options, self.epochs = block, options or {}, epochs
        self.teacher = Teacher(model, source or default_source(strategy),
                               strategy=strategy, block=block, projector_hidden=None, device=device,
                               img_size=img_size)
        self.head_probs = None   # PLB's p for idm; None = uniform
        self.loader, self.scores = loader, None
        if score_cache:
            from mimpipe.maskserver.score_cache import CachedMasks
            self.scores = CachedMasks(self.teacher, strategy, table=loader.m.table, every=score_cache, block=block,
                                      options=self.options, interpolation=loader.plan.cfg.interpolation, seed=seed,
                                      folder=score_cache_dir)

    def get(self, batch) -> Masks:
        t0 = time.perf_counter()
        g = batch_generator(self.seed, batch.epoch, batch.step, self.rank, self.teacher.device)
        version, step = self.teacher.version, self.teacher.step
        if self.scores is None:
            out = self.teacher.compute(batch.images, self.strategy, ratio=self.ratio, generator=g,
                                       progress=batch.epoch / self.epochs, head_probs=self.head_probs,
                                       block=self.block, options=self.options)
        else:
            ids = batch.sample_ids.numpy()
            view = self.loader.plan.views(batch.epoch, ids)[0]
            out, version, step = self.scores.masks(ids, view.crop, view.flip, batch.epoch, ratio=self.ratio,
                                                   generator=g, progress=batch.epoch / self.epochs,
                                                   head_probs=self.head_probs, whole_images=self.loader.whole_images)
        # masks and targets stay where the teacher made them (its GPU): no copy back and forth, and
        # no host sync, since the count of a FIXED_COUNT strategy is known without reading the mask
        fixed = len_keep_for(self.teacher.cfg.num_patches, self.ratio) if self.strategy in FIXED_COUNT else None
        return Masks(out.mask, dict(out.extras), version, step, time.perf_counter() - t0, len_keep=fixed)

    def sync(self, step: int, student: torch.nn.Module, ema: torch.nn.Module) -> None:
        """online: the student's current weights (only what the strategy reads); momentum: the EMA."""
        if self.teacher.kind == "frozen":
            return
        src = (student if self.teacher.kind == "online" else ema).state_dict()
        self.teacher.load_state({k: src[k] for k in self.teacher.held}, version=step, step=step)

    def close(self) -> None:
        pass


def launch_id(world_size: int) -> str:
    """A fresh id of this launch, the same on every rank: rank 0 draws it, the others receive it."""
    ids = [uuid.uuid4().hex[:16]]
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(ids, src=0)
    return ids[0]


class ServerMasks:
    """Masks from a mask server (maskserver/client.py); the trainer's weights go back to it."""

    def __init__(self, endpoint: str, *, strategy: str, model: str, source: str | None, rank: int,
                 world_size: int, plan_hash: str, cursor: tuple[int, int], num_patches: int,
                 ratio: float, seed: int, credits: int, mask_timeout: float, policy: str,
                 heartbeat: float, projector: bool = False, run_id: str | None = None,
                 restart_id: str | None = None, others: tuple[str, ...] = (), curve: str | None = None,
                 mam: bool = False, epochs: int | None = None, should_stop=None):
        """projector: send the EMA's 'projector.*' too; only a server run with --lut holds one
        (maskserver/teacher.py), and any other teacher rejects weights with names it lacks.
        run_id: the run's identity, the same on every rank and kept across --resume (a token of
        the run, stored in its checkpoint); it is what lets a restarted trainer take its ranks back
        from a server that still holds them. Default: this launch's restart_id (every start is a
        run of its own). restart_id: this launch's, the same on every rank; default: rank 0 draws
        one and broadcasts it (a collective: every rank builds its ServerMasks at the same point).
        others: servers to fail over to (maskserver/client.py). curve: the `mimpipe keys` folder
        (maskserver/keys.py client_curve: which key this rank uses). mam: the trainer needs GPA
        targets. epochs: the run's length (the server exits when every rank finished). should_stop:
        a callable checked while get waits (the trainer's `lambda: stop.local`); get then raises
        MaskWaitInterrupted."""
        self.kind = (source or default_source(strategy)).split(":", 1)[0]
        self.prefixes = Teacher.state_for(strategy, model) if self.kind == "online" else ("",)
        from mimpipe.maskserver.client import MaskClient   # pyzmq is needed only where a server is
        from mimpipe.maskserver.snapshot import SnapshotPool
        from mimpipe.maskserver.keys import client_curve
        self.client = MaskClient(endpoint, rank=rank, world_size=world_size, plan_hash=plan_hash,
                                 cursor=cursor, credits=credits, mask_timeout=mask_timeout,
                                 policy=policy, heartbeat=heartbeat, num_patches=num_patches,
                                 ratio=ratio, seed=seed, run_id=run_id,
                                 restart_id=restart_id or launch_id(world_size), others=tuple(others),
                                 curve=client_curve(curve, rank) if curve else None,
                                 run={"strategy": strategy, "model": model, "source": self.kind,
                                      "ratio": float(ratio), "lut": projector,
                                      "targets": ["gpa_target"] if mam else [],
                                      **({"epochs": epochs} if epochs else {})})
        self.should_stop = should_stop
        self.rank, self.needs_weights = rank, strategy != "random" and self.kind != "frozen"
        self.skip = () if projector else ("projector.",)
        self.snapshots = SnapshotPool(torch.bfloat16)  # the server casts to its teacher's dtype

    def get(self, batch) -> Masks:
        t0 = time.perf_counter()
        try:
            mb = self.client.get(batch.epoch, batch.step, batch.sample_ids.numpy(), should_stop=self.should_stop)
        except self.client.Interrupted:
            raise StopRequested(f"rank {self.rank}: a signal arrived while waiting for the masks of epoch "
                                f"{batch.epoch} step {batch.step}") from None
        return Masks(mb.mask, mb.targets, mb.teacher_version,
                     None if mb.teacher_step < 0 else mb.teacher_step, time.perf_counter() - t0, mb.fallback)

    def sync(self, step: int, student: torch.nn.Module, ema: torch.nn.Module):
        """Rank 0 uploads; the server shares one teacher between the ranks it serves. This thread
        only takes the snapshot (maskserver/snapshot.py: a fill on the weights' device, bf16, and
        an asynchronous copy to the host); the client's I/O thread hashes and sends it. Returns the
        snapshot, or None: not rank 0, no weights needed, or both buffers still on the wire (the
        sync is skipped, counted in snapshots.skipped; the per-step staleness shows it)."""
        if self.rank != 0 or not self.needs_weights:
            return None
        src = (student if self.kind == "online" else ema).state_dict()
        snap = self.snapshots.take({k: v for k, v in src.items()
                                    if k.startswith(self.prefixes) and not k.startswith(self.skip)},
                                   version=step, step=step)
        if snap is not None:
            self.client.send_snapshot(snap)
        return snap

    def close(self) -> None:
        self.client.close()
