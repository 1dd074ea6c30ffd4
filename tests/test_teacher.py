"""maskserver/teacher.py against a full forward (hooks live here, in the test only) and docs/methods.md."""
import argparse
import logging

import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from mimpipe.maskserver.strategies import STRATEGIES, gpa_mask, gpa_scores, gpa_target
from mimpipe.maskserver.teacher import DEFAULT_SOURCE, Teacher
from mimpipe.train.heads import mlp_head
from mimpipe.train.model import attention_logits, attention_probs, create_model

MICRO, TINY = "mae_vit_micro_patch8_64", "mae_vit_tiny_patch8_64"
N, L = 3, 64  # 64 px, patch 8


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def close(a, b, atol=1e-5, what=""):
    diff = (a - b).abs().max().item()
    assert torch.allclose(a, b, atol=atol, rtol=0), f"{what} max abs diff {diff:.3g} > {atol}"


def encoder(name: str, seed: int):
    torch.manual_seed(seed)  # parameter init only; masks always take an explicit generator
    return create_model(name, encoder_only=True).eval()


def loaded(name: str, enc, source: str = "momentum", **kw) -> Teacher:
    """A teacher of `source` holding enc's weights, sent the way the trainer sends them."""
    t = Teacher(name, source, projector_hidden=None, **kw)
    sd = enc.state_dict()
    assert t.load_state({k: sd[k] for k in t.held}, version=1, step=10)
    return t


