"""Running on a cluster (issue #13), server and client side, over real processes and sockets: CURVE
end to end, a handshake that compares what makes masks, a trainer that says why it has no masks
and stops on SIGTERM while it waits, `random` falling back at once while the server is dead, the
server exiting when the run is done, and failover between listed servers.

Tiny model (micro, L = 64); every test bounds its waits and kills what it started.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zmq.auth

from mimpipe.maskserver import protocol as P
from mimpipe.maskserver.client import MaskClient, MaskServerError
from mimpipe.maskserver.keys import client_curve, create_keys
from mimpipe.maskserver.server import MaskServer, ServerConfig
from mimpipe.maskserver.teacher import Teacher
from mimpipe.pipeline.manifest import load_manifest
from mimpipe.pipeline.plan import Plan, PlanConfig
from mimpipe.train.trainer import TrainConfig, train
from maskserver_helpers import L, MODEL, ROOT, free_port, kill, read_lines, start_client, start_server


def plan_of(ds, world=1, batch=8, rank=0):
    return Plan(load_manifest(ds), PlanConfig(seed=0, batch_size=batch, world_size=world, img_size=64), rank)


def client(endpoint, plan, world=1, **kw):
    kw = {"num_patches": L, "ratio": 0.75, "seed": 0, "heartbeat": 0.5, "mask_timeout": 30.0, "policy": "fail",
          **kw}
    return MaskClient(endpoint, rank=plan.rank, world_size=world, plan_hash=plan.hash, **kw)


def rows(path) -> list[dict]:
    return [json.loads(x) for x in open(path)]


def train_cfg(ds, out, masks, **kw) -> TrainConfig:
    kw = {"strategy": "sbam", "batch_size": 8, "epochs": 1, "threads": 1, "mask_policy": "fail",
          "mask_timeout": 60.0, "heartbeat": 0.5, "decoder": "pil", **kw}
    return TrainConfig(shards=str(ds), out=str(out), model=MODEL, masks=masks, **kw)


def wait_for(ok, seconds, what):
    deadline = time.monotonic() + seconds
    while not ok():
        assert time.monotonic() < deadline, f"not within {seconds}s: {what}"
        time.sleep(0.02)


# ---- 1. CURVE end to end ----
def test_curve_train_end_to_end_and_refused_logins_are_named(sample_ds, tmp_path):
    keys, other = create_keys(tmp_path / "keys", clients=2), create_keys(tmp_path / "other", clients=1)
    shutil.copy(keys / "server.key", other / "server.key")  # the right server, a key it does not list
    assert client_curve(keys, 3)[0].endswith("client1.key_secret")  # rank r: client{r % n}
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    log = tmp_path / "server.log"
    server = start_server(sample_ds, endpoint, log, world_size=1, batch_size=8,
                          extra=["--curve", keys, "--heartbeat", "0.5", "--keep-alive"])
    try:
        train(train_cfg(sample_ds, tmp_path / "ok", endpoint, curve=str(keys), max_steps=3))
        assert not any(r["fallback"] for r in rows(tmp_path / "ok" / "metrics.jsonl"))
        with pytest.raises(MaskServerError) as err:  # an unlisted key: at once, not after --mask-timeout
            train(train_cfg(sample_ds, tmp_path / "bad", endpoint, curve=str(other), max_steps=3))
        assert "authentication failed" in str(err.value) and endpoint in str(err.value)
        refused = zmq.auth.load_certificate(str(other / "private" / "client0.key_secret"))[0].decode()
        wait_for(lambda: refused in log.read_text(), 10, "the server logs the refused key")
        assert "CURVE login refused" in log.read_text()
        plan = plan_of(sample_ds)
        with client(endpoint, plan) as c:  # no CURVE at all: the trainer is told the server expects it
            with pytest.raises(MaskServerError, match="expects CURVE"):
                c.get(0, 0, plan.batch(0, 0).sample_ids)
    finally:
        kill(server)


# ---- 2. the handshake compares what makes masks ----
class _IdleLoader:
    def epoch(self, epoch, step=0):
        return iter(())

    def close(self):
        pass


@pytest.mark.parametrize("edit,words", [
    ({"strategy": "idm"}, ["strategy", "'idm'", "'sbam'"]),
    ({"model": "mae_vit_tiny_patch8_64"}, ["model", "mae_vit_tiny_patch8_64", MODEL]),
    ({"source": "momentum"}, ["source", "'momentum'", "'online'"]),
    ({"ratio": 0.6}, ["ratio", "0.6", "0.75"]),
    ({"lut": True}, ["lut", "True", "False"]),
    ({"targets": ["gpa_target"]}, ["gpa_target", "--mam", "sbam"]),
])
def test_core_hello_refuses_a_run_that_would_get_wrong_masks(edit, words):
    server = MaskServer(ServerConfig("sbam", model=MODEL), Teacher(MODEL, "online", strategy="sbam"),
                        lambda r: _IdleLoader(), "ab" * 8, 15, 0, 1)
    hello = {"rank": 0, "world_size": 1, "plan_hash": "ab" * 8, "cursor": [0, 0], "restart_id": "l1",
             "credits": 4, "strategy": "sbam", "model": MODEL, "source": "online", "ratio": 0.75,
             "lut": False, "targets": [], "epochs": 3}
    server.handle(b"ok", P.encode(P.HELLO, hello), 0.0)
    assert P.decode(server.outbox.get_nowait()[1]).type == P.WELCOME
    server.handle(b"x", P.encode(P.HELLO, {**hello, **edit, "restart_id": "l2"}), 0.0)
    msg = P.decode(server.outbox.get_nowait()[1])
    assert msg.type == P.ERROR and msg.fields["code"] == P.E_PLAN
    for w in words:
        assert w in msg.fields["message"], (w, msg.fields["message"])


def test_another_strategy_fails_at_once_and_a_rejected_upload_reaches_get(sample_ds, tmp_path):
    endpoint = f"ipc://{tmp_path}/ms"
    server = start_server(sample_ds, endpoint, tmp_path / "server.log", world_size=1, batch_size=8,
                          extra=["--heartbeat", "0.5", "--keep-alive"])
    try:
        with pytest.raises(MaskServerError) as err:
            train(train_cfg(sample_ds, tmp_path / "idm", endpoint, strategy="idm", max_steps=3))
        assert "'idm'" in str(err.value) and "'sbam'" in str(err.value)
        plan = plan_of(sample_ds)
        with client(endpoint, plan) as c:  # weights the teacher has no use for: get raises, not a log line
            c.send_weights({"not.a.teacher.weight": torch.zeros(3)}, version=1, step=1)
            with pytest.raises(MaskServerError, match="rejected our weights"):
                for s in range(plan.steps):
                    c.get(0, s, plan.batch(0, s).sample_ids)
    finally:
        kill(server)


# ---- 3. no server, SIGTERM while waiting, random while the server is dead ----
def test_a_trainer_that_never_reached_its_server_says_so(sample_ds, tmp_path):
    plan = plan_of(sample_ds)
    endpoint = f"ipc://{tmp_path}/nobody"
    with client(endpoint, plan, mask_timeout=2.0, heartbeat=0.2) as c:
        with pytest.raises(TimeoutError) as err:
            c.get(0, 0, plan.batch(0, 0).sample_ids)
    assert endpoint in str(err.value) and "is `mimpipe maskserver` running" in str(err.value)


def test_sigterm_stops_a_client_waiting_for_masks(sample_ds, tmp_path):
    out = tmp_path / "r0.jsonl"
    proc = start_client(f"ipc://{tmp_path}/nobody", sample_ds, out, rank=0, world_size=1, batch_size=8,
                        extra=["--policy", "wait", "--mask-timeout", "600", "--stop-on-term"])
    try:
        wait_for(lambda: "ready" in Path(f"{out}.log").read_text(), 60, "the client starts")
        time.sleep(1.0)  # inside get's wait
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 3, Path(f"{out}.log").read_text()[-2000:]
        print(f"SIGTERM -> exit while waiting: {time.monotonic() - t0:.2f}s")
        assert "interrupted" in json.loads(Path(f"{out}.stats").read_text())
    finally:
        kill(proc)


def test_random_falls_back_at_once_while_the_server_is_dead_and_returns(sample_ds, tmp_path):
    endpoint = f"ipc://{tmp_path}/ms"
    out = tmp_path / "r0.jsonl"
    server = start_server(sample_ds, endpoint, tmp_path / "s1.log", world_size=1, batch_size=4,
                          strategy="random", extra=["--heartbeat", "0.2"])
    proc = None
    try:  # 30 steps per epoch, 0.1 s each: the restarted server comes back well before the end;
        # a --mask-timeout that no per-batch wait could fit in the test's bounds
        proc = start_client(endpoint, sample_ds, out, rank=0, world_size=1, batch_size=4, epochs=10,
                            extra=["--policy", "random", "--mask-timeout", "300", "--heartbeat", "0.2",
                                   "--sleep", "0.1"])
        wait_for(lambda: len(read_lines(out)) >= 3, 60, "served masks")
        kill(server)
        t_kill, n = time.monotonic(), len(read_lines(out))
        wait_for(lambda: any(r["fallback"] for r in read_lines(out)[n:]), 60, "a random fallback")
        print(f"kill -9 -> first fallback: {time.monotonic() - t_kill:.2f}s")
        wait_for(lambda: sum(r["fallback"] for r in read_lines(out)) >= 5, 60, "fallbacks at once, one per step")
        server = start_server(sample_ds, endpoint, tmp_path / "s2.log", world_size=1, batch_size=4,
                              strategy="random", extra=["--heartbeat", "0.2"])
        assert proc.wait(120) == 0, Path(f"{out}.log").read_text()[-2000:]
        got = read_lines(out)
        assert [(r["epoch"], r["step"]) for r in got] == [divmod(i, 30) for i in range(300)]
        first = next(i for i, r in enumerate(got) if r["fallback"])
        assert not got[-1]["fallback"] and any(not r["fallback"] for r in got[first:])  # served again
        stats = json.loads(Path(f"{out}.stats").read_text())
        assert stats["recovered"] >= 1 and stats["fallback_down"] >= 5
    finally:
        kill(proc)
        kill(server)


# ---- 4. the server exits when the run is done ----
def test_server_exits_when_every_rank_finished_unless_kept_alive(sample_ds, tmp_path):
    endpoint = f"ipc://{tmp_path}/ms"
    log = tmp_path / "server.log"
    server = start_server(sample_ds, endpoint, log, world_size=1, batch_size=8, extra=["--heartbeat", "0.5"])
    try:
        train(train_cfg(sample_ds, tmp_path / "run", endpoint))
        assert server.wait(30) == 0
        assert "run finished: ranks [0] done" in log.read_text()
    finally:
        kill(server)
    endpoint = f"ipc://{tmp_path}/ms2"
    server = start_server(sample_ds, endpoint, tmp_path / "kept.log", world_size=1, batch_size=8,
                          extra=["--heartbeat", "0.5", "--keep-alive"])
    try:  # two runs one after the other: the second is served too
        for run in ("a", "b"):
            out = tmp_path / f"{run}.jsonl"
            c = start_client(endpoint, sample_ds, out, rank=0, world_size=1, batch_size=8, extra=["--announce"])
            assert c.wait(120) == 0, Path(f"{out}.log").read_text()[-2000:]
            assert len(read_lines(out)) == 15
        assert server.poll() is None
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
    finally:
        kill(server)


# ---- 5. failover between listed servers ----
def test_a_rank_moves_to_another_server_and_loses_no_batch(sample_ds, tmp_path):
    a, b = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    servers = [start_server(sample_ds, e, tmp_path / f"s{i}.log", world_size=1, batch_size=8,
                            extra=["--heartbeat", "0.2"]) for i, e in enumerate((a, b))]
    out = tmp_path / "run"
    proc = None
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mimpipe.tools.cli", "train", "--shards", str(sample_ds), "--out", str(out),
             "--model", MODEL, "--masks", f"{a},{b}", "--strategy", "sbam", "--batch-size", "8", "--epochs", "4",
             "--threads", "1", "--decoder", "pil", "--mask-policy", "fail", "--mask-timeout", "6",
             "--heartbeat", "0.2"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "train.log", "wb"))
        metrics = out / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and len(rows(metrics)) >= 2, 120, "the trainer runs on server a")
        kill(servers[0])  # for good
        assert proc.wait(300) == 0, (tmp_path / "train.log").read_text()[-3000:]
        got = rows(metrics)
        assert [r["it"] for r in got] == list(range(1, 61))
        assert sum(r["valid"] for r in got) == 4 * 120  # every sample of every epoch once (checksums checked)
        assert not any(r["fallback"] for r in got)
        assert f"moving to {b}" in (tmp_path / "train.log").read_text()
    finally:
        kill(proc)
        for s in servers:
            kill(s)


def test_a_server_that_does_not_serve_the_rank_sends_it_to_the_next_listed_one(sample_ds, tmp_path):
    a, b = (f"ipc://{tmp_path}/{n}" for n in "ab")
    servers = [start_server(sample_ds, e, tmp_path / f"s{n}.log", world_size=2, batch_size=4,
                            extra=["--heartbeat", "0.5", "--ranks", r]) for n, e, r in (("a", a, "1"), ("b", b, "0-1"))]
    out = tmp_path / "r0.jsonl"
    try:
        c = start_client(a, sample_ds, out, rank=0, world_size=2, batch_size=4, extra=["--others", b])
        assert c.wait(120) == 0, Path(f"{out}.log").read_text()[-2000:]
        got = read_lines(out)
        assert [r["step"] for r in got] == list(range(15)) and not any(r["fallback"] for r in got)
        assert f"moving to {b}" in Path(f"{out}.log").read_text()
    finally:
        for s in servers:
            kill(s)
