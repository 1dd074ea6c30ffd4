"""transport: MASKS msgs/s, MB/s, round trip and bytes/image over tcp and ipc, plus a ViT-B weight upload.

One ROUTER (this process, configured like maskserver.serve.make_socket: LINGER 0, ZMQ_MAXMSGSIZE =
protocol.MAX_ARRAY_BYTES) bound to tcp://127.0.0.1:<free port> and ipc://<temp dir>; one DEALER client
in a separate process (multiprocessing 'spawn': its zmq context is created in the child). Per transport
and variant (masks only; masks + float16 gpa_target) the client grants `--credits` credits and one more
per batch it decodes, like a trainer; the server encodes each MASKS with check=False (its hot path) and
the client runs the full `decode`. Round trip: CREDIT 1 -> one MASKS, decoded, with nothing in flight.
The snapshot: a bf16 ViT-B/16 encoder state dict (random values, real shapes) through `weight_chunks`
-> tcp -> `WeightAssembler` (sha256-verified), timed until the server's ack. Every recv has a timeout."""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import time
import traceback

import numpy as np
import torch
import zmq

from mimpipe.maskserver import protocol as P
from mimpipe.maskserver.weights import WeightAssembler, weight_chunks
from mimpipe.maskserver.strategies.masking import pack_mask

REQUIRED_BATCHES_S = 170  # docs/design.md, Transport: 8 GPUs need ~170 batches/s
RESEARCH = "research (docs/design.md): 9-20k batches/s, 150-250 us round trip"
VARIANTS = ("masks", "targets")  # the HELLO's restart_id tells the bench server which one to stream
ACK = "weights-ok"


def add_arguments(p) -> None:
    p.add_argument("--seconds", type=float, default=2.0,
                   help="timed streaming per transport and variant (default 2.0)")
    p.add_argument("--credits", type=int, default=8, help="credits the client grants up front (default 8)")
    p.add_argument("--batch", type=int, default=256, help="images per MASKS message (default 256)")
    p.add_argument("--patches", type=int, default=196, help="patches per image L (default 196)")
    p.add_argument("--rtt", type=int, default=1000, help="timed round trips per transport and variant (default 1000)")
    p.add_argument("--no-snapshot", dest="snapshot", action="store_false",
                   help="skip the ViT-B weight upload (~173 MB)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds any single recv may wait (default 30)")


# ---- shared ----
def _socket(ctx: zmq.Context, kind: int, timeout_ms: int) -> zmq.Socket:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.MAXMSGSIZE, P.MAX_ARRAY_BYTES)  # as maskserver.serve.make_socket
    s.setsockopt(zmq.RCVTIMEO, timeout_ms)
    s.setsockopt(zmq.SNDTIMEO, timeout_ms)
    return s


def _nbytes(frames) -> int:
    return sum(f.nbytes if isinstance(f, memoryview) else len(f) for f in frames)


def _wire_overhead(frames) -> int:
    """ZMTP 3 framing bytes: 1 flag byte + 1-byte length (<= 255) or 8-byte length."""
    return sum(2 if (f.nbytes if isinstance(f, memoryview) else len(f)) <= 255 else 9 for f in frames)


