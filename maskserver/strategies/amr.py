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
    the defaults r stays in [0.65, 0.85] and the clamps never act). c, r and L*(1-r) are float32
    tensors computed in the official order (`y.float().mean() / y_max`, then the r expression, then
    `int(L * (1 - r))` truncates): where L*(1-r) is an integer in exact arithmetic float32 and float64
    truncate to different K (L=196, 3 salient patches: 68 vs 67), and the official K is float32's.
    Δ=0.1 and δ=0.5 are unverified against the paper (docs/methods.md 7 #2: the release has no defaults).
    """
    if mode not in AMR_MODES:
        raise ValueError(f"unknown amr mode {mode!r}; choose from {', '.join(AMR_MODES)}")
    N, L = salience.shape
    y = (salience > delta).sum(dim=1).float()  # strict '>' as in the code
    c = (y.mean().expand(N) if mode == "batch" else y) / L  # official: mean first, then / y_max
    r = (base_ratio - ratio_var + 2 * ratio_var * c).clamp(0.0, 1.0)
    return (L * (1 - r)).long().clamp(1, L)  # .long() truncates toward zero, as int() does


def amr_mask(salience: Tensor, base_ratio: float = 0.75, *, generator: torch.Generator,
             ratio_var: float = 0.1, delta: float = 0.5, mode: str = "batch",
             noise_scale: float = 0.5) -> Tensor:
    """SBAM masking with the AMR count: keep the len_keep[b] lowest ŝ + U(0, noise_scale).

    salience: [N, L]. Returns mask [N, L] bool, True = masked; row b has L - len_keep[b] masked
    (recover len_keep as `(~mask).sum(1)`). ratio_var=0 is `sbam_mask(salience, base_ratio)` except
    where the float32 K differs from `len_keep_for`'s float64 one (r0=0.6, L=50: 19 vs 20), as in
    the official code.
    """
    len_keep = amr_ratios(salience, base_ratio, ratio_var, delta, mode)
    scores = sbam_scores(salience, generator=generator, noise_scale=noise_scale)
    return mask_from_scores(scores, len_keep)
