"""Which device a rank trains on, and a refusal when a GPU is meant but torch cannot use it.

The default torch wheel is a CUDA 13 build (driver >= 580); on an older driver
`torch.cuda.is_available()` is False and a trainer that quietly fell back to the CPU would run
for days at a hundredth of the speed. So: with `--device auto`, a machine that shows NVIDIA device
nodes or a CUDA_VISIBLE_DEVICES list, yet has no usable CUDA, is an error that names the driver and
torch's CUDA; `--device cpu` is the way to mean the CPU there.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

DEVICES = ("auto", "cuda", "cpu")


def driver_version() -> str | None:
    """The NVIDIA driver's version, from the kernel module or nvidia-smi; None without one."""
    proc = Path("/proc/driver/nvidia/version")
    if proc.exists():
        words = proc.read_text().split()
        return next((w for w in words if w[:1].isdigit() and "." in w), None)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def gpu_meant(env: dict | None = None, dev_nodes: bool | None = None) -> str | None:
    """Why this machine looks like it should train on a GPU, or None."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible not in (None, "", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible}"
    if Path("/dev/nvidiactl").exists() if dev_nodes is None else dev_nodes:
        return "NVIDIA device nodes (/dev/nvidiactl)"
    return None


def choose_device(flag: str, *, available: bool | None = None, meant: str | None = None,
                  driver: str | None = None) -> str:
    """--device auto|cuda|cpu -> 'cuda' or 'cpu'; a GPU that is meant but unusable is a ValueError."""
    if flag not in DEVICES:
        raise ValueError(f"--device {flag!r}: choose from {', '.join(DEVICES)}")
    if flag == "cpu":
        return "cpu"
    available = torch.cuda.is_available() if available is None else available
    if available:
        return "cuda"
    why = "--device cuda" if flag == "cuda" else (gpu_meant() if meant is None else meant)
    if why is None:
        return "cpu"
    driver = driver_version() if driver is None else driver
    built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA: a CPU build"
    raise ValueError(f"a GPU is meant ({why}) but torch {torch.__version__} ({built}) cannot use it with "
                     f"NVIDIA driver {driver or 'none found'}: install the torch build for this driver (e.g. "
                     f"make TORCH_INDEX=https://download.pytorch.org/whl/cu126 install) or pass --device cpu")
