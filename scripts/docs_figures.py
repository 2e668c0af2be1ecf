"""The documentation's figures, drawn from committed records by this script, never by hand.

- ``architecture.png``: the layers of the import-linter contract in pyproject.toml (the one
  ``lint-imports`` enforces in CI), each box with its package's docstring summary.
- ``throughput.png``: images/s and speed-up against the reference from the ``apudae-engine
  bench`` records in benchmarks/results/ (``THROUGHPUT_RECORDS``).
- ``r_histogram.png``: the reconstruction error of clean and attacked test images from the
  evaluation records' per_image.npz, with the bundled model's mu and its flag threshold.
- ``aware_curves.png``: robust accuracy against eps against attackers who know each defense,
  without and with detect-and-reject, per dataset (``CURVE_RECORDS``, ``evaluate
  --aware-sweep`` records).
- ``results/...``: the plots ``apudae-engine evaluate`` and ``tune`` committed beside their
  records (accuracy against eps, r histograms, example images), copied as they are.

The docs build makes these in memory on every build (scripts/docs_hooks.py), so nothing
generated is committed except the README's two pictures (GitHub shows the README without a
build): ``docs/figures/preview.png`` and ``docs/figures/aware_curves.png``.
``--preview`` redraws the first (it runs ``purify``, seconds on a CPU), ``--curves`` the second.

    python scripts/docs_figures.py --out /tmp/figures   # write the build's figures to look at
    python scripts/docs_figures.py --preview            # redraw docs/figures/preview.png
    python scripts/docs_figures.py --curves             # redraw docs/figures/aware_curves.png
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# The bench records the performance page's table quotes, drawn in this order.
THROUGHPUT_RECORDS = ("purify_2026-11-25_amd-epyc-2c_cpu_1thread_quiet.json",
                      "purify_2026-11-25_amd-epyc-2c_cpu_1thread_224.json")
SERIES = (("reference", "fp32", "#8c8c8c"), ("compiled", "fp32", "#1f77b4"),
          ("compiled", "bf16", "#ff7f0e"))
# The r histogram: (record, per_image.npz key, label); the first is the clean reference.
R_ROWS = (("fmnist-500-oblivious-art", "oblivious/clean/error", "clean"),
          ("fmnist-500-oblivious-art", "oblivious/pgd/error", "PGD L∞ 0.1 (oblivious)"),
          ("fmnist-200-aware-apgd-tuned", "defense_aware/aware-suite/error",
           "APGD suite (defense-aware)"),
          ("fmnist-500-defense-aware", "defense_aware/below-mu/error",
           "stay below mu (defense-aware)"))
R_MODEL = ROOT / "engine" / "models_data" / "fmnist" / "dae.json"
PREVIEW = ROOT / "docs" / "figures" / "preview.png"
PREVIEW_ROWS = 3  # the first images of each samples folder, in file-name order


def _toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10: the docs extra installs tomli
        import tomli as tomllib
    return tomllib.loads(path.read_text())


def _png(fig, description: str | None = None) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight",
                metadata={"Software": None, "Description": description})
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# -- architecture --------------------------------------------------------------------------


def contract_layers(pyproject: Path = ROOT / "pyproject.toml") -> list[list[tuple[str, bool]]]:
    """The ``layers`` contract's layers, top first: each a list of (module, optional), where
    siblings are joined by "|" and an optional module is written in parentheses."""
    config = _toml(pyproject)["tool"]["importlinter"]
    for contract in config["contracts"]:
        if contract["type"] == "layers":
            return [[(m.strip().strip("()"), m.strip().startswith("(")) for m in layer.split("|")]
                    for layer in contract["layers"]]
    raise ValueError(f"{pyproject}: no import-linter contract of type 'layers'")


def forbidden_contracts(pyproject: Path = ROOT / "pyproject.toml") -> list[dict]:
    config = _toml(pyproject)["tool"]["importlinter"]
    return [c for c in config["contracts"] if c["type"] == "forbidden"]


def unlayered_roots(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The contract's root packages that the layers do not cover (apudae_kernels)."""
    config = _toml(pyproject)["tool"]["importlinter"]
    layered = {m.split(".")[0] for layer in contract_layers(pyproject) for m, _ in layer}
    return [r for r in config["root_packages"] if r not in layered]


