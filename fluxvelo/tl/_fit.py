"""The minibatch loop that fits a gene-local field with the Flux Matching loss."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass, field as dataclass_field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .._threads import cpu_threads
from .._utils import progress_disabled
from ..flux import flux_matching_loss
from ..flux._kernel import serves_fused


# Steps between two looks at the load of other processes (the CPU threads follow it; see fluxvelo._threads).
THREAD_CHECK_STEPS = 10


@dataclass
class FitResult:
    """Loss history of a fit: one mean loss per epoch, and the per-gene loss over the last epoch's worth of steps."""

    loss_history: list[float] = dataclass_field(default_factory=list)
    gene_loss: np.ndarray | None = None
    n_steps: int = 0
    #: The CPU threads of the fit's last steps (one where other processes held the cores); None on a GPU.
    threads: int | None = None


@dataclass(frozen=True)
class BatchPlan:
    """Which cells each optimiser step sees: shuffled minibatches, epoch after epoch, ``total`` steps in all.

    Each epoch visits every cell once. With ``remainder='spread'`` it does so in ``cells // batch_size`` batches
    (the remainder joins them), so that no kernel is estimated from a handful of cells; with ``'last'`` the
    remainder is a smaller last batch, as torch's DataLoader does.
    """

    n_cells: int
    batch_size: int
    n_batches: int
    total: int
    remainder: str

    @classmethod
    def make(
        cls, n_cells: int, *, epochs: int | None, n_steps: int | None, batch_size: int, remainder: str
    ) -> BatchPlan:
        """``epochs`` passes over the cells or, when it is None, ``n_steps`` steps."""
        if remainder not in ("spread", "last"):
            raise ValueError(f"remainder must be 'spread' or 'last', got {remainder!r}.")
        batch_size = min(batch_size, n_cells)
        n_batches = max(1, n_cells // batch_size) if remainder == "spread" else math.ceil(n_cells / batch_size)
        total = epochs * n_batches if epochs is not None else n_steps
        return cls(n_cells, batch_size, n_batches, total, remainder)

    def epochs(self, rng: np.random.Generator) -> Iterator[list[np.ndarray]]:
        """The batches of each epoch (the last epoch may be cut short); draws one permutation per epoch."""
        taken = 0
        while taken < self.total:
            order = rng.permutation(self.n_cells)
            if self.remainder == "spread":
                batches = np.array_split(order, self.n_batches)
            else:
                batches = [order[i : i + self.batch_size] for i in range(0, self.n_cells, self.batch_size)]
            batches = batches[: self.total - taken]
            taken += len(batches)
            yield batches

    def cells(self, rng: np.random.Generator) -> np.ndarray:
        """Sorted positions of every cell the fit will see, drawn from a copy of ``rng`` (left as it is)."""
        if self.total >= self.n_batches:
            return np.arange(self.n_cells)
        first = next(self.epochs(copy.deepcopy(rng)))
        return np.sort(np.concatenate(first))


class Adam:
    """``torch.optim.Adam(params, lr=lr)`` with torch's defaults, step for step as torch computes it on the CPU.

    torch's optimisers import ``torch._dynamo`` when they are built: about 2 s in a fresh process, a fifth of a
    pancreas fit, paid by every new notebook kernel. This one needs nothing beyond tensors.
    """

    def __init__(self, params, *, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.steps = [0] * len(self.params)
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, (p, m, v) in enumerate(zip(self.params, self.exp_avg, self.exp_avg_sq)):
            if p.grad is None:
                continue
            self.steps[i] += 1
            m.lerp_(p.grad, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(p.grad, p.grad, value=1 - self.beta2)
            step_size = self.lr / (1 - self.beta1 ** self.steps[i])
            denom = (v.sqrt() / (1 - self.beta2 ** self.steps[i]) ** 0.5).add_(self.eps)
            p.addcdiv_(m, denom, value=-step_size)


def fit_field(
    field: nn.Module,
    data: torch.Tensor,
    plan: BatchPlan,
    *,
    sigma2: float,
    lr: float,
    horizon: float,
    n_substeps: int,
    loss_scale: float,
    rng: np.random.Generator,
    generator: torch.Generator,
    turnover: torch.Tensor | None = None,
    cells: np.ndarray | None = None,
    desc: str = "fitting",
) -> FitResult:
    """Adam on the minibatches of ``plan``; ``data`` is laid out ``[genes, cells, 2]``.

    ``data`` holds every cell, or only the sorted ``cells`` (from :meth:`BatchPlan.cells`) when they are given;
    ``turnover`` holds every cell's turnover rate ``[cells]`` (population balance), or is None. The loss
    history holds one mean per (partial) epoch, and the per-gene loss averages the last epoch's worth of steps.
    """
    total = plan.total
    window = min(plan.n_batches, total)  # the per-gene loss averages the last `window` steps
    optimiser = Adam(field.parameters(), lr=lr)
    result = FitResult()
    gene_loss = torch.zeros(data.shape[0], dtype=data.dtype, device=data.device)
    bar = tqdm(total=total, desc=desc, disable=progress_disabled(), leave=False, unit="step")
    work = data.shape[0] * plan.batch_size**2
    with cpu_threads(work, device_type=data.device.type, fused=serves_fused(data)) as threads:
        for batches in plan.epochs(rng):
            epoch_loss = 0.0
            for batch in batches:
                local = batch if cells is None else np.searchsorted(cells, batch)
                optimiser.zero_grad()
                out = flux_matching_loss(
                    field,
                    data.index_select(1, torch.from_numpy(local).to(data.device)),  # 4x faster than data[:, local]
                    sigma2=sigma2,
                    horizon=horizon,
                    n_substeps=n_substeps,
                    loss_scale=loss_scale,
                    turnover=None if turnover is None else turnover[torch.from_numpy(batch).to(data.device)],
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
        result.threads = None if threads is None else threads.threads
    bar.close()
    result.gene_loss = gene_loss.cpu().numpy()
    return result
