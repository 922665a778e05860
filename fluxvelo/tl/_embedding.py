"""Projection of velocities into an embedding through the velocity graph's transition matrix (scVelo's)."""

from __future__ import annotations

from collections.abc import MutableMapping

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from .. import _keys
from .._jit import HAS_NUMBA, PROJECTION_KERNELS, announce_compile, compile_in_children, projection_kernels, ready
from .._utils import save_data


__all__ = ["transition_matrix", "velocity_embedding"]

_PAIR_ELEMENTS = 1 << 22  # transitions x embedding dimensions per block in the scipy path
#: Stored graph entries above which 'auto' compiles numba's kernel rather than take the scipy path meanwhile
LARGE_GRAPH = 1 << 24


def _basis_key(adata: AnnData, basis: str) -> tuple[str, str]:
    """('umap', 'X_umap') for basis 'umap' or 'X_umap'; a clear error when the embedding is absent."""
    name = basis[2:] if basis.startswith("X_") else basis
    key = f"X_{name}"
    if key not in adata.obsm:
        raise KeyError(
            f"Embedding '{key}' not found; adata.obsm has {list(adata.obsm.keys())}. "
            f"Compute it first (e.g. scanpy.tl.{name}(adata)) or pass another basis."
        )
    return name, key


def _stored_graphs(adata: AnnData, vkey: str) -> tuple[sp.spmatrix, sp.spmatrix | None]:
    """The velocity graph and its negative part as stored (not copied), with their shapes checked."""
    gkey, nkey = _keys.GRAPH.format(key=vkey), _keys.GRAPH_NEG.format(key=vkey)
    for store in (adata.uns, adata.obsp):
        if gkey in store:
            graph, neg = store[gkey], store.get(nkey)
            for key, g in ((gkey, graph), (nkey, neg)):
                if g is not None and g.shape != (adata.n_obs, adata.n_obs):
                    raise ValueError(
                        f"'{key}' has shape {g.shape} but there are {adata.n_obs} cells (subsetted after the graph "
                        "was built?). Run fv.tl.velocity_graph again."
                    )
            return graph, neg
    raise KeyError(f"adata.uns has no '{gkey}'. Run fv.tl.velocity_graph(adata, vkey='{vkey}') first.")


def _graphs(adata: AnnData, vkey: str) -> tuple[sp.csr_matrix, sp.csr_matrix | None]:
    """Float64 copies of the stored graphs (for the sparse operations of the scipy path)."""
    graph, neg = _stored_graphs(adata, vkey)
    copy = lambda g: None if g is None else sp.csr_matrix(g, dtype=np.float64, copy=True)  # noqa: E731
    return copy(graph), copy(neg)


def _canonical(graph: sp.spmatrix) -> sp.csr_matrix:
    """``graph`` as a csr matrix with sorted, unique entries: the stored arrays themselves when they already are."""
    graph = sp.csr_matrix(graph)
    if not graph.has_canonical_format:
        graph = graph.copy()
        graph.sum_duplicates()
    return graph


def transition_matrix(
    adata: AnnData,
    *,
    vkey: str = _keys.VELOCITY,
    scale: float = 10,
    self_transitions: bool = True,
    use_negative_cosines: bool = True,
) -> sp.csr_matrix:
    r"""Cell-to-cell transition matrix from the velocity graph (scVelo's ``transition_matrix``, no basis).

    :math:`\tilde\pi_{ij} \propto \exp(\lambda \pi_{ij}) - 1` for positive correlations
    :math:`\pi_{ij}`, and :math:`-(\exp(-\lambda \pi_{ij}) - 1)` for negative ones when
    ``use_negative_cosines`` (else :math:`\exp(\lambda\pi_{ij})` for every stored entry); rows are divided by
    the sum of their absolute values. With ``self_transitions`` the diagonal first gets
    clip(98th percentile of the row maxima - row maximum, 0, 1).

    Parameters
    ----------
    adata
        Annotated data with ``uns['<vkey>_graph']`` (and ``uns['<vkey>_graph_neg']``).
    vkey
        Velocity key the graph was computed for.
    scale
        :math:`\lambda`, the inverse kernel width.
    self_transitions
        Add self transitions for cells whose best transition is weak.
    use_negative_cosines
        Let negatively correlated neighbours carry negative weight.

    Returns
    -------
    :class:`~scipy.sparse.csr_matrix` (n_obs x n_obs), row-normalised by absolute sums; ``adata`` is not changed.
    """
    graph, graph_neg = _graphs(adata, vkey)
    if self_transitions:
        graph = sp.csr_matrix(graph - sp.diags(graph.diagonal()) + sp.diags(_self_prob(graph)))
    T = graph.copy()
    T.data = np.expm1(T.data * scale)
    if graph_neg is not None:
        neg = graph_neg.copy()
        if use_negative_cosines:
            neg.data = -np.expm1(-neg.data * scale)
            T = T + neg
        else:
            neg.data = np.expm1(neg.data * scale)
            T = T + neg
            T.eliminate_zeros()
            T.data += 1
    T = sp.csr_matrix(T)
    T.eliminate_zeros()
    with np.errstate(divide="ignore"):
        inv = 1.0 / np.asarray(abs(T).sum(1)).ravel()
    inv[~np.isfinite(inv)] = 0
    return sp.csr_matrix(sp.diags(inv) @ T)


