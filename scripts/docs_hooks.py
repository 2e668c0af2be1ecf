"""MkDocs hooks (mkdocs.yml ``hooks:``): the generated parts of the documentation site.

- ``on_files``: every figure of scripts/docs_figures.py joins the site under ``generated/``,
  made in memory from the committed records on each build; nothing is written into docs/.
- ``on_page_markdown``: docs/cli.md's ``<!-- cli-reference -->`` becomes the reference that
  scripts/docs_cli_reference.py writes from the ``apudae-engine`` parser itself, and the
  ``<!-- eval-records -->``, ``<!-- bench-table -->``, ``<!-- cli-vs-script -->``,
  ``<!-- aware-curves -->`` and ``<!-- detector-strong -->`` markers become the tables that
  scripts/docs_records.py writes from the committed records.

A figure or page that a page links to and that is not made here fails ``mkdocs build
--strict``, as a broken link does.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import docs_cli_reference  # noqa: E402  (a sibling script, found through the line above)
import docs_figures  # noqa: E402
import docs_records  # noqa: E402

log = logging.getLogger("mkdocs.hooks.apudae")
GENERATED = "generated"


def on_files(files, config):
    from mkdocs.structure.files import File

    figures = docs_figures.figures()
    for name, data in figures.items():
        files.append(File.generated(config, f"{GENERATED}/{name}", content=data))
    log.info("apudae: %d generated figures", len(figures))
    return files


GENERATORS = {docs_cli_reference.MARKER: docs_cli_reference.cli_reference,
              docs_records.RECORDS_MARKER: docs_records.records_table,
              docs_records.BENCH_MARKER: docs_records.bench_table,
              docs_records.CLI_MARKER: docs_records.cli_vs_script_table,
              docs_records.CURVES_MARKER: docs_records.curves_table,
              docs_records.STRONG_MARKER: docs_records.strong_table}


def on_page_markdown(markdown, page, config, files):
    for marker, generate in GENERATORS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, generate())
    return markdown
