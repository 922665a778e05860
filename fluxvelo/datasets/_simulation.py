"""A branching lineage with splicing kinetics and count noise, with the true velocities."""

from __future__ import annotations

import string
from collections.abc import Sequence

import anndata
import numpy as np
import pandas as pd
from scipy import sparse


def _evolve(u, s, alpha, beta, gamma, dt):
    """Exact solution of du/dt = alpha - beta u, ds/dt = beta u - gamma s after ``dt`` at constant alpha."""
    eb = np.exp(-beta * dt)
    eg = np.exp(-gamma * dt)
    u_new = u * eb + alpha / beta * (1.0 - eb)
    # (eg - eb) / (gamma - beta) = eb * expm1(-(gamma - beta) dt) / (gamma - beta), stable as gamma -> beta
    d = gamma - beta
    small = np.abs(d) < 1e-10
    ratio = np.where(small, -dt, np.expm1(-d * dt) / np.where(small, 1.0, d))
    s_new = s * eg + alpha / gamma * (1.0 - eg) + (alpha - beta * u) * eb * ratio
    return u_new, s_new


def _segment_counts(n: int, weights: np.ndarray) -> np.ndarray:
    edges = np.round(np.cumsum(np.concatenate([[0.0], weights])) / weights.sum() * n).astype(int)
    return np.diff(edges)


def _cluster_names(n: int, prefix: str) -> list[str]:
    if prefix == "":  # the trunk
        if n <= 2:
            return ["Root", "Progenitor"][:n]
        return ["Root"] + [f"Progenitor {i}" for i in range(1, n)]
    return [prefix] if n == 1 else [f"{prefix}{i}" for i in range(1, n + 1)]


