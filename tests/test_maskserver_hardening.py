"""The mask server and MaskClient under failures and hostile peers, over real processes and sockets.

Each test is the attack or failure that once went unnoticed (a dead worker, a mistyped endpoint,
another run's weights, an impostor, oversized messages, absurd feedback, loose keys, bad flags) and
what the system does now. Tiny model (micro, L = 64, 2 heads), batches of 4, two ranks: 15 steps
per epoch. Every test bounds its time and kills what it started.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

from mimpipe.maskserver import protocol as P
from mimpipe.maskserver.client import MaskClient, MaskServerError
from mimpipe.maskserver.server import MaskServer, ServerConfig
from mimpipe.maskserver.serve import make_socket, rank_list, serve
from mimpipe.maskserver.teacher import Teacher
from mimpipe.pipeline.manifest import load_manifest
from mimpipe.pipeline.plan import Plan
from mimpipe.train.model import create_model, model_config
from maskserver_helpers import (B, L, LAUNCH, MODEL, ROOT, RUN, WORLD, client, free_port, kill, plans,
                                read_lines, start_client, start_server)

HEADS = model_config(MODEL).num_heads


def get_within(c, plan, epoch, step, seconds=120.0):
    """c.get in a thread: (batch, None) or (None, exception); a get still waiting after `seconds`
    fails the test (it would have waited forever)."""
    out = []

    def run():
        try:
            out.append((c.get(epoch, step, plan.batch(epoch, step).sample_ids), None))
        except Exception as e:  # noqa: BLE001
            out.append((None, e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert out, f"rank {plan.rank}: get({epoch}, {step}) still waiting after {seconds}s"
    return out[0]


def raw_hello(endpoint, plan, *, run_id, restart_id, rank=None, curve=None):
    """A bare DEALER that sends one HELLO and returns (socket, the first reply)."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if curve:
        from mimpipe.maskserver.keys import load_secret
        s.curve_publickey, s.curve_secretkey = load_secret(curve[0])
        s.curve_serverkey = zmq.auth.load_certificate(curve[1])[0]
    s.connect(endpoint)
    s.send_multipart(P.encode(P.HELLO, {"rank": plan.rank if rank is None else rank, "world_size": WORLD,
                                        "plan_hash": plan.hash, "cursor": [0, 0], "restart_id": restart_id,
                                        "credits": 1, "run_id": run_id}))
    assert s.poll(20000), "no reply to a HELLO"
    return s, P.decode(s.recv_multipart())


def status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes."""
    rows = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(rows[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def stats(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def wait_stats(path, ok, seconds=20.0) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        st = stats(path)
        if st and ok(st):
            return st
        time.sleep(0.2)
    return stats(path)


def sbam_state():
    prefixes = Teacher.state_for("sbam", MODEL)
    return {k: v.clone() for k, v in create_model(MODEL, encoder_only=True).state_dict().items()
            if k.startswith(prefixes)}


@pytest.fixture(scope="module")
def server(sample_ds, tmp_path_factory):
    """One server for the tests that do not kill it; served ranks given as a range (the README's
    `--ranks 0-7` form)."""
    tmp = tmp_path_factory.mktemp("hardening")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start_server(sample_ds, endpoint, tmp / "server.log",
                        extra=("--heartbeat", 0.5, "--stats-every", 0.3, "--stats-file", tmp / "stats.json",
                               "--ranks", "0-1"))
    try:
        assert "ranks [0, 1]" in (tmp / "server.log").read_text()
        yield types.SimpleNamespace(endpoint=endpoint, proc=proc, log=tmp / "server.log", stats=tmp / "stats.json")
    finally:
        kill(proc)


# ---- 1. a rank worker that fails ----
def _damage(ds, copy: Path, plan: Plan, epoch: int, step: int) -> str:
    """A copy of the dataset whose first sample of batch (epoch, step) has zeroed JPEG bytes (same
    size: the manifest still loads). Returns that sample's key."""
    shutil.copytree(ds, copy)
    m = load_manifest(copy)
    sid = int(plan.batch(epoch, step).sample_ids[0])
    row = m.table[sid]
    with open(m.shard_path(int(row["shard"])), "r+b") as f:
        f.seek(int(row["offset"]))
        f.write(b"\0" * int(row["size"]))
    return m.key(sid)


