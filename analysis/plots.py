"""The trade-off map, drawn from the trial table alone (nothing is re-run)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from study.vocabulary import METHOD_WORDS, metric_words  # noqa: E402

from .records import StudyRecords, pareto_mask, searched_knobs  # noqa: E402

DPI = 130


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def tradeoff_map(rec: StudyRecords, out: Path) -> Path:
    """Specialized gain vs general change of the headline metric per trial (test part), with each change's
    paired 95% interval on both axes; the chosen trial labelled as the console names it (``t04``); the Pareto front
    joined; the baseline at the origin; each method's exchange rate as a line through the origin. Points are
    coloured by method when the study has several, else by learning rate; marker size is the LoRA rank."""
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
        size = lambda r: 40 + 12 * r  # noqa: E731
        lora = methods_of(df) == "lora"
        ranks = pd.to_numeric(df["lora_rank"], errors="coerce").where(lora)
        sized = lora.all() or ranks.nunique() > 1  # marker size tells LoRA ranks apart where they differ
        sizes = size(ranks.fillna(2)) if sized else pd.Series(size(2), df.index)
        colours = method_colours(rec)
        if len(colours) > 1:
            for method, colour in colours.items():
                mine = methods_of(df) == method
                ax.scatter(x[mine], y[mine], color=colour, edgecolor="black", linewidth=0.6, zorder=4, s=sizes[mine],
                           label=method_label(rec, method))
        else:
            lr = pd.to_numeric(df["learning_rate"], errors="coerce")
            sc = ax.scatter(x, y, c=np.log10(lr), cmap="viridis", edgecolor="black", linewidth=0.6, zorder=4, s=sizes)
            fig.colorbar(sc, ax=ax, label="log10 learning rate")
        if sized:
            for r in sorted(ranks.dropna().unique()):
                ax.scatter([], [], s=size(r), color="white", edgecolor="black", label=f"LoRA rank {int(r)}")
        exchange_lines(ax, rec, colours)
        front = df[pareto_mask(df)].sort_values("specialized_gain_pts")
        ax.plot(front["specialized_gain_pts"], front["general_change_pts"], "--", color="crimson", lw=1.5, zorder=3,
                label=f"Pareto front ({len(front)} trials)")
        best = best_row(rec)
        label_point(ax, best["specialized_gain_pts"], best["general_change_pts"], f"chosen on validation: {best['label']}")
    ax.set_xlabel(f"specialized zero-shot {head} gain vs baseline (points, test part)")
    ax.set_ylabel(f"general zero-shot {head} change vs baseline (points, test part)")
    ax.set_title(f"{rec.experiment}: specialized gain vs general cost")
    # Below the axes, so that it never hides a trial.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2 if len(rec.rates) > 1 else 3, fontsize=8,
              frameon=False)
    return save(fig, out / "tradeoff_map.png")


def method_label(rec: StudyRecords, method: str) -> str:
    """A method's legend entry, with its exchange rate where it has one: ``LoRA (exchange rate 0.81 [0.60, 1.02])``."""
    rate = next((r for r in rec.rates if r.method == method), None)
    words = METHOD_WORDS.get(method, method)
    if rate is None:
        return words
    return f"{words} (exchange rate {rate.rate:.2f} [{rate.ci_low:.2f}, {rate.ci_high:.2f}])" if rate.enough else \
        rate.words()


def methods_of(df: pd.DataFrame) -> pd.Series:
    """Each trial's method (``lora`` for runs that predate the knob)."""
    return df["method"].fillna("lora") if "method" in df else pd.Series("lora", df.index)


def method_colours(rec: StudyRecords) -> dict[str, str]:
    """A colour per method of the study's finished trials, in the order of the vocabulary's methods."""
    present = set(methods_of(rec.trials))
    order = [m for m in METHOD_WORDS if m in present] + sorted(present - set(METHOD_WORDS))
    return {m: f"C{i}" for i, m in enumerate(order)}


