"""remote shards: the Loader over HTTP with a per-request latency vs the same shards on local disk.

The server (`RangeServer`, also what the tests use) serves a folder on 127.0.0.1, honours
`Range: bytes=a-b` with 206 replies and sleeps `latency_s` before every reply, as an object store's
time to first byte would. Both sides run the same plan, decoder and threads; only the shard
location differs."""
from __future__ import annotations

import multiprocessing
import re
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch

RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class RangeServer:
    """`with RangeServer(folder, latency_s=0.02) as url:` serves folder at url (127.0.0.1 only).
    `fail_next(n)` answers the next n requests with 503 (to test retries)."""

    def __init__(self, folder: Path, *, latency_s: float = 0.0):
        self.folder, self.latency_s, self._fail = Path(folder), latency_s, 0
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"   # keep-alive: a connection per request would add RTTs

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body: bool):
                time.sleep(owner.latency_s)
                with owner._lock:
                    fail, owner._fail = owner._fail > 0, max(0, owner._fail - 1)
                path = owner.folder / self.path.lstrip("/")
                if fail or ".." in self.path or not path.is_file():
                    return self._reply(503 if fail else 404, b"")
                size = path.stat().st_size
                m = RANGE.match(self.headers.get("Range", ""))
                start, end = (int(m[1]), min(size, int(m[2]) + 1) if m[2] else size) if m else (0, size)
                with open(path, "rb") as f:
                    f.seek(start)
                    data = f.read(max(0, end - start)) if body else b""
                self._reply(206 if m else 200, data, end - start,
                            {"Content-Range": f"bytes {start}-{end - 1}/{size}"} if m else {})

            def _reply(self, code: int, data: bytes, length: int | None = None, headers=()):
                self.send_response(code)
                self.send_header("Content-Length", str(len(data) if length is None else length))
                self.send_header("Accept-Ranges", "bytes")
                for k, v in dict(headers).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):   # quiet: the tests and bench print what matters
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def fail_next(self, n: int) -> None:
        with self._lock:
            self._fail = n

    def __enter__(self) -> str:
        threading.Thread(target=self._httpd.serve_forever, daemon=True, name="range-server").start()
        return self.url

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()


def _serve(folder: Path, latency_s: float, port_q, stop) -> None:
    with RangeServer(folder, latency_s=latency_s) as url:
        port_q.put(url)
        stop.wait()


class ServerProcess:
    """A RangeServer in its own process: as a real server, it takes no GIL from the loader."""

    def __init__(self, folder: Path, *, latency_s: float):
        ctx = multiprocessing.get_context("spawn")
        self._q, self._stop = ctx.Queue(), ctx.Event()
        self._p = ctx.Process(target=_serve, args=(folder, latency_s, self._q, self._stop), daemon=True)

    def __enter__(self) -> str:
        self._p.start()
        return self._q.get(timeout=60)

    def __exit__(self, *exc):
        self._stop.set()
        self._p.join(10)


def add_arguments(p) -> None:
    p.add_argument("shards", nargs="?", type=Path, help="local dataset folder (default: generate one)")
    p.add_argument("--n", type=int, default=640, help="images to generate (default 640)")
    p.add_argument("--latency-ms", type=float, default=20.0, help="per-request latency of the server")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, default=24, help="timed batches per contender")
    p.add_argument("--decoder", default="dali", choices=("dali", "pil"))


def run(args) -> dict:
    from mimpipe.pipeline.manifest import load_manifest
    from mimpipe.pipeline.plan import PlanConfig
    from mimpipe.tools.bench_loader import loader_img_s, make_photos
    torch.set_num_threads(1)
    cfg = PlanConfig(seed=0, batch_size=args.batch_size, img_size=args.img_size)
    with tempfile.TemporaryDirectory(prefix="mimpipe-bench-") as tmp:
        folder = args.shards or make_photos(Path(tmp) / "photos", args.n)
        with ServerProcess(folder, latency_s=args.latency_ms / 1e3) as url:
            t0 = time.perf_counter()
            remote = load_manifest(url)
            res = {"images": len(remote), "mean_kb": round(float(np.mean(remote.table["size"])) / 1e3, 1),
                   "latency_ms": args.latency_ms, "threads": args.threads, "batch_size": args.batch_size,
                   "decoder": args.decoder, "load_manifest_s": round(time.perf_counter() - t0, 2)}
            # alternate, so drift on a shared machine hits both sides alike
            local_a = loader_img_s(load_manifest(folder), cfg, args.decoder, threads=args.threads,
                                   batches=args.batches)
            remote_img_s = loader_img_s(remote, cfg, args.decoder, threads=args.threads, batches=args.batches)
            local_b = loader_img_s(load_manifest(folder), cfg, args.decoder, threads=args.threads,
                                   batches=args.batches)
    res.update(local_img_s=round((local_a + local_b) / 2, 1), remote_img_s=round(remote_img_s, 1))
    res["ratio"] = round(res["remote_img_s"] / res["local_img_s"], 3)
    return res


def table(r: dict) -> str:
    return "\n".join([
        f"remote bench: {r['images']} JPEGs (mean {r['mean_kb']} KB), batch {r['batch_size']}, "
        f"{r['threads']} threads, {r['decoder']}; HTTP server with {r['latency_ms']:g} ms per request",
        f"{'shards':<40}{'images/s':>10}{'vs local':>10}",
        f"{'local disk':<40}{r['local_img_s']:>10.0f}{1:>9.2f}x",
        f"{'HTTP, coalesced ranges per batch':<40}{r['remote_img_s']:>10.0f}{r['ratio']:>9.2f}x",
        f"(load_manifest over HTTP: {r['load_manifest_s']} s)"])
