"""Values cannot smuggle lines: a trailing newline or a control character is
refused in every value that reaches a file name, a config file or a
shell-like context, so provider-locked keys cannot be reached through
another key."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from cloudlets.config import Presets, resolve_config, validate_config
from cloudlets.errors import ConfigError, ManifestError
from cloudlets.jsondoc import load_schema
from cloudlets.manifest import Manifest
from cloudlets.patterns import compile_pattern

SMUGGLED = ["\n", "\nnameserver 203.0.113.66", "\r", "\x00", "\x1b[2J", "\x7f", "\x0b"]

BASE: dict[str, Any] = {
    "name": "web", "version": "1.0", "description": "a cloudlet", "author": "Ann <a@b.c>",
    "filesystem": {"url": "http://mirrors.cloudlets.com/web.tar.gz", "sha256": "a" * 64},
    "boot": {"kernel": "/boot/vmlinuz", "cmdline": "console=ttyS0",
             "root": {"label": "root"}},
    "hardware": {"network": "default"},
    "templates": ["/etc/hostname"], "persistent": ["/var/lib/db"],
}

MANIFEST_FIELDS = [
    ("name",), ("version",), ("description",), ("author",), ("filesystem", "url"),
    ("filesystem", "sha256"), ("boot", "kernel"), ("boot", "cmdline"),
    ("boot", "root", "label"), ("hardware", "network"), ("templates", 0), ("persistent", 0),
]


def _set(data: dict[str, Any], path: tuple[str | int, ...], suffix: str) -> str:
    node: Any = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] += suffix
    return "".join(f"/{p}" for p in path)


@pytest.mark.parametrize("suffix", SMUGGLED, ids=repr)
@pytest.mark.parametrize("path", MANIFEST_FIELDS, ids=lambda p: "/".join(map(str, p)))
def test_manifest_values_refuse_line_breaks_and_control_characters(
        path: tuple[str | int, ...], suffix: str) -> None:
    Manifest.load(copy.deepcopy(BASE))  # the base is valid
    data = copy.deepcopy(BASE)
    where = _set(data, path, suffix)
    with pytest.raises(ManifestError) as caught:
        Manifest.load(json.dumps(data))
    assert where in [p.pointer for p in caught.value.problems]


def test_an_argument_name_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(ManifestError) as caught:
        Manifest.load({"name": "web", "args": {"host\n": {"type": "string"}}})
    assert caught.value.problems[0].pointer == "/args/host\n"


REQUEST_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"hostname": "web1"}, "/hostname"),
    ({"dns": {"search": ["corp.example"]}}, "/dns/search/0"),
    ({"dns": {"nameservers": ["192.0.2.1"]}}, "/dns/nameservers/0"),
    ({"ip": {"interfaces": [{"name": "eth0", "dhcp": True}]}}, "/ip/interfaces/0/name"),
    ({"ip": {"interfaces": [{"name": "eth0", "address": "192.0.2.5"}]}},
     "/ip/interfaces/0/address"),
    ({"ip": {"interfaces": [{"name": "eth0", "address": "fe80::5",
                             "gateway": "fe80::1"}]}}, "/ip/interfaces/0/gateway"),
    ({"ip": {"interfaces": [{"name": "eth0", "dhcp": True, "mac": "52:54:00:12:34:56"}]}},
     "/ip/interfaces/0/mac"),
    ({"ssh_authorized_keys": ["ssh-ed25519 AAAAC3Nza me@laptop"]}, "/ssh_authorized_keys/0"),
    ({"mirrors": [{"prefix": "http://mirrors.cloudlets.com/",
                   "mirrors": ["http://mirror.example/"]}]}, "/mirrors/0/mirrors/0"),
    ({"mirrors": [{"prefix": "http://mirrors.cloudlets.com/",
                   "mirrors": ["http://mirror.example/"]}]}, "/mirrors/0/prefix"),
    ({"x-note": "free text"}, "/x-note"),
]


def _pointer_set(data: dict[str, Any], where: str, suffix: str) -> None:
    node: Any = data
    keys = [int(k) if k.isdigit() else k for k in where.strip("/").split("/")]
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] += suffix


@pytest.mark.parametrize("suffix", SMUGGLED, ids=repr)
@pytest.mark.parametrize(("request_", "where"), REQUEST_FIELDS, ids=[w for _, w in REQUEST_FIELDS])
def test_config_values_refuse_line_breaks_and_control_characters(
        request_: dict[str, Any], where: str, suffix: str) -> None:
    if where == "/x-note" and suffix.startswith("\n"):
        pytest.skip("free text may hold a newline; templates decide where it goes")
    validate_config(request_)  # the base is valid
    data = copy.deepcopy(request_)
    _pointer_set(data, where, suffix)
    with pytest.raises(ConfigError) as caught:
        validate_config(data)
    assert where in [p.pointer for p in caught.value.problems]


LOCKED = Presets(values={"dns": {"nameservers": ["192.0.2.53"], "search": ["corp.example"]},
                         "mirrors": [{"prefix": "http://mirrors.cloudlets.com/",
                                      "mirrors": ["http://mirror.provider.example/"]}]},
                 locked=frozenset({"dns.nameservers", "mirrors"}))


@pytest.mark.parametrize(("request_", "where"), [
    ({"dns": {"search": ["corp.example\nnameserver 203.0.113.66"]}}, "/dns/search/0"),
    ({"dns": {"search": ["corp.example\rnameserver 203.0.113.66"]}}, "/dns/search/0"),
    ({"ip": {"interfaces": [{"name": "eth0", "address": "fe80::5",
                             "gateway": "fe80::1%eth0\nnameserver 203.0.113.66"}]}},
     "/ip/interfaces/0/gateway"),
    ({"ip": {"interfaces": [{"name": "eth0\n  dns-nameservers 203.0.113.66",
                             "dhcp": True}]}}, "/ip/interfaces/0/name"),
    ({"ip": {"interfaces": [{"name": "eth0", "dhcp": True,
                             "mac": "52:54:00:12:34:56\nnameserver 203.0.113.66"}]}},
     "/ip/interfaces/0/mac"),
    ({"hostname": "web\nnameserver 203.0.113.66"}, "/hostname"),
    ({"args": {"hostname": "web\nnameserver 203.0.113.66"}}, "/args/hostname"),
    ({"args": {"hostname": "web;reboot"}}, "/args/hostname"),
    ({"ssh_authorized_keys": ["ssh-ed25519 AAAA me\nssh-rsa AAAA attacker"]},
     "/ssh_authorized_keys/0"),
])
def test_locked_keys_cannot_be_reached_through_another_key(
        request_: dict[str, Any], where: str) -> None:
    manifest = Manifest.load({"name": "web", "args": {"hostname": {"type": "string"}}})
    with pytest.raises(ConfigError) as caught:
        resolve_config(manifest, LOCKED, {"args": {"hostname": "web"}, **request_})
    assert where in [p.pointer for p in caught.value.problems], caught.value.problems
    # and the locks themselves still hold
    with pytest.raises(ConfigError, match="locked"):
        resolve_config(manifest, LOCKED, {"args": {"hostname": "web"},
                                          "dns": {"nameservers": ["203.0.113.66"]}})
    config = resolve_config(manifest, LOCKED, {"args": {"hostname": "web"}})
    assert config.dns["nameservers"] == ["192.0.2.53"]


def test_string_arguments_are_one_line_unless_the_schema_allows_more() -> None:
    manifest = Manifest.load({"name": "web", "args": {
        "motd": {"type": "string", "default": "hi"},
        "banner": {"type": "string", "x-multiline": True, "default": "a\nb"},
        "list": {"type": "array", "default": ["a"]}}})
    assert resolve_config(manifest).args["banner"] == "a\nb"
    for name, value, where in [("motd", "hi\nthere", "/args/motd"),
                               ("list", ["a", "b\nc"], "/args/list/1"),
                               ("banner", "a\x1bb", "/args/banner")]:
        with pytest.raises(ConfigError) as caught:
            resolve_config(manifest, request={"args": {name: value}})
        assert where in [p.pointer for p in caught.value.problems]


def test_the_hostname_argument_that_stands_for_the_host_name_is_a_host_name() -> None:
    manifest = Manifest.load({"name": "web", "args": {
        "hostname": {"type": "string", "default": "web-1"}}})
    assert resolve_config(manifest).hostname == "web-1"
    # an explicit host name takes over: the argument is then only an argument
    config = resolve_config(manifest, request={"hostname": "h", "args": {"hostname": "x y"}})
    assert config.hostname == "h"


def _patterns(node: Any) -> list[str]:
    found = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("pattern"), str):
                found.append(item["pattern"])
            found.extend(k for k in item.get("patternProperties", {}))
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


@pytest.mark.parametrize("name", ["manifest-v1.json", "config-v1.json"])
def test_every_shipped_pattern_is_re2_and_anchored_at_the_very_end(name: str) -> None:
    """The audit: each pattern of the shipped schemas is matched by RE2 (where
    '$' is the end of the value, as in ECMA-262), and none lets a newline
    through by '\\s' or a negated class."""
    patterns = _patterns(load_schema(name))
    assert len(patterns) >= 8
    for pattern in patterns:
        compile_pattern(pattern)
        assert "\\s" not in pattern, pattern
        assert "(?=" not in pattern and "(?!" not in pattern, pattern


def test_a_boot_path_cannot_add_a_grub_command() -> None:
    """Paths may hold quotes and semicolons; the GRUB script quotes them."""
    import shlex

    from cloudlets.disk.bootloader import grub_config

    kernel = "/boot/x'; insmod evil; echo '"
    Manifest.load({"name": "web", "boot": {"kernel": kernel}})  # a valid tree path
    script = grub_config(kernel=kernel, initrd=None, cmdline="quiet", root_uuid="u")
    lines = script.splitlines()
    assert [shlex.split(line)[0] for line in lines] == ["search", "echo", "linux", "boot"]
    assert shlex.split(lines[1]) == ["echo", f"cloudlets: loading {kernel}"]
    assert shlex.split(lines[2])[1] == kernel
