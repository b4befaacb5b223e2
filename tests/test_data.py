"""Data: every source kind loads through one loader; subsets are nested; offline worlds are reproducible."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from study.library.finetune import nested_subset
from study.library.images import images_to_tensor
from study.library.sources import DataError, load_source, require_columns
from study.library.synthetic import HELD_OUT_COMBOS, MORPHOLOGIES, STAINS, general_example, micrograph_example


def _images(folder: Path, n: int = 4) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{i}.png"
        Image.new("RGB", (8, 8), (i * 50, 10, 10)).save(p)
        paths.append(p)
    return paths


def test_nested_subsets_are_prefixes_of_one_permutation():
    small, large = nested_subset(1000, 0.1, seed=3), nested_subset(1000, 0.2, seed=3)
    assert len(small) == 100 and len(large) == 200
    assert set(small) <= set(large)
    assert np.array_equal(small, nested_subset(1000, 0.1, seed=3))
    assert not np.array_equal(nested_subset(1000, 0.5, seed=3), nested_subset(1000, 0.5, seed=4))
    with pytest.raises(ValueError):
        nested_subset(10, 0.0, seed=0)


def test_offline_domain_is_reproducible_and_holds_out_combinations(tmp_path):
    a = load_source("offline:micrographs", "train", cache_dir=tmp_path / "a", scale=0.02)
    b = load_source("offline:micrographs", "train", cache_dir=tmp_path / "b", scale=0.02)
    assert a["caption"] == b["caption"]
    assert np.array_equal(np.asarray(a[0]["image"]), np.asarray(b[0]["image"]))
    assert a.features["label"].names == list(MORPHOLOGIES)
    stains = list(STAINS)
    for i in range(200):
        ex = micrograph_example(0, "train", i)
        stain = next(j for j, s in enumerate(stains) if s in ex["caption"]) if any(
            s in ex["caption"] for s in stains) else None
        if stain is not None:
            assert (ex["label"], stain) not in HELD_OUT_COMBOS
    test_combos = set()
    for i in range(300):
        ex = micrograph_example(0, "test", i)
        test_combos |= {(ex["label"], j) for j, s in enumerate(stains) if s in ex["caption"]}
    assert test_combos & HELD_OUT_COMBOS, "the benchmark must include held-out combinations"


def test_specialized_vocabulary_is_unseen_in_general_captions():
    general = " ".join(general_example(0, "train", i)["caption"] for i in range(2000))
    for word in list(MORPHOLOGIES) + list(STAINS) + ["micrograph", "smear"]:
        assert word not in general


def test_open_clip_csv(tmp_path):
    _images(tmp_path / "imgs")
    (tmp_path / "pairs.csv").write_text("filepath,caption\n" + "".join(f"imgs/{i}.png,cap {i}\n" for i in range(4)))
    ds = load_source(str(tmp_path / "pairs.csv"), "train", cache_dir=tmp_path)
    require_columns(ds, {"image_column": "image", "caption_column": "caption"}, "data.finetune")
    assert ds["caption"] == [f"cap {i}" for i in range(4)]
    assert ds[1]["image"].getpixel((0, 0)) == (50, 10, 10)


def test_parquet_and_saved_dataset(tmp_path):
    import datasets

    imgs = _images(tmp_path / "imgs")
    ds = datasets.Dataset.from_dict({"image": [str(p) for p in imgs], "caption": list("abcd")}).cast_column(
        "image", datasets.Image())
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for source in (tmp_path / "d.parquet", tmp_path / "saved"):
        got = load_source(str(source), "train", cache_dir=tmp_path)
        assert got["caption"] == list("abcd")
        assert got[2]["image"].size == (8, 8)


def test_image_folder_with_metadata(tmp_path):
    folder = tmp_path / "folder"
    for cls in ("cats", "dogs"):
        _images(folder / "train" / cls, 2)
    got = load_source(str(folder), "train", cache_dir=tmp_path)
    assert sorted(got.features["label"].names) == ["cats", "dogs"]
    assert len(got) == 4


def test_errors_name_the_field(tmp_path):
    with pytest.raises(DataError, match=r"^data.finetune.source: path .* does not exist$"):
        load_source(str(tmp_path / "missing.parquet"), "train", cache_dir=tmp_path, where="data.finetune.source")
    with pytest.raises(DataError, match="unknown offline domain"):
        load_source("offline:nope", "train", cache_dir=tmp_path)
    with pytest.raises(DataError, match="split 'dev' not found"):
        load_source("offline:micrographs", "dev", cache_dir=tmp_path, scale=0.01)


def test_corrupt_image_is_reported(tmp_path):
    import datasets

    imgs = _images(tmp_path / "imgs", 3)
    imgs[1].write_bytes(b"garbage")
    ds = datasets.Dataset.from_dict({"image": [str(p) for p in imgs]}).cast_column("image", datasets.Image())
    with pytest.raises(DataError, match="data.finetune: 1 of 3 images cannot be decoded .*first: image 1"):
        images_to_tensor(ds, "image", lambda im: np.asarray(im), where="data.finetune")
    images, kept = images_to_tensor(ds, "image", lambda im: torch.from_numpy(np.array(im)), max_bad_share=0.5)
    assert kept == [0, 2] and len(images) == 2


def test_finetune_subset_skips_undecodable_rows_and_keeps_captions_aligned(tmp_path):
    from study.config import DataSection, FinetuneData
    from study.library.finetune import finetune_tensors

    imgs = _images(tmp_path / "imgs", 4)
    imgs[2].write_bytes(b"garbage")
    csv = tmp_path / "pairs.csv"
    csv.write_text("filepath,caption\n" + "".join(f"imgs/{p.name},caption {i}\n" for i, p in enumerate(imgs)))
    spec = FinetuneData(source=str(csv), max_undecodable_share=0.5)
    images, captions = finetune_tensors(spec, DataSection(finetune=spec), tmp_path, 1.0,
                                        lambda im: torch.from_numpy(np.array(im, dtype=np.float32)), lambda xs: xs)
    assert len(images) == 3 and captions == ["caption 0", "caption 1", "caption 3"]
    half, half_captions = finetune_tensors(spec, DataSection(finetune=spec), tmp_path, 0.5,
                                           lambda im: torch.from_numpy(np.array(im, dtype=np.float32)), lambda xs: xs)
    # The nested subset is drawn over all 4 rows (the same rows whatever decodes), then row 2 is dropped.
    rows = [int(r) for r in nested_subset(4, 0.5, 0) if r != 2]
    assert half_captions == [f"caption {r}" for r in rows] and len(half) == len(rows)