def test_damaged_shard_of_the_server_reaches_the_trainer(sample_ds, tmp_path):
    """The server's own copy of a shard is damaged: its worker for rank 0 fails at batch 3. Once it
    waited forever (policy wait). Now the client restarts the worker with a HELLO, and when it
    fails again at the same batch, get raises naming the sample; the batches before it arrive."""
    plan = plans(sample_ds)[0]
    key = _damage(sample_ds, tmp_path / "copy", plan, 0, 3)
    endpoint = f"ipc://{tmp_path}/ms.sock"
    srv = c = None
    try:
        srv = start_server(tmp_path / "copy", endpoint, tmp_path / "server.log", extra=("--heartbeat", 0.5))
        c = client(endpoint, plan, policy="wait", mask_timeout=2.0, credits=1)
        for s in range(3):
            mb, err = get_within(c, plan, 0, s)
            assert err is None and not mb.fallback, err
        mb, err = get_within(c, plan, 0, 3)
        assert isinstance(err, MaskServerError), (mb, err)
        assert "rank 0" in str(err) and "worker" in str(err) and key in str(err), err
        # the client's HELLO restarted the worker at least once before the repeat at batch 3 was final
        assert (tmp_path / "server.log").read_text().count("rank 0: mask worker failed") >= 2
    finally:
        if c:
            c.close()
        kill(srv)


class _FlakyLoader:
    """A loader whose first epoch() fails (a transient fault), then yields plain batches."""
    calls = 0

    def epoch(self, epoch, start):
        _FlakyLoader.calls += 1
        if _FlakyLoader.calls == 1:
            raise OSError("transient read error")
        for s in range(start, 15):
            yield types.SimpleNamespace(images=torch.zeros(B, 3, 64, 64), sample_ids=torch.arange(B) + s * B,
                                        epoch=epoch, step=s, view2=None)

    def close(self):
        pass


def test_failed_worker_is_restarted_by_the_clients_hello(tmp_path):
    """A transient failure is recovered from: ERROR WORKER, the client's HELLO starts the worker
    again, every batch arrives (real ROUTER/DEALER sockets, the core's serve loop in a thread)."""
    teacher = Teacher(MODEL, "momentum", projector_hidden=None)
    srv = MaskServer(ServerConfig("random", ranks=(0,), heartbeat=0.3), teacher, lambda r: _FlakyLoader(),
                     "ab" * 16, 15, 0, 1)
    ctx = zmq.Context()
    endpoint = f"ipc://{tmp_path}/core.sock"
    sock, _ = make_socket(ctx, endpoint, None, srv.frame_limit)
    stop = threading.Event()
    loop = threading.Thread(target=serve, args=(srv, sock, stop), kwargs={"stats_every": 1e9}, daemon=True)
    loop.start()
    c = MaskClient(endpoint, rank=0, world_size=1, plan_hash="ab" * 16, num_patches=L, heartbeat=0.3,
                   policy="wait", mask_timeout=5.0)
    try:
        for s in range(15):
            assert c.get(0, s, np.arange(B) + s * B).mask.shape == (B, L)
        assert srv.counts["worker_failures"] == 1 and c.stats["errors"] >= 1
    finally:
        c.close()
        stop.set()
        loop.join(10)
        for w in srv.workers:
            w.join(5)
        sock.close(0)
        ctx.term()


