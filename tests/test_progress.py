"""Progress callbacks and the terminal bar."""

from __future__ import annotations

import io

from cloudlets.progress import TerminalProgress, format_bytes, null_progress, terminal_progress


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_quiet_when_not_a_terminal() -> None:
    stream = io.StringIO()
    bar = terminal_progress(stream)
    for done in range(0, 101, 10):
        bar("fetch", done, 100)
    bar("verify", 5, None)
    bar.close()
    assert stream.getvalue() == "" and not bar.enabled


def test_draws_on_a_terminal() -> None:
    stream = FakeTTY()
    bar = TerminalProgress(stream, min_interval=0, width=10)
    bar("fetch", 0, 2048)
    bar("fetch", 1024, 2048)
    bar("fetch", 2048, 2048)
    text = stream.getvalue()
    assert "\r" in text and text.endswith("\n")
    last = text.rstrip("\n").split("\r")[-1]
    assert last.startswith("fetch   [##########] 100.0% 2.0 KiB/2.0 KiB")
    assert "[#####-----]  50.0%" in text


def test_unknown_total_and_stage_change() -> None:
    stream = FakeTTY()
    bar = TerminalProgress(stream, min_interval=0)
    bar("fetch", 3 * 1024 * 1024, None)
    bar("verify", 10, 100)
    bar.close()
    lines = stream.getvalue().split("\n")
    assert lines[0].lstrip("\r").startswith("fetch   3.0 MiB")
    assert lines[1].lstrip("\r").startswith("verify  [")
    assert lines[-1] == ""


def test_redraws_are_throttled() -> None:
    stream = FakeTTY()
    bar = TerminalProgress(stream, min_interval=3600)
    for done in range(1, 100):
        bar("fetch", done, 100)
    assert stream.getvalue().count("\r") == 1  # the first report only
    bar("fetch", 100, 100)  # completion is always drawn
    assert stream.getvalue().count("\r") == 2


def test_forced_off_and_helpers() -> None:
    stream = FakeTTY()
    TerminalProgress(stream, enabled=False)("fetch", 1, 2)
    assert stream.getvalue() == ""
    null_progress("fetch", 1, None)
    assert format_bytes(0) == "0 B" and format_bytes(1536) == "1.5 KiB"
    assert format_bytes(5 * 2**40) == "5.0 TiB" and format_bytes(2**60) == "1048576.0 TiB"
