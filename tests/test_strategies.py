"""Tests for maskserver/strategies: hand examples from docs/methods.md, MAE parity, exact counts, determinism."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mimpipe.maskserver.strategies import (
    STRATEGIES, MaskInputs, amr_mask, amr_ratios, attmask_mask, get_strategy, gpa_counts, gpa_mask,
    gpa_schedule, gpa_scores, gpa_target, head_recall, idm_mask, len_keep_for, mask_from_scores,
    pack_mask, plb_accumulate, plb_sample, plb_update, random_mask, sbam_mask, sbam_salience,
    select_head, unpack_mask,
)
from mimpipe.maskserver.strategies.gpa import HARD, SOFT, gpa_per_head, gpa_priority
from mimpipe.maskserver.strategies.sbam import affinity_column_sums


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mae_random_masking(x, mask_ratio, noise):
    """MAE's random_masking (docs/methods.md 0.4) with the noise passed in instead of drawn."""
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L])
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


# ---------------------------------------------------------------- shared MAE path

def test_len_keep_for_truncates_like_mae():
    assert len_keep_for(196, 0.75) == 49
    assert len_keep_for(64, 0.75) == 16
    assert len_keep_for(196, 0.6) == 78  # 78.4 truncated


def test_mask_from_scores_keeps_lowest_and_per_image_counts():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.4, 0.6]])
    assert mask_from_scores(scores, 2).tolist() == [[True, False, True, False], [False, True, False, True]]
    mask = mask_from_scores(scores, torch.tensor([1, 3]))
    assert mask.tolist() == [[True, False, True, True], [False, True, False, False]]
    assert mask_from_scores(torch.zeros(1, 4), 2).tolist() == [[False, False, True, True]]  # ties: index


def test_random_mask_equals_mae_random_masking():
    N, L, D, ratio = 4, 196, 8, 0.75
    noise = torch.rand(N, L, generator=gen(3))
    x = torch.randn(N, L, D, generator=gen(4))
    x_masked, mae_mask, ids_restore = mae_random_masking(x, ratio, noise)
    mask = random_mask(N, L, ratio, generator=gen(3))
    assert torch.equal(mask, mae_mask.bool())
    assert (mask.sum(1) == L - 49).all()
    # the MAE invariants hold for the shared path too
    ids_keep = torch.argsort(noise, dim=1)[:, :49]
    assert not torch.gather(mask, 1, ids_keep).any()
    assert torch.equal(torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, D)), x_masked)


@pytest.mark.parametrize("L", [1, 7, 8, 9, 63, 64, 196])
def test_pack_unpack_round_trip_matches_numpy(L):
    mask = torch.rand(5, L, generator=gen(L)) < 0.5
    bits = pack_mask(mask)
    assert bits.dtype == torch.uint8 and bits.shape == (5, math.ceil(L / 8))
    assert np.array_equal(bits.numpy(), np.packbits(mask.numpy(), axis=1))  # big-endian bit order
    assert torch.equal(unpack_mask(bits, L), mask)


# ---------------------------------------------------------------- SBAM / AMR

def test_sbam_hand_example():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    s = affinity_column_sums(x)
    assert torch.allclose(s, torch.tensor([[0.78962, 0.78962, 1.42075]]), atol=1e-5), s
    assert abs(s.sum().item() - 3.0) < 1e-5
    assert torch.allclose(sbam_salience(x), torch.tensor([[0.0, 0.0, 1.0]]), atol=1e-5)


def test_sbam_chunked_equals_full_matrix():
    x = torch.randn(3, 37, 16, generator=gen(0)) * 0.5
    full = affinity_column_sums(x, chunk=None)
    for chunk in (1, 5, 36, 100):
        diff = (affinity_column_sums(x, chunk=chunk) - full).abs().max().item()
        assert diff < 1e-5, f"chunk={chunk}: max diff {diff}"
    assert sbam_salience(torch.ones(1, 4, 3)).isfinite().all()  # constant image: eps avoids NaN


def test_sbam_mask_prefers_salient_patches():
    sal = torch.zeros(2, 16)
    sal[:, :10] = 1.0  # ŝ + U(0, 0.5): every salient score (>= 1) beats every background one (< 0.5)
    mask = sbam_mask(sal, 0.5, generator=gen(0))
    assert (mask.sum(1) == 8).all() and not mask[:, 10:].any()


