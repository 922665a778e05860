"""``fv.tl.vector_field``: the fitted kinetic field of one gene on a grid of its (u, s) phase plane."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from anndata import AnnData

from .. import _keys as keys
from .._utils import to_dense
from ..fields import FIELDS
from ..fields._kinetic import EPS

__all__ = ["VectorField", "vector_field"]

_N_FINE = 256  # resolution of the du/dt = 0 root search


@dataclass(frozen=True)
class VectorField:
    """One gene's fitted field, evaluated on a grid of the phase plane, in the original units of the data.

    Grids are indexed ``[i_u, j_s]`` (``u`` along rows), as :func:`matplotlib.pyplot.streamplot` expects for
    ``streamplot(s, u, ds, du)``.

    Attributes
    ----------
    gene
        Gene name.
    u, s
        1-D grids of unspliced and spliced abundance (``len(u) == len(s) == n_grid``).
    du, ds
        ``du/dt`` and ``ds/dt`` on the grid, shape ``(n_grid, n_grid)``.
    drive
        Transcription drive on the grid (units of ``u`` per unit time), shape ``(n_grid, n_grid)``.
    nullcline_ds
        The ``ds/dt = 0`` curve ``u = (gamma / beta) (sigma_u / sigma_s) s`` as a ``(2, 2)`` array of its end
        points ``[[s0, u0], [s1, u1]]`` over the ``s`` range.
    nullcline_du
        The ``du/dt = 0`` curve(s), ``drive(u, s) = beta u``: a list of ``(n, 2)`` arrays of ``(s, u)`` points
        (one per branch; the drive is convex in ``u``, so there are at most two). Empty when it does not cross
        the plotted ``u`` range.
    params
        The gene's fitted parameters: ``a``, ``b``, ``c``, ``beta``, ``gamma`` (scaled units), ``scaling_u``,
        ``scaling_s`` and the ``field`` family.
    """

    gene: str
    u: np.ndarray
    s: np.ndarray
    du: np.ndarray
    ds: np.ndarray
    drive: np.ndarray
    nullcline_ds: np.ndarray
    nullcline_du: list[np.ndarray]
    params: dict[str, float | str]
    _module: torch.nn.Module = field(repr=False, compare=False)

    def evaluate(self, u: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(du/dt, ds/dt, drive)`` at abundances ``u``, ``s`` (original units, any equal shape).

        Computed in float32 exactly as :func:`fluxvelo.tl.velocity` computes ``layers['velocity']``.
        """
        return _evaluate(self._module, self.params, np.asarray(u), np.asarray(s))


def _evaluate(module, params, u, s):
    # the same float32 factors as fv.tl.velocity: input scale times the reported time unit
    ts = np.float32(1)
    if "time_scale" in params:
        ts = np.float32(params["time_scale"])
    elif params["time_unit"] == "splicing":  # written before the time unit was stored per gene
        ts = np.float32(params["scaling_u"]) / (np.float32(params["beta"]) * np.float32(params["scaling_s"]))
    su, ss = np.float32(params["scaling_u"]) * ts, np.float32(params["scaling_s"]) * ts
    su_in, ss_in = np.float32(params["scaling_u"]), np.float32(params["scaling_s"])
    shape = np.broadcast_shapes(u.shape, s.shape)
    uu = np.broadcast_to(u, shape).astype(np.float32).ravel() / su_in
    sv = np.broadcast_to(s, shape).astype(np.float32).ravel() / ss_in
    z = torch.from_numpy(np.stack([uu, sv], -1)[None])
    with torch.no_grad():
        flow = module(z)[0].numpy()
        drive = module.drive(z)[0].numpy()
    return (flow[:, 0] * su).reshape(shape), (flow[:, 1] * ss).reshape(shape), (drive * su).reshape(shape)


def _inv_softplus(rate: float, dtype: torch.dtype) -> torch.Tensor:
    """Raw parameter ``r`` with ``softplus(r) + EPS == rate`` in ``dtype`` (to the last bit where reachable)."""
    y = max(float(rate) - EPS, 1e-30)
    raw = torch.tensor(y + np.log(-np.expm1(-y)), dtype=dtype)  # log(expm1(y)), stable for large y
    target = torch.tensor(rate, dtype=dtype)
    best, err = raw, abs(float(torch.nn.functional.softplus(raw) + EPS - target))
    step = torch.tensor(float("inf"), dtype=dtype)
    for direction in (step, -step):  # float rounding: search a few neighbouring floats for an exact match
        cand = raw
        for _ in range(8):
            if err == 0:
                break
            cand = torch.nextafter(cand, direction)
            e = abs(float(torch.nn.functional.softplus(cand) + EPS - target))
            if e < err:
                best, err = cand, e
    return best


