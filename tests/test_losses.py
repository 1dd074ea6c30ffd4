"""train/losses.py and train/mam.py against hand-computed values of the formulas in docs/methods.md."""
import math

import pytest
import torch
import torch.nn.functional as F

from mimpipe.train.losses import (
    LOSSES, contrastive_loss, cosine_distance, heterogeneity, info_nce, l_e, l_r, l_spa, loss_term,
    lut_loss, lut_momentum, mae_loss, mam_loss, mto_loss, patch_loss, per_head_loss_stats, per_image_loss,
    pooled,
)
from mimpipe.train.mam import MAMHead
from mimpipe.train.model import create_model, model_config, patchify


def close(a, b, atol=1e-6, what=""):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    diff = (a - b).abs().max().item()
    assert diff <= atol, f"{what} max abs diff {diff:.3g} > {atol}"


def entropy(probs):
    return -sum(p * math.log(p) for p in probs if p > 0)


def softmax(xs):
    z = sum(math.exp(x) for x in xs)
    return [math.exp(x) / z for x in xs]


# ---------------------------------------------------------------- MAE

@pytest.fixture
def mae_case():
    """2 images x 2 patches, 3 values per patch; losses worked out by hand in the comments."""
    target = torch.tensor([[[1., 2, 3], [5, 5, 5]],
                           [[0., 0, 3], [4, 4, 4]]])
    pred = torch.tensor([[[0., 0, 0], [7, 7, 7]],
                         [[0., 0, 0], [1, 1, 1]]], requires_grad=True)
    mask = torch.tensor([[1., 0], [1, 1]])
    # [1,2,3]: mean 2, unbiased var 1 -> t^ = (-1,0,1)/sqrt(1+1e-6); vs 0 -> (2/3)/(1+1e-6)
    l00 = (2 / 3) / (1 + 1e-6)
    # [0,0,3]: mean 1, unbiased var (1+1+4)/2 = 3 -> t^ = (-1,-1,2)/sqrt(3+1e-6); vs 0 -> 2/(3+1e-6)
    l10 = 2 / (3 + 1e-6)
    # [4,4,4]: var 0 -> t^ = 0; vs 1 -> 1.  Patch (0, 1) is visible: its error (49) must not count.
    l11 = 1.0
    return pred, target, mask, (l00, l10, l11)


def test_mae_loss_norm_pix_by_hand(mae_case):
    pred, target, mask, (l00, l10, l11) = mae_case
    close(mae_loss(patch_loss(pred, target), mask), (l00 + l10 + l11) / 3, what="global mean over masked")
    close(mae_loss(patch_loss(pred, target), mask.bool()), (l00 + l10 + l11) / 3, what="bool mask")
    raw = (14 / 3 + 3 + 9) / 3  # no norm_pix: mean(1,4,9), mean(0,0,9), mean(9,9,9)
    close(mae_loss(patch_loss(pred, target, norm_pix=False), mask), raw, what="norm_pix=False")


def test_per_image_is_not_the_global_mean(mae_case):
    pred, target, mask, (l00, l10, l11) = mae_case
    per = per_image_loss(patch_loss(pred, target), mask)
    close(per, [l00, (l10 + l11) / 2], what="per-image means")
    assert abs(per.mean().item() - mae_loss(patch_loss(pred, target), mask).item()) > 1e-3  # unequal counts
    assert not per.requires_grad  # PLB feedback only


def test_mae_loss_matches_model_forward_loss():
    torch.manual_seed(0)
    model = create_model("mae_vit_micro_patch8_64")
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(2, 3, 64, 64, generator=g)
    loss, pred, mask = model(imgs, generator=g)
    close(mae_loss(patch_loss(pred, patchify(imgs, 8)), mask), loss, atol=1e-6, what="vs MaskedAutoencoderViT")


def test_mae_loss_gradient_reaches_only_masked_predictions(mae_case):
    pred, target, mask, _ = mae_case
    mae_loss(patch_loss(pred, target), mask).backward()
    assert (pred.grad[0, 1] == 0).all() and (pred.grad[0, 0] != 0).any() and (pred.grad[1] != 0).any()