def test_amr_batch_vs_sample_hand_case():
    L = 20
    sal = torch.zeros(2, L)
    sal[0, :16] = 0.9  # c_0 = 16/20 = 0.8
    sal[1, :4] = 0.9  # c_1 = 4/20 = 0.2
    sal[1, 4:8] = 0.5  # exactly δ: not counted (strict >)
    # batch: c̄ = 0.5 -> r = 0.65 + 0.2*0.5 = 0.75 -> K = 5 for both
    assert amr_ratios(sal, mode="batch").tolist() == [5, 5]
    # sample: r = 0.81 -> int(20*0.19) = 3 ; r = 0.69 -> int(20*0.31) = 6
    assert amr_ratios(sal, mode="sample").tolist() == [3, 6]
    assert [int(L * (1 - r)) for r in (0.65 + 0.2 * 0.8, 0.65 + 0.2 * 0.2)] == [3, 6]
    mask = amr_mask(sal, generator=gen(1), mode="sample")
    assert mask.sum(1).tolist() == [17, 14]
    # clamps: r -> 1 would keep nothing; K >= 1
    assert amr_ratios(torch.ones(2, L), base_ratio=0.99, ratio_var=0.1).tolist() == [1, 1]
    with pytest.raises(ValueError, match="choose from batch, sample"):
        amr_ratios(sal, mode="image")


def test_amr_without_variation_is_sbam():
    sal = torch.rand(3, 50, generator=gen(2))
    assert torch.equal(amr_mask(sal, 0.75, generator=gen(5), ratio_var=0.0),
                       sbam_mask(sal, 0.75, generator=gen(5)))


def official_len_keep(salience, base_mask_ratio, mask_ratio_var, delta, per_image=False):
    """doihye/SBAM models_mae.py `saliency_guided_masking`, its K line for line (float32 torch ops).

    per_image=True is the paper's per-sample r_b evaluated the same way (`y.float() / y_max`)."""
    L = salience.shape[1]
    y = (salience > delta).sum(dim=1)
    y_max = salience.size(1)
    y_normalized = y.float() / y_max if per_image else y.float().mean() / y_max
    dynamic_mask_ratios = base_mask_ratio - mask_ratio_var + 2 * mask_ratio_var * y_normalized
    if per_image:
        return [int(L * (1 - r)) for r in dynamic_mask_ratios]
    return int(L * (1 - dynamic_mask_ratios))


def salience_with_counts(counts, L, g):
    """ŝ [N, L] in [0, 1] with exactly counts[b] entries > 0.5 in row b, some sitting exactly on 0.5."""
    sal = torch.rand(len(counts), L, generator=g) * 0.5  # < 0.5
    sal[:, :: 7] = 0.5  # exactly δ: not salient (strict >)
    for b, k in enumerate(counts):
        sal[b, torch.randperm(L, generator=g)[:k]] = 0.5 + 0.5 * torch.rand(k, generator=g).clamp_min(1e-3)
    return sal


