"""Search spaces are validated completely, with one-line errors naming file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from study.config import (SPACES_DIR, Categorical, ConfigError, LogUniform, TrialSettings, load_study_config,
                          parse_override)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


BASE = """
name: t
params:
  learning_rate: {distribution: loguniform, low: 1.0e-4, high: 1.0e-2}
"""


def test_shipped_spaces_validate():
    for path in sorted(SPACES_DIR.glob("*.yaml")):
        cfg = load_study_config(path)
        assert cfg.search.trials >= 1
        assert any(isinstance(v, (LogUniform, Categorical)) for v in cfg.space.searched.values()), path


def test_default_space_searches_lr_rank_fraction():
    cfg = load_study_config(None)
    searched, fixed = cfg.space.searched, cfg.space.fixed
    assert isinstance(searched["learning_rate"], LogUniform)
    assert isinstance(searched["lora_rank"], Categorical)
    assert searched["data_fraction"].distribution == "uniform"
    assert fixed["lora_targets"] == ["attn", "mlp"] and fixed["epochs"] == 8  # typed once, split once
    assert not fixed.keys() & searched.keys()
    assert cfg.search.objective[0].metric == "specialized_balanced_accuracy"  # the headline, on validation


@pytest.mark.parametrize("text, field", [
    ("name: t\nparams: {learning_rate: {distribution: loguniform, low: 1.0e-4, high: 1.0e-2}}\nbogus: 1\n", "bogus"),
    ("name: t\nparams: {lr: 0.1}\n", "params.lr"),
    ("name: t\nparams: {learning_rate: {distribution: gaussian, low: 0, high: 1}}\n", "params.learning_rate.distribution"),
    ("name: t\nparams: {lora_rank: {distribution: int, low: 0, high: 4}}\n", "params.lora_rank.low"),
    ("name: t\nparams: {lora_rank: {distribution: categorical, choices: [4, -1]}}\n", "params.lora_rank.choices"),
    ("name: t\nparams: {learning_rate: {distribution: uniform, low: -1, high: 1}}\n", "params.learning_rate.low"),
    ("name: t\nparams: {learning_rate: 0, lora_rank: {distribution: int, low: 1, high: 4}}\n", "params.learning_rate"),
    ("name: t\nparams: {data_fraction: {distribution: uniform, low: 0.5, high: 1.5}}\n", "params.data_fraction.high"),
    ("name: t\nparams: {data_fraction: {distribution: uniform, low: 0.0, high: 1.0}}\n", "params.data_fraction.low"),
    ("name: t\nsearch: {trials: 0}\nparams: {lora_rank: {distribution: int, low: 1, high: 4}}\n", "search.trials"),
    ("name: t\nsearch: {objective: [{metric: accuracy}]}\nparams: {lora_rank: {distribution: int, low: 1, high: 4}}\n",
     "search.objective.0.metric"),
    ("name: t\ndata: {specialized: {source: x, templates: ['no slot']}}\nparams: {lora_rank: {distribution: int, low: 1, high: 4}}\n",
     "data.specialized.0.templates"),
    ("name: t\nparams: {learning_rate: {distribution: loguniform, low: 0.1, high: 0.01}}\n", "params.learning_rate"),
    ("name: t\nparams: {learning_rate: 0.1}\n", "params"),
])
def test_bad_space_names_file_and_field(tmp_path, text, field):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_study_config(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: {field}"), msg


def test_malformed_yaml_reports_line(tmp_path):
    path = write(tmp_path, "name: t\nparams: {learning_rate: [\n")
    with pytest.raises(ConfigError, match=r"malformed YAML at line \d+"):
        load_study_config(path)


def test_missing_space_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_study_config(tmp_path / "nope.yaml")


def test_overrides_fix_and_reshape_parameters(tmp_path):
    path = write(tmp_path, BASE)
    overrides = [parse_override("lora_rank=8"), parse_override("search.trials=3"),
                 parse_override("params.learning_rate.high=0.05")]
    cfg = load_study_config(path, overrides)
    assert cfg.space.fixed["lora_rank"] == 8
    assert cfg.search.trials == 3
    assert cfg.space.searched["learning_rate"].high == pytest.approx(0.05)
    with pytest.raises(ConfigError, match="params.lora_rank"):
        load_study_config(path, [parse_override("lora_rank=0")])


def test_trial_settings_parse_parts_and_refuse_empty_training():
    s = TrialSettings(lora_targets="attn+mlp", lora_towers="text")
    assert s.lora_targets == ["attn", "mlp"] and s.lora_towers == ["text"]
    with pytest.raises(ValueError, match="nothing to train"):
        TrialSettings(lora_blocks=0, train_projections=False, train_logit_scale=False)


def test_fractional_gpus_pack_trials_and_auto_concurrency_is_accepted():
    from study.orchestration.runners import TrainRunner, choose_runner, scaling_config

    cfg = load_study_config(None, [("resources.gpus_per_worker", 0.25), ("resources.workers_per_trial", 2),
                                   ("search.max_concurrent", "auto")])
    assert cfg.search.max_concurrent == "auto"
    assert isinstance(choose_runner(cfg.resources), TrainRunner)  # two workers: a Ray Train run
    sc = scaling_config(cfg.resources)
    assert sc.num_workers == 2 and sc.use_gpu and sc.resources_per_worker == {"CPU": 1, "GPU": 0.25}
    with pytest.raises(ConfigError, match="search.max_concurrent"):
        load_study_config(None, [("search.max_concurrent", 0)])


def test_a_shipped_space_is_found_by_name_from_any_directory(tmp_path, monkeypatch):
    from study.config import SPACES_DIR
    from study.run import build_parser

    monkeypatch.chdir(tmp_path)  # outside the repository: search_spaces/ is not here
    for given in ("pareto", "pareto.yaml", "search_spaces/pareto.yaml"):
        assert build_parser().parse_args(["--space", given]).space == SPACES_DIR / "pareto.yaml", given
    (tmp_path / "pareto.yaml").write_text("name: mine\n")  # a file of the user's own wins
    assert build_parser().parse_args(["--space", "pareto.yaml"]).space.resolve() == tmp_path / "pareto.yaml"
    assert build_parser().parse_args(["--space", "/elsewhere/pareto.yaml"]).space.parent.name == "elsewhere"
