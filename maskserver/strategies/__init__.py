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

Calling the Strategy checks that the `needs` fields are set, then calls `run`; gpa, idm and attmask
are `cacheable`: run is `sample(score(inp))`, a deterministic per-patch score from the teacher
(gpa: raw GPA of its head [N, 1, L]; idm: per-head cls attention [N, M, L]; attmask: its head mean
[N, 1, L]) and the stochastic step after it, so a score cache can serve the score.
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

import inspect
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import torch
from torch import Tensor

from .amr import amr_mask, amr_ratios
from .attmask import attmask_mask
from .gpa import (gpa_counts, gpa_mask, gpa_normalize, gpa_raw, gpa_schedule, gpa_scores, gpa_target, head_recall,
                  select_head)
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


# gpa, idm and attmask split into a score, a pure function of the teacher's output ([N, C, L]: what
# a score cache (maskserver/score_cache.py) can store and resample onto another crop), and the
# stochastic step that turns scores into a mask; run = sample(score(inp)), the exact path.
def _gpa_score(inp: MaskInputs, *, head: int = 11, exclude_self_cls: bool = False) -> Tensor:
    return gpa_raw(inp.q, inp.k, head=head, exclude_self_cls=exclude_self_cls).unsqueeze(1)


def _gpa_sample(scores: Tensor, ratio: float, *, generator: torch.Generator, progress: float = 0.0,
                head_probs: Tensor | None = None, **alphas: float) -> Masked:
    g = gpa_normalize(scores[:, 0].float())  # over the crop's own patches, as on the exact path
    return _out(gpa_mask(g, ratio, progress, generator=generator, **alphas), gpa_target=gpa_target(g))


def _cls_attn_score(inp: MaskInputs) -> Tensor:
    return inp.cls_attn


def _idm_sample(scores: Tensor, ratio: float, *, generator: torch.Generator, progress: float = 0.0,
                head_probs: Tensor | None = None) -> Masked:
    N, M, _ = scores.shape
    p = head_probs if head_probs is not None else torch.full((M,), 1.0 / M)
    heads = plb_sample(p.to(generator.device), N, generator=generator)
    return _out(idm_mask(scores.float(), heads, ratio), heads=heads)


def _head_mean_score(inp: MaskInputs) -> Tensor:
    return inp.cls_attn.mean(dim=1, keepdim=True)


def _attmask_sample(scores: Tensor, ratio: float, *, generator: torch.Generator, progress: float = 0.0,
                    head_probs: Tensor | None = None, **opts) -> Masked:
    return _out(attmask_mask(scores[:, 0].float(), ratio, generator=generator, **opts))


@dataclass(frozen=True)
class Strategy:
    name: str
    needs: str  # one of NEEDS
    block: int | None  # teacher block for 'qk' / 'cls_attn' (-1 = last); None = no block runs
    run: Callable[..., Masked] | None = None  # run(inp: MaskInputs, ratio, *, generator, **options) -> Masked
    # the split of a cacheable strategy (run is then their composition):
    score: Callable[..., Tensor] | None = None  # score(inp, **score options) -> [N, C, L]
    sample: Callable[..., Masked] | None = None  # sample(scores, ratio, *, generator, progress, head_probs, **rest)

    def __post_init__(self):
        if (self.run is None) == (self.score is None or self.sample is None):
            raise ValueError(f"strategy {self.name!r}: give run, or score and sample")

    @property
    def cacheable(self) -> bool:
        return self.score is not None

    @cached_property
    def score_options(self) -> tuple[str, ...]:
        """The options `score` takes (its keyword-only parameters); the others go to `sample`."""
        params = inspect.signature(self.score).parameters.values() if self.score is not None else ()
        return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY)

    def split_options(self, options: dict) -> tuple[dict, dict]:
        """(score options, sample options) of a cacheable strategy."""
        return ({k: v for k, v in options.items() if k in self.score_options},
                {k: v for k, v in options.items() if k not in self.score_options})

    def __call__(self, inp: MaskInputs, ratio: float, *, generator: torch.Generator, **options) -> Masked:
        """The mask of `inp`, after checking that the teacher filled the fields this strategy needs."""
        missing = [f for f in NEEDS[self.needs] if getattr(inp, f) is None]
        if missing:
            raise ValueError(f"strategy {self.name!r} needs MaskInputs.{', '.join(missing)} "
                             f"(needs={self.needs!r}); the teacher did not provide it")
        if self.run is not None:
            return self.run(inp, ratio, generator=generator, **options)
        so, rest = self.split_options(options)
        return self.sample(self.score(inp, **so), ratio, generator=generator, progress=inp.progress,
                           head_probs=inp.head_probs, **rest)


STRATEGIES: dict[str, Strategy] = {
    "random": Strategy("random", "none", None, _random),
    "sbam": Strategy("sbam", "embed", None, _sbam),
    "amr": Strategy("amr", "embed", None, _amr),
    # b9h11: the paper's few-shot pick and the code default
    "gpa": Strategy("gpa", "qk", 9, score=_gpa_score, sample=_gpa_sample),
    "idm": Strategy("idm", "cls_attn", -1, score=_cls_attn_score, sample=_idm_sample),
    "attmask": Strategy("attmask", "cls_attn", -1, score=_head_mean_score, sample=_attmask_sample),
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
    "gpa_raw", "gpa_normalize", "gpa_scores", "gpa_schedule", "gpa_counts", "gpa_mask", "gpa_target",
    "head_recall", "select_head",
    "idm_mask", "plb_sample", "plb_update", "plb_accumulate", "attmask_mask",
]
