"""Wire protocol between the mask server (ROUTER) and trainer ranks (DEALER). Pure: no sockets.

A message is a list of frames `[header, *array frames]`. The header is a msgpack map
    {"v": PROTOCOL_VERSION, "type": <one of SCHEMAS>, <that type's fields>,
     "arrays": [{"name", "dtype", "shape"}, ...]}    # one entry per array frame, in frame order
and each array frame is the raw little-endian bytes of a C-contiguous array (pyzmq `send_array`
style: `encode` returns memoryviews of the caller's arrays; the caller sends with copy=False and
must not mutate them until sent). No pickle anywhere. `decode` treats every frame as hostile: it
checks frame count, header size, msgpack limits, version, type, every field's type and bounds,
array names, dtypes, shapes (against the header's own fields) and byte sizes before it makes
read-only `np.frombuffer` views (no copies), then the per-type value checks. Any failure is a
`ProtocolError(code, message)` naming the field and value; nothing else escapes (fuzz-tested).

type       fields (int bounds inclusive)                              array frames
hello      rank [0,world_size), world_size [1,65536], plan_hash hex,  -
           cursor [epoch,step], restart_id id, credits [0,1024],
           optional run_id id; optional (what makes masks wrong when
           it differs, the server compares each) strategy id, model id,
           source online|momentum|frozen, ratio float [0,1), lut bool,
           targets [id] (per-image targets the trainer needs), epochs
welcome    server_id id, plan_hash hex, teacher_version [-1,..],      -
           strategy id, num_patches L [1,65536], cursor [epoch,step]
credit     rank, n [1,1024]                                           -
masks      rank, epoch, step, seq, checksum [0,2^64), n [1,65536],    mask uint8 [n, ceil(L/8)]
           teacher_version [-1,..], teacher_step [-1,..],             len_keep int16|int32 [n]
           num_patches L [1,65536]                                    optional: gpa_target F [n, L],
                                                                      lut_t1 + lut_t2 F [n, D],
                                                                      heads int64 [n]
weights    version, step, chunk [0,n_chunks), n_chunks [1,2^20],      data uint8 [this chunk's
           chunk_bytes [1,64 MiB], total_bytes [0,16 GiB],            length]
           sha256 (64 hex), tensors (chunk 0 only):
           [{name, dtype, shape, offset, nbytes}]
feedback   rank, epoch, step                                          head_loss_sum float32 [M],
                                                                      head_count int64 [M]
heartbeat  restart_id id                                              -
error      code id, message str (<= 4096 bytes)                       -
bye        optional cursor [epoch,step]: the next batch the trainer    -
           would have needed (>= [epochs, 0]: it finished its plan)
rank is in [0, 65536), other ints in [0, 2^63); id = [A-Za-z0-9_.:-]{1,64}; hex = [0-9a-f]{8,128};
F = float16|bf16|float32; D in [1, 16384]; M in [1, 4096]. MASKS: `seq` counts MASKS per rank (a
gap is a lost message), `checksum` is `checksum(sample ids)`, teacher_version/step -1 = no teacher
weights (random); `mask` is `pack_mask` of `[n, L] bool, True = masked` (numpy.packbits order,
padding bits 0), and `len_keep[i]` in [1, L] must equal row i's unmasked count. WEIGHTS: see
maskserver/weights.py (`weight_chunks`, `WeightAssembler`). Values are checked where cheap (len_keep, mask bits, heads,
feedback); float targets are not scanned for NaN (O(n*L) per batch; the trainer's loss sees them).
Unknown fields or arrays are rejected: a new field is a new PROTOCOL_VERSION.
HELLO's run_id names the training run (all its ranks, kept across --resume) and restart_id one
launch of it (all its ranks, new at every start): teacher weights belong to one (run_id,
restart_id), and a live rank is handed over only within its run (maskserver/server.py). Without
run_id the client is a run of its own (run_id = restart_id). Version 2 added run_id; version 3
HELLO's run description (strategy ... epochs), BYE's cursor and the RANKS code.
"""
from __future__ import annotations

import hashlib
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack
import numpy as np
import torch

PROTOCOL_VERSION = 3

