"""The searcher survives Tune's save and restore, which `--resume` relies on: every sampler pickles, and a restored
searcher suggests exactly what the one it was saved from would have (optuna 5.1's NSGA-II holds a lock that does
not pickle; see study.orchestration.tuner.picklable)."""

from __future__ import annotations

import pickle
import typing

import pytest

from study.config import SPACES_DIR, SearchSection, load_study_config
from study.orchestration.tuner import make_sampler, searcher, tune_space

SAMPLERS = [n for n in typing.get_args(SearchSection.model_fields["sampler"].annotation) if n != "auto"]


def _config(sampler: str):
    """The Pareto space with ``sampler``; CMA-ES searches one objective, so it gets the default space."""
    space = SPACES_DIR / ("default.yaml" if sampler == "cmaes" else "pareto.yaml")
    return load_study_config(space, [("search.sampler", sampler)])


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_survives_a_pickle_round_trip(name):
    import optuna

    cfg = _config(name)
    directions = ["maximize"] * len(cfg.search.objective)
    study = optuna.create_study(directions=directions, sampler=make_sampler(cfg, seed=3))

    def objective(trial):
        x, y = trial.suggest_float("x", 0, 1), trial.suggest_float("y", 0, 1)
        return (x, y) if len(directions) == 2 else x - y

    study.optimize(objective, n_trials=3)
    restored = pickle.loads(pickle.dumps(study))
    assert type(restored.sampler) is type(study.sampler)
    # The sampler's state came along: the copy draws the same next trial as the original.
    a, b = study.ask(), restored.ask()
    assert (b.suggest_float("x", 0, 1), b.suggest_float("y", 0, 1)) == \
        (a.suggest_float("x", 0, 1), a.suggest_float("y", 0, 1))
    restored.tell(b, objective(b))  # and it goes on: the lock it got back works
    assert len(restored.trials) == 4


def test_a_pareto_searcher_saved_by_tune_resumes_where_it_stopped(tmp_path):
    """Tune's own save and restore (``Searcher.save_to_dir``/``restore_from_dir``, as ``Tuner.restore`` does) of
    the NSGA-II searcher a Pareto sweep builds: the restored one holds every trial told so far and suggests the
    same next configuration as the one it was saved from."""
    from ray.tune.search.optuna import OptunaSearch

    cfg = _config("auto")
    assert cfg.multi_objective
    live = searcher(cfg, "sweep-test")
    assert type(live._sampler).__name__ == "NSGAIISampler"
    live.set_search_properties(None, None, tune_space(cfg.space.searched))
    metrics = live.metric
    for i in range(3):
        assert live.suggest(f"t{i}") is not None
        live.on_trial_complete(f"t{i}", result={m: 0.1 * (i + j) for j, m in enumerate(metrics)})
    live.save_to_dir(str(tmp_path))

    restored = OptunaSearch()
    restored.restore_from_dir(str(tmp_path))
    assert [t.values for t in restored._ot_study.trials] == [t.values for t in live._ot_study.trials]
    assert len(restored._ot_study.trials) == 3
    assert restored.suggest("t3") == live.suggest("t3")
    restored.on_trial_complete("t3", result={m: 0.5 for m in metrics})
    restored.save_to_dir(str(tmp_path))  # and it saves again