def _short(module: str) -> str:
    return module.removeprefix("apudae_engine.")


def contract_notes() -> list[str]:
    """One line per forbidden contract: its name, and what its sources never import."""
    return [f"{c['name']}: {', '.join(map(_short, c['source_modules']))} never imports "
            f"{', '.join(map(_short, c['forbidden_modules']))}" for c in forbidden_contracts()]


def package_folder(module: str, pyproject: Path = ROOT / "pyproject.toml") -> Path:
    """The source folder of an import name, through pyproject's package-dir mapping."""
    mapping = _toml(pyproject)["tool"]["setuptools"]["package-dir"]
    top, _, rest = module.partition(".")
    return ROOT / mapping.get(top, top) / Path(*rest.split(".")) if rest else ROOT / mapping[top]


def package_summary(module: str) -> str:
    """The first paragraph of the package's ``__init__`` docstring, on one line."""
    init = package_folder(module) / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text())) if init.exists() else None
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def architecture_png() -> bytes:
    plt = _pyplot()
    from matplotlib.patches import FancyBboxPatch

    layers = contract_layers()
    width, side, pad, line = 10.0, 3.2, 0.15, 0.2  # inches of the figure, one text line

    def wrapped(text: str, w: float) -> str:
        return textwrap.fill(text, max(16, int(w * 9.6)))

    boxes, heights = [], []
    for layer in layers:
        w = (width - pad * (len(layer) - 1)) / len(layer)
        texts = [wrapped(package_summary(m), w) for m, _ in layer]
        boxes.append((w, texts))
        heights.append(0.55 + line * max(t.count("\n") + 1 for t in texts))
    gap = 0.3
    height = sum(heights) + gap * len(layers)
    note_lines = 2 + sum(len(textwrap.wrap(n, 150)) for n in contract_notes())
    bottom = 0.25 + 0.19 * note_lines
    fig, ax = plt.subplots(figsize=(12.5, (height + bottom) * 0.9 + 0.3))
    ax.set_xlim(-0.9, width + side + 0.4)
    ax.set_ylim(-bottom, height + 0.1)
    ax.axis("off")

    def box(x, y, w, h, title, text, dashed=False, color="#e8f0fa"):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                    facecolor=color, edgecolor="#34495e",
                                    linestyle="--" if dashed else "-", linewidth=1.2))
        ax.text(x + 0.12, y + h - 0.12, title, fontsize=min(10.5, 4.1 * w), fontweight="bold",
                va="top", family="monospace")
        ax.text(x + 0.12, y + h - 0.45, text, fontsize=8.3, va="top", linespacing=1.3)

    top = height
    for layer, (w, texts), h in zip(layers, boxes, heights):
        y = top - h - gap / 2
        for j, ((module, optional), text) in enumerate(zip(layer, texts)):
            folder = package_folder(module).relative_to(ROOT).as_posix() + "/"
            box(j * (w + pad), y, w, h, folder, text, dashed=optional)
        top -= h + gap
    ax.annotate("", xy=(-0.45, 0.2), xytext=(-0.45, height - 0.2),
                arrowprops=dict(arrowstyle="-|>", color="#34495e", lw=1.5))
    ax.text(-0.62, height / 2, "a layer imports only the layers below it", rotation=90,
            va="center", ha="center", fontsize=9)
    y = gap / 2
    for root in unlayered_roots():
        text = wrapped(package_summary(root), side - 0.4)
        h = 0.55 + line * (text.count("\n") + 1)
        folder = package_folder(root).relative_to(ROOT).as_posix() + "/"
        box(width + 0.4, y, side - 0.2, h, folder, text, color="#f4ecf7")
        y += h + gap
    notes = ["Boxes side by side do not import each other; a dashed box is a layer the "
             "contract marks optional. The other contracts:"]
    notes += [textwrap.fill(n, 150, initial_indent="- ", subsequent_indent="  ")
              for n in contract_notes()]
    notes.append("Drawn from pyproject.toml by scripts/docs_figures.py.")
    ax.text(0, -0.15, "\n".join(notes), fontsize=8, color="#444", va="top", linespacing=1.35)
    ax.set_title("The layers of pyproject.toml's import-linter contract (lint-imports, in CI)",
                 fontsize=11)
    return _png(fig)


