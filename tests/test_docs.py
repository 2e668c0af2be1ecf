"""The documentation as tests: its code runs as written, and its generated parts are complete.

Each ```python and ```bash block of README.md and of the pages under docs/ runs in its own
scratch folder that holds a copy of engine/samples, so the block's relative paths mean what
they mean in the repository root and its outputs land in the scratch folder. Python blocks run
in this interpreter's environment, bash blocks with that environment's ``apudae-engine`` on
PATH (``bash -euo pipefail``: a failing command fails the block). A block whose first line is
a comment ``# needs a GPU``, ``# needs a server``, ``# needs Ray`` or ``# needs a long run``
is skipped with that line as the reason; blocks fenced as ``text`` are not code. A block that
appears on several pages runs once.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import docs_cli_reference  # noqa: E402  (scripts/, found through the line above)
import docs_figures  # noqa: E402
import docs_records  # noqa: E402

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
RUNNABLE = {"python": [sys.executable, "-c"], "bash": ["bash", "-euo", "pipefail", "-c"]}
NOT_CODE = {"text"}
NEEDS = ("# needs a GPU", "# needs a server", "# needs Ray", "# needs a long run")


def fenced_blocks() -> list[tuple[str, str, str]]:
    """(where, language, code) of every fenced block, ``where`` as ``page:line``."""
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            out.append((f"{page.relative_to(ROOT)}:{line}", m.group(1), m.group(2)))
    return out


def runnable_blocks() -> dict[tuple[str, str], list[str]]:
    """{(language, code): [where, ...]}: each distinct runnable block once."""
    blocks: dict[tuple[str, str], list[str]] = {}
    for where, lang, code in fenced_blocks():
        if lang in RUNNABLE:
            blocks.setdefault((lang, code), []).append(where)
    return blocks


BLOCKS = runnable_blocks()


def test_every_code_block_is_python_bash_or_text():
    odd = [f"{where} ({lang or 'no language'})" for where, lang, _ in fenced_blocks()
           if lang not in RUNNABLE and lang not in NOT_CODE]
    assert not odd, "fence these as python, bash (run by this test) or text:\n" + "\n".join(odd)


def test_skipped_blocks_name_a_known_reason():
    odd = [where for where, lang, code in fenced_blocks() if lang in RUNNABLE
           and code.startswith("# needs") and not code.startswith(NEEDS)]
    assert not odd, f"a skipped block starts with one of {NEEDS}:\n" + "\n".join(odd)


def test_the_readme_has_blocks_that_run():
    readme = [k for k, where in BLOCKS.items() if any(w.startswith("README.md") for w in where)]
    assert any(lang == "python" and not code.startswith("# needs") for lang, code in readme)
    assert any(lang == "bash" and not code.startswith("# needs") for lang, code in readme)


@pytest.mark.parametrize(("lang", "code"), list(BLOCKS),
                         ids=[" ".join(where) for where in BLOCKS.values()])
def test_docs_block_runs(lang, code, tmp_path):
    first = code.splitlines()[0] if code else ""
    if first.startswith(NEEDS):
        pytest.skip(f"block marked '{first[2:]}'")
    shutil.copytree(ROOT / "engine" / "samples", tmp_path / "engine" / "samples")
    env = dict(os.environ, APUDAE_PROGRESS="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    res = subprocess.run([*RUNNABLE[lang], code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, (f"{' '.join(BLOCKS[(lang, code)])} failed "
                                 f"(exit {res.returncode}):\n{code}\n{res.stderr[-3000:]}")


def test_the_cli_reference_shows_every_flag_of_the_parser():
    text = docs_cli_reference.cli_reference()
    flags = docs_cli_reference.every_flag()
    assert "--input" in flags and "--backend" in flags
    missing = sorted(f for f in flags if f"`{f}" not in text)
    assert not missing, f"flags missing from the CLI reference: {missing}"
    assert docs_cli_reference.MARKER in (ROOT / "docs" / "cli.md").read_text()


def test_the_architecture_figure_has_a_described_package_per_layer():
    layers = docs_figures.contract_layers()
    assert layers and all(layers)
    for layer in layers:
        for module, _ in layer:
            assert (docs_figures.package_folder(module) / "__init__.py").is_file(), module
            assert docs_figures.package_summary(module), f"{module}: no docstring summary"


def test_every_figure_a_page_shows_is_made_by_the_build():
    figures = docs_figures.figures()
    assert all(data.startswith(b"\x89PNG") for data in figures.values())
    shown = {m for page in PAGES
             for m in re.findall(r"\]\(generated/([^)]+)\)", page.read_text())}
    assert shown and not shown - set(figures), f"not made by the build: {shown - set(figures)}"


def test_every_record_is_listed_with_its_command():
    rows = docs_records.record_rows()
    folders = {p.parent for p in docs_figures.RESULTS.glob("eval/*/results.md")}
    assert len(rows) == len(folders) + len(list(docs_figures.RESULTS.glob("tune/*/tune.md")))
    assert all(r["command"] for r in rows), [r["record"] for r in rows if not r["command"]]
    assert docs_records.RECORDS_MARKER in (ROOT / "docs" / "evaluation.md").read_text()
    assert docs_records.BENCH_MARKER in (ROOT / "docs" / "performance.md").read_text()


def test_the_curves_come_from_every_dataset_record_and_match_the_readme_figure():
    """Each dataset of CURVE_RECORDS has its first record (every target) committed, the
    evaluation page holds the generated table, and the README's committed figure was drawn
    from the records as they are now (redraw it with ``scripts/docs_figures.py --curves``)."""
    from PIL import Image

    for name, records in docs_figures.CURVE_RECORDS:
        series = docs_figures.curve_series(records)
        assert {s["target"] for s in series} >= {"none", "direct", "adaptive"}, name
        assert all(len(s["points"]) >= 4 for s in series), name
        for s in series:  # the paired test's per-image outcomes recount the record's tables
            for p in s["points"]:
                defended = docs_records.system_defended(s, p["eps"])
                assert len(defended) == p["n"]
                assert defended.mean() == pytest.approx(p["rejection"]["all"], abs=1e-9)
    table = docs_records.curves_table()
    for name, _ in docs_figures.CURVE_RECORDS:
        assert f"**{name}**" in table
    assert "vs no defense" in table and "other images" not in table
    assert docs_records.mcnemar_p(8, 0) == 2 / 2**8 and docs_records.mcnemar_p(0, 0) == 1.0
    assert docs_records.mcnemar_p(3, 3) == 1.0
    assert docs_records.CURVES_MARKER in (ROOT / "docs" / "evaluation.md").read_text()
    readme = (ROOT / "README.md").read_text()
    assert docs_figures.CURVES.relative_to(ROOT).as_posix() in readme
    # The stronger detector-aware runs: on the curve's images, at least as strong as the
    # curve's attacks combined (the last column is the per-image worst case of both).
    strong = docs_records.strong_table()
    assert docs_records.STRONG_MARKER in (ROOT / "docs" / "evaluation.md").read_text()
    for name, _, records in docs_records.STRONG_RECORDS:
        assert f"**{name}**" in strong
        for s in docs_figures.curve_series(records):
            assert s["attacks"] == ["apgd-detector"], s["record"]
    cells = re.findall(r"\| ([\d.]+) \| ([\d.]+) \(\d+ steps.*?\| \*\*([\d.]+)\*\* \|", strong)
    assert cells and all(float(w) <= min(float(c), float(s)) for c, s, w in cells)
    with Image.open(docs_figures.CURVES) as png:
        drawn_from = png.info.get("Description")
    assert drawn_from == docs_figures.curves_digest(docs_figures.curve_rows()), \
        "docs/figures/aware_curves.png is stale: python scripts/docs_figures.py --curves"
