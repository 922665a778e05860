"""The shared-state projection's cost: fluxvelo's against the float64 NumPy one that it replaced, in one run.

``fv.tl.velocity`` reads the fitted field at the cells' states projected onto the leading shared axes
(``state_rank``; ``fluxvelo.tl._states.low_rank_states``). The projection it replaced, kept below as the
baseline, made a float64 copy of every cell's ``(u, s)``, a standardised copy of that, and the projection's
products in float64; fluxvelo's standardises one float32 copy in place and runs the products in torch. For each cell count (simulation, 2,000 genes, ``fv.pp.moments`` as
``benchmarks/speed.py`` builds it), both are timed on the same blocks and inside the whole ``fv.tl.velocity``,
alternating, ``--repeats`` times each, with the peak resident memory above the start of each call. The two
projections' largest difference is printed too. ``--busy`` runs everything beside one busy single-threaded process
(``user_speed.busy_neighbour``).

Usage::

    python benchmarks/state_projection.py [--cells 20000,50000] [--repeats 2] [--busy]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
from pathlib import Path

import numpy as np
import torch

import fluxvelo as fv
from fluxvelo.benchmark._memory import Measure
from fluxvelo.tl import _reading, _states

sys.path.insert(0, str(Path(__file__).parent))
from user_speed import busy_neighbour  # noqa: E402


def float64_projection(blocks: torch.Tensor, rank: int, rng: np.random.Generator) -> torch.Tensor:
    """The baseline: the same randomised range finder in float64 NumPy, on a standardised copy of the cells."""
    n_genes, n_cells, _ = blocks.shape
    x = blocks.numpy().transpose(1, 0, 2).reshape(n_cells, -1).astype(np.float64)
    mean, scale = x.mean(0), x.std(0)
    scale[scale == 0] = 1.0
    z = (x - mean) / scale
    y = z @ rng.standard_normal((z.shape[1], rank + _states.OVERSAMPLE))
    for _ in range(_states.POWER_ITERATIONS):
        y = z @ (z.T @ np.linalg.qr(y)[0])
    axes = np.linalg.svd(np.linalg.qr(y)[0].T @ z, full_matrices=False)[2][:rank]
    projected = (z @ axes.T) @ axes * scale + mean
    return torch.from_numpy(projected.reshape(n_cells, n_genes, 2).transpose(1, 0, 2).astype(np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="20000,50000")
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--busy", action="store_true", help="beside one busy single-threaded process")
    args = parser.parse_args()
    fv.settings.verbosity = "warning"
    print(f"machine: {platform.machine()}, torch threads {torch.get_num_threads()}, torch {torch.__version__}"
          f"{', one busy process beside it' if args.busy else ''}")  # fmt: skip
    with busy_neighbour() if args.busy else contextlib.nullcontext():
        compare(args)


def compare(args: argparse.Namespace) -> None:
    """Both projections alone and inside fv.tl.velocity, alternating, at each cell count."""
    methods = {"float64 NumPy (baseline)": float64_projection, "fluxvelo": _states.low_rank_states}
    for n in (int(c) for c in args.cells.split(",")):
        adata = fv.datasets.simulation(n_cells=n, n_genes=args.genes, random_state=0)
        fv.pp.moments(adata, n_neighbors=30, n_pcs=30)
        blocks = torch.from_numpy(np.stack([adata.layers["Mu"].T, adata.layers["Ms"].T], -1).astype(np.float32))
        outputs = {}
        for _ in range(args.repeats):
            for name, project in methods.items():
                with Measure() as m:
                    outputs[name] = project(blocks, _states.STATE_RANK, np.random.default_rng(0))
                print(f"{n:>7} cells  projection  {name:<26} {m.seconds:6.2f} s  peak +{m.delta_mb:5.0f} MiB")
        gap = (outputs["fluxvelo"] - outputs["float64 NumPy (baseline)"]).abs().max().item()
        print(f"{n:>7} cells  largest difference of the two projections {gap:.2e} (states up to "
              f"{blocks.abs().max().item():.1f})")  # fmt: skip
        del outputs, blocks
        for _ in range(args.repeats):
            for name, project in methods.items():
                _reading.low_rank_states = project
                work = adata.copy()
                with Measure() as m:
                    fv.tl.velocity(work, random_state=0)
                print(f"{n:>7} cells  velocity    {name:<26} {m.seconds:6.2f} s  peak +{m.delta_mb:5.0f} MiB")
                del work
        _reading.low_rank_states = _states.low_rank_states


if __name__ == "__main__":
    main()
