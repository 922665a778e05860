"""Ground truth: scVelo's simulator with its noise-free velocities, and scores against a known velocity."""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
from anndata import AnnData

from .. import _keys as keys
from .._utils import to_dense
from ..datasets._simulation import _evolve


def scvelo_simulation(
    *,
    n_obs: int = 1000,
    n_vars: int = 50,
    noise_level: float = 1.0,
    n_clusters: int = 4,
    random_state: int = 0,
) -> AnnData:
    """scVelo's splicing-kinetics simulation, with per-gene kinetics and the noise-free truth added.

    Calls ``scvelo.datasets.simulation`` (one induction then repression per gene, Gaussian noise) with
    rates drawn per gene: ``alpha``, ``beta``, ``gamma`` log-normal around scVelo's defaults 5, 0.5, 0.3
    (log-sd 0.4) and switch times at a uniform 20-90 % of the time span. scVelo seeds the global NumPy
    and ``random`` generators; their states are restored afterwards.

    scVelo returns only the noisy counts, ``obs['true_t']`` (rounded to 0.01) and the rates in ``var``.
    The exact times are recomputed from scVelo's own Poisson draw (checked against ``true_t``) and the
    noise-free abundances solved in closed form from the rates and ``var['true_t_']``; the true velocity is
    ``beta * u - gamma * s`` on them.

    Parameters
    ----------
    n_obs, n_vars
        Cells and genes (they must differ: scVelo reads a rate list of length ``n_obs`` as per cell).
    noise_level
        scVelo's noise level (Gaussian noise of sd ``noise_level`` x 99th percentile / 10, clipped at 0).
    n_clusters
        The cells are cut into this many clusters by time quantiles, ``'t1'``, ``'t2'``, ...
    random_state
        scVelo's ``random_seed`` and the seed of the per-gene rates.

    Returns
    -------
    AnnData with ``layers['spliced']``, ``layers['unspliced']`` (noisy, non-negative; also ``X``),
    ``layers['true_spliced']``, ``layers['true_unspliced']``, ``layers['true_velocity']``,
    ``obs['true_t']`` (exact time), ``obs['clusters']``, scVelo's ``var['true_t_']``, ``var['true_alpha']``,
    ``var['true_beta']``, ``var['true_gamma']``, ``uns['true_edges']`` (``t1 -> t2 -> ...``) and
    ``uns['true_params']`` (settings, and whether the exact times could be recovered).
    """
    import scvelo as scv

    if n_obs == n_vars:
        raise ValueError("n_obs and n_vars must differ (scVelo takes a list of n_obs rates as per-cell rates).")
    if n_clusters < 2:
        raise ValueError("n_clusters must be at least 2, so that there are lineage edges.")
    rng = np.random.default_rng(random_state)
    alpha = 5.0 * np.exp(rng.normal(0.0, 0.4, n_vars))
    beta = 0.5 * np.exp(rng.normal(0.0, 0.4, n_vars))
    gamma = 0.3 * np.exp(rng.normal(0.0, 0.4, n_vars))
    switches = rng.uniform(0.2, 0.9, n_vars)

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        sim = scv.datasets.simulation(
            n_obs=n_obs,
            n_vars=n_vars,
            alpha=alpha.tolist(),
            beta=beta.tolist(),
            gamma=gamma.tolist(),
            switches=switches.tolist(),
            noise_model="normal",
            noise_level=noise_level,
            random_seed=random_state,
        )
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)

    # scVelo's draw_poisson, with a private generator seeded as scVelo seeds the global one
    draw = random.Random(random_state)
    t = np.insert(np.cumsum([-0.1 * np.log(draw.uniform(0, 1)) for _ in range(n_obs - 1)]), 0, 0.0)
    exact = bool(np.allclose(t.round(2), sim.obs["true_t"].to_numpy()))
    if not exact:  # a different scVelo: fall back on the rounded times
        t = sim.obs["true_t"].to_numpy(np.float64)

    t_switch = sim.var["true_t_"].to_numpy(np.float64)
    a, b, g = (sim.var[k].to_numpy(np.float64) for k in ("true_alpha", "true_beta", "true_gamma"))
    zeros = np.zeros(n_vars)
    u_sw, s_sw = _evolve(zeros, zeros, a, b, g, t_switch)  # state at the switch, from (0, 0)
    tt = t[:, None]
    on = tt < t_switch
    u_on, s_on = _evolve(zeros, zeros, a, b, g, np.where(on, tt, 0.0))
    u_off, s_off = _evolve(u_sw, s_sw, zeros, b, g, np.where(on, 0.0, tt - t_switch))
    u, s = np.where(on, u_on, u_off), np.where(on, s_on, s_off)

    names = [f"t{i + 1}" for i in range(n_clusters)]
    bins = np.quantile(t, np.linspace(0, 1, n_clusters + 1)[1:-1])
    clusters = pd.Categorical(np.array(names)[np.searchsorted(bins, t, side="right")], categories=names)

    var = sim.var.copy()
    var.index = [f"gene_{j}" for j in range(n_vars)]
    obs = pd.DataFrame({"true_t": t, "clusters": clusters}, index=[f"cell_{i}" for i in range(n_obs)])
    spliced = np.asarray(sim.layers["spliced"], np.float32)
    layers = {
        "spliced": spliced,
        "unspliced": np.asarray(sim.layers["unspliced"], np.float32),
        "true_spliced": s.astype(np.float32),
        "true_unspliced": u.astype(np.float32),
        "true_velocity": (b * u - g * s).astype(np.float32),
    }
    params = {"n_obs": n_obs, "n_vars": n_vars, "noise_level": noise_level, "random_state": random_state,
              "exact_times": exact, "source": "scvelo.datasets.simulation"}  # fmt: skip
    edges = [[x, y] for x, y in zip(names[:-1], names[1:], strict=True)]
    return AnnData(spliced.copy(), obs=obs, var=var, layers=layers, uns={"true_edges": edges, "true_params": params})


