"""Output of an evaluation: results.json, results.md and small PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from apudae_engine.core.errors import BackendUnavailable
from apudae_engine.core.files import write_atomic
from apudae_engine.evaluation import aware_sweep
from apudae_engine.evaluation.attacks import attack_class, attack_names
from apudae_engine.evaluation.outcomes import row_arrays

log = logging.getLogger(__name__)

INPUT_LABELS = {"clean": "clean", "noise": "uniform noise"}
DEFENSE_LABELS = {"none": "no defense", "direct": "direct DAE", "iterative": "iterative",
                  "adaptive": "adaptive", "adaptive-compat": "adaptive (compat)"}


def _short(path: str) -> str:
    """A path relative to the working directory when it lies below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def _machine(hw: dict[str, Any]) -> str:
    parts = [hw["device"]]
    if hw.get("cpu_cores"):
        parts.append(f"{hw['cpu_cores']} cores")
    parts.append(f"{hw['torch_threads']} torch threads")
    loads = hw.get("load_average") or hw.get("load_average_at_end")  # older records
    if loads:
        load = " / ".join(f"{v:.1f}" for v in loads)
        parts.append(f"load average {load} at the end")
    return ", ".join(parts)


def _pct(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def row_label(name: str) -> str:
    """Report label of an input row: clean, noise or a registered attack's ``label``."""
    if name in INPUT_LABELS:
        return INPUT_LABELS[name]
    return attack_class(name).label if name in attack_names() else name


def _row_label(name: str, entry: dict[str, Any]) -> str:
    label = row_label(name)
    p, b = entry.get("perturbation"), entry.get("budget")
    if p and p.get("eps") is not None:
        norm = "L∞" if p["norm"] == "Linf" else "L2"
        label += f" ({norm} {p['eps']:.3g}"
        if b and b["steps"] > 1:
            label += f", {b['steps']} steps"
        if b and b.get("eot", 1) > 1:
            label += f", EOT {b['eot']}"
        label += ")"
    return label


def _accuracy_table(table: dict[str, Any], defenses: list[str]) -> list[str]:
    head = ["input", *(DEFENSE_LABELS[d] for d in defenses), "AUC of r(x)", "flagged"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in table.items():
        auc, rec = e["detection_auc"], e["reconstruction_error"]
        label = (f"**worst case per image** over the {len(e['over'])} L∞ attacks above"
                 if "over" in e else _row_label(name, e))
        cells = [label, *(_pct(e["accuracy"][d]) for d in defenses),
                 "–" if auc is None else f"{auc:.3f}", "–" if rec is None else _pct(rec["flagged"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _norms(p: dict[str, Any] | None) -> str:
    return "–" if not p else f"{p['mean']:.3g} / {p['max']:.3g}"


def _projected(budget: dict[str, Any], n: int) -> str:
    count = budget["settings"].get("projected_count")
    return "–" if count is None else f"{count} of {n}"


def _budget_table(tables: list[dict[str, Any]]) -> list[str]:
    head = ["attack", "norm", "eps", "steps", "EOT", "classifier fwd", "classifier grad",
            "purifier fwd", "purifier bwd", "DAE fwd", "DAE bwd", "‖δ‖ mean / max",
            "projected to eps", "attack time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for table in tables:
        for name, e in table.items():
            b = e["budget"]
            if b is None:
                continue
            per = b["per_image"]
            cells = [row_label(name), b["norm"], f"{b['eps']:.4g}", str(b["steps"]),
                     str(b["eot"]), *(f"{per[k]:g}" for k in (
                         "classifier_forward", "classifier_gradients", "purifier_forward",
                         "purifier_backward", "dae_forward", "dae_backward")),
                     _norms(e.get("perturbation")), _projected(b, e["n"]),
                     f"{e['attack_seconds']:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _draws_table(table: dict[str, Any], s: dict[str, Any]) -> list[str]:
    """The target defense's accuracy on its own seed and on held-out noise draws."""
    rows = [(n, e) for n, e in table.items() if e.get("draws")]
    if not rows:
        return []
    target, k = s["aware_target"], rows[0][1]["draws"]["k"]
    seeds = ", ".join(str(v) for v in rows[0][1]["draws"]["seeds"])
    out = [f"### {DEFENSE_LABELS[target]} as a randomized defense: {k} held-out noise draws", "",
           f"*defense's seed*: the deployed purifier (seed {s['seed']}, noise keyed by a pixel "
           "fingerprint, so deterministic), which the APGD attacks check their iterates on "
           f"(the attacker knows the seed). *held-out draws*: seeds {seeds}, which no attack "
           f"used for a gradient or a check; *mean* over the {k} draws and *correct on all "
           f"{k}*.", "",
           f"| input | defense's seed | mean over {k} held-out draws | correct on all {k} |",
           "|---|---|---|---|"]
    for name, e in rows:
        d = e["draws"]
        label = (f"**worst case per image** over the {len(e['over'])} L∞ attacks above"
                 if "over" in e else _row_label(name, e))
        out.append(f"| {label} | {_pct(e['accuracy'][target])} | {_pct(d['mean'])} | "
                   f"{_pct(d['all'])} |")
    return out + [""]


def _rejection_table(table: dict[str, Any], s: dict[str, Any],
                     defenses: list[str]) -> list[str]:
    """The detect-and-reject system: flagged inputs are rejected, the rest classified."""
    clean = (table.get("clean") or {}).get("rejection")
    rows = [(n, e) for n, e in table.items() if n != "clean" and e.get("rejection")]
    if not clean or not rows:
        return []
    target = s["aware_target"]
    k = next((e["rejection"]["draws"]["k"] for _, e in rows if e["rejection"].get("draws")), 0)
    kept = ", ".join(f"{DEFENSE_LABELS[d]} {_pct(v)}"
                     for d, v in clean["accepted_accuracy"].items())
    out = ["### Detect and reject: flagged inputs are rejected", "",
           f"On clean images the flag rejects {_pct(clean['rejected'])} % (the false-positive "
           f"rate on these {table['clean']['n']} test images); accuracy on the "
           f"{clean['accepted_n']} accepted: {kept}. On attacked images the system is right "
           "when it rejects the input or classifies it correctly (*with rejection*, over all "
           "attacked images).", "",
           "| input | flagged | " + " | ".join(f"{DEFENSE_LABELS[d]} with rejection"
                                             for d in defenses)
           + (f" | {DEFENSE_LABELS[target]}: mean over {k} held-out draws | correct on all {k}"
              if k else "") + " |",
           "|" + "---|" * (len(defenses) + 2 + (2 if k else 0))]
    for name, e in rows:
        r = e["rejection"]
        label = (f"**worst case per image** over the {len(e['over'])} L∞ attacks above"
                 if "over" in e else _row_label(name, e))
        cells = [label, _pct(r.get("flagged")), *(_pct(r["accuracy"][d]) for d in defenses)]
        if k:
            d = r.get("draws") or {}
            cells += [_pct(d.get("mean")), _pct(d.get("all"))]
        out.append("| " + " | ".join(cells) + " |")
    return out + [""]


def _suite_table(table: dict[str, Any]) -> list[str]:
    """Per member of an attack suite: images it attacked and left fooled on every draw."""
    out = []
    for name, e in table.items():
        b = e.get("budget")
        members = (b or {}).get("settings", {}).get("members")
        if not members:
            continue
        st = b["settings"]
        out += [f"### {row_label(name)}: members in turn (each on the images not yet fooled "
                f"on all {st['selection_draws']} selection draws), n = {e['n']}", "",
                "| member | images attacked | fooled on all selection draws | iterations | "
                "purifier bwd |", "|---|---|---|---|---|"]
        for m in members:
            if f"{m}_images_count" not in st:
                continue
            out.append(f"| {row_label(m)} | {st[f'{m}_images_count']} | "
                       f"{st[f'{m}_fooled_count']} | {st[f'{m}_iterations_count']} | "
                       f"{st[f'{m}_purifier_backward_count']} |")
        out.append("")
    return out


def _parts_line(p: dict[str, Any] | None) -> list[str]:
    """How the run was split: parts, workers and attack time summed over them."""
    if not p:
        return []
    workers = len({(w["host"], w["pid"]) for w in p["workers"]})
    return [f"Batches: {p['used']} parts from {workers} worker process(es), "
            f"{p['computed_by_this_process']} computed by the process that wrote this report "
            f"(the wall time above is its own); attack time summed over the parts "
            f"{p['attack_seconds']:.0f} s ({p.get('attack_cpu_seconds', 0):.0f} CPU s, all "
            "threads).  "]


def _wall(s: dict[str, Any]) -> str:
    """The report process's wall time, said as assembly where it computed no batch."""
    p = s.get("parts")
    if p and p["computed_by_this_process"] == 0:
        return (f"Report assembled from the workers' parts in {s['wall_seconds']:.0f} s "
                "(their attack time is below)")
    return f"Wall time: {s['wall_seconds']:.0f} s"


def _target_settings(defenses: dict[str, Any]) -> dict[str, str]:
    """A note per purifying defense on the settings it ran, for the curve tables."""
    out = {}
    for d, config in defenses.items():
        if config and config.get("method") == "adaptive" and d == "adaptive":
            source = "tuned" if config.get("defaults") == "tuned" else "the method's settings"
            out[d] = (f" ({source}: {config['steps']} steps, lr {255 * config['lr']:.3g}/255, "
                      f"noise_eps {255 * config['noise_eps']:.3g}/255, cap "
                      f"{config['noise_max_scale']:g})")
    return out


def _settings_line(config: dict[str, Any] | None) -> list[str]:
    """Which settings the adaptive column ran: the model's tuned ones or the method's."""
    if not config:
        return []
    source = ("the model's tuned purify_defaults (apudae-engine tune)"
              if config.get("defaults") == "tuned" else "the method's defaults")
    return [f"*adaptive* runs {source}: {config['steps']} steps, lr {255 * config['lr']:.3g}/255, "
            f"noise_eps {255 * config['noise_eps']:.3g}/255, noise cap "
            f"{config['noise_max_scale']:g}."]


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    defenses = list(s["defenses"])
    cal = s["calibration"]
    hw = s["hardware"]
    out = [f"# Robustness evaluation: {s['data']}", "",
           f"Command: `{s['command']}`  ",
           f"{_wall(s)} on {hw.get('cpu') or hw.get('processor')} "
           f"({_machine(hw)}); "
           f"engine {s['engine']}, torch {s['torch']}; "
           f"defenses scored with the {s.get('defense_backend', 'reference')} backend.  ",
           *_parts_line(s.get("parts")),
           f"DAE `{_short(s['dae']['path'])}` ({s['dae']['arch']} {s['dae']['config']}, sha256 "
           f"{s['dae']['sha256'][:12]}), classifier `{_short(s['classifier']['path'])}` (sha256 "
           f"{s['classifier']['sha256'][:12]}).  ",
           f"Calibration: mu = {cal['mu']:.4f}, sigma = {cal['sigma']:.4f} on {cal['data']}; "
           f"flag threshold {cal['flag_threshold']:.4f} "
           f"({cal.get('flag_rule', 'mu + k sigma')}).  ",
           f"Threat model: L∞ eps = {s['eps_linf']:.4g}, L2 eps = {s['eps_l2']:.4g} (PGD-L2, "
           "C&W-L2, DeepFool; the minimal-norm C&W and DeepFool results are projected onto the "
           "L2 ball). Uniform noise is ±L∞ eps. Seed "
           f"{s['seed']}.", "",
           "Cells are top-1 accuracy (%) over all images (misclassified clean images count as "
           "errors). *AUC of r(x)*: ROC-AUC of the reconstruction error before purification, "
           "clean versus that row's images (0.5 = no signal). *flagged*: share of that row's "
           "images with r above the flag threshold: the detector's true-positive rate on attack "
           "rows, its false-positive rate on the clean row. *adaptive (compat)* runs the "
           "authors' code settings (sigma forced to 0.5, no clipping to [0, 1]).  ",
           *_settings_line(s["defenses"].get("adaptive")), ""]
    out += [f"## Oblivious attacks (crafted on the bare classifier), n = {s['n']}", ""]
    out += _accuracy_table(results["oblivious"], defenses) + [""]
    if "defense_aware" in results:
        out += [f"## Defense-aware attacks (crafted against {s['aware_target']}), "
                f"n = {s['aware_n']} (the first {s['aware_n']} images)", ""]
        out += _accuracy_table(results["defense_aware"], defenses) + [""]
        out += _draws_table(results["defense_aware"], s)
        out += _rejection_table(results["defense_aware"], s, defenses)
        out += _suite_table(results["defense_aware"])
    if "aware_sweep" in results:
        out += aware_sweep.markdown(results["aware_sweep"], _target_settings(s["defenses"]))
    sw = results["sweep"]
    if len(sw["eps"]) > 1:
        out += [f"## Accuracy against PGD L∞ eps ({sw['steps']} steps), n = {sw['n']}", "",
                "| eps | " + " | ".join(DEFENSE_LABELS[d] for d in defenses) + " |",
                "|" + "---|" * (len(defenses) + 1)]
        for i, eps in enumerate(sw["eps"]):
            out.append(f"| {eps:.4g} | "
                       + " | ".join(_pct(sw["accuracy"][d][i]) for d in defenses) + " |")
        out.append("")
    budgets = _budget_table([results["oblivious"], results.get("defense_aware", {})])
    if len(budgets) > 2:  # a header without attack rows says nothing
        out += ["## Attack budgets (per image)", "", *budgets]
        out += ["", "Purifier fwd/bwd: whole purification runs (all steps) and backward passes "
                "through a whole unrolled run; DAE fwd/bwd: single DAE passes outside a run. "
                "‖δ‖ in the attack's norm. *projected to eps*: minimal-norm results (C&W, "
                "DeepFool) that exceeded eps and were scaled back onto the ball.", ""]
    return "\n".join(out)


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise BackendUnavailable("plots need matplotlib; `pip install matplotlib` (or the "
                                 "eval extra)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(results: dict[str, Any], path: Path) -> None:
    plt = _plt()
    sw = results["sweep"]
    if len(sw["eps"]) < 2:
        return
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=90)
    for d, acc in sw["accuracy"].items():
        ax.plot(sw["eps"], [100 * a for a in acc], marker="o", label=DEFENSE_LABELS[d])
    ax.set_xlabel("PGD L∞ eps")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{results['settings']['data']}, n={sw['n']}", fontsize=9)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_errors(raw: dict[str, Any], mu: float, sigma: float, path: Path) -> None:
    plt = _plt()
    # A panel per table that has attack rows (clean and noise alone say nothing new).
    groups = [(t, rows) for t, rows in raw.items()
              if any(r.name not in ("clean", "noise") for r in rows)]
    if not groups:
        return
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.4), dpi=90,
                             squeeze=False)
    for ax, (title, rows) in zip(axes[0], groups, strict=True):
        errs = {r.name: r.cat()[1] for r in rows if r.name != "noise"}
        allr = torch.cat(list(errs.values()))
        lo = min(torch.quantile(allr, 0.005).item(), mu - 2 * sigma)
        hi = max(torch.quantile(allr, 0.99).item(), mu + 4 * sigma)
        for name, r in errs.items():
            clean = name == "clean"
            ax.hist(r.clamp(lo, hi).numpy(), bins=60, range=(lo, hi), density=True,
                    histtype="stepfilled" if clean else "step", alpha=0.35 if clean else 1.0,
                    color="gray" if clean else None, label=row_label(name))
        ax.axvline(mu, color="k", lw=1)
        for k in (-1, 1):
            ax.axvline(mu + k * sigma, color="k", lw=0.8, ls="--")
        ax.set_xlabel("reconstruction error r(x) (mu solid, mu ± sigma dashed)")
        ax.set_title(title.replace("_", "-"), fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_examples(raw: dict[str, Any], target: str, path: Path) -> None:
    """One image: rows clean | adversarial | purified, for one oblivious and one aware attack."""
    plt = _plt()
    obl = {r.name: r for r in raw["oblivious"]}
    if "none" not in obl["clean"].examples:  # parts from runs over other image ranges
        log.info("no example images in the parts of this range; examples.png not written")
        return
    grid = [("clean", obl["clean"].examples["none"])]
    aware = {r.name: r for r in raw.get("defense_aware", [])}
    attacked = [n for n in obl if n not in ("clean", "noise")]
    picks = [obl[n] for n in ("pgd", "fgsm", *attacked) if n in obl][:1]
    picks += [aware[n] for n in ("pgd-eot", "bpda", "below-mu") if n in aware][:1]
    for row in picks:
        if "none" not in row.examples:
            continue
        grid.append((row_label(row.name), row.examples["none"]))
        if target in row.examples:
            grid.append((f"→ purified ({target})", row.examples[target]))
    _, c, h, w = grid[0][1].shape
    n = min(imgs.shape[0] for _, imgs in grid)
    pad = 2
    canvas = torch.ones(c, len(grid) * (h + pad), n * (w + pad))
    for i, (_, imgs) in enumerate(grid):
        for j in range(n):
            canvas[:, i * (h + pad):i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = imgs[j]
    img = canvas.clamp(0, 1).permute(1, 2, 0).numpy()
    fig, ax = plt.subplots(figsize=(n * 0.55, 0.3 + len(grid) * 0.55), dpi=100)
    ax.imshow(img[..., 0] if c == 1 else img, cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_yticks([i * (h + pad) + h / 2 for i in range(len(grid))],
                  [label for label, _ in grid], fontsize=6)
    ax.set_xticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    fig.savefig(path, bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)


def save_per_image(raw: dict[str, Any], path: Path) -> None:
    """Per-image outcomes of every row, to recompute any table: correct per defense, r, the
    perturbation's norm and, on defense-aware rows, the held-out draws classified correctly."""
    import numpy as np

    arrays = {}
    for table, rows in raw.items():
        for row in rows:
            arrays.update(row_arrays(row, f"{table}/{row.name}"))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_atomic(path, buf.getvalue())


def write_report(results: dict[str, Any], raw: dict[str, Any], purifier, out_dir: Path) -> None:
    """Write results.json, results.md, per_image.npz, accuracy_vs_eps.png (when there is a
    sweep), aware_vs_eps.png (with --aware-sweep), error_histogram.png and examples.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "results.json", (json.dumps(results, indent=2) + "\n").encode())
    write_atomic(out_dir / "results.md", (markdown(results) + "\n").encode())
    save_per_image(raw, out_dir / "per_image.npz")
    try:
        plot_sweep(results, out_dir / "accuracy_vs_eps.png")
    except BackendUnavailable as exc:
        log.warning("%s/results.json and results.md written; plots skipped: %s", out_dir, exc)
        return
    if "aware_sweep" in results:
        aware_sweep.plot(results["aware_sweep"], results["settings"]["data"],
                         out_dir / "aware_vs_eps.png", _plt())
    # The curve's tables would be a panel each: the histogram keeps the run's main tables.
    plot_errors({k: v for k, v in raw.items() if not k.startswith("aware-")}, purifier.mu,
                purifier.sigma, out_dir / "error_histogram.png")
    plot_examples(raw, results["settings"]["aware_target"], out_dir / "examples.png")
    log.info("wrote %s/results.json, results.md and plots", out_dir)
