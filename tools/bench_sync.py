"""sync: one teacher weight sync: the trainer's main-thread block, the payload, the server's socket loop.

ours: `SnapshotPool.take` (a fill of one preallocated bf16 buffer on the weights' device; on CUDA an
asynchronous copy to pinned memory) and `MaskClient.send_snapshot`; the client's I/O thread hashes,
chunks and sends, the server's AssemblyThread copies the chunks into place and hashes them.
baseline (kept here, as it was): `weight_chunks` on the trainer's thread (every tensor `.cpu()`,
one fp32 buffer, sha256, every chunk encoded) queued to the I/O thread, and the server assembling
each chunk inside `MaskServer.handle`, on its socket thread.

Both run against a real server process (multiprocessing 'spawn'; `serve` on a ROUTER over tcp
loopback, a momentum teacher of --model, ranks without data so only weights move). Its socket
loop is instrumented (a MaskServer subclass here): a turn's busy time runs from the first message
it handles to the end of its sends, i.e. how long the loop did not poll; the figure is the longest
turn from an upload's first chunk to the turn after it is assembled. main_thread_ms: the median
over --syncs syncs (after one warm-up) of the time the call blocked the calling thread (host time:
that is what every other rank waits for at the all-reduce); on CUDA also the fill + copy on the
device, timed with CUDA events."""
from __future__ import annotations

import multiprocessing as mp
import queue
import socket
import statistics
import threading
import time

import torch

from mimpipe.maskserver.weights import weight_chunks

PLAN_HASH, STEPS = "ab" * 16, 1 << 40  # one bench rank; its position never bounds an upload's version
# a baseline turn once blocked > 3 s (3 heartbeats at the default 1 s) on this loaded machine: the
# server then freed the uploading rank mid-upload and the upload never completed. Both paths use 10 s.
HEARTBEAT = 10.0


def add_arguments(p) -> None:
    p.add_argument("--model", default="mae_vit_base_patch16", help="encoder whose EMA is synced")
    p.add_argument("--syncs", type=int, default=3, help="timed syncs per path, after one warm-up (default 3)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where the trainer's weights live (auto: cuda if available)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds one upload may take (default 120)")
    p.add_argument("--threads", type=int, default=1, choices=(1, 2),
                   help="torch threads of the trainer side (default 1: on the shared 2 cores waking a second "
                   "intra-op thread costs ~10 ms per copy; the baseline's copies are numpy's, single-threaded)")


# ---- the server process ----
class _IdleLoader:
    """A rank without data: its worker makes no batches, so the socket loop only moves weights."""

    def epoch(self, epoch, start):
        time.sleep(0.05)
        yield from ()

    def close(self):
        pass


def _probe_class():
    from mimpipe.maskserver import protocol as P
    from mimpipe.maskserver.server import MaskServer

    class Probe(MaskServer):
        """MaskServer with the socket loop's turns timed; `inline` assembles on the socket thread
        (the baseline's `_weights`)."""

        def __init__(self, *a, inline: bool, out, **kw):
            super().__init__(*a, **kw)
            self.inline, self.out = inline, out
            self.turn_start, self.window, self.max_busy, self.completed = None, False, 0.0, None

        def handle(self, identity, frames, now, user=None):
            if self.turn_start is None:
                self.turn_start = time.perf_counter()
            return super().handle(identity, frames, now, user)

        def ready(self, now):
            t0 = self.turn_start or time.perf_counter()
            yield from super().ready(now)
            busy = time.perf_counter() - t0
            self.turn_start = None
            if self.window:
                self.max_busy = max(self.max_busy, busy)
            if self.completed is not None:  # the turn after completion is measured too
                self.out.put((self.completed, 1000 * self.max_busy))
                self.window, self.max_busy, self.completed = False, 0.0, None

        def _weights(self, identity, st, msg):
            self.window = True
            if not self.inline:
                return super()._weights(identity, st, msg)
            try:  # the baseline: assembly and the final hash inside handle, on the socket thread
                w = self.assembler.assembler.add(msg)
            except P.ProtocolError as e:
                return self._error(identity, e.code, e.message)
            if w is not None:
                with self.lock:
                    self.pending = w
                self.completed = w.version

        def _assembled(self, tag, w, err):
            super()._assembled(tag, w, err)
            if w is not None:
                self.completed = w.version

    return Probe


def server_main(endpoint: str, model: str, inline: bool, out, stop) -> None:
    """The spawned server: a momentum teacher of `model` on the CPU, one rank, no data."""
    import zmq
    from mimpipe.maskserver.serve import make_socket, serve
    from mimpipe.maskserver.server import ServerConfig
    from mimpipe.maskserver.teacher import Teacher

    torch.set_num_threads(1)
    teacher = Teacher(model, "momentum", projector_hidden=None)
    server = _probe_class()(ServerConfig("idm", ranks=(0,), heartbeat=HEARTBEAT), teacher, lambda r: _IdleLoader(),
                            PLAN_HASH, STEPS, 0, 1, inline=inline, out=out)
    ctx, halt = zmq.Context(), threading.Event()
    sock, _ = make_socket(ctx, endpoint, None, server.frame_limit)
    loop = threading.Thread(target=serve, args=(server, sock, halt), daemon=True)
    loop.start()
    out.put("ready")
    stop.wait()
    halt.set()
    loop.join(10)
    sock.close(linger=0)
    ctx.term()


