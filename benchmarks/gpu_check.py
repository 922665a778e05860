"""GPU checks in one go: the pancreas fit on CUDA (default preset and the full reference run), with its metrics.

Runs the benchmark on pancreas for ``fluxvelo`` and ``fluxvelo_paper`` (the paper's 100 epochs) on the GPU,
after a warm-up fit that absorbs CUDA's start-up, and one default fit on this machine's CPU for comparison.
Writes the benchmark's files to ``--out``.

Usage::

    FLUXVELO_DATA_DIR=../shared/data python benchmarks/gpu_check.py --out results/gpu [--seeds 3] [--paper-seeds 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

import fluxvelo as fv


def _timed_fit(adata, **kwargs) -> float:
    work = adata.copy()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fv.tl.velocity(work, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="folder for runs.csv (every fit's row)")
    parser.add_argument("--device", default="cuda", help="'cpu' makes a dry run of this script")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--paper-seeds", type=int, default=3)
    parser.add_argument("--paper-epochs", type=int, default=None, help="default: the paper's 100")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script checks the GPU path")
    fv.settings.progress_bar = False
    fv.settings.verbosity = "warning"
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device: {name}, torch {torch.__version__}, CPU threads {torch.get_num_threads()}")

    adata = fv.datasets.load("pancreas_2000")
    fv.pp.recipe_flux(adata, embedding=None)
    _timed_fit(adata, device=args.device, n_steps=5)  # CUDA context and kernels
    timed = [_timed_fit(adata, device=args.device, random_state=s) for s in range(args.seeds)]
    cpu = _timed_fit(adata, device="cpu")
    print(f"default preset, whole fv.tl.velocity call: {args.device} {', '.join(f'{t:.2f}' for t in timed)} s; "
          f"cpu ({torch.get_num_threads()} threads) {cpu:.2f} s")

    options = {"device": args.device}
    runs = []
    for method, n in (("fluxvelo", args.seeds), ("fluxvelo_paper", args.paper_seeds)):
        res = fv.benchmark.run(
            ["pancreas_2000"],
            methods=[method],
            seeds=n,
            method_options={method: options},
            paper_epochs=args.paper_epochs,
            figure=False,
        )
        runs.append(res.runs)
        if args.out:  # after each method, so that a run cut short keeps what it measured
            Path(args.out).mkdir(parents=True, exist_ok=True)
            pd.concat(runs).to_csv(Path(args.out) / "runs.csv", index=False)
        cols = ["method", "seed", "fit_time_s", "cbc", "consistency"]
        print(res.runs[cols].to_string(index=False))
        print(res.summary[["method", "cbc_mean", "cbc_sd", "consistency_mean", "consistency_sd", "fit_time_s_mean"]]
              .to_string(index=False))


if __name__ == "__main__":
    main()
