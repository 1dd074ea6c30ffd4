"""`mimpipe doctor`: one screen of facts for a bug report, and where a command line would run.

    mimpipe doctor                                   # versions, CUDA, GPUs, DALI, ZeroMQ, ...
    mimpipe doctor -- train --masks tcp://h:5555 --model mae_vit_base_patch16
    mimpipe doctor --json -- maskserver --shards S --strategy gpa --model M --device cuda:0

Every optional package is reported as 'not installed' (or 'unusable: why' when it is there but does
not load); nothing here needs a GPU, DALI or pyzmq. The placement mirrors the code that decides it:
train/device.py (choose_device), train/trainer.py (setup_distributed, _autocast), maskserver/serve.py
(teacher device, decode device) and maskserver/teacher.py (fp32 embedding for sbam/amr, bf16
autocast otherwise on CUDA).
"""
from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path

import torch
from PIL import Image

from mimpipe import __version__

ROOT = Path(__file__).resolve().parents[1]
NOT_INSTALLED = "not installed"


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                   help="a mimpipe command line (after --): what it would run on which device")


def _optional(module: str):
    """(module, None), or (None, 'not installed' | 'unusable: why') for a package that fails to load."""
    try:
        return importlib.import_module(module), None
    except ModuleNotFoundError as e:
        return None, NOT_INSTALLED if e.name and module.startswith(e.name) else f"unusable: {e}"
    except Exception as e:  # noqa: BLE001 - a broken wheel (missing .so, ABI) is a fact to report
        return None, f"unusable: {type(e).__name__}: {e}"


def _dist_version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return NOT_INSTALLED


