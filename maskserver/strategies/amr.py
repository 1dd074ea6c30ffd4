"""Adaptive Masking Ratio (docs/methods.md 1.3-1.4) [C doihye/SBAM models_mae.py `saliency_guided_masking`].

More salient area => higher ratio: r = r0 - Δ + 2Δ·c, c = fraction of patches with ŝ > δ.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .masking import mask_from_scores
from .sbam import sbam_scores

AMR_MODES = ("batch", "sample")


def amr_ratios(salience: Tensor, base_ratio: float = 0.75, ratio_var: float = 0.1,
               delta: float = 0.5, mode: str = "batch") -> Tensor:
    """Per-image len_keep [N] long from salience ŝ [N, L] (in [0, 1], from `sbam_salience`).

    mode='batch' (official code): one r from the batch mean of c_b, so every entry is equal.
    mode='sample' (paper): r_b from each image's own c_b.
    r is clamped to [0, 1] and len_keep = int(L*(1-r)) to [1, L] (a third-party port's guard; with
    the defaults r stays in [0.65, 0.85] and the clamps never act). Arithmetic is float64 so that
    the truncation equals Python's `int(L * (1 - r))` in `len_keep_for` for the same r.
    Δ=0.1 and δ=0.5 are unverified against the paper (docs/methods.md 7 #2: the release has no defaults).
    """
    if mode not in AMR_MODES:
        raise ValueError(f"unknown amr mode {mode!r}; choose from {', '.join(AMR_MODES)}")
    N, L = salience.shape
    c = (salience > delta).sum(dim=1).double() / L  # strict '>' as in the code
    if mode == "batch":
        c = c.mean().expand(N)
    r = (base_ratio - ratio_var + 2 * ratio_var * c).clamp(0.0, 1.0)
    return (L * (1 - r)).floor().long().clamp(1, L)


def amr_mask(salience: Tensor, base_ratio: float = 0.75, *, generator: torch.Generator,
             ratio_var: float = 0.1, delta: float = 0.5, mode: str = "batch",
             noise_scale: float = 0.5) -> Tensor:
    """SBAM masking with the AMR count: keep the len_keep[b] lowest ŝ + U(0, noise_scale).

    salience: [N, L]. Returns mask [N, L] bool, True = masked; row b has L - len_keep[b] masked
    (recover len_keep as `(~mask).sum(1)`). ratio_var=0 is plain `sbam_mask(salience, base_ratio)`.
    """
    len_keep = amr_ratios(salience, base_ratio, ratio_var, delta, mode)
    scores = sbam_scores(salience, generator=generator, noise_scale=noise_scale)
    return mask_from_scores(scores, len_keep)
