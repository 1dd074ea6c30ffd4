"""`mimpipe shard SRC OUT`: image folder or ImageNet -> validated WebDataset shards + DALI index.

Two passes. Pass 1 decodes every input once (in parallel) and journals what it found, so the
shard layout can balance bytes and shuffle across shards before a single shard is written.
Pass 2 writes shards (in parallel), each under a temporary name, renamed when complete.
`--resume` replays the journal and rewrites only shards that are not complete; since layout and
keys are pure functions of the inputs and options, the result equals an uninterrupted run.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mimpipe.pipeline.manifest import MANIFEST, SAMPLE_DTYPE, TABLE, Shard, write_manifest
from mimpipe.pipeline.remote import as_url
from mimpipe.tools.argtypes import nonneg_int, positive_int
from mimpipe.tools.imagecheck import BadImage, check_image
from mimpipe.tools.tario import finished_size, index_text, member_sizes_bytes, write_shard

PARTIAL = ".mimpipe-partial"
LABEL_HEADERS = {"filename", "file", "image", "imageid", "image_id", "path", "name"}
# Images with more pixels are downscaled to fit (counted as converted). 4 MP (2048 x 2048, 12 MB
# as decoded RGB) keeps every crop a pre-training plan draws oversampled: MAE's smallest RRC crop
# (20% of the area) of a 4 MP image is ~900 px wide, twice a 448-px model input, and ImageNet's
# photos (~0.1-0.5 MP) are far below it; a 144 MP photo would cost 432 MB per decode instead.
DEFAULT_MAX_PIXELS = 4 * 1024 * 1024
# the shard file prefix: a plain file name (load_manifest accepts nothing else), not hidden
NAME_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"


class ShardError(RuntimeError):
    pass


@dataclass(frozen=True)
class ShardConfig:
    name: str = "shard"
    shard_bytes: int | None = 1_000_000_000
    samples_per_shard: int | None = None
    workers: int = 1
    max_side: int | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    seed: int = 0


@dataclass(frozen=True)
class FileItem:
    """One input file. `read` returns its bytes and extra metadata for KEY.json. `problem`: why
    the file cannot be stored, found while scanning (skipped with that reason, never read)."""
    root: str
    relpath: str
    label: int
    class_name: str
    problem: str = ""

    def read(self) -> tuple[bytes, dict]:
        return (Path(self.root) / self.relpath).read_bytes(), {}


def sample_key(relpath: str) -> str:
    """Stable key from the source path alone: no dots (webdataset and DALI split the extension at
    the first dot), independent of the other inputs, the seed and the shard layout."""
    return hashlib.sha1(relpath.encode()).hexdigest()[:16]


# -- scanning ---------------------------------------------------------------------------------

def scan_folder(src: Path, labels: Path | None = None, classes: Path | None = None, *,
                exclude: Path | None = None):
    """-> (items sorted by relpath, class names, layout). Layouts: `labels` (flat folder + a
    `filename,label` file, ImageNet-val style), `classes` (one sub-folder per class, ImageNet-train
    style), `any` (every file below SRC, unlabeled, label -1). Hidden files and folders and
    `exclude` (OUT, when it lies inside SRC) are not scanned. A file whose name is not valid UTF-8
    becomes an item with a `problem` (skipped, its path shown with \\x escapes)."""
    src = Path(src)
    if not src.is_dir():
        raise ShardError(f"{src}: not a folder")
    skip_dir = None
    if exclude is not None:
        if Path(exclude).resolve() == src.resolve():
            raise ShardError(f"{exclude}: OUT is the source folder SRC; choose another OUT")
        skip_dir = Path(exclude).resolve()
    files, bad_names = [], []
    for dirpath, dirs, names in os.walk(src):
        if dirpath != str(src) and _is_dataset_folder(Path(dirpath), names):
            # an earlier run's OUT inside SRC: its shards are not inputs (nor its name a class)
            print(f"{dirpath}: holds mimpipe shards, not scanned", file=sys.stderr)
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if not d.startswith(".")
                   and (skip_dir is None or Path(dirpath, d).resolve() != skip_dir)]
        for n in names:
            p = os.path.join(dirpath, n)
            if n.startswith(".") or not os.path.isfile(p):
                continue
            rel = os.path.relpath(p, src)
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:   # undecodable bytes, kept by Python as surrogates
                bad_names.append(rel)
                continue
            files.append(rel.replace(os.sep, "/"))
    files.sort()
    if not files and not bad_names:
        raise ShardError(f"{src}: no files to shard (hidden files" + (" and OUT" if skip_dir else "")
                         + " are not scanned)")
    if labels is not None:
        files = [f for f in files if (src / f).resolve() != Path(labels).resolve()]
        by_file = _read_labels(Path(labels))
        names = _class_names(classes, set(by_file.values()))
        cls_of = lambda f: by_file.get(f, by_file.get(Path(f).stem))  # noqa: E731
        layout = "labels"
    elif files and all("/" in f for f in files):
        names = _class_names(classes, {f.split("/", 1)[0] for f in files})
        cls_of = lambda f: f.split("/", 1)[0]  # noqa: E731
        layout = "classes"
    else:
        names, cls_of, layout = [], (lambda f: None), "any"
    index = {n: i for i, n in enumerate(names)}
    items = []
    for f in files:
        c = cls_of(f)
        if c is not None and c not in index:
            raise ShardError(f"{src / f}: class {c!r} is not in the class list")
        items.append(FileItem(str(src), f, index.get(c, -1), c or ""))
    for rel in bad_names:
        shown = os.fsencode(rel).decode("utf-8", "backslashreplace").replace(os.sep, "/")
        items.append(FileItem(str(src), shown, -1, "", problem="file name is not valid UTF-8; rename it"))
    items.sort(key=lambda i: i.relpath)
    return items, names, layout


def _is_dataset_folder(folder: Path, names: list[str]) -> bool:
    return ({MANIFEST, TABLE} <= set(names)) or (folder / PARTIAL).is_dir()


def _read_labels(path: Path) -> dict[str, str]:
    """CSV `filename,label` (header optional) or whitespace `filename label`. In
    LOC_val_solution.csv the label column is 'n01751748 x0 y0 x1 y1 ...': the first word counts."""
    out = {}
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f) if path.suffix == ".csv" else (l.split() for l in f)):
            if not row or (n == 0 and row[0].strip().lower() in LABEL_HEADERS):
                continue
            if len(row) < 2 or not row[1].split():
                raise ShardError(f"{path}:{n + 1}: expected 'filename,label', got {row!r}")
            out[row[0].strip()] = row[1].split()[0]
    if not out:
        raise ShardError(f"{path}: no labels in the file")
    return out


def _class_names(classes: Path | None, seen: set[str]) -> list[str]:
    # sorted names = torchvision ImageFolder's indices (and ImageNet's: sorted wnids)
    return [l.strip() for l in open(classes) if l.strip()] if classes else sorted(seen)


# -- pass 1: check every input ----------------------------------------------------------------

def check_item(item, *, max_side: int | None, max_pixels: int | None = None) -> dict:
    if getattr(item, "problem", ""):
        return {"ok": False, "reason": item.problem}
    try:
        raw, extra = item.read()
        c = check_image(raw, max_side=max_side, max_pixels=max_pixels)
    except BadImage as e:
        return {"ok": False, "reason": str(e)}
    except OSError as e:
        return {"ok": False, "reason": f"unreadable: {e.strerror or e}"}
    meta = {"class": item.class_name, "label": item.label, "source": item.relpath,
            "width": c.width, "height": c.height, **extra}
    return {"ok": True, "label": item.label, "converted": c.converted, "why": c.why,
            "size": len(c.data), "stored": list(c.stored),
            "crc": zlib.crc32(c.data), "meta": json.dumps(meta, sort_keys=True, separators=(",", ":"))}


def _parts(item, rec: dict, max_side: int | None, max_pixels: int | None) -> dict[str, bytes]:
    raw, _ = item.read()
    data = check_image(raw, max_side=max_side, max_pixels=max_pixels).data if rec["converted"] else raw
    if len(data) != rec["size"] or zlib.crc32(data) != rec["crc"]:
        raise ShardError(f"{item.relpath}: input changed since it was checked; run again")
    return {"cls": str(item.label).encode(), "jpg": data, "json": rec["meta"].encode()}


# -- layout: which sample goes to which shard -------------------------------------------------

def sample_bytes(rec: dict) -> int:
    """Bytes one checked sample occupies in a tar (its .cls, .jpg and .json members)."""
    return member_sizes_bytes([len(str(rec["label"])), rec["size"], len(rec["meta"].encode())])


def layout_shards(records: list[dict], cfg: ShardConfig) -> list[np.ndarray]:
    """Sample ids (rows of `records`, all ok) per shard: a seeded permutation, so every shard is
    class-mixed for a reader that streams shards in order, cut by byte or sample budget."""
    order = np.random.default_rng(cfg.seed).permutation(len(records))
    if cfg.samples_per_shard:
        return [order[i:i + cfg.samples_per_shard] for i in range(0, len(order), cfg.samples_per_shard)]
    shards, cur, used = [], [], 0
    for i in order:
        b = sample_bytes(records[i])
        if cur and finished_size(used + b) > cfg.shard_bytes:
            shards.append(np.array(cur))
            cur, used = [], 0
        cur.append(i)
        used += b
    return shards + ([np.array(cur)] if cur else [])


# -- pass 2: one shard ------------------------------------------------------------------------

def write_one(task, *, max_side: int | None, max_pixels: int | None) -> tuple[int, list]:
    i, tar, pairs = task
    entries = write_shard(Path(tar), ((sample_key(it.relpath), _parts(it, rec, max_side, max_pixels))
                                      for it, rec in pairs))
    idx = Path(tar).with_suffix(".idx")
    idx.with_name(idx.name + ".tmp").write_text(index_text(entries))
    idx.with_name(idx.name + ".tmp").replace(idx)
    return i, entries


def _read_index(idx: Path) -> list[list[tuple]]:
    out = []
    for line in idx.read_text().splitlines()[1:]:
        f = line.split()
        out.append([(f[j], int(f[j + 1]), int(f[j + 2]), f[j + 3]) for j in range(0, len(f), 4)])
    return out


# -- the whole job ----------------------------------------------------------------------------

def shard_items(items, classes, out: Path, cfg: ShardConfig, *, resume: bool = False,
                source: str = "", progress: bool | None = None) -> dict:
    """Shard `items` (objects with .relpath, .label, .class_name, .read()) into `out`; returns the
    report (also written to out/report.json)."""
    t0 = time.perf_counter()
    out = Path(out)
    if not re.fullmatch(NAME_PATTERN, cfg.name):
        raise ShardError(f"shard name {cfg.name!r}: use letters, digits, '_', '-' or '.' (not first)")
    progress = sys.stderr.isatty() if progress is None else progress
    part = out / PARTIAL
    # workers change speed, not output: resuming with another count is fine
    job = {"config": {k: v for k, v in asdict(cfg).items() if k != "workers"}, "classes": list(classes),
           "inputs": hashlib.sha1("\n".join(f"{i.relpath}\t{i.label}" for i in items).encode()).hexdigest()}
    _prepare_out(out, part, job, cfg, resume)
    if (out / MANIFEST).exists():   # resumed after the last step: nothing to do
        return json.loads((out / "report.json").read_text())

    with _pool(cfg.workers) as pool:
        records = _check_all(items, part / "checked.jsonl", cfg, pool, progress)
        ok = [i for i, r in enumerate(records) if r["ok"]]
        written = [records[i] for i in ok]
        if not written:
            report = _report(items, records, ok, [], t0)
            (out / "report.json").write_text(json.dumps(report, indent=1))
            shutil.rmtree(part)
            raise ShardError(f"{source or out}: none of the {len(items)} files is an image that "
                             f"decodes; nothing written (reasons: {out / 'report.json'})")
        if len(set(sample_key(items[i].relpath) for i in ok)) != len(ok):
            raise ShardError("two inputs hash to the same key; rename one (this should never happen)")
        shards = layout_shards(written, cfg)
        width = max(6, len(str(len(shards) - 1)))
        tars = [out / f"{cfg.name}-{s:0{width}d}.tar" for s in range(len(shards))]
        entries = _write_all(shards, tars, ok, items, written, cfg, pool, progress)
    table = np.zeros(len(written), SAMPLE_DTYPE)
    for s, (ids, ents) in enumerate(zip(shards, entries)):
        comp = [{c[0]: c for c in bundle} for bundle in ents]
        table["shard"][ids] = s
        table["offset"][ids] = [c["jpg"][1] for c in comp]
        table["size"][ids] = [c["jpg"][2] for c in comp]
        table["meta_offset"][ids] = [c["json"][1] for c in comp]
        table["meta_size"][ids] = [c["json"][2] for c in comp]
    table["key"] = [sample_key(items[i].relpath).encode() for i in ok]
    table["label"] = [items[i].label for i in ok]
    table["width"], table["height"] = np.array([r["stored"] for r in written]).reshape(-1, 2).T
    # what the reader checks before any decoder sees the bytes (the journal's crc is of the
    # bytes that went into the tar: _parts verifies them again while writing)
    table["crc"] = [r["crc"] for r in written]
    table["meta_crc"] = [zlib.crc32(r["meta"].encode()) for r in written]
    shard_list = [Shard(t.name, t.with_suffix(".idx").name, len(ids), t.stat().st_size)
                  for t, ids in zip(tars, shards)]
    report = _report(items, records, ok, shard_list, t0, labeled=bool(classes))
    (out / "report.json").write_text(json.dumps(report, indent=1))
    write_manifest(out, name=cfg.name, classes=classes, shards=shard_list, table=table,
                   seed=cfg.seed, extra={"source": source, "options": job["config"], "inputs": job["inputs"]})
    shutil.rmtree(part)
    return report


def _report(items, records, ok, shard_list, t0, *, labeled: bool = False) -> dict:
    written = [records[i] for i in ok]
    # a labeled dataset (class list) whose sample has label -1: missing from --labels
    unlabeled = [items[i].relpath for i in ok if labeled and items[i].label < 0]
    report = {
        "inputs": len(items), "written": len(written),
        "converted": sum(r["converted"] for r in written),
        "skipped": [{"path": items[i].relpath, "reason": r["reason"]}
                    for i, r in enumerate(records) if not r["ok"]],
        "conversions": [{"path": items[i].relpath, "why": records[i]["why"]}
                        for i in ok if records[i]["converted"]],
        "unlabeled": len(unlabeled), "unlabeled_paths": unlabeled,
        "shards": len(shard_list), "bytes": sum(s.bytes for s in shard_list),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    assert report["inputs"] == report["written"] + len(report["skipped"])
    return report


def _prepare_out(out: Path, part: Path, job: dict, cfg: ShardConfig, resume: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        if (part / "job.json").exists() and json.loads((part / "job.json").read_text()) != job:
            raise ShardError(f"{out}: cannot resume: inputs or options differ from the interrupted "
                             f"run ({part / 'job.json'}); use the same command or a new OUT")
        if (out / MANIFEST).exists() and not (part / "job.json").exists():
            done = json.loads((out / MANIFEST).read_text())
            if (done.get("inputs"), done.get("options"), done.get("classes")) != \
                    (job["inputs"], job["config"], job["classes"]):
                raise ShardError(f"{out}: holds a finished dataset made from other inputs or "
                                 f"options; choose a new OUT")
            return
        if (part / "job.json").exists():
            return
    elif (out / MANIFEST).exists() and not part.exists():
        raise ShardError(f"{out}: already holds a complete dataset; choose another folder (or delete "
                         f"this one to build it again)")
    elif (out / MANIFEST).exists() or part.exists() or any(out.glob(f"{cfg.name}-*.tar")):
        raise ShardError(f"{out}: already holds shards; pass --resume to complete an interrupted "
                         f"run, or choose an empty folder")
    part.mkdir(exist_ok=True)
    (part / "job.json").write_text(json.dumps(job))


def _check_all(items, journal: Path, cfg: ShardConfig, pool, progress: bool) -> list[dict]:
    records, good = [], 0
    if journal.exists():   # keep the complete prefix; a torn last line is simply checked again
        for line in journal.read_bytes().splitlines(keepends=True):
            try:
                if not line.endswith(b"\n"):
                    break
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good += len(line)
        with open(journal, "r+b") as f:
            f.truncate(good)
    fn = partial(check_item, max_side=cfg.max_side, max_pixels=cfg.max_pixels)
    with open(journal, "a") as f, tqdm(total=len(items), initial=len(records), unit="img",
                                       desc="check", disable=not progress) as bar:
        for r in _map(pool, fn, items[len(records):], ordered=True):
            f.write(json.dumps(r) + "\n")
            records.append(r)
            bar.update()
    return records


def _write_all(shards, tars, ok, items, written, cfg: ShardConfig, pool, progress: bool) -> list:
    entries: list = [None] * len(shards)
    tasks = []
    for s, (ids, tar) in enumerate(zip(shards, tars)):
        body = sum(sample_bytes(written[i]) for i in ids)
        idx = tar.with_suffix(".idx")
        if tar.exists() and idx.exists() and tar.stat().st_size == finished_size(body):
            entries[s] = _read_index(idx)
        else:
            tasks.append((s, str(tar), [(items[ok[i]], written[i]) for i in ids]))
    fn = partial(write_one, max_side=cfg.max_side, max_pixels=cfg.max_pixels)
    with tqdm(total=len(shards), initial=len(shards) - len(tasks), unit="shard", desc="write",
              disable=not progress) as bar:
        for s, ents in _map(pool, fn, tasks, ordered=False):
            entries[s] = ents
            bar.update()
    return entries


@contextmanager
def _pool(workers: int):
    """One worker pool for both passes (None: work in this process)."""
    if workers <= 1:
        yield None
        return
    # spawn, not fork: callers (tests, the trainer) may hold DALI/torch threads a fork would copy
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield pool


def _map(pool, fn, tasks, *, ordered: bool):
    if pool is None or len(tasks) <= 1:
        return map(fn, tasks)
    chunk = max(1, min(64, len(tasks) // 16))   # a few chunks per worker keeps both busy
    return (pool.imap if ordered else pool.imap_unordered)(fn, tasks, chunksize=chunk)


def summary(report: dict, out: Path) -> str:
    mb = report["bytes"] / 1e6
    ips = report["written"] / max(report["seconds"], 1e-9)
    unlabeled = f", {report['unlabeled']} without a label (-1)" if report.get("unlabeled") else ""
    return (f"sharded {report['written']} images ({report['converted']} converted) into "
            f"{report['shards']} shards, {mb:.1f} MB, {ips:.0f} images/s, "
            f"{len(report['skipped'])} skipped{unlabeled} -> {out}")


def parse_size(s: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", s)
    if not m or m.group(2).upper() not in units or float(m.group(1)) <= 0:
        raise ValueError(f"bad size {s!r}: use e.g. 500MB, 1GB, 2GiB")
    return int(float(m.group(1)) * units[m.group(2).upper()])


def size_arg(s: str) -> int:
    """parse_size as an argparse type: a bad size is one line naming the flag, exit code 2."""
    try:
        return parse_size(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def shard_name(s: str) -> str:
    """--name: the prefix of every shard file, so a plain name (letters, digits, '_', '-', '.',
    not starting with '.'): the manifest loader accepts only plain file names inside the folder."""
    if not re.fullmatch(NAME_PATTERN, s):
        raise argparse.ArgumentTypeError(f"{s!r} is not allowed: expected letters, digits, '_', "
                                         f"'-' or '.' (not first)")
    return s


def add_arguments(p) -> None:
    p.add_argument("src", type=Path, help="image folder: class sub-folders, flat + --labels, or any")
    p.add_argument("out", help="output folder for shards, indexes and manifest (inside SRC is fine: "
                   "it is not scanned), or s3://bucket/prefix, gs://bucket/prefix: written to "
                   "--staging, then uploaded, the manifest last")
    p.add_argument("--labels", type=Path, help="CSV/TXT of filename,label (ImageNet val style)")
    p.add_argument("--classes", type=Path, help="class names, one per line (fixes label indices)")
    p.add_argument("--name", type=shard_name, default="shard", help="shard file prefix (default: shard)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--shard-size", type=size_arg, default=parse_size("1GB"),
                   help="bytes per shard, e.g. 500MB, 1GB (default 1GB)")
    g.add_argument("--samples-per-shard", type=positive_int)
    p.add_argument("--workers", type=positive_int, default=1, help="processes for read/validate/convert")
    p.add_argument("--max-side", type=positive_int, help="downscale images whose longer side exceeds this")
    p.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                   help=f"downscale images with more pixels than this (default {DEFAULT_MAX_PIXELS}, "
                        f"4 MP; the loader refuses more than 16 MP)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the cross-shard shuffle")
    p.add_argument("--resume", action="store_true", help="complete an interrupted run in OUT")
    p.add_argument("--staging", type=Path, help="local folder a remote OUT is written to before the "
                   "upload (default: mimpipe-staging-HASH in the temp folder; keep it for --resume)")


def main(args) -> int:
    url = as_url(args.out)
    out = staging_folder(url, args.staging) if url else Path(args.out)
    if url:
        _check_upload_target(url, args.resume)
    items, classes, layout = scan_folder(args.src, args.labels, args.classes, exclude=out)
    cfg = ShardConfig(name=args.name, shard_bytes=None if args.samples_per_shard else args.shard_size,
                      samples_per_shard=args.samples_per_shard, workers=args.workers,
                      max_side=args.max_side, max_pixels=args.max_pixels, seed=args.seed)
    inside = out.resolve().is_relative_to(args.src.resolve())
    print(f"{args.src}: {len(items)} files, layout '{layout}', {len(classes)} classes"
          + (f" ({out} not scanned)" if inside else ""), file=sys.stderr)
    if layout == "labels" and (missing := [i.relpath for i in items if i.label < 0 and not i.problem]):
        print(f"warning: {len(missing)} of {len(items)} files have no label in {args.labels} and get "
              f"label -1 (e.g. {missing[0]}); report.json lists them under 'unlabeled_paths'",
              file=sys.stderr)
    report = shard_items(items, classes, out, cfg, resume=args.resume, source=str(args.src))
    if url:
        upload_dataset(out, url)
    print(summary(report, url or out))
    return 0


def staging_folder(url: str, staging: Path | None) -> Path:
    """Where a dataset bound for `url` is written first: named after the URL, so rerunning the
    same command with --resume finds the interrupted run."""
    return staging or Path(tempfile.gettempdir()) / f"mimpipe-staging-{hashlib.sha1(url.encode()).hexdigest()[:12]}"


def _check_upload_target(url: str, resume: bool) -> None:
    from mimpipe.pipeline.remote import RemoteStore
    if not url.startswith(("s3://", "gs://", "gcs://")):
        raise ShardError(f"{url}: shards are uploaded to s3:// or gs:// only (HTTP servers are read-only here)")
    if RemoteStore(url).size(MANIFEST) is not None and not resume:
        raise ShardError(f"{url}: already holds a complete dataset; choose another prefix (or delete it)")


def upload_dataset(folder: Path, url: str) -> None:
    """Upload a finished dataset folder: shards and indexes, then report, table and manifest last."""
    from mimpipe.pipeline.remote import upload
    doc = json.loads((folder / MANIFEST).read_text())
    shards = [n for s in doc["shards"] for n in (s["file"], s["index"])]
    upload(folder, url, shards, ["report.json", TABLE, MANIFEST])