def make_arrays(n: int, L: int, targets: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    keep = max(1, round(L * 0.25))  # MAE's 75 % mask ratio
    order = torch.rand(n, L, generator=g).argsort(dim=1)
    mask = torch.ones(n, L, dtype=torch.bool)
    mask.scatter_(1, order[:, :keep], False)
    arrays = {"mask": pack_mask(mask).numpy(), "len_keep": np.full(n, keep, np.int16)}
    if targets:
        arrays["gpa_target"] = torch.rand(n, L, generator=g).to(torch.float16).numpy()
    return arrays


def _masks_fields(n: int, L: int, seq: int, ck: int) -> dict:
    return {"rank": 0, "epoch": 0, "step": seq, "seq": seq, "checksum": ck, "teacher_version": -1,
            "teacher_step": -1, "n": n, "num_patches": L}


# ---- server (this process) ----
def serve(sock: zmq.Socket, n: int, L: int, proc, deadline: float) -> dict:
    """Answer HELLO / CREDIT / WEIGHTS / BYE until BYE; returns server-side stats."""
    arrays = {v: make_arrays(n, L, v == "targets") for v in VARIANTS}
    ck = P.checksum(np.arange(n))
    peers: dict[bytes, dict] = {}
    asm = WeightAssembler()
    stats = {"encode_s": 0.0, "encoded": 0, "assemble_s": 0.0}
    while True:
        if not sock.poll(100):
            if time.monotonic() > deadline or not proc.is_alive():
                raise TimeoutError("transport bench: client went quiet "
                                   f"(alive={proc.is_alive()}, exitcode={proc.exitcode})")
            continue
        ident, *frames = sock.recv_multipart(copy=False)
        ident = ident.bytes
        msg = P.decode(frames)
        if msg.type == P.HELLO:
            peers[ident] = {"variant": msg.fields["restart_id"], "credits": msg.fields["credits"], "seq": 0}
            continue
        st = peers.get(ident)
        if msg.type == P.CREDIT:
            st["credits"] += msg.fields["n"]
            a = arrays[st["variant"]]
            while st["credits"] > 0:  # the hot path: header encode + zero-copy array frames
                t0 = time.perf_counter()
                out = P.encode(P.MASKS, _masks_fields(n, L, st["seq"], ck), a, check=False)
                stats["encode_s"] += time.perf_counter() - t0
                stats["encoded"] += 1
                sock.send_multipart([ident, *out], copy=False)
                st["seq"] += 1
                st["credits"] -= 1
        elif msg.type == P.WEIGHTS:
            t0 = time.perf_counter()
            try:
                done = asm.add(msg)
            except P.ProtocolError as e:
                sock.send_multipart([ident, *e.frames()])
                continue
            finally:
                stats["assemble_s"] += time.perf_counter() - t0
            if done is not None:
                stats["snapshot_tensors"] = len(done.state)
                del done
                sock.send_multipart([ident, *P.encode(P.HEARTBEAT, {"restart_id": ACK})])
        elif msg.type == P.BYE:
            return stats


# ---- client (spawned process) ----
def _recv(s: zmq.Socket):
    return s.recv_multipart(copy=False)  # RCVTIMEO raises zmq.Again instead of hanging


def _credit(s: zmq.Socket, k: int) -> None:
    s.send_multipart(P.encode(P.CREDIT, {"rank": 0, "n": k}, check=False))


def _hello(s: zmq.Socket, variant: str) -> None:
    s.send_multipart(P.encode(P.HELLO, {"rank": 0, "world_size": 1, "plan_hash": "00000000",
                                         "cursor": [0, 0], "restart_id": variant, "credits": 0}))


def stream(s: zmq.Socket, credits: int, seconds: float, warmup: int = 200) -> dict:
    """Credit-flow streaming: `credits` up front, one more per decoded batch, until `seconds` pass."""
    _credit(s, credits)
    granted, got, timed, nbytes, lost, last_seq = credits, 0, 0, 0, 0, -1
    t0 = t_end = None
    dec = 0.0
    frame_bytes = None
    while True:
        frames = _recv(s)
        d0 = time.perf_counter()
        msg = P.decode(frames)
        d1 = time.perf_counter()
        got += 1
        seq = msg.fields["seq"]
        lost += seq - last_seq - 1
        last_seq = seq
        if frame_bytes is None:
            frame_bytes = [len(f) for f in frames]
        if t0 is None:
            if got == warmup:
                t0 = time.perf_counter()
        elif t_end is None:
            timed += 1
            dec += d1 - d0
            nbytes += sum(frame_bytes)
            if d1 - t0 >= seconds:
                t_end = d1
        if t_end is None:
            _credit(s, 1)
            granted += 1
        elif got == granted:  # everything granted has arrived: nothing left in flight
            break
    dt = t_end - t0
    return {"msgs_s": timed / dt, "mb_s": nbytes / 1e6 / dt, "decode_us": dec / timed * 1e6, "lost": lost,
            "frame_bytes": frame_bytes, "msgs": timed, "seconds": dt}


def round_trips(s: zmq.Socket, n: int, warmup: int = 50) -> dict:
    lat = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        _credit(s, 1)
        P.decode(_recv(s))
        if i >= warmup:
            lat.append(time.perf_counter() - t0)
    lat = np.array(lat) * 1e3
    return {"median": float(np.median(lat)), "p99": float(np.percentile(lat, 99))}


def vit_b_state() -> dict[str, torch.Tensor]:
    from mimpipe.train.model import create_model
    with torch.device("meta"):  # shapes only: no 86M-parameter init
        shapes = {k: v.shape for k, v in create_model("mae_vit_base_patch16", encoder_only=True)
                  .state_dict().items()}
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=g, dtype=torch.float32).to(torch.bfloat16)
            for k, shape in shapes.items()}