def _fitted_params(adata: AnnData, gene: str, key: str) -> tuple[dict, dict]:
    pkey = keys.PARAMS.format(key=key)
    vparams = adata.uns.get(pkey)
    if not isinstance(vparams, Mapping):
        raise KeyError(
            f"adata.uns has no '{pkey}': no velocity fitted under key '{key}'. Run fv.tl.velocity(adata"
            + ("" if key == keys.VELOCITY else f", key_added='{key}'")
            + ") first."
        )
    if vparams.get("mode") != "flux_matching" or vparams.get("field") not in FIELDS:
        raise ValueError(
            f"The velocity under key '{key}' was not fitted with fluxvelo (uns['{pkey}']['mode'] is "
            f"{vparams.get('mode')!r}), so there is no kinetic field to rebuild. Run fv.tl.velocity(adata) first."
        )
    if gene not in adata.var_names:
        close = difflib.get_close_matches(str(gene), adata.var_names.astype(str).tolist(), n=5)
        hint = f" Close matches: {close}." if close else ""
        raise KeyError(f"Gene {gene!r} is not in adata.var_names.{hint}")
    columns = {
        "a": keys.fit_column(keys.FIT_ALPHA_U, key),
        "b": keys.fit_column(keys.FIT_ALPHA_S, key),
        "c": keys.fit_column(keys.FIT_ALPHA_0, key),
        "beta": keys.fit_column(keys.FIT_BETA, key),
        "gamma": keys.fit_column(keys.FIT_GAMMA, key),
        "scaling_u": keys.fit_column(keys.FIT_SCALE_U, key),
        "scaling_s": keys.fit_column(keys.FIT_SCALE_S, key),
    }
    missing = [c for c in columns.values() if c not in adata.var]
    if missing:
        raise KeyError(f"adata.var lacks the fitted parameters {missing}. Run fv.tl.velocity(adata) again.")
    time_scale = keys.fit_column(keys.FIT_TIME_SCALE, key)
    if time_scale in adata.var:
        columns["time_scale"] = time_scale
    read_gamma = keys.fit_column(keys.FIT_GAMMA_READ, key)
    if read_gamma in adata.var:  # the rate the velocities were read with (files before it: the fitted one)
        columns["gamma"] = read_gamma
    params = {name: float(adata.var.loc[gene, col]) for name, col in columns.items()}
    if not all(np.isfinite(v) for v in params.values()):
        raise ValueError(f"Gene {gene!r} has no finite fitted parameters; it was not fitted by fv.tl.velocity.")
    params["field"] = vparams["field"]
    params["time_unit"] = vparams.get("time_unit", "diffusion")
    return params, dict(vparams)


def _build(params: dict, dtype: torch.dtype) -> torch.nn.Module:
    """A one-gene field of the fitted family with the fitted parameters loaded."""
    module = FIELDS[params["field"]](1, dtype=dtype)
    with torch.no_grad():
        for name in ("a", "b", "c"):
            getattr(module, name).fill_(params[name])
        module.beta_raw.copy_(_inv_softplus(params["beta"], dtype).reshape(1, 1))
        module.gamma_raw.copy_(_inv_softplus(params["gamma"], dtype).reshape(1, 1))
    return module.requires_grad_(False)


def _du_nullcline(module: torch.nn.Module, params: dict, u_range, s_range) -> list[np.ndarray]:
    """Roots in ``u`` of ``du/dt(u, s) = 0`` for each ``s`` of a fine grid, as at most two branches."""
    su, ss = params["scaling_u"], params["scaling_s"]
    s = np.linspace(*s_range, _N_FINE) / ss
    u = np.linspace(*u_range, 4 * _N_FINE) / su
    U, S = np.meshgrid(u, s)  # [s, u]
    with torch.no_grad():
        f = module(torch.from_numpy(np.stack([U, S], -1).reshape(1, -1, 2)))[0, :, 0].numpy().reshape(U.shape)
    # a sign change between consecutive u; refine each by bisection on the field itself
    i_s, j_u = np.nonzero(np.sign(f[:, :-1]) * np.sign(f[:, 1:]) < 0)
    lo, hi = u[j_u].copy(), u[j_u + 1].copy()
    f_lo = f[i_s, j_u]
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        with torch.no_grad():
            fm = module(torch.from_numpy(np.stack([mid, s[i_s]], -1)[None]))[0, :, 0].numpy()
        left = np.sign(fm) == np.sign(f_lo)
        lo, hi = np.where(left, mid, lo), np.where(left, hi, mid)
        f_lo = np.where(left, fm, f_lo)
    root = 0.5 * (lo + hi)
    # the drive is convex in u, so du/dt has at most two roots per s: a lower and (maybe) an upper branch
    n_roots = np.bincount(i_s, minlength=s.size)
    lower = np.full(s.size, np.inf)
    upper = np.full(s.size, -np.inf)
    np.minimum.at(lower, i_s, root)
    np.maximum.at(upper, i_s, root)
    branches = []
    for values, rows in ((lower, np.flatnonzero(n_roots >= 1)), (upper, np.flatnonzero(n_roots >= 2))):
        branches += _split_runs(rows, np.column_stack([s[rows] * ss, values[rows] * su]))
    return branches


