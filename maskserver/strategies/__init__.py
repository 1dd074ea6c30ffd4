"""Mask strategies: pure functions of teacher tensors, plus one registry with a uniform call.

Each file holds one method's pure functions (masking.py is the shared MAE path). The registry
wraps them so the server can treat all strategies alike:

    strategy = get_strategy("gpa")
    strategy.needs   # which teacher quantity to compute: one of NEEDS
    strategy.block   # at which encoder block (-1 = last), None if no block runs
    out = strategy(MaskInputs(N, L, q=q, k=k, progress=t), 0.75, generator=g, head=11)
    out.mask         # [N, L] bool, True = masked (MAE: 1 is remove)
    out.len_keep     # [N] long, visible patches per image (varies only for amr 'sample', attmask)
    out.extras       # per-image side outputs: gpa -> {'gpa_target': [N, L]}, idm -> {'heads': [N]}

Calling the Strategy checks that the `needs` fields are set, then calls `run`.
`needs` tells the teacher to run only what is needed:
    'none'      random                nothing
    'embed'     sbam, amr             patch_embed(img) + pos_embed[:, 1:], [N, L, D] (no block)
    'qk'        gpa                   q, k [N, H, 1+L, dh] of block `block` (default 9; the run
                                      config may override it), from norm1 of that block's input
    'cls_attn'  idm, attmask          softmax attention of the cls query over the L patches in the
                                      last block, per head, [N, M, L]
The generator must live on the device of the teacher tensors (all noise is drawn there). Keyword
options are forwarded to the method's pure function (e.g. noise_scale, ratio_var, delta,
mode, head, exclude_self_cls, alpha_h0..alpha_sT, masking_prob, show_max); an unknown one raises
TypeError naming it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .amr import amr_mask, amr_ratios
from .attmask import attmask_mask
from .gpa import gpa_counts, gpa_mask, gpa_schedule, gpa_scores, gpa_target, head_recall, select_head
from .idm import idm_mask
from .masking import len_keep_for, mask_from_scores, pack_mask, unpack_mask
from .plb import plb_accumulate, plb_sample, plb_update
from .random_mask import random_mask
from .sbam import sbam_mask, sbam_salience

# needs -> the MaskInputs fields it requires
NEEDS = {"none": (), "embed": ("embed",), "qk": ("q", "k"), "cls_attn": ("cls_attn",)}


@dataclass(frozen=True)
class MaskInputs:
    """Everything a strategy may read for one batch; only the field its `needs` names is required."""
    N: int
    L: int
    embed: Tensor | None = None  # [N, L, D]
    q: Tensor | None = None  # [N, H, 1 + L, dh], cls first
    k: Tensor | None = None  # [N, H, 1 + L, dh]
    cls_attn: Tensor | None = None  # [N, M, L]
    progress: float = 0.0  # t = epoch / T (gpa's soft-to-hard schedule)
    head_probs: Tensor | None = None  # PLB p [M] (idm); None = uniform


@dataclass(frozen=True)
class Masked:
    mask: Tensor  # [N, L] bool, True = masked
    len_keep: Tensor  # [N] long
    extras: dict[str, Tensor] = field(default_factory=dict)


def _out(mask: Tensor, **extras: Tensor) -> Masked:
    return Masked(mask, (~mask).sum(dim=1), extras)


def _random(inp: MaskInputs, ratio: float, *, generator: torch.Generator) -> Masked:
    return _out(random_mask(inp.N, inp.L, ratio, generator=generator, device=generator.device))


def _sbam(inp: MaskInputs, ratio: float, *, generator: torch.Generator, chunk: int | None = 1024,
          **opts) -> Masked:
    return _out(sbam_mask(sbam_salience(inp.embed, chunk=chunk), ratio, generator=generator, **opts))


def _amr(inp: MaskInputs, ratio: float, *, generator: torch.Generator, chunk: int | None = 1024,
         **opts) -> Masked:
    return _out(amr_mask(sbam_salience(inp.embed, chunk=chunk), ratio, generator=generator, **opts))


def _gpa(inp: MaskInputs, ratio: float, *, generator: torch.Generator, head: int = 11,
         exclude_self_cls: bool = False, **alphas: float) -> Masked:
    g = gpa_scores(inp.q, inp.k, head=head, exclude_self_cls=exclude_self_cls)
    mask = gpa_mask(g, ratio, inp.progress, generator=generator, **alphas)
    return _out(mask, gpa_target=gpa_target(g))


def _idm(inp: MaskInputs, ratio: float, *, generator: torch.Generator) -> Masked:
    M = inp.cls_attn.shape[1]
    p = inp.head_probs if inp.head_probs is not None else torch.full((M,), 1.0 / M)
    heads = plb_sample(p.to(generator.device), inp.N, generator=generator)
    return _out(idm_mask(inp.cls_attn, heads, ratio), heads=heads)


def _attmask(inp: MaskInputs, ratio: float, *, generator: torch.Generator, **opts) -> Masked:
    return _out(attmask_mask(inp.cls_attn.mean(dim=1), ratio, generator=generator, **opts))


@dataclass(frozen=True)
class Strategy:
    name: str
    needs: str  # one of NEEDS
    block: int | None  # teacher block for 'qk' / 'cls_attn' (-1 = last); None = no block runs
    run: Callable[..., Masked]  # run(inp: MaskInputs, ratio, *, generator, **options) -> Masked

    def __call__(self, inp: MaskInputs, ratio: float, *, generator: torch.Generator, **options) -> Masked:
        """`run` after checking that the teacher filled the fields this strategy needs."""
        missing = [f for f in NEEDS[self.needs] if getattr(inp, f) is None]
        if missing:
            raise ValueError(f"strategy {self.name!r} needs MaskInputs.{', '.join(missing)} "
                             f"(needs={self.needs!r}); the teacher did not provide it")
        return self.run(inp, ratio, generator=generator, **options)


STRATEGIES: dict[str, Strategy] = {
    "random": Strategy("random", "none", None, _random),
    "sbam": Strategy("sbam", "embed", None, _sbam),
    "amr": Strategy("amr", "embed", None, _amr),
    "gpa": Strategy("gpa", "qk", 9, _gpa),  # b9h11: the paper's few-shot pick and the code default
    "idm": Strategy("idm", "cls_attn", -1, _idm),
    "attmask": Strategy("attmask", "cls_attn", -1, _attmask),
}


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}") from None


__all__ = [
    "NEEDS", "STRATEGIES", "MaskInputs", "Masked", "Strategy", "get_strategy",
    "mask_from_scores", "len_keep_for", "pack_mask", "unpack_mask", "random_mask",
    "sbam_salience", "sbam_mask", "amr_ratios", "amr_mask",
    "gpa_scores", "gpa_schedule", "gpa_counts", "gpa_mask", "gpa_target", "head_recall", "select_head",
    "idm_mask", "plb_sample", "plb_update", "plb_accumulate", "attmask_mask",
]
