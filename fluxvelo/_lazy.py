"""Dask-backed (lazy) layers: detection, and dense access in blocks of genes.

A Dask array is never imported for, only recognised, so that in-memory AnnData costs nothing here. Lazy layers
are read in blocks of genes spanning every cell: the kinetic field is gene-local, so a fit's statistics, the
field's values and scVelo's per-gene steady-state fit all come out of one block at a time, in bounded memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

#: Bytes of one dense float32 block of genes (all cells); a few such blocks are alive at once.
BLOCK_BYTES = 256 << 20
#: Bytes of one read of whole chunks of columns (all cells, every array read together), cut into blocks after.
SPAN_BYTES = 1 << 30


def is_lazy(x: Any) -> bool:
    """True for a Dask array (or anything else that computes on demand through ``.compute()``)."""
    return type(x).__module__.split(".")[0] == "dask" and hasattr(x, "compute")


def any_lazy(*arrays: Any) -> bool:
    return any(is_lazy(x) for x in arrays)


def _dense(x: Any) -> np.ndarray:
    if is_lazy(x):
        x = x.compute()
    if hasattr(x, "toarray"):
        x = x.toarray()
    return np.asarray(x)


def in_memory(x: Any) -> Any:
    """``x`` itself, or computed when lazy: for the cells x cells graphs (a few entries per cell), which
    ``anndata.experimental.read_lazy`` gives as Dask arrays of sparse chunks."""
    return x.compute() if is_lazy(x) else x


def columns(x: Any, cols: np.ndarray | slice, dtype: Any = np.float32) -> np.ndarray:
    """``x[:, cols]`` as a dense array (a lazy ``x`` is computed for those columns only)."""
    return np.asarray(_dense(x[:, cols]), dtype=dtype)


def gene_block_size(n_obs: int, n_arrays: int = 1) -> int:
    """Genes per block so that ``n_arrays`` dense float32 blocks of all cells fit in :data:`BLOCK_BYTES`."""
    return max(1, BLOCK_BYTES // (4 * max(1, n_obs) * max(1, n_arrays)))


def gene_blocks(genes: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """``genes`` (positions) in consecutive blocks of at most ``size``."""
    for start in range(0, genes.size, size):
        yield genes[start : start + size]


def _column_chunks(x: Any, genes: np.ndarray) -> list[np.ndarray]:
    """``genes`` (sorted positions) split where a chunk of ``x``'s columns ends (one group when not chunked)."""
    widths = getattr(x, "chunks", None)
    if not is_lazy(x) or widths is None:
        return [genes]
    bounds = np.cumsum(widths[1])
    return np.split(genes, np.flatnonzero(np.diff(np.searchsorted(bounds, genes, side="right"))) + 1)


