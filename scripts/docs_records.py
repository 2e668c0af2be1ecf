"""Tables of the committed records, generated for the docs from the records themselves.

- ``records_table()``: every evaluation and tuning record under benchmarks/results/ with the
  command that made it (its results.md or tune.md ``Command:`` line), its size and time, and
  the adaptive settings it ran; docs/evaluation.md's ``<!-- eval-records -->``.
- ``curves_table()``: the defense-aware curves (``docs_figures.CURVE_RECORDS``), a table per
  dataset; docs/evaluation.md's ``<!-- aware-curves -->``.
- ``strong_table()``: the stronger detector-aware runs (``STRONG_RECORDS``) beside the curve's
  points they revisit; docs/evaluation.md's ``<!-- detector-strong -->``.
- ``bench_table()``: the ``apudae-engine bench`` records the performance page quotes
  (``docs_figures.THROUGHPUT_RECORDS``); docs/performance.md's ``<!-- bench-table -->``.

scripts/docs_hooks.py puts them into the pages; run this file to print both.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from apudae_engine.evaluation.aware_sweep import pct
from apudae_engine.evaluation.tables import mcnemar_p

sys.path.insert(0, str(Path(__file__).resolve().parent))

from docs_figures import (  # noqa: E402
    CURVE_RECORDS,
    RESULTS,
    STRONG_RECORDS,
    bench_rows,
    curve_series,
    strong_runs,
    system_defended,
)

RECORDS_MARKER = "<!-- eval-records -->"
BENCH_MARKER = "<!-- bench-table -->"
CLI_MARKER = "<!-- cli-vs-script -->"
CURVES_MARKER = "<!-- aware-curves -->"
STRONG_MARKER = "<!-- detector-strong -->"
COMMAND = re.compile(r"^Command:\s*`([^`]+)`", re.M)


def _over_255(value: float) -> str:
    return f"{value * 255:.3g}/255"


def _adaptive(settings: dict) -> str:
    adaptive = (settings.get("defenses") or {}).get("adaptive")
    if not adaptive:
        return "–"
    return (f"{adaptive['steps']} steps, lr {_over_255(adaptive['lr'])}, noise "
            f"{_over_255(adaptive['noise_eps'])}, cap {adaptive['noise_max_scale']:g}")


def _size(settings: dict) -> str:
    n, aware = settings.get("n"), settings.get("aware_n")
    if n is None:
        return "–"
    return f"n = {n:,}" + (f", defense-aware n = {aware:,}" if aware else "")


def record_rows() -> list[dict]:
    """One dict per record folder: path, command, images, seconds, adaptive settings."""
    rows = []
    for md in sorted(RESULTS.glob("eval/*/results.md")) + sorted(RESULTS.glob("tune/*/tune.md")):
        folder = md.parent
        match = COMMAND.search(md.read_text())
        data = folder / ("results.json" if md.name == "results.md" else "tune.json")
        doc = json.loads(data.read_text()) if data.exists() else {}
        settings = doc.get("settings") or {}
        seconds = settings.get("wall_seconds", doc.get("wall_seconds"))
        rows.append({"record": folder.relative_to(RESULTS.parents[1]).as_posix() + "/",
                     "command": match.group(1) if match else None,
                     "images": _size(settings),
                     "seconds": f"{seconds:,.0f}" if isinstance(seconds, (int, float)) else "–",
                     "adaptive": _adaptive(settings)})
    return rows


def records_table() -> str:
    """A list item per record: its folder, images, time and adaptive settings, then the
    command that made it."""
    lines = []
    for r in record_rows():
        facts = [r["images"] if r["images"] != "–" else "",
                 f"{r['seconds']} s" if r["seconds"] != "–" else "",
                 f"adaptive: {r['adaptive']}" if r["adaptive"] != "–" else ""]
        facts_text = "; ".join(f for f in facts if f)
        command = f"`{r['command']}`" if r["command"] else "the command is in the record"
        lines.append(f"- `{r['record']}`" + (f" ({facts_text})" if facts_text else "")
                     + f":  \n  {command}")
    return "\n".join(lines) + "\n"


def bench_table() -> str:
    rows, _ = bench_rows()
    cases: dict[tuple, dict] = {}
    for r in rows:
        key = (r["case"], tuple(r["image"]), r["batch"])
        cases.setdefault(key, {"model": r["model"]})[(r["backend"], r["precision"])] = r
    lines = ["| case (13 steps) | image | batch | reference img/s | compiled fp32 | "
             "compiled bf16 |", "|---|---|---|---|---|---|"]  # cells: img/s (x reference)
    for (case, image, batch), found in cases.items():
        cells = []
        for series in (("reference", "fp32"), ("compiled", "fp32"), ("compiled", "bf16")):
            r = found.get(series)
            if r is None:
                cells.append("–")
            elif series[0] == "reference":
                cells.append(f"{r['images_per_s']:g}")
            else:
                cells.append(f"{r['images_per_s']:g} ({r['ratio_vs_reference']:.2f}x)")
        lines.append(f"| {case} | {'x'.join(map(str, image))} | {batch} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cli_vs_script_table() -> str:
    """docs/performance.md's ``<!-- cli-vs-script -->``: every
    ``benchmarks/results/purify_cli_vs_script_*.json`` record of
    ``benchmarks/bench_purify_cli.py`` as one row per image count."""
    lines = ["| images | user script (s, each run) | `purify` (s, each run) | median img/s: "
             "script / purify | ratio | `purify`'s first run (builds the loop cache) | "
             "machine | record |", "|---|---|---|---|---|---|---|---|"]
    for path in sorted(RESULTS.glob("purify_cli_vs_script_*.json")):
        doc = json.loads(path.read_text())
        m = doc["machine"]
        machine = (f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}")
        for row in doc["results"]:
            runs = {k: ", ".join(f"{r['wall_s']:.1f}" for r in v) for k, v in row["runs"].items()}
            ips = row["images_per_s"]
            first = row.get("purify_first_run_s")
            lines.append(
                f"| {row['images']:,} | {runs['user_script']} | {runs['purify']} | "
                f"{ips['user_script']:.1f} / {ips['purify']:.1f} | "
                f"**{row['ratio_vs_user_script']:.3f}x** | "
                f"{'–' if first is None else f'{first:.1f} s'} | {machine} | "
                f"`{path.relative_to(RESULTS.parent.parent)}` |")
    return "\n".join(lines) + "\n"


def paired_cell(x, y, note: str = "") -> str:
    """Two systems' per-image outcomes on the same images: *+b / −c* (images only the first
    / only the second defends), ``note``, and the exact two-sided sign test's p."""
    b, c = int((x & ~y).sum()), int((~x & y).sum())
    return f"+{b} / −{c}{note}, p = {mcnemar_p(b, c):.2g}"


