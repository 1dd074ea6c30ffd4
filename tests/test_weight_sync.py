"""Weight sync off the hot paths (maskserver/snapshot.py, the client's I/O thread, the server's
AssemblyThread), over real processes and sockets: the bf16 snapshot reaches the server's teacher, a
newer snapshot replaces one not yet sent, the trainer's thread returns before anything is hashed,
and the server's socket loop keeps answering while an upload is assembled. Order is asserted
through gates on our own hash and assembly functions, never through timings; every wait is bounded.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch
import zmq

from mimpipe.maskserver import snapshot as snapshot_mod
from mimpipe.maskserver.client import MaskClient
from mimpipe.maskserver.protocol import decode
from mimpipe.maskserver.serve import make_socket, serve
from mimpipe.maskserver.server import MaskServer, ServerConfig
from mimpipe.maskserver.snapshot import SnapshotPool
from mimpipe.maskserver.teacher import Teacher
from mimpipe.maskserver.weights import WeightAssembler
from mimpipe.pipeline.loader import Loader
from mimpipe.pipeline.manifest import load_manifest
from mimpipe.pipeline.plan import Plan, PlanConfig, batch_generator
from mimpipe.train.masks import ServerMasks
from mimpipe.train.model import create_model
from maskserver_helpers import L, MODEL, kill, start_server

WORLD, B = 2, 4
BF16_RTOL = 2 ** -8  # bf16 keeps 8 significant bits: rounding to nearest errs by at most 2^-8 relatively


def plans(ds):
    m = load_manifest(ds)
    return [Plan(m, PlanConfig(seed=0, batch_size=B, world_size=WORLD, img_size=64), r) for r in range(WORLD)]


def client(endpoint, plan, run_id, **kw):
    kw = {"num_patches": L, "ratio": 0.75, "seed": 0, "heartbeat": 0.5, "mask_timeout": 30.0, "policy": "fail",
          "run_id": run_id, "restart_id": run_id + "-1", **kw}
    return MaskClient(endpoint, rank=plan.rank, world_size=WORLD, plan_hash=plan.hash, **kw)


def sbam_state(seed: int = 7) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    prefixes = Teacher.state_for("sbam", MODEL)
    return {k: v.clone() for k, v in create_model(MODEL, encoder_only=True).state_dict().items()
            if k.startswith(prefixes)}


def wait_for(cond, what: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, f"still waiting for {what} after {seconds}s"
        time.sleep(0.005)


class Gate:
    """Wraps a function: every call records (label, thread name), and the first `hold` calls wait
    until `open()` (at most 60 s, so a test never hangs)."""

    def __init__(self, fn, label, hold: int = 1):
        self.fn, self.label, self.hold, self.calls = fn, label, hold, []
        self.entered, self._open = threading.Event(), threading.Event()

    def __call__(self, *a, **kw):
        self.calls.append((self.label(*a), threading.current_thread().name))
        if len(self.calls) <= self.hold:
            self.entered.set()
            self._open.wait(60)
        return self.fn(*a, **kw)

    def open(self):
        self._open.set()


@pytest.fixture(scope="module")
def server(sample_ds, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("weight_sync")
    endpoint = f"ipc://{tmp}/ms.sock"
    proc = start_server(sample_ds, endpoint, tmp / "server.log", extra=("--heartbeat", 0.5, "--max-ahead", 2))
    try:
        yield endpoint
    finally:
        kill(proc)


def test_a_snapshot_round_trips_in_bf16_and_is_taken_at_call_time():
    """Pure core: the wire carries bf16 (integers as they are) laid out as chunk 0 says, within bf16
    rounding of the fp32 source; a tensor changed after `take` does not change the snapshot."""
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(33, 7, generator=g), "b": torch.randn(5, generator=g) * 1e3,
             "n": torch.arange(3, dtype=torch.int64)}
    want = {k: v.clone() for k, v in state.items()}
    snap = SnapshotPool(torch.bfloat16).take(state, version=4, step=40)
    state["w"].add_(1.0)  # the trainer's next step
    assert snap.ready() and snap.sha256 is None and snap.claim()
    asm = WeightAssembler()
    got = [asm.add(decode(f)) for f in snap.chunks(chunk_bytes=128)][-1]
    assert got is not None and (got.version, got.step) == (4, 40)
    assert snap.payload_bytes == 512 + 64 + 24  # 231 and 5 bf16 (2 bytes), 3 int64, at 64-byte offsets
    for k, v in want.items():
        t = got.state[k]
        assert t.dtype == (torch.bfloat16 if v.is_floating_point() else v.dtype), k
        assert torch.equal(t, v.to(t.dtype)), k
        err = ((t.double() - v.double()).abs() / v.double().abs().clamp_min(1e-30)).max().item()
        assert err <= BF16_RTOL, f"{k}: relative error {err:.2e} > {BF16_RTOL:.2e}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA path (pinned memory, side stream) needs a GPU")
def test_the_cuda_snapshot_is_in_stream_order_and_read_after_its_event():
    """The fill runs on the main stream after the step that wrote the weights and before the next
    one; the copy to pinned memory on a side stream; the bytes are read only after its event."""
    dev = torch.device("cuda")
    state = {"w": torch.randn(1024, 1024, device=dev), "b": torch.randn(7, device=dev)}
    want = {k: v.clone() for k, v in state.items()}
    pool = SnapshotPool(torch.bfloat16)
    snap = pool.take(state, version=1, step=1)
    state["w"].mul_(3.0)  # queued behind the fill on the same stream
    wait_for(snap.ready, "the device-to-host copy's event")
    assert snap.claim()
    got = [WeightAssembler().add(decode(f)) for f in snap.chunks()][-1]
    for k, v in want.items():
        assert torch.equal(got.state[k], v.cpu().to(torch.bfloat16)), k


def test_the_snapshot_reaches_the_servers_teacher_in_bf16(sample_ds, server):
    """Masks the server makes after a bf16 snapshot (SnapshotPool -> I/O thread -> AssemblyThread ->
    Teacher.load_state, cast to its fp32) equal those of a teacher here loaded with the same bf16
    weights; the fp32 source differs from them by bf16 rounding only."""
    plan = plans(sample_ds)[0]
    state = sbam_state()
    pool = SnapshotPool(torch.bfloat16)
    c = client(server, plan, "run-roundtrip", credits=2)
    got = {}
    try:
        assert c.get(0, 0, plan.batch(0, 0).sample_ids).teacher_version == -1
        snap = pool.take(state, version=5, step=5)
        c.send_snapshot(snap)
        for s in range(1, plan.steps):
            got[s] = c.get(0, s, plan.batch(0, s).sample_ids)
            if got[s].teacher_version == 5:
                break
    finally:
        c.close()
    assert snap.payload_bytes < sum(t.numel() * 4 for t in state.values())  # bf16 on the wire, not fp32
    step = max(got)
    assert got[step].teacher_version == 5, [m.teacher_version for m in got.values()]
    teacher = Teacher(MODEL, "online", strategy="sbam")
    bf16 = {k: v.to(torch.bfloat16) for k, v in state.items()}
    assert teacher.load_state(bf16, 5, 5)
    for k, v in state.items():
        own = teacher.encoder.state_dict()[k]
        assert torch.allclose(own, v, rtol=BF16_RTOL, atol=0), f"{k}: max diff {(own - v).abs().max():.2e}"
    loader = Loader(load_manifest(sample_ds), plan.cfg, 0, decoder="dali", threads=1)
    try:
        for batch in loader.epoch(0, step):
            want = teacher.compute(batch.images, "sbam", ratio=0.75, generator=batch_generator(0, 0, batch.step, 0))
            assert torch.equal(got[step].mask, want.mask), f"step {batch.step}"
            break
    finally:
        loader.close()


def test_a_newer_snapshot_replaces_one_not_yet_sent(sample_ds, server, monkeypatch):
    """v1 is being hashed on the I/O thread (held at the gate) while v2 and then v3 arrive: v2 never
    leaves the client (its buffer went to v3), v3 follows v1, and the server ends at v3."""
    plan = plans(sample_ds)[0]
    gate = Gate(snapshot_mod.sha256_hex, lambda buf: len(buf))
    monkeypatch.setattr(snapshot_mod, "sha256_hex", gate)
    pool = SnapshotPool(torch.bfloat16)
    state = sbam_state()
    c = client(server, plan, "run-supersede", credits=1)
    try:
        assert c.get(0, 0, plan.batch(0, 0).sample_ids).teacher_version == -1
        snaps = {1: pool.take(state, version=1, step=1)}
        c.send_snapshot(snaps[1])
        assert gate.entered.wait(60), "the I/O thread never hashed v1"
        for v in (2, 3):
            snaps[v] = pool.take(state, version=v, step=v)
            c.send_snapshot(snaps[v])
        assert snaps[2].sha256 is None and not snaps[2].claim()  # its buffer is v3's now
        gate.open()
        wait_for(lambda: c.stats["weights_sent"] == 2, "v3 sent")
        assert c.stats["weights_superseded"] == 1 and len(gate.calls) == 2, (c.stats, gate.calls)
        assert snaps[2].sha256 is None and snaps[1].sha256 and snaps[3].sha256
        versions = [c.get(0, s, plan.batch(0, s).sample_ids).teacher_version for s in range(1, plan.steps)]
        assert 2 not in versions and versions[-1] == 3, versions
    finally:
        c.close()


def test_the_trainer_thread_returns_before_the_snapshot_is_hashed(sample_ds, server, monkeypatch):
    """ServerMasks.sync (the trainer's call) hands the snapshot over unhashed; the hash is the I/O
    thread's. With the hash held at a gate, sync still returns."""
    plan = plans(sample_ds)[0]
    gate = Gate(snapshot_mod.sha256_hex, lambda buf: "hash")
    monkeypatch.setattr(snapshot_mod, "sha256_hex", gate)
    masks = ServerMasks(server, strategy="sbam", model=MODEL, source=None, rank=0, world_size=WORLD,
                        plan_hash=plan.hash, cursor=(0, 0), num_patches=L, ratio=0.75, seed=0, credits=1,
                        mask_timeout=30.0, policy="fail", heartbeat=0.5, run_id="run-main-thread",
                        restart_id="run-main-thread-1")
    student = create_model(MODEL)
    try:
        snap = masks.sync(3, student, student)
        assert snap is not None and snap.sha256 is None, "sync hashed the snapshot itself"
        gate.open()
        wait_for(lambda: masks.client.stats["weights_sent"] == 1, "the snapshot sent")
        assert len(gate.calls) == 1 and gate.calls[0][1].startswith("mimpipe-maskclient"), gate.calls  # its I/O thread
        assert snap.sha256 is not None and snap.payload_bytes < sum(
            v.numel() * 4 for k, v in student.state_dict().items() if k.startswith(masks.prefixes))
    finally:
        masks.close()


def test_the_socket_loop_answers_credits_while_an_upload_is_assembled(sample_ds, tmp_path, monkeypatch):
    """The serve loop (real ROUTER, its own thread here so the assembly can be held at a gate) sends
    MASKS against new credits while every chunk of an upload is in and its hash is still pending:
    the assembly is not on the socket thread. Released, the upload applies."""
    plan = plans(sample_ds)[0]
    gate = Gate(WeightAssembler._finish, lambda self: "finish")
    monkeypatch.setattr(WeightAssembler, "_finish", lambda self: gate(self))
    manifest = load_manifest(sample_ds)
    teacher = Teacher(MODEL, "momentum", projector_hidden=None)
    srv = MaskServer(ServerConfig("idm", ranks=(0, 1), max_ahead=2, heartbeat=0.5), teacher,
                     lambda r: Loader(manifest, plan.cfg, r, decoder="pil", threads=1, device="cpu"),
                     plan.hash, plan.steps, 0, WORLD)
    ctx, stop = zmq.Context(), threading.Event()
    sock, _ = make_socket(ctx, f"ipc://{tmp_path}/s.sock", None, srv.frame_limit)
    loop = threading.Thread(target=serve, args=(srv, sock, stop), daemon=True)
    loop.start()
    c = client(f"ipc://{tmp_path}/s.sock", plan, "run-loop", credits=1)
    try:
        assert c.get(0, 0, plan.batch(0, 0).sample_ids).teacher_version == -1
        state = {k: v.clone() for k, v in create_model(MODEL, encoder_only=True).state_dict().items()}
        c.send_weights(state, version=1, step=1)
        assert gate.entered.wait(60), "the upload never completed its chunks"
        sent = srv.counts["batches"]
        for s in range(1, 5):  # each needs a CREDIT handled and a MASKS sent by the socket loop
            assert c.get(0, s, plan.batch(0, s).sample_ids).teacher_version == -1
        assert srv.counts["batches"] >= sent + 3 and srv.pending is None and gate.calls[0][1] == "mimpipe-weights"
        gate.open()
        wait_for(lambda: srv.pending is not None or teacher.version == 1, "the upload applied")
    finally:
        c.close()
        stop.set()
        loop.join(10)
        for r in list(srv.ranks):
            srv.free(r, "test done")
        for w in srv.workers:
            w.join(10)
        sock.close(linger=0)
        ctx.term()
