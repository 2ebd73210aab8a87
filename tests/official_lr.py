"""The official MARLIN learning rates, written from ControlNet/MARLIN's model/marlin.py and train.py semantics
(imported by test modules; torch only where the official LambdaLR stepping is replayed)."""

from __future__ import annotations

import math

import numpy as np


def official_lr_curve(peak: float, minimum: float, warmup_iters: int, total_iters: int) -> np.ndarray:
    """The per-iteration curve: a linspace warmup from 0 (endpoint included), then a cosine from the peak
    towards the minimum over the remaining iterations."""
    warmup = np.linspace(0, peak, warmup_iters) if warmup_iters > 0 else np.zeros(0)
    remaining = total_iters - warmup_iters
    cosine = [minimum + 0.5 * (peak - minimum) * (1 + math.cos(math.pi * i / remaining)) for i in range(remaining)]
    return np.concatenate([warmup, cosine])


def official_lr_per_batch(peak: float, minimum: float, warmup_epochs: int, num_epochs: int,
                          iters_per_epoch: int) -> list[float]:
    """The rate of every batch as the official trainer applies it: a `LambdaLR` over the curve sampled at each
    epoch's first iteration, stepped after the first batch of every epoch, with the lambda's Lightning
    off-by-one (`epoch - 1` for epoch > 0); replayed on a real torch optimiser."""
    import torch
    curve = official_lr_curve(peak, minimum, warmup_epochs * iters_per_epoch, num_epochs * iters_per_epoch)
    factors = curve[::iters_per_epoch] / peak
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: factors[max(epoch - 1, 0)])
    rates = []
    for _ in range(num_epochs):
        for batch in range(iters_per_epoch):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if batch == 0:
                scheduler.step()
    return rates