def column_blocks(
    arrays: list[Any], genes: np.ndarray, size: int, dtype: Any = np.float32, take: list[np.ndarray | None] | None = None
):
    """``(block, [x[:, block] for x in arrays])`` for ``genes`` (sorted positions) in blocks of at most ``size``.

    A lazy store decompresses a whole chunk to give any of its columns, so blocks narrower than its chunks would
    decompress each chunk once per block (25 times at a million cells, in blocks of 5 genes out of 128). Lazy
    arrays are therefore read one whole chunk of columns at a time (several narrow ones together, up to ``size``
    genes) and cut into blocks in memory. A chunk too wide for :data:`SPAN_BYTES` (all of ``arrays`` together;
    a store chunked by cells only) is read in blocks of ``size``. Each read is stored chunk by chunk into one
    buffer that later reads reuse, and a block cut from it is a contiguous copy: a few columns strided across
    a million rows would make every later operation on the block slow. In-memory arrays are sliced block by
    block. ``take`` gives, per array, None or the rows to keep, in their order: the cut then gathers them.
    """
    genes = np.asarray(genes)
    take = take or [None] * len(arrays)
    if not any_lazy(*arrays):
        for block in gene_blocks(genes, size):
            yield block, [_cut(columns(x, _as_slice(block), dtype), t) for x, t in zip(arrays, take)]
        return
    widest = max(size, SPAN_BYTES // (4 * sum(x.shape[0] for x in arrays)))
    reads: list[np.ndarray] = []  # whole chunks of columns; narrow ones merged up to `size` genes
    for chunk in _column_chunks(arrays[0], genes):
        if not chunk.size:
            continue
        if chunk.size > widest:
            reads.extend(gene_blocks(chunk, size))
        elif reads and reads[-1].size + chunk.size <= size:
            reads[-1] = np.concatenate([reads[-1], chunk])
        else:
            reads.append(chunk)
    buffers: list[np.ndarray | None] = [None] * len(arrays)
    for read in reads:
        cols = _as_slice(read)
        if read.size <= size:  # one block: the read itself, handed over (a fresh buffer each time)
            yield read, [_cut(_read(x, cols, dtype)[0], t) for x, t in zip(arrays, take)]
            continue
        dense = []
        for i, x in enumerate(arrays):
            d, buffers[i] = _read(x, cols, dtype, buffers[i])
            dense.append(d)
        for start in range(0, read.size, size):
            part = slice(start, start + size)
            yield read[part], [_cut(d[:, part], t, contiguous=True) for d, t in zip(dense, take)]
        del dense


def _cut(x: np.ndarray, rows: np.ndarray | None, contiguous: bool = False) -> np.ndarray:
    """``x[rows]`` (a gather, contiguous), else ``x`` itself, made contiguous when ``contiguous``."""
    if rows is not None:
        return np.take(x, rows, axis=0)
    return np.ascontiguousarray(x) if contiguous else x


def _as_slice(cols: np.ndarray) -> np.ndarray | slice:
    """Consecutive positions as a slice (a view in memory, no gather in Dask), others as they are."""
    consecutive = cols.size and cols[-1] - cols[0] == cols.size - 1
    return slice(int(cols[0]), int(cols[-1]) + 1) if consecutive else cols


def _read(x: Any, cols: np.ndarray | slice, dtype: Any, buffer: np.ndarray | None = None):
    """``(x[:, cols] dense, the buffer it lies in)``; a lazy ``x`` is stored chunk by chunk into ``buffer``.

    Dask's own ``compute`` concatenates the chunks into a fresh array: one more copy, and fresh pages to fault
    in, on every read. ``buffer`` is reused when it is large enough. Chunks that are not dense NumPy (sparse),
    and schedulers other than the threaded and synchronous ones, whose workers cannot write into this process's
    memory, take ``compute`` (and no buffer).
    """
    import dask.array as da

    part = x[:, cols] if is_lazy(x) else None
    if part is None or not isinstance(part._meta, np.ndarray) or not _local_scheduler():
        return columns(x, cols, dtype), None
    if dtype is not None and part.dtype != np.dtype(dtype):
        part = part.astype(dtype)
    n = part.shape[0] * part.shape[1]
    if buffer is None or buffer.dtype != part.dtype or buffer.size < n:
        buffer = np.empty(n, part.dtype)
    out = buffer[:n].reshape(part.shape)
    da.store(part, out, lock=False)
    return out, buffer


def _local_scheduler() -> bool:
    """True when Dask computes in this process's threads (its default, or the synchronous scheduler)."""
    import dask.local
    import dask.threaded
    from dask.base import get_scheduler

    return get_scheduler() in (None, dask.threaded.get, dask.local.get_sync)


def release_memory() -> bool:
    """Give the heap memory that this process has freed back to the operating system; True when some was.

    glibc keeps freed heap memory for later reuse, so after many temporaries (a Dask computation, scanpy's
    approximate neighbour search) the resident memory stays high although the memory is free, and NumPy's large
    arrays, which are mapped separately, cannot reuse it. This calls glibc's ``malloc_trim(0)``, as
    ``dask.distributed`` does for its workers; elsewhere (macOS, Windows, musl) it does nothing.
    """
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own symbols, which hold the C library's
    except (OSError, AttributeError, TypeError):
        return False
    return bool(trim(0))


def count(x: Any, predicate: Any) -> int:
    """Number of entries where ``predicate`` holds, in one pass over a lazy array (stored values if sparse)."""
    if is_lazy(x):
        return int(predicate(x).sum().compute())
    values = np.asarray(x.data) if hasattr(x, "tocsr") else np.asarray(x)
    return int(np.count_nonzero(predicate(values)))