def upload(s: zmq.Socket, state: dict) -> dict:
    t0 = time.perf_counter()
    chunks = list(weight_chunks(state, version=1, step=0))
    t1 = time.perf_counter()
    total = sum(c[1].nbytes for c in chunks)
    for c in chunks:
        s.send_multipart(c, copy=False)
    reply = P.decode(_recv(s))
    t2 = time.perf_counter()
    if reply.type != P.HEARTBEAT or reply.fields.get("restart_id") != ACK:
        raise RuntimeError(f"weight upload rejected: {reply.type} {reply.fields}")
    return {"s": t2 - t0, "chunk_s": t1 - t0, "send_s": t2 - t1, "mb": total / 1e6, "chunks": len(chunks)}


def client_main(endpoints: dict, cfg: dict, q) -> None:
    try:
        q.put(_client(endpoints, cfg))
    except BaseException:
        q.put({"error": traceback.format_exc()})


def _client(endpoints: dict, cfg: dict) -> dict:
    torch.set_num_threads(1)
    ctx = zmq.Context()
    res: dict = {}
    try:
        for tname, ep in endpoints.items():
            s = _socket(ctx, zmq.DEALER, int(cfg["timeout"] * 1000))
            s.connect(ep)
            for variant in VARIANTS:
                _hello(s, variant)
                r = stream(s, cfg["credits"], cfg["seconds"])
                r["rtt"] = round_trips(s, cfg["rtt"])
                res[f"{tname}/{variant}"] = r
            if tname == "tcp" and cfg["snapshot"]:
                state = vit_b_state()
                res["snapshot"] = upload(s, state)
                del state
            s.close()
        s = _socket(ctx, zmq.DEALER, int(cfg["timeout"] * 1000))
        s.connect(next(iter(endpoints.values())))
        s.send_multipart(P.encode(P.BYE, {}))
        time.sleep(0.05)  # LINGER 0: let the BYE leave before close
        s.close()
    finally:
        ctx.term()
    return res


