"""Tools: fit the velocity field, build the velocity graph, project into embeddings."""

from .._jit import compile_fit_kernels_ahead

# A fit usually follows: where the fit's kernels are not cached, child processes start compiling them now, beside
# the import of torch below (about 1 s off a first fit; nothing happens once they are cached).
compile_fit_kernels_ahead()

from ._embedding import transition_matrix, velocity_embedding
from ._graph import velocity_graph
from ._options import PRESETS
from ._vector_field import VectorField, vector_field
from ._velocity import velocity

__all__ = ["PRESETS", "VectorField", "transition_matrix", "vector_field", "velocity", "velocity_embedding", "velocity_graph"]
