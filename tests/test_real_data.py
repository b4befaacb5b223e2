"""Real data as researchers bring it: images decoded as the field decodes them, label-only fine-tuning,
held-out splits of one source, the contamination check, content-keyed caches and the on-disk store.

Each test builds tiny files of one kind and asserts the value that is right for them.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision import transforms as T

from study.library.benchmarks import SpecError, decode, spec_from_dict
from study.library.cache import prune
from study.library.contamination import check_overlap
from study.library.images import open_image
from study.library.sources import DataError
from study.library.store import build_store

PRE = T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor(), T.Normalize([0.5] * 3, [0.25] * 3)])
COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


def _picture(i: int, label: int, size=(24, 24)) -> np.ndarray:
    """A distinct 8-bit grayscale-ish picture per (i, label)."""
    rng = np.random.default_rng(1000 * label + i)
    base = np.full((size[1], size[0]), 40 + 70 * label, np.uint8)
    return np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8)


def _folder(root: Path, per_class=(6, 6, 6), names=("circle", "cross", "ring"), gray16=False) -> Path:
    """An image folder of classes (label from the sub-folder), 8-bit or 16-bit grayscale PNGs."""
    for label, n in enumerate(per_class):
        (root / names[label]).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = _picture(i, label)
            img = Image.fromarray(arr.astype(np.uint16) * 257) if gray16 else Image.fromarray(arr)
            img.save(root / names[label] / f"{i}.png")
    return root


def _spec(src, **extra):
    return spec_from_dict({"source": str(src), "split": "train", "templates": ["a {c}."], **extra},
                          "bench.yaml", "bench")


def test_16bit_pngs_decode_like_their_8bit_originals(tmp_path):
    eight = decode(_spec(_folder(tmp_path / "8")), "specialized", True, tmp_path / "c", PRE)
    sixteen = decode(_spec(_folder(tmp_path / "16", gray16=True)), "specialized", True, tmp_path / "c", PRE)
    assert Image.open(tmp_path / "16" / "circle" / "0.png").mode.startswith("I")
    assert torch.equal(eight.images.tensor(), sixteen.images.tensor())  # the same pixels: the same top-1
    assert eight.labels.tolist() == sixteen.labels.tolist()


def test_exif_orientation_is_applied(tmp_path):
    upright = np.zeros((20, 40, 3), np.uint8)
    upright[:, :20] = (250, 0, 0)  # red left half, blue right half
    upright[:, 20:] = (0, 0, 250)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # what a camera held sideways writes
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    stored.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    img = np.asarray(open_image(str(tmp_path / "rot.jpg")), dtype=float)
    assert img.shape == (20, 40, 3)
    assert img[:, :18, 0].mean() > 200 and img[:, 22:, 2].mean() > 200


def _parquet(tmp_path: Path, kind: str) -> Path:
    """A Parquet file whose image column holds PNG bytes, relative paths, or {bytes, path} mappings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "img").mkdir(exist_ok=True)
    cells, labels = [], []
    for i in range(8):
        buf = io.BytesIO()
        Image.fromarray(_picture(i, i % 2)).save(buf, format="PNG")
        (tmp_path / "img" / f"{i}.png").write_bytes(buf.getvalue())
        cells.append({"bytes": buf.getvalue(), "path": None} if kind == "struct" else
                     buf.getvalue() if kind == "bytes" else f"img/{i}.png")
        labels.append(["cross", "circle"][i % 2])
    path = tmp_path / f"{kind}.parquet"
    pq.write_table(pa.table({"image": cells, "label": labels}), path)
    return path


@pytest.mark.parametrize("kind", ["bytes", "paths", "struct"])
def test_parquet_image_columns_as_bytes_paths_or_structs(tmp_path, kind):
    s = decode(_spec(_parquet(tmp_path, kind), classnames=["circle", "cross"]), "specialized", True,
               tmp_path / "c", PRE)
    ref = torch.stack([PRE(Image.fromarray(_picture(i, i % 2)).convert("RGB")) for i in range(8)])
    assert torch.equal(s.images.tensor(), ref)
    assert s.labels.tolist() == [1, 0] * 4  # string labels mapped through the class names


def test_string_labels_without_names_and_unknown_labels(tmp_path):
    path = _parquet(tmp_path, "bytes")
    s = decode(_spec(path), "specialized", True, tmp_path / "c", PRE)
    assert s.classnames == ["circle", "cross"] and s.labels.tolist() == [1, 0] * 4
    with pytest.raises(SpecError, match=r"bench\.yaml: label_column: labels \['circle'\] have no class name"):
        decode(_spec(path, classnames=["cross", "square"]), "specialized", True, tmp_path / "c", PRE)


