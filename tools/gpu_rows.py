"""The rows of `gpu_check` that need no trainer: environment, decoders, the output-buffer race,
teacher CPU/GPU parity, student and teacher throughput against the MAC model.

Each row is `row(cfg, data) -> dict` (a one-line `summary` plus its numbers) or raises `Skip`
with the reason (a missing package, no CUDA). Every timed region is bracketed by `clock`, which
synchronizes the GPU first: CUDA work is asynchronous, and a timer read without a sync measures
kernel launches, not kernels.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

RATIO, PROGRESS = 0.75, 0.5   # as tools/bench_teacher.py: mask ratio, gpa's schedule midway
MAX_MEAN_DIFF = 0.02          # DALI vs PIL, normalized units: the README's stated agreement


class Skip(Exception):
    """A row that cannot run here; the message is the reason (printed, not an error)."""


@dataclass(frozen=True)
class CheckConfig:
    device: str                   # "cuda" | "cpu"
    model: str
    img_size: int
    images: int                   # generated photos
    decode_batches: tuple[int, ...]
    timed_batches: int
    train_batch: int
    steps: int                    # trainer iterations per run
    parity_batch: int
    threads: int                  # decoder threads
    work: Path                    # scratch folder (data, runs)
    deadline: float               # time.monotonic() after which no further run starts

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


def need(module: str):
    """Import `module` or Skip naming the package that is missing (the module may need others)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise Skip(f"{e.name} not installed" + ("" if module.startswith(e.name or "?") else
                                                f" (needed by {module})")) from None


def has(module: str) -> bool:
    try:
        need(module)
        return True
    except Skip:
        return False


def clock(cfg: CheckConfig) -> float:
    if cfg.cuda:
        torch.cuda.synchronize()
    return time.perf_counter()


def environment(cfg: CheckConfig, data) -> dict:
    from mimpipe.tools.doctor import facts
    f = facts()
    gpus = ", ".join(g["name"] for g in f["gpus"]) or "no GPU"
    return {"summary": f"torch {f['torch']} (CUDA {f['torch_cuda_build']}), {gpus}, DALI {f['dali']}, "
                       f"nvJPEG HW {f['nvjpeg_hw_decoder']}, pyzmq {f['pyzmq']}, webdataset {f['webdataset']}",
            "facts": f}


def _plan(cfg: CheckConfig, batch: int):
    from mimpipe.pipeline.plan import PlanConfig
    return PlanConfig(seed=0, batch_size=batch, img_size=cfg.img_size)


def _loader(cfg: CheckConfig, data, batch: int, decoder: str, device: str):
    from mimpipe.pipeline.loader import Loader
    return Loader(data, _plan(cfg, batch), decoder=decoder, threads=cfg.threads, device=device,
                  device_id=0 if device == "gpu" else None)


def _batches(loader):
    """The loader's batches, epoch after epoch (the generated set is smaller than a timed run)."""
    for epoch in range(10**6):
        yield from loader.epoch(epoch)


def first_images(cfg: CheckConfig, data, batch: int) -> torch.Tensor:
    """The first batch of epoch 0, decoded with PIL: the same real images for every comparison."""
    loader = _loader(cfg, data, batch, "pil", "cpu")
    it = loader.epoch(0)
    try:
        return next(it).images.clone()
    finally:
        it.close()
        loader.close()


def loader_rate(cfg: CheckConfig, loader, batches: int) -> tuple[float, torch.Tensor]:
    """(images/s over `batches` batches after the first, the first batch's images on the CPU).
    Like tools/bench_loader.loader_img_s, but with the GPU synchronized around the timed batches
    (a DALI mixed batch is a copy still in flight when the loader yields it)."""
    it = _batches(loader)
    try:
        # start-up (pipeline build, first allocations) is not throughput; a copy, as the loader
        # recycles its output tensors
        first = next(it).images.to("cpu", copy=True)
        t0 = clock(cfg)
        n = sum(len(next(it).sample_ids) for _ in range(batches))
        return n / (clock(cfg) - t0), first
    finally:
        it.close()
        loader.close()


def decoders(cfg: CheckConfig) -> tuple[list[tuple[str, str, str]], dict]:
    """[(name, decoder, device)] that can run here, and {name: why not} for the others."""
    runs, skipped = [("pil", "pil", "cpu")], {}
    if not has("nvidia.dali"):
        return runs, {"dali_cpu": "DALI not installed", "dali_mixed": "DALI not installed"}
    runs.append(("dali_cpu", "dali", "cpu"))
    if cfg.cuda:
        runs.append(("dali_mixed", "dali", "gpu"))
    else:
        skipped["dali_mixed"] = "no CUDA"
    return runs, skipped


