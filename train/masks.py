"""Where a trainer's masks come from: `random` (plain MAE), `inloop:<strategy>` (the teacher in
the trainer's own process: the baseline the decoupled design is measured against), or a mask
server (`tcp://...`, maskserver/client.py). All three answer `get(batch) -> Masks` for exactly the
batch (epoch, step) of this rank, and draw their noise from the plan's batch_seed, so the same
weights give the same masks on every path."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from mimpipe.maskserver.client import MaskClient, batch_generator
from mimpipe.maskserver.strategies import random_mask
from mimpipe.maskserver.teacher import Teacher, default_source


@dataclass
class Masks:
    mask: torch.Tensor                 # [N, L] bool, True = masked
    extras: dict = field(default_factory=dict)   # gpa_target, heads, lut_t1/t2 ...
    teacher_version: int = -1
    teacher_step: int | None = None
    wait_s: float = 0.0                # time the trainer spent waiting for (or computing) them
    fallback: bool = False             # random masks because the server did not answer in time


class RandomMasks:
    def __init__(self, num_patches: int, ratio: float, seed: int, rank: int):
        self.L, self.ratio, self.seed, self.rank = num_patches, ratio, seed, rank

    def get(self, batch) -> Masks:
        g = batch_generator(self.seed, batch.epoch, batch.step, self.rank)
        return Masks(random_mask(len(batch.sample_ids), self.L, self.ratio, generator=g))

    def sync(self, step: int, student: torch.nn.Module, ema: torch.nn.Module) -> None:
        pass

    def close(self) -> None:
        pass


class InloopMasks:
    """The teacher runs here, between the trainer's steps: every batch pays for its forward."""

    def __init__(self, strategy: str, model: str, *, ratio: float, seed: int, rank: int,
                 source: str | None = None, block: int | None = None, options: dict | None = None,
                 device="cpu", epochs: int = 1):
        self.strategy, self.ratio, self.seed, self.rank = strategy, ratio, seed, rank
        self.block, self.options, self.epochs = block, options or {}, epochs
        self.teacher = Teacher(model, source or default_source(strategy),
                               strategy=strategy, block=block, projector_hidden=None, device=device)
        self.head_probs = None   # PLB's p for idm; None = uniform

    def get(self, batch) -> Masks:
        t0 = time.perf_counter()
        g = batch_generator(self.seed, batch.epoch, batch.step, self.rank, self.teacher.device)
        out = self.teacher.compute(batch.images, self.strategy, ratio=self.ratio, generator=g,
                                   progress=batch.epoch / self.epochs, head_probs=self.head_probs,
                                   block=self.block, options=self.options)
        return Masks(out.mask.cpu(), {k: v.cpu() for k, v in out.extras.items()}, self.teacher.version,
                     self.teacher.step, time.perf_counter() - t0)

    def sync(self, step: int, student: torch.nn.Module, ema: torch.nn.Module) -> None:
        """online: the student's current weights (only what the strategy reads); momentum: the EMA."""
        if self.teacher.kind == "frozen":
            return
        src = (student if self.teacher.kind == "online" else ema).state_dict()
        self.teacher.load_state({k: src[k] for k in self.teacher.held}, version=step, step=step)

    def close(self) -> None:
        pass


class ServerMasks:
    """Masks from a mask server (maskserver/client.py); the trainer's weights go back to it."""

    def __init__(self, endpoint: str, *, strategy: str, model: str, source: str | None, rank: int,
                 world_size: int, plan_hash: str, cursor: tuple[int, int], num_patches: int,
                 ratio: float, seed: int, credits: int, mask_timeout: float, policy: str,
                 heartbeat: float, projector: bool = False):
        """projector: send the EMA's 'projector.*' too; only a server run with --lut holds one
        (maskserver/teacher.py), and any other teacher rejects weights with names it lacks."""
        self.kind = (source or default_source(strategy)).split(":", 1)[0]
        self.prefixes = Teacher.state_for(strategy, model) if self.kind == "online" else ("",)
        self.client = MaskClient(endpoint, rank=rank, world_size=world_size, plan_hash=plan_hash,
                                 cursor=cursor, credits=credits, mask_timeout=mask_timeout,
                                 policy=policy, heartbeat=heartbeat, num_patches=num_patches,
                                 ratio=ratio, seed=seed)
        self.rank, self.needs_weights = rank, strategy != "random" and self.kind != "frozen"
        self.skip = () if projector else ("projector.",)

    def get(self, batch) -> Masks:
        t0 = time.perf_counter()
        mb = self.client.get(batch.epoch, batch.step, batch.sample_ids.numpy())
        return Masks(mb.mask, mb.targets, mb.teacher_version,
                     None if mb.teacher_step < 0 else mb.teacher_step, time.perf_counter() - t0, mb.fallback)

    def sync(self, step: int, student: torch.nn.Module, ema: torch.nn.Module) -> None:
        """Rank 0 uploads; the server shares one teacher between the ranks it serves."""
        if self.rank != 0 or not self.needs_weights:
            return
        src = (student if self.kind == "online" else ema).state_dict()
        self.client.send_weights({k: v for k, v in src.items()
                                  if k.startswith(self.prefixes) and not k.startswith(self.skip)},
                                 version=step, step=step)

    def close(self) -> None:
        self.client.close()
