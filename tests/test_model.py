"""Behaviour of train/model.py against docs/methods.md section 0 and timm's own ViT."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import Block, VisionTransformer

from mimpipe.train.model import (
    MODELS, MaskedAutoencoderViT, ModelConfig, attention_logits, attention_probs, block_qkv,
    create_model, load_encoder_state, model_config, patchify, random_masking, unpatchify,
)
from mimpipe.train.pos_embed import get_2d_sincos_pos_embed

L = 64  # 64 px images, patch 8: an 8 x 8 grid


def close(a, b, atol=1e-5, what=""):
    diff = (a - b).abs().max().item()
    assert torch.allclose(a, b, atol=atol, rtol=0), f"{what} max abs diff {diff:.3g} > {atol}"


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)  # parameter init only; masking always takes an explicit generator
    return create_model("mae_vit_micro_patch8_64").eval()


@pytest.fixture(scope="module")
def imgs():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def fixed_count_mask(N, n_mask, seed):
    """[N, L] bool with exactly n_mask[b] True per row (1 = masked)."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.zeros(L, dtype=torch.bool).index_fill_(0, torch.randperm(L, generator=g)[:n], True)
            for n in n_mask]
    return torch.stack(rows)


# registry -----------------------------------------------------------------------------------------

def test_registry_names_sizes_and_error():
    assert model_config("mae_vit_base_patch16") == ModelConfig(224, 16, 768, 12, 12, 512, 8, 16)
    assert model_config("mae_vit_small_patch16").embed_dim == 384
    assert model_config("mae_vit_huge_patch14", norm_pix_loss=False).norm_pix_loss is False
    with pytest.raises(ValueError) as e:
        model_config("mae_vit_bsae_patch16")
    assert all(name in str(e.value) for name in MODELS)


def test_img_size_builds_the_variant_on_a_new_grid():
    name = "mae_vit_tiny_patch8_64"
    assert model_config(name, img_size=96) == replace(model_config(name), img_size=96)
    assert model_config(name, None) == model_config(name)
    torch.manual_seed(0)
    model = create_model(name, img_size=96).eval()
    assert model.cfg.num_patches == 144
    want = torch.from_numpy(get_2d_sincos_pos_embed(192, 12, cls_token=True)).float()
    assert torch.equal(model.pos_embed[0], want)
    assert model.decoder_pos_embed.shape == (1, 145, 128)
    imgs96 = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        loss, pred, mask = model(imgs96, generator=torch.Generator().manual_seed(3))
        assert pred.shape == (2, 144, 8 * 8 * 3) and mask.shape == (2, 144)
        assert (mask.sum(1) == 144 - 36).all()  # int(144 * 0.25) kept
        assert torch.equal(model.forward_loss(imgs96, pred, mask), loss) and loss.isfinite()
    assert create_model(name, encoder_only=True, img_size=96).pos_embed.shape == (1, 145, 192)
    for bad in (95, 0, -8, 96.0):
        with pytest.raises(ValueError, match=rf"^--img-size {bad!r}: must be a positive multiple of "
                                             rf"{name}'s patch size 8$"):
            create_model(name, img_size=bad)


def test_encoder_only_has_only_timm_encoder_names(micro):
    enc = MaskedAutoencoderViT(micro.cfg, encoder_only=True)
    assert not [k for k in enc.state_dict() if k.startswith(("decoder_", "mask_token"))]
    assert set(enc.state_dict()) < set(micro.state_dict())


# patchify, sin-cos, init --------------------------------------------------------------------------

def test_patchify_roundtrip_and_order():
    x = torch.randn(2, 3, 64, 64)
    t = patchify(x, 8)
    assert t.shape == (2, L, 8 * 8 * 3)
    assert torch.equal(unpatchify(t, 8), x)
    # patch j = (row j // 8, col j % 8); inside it (row, col, channel) with channel fastest
    assert torch.equal(t[1, 8 * 2 + 5, :3], x[1, :, 16, 40])
    assert torch.equal(t[1, 8 * 2 + 5, 3 * (8 * 1 + 2): 3 * (8 * 1 + 2) + 3], x[1, :, 17, 42])


