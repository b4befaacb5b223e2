"""The library layer: model loading, the alignment module, WiSE-FT, losses and schedule, data sources,
benchmarks, zero-shot metrics and caches.

It imports torch, open_clip, peft and datasets, and never ray, mlflow or optuna
(``tests/test_layout.py`` enforces it), so every piece runs and tests without a
cluster or a tracking server.
"""