# message types
HELLO = "hello"  # trainer -> server: register, or re-register after either side restarted
WELCOME = "welcome"  # server -> trainer: accepted; where the mask stream resumes
CREDIT = "credit"  # trainer -> server: the server may send n more MASKS
MASKS = "masks"  # server -> trainer: one batch of masks (+ per-image targets)
WEIGHTS = "weights"  # trainer -> server: one chunk of a teacher weight snapshot
FEEDBACK = "feedback"  # trainer -> server: per-head loss statistics for PLB
HEARTBEAT = "heartbeat"  # both ways when idle; any traffic counts as alive
ERROR = "error"  # both ways: a rejected message, or a fatal condition such as a plan mismatch
BYE = "bye"  # both ways: orderly goodbye; the server frees the rank's queue

# error codes (ProtocolError.code; the `code` of an ERROR message)
E_FRAMES, E_HEADER, E_VERSION, E_TYPE, E_FIELD = "FRAMES", "HEADER", "VERSION", "TYPE", "FIELD"
E_ARRAY, E_VALUE, E_WEIGHTS, E_INTERNAL = "ARRAY", "VALUE", "WEIGHTS", "INTERNAL"
E_PLAN, E_STATE = "PLAN", "STATE"  # not raised here: plan_hash mismatch, message out of sequence
# not raised here either (server -> trainer): the rank is held by another run or CURVE key (retry
# later); the rank's mask worker failed (HELLO restarts it); this launch was replaced by a newer one
E_BUSY, E_WORKER, E_REPLACED = "BUSY", "WORKER", "REPLACED"
# ... this server does not serve the rank (--ranks): a client with other servers listed tries them
E_RANKS = "RANKS"

# limits: everything a peer declares is checked against these before anything is allocated
MAX_HEADER_BYTES = 256 << 10  # hot-path headers are < 1 KiB; chunk 0's tensor table is the big one
MAX_FRAMES = 16  # header + arrays (masks uses at most 7)
MAX_ARRAY_BYTES = 64 << 20  # per array frame; set the socket's ZMQ_MAXMSGSIZE to match
MAX_NDIM = 8
MAX_STR = 4096  # msgpack max_str_len (bytes); also bounds ERROR messages
MAX_LIST = 4096  # msgpack max_array_len: shapes, the tensor table
MAX_MAP = 64  # msgpack max_map_len: the header and each descriptor
MAX_WORLD = 1 << 16
MAX_CREDITS = 1024
MAX_BATCH = 1 << 16  # images per MASKS message
MAX_PATCHES = 1 << 16  # L
MAX_DIM = 1 << 14  # D of LUT targets
MAX_HEADS = 4096  # M
MAX_COUNT = (1 << 63) - 1  # epochs, steps, seq, versions: int64-safe
MAX_WEIGHTS_BYTES = 16 << 30
MAX_CHUNKS = 1 << 20
WEIGHT_ALIGN = 64  # byte alignment of each tensor in a weight snapshot
DEFAULT_CHUNK_BYTES = 4 << 20

# wire dtype tags -> little-endian numpy dtypes; bf16 travels as its raw 2 bytes (numpy has none)
DTYPES = {"uint8": np.dtype("u1"), "int16": np.dtype("<i2"), "int32": np.dtype("<i4"),
          "int64": np.dtype("<i8"), "float16": np.dtype("<f2"), "bf16": np.dtype("<u2"),
          "float32": np.dtype("<f4")}
TORCH_DTYPES = {"uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
                "float16": torch.float16, "bf16": torch.bfloat16, "float32": torch.float32}
TORCH_TAGS = {v: k for k, v in TORCH_DTYPES.items()}
_NUMPY_TAGS = {(d.kind, d.itemsize): k for k, d in DTYPES.items() if k != "bf16"}
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)
_bitcount = getattr(np, "bitwise_count", _POPCOUNT.__getitem__)  # np.bitwise_count: numpy >= 2.0
_FLOATS = ("float16", "bf16", "float32")
_RESERVED = ("v", "type", "arrays")


