"""`mimpipe profile`: where the throughput goes, stage by stage and as a whole.

On the same shards, model and cores it measures images/s of: the loader alone (DALI vs PIL), the
teacher + strategy alone, and the trainer fed three ways: random masks (no teacher: the ceiling),
a mask server process (the decoupled design), and the teacher in the training loop (the baseline).
The trainer runs on core 0 and the server on core 1, one thread each: on a CPU machine that is
what "separate devices" means. Derived per strategy:

    overlap efficiency   = server-fed / random-mask images/s   (1.0: the teacher costs nothing)
    speedup over in-loop = server-fed / in-loop images/s
    ideal speedup        = 1 + teacher time / student step time  (what perfect overlap would give)

Writes OUT/profile.json, OUT/profile.png (stage bars; queue depth and staleness over time) and
each run's metrics and server stats under OUT/.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path
from statistics import median

import torch

from mimpipe.tools import sample
from mimpipe.tools.bench_loader import loader_img_s
from mimpipe.tools.procs import cli, pinned, placement, start_server, stop

log = logging.getLogger("mimpipe.profile")


def add_arguments(p) -> None:
    p.add_argument("--shards", type=Path, default=Path("shards/sample"))
    p.add_argument("--out", type=Path, default=Path("runs/profile"))
    p.add_argument("--model", default="mae_vit_tiny_patch8_64")
    p.add_argument("--strategies", default="sbam,gpa,idm")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=80, help="trainer iterations per run")
    p.add_argument("--warmup", type=int, default=10, help="first iterations left out of images/s")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of (random, served, in-loop) per strategy; ratios are medians over rounds")
    p.add_argument("--port", type=int, default=5566)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cpu: trainer and server on their own core; cuda: trainer on GPU 0, server on the last GPU")
    p.add_argument("--sync-every", type=int, default=10,
                   help="trainer -> teacher weight sync interval (a momentum teacher's whole encoder "
                        "is copied and hashed at every sync)")


def block_macs(tokens: int, dim: int, mlp_ratio: float = 4.0) -> float:
    """Multiply-adds of one ViT block on `tokens` tokens: qkv + proj (4 N D^2), MLP (2 r N D^2),
    scores and weighted sum (2 N^2 D)."""
    return (4 + 2 * mlp_ratio) * tokens * dim ** 2 + 2 * tokens ** 2 * dim


def teacher_macs(cfg, strategy: str) -> float:
    """Per image: the truncated forward each strategy runs (teacher.py), patch embedding included."""
    from mimpipe.maskserver.teacher import block_for
    from mimpipe.maskserver.strategies import get_strategy
    L, D = cfg.num_patches, cfg.embed_dim
    embed = L * D * 3 * cfg.patch_size ** 2
    b = block_for(get_strategy(strategy), cfg.depth)
    if b is None:   # sbam/amr: the embedding and its L x L affinity
        return embed + (L * L * D if strategy in ("sbam", "amr") else 0)
    return embed + b * block_macs(L + 1, D) + 3 * (L + 1) * D ** 2   # blocks before b, then b's qkv


def student_macs(cfg, ratio: float = 0.75) -> float:
    """Per image per training step: MAE encoder on the visible tokens, decoder on all, x3 for the
    backward pass (the usual 1 forward + 2 backward)."""
    L = cfg.num_patches
    K = int(L * (1 - ratio))
    enc = L * cfg.embed_dim * 3 * cfg.patch_size ** 2 + cfg.depth * block_macs(K + 1, cfg.embed_dim)
    dec = cfg.decoder_depth * block_macs(L + 1, cfg.decoder_embed_dim)
    return 3 * (enc + dec)


class on_core:
    """Measure in this process on one core with one torch thread, then restore both."""

    def __init__(self, core: int):
        self.core = core

    def __enter__(self):
        self.aff, self.threads = os.sched_getaffinity(0), torch.get_num_threads()
        os.sched_setaffinity(0, {self.core} if self.core in self.aff else self.aff)
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        os.sched_setaffinity(0, self.aff)
        torch.set_num_threads(self.threads)


def teacher_img_s(model: str, strategy: str, images, batches: int = 10, device: str = "cpu") -> float:
    """Teacher + strategy on a fresh encoder (timing does not depend on the weights), on `device`;
    a GPU is synchronized around the timed batches."""
    from mimpipe.maskserver.teacher import Teacher, default_source
    from mimpipe.pipeline.plan import batch_generator
    from mimpipe.train.model import create_model
    source = default_source(strategy)
    t = Teacher(model, source, strategy=strategy, projector_hidden=None, device=device)
    full = create_model(model, encoder_only=True).state_dict()
    t.load_state({k: full[k] for k in t.held}, version=0, step=0)
    images = images.to(device)
    sync = torch.cuda.synchronize if t.device.type == "cuda" else (lambda: None)
    t.compute(images, strategy, ratio=0.75, generator=batch_generator(0, 0, 0, 0, t.device))
    sync()
    t0 = time.perf_counter()
    for s in range(batches):
        t.compute(images, strategy, ratio=0.75, generator=batch_generator(0, 0, s, 0, t.device))
    sync()
    return batches * len(images) / (time.perf_counter() - t0)


def thread_ticks(pid: int) -> dict[str, int]:
    """CPU ticks so far per thread group of a process (Linux /proc): the main thread (the training
    step), DALI's workers, ZeroMQ's I/O thread, and the other Python threads (loader producer,
    mask client). {} where /proc is not there."""
    groups: dict[str, int] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return groups
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read()
        except OSError:   # the thread ended between listing and reading
            continue
        group = ("main" if int(tid) == pid else "dali" if "DALI" in name else
                 "zmq" if name.startswith("ZMQ") else "other python")
        groups[group] = groups.get(group, 0) + int(fields[11]) + int(fields[12])   # utime + stime
    return groups


def train_run(args, out: Path, masks: str, strategy: str = "sbam") -> dict:
    """One trainer process on core 0; images/s and wait shares from its steady-state steps, and
    which of its threads used the core over those steps."""
    out.mkdir(parents=True, exist_ok=True)
    metrics, log = out / "metrics.jsonl", out / "train.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cli("train", "--shards", args.shards, "--out", out, "--overwrite",
                                    "--model", args.model,
                                    "--masks", masks, "--strategy", strategy, "--max-steps", args.steps,
                                    "--epochs", 100, "--batch-size", args.batch_size, "--threads", 1,
                                    "--mask-policy", "wait", "--sync-every", args.sync_every,
                                    "--no-mask-quality",   # its foreground reads are not the pipeline
                                    *placement(args.device)["train"]),
                                stdout=f, stderr=subprocess.STDOUT, **pinned(placement(args.device)["train_core"]))
        start = end = None
        while proc.poll() is None:
            # the window: from the end of warm-up to the last step; not the teardown, whose
            # ended threads take their ticks out of /proc
            now = thread_ticks(proc.pid)
            done = sum(1 for _ in open(metrics)) if metrics.exists() else 0
            if start is None and done >= args.warmup:
                start = now
            if start is not None and done < args.steps:
                end = now
            time.sleep(0.05)
    if proc.returncode:
        raise RuntimeError(f"mimpipe train --masks {masks} exited {proc.returncode}: "
                           f"{log.read_text()[-2000:]}")
    (out / "checkpoint.pt").unlink()   # only the timings matter here (ViT-B: ~1 GB a run)
    rows = [json.loads(x) for x in open(metrics)][args.warmup:]
    step = sum(r["data_wait"] + r["mask_wait"] + r["compute"] for r in rows)
    used = {k: end[k] - start.get(k, 0) for k in end} if start and end else {}
    return {"img_s": sum(r["images"] for r in rows) / step,
            "mask_wait_share": sum(r["mask_wait"] for r in rows) / step,
            "data_wait_share": sum(r["data_wait"] for r in rows) / step,
            "staleness": [r["staleness"] for r in rows],
            "step_s": step / len(rows), "mask_s": sum(r["mask_wait"] for r in rows) / len(rows),
            "threads": {k: v / max(sum(used.values()), 1) for k, v in used.items()}}


def served_run(args, out: Path, strategy: str) -> dict:
    endpoint = f"tcp://127.0.0.1:{args.port}"
    stats = out / "maskserver.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    stats.unlink(missing_ok=True)
    server = start_server(["--shards", args.shards, "--strategy", strategy, "--model", args.model,
                           "--bind", endpoint, "--threads", 1, "--batch-size", args.batch_size,
                           "--stats-file", stats, "--stats-every", 0.5, *placement(args.device)["server"]],
                          out / "maskserver.log", core=placement(args.device)["server_core"])
    try:
        r = train_run(args, out, endpoint, strategy)
    finally:
        stop(server)
    r["queue"] = [s["ranks"].get("0", {}).get("queue", 0) for s in map(json.loads, open(stats))]
    return r


def run(args) -> dict:
    from mimpipe.pipeline.manifest import load_manifest
    from mimpipe.pipeline.plan import PlanConfig
    from mimpipe.train.model import model_config
    sample.ensure(args.shards)
    m, mc = load_manifest(args.shards), model_config(args.model)
    plan_cfg = PlanConfig(seed=0, batch_size=args.batch_size, img_size=mc.img_size)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    images = torch.randn(args.batch_size, 3, mc.img_size, mc.img_size)
    res = {"model": args.model, "batch_size": args.batch_size, "steps": args.steps, "repeats": args.repeats,
           "device": args.device}
    log.info("loader and teacher alone, then %d round(s) of %d trainer runs", args.repeats, 3 * len(strategies))
    with on_core(0):
        res["loader"] = {f"{d}_img_s": loader_img_s(m, plan_cfg, d, threads=1, batches=20) for d in ("dali", "pil")}
    with on_core(1):
        teacher_device = placement(args.device)["server"][1]
        res["teacher_img_s"] = {s: teacher_img_s(args.model, s, images, device=teacher_device) for s in strategies}
    # each served and in-loop run is paired with a random-mask run just before it, and each ratio is
    # taken within its pair: this machine drifts by +-10% over minutes, more than the effects measured
    runs = {s: [] for s in strategies}
    for i in range(args.repeats):
        for s in strategies:
            rs = {"random": train_run(args, args.out / "random", "random"),
                  "served": served_run(args, args.out / f"served-{s}", s),
                  "inloop": train_run(args, args.out / f"inloop-{s}", f"inloop:{s}", s)}
            runs[s].append(rs)
            # minutes per round: say where it is
            log.info("round %d/%d, %s: random %.1f, served %.1f, in-loop %.1f img/s", i + 1, args.repeats, s,
                     *(rs[k]["img_s"] for k in ("random", "served", "inloop")))
    base = [r["random"] for rs in runs.values() for r in rs]
    res["random"] = {k: median([b[k] for b in base]) for k in ("img_s", "data_wait_share", "mask_wait_share")}
    res["random"]["threads"] = base[-1]["threads"]
    res["strategies"] = {}
    for s, rs in runs.items():
        served = rs[-1]["served"]
        res["strategies"][s] = {
            "served_img_s": median([r["served"]["img_s"] for r in rs]),
            "inloop_img_s": median([r["inloop"]["img_s"] for r in rs]),
            "overlap_efficiency": median([r["served"]["img_s"] / r["random"]["img_s"] for r in rs]),
            "overlap_runs": [r["served"]["img_s"] / r["random"]["img_s"] for r in rs],
            "speedup_over_inloop": median([r["served"]["img_s"] / r["inloop"]["img_s"] for r in rs]),
            # 1 + teacher time / student step time, both from the in-loop run
            "ideal_speedup": median([r["inloop"]["step_s"] / (r["inloop"]["step_s"] - r["inloop"]["mask_s"])
                                     for r in rs]),
            "mask_wait_share": median([r["served"]["mask_wait_share"] for r in rs]),
            "data_wait_share": median([r["served"]["data_wait_share"] for r in rs]),
            "staleness": served["staleness"], "queue": served["queue"],
            "trainer_threads": served["threads"],   # CPU shares on the trainer's core, last round
            # how many trainers one server can feed: predicted from MACs, measured from images/s
            "trainers_per_server_predicted": student_macs(mc) / teacher_macs(mc, s),
            "trainers_per_server_measured": res["teacher_img_s"][s] / res["random"]["img_s"]}
    # the headline: the first strategy (sbam by default)
    head = res["strategies"][strategies[0]]
    res.update({k: head[k] for k in ("overlap_efficiency", "speedup_over_inloop", "mask_wait_share")})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.json").write_text(json.dumps(res, indent=1))
    plot(res, args.out / "profile.png")
    return res


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (bars, queue, stale) = plt.subplots(1, 3, figsize=(14, 3.6))
    names = ["loader DALI", "loader PIL", "trainer random"]
    vals = [res["loader"]["dali_img_s"], res["loader"]["pil_img_s"], res["random"]["img_s"]]
    for s, r in res["strategies"].items():
        names += [f"teacher {s}", f"served {s}", f"in-loop {s}"]
        vals += [res["teacher_img_s"][s], r["served_img_s"], r["inloop_img_s"]]
    bars.barh(names[::-1], vals[::-1])
    bars.set_xscale("log")
    bars.set_xlabel("images/s (log)")
    for s, r in res["strategies"].items():
        queue.plot([0.5 * i for i in range(len(r["queue"]))], r["queue"], label=s)
        stale.plot(r["staleness"], label=s)
    queue.set(xlabel="seconds", ylabel="server queue depth (rank 0)", title="mask queue")
    stale.set(xlabel="trainer step (after warm-up)", ylabel="steps", title="teacher staleness")
    queue.legend()
    stale.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(r: dict) -> str:
    rows = [f"profile: {r['model']}, batch {r['batch_size']}, {r['steps']} steps per run, {r['repeats']} round(s); "
            + ("trainer on core 0, server on core 1, one thread each" if r.get("device", "cpu") == "cpu"
               else "trainer on GPU 0, server on the last GPU"),
            f"  loader alone           DALI {r['loader']['dali_img_s']:8.0f} img/s   PIL {r['loader']['pil_img_s']:8.0f} img/s",
            f"  trainer, random masks  {r['random']['img_s']:8.1f} img/s (data wait {100 * r['random']['data_wait_share']:.1f}%)",
            f"  {'strategy':<9}{'teacher':>10}{'served':>9}{'in-loop':>9}{'overlap':>9}{'speedup':>9}"
            f"{'ideal':>7}{'mask wait':>11}{'staleness':>11}{'feeds (model/meas.)':>21}"]
    for s, x in r["strategies"].items():
        st = [v for v in x["staleness"] if v is not None]
        rows.append(f"  {s:<9}{r['teacher_img_s'][s]:>10.0f}{x['served_img_s']:>9.1f}{x['inloop_img_s']:>9.1f}"
                    f"{x['overlap_efficiency']:>9.2f}{x['speedup_over_inloop']:>8.2f}x{x['ideal_speedup']:>6.2f}x"
                    f"{100 * x['mask_wait_share']:>10.1f}%{(sum(st) / max(len(st), 1)):>11.1f}"
                    f"{x['trainers_per_server_predicted']:>12.1f} / {x['trainers_per_server_measured']:<6.1f}")
    rows += ["  (images/s; overlap = served / random; ideal = 1 + teacher time / student step time;",
             "   feeds = trainers one server core keeps busy: MAC model / measured images/s)",
             "  the trainer's core, CPU share by thread over the measured steps:"]
    for name, threads in [("random", r["random"]["threads"])] + [
            (f"served {s}", x["trainer_threads"]) for s, x in r["strategies"].items()]:
        shares = ", ".join(f"{k} {100 * v:.1f}%" for k, v in sorted(threads.items(), key=lambda kv: -kv[1]))
        rows.append(f"    {name:<12} {shares or 'n/a (no /proc)'}")
    return "\n".join(rows)


def main(args) -> int:
    print(table(run(args)))
    return 0
