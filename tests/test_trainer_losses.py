"""The trainer's switchable loss terms (--lut, --mto, --mam, --contrastive) and PLB feedback.

Tiny on purpose (micro model, batch 8-32, a few steps): the machine is shared.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from mimpipe.maskserver.client import batch_generator
from mimpipe.maskserver.teacher import Teacher
from mimpipe.train.masks import Masks
from mimpipe.train.model import create_model, patchify
from mimpipe.train.objective import second_view_mask
from mimpipe.train.trainer import Run, TrainConfig, compute_losses, train

MODEL = "mae_vit_micro_patch8_64"


def cfg(sample_ds, out, **kw):
    base = dict(shards=str(sample_ds), out=str(out), model=MODEL, batch_size=8, epochs=1, blr=1e-3,
                threads=1, head_hidden=64)
    return TrainConfig(**{**base, **kw})


def rows(out) -> list[dict]:
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def first_batch(run: Run):
    """The Run's first batch and its masks, as the loop would see them."""
    run.start_masks()
    run.masks.sync(0, run.model, run.ema)
    batches = run.loader.epoch(0, 0)
    batch = next(batches)
    batches.close()
    return batch, run.masks.get(batch)


# ------------------------------------------------------------------ model: decoder hidden states

def test_decoder_hidden_states_end_in_the_prediction():
    torch.manual_seed(0)
    m = create_model(MODEL).eval()
    imgs = torch.randn(2, 3, 64, 64)
    latent, mask, ids_restore = m.forward_encoder(imgs, 0.75, generator=torch.Generator().manual_seed(0))
    pred = m.forward_decoder(latent, ids_restore, mask)
    pred2, hidden = m.forward_decoder(latent, ids_restore, mask, return_hidden=True)
    assert torch.equal(pred, pred2)                              # the default path is unchanged
    assert len(hidden) == len(m.decoder_blocks) + 1
    assert all(h.shape == (2, 65, m.cfg.decoder_embed_dim) for h in hidden)
    assert torch.equal(m.decoder_pred(m.decoder_norm(hidden[-1]))[:, 1:], pred)
    assert torch.equal(m.decoder_blocks[0](hidden[0]), hidden[1])
    # X^0 holds the mask token (+ pos) at every masked position
    j = int(mask[0].nonzero()[0])
    assert torch.allclose(hidden[0][0, 1 + j], (m.mask_token + m.decoder_pos_embed[:, 1 + j])[0, 0])


# ------------------------------------------------------------------ each switch runs and logs

@pytest.mark.parametrize("term,kw", [
    ("lut", dict(views="src,src+color")),
    ("mto", {}),
    ("mam", dict(masks="inloop:gpa")),
    ("contrastive", dict(views="src,src+color")),
])
def test_each_switch_trains_and_logs_its_term(sample_ds, tmp_path, term, kw):
    w = 0.5
    train(cfg(sample_ds, tmp_path, max_steps=2, **{term: w}, **kw))
    got = rows(tmp_path)
    assert len(got) == 2
    for r in got:
        assert math.isfinite(r[f"loss_{term}"]) and math.isfinite(r["loss_mae"])
        assert math.isclose(r["loss"], r["loss_mae"] + w * r[f"loss_{term}"], rel_tol=1e-5)


def test_default_run_logs_only_the_mae_term(sample_ds, tmp_path):
    train(cfg(sample_ds, tmp_path, max_steps=1))
    (r,) = rows(tmp_path)
    assert r["loss"] == r["loss_mae"] and not any(f"loss_{t}" in r for t in ("lut", "mto", "mam", "contrastive"))


def test_two_view_terms_need_two_views(sample_ds, tmp_path):
    with pytest.raises(ValueError, match="two views"):
        train(cfg(sample_ds, tmp_path, max_steps=1, lut=0.25))


def test_mam_without_gpa_target_fails_clearly(sample_ds, tmp_path):
    with pytest.raises(ValueError, match="gpa_target.*inloop:gpa"):
        train(cfg(sample_ds, tmp_path, max_steps=1, mam=1.0))


# ------------------------------------------------------------------ gradients go where they should

