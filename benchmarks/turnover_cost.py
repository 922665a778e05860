"""What the population-balance default costs over the free fit: pancreas fits, alternated, in one process.

    FLUXVELO_DATA_DIR=../shared/data python benchmarks/turnover_cost.py --repeats 2
"""

from __future__ import annotations

import argparse

import fluxvelo as fv
from fluxvelo.benchmark._datasets import prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    fv.settings.verbosity, fv.settings.progress_bar = "warning", False
    adata = prepare("pancreas_2000", download=False).adata
    fv.tl.velocity(adata, n_steps=2)  # compiles the kernels
    for _ in range(args.repeats):
        for name, options in (("default (cell-cycle turnover, balanced)", {}), ("turnover=False", {"turnover": False})):
            fv.tl.velocity(adata, **options)
            print(f"{name}: fit {adata.uns['velocity_params']['fit_time_s']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
