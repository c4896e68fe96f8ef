"""Per-layer linear probes and activation-subspace overlap.

>>> from probes import ProbeSweep, activation_overlap   # doctest: +SKIP
"""

from probes.overlap import OverlapResult, activation_overlap
from probes.sweep import ProbeSweep, SweepResult

__all__ = ["ProbeSweep", "SweepResult", "activation_overlap", "OverlapResult"]
