"""The plain answer printed at the end of a sweep."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrialOutcome:
    trial_id: str
    status: str  # TERMINATED, ERROR, or anything Tune reports for unfinished trials
    config: dict
    metrics: dict
    error: str = ""


def pareto_front(rows: list[TrialOutcome]) -> list[TrialOutcome]:
    """Trials not dominated on (specialized_top1, general_top1), both maximised."""
    pts = [r for r in rows if "specialized_top1" in r.metrics and "general_top1" in r.metrics]

    def dominates(a, b):
        ga, gb = (a.metrics["specialized_top1"], a.metrics["general_top1"]), (b.metrics["specialized_top1"],
                                                                              b.metrics["general_top1"])
        return all(x >= y for x, y in zip(ga, gb)) and ga != gb

    return [r for r in pts if not any(dominates(o, r) for o in pts)]


def best_specialized(rows: list[TrialOutcome]) -> TrialOutcome | None:
    done = [r for r in rows if r.status == "TERMINATED" and "specialized_top1" in r.metrics]
    return max(done, key=lambda r: (r.metrics["specialized_top1"], r.metrics.get("general_top1", 0)), default=None)


def format_summary(rows: list[TrialOutcome], baseline: dict, experiment: str, tracking_uri: str,
                   parent_run_id: str, multi_objective: bool, extra: list[str] = ()) -> str:
    """The end-of-run answer; ``extra`` lines (e.g. the seed replicates) go before the MLflow pointers."""
    done = [r for r in rows if r.status == "TERMINATED"]
    failed = [r for r in rows if r.status == "ERROR"]
    lines = ["", "=" * 72, "Study summary", "=" * 72,
             f"trials: {len(done)} finished, {len(failed)} failed, {len(rows) - len(done) - len(failed)} unfinished"]
    for r in failed:
        lines.append(f"  failed {r.trial_id}: {r.error}")
    b_spec, b_gen = baseline["specialized_top1"], baseline["general_top1"]
    lines.append(f"baseline zero-shot top-1: specialized {b_spec:.1%} (chance {baseline.get('specialized_chance', 0):.1%}),"
                 f" general {b_gen:.1%}")
    best = best_specialized(rows)
    if best is None:
        lines.append("no trial finished, so there is no fine-tuned result to compare.")
    else:
        m, c = best.metrics, best.config
        d_spec = (m["specialized_top1"] - b_spec) * 100
        d_gen = (m["general_top1"] - b_gen) * 100
        lines += [
            f"best specialized trial {best.trial_id}: specialized {m['specialized_top1']:.1%} "
            f"({d_spec:+.1f} points vs baseline), general {m['general_top1']:.1%} ({d_gen:+.1f} points)",
            *[f"  {bench} top-1 95% CI [{m[f'{bench}_top1_ci_low']:.1%}, {m[f'{bench}_top1_ci_high']:.1%}] "
              f"(bootstrap over images)" for bench in ("specialized", "general") if f"{bench}_top1_ci_low" in m],
            *[f"  {bench} gain 95% CI [{m[f'{bench}_top1_gain_ci_low'] * 100:+.1f}, "
              f"{m[f'{bench}_top1_gain_ci_high'] * 100:+.1f}] points (paired bootstrap), "
              f"McNemar p = {m[f'{bench}_mcnemar_p']:.2g}"
              for bench in ("specialized", "general") if f"{bench}_top1_gain_ci_low" in m],
            "  knobs: " + ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(c.items())),
        ]
        if "wiseft_best_alpha" in m:
            curve = sorted((float(k.split("/")[1].removeprefix("alpha_")), v) for k, v in m.items()
                           if k.startswith("wiseft/alpha_") and k.endswith("/specialized_top1"))
            lines.append(f"  WiSE-FT (trained change x alpha): best alpha {m['wiseft_best_alpha']:g} gives specialized "
                         f"{m['wiseft_best_specialized_top1']:.1%}, general {m['wiseft_best_general_top1']:.1%}; "
                         "specialized by alpha: " + ", ".join(f"{a:g}: {v:.1%}" for a, v in curve))
        if multi_objective:
            front = pareto_front(done)
            lines.append(f"Pareto front (specialized vs general top-1): {len(front)} trial(s)")
            for r in sorted(front, key=lambda r: -r.metrics["specialized_top1"]):
                lines.append(f"  {r.trial_id}: specialized {(r.metrics['specialized_top1'] - b_spec) * 100:+.1f} pts, "
                             f"general {(r.metrics['general_top1'] - b_gen) * 100:+.1f} pts")
    ui = (f"mlflow ui --backend-store-uri {tracking_uri}   (then open http://127.0.0.1:5000)"
          if tracking_uri.startswith("sqlite:") else f"open {tracking_uri} in a browser")
    lines += [*extra, f"MLflow experiment {experiment!r}, parent run {parent_run_id}", f"  to browse: {ui}", "=" * 72]
    return "\n".join(lines)


def _fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)