# ---- the trainer side ----
def _sync_ours(pool, client, state, version):
    snap = pool.take(state, version, version)
    client.send_snapshot(snap)
    return snap.payload_bytes, snap


def _sync_baseline(client, state, version):
    """The synchronous send_weights as it was: snapshot, hash and encode now, then queue."""
    chunks = list(weight_chunks(state, version, version))
    for frames in chunks:
        client._command(("send", frames))  # the I/O thread's plain send path, as the old send_weights
    return sum(len(f[-1]) for f in chunks), None


def _run_path(args, state, device, inline: bool) -> dict:
    from mimpipe.maskserver.client import MaskClient
    from mimpipe.maskserver.snapshot import SnapshotPool

    ctx = mp.get_context("spawn")
    out, stop = ctx.Queue(), ctx.Event()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    proc = ctx.Process(target=server_main, args=(endpoint, args.model, inline, out, stop), daemon=True)
    proc.start()
    client = None
    try:
        if out.get(timeout=args.timeout) != "ready":
            raise RuntimeError("bench server did not start")
        client = MaskClient(endpoint, rank=0, world_size=1, plan_hash=PLAN_HASH, num_patches=196,
                            heartbeat=HEARTBEAT, mask_timeout=args.timeout)
        deadline = time.monotonic() + args.timeout
        while client.server_id is None:  # WELCOME: the server's session is this client's
            if time.monotonic() > deadline:
                raise RuntimeError("bench server never welcomed the client")
            time.sleep(0.01)
        pool = SnapshotPool(torch.bfloat16)
        main_ms, device_ms, blocks, upload_s, payload = [], [], [], [], 0
        for version in range(1, args.syncs + 2):  # version 1 is the warm-up (buffers, first touch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # host sync: the bench starts each sync with an idle GPU
                start = torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            payload, snap = (_sync_baseline(client, state, version) if inline else
                             _sync_ours(pool, client, state, version))
            t1 = time.perf_counter()
            done_version, block_ms = out.get(timeout=args.timeout)
            t2 = time.perf_counter()
            if done_version != version:
                raise RuntimeError(f"server assembled v{done_version}, expected v{version}")
            if version > 1:
                main_ms.append(1000 * (t1 - t0))
                blocks.append(block_ms)
                upload_s.append(t2 - t0)
                if device.type == "cuda" and snap is not None:
                    done = torch.cuda.Event(enable_timing=True)
                    done.record(torch.cuda.current_stream(device))
                    done.synchronize()  # host sync: the timing needs both events complete
                    device_ms.append(start.elapsed_time(snap.event))
        r = {"main_thread_ms": round(statistics.median(main_ms), 2), "payload_bytes": payload,
             "socket_thread_max_block_ms": round(max(blocks), 2),
             "upload_s": round(statistics.median(upload_s), 3), "main_thread_ms_all": [round(x, 1) for x in main_ms]}
        if device_ms:
            r["device_ms"] = round(statistics.median(device_ms), 3)
        return r
    finally:
        if client is not None:
            client.close()
        stop.set()
        proc.join(30)
        if proc.is_alive():
            proc.kill()


def run(args) -> dict:
    from mimpipe.train.model import create_model

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    state = create_model(args.model, encoder_only=True).to(device).state_dict()  # the EMA encoder, fp32
    before = _run_path(args, state, device, inline=True)
    ours = _run_path(args, state, device, inline=False)
    r = {"model": args.model, "device": str(device), "syncs": args.syncs, "tensors": len(state), **ours,
         **{f"before_{k}": v for k, v in before.items()}}
    r["main_thread_vs_before"] = round(r["main_thread_ms"] / r["before_main_thread_ms"], 3)
    return r


def table(r: dict) -> str:
    rows = [("trainer main thread per sync", f"{r['before_main_thread_ms']:.1f} ms", f"{r['main_thread_ms']:.1f} ms"),
            ("payload", f"{r['before_payload_bytes'] / 1e6:.1f} MB", f"{r['payload_bytes'] / 1e6:.1f} MB"),
            ("server socket loop, longest turn", f"{r['before_socket_thread_max_block_ms']:.1f} ms",
             f"{r['socket_thread_max_block_ms']:.1f} ms"),
            ("sync call to server assembled", f"{r['before_upload_s']:.2f} s", f"{r['upload_s']:.2f} s")]
    w = max(len(a) for a, *_ in rows)
    lines = [f"sync: {r['model']} ({r['tensors']} tensors) on {r['device']}, {r['syncs']} syncs per path",
             f"  {'':{w}}  {'baseline (sync fp32)':>22}  {'ours':>12}"]
    lines += [f"  {a:{w}}  {b:>22}  {c:>12}" for a, b, c in rows]
    lines.append(f"  main thread: {r['main_thread_vs_before']:.3f}x of the baseline"
                 + (f"; device fill + copy {r['device_ms']:.2f} ms" if "device_ms" in r else ""))
    return "\n".join(lines)