def decode(cfg: CheckConfig, data) -> dict:
    runs, skipped = decoders(cfg)
    res, firsts = {}, {}
    for name, decoder, device in runs:
        r = {"device": "gpu (nvJPEG)" if device == "gpu" else "cpu"}
        for batch in cfg.decode_batches:
            img_s, first = loader_rate(cfg, _loader(cfg, data, batch, decoder, device), cfg.timed_batches)
            r[f"img_s_b{batch}"] = round(img_s, 1)
            firsts.setdefault(name, first)
        res[name] = r
    for name in res:   # the same plan: the same crops, so only decoder rounding differs
        d = (firsts[name] - firsts["pil"]).abs()
        res[name].update(max_abs_diff_vs_pil=round(float(d.max()), 4), mean_abs_diff_vs_pil=round(float(d.mean()), 5))
    if "dali_mixed" in res:
        d = (firsts["dali_mixed"] - firsts["dali_cpu"]).abs()
        res["dali_mixed"]["max_abs_diff_vs_dali_cpu"] = round(float(d.max()), 4)
    b = cfg.decode_batches[-1]
    summary = ", ".join(f"{n} {r[f'img_s_b{b}']:.0f} img/s (mean diff to PIL {r['mean_abs_diff_vs_pil']:.4f})"
                        for n, r in res.items())
    off = [n for n, r in res.items() if r["mean_abs_diff_vs_pil"] >= MAX_MEAN_DIFF]
    return {"summary": f"batch {b}: {summary}" + "".join(f"; {n} skipped: {w}" for n, w in skipped.items()),
            "decoders": res, "skipped": skipped,
            "failed": f"{off}: mean |difference| to PIL >= {MAX_MEAN_DIFF}" if off else None}


def buffer_race(cfg: CheckConfig, data) -> dict:
    """The loader recycles its output tensors one batch late (pipeline/loader.py). Consume batches
    as a trainer does, with no sync: checksum each batch on arrival and again after the next one
    arrived (still valid by contract), clone it; then compare with a reference pass that syncs
    after every batch. Any difference is a batch read while DALI was still writing it."""
    runs, _ = decoders(cfg)
    name, decoder, device = runs[-1]   # the GPU path where there is one
    batch, n = cfg.decode_batches[0], cfg.timed_batches + 2

    def sums(x):
        return x.double().sum(dim=(1, 2, 3))

    loader, on_arrival, after_next, copies, held = _loader(cfg, data, batch, decoder, device), [], [], [], None
    it = _batches(loader)
    for _ in range(n):
        b = next(it)
        if held is not None:
            after_next.append(sums(held.images))
        on_arrival.append(sums(b.images))
        copies.append(b.images.clone())
        held = b
    it.close()
    loader.close()
    loader, ref = _loader(cfg, data, batch, decoder, device), []
    it = _batches(loader)
    for _ in range(n):
        x = next(it).images
        clock(cfg)
        ref.append(sums(x).cpu())
    it.close()
    loader.close()
    clock(cfg)
    bad = {"on_arrival": sum(not torch.equal(a.cpu(), r) for a, r in zip(on_arrival, ref)),
           "after_next": sum(not torch.equal(a.cpu(), r) for a, r in zip(after_next, ref)),
           "clones": sum(not torch.equal(sums(c).cpu(), r) for c, r in zip(copies, ref))}
    race = any(bad.values())
    return {"summary": f"{name}, {n} batches of {batch}: mismatches " + ", ".join(f"{k} {v}" for k, v in bad.items()),
            "decoder": name, "batches": n, "mismatches": bad, "race_free": not race,
            "failed": "batches read while the decoder was still writing them" if race else None}


@contextlib.contextmanager
def tf32(on: bool):
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def teacher_on(cfg: CheckConfig, strategy: str, device: str, weights: dict):
    """A teacher with the strategy's default source (gpa: momentum, no file needed) and `weights`."""
    from mimpipe.maskserver.teacher import Teacher, default_source
    t = Teacher(cfg.model, default_source(strategy), strategy=strategy, projector_hidden=None, device=device,
                img_size=cfg.img_size)
    if t.held:
        t.load_state({k: weights[k] for k in t.held}, version=0, step=0)
    return t


def _to_cpu(inp):
    """MaskInputs with every tensor field in fp32 on the CPU (the GPU's are bf16 under autocast)."""
    return dataclasses.replace(inp, **{f.name: getattr(inp, f.name).float().cpu() for f in dataclasses.fields(inp)
                                       if isinstance(getattr(inp, f.name), torch.Tensor)})


