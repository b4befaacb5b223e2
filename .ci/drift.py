"""Which installed packages differ from the lock: run with the interpreter of the environment to compare.

    python .ci/drift.py .ci/requirements.lock

Prints the study's main packages first (the lock's version -> the installed one), then every other difference, and
exits 0: it reports, it does not judge. CI's last stage uses it on an install made without the lock.
"""

from __future__ import annotations

import importlib.metadata
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

MAIN = ["torch", "torchvision", "ray", "optuna", "mlflow", "open-clip-torch", "peft", "datasets", "numpy"]


def locked(path: str) -> dict[str, str]:
    """``{name: version}`` the lock pins for this interpreter (markers evaluated here)."""
    out, entry = {}, ""
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("--hash"):
            continue
        entry = line.rstrip("\\").strip()
        req = Requirement(entry)
        if req.marker is None or req.marker.evaluate():
            out[canonicalize_name(req.name)] = next(iter(req.specifier)).version
    return out


def main(path: str) -> None:
    lock = locked(path)
    here = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    for tool in ("clip-alignment-study", "pip", "setuptools", "wheel"):  # the project itself and the installers
        here.pop(tool, None), lock.pop(tool, None)
    changed = {n: (lock.get(n, "-"), here.get(n, "-")) for n in sorted(set(lock) | set(here))
               if lock.get(n) != here.get(n)}
    print("main packages (lock -> installed): " + ", ".join(
        f"{n} {lock.get(n, '-')}" + ("" if n not in changed else f" -> {here.get(n, '-')}") for n in MAIN))
    others = [f"{n} {a} -> {b}" for n, (a, b) in changed.items() if n not in MAIN]
    print(f"{len(changed)} package(s) differ from {path}" + (": " + ", ".join(others) if others else ""))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".ci/requirements.lock")
