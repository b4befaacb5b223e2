"""Bad input, as a table: every kind gets exit 2 and one ``error:`` line naming the file or flag and the
field, before Ray starts and before anything reaches MLflow.

Each row calls a command's ``main(argv)`` in-process (``study.run``, ``study.evaluate``, ``analysis``) in a
fresh folder. ``ray.init`` and, for the two commands that write to MLflow, ``MlflowClient`` are replaced by
functions that fail the test; after the call no MLflow store, sweep state or Optuna database may exist, and
for ``analysis`` (which reads a store) the store's runs must be unchanged.
"""

from __future__ import annotations

import io
import shutil
import socket
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hub_cache import offline
from PIL import Image

SPACE = "{tmp}/space.yaml"


# ---------------------------------------------------------------- input files the rows refer to
def _images_csv(tmp: Path, header: str, corrupt: bool = False, name: str = "pairs.csv") -> Path:
    img_dir = tmp / "imgs"
    img_dir.mkdir(exist_ok=True)
    rows = [header]
    for i in range(4):
        if corrupt and i == 2:
            (img_dir / f"{i}.png").write_bytes(b"not a png")
        else:
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(img_dir / f"{i}.png")
        rows.append(f"imgs/{i}.png,{i}")
    path = tmp / name
    path.write_text("\n".join(rows) + "\n")
    return path


def _spec(tmp: Path, extra: str = "", corrupt: bool = False, replace: tuple = ("", "")) -> None:
    csv = _images_csv(tmp, "filepath,label", corrupt, name="labels.csv")
    text = (f"name: slides\nsource: {csv}\nsplit: train\nclassnames: [a, b, c, d]\n"
            f"templates: ['a slide of {{c}}']\n{extra}")
    (tmp / "slides.yaml").write_text(text.replace(*replace) if replace[0] else text)


def _webdataset(tmp: Path, nshards: bool = True, classnames: bool = True, images: bool = True) -> None:
    """A WebDataset in CLIP_benchmark's layout at ``tmp/wds`` (one shard of 4 samples) and ``tmp/wds.yaml`` naming it;
    ``images=False``: its shard holds only ``.cls`` members."""
    import io
    import tarfile

    (tmp / "wds" / "test").mkdir(parents=True)
    with tarfile.open(tmp / "wds" / "test" / "0.tar", "w") as tar:
        for i in range(4):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(buf, format="png")
            for ext, data in (("png", buf.getvalue()), ("cls", str(i % 2).encode()))[0 if images else 1:]:
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    if nshards:
        (tmp / "wds" / "test" / "nshards.txt").write_text("1")
    if classnames:
        (tmp / "wds" / "classnames.txt").write_text("rods\nspheres\n")
    (tmp / "wds.yaml").write_text(f"source: {tmp / 'wds'}\n")


def _checkpoints(tmp: Path) -> None:
    import torch

    (tmp / "random.pt").write_bytes(bytes(range(256)) * 8)
    torch.save({"not_clip.weight": torch.zeros(2)}, tmp / "notclip.pt")


def _mlflow_store(tmp: Path, template: Path) -> None:
    shutil.copy(template, tmp / "mlflow.db")


def _sweep_state(tmp: Path, text: str) -> None:
    folder = tmp / "outputs" / "clip-alignment-study"
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text(text)


