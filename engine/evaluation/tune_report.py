"""What ``tune`` writes for people: tune.md (a row per scored setting) and tune.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def markdown(doc: dict[str, Any]) -> str:
    """tune.md: the rule, the chosen setting and every candidate's scores."""
    ident = doc["identity"]
    lines = [f"# Tuning the purification defaults: {doc['data']}", "",
             f"Command: `{doc['command']}`", "",
             f"Attack: `{ident['attack']}` at L-inf {doc['eps_linf']:.4g}, {ident['attack_steps']}"
             f" steps, EOT {ident['eot']}, {ident['draws']} held-out draws, on the first "
             f"{ident['attack_limit']} calib images; clean accuracy on the first "
             f"{ident['clean_limit']}. Seed {ident['seed']}. Attack time "
             f"{doc['attack_seconds']:.0f} s over all settings (this process: "
             f"{doc['wall_seconds']:.0f} s wall, on "
             f"{doc['hardware'].get('cpu') or doc['hardware'].get('device')}).", "",
             f"Rule: {doc['rule']}.", "",
             "| steps | lr (x255) | noise_eps (x255) | noise cap | clean | robust (mean) | "
             "robust (all draws) | robust (defense seed) | attack s | |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    chosen, base = doc["chosen"]["settings"], doc["method_defaults"]["settings"]
    for cand in doc["candidates"]:
        s = cand["settings"]
        mark = " ".join(m for m, t in (("chosen", chosen), ("method", base)) if s == t)
        lines.append(f"| {s['steps']} | {255 * s['lr']:.3g} | {255 * s['noise_eps']:.3g} | "
                     f"{s['noise_max_scale']:g} | {100 * cand['clean']:.1f} | "
                     f"{100 * cand['robust_mean']:.2f} | {100 * cand['robust_all']:.2f} | "
                     f"{100 * cand['robust_seed']:.2f} | {cand['attack_seconds']:.0f} | {mark} |")
    lines += ["", "The tuning attack's budget is below a reported evaluation's: compare the "
              "chosen and the method's settings on the test split with `apudae-engine "
              "evaluate` (and `--method-defaults`)."]
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> None:
    """tune.png: clean against robust accuracy per setting, chosen and method marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=90)
    cands = doc["candidates"]
    ax.scatter([100 * c["robust_mean"] for c in cands], [100 * c["clean"] for c in cands],
               c="tab:gray", label="tried")
    for key, colour in (("method_defaults", "tab:blue"), ("chosen", "tab:red")):
        c = doc[key]
        ax.scatter([100 * c["robust_mean"]], [100 * c["clean"]], c=colour, s=60,
                   label=key.replace("_", " "))
    ax.set_xlabel(f"robust accuracy, %  ({doc['identity']['attack']}, "
                  f"eps {doc['eps_linf']:.3g})")
    ax.set_ylabel("clean accuracy, %")
    ax.set_title(doc["data"], fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