def test_amr_len_keep_equals_official_float32_truncation():
    L, g = 196, gen(11)
    # methods 1.3's hand case: L(1-r) is 68 exactly; float32 gives 68, float64 67.99... -> 67
    sal = salience_with_counts([3], L, g)
    assert amr_ratios(sal).tolist() == [official_len_keep(sal, 0.75, 0.1, 0.5)] == [68]
    assert int(L * (1 - (0.65 + 0.2 * 3 / L))) == 67
    # batch mode: every batch-total count of a 4-image batch (the 785 means of issue #14)
    for total in range(4 * L + 1):
        counts = [total // 4 + (b < total % 4) for b in range(4)]
        sal = salience_with_counts(counts, L, g)
        got = amr_ratios(sal, mode="batch")
        assert got.tolist() == [official_len_keep(sal, 0.75, 0.1, 0.5)] * 4, (total, got)
    # sample mode: every per-image count, in one batch
    sal = salience_with_counts(list(range(L + 1)), L, g)
    assert amr_ratios(sal, mode="sample").tolist() == official_len_keep(sal, 0.75, 0.1, 0.5, per_image=True)
    # random batches of random sizes, other r0/Δ/δ
    for i in range(300):
        N = int(torch.randint(1, 65, (1,), generator=g))
        sal = torch.rand(N, L, generator=g) ** float(torch.rand(1, generator=g) * 4 + 0.25)
        r0, var, delta = [(0.75, 0.1, 0.5), (0.6, 0.15, 0.3), (0.8, 0.05, 0.7)][i % 3]
        assert amr_ratios(sal, r0, var, delta, "batch").tolist() == [official_len_keep(sal, r0, var, delta)] * N
        assert (amr_ratios(sal, r0, var, delta, "sample").tolist()
                == official_len_keep(sal, r0, var, delta, per_image=True)), i


# ---------------------------------------------------------------- GPA

def explicit_gpa(q, k, exclude_self_cls):
    """Σ over queries of the explicit [T, T] logit matrix (the official code's form)."""
    S = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5  # [N, H, Tq, Tk]
    if exclude_self_cls:
        S = S[:, :, 1:, 1:] * (1 - torch.eye(S.shape[-1] - 1))  # patch queries only, no self
        return S.sum(2)
    return S.sum(2)[:, :, 1:]


@pytest.mark.parametrize("exclude_self_cls", [False, True])
def test_gpa_linear_form_equals_explicit_sum(exclude_self_cls):
    q = torch.randn(2, 3, 17, 8, generator=gen(0), dtype=torch.float64)
    k = torch.randn(2, 3, 17, 8, generator=gen(1), dtype=torch.float64)
    ref = explicit_gpa(q, k, exclude_self_cls)
    got = gpa_per_head(q, k, exclude_self_cls=exclude_self_cls)
    assert torch.allclose(got.double(), ref, atol=1e-4), (got.double() - ref).abs().max()
    for head, raw in ((1, ref[:, 1]), (-1, ref.sum(1))):  # head=-1: sum heads before min-max
        g = gpa_scores(q, k, head=head, exclude_self_cls=exclude_self_cls)
        want = (raw - raw.amin(1, keepdim=True)) / (raw.amax(1, keepdim=True) - raw.amin(1, keepdim=True))
        assert torch.allclose(g.double(), want, atol=1e-5)
        assert (g.amin(1) == 0).all()


@pytest.mark.parametrize("L,t,counts", [
    (196, 0.0, (0, 73, 74)), (196, 0.5, (36, 36, 75)), (196, 1.0, (73, 0, 74)),
    (64, 0.0, (0, 24, 24)), (64, 1.0, (24, 0, 24)),
])
def test_gpa_counts_table(L, t, counts):
    assert gpa_counts(L, 0.75, t) == counts
    assert gpa_schedule(0.0) == (0.0, 0.5) and gpa_schedule(1.0) == (0.5, 0.0)


def test_gpa_soft_to_hard_endpoints():
    N, L = 4, 196
    g = torch.rand(N, L, generator=gen(0))
    g = (g - g.amin(1, keepdim=True)) / (g.amax(1, keepdim=True) - g.amin(1, keepdim=True))
    # t = 0: soft + random only; the min patch (g = 0) is never drawn soft
    u = gpa_priority(g, *gpa_counts(L, 0.75, 0.0)[:2], generator=gen(1))
    assert not (u == HARD).any() and ((u == SOFT).sum(1) == 73).all()
    assert not (u == SOFT)[torch.arange(N), g.argmin(1)].any()
    mask = gpa_mask(g, 0.75, 0.0, generator=gen(1))
    assert (mask.sum(1) == 147).all() and mask[u == SOFT].all()
    # t = 1: hard + random only; the hard set is the top-73 of g
    u = gpa_priority(g, *gpa_counts(L, 0.75, 1.0)[:2], generator=gen(1))
    assert not (u == SOFT).any()
    top = torch.zeros(N, L, dtype=torch.bool).scatter_(1, g.topk(73, dim=1).indices, True)
    assert torch.equal(u == HARD, top)
    mask = gpa_mask(g, 0.75, 1.0, generator=gen(1))
    assert (mask.sum(1) == 147).all() and mask[top].all()


def test_gpa_constant_map_falls_back_to_uniform_soft():
    mask = gpa_mask(torch.zeros(2, 64), 0.75, 0.0, generator=gen(0))  # multinomial would raise
    assert (mask.sum(1) == 48).all()


def test_gpa_target_is_zscore():
    g = torch.rand(3, 196, generator=gen(0))
    z = gpa_target(g)
    assert torch.allclose(z.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(z.var(1), torch.ones(3), atol=1e-3)


def test_select_head_by_recall_hand_case():
    # 1 image, L = 8, foreground {0, 1}; 2 blocks x 2 heads; k = n_mask = 4
    fg = torch.zeros(1, 8, dtype=torch.bool)
    fg[0, :2] = True
    s = torch.zeros(1, 2, 2, 8)
    s[0, 0, 0] = torch.tensor([8, 1, 7, 6, 5, 4, 3, 2.0])  # patch 1 ranked last -> recall 1/2
    s[0, 0, 1] = torch.tensor([1, 2, 8, 7, 6, 5, 4, 3.0])  # both last -> 0
    s[0, 1, 0] = torch.tensor([8, 7, 6, 5, 4, 3, 2, 1.0])  # both top -> 1
    s[0, 1, 1] = torch.tensor([6, 5, 8, 7, 4, 3, 2, 1.0])  # ranks 2, 3 -> 1 with k=4, 0 with k=|M_gt|=2
    assert head_recall(s, fg, 4).tolist() == [[0.5, 0.0], [1.0, 1.0]]
    assert head_recall(s, fg, None).tolist() == [[0.5, 0.0], [1.0, 0.0]]
    assert select_head(s, fg, 4) == (1, 0)  # tie with (1, 1) goes to the first
    with pytest.raises(ValueError):
        head_recall(s, torch.zeros(1, 8, dtype=torch.bool), 4)


# ---------------------------------------------------------------- IDM / PLB

def test_idm_masks_top_of_chosen_head():
    N, M, L = 5, 12, 196
    attn = torch.rand(N, M, L, generator=gen(0)).softmax(-1)
    heads = torch.tensor([0, 3, 11, 3, 7])
    mask = idm_mask(attn, heads, 0.75)
    for b in range(N):  # check per image against an independent top-k
        top = set(attn[b, heads[b]].topk(147).indices.tolist())
        assert set(mask[b].nonzero().flatten().tolist()) == top


def test_plb_update_hand_example():
    p = torch.full((3,), 1 / 3, dtype=torch.float64)
    p_new, L = plb_update(p, torch.tensor([1.0, 1.2, 2.1], dtype=torch.float64),
                          torch.tensor([2, 2, 3]))
    assert torch.allclose(L, torch.tensor([0.5, 0.6, 0.7], dtype=torch.float64))
    assert torch.allclose(p_new, torch.tensor([0.18779, 0.30746, 0.50475], dtype=torch.float64), atol=1e-5)
    assert abs(p_new.sum().item() - 1) < 1e-12


def test_plb_count_zero_rule_and_accumulate():
    p = torch.full((3,), 1 / 3, dtype=torch.float64)
    loss_sum, count = plb_accumulate(torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.long),
                                     torch.tensor([0, 0, 2]), torch.tensor([0.4, 0.6, 0.7]))
    assert loss_sum.tolist() == pytest.approx([1.0, 0.0, 0.7]) and count.tolist() == [2, 0, 1]
    _, L = plb_update(p, loss_sum, count)  # epoch 1: unseen head gets the mean of the seen ones
    assert L.tolist() == pytest.approx([0.5, 0.6, 0.7])
    _, L = plb_update(p, loss_sum, count, prev_L=torch.tensor([9.0, 0.55, 9.0], dtype=torch.float64))
    assert L.tolist() == pytest.approx([0.5, 0.55, 0.7])  # unseen head keeps last epoch's value
    with pytest.raises(ValueError):
        plb_update(p, torch.zeros(3), torch.zeros(3, dtype=torch.long))


def test_plb_sample_follows_p():
    heads = plb_sample(torch.tensor([0.0, 0.25, 0.75]), 4000, generator=gen(0))
    freq = torch.bincount(heads, minlength=3).double() / 4000
    assert freq[0] == 0 and abs(freq[2].item() - 0.75) < 0.03
    assert torch.equal(heads, plb_sample(torch.tensor([0.0, 0.25, 0.75]), 4000, generator=gen(0)))


# ---------------------------------------------------------------- AttMask

def test_attmask_high_low_hint_and_masking_prob():
    N, L = 6, 196
    attn = torch.rand(N, L, generator=gen(0))
    top = attn.topk(int(L * 0.3), dim=1).indices
    mask = attmask_mask(attn, 0.3, generator=gen(1), masking_prob=1.0)
    assert (mask.sum(1) == 58).all()  # AttMask truncates the masked count: int(196*0.3) = 58
    assert mask.gather(1, top).all()
    low = attmask_mask(attn, 0.3, generator=gen(1), masking_prob=1.0, mode="low")
    assert low.gather(1, (-attn).topk(58, dim=1).indices).all() and (low.sum(1) == 58).all()
    assert not attmask_mask(attn, 0.3, generator=gen(1), masking_prob=0.0).any()
    # default masking_prob 0.5: each image fully masked or not at all
    counts = attmask_mask(torch.rand(64, L, generator=gen(2)), 0.3, generator=gen(3)).sum(1)
    assert set(counts.tolist()) == {0, 58}
    # hint: reveal int(0.1*0.3*196) = 5 of the top int(196*0.1) = 19 tokens
    hint = attmask_mask(attn, 0.3, generator=gen(1), masking_prob=1.0, mode="hint")
    revealed = mask & ~hint
    assert (hint.sum(1) == 53).all() and (revealed.sum(1) == 5).all() and not (hint & ~mask).any()
    top19 = torch.zeros(N, L, dtype=torch.bool).scatter_(1, attn.topk(19, dim=1).indices, True)
    assert not (revealed & ~top19).any()
    # ratio_var: one ratio for the whole call, in [ratio - var, ratio + var]
    var = attmask_mask(attn, 0.3, generator=gen(4), masking_prob=1.0, ratio_var=0.2).sum(1)
    assert len(set(var.tolist())) == 1 and int(L * 0.1) <= var[0] <= int(L * 0.5)


# ---------------------------------------------------------------- registry: counts, determinism

def make_inputs(N: int, L: int, seed: int) -> MaskInputs:
    H, dh, D = 3, 4, 8
    return MaskInputs(
        N, L,
        embed=torch.randn(N, L, D, generator=gen(seed)),
        q=torch.randn(N, H, 1 + L, dh, generator=gen(seed + 1)),
        k=torch.randn(N, H, 1 + L, dh, generator=gen(seed + 2)),
        cls_attn=torch.rand(N, H, L, generator=gen(seed + 3)).softmax(-1),
        progress=(seed % 5) / 4,
    )


OPTIONS = {"gpa": {"head": 1}}


@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 4), L=st.integers(2, 70), ratio=st.floats(0.05, 0.95), seed=st.integers(0, 1000),
       name=st.sampled_from(sorted(STRATEGIES)))
