"""Manifest v1: loading from every source, validation messages, digest."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cloudlets import Manifest, ManifestError
from cloudlets.jsondoc import JSONSyntaxError, load_schema, parse_json, parse_size
from tests.netpolicy import loopback_fetcher

GOOD: dict[str, Any] = {
    "name": "web",
    "version": "2.1",
    "arch": "x86_64",
    "filesystem": {"url": "http://mirrors.cloudlets.com/web.tar.gz", "sha256": "0" * 64},
    "boot": {"kernel": "/boot/vmlinuz"},
    "args": {"hostname": {"type": "string", "default": "web"}},
    "templates": ["/etc/hostname"],
    "volatile": ["/tmp/.+"],
}


def mutate(change: dict[str, Any] | None = None, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """GOOD with top-level or dotted ``change`` applied and ``drop`` keys removed."""
    data = copy.deepcopy(GOOD)
    for dotted, value in (change or {}).items():
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    for dotted in drop:
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node[part]
        del node[parts[-1]]
    return data


# (id, manifest, expected pointer, expected message fragment)
BAD: list[tuple[str, Any, str, str]] = [
    ("missing-name", mutate(drop=("name",)), "/name", "is required"),
    ("name-uppercase", mutate({"name": "Web"}), "/name", "not a valid cloudlet name"),
    ("name-space", mutate({"name": "my web"}), "/name", "not a valid cloudlet name"),
    ("name-too-long", mutate({"name": "a" * 129}), "/name", "at most 128"),
    ("name-number", mutate({"name": 5}), "/name", "not a valid cloudlet name"),
    ("version-space", mutate({"version": "1 0"}), "/version", "not a valid version"),
    ("arch-unknown", mutate({"arch": "sparc"}), "/arch", "not a known architecture"),
    ("unknown-key", mutate({"colour": "blue"}), "/colour", "unknown key"),
    ("description-number", mutate({"description": 3}), "/description", "is not a string"),
    ("fs-missing-url", mutate(drop=("filesystem.url",)), "/filesystem/url", "is required"),
    ("fs-missing-sha", mutate(drop=("filesystem.sha256",)), "/filesystem/sha256",
     "is required"),
    ("fs-sha-short", mutate({"filesystem.sha256": "abc"}), "/filesystem/sha256",
     "'abc' is not a 64-character hex digest"),
    ("fs-sha-upper", mutate({"filesystem.sha256": "A" * 64}), "/filesystem/sha256",
     "64-character hex digest"),
    ("fs-size-zero", mutate({"filesystem.size": 0}), "/filesystem/size",
     "not a positive number of bytes"),
    ("fs-size-string", mutate({"filesystem.size": "1k"}), "/filesystem/size",
     "not a positive number of bytes"),
    ("fs-compression", mutate({"filesystem.compression": "rar"}), "/filesystem/compression",
     "not a known compression"),
    ("fs-unknown-key", mutate({"filesystem.md5": "x"}), "/filesystem/md5", "unknown key"),
    ("fs-url-blank", mutate({"filesystem.url": " http://x/"}), "/filesystem/url",
     "not a usable URL"),
    ("fs-not-object", mutate({"filesystem": "http://x/a.tgz"}), "/filesystem",
     "is not an object"),
    ("boot-missing-kernel", mutate(drop=("boot.kernel",)), "/boot/kernel", "is required"),
    ("boot-kernel-relative", mutate({"boot.kernel": "boot/vmlinuz"}), "/boot/kernel",
     "not an absolute path inside the tree"),
    ("boot-kernel-dotdot", mutate({"boot.kernel": "/boot/../../etc/shadow"}), "/boot/kernel",
     "not an absolute path inside the tree"),
    ("boot-firmware", mutate({"boot.firmware": "efi"}), "/boot/firmware",
     "'efi' is not a firmware type"),
    ("boot-mbr-uefi", mutate({"boot.firmware": "uefi", "boot.partition_table": "mbr"}),
     "/boot/partition_table", "cannot boot firmware 'uefi'"),
    ("boot-fstype", mutate({"boot.root": {"fstype": "xfs"}}), "/boot/root/fstype",
     "not a supported root filesystem type"),
    ("boot-root-size", mutate({"boot.root": {"size": "lots"}}), "/boot/root/size",
     "is not a size"),
    ("boot-root-size-negative", mutate({"boot.root": {"size": -5}}), "/boot/root/size",
     "is not a size"),
    ("boot-label-long", mutate({"boot.root": {"label": "a" * 17}}), "/boot/root/label",
     "not a valid filesystem label"),
    ("boot-cmdline-newline", mutate({"boot.cmdline": "quiet\ninit=/bin/sh"}),
     "/boot/cmdline", "single-line"),
    ("args-bad-name", mutate({"args": {"host-name": {"type": "string"}}}), "/args/host-name",
     "not a valid argument name"),
    ("args-not-schema", mutate({"args": {"hostname": "debian"}}), "/args/hostname",
     "not a JSON Schema object"),
    ("args-default-type", mutate({"args": {"port": {"type": "integer", "default": "80"}}}),
     "/args/port/default", "'80' is not an integer"),
    ("args-invalid-schema", mutate({"args": {"port": {"type": "int"}}}), "/args/port/type",
     "not a valid JSON Schema"),
    ("templates-not-list", mutate({"templates": "/etc/hostname"}), "/templates",
     "is not an array"),
    ("templates-duplicate", mutate({"templates": ["/etc/a", "/etc/a"]}), "/templates",
     "duplicate"),
    ("templates-relative", mutate({"templates": ["etc/hostname"]}), "/templates/0",
     "not an absolute path inside the tree"),
    ("template-volatile", mutate({"templates": ["/tmp/motd"]}), "/templates/0",
     "dropped by volatile pattern /volatile/0"),
    ("volatile-bad-regex", mutate({"volatile": ["/var/(log"]}), "/volatile/0",
     "not a valid regular expression"),
    ("persistent-double-slash", mutate({"persistent": ["/var//log"]}), "/persistent/0",
     "not an absolute path inside the tree"),
    ("template-syntax", mutate({"template_syntax": "erb"}), "/template_syntax",
     "not a template syntax"),
    ("manifest-version", mutate({"manifest_version": 2}), "/manifest_version",
     "not a supported manifest version"),
    ("hardware-cpus", mutate({"hardware": {"cpus": 0}}), "/hardware/cpus",
     "not a CPU count"),
    ("hardware-memory", mutate({"hardware": {"memory": "big"}}), "/hardware/memory",
     "is not a size"),
]


@pytest.mark.parametrize(("data", "pointer", "fragment"),
                         [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_manifest_names_problem_and_pointer(data: Any, pointer: str, fragment: str) -> None:
    with pytest.raises(ManifestError) as caught:
        Manifest.load(data)
    found = {(p.pointer, p.message) for p in caught.value.problems}
    assert any(p == pointer and fragment in m for p, m in found), found
    assert f"{pointer}: " in str(caught.value)


def test_at_least_thirty_distinct_bad_manifests() -> None:
    assert len({case[0] for case in BAD}) >= 30


@pytest.mark.parametrize(("text", "fragment"), [
    ('{"name": "x",\n  "version": }', "line 2, column 14"),
    ('{"name": "x", "name": "y"}', "duplicate key 'name'"),
    ('{"name": "x", "x-n": NaN}', "NaN is not valid JSON"),
    ('["name"]', "must be a JSON object"),
    ('{"name": "x"', "line 1"),
])
def test_invalid_json_reports_where(text: str, fragment: str) -> None:
    with pytest.raises(ManifestError) as caught:
        Manifest.load(text)
    assert fragment in str(caught.value)


@pytest.mark.parametrize(("body", "expected"), [
    (b'\xef\xbb\xbf{"a": "\xc3\xa9"}', {"a": "\u00e9"}),
    (b'{"a": 1}', {"a": 1}),
])
def test_json_bytes_are_utf8_with_an_optional_byte_order_mark(
        body: bytes, expected: Any) -> None:
    assert parse_json(body) == expected


@pytest.mark.parametrize(("body", "fragment"), [
    (b'\xef\xbb\xbf\xef\xbb\xbf{}', "line 1, column 1"),  # one mark only
    (b'{"a": "\xff"}', "not UTF-8 text (byte 7)"),
    (b'\xef\xbb{}', "not UTF-8 text (byte 0)"),
])
def test_json_bytes_that_are_not_one_utf8_document(body: bytes, fragment: str) -> None:
    with pytest.raises(JSONSyntaxError) as caught:
        parse_json(body)
    assert fragment in str(caught.value)


def test_a_byte_order_mark_costs_no_codec_import() -> None:
    """The service parses its first create body on the event loop: the mark is
    stripped without the utf-8-sig codec, whose module loads on first use."""
    script = ("import sys\n"
              "from cloudlets.jsondoc import parse_json\n"
              "assert parse_json(b'\\xef\\xbb\\xbf{}') == {}\n"
              "print('encodings.utf_8_sig' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False"]


def test_every_problem_reported_at_once() -> None:
    data = mutate({"name": "Bad Name", "filesystem.sha256": "abc", "boot.firmware": "efi",
                   "colour": 1})
    with pytest.raises(ManifestError) as caught:
        Manifest.load(data)
    pointers = [p.pointer for p in caught.value.problems]
    assert pointers == sorted(pointers)
    assert {"/name", "/filesystem/sha256", "/boot/firmware", "/colour"} <= set(pointers)
    assert "4 problems" in str(caught.value)


def test_dotcloud_manifest_loads_unchanged(dotcloud_manifest_path: Path) -> None:
    original = json.loads(dotcloud_manifest_path.read_text())
    manifest = Manifest.load(dotcloud_manifest_path)
    assert manifest.to_dict() == original
    assert manifest.name == "debian-5.0"
    assert manifest.arch == "i386"
    assert manifest.args == {"hostname": {"type": "string", "default": "debian-host"}}
    assert manifest.templates == ["/etc/hostname"]
    assert manifest.persistent == ["/var/log"]
    assert len(manifest.volatile) == 21


def test_dotcloud_manifest_says_what_a_render_needs(dotcloud_manifest_path: Path) -> None:
    manifest = Manifest.load(dotcloud_manifest_path)
    with pytest.raises(ManifestError) as caught:
        manifest.require_renderable()
    pointers = [p.pointer for p in caught.value.problems]
    assert pointers == ["/filesystem", "/boot"]
    assert "url" in caught.value.problems[0].message
    assert "kernel" in caught.value.problems[1].message


def test_extension_keys_are_accepted_and_digested() -> None:
    plain = Manifest.load(GOOD)
    extended = Manifest.load(mutate({"x-provider": {"tier": "gold"}}))
    assert extended.extensions == {"x-provider": {"tier": "gold"}}
    assert extended.digest != plain.digest


def test_digest_is_stable_across_key_order_and_whitespace() -> None:
    compact = json.dumps(GOOD, separators=(",", ":"))
    spaced = json.dumps(dict(reversed(list(GOOD.items()))), indent=7)
    assert Manifest.load(compact).digest == Manifest.load(spaced).digest
    assert Manifest.load(compact).digest == Manifest.load(GOOD).digest
    assert Manifest.load(mutate({"version": "2.2"})).digest != Manifest.load(GOOD).digest


def test_load_from_path_file_url_and_http(tmp_path: Path,
                                          static_http: tuple[str, Path]) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps(GOOD))
    base, root = static_http
    (root / "m.json").write_text(json.dumps(GOOD, indent=2))
    digests = {
        Manifest.load(path).digest,
        Manifest.load(str(path)).digest,
        Manifest.load(path.as_uri()).digest,
        Manifest.load(f"{base}/m.json", fetcher=loopback_fetcher()).digest,
        Manifest.load(json.dumps(GOOD)).digest,
    }
    assert digests == {Manifest.load(GOOD).digest}


def test_http_errors_are_manifest_errors(static_http: tuple[str, Path]) -> None:
    base, _ = static_http
    with pytest.raises(ManifestError, match="HTTP 404"):
        Manifest.load(f"{base}/missing.json", fetcher=loopback_fetcher())
    with pytest.raises(ManifestError, match="rule 'loopback'"):  # the default policy
        Manifest.load(f"{base}/missing.json")


def test_missing_file_names_path(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as caught:
        Manifest.load(tmp_path / "nope.json")
    assert "nope.json" in str(caught.value)
    assert "cannot read" in str(caught.value)


def test_typed_accessors_apply_defaults() -> None:
    manifest = Manifest.load(mutate({"arch": "amd64", "boot.root": {"size": "2G"}}))
    boot = manifest.boot
    assert boot is not None
    assert (boot.firmware, boot.partition_table, boot.fstype) == ("bios", "gpt", "ext4")
    assert boot.root_size == 2 * 1024 ** 3
    assert manifest.arch == "x86_64"
    assert manifest.label == "web-2.1"
    assert manifest.filesystem is not None and manifest.filesystem.compression == "auto"
    assert manifest.hardware["memory"] == 512 * 1024 * 1024


def test_data_is_read_only() -> None:
    manifest = Manifest.load(GOOD)
    with pytest.raises(TypeError):
        manifest.data["name"] = "other"  # type: ignore[index]


@pytest.mark.parametrize(("text", "expected"), [
    ("512M", 512 * 1024 ** 2), ("2G", 2 * 1024 ** 3), ("2GiB", 2 * 1024 ** 3),
    ("1.5K", 1536), ("100", 100), (4096, 4096), ("3 MB", 3 * 1024 ** 2),
])
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "2X", "", "G", True])
def test_parse_size_rejects(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_schema_is_draft_2020_12() -> None:
    from jsonschema import Draft202012Validator

    schema = load_schema("manifest-v1.json")
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)


def count_validations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the schema validations :class:`Manifest` runs (the real ones)."""
    calls = [0]
    problems = Manifest._problems

    def counted(data: Any) -> Any:
        calls[0] += 1
        return problems(data)

    monkeypatch.setattr(Manifest, "_problems", staticmethod(counted))
    return calls


