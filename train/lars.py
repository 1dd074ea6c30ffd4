"""LARS (You et al. 2017) as MAE's util/lars.py has it, for the linear probe (main_linprobe).

Per parameter with ndim > 1 (weights; biases and norm parameters are left as plain momentum SGD):
    d = grad + wd * p;  d *= trust * ||p|| / ||d||  (1 where either norm is 0);  mu = m * mu + d;  p -= lr * mu
"""
from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for g in self.param_groups:
            for p in g["params"]:
                d = p.grad
                if d is None:
                    continue
                if p.ndim > 1:   # not a norm's gamma/beta or a bias
                    d = d.add(p, alpha=g["weight_decay"])
                    p_norm, d_norm = torch.norm(p), torch.norm(d)
                    one = torch.ones_like(p_norm)
                    q = torch.where(p_norm > 0, torch.where(d_norm > 0, g["trust_coefficient"] * p_norm / d_norm,
                                                            one), one)
                    d = d.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(g["momentum"]).add_(d)
                p.add_(state["mu"], alpha=-g["lr"])
        return loss
