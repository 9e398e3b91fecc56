"""The cloudlets command: commands, JSON output, exit codes."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cloudlets.cli import EXIT_CODES, main, parse_set
from cloudlets.manifest import Manifest


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_exit_codes_are_distinct_and_documented() -> None:
    assert sorted(EXIT_CODES) == [0, 1, 2, 3, 4, 5, 6, 7, 130, 141, 143]
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


def test_parse_set_indexes_and_appends() -> None:
    parsed = parse_set([
        "ip.interfaces.0.name=eth0",
        'ip.interfaces.0.addresses=["192.0.2.10/24"]',
        "ip.interfaces.0.addresses+=2001:db8::10/64",
        'ip.interfaces+={"name": "eth1", "dhcp": true}',
        "dns.nameservers+=1.1.1.1",
        " dns.nameservers +=9.9.9.9",
    ], into={"dns": {"nameservers": ["192.0.2.53"]}})
    assert parsed == {
        "ip": {"interfaces": [
            {"name": "eth0", "addresses": ["192.0.2.10/24", "2001:db8::10/64"]},
            {"name": "eth1", "dhcp": True}]},
        "dns": {"nameservers": ["192.0.2.53", "1.1.1.1", "9.9.9.9"]},
    }


def test_set_append_onto_a_locked_list_is_invalid_input(complete_manifest: dict[str, Any],
                                                        tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps(complete_manifest))
    presets = tmp_path / "presets.json"
    presets.write_text(json.dumps({"config": {"dns": {"search": ["a.example"]}},
                                   "locked": ["dns.search"]}))
    code, _, err = run("render", str(path), "-f", "raw", "-o", str(tmp_path) + "/",
                       "--presets", str(presets), "--set", "dns.search+=b.example")
    assert code == 3 and "'dns.search' is locked" in err
    code, _, err = run("render", str(path), "-f", "raw", "-o", str(tmp_path) + "/",
                       "--set", "ip.interfaces.2.name=eth2")
    assert code == 3 and "use an index from 0 to 0" in err


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


# -- render end to end ------------------------------------------------------------

@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Cache and catalog under the test's directory; a fixed clock."""
    monkeypatch.setenv("CLOUDLETS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CLOUDLETS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    return tmp_path


def test_render_json_prints_the_result(cli_env: Path) -> None:
    from tests.test_catalog import make_cloudlet

    manifest = write_manifest(cli_env, make_cloudlet(cli_env / "src", name="web", version="3.1"))
    code, out, err = run("render", str(manifest), "--format", "raw", "--output",
                         str(cli_env / "out") + "/", "--allow-file-urls",
                         "--set", "args.motd=bonjour", "--set", "hostname=web-9", "--json")
    assert code == 0, err
    result = json.loads(out)
    disk = cli_env / "out" / "web-3.1.raw"
    assert result["image_id"].startswith("img-")
    assert result["manifest"] == {"name": "web", "version": "3.1",
                                  "digest": result["manifest"]["digest"]}
    assert len(result["manifest"]["digest"]) == 64
    [artifact] = result["artifacts"]
    assert artifact["location"] in (str(disk), disk.as_uri())
    assert artifact["size"] == disk.stat().st_size
    assert artifact["sha256"] == hashlib.sha256(disk.read_bytes()).hexdigest()
    assert result["details"]["rootfs"]["templates"] == ["/etc/motd"]
    assert result["catalog"]["existing"] is False
    # The render is recorded in the catalog: `cloudlets images` lists it.
    code, out, _ = run("images", "--json")
    [listed] = json.loads(out)["images"]
    assert listed["image_id"] == result["image_id"] and listed["status"] == "ready"
    assert listed["entry_id"] == result["catalog"]["entry_id"]
    same = ("render", str(manifest), "-f", "raw", "-o", str(cli_env / "out") + "/",
            "--allow-file-urls", "--set", "args.motd=bonjour", "--set", "hostname=web-9")
    # The same request again prints the existing image and exits 0, rendering nothing.
    before = disk.stat().st_mtime_ns
    code, out, err = run(*same)
    assert code == 0, err
    assert f"already rendered as raw to local: image {result['image_id']}" in out
    assert str(disk) in out and disk.stat().st_mtime_ns == before
    # --force renders it again (same image id, a new catalog entry).
    code, out, err = run(*same, "--force", "--json")
    assert code == 0, err
    forced = json.loads(out)
    assert forced["image_id"] == result["image_id"]
    assert forced["catalog"] == {"entry_id": forced["catalog"]["entry_id"], "existing": False}
    assert forced["catalog"]["entry_id"] != result["catalog"]["entry_id"]
    assert disk.stat().st_mtime_ns != before
    # Without the catalog, the same output is refused (no silent overwrite), exit 4.
    code, _, err = run(*same, "--no-catalog")
    assert code == 4 and "refusing to overwrite" in err
    code, out, _ = run("images", "--json")
    assert [i["status"] for i in json.loads(out)["images"]] == ["ready"]


def test_render_no_catalog_records_nothing(cli_env: Path) -> None:
    from tests.test_catalog import make_cloudlet

    manifest = write_manifest(cli_env, make_cloudlet(cli_env / "src"))
    code, out, err = run("render", str(manifest), "-f", "tar", "-o", str(cli_env / "out") + "/",
                         "--allow-file-urls", "--no-catalog", "--json")
    assert code == 0, err
    assert "catalog" not in json.loads(out)
    assert not (cli_env / "home" / "catalog.sqlite3").exists()


def test_render_passes_driver_options(cli_env: Path) -> None:
    from tests.test_catalog import make_cloudlet

    manifest = write_manifest(cli_env, make_cloudlet(cli_env / "src"))
    sizes = {}
    for compress in ("false", "true"):
        out_dir = cli_env / f"out-{compress}"
        code, out, err = run("render", str(manifest), "-f", "qcow2", "-o", str(out_dir) + "/",
                             "--allow-file-urls", "-F", f"ex_compress={compress}", "--json")
        assert code == 0, err
        sizes[compress] = json.loads(out)["artifacts"][0]["size"]
    assert sizes["true"] < sizes["false"]  # the JSON boolean reached Qcow2Format


def test_unknown_driver_option_names_what_the_driver_takes(cli_env: Path) -> None:
    from tests.test_catalog import make_cloudlet

    manifest = write_manifest(cli_env, make_cloudlet(cli_env / "src"))
    code, _, err = run("render", str(manifest), "-f", "qcow2", "-o", str(cli_env / "o") + "/",
                       "--allow-file-urls", "-F", "ex_colour=blue")
    assert code == 5
    assert "format driver 'qcow2'" in err and "ex_colour" in err and "ex_compress" in err
    code, _, err = run("render", str(manifest), "-f", "raw", "-o", str(cli_env / "o") + "/",
                       "--allow-file-urls", "-S", "no-equals-sign")
    assert code == 3 and "--storage-option 'no-equals-sign': expected KEY=VALUE" in err
    assert not (cli_env / "o").exists()


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = directory / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def test_log_flags_and_the_library_never_prints(cli_env: Path) -> None:
    import logging

    def warn(args: Any, out: Any) -> int:
        logging.getLogger("cloudlets.test").warning("a warning from the library")
        logging.getLogger("cloudlets.test").info("an info line")
        return 0

    import cloudlets.cli as cli

    original = cli._cmd_drivers
    try:
        cli._cmd_drivers = warn  # type: ignore[assignment]
        # the handler was bound when the parser was built: rebuild per call
        for argv, shown in ((["drivers"], ["warning"]), (["-q", "drivers"], []),
                            (["-v", "drivers"], ["warning", "info"]),
                            (["--log-level", "ERROR", "drivers"], [])):
            code, _, err = run(*argv)
            assert code == 0
            assert ("cloudlets: warning: a warning from the library" in err) == (
                "warning" in shown), (argv, err)
            assert ("cloudlets: info: an info line" in err) == ("info" in shown), (argv, err)
    finally:
        cli._cmd_drivers = original  # type: ignore[assignment]
    # Without the command line, nothing reaches stderr (no last-resort handler).
    done = subprocess.run([sys.executable, "-c", "import logging, cloudlets; "
                           "logging.getLogger('cloudlets.x').warning('hidden')"],
                          capture_output=True, text=True, timeout=60, check=False,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and done.stderr == ""


def test_render_progress_json_reports_bytes_stored(cli_env: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_catalog import make_cloudlet

    manifest = write_manifest(cli_env, make_cloudlet(cli_env / "src"))
    code = main(["render", str(manifest), "-f", "raw", "-o", str(cli_env / "out") + "/",
                 "--allow-file-urls", "--progress", "json", "--no-catalog"],
                out=io.StringIO(), err=io.StringIO())
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    stages = [line["stage"] for line in lines]
    assert {"rootfs", "convert", "store"} <= set(stages)
    stored = [line for line in lines if line["stage"] == "store" and line["total"]]
    disk = cli_env / "out" / "tiny-1.0.raw"
    assert stored[-1]["done"] == stored[-1]["total"] == disk.stat().st_size


def _stage_lines(lines: list[dict[str, Any]], stage: str) -> list[dict[str, Any]]:
    """A stage's JSON progress lines after its start line, checked in order."""
    mine = [line for line in lines if line["stage"] == stage]
    assert mine[0]["done"] == 0 and mine[0]["total"] is None, mine  # the stage starts
    measured = mine[1:]
    assert measured and all(line["total"] and line["done"] > 0 for line in measured), mine
    assert len({line["total"] for line in measured}) == 1, mine
    dones = [line["done"] for line in measured]
    assert dones == sorted(dones) and dones[-1] <= measured[0]["total"], mine
    return measured


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_render_progress_json_reports_disk_and_convert_bytes(
        cli_env: Path, capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    import os
    import tarfile

    from tests.test_catalog import make_cloudlet

    cloudlet = make_cloudlet(cli_env / "src")
    tarball = Path(cloudlet["filesystem"]["url"])
    with tarfile.open(tarball, "w:gz", compresslevel=1) as tar:  # a few MiB to move
        for path, data in (("boot/vmlinuz", b"kernel"), ("etc/motd", b"{{ hostname }}\n"),
                           ("usr/lib/blob", os.urandom(3 * 1024 * 1024))):
            info = tarfile.TarInfo(path)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    cloudlet["filesystem"]["sha256"] = hashlib.sha256(tarball.read_bytes()).hexdigest()
    manifest = write_manifest(cli_env, cloudlet)
    code = main(["render", str(manifest), "-f", fmt, "-o", str(cli_env / "out") + "/",
                 "--allow-file-urls", "--progress", "json", "--no-catalog"],
                out=io.StringIO(), err=io.StringIO())
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert all(set(line) == {"stage", "done", "total", "elapsed"} for line in lines)
    disk = _stage_lines(lines, "disk")
    assert disk[-1]["done"] == disk[-1]["total"] > 3 * 1024 * 1024  # the tree, at least
    converted = _stage_lines(lines, "convert")
    output = cli_env / "out" / f"tiny-1.0.{fmt}"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(output)],
                                     capture_output=True, check=True, timeout=60).stdout)
    assert converted[-1]["done"] == converted[-1]["total"] == info["virtual-size"]
    stages = [line["stage"] for line in lines]
    assert stages.index("disk") < stages.index("convert") < stages.index("store")


@pytest.fixture
def manifest_path(tmp_path: Path, complete_manifest: dict[str, Any]) -> Path:
    path = tmp_path / "m.json"
    path.write_text(json.dumps(complete_manifest))
    return path


def _uncommented(text: str) -> str:
    """The example presets with every setting uncommented."""
    lines = []
    for line in text.splitlines():
        if line.startswith("# "):
            line = line[2:]
        elif line == "#":
            line = ""
        lines.append(line)
    return "\n".join(lines) + "\n"


def test_init_writes_a_commented_presets_file(tmp_path: Path, manifest_path: Path) -> None:
    from cloudlets import Presets, resolve_config

    target = tmp_path / "presets.toml"
    code, out, _ = run("init", str(target))
    assert code == 0 and str(target) in out
    assert Presets.load(target) == Presets()  # as written it presets nothing
    code, _, err = run("init", str(target))
    assert code == 3 and "exists already (--force replaces it)" in err
    full = tmp_path / "full.toml"
    full.write_text(_uncommented(target.read_text()))
    presets = Presets.load(full)
    assert presets.locked == {"dns.nameservers", "ssh_authorized_keys"}
    assert presets.values["ip"]["interfaces"][0]["addresses"] == ["192.0.2.10/24",
                                                                   "2001:db8::10/64"]
    config = resolve_config(Manifest.load(manifest_path), presets, {})
    assert config.dns["nameservers"] == ["192.0.2.53", "2001:db8::53"]
    assert config.interfaces[1]["dhcp"] is True and config.mirrors
    target.write_text("changed")
    assert run("init", str(target), "--force")[0] == 0
    assert target.read_text().startswith("## cloudlets provider presets")


def test_render_config_reads_a_presets_document(tmp_path: Path, manifest_path: Path) -> None:
    presets = tmp_path / "presets.toml"
    presets.write_text('locked = ["hostname"]\n[config]\nhostname = "fixed"\n')
    code, _, err = run("render", str(manifest_path), "-f", "raw", "-o", str(tmp_path) + "/",
                       "--config", str(presets), "--set", "hostname=mine")
    assert code == 3 and "'hostname' is locked by the provider preset" in err
    code, _, err = run("render", str(manifest_path), "-f", "raw", "-o", str(tmp_path) + "/",
                       "--config", str(presets), "--presets", str(presets))
    assert code == 3 and "give presets once" in err
    bad = tmp_path / "bad.toml"
    bad.write_text('[config]\nhostname = 1979-05-27\n')
    code, _, err = run("render", str(manifest_path), "-f", "raw", "-o", str(tmp_path) + "/",
                       "--config", str(bad))
    assert code == 3 and "/config/hostname" in err


def test_every_command_is_in_the_help_and_the_docs() -> None:
    from cloudlets.cli import _build_parser

    parser = _build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = sorted(action.choices)
    assert {"init", "render", "serve", "images", "image", "cache"} <= set(commands)
    code, out, _ = run("--help")
    assert code == 0
    docs = (Path(__file__).resolve().parents[1] / "docs" / "cli.rst").read_text()
    for command in commands:
        assert re.search(rf"^    {re.escape(command)}\s", out, re.M), command
        assert f"``cloudlets {command}" in docs, command


def test_a_command_that_logs_on_its_own_logs_each_record_once(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    import cloudlets.cli_serve as cli_serve

    root = logging.getLogger()
    before = list(root.handlers)

    def serve(args: Any, out: Any) -> int:
        cli_serve.log_to_stderr("info", frozenset())
        logging.getLogger("cloudlets.service.test").warning("served once")
        return 0

    monkeypatch.setattr(cli_serve, "cmd_serve", serve)
    try:
        err = io.StringIO()
        assert main(["serve"], out=io.StringIO(), err=err) == 0
    finally:
        for handler in root.handlers[len(before):]:
            root.removeHandler(handler)
    assert "served once" not in err.getvalue()  # not the command line's handler too
    assert capsys.readouterr().err.count("served once") == 1