def _run(cmd: list[str]) -> str | None:
    """stdout of a short diagnostic command, or None where it is missing or fails."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def driver() -> str:
    from mimpipe.train.device import driver_version
    return driver_version() or "no NVIDIA driver"


def cuda_facts() -> dict:
    why = None
    if not torch.cuda.is_available():
        drv = driver()
        why = ("torch is a CPU-only build" if torch.version.cuda is None else
               f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r} hides every GPU"
               if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1") else
               "no NVIDIA driver" if drv == "no NVIDIA driver" else
               f"driver {drv} is there but torch cannot use it (too old for CUDA {torch.version.cuda}?)")
    gpus = []
    for i in range(torch.cuda.device_count() if why is None else 0):
        p = torch.cuda.get_device_properties(i)
        gpus.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                     "capability": f"{p.major}.{p.minor}"})
    try:
        nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else "no"
    except Exception as e:  # noqa: BLE001 - a CPU build without the NCCL library
        nccl = f"no ({type(e).__name__})"
    return {"torch": torch.__version__, "torch_cuda_build": torch.version.cuda or "none (CPU build)",
            "cudnn": torch.backends.cudnn.version(), "cuda_available": why is None,
            "cuda_unavailable_because": why, "driver": driver() if why is None else None, "gpus": gpus,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "nccl": nccl, "gloo": torch.distributed.is_gloo_available()}


def nvjpeg_hw() -> str:
    """Whether nvJPEG's hardware JPEG engine decodes here. DALI 2.4 decodes through nvImageCodec
    (`fn.decoders.*` name it; `backend.GetNvjpegVersion` is gone), whose decoder restricted to
    the HW_GPU_ONLY backend returns None for an image it cannot take: we try one small JPEG."""
    if not torch.cuda.is_available():
        return "no GPU"
    codec, why = _optional("nvidia.nvimgcodec")
    if codec is None:
        return f"unknown: nvImageCodec {why}"
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (90, 140, 200)).save(buf, format="JPEG", quality=90)
    try:
        dec = codec.Decoder(device_id=torch.cuda.current_device(),
                            backends=[codec.Backend(codec.BackendKind.HW_GPU_ONLY)])
        ok = dec.decode(codec.CodeStream(buf.getvalue())) is not None
    except Exception as e:  # noqa: BLE001 - the probe's failure is the answer
        return f"no ({type(e).__name__}: {e})"
    return "yes" if ok else "no (this GPU has no JPEG engine; DALI uses nvJPEG's CUDA decoder)"


def dali_facts() -> dict:
    dali, why = _optional("nvidia.dali")
    if dali is None:
        return {"dali": why, "nvjpeg_hw_decoder": "-"}
    codec = dali.backend.GetNvimgcodecVersion()   # e.g. 900 = 0.9.0
    wheel = [d for d in packages_distributions().get("nvidia", []) if d.startswith("nvidia-dali")]
    return {"dali": f"{dali.__version__} ({', '.join(sorted(set(wheel))) or 'no wheel metadata'})",
            "nvimgcodec": "none" if codec < 0 else f"{codec // 1000}.{codec // 100 % 10}.{codec % 100}",
            "nvjpeg_hw_decoder": nvjpeg_hw()}


def zmq_facts() -> dict:
    zmq, why = _optional("zmq")
    if zmq is None:
        return {"pyzmq": why}
    return {"pyzmq": zmq.pyzmq_version(), "libzmq": zmq.zmq_version(), "curve": bool(zmq.has("curve"))}


def mimpipe_facts() -> dict:
    commit = _run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    return {"mimpipe": __version__, "source": str(ROOT),
            "commit": None if commit is None else commit + (" (modified)" if dirty else "")}


def facts() -> dict:
    """Everything a bug report needs about this machine; never raises for a missing package."""
    return {**mimpipe_facts(), "python": sys.version.split()[0], "executable": sys.executable,
            "platform": platform.platform(), "cpus": len(os.sched_getaffinity(0)),
            **cuda_facts(), **dali_facts(), **zmq_facts(),
            **{name: _dist_version(name) for name in ("webdataset", "timm", "msgpack", "numpy", "pillow")}}


def teacher_dtype(strategy: str, cuda: bool) -> str:
    if strategy == "random":
        return "no teacher"
    if strategy in ("sbam", "amr"):
        return "fp32 embedding"
    return "bf16 autocast" if cuda else "fp32"


def decode_device(decoder: str, gpu: str | None, f: dict) -> str:
    if decoder == "pil":
        return "PIL on the CPU"
    where = f"DALI mixed (nvJPEG on {gpu})" if gpu else "DALI cpu (libjpeg-turbo)"
    return where if not f["dali"].startswith(("not installed", "unusable")) else \
        f"{where}: DALI {f['dali']}, the loader will fail; pass --decoder pil"


def placement(args: argparse.Namespace, f: dict) -> dict:
    """What a parsed `mimpipe` command line runs on which device, on this machine."""
    cuda = f["cuda_available"]
    if args.command == "train":
        from mimpipe.train.device import choose_device
        try:   # the trainer's own rule: a GPU that is meant but unusable is an error, not a CPU run
            cuda = choose_device(args.device) == "cuda"
        except ValueError as e:
            return {"trainer_device": f"none: the trainer will refuse to start: {e}"}
        world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
        gpu = f"cuda:{local}" if cuda else None
        ddp = ("nccl" if cuda else "gloo") if world > 1 else \
            f"none (one process; under torchrun: {'nccl' if cuda else 'gloo'})"
        masks = args.masks
        teacher = ("random masks, no teacher" if masks == "random" else
                   f"in the trainer on {gpu or 'cpu'}, {teacher_dtype(masks.split(':', 1)[1], cuda)}"
                   if masks.startswith("inloop:") else
                   f"mask server {masks} (its device: `mimpipe doctor -- maskserver ...` there); "
                   f"pyzmq {f['pyzmq']}")
        return {"trainer_device": gpu or "cpu", "ddp_backend": ddp, "decode": decode_device(args.decoder, gpu, f),
                "autocast": "bf16" if cuda else "fp32", "teacher": teacher}
    if args.command == "maskserver":
        dev = args.device
        ok = not dev.startswith("cuda") or cuda
        gpu = dev if dev.startswith("cuda") and cuda else None
        return {"teacher_device": dev if ok else f"{dev} requested, but CUDA is not available "
                f"({f['cuda_unavailable_because']}): the server will fail",
                "teacher_dtype": teacher_dtype(args.strategy, gpu is not None),
                "decode": decode_device(args.decoder, gpu, f),
                "transport": f"pyzmq {f['pyzmq']}" + (f", CURVE {'yes' if f.get('curve') else 'NOT supported'}"
                                                      if args.curve else "")}
    if args.command == "eval":
        return {"encoder_device": "cuda" if cuda else "cpu",
                "decode": decode_device("dali", "cuda" if cuda else None, f)}
    return {"device": f"doctor has no placement rules for mimpipe {args.command} (it knows train, maskserver, eval)"}


def command_placement(argv: list[str], f: dict) -> dict:
    """Parse `argv` with the real `mimpipe` parser (so defaults and checks are the command's own)."""
    from mimpipe.tools.cli import parse_args
    argv = argv[1:] if argv[:1] == ["--"] else argv
    try:
        args = parse_args(argv)
    except ImportError as e:   # the command's module needs a package this machine lacks
        return {"command": " ".join(argv), "error": f"mimpipe {argv[0]} cannot load here: {e}"}
    except SystemExit:
        return {"command": " ".join(argv), "error": "the command line does not parse (the message is above)"}
    return {"command": " ".join(argv), **placement(args, f)}


def table(f: dict) -> str:
    gpus = "; ".join(f"{g['index']}: {g['name']}, {g['memory_gib']} GiB, sm {g['capability']}"
                     for g in f["gpus"]) or "none"
    cuda = "yes" if f["cuda_available"] else f"no: {f['cuda_unavailable_because']}"
    rows = [("mimpipe", f"{f['mimpipe']} at {f['source']}" + (f", commit {f['commit']}" if f["commit"] else "")),
            ("python", f"{f['python']} ({f['executable']}), {f['platform']}, {f['cpus']} CPUs"),
            ("torch", f"{f['torch']}, CUDA build {f['torch_cuda_build']}, cuDNN {f['cudnn']}"),
            ("CUDA available", cuda + (f", driver {f['driver']}" if f["driver"] else "")),
            ("GPUs", gpus),
            ("TF32", f"matmul {f['tf32_matmul']}, cudnn {f['tf32_cudnn']} (float32 matmul precision "
                     f"{f['float32_matmul_precision']})"),
            ("NCCL / gloo", f"{f['nccl']} / {'yes' if f['gloo'] else 'no'}"),
            ("DALI", f["dali"] + (f", nvImageCodec {f['nvimgcodec']}" if "nvimgcodec" in f else "")),
            ("nvJPEG HW decoder", f["nvjpeg_hw_decoder"]),
            ("pyzmq", f["pyzmq"] + (f", libzmq {f['libzmq']}, CURVE {'yes' if f['curve'] else 'no'}"
                                    if "libzmq" in f else "")),
            *((name, f[name]) for name in ("webdataset", "timm", "msgpack", "numpy", "pillow"))]
    if "placement" in f:
        rows += [("command", f["placement"]["command"])]
        rows += [(f"  {k.replace('_', ' ')}", str(v)) for k, v in f["placement"].items() if k != "command"]
    return "\n".join(f"{k:<20}{v}" for k, v in rows)


def main(args) -> int:
    f = facts()
    if args.command:
        f["placement"] = command_placement(args.command, f)
    print(json.dumps(f, indent=1) if args.json else table(f))
    return 0
