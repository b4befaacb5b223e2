"""The Hub paths a researcher's first real run takes, proven offline: an open_clip pretrained tag, an ``hf-hub:``
model and a Hub dataset id (as fine-tuning set and as benchmark), each through the real ``huggingface_hub``,
open_clip and ``datasets`` loading code, against a local cache laid out in the Hub's own layout
(:mod:`hub_cache`) with ``HF_HUB_OFFLINE=1``.

The weights are small random ones (ViT-B-32 and ViT-B-16 at full size, the hf-hub model at the offline model's
size), perturbed so that no fresh initialisation can equal them: every test asserts the loaded tensors are the ones
written. With the cache absent, each path stops with the one-line error a user sees today. The end-to-end studies
are ``slow``.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import mlflow_runs, run_cli
from hub_cache import env, offline, put_dataset, put_repo

TAGS = [("ViT-B-32", "laion2b_s34b_b79k"), ("ViT-B-16", "openai")]  # the example; README's first command
HUB_MODEL = "clip-study/tiny-hub-clip"
HUB_DATA = "clip-study/hub-cells"
CLASSES = ["coccus", "rod", "spiral"]


def _random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """``model``'s state, every float tensor moved off its initialisation by seeded noise."""
    gen = torch.Generator().manual_seed(seed)
    return {k: (v + 0.01 * torch.randn(v.shape, generator=gen)).contiguous() if v.is_floating_point() else v.clone()
            for k, v in model.state_dict().items()}


class HubHome:
    """One ``HF_HOME`` for the session, filled on demand: each repo is built once."""

    def __init__(self, root: Path):
        self.root, self.written = root, {}

    def tag(self, name: str, tag: str) -> dict:
        """The file open_clip's tag resolves to, where it resolves: ``get_pretrained_cfg(name, tag)["hf_hub"]`` names
        the repo (and file; none means ``open_clip_pytorch_model.bin``, whose ``.safetensors`` twin open_clip takes
        first, as the real repos hold it)."""
        if (name, tag) not in self.written:
            import open_clip
            from safetensors.torch import save_file

            repo, file = posixpath.split(open_clip.get_pretrained_cfg(name, tag)["hf_hub"])  # as open_clip splits it
            file = file or "open_clip_model.safetensors"
            state = _random_state(open_clip.create_model(name), seed=len(self.written))
            path = self.root / "incoming.safetensors"
            save_file(state, str(path))
            put_repo(self.root, "model", repo, {file: path})
            self.written[(name, tag)] = state
        return self.written[(name, tag)]

    def hub_model(self, with_weights: bool = True, repo: str = HUB_MODEL) -> dict:
        """An ``hf-hub:`` repo: ``open_clip_config.json`` (the offline model's architecture) and, unless
        ``with_weights`` is false, ``open_clip_pytorch_model.bin`` (a state dict, loaded with ``weights_only``)."""
        if repo not in self.written:
            import open_clip

            from study.library.models import model_config, register_configs

            register_configs()
            cfg = {"model_cfg": model_config("clip-study-tiny"),
                   "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
            files = {"open_clip_config.json": json.dumps(cfg).encode()}
            state = _random_state(open_clip.create_model("clip-study-tiny"), seed=7)
            if with_weights:
                path = self.root / "incoming.bin"
                torch.save(state, path)
                files["open_clip_pytorch_model.bin"] = path
            put_repo(self.root, "model", repo, files)
            self.written[repo] = state
        return self.written[repo]

    def dataset(self) -> dict:
        """A Hub dataset of image-caption pairs with a class label: ``train`` (36 rows) and ``test`` (24), images
        distinct (seeded noise over a colour per class) so that the contamination check finds no overlap."""
        if HUB_DATA not in self.written:
            import datasets
            from PIL import Image

            features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                          "label": datasets.ClassLabel(names=CLASSES)})
            splits = {}
            for split, n, seed in (("train", 36, 1), ("test", 24, 2)):
                rng = np.random.default_rng(seed)
                labels = [i % 3 for i in range(n)]
                images = [Image.fromarray(np.clip(rng.integers(0, 256, (32, 32, 3)) * 0.5 + np.array(
                    [(200, 60, 60), (60, 200, 60), (60, 60, 200)][c]) * 0.5, 0, 255).astype(np.uint8)) for c in labels]
                splits[split] = datasets.Dataset.from_dict(
                    {"image": images, "caption": [f"a micrograph of {CLASSES[c]} bacteria, sample {i}"
                                                  for i, c in enumerate(labels)], "label": labels}, features=features)
            put_dataset(self.root, HUB_DATA, splits)
            self.written[HUB_DATA] = splits
        return self.written[HUB_DATA]


@pytest.fixture(scope="session")
def hub_home(tmp_path_factory) -> HubHome:
    return HubHome(tmp_path_factory.mktemp("hf-home"))