def paired_table(series: list[dict]) -> list[str]:
    """Each adaptive curve against no defense and the direct DAE on the same images, the
    detect-and-reject system correct on all held-out draws: +b / -c (images only it / only
    the other defends) and the exact sign test's two-sided p."""
    by_target = {s["label"]: s for s in series}
    others = [by_target[k] for k in ("no defense", "direct DAE") if k in by_target]
    adaptive = [s for s in series if s["target"] == "adaptive"]
    if not (others and adaptive):
        return []
    cols = [(a, o) for a in adaptive for o in others]
    lines = ["Paired, on the same attacked images (detect and reject, correct on all held-out "
             "draws): *+b / −c* = images only the adaptive system defends / only the other "
             "does; *p*: exact two-sided sign test.", "",
             "| eps | " + " | ".join(f"{a['label']} vs {o['label']}" for a, o in cols) + " |",
             "|---|" + "---|" * len(cols)]
    eps = sorted({p["eps"] for a in adaptive for p in a["points"]})
    for e in eps:
        cells = []
        for a, o in cols:
            if not all(any(p["eps"] == e for p in s["points"]) for s in (a, o)):
                cells.append("not run")
                continue
            if a["images"] != o["images"]:
                cells.append("other images")
                continue
            cells.append(paired_cell(system_defended(a, e), system_defended(o, e)))
        lines.append(f"| {e:g} | " + " | ".join(cells) + " |")
    return lines