def test_per_head_loss_stats():
    per = torch.tensor([1., 2, 3, 4])
    total, count = per_head_loss_stats(per, torch.tensor([0, 2, 0, 2]), 3,
                                       torch.tensor([True, True, False, True]))
    close(total, [1, 0, 6], what="sum")
    close(count, [1, 0, 2], what="count")
    total, count = per_head_loss_stats(per, torch.tensor([0, 2, 0, 2]), 3)
    close(total, [4, 0, 6], what="sum, all valid")
    close(count, [2, 0, 2], what="count, all valid")


# ---------------------------------------------------------------- LUT

def test_cosine_distance_bounds_and_hand_case():
    a = torch.tensor([[1., 0], [1, 0], [1, 0], [3, 0]])
    b = torch.tensor([[2., 0], [-1, 0], [0, 5], [1, 1]])
    close(cosine_distance(a, b), [0, 4, 2, 2 - math.sqrt(2)], atol=1e-6, what="same/opposite/orth/45deg")
    x, y = torch.randn(64, 8), torch.randn(64, 8)
    d = cosine_distance(x, y)
    assert d.min() >= 0 and d.max() <= 4
    close(d, ((F.normalize(x, dim=1) - F.normalize(y, dim=1)) ** 2).sum(1), atol=1e-5, what="||a^-b^||^2")


def test_lut_loss_hand_case_symmetry_and_stop_gradient():
    q1 = torch.tensor([[1., 0], [0, 1]], requires_grad=True)
    q2 = torch.tensor([[1., 1], [1, 0]], requires_grad=True)
    t1 = torch.tensor([[1., 0], [0, 1]], requires_grad=True)
    t2 = torch.tensor([[0., 1], [0, 1]], requires_grad=True)
    # d(q2, t1) = (2 - sqrt2, 2); d(q1, t2) = (2, 0)
    loss = lut_loss(q1, q2, t1, t2)
    close(loss, 0.5 * ((4 - math.sqrt(2)) / 2 + 1), what="hand case")
    close(lut_loss(q2, q1, t2, t1), loss, what="swapping views")
    loss.backward()
    assert t1.grad is None and t2.grad is None, "targets must be stop-gradient"
    assert q1.grad.abs().sum() > 0 and q2.grad.abs().sum() > 0


def test_lut_momentum_schedule():
    assert lut_momentum(0, 100) == pytest.approx(0.996)
    assert lut_momentum(100, 100) == pytest.approx(1.0)
    assert lut_momentum(50, 100) == pytest.approx(0.998)
    assert lut_momentum(0, 10, m0=0.99) == pytest.approx(0.99)
    ms = [lut_momentum(i, 10) for i in range(11)]
    assert all(a <= b for a, b in zip(ms, ms[1:]))


def test_pooled_excludes_cls_and_padding():
    z = torch.tensor([[[100., 100], [1, 2], [3, 4]],
                      [[100., 100], [5, 6], [-50, -50]]])
    close(pooled(z), [[2, 3], [-22.5, -22]], what="mean of patch tokens")
    close(pooled(z, len_keep=torch.tensor([2, 1])), [[2, 3], [5, 6]], what="padded slot ignored")


# ---------------------------------------------------------------- MTO

E = torch.eye(4)


def test_heterogeneity_is_log_V_for_orthogonal_masked_rows():
    # visible: e0, e1, 2 e0 (|V| = 3); masked: e2, 5 e2 (orthogonal to every visible row; their
    # mutual affinity must not matter: masked columns are excluded)
    x = torch.stack([E[0], E[2], E[1], 5 * E[2], 2 * E[0]])[None]
    mask = torch.tensor([[False, True, False, True, False]])
    close(heterogeneity(x, mask), math.log(3), atol=1e-6, what="uniform rows")


