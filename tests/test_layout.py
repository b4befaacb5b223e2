"""The architecture holds: two layers, no import circle, short functions, one vocabulary."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("study", "analysis")
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out[name] = path
    return out


def internal_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules ``name`` imports anywhere in its body (function-level imports count too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found |= {c for c in [target, *(f"{target}.{a.name}" for a in node.names)] if c in known}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: internal_imports(name, path, set(mods)) for name, path in mods.items()}


LIBRARY = [m for m in modules() if m.startswith("study.library.")] + [
    "study.settings", "study.vocabulary", "study.selection", "study.config"]


def test_library_layer_never_imports_ray_mlflow_or_optuna():
    # A fresh interpreter, so nothing another test imported can hide an import.
    code = ("import importlib, json, sys\n"
            f"for m in {LIBRARY!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(k for k in ('ray', 'mlflow', 'optuna') if k in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    assert len(LIBRARY) >= 14  # every library module was imported, not an empty list


def test_no_library_function_imports_ray_mlflow_or_optuna_either():
    """The fresh-interpreter test sees module-level imports; this one reads every import statement, those
    inside functions too."""
    for name, path in modules().items():
        if name not in LIBRARY:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad = [n for n in names if n.split(".")[0] in ("ray", "mlflow", "optuna")]
            assert not bad, f"{name} imports {bad}"


def test_analysis_reads_the_vocabulary_never_the_orchestration():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("analysis"):
            assert not {d for d in deps if d.startswith("study.orchestration")}, name


def test_the_library_takes_typed_arguments_and_imports_nothing_above_it():
    """``study.library`` imports neither the config, MLflow's records nor the orchestration: what it needs comes in
    as typed arguments (``TrialSettings`` from :mod:`study.settings`, which has no project imports)."""
    graph = import_graph()
    above = ("study.orchestration", "study.config", "study.tracking", "study.run", "study.export", "analysis")
    for name, deps in graph.items():
        if name.startswith("study.library"):
            assert not {d for d in deps if d.startswith(above)}, name
    assert graph["study.settings"] == set()


def test_no_module_imports_another_modules_private_names():
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(PACKAGES)):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{name} imports {private} from {node.module or '.'}"


def test_no_import_circle():
    graph = import_graph()
    state: dict[str, int] = {}

    def visit(node, path):
        if state.get(node) == 1:
            pytest.fail("import circle: " + " -> ".join(path[path.index(node):] + [node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for dep in sorted(graph[node]):
            visit(dep, path + [node])
        state[node] = 2

    for node in graph:
        visit(node, [])
    assert len(graph) > 20


def test_no_function_is_longer_than_sixty_lines():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, long


def test_every_knob_is_in_the_vocabulary_and_in_the_analysis():
    from analysis.records import METRICS
    from study.vocabulary import NUMERIC_KNOBS

    assert {"lora_alpha", "warmup_steps", "tether_weight", "learning_rate", "lora_rank"} <= set(NUMERIC_KNOBS)
    assert not {"lora_targets", "lora_towers", "train_projections"} & set(NUMERIC_KNOBS)
    assert {"specialized_top1", "general_top1", "weight_change_norm"} <= set(METRICS)
