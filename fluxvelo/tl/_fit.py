"""The minibatch loop that fits a gene-local field with the Flux Matching loss."""

from __future__ import annotations

import math
from dataclasses import dataclass, field as dataclass_field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .._threads import cpu_threads
from .._utils import progress_disabled
from ..flux import flux_matching_loss


# Steps between two looks at the load of other processes (the CPU threads follow it; see fluxvelo._threads).
THREAD_CHECK_STEPS = 10


@dataclass
class FitResult:
    """Loss history of a fit: one mean loss per epoch, and the per-gene loss over the last epoch's worth of steps."""

    loss_history: list[float] = dataclass_field(default_factory=list)
    gene_loss: np.ndarray | None = None
    n_steps: int = 0


def fit_field(
    field: nn.Module,
    data: torch.Tensor,
    *,
    sigma2: float,
    epochs: int | None,
    n_steps: int | None,
    batch_size: int,
    lr: float,
    horizon: float,
    n_substeps: int,
    loss_scale: float,
    rng: np.random.Generator,
    generator: torch.Generator,
    turnover: torch.Tensor | None = None,
    remainder: str = "spread",
    desc: str = "fitting",
) -> FitResult:
    """Adam on shuffled minibatches of cells; ``data`` is laid out ``[genes, cells, 2]``.

    Each epoch visits every cell once. With ``remainder='spread'`` it does so in ``cells // batch_size``
    batches (the remainder joins them), so that no kernel is estimated from a handful of cells; with
    ``'last'`` the remainder is a smaller last batch, as torch's DataLoader does. The fit lasts ``epochs``
    epochs or, when ``epochs`` is None, ``n_steps`` optimiser steps; the loss history holds one mean per
    (partial) epoch, and the per-gene loss averages the last epoch's worth of steps. ``turnover`` holds the
    cells' turnover rates ``[cells]`` (population balance), or None.
    """
    if remainder not in ("spread", "last"):
        raise ValueError(f"remainder must be 'spread' or 'last', got {remainder!r}.")
    n_cells = data.shape[1]
    batch_size = min(batch_size, n_cells)
    n_batches = max(1, n_cells // batch_size) if remainder == "spread" else math.ceil(n_cells / batch_size)
    total = epochs * n_batches if epochs is not None else n_steps
    window = min(n_batches, total)  # the per-gene loss averages the last `window` steps
    n_epochs = math.ceil(total / n_batches)
    optimiser = torch.optim.Adam(field.parameters(), lr=lr)
    result = FitResult()
    gene_loss = torch.zeros(data.shape[0], dtype=data.dtype, device=data.device)
    bar = tqdm(total=total, desc=desc, disable=progress_disabled(), leave=False, unit="step")
    with cpu_threads(data.shape[0] * batch_size**2, device_type=data.device.type) as threads:
        for _ in range(n_epochs):
            order = torch.from_numpy(rng.permutation(n_cells)).to(data.device)
            if remainder == "spread":
                batches = torch.tensor_split(order, n_batches)
            else:
                batches = torch.split(order, batch_size)
            batches = batches[: total - result.n_steps]
            epoch_loss = 0.0
            for batch in batches:
                optimiser.zero_grad(set_to_none=True)
                out = flux_matching_loss(
                    field,
                    data[:, batch],
                    sigma2=sigma2,
                    horizon=horizon,
                    n_substeps=n_substeps,
                    loss_scale=loss_scale,
                    turnover=None if turnover is None else turnover[batch],
                    generator=generator,
                )
                out.loss.backward()
                optimiser.step()
                epoch_loss += float(out.loss.detach()) / len(batches)
                if result.n_steps >= total - window:
                    gene_loss += out.per_block / window
                result.n_steps += 1
                bar.update()
                if threads is not None and result.n_steps % THREAD_CHECK_STEPS == 0:
                    threads.update()
            if not math.isfinite(epoch_loss):
                raise FloatingPointError(
                    "The Flux Matching loss became non-finite; lower lr or raise sigma2 "
                    "(check the input for extreme values)."
                )
            result.loss_history.append(epoch_loss)
            bar.set_postfix(loss=f"{epoch_loss:.4g}")
    bar.close()
    result.gene_loss = gene_loss.cpu().numpy()
    return result