# -- throughput ----------------------------------------------------------------------------


def bench_rows(names=THROUGHPUT_RECORDS) -> tuple[list[dict], dict]:
    """The bench records' results in order, and the first record's hardware."""
    rows, hardware = [], None
    for name in names:
        record = json.loads((RESULTS / name).read_text())
        hardware = hardware or record["hardware"]
        rows += record["results"]
    return rows, hardware


def throughput_png() -> bytes:
    plt = _pyplot()
    rows, hw = bench_rows()
    groups: list[tuple] = []
    for r in rows:
        key = (r["case"], tuple(r["image"]), r["batch"])
        if key not in groups:
            groups.append(key)
    rate = {(r["case"], tuple(r["image"]), r["batch"], r["backend"], r["precision"]):
            (r["images_per_s"], r["ratio_vs_reference"]) for r in rows}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.55 * len(groups) + 1.6),
                                      sharey=True)
    bar = 0.8 / len(SERIES)
    for s, (backend, precision, color) in enumerate(SERIES):
        ys, ips, ratio = [], [], []
        for g, key in enumerate(groups):
            if (*key, backend, precision) in rate:
                ys.append(g + (s - 1) * bar)
                ips.append(rate[(*key, backend, precision)][0])
                ratio.append(rate[(*key, backend, precision)][1])
        label = f"{backend} {precision}"
        left.barh(ys, ips, height=bar, color=color, label=label)
        right.barh(ys, ratio, height=bar, color=color, label=label)
        for y, v, q in zip(ys, ips, ratio):
            left.text(v * 1.05, y, f"{v:g}", va="center", fontsize=7)
            right.text(q + 0.05, y, f"{q:.2f}x", va="center", fontsize=7)
    labels = [f"{case}, {'x'.join(map(str, image))}, batch {batch}"
              for case, image, batch in groups]
    left.set_yticks(range(len(groups)), labels, fontsize=8.5)
    left.invert_yaxis()
    left.set_xscale("log")
    left.set_xlabel("images/s (log scale)")
    right.set_xlabel("speed-up against the reference in the same run")
    right.axvline(1.0, color="#555", lw=0.8)
    right.set_xlim(0, max(r["ratio_vs_reference"] for r in rows) * 1.12)
    left.set_xlim(right=max(r["images_per_s"] for r in rows) * 2.5)
    right.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"apudae-engine bench, adaptive 13 steps: {hw['cpu']}, {hw['cpu_cores']} cores, "
                 f"{hw['torch_threads']} torch thread, torch {hw['torch']}", fontsize=10)
    fig.text(0.01, -0.02, "records: " + ", ".join(f"benchmarks/results/{n}"
                                                  for n in THROUGHPUT_RECORDS), fontsize=7)
    fig.tight_layout()
    return _png(fig)


# -- reconstruction error --------------------------------------------------------------------


def r_histogram_png() -> bytes:
    import numpy as np

    from apudae_engine.method.detection import flag_threshold

    plt = _pyplot()
    calibration = json.loads(R_MODEL.read_text())["calibration"]
    mu, threshold = calibration["mu"], flag_threshold(calibration)
    fig, ax = plt.subplots(figsize=(8, 4))
    bins, top = np.linspace(0, 14, 57), 0.8
    for i, (record, key, label) in enumerate(R_ROWS):
        r = np.load(RESULTS / "eval" / record / "per_image.npz")[key]
        kw = dict(color="#bbbbbb") if i == 0 else dict(histtype="step", lw=1.4)
        density, _, patches = ax.hist(np.clip(r, 0, bins[-1]), bins=bins, density=True,
                                      label=f"{label}, n = {len(r)}", **kw)
        k = int(np.argmax(density))
        if density[k] > top:  # a peak off the scale: say how high it goes
            color = patches[0].get_edgecolor() if i else "#888888"
            ax.annotate(f"peak {density[k]:.1f}", xy=(bins[k + 1], top * 0.97),
                        xytext=(bins[k + 1] + 0.3, top * 0.9), fontsize=7.5, color=color,
                        arrowprops=dict(arrowstyle="->", color=color))
    ax.set_ylim(0, top)
    ax.axvline(mu, color="k", lw=1.2, label=f"mu = {mu:.2f} (the hinge starts here)")
    ax.axvline(threshold, color="#d62728", ls="--", lw=1.2,
               label=f"flag threshold = {threshold:.2f} (5 % of clean calib images above)")
    ax.set_xlabel("reconstruction error r(x) before purification (last bin: 14 and above)")
    ax.set_ylabel("density")
    ax.set_title("Fashion-MNIST test images, bundled fmnist DAE", fontsize=10)
    ax.legend(fontsize=7.5)
    fig.text(0.01, -0.03, "records: " + ", ".join(sorted({f"benchmarks/results/eval/{r}"
                                                          for r, _, _ in R_ROWS})), fontsize=7)
    return _png(fig)