def simulation(
    *,
    n_cells: int = 1000,
    n_genes: int = 100,
    branches: int | Sequence[str] = 2,
    trunk_clusters: int = 2,
    branch_clusters: int = 2,
    noise: str | None = "poisson",
    theta: float = 10.0,
    library_size_sd: float = 0.3,
    switch_probability: float = 0.7,
    trunk_fraction: float = 0.4,
    t_max: float = 20.0,
    growth_rate: float = 0.0,
    cell_cycle_genes: int = 0,
    random_state: int | None = 0,
) -> anndata.AnnData:
    """Simulate a branching lineage whose genes follow splicing kinetics, with the true velocities.

    Cells sit on a tree: a trunk (time ``0`` to ``trunk_fraction * t_max``) that splits into
    ``branches`` paths (up to ``t_max``), each cut into clusters by time. Every gene follows

        du/dt = alpha(t) - beta u,    ds/dt = beta u - gamma s

    with its own ``beta`` and ``gamma`` and a piecewise-constant transcription rate ``alpha(t)``: it
    starts at steady state, on or off, may switch once in the trunk and once, independently, in each
    branch, so some genes are induced and others repressed along each branch, at gene-specific times.
    The solution is exact (no ODE steps). Counts are Poisson or negative-binomial draws of the
    abundances times a per-cell library factor.

    Parameters
    ----------
    n_cells, n_genes
        Size of the data. Cells are spread over the tree with equal density in time.
    branches
        Number of branches after the split, or their names (default names ``'A'``, ``'B'``, ...).
    trunk_clusters, branch_clusters
        Number of clusters along the trunk (``'Root'``, ``'Progenitor'``, ...) and along each branch
        (``'A1'``, ``'A2'``, ...).
    noise
        ``'poisson'``, ``'nb'`` (negative binomial, gamma-Poisson with shape ``theta``) or None (the
        expected counts themselves, not integers).
    theta
        Inverse dispersion of the negative binomial: variance = mean + mean**2 / theta.
    library_size_sd
        Standard deviation of the log library factor per cell (its mean is 1).
    switch_probability
        Probability that a gene switches (on <-> off) in the trunk, and, independently, in each branch.
    trunk_fraction
        Share of the time span taken by the trunk.
    t_max
        Time span, in units of the typical 1/beta.
    growth_rate
        Population balance: trunk cells divide at this rate ``lambda`` (per unit time), and branch cells
        leave at ``mu = lambda t_split / (t_max - t_split)``, which balances the births, so that as many
        cells leave at the tips as enter at the root. The density along each path is then the stationary
        one, ``exp(int g dt)`` with the turnover ``g`` (``lambda`` on the trunk, ``-mu`` on the branches, the
        flow splitting evenly at the branch point), and ``obs['true_turnover']`` holds ``g``. 0 (default)
        spreads the cells with equal density in time on every path and sets no turnover.
    cell_cycle_genes
        Proliferation markers to append after the ``n_genes`` kinetic genes (needs ``growth_rate > 0``), named
        after cell-cycle marker genes (``'Mki67'``, ``'Top2a'``, ...) so that ``turnover='auto'`` scores them.
        A dividing cell (on the trunk) is in S or G2/M with probability 1/2 (``obs['true_cycling']``); there
        each marker's expected spliced count is 8 instead of 2, and the unspliced 0.3 times that, times the
        library factor, with the counts' noise. The markers follow no kinetics: their true layers are NaN,
        so ground-truth scores leave them out.
    random_state
        Seed of the :class:`numpy.random.Generator`; the same seed gives the same data.

    Returns
    -------
    AnnData, cells x genes, with

    - ``layers['spliced']``, ``layers['unspliced']``: counts (sparse CSR, integer values in float32);
      ``X`` is a copy of the spliced counts.
    - ``layers['true_spliced']``, ``layers['true_unspliced']``: noise-free abundances ``s``, ``u``;
      a cell's expected counts are ``obs['true_size_factor']`` times these.
    - ``layers['true_velocity']`` = ``beta * u - gamma * s`` and ``layers['true_velocity_u']`` =
      ``alpha - beta * u``, in the same units as the abundances.
    - ``layers['true_alpha']``: transcription rate ``alpha(t)`` at each cell.
    - ``obs['clusters']`` (categorical, in lineage order), ``obs['branch']`` (``'trunk'`` or the branch
      name), ``obs['true_time']``, ``obs['true_size_factor']``, and ``obs['true_turnover']`` when
      ``growth_rate > 0``; ``obs['true_cycling']`` with ``cell_cycle_genes``.
    - ``var['true_alpha']`` (on-rate), ``var['true_alpha_off']``, ``var['true_beta']``,
      ``var['true_gamma']``, ``var['true_initial_on']`` (whether alpha starts at the on-rate),
      ``var['true_switch_trunk']`` and ``var['true_switch_<branch>']`` (switch times; NaN where the
      gene does not switch); with ``cell_cycle_genes``, ``var['true_cell_cycle']`` marks the markers (their
      kinetic columns are NaN).
    - ``uns['true_edges']``: lineage edges ``[A, B]`` between clusters; ``uns['true_params']``: settings.
    - ``obsm['X_umap']``: a 2-D layout from time and branch (not a UMAP), so plots work as is.
    """
    if n_cells < 2 or n_genes < 1:
        raise ValueError(f"Need n_cells >= 2 and n_genes >= 1, got n_cells={n_cells}, n_genes={n_genes}.")
    if isinstance(branches, (int, np.integer)):
        if not 1 <= branches <= 26:
            raise ValueError(f"branches must be between 1 and 26, got {branches}.")
        branch_names = list(string.ascii_uppercase[: int(branches)])
    else:
        branch_names = [str(b) for b in branches]
        if not branch_names or len(set(branch_names)) != len(branch_names) or "trunk" in branch_names:
            raise ValueError(f"branches must be distinct names other than 'trunk', got {branches!r}.")
    if noise not in {"poisson", "nb", None}:
        raise ValueError(f"noise must be 'poisson', 'nb' or None, got {noise!r}.")
    if trunk_clusters < 1 or branch_clusters < 1:
        raise ValueError("trunk_clusters and branch_clusters must be at least 1.")
    if not 0.0 < trunk_fraction < 1.0 or t_max <= 0:
        raise ValueError("Need 0 < trunk_fraction < 1 and t_max > 0.")
    if theta <= 0:
        raise ValueError(f"theta must be positive, got {theta}.")
    if growth_rate < 0:
        raise ValueError(f"growth_rate must be non-negative, got {growth_rate}.")
    if not 0 <= cell_cycle_genes <= len(CELL_CYCLE_MARKERS):
        raise ValueError(f"cell_cycle_genes must be between 0 and {len(CELL_CYCLE_MARKERS)}, got {cell_cycle_genes}.")
    if cell_cycle_genes and growth_rate <= 0:
        raise ValueError("cell_cycle_genes mark dividing cells, and only growth_rate > 0 has any; set growth_rate.")

    rng = np.random.default_rng(random_state)
    n_branches = len(branch_names)
    t_split = trunk_fraction * t_max

    # --- per-gene kinetics
    beta = np.exp(rng.normal(0.0, 0.25, n_genes))
    gamma = np.clip(np.exp(rng.normal(np.log(0.3), 0.4, n_genes)), 0.05, 3.0)
    alpha_on = np.exp(rng.normal(np.log(2.0), 0.7, n_genes))
    alpha_off = alpha_on * rng.uniform(0.0, 0.05, n_genes)
    start_on = rng.random(n_genes) < 0.5
    trunk_switch = np.where(
        rng.random(n_genes) < switch_probability, rng.uniform(0.05, 0.85, n_genes) * t_split, np.nan
    )
    branch_switch = np.where(
        rng.random((n_branches, n_genes)) < switch_probability,
        t_split + rng.uniform(0.0, 0.6, (n_branches, n_genes)) * (t_max - t_split),
        np.nan,
    )
    on_after_trunk = start_on ^ ~np.isnan(trunk_switch)
    on_after_branch = on_after_trunk[None, :] ^ ~np.isnan(branch_switch)

    def level(on):
        return np.where(on, alpha_on, alpha_off)

    # --- cells: the trunk, then each branch
    durations = np.array([t_split] + [t_max - t_split] * n_branches)
    if growth_rate > 0:
        lam, mu = growth_rate, growth_rate * t_split / (t_max - t_split)
        # masses of exp(lam t) on the trunk and exp(lam t_split - mu (t - t_split)) / n_branches on each branch
        masses = np.array([np.expm1(lam * t_split) / lam] + [np.exp(lam * t_split) / n_branches * -np.expm1(-mu * durations[1]) / mu] * n_branches)
        counts = _segment_counts(n_cells, masses)
    else:
        counts = _segment_counts(n_cells, durations)
    path = np.repeat(np.arange(n_branches + 1), counts)  # 0 = trunk, b + 1 = branch b
    start = np.where(path == 0, 0.0, t_split)
    draw = rng.random(n_cells)
    if growth_rate > 0:  # inverse CDFs of the two exponential densities
        time = np.where(
            path == 0, np.log1p(draw * np.expm1(lam * t_split)) / lam, t_split - np.log1p(draw * np.expm1(-mu * durations[1])) / mu
        )
        turnover = np.where(path == 0, lam, -mu)
    else:
        time = start + draw * durations[path]

    trunk_names = _cluster_names(trunk_clusters, "")
    branch_cluster_names = [_cluster_names(branch_clusters, b) for b in branch_names]
    n_seg = np.where(path == 0, trunk_clusters, branch_clusters)
    seg = np.minimum(((time - start) / durations[path] * n_seg).astype(int), n_seg - 1)
    cluster = np.array(
        [trunk_names[k] if p == 0 else branch_cluster_names[p - 1][k] for p, k in zip(path, seg, strict=True)]
    )
    edges = [[a, b] for a, b in zip(trunk_names[:-1], trunk_names[1:], strict=True)]
    for names in branch_cluster_names:
        edges.append([trunk_names[-1], names[0]])
        edges += [[a, b] for a, b in zip(names[:-1], names[1:], strict=True)]

    # --- exact kinetics: alpha is constant on [0, sw1), [sw1, sw2), [sw2, inf) per branch and gene.
    # The states at the switches are cheap (branches x genes); each cell then needs one step from
    # the last switch before its time.
    never = 2.0 * t_max + 1.0  # a switch that never happens (alpha is the same on both sides)
    sw1 = np.broadcast_to(np.nan_to_num(trunk_switch, nan=never), (n_branches, n_genes))
    sw2 = np.nan_to_num(branch_switch, nan=never)
    sw1 = np.minimum(sw1, sw2)  # keep the pieces ordered (a trunk switch is before t_split anyway)
    a0 = np.broadcast_to(level(start_on), (n_branches, n_genes))
    a1 = np.broadcast_to(level(on_after_trunk), (n_branches, n_genes))
    a2 = level(on_after_branch)
    u1, s1 = _evolve(a0 / beta, a0 / gamma, a0, beta, gamma, sw1)  # state at sw1, from the steady state
    u2, s2 = _evolve(u1, s1, a1, beta, gamma, sw2 - sw1)  # state at sw2

    b_idx = np.maximum(path - 1, 0)  # trunk cells never reach a branch switch: any branch's schedule works
    t = time[:, None]
    after1, after2 = t >= sw1[b_idx], t >= sw2[b_idx]
    t_start = np.where(after2, sw2[b_idx], np.where(after1, sw1[b_idx], 0.0))
    alpha_now = np.where(after2, a2[b_idx], np.where(after1, a1[b_idx], a0[b_idx]))
    u_start = np.where(after2, u2[b_idx], np.where(after1, u1[b_idx], (a0 / beta)[b_idx]))
    s_start = np.where(after2, s2[b_idx], np.where(after1, s1[b_idx], (a0 / gamma)[b_idx]))
    u, s = _evolve(u_start, s_start, alpha_now, beta, gamma, t - t_start)
    velocity = beta * u - gamma * s
    velocity_u = alpha_now - beta * u

    # --- counts
    size = np.exp(rng.normal(-0.5 * library_size_sd**2, library_size_sd, n_cells))
    spliced, unspliced = _counts(rng, (size[:, None] * s, size[:, None] * u), noise, theta)

    # --- 2-D layout: the trunk along x, branches fanning out from the split point, plus jitter
    angles = np.deg2rad(np.linspace(-40.0, 40.0, n_branches)) if n_branches > 1 else np.zeros(1)
    direction = np.vstack([[1.0, 0.0], np.column_stack([np.cos(angles), np.sin(angles)])])[path]
    origin = np.where(path[:, None] == 0, 0.0, np.array([t_split, 0.0]))
    layout = origin + (time - start)[:, None] * direction + rng.normal(0.0, 0.04 * t_max, (n_cells, 2))

    # --- shuffle the cells so nothing depends on their order
    order = rng.permutation(n_cells)
    if cell_cycle_genes:  # drawn last, so that the kinetic genes are those of the same seed without markers
        cycling = (path == 0) & (rng.random(n_cells) < 0.5)
        markers = _markers(rng, cycling, size, cell_cycle_genes, noise, theta)

    obs = pd.DataFrame(
        {
            "clusters": pd.Categorical(cluster[order], categories=trunk_names + sum(branch_cluster_names, [])),
            "branch": pd.Categorical(
                np.array(["trunk", *branch_names])[path][order], categories=["trunk", *branch_names]
            ),
            "true_time": time[order],
            "true_size_factor": size[order],
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    if growth_rate > 0:
        obs["true_turnover"] = turnover[order]
    if cell_cycle_genes:
        obs["true_cycling"] = cycling[order]
    var = pd.DataFrame(
        {
            "true_alpha": alpha_on,
            "true_alpha_off": alpha_off,
            "true_beta": beta,
            "true_gamma": gamma,
            "true_initial_on": start_on,
            "true_switch_trunk": trunk_switch,
            **{f"true_switch_{b}": branch_switch[i] for i, b in enumerate(branch_names)},
        },
        index=[f"gene_{j}" for j in range(n_genes)],
    )

    def csr(x):
        return sparse.csr_matrix(np.asarray(x, dtype=np.float32)[order])

    def dense(x):
        return np.ascontiguousarray(np.asarray(x, dtype=np.float32)[order])

    layers = {
        "spliced": csr(spliced),
        "unspliced": csr(unspliced),
        "true_spliced": dense(s),
        "true_unspliced": dense(u),
        "true_velocity": dense(velocity),
        "true_velocity_u": dense(velocity_u),
        "true_alpha": dense(alpha_now),
    }
    if cell_cycle_genes:
        var, layers = _append_markers(var, layers, markers, order)
    params = {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "branches": branch_names,
        "noise": str(noise),
        "theta": theta,
        "library_size_sd": library_size_sd,
        "switch_probability": switch_probability,
        "trunk_fraction": trunk_fraction,
        "t_max": t_max,
        "t_split": t_split,
        "growth_rate": growth_rate,
        "cell_cycle_genes": cell_cycle_genes,
        "random_state": -1 if random_state is None else int(random_state),
        "root": trunk_names[0],
    }
    return anndata.AnnData(
        X=layers["spliced"].copy(),
        obs=obs,
        var=var,
        layers=layers,
        obsm={"X_umap": layout[order].astype(np.float32)},
        uns={"true_edges": edges, "true_params": params},
    )


#: Names of the proliferation markers that ``cell_cycle_genes`` appends (mouse symbols of S and G2/M markers).
CELL_CYCLE_MARKERS = ("Mki67", "Top2a", "Cdk1", "Birc5", "Cks2", "Hmgb2", "Ube2c", "Ccnb2", "Tpx2", "Nusap1")


def _counts(rng, means: tuple[np.ndarray, ...], noise: str | None, theta: float) -> tuple[np.ndarray, ...]:
    """Counts drawn around each of ``means`` with the simulator's ``noise`` (None: the means themselves)."""
    if noise == "nb":
        means = tuple(rng.gamma(theta, mean / theta) for mean in means)
    return means if noise is None else tuple(rng.poisson(mean) for mean in means)


def _markers(rng, cycling, size, n, noise, theta) -> dict[str, np.ndarray]:
    """Spliced and unspliced counts of ``n`` markers: expected 2 (8 in cycling cells), unspliced 0.3 of that."""
    mean_s = (size * np.where(cycling, 8.0, 2.0))[:, None] * np.ones((1, n))
    spliced, unspliced = _counts(rng, (mean_s, 0.3 * mean_s), noise, theta)
    return {"spliced": spliced, "unspliced": unspliced}


def _append_markers(var: pd.DataFrame, layers: dict, markers: dict, order: np.ndarray):
    """``var`` and ``layers`` with the marker genes after the kinetic ones (NaN where a truth is undefined)."""
    n = markers["spliced"].shape[1]
    extra = pd.DataFrame(np.nan, index=list(CELL_CYCLE_MARKERS[:n]), columns=var.columns)
    var = pd.concat([var.assign(true_cell_cycle=False), extra.assign(true_cell_cycle=True)])
    var["true_initial_on"] = var["true_initial_on"].astype("boolean")  # <NA> for the markers
    out = {}
    for key, layer in layers.items():
        if key in markers:
            block = sparse.csr_matrix(np.asarray(markers[key], dtype=np.float32)[order])
            out[key] = sparse.hstack([layer, block], format="csr")
        else:
            out[key] = np.hstack([layer, np.full((layer.shape[0], n), np.nan, np.float32)])
    return var, out