class ProtocolError(Exception):
    """A message that breaks the protocol: `code` is one of the E_* codes, `message` says what."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message

    def frames(self) -> list:
        """This error as an ERROR message, ready to send back to the peer."""
        message = self.message.encode()[:MAX_STR].decode(errors="ignore")  # MAX_STR counts utf-8 bytes
        return encode(ERROR, {"code": self.code, "message": message})


def brief(v: Any) -> str:
    """repr of a peer-supplied value, truncated: error messages must not echo 4 KiB strings."""
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


# ---- field specs: check(name, value) raises ProtocolError naming the field and the value ----
@dataclass(frozen=True)
class Int:
    lo: int = 0
    hi: int = MAX_COUNT

    def check(self, name: str, v: Any) -> None:
        if type(v) is not int:  # bool is an int subclass, and msgpack gives True for `true`
            raise ProtocolError(E_FIELD, f"field {name!r} must be an int, got {brief(v)}")
        if not self.lo <= v <= self.hi:
            raise ProtocolError(E_FIELD, f"field {name!r} = {v} out of range [{self.lo}, {self.hi}]")


@dataclass(frozen=True)
class Str:
    pattern: str

    def check(self, name: str, v: Any) -> None:
        if type(v) is not str or not re.fullmatch(self.pattern, v):
            raise ProtocolError(E_FIELD, f"field {name!r} must be a string matching {self.pattern}, "
                                         f"got {brief(v)}")


@dataclass(frozen=True)
class Cursor:
    def check(self, name: str, v: Any) -> None:
        if type(v) is not list or len(v) != 2 or any(type(x) is not int or not 0 <= x <= MAX_COUNT
                                                       for x in v):
            raise ProtocolError(E_FIELD, f"field {name!r} must be [epoch, step], non-negative ints; got {brief(v)}")


@dataclass(frozen=True)
class Float:
    lo: float
    hi: float  # exclusive

    def check(self, name: str, v: Any) -> None:
        if type(v) is not float or not self.lo <= v < self.hi:
            raise ProtocolError(E_FIELD, f"field {name!r} must be a float in [{self.lo}, {self.hi}), got {brief(v)}")


@dataclass(frozen=True)
class Bool:
    def check(self, name: str, v: Any) -> None:
        if type(v) is not bool:
            raise ProtocolError(E_FIELD, f"field {name!r} must be true or false, got {brief(v)}")


@dataclass(frozen=True)
class Ids:
    def check(self, name: str, v: Any) -> None:
        if type(v) is not list or len(v) > 16 or not all(type(x) is str and re.fullmatch(_ID, x) for x in v):
            raise ProtocolError(E_FIELD, f"field {name!r} must be a list of at most 16 ids, got {brief(v)}")


def _shape(where: str, shape: Any) -> list[int]:
    if type(shape) is not list or len(shape) > MAX_NDIM or any(type(d) is not int or d < 0 for d in shape):
        raise ProtocolError(E_ARRAY, f"{where}: shape must be a list of at most {MAX_NDIM} non-negative "
                                     f"ints, got {brief(shape)}")
    return shape


@dataclass(frozen=True)
class TensorTable:
    """Chunk 0's [{name, dtype, shape, offset, nbytes}]: where each tensor lies in the snapshot."""
    KEYS = frozenset(("name", "dtype", "shape", "offset", "nbytes"))

    def check(self, name: str, v: Any) -> None:
        if type(v) is not list:
            raise ProtocolError(E_FIELD, f"field {name!r} must be a list of tensor entries, got {brief(v)}")
        seen = set()
        for i, e in enumerate(v):
            if type(e) is not dict or set(e) != self.KEYS:
                raise ProtocolError(E_FIELD, f"{name}[{i}] must be a map of {sorted(self.KEYS)}, got {brief(e)}")
            n, tag = e["name"], e["dtype"]
            if type(n) is not str or not 0 < len(n) <= 256 or not n.isprintable() or n in seen:
                raise ProtocolError(E_FIELD, f"{name}[{i}].name must be a unique printable str, got {brief(n)}")
            seen.add(n)
            if tag not in tuple(DTYPES):
                raise ProtocolError(E_FIELD, f"tensor {n!r}: dtype {brief(tag)} not allowed; "
                                             f"choose from {', '.join(DTYPES)}")
            shape = _shape(f"tensor {n!r}", e["shape"])
            for k in ("offset", "nbytes"):
                Int(0, MAX_WEIGHTS_BYTES).check(f"tensor {n!r} {k}", e[k])
            size = DTYPES[tag].itemsize
            if e["nbytes"] != math.prod(shape) * size or e["offset"] % size:
                raise ProtocolError(E_FIELD, f"tensor {n!r}: shape {shape} x {tag} does not fit nbytes "
                                             f"{e['nbytes']} at offset {e['offset']}")