# -- defense-aware curves --------------------------------------------------------------------

# The defense-aware curves (``evaluate --aware-sweep``) per dataset: its records under
# benchmarks/results/eval/, in order; a later record adds the targets the first lacks (the
# adaptive defense at the method's own settings runs in a folder of its own).
CURVE_RECORDS = (("Fashion-MNIST", ("fmnist-aware-curve", "fmnist-aware-curve-method")),
                 ("MNIST", ("mnist-aware-curve",)))
# Stronger runs of the detector-aware attack on a curve's first images (more steps, restarts):
# per dataset, its curve records and the stronger ones, each a record of the same evaluate
# with only ``--aware-attacks apgd-detector`` (``strong_runs``; docs_records.strong_table).
STRONG_RECORDS = (("MNIST", ("mnist-aware-curve",),
                   ("mnist-detector-strong", "mnist-detector-strong-adaptive",
                    "mnist-detector-stronger")),)
CURVES = ROOT / "docs" / "figures" / "aware_curves.png"
CURVE_LABELS = {"none": "no defense", "direct": "direct DAE"}


def _curve_label(target: str, settings: dict) -> str:
    if target != "adaptive":
        return CURVE_LABELS.get(target, target)
    tuned = (settings["defenses"].get("adaptive") or {}).get("defaults") == "tuned"
    return "adaptive, tuned" if tuned else "adaptive, method's settings"


def curve_series(records: tuple[str, ...]) -> list[dict]:
    """A dataset's curves, one per target over its ``records`` (missing ones skipped): label,
    record, the clean point (accuracy; accepted accuracy for detect and reject) and the
    results.json points (worst case over the attacks, in the target's own column)."""
    series, seen = [], set()
    for record in records:
        path = RESULTS / "eval" / record / "results.json"
        if not path.exists():
            continue
        doc = json.loads(path.read_text())
        curves = doc["aware_sweep"]
        for target, points in curves["targets"].items():
            label = _curve_label(target, doc["settings"])
            if label in seen:
                continue
            seen.add(label)
            clean = curves["clean"]
            series.append({"label": label, "record": record, "target": target,
                           "n_clean": clean["n"], "clean": clean["accuracy"][target],
                           "clean_accepted": clean["accepted_accuracy"][target],
                           "clean_rejected": clean["rejected"], "points": points,
                           "command": doc["settings"]["command"],
                           "attack_settings": doc["settings"]["attacks"],
                           "threshold": doc["settings"]["calibration"]["flag_threshold"],
                           "images": [doc["settings"][k] for k in
                                      ("dataset", "split", "offset", "aware_n")],
                           "attacks": curves["attacks"], "draws": curves["draws"]})
    return series


def system_defended(series: dict, eps: float):
    """Per attacked image of a curve's point: is the detect-and-reject system right on every
    held-out draw (flagged, or classified correctly on all of them) under every attack of the
    point (their per-image worst case)? A bool array, from the record's per_image.npz."""
    import numpy as np

    threshold, k = series["threshold"], series["draws"]
    npz = np.load(RESULTS / "eval" / series["record"] / "per_image.npz")
    table = f"aware-{series['target']}-eps{eps:g}"
    ok = None
    for attack in series["attacks"]:
        key = f"{table}/{attack}"
        good = (npz[f"{key}/error"] > threshold) | (npz[f"{key}/draws"] == k)
        ok = good if ok is None else ok & good
    return ok