def test_class_map_starting_at_1_adds_no_phantom_class(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "gaps.parquet"
    cells = []
    for i in range(9):
        buf = io.BytesIO()
        Image.fromarray(_picture(i, i % 3)).save(buf, format="PNG")
        cells.append(buf.getvalue())
    pq.write_table(pa.table({"image": cells, "label": [1, 3, 5] * 3}), path)
    s = decode(_spec(path, classnames={1: "circle", 3: "cross", 5: "ring"}), "specialized", True, tmp_path / "c", PRE)
    assert s.classnames == ["circle", "cross", "ring"] and s.prompts == [["a circle."], ["a cross."], ["a ring."]]
    assert s.labels.tolist() == [0, 1, 2] * 3


def test_max_images_is_a_seeded_stratified_sample_and_one_class_is_an_error(tmp_path):
    folder = _folder(tmp_path / "f", per_class=(20, 10, 10))
    s = decode(_spec(folder, max_images=8), "specialized", True, tmp_path / "c", PRE)
    assert np.bincount(s.labels.numpy()).tolist() == [4, 2, 2]  # each class keeps its share, not the first rows
    again = decode(_spec(folder, max_images=8), "specialized", True, tmp_path / "c2", PRE)
    assert torch.equal(s.images.tensor(), again.images.tensor())
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [str(p) for p in sorted(folder.rglob("*.png"))[:5]], "label": ["cross"] * 5}),
                   tmp_path / "one.parquet")
    with pytest.raises(SpecError, match=r"bench\.yaml: split: only 1 class present in 5 images"):
        decode(_spec(tmp_path / "one.parquet", classnames=["circle", "cross"]), "specialized", True, tmp_path / "c", PRE)
    with pytest.raises(SpecError, match=r"bench\.yaml: label_column: .*a single class sub-folder has no label column"):
        decode(_spec(_folder(tmp_path / "single", per_class=(4, 0, 0))), "specialized", True, tmp_path / "c", PRE)


def test_editing_metadata_in_place_changes_the_result(tmp_path):
    folder = _folder(tmp_path / "f", per_class=(4, 4, 0), names=("a", "b", "c"))
    flat = tmp_path / "flat"
    flat.mkdir()
    rows = ["file_name,kind"]
    for i, p in enumerate(sorted(folder.rglob("*.png"))):
        (flat / f"{i}.png").write_bytes(p.read_bytes())
        rows.append(f"{i}.png,{p.parent.name}")
    (flat / "metadata.csv").write_text("\n".join(rows) + "\n")
    spec = _spec(flat, label_column="kind", classnames=["a", "b"])
    before = decode(spec, "specialized", True, tmp_path / "c", PRE).labels.tolist()
    stamp, file_stamp = os.stat(flat).st_mtime_ns, os.stat(flat / "metadata.csv").st_mtime_ns
    text = (flat / "metadata.csv").read_text().replace(",a\n", ",X\n").replace(",b\n", ",a\n").replace(",X\n", ",b\n")
    (flat / "metadata.csv").write_text(text)  # the same size
    os.utime(flat / "metadata.csv", ns=(file_stamp, file_stamp))  # and its old time: only the content tells
    os.utime(flat, ns=(stamp, stamp))  # the folder's own mtime unchanged, as after an in-place edit
    after = decode(spec, "specialized", True, tmp_path / "c", PRE).labels.tolist()
    assert after == [1 - y for y in before]


def test_store_reads_batches_from_disk_and_pickles_without_pixels(tmp_path):
    from datasets import Dataset, Image as HFImage

    paths = []
    for i in range(40):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(_picture(i, i % 3)).save(paths[-1])
    ds = Dataset.from_dict({"image": paths}).cast_column("image", HFImage())
    store, skipped = build_store(ds, "image", PRE, tmp_path / "store", where="w", progress=False)
    ref = torch.stack([PRE(Image.open(p).convert("RGB")) for p in paths])
    idx = torch.tensor([31, 2, 17, 2])
    assert skipped == 0 and torch.equal(store[idx], ref[idx]) and torch.equal(store[5:9], ref[5:9])
    sub = store.subset([3, 1])
    assert torch.equal(sub[0:2], ref[[3, 1]]) and sub.rows.tolist() == [3, 1]
    assert len(pickle.dumps(sub)) < 20_000 < ref.numel()  # Ray ships the path, not the pixels
    assert torch.equal(pickle.loads(pickle.dumps(sub))[1], ref[1])
    assert store.column("sha1")[0] != store.column("sha1")[1]