REACH = {   # term -> (parameters its gradient must reach, parameters it must not touch)
    "mae": (["blocks.0.attn.qkv.weight", "decoder_pred.weight"], ["projector.0.weight", "mam.pred.weight"]),
    "lut": (["blocks.0.attn.qkv.weight", "projector.0.weight", "predictor.0.weight"],
            ["decoder_embed.weight", "decoder_pred.weight", "mam.pred.weight"]),
    "mto": (["blocks.0.attn.qkv.weight", "decoder_embed.weight", "mask_token", "decoder_blocks.0.mlp.fc1.weight"],
            ["decoder_pred.weight", "decoder_norm.weight", "projector.0.weight", "mam.pred.weight"]),
    "mam": (["blocks.0.attn.qkv.weight", "decoder_embed.weight", "mam.pred.weight", "mam.blocks.0.attn.qkv.weight"],
            ["decoder_blocks.0.attn.qkv.weight", "decoder_pred.weight", "projector.0.weight"]),
    "contrastive": (["blocks.0.attn.qkv.weight", "cls_token", "projector.0.weight", "predictor.0.weight"],
                    ["decoder_embed.weight", "mam.pred.weight"]),
}


def test_each_term_trains_its_parameters_and_never_the_teacher(sample_ds, tmp_path):
    run = Run(cfg(sample_ds, tmp_path, masks="inloop:gpa", views="src,src+color", lut=1.0, mto=1.0,
                  mam=1.0, contrastive=1.0), 0, 1)
    try:
        batch, masks = first_batch(run)
        total, parts, _ = compute_losses(run, batch, masks)
        assert set(parts) == set(REACH)
        params = dict(run.model.named_parameters())
        for term, (reach, untouched) in REACH.items():
            run.model.zero_grad(set_to_none=True)
            parts[term].backward(retain_graph=True)
            for name in reach:
                g = params[name].grad
                assert g is not None and g.abs().sum() > 0, f"{term}: no gradient reaches {name}"
            for name in untouched:
                g = params[name].grad
                assert g is None or not g.any(), f"{term}: gradient leaks into {name}"
        run.model.zero_grad(set_to_none=True)
        total.backward()
        run.opt.step()
        assert any(k.startswith("projector.") for k in run.ema.state_dict())   # what a momentum server holds
        for name, p in run.ema.named_parameters():
            assert not p.requires_grad and p.grad is None, f"EMA {name} got a gradient"
        assert not run.ema.training    # eval-mode BN in the momentum projector (docs/methods.md 2.3)
    finally:
        run.loader.close()


# ------------------------------------------------------------------ LUT targets: two paths, one loss

def test_lut_targets_from_the_mask_source_equal_the_trainers_own(sample_ds, tmp_path):
    run = Run(cfg(sample_ds, tmp_path, views="src,src+color", lut=0.25), 0, 1)
    try:
        batch, masks = first_batch(run)
        with torch.no_grad():   # an EMA that differs from the student, BN running stats included
            for v in run.ema.state_dict().values():
                if v.is_floating_point():
                    v.add_(0.01 * torch.randn_like(v))
        _, own, _ = compute_losses(run, batch, masks)
        # what a momentum mask server run with --lut computes from the trainer's EMA snapshot
        teacher = Teacher(MODEL, "momentum", projector_hidden=64)
        assert teacher.load_state(run.ema.state_dict(), version=1, step=1)
        t1, t2 = teacher.lut_targets(batch.images, batch.view2)
        _, served, _ = compute_losses(run, batch, Masks(masks.mask, {"lut_t1": t1, "lut_t2": t2}))
        assert torch.allclose(own["lut"], served["lut"], rtol=1e-6, atol=1e-7), (own["lut"], served["lut"])
        assert torch.equal(own["mae"], served["mae"])
    finally:
        run.loader.close()


def test_second_view_keeps_luts_next_k_of_the_same_permutation():
    N, L, K = 4, 64, 16
    noise = torch.rand(N, L, generator=batch_generator(0, 1, 2, 0))
    ids = noise.argsort(dim=1)
    mask1 = torch.ones(N, L, dtype=torch.bool).scatter(1, ids[:, :K], False)
    mask2 = second_view_mask(mask1, batch_generator(0, 1, 2, 0))
    want = torch.ones(N, L, dtype=torch.bool).scatter(1, ids[:, K:2 * K], False)
    assert torch.equal(mask2, want)
    assert not (~mask1 & ~mask2).any() and ((~mask2).sum(1) == K).all()


# ------------------------------------------------------------------ PLB with an in-loop idm source

