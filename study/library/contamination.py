"""The contamination check: benchmark images that also sit in the fine-tuning set.

Every decoded image carries two hashes (:mod:`study.library.store`): SHA-1 of its decoded pixels (exact
copies, whatever the file format) and its perceptual hash (pHash, from ``imagehash``; the same picture
re-encoded or resized). A benchmark image overlaps when either hash is among the fine-tuning images'.
"""

from __future__ import annotations

from .sources import DataError


def overlap(finetune_store, bench_store) -> dict[str, int]:
    """``{"exact": n, "perceptual": m, "images": k}``: benchmark images with the same pixels as a fine-tuning
    image, with the same perceptual hash, and with either (``k``, the count the check uses)."""
    sha, ph = set(finetune_store.column("sha1").tolist()), set(finetune_store.column("phash").tolist())
    b_sha, b_ph = bench_store.column("sha1").tolist(), bench_store.column("phash").tolist()
    exact = [s in sha for s in b_sha]
    near = [p in ph for p in b_ph]
    return {"exact": sum(exact), "perceptual": sum(near), "images": sum(a or b for a, b in zip(exact, near))}


def check_overlap(finetune_store, benchmarks: dict[str, object], max_overlap: int) -> dict[str, dict[str, int]]:
    """:func:`overlap` for every ``{"data.<role> '<name>'": store}``; raises :class:`DataError` naming the
    first benchmark with more than ``max_overlap`` shared images."""
    counts = {where: overlap(finetune_store, store) for where, store in benchmarks.items()}
    for where, c in counts.items():
        if c["images"] > max_overlap:
            raise DataError(f"data.max_overlap: {c['images']} images of benchmark {where} are also in data.finetune "
                            f"({c['exact']} identical, {c['perceptual']} with the same perceptual hash; max_overlap "
                            f"{max_overlap}); hold them out (holdout: {{share, take}}) or raise data.max_overlap")
    return counts
