"""Hostile-input class 11: terminals and signals. What a manifest says never
reaches a terminal as escape sequences, and SIGTERM or SIGINT in mid-render
leave nothing behind (work directory, half-written artifact, an entry stuck
``rendering``), exiting 143 and 130. Real processes, real signals, a real
loopback HTTP server that stalls the download."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cloudlets.catalog import ImageCatalog, ImageStatus
from cloudlets.cli import EXIT_INTERRUPTED, EXIT_TERMINATED, main
from cloudlets.cli_output import escape_controls
from cloudlets.drivers.storage.local import LocalStorage
from tests.httpfaults import FaultServer, Route
from tests.netpolicy import allow_args
from tests.test_catalog import make_cloudlet

ROOT = Path(__file__).resolve().parents[2]
ESC = "\x1b"
HOSTILE = (f"{ESC}]0;owned{ESC}\\ {ESC}[2J{ESC}[31mred\x07\x08\x9b31m "
           "\u202egnp.exe\u202c")


def test_escape_controls_leaves_no_control_character() -> None:
    escaped = escape_controls(HOSTILE + "\ttab\nline")
    assert not any(ch in escaped for ch in (ESC, "\x07", "\x08", "\x9b", "\u202e", "\u202c"))
    assert "\\x1b]0;owned" in escaped and "\\u202e" in escaped
    assert escaped.endswith("\ttab\nline")  # newline and tab stay: they are layout


def test_inspect_and_errors_escape_what_the_manifest_says(tmp_path: Path) -> None:
    manifest = make_cloudlet(tmp_path / "src")
    # description and author refuse C0 controls (they reach the OVF's XML);
    # C1 controls, bidi overrides and volatile patterns still reach inspect.
    described = "\x9b31m \u202egnp.exe\u202c"
    manifest["description"] = described
    manifest["volatile"] = [f"{ESC}]0;owned{ESC}\\\\", f"{ESC}\\[8mhidden"]
    path = tmp_path / "m.json"
    path.write_text(json.dumps(manifest))
    out, err = io.StringIO(), io.StringIO()
    assert main(["inspect", str(path)], out=out, err=err) == 0
    assert ESC not in out.getvalue() and "\u202e" not in out.getvalue()
    assert "\\x1b]0;owned" in out.getvalue()
    # JSON output escapes them itself, and the value round-trips exactly.
    out = io.StringIO()
    assert main(["inspect", str(path), "--json"], out=out, err=err) == 0
    assert ESC not in out.getvalue()
    assert json.loads(out.getvalue())["description"] == described
    assert json.loads(out.getvalue())["volatile"] == manifest["volatile"]
    # Errors naming hostile values are escaped too.
    err = io.StringIO()
    assert main(["validate", f"{ESC}]0;x\x07.json"], out=io.StringIO(), err=err) != 0
    assert ESC not in err.getvalue() and "\x07" not in err.getvalue()


def test_interrupted_upload_leaves_no_partial_file(tmp_path: Path) -> None:
    storage = LocalStorage(root=str(tmp_path))

    def chunks() -> Any:
        yield b"x" * 65536
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        storage.upload(chunks(), "out/disk.raw")
    assert not (tmp_path / "out").exists()  # not even the directory the upload made


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, EXIT_TERMINATED),
                                             (signal.SIGINT, EXIT_INTERRUPTED)])
def test_signal_mid_render_cleans_up_and_exits_with_its_code(
        tmp_path: Path, signum: int, code: int) -> None:
    manifest = make_cloudlet(tmp_path / "src")
    tarball = Path(manifest["filesystem"]["url"]).read_bytes()
    work, home = tmp_path / "tmp", tmp_path / "home"
    work.mkdir()
    with FaultServer() as server:
        # The download stalls half-way: the render is in flight, its work
        # directory made and its catalog entry rendering, when the signal comes.
        server.add("/tiny.tar.gz", Route(tarball, stall_after=len(tarball) // 2))
        manifest["filesystem"]["url"] = server.url("/tiny.tar.gz")
        path = tmp_path / "m.json"
        path.write_text(json.dumps(manifest))
        env = {**os.environ, "TMPDIR": str(work), "CLOUDLETS_HOME": str(home),
               "CLOUDLETS_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
        process = subprocess.Popen(
            [sys.executable, "-m", "cloudlets", "render", str(path), "-f", "tar", "-o",
             str(tmp_path / "out") + "/", *allow_args(server.url("/"))],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while not list(work.glob("cloudlets-render-*")):
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline, "the render never started"
                time.sleep(0.05)
            time.sleep(0.3)
            process.send_signal(signum)
            _, stderr = process.communicate(timeout=45)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    assert list(work.iterdir()) == []  # no work directory, no lock, nothing
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))
    (entry,) = ImageCatalog(home / "catalog.sqlite3").entries()
    assert entry.status is ImageStatus.FAILED
    assert entry.error_type == ("Terminated" if signum == signal.SIGTERM else "KeyboardInterrupt")


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CLOUDLETS_HOME": str(tmp_path)}
    # The reader exits at once, long before the command writes: every write fails.
    done = subprocess.run(
        f"'{sys.executable}' -m cloudlets drivers --json | true; echo ${{PIPESTATUS[0]}}",
        shell=True, executable="/bin/bash", env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=60, check=False)
    assert done.stdout.strip() == "141"
    assert done.stderr == "", done.stderr