FILES = {
    "afile": lambda t: (t / "afile").write_text("x"),
    "dup": lambda t: (t / "space.yaml").write_text(
        "params:\n  learning_rate: {distribution: loguniform, low: 1.0e-4, high: 1.0e-2}\n"
        "  lora_rank: 4\n  learning_rate: 1.0e-3\n"),
    "malformed": lambda t: (t / "space.yaml").write_text(
        "params: {learning_rate: {distribution: loguniform, low: 1e-4, high: ]\n"),
    "toplist": lambda t: (t / "space.yaml").write_text("- 1\n- 2\n"),
    "binary": lambda t: (t / "space.yaml").write_bytes(b"\xff\xfe\x00\x81" * 16),
    "int_uniform": lambda t: (t / "space.yaml").write_text(
        "params:\n  lora_rank: {distribution: uniform, low: 2, high: 8}\n"),
    "logint0": lambda t: (t / "space.yaml").write_text(
        "params:\n  lora_blocks: {distribution: logint, low: 0, high: 2}\n"),
    "quniform_off_grid": lambda t: (t / "space.yaml").write_text(  # issue 24: Optuna failed after Ray started
        "params:\n  learning_rate: {distribution: quniform, low: 1.0e-4, high: 1.0e-2, q: 2.0e-4}\n"),
    "mixed": lambda t: (t / "space.yaml").write_text(
        "search: {early_stopping: {type: asha}}\n"
        "params:\n  learning_rate: {distribution: loguniform, low: 1.0e-4, high: 1.0e-2}\n"
        "  epochs: {distribution: categorical, choices: [1, '2']}\n"),
    "nocap": lambda t: _images_csv(t, "filepath,text"),
    "corrupt": lambda t: _images_csv(t, "filepath,caption", corrupt=True),
    "spec_col": lambda t: _spec(t, "label_column: diagnosis\n"),
    "spec_corrupt": lambda t: _spec(t, corrupt=True),
    "spec_slot": lambda t: _spec(t, replace=("templates: ['a slide of {c}']", "templates: ['a slide']")),
    "spec_dup": lambda t: _spec(t, "split: test\n"),
    "spec_name": lambda t: _spec(t, replace=("name: slides", "name: slides (v2)")),
    "spec_bad_yaml": lambda t: (t / "slides.yaml").write_text("name: [unclosed\n"),
    "ckpt": _checkpoints,
    "wds_no_nshards": lambda t: _webdataset(t, nshards=False),
    "wds_no_classnames": lambda t: _webdataset(t, classnames=False),
    "wds_no_images": lambda t: _webdataset(t, images=False),
    "state_corrupt": lambda t: _sweep_state(t, "{not json"),
    "state_folder": lambda t: (t / "outputs" / "clip-alignment-study" / "sweep.json").mkdir(parents=True),
    "state_partial": lambda t: _sweep_state(t, '{"sweep": "s"}'),
}


@dataclass
class Case:
    id: str
    argv: list[str]
    expect: list[str]  # fragments of the one error line: the file or flag, and the field
    command: str = "run"  # run | evaluate | analysis
    files: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)


def R(id, argv, *expect, files=(), env=None):  # noqa: N802 - a table row
    return Case(id, ["--smoke-test", "--cache-dir", "{cache}", *argv], list(expect), "run", list(files), env or {})


def E(id, argv, *expect, files=()):  # noqa: N802
    return Case(id, ["--cache-dir", "{cache}", "--offline-scale", "0.1", *argv], list(expect), "evaluate",
                list(files))


def A(id, argv, *expect, files=("store",)):  # noqa: N802
    return Case(id, argv, list(expect), "analysis", list(files))


