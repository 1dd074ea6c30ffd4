"""MAE random masking (docs/methods.md 0.4) [C facebookresearch/mae models_mae.py `random_masking`].

Named random_mask.py rather than random.py so that running anything from this folder can never
shadow the standard library's `random`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .masking import len_keep_for, mask_from_scores


def random_mask(N: int, L: int, ratio: float, *, generator: torch.Generator,
                device: torch.device | str | None = None) -> Tensor:
    """Uniformly random mask with exactly L - int(L*(1-ratio)) masked patches per image.

    Returns mask [N, L] bool, True = masked. The noise is `torch.rand(N, L)` drawn from `generator`
    (on `device`, which must match the generator's device), so it equals MAE's `random_masking`
    given the same noise.
    """
    noise = torch.rand(N, L, generator=generator, device=device)  # U[0,1): small is keep
    return mask_from_scores(noise, len_keep_for(L, ratio))
