"""The generated sample dataset: what it draws, and when demo/profile rebuild it."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mimpipe.tools import sample


def test_one_upright_object_near_the_centre_of_its_class():
    for i in range(20):
        img, fg, label = sample.render(0, i, 96)
        assert img.shape == (96, 96, 3) and img.dtype == np.uint8 and label == sample.label_of(0, i)
        ys, xs = np.nonzero(fg)
        assert 0.05 < fg.mean() < 0.5                               # one object, a good part of the image
        # near the centre: the object's box reaches into the central fifth of the image both ways
        assert xs.min() < 0.6 * 96 and xs.max() > 0.4 * 96 and ys.min() < 0.6 * 96 and ys.max() > 0.4 * 96
    a, b = sample.render(0, 3, 96), sample.render(0, 3, 96)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])   # a pure function of (seed, index)


def _manifest(folder, source):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"source": source}))


def test_ensure_keeps_current_rebuilds_older_refuses_foreign(tmp_path, monkeypatch):
    """The decision only: building itself is `mimpipe sample`, run by every other test's fixture."""
    built = []

    def build(args):
        built.append(args.out)
        _manifest(args.out, sample.GENERATOR + " --n 2000")
    monkeypatch.setattr(sample, "main", build)
    current, older, foreign = tmp_path / "current", tmp_path / "older", tmp_path / "foreign"
    _manifest(current, sample.GENERATOR + " --n 2000 --size 96 --seed 0")
    (current / "keep").write_text("x")
    sample.ensure(current)
    assert built == [] and (current / "keep").exists()
    _manifest(older, "mimpipe sample --n 2000 --size 96 --seed 0")   # the v1 generator's record
    (older / "stale").write_text("x")
    sample.ensure(older)
    assert built == [older] and not (older / "stale").exists()
    _manifest(foreign, "mimpipe shard /data/imagenet/train")
    with pytest.raises(SystemExit, match="not a sample set"):
        sample.ensure(foreign)
    assert (foreign / "manifest.json").exists()
    sample.ensure(tmp_path / "missing")
    assert built == [older, tmp_path / "missing"]


@pytest.mark.parametrize("args, says", [
    (["--n", "0"], "argument --n: '0' is not allowed: expected an integer >= 1"),
    (["--n", "-5"], "argument --n: '-5' is not allowed: expected an integer >= 1"),
    (["--size", "30"], "argument --size: '30' is not allowed: expected a multiple of 4, at least 16"),
    (["--samples-per-shard", "0"], "argument --samples-per-shard: '0' is not allowed: expected an integer >= 1"),
])
def test_bad_sample_flags_are_one_line_and_exit_2(tmp_path, args, says):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "mimpipe.tools.cli", "sample", str(tmp_path / "out"), *args],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(says), r.stderr
    assert not (tmp_path / "out").exists()


def test_sample_on_a_complete_set_says_it_is_complete(tmp_path):
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "mimpipe.tools.cli", "sample", str(tmp_path / "s"), "--n", "8", "--size", "32",
           "--samples-per-shard", "4"]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "already holds a complete dataset" in again.stderr, again.stderr
    assert "--resume" not in again.stderr
