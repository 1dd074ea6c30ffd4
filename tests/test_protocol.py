"""Tests for maskserver/protocol.py: round trips, zero copy, every validation rule, fuzzing, weights."""
from __future__ import annotations

import copy
import hashlib
import tracemalloc

import msgpack
import numpy as np
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mimpipe.maskserver import protocol as P
from mimpipe.maskserver.protocol import (
    BYE, CREDIT, ERROR, FEEDBACK, HEARTBEAT, HELLO, MASKS, PROTOCOL_VERSION, WEIGHTS, WELCOME,
    Message, ProtocolError, checksum, decode, encode,
)
from mimpipe.maskserver.weights import WeightAssembler, weight_chunks
from mimpipe.maskserver.strategies import pack_mask, random_mask

N, L, D, M = 8, 20, 6, 4  # L = 20: 3 mask bytes per image, 4 padding bits
HEX = "0123abcd" * 4


def masks_arrays(rng: np.random.Generator, n: int = N, L: int = L) -> dict:
    len_keep = rng.integers(1, L + 1, n)
    mask = np.ones((n, L), bool)
    for i, k in enumerate(len_keep):
        mask[i, rng.permutation(L)[:k]] = False
    return {"mask": np.packbits(mask, axis=1), "len_keep": len_keep.astype(np.int16),
            "gpa_target": torch.randn(n, L).to(torch.bfloat16),
            "lut_t1": rng.standard_normal((n, D)).astype(np.float16),
            "lut_t2": torch.randn(n, D, dtype=torch.float32), "heads": rng.integers(0, 12, n)}


