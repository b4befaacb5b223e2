"""The trade-off map, drawn from the trial table alone (nothing is re-run)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from study.vocabulary import metric_words  # noqa: E402

from .records import StudyRecords, pareto_mask, searched_knobs  # noqa: E402

DPI = 130


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def tradeoff_map(rec: StudyRecords, out: Path) -> Path:
    """Specialized gain vs general change of the headline metric per trial (test part), with each change's
    paired 95% interval on both axes; the chosen trial labelled; the Pareto front joined; the baseline at
    the origin; a key for the marker size (LoRA rank)."""
    from .records import best_row

    df, head = rec.trials, metric_words(rec.headline)
    fig, ax = plt.subplots(figsize=(7.5, 6.3))
    ax.axhline(0, color="0.6", lw=0.8)
    ax.axvline(0, color="0.6", lw=0.8)
    ax.scatter([0], [0], marker="*", s=260, color="black", zorder=5, label="baseline (zero-shot base model)")
    if len(df):
        x, y = df["specialized_gain_pts"], df["general_change_pts"]
        # A percentile interval can miss its own point estimate by a hair; matplotlib refuses negative bars.
        xerr = np.clip(np.vstack([x - df["specialized_gain_ci_low_pts"], df["specialized_gain_ci_high_pts"] - x]), 0, None)
        yerr = np.clip(np.vstack([y - df["general_change_ci_low_pts"], df["general_change_ci_high_pts"] - y]), 0, None)
        if np.isfinite(xerr).any():
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="none", ecolor="0.6", lw=0.8, zorder=2,
                        label="paired 95% CI of each change")
        lr = pd.to_numeric(df["learning_rate"], errors="coerce")
        size = lambda r: 40 + 12 * r  # noqa: E731
        sc = ax.scatter(x, y, c=np.log10(lr), cmap="viridis", edgecolor="black", linewidth=0.6, zorder=4,
                        s=size(pd.to_numeric(df["lora_rank"], errors="coerce").fillna(1)))
        fig.colorbar(sc, ax=ax, label="log10 learning rate")
        for r in sorted(pd.to_numeric(df["lora_rank"], errors="coerce").dropna().unique()):
            ax.scatter([], [], s=size(r), color="white", edgecolor="black", label=f"LoRA rank {int(r)}")
        front = df[pareto_mask(df)].sort_values("specialized_gain_pts")
        ax.plot(front["specialized_gain_pts"], front["general_change_pts"], "--", color="crimson", lw=1.5, zorder=3,
                label=f"Pareto front ({len(front)} trials)")
        best = best_row(rec)
        ax.annotate(f"chosen on validation: {best['trial_id']}", (best["specialized_gain_pts"], best["general_change_pts"]),
                    xytext=(8, 8), textcoords="offset points", fontsize=8, zorder=6,
                    arrowprops={"arrowstyle": "-", "color": "black", "lw": 0.6})
    ax.set_xlabel(f"specialized zero-shot {head} gain vs baseline (points, test part)")
    ax.set_ylabel(f"general zero-shot {head} change vs baseline (points, test part)")
    ax.set_title(f"{rec.experiment}: specialized gain vs general cost")
    # Below the axes, so that it never hides a trial.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=8, frameon=False)
    return _save(fig, out / "tradeoff_map.png")


def accuracy_vs_intensity(rec: StudyRecords, out: Path) -> Path:
    """Each accuracy against ‖ΔW‖, with the baseline as a dashed line."""
    df = rec.trials
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True)
    for ax, bench, color in zip(axes, ("specialized", "general"), ("tab:blue", "tab:orange")):
        ax.scatter(df["weight_change_norm"], df[f"{bench}_top1"] * 100, color=color, edgecolor="black", lw=0.5)
        base = rec.baseline.get(f"{bench}_top1")
        if base is not None:
            ax.axhline(base * 100, ls="--", color="black", lw=1, label=f"baseline {base:.1%}")
            ax.legend(fontsize=8)
        ax.set_xlabel("fine-tuning intensity ‖ΔW‖ (Frobenius norm of the weight change)")
        ax.set_ylabel(f"{bench} zero-shot top-1 (%)")
        ax.set_title(f"{bench} accuracy vs intensity")
    return _save(fig, out / "accuracy_vs_intensity.png")


KNOB_LABELS = {"learning_rate": "learning rate (log scale)", "lora_rank": "LoRA rank r",
               "data_fraction": "data fraction (share of fine-tuning pairs)",
               "shots_per_class": "shots per class k (log scale)",
               "tether_weight": "tether weight λ (MoCLIP)", "lora_blocks": "LoRA blocks K (last K per tower)",
               "lora_alpha": "LoRA alpha", "weight_decay": "weight decay", "warmup_steps": "warmup steps"}


LOG_KNOBS = ("learning_rate", "shots_per_class")  # drawn on a log axis: the field reports k-shot as 1, 2, 4, 8, 16


def marginals(rec: StudyRecords, out: Path) -> Path:
    """Gain and cost along every searched knob (points, plus the mean per level/bin)."""
    df = rec.trials
    knobs = searched_knobs(df) or ["learning_rate", "lora_rank", "data_fraction"]
    fig, axes = plt.subplots(2, len(knobs), figsize=(4 * len(knobs), 6.5), sharey="row", squeeze=False)
    for col, knob in enumerate(knobs):
        x = pd.to_numeric(df[knob], errors="coerce")
        for row, (metric, name, color) in enumerate((("specialized_gain_pts", "specialized gain (points)", "tab:blue"),
                                                     ("general_change_pts", "general change (points)", "tab:orange"))):
            ax = axes[row, col]
            ax.scatter(x, df[metric], color=color, edgecolor="black", lw=0.5, s=30)
            levels = level_means(x, df[metric])
            if len(levels) > 1:
                ax.plot(levels.index, levels.values, "-", color="black", lw=1.2, label="mean per level/bin")
                ax.legend(fontsize=7)
            ax.axhline(0, color="0.6", lw=0.8)
            if knob in LOG_KNOBS and (x > 0).any() and df[metric].notna().any():
                ax.set_xscale("log")  # (no finished trial: nothing to place on a log axis)
                if knob == "shots_per_class":  # k = 1, 2, 4, 8, 16 as the field tabulates them
                    ax.set_xticks(sorted(x.dropna().unique()), [f"{k:g}" for k in sorted(x.dropna().unique())])
                    ax.minorticks_off()
            elif x.nunique() <= 8 and (x.dropna() == x.dropna().round()).all():  # integer levels: tick each
                ax.set_xticks(sorted(x.dropna().unique()))
            ax.set_xlabel(KNOB_LABELS.get(knob, knob))
            if col == 0:
                ax.set_ylabel(name)
    fig.suptitle("marginal effect of each searched knob (other knobs vary too: read as trends, not causal effects)",
                 fontsize=10)
    return _save(fig, out / "marginals.png")


def level_means(x: pd.Series, y: pd.Series, agg: str = "mean") -> pd.Series:
    """``agg`` (mean or count) of ``y`` per distinct ``x`` (few levels) or per quartile bin of ``x``."""
    ok = x.notna() & y.notna()
    x, y = x[ok], y[ok]
    if x.nunique() <= 4:
        return y.groupby(x).agg(agg).sort_index()
    bins = pd.qcut(x, q=min(4, x.nunique()), duplicates="drop")
    values = y.groupby(bins, observed=True).agg(agg)
    centres = x.groupby(bins, observed=True).median()
    return pd.Series(values.values, index=centres.values).sort_index()


def importances_plot(importances: dict, out: Path) -> Path | None:
    if not importances:
        return None
    fig, axes = plt.subplots(1, len(importances), figsize=(5 * len(importances), 3.6))
    axes = np.atleast_1d(axes)
    for ax, (target, imp) in zip(axes, importances.items()):
        names = list(imp)[::-1]
        ax.barh(names, [imp[n] for n in names], color="tab:green")
        ax.set_xlabel("importance (fANOVA, share of variance)")
        ax.set_title(f"for {target}")
    return _save(fig, out / "importances.png")


def wiseft_curves(rec: StudyRecords, trial_ids: list[str], out: Path) -> Path | None:
    """Validation top-1 of specialized vs general as each trial's change is scaled by α (WiSE-FT); every α
    marked, the baseline at α = 0."""
    curves = {t: rec.wiseft[t] for t in trial_ids if t in rec.wiseft}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for t, pts in curves.items():
        a, s, g = zip(*pts)
        line, = ax.plot(np.array(s) * 100, np.array(g) * 100, "-o", label=f"{t} (α = 0 → 1)")
        for alpha, sx, gy in pts:
            ax.annotate(f"{alpha:g}", (sx * 100, gy * 100), xytext=(4, 3), textcoords="offset points", fontsize=7,
                        color=line.get_color())
        chosen = rec.trials.loc[rec.trials["trial_id"] == t, "wiseft_best_alpha"]
        hit = [(sx, gy) for alpha, sx, gy in pts if len(chosen) and alpha == chosen.iloc[0]]
        if hit:
            ax.scatter([hit[0][0] * 100], [hit[0][1] * 100], marker="*", s=180, color=line.get_color(),
                       edgecolor="black", zorder=5)
    ax.set_xlabel("specialized zero-shot top-1 (%, validation part)")
    ax.set_ylabel("general zero-shot top-1 (%, validation part)")
    ax.set_title("WiSE-FT interpolation of Pareto-optimal trials\n(labels: α; star: α chosen on validation)",
                 fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, out / "wiseft_curves.png")