def strong_runs(name: str) -> tuple[list[dict], dict]:
    """A dataset's stronger detector-aware runs (``STRONG_RECORDS``): a point per record,
    target and eps, in order (its ``series``, ``eps``, and the system's per-image outcome on
    the run's images under the curve's attacks, ``curve``, and under the run, ``run``); and
    per (target, eps) the per-image worst case of the curve's attacks and every run of the
    point, on the images all of them attacked."""
    curve_records, strong_records = next(
        ((c, s) for n, c, s in STRONG_RECORDS if n == name), ((), ()))
    curve = {s["target"]: s for s in curve_series(curve_records)}
    runs = [s for r in strong_records for s in curve_series((r,)) if s["target"] in curve]
    points, worst = [], {}
    for s in runs:
        c = curve[s["target"]]
        if s["images"][:3] != c["images"][:3]:
            raise ValueError(f"{s['record']} attacked other images than {c['record']}")
        for p in s["points"]:
            key = (s["target"], p["eps"])
            new = system_defended(s, p["eps"])
            old = system_defended(c, p["eps"])[:len(new)]
            points.append({"series": s, "eps": p["eps"], "curve": old, "run": new})
            prev = worst.get(key, old)
            n = min(len(prev), len(new))
            worst[key] = prev[:n] & new[:n]
    return points, worst


def strong_points(name: str) -> list[dict]:
    """The figure's markers for a dataset's stronger runs: per (target, eps), the label, the
    images and the system's worst-case accuracy, correct on all held-out draws."""
    points, worst = strong_runs(name)
    labels = {q["series"]["target"]: q["series"]["label"] for q in points}
    records = {t: list(dict.fromkeys(q["series"]["record"] for q in points
                                     if q["series"]["target"] == t)) for t in labels}
    return [{"label": labels[t], "eps": e, "n": int(len(w)), "all": float(w.mean()),
             "records": records[t]}
            for (t, e), w in sorted(worst.items())]


def curves_digest(rows: list[tuple[str, list[dict]]]) -> str:
    """What the curves figure was drawn from (sha256 of its series), kept in the PNG's
    Description so a test can tell a stale README figure without comparing pixels."""
    return "aware-curves sha256:" + hashlib.sha256(
        json.dumps(rows, sort_keys=True).encode()).hexdigest()


def curve_rows() -> list[tuple[str, list[dict], list[dict]]]:
    """Every dataset of ``CURVE_RECORDS`` that has a record: its ``curve_series`` and its
    ``strong_points``."""
    rows = [(name, curve_series(records), strong_points(name))
            for name, records in CURVE_RECORDS]
    return [row for row in rows if row[1]]


def aware_curves_png() -> bytes:
    """Robust accuracy against L-inf eps against attackers who know each defense (mean over
    held-out draws with its 95 % band; dashed: correct on every draw), without and with
    detect-and-reject, a row per dataset of ``CURVE_RECORDS``; triangles on the system's
    panel: the worst case with a dataset's stronger detector-aware runs (``strong_points``)."""
    plt = _pyplot()
    rows = curve_rows()
    if not rows:
        raise FileNotFoundError("no defense-aware curve record (CURVE_RECORDS) has a "
                                "results.json under benchmarks/results/eval/")
    fig, axes = plt.subplots(len(rows), 2, figsize=(9, 3.3 * len(rows)), dpi=90,
                             sharey=True, squeeze=False)
    colors = {"no defense": "#8c8c8c", "direct DAE": "#2ca02c", "adaptive, tuned": "#1f77b4",
              "adaptive, method's settings": "#ff7f0e"}
    for (name, series, strong), ax_row in zip(rows, axes):
        marked = []  # the stronger runs' markers, in their own legend
        for ax, system in zip(ax_row, (False, True)):
            for s in series:
                pts = [p.get("rejection", {}) if system else p for p in s["points"]]
                eps = [0.0] + [p["eps"] for p in s["points"]]
                start = s["clean_accepted"] if system else s["clean"]
                mean = [start] + [q.get("mean", q.get("seed")) for q in pts]
                every = [start] + [q.get("all", q.get("seed")) for q in pts]
                band = [(q.get("ci95") or {}).get("mean") or [q.get("seed")] * 2 for q in pts]
                color = colors.get(s["label"])
                ax.plot(eps, [100 * v for v in mean], marker="o", ms=3, color=color,
                        label=s["label"])
                ax.fill_between(eps, [100 * start] + [100 * b[0] for b in band],
                                [100 * start] + [100 * b[1] for b in band], color=color,
                                alpha=0.12, lw=0)
                ax.plot(eps, [100 * v for v in every], ls="--", lw=0.8, color=color)
                marks = [q for q in strong if q["label"] == s["label"]] if system else []
                if marks:
                    n = ", ".join(sorted({str(q["n"]) for q in marks}))
                    marked.append(ax.scatter(
                        [q["eps"] for q in marks], [100 * q["all"] for q in marks], marker="v",
                        s=28, color=color, edgecolor="black", lw=0.5, zorder=3,
                        label=f"{s['label']} (n = {n})"))
            ax.set_title(f"{name}: " + ("detect and reject (flagged or correct)" if system
                                        else "robust accuracy"), fontsize=9)
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
            ax.set_xlabel("L\u221e eps, crafted against each defense")
        ax_row[0].set_ylabel("accuracy (%)")
        ax_row[0].legend(fontsize=7, title="solid: mean over held-out draws; dashed: all",
                         title_fontsize=6)
        if marked:
            ax_row[1].legend(handles=marked, fontsize=6, loc="lower left",
                             title="\u25bc stronger apgd-detector, worst case", title_fontsize=6)
    records = sorted({s["record"] for _, series, _ in rows for s in series}
                     | {r for _, _, strong in rows for q in strong for r in q["records"]})
    footer = textwrap.wrap("records: " + ", ".join(f"benchmarks/results/eval/{r}"
                                                   for r in records), 170)
    fig.text(0.01, 0.0, "\n".join(footer), fontsize=6)
    fig.tight_layout(rect=(0, 0.01 + 0.012 * len(footer), 1, 1))
    return _png(fig, curves_digest(rows))


