"""Benchmark specs: every shipped spec loads (offline data, or a local fixture of the real dataset's
schema through the same loading call), and bad specs or data fail with the spec file and field named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from study.library.benchmarks import SpecError, check, decode, load_spec, shipped_specs, spec_from_dict
from study.library.cache import FeatureCache
from study.library.zeroshot import retrieval_hits, retrieval_metrics

OFFLINE = {"micrographs", "micrographs-captions", "shapes"}
REAL = {"pcam", "pathmnist", "bloodmnist", "dermamnist", "cifar10"}


def preprocess(img):
    return torch.from_numpy(np.asarray(img.convert("RGB").resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)


def _images(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)) for _ in range(n)]


def _dataset(image_column: str, labels, label_feature):
    import datasets

    return datasets.Dataset.from_dict(
        {image_column: _images(len(labels)), "label": labels},
        features=datasets.Features({image_column: datasets.Image(), "label": label_feature}))


def _hub_repo(root: Path, config_dir: str, ds, readme_config: str = "default") -> Path:
    """A local copy of a Hub dataset repo: Parquet shards plus a README that declares the config."""
    (root / config_dir).mkdir(parents=True)
    ds.to_parquet(str(root / config_dir / "test-00000-of-00001.parquet"))
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: {readme_config}\n  data_files:\n"
                                    f"  - split: test\n    path: {config_dir}/test-*\n---\n")
    return root


def test_every_shipped_spec_is_covered_here():
    assert set(shipped_specs()) == OFFLINE | REAL


@pytest.mark.parametrize("name", sorted(OFFLINE))
def test_offline_specs_load_their_data(name, tmp_path):
    spec = load_spec(name)
    n = check(spec, tmp_path, seed=0, scale=0.02)
    assert n > 0
    s = decode(spec, "specialized", True, tmp_path, preprocess, scale=0.02)
    assert s.images.shape[1:] == (3, 8, 8) and len(s.images) == n
    if spec.task == "classification":
        assert len(s.classnames) >= 4 and s.labels.max() < len(s.classnames)
        assert all("{c}" not in p for prompts in s.prompts for p in prompts)
    else:
        assert len(s.captions) == n and s.caption_image.tolist() == list(range(n))


def test_pcam_loads_from_a_hub_shaped_repo_with_bool_labels(tmp_path):
    import datasets

    repo = _hub_repo(tmp_path / "PatchCamelyon", "data", _dataset("image", [True, False, True, False],
                                                                   datasets.Value("bool")))
    spec = load_spec("pcam").model_copy(update={"source": str(repo)})
    s = decode(spec, "specialized", True, tmp_path, preprocess)
    assert s.labels.tolist() == [1, 0, 1, 0]
    assert s.classnames == ["lymph node", "lymph node containing metastatic tumor tissue"]
    assert s.prompts[1][0] == "a histopathology slide showing lymph node containing metastatic tumor tissue"


def test_cifar10_loads_from_a_hub_shaped_repo_with_its_config(tmp_path):
    import datasets

    names = load_spec("cifar10").class_list()
    ds = _dataset("img", [0, 9, 3], datasets.ClassLabel(names=names))
    repo = _hub_repo(tmp_path / "cifar10", "plain_text", ds, readme_config="plain_text")
    spec = load_spec("cifar10").model_copy(update={"source": str(repo)})
    s = decode(spec, "general", True, tmp_path, preprocess)
    assert s.labels.tolist() == [0, 9, 3] and s.classnames[9] == "truck" and len(s.prompts[0]) == 18


@pytest.mark.parametrize("name", ["pathmnist", "bloodmnist", "dermamnist"])
def test_medmnist_specs_load_parquet_data_files(name, tmp_path):
    import datasets

    spec = load_spec(name)
    assert spec.source == "parquet" and "hf://datasets/albertvillanova/medmnist-v2" in spec.data_files["test"]
    k = len(spec.class_list())
    _dataset("image", [0, k - 1, 1], datasets.Value("int64")).to_parquet(str(tmp_path / "test-0.parquet"))
    local = spec.model_copy(update={"data_files": {"test": str(tmp_path / "test-*.parquet")}})
    s = decode(local, "specialized", True, tmp_path, preprocess)
    assert s.labels.tolist() == [0, k - 1, 1] and len(s.classnames) == k


# ------------------------------------------------------------------ bad input
def _write_spec(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "bench.yaml"
    path.write_text(body)
    return path


def _folder(tmp_path: Path, n: int = 4, corrupt: int = 0, labels=None) -> Path:
    """A Parquet file of ``n`` labelled images, the first ``corrupt`` of them garbage bytes."""
    import datasets

    rows = []
    for i, img in enumerate(_images(n)):
        if i < corrupt:
            rows.append({"bytes": b"not an image", "path": None})
        else:
            p = tmp_path / f"{i}.png"
            img.save(p)
            rows.append({"bytes": p.read_bytes(), "path": None})
    ds = datasets.Dataset.from_dict({"image": rows, "label": labels or [i % 2 for i in range(n)]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    path = tmp_path / "data.parquet"
    ds.to_parquet(str(path))
    return path


BASE = "source: {src}\nsplit: train\nclassnames: [healthy, diseased]\n"


def test_template_without_slot_names_spec_file_and_field(tmp_path):
    path = _write_spec(tmp_path, BASE.format(src="x.parquet") + "templates: ['a photo']\n")
    with pytest.raises(SpecError, match=rf"^{path}: templates: template 'a photo' has no '{{c}}' slot"):
        load_spec(str(path))


def test_classnames_that_do_not_cover_labels(tmp_path):
    data = _folder(tmp_path, labels=[0, 1, 2, 1])
    spec = load_spec(str(_write_spec(tmp_path, BASE.format(src=data))))
    with pytest.raises(SpecError, match=r"bench\.yaml: classnames: labels \['2'\] have no class name"):
        check(spec, tmp_path)


def test_missing_label_and_image_columns(tmp_path):
    data = _folder(tmp_path)
    spec = load_spec(str(_write_spec(tmp_path, BASE.format(src=data) + "label_column: diagnosis\n")))
    with pytest.raises(SpecError, match=r"bench\.yaml: label_column: column 'diagnosis' not in split 'train'"):
        check(spec, tmp_path)
    spec = spec.model_copy(update={"label_column": "label", "image_column": "pixels"})
    with pytest.raises(SpecError, match=r"bench\.yaml: image_column: column 'pixels'"):
        check(spec, tmp_path)


@pytest.mark.parametrize("layout", ["parquet", "csv"])
def test_empty_split(tmp_path, layout):
    import datasets

    path = tmp_path / f"empty.{layout}"
    if layout == "parquet":
        datasets.Dataset.from_dict({"image": [], "label": []}, features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.Value("int64")})).to_parquet(str(path))
    else:
        path.write_text("filepath,label\n")
    spec = load_spec(str(_write_spec(tmp_path, BASE.format(src=path))))
    with pytest.raises(SpecError, match=r"bench\.yaml: split: split 'train' is empty"):
        check(spec, tmp_path)


def test_undecodable_images_are_skipped_and_counted_up_to_the_threshold(tmp_path, capsys):
    data = _folder(tmp_path, n=10, corrupt=1)
    spec = load_spec(str(_write_spec(tmp_path, BASE.format(src=data) + "max_undecodable_share: 0.2\n")))
    s = decode(spec, "specialized", True, tmp_path, preprocess)
    assert s.skipped == 1 and len(s.images) == 9 and len(s.labels) == 9
    assert s.labels.tolist() == [i % 2 for i in range(1, 10)]  # labels stay aligned with kept images
    assert "skipped 1 of 10 images" in capsys.readouterr().out
    strict = spec.model_copy(update={"max_undecodable_share": 0.05})
    with pytest.raises(SpecError, match=r"bench\.yaml: image_column: 1 of 10 images cannot be decoded .*first: row 0"):
        decode(strict, "specialized", True, tmp_path, preprocess)


def test_cupl_prompts_must_cover_every_class():
    with pytest.raises(SpecError, match=r"inline: <top>: templates: per-class prompts missing for \['diseased'\]"):
        spec_from_dict({"source": "x", "classnames": ["healthy", "diseased"],
                        "templates": {"healthy": ["a healthy cell"]}}, "inline", "b")


def test_study_config_names_benchmarks_by_spec_and_rejects_unknown_ones(tmp_path):
    from study.config import ConfigError, load_study_config

    cfg = load_study_config(None, [("data.general", ["shapes", "cifar10"])])
    assert [s.name for s in cfg.data.general] == ["shapes", "cifar10"]  # resolved once, typed
    with pytest.raises(ConfigError, match="nope: no such benchmark spec; shipped specs: bloodmnist"):
        load_study_config(None, [("data.general", ["nope"])])
    with pytest.raises(ConfigError, match=r"data\.specialized: needs a classification benchmark"):
        load_study_config(None, [("data.specialized", ["micrographs-captions"])])


# ------------------------------------------------------------------ metrics
def test_retrieval_recall_counts_any_caption_of_an_image():
    # 3 images; image 0 owns captions 0 and 1, image 1 caption 2, image 2 caption 3.
    owner = torch.tensor([0, 0, 1, 2])
    scores = torch.tensor([[0.1, 0.9, 0.0, 0.2],   # image 0: best caption 1 (its own) -> hit@1
                           [0.8, 0.0, 0.5, 0.1],   # image 1: best caption 0, own caption 2 second -> miss@1
                           [0.0, 0.1, 0.2, 0.3]])  # image 2: own caption 3 best -> hit@1
    i2t, t2i = retrieval_hits(scores, owner, 1)
    assert i2t.tolist() == [True, False, True]
    assert t2i.tolist() == [False, True, True, True]  # caption 0's best image is 1, not its own 0
    i2t2, _ = retrieval_hits(scores, owner, 2)
    assert i2t2.tolist() == [True, True, True]
    img = torch.nn.functional.normalize(torch.randn(20, 8), dim=-1)
    m = retrieval_metrics(img, img.clone(), torch.arange(20))
    assert m["i2t_recall_at_1"] == m["t2i_recall_at_1"] == 1.0 and m["i2t_recall_at_1_ci_low"] == 1.0


def test_feature_cache_computes_once_per_key(tmp_path):
    calls = []
    cache = FeatureCache(tmp_path, "model-a")
    for _ in range(3):
        value = cache.get("image", "bench-1", lambda: calls.append(1) or torch.ones(2))
    assert len(calls) == 1 and cache.hits == 2 and value.tolist() == [1.0, 1.0]
    FeatureCache(tmp_path, "model-b").get("image", "bench-1", lambda: calls.append(1) or torch.zeros(2))
    assert len(calls) == 2  # other weights never reuse a file


# ------------------------------------------------------- validation and test parts
def test_validation_and_test_parts_are_seeded_stratified_and_disjoint():
    from study.library.benchmarks import stratified_split

    labels = torch.tensor([0] * 50 + [1] * 25 + [2] * 25)
    val, test = stratified_split(labels, 0.4, seed=3)
    assert set(val.tolist()).isdisjoint(test.tolist()) and sorted(val.tolist() + test.tolist()) == list(range(100))
    assert torch.bincount(labels[val]).tolist() == [20, 10, 10]  # 40% of every class
    again, _ = stratified_split(labels, 0.4, seed=3)
    other, _ = stratified_split(labels, 0.4, seed=4)
    assert torch.equal(val, again) and not torch.equal(val, other)


def test_a_study_scores_each_benchmark_on_disjoint_validation_and_test_parts(tmp_path):
    from study.config import load_study_config
    from study.library.benchmarks import eval_sets
    from study.library.models import load_base_model

    cfg = load_study_config(None, [("data.offline_scale", 0.05)])
    sets = eval_sets(cfg.data, tmp_path, load_base_model("clip-study-tiny", None).preprocess, validation_share=0.5)
    assert [(s.spec.name, s.split) for s in sets] == [
        ("micrographs", "val"), ("micrographs", "test"), ("micrographs-captions", "val"),
        ("micrographs-captions", "test"), ("shapes", "val"), ("shapes", "test")]
    val, test = sets[0], sets[1]
    assert val.key == "val/specialized_" and test.key == "test/specialized_" and test.label == "test_specialized"
    whole = {tuple(x.flatten()[:64].tolist()) for x in torch.cat([val.images.tensor(), test.images.tensor()])}
    assert len(whole) == len(val.images) + len(test.images)  # no image in both parts
    cap_val, cap_test = sets[2], sets[3]
    for part in (cap_val, cap_test):  # retrieval splits by image; each caption follows its image
        assert sorted(set(part.caption_image.tolist())) == list(range(len(part.images)))
        assert len(part.captions) == len(part.caption_image)


def test_chance_levels_and_collapse():
    from study.library.zeroshot import chance_and_collapse

    labels = torch.tensor([0] * 50 + [1] * 25 + [2] * 25)
    out = chance_and_collapse(torch.zeros(100, dtype=torch.long), labels, 3)
    assert out == {"chance_top1": 0.5, "chance_balanced_accuracy": 1 / 3, "pred_majority_share": 1.0, "collapsed": 1.0}
    assert chance_and_collapse(labels.clone(), labels, 3)["collapsed"] == 0.0  # right answers do not collapse
    skewed = torch.tensor([0] * 95 + [1] * 5)
    assert chance_and_collapse(torch.zeros(100, dtype=torch.long), skewed, 2)["collapsed"] == 0.0  # the data is 95% one class