def test_heterogeneity_lower_when_aligned_and_per_image_mean():
    x = torch.stack([E[0], E[0], E[1], E[2], 2 * E[0]])[None]  # masked row 1 = e0: logits (1, 0, 2)
    mask = torch.tensor([[False, True, False, True, False]])
    H = heterogeneity(x, mask)
    close(H, (entropy(softmax([1, 0, 2])) + math.log(3)) / 2, atol=1e-6, what="hand case")
    assert H < math.log(3)
    # per image, then batch mean: |V| = 2 and |V| = 3, each orthogonal -> (ln 2 + ln 3) / 2
    xb = torch.stack([torch.stack([E[0], E[1], E[2], E[3], E[3]]),
                      torch.stack([E[0], E[1], E[1], E[3], E[2]])])
    mb = torch.tensor([[False, False, True, True, True], [False, False, False, True, True]])
    close(heterogeneity(xb, mb), (math.log(2) + math.log(3)) / 2, atol=1e-6, what="two images")


def test_heterogeneity_never_exceeds_log_V():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 8, 5, generator=g)
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[:, :5] = True  # |V| = 3
    assert heterogeneity(x, mask) <= math.log(3) + 1e-6


def test_l_spa_hand_case():
    x = torch.tensor([[[1., 0], [0, 1], [0, 0]]])  # visible rows e0, e1; the masked row is zero
    mask = torch.tensor([[False, False, True]])
    # each visible row's logits over all 3 tokens: (1, 0, 0) up to order
    close(l_spa(x, mask), entropy(softmax([1, 0, 0])), atol=1e-6, what="mean visible-row entropy")


def test_l_e_and_gradient():
    H0 = torch.tensor(0.5, requires_grad=True)
    loss = l_e(H0)
    close(loss, 1 / (0.5 + 1e-6), atol=1e-6)
    loss.backward()
    close(H0.grad, -1 / (0.5 + 1e-6) ** 2, atol=1e-5, what="d/dH0")


def test_l_r_sign_options():
    H = [torch.tensor(3.), torch.tensor(1.), torch.tensor(2.)]
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    close(l_r(H), sp(1 - 3) + sp(2 - 1), what="text: softplus(H^l - H^(l-1))")
    close(l_r(H, sign="printed"), sp(3 - 1) + sp(1 - 2), what="printed: softplus(H^(l-1) - H^l)")
    assert l_r([torch.tensor(3.), torch.tensor(2.), torch.tensor(1.)]) < l_r(H)  # decreasing is cheap
    with pytest.raises(ValueError, match="choose from text, printed"):
        l_r(H, sign="up")


