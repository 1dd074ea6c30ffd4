"""A signal to one rank stops every rank at the same iteration, with a checkpoint (two gloo ranks
under torchrun); the device a run picks, and the install that never replaces a user's torch."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.maskserver_helpers import MODEL, ROOT, free_port
from mimpipe.train.device import choose_device


def worker_pids(parent: int) -> dict[int, int]:
    """{RANK: pid} of torchrun's workers, read from /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
        if int(fields[1]) == parent and rank is not None:
            found[rank] = int(stat.parent.name)
    return found


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in open(path)] if path.exists() else []


def test_sigterm_to_one_rank_stops_both_at_the_same_iteration_with_a_checkpoint(sample_ds, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "mimpipe.tools.cli", "train", "--shards", str(sample_ds), "--out", str(out), "--model", MODEL,
         "--batch-size", "4", "--epochs", "50", "--threads", "1", "--decoder", "pil"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while len(rows(out / "metrics.rank1.jsonl")) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.2)
        os.kill(worker_pids(proc.pid)[1], signal.SIGTERM)
        text, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, text[-3000:]
    r0, r1 = rows(out / "metrics.jsonl"), rows(out / "metrics.rank1.jsonl")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert r0[-1]["it"] == r1[-1]["it"] == ckpt["it"] < 50 * 15, (r0[-1], r1[-1], ckpt["it"])
    assert "stopped at iteration" in text and "--resume" in text, text[-2000:]
    assert (out / "STOPPED").read_text().startswith(f"iteration {ckpt['it']} of")   # a job script requeues on it


@pytest.mark.parametrize("flag, available, meant, want", [
    ("auto", True, None, "cuda"), ("auto", False, None, "cpu"), ("cpu", True, "CUDA_VISIBLE_DEVICES=0", "cpu"),
    ("auto", False, "CUDA_VISIBLE_DEVICES=0", "error"), ("cuda", False, None, "error"),
])
def test_a_gpu_that_is_meant_but_unusable_is_an_error(flag, available, meant, want):
    if want == "error":
        with pytest.raises(ValueError, match=r"a GPU is meant .* torch .* cannot use it with NVIDIA driver 535.104"
                                             r".*TORCH_INDEX=.*--device cpu"):
            choose_device(flag, available=available, meant=meant, driver="535.104")
    else:
        assert choose_device(flag, available=available, meant=meant, driver="535.104") == want


def test_install_takes_a_torch_index_and_keeps_an_installed_torch(tmp_path):
    """`make install` dry run: TORCH_INDEX reaches pip, a torch already in the venv is kept, and
    the installed pair constrains the rest of the install."""
    r = subprocess.run(["make", "-n", "-B", "install", f"VENV={tmp_path}/venv",
                        "TORCH_INDEX=https://download.pytorch.org/whl/cu126"], cwd=ROOT, capture_output=True,
                       text=True, check=True)
    lines = r.stdout.splitlines()
    guard = next(i for i, line in enumerate(lines) if "-c 'import torch' 2>/dev/null ||" in line)
    assert "pip install --index-url https://download.pytorch.org/whl/cu126 torch" in lines[guard + 1]
    assert any("pip install -c" in line and "torch-pins.txt -e" in line for line in lines)


def torchrun_train(*args, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
         str(free_port()), "-m", "mimpipe.tools.cli", "train", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("first, second", [("2x8", "1x16"), ("1x16", "2x8")])
def test_elastic_resume_on_another_world_size_trains_each_sample_once(sample_ds, tmp_path, first, second):
    """120 samples: 3 global batches of 16 on the first layout, then the rest of the epoch on the
    other; the valid samples of both add up to the epoch, exactly (the plan test checks the ids)."""
    out = tmp_path / "run"
    common = ["--shards", sample_ds, "--out", out, "--model", MODEL, "--epochs", 1, "--threads", 1, "--decoder", "pil"]

    def launch(layout, *extra):
        world, batch = map(int, layout.split("x"))
        r = torchrun_train(*common, "--batch-size", batch, *extra, nproc=world)
        assert r.returncode == 0, r.stderr[-3000:]
        return r
    launch(first, "--max-steps", 3)
    r = launch(second, "--resume", "--max-steps", 1000)   # the first launch's 3 is in OUT/config.yaml
    assert "elastic: world size" in r.stderr and "48 of 120 samples done" in r.stderr, r.stderr[-2000:]
    valid = sum(row["valid"] for f in out.glob("metrics*.jsonl") for row in rows(f))
    assert valid == 120, valid


def test_sigterm_while_waiting_for_a_server_that_never_answers_stops_within_seconds(sample_ds, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mimpipe.tools.cli", "train", "--shards", str(sample_ds), "--out", str(out),
         "--model", MODEL, "--batch-size", "8", "--threads", "1", "--decoder", "pil",
         "--masks", f"tcp://127.0.0.1:{free_port()}", "--mask-policy", "wait", "--mask-timeout", "600"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "config.yaml").exists():   # written just before the first wait for masks
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.1)
        time.sleep(1.0)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        text, _ = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 0, text[-3000:]
    assert "a signal arrived while waiting for the masks of epoch 0 step 0" in text and "--resume" in text, text[-2000:]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["it"] == 0
    print(f"SIGTERM to exit while waiting for masks: {took:.2f} s")
