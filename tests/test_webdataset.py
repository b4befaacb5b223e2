"""CLIP_benchmark's WebDatasets: the same numbers as CLIP_benchmark on the same shards, from a local folder and from
the Hub's cache (``HF_HUB_OFFLINE=1``, the real ``huggingface_hub`` path), and a WebDataset as a fine-tuning set.

The shards are written by ``clip_benchmark.webdataset_builder.convert_dataset`` itself (lossless WebP, several
shards) from the offline shapes benchmark's images, with its class names and templates. CLIP_benchmark reads them
with its own ``build_dataset("wds/...", root=<folder>)`` (it reads a Hub repo over HTTP with curl, so the reference
is served from the folder; ours from the Hub cache holding the same files) and scores them with its own
``zeroshot_classification.evaluate`` (AMP off, CPU; its ``accuracy`` under numpy >= 2.4 as in test_parity.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_parity import clip_benchmark_zsc  # noqa: F401 (fixture)

from study.library.benchmarks import decode, load_split, load_spec, spec_from_dict
from study.library.models import load_base_model
from study.library.zeroshot import evaluate_sets

NAME = "vtab/toyshapes"  # served as clip-benchmark/wds_vtab-toyshapes
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def wds_folder(smoke_world, smoke_cache, tmp_path_factory) -> Path:
    """The shapes benchmark's test and validation splits as a WebDataset in CLIP_benchmark's layout, written by
    CLIP_benchmark's converter: ``test`` in shards of 25, ``train`` (its validation split) in one."""
    from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_dataset

    cfg, _ = smoke_world
    spec = load_spec("shapes")
    root = tmp_path_factory.mktemp("wds") / "toyshapes"
    for split, theirs, per_shard in (("test", "test", 25), ("validation", "train", 1000)):
        ds = load_split(spec.model_copy(update={"split": split}), smoke_cache, cfg.data.seed, cfg.data.offline_scale)

        class Rows(list):
            classes = ds.features["label"].names
            templates = list(spec.templates)

        rows = Rows((img.convert("RGB"), int(y)) for img, y in zip(ds["image"], ds["label"]))
        convert_dataset(rows, theirs, str(root), transform=PIL_to_bytes("webp"), image_format="webp",
                        max_count=per_shard, verbose=False)
    assert int((root / "test" / "nshards.txt").read_text()) >= 2  # several shards, in order
    return root


def hub_cache(folder: Path, cache: Path, name: str = NAME) -> Path:
    """``folder`` as ``huggingface_hub`` caches a dataset repo it downloaded: ``blobs/<sha256>``, and
    ``snapshots/<commit>/<path>`` links to them, ``refs/main`` naming the commit."""
    repo = cache / f"datasets--clip-benchmark--wds_{name.replace('/', '-')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        shutil.copyfile(f, blob)
        link = repo / "snapshots" / COMMIT / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return cache


def theirs(zsc, folder: Path, lm) -> dict:
    """CLIP_benchmark on ``folder``: ``build_dataset("wds/...")`` and its evaluate, as its ``cli.py`` runs a WebDataset
    (``dataset.batched``, a DataLoader with ``batch_size=None``)."""
    from clip_benchmark.datasets.builder import build_dataset

    ds = build_dataset(f"wds/{NAME}", root=str(folder), transform=lm.preprocess, split="test")
    loader = torch.utils.data.DataLoader(ds.batched(64), batch_size=None, shuffle=False, num_workers=0)
    return zsc.evaluate(lm.model, loader, lm.tokenizer, ds.classes, ds.templates, "cpu", amp=False)