CASES = [
    # ---- flags
    R("trials-not-int", ["--trials", "abc"], "--trials", "'abc'"),
    R("trials-zero", ["--trials", "0"], "--trials", "integer >= 1"),
    R("max-concurrent-zero", ["--max-concurrent", "0"], "--max-concurrent", ">= 1"),
    R("max-concurrent-word", ["--max-concurrent", "lots"], "--max-concurrent", "or 'auto'", "'lots'"),
    R("register-slash", ["--register", "cells/v1"], "--register", "without '/' or ':'", "'cells/v1'"),
    R("workers-zero", ["--workers", "0"], "--workers", ">= 1"),
    R("seeds-zero", ["--seeds", "0"], "--seeds", ">= 1"),
    R("seeds-too-many", ["--seeds", "1000"], "--seeds", "search.replicate_seeds"),
    R("replicate-top-zero", ["--replicate-top", "0"], "--replicate-top", "'all'"),
    R("replicate-top-word", ["--replicate-top", "best"], "--replicate-top", "'best'"),
    R("unknown-flag", ["--learning-rate", "0.1"], "unrecognized arguments: --learning-rate"),
    R("set-without-value", ["--set", "lora_rank"], "--set 'lora_rank'", "KEY=VALUE"),
    R("set-unknown-section", ["--set", "optimizer.lr=1"], "--set optimizer.lr", "optimizer", "Extra inputs"),
    R("set-bad-knob-value", ["--set", "lora_rank=0"], "--set lora_rank", "params.lora_rank",
      "greater than or equal to 1"),
    R("set-bad-trials", ["--set", "search.trials=x"], "--set search.trials", "search.trials"),
    R("set-into-a-value", ["--set", "name.x=1"], "--set name.x", "'name' is not a section"),
    R("set-malformed-yaml", ["--set", "data.specialized=[a"], "--set data.specialized", "malformed YAML"),
    R("name-with-slash", ["--name", "a/b"], "--name", "name:", "letters, digits"),
    R("name-with-parens", ["--set", "name=study (v2)"], "--set name", "name:"),
    R("name-empty", ["--name", ""], "--name", "name:"),
    R("name-too-long", ["--name", "n" * 300], "--name", "name:"),
    # ---- the space file
    R("space-missing", ["--space", "{tmp}/nope.yaml"], "{tmp}/nope.yaml", "not found", "default, kshot, methods, pareto"),
    R("space-is-a-folder", ["--space", "{tmp}"], "{tmp}", "is a directory"),
    R("space-malformed", ["--space", SPACE], SPACE, "malformed YAML at line 1", files=["malformed"]),
    R("space-duplicate-key", ["--space", SPACE], SPACE, "line 4", "duplicate key \"learning_rate\"", files=["dup"]),
    R("space-top-level-list", ["--space", SPACE], SPACE, "expected a mapping", files=["toplist"]),
    R("space-binary", ["--space", SPACE], SPACE, "not a text file", files=["binary"]),
    R("space-float-on-int-knob", ["--space", SPACE], SPACE, "params.lora_rank.distribution", "'uniform' draws",
      files=["int_uniform"]),
    R("space-logint-low-zero", ["--space", SPACE], SPACE, "params.lora_blocks", "logint needs low >= 1",
      files=["logint0"]),
    R("space-quniform-low-off-grid", ["--space", SPACE], SPACE, "params.learning_rate.low",
      "0.0001 is not a multiple of q 0.0002", "use low: 0.0002", files=["quniform_off_grid"]),
    # --smoke-test fixes epochs at 1, but the space the real run reads is checked too
    R("space-mixed-choices", ["--space", SPACE], SPACE, "params.epochs.choices", "mix types", files=["mixed"]),
    # ---- distributions (through --set, so the flag is named)
    R("unknown-parameter", ["--set", "params.dropout=0.1"], "--set params.dropout", "unknown parameter"),
    R("unknown-distribution", ["--set", "params.lora_rank={distribution: normal, low: 1, high: 2}"],
      "--set params.lora_rank", "params.lora_rank.distribution", "unknown distribution 'normal'"),
    R("loguniform-on-int-knob", ["--set", "params.epochs={distribution: loguniform, low: 1, high: 4}"],
      "params.epochs.distribution", "'loguniform' draws floats"),
    R("quniform-on-int-knob", ["--set", "params.batch_size={distribution: quniform, low: 16, high: 64, q: 16}"],
      "params.batch_size.distribution", "'quniform' draws floats"),
    R("uniform-on-bool-knob", ["--set", "params.train_projections={distribution: uniform, low: 0, high: 1}"],
      "params.train_projections.distribution", "use categorical"),
    R("int-on-list-knob", ["--set", "params.lora_targets={distribution: int, low: 0, high: 1}"],
      "params.lora_targets.distribution", "use categorical"),
    R("loguniform-low-zero", ["--set", "params.learning_rate.low=0"], "params.learning_rate.low",
      "greater than 0"),
    R("loguniform-negative", ["--set", "params.learning_rate.high=-1"], "params.learning_rate.high"),
    R("low-above-high", ["--set", "params.learning_rate.low=0.5"], "params.learning_rate", "low 0.5 is above high"),
    R("choices-empty", ["--set", "params.lora_rank={distribution: categorical, choices: []}"],
      "params.lora_rank.choices", "at least 1"),
    R("choice-out-of-range", ["--set", "params.lora_rank.choices=[0, 2]"], "params.lora_rank.choices",
      "greater than or equal to 1"),
    R("choice-bad-target", ["--set", "params.lora_targets={distribution: categorical, choices: [attn, conv]}"],
      "params.lora_targets.choices"),
    R("mixed-bool-choices", ["--set", "params.train_logit_scale={distribution: categorical, choices: [true, 'no']}"],
      "params.train_logit_scale.choices", "mix types"),
    R("distribution-missing-high", ["--set", "params.tether_weight={distribution: uniform, low: 0}"],
      "params.tether_weight.high", "Field required"),
    R("distribution-extra-key", ["--set", "params.tether_weight={distribution: uniform, low: 0, high: 1, step: 2}"],
      "params.tether_weight.step", "Extra inputs"),
    R("quniform-q-zero", ["--set", "params.tether_weight={distribution: quniform, low: 0, high: 1, q: 0}"],
      "params.tether_weight.q"),
    # ---- what Ray Tune or Optuna would refuse only after Ray started (issue 24)
    R("quniform-high-off-grid",
      ["--set", "params.data_fraction={distribution: quniform, low: 0.1, high: 0.95, q: 0.1}"],
      "--set params.data_fraction", "params.data_fraction.high", "not a multiple of q 0.1", "use high: 0.9"),
    R("quniform-both-off-grid",
      ["--set", "params.tether_weight={distribution: quniform, low: 0.05, high: 0.95, q: 0.1}"],
      "params.tether_weight.low", "use low: 0.1, high: 0.9"),
    R("quniform-q-wider-than-range", ["--set", "params.tether_weight={distribution: quniform, low: 0.1, high: 0.2, "
                                               "q: 0.5}"], "params.tether_weight.q", "no multiple of q 0.5"),
    R("uniform-infinite-high", ["--set", "params.tether_weight={distribution: uniform, low: 0, high: .inf}"],
      "params.tether_weight.high", "finite number"),
    R("uniform-nan-low", ["--set", "params.tether_weight={distribution: uniform, low: .nan, high: 1}"],
      "params.tether_weight.low", "finite number"),
    R("loguniform-infinite-high", ["--set", "params.learning_rate.high=.inf"], "params.learning_rate.high",
      "finite number"),
    R("quniform-infinite-high", ["--set", "params.tether_weight={distribution: quniform, low: 0, high: .inf, q: 1}"],
      "params.tether_weight.high", "finite number"),
    R("int-fractional-bound", ["--set", "params.lora_blocks={distribution: int, low: 1, high: 2.5}"],
      "params.lora_blocks.high", "fractional part"),
    R("logint-negative-low", ["--set", "params.lora_rank={distribution: logint, low: -2, high: 8}"],
      "params.lora_rank", "logint needs low >= 1"),
    R("choice-nan", ["--set", "params.tether_weight={distribution: categorical, choices: [0.5, .nan]}"],
      "params.tether_weight.choices", "finite number"),
    R("choice-infinite", ["--set", "params.learning_rate={distribution: categorical, choices: [0.001, .inf]}"],
      "params.learning_rate.choices", "finite number"),
    R("choice-repeated", ["--set", "params.lora_rank.choices=[2, 4, 2]"], "params.lora_rank.choices",
      "2 is given twice"),
    R("choice-repeated-as-float", ["--set", "params.tether_weight={distribution: categorical, choices: [1, 1.0]}"],
      "params.tether_weight.choices", "given twice"),
    R("choice-a-list", ["--set", "params.lora_targets={distribution: categorical, choices: [[attn], [mlp]]}"],
      "params.lora_targets.choices", "one number, word or true/false", "'attn+mlp'"),
    R("choice-null", ["--set", "params.lora_alpha={distribution: categorical, choices: [null, 8]}"],
      "params.lora_alpha.choices", "not None"),
    R("fixed-value-infinite", ["--set", "learning_rate=.inf"], "--set learning_rate", "params.learning_rate",
      "finite number"),
    R("fixed-value-nan", ["--set", "weight_decay=.nan"], "params.weight_decay", "finite number"),
    R("asha-grace-beyond-epochs", ["--set", "search.early_stopping={type: asha, grace_period: 3}"],
      "--set search.early_stopping", "search.early_stopping.grace_period", "no trial of this space runs more than 1"),
    R("fixed-value-invalid", ["--set", "tether_weight=-1"], "--set tether_weight", "params.tether_weight"),
    R("fraction-above-one", ["--set", "data_fraction=1.5"], "params.data_fraction"),
    R("nothing-trains", ["--set", "lora_blocks=0", "--set", "train_projections=false", "--set",
                         "train_logit_scale=false"], "nothing to train"),
    R("nothing-to-search", ["--set", "params={lora_rank: 4}"], "--set params", "nothing to search"),
    R("method-unknown", ["--set", "method=adapters"], "--set method", "params.method", "'adapters'"),
    R("projections-with-nothing-to-train", ["--set", "method=projections", "--set", "train_projections=false",
                                            "--set", "train_logit_scale=false"], "nothing to train: method projections"),
    R("stratified-without-categorical", ["--set", "search.sampler=stratified", "--set", "lora_rank=4", "--set",
                                         "lora_blocks=2"], "--set search.sampler", "needs a categorical knob"),
    # ---- other sections
    R("objective-unknown-metric", ["--set", "search.objective=[{metric: accuracy}]"], "search.objective.0.metric"),
    R("objective-bad-mode", ["--set", "search.objective=[{metric: specialized_top1, mode: up}]"],
      "search.objective.0.mode"),
    R("asha-bad-metric", ["--set", "search.early_stopping={type: asha, metric: f1}"],
      "search.early_stopping.metric"),
    R("validation-share-one", ["--set", "evaluation.validation_share=1"], "evaluation.validation_share"),
    R("wiseft-alpha-above-one", ["--set", "evaluation.wiseft_alphas=[0, 2]"], "evaluation.wiseft_alphas.1"),
    R("unknown-headline", ["--set", "evaluation.headline=f1"], "evaluation.headline"),
    R("precision-unknown", ["--set", "model.precision=fp8"], "model.precision"),
    R("pretrain-steps-zero", ["--set", "model.pretrain.steps=0"], "model.pretrain.steps"),
    R("max-overlap-negative", ["--set", "data.max_overlap=-1"], "data.max_overlap"),
    R("cache-max-gb-zero", ["--set", "data.cache_max_gb=0"], "data.cache_max_gb"),
    R("finetune-template-no-slot", ["--set", "data.finetune.templates=['a photo']"], "data.finetune.templates",
      "no '{c}' slot"),
    R("no-specialized-benchmark", ["--set", "data.specialized=[]"], "data.specialized", "at least 1"),
    R("unknown-shipped-spec", ["--set", "data.specialized=[nope]"], "nope", "no such benchmark spec"),
    R("benchmark-names-repeat", ["--set", "data.general=[shapes, shapes]"], "data.general", "names repeat"),
    R("inline-spec-unknown-field", ["--set", "data.specialized=[{source: 'offline:micrographs', colour: red}]"],
      "data.specialized.0", "colour"),
    # ---- resources against this machine
    R("gpus-on-a-cpu-machine", ["--set", "resources.gpus_per_worker=1"], "--set resources.gpus_per_worker",
      "resources.gpus_per_worker", "could never start"),
    R("cpus-above-the-machine", ["--set", "resources.cpus_per_worker=512"], "resources.cpus_per_worker",
      "could never start"),
    R("workers-above-the-machine", ["--workers", "64"], "resources.workers_per_trial", "could never start"),
    R("cpus-zero", ["--set", "resources.cpus_per_worker=0"], "resources.cpus_per_worker"),
    # ---- folders, stores, URIs
    R("output-dir-below-a-file", ["--output-dir", "{tmp}/afile/out"], "--output-dir", "which is a file",
      files=["afile"]),
    R("output-dir-is-a-file", ["--output-dir", "{tmp}/afile"], "--output-dir", "is a file", files=["afile"]),
    R("output-dir-unwritable", ["--output-dir", "/proc/clip-study-out"], "--output-dir", "cannot write"),
    R("cache-dir-unwritable", ["--cache-dir", "/proc/clip-study-cache"], "--cache-dir", "cannot write"),
    R("storage-path-below-a-file", ["--storage-path", "{tmp}/afile/ray"], "--storage-path", files=["afile"]),
    R("tracking-unknown-scheme", ["--tracking-uri", "foo://bar"], "--tracking-uri", "unknown tracking URI scheme"),
    R("tracking-nobody-answers", ["--tracking-uri", "http://127.0.0.1:{port}"], "--tracking-uri",
      "no MLflow server answers"),
    R("tracking-sqlite-no-file", ["--tracking-uri", "sqlite://"], "--tracking-uri", "names no file"),
    R("tracking-sqlite-below-a-file", ["--tracking-uri", "sqlite:///{tmp}/afile/mlflow.db"], "--tracking-uri",
      "afile is a file", files=["afile"]),
    R("tracking-file-store", ["--tracking-uri", "{tmp}/mlruns"], "--tracking-uri", "MLFLOW_ALLOW_FILE_STORE"),
    R("tracking-missing-driver", ["--tracking-uri", "mysql://u@127.0.0.1/db"], "--tracking-uri",
      "driver", "not installed"),
    R("tracking-env-unknown-scheme", [], "MLFLOW_TRACKING_URI", "unknown tracking URI scheme",
      env={"MLFLOW_TRACKING_URI": "foo://bar"}),
    R("optuna-storage-bad-url", ["--set", "search.optuna_storage=nope://x"], "--set search.optuna_storage",
      "search.optuna_storage", "not a usable database URL"),
    R("optuna-storage-missing-driver", ["--set", "search.optuna_storage=postgresql://u@127.0.0.1/db"],
      "search.optuna_storage", "not installed"),
    R("optuna-storage-below-a-file", ["--set", "search.optuna_storage=sqlite:///{tmp}/afile/optuna.db"],
      "search.optuna_storage", "afile is a file", files=["afile"]),
    R("optuna-storage-env", [], "OPTUNA_STORAGE", "not a usable database URL", env={"OPTUNA_STORAGE": "nope://x"}),
    R("resume-corrupt-state", ["--resume"], "--resume", "sweep.json", "unreadable", files=["state_corrupt"]),
    R("resume-partial-state", ["--resume"], "--resume", "sweep.json", "lacks", files=["state_partial"]),
    R("resume-state-is-a-folder", ["--resume"], "--resume", "sweep.json", "unreadable", files=["state_folder"]),
    # ---- data (decoded into the shared smoke cache)
    R("finetune-source-missing", ["--set", "data.finetune.source={tmp}/nope.csv"], "data.finetune.source",
      "does not exist"),
    R("finetune-no-caption-column", ["--set", "data.finetune.source={tmp}/pairs.csv"],
      "data.finetune.caption_column", "'caption' not in {tmp}/pairs.csv", files=["nocap"]),
    R("finetune-undecodable", ["--set", "data.finetune.source={tmp}/pairs.csv"], "data.finetune.image_column",
      "1 of 4 images cannot be decoded", files=["corrupt"]),
    R("spec-missing-column", ["--set", "data.specialized=[{tmp}/slides.yaml]"], "{tmp}/slides.yaml",
      "label_column", "'diagnosis'", files=["spec_col"]),
    R("spec-undecodable", ["--set", "data.specialized=[{tmp}/slides.yaml]"], "{tmp}/slides.yaml",
      "image_column", "cannot be decoded", files=["spec_corrupt"]),
    R("spec-template-no-slot", ["--set", "data.general=[shapes, {tmp}/slides.yaml]"], "{tmp}/slides.yaml",
      "templates", "no '{c}' slot", files=["spec_slot"]),
    R("spec-duplicate-key", ["--set", "data.specialized=[{tmp}/slides.yaml]"], "{tmp}/slides.yaml",
      "duplicate key \"split\"", files=["spec_dup"]),
    R("spec-name-invalid", ["--set", "data.specialized=[{tmp}/slides.yaml]"], "{tmp}/slides.yaml", "name",
      "metric keys", files=["spec_name"]),
    R("spec-malformed", ["--set", "data.specialized=[{tmp}/slides.yaml]"], "{tmp}/slides.yaml", "malformed YAML",
      files=["spec_bad_yaml"]),
    # ---- WebDatasets and k-shot budgets
    R("wds-without-nshards", ["--set", "data.general=[shapes, {tmp}/wds.yaml]"], "{tmp}/wds.yaml: source",
      "no test/nshards.txt", files=["wds_no_nshards"]),
    R("wds-without-classnames", ["--set", "data.general=[shapes, {tmp}/wds.yaml]"], "{tmp}/wds.yaml: classnames",
      "no classnames.txt", files=["wds_no_classnames"]),
    R("wds-tar-without-images", ["--set", "data.general=[shapes, {source: '{tmp}/wds/test/0.tar', classnames: [a, b]}]"],
      "data.general.1.source", "0.tar: no image member", files=["wds_no_images"]),
    R("wds-name-not-cached-offline", ["--set", "data.general=[wds/vtab/not-cached]"], "wds/vtab/not-cached: source",
      "clip-benchmark/wds_vtab-not-cached"),
    R("shots-with-data-fraction", ["--set", "shots_per_class=4"], "--set shots_per_class", "params.shots_per_class",
      "remove data_fraction"),
    R("shots-without-labels", ["--space", "kshot", "--set", "data.finetune.label_column=null"],
      "--set data.finetune.label_column", "params.shots_per_class", "no labels"),
    R("shots-above-the-smallest-class", ["--space", "kshot", "--set", "params.shots_per_class.choices=[4, 500]"],
      "params.shots_per_class", "500 images per class", "has"),
    # ---- the model
    R("model-unknown", ["--set", "model.name=ViT-Nope-32"], "model.name", "unknown open_clip model"),
    R("model-unknown-tag", ["--set", "model.name=ViT-B-32", "--set", "model.pretrained=not_a_tag"],
      "model.pretrained", "unknown tag 'not_a_tag'"),
    R("model-no-weights-named", ["--set", "model.name=ViT-B-32"], "model.pretrained", "needs a pretrained tag"),
    R("checkpoint-missing", ["--set", "model.name=ViT-B-32", "--set", "model.pretrained={tmp}/missing.pt"],
      "model.pretrained", "does not exist"),
    R("checkpoint-random-bytes", ["--set", "model.name=ViT-B-32", "--set", "model.pretrained={tmp}/random.pt"],
      "model.pretrained", "random.pt", "does not load into 'ViT-B-32'", files=["ckpt"]),
    R("checkpoint-not-clip", ["--set", "model.name=ViT-B-32", "--set", "model.pretrained={tmp}/notclip.pt"],
      "model.pretrained", "notclip.pt", "does not load into 'ViT-B-32'", files=["ckpt"]),
    R("hf-hub-offline", ["--set", "model.name=hf-hub:clip-study/does-not-exist"], "model.name",
      "cannot be loaded"),
    R("model-tag-not-in-the-hub-cache", ["--set", "model.name=ViT-B-16", "--set", "model.pretrained=openai"],
      "model.pretrained", "tag 'openai' of 'ViT-B-16'", "a copy in the Hugging Face cache"),
    R("finetune-hub-dataset-not-in-the-cache", ["--set", "data.finetune.source=clip-study/not-cached"],
      "data.finetune.source", "cannot load Hugging Face dataset 'clip-study/not-cached'", "ConnectionError"),
    R("benchmark-hub-dataset-not-in-the-cache",
      ["--set", "data.specialized=[{name: cells, source: clip-study/not-cached, split: test}]"],
      "data.specialized", "clip-study/not-cached"),
    # ---- study.evaluate
    E("eval-batch-size-zero", ["--benchmark", "shapes", "--batch-size", "0"], "--batch-size", ">= 1"),
    E("eval-batch-size-word", ["--benchmark", "shapes", "--batch-size", "big"], "--batch-size", "'big'"),
    E("eval-cuda-without-gpu", ["--benchmark", "shapes", "--device", "cuda:0"], "--device", "CUDA device"),
    E("eval-device-nonsense", ["--benchmark", "shapes", "--device", "gpu7"], "--device", "'gpu7'"),
    E("eval-json-folder", ["--benchmark", "shapes", "--json", "{tmp}"], "--json", "is a folder"),
    E("eval-json-below-a-file", ["--benchmark", "shapes", "--json", "{tmp}/afile/out.json"], "--json",
      "afile is a file", files=["afile"]),
    E("eval-offline-scale", ["--benchmark", "shapes", "--offline-scale", "2"], "--offline-scale", "(0, 1]"),
    E("eval-unknown-spec", ["--benchmark", "nope"], "nope", "no such benchmark spec"),
    E("eval-no-benchmark", [], "--benchmark", "required"),
    E("eval-unknown-model", ["--benchmark", "shapes", "--model", "ViT-Nope"], "--model/--pretrained.name",
      "unknown open_clip model"),
    E("eval-random-checkpoint", ["--benchmark", "shapes", "--model", "ViT-B-32", "--pretrained", "{tmp}/random.pt"],
      "model.pretrained", "does not load", files=["ckpt"]),
    E("eval-cache-unwritable", ["--benchmark", "shapes", "--cache-dir", "/proc/clip-study-cache"], "--cache-dir",
      "cannot write"),
    E("eval-spec-malformed", ["--benchmark", "{tmp}/slides.yaml"], "{tmp}/slides.yaml", "malformed YAML",
      files=["spec_bad_yaml"]),
    E("eval-unknown-flag", ["--benchmark", "shapes", "--top-k", "5"], "unrecognized arguments: --top-k"),
    # ---- analysis
    A("analysis-unknown-scheme", ["--tracking-uri", "foo://bar"], "--tracking-uri", "unknown tracking URI scheme",
      files=()),
    A("analysis-no-store", [], "--tracking-uri", "no MLflow store", files=()),
    A("analysis-unknown-experiment", ["--experiment", "nope"], "--experiment", "'nope'"),
    A("analysis-unknown-parent-run", ["--parent-run", "0123456789abcdef"], "--parent-run", "no run"),
    A("analysis-parent-not-a-sweep", ["--parent-run", "{run}"], "--parent-run", "is not a sweep"),
    A("analysis-out-below-a-file", ["--out", "{tmp}/afile/report"], "--out", "which is a file",
      files=("store", "afile")),
    A("analysis-out-unwritable", ["--out", "/proc/clip-study-report"], "--out", "cannot write"),
    A("analysis-unknown-flag", ["--html"], "unrecognized arguments: --html", files=()),
    A("compare-unknown-sweep", ["compare", "nope"], "SWEEP 'nope'", "no MLflow experiment named 'nope'"),
    A("compare-store-missing", ["compare", "sqlite:///{tmp}/none.db::s"], "SWEEP 'sqlite:///{tmp}/none.db::s'",
      "no MLflow store"),
    A("compare-not-a-sweep", ["compare", "{run}"], "SWEEP '{run}'", "is not a sweep"),
    A("compare-out-below-a-file", ["compare", "clip-alignment-study", "--out", "{tmp}/afile/cmp"], "--out",
      "which is a file", files=("store", "afile")),
]