def test_sincos_first_half_is_column_second_half_is_row():
    D, g = 16, 4
    pe = get_2d_sincos_pos_embed(D, g, cls_token=True)
    assert pe.dtype == np.float64 and pe.shape == (1 + g * g, D)
    assert not pe[0].any()  # cls row is zeros
    tok = pe[1:]
    same_col = (1 * g + 2, 3 * g + 2)  # rows 1 and 3, column 2
    same_row = (1 * g + 0, 1 * g + 3)  # row 1, columns 0 and 3
    assert np.array_equal(tok[same_col[0], :D // 2], tok[same_col[1], :D // 2])
    assert not np.allclose(tok[same_col[0], D // 2:], tok[same_col[1], D // 2:])
    assert np.array_equal(tok[same_row[0], D // 2:], tok[same_row[1], D // 2:])
    omega = 1.0 / 10000 ** (np.arange(D // 4) / (D / 4))
    col, row = 2, 3
    expect = np.concatenate([np.sin(col * omega), np.cos(col * omega),  # column half first
                             np.sin(row * omega), np.cos(row * omega)])
    np.testing.assert_allclose(tok[row * g + col], expect, rtol=0, atol=1e-12)


def test_mae_init(micro):
    ref = torch.from_numpy(get_2d_sincos_pos_embed(64, 8, cls_token=True)).float()
    assert torch.equal(micro.pos_embed[0], ref) and not micro.pos_embed.requires_grad
    assert not micro.decoder_pos_embed.requires_grad
    bound = math.sqrt(6 / (64 + 3 * 64))  # xavier_uniform on qkv's [3D, D] as one matrix
    w = micro.blocks[0].attn.qkv.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert not micro.blocks[0].attn.qkv.bias.any() and torch.equal(micro.norm.weight, torch.ones(64))


# random_masking -----------------------------------------------------------------------------------

@pytest.mark.parametrize("L_, ratio, K", [(196, 0.75, 49), (64, 0.75, 16), (64, 0.6, 25)])
def test_random_masking_invariants(L_, ratio, K):
    x = torch.randn(4, L_, 5)
    rng_before = torch.get_rng_state()
    x_masked, mask, ids_restore = random_masking(x, ratio, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), rng_before), "random_masking touched the global RNG"
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    ids_keep = ids_shuffle[:, :K]
    assert x_masked.shape == (4, K, 5)
    assert torch.equal(mask.sum(1), torch.full((4,), float(L_ - K)))
    assert not mask.gather(1, ids_keep).any()
    assert torch.equal(ids_shuffle.gather(1, ids_restore), torch.arange(L_).expand(4, -1))
    assert torch.equal(x_masked, x.gather(1, ids_keep[..., None].expand(-1, -1, 5)))
    again = random_masking(x, ratio, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again[1], mask), "same seed must give the same mask"


# loss ---------------------------------------------------------------------------------------------

def test_norm_pix_loss_matches_hand_computation():
    cfg = ModelConfig(img_size=4, patch_size=2, embed_dim=8, depth=1, num_heads=2,
                      decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2)
    model = MaskedAutoencoderViT(cfg)
    g = torch.Generator().manual_seed(0)
    imgs, pred = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 4, 12, generator=g)
    mask = torch.tensor([[1.0, 0, 1, 1], [0, 1, 0, 0]])
    total, count, per_image = 0.0, 0, []
    for b in range(2):
        ls = []
        for j in range(4):
            r, c = divmod(j, 2)
            patch = imgs[b, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2].permute(1, 2, 0).reshape(-1).double()
            mu = patch.mean()
            var = ((patch - mu) ** 2).sum() / (patch.numel() - 1)  # unbiased
            ell = ((pred[b, j].double() - (patch - mu) / (var + 1e-6).sqrt()) ** 2).mean()
            if mask[b, j]:
                total, count = total + ell, count + 1
                ls.append(ell)
        per_image.append(sum(ls) / len(ls))
    got = model.forward_loss(imgs, pred, mask)
    assert abs(got.item() - total / count) < 1e-6, (got.item(), total / count)
    assert abs(got.item() - sum(per_image) / 2) > 1e-3, "must be one global mean, not a mean of means"


# external masks -----------------------------------------------------------------------------------

def test_generator_is_required_for_random_masking(micro, imgs):
    with pytest.raises(ValueError, match="generator"):
        micro(imgs)


def test_given_random_mask_reproduces_random_path(micro, imgs):
    with torch.no_grad():
        loss_r, pred_r, mask_r = micro(imgs, generator=torch.Generator().manual_seed(7))
        for given in (mask_r, mask_r.bool(), mask_r.to(torch.uint8)):
            loss_e, pred_e, mask_e = micro(imgs, mask=given)
            assert torch.equal(mask_e, mask_r)
            close(loss_e, loss_r, 1e-5, "loss")
            close(pred_e, pred_r, 1e-5, "pred")


def test_given_mask_count_and_order_honoured(micro, imgs):
    mask = fixed_count_mask(3, [40, 40, 40], seed=2)
    with torch.no_grad():
        latent, mask_out, ids_restore = micro.forward_encoder(imgs, mask=mask)
    assert latent.shape == (3, 1 + L - 40, 64)
    assert torch.equal(mask_out.bool(), mask)
    ids_keep = torch.argsort(ids_restore, dim=1)[:, :L - 40]
    assert torch.equal(ids_keep, torch.stack([(~m).nonzero().flatten() for m in mask]))  # ascending


def test_bad_masks_raise(micro, imgs):
    full = fixed_count_mask(3, [40, 64, 40], seed=2)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        micro(imgs, mask=full)
    with pytest.raises(ValueError, match="0/1"):
        micro(imgs, mask=torch.full((3, L), 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="shape"):
        micro(imgs, mask=torch.zeros(3, L - 1, dtype=torch.bool))


def test_padded_path_equals_plain_path_for_equal_counts(micro, imgs):
    mask = fixed_count_mask(3, [48, 48, 48], seed=4)
    with torch.no_grad():
        loss_plain, pred_plain, _ = micro(imgs, mask=mask)
        loss_pad, pred_pad, _ = micro(imgs, mask=mask, pad_to=16 + 9)
    close(loss_pad, loss_plain, 1e-5, "loss")
    close(pred_pad, pred_plain, 1e-5, "pred")


def test_variable_counts_equal_separate_forwards(micro, imgs):
    n_mask = [48, 40, 56]  # kept 16, 24, 8: two of three images are padded to 24 slots
    mask = fixed_count_mask(3, n_mask, seed=5)
    with torch.no_grad():
        loss, pred, mask_out = micro(imgs, mask=mask)
        assert torch.equal(mask_out.bool(), mask)
        sums = []
        for b in range(3):
            loss_b, pred_b, _ = micro(imgs[b:b + 1], mask=mask[b:b + 1])
            close(pred[b], pred_b[0], 1e-5, f"image {b} pred")
            sums.append(loss_b * n_mask[b])
    close(loss, sum(sums) / sum(n_mask), 1e-5, "global masked mean")


def test_len_keep_path_equals_mask_read_path(micro, imgs):
    mask = fixed_count_mask(3, [48, 48, 48], seed=6)
    with torch.no_grad():
        for pad_to in (None, 16 + 5):
            read = micro.forward_encoder(imgs, mask=mask, pad_to=pad_to)
            told = micro.forward_encoder(imgs, mask=mask, len_keep=16, pad_to=pad_to)
            for what, a, b in zip(("latent", "mask", "ids_restore"), read, told):
                assert torch.equal(a, b), (what, pad_to)
        loss_r, pred_r, mask_r = micro(imgs, generator=torch.Generator().manual_seed(8))
        loss_k, pred_k, mask_k = micro(imgs, mask=mask_r, len_keep=16)  # MAE: int(64 * 0.25)
    assert torch.equal(mask_k, mask_r)
    close(loss_k, loss_r, 1e-5, "loss")
    close(pred_k, pred_r, 1e-5, "pred")


def test_len_keep_path_reads_no_mask_values(micro, imgs):
    """A meta tensor has no values, so any host read of one (.item, .tolist, bool) raises: the
    CPU-side stand-in for torch.cuda.set_sync_debug_mode('error'), which needs a GPU."""
    model = create_model("mae_vit_micro_patch8_64").to("meta")
    x, mask = imgs.to("meta"), fixed_count_mask(3, [48, 48, 48], seed=6).to("meta")
    for pad_to in (None, 16 + 5):
        loss, pred, mask_out = model(x, mask=mask, len_keep=16, pad_to=pad_to)
        assert loss.shape == () and pred.shape == (3, L, 8 * 8 * 3) and mask_out.shape == (3, L)
    # a CPU mask is read on the CPU (checked for free) and only copied to the model's device
    model(x, mask=fixed_count_mask(3, [48, 48, 48], seed=6), len_keep=16)
    with pytest.raises((RuntimeError, NotImplementedError)):  # without len_keep K must be read: one host sync
        model(x, mask=mask)


def test_len_keep_checked_against_a_cpu_mask(micro, imgs):
    mask = fixed_count_mask(3, [48, 48, 40], seed=7)
    with pytest.raises(ValueError, match="len_keep 16 given, but mask rows keep 16 to 24"):
        micro(imgs, mask=mask, len_keep=16)
    for bad in (0, L + 1, torch.tensor([16, 16, 24])):  # one int, not per-image counts
        with pytest.raises(ValueError, match=r"len_keep .*: must be one int in \[1, L = 64\]"):
            micro(imgs, mask=mask, len_keep=bad)


# attention maps and truncated forward -------------------------------------------------------------

@pytest.mark.parametrize("qk_norm", [False, True])
def test_captured_attention_matches_block_attention(qk_norm):
    torch.manual_seed(0)
    block = Block(64, num_heads=4, qkv_bias=True, qk_norm=qk_norm).eval()
    assert block.attn.fused_attn, "the block's own path should stay fused SDPA"
    x = torch.randn(2, 10, 64)
    q, k, v = block_qkv(block, x)
    assert q.shape == k.shape == v.shape == (2, 4, 10, 16)
    logits, probs = attention_logits(q, k), attention_probs(q, k)
    close(logits, torch.einsum("nhid,nhjd->nhij", q, k) / 4.0, 1e-5, "logits")
    close(probs, torch.softmax(logits, dim=-1), 1e-6, "probs")
    out = block.attn.proj((probs @ v).transpose(1, 2).reshape(2, 10, 64))
    with torch.no_grad():
        close(out, block.attn(block.norm1(x)), 1e-5, "probs @ v -> proj vs timm attn")


def capture_block_inputs(blocks):
    """Forward pre-hooks recording the tokens entering each block (test only)."""
    seen = {}
    hooks = [blk.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0]))
             for i, blk in enumerate(blocks)]
    return seen, hooks


def test_truncated_forward_equals_full_forward_intermediates():
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch8_64").eval()
    x = torch.randn(2, 3, 64, 64)
    seen, hooks = capture_block_inputs(model.blocks)
    with torch.no_grad():
        latent, _, _ = model.forward_encoder(x, mask=torch.zeros(2, L, dtype=torch.bool))  # keep all
        for b in range(len(model.blocks)):
            close(model.forward_features_until(x, b), seen[b], 1e-5, f"block {b}")
        close(model.norm(model.forward_features_until(x, len(model.blocks))), latent, 1e-5, "final")
    for h in hooks:
        h.remove()
    with pytest.raises(ValueError):
        model.forward_features_until(x, len(model.blocks) + 1)


# loading weights ----------------------------------------------------------------------------------

def tiny_timm_vit(**kw):
    args = dict(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10,
                global_pool="token", class_token=True)
    return VisionTransformer(**{**args, **kw}).eval()


def test_timm_vit_weights_load_and_match_forward_features(micro):
    torch.manual_seed(1)
    vit = tiny_timm_vit()
    model = MaskedAutoencoderViT(micro.cfg, encoder_only=True).eval()
    report = load_encoder_state(model, vit.state_dict())
    assert report.ignored == ("head.bias", "head.weight")
    assert torch.equal(model.pos_embed, vit.pos_embed), "learned pos_embed is loaded as given"
    x = torch.randn(2, 3, 64, 64)
    seen, hooks = capture_block_inputs(vit.blocks)
    with torch.no_grad():
        ref = vit.forward_features(x)
        ours = model.norm(model.forward_features_until(x, len(model.blocks)))
        close(ours[:, 0], ref[:, 0], 1e-5, "normed cls")
        close(ours, ref, 1e-5, "all tokens")
        close(model.forward_features_until(x, 1), seen[1], 1e-5, "tokens entering block 1")
    for h in hooks:
        h.remove()


def test_mae_checkpoint_loads_and_ignores_decoder(micro):
    ckpt = {"model": micro.state_dict(), "epoch": 3}
    enc = MaskedAutoencoderViT(micro.cfg, encoder_only=True)
    report = load_encoder_state(enc, ckpt)
    assert "mask_token" in report.ignored and "decoder_pred.weight" in report.ignored
    for k, v in enc.state_dict().items():
        assert torch.equal(v, micro.state_dict()[k]), k


def test_timm_vit_base_names_fit_mae_vit_base():
    import timm
    vit = timm.create_model("vit_base_patch16_224", pretrained=False)
    model = create_model("mae_vit_base_patch16", encoder_only=True)
    report = load_encoder_state(model, vit.state_dict())
    assert len(report.loaded) == len(vit.state_dict()) - 2  # all but head.weight, head.bias


@pytest.mark.parametrize("kw, names", [
    (dict(qkv_bias=False), ["blocks.0.attn.qkv.bias", "blocks.1.attn.qkv.bias"]),  # missing
    (dict(reg_tokens=1), ["reg_token"]),  # unexpected
    (dict(embed_dim=96, num_heads=2), ["cls_token (1, 1, 96) vs model (1, 1, 64)"]),  # shape
])
def test_load_errors_name_the_keys(micro, kw, names):
    model = MaskedAutoencoderViT(micro.cfg, encoder_only=True)
    with pytest.raises(ValueError) as e:
        load_encoder_state(model, tiny_timm_vit(**kw).state_dict())
    assert all(n in str(e.value) for n in names), str(e.value)
