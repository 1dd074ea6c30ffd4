"""`python -m mimpipe.tools.gpu_check` (`make gpu-check`): the GPU path, checked in one run.

On one GPU in at most ~8 minutes (`--budget-s`: rows not started by then are skipped), on data it
generates (tools/bench_loader.make_photos), with only torch + timm + msgpack required: every row
whose dependency is missing (DALI, pyzmq, webdataset, CUDA) is reported as skipped with the reason.
Rows: environment (mimpipe doctor's facts); decode (DALI mixed / DALI CPU / PIL); buffer_race;
teacher_parity; trainer (random, inloop:sbam, inloop:gpa --mam, inloop:idm --score-cache 2, LUT,
MTO); throughput; server (a mask server process on the same GPU feeding a trainer); resume. Prints a table and writes JSON to
`--out` (default $OUT/gpu-check.json when OUT is set, else runs/gpu-check.json).

`--device cpu --model mae_vit_micro_patch8_64 --small` is the dry run the test suite runs
(tests/test_gpu_check.py), so the script cannot rot on a machine without a GPU.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

import torch

import mimpipe
from mimpipe.tools.procs import free_port
from mimpipe.tools.gpu_rows import (CheckConfig, Skip, buffer_race, clock, decode, environment, has, need,
                                    teacher_parity, throughput)

log = logging.getLogger("mimpipe.gpu_check")


def add_arguments(p) -> None:
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda where available")
    p.add_argument("--model", default="mae_vit_base_patch16")
    p.add_argument("--small", action="store_true", help="tiny data and few steps: the CPU dry run")
    p.add_argument("--budget-s", type=float, default=360.0,
                   help="rows not started within this many seconds are skipped (the GPU lease is 8 min)")
    p.add_argument("--rows", default=None, help="comma list of rows to run (default: all)")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default $OUT/gpu-check.json or "
                   "runs/gpu-check.json)")


def check_config(args, work: Path, deadline: float) -> CheckConfig:
    from mimpipe.train.model import model_config
    size = model_config(args.model).img_size
    threads = max(1, min(8, len(os.sched_getaffinity(0)) - 1))
    if args.small:
        return CheckConfig(args.device, args.model, size, images=40, decode_batches=(8, 16), timed_batches=2,
                           train_batch=8, steps=3, parity_batch=8, threads=min(2, threads), work=work,
                           deadline=deadline)
    return CheckConfig(args.device, args.model, size, images=512, decode_batches=(64, 256), timed_batches=6,
                       train_batch=64, steps=20, parity_batch=32, threads=threads, work=work, deadline=deadline)


def trainer_module():
    """mimpipe.train.trainer, or Skip: it imports the mask client, hence pyzmq, at module level."""
    return need("mimpipe.train.trainer")


def train_config(cfg: CheckConfig, data: Path, out: str, **kw):
    trainer = trainer_module()
    fields = dict(shards=str(data), out=str(cfg.work / out), model=cfg.model, batch_size=cfg.train_batch,
                  epochs=1000, max_steps=cfg.steps, warmup_epochs=0.0, threads=cfg.threads, print_every=10**9,
                  decoder="dali" if has("nvidia.dali") else "pil", device=cfg.device)
    return trainer.TrainConfig(**{**fields, **kw})


def metrics(tc) -> list[dict]:
    return [json.loads(line) for line in open(Path(tc.out) / "metrics.jsonl")]


def timed_train(cfg: CheckConfig, tc) -> dict:
    """Two runs, `cfg.steps` and a quarter of them. On CUDA the step time is the difference of their
    (synchronized) wall times over the difference of their steps, so start-up, the first steps'
    kernel selection and the checkpoint write cancel: the trainer's own per-step fields stop their
    clocks before the kernels finish. On the CPU nothing is asynchronous and those fields are exact,
    while a difference of two short runs is mostly start-up noise."""
    train = trainer_module().train
    short = max(1, cfg.steps // 4)
    walls = {}
    for steps in (short, cfg.steps):
        t0 = clock(cfg)
        train(replace(tc, max_steps=steps), overwrite=True)
        walls[steps] = clock(cfg) - t0
    rows = metrics(tc)
    (Path(tc.out) / "checkpoint.pt").unlink()   # ViT-B with optimizer and EMA: ~1.7 GB a run
    losses, steady = [r["loss"] for r in rows], rows[short:]

    def per_step(*keys):
        return round(sum(r[k] for r in steady for k in keys) / len(steady), 4)
    wall_s = round((walls[cfg.steps] - walls[short]) / (cfg.steps - short), 4)
    host_s = per_step("data_wait", "mask_wait", "compute")
    step_s = wall_s if cfg.cuda else host_s
    return {"decoder": tc.decoder, "steps": len(rows), "finite": all(map(math.isfinite, losses)),
            "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4), "step_s": step_s,
            "img_s": round(cfg.train_batch / step_s, 1) if step_s > 0 else None,
            "wall_diff_step_s": wall_s, "host_step_s": host_s,
            "data_wait_s": per_step("data_wait"), "mask_wait_s": per_step("mask_wait"),
            "terms": sorted(k for k in rows[-1] if k.startswith("loss_"))}


def trainer_runs() -> dict[str, dict]:
    from mimpipe.train.losses import LOSSES
    return {"random": {"masks": "random"},
            "inloop:sbam": {"masks": "inloop:sbam", "strategy": "sbam"},
            "inloop:gpa --mam": {"masks": "inloop:gpa", "strategy": "gpa", "mam": LOSSES["mam"].weight},
            # the score cache's device path: reference views, teacher scores, grid_sample on the GPU
            "inloop:idm --score-cache 2": {"masks": "inloop:idm", "strategy": "idm", "score_cache": 2},
            "lut (src,src+color)": {"lut": LOSSES["lut"].weight, "views": "src,src+color"},
            "mto": {"mto": LOSSES["mto"].weight}}


def trainer(cfg: CheckConfig, data: Path) -> dict:
    res, late = {}, []
    for i, (name, kw) in enumerate(trainer_runs().items()):
        if time.monotonic() > cfg.deadline:   # the lease ends the process: better a row with fewer runs
            late.append(name)
            continue
        res[name] = timed_train(cfg, train_config(cfg, data, f"train-{i}", **kw))
    bad = [n for n, r in res.items() if not r["finite"]]
    lines = [f"{n}: loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}, {r['step_s'] * 1e3:.0f} ms/step, "
             f"data wait {r['data_wait_s'] * 1e3:.1f} ms ({r['decoder']})" for n, r in res.items()]
    return {"summary": lines + [f"{n}: skipped, time budget spent" for n in late], "runs": res, "skipped_runs": late,
            "failed": f"non-finite losses in {bad}" if bad else None}


def server(cfg: CheckConfig, data: Path) -> dict:
    """`mimpipe maskserver` as its own process on the trainer's device, SBAM masks to one trainer."""
    need("zmq")
    from mimpipe.tools.procs import start_server, stop
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    # a server that stops answering fails the row within a minute instead of hanging the lease
    tc = train_config(cfg, data, "served", masks=endpoint, strategy="sbam", mask_policy="fail", mask_timeout=60.0)
    (cfg.work / "served").mkdir(parents=True, exist_ok=True)
    proc = start_server(["--shards", data, "--strategy", "sbam", "--model", cfg.model, "--bind", endpoint,
                         "--device", "cuda:0" if cfg.cuda else "cpu", "--decoder", tc.decoder,
                         "--threads", cfg.threads, "--batch-size", cfg.train_batch, "--seed", tc.seed],
                        cfg.work / "served" / "maskserver.log")
    try:
        r = timed_train(cfg, tc)
    finally:
        code = stop(proc)
    return {"summary": f"rank 0 {r['step_s'] * 1e3:.0f} ms/step, mask wait {r['mask_wait_s'] * 1e3:.1f} ms, "
                       f"loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}, server exit {code}",
            **r, "server_exit": code, "failed": None if r["finite"] else "non-finite losses"}