def test_prune_keeps_the_cache_under_its_bound_least_recently_used_first(tmp_path):
    for i, name in enumerate(["old", "mid", "new"]):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x").write_bytes(b"0" * 1000)
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    assert prune(tmp_path, 2500) == [tmp_path / "old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mid", "new"]


def test_holdout_gives_disjoint_parts_and_the_overlap_check_counts_shared_images(tmp_path):
    from study.config import DataSection, FinetuneData
    from study.library.finetune import decoded_finetune

    folder = _folder(tmp_path / "f", per_class=(10, 10, 10))
    data = DataSection(finetune=FinetuneData(source=str(folder), label_column="label",
                                             holdout={"share": 0.3, "take": "rest"}))
    ft = decoded_finetune(data.finetune, data, tmp_path / "c", PRE)
    bench = decode(_spec(folder, holdout={"share": 0.3, "take": "held_out"}), "specialized", True, tmp_path / "c", PRE)
    assert len(ft["store"]) == 21 and len(bench.images) == 9
    assert np.bincount(bench.labels.numpy()).tolist() == [3, 3, 3]  # stratified
    assert ft["captions"][0] == "a photo of a circle."  # captioned from the labels
    counts = check_overlap(ft["store"], {"data.specialized 'bench'": bench.images}, 0)
    assert counts["data.specialized 'bench'"]["images"] == 0
    whole = decode(_spec(folder), "specialized", True, tmp_path / "c", PRE)
    with pytest.raises(DataError, match=r"data\.max_overlap: 21 images of benchmark data\.specialized 'bench' are also "
                                        r"in data\.finetune \(21 identical"):
        check_overlap(ft["store"], {"data.specialized 'bench'": whole.images}, 0)


def test_split_slices_as_datasets_writes_them(tmp_path):
    folder = _folder(tmp_path / "f", per_class=(5, 5, 5), names=("a", "b", "c"))
    head = decode(_spec(folder, split="train[:60%]"), "specialized", True, tmp_path / "c", PRE)
    tail = decode(_spec(folder, split="train[60%:]"), "specialized", True, tmp_path / "c", PRE)
    assert len(head.images) == 9 and len(tail.images) == 6
    assert np.bincount(tail.labels.numpy()).tolist() == [0, 1, 5]  # an image folder is sorted by class
    sha = set(head.images.column("sha1").tolist())
    assert not sha & set(tail.images.column("sha1").tolist())


def test_empty_captions_are_skipped_and_counted(tmp_path, capsys):
    from study.config import DataSection, FinetuneData
    from study.library.finetune import decoded_finetune

    src = tmp_path / "data"
    src.mkdir()
    rows = ["file_name,caption"]
    for i in range(6):
        Image.fromarray(_picture(i, 0)).save(src / f"{i}.png")
        rows.append(f"{i}.png,{'' if i < 3 else f'a picture number {i}'}")
    (src / "metadata.csv").write_text("\n".join(rows) + "\n")
    data = DataSection(finetune=FinetuneData(source=str(src)))
    ft = decoded_finetune(data.finetune, data, tmp_path / "c", PRE)
    assert ft["captions"] == [f"a picture number {i}" for i in (3, 4, 5)] and ft["no_caption"] == 3
    assert len(ft["store"]) == 3
    spec = _spec(src, task="retrieval")
    s = decode(spec, "specialized", False, tmp_path / "c", PRE)
    assert s.captions == [f"a picture number {i}" for i in (3, 4, 5)] and s.caption_image.tolist() == [0, 1, 2]
    assert len(s.images) == 3  # an image with no caption left could never be a hit
    assert torch.equal(s.images.tensor(), ft["store"].tensor())
    assert "skipped 3 empty or missing captions (3 images left with none)" in capsys.readouterr().out


