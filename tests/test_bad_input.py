"""Bad input: a one-line error naming file and field, exit 2, nothing started in Ray, nothing in MLflow."""

from __future__ import annotations

import io
from contextlib import redirect_stderr
from pathlib import Path

import pytest
from PIL import Image

from study.run import main


@pytest.fixture
def guarded(tmp_path, monkeypatch):
    """Run ``main`` in a fresh directory; fail loudly if it ever starts Ray."""
    import ray

    def no_ray(*a, **k):
        raise AssertionError("Ray was started on bad input")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def run(*args):
        err = io.StringIO()
        with redirect_stderr(err):
            code = main(["--smoke-test", *args])
        return code, err.getvalue().strip()

    yield run
    assert not (tmp_path / "mlflow.db").exists(), "MLflow store written on bad input"
    assert not (tmp_path / "outputs").exists(), "sweep state written on bad input"


def one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def test_unknown_model(guarded, smoke_cache):
    code, err = guarded("--cache-dir", str(smoke_cache), "--set", "model.name=ViT-Nope-32")
    assert code == 2
    assert "model.name: unknown open_clip model 'ViT-Nope-32'" in one_line(err)


def test_unknown_pretrained_tag(guarded, smoke_cache):
    code, err = guarded("--cache-dir", str(smoke_cache), "--set", "model.name=ViT-B-32",
                        "--set", "model.pretrained=not_a_tag")
    assert code == 2 and "model.pretrained: unknown tag 'not_a_tag'" in one_line(err)


def test_missing_checkpoint_path(guarded, smoke_cache, tmp_path):
    code, err = guarded("--cache-dir", str(smoke_cache), "--set", "model.name=ViT-B-32",
                        "--set", f"model.pretrained={tmp_path}/missing.pt")
    assert code == 2 and "model.pretrained: checkpoint" in one_line(err)


def test_out_of_range_rank(guarded, smoke_cache):
    code, err = guarded("--cache-dir", str(smoke_cache), "--set", "params.lora_rank.choices=[0, 2]")
    assert code == 2
    line = one_line(err)
    assert "default.yaml: params.lora_rank.choices" in line and "greater than or equal to 1" in line


def test_missing_dataset_path(guarded, smoke_cache, tmp_path):
    code, err = guarded("--cache-dir", str(smoke_cache), "--set", f"data.finetune.source={tmp_path}/nope.csv")
    assert code == 2 and "data.finetune.source: path" in one_line(err) and "does not exist" in err


def _csv(tmp_path: Path, header: str, corrupt: bool = False) -> Path:
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    rows = [header]
    for i in range(4):
        if corrupt and i == 2:
            (img_dir / f"{i}.png").write_bytes(b"not a png")
        else:
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(img_dir / f"{i}.png")
        rows.append(f"imgs/{i}.png,a red square {i}")
    path = tmp_path / "pairs.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_dataset_without_caption_column(guarded, smoke_cache, tmp_path):
    path = _csv(tmp_path, "filepath,text")
    code, err = guarded("--cache-dir", str(smoke_cache), "--set", f"data.finetune.source={path}")
    assert code == 2
    assert "data.finetune.caption_column: column 'caption' not in dataset" in one_line(err)


def test_malformed_space_file(guarded, smoke_cache, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("params: {learning_rate: {distribution: loguniform, low: 1e-4, high: ]\n")
    code, err = guarded("--cache-dir", str(smoke_cache), "--space", str(bad))
    assert code == 2 and f"{bad}: malformed YAML" in one_line(err)


def test_resume_without_a_sweep(guarded, smoke_cache):
    code, err = guarded("--cache-dir", str(smoke_cache), "--resume")
    assert code == 2 and "--resume: no sweep" in one_line(err)


def test_undecodable_finetune_images_above_the_share(guarded, smoke_cache, tmp_path):
    path = _csv(tmp_path, "filepath,caption", corrupt=True)  # 1 of 4 broken: 25% > the default 1%
    code, err = guarded("--cache-dir", str(smoke_cache), "--set", f"data.finetune.source={path}")
    assert code == 2
    assert "data.finetune.image_column: 1 of 4 images cannot be decoded (max_undecodable_share 0.01); first: row 2" in one_line(err)


def _bench_spec(tmp_path: Path, extra: str = "", corrupt: bool = False) -> Path:
    csv = _csv(tmp_path, "filepath,label", corrupt=corrupt)
    csv.write_text(csv.read_text().replace("a red square ", ""))  # label column: 0..3
    spec = tmp_path / "slides.yaml"
    spec.write_text(f"name: slides\nsource: {csv}\nsplit: train\nclassnames: [a, b, c, d]\n"
                    f"templates: ['a slide of {{c}}']\n{extra}")
    return spec


def test_benchmark_spec_with_a_missing_column(guarded, smoke_cache, tmp_path):
    spec = _bench_spec(tmp_path, "label_column: diagnosis\n")
    code, err = guarded("--cache-dir", str(smoke_cache), "--set", f"data.specialized=[{spec}]")
    assert code == 2 and f"{spec}: label_column: column 'diagnosis' not in split 'train'" in one_line(err)


def test_benchmark_spec_with_undecodable_images(guarded, smoke_cache, tmp_path):
    spec = _bench_spec(tmp_path, corrupt=True)
    code, err = guarded("--cache-dir", str(smoke_cache), "--set", f"data.specialized=[{spec}]")
    assert code == 2 and f"{spec}: image_column: 1 of 4 images cannot be decoded" in one_line(err)


def test_benchmark_spec_template_without_slot(guarded, smoke_cache, tmp_path):
    spec = _bench_spec(tmp_path, "templates: ['a slide']\n".replace("templates", "description: x\ntemplates"))
    spec.write_text(spec.read_text().replace("templates: ['a slide of {c}']\n", ""))
    code, err = guarded("--cache-dir", str(smoke_cache), "--set", f"data.general=[shapes, {spec}]")
    assert code == 2 and f"{spec}: templates: template 'a slide' has no '{{c}}' slot" in one_line(err)
