"""Two Ray Train workers (DDP over gloo) train exactly what one worker trains."""

from __future__ import annotations

import torch

from study.config import TrialSettings
from study.train_loop import WorkerJob, train_fn_per_worker


def _fit(ray_local, job: WorkerJob, workers: int, storage) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_fn_per_worker, train_loop_config=job.model_dump(),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"w{workers}", storage_path=str(storage)))
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = torch.load(f"{d}/state.pt", weights_only=True)
    return state["trainable"], result.metrics


def test_two_gloo_workers_match_one(ray_local, smoke_world, smoke_cache, tmp_path):
    cfg, _, prepared = smoke_world
    settings = TrialSettings(learning_rate=3e-3, lora_rank=2, data_fraction=0.5, epochs=1, batch_size=32,
                             tether_weight=0.6, warmup_steps=0)
    job = WorkerJob(settings=settings, data=cfg.data, model_name=cfg.model.name,
                    model_pretrained=prepared.model_pretrained, cache_dir=str(smoke_cache))
    one, m1 = _fit(ray_local, job, 1, tmp_path)
    two, m2 = _fit(ray_local, job, 2, tmp_path)
    assert m1["steps"] == m2["steps"] > 1
    assert one.keys() == two.keys() and any("lora_B" in k for k in one)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    # ...and training did move the weights, so the comparison is not vacuous.
    assert any(t.abs().max() > 1e-4 for k, t in one.items() if "lora_B" in k)
    assert abs(m1["train_loss"] - m2["train_loss"]) < 1e-4
    assert m1["specialized_top1"] == m2["specialized_top1"]
