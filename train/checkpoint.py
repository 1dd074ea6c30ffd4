"""Checkpoint files: written atomically with a digest of every tensor, read back as one line
naming the file for anything that is not a sound checkpoint.

A flipped byte inside a tensor loads without complaint from torch (its zip format checks no
data), trains on as NaN and is written back; so `save` stores `digest`, a SHA-256 over every
tensor's bytes, dtype and shape and every other value, and `load` recomputes it. Files without
one (MAE's releases, timm state dicts) load as they are.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

DIGEST = "digest"


def state_digest(obj: Any) -> str:
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"D%d" % len(obj))
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(b"L%d" % len(obj))
        for v in obj:
            _feed(h, v)
    else:
        h.update(repr(obj).encode())


def save_checkpoint(state: dict, path: Path) -> None:
    """state + its digest to path; a crash mid-save leaves the previous file as it was."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({**state, DIGEST: state_digest(state)}, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """-> the saved mapping, its digest checked where it has one; ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r}: no such file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file, not a checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))  # e.g. a training run's argparse args
        what = f"a pickled {found.group(1)}" if found else "objects other than tensors"
        raise ValueError(f"{path}: holds {what}, which weights_only loading refuses; "
                         f"re-save only {{'model': state_dict}}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:   # truncated, not a torch file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable checkpoint (truncated or damaged?): {first}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict")
    if DIGEST in state:
        want = state.pop(DIGEST)
        if state_digest(state) != want:
            raise ValueError(f"{path}: damaged: its tensors do not match the digest written with them "
                             f"(disk or copy corruption); use an earlier checkpoint")
    return state
