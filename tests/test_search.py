"""The searcher survives Tune's save and restore, which `--resume` relies on: every sampler pickles, and a restored
searcher suggests exactly what the one it was saved from would have (optuna 5.1's NSGA-II holds a lock that does
not pickle; see study.orchestration.tuner.picklable)."""

from __future__ import annotations

import pickle
import typing

import pytest

from study.config import SPACES_DIR, ConfigError, SearchSection, load_study_config
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


# Spaces at the edges of what the config accepts (issue 24): each must be one Tune converts and Optuna samples,
# with every draw a valid trial.
EDGE_SPACES = {
    "quniform-grid-with-float-noise": {"data_fraction": {"distribution": "quniform", "low": 0.3, "high": 0.9, "q": 0.1},
                                       "learning_rate": {"distribution": "quniform", "low": 2e-4, "high": 1e-2,
                                                         "q": 2e-4}},
    "one-value-ranges": {"tether_weight": {"distribution": "uniform", "low": 0.5, "high": 0.5},
                         "lora_blocks": {"distribution": "int", "low": 2, "high": 2},
                         "learning_rate": {"distribution": "loguniform", "low": 1e-3, "high": 1e-3}},
    "logint-from-one-and-mixed-numbers": {"lora_rank": {"distribution": "logint", "low": 1, "high": 8},
                                          "tether_weight": {"distribution": "categorical", "choices": [0, 0.5, 1]},
                                          "train_projections": {"distribution": "categorical",
                                                                "choices": [True, False]},
                                          "lora_targets": {"distribution": "categorical",
                                                           "choices": ["attn", "attn+mlp"]}},
}


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_edge_space_the_config_accepts_is_sampled_by_tune_and_optuna(sampler):
    import math
    import warnings

    for name, params in EDGE_SPACES.items():
        overrides = [("params", params), ("search.sampler", sampler), ("search.trials", 4)]
        if sampler == "stratified" and not any(p.get("distribution") == "categorical" for p in params.values()):
            with pytest.raises(ConfigError, match="stratified needs a categorical knob"):  # nothing to stratify
                load_study_config(None, overrides)
            continue
        cfg = load_study_config(None, overrides)
        s = searcher(cfg, f"edge-{name}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CMA-ES and QMC say they sample categoricals independently
            s.set_search_properties(None, None, tune_space(cfg.space.searched))
            metrics = s.metric if isinstance(s.metric, list) else [s.metric]
            for i in range(4):
                drawn = s.suggest(f"t{i}")
                settings = cfg.space.settings(drawn)  # raises if a draw is not a valid trial
                for knob, dist in cfg.space.searched.items():
                    value = getattr(settings, knob)
                    if dist.distribution == "quniform":
                        assert dist.low - 1e-9 <= value <= dist.high + 1e-9, (name, knob, value)
                        assert math.isclose(value / dist.q, round(value / dist.q)), (name, knob, value)
                s.on_trial_complete(f"t{i}", result={m: 0.1 * i for m in metrics})


@pytest.mark.parametrize("low,high,q", [(1e-4, 1e-2, 2e-4), (2e-4, 1e-2, 2e-4), (0.1, 0.95, 0.1), (0.3, 0.9, 0.1),
                                        (0.05, 0.95, 0.1), (0.1, 0.2, 0.5), (0.0, 4.0, 0.25), (0.0, 4.0, 0.3)])
def test_a_quniform_space_is_refused_exactly_when_ray_tune_would_refuse_it(low, high, q):
    """Before issue 24 these failed inside Optuna's searcher after Ray had started; the config now applies Ray
    Tune's own rule first, and this ties the two together (a Tune release that relaxes it shows up here)."""
    from ray import tune

    from study.config import ConfigError

    try:
        tune.quniform(low, high, q)
        tune_takes_it = True
    except ValueError:
        tune_takes_it = False
    try:
        load_study_config(None, [("params.tether_weight", {"distribution": "quniform", "low": low, "high": high,
                                                           "q": q})])
        we_take_it = True
    except ConfigError:
        we_take_it = False
    assert we_take_it == tune_takes_it
