"""The ``fluxvelo benchmark`` command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _seeds(text: str) -> int | list[int]:
    try:
        return [int(s) for s in text.split(",") if s] if "," in text else int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--seeds takes a count (3) or a list (0,5,7), got {text!r}") from err


def _assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value.strip()


def _method_option(text: str) -> tuple[str, str, object]:
    key, value = _assignment(text)
    method, dot, option = key.partition(".")
    if not dot or not method or not option:
        raise argparse.ArgumentTypeError(f"expected METHOD.OPTION=VALUE (e.g. velovi.max_epochs=100), got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value  # a plain string
    return method, option, parsed


def add_benchmark_parser(sub) -> None:
    """Add the ``benchmark`` subcommand to the top-level parser's subparsers."""
    from ._methods import METHODS
    from ._run import DEFAULT_METHODS

    p = sub.add_parser(
        "benchmark",
        help="fluxvelo against scVelo on the paper's datasets and on simulations with ground truth",
        description="Run every method on every dataset (preprocessed once), several seeds; write results.csv, "
        "per_edge.csv, summary.csv, benchmark.md, figure.png and config.json into --out and print the table.",
    )
    p.add_argument("--datasets", nargs="+", default=None, metavar="NAME",
                   help="registry names, 'simulation', 'growth_simulation' (cells divide and leave; five "
                   "proliferation markers), 'scvelo_simulation', or <name>_standin (the simulation with that "
                   "dataset's number of cells); default: the paper's five, pancreas_2000 and the three "
                   "simulations")  # fmt: skip
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, from {','.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})")
    p.add_argument("--peer-python", type=_assignment, action="append", default=[], metavar="NAME=PATH",
                   help="run a peer (velovi, unitvelo, scvelo_rs, celldancer) with the Python of its own "
                   "environment, e.g. unitvelo=/path/to/venv/bin/python; repeat for several")
    p.add_argument("--method-option", type=_method_option, action="append", default=[],
                   metavar="METHOD.OPTION=VALUE",
                   help="an option of one method, the value read as JSON where it parses (velovi.max_epochs=100, "
                   "unitvelo.max_iter=1200); recorded in config.json; repeat for several")  # fmt: skip
    p.add_argument("--seeds", type=_seeds, default=3, help="number of seeds, or a comma-separated list (default 3)")
    p.add_argument("--out", type=Path, default=Path("benchmark_results"), help="output folder")
    p.add_argument("--paper-epochs", type=int, default=None,
                   help="epochs of fluxvelo_paper instead of the paper's 100 (14 steps each on pancreas)")  # fmt: skip
    p.add_argument("--fluxvelo-epochs", type=int, default=None, help="epochs of fluxvelo (default: the preset's)")
    p.add_argument("--device", default=None, help="device of the fluxvelo fits: 'auto', 'cpu', 'cuda', 'cuda:<i>'")
    p.add_argument("--n-jobs", type=int, default=2, help="workers of scVelo's recover_dynamics (default 2)")
    p.add_argument("--sim-cells", type=int, default=None, help="cells of the simulations (default 1000)")
    p.add_argument("--sim-genes", type=int, default=None, help="genes of the simulations (default 100 / 50)")
    p.add_argument("--sim-seed", type=int, default=None, help="seed of the simulated data (default 0)")
    p.add_argument("--no-download", action="store_true", help="use local files only")
    p.add_argument("--no-figure", action="store_true", help="skip figure.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="log every step")
    p.set_defaults(func=run_benchmark)


def run_benchmark(args: argparse.Namespace) -> int:
    """Run :func:`fluxvelo.benchmark.run` from parsed arguments, print the table and the files written."""
    from .. import settings
    from ._result import problems
    from ._run import run

    settings.verbosity = "info" if args.verbose else "warning"
    if args.no_progress:
        settings.progress_bar = False
    flux = {} if args.device is None else {"device": args.device}
    options = {
        "fluxvelo": {**flux, **({} if args.fluxvelo_epochs is None else {"epochs": args.fluxvelo_epochs})},
        "fluxvelo_paper": dict(flux),
        "scvelo_dynamical": {"n_jobs": args.n_jobs},
    }
    for method, option, value in args.method_option:
        options.setdefault(method, {})[option] = value
    sim = {k: v for k, v in (("n_cells", args.sim_cells), ("n_genes", args.sim_genes), ("random_state", args.sim_seed))
           if v is not None}  # fmt: skip
    result = run(
        args.datasets,
        methods=args.methods,
        seeds=args.seeds,
        out=args.out,
        paper_epochs=args.paper_epochs,
        method_options=options,
        peer_python=dict(args.peer_python),
        simulation_options=sim,
        download=not args.no_download,
        figure=not args.no_figure,
        keep_adata="first" if not args.no_figure else False,
    )
    print(result.table())
    gt = result.summary[(result.summary["kind"] == "simulation") & (result.summary["status"] == "ok")]
    if len(gt):
        print("\nGround truth (simulations): velocity cosine / sign accuracy / CBC on the true edges")
        for r in gt.itertuples():
            print(f"  {r.dataset:18s} {r.method:18s} {r.velocity_cosine_mean:.3f} / {r.sign_accuracy_mean:.3f} / "
                  f"{r.cbc_mean:.3f}")  # fmt: skip
    if (result.runs["status"] != "ok").any():
        print("\nNot available or failed:\n" + problems(result))
    print("\nwrote " + ", ".join(str(p) for p in result.files.values()))
    return 0
