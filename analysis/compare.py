"""``python -m analysis compare``: several studies in one table and one figure, the paper's table.

Each sweep is read once with :func:`study.tracking.read_sweep` (from its own tracking store) and turned into its
report's headline row (:func:`analysis.headline.headline_row`), so every number in the comparison is the number in
that sweep's own report. Writes ``compare.md``, ``compare.csv`` and ``compare.tex`` (one row per sweep: study,
model and fine-tuning set; the baseline of both roles; the best gain and the general change with their paired 95%
intervals; each method's exchange rate) and ``fronts.png`` (every study's Pareto front on one trade-off map), and
notes where the sweeps ran under different versions of the packages that move numbers.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pandas as pd

from study.checks import Parser, check_folder, existing_store
from study.config import ConfigError
from study.vocabulary import RUN_NAME_TAG

from .headline import headline_row, latex_table, markdown_table, version_notes
from .records import StudyRecords, pareto_mask, study_records

STORE_SEPARATOR = "::"  # URI::NAME; experiment names and run ids never hold a colon
RUN_ID = re.compile(r"[0-9a-f]{32}")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m analysis compare",
        description="Put several sweeps in one table (Markdown, CSV, LaTeX) and one figure of their trade-off fronts, "
                    "each number as that sweep's own report gives it; only reads MLflow.",
        epilog="example: python -m analysis compare clip-alignment-study "
               "sqlite:///runs/methods/mlflow.db::clip-alignment-methods --out paper/",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("sweeps", nargs="+", metavar="SWEEP",
                   help="an experiment name (its latest sweep, not a --smoke-test's) or a sweep's parent run id, "
                        "optionally with its own tracking store in front: URI::NAME "
                        "(e.g. sqlite:///other/mlflow.db::clip-methods)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="the store of every SWEEP given without URI:: (env MLFLOW_TRACKING_URI; default "
                        "sqlite:///mlflow.db here)")
    p.add_argument("--out", type=Path, default=Path("analysis_out") / "compare",
                   help="folder for compare.md, compare.csv, compare.tex and fronts.png")
    return p


def read_sweeps(refs: list[str], default_uri: str | None):
    """Each ``SWEEP`` argument as a :class:`~study.tracking.SweepRecord`, read from its store. Raises
    :class:`ConfigError` naming the argument."""
    from study.tracking import read_sweep, sweep_experiment

    out = []
    for ref in refs:
        where, sep, name = ref.rpartition(STORE_SEPARATOR)
        flag = f"SWEEP {ref!r}"
        uri = existing_store(where, flag) if sep else existing_store(default_uri)
        try:
            try:
                out.append(read_sweep(uri, name))
            except LookupError:
                if not RUN_ID.fullmatch(name):
                    raise LookupError(f"no MLflow experiment named {name!r} (nor a sweep run id) at {uri}") from None
                out.append(read_sweep(uri, sweep_experiment(uri, name), name))
        except LookupError as exc:
            raise ConfigError(f"{flag}: {str(exc).removeprefix('--experiment: ').removeprefix('--parent-run: ')}") \
                from None
    return out


def fronts(recs: list[StudyRecords], out: Path) -> Path:
    """Every study's Pareto front of specialized gain vs general change (each in its own headline metric, test
    part, points against its own baseline) on one trade-off map; each study's trials as faint points."""
    from .plots import plt, save

    fig, ax = plt.subplots(figsize=(7.5, 6.3))
    ax.axhline(0, color="0.6", lw=0.8)
    ax.axvline(0, color="0.6", lw=0.8)
    ax.scatter([0], [0], marker="*", s=260, color="black", zorder=5, label="each study's baseline")
    for i, rec in enumerate(recs):
        df = rec.trials
        if not len(df):
            continue
        colour = f"C{i}"
        ax.scatter(df["specialized_gain_pts"], df["general_change_pts"], color=colour, alpha=0.3, s=25, zorder=3)
        front = df[pareto_mask(df)].sort_values("specialized_gain_pts")
        ax.plot(front["specialized_gain_pts"], front["general_change_pts"], "-o", color=colour, lw=1.5, zorder=4,
                label=f"{label(rec)}: front of {len(front)} of {len(df)} trials ({rec.headline.replace('_', ' ')})")
    ax.set_xlabel("specialized zero-shot gain vs baseline (points, test part, each study's headline metric)")
    ax.set_ylabel("general zero-shot change vs baseline (points, test part)")
    ax.set_title("Trade-off fronts of the compared studies")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1, fontsize=8, frameon=False)
    return save(fig, out / "fronts.png")


def label(rec: StudyRecords) -> str:
    """A study as the table names it: its experiment, and its sweep's run name when it has one."""
    sweep = rec.sweep.tags.get(RUN_NAME_TAG, "") if rec.sweep else ""
    return f"{rec.experiment} ({sweep})" if sweep else rec.experiment


def write(recs: list[StudyRecords], out: Path) -> tuple[list[dict], list[str], list[Path]]:
    """Write the table (``compare.md``/``.csv``/``.tex``) and ``fronts.png`` under ``out``; returns the rows, the
    notes (software versions that differ between sweeps, and within one) and the files written."""
    from .report import mixed_versions_sentences

    rows = [headline_row(r) for r in recs]
    notes = version_notes([(label(r), r.versions) for r in recs])
    notes += [f"{label(r)}: {s}" for r in recs for s in mixed_versions_sentences(r.versions)]
    out.mkdir(parents=True, exist_ok=True)
    md = ["# Studies compared", "", "Test part; each study in its own headline metric, against its own zero-shot "
          "baseline; the best trial is chosen on validation by each study's first objective. Exchange rate: general "
          "points lost per point of specialized gain over each method's trials and their WiSE-FT curves (bootstrap "
          "95% interval over trials).", "", markdown_table(rows), ""]
    md += [f"**Note.** {n}" for n in notes]
    paths = [out / "compare.md", out / "compare.csv", out / "compare.tex"]
    paths[0].write_text("\n".join(md) + "\n")
    pd.DataFrame(rows).to_csv(paths[1], index=False)
    paths[2].write_text(latex_table(rows))
    paths.append(fronts(recs, out))
    return rows, notes, paths


def main(argv: list[str] | None = None) -> int:
    """Exit 0 with the comparison written; 2 on bad input (one ``error:`` line, nothing written)."""
    import sys

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        args = build_parser().parse_args(argv)
        out = check_folder(args.out, "--out")
        sweeps = read_sweeps(args.sweeps, args.tracking_uri)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows, notes, paths = write([study_records(s) for s in sweeps], out)
    print(markdown_table(rows))
    for n in notes:
        print(f"note: {n}")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