# ---- 2. whatever ends the client's I/O thread reaches get ----
def test_mistyped_endpoint_or_key_reaches_get(sample_ds, tmp_path):
    from mimpipe.train.masks import ServerMasks
    plan = plans(sample_ds)[0]
    c = client("tcp://127.0.0.1:notaport", plan, policy="wait")
    try:
        _, err = get_within(c, plan, 0, 0, 30)
        assert isinstance(err, MaskServerError) and "tcp://127.0.0.1:notaport" in str(err), err
    finally:
        c.close()
    sm = ServerMasks("tcp://127.0.0.1:notaport", strategy="sbam", model=MODEL, source=None, rank=0, world_size=1,
                     plan_hash=plan.hash, cursor=(0, 0), num_patches=L, ratio=0.75, seed=0, credits=2,
                     mask_timeout=1.0, policy="wait", heartbeat=0.5)
    try:
        batch = types.SimpleNamespace(epoch=0, step=0, sample_ids=torch.as_tensor(plan.batch(0, 0).sample_ids))
        with pytest.raises(MaskServerError, match="notaport"):
            sm.get(batch)
    finally:
        sm.close()
    missing = tmp_path / "nokey.key_secret"
    c = client(f"ipc://{tmp_path}/x.sock", plan, policy="wait", curve=(str(missing), str(missing)))
    try:
        _, err = get_within(c, plan, 0, 0, 30)
        assert isinstance(err, MaskServerError) and str(missing) in str(err), err
    finally:
        c.close()


# ---- 3. weights belong to a run and a launch ----
def _versions_until(c, plan, start, want, steps=15):
    """Versions of the batches from `start` on, until one carries `want` (or the epoch ends)."""
    seen = []
    for s in range(start, steps):
        mb, err = get_within(c, plan, 0, s)
        assert err is None, err
        seen.append(mb.teacher_version)
        if mb.teacher_version == want:
            break
    return seen


def test_a_run_is_masked_only_with_weights_it_sent(sample_ds, server):
    """A second run once trained on the first run's weights (its own uploads, of lower versions,
    ignored), and a resumed launch on the killed launch's. Now the teacher starts over (version
    -1: random masks, stated as such) for each new run and launch, and their uploads count."""
    plan = plans(sample_ds)[0]
    state = sbam_state()
    a = client(server.endpoint, plan, run_id="run-a", restart_id="a1", credits=1)
    try:
        assert get_within(a, plan, 0, 0)[0].teacher_version == -1
        a.send_weights(state, version=9, step=9)
        assert _versions_until(a, plan, 1, 9)[-1] == 9
    finally:
        a.close()  # BYE: its rank is freed
    b = client(server.endpoint, plan, run_id="run-b", restart_id="b1", credits=1)
    b2 = None
    try:
        assert get_within(b, plan, 0, 0)[0].teacher_version == -1  # not run a's v9
        b.send_weights(state, version=1, step=1)
        seen = _versions_until(b, plan, 1, 1)
        assert set(seen) <= {-1, 1} and seen[-1] == 1, seen
        # run b restarts (--resume at step 5) while its killed launch still holds the rank
        b2 = client(server.endpoint, plan, run_id="run-b", restart_id="b2", cursor=(0, 5), credits=1)
        assert get_within(b2, plan, 0, 5)[0].teacher_version == -1  # not the killed launch's v1
        # one hostile upload (version 2^62, a name the teacher lacks) must not freeze the teacher,
        # and its sender is told (MaskClient.get raises each rejection once). Each waits for the
        # server's verdict: the client keeps one snapshot waiting, so a quicker next one replaces it.
        for bad in ({"bogus": torch.zeros(3)}, 2**62), ({**state, "bogus": torch.zeros(3)}, 7):
            before = wait_stats(server.stats, lambda st: True)["rejected"]
            b2.send_weights(bad[0], version=bad[1], step=6)
            assert wait_stats(server.stats, lambda st: st["rejected"] > before)["rejected"] > before
        b2.send_weights(state, version=6, step=6)
        seen, rejected = [], []
        for s in range(6, 15):
            mb, err = get_within(b2, plan, 0, s)
            while isinstance(err, MaskServerError) and "rejected our weights" in str(err):
                rejected.append(str(err))
                mb, err = get_within(b2, plan, 0, s)
            assert err is None, err
            seen.append(mb.teacher_version)
            if mb.teacher_version == 6:
                break
        assert set(seen) <= {-1, 6} and seen[-1] == 6, seen
        assert rejected and all("weights" in r for r in rejected), rejected
        _, err = get_within(b, plan, 0, 14, 30)  # the replaced launch is told so
        assert isinstance(err, MaskServerError) and "REPLACED" in str(err), err
    finally:
        for c in (b, b2):
            if c:
                c.close()


