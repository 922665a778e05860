"""Vector-field families as torch modules, laid out in blocks ``[blocks, points, dim]``."""

from ._kinetic import KineticField, LinearKineticField, balance_moments, moment_rates

FIELDS = {"kinetic": KineticField, "linear": LinearKineticField}

__all__ = ["FIELDS", "KineticField", "LinearKineticField", "balance_moments", "moment_rates"]
