"""`mimpipe launch`: one node's mask server and trainer ranks from one set of flags, end to end."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.maskserver_helpers import MODEL, ROOT, free_port
from mimpipe.tools.launch import server_ranks


def test_servers_serve_their_own_nodes_ranks():
    # 2 nodes x 8 ranks, 2 servers a node: each serves 4 ranks of its own node
    got = [server_ranks(node, s, 8, 2, 2) for node in range(2) for s in range(2)]
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    # GPA's 5 trainers + 3 servers on one node: blocks of 2, 2, 1
    assert [server_ranks(0, s, 5, 3, 1) for s in range(3)] == [[0, 1], [2, 3], [4]]


def test_launch_runs_two_gloo_ranks_on_one_server_and_stops_it(sample_ds, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "mimpipe.tools.cli", "launch", "--nproc-per-node", "2", "--servers", "1",
         "--server-port", str(free_port()), "--master-port", str(free_port()), "--server-threads", "1", "--",
         "--shards", str(sample_ds), "--out", str(out), "--model", MODEL, "--strategy", "sbam", "--batch-size", "8",
         "--epochs", "1", "--threads", "1", "--mask-policy", "fail", "--mask-timeout", "60"],
        cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    r0 = [json.loads(x) for x in open(out / "metrics.jsonl")]
    r1 = [json.loads(x) for x in open(out / "metrics.rank1.jsonl")]
    assert len(r0) == len(r1) == 8 and sum(x["valid"] for x in r0 + r1) == 120
    assert not any(x["fallback"] for x in r0 + r1) and r0[-1]["teacher_version"] >= 0
    assert "ready on" in (out / "maskserver-node0-0.log").read_text()
    assert "mask servers [0]" in r.stderr, r.stderr[-2000:]   # stopped cleanly after the trainers


def test_the_servers_get_the_score_cache_and_a_folder_each():
    from mimpipe.tools.cli import parse_args
    from mimpipe.tools.launch import server_argv
    t = parse_args(["train", "--shards", "s3://b/ds", "--model", MODEL, "--strategy", "gpa",
                    "--teacher-source", "frozen:/w/mae.pth"])
    argv = [str(a) for a in server_argv(t, [0, 1], 4, "tcp://h:5555", "cuda:2", 2, 4, "/c/node1-server0")]
    assert argv[argv.index("--score-cache") + 1] == "4" and argv[argv.index("--score-cache-dir") + 1] == \
        "/c/node1-server0" and argv[argv.index("--source") + 1] == "frozen:/w/mae.pth"
    assert "--score-cache" not in server_argv(t, [0], 1, "tcp://h:5555", "cpu", 1)
