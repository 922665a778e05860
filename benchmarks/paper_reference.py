"""The paper's own velocity code next to ``preset='paper'``, in one run of the benchmark harness.

The reference code (github.com/peterpaohuang/flux_matching, ``experiments/exp2_rna_velocity``) is not copied into
fluxvelo: give a checkout of it with ``--checkout``. Its ``flux_velocity`` is loaded from there and run on the
harness's prepared pancreas, after scVelo's stochastic model as the paper's pipeline runs it
(``scv.tl.velocity(adata, mask_zero=False)``, whose velocity genes and ``uns['velocity_params']`` the velocity
graph then uses). Two changes make it run without a GPU: the trainer puts the model on the CPU instead of
``'cuda'`` in ``DataParallel``, and the data loader module it imports from its own scVelo fork is loaded from the
same checkout. The same command runs ``fluxvelo_paper`` at the same settings (epochs, learning rate; batch 256 in
both), so the two share the UMAP, the graph and the metrics.

    FLUXVELO_DATA_DIR=../shared/data python benchmarks/paper_reference.py --checkout /path/to/flux_matching \\
        [--epochs 10] [--lr 0.01] [--seeds 1] [--out results_paper_reference]

At 10 epochs (150 steps on pancreas) the reference takes about half an hour on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

import fluxvelo.benchmark as bench


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def reference_module(checkout: Path):
    """The reference's ``velocity_flux`` module, with its data loader, set to train on the CPU."""
    tools = checkout / "experiments" / "exp2_rna_velocity" / "scvelo"
    if not (tools / "tools" / "velocity_flux.py").is_file():
        raise SystemExit(f"{checkout} is not a checkout of peterpaohuang/flux_matching (no {tools / 'tools'}).")
    import scvelo  # noqa: F401 - the installed scVelo; the fork's data loader goes beside it

    _load(tools / "dataloader" / "dataloader.py", "scvelo.dataloader.dataloader")
    module = _load(tools / "tools" / "velocity_flux.py", "flux_matching_reference_velocity_flux")

    def on_cpu(self, model, optimizer):
        self.device, self.model, self.optimizer, self.start_epoch, self.epochs = "cpu", model, optimizer, 1, 100

    module.BaseTrainer.__init__ = on_cpu
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, required=True, help="a checkout of peterpaohuang/flux_matching")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seeds", default="1")
    parser.add_argument("--out", type=Path, default=Path("results_paper_reference"))
    args = parser.parse_args()
    reference = reference_module(args.checkout)

    def fit(adata, seed, options):
        import scvelo as scv
        import torch

        scv.tl.velocity(adata, mask_zero=False)
        torch.manual_seed(seed)
        np.random.seed(seed)
        start = time.perf_counter()
        reference.flux_velocity(adata, lr=options["lr"], epochs=options["epochs"])
        return {"epochs": options["epochs"], "lr": options["lr"], "fit_time_s": time.perf_counter() - start,
                "velocity_genes": "scVelo stochastic (mask_zero=False)", "device": "cpu"}  # fmt: skip

    bench.register_method(bench.Method("paper_code", "the paper's flux_velocity (its own code, on the CPU)", fit))
    seeds = [int(s) for s in args.seeds.split(",")] if "," in args.seeds else int(args.seeds)
    options = {"epochs": args.epochs, "lr": args.lr}
    result = bench.run(
        ["pancreas_2000"], methods="paper_code,fluxvelo_paper", seeds=seeds, out=args.out, download=False,
        method_options={"paper_code": options, "fluxvelo_paper": options},
    )  # fmt: skip
    print(result.table())


if __name__ == "__main__":
    main()
