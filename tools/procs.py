"""Child processes of the demo and the profiler: the mimpipe CLI, pinned to one core each."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "mimpipe.tools.cli", *map(str, args)]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(core: int | None) -> dict:
    """Popen keywords running a child on one core with one torch/OpenMP thread: on a CPU machine,
    the stand-in for "its own GPU" (every core where that core does not exist, or core is None)."""
    cores = os.sched_getaffinity(0)
    target = {core} if core in cores else cores
    return dict(preexec_fn=lambda: os.sched_setaffinity(0, target),
                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


def placement(device: str) -> dict:
    """Where demo and profile run their trainer and mask server. cpu: core 0 and core 1, one
    thread each (separate cores stand for separate GPUs); cuda: GPU 0 for the trainer, the last GPU
    for the server (the same one on a one-GPU machine), no core pinning."""
    if device == "cpu":
        return {"train": ["--device", "cpu"], "train_core": 0, "server": ["--device", "cpu"], "server_core": 1}
    if device != "cuda":
        raise ValueError(f"--device {device!r}: choose cpu or cuda")
    import torch
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no GPU here (mimpipe doctor says why)")
    last = torch.cuda.device_count() - 1
    return {"train": ["--device", "cuda"], "train_core": None, "server": ["--device", f"cuda:{last}"],
            "server_core": None}


def start_server(args: list, log: Path, core: int | None = None, timeout: float = 120.0,
                 cwd: Path | None = None) -> subprocess.Popen:
    """`mimpipe maskserver ARGS` (on `core`); returns once its log says it is ready, else kills it
    and raises with the log's tail."""
    proc = subprocess.Popen(cli("maskserver", *args), stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            cwd=cwd, **pinned(core))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if b"ready on" in log.read_bytes():
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    stop(proc)
    raise RuntimeError(f"mask server did not start: {Path(log).read_text()[-3000:]}")


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> int | None:
    """SIGTERM (the server says BYE and writes its stats), SIGKILL if it does not exit."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
