"""PLB: loss-driven probabilities over attention heads for IDM (docs/methods.md 5.3; CAMAE Eq. 4-5).

State is one vector p [M]; the trainer accumulates per-head loss sums/counts during an epoch (all-
reduced across ranks) and calls `plb_update` once per epoch. Heads with higher loss get sampled more.
"""
from __future__ import annotations

import torch
from torch import Tensor


def plb_sample(p: Tensor, N: int, *, generator: torch.Generator) -> Tensor:
    """One head per image (docs/methods.md 7 #16 default): p [M] -> heads [N] long, m ~ Categorical(p)."""
    return torch.multinomial(p, N, replacement=True, generator=generator)


def plb_accumulate(loss_sum: Tensor, count: Tensor, heads: Tensor, loss: Tensor) -> tuple[Tensor, Tensor]:
    """Add per-image reconstruction losses to the epoch statistics (returns new tensors).

    loss_sum, count: [M]; heads: [N] long (from `plb_sample`); loss: [N], each image's mean loss
    over its masked patches. Sum then all-reduce across ranks before `plb_update`.
    """
    loss_sum = loss_sum.index_add(0, heads, loss.to(loss_sum.dtype))
    count = count.index_add(0, heads, torch.ones_like(heads, dtype=count.dtype))
    return loss_sum, count


def plb_update(p: Tensor, loss_sum: Tensor, count: Tensor, prev_L: Tensor | None = None,
               lam: float = 0.99, eps: float = 0.2) -> tuple[Tensor, Tensor]:
    """p <- (1 - lam) p + lam softmax(L / eps), L^m = loss_sum^m / count^m. Returns (p_new, L), all [M].

    A head with count 0 has no new evidence: it keeps prev_L[m] (last epoch's value), or, when there
    is no previous epoch (prev_L None), the mean L of the heads that were seen [I]. Pass the
    returned L as prev_L next epoch. Example: p=(1/3,1/3,1/3), L=(.5,.6,.7) -> (.18779,.30746,.50475).
    """
    seen = count > 0
    if not bool(seen.any()) and prev_L is None:
        raise ValueError("plb_update: no head was sampled this epoch and there is no previous L")
    L = loss_sum / count.clamp_min(1).to(loss_sum.dtype)
    fill = prev_L.to(L.dtype) if prev_L is not None else L[seen].mean().expand_as(L)
    L = torch.where(seen, L, fill)
    return (1 - lam) * p + lam * torch.softmax(L / eps, dim=0), L