def resume(cfg: CheckConfig, data: Path) -> dict:
    """k steps, checkpoint, resume for one more; its loss against an uninterrupted k + 1 steps. On
    the CPU the two are bit-equal; CUDA's kernels are not all deterministic (atomics in backward),
    so there `match` allows 1e-3 relative."""
    train = trainer_module().train
    k = max(2, cfg.steps // 4)
    whole = train_config(cfg, data, "resume-whole", max_steps=k + 1)
    parts = train_config(cfg, data, "resume-parts", max_steps=k)
    train(whole, overwrite=True)
    train(parts, overwrite=True)
    train(replace(parts, max_steps=k + 1), resume=True)
    a, b = (next(r["loss"] for r in metrics(tc) if r["it"] == k + 1) for tc in (whole, parts))
    diff = abs(a - b)
    match = diff == 0 if not cfg.cuda else diff <= 1e-3 * abs(a)
    return {"summary": f"loss at iteration {k + 1}: uninterrupted {a:.6f}, resumed {b:.6f}, "
                       f"|diff| {diff:.2e} -> {'match' if match else 'MISMATCH'}",
            "iteration": k + 1, "uninterrupted": a, "resumed": b, "diff": diff, "equal": match,
            "rule": "exact" if not cfg.cuda else "relative 1e-3",
            "failed": None if match else "the resumed run's loss differs from the uninterrupted run's"}


ROWS = {"environment": environment, "decode": decode, "buffer_race": buffer_race, "teacher_parity": teacher_parity,
        "trainer": trainer, "throughput": throughput, "server": server, "resume": resume}


def run_row(name: str, fn, cfg: CheckConfig, data) -> dict:
    """One row: ok or fail with its numbers, skipped with the reason, or error with the message of
    what raised (never raises itself)."""
    if time.monotonic() > cfg.deadline:
        return {"row": name, "status": "skipped", "reason": "time budget spent", "summary": ""}
    log.info("row %s", name)
    t0 = time.monotonic()
    try:
        out = fn(cfg, data)
        # a row that ran but found the system wrong (race, mismatch, NaN) says why in 'failed'
        out = {"status": "fail" if out.get("failed") else "ok", **out}
    except Skip as e:
        out = {"status": "skipped", "reason": str(e), "summary": ""}
    except Exception as e:  # noqa: BLE001 - one row's failure is a finding; the other rows still run
        out = {"status": "error", "reason": f"{type(e).__name__}: {e}", "summary": "",
               "traceback": traceback.format_exc()[-3000:]}
    return {"row": name, "seconds": round(time.monotonic() - t0, 1), **out}


def check(args, out: Path) -> dict:
    """Every row in turn; the JSON is rewritten and the row's lines printed as each row ends, so a
    run the lease cuts short still leaves what it measured."""
    from mimpipe.pipeline.manifest import load_manifest
    from mimpipe.tools.bench_loader import make_photos
    t_start = time.monotonic()
    names = list(ROWS) if args.rows is None else [r.strip() for r in args.rows.split(",")]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise ValueError(f"--rows: unknown {unknown}; choose from {', '.join(ROWS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mimpipe-gpu-check-") as tmp:
        cfg = check_config(args, Path(tmp), t_start + args.budget_s)
        photos = make_photos(cfg.work / "photos", cfg.images)
        manifest = load_manifest(photos)
        r = {"device": cfg.device, "model": cfg.model, "small": args.small, "budget_s": args.budget_s,
             "package": str(Path(mimpipe.__file__).parent),   # where `mimpipe` came from (make gpu-check: symlinks)
             "config": {k: v for k, v in asdict(cfg).items() if k not in ("work", "deadline")},
             "setup_s": round(time.monotonic() - t_start, 1), "rows": []}
        print(header(r), flush=True)
        for n in names:
            r["rows"].append(run_row(n, ROWS[n], cfg, photos if n in ("trainer", "server", "resume") else manifest))
            r["seconds"] = round(time.monotonic() - t_start, 1)
            out.write_text(json.dumps(r, indent=1))
            print(row_lines(r["rows"][-1]), flush=True)
    return r


def header(r: dict) -> str:
    return (f"gpu-check: {r['model']} on {r['device']}{' (small)' if r['small'] else ''}, {r['budget_s']:.0f} s "
            f"budget, data {r['setup_s']} s\n{'row':<16}{'status':<9}{'s':>6}  result")


def row_lines(row: dict) -> str:
    text = row["summary"] if row["status"] in ("ok", "fail") else row["reason"]
    first, *more = [text] if isinstance(text, str) else text   # a row of several runs: one line each
    more += [f"FAIL: {row['failed']}"] if row["status"] == "fail" else []
    return "\n".join([f"{row['row']:<16}{row['status']:<9}{row.get('seconds', 0):>6.1f}  {first}",
                      *(f"{'':<33}{t}" for t in more)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mimpipe.tools.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    # every gpa teacher here is momentum on purpose (no frozen checkpoint on a fresh machine): the
    # teacher's per-instance deviation notice would repeat a dozen times
    logging.getLogger("mimpipe.maskserver.teacher").setLevel(logging.ERROR)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        from mimpipe.tools.doctor import cuda_facts
        p.error(f"--device cuda: CUDA is not available ({cuda_facts()['cuda_unavailable_because']})")
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("runs")) / "gpu-check.json"
    r = check(args, out)
    print(f"{r['seconds']} s in all; JSON: {out}")
    return 1 if any(row["status"] in ("error", "fail") for row in r["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