def teacher_parity(cfg: CheckConfig, data) -> dict:
    """Per strategy: the teacher's forward on CPU (fp32) and GPU (TF32 off / on, bf16 where the
    teacher autocasts), then the strategy on the CPU with the same generator for both: mask
    agreement measures the forward's numerics, not CUDA's other random stream."""
    if not cfg.cuda:
        raise Skip("no CUDA")
    from mimpipe.maskserver.strategies import STRATEGIES, get_strategy
    from mimpipe.maskserver.teacher import strategy_options
    from mimpipe.tools.bench_teacher import bench_options
    from mimpipe.train.model import create_model
    images = first_images(cfg, data, cfg.parity_batch)
    torch.manual_seed(0)
    weights = create_model(cfg.model, encoder_only=True, img_size=cfg.img_size).state_dict()
    res = {}
    for s in STRATEGIES:
        cpu, gpu = teacher_on(cfg, s, "cpu", weights), teacher_on(cfg, s, "cuda", weights)
        kw = bench_options(s, cpu.cfg.depth, cpu.cfg.num_heads)

        def masks(t, x):
            inp = _to_cpu(t.mask_inputs(x, s, block=kw.get("block"), progress=PROGRESS))
            return get_strategy(s)(inp, RATIO, generator=torch.Generator().manual_seed(0),
                                   **strategy_options(s, t.cfg, kw.get("options"))).mask
        ref = masks(cpu, images)
        res[s] = {}
        for on in (False, True):
            with tf32(on):
                same = masks(gpu, images.cuda()) == ref
                res[s][f"tf32_{'on' if on else 'off'}"] = round(float(same.float().mean()), 4)
    low = min(v for r in res.values() for v in r.values())
    return {"summary": f"{cfg.parity_batch} images; mask agreement CPU vs GPU, min {low:.4f}: " +
                       ", ".join(f"{s} {r['tf32_off']:.3f}/{r['tf32_on']:.3f}" for s, r in res.items()) +
                       " (TF32 off/on)", "agreement": res}


def throughput(cfg: CheckConfig, data) -> dict:
    """Student training step and teacher + strategy, images/s (bf16 autocast on CUDA, fp32 on the
    CPU), next to tools/profile.py's MAC model: trainers one teacher feeds = student / teacher MACs."""
    from mimpipe.tools.doctor import teacher_dtype
    from mimpipe.tools.profile import student_macs, teacher_macs
    from mimpipe.train.model import MaskedAutoencoderViT, model_config
    mc, dev, B = model_config(cfg.model, img_size=cfg.img_size), torch.device(cfg.device), cfg.train_batch
    amp = dict(device_type=cfg.device, dtype=torch.bfloat16, enabled=cfg.cuda)
    x = torch.randn(B, 3, mc.img_size, mc.img_size, device=dev, generator=torch.Generator(dev).manual_seed(0))
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(mc).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(g):
        with torch.autocast(**amp):
            loss, _, _ = model(x, mask_ratio=RATIO, generator=g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def rate(fn, n):
        fn(torch.Generator(dev).manual_seed(0))   # warm-up: allocations, kernel selection
        t0 = clock(cfg)
        for i in range(n):
            fn(torch.Generator(dev).manual_seed(i + 1))
        return n * B / (clock(cfg) - t0)
    res = {"dtype": "bf16" if cfg.cuda else "fp32", "batch": B,
           "student": {"img_s": round(rate(step, cfg.steps), 1), "gmac": round(student_macs(mc) / 1e9, 2)}}
    del model, opt
    weights = MaskedAutoencoderViT(mc, encoder_only=True).state_dict()
    for s in ("sbam", "gpa", "idm"):
        t = teacher_on(cfg, s, dev, weights)
        img_s = rate(lambda g: t.compute(x, s, ratio=RATIO, generator=g, progress=PROGRESS), cfg.steps)
        macs = teacher_macs(mc, s)
        res[s] = {"img_s": round(img_s, 1), "gmac": round(macs / 1e9, 3), "dtype": teacher_dtype(s, cfg.cuda),
                  "feeds_model": round(student_macs(mc) / macs, 1),
                  "feeds_measured": round(img_s / res["student"]["img_s"], 1)}
    res["summary"] = (f"batch {B}: student ({res['dtype']}) {res['student']['img_s']:.0f} img/s; teacher " +
                      ", ".join(f"{s} ({res[s]['dtype']}) {res[s]['img_s']:.0f} img/s (feeds "
                                f"{res[s]['feeds_measured']} measured / {res[s]['feeds_model']} MAC model)"
                                for s in ("sbam", "gpa", "idm")))
    return res
