"""Steering and ablation: directions, interventions, selection, sweeps, orthogonalisation.

>>> from steering import mean_diff_directions, addition, ablation   # doctest: +SKIP
"""

from steering.directions import mean_diff_directions, pca_directions, random_like
from steering.interventions import ablation, addition

__all__ = ["mean_diff_directions", "pca_directions", "random_like", "addition", "ablation"]
