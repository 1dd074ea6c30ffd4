"""Training losses as pure functions of tensors (docs/methods.md 0.5, 2, 3.5, 4, 5.1; defaults from 7).

Mask convention everywhere: mask [N, L] bool or 0/1 float, 1/True = masked (MAE: 1 is remove).
Nothing here holds state, does I/O or knows about processes: the trainer passes tensors in, and
for cross-rank negatives (contrastive) it passes a `gather` callable.
`LOSSES` lists the switchable extra terms with their default weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


# ---------------------------------------------------------------- MAE (docs/methods.md 0.5, PLB 5.3)

def patch_loss(pred: Tensor, target_patches: Tensor, norm_pix: bool = True) -> Tensor:
    """pred, target_patches: [N, L, p*p*3] (target = patchify(imgs)) -> per-patch MSE [N, L].

    norm_pix: target normalized per patch with the UNBIASED variance and +1e-6 inside the sqrt (MAE).
    """
    if norm_pix:
        mean = target_patches.mean(dim=-1, keepdim=True)
        var = target_patches.var(dim=-1, keepdim=True)  # unbiased (N - 1), as MAE
        target_patches = (target_patches - mean) / (var + 1.0e-6) ** 0.5
    return ((pred - target_patches) ** 2).mean(dim=-1)


def mae_loss(per_patch: Tensor, mask: Tensor) -> Tensor:
    """per_patch [N, L] (patch_loss), mask [N, L] 1 = masked -> scalar: ONE mean over all masked
    patches of the batch, not a mean of per-image means (MAE)."""
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum()


def per_image_loss(per_patch: Tensor, mask: Tensor) -> Tensor:
    """-> [N]: each image's mean over its own masked patches (PLB's l_i, docs/methods.md 5.3), from the same
    per-patch errors as `mae_loss`. Detached: feedback for head sampling, never a gradient path."""
    mask = mask.to(per_patch.dtype)
    return (per_patch.detach() * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)


def per_head_loss_stats(per_image: Tensor, heads: Tensor, M: int, valid: Tensor | None = None):
    """per_image [N], heads [N] long in [0, M), valid [N] bool (None = all) -> (sum [M], count [M]).

    One batch's contribution to PLB's epoch statistics; the trainer adds these up over the epoch and
    all-reduces both across ranks before `plb_update` (a ratio of sums, so ranks may differ in N).
    """
    w = torch.ones_like(per_image) if valid is None else valid.to(per_image.dtype)
    total = per_image.new_zeros(M).index_add(0, heads, per_image.detach() * w)
    count = per_image.new_zeros(M).index_add(0, heads, w)
    return total, count


# ---------------------------------------------------------------- LUT (docs/methods.md 2)

def pooled(z: Tensor, len_keep: Tensor | None = None) -> Tensor:
    """z: encoder output [N, 1 + K, D] (cls at 0) -> [N, D], mean over patch tokens, cls excluded.

    LUT pools the visible patch tokens (2.2: pooled beats cls, 83.5 vs 83.2). len_keep [N]: for a
    padded latent (AMR sample mode) only the first len_keep[b] slots are real tokens.
    """
    x = z[:, 1:]
    if len_keep is None:
        return x.mean(dim=1)
    w = (torch.arange(x.shape[1], device=x.device) < len_keep[:, None]).to(x.dtype)
    return (x * w[..., None]).sum(dim=1) / w.sum(dim=1, keepdim=True)


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """a, b: [N, C] -> [N], d = 2 - 2 cos(a, b) = ||a^ - b^||^2, in [0, 4] (LUT 2.5)."""
    return 2 - 2 * (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(dim=-1)


def lut_loss(q1: Tensor, q2: Tensor, t1: Tensor, t2: Tensor) -> Tensor:
    """q_k: online predictions g(h(pooled)) [N, C]; t_k: momentum targets h(pooled) [N, C] -> scalar.

    Cross-view pairs only, targets stop-gradient: 1/2 [mean d(q2, sg t1) + mean d(q1, sg t2)].
    """
    return 0.5 * (cosine_distance(q2, t1.detach()).mean() + cosine_distance(q1, t2.detach()).mean())


def lut_momentum(it: int, total_iters: int, m0: float = 0.996) -> float:
    """EMA momentum at data iteration `it` of `total_iters` (= epochs x iters/epoch): cosine m0 -> 1.

    m = 1 + 1/2 (m0 - 1)(1 + cos(pi it / total)) (LUT util/augs.py cosine_scheduler, 2.6).
    """
    assert 0 <= it <= total_iters, f"iteration {it} outside [0, {total_iters}]"
    return 1 + 0.5 * (m0 - 1) * (1 + math.cos(math.pi * it / total_iters))


# ---------------------------------------------------------------- MTO (docs/methods.md 4)

def _row_entropy(x: Tensor, col_valid: Tensor) -> Tensor:
    """x [N, T, D], col_valid [N, T] bool -> [N, T]: entropy (nats) of softmax_row(x x^T) over valid
    columns. Raw dot product, no 1/sqrt(D) (docs/methods.md 7 #13); fp32 and log_softmax for stability:
    autocast is off here, or it would run the matmul of these large raw products in bf16."""
    x = x.float()
    with torch.autocast(x.device.type, enabled=False):
        logits = x @ x.transpose(1, 2)
    # finite fill, not -inf: exp underflows to exactly 0 and 0 * fill = 0, so no NaN in grad
    logits = logits.masked_fill(~col_valid[:, None, :], -1e9)
    logp = logits.log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def _mean_over_rows(values: Tensor, rows: Tensor) -> Tensor:
    """values [N, T], rows [N, T] bool -> scalar: per-image mean over `rows`, then mean over images
    that have such rows (a per-image mean so images weigh equally whatever their counts)."""
    rows = rows.to(values.dtype)
    n = rows.sum(dim=1)
    per_image = (values * rows).sum(dim=1) / n.clamp_min(1)
    has = (n > 0).to(values.dtype)
    return (per_image * has).sum() / has.sum().clamp_min(1)


def heterogeneity(x: Tensor, mask: Tensor) -> Tensor:
    """H (MTO Eq. 2): x [N, T, D] patch tokens (no cls), mask [N, T] bool True = masked -> scalar.

    A = softmax_row(X_M X_V^T) over the VISIBLE columns only; H = mean entropy of the masked rows
    (natural log; max log|V| when masked rows are orthogonal to the visible ones), per image then
    batch mean. Images with no masked or no visible token do not count.
    """
    mask = mask.bool()
    ent = _row_entropy(x, ~mask)
    return _mean_over_rows(ent, mask & (~mask).any(dim=1, keepdim=True))


def l_spa(x0: Tensor, mask: Tensor) -> Tensor:
    """L_spa (MTO Eq. 3): x0 [N, T, D] patch tokens at X^0, mask [N, T] True = masked -> scalar.

    Entropy of softmax_row(X X^T) over ALL T tokens (self included), for the VISIBLE rows; mean over
    those rows (per image, then batch), not the paper's sum, which (~200) would swamp L_MIM (7 #12).
    """
    mask = mask.bool()
    return _mean_over_rows(_row_entropy(x0, torch.ones_like(mask)), ~mask)


def l_e(H0: Tensor, eps: float = 1e-6) -> Tensor:
    """L_e (MTO Eq. 6) = 1 / (H^0 + eps): pushes heterogeneity up at the initial embedding."""
    return 1 / (H0 + eps)


def l_r(H_list: Sequence[Tensor], sign: str = "text") -> Tensor:
    """L_r (MTO Eq. 7): H_list = [H^0, ..., H^Lblk] scalars -> sum_l softplus of consecutive steps.

    sign 'text' (default, 7 #11): softplus(H^l - H^{l-1}), H should DECREASE with depth as the text,
    Table 1 and the ablation say. 'printed': softplus(H^{l-1} - H^l), Eq. 7 as printed.
    """
    H = torch.stack(list(H_list))
    step = H[1:] - H[:-1]
    if sign == "printed":
        step = -step
    elif sign != "text":
        raise ValueError(f"unknown mto sign {sign!r}; choose from text, printed")
    return F.softplus(step).sum()


def mto_loss(hidden_states: Sequence[Tensor], mask: Tensor, weights=(1.0, 1.0, 1.0),
             sign: str = "text", spa_layers: str = "first", has_cls: bool = True):
    """MTO = w_spa L_spa + w_e L_e + w_r L_r -> (loss, parts dict of detached scalars incl. H per layer).

    hidden_states: [X^0, X^1, ..., X^Lblk], each [N, (1 +) L, Dd]. For MAE these live in the DECODER
    (4.1): X^0 = decoder_embed(latent), mask tokens inserted and unshuffled, + decoder_pos_embed, i.e.
    what enters decoder_blocks[0]; X^l = output of decoder_blocks[l-1] (before decoder_norm).
    has_cls: drop sequence index 0 (the cls token; MTO uses patch tokens only [I]).
    mask [N, L], True = masked. spa_layers 'first' (default: X^0 only, as the paper) or 'all'.
    """
    xs = [h[:, 1:] if has_cls else h for h in hidden_states]
    w_spa, w_e, w_r = weights
    H = [heterogeneity(x, mask) for x in xs]
    if spa_layers == "first":
        spa = l_spa(xs[0], mask)
    elif spa_layers == "all":
        spa = torch.stack([l_spa(x, mask) for x in xs]).mean()
    else:
        raise ValueError(f"unknown spa_layers {spa_layers!r}; choose from first, all")
    e, r = l_e(H[0]), l_r(H, sign)
    parts = {"spa": spa.detach(), "e": e.detach(), "r": r.detach(), "H": torch.stack(H).detach()}
    return w_spa * spa + w_e * e + w_r * r, parts


# ---------------------------------------------------------------- MAM (docs/methods.md 3.5)

def mam_loss(pred: Tensor, gpa_target: Tensor, mask: Tensor, on: str = "masked") -> Tensor:
    """pred [N, L] (MAMHead), gpa_target [N, L] teacher GPA z-scored per image, mask [N, L] 1 = masked.

    on 'masked' (default, paper Eq. 7): MSE averaged over masked patches, like MAE's denominator
    (the paper writes a sum) [I]; 'all' (official code): mean over all N x L patches.
    The target is a teacher output: no gradient flows into it.
    """
    se = (pred - gpa_target.detach()) ** 2
    if on == "all":
        return se.mean()
    if on != "masked":
        raise ValueError(f"unknown mam_loss_on {on!r}; choose from masked, all")
    mask = mask.to(se.dtype)
    return (se * mask).sum() / mask.sum()


# ---------------------------------------------------------------- contrastive / CAMAE (docs/methods.md 5.1)

def info_nce(q: Tensor, k: Tensor, tau: float = 0.2, gather: Callable[[Tensor], Tensor] | None = None,
             rank: int = 0) -> Tensor:
    """q: online [N, C], k: momentum keys [N, C] -> scalar CE(q^ k_all^T / tau, positives on diagonal).

    z l2-normalized (CAMAE Eq. 1). Negatives are the other keys of the batch; under DDP pass
    `gather` = an all-gather of keys over ranks ([world*N, C], no grad needed: keys are sg) and this
    rank's `rank`, so the positive of row i sits at column rank*N + i (MoCo v3 builder.py).
    """
    q = F.normalize(q, dim=1)
    k = k.detach()
    k_all = F.normalize(k if gather is None else gather(k), dim=1)  # after gather: any gather works
    logits = q @ k_all.t() / tau
    labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
    return F.cross_entropy(logits, labels)


def contrastive_loss(q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, tau: float = 0.2,
                     symmetric: bool = True, scale_2tau: bool = False, gather=None, rank: int = 0) -> Tensor:
    """q_k online (after predictor), k_k momentum (after projector), all [N, C], views 1 and 2.

    symmetric (MoCo v3, default): info_nce(q1, k2) + info_nce(q2, k1), summed as MoCo v3 does;
    otherwise info_nce(q1, k2) only (CAMAE Eq. 1). scale_2tau multiplies by 2 tau (MoCo v3's
    gradient-scale choice); off by default because Eq. 1 has no such factor (7 #17).
    """
    loss = info_nce(q1, k2, tau, gather, rank)
    if symmetric:
        loss = loss + info_nce(q2, k1, tau, gather, rank)
    return loss * (2 * tau) if scale_2tau else loss


# ---------------------------------------------------------------- registry

@dataclass(frozen=True)
class LossTerm:
    fn: Callable
    weight: float  # default weight of the term in L = L_MAE + sum weight * term
    why: str


LOSSES = {
    "lut": LossTerm(lut_loss, 0.25, "LUT lambda for ViT-B (and L, 7 #5); use 1.0 for ViT-S (2.5)"),
    "mam": LossTerm(mam_loss, 1.0, "GPA: L = L_RGB + L_GPA, weight 1 (3.5)"),
    "mto": LossTerm(mto_loss, 1.0, "MTO lambdas are not given; 1 each, set inside mto_loss (4.6)"),
    "contrastive": LossTerm(contrastive_loss, 1.0, "CAMAE Eq. 6: weight 1 each (5.1)"),
}


def loss_term(name: str) -> LossTerm:
    """The registered extra loss `name`; the error lists the valid choices."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
    return LOSSES[name]
