"""`make gpu-check`'s CPU dry run, as the Makefile runs it (mimpipe imported from a folder of
symlinks, not from the install): every row present, ok or skipped with a reason, none an error,
finite losses, resume equal to an uninterrupted run. Keeps tools/gpu_check.py from rotting on a
machine without a GPU; the GPU-only rows show as skipped here."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from mimpipe.tools.gpu_check import ROWS, run_row
from mimpipe.tools.gpu_rows import CheckConfig, Skip

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    tmp = tmp_path_factory.mktemp("gpu-check")
    r = subprocess.run(["make", "-s", "gpu-check", f"GPU_PATH={tmp / 'path'}", f"OUT={tmp}",
                        "GPU_CHECK_ARGS=--device cpu --model mae_vit_micro_patch8_64 --small"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((tmp / "gpu-check.json").read_text()), r.stdout, tmp


def test_every_row_runs_or_says_why_not(report):
    r, stdout, tmp = report
    rows = {row["row"]: row for row in r["rows"]}
    assert list(rows) == list(ROWS)
    assert {row["status"] for row in rows.values()} <= {"ok", "skipped"}, \
        {n: row.get("reason") or row.get("failed") for n, row in rows.items() if row["status"] != "ok"}
    assert all(row["reason"] for row in rows.values() if row["status"] == "skipped")
    # on a CPU machine only the GPU comparisons skip; everything else must have run
    assert rows["teacher_parity"] == {**rows["teacher_parity"], "status": "skipped", "reason": "no CUDA"}
    assert rows["decode"]["skipped"].get("dali_mixed") == "no CUDA"
    assert [n for n, row in rows.items() if row["status"] == "skipped"] == ["teacher_parity"]
    for name in ROWS:
        assert name in stdout   # the table names every row
    assert Path(r["package"]).is_relative_to(tmp / "path")   # not the installed package


def test_trainer_runs_have_finite_losses(report):
    rows = {row["row"]: row for row in report[0]["rows"]}
    runs = rows["trainer"]["runs"]
    assert set(runs) == {"random", "inloop:sbam", "inloop:gpa --mam", "inloop:idm --score-cache 2",
                         "lut (src,src+color)", "mto"}
    for name, run in runs.items():
        assert run["finite"] and math.isfinite(run["first_loss"]) and math.isfinite(run["last_loss"]), name
        assert run["steps"] == report[0]["config"]["steps"], name
    assert "loss_mam" in runs["inloop:gpa --mam"]["terms"]
    assert "loss_lut" in runs["lut (src,src+color)"]["terms"]
    assert "loss_mto" in runs["mto"]["terms"]
    assert math.isfinite(rows["server"]["last_loss"]) and rows["server"]["server_exit"] == 0


def test_resume_equals_uninterrupted_and_buffers_do_not_race(report):
    rows = {row["row"]: row for row in report[0]["rows"]}
    assert rows["resume"]["equal"] is True and rows["resume"]["diff"] == 0.0
    assert rows["buffer_race"]["race_free"] is True
    assert rows["decode"]["decoders"]["dali_cpu"]["mean_abs_diff_vs_pil"] < 0.02   # README: below 0.02


def test_a_failing_or_late_row_is_reported_never_raised(tmp_path):
    cfg = CheckConfig("cpu", "mae_vit_micro_patch8_64", 64, images=1, decode_batches=(1,), timed_batches=1,
                      train_batch=1, steps=1, parity_batch=1, threads=1, work=tmp_path,
                      deadline=time.monotonic() + 60)

    def broken(cfg, data):
        raise ValueError("shard x: bad")

    def missing(cfg, data):
        raise Skip("zmq not installed")

    def wrong(cfg, data):
        return {"summary": "loss 1 vs 2", "failed": "the resumed run's loss differs"}
    assert run_row("r", broken, cfg, None) | {"seconds": 0, "traceback": ""} == {
        "row": "r", "status": "error", "reason": "ValueError: shard x: bad", "summary": "", "seconds": 0,
        "traceback": ""}
    assert run_row("r", missing, cfg, None)["reason"] == "zmq not installed"
    assert run_row("r", wrong, cfg, None)["status"] == "fail"
    late = replace(cfg, deadline=time.monotonic() - 1)
    assert run_row("r", broken, late, None)["reason"] == "time budget spent"
