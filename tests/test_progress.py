"""Progress callbacks and the terminal bar."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from cloudlets.disk.tools import read_position
from cloudlets.drivers.formats import qemuimg
from cloudlets.drivers.formats.qemuimg import ConvertProgress
from cloudlets.errors import FormatError
from cloudlets.progress import (
    StageMeter,
    TerminalProgress,
    format_bytes,
    null_progress,
    terminal_progress,
)
from cloudlets.tools import STDERR_TAIL, run_streaming

MIB = 1024 * 1024


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


# -- StageMeter ----------------------------------------------------------------

def _recorder() -> tuple[list[tuple[str, int, int | None]], Any]:
    seen: list[tuple[str, int, int | None]] = []
    return seen, lambda stage, done, total: seen.append((stage, done, total))


def test_stage_meter_throttles_by_bytes_never_goes_back_and_ends_at_total() -> None:
    seen, report = _recorder()
    meter = StageMeter(report, "disk", 10 * MIB, step=MIB)
    for done in (1, 2, MIB // 2, MIB, MIB - 5, MIB + 3, 3 * MIB, 2 * MIB, 20 * MIB):
        meter.update(done)
    meter.finish()
    meter.finish()  # said once
    assert seen == [("disk", MIB, 10 * MIB), ("disk", 3 * MIB, 10 * MIB),
                    ("disk", 10 * MIB, 10 * MIB)]


def test_stage_meter_parts_are_scaled_into_their_slots() -> None:
    seen, report = _recorder()
    meter = StageMeter(report, "disk", 4 * MIB, step=1)
    first, second = meter.part(MIB), meter.part(3 * MIB)
    first(50, 100)  # a percentage: half of the first slot
    first(2, 1)  # past its own total: its slot's end, not beyond
    second(MIB)  # default total: the slot's size
    second(-7, 10)  # garbage moves nothing
    second(0, 0)
    assert [done for _, done, _ in seen] == [MIB // 2, MIB, 2 * MIB]
    meter.finish()
    assert seen[-1] == ("disk", 4 * MIB, 4 * MIB)


def test_stage_meter_without_a_callback_or_a_total_reports_nothing() -> None:
    seen, report = _recorder()
    for meter in (StageMeter(None, "disk", MIB), StageMeter(report, "disk", 0)):
        meter.part(MIB)(MIB)
        meter.update(5 * MIB)
        meter.finish()
    assert seen == []


# -- qemu-img convert -p --------------------------------------------------------

def _parsed(chunks: list[bytes], total: int = 1000) -> tuple[list[int], ConvertProgress]:
    seen: list[int] = []

    def report(done: int, whole: int | None = None) -> None:
        assert whole == total
        seen.append(done)

    reader = ConvertProgress(report, total)
    for chunk in chunks:
        reader.feed(chunk)
    return seen, reader


def test_qemu_img_progress_read_in_pieces() -> None:
    text = b"".join(b"    (%.2f/100%%)\r" % value for value in (0, 2, 4, 50.5, 100))
    assert _parsed([text])[0] == [1000]  # one report per read: the furthest
    assert _parsed([text[:16], text[16:32], text[32:48], text[48:]])[0] == [20, 40, 1000]
    for size in (1, 3, 7, 16):  # updates cut anywhere: each read once it ends
        pieces = [text[i:i + size] for i in range(0, len(text), size)]
        seen = _parsed(pieces)[0]
        assert seen[-1] == 1000 and seen == sorted(set(seen))
        assert set(seen) <= {20, 40, 505, 1000}
    assert _parsed([text[i:i + 1] for i in range(len(text))])[0] == [20, 40, 505, 1000]


def test_qemu_img_progress_hostile_output_moves_nothing_wrong() -> None:
    chunks = [
        b"\x00\xff garbage (12.50/100%\r",  # no closing parenthesis
        b"(999.00/100%)\r(101/100%)\r(-5.00/100%)\r(1e9/100%)\r",  # out of range
        b"qemu-img: warning: something\n",
        b"    (30.00/100%)\r    (10.00/100%)\r",  # going back is ignored
        b"(" + b"9" * 5000 + b"/100%)\r",  # no number that long
        b"x" * 100_000,  # a line that never ends
        b"(40.00/100%)",  # ...so this, glued to it, is dropped
        b"\r(60.00/100%)\r",
        b"(70.00/100%)",  # not finished yet: waits for its end
    ]
    seen, reader = _parsed(chunks)
    assert seen == [300, 600]
    assert len(reader._pending) <= ConvertProgress.MAX_PENDING
    reader.feed(b"\r")
    assert seen == [300, 600, 700] and reader.percent == 70.0


def test_convert_reports_progress_from_real_qemu_img(tmp_path: Path) -> None:
    source = tmp_path / "disk.raw"
    with open(source, "wb") as handle:
        for _ in range(32):
            handle.write(os.urandom(MIB))
    seen: list[tuple[int, int | None]] = []
    qemuimg.convert(source, tmp_path / "disk.qcow2", "qcow2",
                    progress=lambda done, total=None: seen.append((done, total)))
    assert qemuimg.info(tmp_path / "disk.qcow2")["format"] == "qcow2"
    assert len(seen) > 2 and seen[-1] == (32 * MIB, 32 * MIB)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert {total for _, total in seen} == {32 * MIB}


def test_convert_with_progress_fails_naming_qemu_img_and_its_error(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match=r"qemu-img failed with exit code 1: .*missing\.raw"):
        qemuimg.convert(tmp_path / "missing.raw", tmp_path / "out.qcow2", "qcow2",
                        progress=lambda done, total=None: None)


# -- streaming a tool's output ------------------------------------------------------

def test_run_streaming_hands_over_bounded_chunks_in_order(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    (tmp_path / "data").write_bytes(data)
    chunks: list[bytes] = []
    run_streaming("cat", [tmp_path / "data"], error=FormatError, on_stdout=chunks.append,
                  timeout=60)
    assert b"".join(chunks) == data and max(map(len, chunks)) <= 4096


def test_run_streaming_times_out_and_keeps_only_the_stderr_tail() -> None:
    with pytest.raises(FormatError, match=r"sleep did not finish within 0.3 s"):
        run_streaming("sleep", ["30"], error=FormatError, on_stdout=lambda data: None,
                      timeout=0.3)
    script = "import sys; sys.stderr.write('x' * 100000 + 'THE END'); sys.exit(3)"
    with pytest.raises(FormatError) as caught:
        run_streaming(sys.executable, ["-c", script], error=FormatError,
                      on_stdout=lambda data: None, timeout=60)
    message = str(caught.value)
    assert "exit code 3" in message and message.endswith("THE END")
    assert len(message) < STDERR_TAIL + 200


def test_read_position_sees_where_a_process_reads(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(bytes(10_000))
    with open(path, "rb") as handle:
        handle.seek(1234)
        assert read_position(os.getpid(), path) == 1234
    assert read_position(os.getpid(), path) is None