def curves_table() -> str:
    """docs/evaluation.md's ``<!-- aware-curves -->``: per dataset, a row per eps and a column
    per defense; a cell is robust accuracy / the detect-and-reject system's accuracy, both
    the worst case over the attacks as the mean over held-out draws (correct on all draws
    in brackets), eps 0 the clean accuracy / accuracy on the accepted clean images."""
    out = []
    for name, records in CURVE_RECORDS:
        series = curve_series(records)
        if not series:
            continue
        s0 = series[0]
        others = [f"{s['label']}: the first {s['n_clean']:,} images, "
                  f"{pct(s['clean_rejected'])} %"
                  for s in series if s["record"] != s0["record"]
                  and (s["n_clean"], s["clean_rejected"]) != (s0["n_clean"], s0["clean_rejected"])]
        out += [f"**{name}**: {s0['n_clean']:,} clean test images, {s0['points'][0]['n']} "
                f"attacked per point; attacks {', '.join(s0['attacks'])} (per-image worst "
                f"case), scored on {s0['draws']} held-out noise draws; clean rejection rate "
                f"{pct(s0['clean_rejected'])} %"
                + (f" ({'; '.join(others)})" if others else "")
                + ". Cells: robust accuracy, mean over the draws "
                "(correct on all) / the detect-and-reject system's, the same; eps 0: clean "
                "accuracy / accuracy on the accepted clean images.", "",
                "| eps | " + " | ".join(s["label"] for s in series) + " |",
                "|---|" + "---|" * len(series)]
        out.append("| 0 (clean) | " + " | ".join(
            f"{pct(s['clean'])} / {pct(s['clean_accepted'])}" for s in series) + " |")
        eps = sorted({p["eps"] for s in series for p in s["points"]})
        for e in eps:
            cells = []
            for s in series:
                p = next((q for q in s["points"] if q["eps"] == e), None)
                if p is None:
                    cells.append("not run")
                    continue
                r = p.get("rejection", {})
                cells.append(f"{pct(p.get('mean', p['seed']))} ({pct(p.get('all', p['seed']))})"
                             f" / {pct(r.get('mean', r.get('seed')))} "
                             f"({pct(r.get('all', r.get('seed')))})")
            out.append(f"| {e:g} | " + " | ".join(cells) + " |")
        out += ["", *paired_table(series)]
        out += ["", "Commands: " + "; ".join(
            f"`{c}`" for c in dict.fromkeys(s["command"] for s in series)), ""]
    return "\n".join(out) + "\n"


def _budget(series: dict) -> str:
    a = series["attack_settings"]["apgd-detector"]
    starts = a.get("restarts", 1)
    return f"{a['steps']} steps, {starts} start{'s' if starts > 1 else ''}"


def strong_table() -> str:
    """docs/evaluation.md's ``<!-- detector-strong -->``: per point of ``strong_runs``, the
    detect-and-reject system's accuracy (correct on all held-out draws) on that run's images
    under the curve's attacks, under the run's stronger ``apgd-detector`` and under the
    per-image worst case of the curve's attacks and every run of the point; then the adaptive
    system against the others on the images both ran (exact sign test)."""
    out = []
    for name, _, _ in STRONG_RECORDS:
        points, worst = strong_runs(name)
        if not points:
            continue
        out += [f"**{name}**, the detect-and-reject system correct on all "
                f"{points[0]['series']['draws']} held-out draws (%), on the first *n* images of "
                "the curve's points; the last column is the per-image worst case of the curve's "
                "attacks and every stronger run of the point:", "",
                "| eps | defense | n | the curve's attacks | stronger apgd-detector | "
                "worst case of all |", "|---|---|---|---|---|---|"]
        for q in points:
            s, n = q["series"], len(q["run"])
            w = worst[s["target"], q["eps"]][:n]
            out.append(f"| {q['eps']:g} | {s['label']} | {n} | {pct(q['curve'].mean())} | "
                       f"{pct(q['run'].mean())} ({_budget(s)}) | **{pct(w.mean())}** |")
        eps = sorted({e for t, e in worst if t == "adaptive"}, reverse=True)
        if eps:
            out += ["", "Paired on the images every run of both points attacked, worst case of "
                    "all: *+b / −c* = images only the adaptive system defends / only the other "
                    "does.", "", "| eps | n | vs no defense | vs direct DAE |",
                    "|---|---|---|---|"]
            for e in eps:
                x = worst["adaptive", e]
                cells = []
                for other in ("none", "direct"):
                    y = worst.get((other, e))
                    if y is None:
                        cells.append("not run")
                        continue
                    m = min(len(x), len(y))
                    cells.append(paired_cell(x[:m], y[:m], f" (n = {m})" if m < len(x) else ""))
                out.append(f"| {e:g} | {len(x)} | " + " | ".join(cells) + " |")
        out += ["", "Commands: " + "; ".join(
            f"`{c}`" for c in dict.fromkeys(q["series"]["command"] for q in points)), ""]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(records_table() + "\n" + bench_table() + "\n" + cli_vs_script_table()
                     + "\n" + curves_table() + "\n" + strong_table())