@dataclass(frozen=True)
class ArraySpec:
    dtypes: tuple[str, ...]
    dims: tuple[str, ...]  # symbols: fixed by the header's fields (Schema.dims), or free (FREE_DIMS)
    required: bool = True


FREE_DIMS = {"D": (1, MAX_DIM), "M": (1, MAX_HEADS)}  # free: set by the first array, then equal


@dataclass(frozen=True)
class Schema:
    fields: dict[str, Any]
    arrays: dict[str, ArraySpec] = field(default_factory=dict)
    optional: dict[str, Any] = field(default_factory=dict)
    dims: Callable[[dict], dict[str, int]] | None = None  # fields -> fixed dims (may raise)
    check: Callable[[dict, dict], None] | None = None  # (fields, arrays) -> None, value checks


def _check_hello(f: dict, a: dict) -> None:
    if f["rank"] >= f["world_size"]:
        raise ProtocolError(E_FIELD, f"field 'rank' = {f['rank']} >= world_size {f['world_size']}")


def _masks_dims(f: dict) -> dict[str, int]:
    return {"n": f["n"], "L": f["num_patches"], "B": (f["num_patches"] + 7) // 8}


def _check_masks(f: dict, a: dict) -> None:
    L, mask, len_keep = f["num_patches"], a["mask"], a["len_keep"].astype(np.int64)
    lo, hi = int(len_keep.min()), int(len_keep.max())
    if lo < 1 or hi > L:
        raise ProtocolError(E_VALUE, f"len_keep must be in [1, num_patches={L}], got min {lo}, max {hi}")
    pad = (-L) % 8  # pack_mask's zero tail sits in the low bits of the last byte
    if pad and (mask[:, -1] & ((1 << pad) - 1)).any():
        raise ProtocolError(E_VALUE, f"mask padding bits past num_patches={L} must be 0")
    visible = L - _bitcount(mask).sum(axis=1, dtype=np.int64)
    bad = np.flatnonzero(visible != len_keep)
    if bad.size:
        i = int(bad[0])
        raise ProtocolError(E_VALUE, f"image {i}: mask keeps {visible[i]} patches but "
                                     f"len_keep[{i}] = {len_keep[i]}")
    if ("lut_t1" in a) != ("lut_t2" in a):
        raise ProtocolError(E_ARRAY, "arrays 'lut_t1' and 'lut_t2' travel together; got only one")
    if "heads" in a and not 0 <= int(a["heads"].min()) <= int(a["heads"].max()) < MAX_HEADS:
        raise ProtocolError(E_VALUE, f"heads must be in [0, {MAX_HEADS}), "
                                     f"got {a['heads'].min()}..{a['heads'].max()}")


def _weights_dims(f: dict) -> dict[str, int]:
    total, size, chunk = f["total_bytes"], f["chunk_bytes"], f["chunk"]
    if f["n_chunks"] != max(1, -(-total // size)) or chunk >= f["n_chunks"]:
        raise ProtocolError(E_FIELD, f"chunk {chunk} of n_chunks {f['n_chunks']} does not fit total_bytes "
                                     f"{total} in chunks of {size}")
    return {"chunk_len": max(0, min(size, total - chunk * size))}


def _check_weights(f: dict, a: dict) -> None:
    if (f["chunk"] == 0) != ("tensors" in f):
        raise ProtocolError(E_FIELD, f"field 'tensors' belongs in chunk 0 only (this is chunk {f['chunk']})")
    end = 0
    for e in sorted(f.get("tensors", ()), key=lambda e: e["offset"]):
        if e["offset"] < end or e["offset"] + e["nbytes"] > f["total_bytes"]:
            raise ProtocolError(E_FIELD, f"tensor {e['name']!r} at offset {e['offset']} (+{e['nbytes']}) "
                                         f"overlaps another or passes total_bytes {f['total_bytes']}")
        end = e["offset"] + e["nbytes"]


def _check_feedback(f: dict, a: dict) -> None:
    if (a["head_count"] < 0).any() or not np.isfinite(a["head_loss_sum"]).all():
        raise ProtocolError(E_VALUE, "head_count must be >= 0 and head_loss_sum finite")


_ID, _HEX = r"[A-Za-z0-9_.:-]{1,64}", r"[0-9a-f]{8,128}"
_RANK, _STEP, _VERSION = Int(0, MAX_WORLD - 1), Int(), Int(-1)
SCHEMAS: dict[str, Schema] = {
    HELLO: Schema({"rank": _RANK, "world_size": Int(1, MAX_WORLD), "plan_hash": Str(_HEX),
                   "cursor": Cursor(), "restart_id": Str(_ID), "credits": Int(0, MAX_CREDITS)},
                  optional={"run_id": Str(_ID), "strategy": Str(_ID), "model": Str(_ID),
                            "source": Str("online|momentum|frozen"), "ratio": Float(0.0, 1.0), "lut": Bool(),
                            "targets": Ids(), "epochs": Int(1)}, check=_check_hello),
    WELCOME: Schema({"server_id": Str(_ID), "plan_hash": Str(_HEX), "teacher_version": _VERSION,
                     "strategy": Str(_ID), "num_patches": Int(1, MAX_PATCHES), "cursor": Cursor()}),
    CREDIT: Schema({"rank": _RANK, "n": Int(1, MAX_CREDITS)}),
    MASKS: Schema({"rank": _RANK, "epoch": _STEP, "step": _STEP, "seq": _STEP,
                   "checksum": Int(0, (1 << 64) - 1), "teacher_version": _VERSION, "teacher_step": _VERSION,
                   "n": Int(1, MAX_BATCH), "num_patches": Int(1, MAX_PATCHES)},
                  {"mask": ArraySpec(("uint8",), ("n", "B")), "len_keep": ArraySpec(("int16", "int32"), ("n",)),
                   "gpa_target": ArraySpec(_FLOATS, ("n", "L"), False),
                   "lut_t1": ArraySpec(_FLOATS, ("n", "D"), False),
                   "lut_t2": ArraySpec(_FLOATS, ("n", "D"), False),
                   "heads": ArraySpec(("int64",), ("n",), False)},
                  dims=_masks_dims, check=_check_masks),
    WEIGHTS: Schema({"version": Int(), "step": _STEP, "chunk": Int(0, MAX_CHUNKS - 1),
                     "n_chunks": Int(1, MAX_CHUNKS), "chunk_bytes": Int(1, MAX_ARRAY_BYTES),
                     "total_bytes": Int(0, MAX_WEIGHTS_BYTES), "sha256": Str(r"[0-9a-f]{64}")},
                    {"data": ArraySpec(("uint8",), ("chunk_len",))},
                    optional={"tensors": TensorTable()}, dims=_weights_dims, check=_check_weights),
    FEEDBACK: Schema({"rank": _RANK, "epoch": _STEP, "step": _STEP},
                     {"head_loss_sum": ArraySpec(("float32",), ("M",)),
                      "head_count": ArraySpec(("int64",), ("M",))}, check=_check_feedback),
    HEARTBEAT: Schema({"restart_id": Str(_ID)}),
    ERROR: Schema({"code": Str(_ID), "message": Str(r"(?s).*")}),
    BYE: Schema({}, optional={"cursor": Cursor()}),
}


@dataclass(frozen=True)
class Message:
    """A decoded, validated message. `arrays` are read-only views of the frames (bf16: raw uint16)."""
    type: str
    fields: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)  # array name -> wire dtype tag

    def tensor(self, name: str) -> torch.Tensor:
        """`arrays[name]` as a torch tensor of its wire dtype (bf16 included), sharing the frame."""
        a = self.arrays[name]
        if not a.flags.aligned:  # libzmq gives no alignment promise; torch wants aligned data
            a = a.copy()
        if self.dtypes[name] == "bf16":
            a = a.view(np.int16)
        with warnings.catch_warnings():  # read-only on purpose: the frame is shared, do not write
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            t = torch.from_numpy(a)
        return t.view(torch.bfloat16) if self.dtypes[name] == "bf16" else t


def _plain(v: Any) -> Any:
    """msgpack `default`: numpy scalars and small arrays in fields become plain Python values."""
    if isinstance(v, (np.generic, np.ndarray)):
        return v.tolist()
    raise TypeError(f"cannot serialize {type(v).__name__}")


def _wire(name: str, a: Any) -> tuple[str, np.ndarray]:
    """An array or tensor -> (dtype tag, its bytes as a flat uint8 array), a view when contiguous."""
    if isinstance(a, torch.Tensor):
        tag = TORCH_TAGS.get(a.dtype)
    elif isinstance(a, np.ndarray):
        tag = _NUMPY_TAGS.get((a.dtype.kind, a.dtype.itemsize))
    else:
        raise ProtocolError(E_ARRAY, f"array {name!r} must be a numpy array or torch tensor, "
                                     f"got {type(a).__name__}")
    if tag is None:
        raise ProtocolError(E_ARRAY, f"array {name!r}: dtype {a.dtype} not allowed; "
                                     f"choose from {', '.join(DTYPES)}")
    if isinstance(a, torch.Tensor):  # .cpu() copies only a GPU tensor; numpy has no bf16: ship raw bits
        a = a.detach().cpu()
        a = (a.view(torch.int16) if tag == "bf16" else a).numpy()
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))  # no copy if already C-contiguous LE
    return tag, a.reshape(-1).view(np.uint8)


