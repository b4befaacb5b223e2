"""Memory and throughput of the data path: the on-disk image store against a plain ``datasets.map`` decode.

For generated fine-tuning sets of 1k, 10k and 50k JPEG images (224 px), with ViT-B-32's preprocessing:

* ``store build`` - the driver building the store (:func:`study.library.store.build_store`);
* ``store epoch`` - a worker reading one epoch from it in shuffled batches of 256, as training does;
* ``datasets.map`` - the plain way: ``ds.map`` to float32 ``pixel_values``, written to an Arrow cache file.

Each measurement runs in its own process. Peak RSS is read from ``/proc/self/status``: ``VmHWM`` (all resident
pages, including those of memory-mapped files and shared libraries) and the peak of ``RssAnon`` (the process's
own memory). The goal: both grow by <= 1 GB from the smallest to the largest set; the exit status is 1 when not.

    python bench/data_store.py                 # 1k, 10k, 50k (about 25 min on 2 cores; 1.5 GB of disk per 10k)
    python bench/data_store.py --quick         # 1k and 4k only (about 2 min)
    python bench/data_store.py --sizes 1000 20000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import tempfile
import threading
import time
from pathlib import Path

GOAL_GB = 1.0


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class PeakAnon:
    """Samples ``RssAnon`` every 20 ms in a thread; ``peak`` in bytes."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, status_kb("RssAnon") * 1024)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, status_kb("RssAnon") * 1024)


def make_images(folder: Path, n: int, size: int = 224) -> None:
    """``n`` smooth JPEG pictures (a gradient and a disc, distinct per index) in 4 class folders."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    for i in range(n):
        d = folder / f"class{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        a, b, c = rng.integers(0, 255, 3)
        arr = np.stack([(x * a // size), (y * b // size), np.full_like(x, c)], -1).astype(np.uint8)
        img = Image.fromarray(arr)
        r = int(rng.integers(10, size // 3))
        cx, cy = rng.integers(r, size - r, 2)
        ImageDraw.Draw(img).ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        img.save(d / f"{i}.jpg", quality=90)


def preprocess():
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return open_clip.image_transform(224, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)


def _source(folder: Path):
    from study.library.sources import load_source

    return load_source(str(folder), "train", cache_dir=folder.parent)


def job_build(folder: Path, out: Path) -> dict:
    from study.library.store import build_store

    ds, pre = _source(folder), preprocess()
    t0 = time.time()
    with PeakAnon() as anon:
        store, _ = build_store(ds, "image", pre, out / "store", where="bench", progress=False)
    return {"seconds": time.time() - t0, "images": len(store), "hwm": status_kb("VmHWM") * 1024, "anon": anon.peak}


def job_epoch(folder: Path, out: Path) -> dict:
    import torch

    from study.library.store import ImageStore

    store = ImageStore(out / "store", preprocess())
    t0 = time.time()
    with PeakAnon() as anon:
        perm = torch.randperm(len(store), generator=torch.Generator().manual_seed(0))
        total = 0.0
        for i in range(0, len(store), 256):
            total += float(store[perm[i:i + 256]].mean())
    return {"seconds": time.time() - t0, "images": len(store), "hwm": status_kb("VmHWM") * 1024, "anon": anon.peak}


def job_map(folder: Path, out: Path) -> dict:
    import numpy as np

    ds, pre = _source(folder), preprocess()
    t0 = time.time()
    with PeakAnon() as anon:
        done = ds.map(lambda b: {"pixel_values": [np.asarray(pre(im.convert("RGB"))) for im in b["image"]]},
                      batched=True, batch_size=64, writer_batch_size=64, remove_columns=["image"],
                      cache_file_name=str(out / "map.arrow"))
    return {"seconds": time.time() - t0, "images": len(done), "hwm": status_kb("VmHWM") * 1024, "anon": anon.peak}


def _child(fn, folder, out, q):
    q.put(fn(folder, out))


def measure(fn, folder: Path, out: Path) -> dict:
    q = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=_child, args=(fn, folder, out, q))
    p.start()
    result = q.get()
    p.join()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000], help="fine-tuning set sizes")
    p.add_argument("--quick", action="store_true", help="sizes 1000 and 4000 only (CI)")
    p.add_argument("--map-max", type=int, default=10000,
                   help="run the datasets.map comparison up to this size (its float32 cache takes 0.6 MB per image)")
    p.add_argument("--workdir", type=Path, help="where to write images and stores (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="also write the table as JSON")
    args = p.parse_args(argv)
    sizes = [1000, 4000] if args.quick else args.sizes
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-data-"))
    rows = []
    for n in sizes:
        folder, out = root / f"images-{n}", root / f"out-{n}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        if not folder.exists():
            t0 = time.time()
            make_images(folder, n)
            print(f"[bench] generated {n} images in {time.time() - t0:.0f}s", flush=True)
        jobs = [("store build", job_build), ("store epoch", job_epoch)] + ([("datasets.map", job_map)] if n <= args.map_max else [])
        for name, fn in jobs:
            r = measure(fn, folder, out)
            rows.append({"images": n, "path": name, **r, "per_s": r["images"] / r["seconds"]})
            print(f"[bench] {n:>6} {name:<12} {r['seconds']:7.1f}s  {rows[-1]['per_s']:7.0f} img/s  peak RSS "
                  f"{r['hwm'] / 2**30:5.2f} GiB  peak anonymous {r['anon'] / 2**30:5.2f} GiB", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    print("\n| images | path | img/s | peak RSS (GiB) | peak anonymous RSS (GiB) |\n|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['images']} | {r['path']} | {r['per_s']:.0f} | {r['hwm'] / 2**30:.2f} | {r['anon'] / 2**30:.2f} |")
    ok = True
    for name in ("store build", "store epoch"):
        sel = [r for r in rows if r["path"] == name]
        for what, label in (("hwm", "peak RSS"), ("anon", "peak anonymous RSS")):
            grow = (sel[-1][what] - sel[0][what]) / 2**30
            ok &= grow <= GOAL_GB
            print(f"{name}: {label} grows {grow:+.2f} GiB from {sel[0]['images']} to {sel[-1]['images']} images "
                  f"(goal <= {GOAL_GB} GiB): {'ok' if grow <= GOAL_GB else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