def test_exact_counts_every_strategy(N, L, ratio, seed, name):
    inp = make_inputs(N, L, seed)
    out = get_strategy(name)(inp, ratio, generator=gen(seed), **OPTIONS.get(name, {}))
    assert out.mask.shape == (N, L) and out.mask.dtype == torch.bool
    assert torch.equal(out.len_keep, (~out.mask).sum(1))
    counts = out.mask.sum(1)
    if name == "amr":
        want = L - amr_ratios(sbam_salience(inp.embed), ratio)
    elif name == "attmask":  # all-or-nothing per image, AttMask's int(L*ratio)
        assert set(counts.tolist()) <= {0, int(L * ratio)}
        return
    else:
        want = torch.full((N,), L - len_keep_for(L, ratio))
    assert torch.equal(counts, want), (name, counts, want)
    assert torch.equal(unpack_mask(pack_mask(out.mask), L), out.mask)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_same_seed_same_mask_different_seed_different(name):
    inp = make_inputs(8, 64, 0)
    run = lambda seed: get_strategy(name)(inp, 0.75, generator=gen(seed), **OPTIONS.get(name, {}))
    assert torch.equal(run(7).mask, run(7).mask)
    assert not torch.equal(run(7).mask, run(8).mask)


def test_registry_extras_and_errors():
    inp = make_inputs(2, 16, 0)
    out = get_strategy("gpa")(inp, 0.75, generator=gen(0), head=-1)
    assert out.extras["gpa_target"].shape == (2, 16)
    heads = get_strategy("idm")(inp, 0.75, generator=gen(0)).extras["heads"]
    assert heads.shape == (2,) and heads.dtype == torch.long
    with pytest.raises(ValueError, match=r"^unknown strategy 'sbma'; choose from random, sbam, amr, gpa, idm, attmask$"):
        get_strategy("sbma")
    with pytest.raises(ValueError, match=r"needs MaskInputs.q, k"):
        get_strategy("gpa")(MaskInputs(2, 16), 0.75, generator=gen(0))
    assert get_strategy("gpa").needs == "qk" and get_strategy("sbam").needs == "embed"