@pytest.fixture(scope="module")
def store_template(tmp_path_factory):
    """An MLflow store holding the study's experiment and one run that is not a sweep."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("store")
    c = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = c.create_experiment("clip-alignment-study")
    run = c.create_run(exp, run_name="not-a-sweep").info.run_id
    c.set_terminated(run)
    return folder / "mlflow.db", run


@pytest.fixture(scope="module")
def empty_hf_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf-home-empty")


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forbid(monkeypatch, command: str) -> None:
    import mlflow.tracking
    import ray

    def no_ray(*a, **k):
        raise AssertionError("Ray was started on bad input")

    def no_mlflow(*a, **k):
        raise AssertionError("MLflow was opened on bad input")

    monkeypatch.setattr(ray, "init", no_ray)
    if command != "analysis":
        monkeypatch.setattr(mlflow.tracking.MlflowClient, "__init__", no_mlflow)


def _main(command: str):
    if command == "run":
        from study.run import main
    elif command == "evaluate":
        from study.evaluate import main
    else:
        from analysis.__main__ import main
    return main


def _fill(text: str, values: dict) -> str:
    for k, v in values.items():
        text = text.replace("{" + k + "}", v)
    return text


def _runs(db: Path) -> list:
    import sqlite3

    with sqlite3.connect(db) as con:
        return con.execute("select run_uuid, status from runs order by run_uuid").fetchall()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, smoke_cache, store_template, closed_port, monkeypatch,
                                          empty_hf_home):
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE", "RAY_ADDRESS", "CLIP_STUDY_STORAGE_PATH"):
        monkeypatch.delenv(var, raising=False)
    offline(monkeypatch, empty_hf_home)  # no test reaches the network, nor finds a Hub file in the user's cache
    for var, value in case.env.items():
        monkeypatch.setenv(var, value)
    for name in case.files:
        if name == "store":
            _mlflow_store(tmp_path, store_template[0])
        else:
            FILES[name](tmp_path)
    before = set(tmp_path.rglob("*"))
    runs_before = _runs(tmp_path / "mlflow.db") if "store" in case.files else None
    fill = {"tmp": str(tmp_path), "cache": str(smoke_cache), "port": str(closed_port), "run": store_template[1]}
    argv = [_fill(a, fill) for a in case.argv]
    _forbid(monkeypatch, case.command)
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        code = _main(case.command)(argv)
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.lower().startswith("error")]  # progress bars of a first build may precede
    assert code == 2, (code, err.getvalue()[-2000:])
    assert len(errors) == 1 and errors[0].startswith("error: "), err.getvalue()[-2000:]
    assert not any("Traceback" in ln for ln in lines), err.getvalue()[-2000:]
    for fragment in case.expect:
        assert _fill(fragment, fill) in errors[0], (fragment, errors[0])
    made = {p for p in set(tmp_path.rglob("*")) - before if p.is_file()}
    assert not made, f"bad input wrote {sorted(map(str, made))}"
    if runs_before is not None:
        assert _runs(tmp_path / "mlflow.db") == runs_before, "analysis changed the store on bad input"


def test_the_table_covers_every_command_and_at_least_80_kinds():
    kinds = {c.command for c in CASES}
    assert kinds == {"run", "evaluate", "analysis"}
    assert len({c.id for c in CASES}) == len(CASES) >= 80


def test_max_concurrent_auto_is_accepted_from_the_command_line():
    from study.run import build_parser, config_from_args

    cfg, _ = config_from_args(build_parser().parse_args(["--max-concurrent", "auto"]))
    assert cfg.search.max_concurrent == "auto"


def test_a_relative_sqlite_uri_is_made_absolute(tmp_path, monkeypatch):
    from study.checks import tracking_uri

    monkeypatch.chdir(tmp_path)
    assert tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert not (tmp_path / "mlflow.db").exists()


def test_a_spec_file_name_mlflow_rejects_becomes_a_valid_benchmark_name(tmp_path):
    from study.library.benchmarks import load_spec

    path = tmp_path / "my slides (v2).yaml"
    path.write_text("source: offline:micrographs\nclassnames: [a, b]\n")
    assert load_spec(str(path)).name == "my_slides_v2"
