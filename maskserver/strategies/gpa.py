"""GPA: global patch-wise attention scores and soft-to-hard masking (docs/methods.md 3.2-3.5).

[C Lrbomchz/MM2024_GPA models_vit_teacher.py `forward_features` (score), models_GPA.py
`prob_masking` "SP+RAND" (mask)]; [P] Eq. 5-6 and §3.4 (few-shot head choice, not in the code).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .masking import len_keep_for, mask_from_scores

EPS = 1e-6  # the official min-max has no eps: NaN for a constant row [I]
HARD, SOFT = 3.0, 2.0  # priorities above U[0,1) noise, as in the code: hard wins over soft


@torch.no_grad()
def gpa_per_head(q: Tensor, k: Tensor, *, exclude_self_cls: bool = False) -> Tensor:
    """Raw GPA of every head: q, k [N, H, T, dh] (T = 1 + L, cls first) -> [N, H, L] fp32.

    Code form (default): GPA_j = Σ_{i=0..L} q_i·k_j / sqrt(dh), cls query and self included.
    Paper form (exclude_self_cls): GPA_j = (Σ_{i=1..L} q_i - q_j)·k_j / sqrt(dh).
    Both are linear in the queries, so the [T, T] logit matrix is never built.
    """
    q, k = q.float(), k.float()
    k_patch = k[:, :, 1:]  # cls as a key is dropped
    q_sum = q.sum(dim=2, keepdim=True)  # [N, H, 1, dh]: the code sums raw logits over dim 2 (queries)
    if exclude_self_cls:
        q_sum = q_sum - q[:, :, :1] - q[:, :, 1:]  # per key j: drop the cls query and q_j itself
    return (q_sum * k_patch).sum(-1) / q.shape[-1] ** 0.5


def gpa_raw(q: Tensor, k: Tensor, *, head: int, exclude_self_cls: bool = False) -> Tensor:
    """Raw GPA [N, L] of one head (head=-1: the sum of all heads' raw GPA)."""
    a = gpa_per_head(q, k, exclude_self_cls=exclude_self_cls)
    return a.sum(dim=1) if head == -1 else a[:, head]


def gpa_normalize(a: Tensor) -> Tensor:
    """Per-image min-max of raw GPA [N, L] -> g in [0, 1] (of the patches present: a crop's own)."""
    a_min, a_max = a.amin(dim=1, keepdim=True), a.amax(dim=1, keepdim=True)
    return (a - a_min) / (a_max - a_min + EPS)


def gpa_scores(q: Tensor, k: Tensor, *, head: int, exclude_self_cls: bool = False) -> Tensor:
    """Normalized GPA g [N, L] in [0, 1] of one head (head=-1: sum of all heads' raw GPA first).
    q, k: [N, H, 1 + L, dh] of block b* (default (9, 11), chosen by the caller)."""
    return gpa_normalize(gpa_raw(q, k, head=head, exclude_self_cls=exclude_self_cls))


def gpa_schedule(t: float, alpha_h0: float = 0.0, alpha_hT: float = 0.5,
                 alpha_s0: float = 0.5, alpha_sT: float = 0.0) -> tuple[float, float]:
    """(α_h, α_s) at progress t = epoch / T: hard and soft fractions of the *masked* count.
    Defaults are the paper's §4.1 (hard 0 -> 0.5, soft 0.5 -> 0); the code's argparse has 0.2 -> 0.6
    and 0.3 -> 0."""
    return alpha_h0 + t * (alpha_hT - alpha_h0), alpha_s0 + t * (alpha_sT - alpha_s0)


def gpa_counts(L: int, ratio: float, t: float, **alphas: float) -> tuple[int, int, int]:
    """(n_hard, n_soft, n_random), summing to n_mask = L - int(L*(1-ratio)).
    L=196, r=0.75: t=0 -> (0, 73, 74), t=0.5 -> (36, 36, 75), t=1 -> (73, 0, 74)."""
    n_mask = L - len_keep_for(L, ratio)
    alpha_h, alpha_s = gpa_schedule(t, **alphas)
    if not (0.0 <= alpha_h <= 1.0 and alpha_s >= 0.0):
        raise ValueError(f"gpa: need 0 <= alpha_h <= 1 and alpha_s >= 0 at t={t}, got {alpha_h}, {alpha_s}")
    n_h, n_s = int(n_mask * alpha_h), int(n_mask * alpha_s)
    if n_h + n_s > n_mask:
        n_s = n_mask - n_h
    return n_h, n_s, n_mask - n_h - n_s


def gpa_priority(g: Tensor, n_hard: int, n_soft: int, *, generator: torch.Generator) -> Tensor:
    """The "noise" of the MAE path: [N, L] with HARD on the top-n_hard of g, SOFT on n_soft patches
    drawn without replacement with P ∝ g, U[0,1) elsewhere (the random fill).

    A patch drawn soft that is also hard just stays hard, so its soft slot goes to the random fill
    (code behaviour, kept). The minimum patch (g = 0) is never drawn soft. A row with fewer than
    n_soft positive entries (e.g. a constant g) is drawn uniformly instead of crashing multinomial.
    """
    u = torch.rand(g.shape, generator=generator, device=g.device)  # drawn first, as in the code
    if n_soft > 0:
        enough = (g > 0).sum(dim=1, keepdim=True) >= n_soft
        w = torch.where(enough, g.clamp_min(0.0), torch.ones_like(g))
        soft = torch.multinomial(w, n_soft, replacement=False, generator=generator)
        u.scatter_(1, soft, SOFT)
    if n_hard > 0:
        hard = torch.argsort(g, dim=1, stable=True)[:, -n_hard:]  # last n_hard of the ascending order
        u.scatter_(1, hard, HARD)
    return u


def gpa_mask(g: Tensor, ratio: float, t: float, *, generator: torch.Generator,
             alpha_h0: float = 0.0, alpha_hT: float = 0.5,
             alpha_s0: float = 0.5, alpha_sT: float = 0.0) -> Tensor:
    """Soft-to-hard GPA mask ("SP+RAND"). g: [N, L] from `gpa_scores`; t = epoch / T.
    Returns mask [N, L] bool, True = masked, exactly L - int(L*(1-ratio)) per image."""
    L = g.shape[1]
    n_h, n_s, _ = gpa_counts(L, ratio, t, alpha_h0=alpha_h0, alpha_hT=alpha_hT,
                             alpha_s0=alpha_s0, alpha_sT=alpha_sT)
    u = gpa_priority(g, n_h, n_s, generator=generator)
    return mask_from_scores(u, len_keep_for(L, ratio))


def gpa_target(g: Tensor) -> Tensor:
    """MAM target: per-image z-score of g [N, L] (unbiased var + 1e-6, as HPM/GPA's loss code)."""
    return (g - g.mean(dim=1, keepdim=True)) / (g.var(dim=1, keepdim=True) + 1e-6).sqrt()


def head_recall(scores_per_head: Tensor, fg: Tensor, n_mask: int | None) -> Tensor:
    """Few-shot recall table [n_blocks, H] (docs/methods.md 3.3).

    scores_per_head: [n', n_blocks, H, L] raw or normalized GPA of each block's heads for n'
    labeled images; fg: [n', L] bool, the annotated object patches M_gt. M_h = the top-k patches
    of a head, k = n_mask (default, the 75% hard mask) or, with n_mask=None, k = |M_gt| per image.
    Entry = mean over images of |M_gt ∩ M_h| / |M_gt|.
    """
    n_fg = fg.sum(dim=1)
    if bool((n_fg == 0).any()):
        raise ValueError("head_recall: an image has no foreground patch; recall is undefined")
    k = n_fg if n_mask is None else torch.full_like(n_fg, n_mask)
    rank = torch.argsort(torch.argsort(scores_per_head, dim=-1, descending=True, stable=True), dim=-1)
    top = rank < k.view(-1, 1, 1, 1)  # [n', n_blocks, H, L]: rank 0 = highest GPA
    hits = (top & fg[:, None, None, :]).sum(-1).double()
    return (hits / n_fg.view(-1, 1, 1)).mean(dim=0)


def select_head(scores_per_head: Tensor, fg: Tensor, n_mask: int | None) -> tuple[int, int]:
    """(block, head) with the highest mean recall; ties go to the first in (block, head) order."""
    recall = head_recall(scores_per_head, fg, n_mask)
    flat = int(torch.argmax(recall.flatten()))
    return divmod(flat, recall.shape[1])
