"""Random search stratified over the categorical knobs, as an Optuna sampler (``search.sampler: stratified``).

Comparing methods side by side needs each method tried about equally often under one protocol. TPE crowds the
trials into whichever method looks best early, and independent random draws leave some method with too few
trials for its exchange rate; Optuna's grid and brute-force samplers stop the study when the grid is done, which
Ray Tune's searcher does not allow. Here trial ``n`` takes the ``(n mod C)``-th of the ``C`` combinations of the
categorical knobs' choices (the first knob varying fastest), so after any number of trials every combination has
run equally often to within one; every other knob is drawn by Optuna's ``RandomSampler``, seeded.
"""

from __future__ import annotations

from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import RandomSampler


class StratifiedSampler(RandomSampler):
    """``RandomSampler`` whose categorical knobs named in ``grid`` (``{knob: number of choices}``, in the order
    they vary, fastest first) cycle through every combination of their choices with the trial number."""

    def __init__(self, grid: dict[str, int], seed: int | None = None):
        super().__init__(seed=seed)
        self._grid = dict(grid)

    def sample_independent(self, study, trial, param_name: str, param_distribution: BaseDistribution) -> Any:
        if param_name not in self._grid or not isinstance(param_distribution, CategoricalDistribution):
            return super().sample_independent(study, trial, param_name, param_distribution)
        index = trial.number
        for name, size in self._grid.items():
            index, pick = divmod(index, size)
            if name == param_name:
                return param_distribution.choices[pick % len(param_distribution.choices)]
        raise AssertionError("unreachable: param_name is in the grid")