def test_inloop_plb_updates_head_probs_and_resumes_exactly(sample_ds, tmp_path):
    kw = dict(masks="inloop:idm", batch_size=32, epochs=2)   # 120 images: 4 steps per epoch
    train(cfg(sample_ds, tmp_path / "a", **kw))
    train(cfg(sample_ds, tmp_path / "b", max_steps=6, **kw))   # stops mid epoch 1: half-summed PLB
    mid = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["plb"]
    train(cfg(sample_ds, tmp_path / "b", **kw), resume=True)
    assert [r["loss"] for r in rows(tmp_path / "a")] == [r["loss"] for r in rows(tmp_path / "b")]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["plb"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["plb"]
    M = 2   # micro model: 2 heads in the last block
    # after epoch 0 p moved away from uniform; mid-epoch the checkpoint carries the running sums
    assert mid["p"] is not None and not torch.allclose(mid["p"], torch.full((M,), 0.5, dtype=torch.float64))
    assert math.isclose(float(mid["p"].sum()), 1.0) and mid["count"].sum() == 2 * 32
    assert torch.equal(a["p"], b["p"]) and torch.equal(a["prev"], b["prev"])
    assert not torch.equal(a["p"], mid["p"]) and a["count"].sum() == 0   # epoch 1's update ran


def test_per_image_loss_feedback_matches_the_mae_loss(sample_ds, tmp_path):
    """per_image (PLB's l_i) averages the same per-patch errors as the MAE loss."""
    run = Run(cfg(sample_ds, tmp_path, masks="inloop:idm"), 0, 1)
    try:
        batch, masks = first_batch(run)
        assert "heads" in masks.extras
        _, parts, per_image = compute_losses(run, batch, masks)
        assert per_image.shape == (8,) and not per_image.requires_grad
        # equal kept counts: the batch mean of per-image means is the global mean
        assert torch.allclose(per_image.mean(), parts["mae"].detach(), rtol=1e-5)
        assert patchify(batch.images, 8).shape[1] == masks.mask.shape[1]
    finally:
        run.loader.close()


def test_server_source_gets_plb_feedback_per_step(sample_ds, tmp_path):
    """With a server source the trainer sends (epoch, step, per-head sum, count), valid rows only."""
    from mimpipe.train.masks import ServerMasks
    from mimpipe.train.trainer import plb_feedback

    class Client:
        def __init__(self):
            self.sent = []

        def send_feedback(self, epoch, step, head_loss_sum, head_count):
            self.sent.append((epoch, step, head_loss_sum, head_count))

    run = Run(cfg(sample_ds, tmp_path, masks="inloop:idm"), 0, 1)
    try:
        batch, masks = first_batch(run)
        _, _, per_image = compute_losses(run, batch, masks)
        server = ServerMasks.__new__(ServerMasks)   # no socket: only its client is used here
        server.client = Client()
        run.masks = server
        plb_feedback(run, batch, masks, per_image)
        ((epoch, step, s, c),) = server.client.sent
        heads = masks.extras["heads"]
        assert (epoch, step) == (0, 0) and c.sum() == int(batch.valid.sum())
        assert math.isclose(float(s.sum()), float(per_image[batch.valid].sum()), rel_tol=1e-5)
        assert c.tolist() == torch.bincount(heads[batch.valid], minlength=2).float().tolist()
        assert run.plb["count"].sum() == 0   # a server keeps PLB state itself
    finally:
        run.loader.close()


def test_lut_with_a_momentum_server_that_sends_targets(sample_ds, tmp_path):
    """--server-lut: the EMA snapshot (encoder + projector.*) fits a `--lut` server's teacher, idm's
    PLB feedback goes back, and the run trains with the served targets."""
    from tests.maskserver_helpers import kill, start_server
    endpoint = f"ipc://{tmp_path}/ms"
    log = tmp_path / "server.log"
    server = start_server(sample_ds, endpoint, log, world_size=1, batch_size=16, strategy="idm",
                          extra=["--lut", "--views", "src,src+color"])
    try:
        train(cfg(sample_ds, tmp_path / "run", masks=endpoint, strategy="idm", server_lut=True, lut=0.25,
                  views="src,src+color", batch_size=16, max_steps=4, head_hidden=4096,
                  mask_policy="fail", mask_timeout=60))
    finally:
        kill(server)
    got = rows(tmp_path / "run")
    assert len(got) == 4 and all(math.isfinite(r["loss_lut"]) for r in got)
    text = log.read_text()
    assert "teacher now at weights" in text and "rejected" not in text, text[-2000:]


def test_tensorboard_gets_the_logged_numbers(sample_ds, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train(cfg(sample_ds, tmp_path, max_steps=2, tensorboard=True))
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    logged = rows(tmp_path)
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == \
        [(r["it"], pytest.approx(r["loss"])) for r in logged]
    assert {"loss_mae", "lr", "data_wait", "mask_wait", "fallback"} <= set(acc.Tags()["scalars"])