def encode(msg_type: str, fields: dict[str, Any], arrays: dict[str, Any] | None = None, *,
           check: bool = True) -> list:
    """Message -> frames `[header bytes, *memoryviews of the arrays]`; send with copy=False.

    Zero-copy for C-contiguous CPU arrays/tensors. With `check` (default), the frames are run
    through `decode`, so a sender gets the receiver's ProtocolError instead of sending junk.
    """
    descs, frames = [], []
    for name, a in (arrays or {}).items():
        tag, flat = _wire(name, a)
        descs.append({"name": name, "dtype": tag, "shape": [int(d) for d in a.shape]})
        frames.append(memoryview(flat))
    reserved = [k for k in _RESERVED if k in fields]
    if reserved:
        raise ProtocolError(E_FIELD, f"{msg_type}: fields may not be named {reserved}")
    header = {"v": PROTOCOL_VERSION, "type": msg_type, **fields, **({"arrays": descs} if descs else {})}
    try:
        out = [msgpack.packb(header, default=_plain), *frames]
    except Exception as e:
        raise ProtocolError(E_FIELD, f"{msg_type}: cannot pack fields: {e}") from None
    if check:
        decode(out)
    return out


def _buffer(frame: Any, i: int) -> memoryview:
    try:
        view = memoryview(frame)
        return (view if view.format == "B" and view.ndim == 1 else view.cast("B")).toreadonly()
    except (TypeError, ValueError):
        raise ProtocolError(E_FRAMES, f"frame {i} is not a contiguous buffer: {type(frame).__name__}") \
            from None


