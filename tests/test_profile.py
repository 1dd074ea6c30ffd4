"""mimpipe profile runs every stage and the whole system, and writes what it measured.
(Speeds are measured, not asserted: only the report's shape and consistency are checked.)"""
from __future__ import annotations

import argparse
import json

import pytest

from mimpipe.tools import profile


def test_profile_reports_every_stage(sample_ds, tmp_path):
    p = argparse.ArgumentParser()
    profile.add_arguments(p)
    args = p.parse_args(["--shards", str(sample_ds), "--out", str(tmp_path), "--model", "mae_vit_micro_patch8_64",
                         "--strategies", "sbam", "--steps", "40", "--warmup", "2", "--batch-size", "8",
                         "--port", str(__import__("tests.maskserver_helpers", fromlist=["x"]).free_port())])
    r = profile.run(args)
    saved = json.loads((tmp_path / "profile.json").read_text())
    for key in ("overlap_efficiency", "speedup_over_inloop", "mask_wait_share"):
        assert saved[key] == r[key] and saved[key] >= 0
    s = saved["strategies"]["sbam"]
    # one round: each ratio is its only pair's
    assert s["overlap_runs"] == [s["overlap_efficiency"]] and saved["repeats"] == 1
    assert s["overlap_efficiency"] == s["served_img_s"] / saved["random"]["img_s"]
    assert s["speedup_over_inloop"] == s["served_img_s"] / s["inloop_img_s"]
    assert len(s["staleness"]) == 38 and s["queue"]
    for threads in (s["trainer_threads"], saved["random"]["threads"]):   # shares of the trainer's core
        assert "main" in threads and abs(sum(threads.values()) - 1) < 1e-9
    assert min(saved["loader"].values()) > 0 and saved["teacher_img_s"]["sbam"] > 0
    assert not list(tmp_path.rglob("checkpoint*.pt"))   # profile keeps only its timings
    assert (tmp_path / "profile.png").stat().st_size > 10_000
    assert "overlap" in profile.table(saved)


def test_bench_without_a_stage_runs_every_stage(monkeypatch, capsys):
    """`mimpipe bench` (what `make bench` runs) goes through every registered stage."""
    from mimpipe.tools import bench, cli
    ran = []
    for stage, module in bench.STAGES.items():
        mod = __import__(module, fromlist=["run"])
        monkeypatch.setattr(mod, "run", lambda a, stage=stage: ran.append(stage) or {"stage": stage})
        monkeypatch.setattr(mod, "table", lambda r: f"table {r['stage']}")
    assert cli.main(["bench"]) == 0
    assert ran == list(bench.STAGES)
    assert capsys.readouterr().out.splitlines() == [f"table {s}" for s in bench.STAGES]


def test_placement_of_trainer_and_server():
    from mimpipe.tools.procs import placement
    assert placement("cpu") == {"train": ["--device", "cpu"], "train_core": 0, "server": ["--device", "cpu"],
                                "server_core": 1}
    import torch
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: torch sees no GPU"):
            placement("cuda")