def valid(mtype: str) -> tuple[dict, dict]:
    """A valid (fields, arrays) of every type; WEIGHTS is a whole one-chunk snapshot."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 100, dtype=np.uint8)
    return {
        HELLO: ({"rank": 1, "world_size": 4, "plan_hash": HEX, "cursor": [2, 17], "restart_id": "trainer-1.a9f3",
                 "credits": 4, "run_id": "run-7f3a", "strategy": "gpa", "model": "mae_vit_base_patch16",
                 "source": "momentum", "ratio": 0.75, "lut": False, "targets": ["gpa_target"], "epochs": 800}, {}),
        WELCOME: ({"server_id": "srv-77", "plan_hash": HEX, "teacher_version": 3, "strategy": "gpa",
                   "num_patches": L, "cursor": [2, 17]}, {}),
        CREDIT: ({"rank": 1, "n": 2}, {}),
        MASKS: ({"rank": 1, "epoch": 2, "step": 17, "seq": 40, "checksum": 2**64 - 1, "teacher_version": 3,
                 "teacher_step": 15, "n": N, "num_patches": L}, masks_arrays(rng)),
        WEIGHTS: ({"version": 1, "step": 10, "chunk": 0, "n_chunks": 1, "chunk_bytes": 128, "total_bytes": 100,
                   "sha256": hashlib.sha256(data).hexdigest(),
                   "tensors": [{"name": "w", "dtype": "float32", "shape": [5, 5], "offset": 0, "nbytes": 100}]},
                  {"data": data}),
        FEEDBACK: ({"rank": 1, "epoch": 2, "step": 17}, {"head_loss_sum": rng.random(M, dtype=np.float32),
                                                         "head_count": rng.integers(0, 9, M)}),
        HEARTBEAT: ({"restart_id": "srv-77"}, {}),
        ERROR: ({"code": "PLAN", "message": "plan_hash mismatch: é"}, {}),
        BYE: ({"cursor": [800, 0]}, {}),
    }[mtype]


def as_numpy(a) -> np.ndarray:
    return a.view(torch.int16).numpy() if a.dtype == torch.bfloat16 else np.asarray(a)


def assert_same(msg: Message, mtype: str, fields: dict, arrays: dict) -> None:
    assert msg.type == mtype and msg.fields == fields
    assert list(msg.arrays) == list(arrays)
    for name, a in arrays.items():
        t = msg.tensor(name)
        want = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))
        assert t.dtype == want.dtype and t.shape == want.shape, name
        assert msg.arrays[name].tobytes() == as_numpy(a).tobytes(), name
        assert not msg.arrays[name].flags.writeable


TYPES = [HELLO, WELCOME, CREDIT, MASKS, WEIGHTS, FEEDBACK, HEARTBEAT, ERROR, BYE]


@pytest.mark.parametrize("mtype", TYPES)
def test_round_trip_every_type(mtype):
    fields, arrays = valid(mtype)
    frames = encode(mtype, fields, arrays)
    assert len(frames) == 1 + len(arrays)
    assert_same(decode(frames), mtype, fields, arrays)
    assert_same(decode([bytes(f) for f in frames]), mtype, fields, arrays)  # as if off the wire
    odd = [frames[0]] + [memoryview(bytearray(b"?") + bytes(f))[1:] for f in frames[1:]]  # misaligned
    assert_same(decode(odd), mtype, fields, arrays)


def test_masks_from_the_strategies_decode():
    """pack_mask's bit order and the decoder's popcount/padding checks agree (odd L, int32 len_keep)."""
    mask = random_mask(5, 49, 0.75, generator=torch.Generator().manual_seed(0))
    fields = {**valid(MASKS)[0], "n": 5, "num_patches": 49}
    msg = decode(encode(MASKS, fields, {"mask": pack_mask(mask), "len_keep": (~mask).sum(1).to(torch.int32)}))
    assert msg.tensor("len_keep").tolist() == [12] * 5
    assert np.array_equal(np.unpackbits(msg.arrays["mask"], axis=1, count=49).astype(bool), mask.numpy())


def test_encode_is_zero_copy_and_decode_makes_views():
    keep_first = np.ones((N, L), bool)
    keep_first[:, 0] = False
    arrays = {"mask": np.packbits(keep_first, axis=1), "len_keep": torch.ones(N, dtype=torch.int32),
              "gpa_target": torch.randn(N, L).to(torch.bfloat16)}
    fields = valid(MASKS)[0]
    frames = encode(MASKS, fields, arrays)
    assert np.shares_memory(np.frombuffer(frames[1], np.uint8), arrays["mask"])
    assert np.frombuffer(frames[2], np.uint8).ctypes.data == arrays["len_keep"].data_ptr()
    assert np.frombuffer(frames[3], np.uint8).ctypes.data == arrays["gpa_target"].data_ptr()  # bf16 too
    msg = decode(frames)
    assert np.shares_memory(msg.arrays["mask"], arrays["mask"])  # decode: views of the frames
    assert msg.tensor("gpa_target").data_ptr() == arrays["gpa_target"].data_ptr()
    # not C-contiguous: copied once, still the same values
    t = torch.randn(L, N).t()
    assert torch.equal(decode(encode(MASKS, fields, {**arrays, "gpa_target": t})).tensor("gpa_target"), t)


def test_encode_checks_its_input():
    fields, arrays = valid(MASKS)
    with pytest.raises(ProtocolError, match="dtype float64 not allowed"):
        encode(MASKS, fields, {**arrays, "gpa_target": np.zeros((N, L))})
    with pytest.raises(ProtocolError, match="dtype torch.float64 not allowed"):
        encode(MASKS, fields, {**arrays, "lut_t1": torch.zeros(N, D, dtype=torch.float64)})
    with pytest.raises(ProtocolError, match="must be a numpy array or torch tensor, got list"):
        encode(MASKS, fields, {**arrays, "heads": [0] * N})
    with pytest.raises(ProtocolError, match="'type'"):
        encode(MASKS, {**fields, "type": "x"}, arrays)
    with pytest.raises(ProtocolError, match="missing field 'seq'"):
        encode(MASKS, {k: v for k, v in fields.items() if k != "seq"}, arrays)
    assert decode(encode(MASKS, {**fields, "step": np.int64(17)}, arrays)).fields["step"] == 17  # numpy ints ok


# ---------------------------------------------------------------- every validation rule


def parts(mtype: str) -> tuple[dict, list]:
    frames = encode(mtype, *valid(mtype))
    return msgpack.unpackb(frames[0]), [bytes(f) for f in frames[1:]]


def desc(h: dict, name: str) -> dict:
    return next(d for d in h["arrays"] if d["name"] == name)


def put(h: dict, f: list, name: str, a: np.ndarray) -> None:
    i = [d["name"] for d in h["arrays"]].index(name)
    f[i] = np.ascontiguousarray(a).tobytes()
    desc(h, name)["shape"] = list(a.shape)


def mask_of(h: dict, f: list) -> np.ndarray:
    return np.frombuffer(f[0], np.uint8).reshape(desc(h, "mask")["shape"]).copy()


CASES = [  # (id, type, edit(header, array frames), code, words the message must contain)
    ("version", HELLO, lambda h, f: h.update(v=1), "VERSION", ["version 1", f"speaks {PROTOCOL_VERSION}"]),
    ("hello-ratio-int", HELLO, lambda h, f: h.update(ratio=1), "FIELD", ["'ratio'", "float"]),
    ("hello-lut-int", HELLO, lambda h, f: h.update(lut=1), "FIELD", ["'lut'", "true or false"]),
    ("hello-targets", HELLO, lambda h, f: h.update(targets=["gpa target"]), "FIELD", ["'targets'"]),
    ("hello-source", HELLO, lambda h, f: h.update(source="frozen:/x"), "FIELD", ["'source'"]),
    ("bye-cursor", BYE, lambda h, f: h.update(cursor=[1]), "FIELD", ["'cursor'"]),
    ("no-version", HELLO, lambda h, f: h.pop("v"), "VERSION", ["None"]),
    ("bool-version", HELLO, lambda h, f: h.update(v=True), "VERSION", ["True"]),
    ("unknown-type", HELLO, lambda h, f: h.update(type="nope"), "TYPE", ["'nope'", "hello"]),
    ("missing-field", MASKS, lambda h, f: h.pop("step"), "FIELD", ["missing field 'step'"]),
    ("wrong-type", MASKS, lambda h, f: h.update(step="3"), "FIELD", ["'step'", "'3'"]),
    ("bool-int", CREDIT, lambda h, f: h.update(n=True), "FIELD", ["'n'", "True"]),
    ("out-of-range", HELLO, lambda h, f: h.update(credits=5000), "FIELD", ["'credits'", "5000"]),
    ("rank>=world", HELLO, lambda h, f: h.update(rank=4), "FIELD", ["'rank' = 4", "world_size 4"]),
    ("bad-hex", HELLO, lambda h, f: h.update(plan_hash="XYZ"), "FIELD", ["'plan_hash'", "'XYZ'"]),
    ("bad-cursor", HELLO, lambda h, f: h.update(cursor=[1, -2]), "FIELD", ["'cursor'", "[1, -2]"]),
    ("unknown-field", CREDIT, lambda h, f: h.update(extra=1), "FIELD", ["unknown field 'extra'"]),
    ("extra-frame", MASKS, lambda h, f: f.append(b"x"), "FRAMES", ["declares 6 arrays", "7 array frames"]),
    ("missing-frame", MASKS, lambda h, f: f.pop(), "FRAMES", ["declares 6 arrays", "5 array frames"]),
    ("frames-no-descs", CREDIT, lambda h, f: f.append(b"x"), "FRAMES", ["declares 0 arrays"]),
    ("unknown-array", FEEDBACK, lambda h, f: desc(h, "head_count").update(name="bogus"), "ARRAY", ["'bogus'"]),
    ("duplicate-array", FEEDBACK, lambda h, f: desc(h, "head_count").update(name="head_loss_sum"), "ARRAY",
     ["duplicate array 'head_loss_sum'"]),
    ("missing-array", MASKS, lambda h, f: [h["arrays"].pop(1), f.pop(1)], "ARRAY", ["missing array 'len_keep'"]),
    ("unknown-dtype", MASKS, lambda h, f: desc(h, "gpa_target").update(dtype="float64"), "ARRAY",
     ["'gpa_target'", "'float64'"]),
    ("dtype-for-array", MASKS, lambda h, f: desc(h, "mask").update(dtype="int8"), "ARRAY", ["'mask'", "'int8'"]),
    ("bad-descriptor", MASKS, lambda h, f: desc(h, "mask").update(extra=1), "ARRAY", ["descriptor 1"]),
    ("negative-dim", FEEDBACK, lambda h, f: desc(h, "head_count").update(shape=[-4]), "ARRAY", ["[-4]"]),
    ("rank-of-shape", MASKS, lambda h, f: desc(h, "len_keep").update(shape=[N, 1]), "ARRAY", ["'len_keep'", "[n]"]),
    ("frame-length", MASKS, lambda h, f: f.__setitem__(1, f[1][:-2]), "ARRAY",
     ["'len_keep'", "16 bytes", "has 14"]),
    ("mask-rows!=n", MASKS, lambda h, f: h.update(n=N + 1), "ARRAY", ["'mask'", "n = 9", "got 8"]),
    ("mask-bytes", MASKS, lambda h, f: h.update(num_patches=30), "ARRAY", ["'mask'", "B = 4", "got 3"]),
    ("free-dim-mismatch", MASKS, lambda h, f: put(h, f, "lut_t2", np.zeros((N, D + 1), np.float32)), "ARRAY",
     ["'lut_t2'", "D = 6"]),
    ("lut-alone", MASKS, lambda h, f: [h["arrays"].pop(4), f.pop(4)], "ARRAY", ["'lut_t1' and 'lut_t2'"]),
    ("len_keep=0", MASKS, lambda h, f: put(h, f, "len_keep", np.zeros(N, np.int16)), "VALUE",
     ["len_keep", "min 0"]),
    ("len_keep>L", MASKS, lambda h, f: put(h, f, "len_keep", np.full(N, L + 1, np.int16)), "VALUE",
     ["len_keep", "num_patches=20", "max 21"]),
    ("mask-vs-len_keep", MASKS, lambda h, f: put(h, f, "mask", mask_of(h, f) ^ np.array([0x80, 0, 0], np.uint8)),
     "VALUE", ["image 0", "len_keep[0]"]),
    ("padding-bits", MASKS, lambda h, f: put(h, f, "mask", mask_of(h, f) | np.array([0, 0, 1], np.uint8)),
     "VALUE", ["padding"]),
    ("heads-range", MASKS, lambda h, f: put(h, f, "heads", np.full(N, 5000, np.int64)), "VALUE", ["heads"]),
    ("negative-count", FEEDBACK, lambda h, f: put(h, f, "head_count", np.full(M, -1, np.int64)), "VALUE",
     ["head_count"]),
    ("nan-loss", FEEDBACK, lambda h, f: put(h, f, "head_loss_sum", np.full(M, np.nan, np.float32)), "VALUE",
     ["finite"]),
    ("tensors-not-chunk0", WEIGHTS, lambda h, f: [h.update(chunk=1, n_chunks=2, chunk_bytes=50), put(h, f, "data", np.zeros(50, np.uint8))],
     "FIELD",
     ["'tensors'", "chunk 1"]),
    ("n_chunks", WEIGHTS, lambda h, f: h.update(n_chunks=3), "FIELD", ["n_chunks 3", "total_bytes 100"]),
    ("chunk-length", WEIGHTS, lambda h, f: f.__setitem__(0, f[0] + b"x"), "ARRAY", ["'data'", "has 101"]),
    ("tensor-nbytes", WEIGHTS, lambda h, f: h["tensors"][0].update(nbytes=96), "FIELD", ["'w'", "nbytes 96"]),
    ("tensor-past-end", WEIGHTS, lambda h, f: h["tensors"][0].update(offset=4), "FIELD",
     ["'w'", "offset 4", "total_bytes 100"]),
    ("tensor-dtype", WEIGHTS, lambda h, f: h["tensors"][0].update(dtype="complex64"), "FIELD", ["'complex64'"]),
    ("bad-sha", WEIGHTS, lambda h, f: h.update(sha256="abc"), "FIELD", ["'sha256'"]),
]


@pytest.mark.parametrize("what,mtype,edit,code,words", CASES, ids=[c[0] for c in CASES])
def test_decode_rejects(what, mtype, edit, code, words):
    h, f = parts(mtype)
    edit(h, f)
    with pytest.raises(ProtocolError) as err:
        decode([msgpack.packb(h), *f])
    assert err.value.code == code, err.value
    for w in words:
        assert w in err.value.message, (w, err.value.message)


@pytest.mark.parametrize("frames,code,words", [
    ([], "FRAMES", ["got 0"]),
    ("not a list", "FRAMES", ["got str"]),
    ([b"\x80"] * (P.MAX_FRAMES + 1), "FRAMES", ["got 17"]),
    (["str frame"], "FRAMES", ["frame 0", "str"]),
    ([b"\xc1"], "HEADER", ["not valid msgpack"]),
    ([b"\x81\xa1v\x01\xff"], "HEADER", ["not valid msgpack"]),  # trailing bytes
    ([msgpack.packb([1, 2])], "HEADER", ["must be a msgpack map, got list"]),
    ([msgpack.packb({"v": P.PROTOCOL_VERSION, "type": "bye", "pad": "x" * (P.MAX_HEADER_BYTES)})], "HEADER", ["limit 262144"]),
    ([msgpack.packb({"v": P.PROTOCOL_VERSION, "type": "bye", "x": b"bin"})], "HEADER", ["max_bin_len"]),
    ([msgpack.packb({1: 1})], "HEADER", ["not valid msgpack"]),  # strict_map_key
    ([msgpack.packb({"v": P.PROTOCOL_VERSION, "type": "bye", "l": list(range(P.MAX_LIST + 1))})], "HEADER", ["max_array_len"]),
])
def test_decode_rejects_frames_and_headers(frames, code, words):
    with pytest.raises(ProtocolError) as err:
        decode(frames)
    assert err.value.code == code, err.value
    assert all(w in err.value.message for w in words), err.value.message


def test_error_reply_round_trips_and_is_bounded():
    err = ProtocolError("FIELD", "x" * 10_000)
    msg = decode(err.frames())
    assert msg.type == ERROR and msg.fields["code"] == "FIELD" and len(msg.fields["message"]) == P.MAX_STR
    with pytest.raises(ProtocolError) as e:
        decode([msgpack.packb({"v": P.PROTOCOL_VERSION, "type": "hello", "rank": "r" * 3000})])
    assert len(e.value.message) < 200  # hostile values are not echoed in full


# ---------------------------------------------------------------- fuzzing

POOL = [None, True, False, -1, 0, 1, 7, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, 1.5, float("nan"), "", "x",
        "mask", "bf16", "float64", "hello", "0" * 64, "é", b"\x00", [], [0], [-1], [2**40, 2**40], [[1]],
        {}, {"name": "mask"}, list(range(9)), [2**62] * 3]


def mutate_obj(rng: np.random.Generator, obj) -> None:
    """Replace, delete or add one entry somewhere inside a decoded header."""
    while True:
        keys = list(obj) if isinstance(obj, dict) else list(range(len(obj)))
        pick = POOL[rng.integers(len(POOL))]
        if not keys or rng.random() < 0.1:
            obj.update({str(pick)[:8]: pick}) if isinstance(obj, dict) else obj.append(pick)
            return
        k = keys[rng.integers(len(keys))]
        if isinstance(obj[k], (dict, list)) and obj[k] and rng.random() < 0.6:
            obj = obj[k]
        elif isinstance(obj, dict) and rng.random() < 0.2:
            del obj[k]
            return
        else:
            obj[k] = pick
            return


def header_of(frames: list):
    try:
        h = msgpack.unpackb(frames[0], strict_map_key=False)
    except Exception:
        return None
    return h if isinstance(h, dict) else None


def mutate(rng: np.random.Generator, frames: list) -> list:
    frames = [bytes(f) for f in frames]
    op = rng.integers(8)
    h = header_of(frames) if frames else None
    if not frames or (op in (4, 5, 7) and h is None):
        op = 0
    if op == 0:  # noise
        return [rng.bytes(int(rng.integers(0, 48))) for _ in range(rng.integers(0, 5))]
    i = int(rng.integers(len(frames)))
    if op == 1:  # truncation
        frames[i] = frames[i][: rng.integers(0, len(frames[i]) + 1)]
    elif op == 2 and frames[0]:  # flipped header bytes
        head = bytearray(frames[0])
        for j in rng.integers(0, len(head), rng.integers(1, 4)):
            head[j] ^= int(rng.integers(1, 256))
        frames[0] = bytes(head)
    elif op == 3:  # lost, duplicated or stray frames
        [lambda: frames.pop(i), lambda: frames.insert(i, frames[i]), lambda: frames.append(rng.bytes(8))][i % 3]()
    elif op in (4, 5):  # a valid header with a corrupted field
        mutate_obj(rng, h)
        frames[0] = msgpack.packb(h)
    elif op == 6 and len(frames) > 1:  # corrupted array bytes
        frames[i or 1] = rng.bytes(len(frames[i or 1]))
    elif op == 7:  # huge declared shape
        for d in h.get("arrays", []) if isinstance(h.get("arrays"), list) else []:
            if isinstance(d, dict) and isinstance(d.get("shape"), list):
                d["shape"] = [int(x) for x in rng.choice([2**31, 2**40, 2**62, P.MAX_BATCH], len(d["shape"]))]
        frames[0] = msgpack.packb(h)
    return frames


def reencode(msg: Message) -> list:
    arrays = {k: msg.tensor(k) if msg.dtypes[k] == "bf16" else v for k, v in msg.arrays.items()}
    return encode(msg.type, msg.fields, arrays)


def test_fuzz_mutated_messages_raise_only_protocol_error():
    rng = np.random.default_rng(1234)
    originals = [encode(t, *valid(t)) for t in TYPES]
    codes, accepted = {}, 0
    for it in range(10_000):
        frames = mutate(rng, originals[it % len(originals)])
        for _ in range(rng.integers(0, 3)):  # sometimes stack mutations
            frames = mutate(rng, frames)
        try:
            msg = decode(frames)
        except ProtocolError as e:
            assert e.code != P.E_INTERNAL, e
            codes[e.code] = codes.get(e.code, 0) + 1
        else:
            accepted += 1
            assert decode(reencode(msg)).fields == msg.fields  # whatever is accepted is well formed
    assert accepted > 100 and {"FRAMES", "HEADER", "VERSION", "TYPE", "FIELD", "ARRAY", "VALUE"} <= set(codes), codes


_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=12)
    | st.sampled_from(["mask", "len_keep", "bf16", "uint8", "data", "tensors"]),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=8), kids, max_size=5), max_leaves=20)
_field_names = st.sampled_from(sorted({k for s in P.SCHEMAS.values() for k in [*s.fields, *s.optional]}))


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(mtype=st.sampled_from(TYPES), fields=st.dictionaries(_field_names, _msgpack_values, max_size=10),
       descs=st.lists(st.fixed_dictionaries({"name": st.sampled_from(["mask", "len_keep", "data", "heads", "x"]),
                                             "dtype": st.sampled_from([*P.DTYPES, "float64"]),
                                             "shape": st.lists(st.integers(-2, 2**64 - 1), max_size=3)}), max_size=3),
       blobs=st.lists(st.binary(max_size=64), max_size=4), raw=st.binary(max_size=64))
def test_fuzz_structured_headers(mtype, fields, descs, blobs, raw):
    for frames in ([msgpack.packb({"v": PROTOCOL_VERSION, "type": mtype, **fields, "arrays": descs}), *blobs],
                   [raw, *blobs]):
        try:
            decode(frames)
        except ProtocolError as e:
            assert e.code != P.E_INTERNAL, e


def test_huge_declared_shapes_allocate_nothing():
    h, f = parts(MASKS)
    hostile = []
    for shape in ([2**62, 2**62], [P.MAX_BATCH, 2**40], [N, 2**61]):
        desc(h, "gpa_target")["shape"] = shape
        hostile.append([msgpack.packb(h), *f])
    h2 = copy.deepcopy(h)
    h2.update(n=P.MAX_BATCH, num_patches=P.MAX_PATCHES)  # every dim consistent: 512 MiB mask, 8 GiB targets
    for d in h2["arrays"]:
        d["shape"] = [P.MAX_BATCH, {"mask": P.MAX_PATCHES // 8, "gpa_target": P.MAX_PATCHES}.get(d["name"], D)][
            : len(d["shape"])]
    hostile.append([msgpack.packb(h2), *f])
    w, wf = parts(WEIGHTS)
    w["tensors"][0]["shape"] = [2**40, 2**40]
    hostile.append([msgpack.packb(w), *wf])
    tracemalloc.start()
    try:
        np.zeros(1 << 21, np.uint8).fill(1)  # control: numpy allocations are traced
        assert tracemalloc.get_traced_memory()[1] >= 1 << 21
        tracemalloc.reset_peak()
        for frames in hostile:
            with pytest.raises(ProtocolError):
                decode(frames)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 << 10, f"decode of hostile shapes peaked at {peak} bytes"


# ---------------------------------------------------------------- checksum


def test_checksum():
    ids = np.array([5, 3, 9, 2**40], np.int64)
    c = checksum(ids)
    assert 0 <= c < 2**64 and c == checksum(ids.astype(">i8")) == checksum(torch.tensor(ids)) == checksum(list(ids))
    assert c != checksum(ids[::-1]) and checksum(np.arange(3, dtype=np.int32)) == checksum(np.arange(3))
    assert c == int.from_bytes(hashlib.blake2b(ids.astype("<i8").tobytes(), digest_size=8).digest(), "little")
    with pytest.raises(ValueError, match="integer"):
        checksum(np.array([1.0, 2.0]))


# ---------------------------------------------------------------- weights


def small_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"patch_embed.proj.weight": torch.randn(8, 3, 4, 4, generator=g).to(torch.bfloat16),
            "pos_embed": torch.randn(1, 17, 8, generator=g), "norm.bias": torch.randn(8, generator=g).half(),
            "bn.num_batches_tracked": torch.tensor(12345), "empty": torch.zeros(0, 3),
            "ids": torch.arange(-5, 6, dtype=torch.int64)}


def assert_state_equal(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape and torch.equal(got[k], want[k]), k


def test_weights_round_trip_out_of_order_with_duplicates():
    state = small_state()
    chunks = list(weight_chunks(state, version=7, step=700, chunk_bytes=256))
    assert len(chunks) > 4
    want = {k: v.clone() for k, v in state.items()}
    for p in state.values():
        p.add_(1)  # the trainer keeps training: the snapshot was taken at call time
    order = [3, 1, 1, 0, 4, 3, *range(len(chunks) - 1, -1, -1)]
    asm = WeightAssembler()
    results = [asm.add(decode([bytes(f) for f in chunks[i]])) for i in order]
    last_missing = max(order.index(i) for i in range(len(chunks)))
    assert [i for i, r in enumerate(results) if r is not None] == [last_missing]  # once, when complete
    done = [results[last_missing]]
    assert done[0].version == 7 and done[0].step == 700 and asm.version == 7 and asm.ignored > 0
    assert_state_equal(done[0].state, want)
    assert asm.add(decode(chunks[0])) is None  # an already applied version never re-yields


def test_weights_partial_or_corrupt_never_yields():
    state = small_state()
    chunks = [[bytes(f) for f in c] for c in weight_chunks(state, version=2, step=20, chunk_bytes=256)]
    asm = WeightAssembler()
    assert all(asm.add(decode(c)) is None for c in chunks[:-1])  # partial
    bad = bytearray(chunks[-1][1])
    bad[0] ^= 0xFF
    with pytest.raises(ProtocolError) as err:
        asm.add(decode([chunks[-1][0], bytes(bad)]))
    assert err.value.code == "WEIGHTS" and "sha256" in err.value.message and "version 2" in err.value.message
    assert asm.version == -1
    assert asm.add(decode(chunks[-1])) is None  # the corrupt upload was dropped, not patched
    results = [asm.add(decode(c)) for c in chunks]  # a full resend of the same version applies
    assert_state_equal(next(r for r in results if r is not None).state, state)


def test_weights_versions_and_limits():
    state = small_state()
    old = list(weight_chunks(state, version=3, step=30, chunk_bytes=256))
    new = list(weight_chunks(state, version=4, step=40, chunk_bytes=256))
    asm = WeightAssembler()
    asm.add(decode(old[0]))
    asm.add(decode(new[1]))  # newer version abandons the partial older one
    assert all(asm.add(decode(c)) is None for c in old)  # older chunks are stale now
    got = [asm.add(decode(c)) for c in new][-1]
    assert got.version == 4 and got.step == 40
    other = list(weight_chunks({"x": torch.ones(3)}, version=5, step=50, chunk_bytes=8))
    clash = list(weight_chunks({"x": torch.zeros(3)}, version=5, step=50, chunk_bytes=8))
    asm.add(decode(other[0]))
    with pytest.raises(ProtocolError, match="disagrees"):
        asm.add(decode(clash[1]))
    with pytest.raises(ProtocolError, match="total_bytes .* > limit 100"):
        WeightAssembler(max_bytes=100).add(decode(new[0]))
    with pytest.raises(ProtocolError, match="takes 'weights'"):
        asm.add(decode(encode(BYE, {})))
    with pytest.raises(ProtocolError, match="float64 not allowed"):
        weight_chunks({"x": torch.zeros(2, dtype=torch.float64)}, 1, 1)


def test_weights_memory_is_bounded_by_the_teacher_not_the_peer():
    """A peer declares 16 GiB: refused at its first chunk. A fitting upload costs one buffer of its
    declared size, whatever the chunks (the old assembler kept every chunk, then joined a copy)."""
    chunk = 1 << 20
    limit = 8 * chunk  # what the teacher implies (server.py: weights.snapshot_limit)
    data = np.zeros(chunk, np.uint8)
    huge = {"version": 1, "step": 1, "chunk": 1, "n_chunks": 16384, "chunk_bytes": chunk,
            "total_bytes": 16384 * chunk, "sha256": "0" * 64}
    fits = {**huge, "n_chunks": 8, "total_bytes": limit}
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="total_bytes 17179869184 > limit 8388608"):
            WeightAssembler(max_bytes=limit).add(decode(encode(WEIGHTS, huge, {"data": data})))
        asm = WeightAssembler(max_bytes=limit)
        for i in range(1, 8):
            assert asm.add(decode(encode(WEIGHTS, {**fits, "chunk": i}, {"data": data}))) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < limit + 2 * chunk, peak


def test_weights_that_do_not_fit_the_teacher_never_count():
    """The freeze: one upload with version 2^62 and a wrong tensor name made every later (real)
    upload 'older'. Now the table is checked against the teacher at chunk 0 and a version counts
    only once the whole snapshot passed (names, shapes, float vs int, sha256, finite values)."""
    state = small_state()
    expect = {k: (tuple(v.shape), v.is_floating_point()) for k, v in state.items()}
    asm = WeightAssembler(expect=expect)
    bad_name = {("x" + k if k == "pos_embed" else k): v for k, v in state.items()}
    with pytest.raises(ProtocolError, match=r"missing \['pos_embed'\]; unexpected \['xpos_embed'\]"):
        asm.add(decode(next(weight_chunks(bad_name, version=2**62, step=2**62, chunk_bytes=1 << 16))))
    assert asm.version == -1
    wrong = {**state, "ids": state["ids"].float()}  # an int buffer sent as float
    with pytest.raises(ProtocolError, match="ids float32"):
        asm.add(decode(next(weight_chunks(wrong, version=2**62, step=1, chunk_bytes=1 << 16))))
    shaped = {**state, "norm.bias": torch.zeros(9).half()}
    with pytest.raises(ProtocolError, match=r"norm.bias float16\[9\] vs float\[8\]"):
        asm.add(decode(next(weight_chunks(shaped, version=2**62, step=1, chunk_bytes=1 << 16))))
    nan = {**state, "pos_embed": torch.full((1, 17, 8), float("nan"))}
    with pytest.raises(ProtocolError, match="'pos_embed' holds NaN"):
        for frames in weight_chunks(nan, version=2**62, step=1, chunk_bytes=1 << 16):
            asm.add(decode(frames))
    assert asm.version == -1
    got = [asm.add(decode(f)) for f in weight_chunks(state, version=3, step=3, chunk_bytes=256)][-1]
    assert got is not None and got.version == 3 and asm.version == 3
    asm.reset()  # a new run owns the teacher: its version 0 counts again
    assert [asm.add(decode(f)) for f in weight_chunks(state, version=0, step=0)][-1].version == 0


# ---------------------------------------------------------------- over ZeroMQ


def test_inproc_router_dealer_masks_copy_false():
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        for s in (router, dealer):
            s.setsockopt(zmq.LINGER, 0)
        router.bind("inproc://mimpipe-protocol-test")
        dealer.connect("inproc://mimpipe-protocol-test")
        dealer.send_multipart(encode(HELLO, valid(HELLO)[0]), copy=False)
        assert router.poll(5000), "no HELLO within 5 s"
        ident, *frames = router.recv_multipart(copy=False)
        assert decode(frames).fields["rank"] == 1  # zmq.Frame objects decode directly
        rng = np.random.default_rng(5)
        fields = {**valid(MASKS)[0], "n": 256, "num_patches": 196}
        arrays = masks_arrays(rng, 256, 196)
        arrays["gpa_target"] = torch.randn(256, 196).half()
        router.send_multipart([ident, *encode(MASKS, fields, arrays)], copy=False)
        dealer.send_multipart([b"\x93garbage"], copy=False)  # a rogue frame gets an ERROR, not a crash
        assert dealer.poll(5000), "no MASKS within 5 s"
        assert_same(decode(dealer.recv_multipart(copy=False)), MASKS, fields, arrays)
        assert router.poll(5000)
        ident, *frames = router.recv_multipart(copy=False)
        with pytest.raises(ProtocolError) as err:
            decode(frames)
        router.send_multipart([ident, *err.value.frames()], copy=False)
        assert dealer.poll(5000)
        reply = decode(dealer.recv_multipart(copy=False))
        assert reply.type == ERROR and reply.fields["code"] == "HEADER"
    finally:
        router.close(0)
        dealer.close(0)
        ctx.term()