def test_the_same_valid_document_is_validated_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_validations(monkeypatch)
    data = mutate({"name": "cached-once"})
    first = Manifest(data)
    reordered = json.loads(json.dumps(data, sort_keys=True))
    again = Manifest.load(json.dumps(reordered, indent=2))  # other bytes, same document
    assert calls == [1]
    assert first.digest == again.digest
    Manifest(mutate({"name": "cached-once", "version": "2.2"}))  # another document
    assert calls == [2]


def test_an_invalid_document_is_refused_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_validations(monkeypatch)
    bad = mutate({"name": "not cached", "boot.kernel": 7})
    for _ in range(2):
        with pytest.raises(ManifestError, match="/boot/kernel"):
            Manifest(bad)
    assert calls == [2]


def test_a_document_that_json_cannot_tell_apart_is_not_taken_from_the_cache(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_validations(monkeypatch)
    Manifest(mutate({"name": "tuple-twin"}))
    # the same canonical JSON, but a tuple is not an array to the schema
    with pytest.raises(ManifestError, match="/templates"):
        Manifest(mutate({"name": "tuple-twin", "templates": ("/etc/hostname",)}))
    assert calls == [2]


def test_an_arguments_schema_is_checked_once_and_a_bad_one_always() -> None:
    from cloudlets.userschema import _VALID_SCHEMAS, check_schema

    good = {"type": "integer", "minimum": 3, "x-test": "checked-once"}
    assert check_schema(good, ["args", "a"]) == []
    assert _VALID_SCHEMAS.seen(str(_VALID_SCHEMAS.key(good)))
    bad = {"type": "no-such-type", "x-test": "checked-always"}
    for _ in range(2):
        (problem,) = check_schema(bad, ["args", "b"])
        assert problem.pointer.startswith("/args/b") and "not a valid JSON Schema" in \
            problem.message
    assert not _VALID_SCHEMAS.seen(str(_VALID_SCHEMAS.key(bad)))


def test_valid_digests_are_bounded() -> None:
    from cloudlets.jsondoc import ValidDigests

    kept = ValidDigests(3)
    keys = [str(kept.key({"n": n})) for n in range(5)]
    for key in keys:
        kept.add(key)
    assert [kept.seen(key) for key in keys] == [False, False, True, True, True]