def ground_truth_scores(
    adata: AnnData, *, vkey: str = keys.VELOCITY, true_key: str = "true_velocity", rel_tol: float = 0.01
) -> tuple[dict[str, float], pd.Series]:
    """Agreement of an estimated velocity with the true one.

    Genes are those whose estimate is finite in every cell (and whose truth is finite).

    - ``velocity_cosine``: per cell, the cosine between estimated and true velocity over those genes
      (0 where either is zero), averaged over cells. It ignores any per-cell factor, such as the
      library-size normalisation between true abundances and normalised data.
    - ``sign_accuracy``: per gene, the share of cells where the estimate has the sign of the truth, over
      the cells whose true ``|velocity|`` exceeds ``rel_tol`` times the gene's largest (near steady
      states the sign is undefined); averaged over genes.

    Parameters
    ----------
    adata
        Annotated data with ``layers[vkey]`` and ``layers[true_key]``.
    vkey
        Estimated velocity layer.
    true_key
        True velocity layer.
    rel_tol
        Relative threshold below which a true velocity counts as zero for the sign accuracy.

    Returns
    -------
    scores
        ``velocity_cosine``, ``sign_accuracy`` and ``n_genes_compared``.
    per_gene
        Sign accuracy per gene (NaN for genes not compared).
    """
    est = to_dense(adata.layers[vkey]).astype(np.float64)
    true = to_dense(adata.layers[true_key]).astype(np.float64)
    genes = np.isfinite(est).all(0) & np.isfinite(true).all(0)
    if not genes.any():
        raise ValueError(f"No gene has a finite estimate in layers['{vkey}'] and truth in layers['{true_key}'].")
    e, v = est[:, genes], true[:, genes]
    den = np.linalg.norm(e, axis=1) * np.linalg.norm(v, axis=1)
    cos = np.divide((e * v).sum(1), den, out=np.zeros(len(e)), where=den > 0)

    big = np.abs(v) > rel_tol * np.abs(v).max(0, keepdims=True)
    agree = (np.sign(e) == np.sign(v)) & big
    n = big.sum(0)
    per = np.divide(agree.sum(0), n, out=np.full(n.shape, np.nan), where=n > 0)
    per_gene = pd.Series(np.nan, index=adata.var_names, name="sign_accuracy")
    per_gene[genes] = per
    scores = {
        "velocity_cosine": float(cos.mean()),
        "sign_accuracy": float(np.nanmean(per)) if (n > 0).any() else float("nan"),
        "n_genes_compared": int(genes.sum()),
    }
    return scores, per_gene