# -- all figures -------------------------------------------------------------------------------


def committed_plots() -> dict[str, bytes]:
    """The PNGs committed beside the records, keyed ``results/<path under results>``."""
    return {f"results/{p.relative_to(RESULTS).as_posix()}": p.read_bytes()
            for p in sorted(RESULTS.rglob("*.png"))}


def figures() -> dict[str, bytes]:
    """Every figure of the docs build, keyed by its path under the site's ``generated/``."""
    return {"architecture.png": architecture_png(), "throughput.png": throughput_png(),
            "r_histogram.png": r_histogram_png(), "aware_curves.png": aware_curves_png(),
            **committed_plots()}


def draw_preview(path: Path = PREVIEW, rows: int = PREVIEW_ROWS) -> Path:
    """Purify engine/samples with seed 0 and draw the first ``rows`` images of each folder
    with ``purify``'s own preview grid (input | purified | difference x8, and the record)."""
    import tempfile

    import numpy as np
    from PIL import Image

    from apudae_engine import FolderJob, PurifyConfig, purify_folder
    from apudae_engine.images.preview import preview_grid

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "purified"
        purify_folder(FolderJob(ROOT / "engine" / "samples", out, batch_size=64,
                                config=PurifyConfig(seed=0)))
        records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().split("\n")
                   if line]
        chosen = []
        for folder in ("adversarial", "clean"):
            chosen += sorted((r for r in records if r["path"].startswith(folder + "/")),
                             key=lambda r: r["path"])[:rows]

        def pixels(p: Path) -> np.ndarray:
            return np.asarray(Image.open(p).convert("L"))[None]

        grid = preview_grid([(pixels(ROOT / "engine" / "samples" / r["path"]),
                              pixels(out / r["output"]), r) for r in chosen])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.transpose(1, 2, 0)).save(path, optimize=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the build's figures into this folder")
    parser.add_argument("--preview", action="store_true",
                        help=f"redraw {PREVIEW.relative_to(ROOT)}")
    parser.add_argument("--curves", action="store_true",
                        help=f"redraw {CURVES.relative_to(ROOT)} (the README's) from the records")
    a = parser.parse_args(argv)
    if not (a.out or a.preview or a.curves):
        parser.error("give --out DIR, --preview, --curves or several")
    if a.out:
        for name, data in figures().items():
            (a.out / name).parent.mkdir(parents=True, exist_ok=True)
            (a.out / name).write_bytes(data)
            print(a.out / name)
    if a.preview:
        print(draw_preview())
    if a.curves:
        CURVES.write_bytes(aware_curves_png())
        print(CURVES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