def full_forward_qk(enc, imgs):
    """q, k of every block as timm's own Attention computes them in a full, unmasked encoder forward."""
    seen = {}

    def grab(i):
        a = enc.blocks[i].attn

        def hook(module, args, out):  # qkv Linear output [N, T, 3C]; q_norm/k_norm are Identity here
            n, t, _ = out.shape
            q, k, _ = out.reshape(n, t, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            seen[i] = (q, k)
        return hook

    hooks = [blk.attn.qkv.register_forward_hook(grab(i)) for i, blk in enumerate(enc.blocks)]
    with torch.no_grad():
        enc.forward_encoder(imgs, mask=torch.zeros(imgs.shape[0], L, dtype=torch.bool))
    for h in hooks:
        h.remove()
    return seen


@pytest.fixture(scope="module")
def imgs():
    return torch.randn(N, 3, 64, 64, generator=gen(1))


@pytest.fixture(scope="module")
def tiny():
    return encoder(TINY, 0)


@pytest.fixture(scope="module")
def tiny_qk(tiny, imgs):
    return full_forward_qk(tiny, imgs)


# truncated forward ------------------------------------------------------------------------------

@pytest.mark.parametrize("b", [0, 2, 3])
def test_truncated_qk_equals_what_the_full_forward_feeds_block_b(tiny, tiny_qk, imgs, b):
    t = loaded(TINY, tiny)
    ran = []
    hooks = [blk.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
             for i, blk in enumerate(t.encoder.blocks)]
    inp = t.mask_inputs(imgs, "gpa", block=b)
    for h in hooks:
        h.remove()
    assert ran == list(range(b)), f"blocks run: {ran}; block {b} contributes only its q, k"
    close(inp.q, tiny_qk[b][0], what=f"q of block {b}")
    close(inp.k, tiny_qk[b][1], what=f"k of block {b}")


@pytest.mark.parametrize("name", ["idm", "attmask"])
def test_cls_attention_is_row_0_of_the_full_softmax_for_every_head(tiny, tiny_qk, imgs, name):
    cls_attn = loaded(TINY, tiny).mask_inputs(imgs, name).cls_attn
    full = attention_probs(*tiny_qk[3])  # [N, H, T, T] of the last block
    assert cls_attn.shape == (N, 3, L)
    for h in range(3):
        close(cls_attn[:, h], full[:, h, 0, 1:], 1e-6, f"head {h}")


def test_gpa_through_the_teacher_equals_gpa_on_explicit_qk(tiny, tiny_qk, imgs):
    b, h, t_ = 2, 1, 0.3
    out = loaded(TINY, tiny).compute(imgs, "gpa", ratio=0.75, generator=gen(5), progress=t_, block=b,
                                     options={"head": h})
    q, k = tiny_qk[b]
    raw = attention_logits(q, k)[:, h].sum(dim=1)[:, 1:]  # Σ over all queries (cls, self too), patch keys
    g = gpa_scores(q, k, head=h)
    close(g, (raw - raw.amin(1, keepdim=True)) / (raw.amax(1, keepdim=True) - raw.amin(1, keepdim=True)),
          1e-4, "g vs the explicit T x T sum")
    assert torch.equal(out.mask, gpa_mask(g, 0.75, t_, generator=gen(5)))
    close(out.extras["gpa_target"], gpa_target(g), 1e-4, "MAM target")


# online source ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sbam", "amr"])
def test_embed_strategies_read_only_patch_embed_and_pos(tiny, imgs, name):
    prefixes = Teacher.state_for(name, TINY)
    part = {k: v for k, v in tiny.state_dict().items() if k.startswith(prefixes)}
    assert sorted(part) == ["patch_embed.proj.bias", "patch_embed.proj.weight", "pos_embed"]
    online = Teacher(TINY, "online", strategy=name)
    assert len(online.encoder.blocks) == 0 and online.load_state(part, 1, 1)
    with torch.no_grad():
        close(online.mask_inputs(imgs, name).embed, tiny.patch_embed(imgs) + tiny.pos_embed[:, 1:], 1e-6)
    a = online.compute(imgs, name, ratio=0.75, generator=gen(3))
    b = loaded(TINY, tiny).compute(imgs, name, ratio=0.75, generator=gen(3))
    assert torch.equal(a.mask, b.mask)


def test_online_gpa_holds_blocks_up_to_b_and_refuses_more(imgs):
    enc = encoder(MICRO, 2)
    online = loaded(MICRO, enc, "online", strategy="gpa", block=1)
    assert "blocks.0.mlp.fc2.weight" in online.held and "blocks.1.attn.qkv.weight" in online.held
    assert not [k for k in online.held if k.startswith(("blocks.1.mlp", "blocks.1.attn.proj", "norm."))]
    run = lambda t, name: t.compute(imgs, name, ratio=0.75, generator=gen(4), block=1, options={"head": 1})
    assert torch.equal(run(online, "gpa").mask, run(loaded(MICRO, enc), "gpa").mask)
    sbam_only = loaded(MICRO, enc, "online", strategy="sbam")
    with pytest.raises(ValueError, match=r"also reads \['cls_token', 'blocks.0.'"):
        run(sbam_only, "gpa")


# weights ----------------------------------------------------------------------------------------

def momentum_state(seed: int, hidden: int = 16):
    """(state, encoder, head): an EMA snapshot as the trainer sends it, encoder (timm names) +
    'projector.*' with non-trivial BN buffers, and the modules it came from."""
    enc = encoder(MICRO, seed)
    head = mlp_head(64, hidden=hidden, out_dim=64)
    bn = head[1]
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.normal_()
    bn.bias.data.normal_()
    return {**enc.state_dict(), **{f"projector.{k}": v for k, v in head.state_dict().items()}}, enc, head


def test_load_state_versions_and_key_errors(imgs):
    t = Teacher(MICRO, "momentum", projector_hidden=16)
    assert (t.version, t.step) == (-1, None)
    with pytest.raises(RuntimeError, match="no weights yet"):
        t.compute(imgs, "idm", ratio=0.75, generator=gen(0))
    sd1, sd2 = momentum_state(1)[0], momentum_state(2)[0]
    assert t.load_state(sd1, version=3, step=30) and (t.version, t.step) == (3, 30)
    snapshot = {k: v.clone() for k, v in t._state().items()}
    assert not t.load_state(sd2, version=3, step=31), "a duplicate upload must not change the teacher"
    assert not t.load_state(sd2, version=2, step=40), "an older upload must not change the teacher"
    bad = {k: v for k, v in sd2.items() if k != "blocks.1.attn.qkv.weight"}
    bad["module.norm.weight"] = sd2["norm.weight"]
    bad["pos_embed"] = torch.zeros(1, 10, 64)
    with pytest.raises(ValueError) as e:
        t.load_state(bad, version=9, step=90)
    for name in ("missing ['blocks.1.attn.qkv.weight']", "unexpected ['module.norm.weight']",
                 "pos_embed (1, 10, 64) vs teacher (1, 65, 64)"):
        assert name in str(e.value), str(e.value)
    assert (t.version, t.step) == (3, 30)
    assert all(torch.equal(v, snapshot[k]) for k, v in t._state().items()), "a failed load changed weights"
    assert t.load_state(sd2, version=4, step=40) and (t.version, t.step) == (4, 40)
    assert all(torch.equal(v, sd2[k]) for k, v in t._state().items())


def test_lut_targets_equal_a_hand_computation():
    sd, enc, head = momentum_state(3)
    t = Teacher(MICRO, "momentum", projector_hidden=16)
    t.load_state(sd, 1, 1)
    v1, v2 = torch.randn(2, N, 3, 64, 64, generator=gen(6))
    t1, t2 = t.lut_targets(v1, v2)
    lin0, bn, lin1 = head[0], head[1], head[3]
    with torch.no_grad():
        for v, got in ((v1, t1), (v2, t2)):
            z = enc.norm(enc.forward_features_until(v, 2))[:, 1:].mean(dim=1)  # final norm, patch mean
            hid = z @ lin0.weight.T  # then BN1d with running statistics, by hand
            hid = (hid - bn.running_mean) / (bn.running_var + bn.eps).sqrt() * bn.weight + bn.bias
            assert got.shape == (N, 64) and got.dtype == torch.float32
            close(got, hid.clamp_min(0) @ lin1.weight.T, 1e-4, "t_k")
    with pytest.raises(ValueError, match="projector"):
        loaded(MICRO, enc).lut_targets(v1, v2)


def test_mlp_head_layers():
    kinds = lambda m: [type(x).__name__ for x in m]
    assert kinds(mlp_head(8, hidden=32, out_dim=4)) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert kinds(mlp_head(8, hidden=32, out_dim=4, depth=3, bn=False)) == [
        "Linear", "ReLU", "Linear", "ReLU", "Linear"]
    head = mlp_head(8, hidden=32, out_dim=4)
    assert all(m.bias is None for m in head if isinstance(m, nn.Linear))
    assert (head[0].in_features, head[-1].out_features) == (8, 4)


# frozen source ----------------------------------------------------------------------------------

def test_frozen_loads_timm_and_mae_files_and_rejects_the_rest(tmp_path, imgs):
    torch.manual_seed(1)
    vit = VisionTransformer(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    torch.save(vit.state_dict(), tmp_path / "timm.pth")
    mae = create_model(MICRO)  # with decoder: an MAE release-style {'model': sd}
    torch.save({"model": mae.state_dict()}, tmp_path / "mae.pth")
    for file, ref in (("timm.pth", vit), ("mae.pth", mae)):
        t = Teacher(MICRO, f"frozen:{tmp_path / file}")
        assert (t.version, t.step) == (0, None)
        assert all(torch.equal(v, ref.state_dict()[k]) for k, v in t.encoder.state_dict().items()), file
    assert t.compute(imgs, "idm", ratio=0.75, generator=gen(0)).mask.shape == (N, L)
    with pytest.raises(ValueError, match="frozen; it takes no weights"):
        t.load_state(mae.state_dict(), 5, 5)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        Teacher(MICRO, f"frozen:{tmp_path / 'nope.pth'}")
    torch.save({"model": mae.state_dict(), "args": argparse.Namespace(lr=1)}, tmp_path / "run.pth")
    with pytest.raises(ValueError, match=r"run.pth: holds a pickled argparse.Namespace"):
        Teacher(MICRO, f"frozen:{tmp_path / 'run.pth'}")
    with pytest.raises(ValueError, match=r"mae.pth: encoder state does not fit"):
        Teacher(TINY, f"frozen:{tmp_path / 'mae.pth'}")


# determinism, logging, errors -------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_same_seed_same_masks(imgs, name):
    t = loaded(MICRO, encoder(MICRO, 4))
    kw = dict(block=1, options={"head": 1}) if name == "gpa" else {}
    a, b = (t.compute(imgs, name, ratio=0.75, generator=gen(7), progress=0.5, **kw) for _ in range(2))
    assert torch.equal(a.mask, b.mask) and a.mask.shape == (N, L)
    assert a.extras.keys() == b.extras.keys() and all(torch.equal(a.extras[k], b.extras[k]) for k in a.extras)


def test_non_default_source_is_logged_once(imgs, caplog):
    assert set(DEFAULT_SOURCE) == {n for n, s in STRATEGIES.items() if s.needs != "none"}
    t = loaded(MICRO, encoder(MICRO, 5))
    with caplog.at_level(logging.WARNING, logger="mimpipe.maskserver.teacher"):
        for name in ("gpa", "gpa", "idm"):
            t.compute(imgs, name, ratio=0.75, generator=gen(0), **({"block": 1, "options": {"head": 0}}
                                                                    if name == "gpa" else {}))
    assert [r.getMessage() for r in caplog.records] == [
        "strategy 'gpa' runs on a 'momentum' teacher; its paper uses 'frozen' (docs/methods.md 'Decisions')"]


def test_gpa_defaults_fit_a_shallow_narrow_model(imgs):
    """b9h11 does not exist in the micro model: its last block and the sum of its heads stand in."""
    t = loaded(MICRO, encoder(MICRO, 6))
    a = t.compute(imgs, "gpa", ratio=0.75, generator=gen(0))
    b = t.compute(imgs, "gpa", ratio=0.75, generator=gen(0), block=1, options={"head": -1})
    assert torch.equal(a.mask, b.mask) and torch.equal(a.extras["gpa_target"], b.extras["gpa_target"])


def test_errors_name_the_problem(imgs):
    t = loaded(MICRO, encoder(MICRO, 6))
    with pytest.raises(ValueError, match=r"reads block 9, but the model has blocks 0..1"):
        t.compute(imgs, "gpa", ratio=0.75, generator=gen(0), block=9)
    with pytest.raises(ValueError, match=r"teacher expects \[N, 3, 64, 64\]"):
        t.compute(imgs[:, :, :32], "idm", ratio=0.75, generator=gen(0))
    with pytest.raises(ValueError, match="choose from online, momentum, frozen:PATH"):
        Teacher(MICRO, "ema")
    with pytest.raises(ValueError, match="pass strategy="):
        Teacher(MICRO, "online")


@pytest.mark.parametrize("name", ["sbam", "amr", "gpa"])
def test_embed_strategies_run_in_full_fp32_and_restore_the_flags(imgs, name):
    """TF32 (torch's default for cuDNN convolutions on a GPU) is off while SBAM's embedding and
    salience are computed, and back as it was afterwards; attention strategies keep the defaults."""
    t = Teacher("mae_vit_micro_patch8_64", "momentum", projector_hidden=None)
    t.load_state(create_model("mae_vit_micro_patch8_64", encoder_only=True).state_dict(), version=0, step=0)
    seen = []
    t.encoder.patch_embed.register_forward_hook(
        lambda m, i, o: seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)))
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    t.compute(imgs, name, ratio=0.75, generator=torch.Generator().manual_seed(0))
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before
    assert seen == [(False, False)] if name != "gpa" else seen == [before]
