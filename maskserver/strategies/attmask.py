"""AttMask (Kakogeorgiou et al., ECCV 2022) [C gkakogeorgiou/attmask@9f62061 attmask.py, main_attmask.py].

What the official code does (iBOT framework, EMA teacher):
- main_attmask.py l.461-465: the teacher's last block softmax attention, [CLS] query row over the
  patch keys, averaged over heads: `teacher_attention[:, :, 0, 1:].mean(1)` -> [N, L].
- attmask.py l.45-55 `attention_masking`: masks the top N = int(L * ratio) tokens ('high'), or the
  bottom N ('low'). Note the count truncates the *masked* number; MAE truncates the kept number.
- attmask.py l.37-38 `get_mask`: one u ~ U[0,1) per image; images with u > masking_prob (default 0.5,
  main_attmask.py l.161) get NO mask at all. So by default about half the images are unmasked.
- attmask.py l.16-26, 60-69 'hint': of the top int(L * show_max) tokens (show_max 0.1, l.163),
  int(show_max * ratio * L) are drawn uniformly without replacement and revealed (unmasked).
- The ratio (`pred_ratio`, default 0.3 +- `pred_ratio_var` in the README recipes 0.2) is drawn once
  per iteration with Python's `random` (loader.py l.35-51), the same for the whole batch.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .masking import mask_from_scores

ATTMASK_MODES = ("high", "hint", "low")


def attmask_mask(cls_attn: Tensor, ratio: float, *, generator: torch.Generator,
                 masking_prob: float = 0.5, mode: str = "high", show_max: float = 0.1,
                 ratio_var: float = 0.0) -> Tensor:
    """cls_attn: [N, L], the head-averaged cls->patch attention. Returns mask [N, L] bool, True =
    masked. Each image is masked with probability masking_prob, with int(L*r) patches ('hint':
    minus the revealed ones), else not at all. r = ratio, or U(ratio ± ratio_var) once per call.
    Random draws, in order: r (only if ratio_var > 0), the per-image u, the hint sample.
    """
    if mode not in ATTMASK_MODES:
        raise ValueError(f"unknown attmask mode {mode!r}; choose from {', '.join(ATTMASK_MODES)}")
    N, L = cls_attn.shape
    dev = cls_attn.device
    if ratio_var > 0:
        u = torch.rand((), generator=generator, device=dev).item()
        ratio = ratio - ratio_var + 2 * ratio_var * u
    n_mask = int(L * ratio)
    score = -cls_attn if mode == "low" else cls_attn  # masked = the n_mask highest score
    mask = mask_from_scores(score, L - n_mask)
    use = torch.rand(N, generator=generator, device=dev) <= masking_prob  # code: u > prob -> unmasked
    mask &= use.unsqueeze(1)
    n_reveal = int(show_max * ratio * L)
    if mode == "hint" and n_reveal > 0:
        top = mask_from_scores(cls_attn, L - int(L * show_max))  # the most attended tokens
        reveal = torch.multinomial(top.float(), n_reveal, replacement=False, generator=generator)
        mask.scatter_(1, reveal, False)
    return mask