def decode(frames: list | tuple) -> Message:
    """Frames (bytes, memoryview or zmq.Frame) -> a validated Message, or ProtocolError; never else."""
    try:
        return _decode(frames)
    except ProtocolError:
        raise
    except Exception as e:  # a decoder bug must not kill the server; the fuzz tests assert it never fires
        raise ProtocolError(E_INTERNAL, f"decoder failed: {type(e).__name__}: {brief(str(e))}") from None


def _decode(frames: Any) -> Message:
    if not isinstance(frames, (list, tuple)) or not 1 <= len(frames) <= MAX_FRAMES:
        n = len(frames) if isinstance(frames, (list, tuple)) else type(frames).__name__
        raise ProtocolError(E_FRAMES, f"a message is a list of 1..{MAX_FRAMES} frames, got {n}")
    head = _buffer(frames[0], 0)
    if head.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(E_HEADER, f"header is {head.nbytes} bytes, limit {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True, max_str_len=MAX_STR, max_bin_len=0,
                                 max_ext_len=0, max_array_len=MAX_LIST, max_map_len=MAX_MAP)
    except Exception as e:
        raise ProtocolError(E_HEADER, f"header is not valid msgpack: {brief(str(e))}") from None
    if type(header) is not dict:
        raise ProtocolError(E_HEADER, f"header must be a msgpack map, got {type(header).__name__}")
    v = header.get("v")
    if type(v) is not int or v != PROTOCOL_VERSION:
        raise ProtocolError(E_VERSION, f"peer speaks protocol version {brief(v)}, "
                                       f"this side speaks {PROTOCOL_VERSION}")
    mtype = header.get("type")
    schema = SCHEMAS.get(mtype) if type(mtype) is str else None
    if schema is None:
        raise ProtocolError(E_TYPE, f"unknown message type {brief(mtype)}; "
                                    f"expected one of {', '.join(SCHEMAS)}")
    fields = {k: val for k, val in header.items() if k not in _RESERVED}
    unknown = [k for k in fields if k not in schema.fields and k not in schema.optional]
    if unknown:
        raise ProtocolError(E_FIELD, f"{mtype}: unknown field {brief(unknown[0])}")
    for name, spec in schema.fields.items():
        if name not in fields:
            raise ProtocolError(E_FIELD, f"{mtype}: missing field {name!r}")
        spec.check(name, fields[name])
    for name, spec in schema.optional.items():
        if name in fields:
            spec.check(name, fields[name])
    arrays, dtypes = _arrays(mtype, schema, header.get("arrays", []), frames,
                             schema.dims(fields) if schema.dims else {})
    if schema.check:
        schema.check(fields, arrays)
    return Message(mtype, fields, arrays, dtypes)


