"""Progress: one log line per update when stderr is not a terminal; a bar that logs above it."""

from __future__ import annotations

import logging

from apudae_engine.core.progress import progress


def test_lines_mode_logs_done_total_rate_eta_and_fields(monkeypatch, caplog):
    monkeypatch.delenv("APUDAE_PROGRESS", raising=False)  # pytest's stderr is not a TTY
    with caplog.at_level(logging.INFO, logger="apudae_engine.progress"), \
            progress(total=2500, initial=500, desc="purify", unit="img") as bar:
        for _ in range(4):
            bar.update(500)
            bar.set_postfix(ok=bar.n, failed=0, flagged=3)
    lines = [r.getMessage() for r in caplog.records if r.name == "apudae_engine.progress"]
    assert len(lines) == 4  # one line per batch, not only the first and the last
    assert lines[0].startswith("purify: 1000/2500 (40 %), ") and "img/s, ETA " in lines[0]
    assert lines[-1].startswith("purify: 2500/2500 (100 %)") and "ETA" not in lines[-1]
    # The fields describe the batches committed before the line: ok equals the count shown.
    assert "ok 1500, failed 0, flagged 3" in lines[2]


def test_bar_mode_writes_log_records_above_the_bar(monkeypatch, capsys):
    monkeypatch.setenv("APUDAE_PROGRESS", "1")
    logger = logging.getLogger("apudae_engine.test")
    with progress(total=3, desc="purify", unit="img") as bar:
        bar.update(1)
        logger.warning("a message during the run")
        bar.update(2)
    err = capsys.readouterr().err
    assert "a message during the run" in err and "3/3" in err


def test_off_prints_and_logs_nothing(monkeypatch, capsys, caplog):
    monkeypatch.setenv("APUDAE_PROGRESS", "0")
    with caplog.at_level(logging.INFO), progress(total=2, desc="x") as bar:
        bar.update(2)
    assert not capsys.readouterr().err and not caplog.records
