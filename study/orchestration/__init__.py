"""The orchestration layer, built on :mod:`study.library`: :class:`~study.orchestration.sweep.Sweep` owns a sweep
(its state, its Tune parts, replicates, annotations, summary and report); around it the preparation before Ray
starts, the Ray Tune and Ray Train wiring, the runner each trial trains on, and the worker loop. MLflow is written
and read through :mod:`study.tracking`."""
