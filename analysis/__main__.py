"""``python -m analysis``: the trade-off map and written finding of a study, read from MLflow;
``python -m analysis compare``: several studies in one table (:mod:`analysis.compare`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from study.checks import Parser, check_folder, existing_store
from study.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m analysis",
        description="Read a study's runs from MLflow (never re-running or changing them) and write the trial "
                    "table (CSV), the trade-off map and other plots, and a short Markdown finding. Everything is "
                    "also attached to the sweep's parent run under analysis/.",
        epilog="Several sweeps in one table and one figure: python -m analysis compare SWEEP [SWEEP ...] "
               "(python -m analysis compare --help).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--experiment", default="clip-alignment-study", help="MLflow experiment (= study name)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking URI (env MLFLOW_TRACKING_URI); default sqlite:///mlflow.db here")
    p.add_argument("--parent-run", help="the sweep's parent run id (default: the experiment's latest sweep "
                   "that is not a --smoke-test's, if it holds one)")
    p.add_argument("--out", type=Path, default=Path("analysis_out"), help="local folder for the report")
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit 0 with the report written; 2 on bad input (one ``error:`` line, nothing written). ``compare`` as the
    first argument runs :mod:`analysis.compare` on the rest."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        from .compare import main as compare

        return compare(argv[1:])
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # it reads a small file per trial
    try:
        args = build_parser().parse_args(argv)
        uri = existing_store(args.tracking_uri)
        out = check_folder(args.out, "--out")
        from study.tracking import read_sweep

        from .report import run_analysis

        report, lines = run_analysis(read_sweep(uri, args.experiment, args.parent_run), out)
    except (ConfigError, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(["Finding:"] + [f"  - {s}" for s in lines] + [f"report: {report}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
