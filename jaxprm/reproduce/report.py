"""The reproduction's report: numbers over seeds, the paper's claims as checks, tables and plots.

A claim compares two measurements paired by seed (the same seed trains both PRMs / draws the same
puzzles). Its verdict: ``held`` when the 95% t-interval of the mean difference lies above 0,
``contradicted`` when it lies below 0, ``inconclusive`` otherwise; with one seed there is no interval
and the verdict says so. Nothing is tuned to make a claim hold: a claim that does not hold here is
reported as such.
"""
from __future__ import annotations

import math
import os
from typing import Any

from jaxprm.atomic import atomic_write_json, atomic_write_text
from jaxprm.reporting import format_table, markdown_table

# two-sided 95% Student t quantiles by degrees of freedom (1.96 beyond 30)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def _t95(df: int) -> float:
    for k in sorted(_T95):
        if df <= k:
            return _T95[k]
    return 1.96


def mean_ci(values) -> dict:
    """Mean and 95% t-interval half width (None with fewer than two values)."""
    v = [float(x) for x in values]
    m = sum(v) / len(v)
    if len(v) < 2:
        return {"mean": m, "ci": None, "n": len(v), "values": v}
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
    return {"mean": m, "ci": _t95(len(v) - 1) * sd / math.sqrt(len(v)), "n": len(v), "values": v}


def verdict(diffs) -> dict:
    s = mean_ci(diffs)
    if s["ci"] is None:
        s["verdict"] = ("held" if s["mean"] > 0 else "not held") + " (1 seed, no interval)"
    elif s["mean"] - s["ci"] > 0:
        s["verdict"] = "held"
    elif s["mean"] + s["ci"] < 0:
        s["verdict"] = "contradicted"
    else:
        s["verdict"] = "inconclusive"
    return s


def _f1(ev: dict, kind: str | None) -> float:
    if kind is None:
        return float(ev["macro_f1"])
    m = ev["by_step_kind"].get(kind)
    return float(m["macro_f1"]) if m else float("nan")


def build_results(cfg, synth: dict, evals: dict, searches: dict) -> dict[str, Any]:
    seeds = [int(s) for s in cfg.seeds]
    runs = list(cfg.runs)
    f1 = {run: {kind or "all": mean_ci([_f1(evals[(run, s)], kind) for s in seeds])
                for kind in (None, "perception", "reasoning")} for run in runs}
    claims = []

    def paired(a, b, kind):
        return [_f1(evals[(a, s)], kind) - _f1(evals[(b, s)], kind) for s in seeds]

    for other in ("mc", "judge"):
        if "hybrid" in runs and other in runs:
            claims.append({"claim": f"hybrid labels train a better PRM than {other}-only labels",
                           "measure": "step macro-F1 on held-out puzzles, hybrid minus " + other,
                           **verdict(paired("hybrid", other, None))})
    if "hybrid" in runs and "hybrid_no_perception" in runs:
        claim = {"claim": "supervising perception steps helps on perception errors",
                 "measure": "macro-F1 on perception steps, hybrid minus hybrid_no_perception"}
        if any("perception" in evals[("hybrid", s)]["by_error_kind"] for s in seeds):
            claims.append({**claim, **verdict(paired("hybrid", "hybrid_no_perception", "perception"))})
        else:
            d = mean_ci(paired("hybrid", "hybrid_no_perception", None))
            claims.append({**claim, "measure": "overall macro-F1, hybrid minus hybrid_no_perception", **d,
                           "verdict": "not testable: the task has no perception errors "
                                      "(task.perception_error_share=0)"})
    search = None
    if searches:
        ns = searches[seeds[0]]["ns"]
        names = list(searches[seeds[0]]["curves"])
        curves = {name: [mean_ci([searches[s]["curves"][name]["acc"][i] for s in seeds])["mean"]
                         for i in range(len(ns))] for name in names}
        guided = mean_ci([searches[s]["guided"]["accuracy"] for s in seeds])
        n_max = ns[-1]
        at_max = {name: mean_ci([searches[s]["curves"][name]["acc"][-1] for s in seeds]) for name in names}
        methods = {k: v for k, v in at_max.items() if k not in ("pass@n", "worst")}
        methods[f"guided (k={searches[seeds[0]]['guided']['k']})"] = guided
        best = max(methods, key=lambda k: methods[k]["mean"])
        search = {"ns": ns, "curves": curves, "at_max_n": at_max, "guided": guided, "n_max": n_max,
                  "best_method": best, "run": cfg.search_run}
        if "bon_mean" in names:
            claims.append({"claim": f"PRM best-of-N (mean step score) beats majority vote at N={n_max}",
                           "measure": f"answer accuracy at N={n_max}, best-of-N minus majority vote",
                           **verdict([searches[s]["curves"]["bon_mean"]["acc"][-1]
                                      - searches[s]["curves"]["majority"]["acc"][-1] for s in seeds])})
        claims.append({"claim": f"the best search strategy at N={n_max}", "measure": "highest mean accuracy",
                       "verdict": best, "mean": methods[best]["mean"], "ci": methods[best]["ci"]})
    return {"seeds": seeds, "runs": runs, "search_run": cfg.search_run,
            "label_quality": synth["label_quality"], "data": synth["data"], "f1": f1, "claims": claims,
            "search": search, "config": cfg.to_dict()}


