"""The install adds one top-level name, `mimpipe`: a user's own `tools` or `train` stays theirs."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_only_the_mimpipe_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("mimpipe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"mimpipe", next(t for t in top if t.endswith(".dist-info"))}, top
    for module in ("mimpipe/pipeline/plan.py", "mimpipe/maskserver/strategies/sbam.py",
                   "mimpipe/train/trainer.py", "mimpipe/tools/cli.py"):
        assert module in names, module


def test_installed_names_resolve_outside_the_repository(tmp_path):
    # run from elsewhere, so the repository folder is not on sys.path
    code = ("import importlib.util, mimpipe, mimpipe.pipeline.plan, mimpipe.tools.cli;"
            "print(mimpipe.__version__);"
            "print([n for n in ('tools', 'train', 'pipeline', 'maskserver') if importlib.util.find_spec(n)])")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    version, leaked = r.stdout.splitlines()
    assert version != "0+unknown"
    assert leaked == "[]", f"top-level modules besides mimpipe: {leaked}"


def test_the_trainer_needs_no_zeromq_without_a_mask_server(tmp_path):
    """A GPU box may hold only torch and timm: random and in-loop masks must not import pyzmq."""
    code = ("import sys; sys.modules['zmq'] = None\n"   # any `import zmq` now raises ImportError
            "import mimpipe.train.trainer, mimpipe.train.masks, mimpipe.tools.profile\n"
            "from mimpipe.pipeline.plan import batch_generator\n"
            "print(torch_ok := batch_generator(0, 1, 2, 3).initial_seed() > 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr[-2000:]