def _arrays(mtype: str, schema: Schema, descs: Any, frames: Any, fixed: dict[str, int]):
    if type(descs) is not list or len(descs) != len(frames) - 1:
        n = len(descs) if type(descs) is list else brief(descs)
        raise ProtocolError(E_FRAMES, f"{mtype}: header declares {n} arrays, "
                                      f"message has {len(frames) - 1} array frames")
    arrays, dtypes, free = {}, {}, {}
    for i, desc in enumerate(descs, 1):
        if type(desc) is not dict or set(desc) != {"name", "dtype", "shape"}:
            raise ProtocolError(E_ARRAY, f"array descriptor {i} must be a map of name, dtype, shape; "
                                         f"got {brief(desc)}")
        name, tag = desc["name"], desc["dtype"]
        spec = schema.arrays.get(name) if type(name) is str else None
        if spec is None or name in arrays:
            what = "unknown" if spec is None else "duplicate"
            raise ProtocolError(E_ARRAY, f"{mtype}: {what} array {brief(name)}; "
                                         f"expected {', '.join(schema.arrays) or 'none'}")
        if tag not in spec.dtypes:
            raise ProtocolError(E_ARRAY, f"array {name!r}: dtype {brief(tag)} not allowed; "
                                         f"expected {', '.join(spec.dtypes)}")
        shape = _shape(f"array {name!r}", desc["shape"])
        if len(shape) != len(spec.dims):
            raise ProtocolError(E_ARRAY, f"array {name!r}: shape {shape} must be [{', '.join(spec.dims)}]")
        for sym, d in zip(spec.dims, shape):
            want = fixed.get(sym, free.get(sym))
            if want is None and not FREE_DIMS[sym][0] <= d <= FREE_DIMS[sym][1]:
                raise ProtocolError(E_ARRAY, f"array {name!r}: {sym} = {d} out of range {list(FREE_DIMS[sym])}")
            if want is not None and d != want:
                raise ProtocolError(E_ARRAY, f"array {name!r}: shape {shape} must be [{', '.join(spec.dims)}] "
                                             f"with {sym} = {want}, got {d}")
            free.setdefault(sym, d)
        view = _buffer(frames[i], i)
        nbytes = math.prod(shape) * DTYPES[tag].itemsize  # Python ints: no overflow, nothing allocated
        if nbytes != view.nbytes or nbytes > MAX_ARRAY_BYTES:
            raise ProtocolError(E_ARRAY, f"array {name!r}: shape {shape} of {tag} is {nbytes} bytes but "
                                         f"its frame has {view.nbytes} (limit {MAX_ARRAY_BYTES})")
        arrays[name], dtypes[name] = np.frombuffer(view, DTYPES[tag]).reshape(shape), tag
    missing = [n for n, s in schema.arrays.items() if s.required and n not in arrays]
    if missing:
        raise ProtocolError(E_ARRAY, f"{mtype}: missing array {missing[0]!r}")
    return arrays, dtypes


def checksum(sample_ids: Any) -> int:
    """Fingerprint of a batch's sample ids, in batch order: blake2b (8-byte digest) of the ids as
    int64 little-endian bytes, read as an unsigned little-endian int in [0, 2^64). 64 bits rather
    than crc32 so that a misaligned batch is not missed once in 4e9; ~1 us for 256 ids."""
    ids = np.asarray(sample_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"checksum: sample ids must be a 1-D integer array, "
                         f"got {ids.dtype} {list(ids.shape)}")
    ids = np.ascontiguousarray(ids, dtype="<i8")
    return int.from_bytes(hashlib.blake2b(ids, digest_size=8).digest(), "little")