# ---- 7. feedback within the plan and the teacher ----
def test_feedback_outside_the_plan_or_the_teacher_is_refused(sample_ds, server):
    """One FEEDBACK for epoch 2^62 with 4096 heads once made the server ignore all later feedback,
    and future epochs grew its de-duplication set without bound."""
    plan = plans(sample_ds)[0]
    c = client(server.endpoint, plan)
    try:
        for s in range(3):
            assert get_within(c, plan, 0, s)[1] is None
        before = wait_stats(server.stats, lambda st: "0" in st["ranks"])
        c.send_feedback(2**62, 0, np.ones(HEADS), np.ones(HEADS))
        c.send_feedback(0, 0, np.ones(4096), np.ones(4096))
        for e in range(1, 200):  # batches the server never sent
            c.send_feedback(e, 0, np.ones(HEADS), np.ones(HEADS))
        c.send_feedback(0, 0, np.ones(HEADS), np.ones(HEADS))
        c.send_feedback(0, 1, np.ones(HEADS), np.ones(HEADS))
        st = wait_stats(server.stats, lambda st: st["feedback"] >= before["feedback"] + 2
                        and st["rejected"] >= before["rejected"] + 201)
        assert st["feedback"] == before["feedback"] + 2 and st["plb_epoch"] == 0, st
        assert st["rejected"] >= before["rejected"] + 201 and st["feedback_pending"] == 2, st
    finally:
        c.close()


# ---- 9. a live rank stays with its run ----
def test_impostor_refused_and_a_restarted_trainer_takes_its_rank_back(sample_ds, tmp_path):
    """Any local process with the banner's plan hash once took rank 0 from its trainer. Now a HELLO
    of another run is refused (ERROR BUSY, logged) while the rank is live; a trainer killed with
    -9 and restarted (same run, new launch) takes the rank back at once and loses nothing; the
    killed launch, should it speak again, is told REPLACED."""
    plan = plans(sample_ds)[0]
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    srv = first = second = impostor = None
    try:
        # heartbeat 3 s: a silent rank is freed after 9 s, far later than the restart below
        srv = start_server(sample_ds, endpoint, tmp_path / "server.log", extra=("--heartbeat", 3))
        slow = ("--heartbeat", 3, "--sleep", 0.25)  # a trainer step; heartbeats as the server's
        first = start_client(endpoint, sample_ds, tmp_path / "first.jsonl", rank=0, epochs=2, extra=slow)
        deadline = time.monotonic() + 60
        while len(read_lines(tmp_path / "first.jsonl")) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        sock, reply = raw_hello(endpoint, plan, run_id="evil", restart_id="evil-1")
        sock.close(0)
        assert reply.type == P.ERROR and reply.fields["code"] == P.E_BUSY, reply
        impostor = client(endpoint, plan, run_id="evil", restart_id="evil-2", mask_timeout=3.0)
        _, err = get_within(impostor, plan, 0, 0, 30)
        assert isinstance(err, TimeoutError) and impostor.stats["received"] == 0, err
        first.kill()
        first.wait(10)
        got = read_lines(tmp_path / "first.jsonl")
        n = len(got)
        t_kill = time.monotonic()
        second = start_client(endpoint, sample_ds, tmp_path / "second.jsonl", rank=0, epochs=2,
                              extra=("--restart-id", "launch-2", "--start", str(n), *slow))
        assert second.wait(120) == 0, (tmp_path / "second.jsonl.log").read_text()
        log = (tmp_path / "server.log").read_text()
        assert "rank 0: restarted trainer" in log and "HELLO refused" in log
        assert "rank 0: silent" not in log.split("rank 0: restarted trainer")[0], "taken over only once freed"
        got += read_lines(tmp_path / "second.jsonl")
        assert [(g["epoch"], g["step"]) for g in got] == [(e, s) for e in range(2) for s in range(plan.steps)]
        assert all(g["checksum"] == P.checksum(plan.batch(g["epoch"], g["step"]).sample_ids) for g in got)
        assert not any(g["fallback"] for g in got) and time.monotonic() - t_kill < 120
        sock, reply = raw_hello(endpoint, plan, run_id=RUN, restart_id=LAUNCH)  # the killed launch
        sock.close(0)
        assert reply.type == P.ERROR and reply.fields["code"] == P.E_REPLACED, reply
    finally:
        if impostor:
            impostor.close()
        kill(first)
        kill(second)
        kill(srv)


