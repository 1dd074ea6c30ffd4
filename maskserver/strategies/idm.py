"""IDM: mask by one sampled head's [CLS] attention (docs/methods.md 5.2; CAMAE paper §III-C, no code).

The teacher gives the last block's per-head cls->patch softmax attention; PLB (`plb.py`) picks a
head per image; the top `ratio` of that head's map is masked with no noise.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .masking import len_keep_for, mask_from_scores


def idm_mask(cls_attn: Tensor, heads: Tensor, ratio: float) -> Tensor:
    """cls_attn: [N, M, L] attention of the cls query over the L patches, per head M;
    heads: [N] long, the head used for each image. Returns mask [N, L] bool, True = masked:
    the L - int(L*(1-ratio)) most attended patches of head heads[b] (docs/methods.md 7 #15: "mask the
    75% highest", 147 of 196). Deterministic; ties keep the lower patch index visible.
    """
    N, _, L = cls_attn.shape
    chosen = cls_attn[torch.arange(N, device=cls_attn.device), heads.to(cls_attn.device)]  # [N, L]
    return mask_from_scores(chosen, len_keep_for(L, ratio))
