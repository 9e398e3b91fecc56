"""The cloudlets command: commands, JSON output, exit codes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cloudlets.cli import EXIT_CODES, main, parse_set


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_exit_codes_are_distinct_and_documented() -> None:
    assert sorted(EXIT_CODES) == [0, 1, 2, 3, 4, 5]
    code, out, _ = run("--help")
    assert code == 0
    for number, meaning in EXIT_CODES.items():
        assert f"{number}  {meaning}" in out


def test_validate_dotcloud(dotcloud_manifest_path: Path) -> None:
    code, out, _ = run("validate", str(dotcloud_manifest_path))
    assert code == 0
    assert "valid manifest debian-5.0" in out
    assert "note: /filesystem" in out and "note: /boot" in out


def test_validate_renderable_fails_for_dotcloud(dotcloud_manifest_path: Path) -> None:
    code, out, err = run("validate", "--renderable", "--json", str(dotcloud_manifest_path))
    assert code == 3
    report = json.loads(out)
    assert [p["pointer"] for p in report["problems"]] == ["/filesystem", "/boot"]
    assert "ManifestError" in err


def test_invalid_manifest_json_lists_problems(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"name": "Bad", "filesystem": {"url": "x", "sha256": "abc"}}))
    code, out, _ = run("validate", str(path), "--json")
    assert code == 3
    problems = {p["pointer"]: p["message"] for p in json.loads(out)["problems"]}
    assert problems["/filesystem/sha256"] == "'abc' is not a 64-character hex digest"
    assert "/name" in problems


def test_invalid_json_reports_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "name": "x",\n  oops\n}')
    code, _, err = run("validate", str(path))
    assert code == 3
    assert "line 3, column 3" in err


def test_render_dotcloud_names_what_is_missing(dotcloud_manifest_path: Path,
                                              tmp_path: Path) -> None:
    code, _, err = run("render", str(dotcloud_manifest_path), "--format", "raw",
                       "--output", str(tmp_path / "out") + "/")
    assert code == 3
    assert "/filesystem: a render needs the root filesystem tarball" in err
    assert "/boot: a render needs to know how the image boots" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [
    ("render",),
    ("render", "m.json", "--output", "x"),
    ("frobnicate",),
    ("validate",),
])
def test_usage_errors_exit_2(argv: tuple[str, ...]) -> None:
    code, _, _ = run(*argv)
    assert code == 2


def test_unknown_format_is_a_setup_error(complete_manifest: dict[str, Any],
                                         tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps(complete_manifest))
    code, _, err = run("render", str(path), "-f", "floppy", "-o", str(tmp_path) + "/")
    assert code == 5
    assert "no format driver named 'floppy'" in err


def test_locked_key_via_set_is_invalid_input(complete_manifest: dict[str, Any],
                                             tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps(complete_manifest))
    presets = tmp_path / "presets.json"
    presets.write_text(json.dumps({"config": {"hostname": "fixed"}, "locked": ["hostname"]}))
    code, _, err = run("render", str(path), "-f", "raw", "-o", str(tmp_path) + "/",
                       "--presets", str(presets), "--set", "hostname=mine")
    assert code == 3
    assert "'hostname' is locked by the provider preset" in err


def test_parse_set_json_and_strings() -> None:
    parsed = parse_set([
        'ip.interfaces=[{"name": "eth0", "dhcp": true}]',
        "hostname=web1",
        "args.count=3",
        "args.label=3x",
        "dns.search=[\"a.example\"]",
    ])
    assert parsed == {
        "ip": {"interfaces": [{"name": "eth0", "dhcp": True}]},
        "hostname": "web1",
        "args": {"count": 3, "label": "3x"},
        "dns": {"search": ["a.example"]},
    }


def test_parse_set_rejects_missing_equals() -> None:
    from cloudlets import ConfigError

    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_set(["hostname"])


def test_drivers_lists_builtins_with_capabilities() -> None:
    code, out, _ = run("drivers", "--json")
    assert code == 0
    report = json.loads(out)
    storage = {row["name"]: row for row in report["storage"]}
    assert storage["local"]["available"] is True
    assert "ATOMIC" in storage["local"]["capabilities"]
    formats = {row["name"]: row for row in report["format"]}
    assert {"raw", "qcow2", "tar"} <= set(formats)
    code, text, _ = run("drivers")
    assert "local" in text and "atomic" in text


def test_inspect_shows_args_and_render_needs(dotcloud_manifest_path: Path) -> None:
    code, out, _ = run("inspect", str(dotcloud_manifest_path))
    assert code == 0
    assert 'arg hostname: string = "debian-host"' in out
    assert "volatile: 21" in out
    code, out, _ = run("inspect", "--json", str(dotcloud_manifest_path))
    info = json.loads(out)
    assert info["arch"] == "i386" and info["templates"] == ["/etc/hostname"]


def test_module_entry_point_runs() -> None:
    result = subprocess.run([sys.executable, "-m", "cloudlets", "--version"],
                            capture_output=True, text=True, timeout=60, check=False,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0
    assert result.stdout.startswith("cloudlets ")
