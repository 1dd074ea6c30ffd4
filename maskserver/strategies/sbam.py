"""SBAM salience-based masking (docs/methods.md 1.1-1.2) [C doihye/SBAM models_mae.py `saliency_guided_masking`].

The salience is computed from the encoder *input* tokens (patch_embed + pos_embed[:, 1:], cls
excluded, before masking): no transformer block, no q/k projections, no 1/sqrt(D).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .masking import len_keep_for, mask_from_scores

EPS = 1e-6  # the official code divides by (max - min) bare: NaN for a constant image (docs/methods.md 1.1 [I])


@torch.no_grad()  # selection only goes through argsort: nothing to differentiate
def affinity_column_sums(x: Tensor, *, chunk: int | None = 1024) -> Tensor:
    """s_j = Σ_i softmax_row(X Xᵀ)_ij: x [N, L, D] -> s [N, L] fp32, Σ_j s_j = L.

    Computed in fp32 because unscaled XXᵀ overflows fp16 for wide models. chunk: queries per step;
    s_j = Σ_i exp(x_i·x_j - lse_i) only needs each query's own row, so storing [N, chunk, L] of A
    suffices for any L (chunking keys too would only add a second pass for lse). chunk=None builds
    the whole [N, L, L] matrix as the official code does: the reference path, tested to agree.
    """
    x = x.float()
    N, L, _ = x.shape
    step = L if chunk is None else chunk
    s = x.new_zeros(N, L)
    for i0 in range(0, L, step):  # loop over query chunks, never over images
        logits = x[:, i0:i0 + step] @ x.transpose(1, 2)  # [N, C, L] = x_i · x_j, no 1/sqrt(D)
        s += logits.softmax(dim=-1).sum(dim=1)  # sum over the query axis (dim=1 in the code)
    return s


def sbam_salience(x: Tensor, *, chunk: int | None = 1024) -> Tensor:
    """Token salience ŝ [N, L] fp32 in [0, 1] (the least salient patch is exactly 0): column sums
    of softmax_row(X Xᵀ), min-max normalized per image. x: [N, L, D] patch tokens."""
    s = affinity_column_sums(x, chunk=chunk)
    s_min = s.amin(dim=1, keepdim=True)
    s_max = s.amax(dim=1, keepdim=True)
    return (s - s_min) / (s_max - s_min + EPS)


def sbam_scores(salience: Tensor, *, generator: torch.Generator, noise_scale: float = 0.5) -> Tensor:
    """ŝ + U(0, noise_scale): [N, L] -> [N, L]. Salient patches get high scores, i.e. are masked
    first; the noise (official: `torch.rand(N, L) / 2`) gives background patches a chance."""
    noise = torch.rand(salience.shape, generator=generator, device=salience.device)
    return salience + noise_scale * noise


def sbam_mask(salience: Tensor, ratio: float, *, generator: torch.Generator,
              noise_scale: float = 0.5) -> Tensor:
    """SBM mask: keep the int(L*(1-ratio)) lowest ŝ + noise. salience: [N, L] from `sbam_salience`.
    Returns mask [N, L] bool, True = masked, exactly L - len_keep per image."""
    scores = sbam_scores(salience, generator=generator, noise_scale=noise_scale)
    return mask_from_scores(scores, len_keep_for(salience.shape[1], ratio))