@pytest.fixture
def empty_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf-home-empty")


def _same(model: torch.nn.Module, written: dict) -> None:
    state = model.state_dict()
    assert set(state) == set(written)
    for k, v in written.items():
        assert torch.equal(state[k], v), k


# ------------------------------------------------------------------- each path loads what the cache holds
@pytest.mark.parametrize("name,tag", TAGS)
def test_an_open_clip_tag_loads_the_weights_the_hub_cache_holds(name, tag, hub_home, monkeypatch):
    from study.library.models import load_base_model, weights_source

    import warnings

    import open_clip

    written = hub_home.tag(name, tag)
    offline(monkeypatch, hub_home.root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "QuickGELU mismatch": the network is the one the weights were trained in
        model = load_base_model(name, tag).model
    _same(model, written)
    acts = {type(m).__name__ for m in model.modules() if type(m).__name__ in ("QuickGELU", "GELU")}
    assert acts == ({"QuickGELU"} if open_clip.get_pretrained_cfg(name, tag).get("quick_gelu") else {"GELU"})

    repo = open_clip.get_pretrained_cfg(name, tag)["hf_hub"].rstrip("/")
    assert weights_source(name, tag) == f"open_clip tag {tag}: Hugging Face Hub repo {repo}"


def test_an_hf_hub_model_loads_its_config_and_weights_from_the_hub_cache(hub_home, monkeypatch):
    from study.library.models import load_base_model, weights_source

    written = hub_home.hub_model()
    offline(monkeypatch, hub_home.root)
    lm = load_base_model(f"hf-hub:{HUB_MODEL}", None)
    _same(lm.model, written)
    assert lm.tokenizer(["a rod"]).shape == (1, 24)  # the repo's text config, not open_clip's default of 77
    assert tuple(lm.preprocess.transforms[-1].mean) == (0.5, 0.5, 0.5)  # its preprocess_cfg
    assert "Hugging Face Hub repo clip-study/tiny-hub-clip" in weights_source(f"hf-hub:{HUB_MODEL}", None)


def test_an_hf_hub_repo_whose_weights_are_missing_is_refused_not_built_at_random(hub_home, monkeypatch):
    """open_clip itself only warns and initialises at random when an hf-hub repo's weights cannot be fetched."""
    from study.library.models import ModelError, load_base_model

    hub_home.hub_model(with_weights=False, repo="clip-study/config-only")
    offline(monkeypatch, hub_home.root)
    with pytest.raises(ModelError, match=r"model.name: 'hf-hub:clip-study/config-only': the weights cannot be loaded"):
        load_base_model("hf-hub:clip-study/config-only", None)


def test_a_hub_dataset_id_loads_offline_as_fine_tuning_pairs_and_as_a_benchmark(hub_home, monkeypatch, tmp_path):
    from study.library.benchmarks import decode, spec_from_dict
    from study.library.sources import load_source

    written = hub_home.dataset()
    offline(monkeypatch, hub_home.root)
    train = load_source(HUB_DATA, "train", cache_dir=tmp_path)
    assert train["caption"] == written["train"]["caption"] and train["label"] == written["train"]["label"]
    assert np.array_equal(np.asarray(train[5]["image"]), np.asarray(written["train"][5]["image"]))
    pre = __import__("torchvision.transforms", fromlist=["ToTensor"]).ToTensor()
    spec = spec_from_dict({"source": HUB_DATA, "split": "test", "templates": ["a micrograph of {c} bacteria."]},
                          "hub.yaml", "hub-cells")
    bench = decode(spec, "specialized", True, tmp_path, pre)
    assert bench.classnames == CLASSES  # from the repo's ClassLabel
    assert sorted(bench.labels.tolist()) == sorted(written["test"]["label"])


# ------------------------------------------------------------------- with the cache absent: today's one line
def test_with_the_cache_absent_each_path_stops_with_one_line(empty_home, monkeypatch, tmp_path):
    from study.library.models import ModelError, load_base_model
    from study.library.sources import DataError, load_source

    offline(monkeypatch, empty_home)
    with pytest.raises(ModelError) as tag:
        load_base_model("ViT-B-32", "laion2b_s34b_b79k")
    with pytest.raises(ModelError) as hub:
        load_base_model(f"hf-hub:{HUB_MODEL}", None)
    with pytest.raises(DataError) as data:
        load_source(HUB_DATA, "train", cache_dir=tmp_path, where="data.finetune.source")
    assert str(tag.value).startswith("model.pretrained: tag 'laion2b_s34b_b79k' of 'ViT-B-32': the weights cannot be "
                                     "loaded (downloads need the network, or a copy in the Hugging Face cache)")
    assert str(hub.value).startswith(f"model.name: 'hf-hub:{HUB_MODEL}': the weights cannot be loaded")
    assert str(data.value).startswith(f"data.finetune.source: cannot load Hugging Face dataset '{HUB_DATA}' split "
                                      f"'train': ConnectionError")
    assert all("\n" not in str(e.value) for e in (tag, hub, data))


# ------------------------------------------------------------------- the commands name where weights came from
def test_evaluate_names_a_hub_model_by_its_repo_on_a_hub_benchmark(hub_home, monkeypatch, tmp_path, capsys):
    from study.evaluate import main

    hub_home.hub_model()
    hub_home.dataset()
    offline(monkeypatch, hub_home.root)
    (tmp_path / "cells.yaml").write_text(f"name: hub-cells\nsource: {HUB_DATA}\nsplit: test\n"
                                         f"templates: ['a micrograph of {{c}} bacteria.']\n")
    code = main(["--model", f"hf-hub:{HUB_MODEL}", "--benchmark", str(tmp_path / "cells.yaml"), "--cache-dir",
                 str(tmp_path / "cache"), "--json", str(tmp_path / "out.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    first = out.splitlines()[0]
    assert first.startswith(f"hf-hub:{HUB_MODEL} (Hugging Face Hub repo {HUB_MODEL}") and "random init" not in out
    assert "hub-cells" in out and "(24 images)" in out
    assert json.loads((tmp_path / "out.json").read_text())["weights"].startswith("Hugging Face Hub repo")


def test_weights_are_named_for_every_kind_of_source(tmp_path):
    from study.library.models import weights_source

    assert weights_source("clip-study-tiny", None) == "offline pretraining on the generated general domain"
    assert weights_source("ViT-B-32", None) == "random init"  # only where the weights really are random
    assert weights_source("ViT-B-32", str(tmp_path / "ft.pt")) == f"checkpoint {tmp_path / 'ft.pt'}"
    assert weights_source("ViT-B-16", "openai") == "open_clip tag openai: Hugging Face Hub repo " \
                                                   "timm/vit_base_patch16_clip_224.openai"


# ------------------------------------------------------------------- end to end: a study on each
def _study_args(model: list[str]) -> list[str]:
    spec = {"name": "hub-cells", "source": HUB_DATA, "split": "test", "templates": ["a micrograph of {c} bacteria."]}
    return ["--smoke-test", *model, "--set", f"data.finetune={json.dumps({'source': HUB_DATA, 'split': 'train'})}",
            "--set", f"data.specialized=[{json.dumps(spec)}]", "--set", "data.general=[shapes]",
            "--set", "data.offline_scale=0.05", "--set", "batch_size=12", "--set", "lora_blocks=1",
            "--set", "evaluation.wiseft_alphas=[0.0, 1.0]"]


def _check_study(proc, cwd: Path, name: str, words: str) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"base model: {name}, weights from {words}" in proc.stdout
    assert "random init" not in proc.stdout
    c, runs = mlflow_runs(cwd)
    parent = next(r for r in runs if r.data.tags["study.kind"] == "sweep")
    baseline = next(r for r in runs if r.data.tags["study.kind"] == "baseline")
    assert parent.data.params["model.weights"] == words == baseline.data.params["model.weights"]
    assert parent.data.params["data.finetune.source"] == HUB_DATA
    assert sum(r.data.tags["study.kind"] == "trial" and r.info.status == "FINISHED" for r in runs) == 2
    report = Path(c.download_artifacts(parent.info.run_id, "analysis/report.md", str(cwd))).read_text()
    assert f"Base model: {name}, weights from {words}." in report


@pytest.mark.slow
def test_a_study_of_an_hf_hub_model_on_a_hub_dataset_runs_offline(hub_home, tmp_path, smoke_cache):
    hub_home.hub_model()
    hub_home.dataset()
    proc = run_cli(_study_args(["--set", f"model.name=hf-hub:{HUB_MODEL}"]), tmp_path, smoke_cache, timeout=900,
                   env=env(hub_home.root))
    _check_study(proc, tmp_path, f"hf-hub:{HUB_MODEL}",
                 f"Hugging Face Hub repo {HUB_MODEL} (open_clip_config.json and its weights)")


@pytest.mark.slow
def test_a_study_of_a_tagged_vit_b_32_on_a_hub_dataset_runs_offline(hub_home, tmp_path, smoke_cache):
    """ViT-B-32 at full size on 2 CPU cores: a few minutes (the frozen prefix of 36 + 24 + 50 images, 2 trials)."""
    hub_home.tag("ViT-B-32", "laion2b_s34b_b79k")
    hub_home.dataset()
    proc = run_cli(_study_args(["--set", "model.name=ViT-B-32", "--set", "model.pretrained=laion2b_s34b_b79k"]),
                   tmp_path, smoke_cache, timeout=1500, env=env(hub_home.root))
    _check_study(proc, tmp_path, "ViT-B-32",
                 "open_clip tag laion2b_s34b_b79k: Hugging Face Hub repo laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
