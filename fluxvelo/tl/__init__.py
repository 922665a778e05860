"""Tools: fit the velocity field, build the velocity graph, project into embeddings."""

from ._embedding import transition_matrix, velocity_embedding
from ._graph import velocity_graph
from ._vector_field import VectorField, vector_field
from ._velocity import PRESETS, velocity

__all__ = ["PRESETS", "transition_matrix", "velocity", "velocity_embedding", "velocity_graph", "VectorField", "vector_field"]