def _fmt(s: dict | None) -> str:
    if s is None or s.get("mean") is None or (isinstance(s["mean"], float) and math.isnan(s["mean"])):
        return "n/a"
    return f"{s['mean']:.3f}" + (f" ± {s['ci']:.3f}" if s.get("ci") is not None else "")


def claims_table(res: dict, fmt=format_table) -> str:
    rows = [[c["claim"], c["measure"], _fmt(c) if "values" in c else f"{c['mean']:.3f}", c["verdict"]]
            for c in res["claims"]]
    return fmt(["claim", "measure", "value (95% CI over seeds)", "verdict"], rows)


def f1_table(res: dict, fmt=format_table) -> str:
    rows = []
    for run in res["runs"]:
        d = res["data"][run]
        rows.append([run, _fmt(res["f1"][run]["all"]), _fmt(res["f1"][run]["perception"]),
                     _fmt(res["f1"][run]["reasoning"]), f"{d['pos']}/{d['neg']}/{d['unsupervised']}"])
    return fmt(["run", "macro-F1 all", "perception", "reasoning", "labels +/-/none"], rows)


def search_table(res: dict, fmt=format_table) -> str:
    s = res["search"]
    if not s:
        return ""
    ns = s["ns"]
    cols = [n for n in (1, 2, 4, 8, 16, 32, 64) if n in ns] or [ns[-1]]
    rows = [[name] + [f"{s['curves'][name][ns.index(n)]:.3f}" for n in cols] for name in s["curves"]]
    rows.append([f"guided greedy (k={res['config']['search']['guided_k']})"] + [""] * (len(cols) - 1)
                + [_fmt(s["guided"])])
    return fmt(["method"] + [f"N={n}" for n in cols], rows)


def _plot_f1(res: dict, path: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = res["runs"]
    fig = Figure(figsize=(max(6, 1.4 * len(runs)), 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.27
    for j, kind in enumerate(("all", "perception", "reasoning")):
        vals = [res["f1"][r][kind]["mean"] for r in runs]
        errs = [res["f1"][r][kind]["ci"] or 0.0 for r in runs]
        ax.bar([i + (j - 1) * width for i in range(len(runs))], vals, width, yerr=errs, label=kind, capsize=3)
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels(runs, rotation=20, ha="right")
    ax.set_ylabel("step macro-F1 (held-out puzzles)")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(f"PRM step F1 by label rule and step kind ({len(res['seeds'])} seed(s), 95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def write_report(res: dict, out: str) -> list[str]:
    from jaxprm.eval.bon_curve import plot_bon_curve

    paths = [os.path.join(out, "results.json")]
    atomic_write_json(paths[0], res, indent=1)
    paths.append(_plot_f1(res, os.path.join(out, "f1_by_rule.png")))
    if res["search"]:
        s = res["search"]
        paths.append(plot_bon_curve({k: (s["ns"], v) for k, v in s["curves"].items()},
                                    os.path.join(out, "accuracy_vs_n.png"),
                                    title=f"test-time scaling with the {s['run']} PRM (guided: {100 * s['guided']['mean']:.1f}%)"))
    lq = res["label_quality"]["rules"] if "rules" in res["label_quality"] else {}
    lq_rows = [[r, f"{v.get('coverage', 0):.3f}", f"{v.get('accuracy', 0):.3f}"] for r, v in lq.items()]
    md = [
        "# VL-PRM in miniature: reproduction report",
        "",
        f"Seeds {res['seeds']}; wall time {res.get('wall_s', 'n/a')} s (this invocation).",
        "",
        "## Claims",
        "",
        claims_table(res, markdown_table),
        "",
        "## Step F1 of the PRM trained on each run's labels (held-out puzzles, ground truth)",
        "",
        f1_table(res, markdown_table),
        "",
    ]
    if lq_rows:
        md += ["## Label quality of each rule against the puzzles' ground truth (training data)", "",
               markdown_table(["rule", "coverage", "accuracy"], lq_rows), ""]
    if res["search"]:
        md += [f"## Test-time scaling with the {res['search']['run']} PRM (answer accuracy, mean over seeds)", "",
               search_table(res, markdown_table), ""]
    md += ["Plots: `f1_by_rule.png`" + (", `accuracy_vs_n.png`" if res["search"] else "") + "; every number: "
           "`results.json`.", ""]
    paths.insert(1, os.path.join(out, "report.md"))
    atomic_write_text(paths[1], "\n".join(md))
    return paths