def _label_only_study(tmp_path: Path, smoke_cache: Path, overlap: bool) -> Path:
    from study.library.sources import load_source
    from study.library.synthetic import MORPHOLOGIES

    folder = tmp_path / "cells"
    ds = load_source("offline:micrographs", "train", cache_dir=smoke_cache, scale=0.1)
    counts = {}
    for ex in ds:
        name = list(MORPHOLOGIES)[ex["label"]]
        if counts.get(name, 0) < 30:
            (folder / name).mkdir(parents=True, exist_ok=True)
            ex["image"].save(folder / name / f"{counts.get(name, 0)}.png")
            counts[name] = counts.get(name, 0) + 1
    space = yaml.safe_load((Path(__file__).parent.parent / "search_spaces" / "default.yaml").read_text())
    held = None if overlap else {"share": 0.4, "take": "held_out"}
    space["data"] = {
        "finetune": {"source": str(folder), "label_column": "label", "templates": ["a micrograph of {c} cells."],
                     **({} if overlap else {"holdout": {"share": 0.4, "take": "rest"}})},
        "specialized": [{"name": "cells", "source": str(folder), "split": "train", "holdout": held,
                         "templates": ["a micrograph of {c} cells."]}],
        "general": ["shapes"]}
    path = tmp_path / "cells.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def test_overlap_stops_the_study_before_ray(tmp_path, smoke_cache):
    from helpers import run_cli

    space = _label_only_study(tmp_path, smoke_cache, overlap=True)
    r = run_cli(["--space", str(space), "--smoke-test"], tmp_path, smoke_cache, timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    images = len(list((tmp_path / "cells").rglob("*.png")))
    assert len(err) == 1 and (f"data.max_overlap: {images} images of benchmark data.specialized 'cells' are also in "
                              f"data.finetune ({images} identical") in err[0], r.stderr
    assert not (tmp_path / "mlflow.db").exists() and "Ray" not in r.stdout


@pytest.mark.slow  # about 2 minutes: CI's second stage (pytest -m slow) runs it beside the default study
def test_one_labelled_folder_with_no_captions_gives_a_finding(tmp_path, smoke_cache):
    from helpers import mlflow_runs, run_cli

    space = _label_only_study(tmp_path, smoke_cache, overlap=False)
    r = run_cli(["--space", str(space), "--smoke-test"], tmp_path, smoke_cache, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "in-distribution transfer, not zero-shot" in r.stdout and "Study summary" in r.stdout
    c, runs = mlflow_runs(tmp_path)
    parent = next(x for x in runs if x.data.tags.get("study.kind") == "sweep")
    assert parent.data.metrics["data_overlap/specialized/cells"] == 0
    assert parent.data.tags["study.transfer"] == "in-distribution"
    assert sum(x.data.tags.get("study.kind") == "trial" for x in runs) == 2
    report = next((tmp_path / "outputs" / "analysis").rglob("report.md")).read_text()
    assert "in-distribution transfer" in report


def test_two_nodes_build_identical_stores(tmp_path):
    """On a cluster each node without a shared cache builds its own store: the builds must agree exactly,
    so every worker trains on the same pixels in the same order."""
    from study.config import DataSection, FinetuneData
    from study.library.finetune import finetune_tensors

    folder = _folder(tmp_path / "f", per_class=(7, 7, 7))
    data = DataSection(finetune=FinetuneData(source=str(folder), label_column="label"))

    def tokens(texts):
        return torch.tensor([[len(t), hash(t) % 997] for t in texts])

    a_img, a_tok = finetune_tensors(data.finetune, data, tmp_path / "node-a", 0.5, PRE, tokens)
    b_img, b_tok = finetune_tensors(data.finetune, data, tmp_path / "node-b", 0.5, PRE, tokens)
    assert a_img.path != b_img.path and len(a_img) == 11
    assert torch.equal(a_img.tensor(), b_img.tensor()) and torch.equal(a_tok, b_tok)
    assert a_img.column("sha1").tolist() == b_img.column("sha1").tolist()


def test_a_store_pruned_away_is_built_again(tmp_path):
    folder = _folder(tmp_path / "f", per_class=(4, 4, 4))
    first = decode(_spec(folder), "specialized", True, tmp_path / "c", PRE)
    prune(tmp_path / "c" / "stores", 0, keep=tuple(p for p in (tmp_path / "c" / "stores").iterdir()
                                                    if p.name.endswith(".eval.pt")))
    assert [p.name.endswith(".eval.pt") for p in (tmp_path / "c" / "stores").iterdir()] == [True]
    again = decode(_spec(folder), "specialized", True, tmp_path / "c", PRE)
    assert torch.equal(first.images.tensor(), again.images.tensor()) and len(again.images) == 12
