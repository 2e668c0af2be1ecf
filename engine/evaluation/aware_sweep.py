"""Defense-aware curves (``evaluate --aware-sweep``): robust accuracy against L-inf eps, each
point crafted against its own defense (never by transfer), with and without the detector.

For every eps and target (``--aware-targets``: the bare classifier, the direct DAE, adaptive
purification) the defense-aware attacks run against that target on the first
``--aware-limit`` images, each a table of its own in the parts folder
(:func:`aware_key`). A point of the curve is the per-image worst case over those attacks,
read in the target's own column: on the defense's seed, as the mean over held-out noise
draws and as correct on all of them, each with a 95 % interval; and for the detect-and-reject
system (a flagged input is rejected: defended when flagged or classified correctly). Eps 0 is
the clean images: accuracy, and for the system the accuracy on the accepted clean images.

``summarize_curves`` builds results.json's ``aware_sweep``; ``markdown`` and ``plot`` its
section of results.md and ``aware_vs_eps.png``.
"""

from __future__ import annotations

from typing import Any

from apudae_engine.evaluation.tables import WORST_CASE, wilson

LABELS = {"none": "no defense", "direct": "direct DAE", "iterative": "iterative",
          "adaptive": "adaptive", "adaptive-compat": "adaptive (compat)"}


def aware_key(target: str, eps: float) -> str:
    """The table (and parts prefix) of one point: ``aware-adaptive-eps0.05``."""
    return f"aware-{target}-eps{eps:g}"


def _point(entry: dict[str, Any], target: str) -> dict[str, Any]:
    """One point of a target's curve from a table entry (a row or the worst case)."""
    n = entry["n"]
    seed = entry["accuracy"][target]
    rej = entry.get("rejection") or {}
    point = {"n": n, "seed": seed, "seed_ci95": wilson(seed, n)}
    if entry.get("draws"):
        d = entry["draws"]
        point.update(mean=d["mean"], all=d["all"], ci95=d["ci95"])
    if rej.get("accuracy"):
        r_seed = rej["accuracy"][target]
        point["rejection"] = {"flagged": rej.get("flagged"), "seed": r_seed,
                              "seed_ci95": wilson(r_seed, n)}
        if rej.get("draws"):
            d = rej["draws"]
            point["rejection"].update(mean=d["mean"], all=d["all"], ci95=d["ci95"])
    return point


def summarize_curves(config, tables: dict[str, dict[str, Any]],
                     clean: dict[str, Any]) -> dict[str, Any]:
    """results.json's ``aware_sweep``: per target, a point per eps (the worst case over the
    attack rows, and each row), and the clean point from the oblivious table's clean row
    (``clean``: its entry, over the run's first ``--limit`` images)."""
    c = config
    rej = clean.get("rejection") or {}
    out: dict[str, Any] = {
        "eps": sorted(c.aware_sweep), "attacks": list(c.aware_attacks), "draws": c.draws,
        "clean": {"n": clean["n"], "rejected": rej.get("rejected"),
                  "accepted_n": rej.get("accepted_n"),
                  "accuracy": {t: clean["accuracy"][t] for t in c.aware_targets},
                  "accepted_accuracy": {t: (rej.get("accepted_accuracy") or {}).get(t)
                                        for t in c.aware_targets}},
        "targets": {}}
    for target in c.aware_targets:
        points = []
        for eps in sorted(c.aware_sweep):
            table = tables[aware_key(target, eps)]
            rows = {name: {**_point(e, target),
                           "attack_cpu_seconds": round(e.get("attack_cpu_seconds", 0.0), 1)}
                    for name, e in table.items() if name != WORST_CASE}
            worst = table.get(WORST_CASE)
            point = _point(worst, target) if worst else next(iter(rows.values()))
            attacked = [e for name, e in table.items() if name != WORST_CASE]
            points.append({"eps": eps, **point, "rows": rows,
                           "attack_seconds": round(sum(e["attack_seconds"] for e in attacked), 1),
                           "attack_cpu_seconds": round(sum(e.get("attack_cpu_seconds", 0.0)
                                                           for e in attacked), 1)})
        out["targets"][target] = points
    return out


