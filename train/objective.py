"""The student's objective: MAE plus the switchable terms of train/losses.py (docs/methods.md 2, 3.5, 4, 5.1).

L = L_MAE + w_lut L_LUT + w_mto L_MTO + w_mam L_MAM + w_contrastive L_c; a weight of 0 switches a
term off, and a term that is off costs nothing (no head, no extra forward). The heads live on the
MAE model itself, as in the official LUT and GPA code (`model.head`, `model.predictor`), so
checkpoints, optimizer groups and `ema_update` see them by name:
    model.projector, model.predictor   LUT's h and g (docs/methods.md 2.4); the contrastive term reuses them
    model.mam                          GPA's attention decoder (MAMHead, docs/methods.md 3.5)
    ema.projector                      the momentum projector: `projector.*` is what a momentum mask
                                       server holds (maskserver/teacher.py)
`Student` wraps the whole forward in one module call, because DDP synchronizes gradients only for
what runs through its own forward.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

from mimpipe.train.heads import mlp_head
from mimpipe.train.losses import (contrastive_loss, lut_loss, mae_loss, mam_loss, mto_loss, patch_loss, per_image_loss,
                          pooled)
from mimpipe.train.mam import MAMHead
from mimpipe.train.model import MaskedAutoencoderViT, patchify

TERMS = ("lut", "mto", "mam", "contrastive")   # extra terms; their weights are TrainConfig fields


def attach_heads(model: MaskedAutoencoderViT, ema: MaskedAutoencoderViT, weights: dict,
                 hidden: int = 4096) -> None:
    """Add the heads the enabled terms train (module docstring). The contrastive term shares LUT's
    projector and predictor (D -> hidden -> D, BN) instead of MoCo v3's 3-layer 256-d ones: one
    head pair, one EMA projector, and the momentum server's `projector.*` fits both [I]."""
    D = model.cfg.embed_dim
    if weights.get("lut") or weights.get("contrastive"):
        model.projector = mlp_head(D, hidden=hidden, out_dim=D)
        model.predictor = mlp_head(D, hidden=hidden, out_dim=D)
        ema.projector = mlp_head(D, hidden=hidden, out_dim=D)
    if weights.get("mam"):
        model.mam = MAMHead(model.cfg)
        model.mam.copy_decoder_blocks(model.decoder_blocks)   # the official init (docs/methods.md 3.5)


def second_view_mask(mask: Tensor, generator: torch.Generator) -> Tensor:
    """LUT's view-2 mask (docs/methods.md 2.2): mask [N, L] bool True = masked -> [N, L] bool.

    View 2 keeps K_b = (view 1's kept count) patches drawn at random from view 1's MASKED ones, so
    the two visible sets are disjoint. The noise is `torch.rand(N, L)` from `generator`: given the
    generator that drew a random view-1 mask (the batch's), the kept sets are exactly the official
    ids_shuffle[:, :K] and ids_shuffle[:, K:2K] of one permutation. Below ratio 0.5 view 2 keeps
    all of view 1's masked patches.
    """
    mask = mask.bool()
    keep = torch.minimum((~mask).sum(dim=1), mask.sum(dim=1))                   # [N]
    noise = torch.rand(mask.shape, generator=generator, device=mask.device)
    order = torch.argsort(noise + (~mask).to(noise.dtype), dim=1)               # view 1's kept sort last
    rank = torch.argsort(order, dim=1)
    return rank >= keep[:, None]


@torch.no_grad()
def ema_targets(ema: MaskedAutoencoderViT, view1: Tensor, view2: Tensor) -> dict[str, Tensor]:
    """The momentum branch on both whole views (no masking, docs/methods.md 2.3), eval-mode BN ->
    {'lut_t1', 'lut_t2'}: h_ξ(mean of the patch tokens after the final norm), the same computation
    as Teacher.lut_targets; {'key1', 'key2'}: h_ξ(cls token), the contrastive keys (MoCo v3's
    momentum feature is the cls token). All [N, D] fp32."""
    z = ema.norm(ema.forward_features_until(torch.cat([view1, view2]), len(ema.blocks)))
    t1, t2 = ema.projector(pooled(z)).float().chunk(2)
    k1, k2 = ema.projector(z[:, 0]).float().chunk(2)
    return {"lut_t1": t1, "lut_t2": t2, "key1": k1, "key2": k2}


