"""The linear-probe ceiling: within 1 point of CLIP_benchmark's own ``linear_probe.evaluate`` on the same features.

Settings matched to CLIP_benchmark's (its ``cli.py`` defaults): learning rate 0.1 (``--fewshot_lr``), 10 epochs
(``--fewshot_epochs``), batch size 64, ``fewshot_k = -1`` (all of the fitting data), features already L2-normalized
(``normalize=True``), AMP off, seed 0, its weight-decay grid and search scored by top-1 (our ``select="top1"``; the
study itself selects by its headline metric), a validation split given, and the final probe refit on fit + validation.
Both see the same fitting / validation division: ours (a seeded, stratified 20% of the fitting data) is handed to
CLIP_benchmark as its ``train`` and ``val`` features. What differs is only the random initialisation and batch order.

CLIP_benchmark's probe asserts ``device == "cuda"`` and calls ``.cuda()``; on this CPU machine the test runs it with
``.cuda()`` and ``.to("cuda")`` as no-ops (its ``DataParallel`` then calls the module directly, and its autocast is
off), and with its ``accuracy`` under numpy >= 2.4 as in test_parity.py. Everything else is its code.

The features are fixed and seeded: a 10-class Gaussian mixture on the unit sphere of R^64 (2,000 fitting and 1,000
test points, so 1 point is 10 test images), hard enough that the search chooses a weight decay inside the grid.
CLIP_benchmark's side runs on one thread, as ours does (many threads make its tiny steps 20x slower on a busy
machine).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from study.library.probe import WEIGHT_DECAYS, ProbeSettings, linear_probe
from study.library.rows import stratified_split


def mixture(n: int, seed: int, classes: int = 10, dim: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)  # the same class centres for every draw
    centres = F.normalize(torch.randn(classes, dim, generator=gen), dim=-1)
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = centres[y] + 0.5 * torch.randn(n, dim, generator=gen)
    return F.normalize(x, dim=-1), y


@pytest.fixture
def clip_benchmark_lp(monkeypatch):
    import clip_benchmark.metrics.linear_probe as lp

    def accuracy(output, target, topk=(1,)):  # its arithmetic, taking the one element with [0] (numpy >= 2.4)
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [float(correct[:k].reshape(-1).float().sum(0, keepdim=True).cpu().numpy()[0]) / len(target)
                for k in topk]

    to = torch.Tensor.to

    def to_cpu(self, *args, **kwargs):
        return to(self, *("cpu" if a == "cuda" else a for a in args), **kwargs)

    monkeypatch.setattr(lp, "accuracy", accuracy)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.Tensor, "to", to_cpu)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield lp
    torch.set_num_threads(threads)


def test_the_probe_is_within_one_point_of_clip_benchmarks(clip_benchmark_lp, tmp_path):
    train_x, train_y = mixture(2000, seed=1)
    test_x, test_y = mixture(1000, seed=2)
    s = ProbeSettings(select="top1", seed=0)
    ours = linear_probe(train_x, train_y, test_x, test_y, 10, s)

    val, fit = stratified_split(train_y, s.val_share, s.seed)  # the division ours made, handed to CLIP_benchmark
    folder = tmp_path / "features" / "model"
    folder.mkdir(parents=True)
    for part, (x, y) in {"train": (train_x[fit], train_y[fit]), "val": (train_x[val], train_y[val]),
                         "test": (test_x, test_y)}.items():
        torch.save(x, folder / f"features_{part}.pt")
        torch.save(y, folder / f"targets_{part}.pt")
    torch.manual_seed(0)
    theirs = clip_benchmark_lp.evaluate(None, None, None, fewshot_k=-1, batch_size=64, num_workers=0, lr=0.1,
                                        epochs=10, model_id="model", seed=0, feature_root=str(tmp_path / "features"),
                                        device="cuda", val_dataloader=[], normalize=True, amp=False)
    print(f"\nlinear probe test top-1: ours {ours['top1']:.2%} (weight decay {ours['weight_decay']:.3g}), "
          f"CLIP_benchmark {theirs['lp_acc1']:.2%} (weight decay {theirs['weight_decay']:.3g}); balanced accuracy "
          f"ours {ours['balanced_accuracy']:.2%}, CLIP_benchmark {theirs['lp_mean_per_class_recall']:.2%}")
    assert abs(ours["top1"] - theirs["lp_acc1"]) <= 0.01
    assert abs(ours["balanced_accuracy"] - theirs["lp_mean_per_class_recall"]) <= 0.01
    assert 0.3 < ours["top1"] < 0.95 and ours["weight_decay"] > WEIGHT_DECAYS[0]  # the search had something to do
    assert ours["train_images"] == 2000 and ours["top1_ci_low"] <= ours["top1"] <= ours["top1_ci_high"]


def test_the_search_walks_clip_benchmarks_grid_and_leaves_the_global_random_state_alone():
    x, y = mixture(300, seed=3)
    state = torch.random.get_rng_state()
    out = linear_probe(x, y, x, y, 10, ProbeSettings(seed=5))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert out["weight_decay"] in WEIGHT_DECAYS and len(WEIGHT_DECAYS) == 97
    assert linear_probe(x, y, x, y, 10, ProbeSettings(seed=5)) == out  # seeded
    assert np.isclose(WEIGHT_DECAYS[0], 1e-6) and np.isclose(WEIGHT_DECAYS[-1], 100)
