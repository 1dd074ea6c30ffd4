"""train/optim.py ema_update: one foreach lerp that equals the formula ξ <- m ξ + (1 - m) θ."""
import copy

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from mimpipe.train.optim import ema_momentum, ema_update


def student_and_ema():
    """A student with BN buffers that training moved, and an EMA holding a subset of its names
    (no last Linear, like the encoder-only teacher) that starts elsewhere."""
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4))
    for _ in range(3):
        student(torch.randn(32, 8))  # train mode: running stats and num_batches_tracked move
    ema = copy.deepcopy(student[:2])
    for v in ema.state_dict().values():
        if v.dtype.is_floating_point:
            v.add_(torch.randn_like(v))
    return student, ema


def old_formula(ema_sd, student_sd, m):
    """The update before the foreach lerp: m ξ + (1 - m) θ per floating tensor, a copy otherwise."""
    return {k: m * v + (1 - m) * student_sd[k] if v.dtype.is_floating_point else student_sd[k].clone()
            for k, v in ema_sd.items()}


def test_ema_update_equals_the_formula_buffers_included():
    student, ema = student_and_ema()
    for it in range(6):
        m = ema_momentum(it, 5, m0=0.9)  # LUT's cosine, 0.9 -> 1
        want = old_formula({k: v.clone() for k, v in ema.state_dict().items()}, student.state_dict(), m)
        ema_update(ema, student, m)
        got = ema.state_dict()
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype, k
            torch.testing.assert_close(got[k], want[k], msg=lambda s, k=k, it=it: f"{k} step {it}: {s}")
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.1 * torch.randn_like(p))
    assert torch.equal(ema.state_dict()["1.num_batches_tracked"], torch.tensor(3))
    ema_update(ema, student, 0.0)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in ema.state_dict().items())  # m = 0: a copy


def test_ema_update_is_one_foreach_lerp():
    student, ema = student_and_ema()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ema_update(ema, student, 0.99)
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("aten::_foreach_lerp_") == 1, calls
    # no per-tensor mul_/add_ pair; the CPU's foreach falls back to a lerp_ per tensor, CUDA's is
    # one multi-tensor kernel per chunk of tensors
    assert not {"aten::mul_", "aten::add_"} & calls.keys(), calls