def pct(v: float | None) -> str:
    """A share as a percentage with one decimal, or an en dash where there is none (the curve
    tables here and in the docs)."""
    return "–" if v is None else f"{100 * v:.1f}"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def markdown(curves: dict[str, Any], target_settings: dict[str, str]) -> list[str]:
    """The curve tables: one per target, a row per eps (the worst case over the attacks, then
    each attack), robust accuracy and the detect-and-reject system's."""
    k, clean = curves["draws"], curves["clean"]
    out = ["## Defense-aware curves: robust accuracy against L∞ eps, each point crafted "
           "against its own defense", "",
           f"Attacks per point: {', '.join(curves['attacks'])}; a point is the per-image worst "
           f"case over them, in the target's own column. *seed*: the deployed purifier's "
           f"seed; *mean* / *all*: over {k} held-out noise draws no attack saw (mean, and "
           "correct on all), with Wilson 95 % intervals. "
           "*Detect and reject*: an input whose reconstruction error exceeds the flag "
           "threshold is rejected; the system is right when it rejects an attacked input or "
           "classifies it correctly. *flagged*: attacked inputs rejected. Eps 0: clean "
           f"images (n = {clean['n']}); the system rejects {pct(clean['rejected'])} % of "
           f"them (the false-positive rate on this split) and its accuracy there is on the "
           f"{clean['accepted_n']} accepted ones. *attack CPU s*: the attack's CPU seconds (all "
           "threads), the worst-case row their sum.", ""]
    for target, points in curves["targets"].items():
        out += [f"### Against {LABELS[target]}{target_settings.get(target, '')}", "",
                "| eps | attack | n | seed | mean [95 % CI] | all | flagged | "
                "reject: seed | reject: mean [95 % CI] | reject: all | attack CPU s |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        acc, acc_kept = clean["accuracy"][target], clean["accepted_accuracy"][target]
        out.append(f"| 0 | clean | {clean['n']} | {pct(acc)} | | | "
                   f"{pct(clean['rejected'])} | {pct(acc_kept)} (accepted) | | | |")
        for p in points:
            for name, q in [("**worst case**", p), *p["rows"].items()]:
                if name != "**worst case**" and len(p["rows"]) < 2:
                    continue
                r = q.get("rejection", {})
                out.append(
                    f"| {p['eps']:g} | {name} | {q['n']} | {pct(q['seed'])} | "
                    f"{pct(q.get('mean'))}{_ci((q.get('ci95') or {}).get('mean'))} | "
                    f"{pct(q.get('all'))} | {pct(r.get('flagged'))} | {pct(r.get('seed'))} | "
                    f"{pct(r.get('mean'))}{_ci((r.get('ci95') or {}).get('mean'))} | "
                    f"{pct(r.get('all'))} | {q['attack_cpu_seconds']:.0f} |")
        out.append("")
    return out


def plot(curves: dict[str, Any], title: str, path, plt) -> None:
    """aware_vs_eps.png: robust accuracy (mean over held-out draws, 95 % band; dashed: correct
    on all draws) against eps per target, without and with detect-and-reject (``plt``:
    matplotlib.pyplot, Agg)."""
    clean = curves["clean"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=90, sharey=True)
    for ax, system in zip(axes, (False, True)):
        for i, (target, points) in enumerate(curves["targets"].items()):
            color = f"C{i}"
            get = (lambda p: p.get("rejection", {})) if system else (lambda p: p)
            eps = [0.0] + [p["eps"] for p in points]
            start = clean["accepted_accuracy"][target] if system else clean["accuracy"][target]
            mean = [start] + [get(p).get("mean", get(p).get("seed")) for p in points]
            every = [start] + [get(p).get("all", get(p).get("seed")) for p in points]
            lo = [start] + [(get(p).get("ci95") or {}).get("mean", [None])[0] or
                            get(p).get("seed") for p in points]
            hi = [start] + [(get(p).get("ci95") or {}).get("mean", [None, None])[1] or
                            get(p).get("seed") for p in points]
            ax.plot(eps, [100 * v for v in mean], marker="o", color=color,
                    label=LABELS[target])
            ax.fill_between(eps, [100 * v for v in lo], [100 * v for v in hi], color=color,
                            alpha=0.15, lw=0)
            ax.plot(eps, [100 * v for v in every], ls="--", color=color, lw=0.9)
        ax.set_xlabel("L∞ eps (crafted against each defense)")
        ax.set_title("detect and reject (flagged or correct)" if system
                     else "robust accuracy", fontsize=9)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(fontsize=7, title="solid: mean over draws; dashed: all", title_fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
