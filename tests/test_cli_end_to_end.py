"""`python -m study.run` end to end, as a user runs it, checked against what MLflow holds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from helpers import mlflow_runs, run_cli

from study.tracking import run_metrics

TRIAL_PARAMS = {"method", "learning_rate", "lora_rank", "data_fraction", "tether_weight", "epochs", "batch_size",
                "lora_targets", "lora_towers", "lora_blocks"}


def test_smoke_study_records_parent_baseline_and_one_child_per_trial(tmp_path, smoke_cache):
    proc = run_cli(["--smoke-test", "--set", "params.epochs=2", "--seeds", "2", "--replicate-top", "1"],
                   tmp_path, smoke_cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "Study summary" in out and "points vs baseline" in out and "mlflow ui --backend-store-uri" in out
    assert "chosen on validation (specialized_balanced_accuracy, max)" in out and "(chance" in out
    # A quiet console: the study's own lines and trial table, none of Ray's result dumps or hints.
    assert "[study] trials: " in out and "val spec." in out
    assert "Reporting training result" not in out + proc.stderr and "TensorBoard" not in out + proc.stderr
    assert "Downloading artifacts" not in proc.stderr  # the report reads each trial's metrics/final.json

    c, runs = mlflow_runs(tmp_path)
    kinds = [r.data.tags.get("study.kind") for r in runs]
    assert sorted(kinds) == ["baseline", "replicate", "sweep", "trial", "trial"]
    parent = next(r for r in runs if r.data.tags["study.kind"] == "sweep")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4
    assert parent.info.run_id in out
    assert parent.data.tags["mlflow.source.git.commit"]
    assert parent.data.tags["version.torch"] and parent.data.tags["version.ray"] == "2.60.0"
    assert parent.data.tags["study.smoke_test"] == "true"  # so that the experiment's latest sweep is a real one
    assert {a.path for a in c.list_artifacts(parent.info.run_id)} >= {"study_config.yaml", "package_versions.json",
                                                                       "analysis"}
    assert "trade-off report" in out
    report = {a.path for a in c.list_artifacts(parent.info.run_id, "analysis")}
    assert {"analysis/report.md", "analysis/report.html", "analysis/trials.csv", "analysis/tradeoff_map.png",
            "analysis/wiseft_curves.png"} <= report
    html = Path(c.download_artifacts(parent.info.run_id, "analysis/report.html", str(tmp_path))).read_text()
    assert html.count('src="data:image/png;base64,') >= 4 and "<table" in html  # MLflow's viewer renders it

    # Readable in the MLflow UI: the experiment opens on its training runs, run names tell runs apart, and the
    # parent's row carries the sweep's headline.
    assert c.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    for r in runs:  # the run page's "Source: python -m study.run <commit>"
        assert r.data.tags["mlflow.source.name"] == "python -m study.run" and "mlflow.source.git.commit" in r.data.tags
    assert re.fullmatch(r"sweep \d\d:\d\d:\d\d \d{4}-\d\d-\d\d", parent.info.run_name), parent.info.run_name
    names = {r.data.tags["study.kind"]: r.info.run_name for r in runs if r.data.tags["study.kind"] != "trial"}
    assert names["baseline"] == f"baseline · {parent.info.run_name}"
    assert names["replicate"].startswith("rep seed=1 of ")
    trial_names = sorted(r.info.run_name for r in runs if r.data.tags["study.kind"] == "trial")
    assert [n[:4] for n in trial_names] == ["t01 ", "t02 "] and all("lr=" in n for n in trial_names), trial_names
    for r in runs:  # the console names each trial as its MLflow run: "t01 <Tune's trial id>"
        if r.data.tags["study.kind"] == "trial":
            assert f"{r.info.run_name[:3]} {r.data.tags['study.trial_id']}" in out, r.info.run_name
    assert re.search(r"best trial t0[12] \w{8} \(chosen on validation\)", out)
    inputs = {(d.dataset.name, d.dataset.source_type, d.tags[0].value) for d in
              c.get_run(parent.info.run_id).inputs.dataset_inputs}
    assert ("finetune (train)", "code", "training") in inputs and len(inputs) >= 3, inputs  # + the benchmarks
    pm = c.get_run(parent.info.run_id).data.metrics
    assert pm["trials_finished"] == 2 and pm["trials_failed"] == 0
    assert (pm["best/test/specialized_balanced_accuracy_gain_ci_low"] <= pm["best/test/specialized_balanced_accuracy_gain"]
            <= pm["best/test/specialized_balanced_accuracy_gain_ci_high"])
    assert "WiSE-FT (trained change x alpha): alpha" in out and "paired 95% CI [" in out and "Holm-adjusted" in out
    # The summary's WiSE-FT line gives the metric that chose alpha (the headline's mean over both roles), at every
    # alpha as the chosen trial logged it (it once listed specialized top-1, which chose nothing).
    label = re.search(r"best trial (t0[12]) ", out).group(1)
    best = next(r for r in runs if r.info.run_name.startswith(label + " "))
    bm = run_metrics(c, best)
    listed = re.search(r"chosen on validation by mean balanced accuracy gives test balanced accuracy specialized "
                       r"[\d.]+%, general [\d.]+%; validation mean balanced accuracy by alpha: (.*)", out).group(1)
    curve = {float(a): float(v) for a, v in re.findall(r"([\d.]+): ([\d.]+)%", listed)}
    assert curve == {a: pytest.approx(100 * bm[f"val/wiseft/alpha_{a:g}/mean_balanced_accuracy"], abs=0.05)
                     for a in (0.0, 0.25, 0.5, 0.75, 1.0)}

    baseline = next(r for r in children if r.data.tags["study.kind"] == "baseline")
    bm = run_metrics(c, baseline)  # every metric: its metrics/final.json over its top level
    assert len(baseline.data.metrics) <= 40 and bm["test/specialized_top1"] == baseline.data.metrics[
        "test/specialized_top1"]
    assert 0 <= bm["test/specialized_top1"] <= 1 and 0 <= bm["val/specialized_top1"] <= 1
    assert bm["test/specialized_top1_ci_low"] <= bm["test/specialized_top1"]
    assert bm["test/specialized_chance_balanced_accuracy"] == 0.25  # 4 morphologies
    assert 0.25 <= bm["test/specialized_chance_top1"] < 1  # the majority class's share of the test part
    assert {"eval/test_general_confusion.csv", "eval/val_general_confusion.csv"} <= {
        a.path for a in c.list_artifacts(baseline.info.run_id, "eval")}
    assert "McNemar p" in out
    assert bm["test/general_top1"] >= 0

    trials = [r for r in children if r.data.tags["study.kind"] == "trial"]
    assert len({r.data.tags["study.trial_id"] for r in trials}) == 2
    # Each trial's fine-tuning subset is its run's training input: the parent's set at its data fraction.
    subsets = [c.get_run(r.info.run_id).inputs.dataset_inputs for r in trials]
    for r, (d,) in zip(trials, subsets):
        assert d.dataset.name == f"finetune (train) f={float(r.data.params['data_fraction']):.3g}", d.dataset.name
        assert d.tags[0].value == "training" and d.dataset.source_type == "code"
    assert len({d.dataset.digest for (d,) in subsets}) == 2

    # --seeds 2 --replicate-top 1: the best trial rerun once with the next seed; mean +/- sd reported.
    rep = next(r for r in children if r.data.tags["study.kind"] == "replicate")
    best = next(r for r in trials if r.data.tags["study.trial_id"] == rep.data.tags["study.replicate_of"])
    chosen = "val/specialized_balanced_accuracy"  # replicated: the best on validation
    assert best.data.metrics[chosen] == max(r.data.metrics[chosen] for r in trials)
    assert rep.info.status == "FINISHED" and rep.data.params["seed"] == "1"
    assert rep.data.params["learning_rate"] == best.data.params["learning_rate"]
    pm = c.get_run(parent.info.run_id).data.metrics
    values = [best.data.metrics["test/specialized_top1"], rep.data.metrics["test/specialized_top1"]]
    key = f"replicates/{best.data.tags['study.trial_id']}/specialized_top1"
    assert pm[f"{key}_mean"] == pytest.approx(sum(values) / 2) and pm[f"{key}_sd"] >= 0
    assert "seed replicates (test top-1, mean +/- sd" in out and f"{best.data.tags['study.trial_id']} (n=2)" in out
    assert "replicates.csv" in {a.path for a in c.list_artifacts(parent.info.run_id)}
    for run in trials:
        assert run.info.status == "FINISHED" and run.data.tags["study.status"] == "FINISHED"
        assert TRIAL_PARAMS <= set(run.data.params), set(run.data.params)
        assert run.data.params["epochs"] == "2"
        # The run's top level holds what a reader compares runs by; everything else is in metrics/.
        top, m = run.data.metrics, run_metrics(c, run)
        assert len(top) <= 40, sorted(top)
        for key in ("val/specialized_top1", "val/general_top1", "val/specialized_balanced_accuracy", "train_loss",
                    "weight_change_norm", "test/specialized_top1", "test/general_top1_change", "wiseft_best_alpha",
                    "test/specialized_balanced_accuracy_gain_ci_low", "test/specialized_mcnemar_p_holm"):
            assert key in top, key
        assert not any(k.startswith(("final/", "val/wiseft/")) or "recall/" in k for k in top)
        for key in ("test/general_mcnemar_p", "test/specialized_recall/0", "test/specialized_collapsed"):
            assert key in m, key
        tables = {a.path for a in c.list_artifacts(run.info.run_id, "metrics")}
        assert tables == {f"metrics/{n}" for n in ("final.json", "per_class.csv", "intervals.csv", "wiseft.csv")}
        per_class = pd.read_csv(c.download_artifacts(run.info.run_id, "metrics/per_class.csv", str(tmp_path)))
        spec = per_class[(per_class["part"] == "test") & (per_class["benchmark"] == "specialized")]
        assert len(spec) == 4 and spec["class"].str.len().min() > 1  # the 4 morphologies, by name
        for _, row in spec.iterrows():
            assert row["recall"] == pytest.approx(m[f"test/specialized_recall/{row['class_index']}"], abs=1e-5)
        curve = pd.read_csv(c.download_artifacts(run.info.run_id, "metrics/wiseft.csv", str(tmp_path)))
        assert list(curve["alpha"]) == [0.0, 0.25, 0.5, 0.75, 1.0] and "val/specialized_top1" in curve
        assert m["test/specialized_top1_ci_low"] <= m["test/specialized_top1"] <= m["test/specialized_top1_ci_high"]
        assert 0 <= m["test/specialized_mcnemar_p"] <= m["test/specialized_mcnemar_p_holm"] <= 1
        assert "eval/test_specialized_confusion.csv" in {a.path for a in c.list_artifacts(run.info.run_id, "eval")}
        # The test part is scored once, at the last epoch; validation every epoch.
        assert [h.step for h in c.get_metric_history(run.info.run_id, "test/specialized_top1")] == [2]
        assert sorted(h.step for h in c.get_metric_history(run.info.run_id, "val/specialized_top1")) == [1, 2]
        # Retrieval on held-out captions, both directions, and how long evaluation took.
        for key in ("i2t_recall_at_1", "t2i_recall_at_5", "i2t_recall_at_10", "i2t_recall_at_1_ci_low"):
            assert 0 <= m[f"test/specialized/micrographs-captions/{key}"] <= 1, key
        assert m["eval_seconds"] > 0
        # The WiSE-FT curve on both parts (the test curve reports the trade-off): every alpha logged; alpha = 0 is
        # the baseline exactly. Validation alone chooses the alpha, by the headline's mean over both roles.
        for part in ("val", "test"):
            alphas = sorted(float(k.split("/")[2].removeprefix("alpha_")) for k in m
                            if k.startswith(f"{part}/wiseft/alpha_") and k.endswith("/specialized_top1"))
            assert alphas == [0.0, 0.25, 0.5, 0.75, 1.0]
            for bench in ("specialized", "general"):
                assert m[f"{part}/wiseft/alpha_0/{bench}_top1"] == bm[f"{part}/{bench}_top1"]
                assert m[f"{part}/wiseft/alpha_0/{bench}_balanced_accuracy"] == bm[f"{part}/{bench}_balanced_accuracy"]
        means = [m[f"val/wiseft/alpha_{a:g}/mean_balanced_accuracy"] for a in alphas]
        chosen = alphas[means.index(max(means))]  # the first alpha at the best validation mean
        assert m["wiseft_best_alpha"] == chosen and m["val/wiseft_best_mean_balanced_accuracy"] == max(means)
        for name in ("specialized_top1", "general_balanced_accuracy"):
            assert m[f"test/wiseft_best_{name}"] == m[f"test/wiseft/alpha_{chosen:g}/{name}"]
        gain = m["test/specialized_top1"] - bm["test/specialized_top1"]
        assert abs(m["test/specialized_top1_gain"] - gain) < 1e-6
        artifacts = {a.path for a in c.list_artifacts(run.info.run_id, "adapter")}
        assert {"adapter/adapter_model.safetensors", "adapter/alignment_params.safetensors"} <= artifacts
        cfg = json.loads(open(c.download_artifacts(run.info.run_id, "trial_config.json", str(tmp_path))).read())
        assert cfg["epochs"] == 2


def test_nan_trial_fails_with_reason_and_sweep_goes_on(tmp_path, smoke_cache):
    # A tether weight beyond float32 makes the loss infinite at the first step. The searched
    # choice gives some trials that value and some a sane one; the seed fixes which.
    proc = run_cli(["--smoke-test", "--space", str(_root() / "search_spaces" / "pareto.yaml"), "--trials", "3",
                    "--set", "params.tether_weight={distribution: categorical, choices: [0.0, 1.0e+40]}",
                    "--set", "search.seed=6"], tmp_path, smoke_cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    c, runs = mlflow_runs(tmp_path, "clip-alignment-pareto")
    trials = [r for r in runs if r.data.tags.get("study.kind") == "trial"]
    assert len(trials) == 3
    failed = [r for r in trials if r.data.tags["study.status"] == "FAILED"]
    done = [r for r in trials if r.data.tags["study.status"] == "FINISHED"]
    assert failed and done, [r.data.params["tether_weight"] for r in trials]
    for r in failed:
        assert r.info.status == "FAILED"
        assert "NonFiniteLossError" in r.data.tags["study.failure_reason"]
        assert float(r.data.params["tether_weight"]) > 1e30
    parent = next(r for r in runs if r.data.tags.get("study.kind") == "sweep")
    assert parent.data.metrics["trials_failed"] == len(failed) and parent.data.metrics["trials_finished"] == len(done)
    assert "Pareto front" in proc.stdout  # the summary of a Pareto search lists its front

    # Optuna was told: the failed trial is FAIL in the searcher's study, the others COMPLETE
    # with both objectives.
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch()
    searcher.restore_from_dir(str(next((tmp_path / "outputs" / "clip-alignment-pareto" / "ray").glob("sweep-*"))))
    states = sorted(t.state.name for t in searcher._ot_study.trials)
    assert states == sorted(["FAIL"] * len(failed) + ["COMPLETE"] * len(done))
    assert all(len(t.values) == 2 for t in searcher._ot_study.trials if t.state == optuna.trial.TrialState.COMPLETE)


def _root():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent


@pytest.mark.slow  # about 100 s: CI's second stage runs it, keeping README's suite under 10 minutes
def test_asha_auto_concurrency_and_an_optuna_storage_for_the_dashboard(tmp_path, smoke_cache):
    import optuna

    proc = run_cli(["--smoke-test", "--trials", "4", "--set", "params.epochs=4",
                    "--set", "search.max_concurrent=auto", "--set", "search.seed=1",
                    "--set", "search.early_stopping={type: asha, metric: train_loss, grace_period: 1, "
                             "reduction_factor: 2}",
                    "--set", "params.learning_rate={distribution: categorical, choices: [1.0e-7, 1.0e-2]}",
                    "--set", "search.optuna_storage=sqlite:///optuna.db"], tmp_path, smoke_cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "max_concurrent auto: 2 trial(s) at once (cluster: 2 CPUs" in proc.stdout

    c, runs = mlflow_runs(tmp_path)
    trials = [r for r in runs if r.data.tags.get("study.kind") == "trial"]
    assert len(trials) == 4 and all(r.info.status == "FINISHED" for r in trials)  # none left RUNNING
    statuses = {r.data.tags["study.trial_id"]: r.data.tags["study.status"] for r in trials}
    stopped = [t for t, s in statuses.items() if s == "EARLY_STOPPED"]
    assert stopped, statuses  # a trial at lr 1e-7 trails one at 1e-2 on the loss at the first rung
    for r in trials:
        epochs = sorted(m.step for m in c.get_metric_history(r.info.run_id, "train_loss"))
        assert (len(epochs) < 4) == (r.data.tags["study.trial_id"] in stopped), (statuses, epochs)
    assert f"early stopping ended {len(stopped)} trial(s)" in proc.stdout

    # optuna-dashboard sqlite:///optuna.db shows the same study.
    names = optuna.get_all_study_names(f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(names) == 1 and names[0].startswith("clip-alignment-study/sweep-")
    study = optuna.load_study(study_name=names[0], storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 4

    # The objective never sees a test number: every value Optuna received is a validation value some trial
    # logged at some epoch, and none is a test value that no validation value equals.
    val = {h.value for r in trials for h in c.get_metric_history(r.info.run_id, "val/specialized_balanced_accuracy")}
    test = {h.value for r in trials for h in c.get_metric_history(r.info.run_id, "test/specialized_balanced_accuracy")}
    received = [t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert received and all(v in val for v in received), (received, val)
    assert test - val, "validation and test values coincide: the check above proves nothing"