def test_curve_keys_are_bound_to_live_ranks_and_secrets_must_be_private(sample_ds, tmp_path):
    """Under CURVE, listed key client1 once took rank 0 from client0. A world-readable secret key
    was used without a word."""
    keys = tmp_path / "keys"
    done = subprocess.run([sys.executable, "-m", "mimpipe.tools.cli", "keys", str(keys), "--clients", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    plan0, plan1 = plans(sample_ds)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    secret = keys / "private" / "server.key_secret"
    os.chmod(secret, 0o644)
    with pytest.raises(RuntimeError, match="did not start") as e:
        start_server(sample_ds, endpoint, tmp_path / "loose.log", extra=("--curve", keys))
    assert f"mimpipe maskserver: error: {secret}: secret key is readable by group/others" in str(e.value)
    assert "Traceback" not in str(e.value)
    os.chmod(secret, 0o600)

    def key(i):
        return str(keys / f"private/client{i}.key_secret"), str(keys / "server.key")

    srv = c0 = c1 = c1r = loose = None
    try:
        srv = start_server(sample_ds, endpoint, tmp_path / "server.log", extra=("--curve", keys))
        c0 = client(endpoint, plan0, curve=key(0))
        assert get_within(c0, plan0, 0, 0)[1] is None
        sock, reply = raw_hello(endpoint, plan0, run_id=RUN, restart_id="other", curve=key(1))
        sock.close(0)
        assert reply.type == P.ERROR and reply.fields["code"] == P.E_BUSY and "CURVE key" in reply.fields["message"]
        c1 = client(endpoint, plan0, curve=key(1), mask_timeout=3.0)  # the same run id, another key
        assert isinstance(get_within(c1, plan0, 0, 0, 30)[1], TimeoutError) and c1.stats["received"] == 0
        for s in range(1, 4):
            assert get_within(c0, plan0, 0, s)[1] is None  # rank 0 stays with client0
        c1r = client(endpoint, plan1, curve=key(1))  # client1 on its own rank: served
        assert get_within(c1r, plan1, 0, 0)[1] is None
        os.chmod(keys / "private/client0.key_secret", 0o640)
        loose = client(endpoint, plan1, curve=key(0), policy="wait")
        _, err = get_within(loose, plan1, 0, 0, 30)
        assert isinstance(err, MaskServerError) and "readable by group/others" in str(err), err
    finally:
        for c in (c0, c1, c1r, loose):
            if c:
                c.close()
        kill(srv)


# ---- 6. every peer-driven allocation bounded by the teacher ----
def test_server_memory_stays_bounded_under_oversized_messages(sample_ds, server):
    """One message of 20 x 48 MiB frames once cost the server 960 MB (libzmq holds a multipart
    message whole before the serve loop counts its frames), and a WEIGHTS upload declaring 16 GiB
    for a 66 KB teacher was buffered chunk by chunk. Now ZMQ_MAXMSGSIZE is what the teacher implies
    (a bigger frame disconnects its sender unread) and an upload larger than the teacher is refused
    at its first chunk: the server's peak RSS stays near its baseline."""
    plan0, plan1 = plans(sample_ds)
    c = client(server.endpoint, plan0)
    try:
        for s in range(3):
            assert get_within(c, plan0, 0, s)[1] is None
        time.sleep(1.0)
        base = status(server.proc.pid)
        ctx = zmq.Context.instance()
        big = ctx.socket(zmq.DEALER)
        big.setsockopt(zmq.LINGER, 0)
        big.connect(server.endpoint)
        frame = np.zeros(48 << 20, np.uint8)
        big.send_multipart([memoryview(frame)] * 20, copy=False)
        # a registered rank of the run uploads 256 MiB in 128 KiB chunks, declaring 16 GiB
        sock, reply = raw_hello(server.endpoint, plan1, run_id=RUN, restart_id=LAUNCH)
        assert reply.type == P.WELCOME, reply
        chunk = np.zeros(128 << 10, np.uint8)
        fields = {"version": 1, "step": 1, "n_chunks": (16 << 30) // len(chunk), "chunk_bytes": len(chunk),
                  "total_bytes": 16 << 30, "sha256": "0" * 64}
        for i in range(1, 2049):
            sock.send_multipart(P.encode(P.WEIGHTS, {**fields, "chunk": i}, {"data": chunk}), copy=False)
            if i % 256 == 0:
                time.sleep(0.2)  # the attacker keeps within the server's receive queue
        time.sleep(3.0)
        for s in range(3, 6):  # the server still serves
            assert get_within(c, plan0, 0, s)[1] is None
        after = status(server.proc.pid)
        sock.send_multipart(P.encode(P.BYE, {}))
        sock.close(0)
        big.close(0)
        grew = after["VmHWM"] - base["VmHWM"]
        assert grew < 150 << 20, f"server peak RSS grew {grew >> 20} MiB (baseline {base['VmRSS'] >> 20} MiB)"
    finally:
        c.close()


# ---- 10, 13. key folders and flags ----
def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "mimpipe.tools.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_keys_refuses_an_existing_folder_unless_forced(tmp_path):
    keys = tmp_path / "keys"
    assert _cli("keys", keys, "--clients", 3).returncode == 0
    before = (keys / "server.key").read_bytes()
    done = _cli("keys", keys)
    assert done.returncode == 2 and "already holds keys" in done.stderr and "--force" in done.stderr
    assert (keys / "server.key").read_bytes() == before and len(done.stderr.strip().splitlines()) == 1
    assert _cli("keys", keys, "--clients", 1, "--force").returncode == 0
    assert (keys / "server.key").read_bytes() != before
    assert sorted(p.name for p in (keys / "clients").iterdir()) == ["client0.key"]  # no stale key admitted
    assert (keys / "private" / "client0.key_secret").stat().st_mode & 0o077 == 0
    done = _cli("keys", tmp_path / "k2", "--clients", -1)
    assert done.returncode == 2 and "--clients" in done.stderr and ">= 1" in done.stderr


@pytest.mark.parametrize("flag,value,words", [
    ("--ratio", "-0.5", [">= 0", "< 1"]), ("--heartbeat", "0", ["> 0"]), ("--max-ahead", "0", [">= 1"]),
    ("--ranks", "3-1", ["lo <= hi"]), ("--ranks", "a", ["not a rank"]),
])
def test_maskserver_refuses_out_of_range_flags(sample_ds, flag, value, words):
    done = _cli("maskserver", "--shards", sample_ds, "--strategy", "sbam", "--model", MODEL, flag, value)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"argument {flag}" in done.stderr and all(w in done.stderr for w in words), done.stderr


def test_maskserver_bind_errors_are_one_line(sample_ds, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for bind, why in ((f"tcp://127.0.0.1:{port}", "Address already in use"), ("tcp://nowhere:x", ""),
                          ("bogus", "")):
            done = _cli("maskserver", "--shards", sample_ds, "--strategy", "sbam", "--model", MODEL,
                        "--world-size", 2, "--batch-size", 4, "--bind", bind)
            last = done.stderr.strip().splitlines()[-1]
            assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
            assert last.startswith(f"mimpipe maskserver: error: --bind {bind}: ") and why in last, last


def test_rank_list_and_config_bounds():
    assert rank_list("0-7") == tuple(range(8)) and rank_list("0-3,6") == (0, 1, 2, 3, 6)
    assert rank_list("2, 0-1,2") == (2, 0, 1)
    with pytest.raises(ValueError, match="max_ahead 0"):
        ServerConfig("sbam", max_ahead=0)  # queue.Queue(0) is unbounded