def test_a_local_webdataset_folder_gives_clip_benchmarks_numbers(clip_benchmark_zsc, wds_folder, smoke_world,
                                                                  tmp_path):
    cfg, prepared = smoke_world
    torch.manual_seed(0)
    lm = load_base_model(cfg.model.name, prepared.model_pretrained)
    spec = spec_from_dict({"source": str(wds_folder)}, "toyshapes.yaml", "toyshapes")  # no columns, no class names
    assert spec.classnames == (wds_folder / "classnames.txt").read_text().split("\n")[:-1]
    assert spec.train_split == "train" and spec.task == "classification"
    s = decode(spec, "general", True, tmp_path, lm.preprocess)
    ours, _, _ = evaluate_sets(lm.model, lm.tokenizer, [s], "cpu", detailed=True, batch_size=64)
    ref = theirs(clip_benchmark_zsc, wds_folder, lm)
    assert len(s.images) == int(ours["general_images"]) > 50
    assert abs(ours["general_top1"] - ref["acc1"]) <= 1e-6
    assert abs(ours["general_balanced_accuracy"] - ref["mean_per_class_recall"]) <= 1e-6
    print(f"\nlocal folder: ours top-1 {ours['general_top1']:.4%} balanced {ours['general_balanced_accuracy']:.4%}; "
          f"CLIP_benchmark acc1 {ref['acc1']:.4%} mean per-class recall {ref['mean_per_class_recall']:.4%}")