# ---- entry ----
def run(args) -> dict:
    n, L = args.batch, args.patches
    tmp = tempfile.mkdtemp(prefix="mimpipe-transport-")
    ctx = zmq.Context()
    sock = _socket(ctx, zmq.ROUTER, int(args.timeout * 1000))
    sock.setsockopt(zmq.SNDHWM, 1000)  # as the server
    proc = None
    try:
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        ipc = f"ipc://{os.path.join(tmp, 'bench.sock')}"
        sock.bind(ipc)
        endpoints = {"tcp": f"tcp://127.0.0.1:{port}", "ipc": ipc}
        cfg = {k: getattr(args, k) for k in ("credits", "seconds", "rtt", "snapshot", "timeout")}
        mpc = mp.get_context("spawn")
        q = mpc.Queue()
        proc = mpc.Process(target=client_main, args=(endpoints, cfg, q), daemon=True)
        proc.start()
        budget = 60 + 4 * (args.seconds + args.rtt * 0.005) + (60 if args.snapshot else 0)
        srv = serve(sock, n, L, proc, time.monotonic() + budget)
        try:
            got = q.get(timeout=args.timeout)
        except queue.Empty:
            raise TimeoutError("transport bench: the client sent BYE but no results") from None
        if "error" in got:
            raise RuntimeError("transport bench client failed:\n" + got["error"])
        proc.join(timeout=5)
    finally:
        if proc is not None and proc.is_alive():
            proc.terminate()
            proc.join(timeout=5)
        sock.close()
        ctx.term()
        shutil.rmtree(tmp, ignore_errors=True)

    res: dict = {"batch": n, "patches": L, "credits": args.credits, "required_batches_s": REQUIRED_BATCHES_S}
    for tname in ("tcp", "ipc"):
        for variant in VARIANTS:
            r, key = got[f"{tname}/{variant}"], tname + ("" if variant == "masks" else "_targets")
            res[f"{key}_msgs_s"] = round(r["msgs_s"], 1)
            res[f"{key}_mb_s"] = round(r["mb_s"], 2)
            res[f"{key}_rtt_ms"] = round(r["rtt"]["median"], 4)
            res[f"{key}_rtt_p99_ms"] = round(r["rtt"]["p99"], 4)
            res[f"{key}_decode_us"] = round(r["decode_us"], 1)
            res[f"{key}_lost"] = r["lost"]
            res[f"{key}_x_required"] = round(r["msgs_s"] / REQUIRED_BATCHES_S, 1)
    for variant in VARIANTS:
        fb = got[f"tcp/{variant}"]["frame_bytes"]
        key = "" if variant == "masks" else "_targets"
        res[f"frame_bytes{key}"] = fb  # [header, mask, len_keep(, gpa_target)]
        res[f"bytes_per_image{key}"] = round(sum(fb) / n, 2)
        res[f"wire_bytes_per_image{key}"] = round((sum(fb) + sum(2 if b <= 255 else 9 for b in fb)) / n, 2)
    res["encode_us"] = round(srv["encode_s"] / max(1, srv["encoded"]) * 1e6, 1)
    if "snapshot" in got:
        s = got["snapshot"]
        res.update({"vit_b_snapshot_s": round(s["s"], 3), "vit_b_snapshot_mb": round(s["mb"], 1),
                    "vit_b_snapshot_mb_s": round(s["mb"] / s["s"], 1),
                    "vit_b_chunking_s": round(s["chunk_s"], 3), "vit_b_send_assemble_s": round(s["send_s"], 3),
                    "vit_b_chunks": s["chunks"], "vit_b_tensors": srv.get("snapshot_tensors"),
                    "server_assemble_s": round(srv["assemble_s"], 3)})
    return res


def table(r: dict) -> str:
    req = r["required_batches_s"]
    rows = [f"transport bench: MASKS of {r['batch']} images x {r['patches']} patches, {r['credits']} credits, "
            f"DEALER client in its own process",
            f"{'path':<22}{'batches/s':>11}{'MB/s':>9}{'x need':>9}{'rtt ms':>9}{'p99 ms':>9}{'B/image':>9}"]
    for tname in ("tcp", "ipc"):
        for key, label, bpi in ((tname, "masks", "bytes_per_image"),
                                (tname + "_targets", "masks+gpa_target", "bytes_per_image_targets")):
            rows.append(f"{tname + ' ' + label:<22}{r[key + '_msgs_s']:>11.0f}{r[key + '_mb_s']:>9.1f}"
                        f"{r[key + '_x_required']:>8.1f}x{r[key + '_rtt_ms']:>9.3f}{r[key + '_rtt_p99_ms']:>9.3f}"
                        f"{r[bpi]:>9.1f}")
    rows.append(f"need (docs/design.md, 8 GPUs): ~{req} batches/s; {RESEARCH}")
    rows.append(f"server encode (check=False): {r['encode_us']} us/batch; client decode: "
                f"{r['tcp_decode_us']} us (masks), {r['tcp_targets_decode_us']} us (+targets); "
                f"lost: {sum(r[k] for k in r if k.endswith('_lost'))}")
    if "vit_b_snapshot_s" in r:
        rows.append(f"ViT-B bf16 snapshot over tcp: {r['vit_b_snapshot_mb']} MB in {r['vit_b_chunks']} chunks, "
                    f"{r['vit_b_snapshot_s']:.2f} s ({r['vit_b_snapshot_mb_s']:.0f} MB/s; weight_chunks "
                    f"{r['vit_b_chunking_s']:.2f} s, send+assemble+verify {r['vit_b_send_assemble_s']:.2f} s)")
    return "\n".join(rows)
