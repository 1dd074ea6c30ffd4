"""`mimpipe doctor`: the facts, the placement of a command line, and missing packages reported as
'not installed' (a machine without them is simulated by blocking their import in a child process)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from mimpipe.tools import doctor

ROOT = Path(__file__).resolve().parents[1]


def doctor_json(*argv: str, block: tuple[str, ...] = ()) -> dict:
    """`mimpipe doctor --json ARGV` in a child whose imports of `block` fail as if not installed."""
    code = ("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in block) +
            "from mimpipe.tools.cli import main\nsys.exit(main(['doctor', '--json', *sys.argv[1:]]))")
    r = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_facts_name_versions_and_why_cuda_is_missing():
    f = doctor.facts()
    json.dumps(f)   # --json must not fail on any value
    assert f["torch"] == torch.__version__ and f["python"] == sys.version.split()[0]
    assert f["cuda_available"] == torch.cuda.is_available()
    if not f["cuda_available"]:   # this machine: the reason, and DALI's HW decoder cannot be asked
        assert f["cuda_unavailable_because"] and f["gpus"] == []
        assert f["nvjpeg_hw_decoder"] in ("no GPU", "-")
    for key in ("tf32_matmul", "tf32_cudnn", "nccl", "dali", "pyzmq", "webdataset", "timm", "msgpack"):
        assert key in f, key
    table = doctor.table(f)
    assert "CUDA available" in table and "nvJPEG HW decoder" in table and len(table.splitlines()) < 30


def test_train_command_placement_on_this_machine():
    f = doctor_json("--", "train", "--shards", "x", "--masks", "inloop:gpa", "--model", "mae_vit_base_patch16")
    p = f["placement"]
    cuda = f["cuda_available"]
    assert p["trainer_device"] == ("cuda:0" if cuda else "cpu")
    assert p["autocast"] == ("bf16" if cuda else "fp32")
    assert ("nccl" if cuda else "gloo") in p["ddp_backend"]
    assert p["decode"].startswith("DALI mixed" if cuda else "DALI cpu")
    assert p["teacher"].startswith("in the trainer")


def test_maskserver_on_a_gpu_that_is_not_there_says_so():
    f = doctor_json("--", "maskserver", "--shards", "x", "--strategy", "sbam", "--model", "mae_vit_base_patch16",
                    "--device", "cuda:0", "--decoder", "pil", "--curve", "keys")
    p = f["placement"]
    if not f["cuda_available"]:
        assert "CUDA is not available" in p["teacher_device"] and "fail" in p["teacher_device"]
    assert p["teacher_dtype"].startswith("fp32") and p["decode"] == "PIL on the CPU"
    assert "CURVE" in p["transport"]


def test_missing_optional_packages_are_not_installed_never_a_crash():
    f = doctor_json("--", "train", "--shards", "x", block=("zmq", "nvidia.dali"))
    assert f["pyzmq"] == "not installed" and f["dali"] == "not installed"
    # without a mask server the trainer needs no pyzmq: its placement is still worked out
    assert "error" not in f["placement"], f["placement"]
    f = doctor_json("--", "maskserver", "--shards", "x", "--strategy", "sbam", "--model", "m", block=("nvidia.dali",))
    assert "DALI not installed" in f["placement"]["decode"] and "--decoder pil" in f["placement"]["decode"]


def test_a_bad_command_line_is_reported_not_raised():
    f = doctor_json("--", "train", "--no-such-flag")
    assert "does not parse" in f["placement"]["error"]


def test_maskserver_placement_on_a_gpu_machine():
    """The placement rules with CUDA present (this machine has none: the facts say it has)."""
    f = {**doctor.facts(), "cuda_available": True, "dali": "2.4.0", "pyzmq": "27.3.0", "curve": True}
    args = argparse.Namespace(command="maskserver", device="cuda:1", strategy="gpa", decoder="dali", curve=None)
    p = doctor.placement(args, f)
    assert p == {"teacher_device": "cuda:1", "teacher_dtype": "bf16 autocast",
                 "decode": "DALI mixed (nvJPEG on cuda:1)", "transport": "pyzmq 27.3.0"}
    assert doctor.placement(argparse.Namespace(**{**vars(args), "strategy": "sbam"}), f)["teacher_dtype"] \
        == "fp32 embedding"


def test_train_on_a_gpu_that_is_not_there_is_a_refusal():
    """--device cuda without CUDA: the trainer's own rule (train/device.py) refuses; doctor says so."""
    if torch.cuda.is_available():
        return
    args = argparse.Namespace(command="train", device="cuda", masks="random", decoder="dali")
    assert doctor.placement(args, doctor.facts())["trainer_device"].startswith("none: the trainer will refuse")
