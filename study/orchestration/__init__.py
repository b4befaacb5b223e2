"""The orchestration layer: preparing a study, the Ray Tune and Ray Train wiring, the worker loop, MLflow
tracking, seed replicates, the summary and the study runner. Built on :mod:`study.library`."""
