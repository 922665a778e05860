"""Rate recovery on cells drawn from the kinetic SDE itself, where the true rates are known.

    python benchmarks/kinetic_sde.py               # the balanced fit as it is (centred drive)
    python benchmarks/kinetic_sde.py --uncentred   # the balanced fit without centring its drive

Three genes, ``du = (alpha - beta u) dt + sqrt(2) dW``, ``ds = (beta u - gamma s) dt + sqrt(2) dW``, run to
stationarity (true ``beta`` 1, 2, 0.5; ``gamma`` 0.5, 1.5, 1). Prints, for the raw inputs (``gene_scale=False``,
where the fit's unit diffusion is the simulation's) and the default scaling (``gene_scale`` 10), the balance's
rates from the moments (``fv.fields.moment_rates``) and the fitted ``beta``, ``gamma`` and stationarity residual
after 120 and 600 steps, balanced and free.
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from unittest import mock

import anndata as ad
import numpy as np
import torch

import fluxvelo as fv
from fluxvelo.fields import KineticField, moment_rates

ALPHA, BETA, GAMMA = np.array([20.0, 40.0, 10.0]), np.array([1.0, 2.0, 0.5]), np.array([0.5, 1.5, 1.0])


def kinetic_sde(n_cells: int = 3000, n_steps: int = 3000, dt: float = 0.02, seed: int = 0) -> np.ndarray:
    """``[genes, cells, 2]`` draws of ``(u, s)`` by Euler-Maruyama from the steady state's mean."""
    rng = np.random.default_rng(seed)
    u = np.repeat((ALPHA / BETA)[:, None], n_cells, 1)
    s = np.repeat((ALPHA / GAMMA)[:, None], n_cells, 1)
    for _ in range(n_steps):
        du = (ALPHA[:, None] - BETA[:, None] * u) * dt + np.sqrt(2 * dt) * rng.standard_normal(u.shape)
        ds = (BETA[:, None] * u - GAMMA[:, None] * s) * dt + np.sqrt(2 * dt) * rng.standard_normal(s.shape)
        u, s = u + du, s + ds
    return np.stack((u, s), -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uncentred", action="store_true", help="skip KineticField.centre_drive")
    args = parser.parse_args()
    fv.settings.verbosity, fv.settings.progress_bar = "warning", False
    x = kinetic_sde()
    adata = ad.AnnData(np.zeros((x.shape[1], x.shape[0]), np.float32))
    adata.layers["Mu"], adata.layers["Ms"] = x[..., 0].T.astype(np.float32), x[..., 1].T.astype(np.float32)
    skip_centring = mock.patch.object(KineticField, "centre_drive", lambda self, blocks, unit: None)
    with skip_centring if args.uncentred else nullcontext():
        for gene_scale, sigma2 in ((False, 0.1), (10.0, 4.0)):
            scale = np.stack([x[..., 0].std(1), x[..., 1].std(1)], -1) / gene_scale if gene_scale else np.ones((3, 2))
            start = moment_rates(torch.from_numpy(x / scale[:, None, :]))
            print(f"gene_scale {gene_scale} sigma2 {sigma2}: balance from the moments beta "
                  f"{start['beta'].numpy().round(4)} gamma {start['gamma'].numpy().round(4)}")  # fmt: skip
            for balance in (True, False):
                for n_steps in (120, 600):
                    fit = fv.tl.velocity(adata, gene_scale=gene_scale, sigma2=sigma2, time_unit="diffusion",
                                         turnover=False, balance=balance, n_steps=n_steps, copy=True)  # fmt: skip
                    print(f"  {'balanced' if balance else 'free':8} {n_steps:3} steps: "
                          f"beta {fit.var['fit_beta'].to_numpy().round(4)} "
                          f"gamma {fit.var['fit_gamma'].to_numpy().round(4)} "
                          f"residual {fit.var['fit_stationarity'].to_numpy().round(3)}")  # fmt: skip


if __name__ == "__main__":
    main()