class Student(nn.Module):
    """model + term weights as one forward for DDP; see `student_losses`."""

    def __init__(self, model: MaskedAutoencoderViT, weights: dict, *, tau: float = 0.2,
                 gather: Callable[[Tensor], Tensor] | None = None, rank: int = 0):
        super().__init__()
        self.mae, self.weights, self.tau, self.gather, self.rank = model, dict(weights), tau, gather, rank

    def forward(self, images, mask, *, len_keep=None, view2=None, mask2=None, targets=None,
                want_per_image=False, skip=()):
        return student_losses(self.mae, self.weights, images, mask, len_keep=len_keep, view2=view2,
                              mask2=mask2, targets=targets or {}, want_per_image=want_per_image,
                              tau=self.tau, gather=self.gather, rank=self.rank, skip=skip)


def student_losses(model: MaskedAutoencoderViT, weights: dict, images: Tensor, mask: Tensor, *,
                   len_keep: int | None = None, view2: Tensor | None = None, mask2: Tensor | None = None,
                   targets: dict,
                   want_per_image: bool = False, tau: float = 0.2, gather=None, rank: int = 0,
                   skip=()):
    """images [N, 3, H, W], mask [N, L] (True = masked) -> (total, parts, per_image).

    parts: {'mae', and each enabled term}: unweighted scalars with their graphs; total = mae +
    sum weight * term. per_image [N] (detached, PLB feedback) when asked, else None.
    view2/mask2: LUT's second view and its disjoint mask (`second_view_mask`); targets: 'lut_t1/2'
    (LUT), 'key1/2' (contrastive), 'gpa_target' [N, L] (MAM), all teacher outputs (no gradient).
    mask/mask2 may stay on the CPU (the model checks them there and copies without blocking);
    len_keep: every image's kept count where the caller knows it (model.given_mask).
    skip: enabled terms whose targets this batch lacks (a server's random-fallback batch has no
    gpa_target): still computed, on whatever targets were passed, so every DDP rank's graph
    reaches the same parameters, but weighted 0 and left out of parts.
    """
    w = {k: weights.get(k, 0.0) for k in TERMS}
    latent, mask, ids_restore = model.forward_encoder(images, mask=mask, len_keep=len_keep)
    hidden = None
    if w["mto"] or w["mam"]:
        pred, hidden = model.forward_decoder(latent, ids_restore, mask, return_hidden=True)
    else:
        pred = model.forward_decoder(latent, ids_restore, mask)
    # one per-patch error for the MAE loss and PLB's per-image feedback: the path of model.forward_loss
    per_patch = patch_loss(pred, patchify(images, model.patch_size), model.norm_pix_loss)
    parts = {"mae": mae_loss(per_patch, mask)}
    if w["lut"]:
        z2, mask2, _ = model.forward_encoder(view2, mask=mask2)   # a CPU mask2: its K read on the CPU
        # each view through the heads on its own: BN batch statistics per view
        q1 = model.predictor(model.projector(pooled(latent, (mask == 0).sum(dim=1))))
        q2 = model.predictor(model.projector(pooled(z2, (~mask2.bool()).sum(dim=1))))
        parts["lut"] = lut_loss(q1, q2, targets["lut_t1"], targets["lut_t2"])
    if w["mto"]:   # MAE: the decoder's hidden states, X^0 = what enters its first block (docs/methods.md 4.1)
        parts["mto"], _ = mto_loss(hidden, mask.bool())
    if w["mam"]:   # the attention decoder reads the RGB decoder's input tokens (docs/methods.md 3.5)
        parts["mam"] = mam_loss(model.mam(hidden[0]), targets["gpa_target"], mask)
    if w["contrastive"]:
        # CAMAE: the online encoder sees the whole views for CL, the masked view for MIM (docs/methods.md 5.1)
        c1, c2 = model.norm(model.forward_features_until(torch.cat([images, view2]), len(model.blocks)))[:, 0].chunk(2)
        q1, q2 = model.predictor(model.projector(c1)), model.predictor(model.projector(c2))
        parts["contrastive"] = contrastive_loss(q1, q2, targets["key1"], targets["key2"], tau,
                                                gather=gather, rank=rank)
    total = parts["mae"]
    for k in TERMS:
        if w[k]:
            total = total + (0.0 if k in skip else w[k]) * parts[k]
    parts = {k: v for k, v in parts.items() if k not in skip}
    return total, parts, per_image_loss(per_patch, mask) if want_per_image else None