def _self_prob(graph: sp.csr_matrix) -> np.ndarray:
    confidence = graph.max(1).toarray().ravel().astype(np.float64)
    return np.clip(np.percentile(confidence, 98) - confidence, 0, 1)


def _project_scipy(adata, vkey, X_emb, scale, self_transitions, use_negative_cosines):
    """Projection through the explicit transition matrix (sparse ops; reference path)."""
    T = transition_matrix(
        adata, vkey=vkey, scale=scale, self_transitions=self_transitions, use_negative_cosines=use_negative_cosines
    )
    T = sp.csr_matrix(T - sp.diags(T.diagonal()))
    T.eliminate_zeros()
    n = adata.n_obs
    counts = np.diff(T.indptr)
    rows = np.repeat(np.arange(n), counts)
    mean_p = np.divide(np.bincount(rows, weights=T.data, minlength=n), counts, out=np.zeros(n), where=counts > 0)
    weighted, plain = np.zeros_like(X_emb), np.zeros_like(X_emb)  # sums of p * unit displacement, and of it
    step = max(1, _PAIR_ELEMENTS // X_emb.shape[1])
    for start in range(0, rows.size, step):
        r, p = rows[start : start + step], T.data[start : start + step]
        dX = X_emb[T.indices[start : start + step]] - X_emb[r]
        norm = np.sqrt(np.einsum("ij,ij->i", dX, dX))
        with np.errstate(divide="ignore", invalid="ignore"):
            dX = np.where(norm[:, None] > 0, dX / norm[:, None], 0.0)
        for d in range(X_emb.shape[1]):
            weighted[:, d] += np.bincount(r, weights=p * dX[:, d], minlength=n)
            plain[:, d] += np.bincount(r, weights=dX[:, d], minlength=n)
    return weighted - mean_p[:, None] * plain


def _numba_ready(n_entries: int) -> bool:
    """numba when its kernel is compiled or the graph is large (its compile then costs little); else False, and
    the kernels compile in child processes meanwhile."""
    if not HAS_NUMBA:
        return False
    if ready((projection_kernels().project,)) or n_entries > LARGE_GRAPH:
        return True
    compile_in_children(*PROJECTION_KERNELS)
    return False


def _project_numba(adata, vkey, X_emb, scale, self_transitions, use_negative_cosines):
    """Projection by the kernel, on the stored graph's own arrays (no copy of a graph already canonical)."""
    graph, graph_neg = _stored_graphs(adata, vkey)
    graph = _canonical(graph)
    diag = _self_prob(graph) if self_transitions else graph.diagonal()
    has_neg = graph_neg is not None
    graph_neg = _canonical(graph_neg) if has_neg else sp.csr_matrix(graph.shape, dtype=graph.dtype)
    out = np.empty(X_emb.shape)
    project = projection_kernels().project
    announce_compile("the embedding's kernel", (project,))
    project(
        graph.indptr, graph.indices, graph.data, graph_neg.indptr, graph_neg.indices, graph_neg.data,
        has_neg, np.asarray(diag, np.float64), np.ascontiguousarray(X_emb), float(scale),
        bool(use_negative_cosines), out,
    )  # fmt: skip
    return out


def _quiver_scale(X_emb: np.ndarray, V_emb: np.ndarray) -> float:
    """Matplotlib's quiver autoscale for these arrows (scVelo divides by 3x it); no pyplot state is touched."""
    from matplotlib.figure import Figure

    factor = np.abs(X_emb).max()  # handles very large coordinates
    fig = Figure()
    ax = fig.add_subplot()
    q = ax.quiver(
        X_emb[:, 0] / factor, X_emb[:, 1] / factor, V_emb[:, 0], V_emb[:, 1],
        angles="xy", scale_units="xy", scale=None,
    )  # fmt: skip
    q._init()
    return float(q.scale) / factor


def velocity_embedding(
    adata: AnnData,
    *,
    basis: str = "umap",
    vkey: str = _keys.VELOCITY,
    scale: float = 10,
    self_transitions: bool = True,
    use_negative_cosines: bool = True,
    autoscale: bool = True,
    direct_pca: bool | None = None,
    backend: str = "auto",
    copy: bool = False,
) -> AnnData | None:
    r"""Project velocities into an embedding: the expected unit displacement under the transition matrix.

    With :math:`\tilde\pi` from :func:`transition_matrix` (diagonal removed) and unit displacements
    :math:`\tilde\delta_{ij} = (e_j - e_i) / \lVert e_j - e_i \rVert` in the embedding,
    :math:`\tilde\nu_i = \sum_j \tilde\pi_{ij}\tilde\delta_{ij} - \bar\pi_i \sum_j \tilde\delta_{ij}`,
    where both sums and the mean :math:`\bar\pi_i` run over the stored transitions of cell :math:`i`. This is
    scVelo's ``velocity_embedding`` (``all_comps=True``, ``retain_scale=False``), vectorised. Coincident cells
    contribute a zero displacement. A cell without any transition gets a zero vector (scVelo gives NaN).

    Parameters
    ----------
    adata
        Annotated data with ``obsm['X_<basis>']`` and ``uns['<vkey>_graph']`` (from
        :func:`~fluxvelo.tl.velocity_graph`).
    basis
        Embedding name, e.g. ``'umap'``, ``'tsne'``, ``'pca'`` (``'X_umap'`` works too).
    vkey
        Velocity key.
    scale
        Inverse kernel width of the transition matrix.
    self_transitions
        Allow self transitions (see :func:`transition_matrix`).
    use_negative_cosines
        Project negatively correlated transitions into the opposite direction.
    autoscale
        Divide by 3x matplotlib's quiver autoscale so that arrows have a readable length (as scVelo).
    direct_pca
        For a PCA basis: project ``layers[vkey]`` (velocity genes without NaN, centred over cells) onto
        ``varm['PCs']`` directly, skipping the graph.
    backend
        ``'auto'``, ``'numba'`` or ``'scipy'`` (explicit transition matrix). ``'auto'`` takes numba when its
        kernel is compiled (in this process or in numba's cache); before that, scipy, while child processes
        compile it.
    copy
        Return a modified copy instead of writing to ``adata``.

    Returns
    -------
    Returns a copy when ``copy=True``, else None; sets

    ``adata.obsm['<vkey>_<basis>']``
        Projected velocities, same shape as ``obsm['X_<basis>']``.
    ``adata.uns['<vkey>_params']['embeddings']``
        ``basis`` is added to this list when ``uns['<vkey>_params']`` exists.
    """
    if backend not in {"auto", "numba", "scipy"}:
        raise ValueError(f"backend must be 'auto', 'numba' or 'scipy', got {backend!r}.")
    if backend == "numba" and not HAS_NUMBA:
        raise ImportError("backend='numba' needs numba (pip install numba).")
    name, key = _basis_key(adata, basis)
    X_emb = np.asarray(adata.obsm[key], dtype=np.float64)
    if X_emb.ndim != 2 or X_emb.shape[1] < 2:
        raise ValueError(f"obsm['{key}'] must be a 2-D array with at least 2 columns, got shape {X_emb.shape}.")
    if not np.isfinite(X_emb).all():
        bad = int((~np.isfinite(X_emb)).any(1).sum())
        raise ValueError(f"obsm['{key}'] has NaN/inf coordinates in {bad} cell(s); recompute the embedding.")

    if direct_pca and "pca" in name:
        if vkey not in adata.layers:
            raise KeyError(f"adata.layers has no '{vkey}' (it has {list(adata.layers.keys())}).")
        if "PCs" not in adata.varm:
            raise KeyError(f"direct_pca needs varm['PCs'] (scanpy.pp.pca); adata.varm has {list(adata.varm.keys())}.")
        V = adata.layers[vkey]
        V = np.asarray(V.toarray() if sp.issparse(V) else V, dtype=np.float64)
        genes = ~np.isnan(V.sum(0))
        gkey = _keys.VELOCITY_GENES.format(key=vkey)
        if gkey in adata.var:
            genes &= np.asarray(adata.var[gkey], dtype=bool)
        V = V[:, genes]
        V_emb = (V - V.mean(0)) @ np.asarray(adata.varm["PCs"])[genes]
    else:
        n_entries = sum(g.nnz for g in _stored_graphs(adata, vkey) if g is not None)
        use_numba = backend == "numba" or (backend == "auto" and _numba_ready(n_entries))
        V_emb = (_project_numba if use_numba else _project_scipy)(adata, vkey, X_emb, scale, self_transitions, use_negative_cosines)

    if autoscale and np.any(V_emb[:, :2] != 0):
        V_emb = V_emb / (3 * _quiver_scale(X_emb, V_emb))

    adata = adata.copy() if copy else adata
    save_data(adata, "obsm", _keys.EMBEDDING.format(key=vkey, basis=name), V_emb)
    pkey = _keys.PARAMS.format(key=vkey)
    if isinstance(adata.uns.get(pkey), MutableMapping):
        embeddings = list(adata.uns[pkey].get("embeddings", []))
        if name not in embeddings:
            embeddings.append(name)
        adata.uns[pkey]["embeddings"] = embeddings
    return adata if copy else None