def _split_runs(rows: np.ndarray, pts: np.ndarray) -> list[np.ndarray]:
    """Split points (sorted by row) into runs of consecutive grid rows (a branch may leave the box and come back)."""
    cuts = np.flatnonzero(np.diff(rows) > 1) + 1
    return [p for p in np.split(pts, cuts) if len(p) > 1]


def _axis_range(x: np.ndarray, given, margin: float, name: str) -> tuple[float, float]:
    if given is not None:
        lo, hi = map(float, given)
        if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
            raise ValueError(f"{name} must be (low, high) with low < high, got {given!r}.")
        return lo, hi
    lo, hi = float(np.min(x)), float(np.max(x))
    span = hi - lo if hi > lo else max(abs(hi), 1.0)
    return max(lo - margin * span, 0.0) if lo >= 0 else lo - margin * span, hi + margin * span


def vector_field(
    adata: AnnData,
    gene: str,
    *,
    key: str = keys.VELOCITY,
    n_grid: int = 30,
    u_range: tuple[float, float] | None = None,
    s_range: tuple[float, float] | None = None,
    margin: float = 0.1,
) -> VectorField:
    """Rebuild the kinetic field that :func:`fluxvelo.tl.velocity` fitted for one gene, on its phase plane.

    The gene's field module (:class:`~fluxvelo.fields.KineticField` or
    :class:`~fluxvelo.fields.LinearKineticField`) is rebuilt from ``adata.var['fit_*']`` and evaluated on an
    ``n_grid x n_grid`` grid of ``(u, s)`` in the original units of the data (the fit's per-gene scaling is
    undone), so the field at the states where :func:`fluxvelo.tl.velocity` read it equals ``layers['<key>']`` and
    ``layers['<key>_u']``: the cells' smoothed ``(Mu, Ms)`` with ``state_rank=False``, else their projection onto
    the shared axes, which this plane does not show. Also returns the nullclines ``ds/dt = 0`` (a line through the
    origin) and ``du/dt = 0``.

    Parameters
    ----------
    adata
        Annotated data on which :func:`fluxvelo.tl.velocity` was run.
    gene
        Name of a velocity gene.
    key
        ``key_added`` of the velocity fit.
    n_grid
        Grid points per axis.
    u_range, s_range
        ``(low, high)`` of the grid in unspliced and spliced abundance. Default: the range of the cells'
        smoothed abundances (the layers the fit used) widened by ``margin`` of its span on both sides, cut at 0.
    margin
        Relative widening of the default ranges.

    Returns
    -------
    :class:`VectorField` with ``u``, ``s`` (1-D grids), ``du``, ``ds``, ``drive`` (``[i_u, j_s]``),
    ``nullcline_ds``, ``nullcline_du``, ``params`` and ``evaluate(u, s)``. ``adata`` is not changed.
    """
    if n_grid < 2:
        raise ValueError(f"n_grid must be at least 2, got {n_grid}.")
    if margin < 0:
        raise ValueError(f"margin must be non-negative, got {margin}.")
    params, vparams = _fitted_params(adata, gene, key)
    if u_range is None or s_range is None:
        layers = [vparams.get("layer_unspliced", keys.MU), vparams.get("layer_spliced", keys.MS)]
        absent = [lay for lay in layers if lay not in adata.layers]
        if absent:
            raise KeyError(f"adata.layers lacks {absent} (the layers of the fit); pass u_range and s_range.")
        col = adata.var_names.get_loc(gene)
        u_range = _axis_range(to_dense(adata.layers[layers[0]][:, col]), u_range, margin, "u_range")
        s_range = _axis_range(to_dense(adata.layers[layers[1]][:, col]), s_range, margin, "s_range")
    else:
        u_range = _axis_range(None, u_range, margin, "u_range")
        s_range = _axis_range(None, s_range, margin, "s_range")

    module = _build(params, torch.float32)
    u = np.linspace(*u_range, n_grid)
    s = np.linspace(*s_range, n_grid)
    du, ds, drive = _evaluate(module, params, *np.meshgrid(u, s, indexing="ij"))

    # ds/dt = 0: beta u / sigma_u = gamma s / sigma_s
    slope = params["gamma"] * params["scaling_u"] / (params["beta"] * params["scaling_s"])
    nullcline_ds = np.array([[s_range[0], slope * s_range[0]], [s_range[1], slope * s_range[1]]])
    nullcline_du = _du_nullcline(_build(params, torch.float64), params, u_range, s_range)
    return VectorField(
        gene=str(gene),
        u=u,
        s=s,
        du=du.astype(np.float64),
        ds=ds.astype(np.float64),
        drive=drive.astype(np.float64),
        nullcline_ds=nullcline_ds,
        nullcline_du=nullcline_du,
        params=params,
        _module=module,
    )
