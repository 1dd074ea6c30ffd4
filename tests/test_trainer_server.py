"""The trainer against a live mask server: two torchrun ranks, and mask-source equivalence."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.maskserver_helpers import MODEL, ROOT, free_port, kill, start_server
from mimpipe.train.trainer import TrainConfig, train


def rows(path) -> list[dict]:
    return [json.loads(x) for x in open(path)]


def test_two_torchrun_ranks_train_an_epoch_on_server_masks(sample_ds, tmp_path):
    endpoint = f"ipc://{tmp_path}/ms"
    server = start_server(sample_ds, endpoint, tmp_path / "server.log", world_size=2, batch_size=8,
                          strategy="sbam", extra=["--heartbeat", "0.5"])
    try:
        out = tmp_path / "run"
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
             str(free_port()), "-m", "mimpipe.tools.cli", "train", "--shards", str(sample_ds), "--out", str(out),
             "--model", MODEL, "--masks", endpoint, "--strategy", "sbam", "--batch-size", "8",
             "--epochs", "1", "--threads", "1", "--mask-policy", "fail", "--mask-timeout", "60",
             "--heartbeat", "0.5"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        r0, r1 = rows(out / "metrics.jsonl"), rows(out / "metrics.rank1.jsonl")
        assert len(r0) == len(r1) == 8                          # ceil(120 / (2 * 8)) steps each
        assert sum(r["valid"] for r in r0 + r1) == 120          # every sample once (checksums checked)
        assert not any(r["fallback"] for r in r0 + r1)
        versions = [r["teacher_version"] for r in r0]
        assert versions == sorted(versions) and versions[0] >= 0    # rank 0's weights reached the server
        # masks are computed ahead: staleness is bounded by what the server may hold (max-ahead 4
        # + 4 credits), whatever the relative speed of trainer and server
        assert all(0 <= r["staleness"] <= 8 for r in r0 + r1)
    finally:
        kill(server)


def test_server_masks_and_local_masks_train_the_same(sample_ds, tmp_path):
    """The random strategy on the server draws the same noise the trainer would: same losses."""
    endpoint = f"ipc://{tmp_path}/ms"
    server = start_server(sample_ds, endpoint, tmp_path / "server.log", world_size=1, batch_size=16,
                          strategy="random")
    common = dict(shards=str(sample_ds), model=MODEL, batch_size=16, epochs=1, max_steps=4, threads=1)
    try:
        train(TrainConfig(out=str(tmp_path / "s"), masks=endpoint, strategy="random", **common))
    finally:
        kill(server)
    train(TrainConfig(out=str(tmp_path / "l"), masks="random", **common))
    served, local = rows(tmp_path / "s" / "metrics.jsonl"), rows(tmp_path / "l" / "metrics.jsonl")
    assert [r["loss"] for r in served] == [r["loss"] for r in local]


def test_mam_sits_out_the_batches_a_missing_server_leaves_to_random_masks(sample_ds, tmp_path):
    """No server answers: every batch falls back to random masks, which carry no GPA target, so the
    MAM term is skipped for them instead of stopping the run."""
    out = tmp_path / "run"
    train(TrainConfig(shards=str(sample_ds), out=str(out), model=MODEL, masks=f"ipc://{tmp_path}/nobody",
                      strategy="gpa", mam=1.0, mask_policy="random", mask_timeout=0.2, batch_size=8,
                      max_steps=2, threads=1))
    rs = rows(out / "metrics.jsonl")
    assert len(rs) == 2 and all(r["fallback"] for r in rs)
    assert not any("loss_mam" in r for r in rs) and all(r["loss"] == r["loss_mae"] for r in rs)
