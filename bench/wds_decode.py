"""WebDataset sources and the linear probe: what they cost, each row against a baseline measured in the same run.

1. Decoding a WebDataset in CLIP_benchmark's layout (generated 256 px JPEGs, 1,000 per shard, 4 classes) into the
   study's image store (``load_source`` reads the shards into ``<cache>/hf/wds-*``, then ``build_store`` decodes,
   preprocesses and hashes every image into the memory-mapped store) against ``webdataset``'s own decode loop on the
   same shards (``WebDataset(...).decode("pil").to_tuple("jpg", "cls").map_tuple(preprocess, None)``, iterated once),
   both with ViT-B-32's preprocessing: images/s and peak RSS (``VmHWM``; and the peak of ``RssAnon``, the process's
   own memory) at each size, each measurement in its own process. Goals: >= 0.8x webdataset's images/s, and RSS flat
   from the smallest to the largest set.
2. The linear probe's wall time against the baseline's zero-shot evaluation on the same benchmark (the first
   ``--probe-images`` of those shards, split into validation and test parts as a study splits it, a randomly
   initialised ViT-B-32 on CPU: timing does not depend on the weights): the zero-shot evaluation embeds both parts;
   the probe, fit on the validation part and scored on the test part, reads the features the evaluation cached (what
   the baseline does), and, as a trial with ``evaluation.linear_probe`` does without a frozen image tower, embeds them
   again.

It prints a table and asserts no timing (exit 0).

    python bench/wds_decode.py                        # 1k and 20k images, probe on 300 (about 10 min on 2 cores)
    python bench/wds_decode.py --sizes 500 2000 --probe-images 200    # a few minutes
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_store import PeakAnon, measure, preprocess, status_kb  # noqa: E402 (this folder's helpers)

PER_SHARD = 1000
CLASSES = ["circle", "square", "triangle", "star"]


def make_shards(folder: Path, n: int, size: int = 256) -> None:
    """``n`` smooth JPEG pictures (a gradient and a disc, distinct per index) as ``folder/test/<i>.tar`` shards of
    ``PER_SHARD`` samples (``.jpg`` + ``.cls``), with ``nshards.txt`` and ``classnames.txt``."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    (folder / "test").mkdir(parents=True)
    tar = None
    for i in range(n):
        if i % PER_SHARD == 0:
            if tar is not None:
                tar.close()
            tar = tarfile.open(folder / "test" / f"{i // PER_SHARD}.tar", "w")
        a, b, c = rng.integers(0, 255, 3)
        img = Image.fromarray(np.stack([(x * a // size), (y * b // size), np.full_like(x, c)], -1).astype(np.uint8))
        r = int(rng.integers(10, size // 3))
        cx, cy = rng.integers(r, size - r, 2)
        ImageDraw.Draw(img).ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        buf = io.BytesIO()
        img.save(buf, format="jpeg", quality=90)
        for ext, data in (("jpg", buf.getvalue()), ("cls", str(i % len(CLASSES)).encode())):
            info = tarfile.TarInfo(f"s{i:07d}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tar.close()
    (folder / "test" / "nshards.txt").write_text(str((n + PER_SHARD - 1) // PER_SHARD))
    (folder / "classnames.txt").write_text("\n".join(CLASSES) + "\n")


def one_thread() -> None:
    """Both decode paths on one torch thread, as a DataLoader worker runs (torch sets it so in each worker): on a busy
    machine the per-image tensor ops of several threads wait on each other (webdataset's loop ran 3x slower)."""
    import torch

    torch.set_num_threads(1)


def job_store(folder: Path, out: Path) -> dict:
    import imagehash  # noqa: F401 (imported here, not inside the timing: webdataset's imports are outside it too)

    from study.library.sources import datasets_quiet, load_source
    from study.library.store import build_store

    one_thread()
    datasets_quiet()
    pre = preprocess()
    t0 = time.time()
    with PeakAnon() as anon:
        ds = load_source(str(folder), "test", cache_dir=out)
        read = time.time() - t0
        store, _ = build_store(ds, "image", pre, out / "store", where="bench", progress=False)
    return {"seconds": time.time() - t0, "read_seconds": read, "images": len(store),
            "hwm": status_kb("VmHWM") * 1024, "anon": anon.peak}


def job_webdataset(folder: Path, out: Path) -> dict:
    import webdataset as wds

    one_thread()
    pre = preprocess()
    shards = sorted(str(p) for p in (folder / "test").glob("*.tar"))
    t0 = time.time()
    n, total = 0, 0.0
    with PeakAnon() as anon:
        loop = wds.WebDataset(shards, shardshuffle=False).decode("pil").to_tuple("jpg", "cls").map_tuple(pre, None)
        for image, _ in loop:
            total += float(image[0, 0, 0])  # touch the tensor
            n += 1
    return {"seconds": time.time() - t0, "images": n, "hwm": status_kb("VmHWM") * 1024, "anon": anon.peak}


def probe_rows(folder: Path, out: Path, n: int) -> list[dict]:
    """Zero-shot evaluation of both parts vs the linear probe (cached features; features computed again)."""
    import open_clip
    import torch

    from study.library.benchmarks import spec_from_dict, validation_and_test
    from study.library.cache import FeatureCache
    from study.library.probe import ProbeSettings, probe_metrics
    from study.library.zeroshot import evaluate_sets

    torch.manual_seed(0)
    model, _, pre = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    spec = spec_from_dict({"source": str(folder), "split": f"test[:{n}]", "train_split": False}, "bench", "bench")
    sets = validation_and_test(spec, "specialized", True, out, pre)
    cache = FeatureCache(out / "features", "ViT-B-32 random")
    rows = []
    for name, fn in (
            ("zero-shot evaluation (validation + test parts)",
             lambda: evaluate_sets(model, tokenizer, sets, "cpu", detailed=True, cache=cache, frozen_image=True,
                                   frozen_text=True)),
            ("linear probe, features from the cache (the baseline)",
             lambda: probe_metrics(model, [tuple(sets)], "cpu", cache=cache, frozen=True, settings=ProbeSettings())),
            ("linear probe, features computed (a trial)",
             lambda: probe_metrics(model, [tuple(sets)], "cpu", settings=ProbeSettings()))):
        t0 = time.time()
        fn()
        rows.append({"images": n, "path": name, "seconds": time.time() - t0})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 20000], help="WebDataset sizes (images)")
    p.add_argument("--probe-images", type=int, default=300, help="benchmark size for the probe rows (0: skip)")
    p.add_argument("--workdir", type=Path, help="where to write shards and stores (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = p.parse_args(argv)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-wds-"))
    rows = []
    for n in args.sizes:
        folder, out = root / f"wds-{n}", root / f"out-{n}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        if not folder.exists():
            t0 = time.time()
            make_shards(folder, n)
            print(f"[bench] wrote {n} images in {(n + PER_SHARD - 1) // PER_SHARD} shards in {time.time() - t0:.0f}s",
                  flush=True)
        for name, fn in (("webdataset decode loop", job_webdataset), ("into the study's store", job_store)):
            r = measure(fn, folder, out)
            rows.append({"images": n, "path": name, **r, "per_s": r["images"] / r["seconds"]})
            print(f"[bench] {n:>6} {name:<24} {r['seconds']:7.1f}s  {rows[-1]['per_s']:6.0f} img/s  peak RSS "
                  f"{r['hwm'] / 2**30:5.2f} GiB  peak anonymous {r['anon'] / 2**30:5.2f} GiB", flush=True)
        if n == args.sizes[0] and args.probe_images:
            rows += probe_rows(folder, out, min(args.probe_images, n))
        shutil.rmtree(out, ignore_errors=True)
    print("\n| images | path | seconds | img/s | ratio | peak RSS (GiB) | peak anonymous RSS (GiB) |\n"
          "|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        base = next((b for b in rows if b["images"] == r["images"] and b["path"] == "webdataset decode loop"), None)
        if "per_s" in r:
            ratio = r["per_s"] / base["per_s"]
            read = f" (of which {r['read_seconds']:.1f} s reading the shards)" if "read_seconds" in r else ""
            print(f"| {r['images']} | {r['path']}{read} | {r['seconds']:.1f} | {r['per_s']:.0f} | {ratio:.2f}x | "
                  f"{r['hwm'] / 2**30:.2f} | {r['anon'] / 2**30:.2f} |")
        else:
            zs = next(b for b in rows if b["path"].startswith("zero-shot"))
            print(f"| {r['images']} | {r['path']} | {r['seconds']:.1f} | | {r['seconds'] / zs['seconds']:.2f}x of "
                  f"zero-shot | | |")
    for name in ("webdataset decode loop", "into the study's store"):
        sel = [r for r in rows if r["path"] == name]
        if len(sel) > 1:
            print(f"{name}: peak RSS {sel[0]['hwm'] / 2**30:.2f} -> {sel[-1]['hwm'] / 2**30:.2f} GiB, peak anonymous "
                  f"{sel[0]['anon'] / 2**30:.2f} -> {sel[-1]['anon'] / 2**30:.2f} GiB from {sel[0]['images']} to "
                  f"{sel[-1]['images']} images")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