def test_mto_entropies_stay_fp32_under_bf16_autocast():
    """The trainer runs its losses under bf16 autocast on a GPU; the raw XX^T products (hundreds)
    must not be rounded to bf16 there. CPU autocast rounds matmuls the same way."""
    g = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(2, 17, 64, generator=g)
    mask = torch.rand(2, 17, generator=g) < 0.75
    ref = l_spa(x, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = l_spa(x, mask)
    assert got.dtype == torch.float32 and torch.equal(got, ref)


def test_mto_loss_combines_terms_and_reaches_every_layer():
    g = torch.Generator().manual_seed(0)
    hs = [torch.randn(2, 1 + 6, 4, generator=g, requires_grad=True) for _ in range(3)]
    mask = torch.tensor([[1, 0, 1, 0, 1, 1], [0, 1, 1, 0, 0, 1]]).bool()
    xs = [h[:, 1:] for h in hs]
    H = [heterogeneity(x, mask) for x in xs]
    loss, parts = mto_loss(hs, mask, weights=(0.5, 2.0, 3.0))
    close(loss, 0.5 * l_spa(xs[0], mask) + 2 * l_e(H[0]) + 3 * l_r(H), atol=1e-5, what="weighted sum")
    close(parts["H"], torch.stack(H).detach(), atol=1e-6, what="H per layer")
    loss.backward()
    for i, h in enumerate(hs):
        assert (h.grad[:, 0] == 0).all(), f"cls token of layer {i} must get no gradient"
        assert h.grad[:, 1:].abs().sum() > 0, f"layer {i} gets no gradient"
        assert torch.isfinite(h.grad).all(), f"layer {i}: non-finite gradient (masked-column fill)"
    close(mto_loss(hs, mask.float(), weights=(0.5, 2.0, 3.0))[0], loss, what="float 0/1 mask (model's)")
    spa_all, _ = mto_loss(hs, mask, weights=(1, 0, 0), spa_layers="all")
    close(spa_all, sum(l_spa(x, mask) for x in xs) / 3, atol=1e-6, what="spa_layers=all")


# ---------------------------------------------------------------- MAM

def test_mam_loss_masked_vs_all_and_gradient():
    pred = torch.tensor([[1., 2], [3, 4]], requires_grad=True)
    target = torch.zeros(2, 2, requires_grad=True)
    mask = torch.tensor([[1, 0], [0, 1]])
    close(mam_loss(pred, target, mask), (1 + 16) / 2, what="masked only")
    close(mam_loss(pred, target, mask, on="all"), (1 + 4 + 9 + 16) / 4, what="all patches")
    mam_loss(pred, target, mask).backward()
    assert target.grad is None
    close(pred.grad, [[1, 0], [0, 4]], what="d/dpred = 2 (pred - t) mask / n_masked")
    with pytest.raises(ValueError, match="choose from masked, all"):
        mam_loss(pred, target, mask, on="visible")


def test_mam_head_shapes_and_copy():
    torch.manual_seed(0)
    cfg = model_config("mae_vit_micro_patch8_64")
    model = create_model("mae_vit_micro_patch8_64")
    head = MAMHead(cfg)
    head.copy_decoder_blocks(model.decoder_blocks)
    close(head.blocks[0].attn.qkv.weight, model.decoder_blocks[0].attn.qkv.weight, what="copied block")
    x = torch.randn(2, 1 + cfg.num_patches, cfg.decoder_embed_dim, requires_grad=True)
    out = head(x)
    assert out.shape == (2, cfg.num_patches)
    mam_loss(out, torch.randn(2, cfg.num_patches), torch.ones(2, cfg.num_patches)).backward()
    assert x.grad.abs().sum() > 0  # reaches the shared decoder input tokens
    with pytest.raises(ValueError, match="MAM depth"):
        MAMHead(cfg, depth=2).copy_decoder_blocks(model.decoder_blocks)


# ---------------------------------------------------------------- contrastive

def explicit_nce(q, k, tau):
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = q @ k.t() / tau
    return -(logits.diag() - logits.logsumexp(dim=1)).mean()


def test_info_nce_equals_explicit_cross_entropy():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    close(info_nce(q, k), explicit_nce(q, k, 0.2), atol=1e-5, what="tau 0.2")
    close(info_nce(q, k, tau=1.0), explicit_nce(q, k, 1.0), atol=1e-5, what="tau 1")


def test_info_nce_with_gather_puts_positive_at_rank_offset():
    g = torch.Generator().manual_seed(1)
    q, k, k_other = (torch.randn(3, 4, generator=g) for _ in range(3))
    loss = info_nce(q, k, gather=lambda t: torch.cat([k_other, t]), rank=1)
    qn, kn = F.normalize(q, dim=1), F.normalize(torch.cat([k_other, k]), dim=1)
    logits = qn @ kn.t() / 0.2
    close(loss, -(logits[torch.arange(3), 3 + torch.arange(3)] - logits.logsumexp(1)).mean(), atol=1e-5)


def test_contrastive_symmetric_scale_and_gradient():
    g = torch.Generator().manual_seed(2)
    q1, q2, k1, k2 = (torch.randn(4, 6, generator=g, requires_grad=True) for _ in range(4))
    sym = contrastive_loss(q1, q2, k1, k2)
    close(sym, explicit_nce(q1, k2, 0.2) + explicit_nce(q2, k1, 0.2), atol=1e-5, what="symmetric sum")
    close(contrastive_loss(q1, q2, k1, k2, symmetric=False), explicit_nce(q1, k2, 0.2), atol=1e-5)
    close(contrastive_loss(q1, q2, k1, k2, scale_2tau=True), 0.4 * sym, atol=1e-5, what="2 tau")
    sym.backward()
    assert k1.grad is None and k2.grad is None, "momentum keys must be stop-gradient"
    assert q1.grad.abs().sum() > 0 and q2.grad.abs().sum() > 0


# ---------------------------------------------------------------- registry

def test_registry_defaults_and_error():
    assert LOSSES["lut"].weight == 0.25 and loss_term("lut").fn is lut_loss
    with pytest.raises(ValueError, match="unknown loss 'lutt'; choose from lut, mam, mto, contrastive"):
        loss_term("lutt")