def exchange_lines(ax, rec: StudyRecords, colours: dict[str, str]) -> None:
    """Each method's exchange rate as the line ``general change = -rate x gain`` through the baseline, up to the
    largest gain its own trials reached; none for a method with too few trials for an interval. In a study of
    several methods the line shares its method's colour and legend entry."""
    methods = methods_of(rec.trials)
    for r in rec.rates:
        if not r.enough:
            continue
        gains = rec.trials.loc[methods == r.method, "specialized_gain_pts"]
        ends = np.array([min(0.0, float(gains.min())), max(0.0, float(gains.max()))])
        several = len(colours) > 1
        ax.plot(ends, -r.rate * ends, "-", color=colours.get(r.method, "black") if several else "black", lw=1.2,
                alpha=0.8, zorder=3, label=None if several else f"exchange rate, {r.words()}")


def label_point(ax, x: float, y: float, text: str) -> None:
    """Label a point with a short leader line, on the side of the point facing the middle of the axes, so that the
    label stays inside them (never over the colour bar beside them)."""
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    right = x > (x0 + x1) / 2
    top = y > (y0 + y1) / 2
    ax.annotate(text, (x, y), xytext=(-10 if right else 10, -12 if top else 10), textcoords="offset points",
                ha="right" if right else "left", va="top" if top else "bottom", fontsize=8, zorder=6,
                arrowprops={"arrowstyle": "-", "color": "black", "lw": 0.6})


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
    return save(fig, out / "accuracy_vs_intensity.png")


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
    return save(fig, out / "marginals.png")


def level_means(x: pd.Series, y: pd.Series, agg: str = "mean") -> pd.Series:
    """``agg`` (mean or count) of ``y`` per distinct ``x`` (up to 4 levels, or up to 8 whole numbers: k shots of
    1, 2, 4, 8, 16 stay five levels) or per quartile bin of ``x``."""
    ok = x.notna() & y.notna()
    x, y = x[ok], y[ok]
    if x.nunique() <= 4 or (x.nunique() <= 8 and bool((x == x.round()).all())):
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
    return save(fig, out / "importances.png")


def wiseft_curves(rec: StudyRecords, trial_ids: list[str], out: Path) -> Path | None:
    """The headline metric's specialized gain vs general change (points against the baseline, as on the trade-off
    map) as each trial's trained change is scaled by α (WiSE-FT), on the part the curves were scored on; every α
    marked, the baseline at α = 0 (the origin), the α chosen on validation starred. Trials named ``t04``."""
    curves = {t: rec.wiseft[t] for t in trial_ids if t in rec.wiseft}
    if not curves:
        return None
    labels = dict(zip(rec.trials["trial_id"], rec.trials["label"]))
    if len(method_colours(rec)) > 1:  # several methods: say each curve's
        labels = {t: f"{labels[t]}, {METHOD_WORDS.get(m, m)}" for t, m in zip(rec.trials["trial_id"],
                                                                               methods_of(rec.trials))}
    part = "test part" if rec.wiseft_part == "test" else "validation part"
    fig, ax = plt.subplots(figsize=(6.5, 5))
    ax.axhline(0, color="0.6", lw=0.8)
    ax.axvline(0, color="0.6", lw=0.8)
    for t, pts in curves.items():
        a, s, g = zip(*pts)
        line, = ax.plot(s, g, "-o", label=f"{labels.get(t, t)} (α = 0 → 1)")
        for alpha, sx, gy in pts:
            ax.annotate(f"{alpha:g}", (sx, gy), xytext=(4, 3), textcoords="offset points", fontsize=7,
                        color=line.get_color())
        chosen = rec.trials.loc[rec.trials["trial_id"] == t, "wiseft_best_alpha"]
        hit = [(sx, gy) for alpha, sx, gy in pts if len(chosen) and alpha == chosen.iloc[0]]
        if hit:
            ax.scatter([hit[0][0]], [hit[0][1]], marker="*", s=180, color=line.get_color(), edgecolor="black", zorder=5)
    head = metric_words(rec.headline)
    ax.set_xlabel(f"specialized {head} gain vs baseline (points, {part})")
    ax.set_ylabel(f"general {head} change vs baseline (points, {part})")
    ax.set_title("WiSE-FT interpolation of Pareto-optimal trials\n(labels: α; star: α chosen on validation)",
                 fontsize=10)
    ax.legend(fontsize=8)
    return save(fig, out / "wiseft_curves.png")