def test_a_wds_name_reads_the_hub_cache_offline_and_gives_clip_benchmarks_numbers(clip_benchmark_zsc, wds_folder,
                                                                                    smoke_world, tmp_path):
    """``python -m study.evaluate --benchmark wds/vtab/toyshapes`` with ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` at a
    cache holding ``clip-benchmark/wds_vtab-toyshapes``: the same numbers as CLIP_benchmark on the folder."""
    cfg, prepared = smoke_world
    cache = hub_cache(wds_folder, tmp_path / "hub")
    out = tmp_path / "metrics.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home")}
    proc = subprocess.run([sys.executable, "-m", "study.evaluate", "--model", cfg.model.name, "--pretrained",
                           prepared.model_pretrained, "--benchmark", f"wds/{NAME}", "--batch-size", "64",
                           "--cache-dir", str(tmp_path / "cache"), "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(out.read_text())["metrics"]
    torch.manual_seed(0)
    lm = load_base_model(cfg.model.name, prepared.model_pretrained)
    ref = theirs(clip_benchmark_zsc, wds_folder, lm)
    assert abs(metrics["vtab-toyshapes_top1"] - ref["acc1"]) <= 1e-6
    assert abs(metrics["vtab-toyshapes_balanced_accuracy"] - ref["mean_per_class_recall"]) <= 1e-6
    assert "vtab-toyshapes" in proc.stdout
    print(f"\nHub cache: ours top-1 {metrics['vtab-toyshapes_top1']:.4%} balanced "
          f"{metrics['vtab-toyshapes_balanced_accuracy']:.4%}; CLIP_benchmark acc1 {ref['acc1']:.4%} mean per-class "
          f"recall {ref['mean_per_class_recall']:.4%}")


def test_a_spec_overrides_what_the_webdataset_says(wds_folder):
    spec = spec_from_dict({"source": str(wds_folder), "templates": ["a drawing of a {c}."], "train_split": False,
                           "classnames": ["a", "b", "c", "d", "e"]}, "toy.yaml", "toy")
    assert spec.templates == ["a drawing of a {c}."] and spec.train_split is False
    assert spec.classnames == ["a", "b", "c", "d", "e"]


def pixels(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)


def test_shards_are_a_source_whatever_the_image_extension(wds_folder, tmp_path):
    """A bare list of shards (a ``{0..n}`` range) reads the metadata beside it; ``source: webdataset`` with
    ``data_files`` takes a shard whose images are PNG next to one whose images are WebP, as one image column."""
    from study.library.sources import load_source

    n = int((wds_folder / "test" / "nshards.txt").read_text())
    whole = load_source(str(wds_folder), "test", cache_dir=tmp_path)
    ranged = load_source(f"{wds_folder}/test/{{0..{n - 1}}}.tar", "test", cache_dir=tmp_path)
    assert len(ranged) == len(whole) and ranged["label"] == whole["label"]
    png = tmp_path / "png.tar"  # the first shard again, its images re-encoded as (lossless) PNG
    with tarfile.open(wds_folder / "test" / "0.tar") as src, tarfile.open(png, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name.endswith(".webp"):
                buf = io.BytesIO()
                Image.open(io.BytesIO(data)).save(buf, format="png")
                data, m.name = buf.getvalue(), m.name.replace(".webp", ".png")
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    names = (wds_folder / "classnames.txt").read_text().splitlines()
    mixed = spec_from_dict({"source": "webdataset", "data_files": [str(png), str(wds_folder / "test" / "1.tar")],
                            "classnames": names}, "mixed.yaml", "mixed")
    s = decode(mixed, "general", True, tmp_path, pixels)
    folder = decode(spec_from_dict({"source": str(wds_folder)}, "toy.yaml", "toy"), "general", True, tmp_path, pixels)
    assert len(s.images) == 50 and s.labels.tolist() == folder.labels[:50].tolist()
    assert torch.equal(s.images[:50], folder.images[:50])  # PNG and WebP decode to the same pixels


def test_a_webdataset_is_a_fine_tuning_set_and_k_shot_sets_are_exact_and_nested(wds_folder, tmp_path):
    """A labelled WebDataset as data.finetune, with nothing but its path: labels and class names come from its files;
    the 4-shot set holds exactly 4 images of each class and contains the 2-shot set."""
    from study.config import load_study_config
    from study.library.finetune import finetune_subset

    cfg = load_study_config(None, [("data.finetune.source", str(wds_folder)), ("data.finetune.split", "test"),
                                   ("params.data_fraction", 1.0)])
    ft = cfg.data.finetune
    assert ft.label_column == "label" and ft.classnames == (wds_folder / "classnames.txt").read_text().splitlines()
    _, two = finetune_subset(ft, cfg.data, tmp_path, 1.0, pixels, shots=2)
    d4, four = finetune_subset(ft, cfg.data, tmp_path, 1.0, pixels, shots=4)
    labels = d4["labels"]
    assert np.bincount(labels[four]).tolist() == [4] * len(ft.classnames)
    assert np.bincount(labels[two]).tolist() == [2] * len(ft.classnames)
    assert set(two) <= set(four)
    assert finetune_subset(ft, cfg.data, tmp_path, 1.0, pixels, shots=4)[1] == four  # seeded
    assert {d4["captions"][i].split(" ")[-1].rstrip(".") for i in four} <= set(ft.classnames)


def test_the_baseline_probe_fits_a_webdatasets_train_split_and_scores_its_test_part(wds_folder, smoke_world, tmp_path):
    """The spec found ``train/`` in the WebDataset, so the probe is fit on that split (not on the validation part) and
    scored on the test part, with keys beside the zero-shot ones."""
    from study.library.benchmarks import probe_pairs, validation_and_test
    from study.library.probe import probe_metrics

    cfg, prepared = smoke_world
    lm = load_base_model(cfg.model.name, prepared.model_pretrained)
    spec = spec_from_dict({"source": str(wds_folder)}, "toyshapes.yaml", "toyshapes")
    sets = validation_and_test(spec, "general", True, tmp_path, lm.preprocess)
    (fit, test), = probe_pairs(sets, tmp_path, lm.preprocess)
    assert fit.split == "train" and len(fit.images) == 50 and test is sets[1]
    out = probe_metrics(lm.model, [(fit, test)], "cpu")
    assert out["test/general_linear_probe_train_images"] == 50
    assert 0 <= out["test/general_linear_probe_top1"] <= 1 and "test/general_linear_probe_balanced_accuracy" in out
    no_train = spec.model_copy(update={"train_split": False})
    (fit, _), = probe_pairs(validation_and_test(no_train, "general", True, tmp_path, lm.preprocess), tmp_path,
                            lm.preprocess)
    assert fit.split == "val"
