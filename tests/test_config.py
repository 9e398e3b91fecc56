"""Render config: schema, merge order, locked presets, manifest args."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from cloudlets import ConfigError, LockedKeyError, Manifest, Presets, resolve_config
from cloudlets.config import set_dotted


@pytest.fixture
def manifest(complete_manifest: dict[str, Any]) -> Manifest:
    return Manifest.load(complete_manifest)


PRESETS = Presets(
    values={"ip": {"interfaces": [{"name": "eth0", "address": "192.0.2.10", "prefix": 24,
                                   "gateway": "192.0.2.1"}]},
            "dns": {"nameservers": ["192.0.2.53"], "search": ["example.net"]},
            "hostname": "preset-host"},
    locked=frozenset({"ip", "dns.nameservers"}),
)


def test_merge_order_manifest_defaults_then_presets_then_request(manifest: Manifest) -> None:
    config = resolve_config(manifest, PRESETS, {"hostname": "asked", "args": {"motd": "hi"}})
    assert config.hostname == "asked"
    assert config.args == {"hostname": "tiny-host", "motd": "hi"}
    assert config.interfaces[0]["address"] == "192.0.2.10"
    assert config.dns == {"nameservers": ["192.0.2.53"], "search": ["example.net"]}


def test_preset_applies_when_request_is_silent(manifest: Manifest) -> None:
    assert resolve_config(manifest, PRESETS, {}).hostname == "preset-host"


def test_hostname_falls_back_to_arg_then_manifest_name(manifest: Manifest,
                                                       complete_manifest: dict[str, Any]) -> None:
    assert resolve_config(manifest).hostname == "tiny-host"
    del complete_manifest["args"]
    assert resolve_config(Manifest.load(complete_manifest)).hostname == "tiny"


@pytest.mark.parametrize(("request_", "locked"), [
    ({"ip": {"interfaces": [{"name": "eth0", "dhcp": True}]}}, "ip"),
    ({"dns": {"nameservers": ["198.51.100.1"]}}, "dns.nameservers"),
    ({"dns": {"nameservers": []}}, "dns.nameservers"),
])
def test_locked_preset_cannot_be_overridden(manifest: Manifest, request_: dict[str, Any],
                                            locked: str) -> None:
    with pytest.raises(LockedKeyError) as caught:
        resolve_config(manifest, PRESETS, request_)
    assert caught.value.keys == [locked]
    assert f"'{locked}' is locked" in str(caught.value)


def test_unlocked_sibling_of_locked_key_is_allowed(manifest: Manifest) -> None:
    config = resolve_config(manifest, PRESETS, {"dns": {"search": ["corp.example"]}})
    assert config.dns["search"] == ["corp.example"]
    assert config.dns["nameservers"] == ["192.0.2.53"]


def test_parent_of_locked_key_is_refused(manifest: Manifest) -> None:
    presets = Presets(values={"dns": {"nameservers": ["192.0.2.53"]}},
                      locked=frozenset({"dns.nameservers"}))
    with pytest.raises(LockedKeyError):
        resolve_config(manifest, presets, {"dns": {"nameservers": ["192.0.2.54"],
                                                   "search": []}})


@pytest.mark.parametrize(("request_", "pointer", "fragment"), [
    ({"hostname": "bad_host!"}, "/hostname", "not a valid host name"),
    ({"ip": {"interfaces": [{"name": "eth0", "address": "300.1.1.1"}]}},
     "/ip/interfaces/0/address", "not an IPv4 or IPv6 address"),
    ({"ip": {"interfaces": [{"name": "eth0"}]}}, "/ip/interfaces/0",
     "needs 'addresses' or 'address'"),
    ({"ip": {"interfaces": [{"name": "eth0", "addresses": ["192.0.2.1"]}]}},
     "/ip/interfaces/0/addresses/0", "CIDR notation"),
    ({"ip": {"interfaces": [{"name": "eth0", "addresses": ["192.0.2.1/33"]}]}},
     "/ip/interfaces/0/addresses/0", "192.0.2.1/33"),
    ({"ip": {"interfaces": [{"name": "eth0", "addresses": ["1.2.3.4/8\n"]}]}},
     "/ip/interfaces/0/addresses/0", "CIDR notation"),
    ({"ip": {"interfaces": [{"name": "eth0", "addresses": ["192.0.2.1/24"],
                             "address": "192.0.2.1"}]}},
     "/ip/interfaces/0", "not both"),
    ({"ip": {"interfaces": [{"name": "eth0", "addresses": []}]}},
     "/ip/interfaces/0/addresses", ""),
    ({"ip": {"interfaces": [{"name": "eth0", "dhcp": True}, {"name": "eth0", "dhcp": True}]}},
     "/ip/interfaces/1/name", "listed twice"),
    ({"ip": {"interfaces": [{"name": "eth0", "address": "192.0.2.1", "prefix": 33}]}},
     "/ip/interfaces/0/prefix", "longer than 32"),
    ({"ip": {"interfaces": [{"name": "eth0", "dhcp": True, "mac": "zz"}]}},
     "/ip/interfaces/0/mac", "not a MAC address"),
    ({"dns": {"nameservers": ["dns.google"]}}, "/dns/nameservers/0", "not an IPv4"),
    ({"ssh_authorized_keys": ["hello"]}, "/ssh_authorized_keys/0", "OpenSSH public key"),
    ({"mirrors": [{"prefix": "ftp://x/", "mirrors": ["http://y/"]}]}, "/mirrors/0/prefix",
     "URL prefix"),
    ({"args": {"motd": 5}}, "/args/motd", "5 is not a string"),
    ({"args": {"nosuch": "x"}}, "/args/nosuch", "unknown key"),
    ({"colour": "blue"}, "/colour", "unknown key"),
])
def test_invalid_request_names_the_key(manifest: Manifest, request_: dict[str, Any],
                                       pointer: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_config(manifest, None, request_)
    found = [(p.pointer, p.message) for p in caught.value.problems]
    assert any(p == pointer and fragment in m for p, m in found), found


def test_required_arg_without_default(complete_manifest: dict[str, Any]) -> None:
    complete_manifest["args"]["token"] = {"type": "string", "minLength": 8}
    manifest = Manifest.load(complete_manifest)
    with pytest.raises(ConfigError) as caught:
        resolve_config(manifest)
    assert [p.pointer for p in caught.value.problems] == ["/args/token"]
    with pytest.raises(ConfigError, match="too short"):
        resolve_config(manifest, None, {"args": {"token": "short"}})
    assert resolve_config(manifest, None, {"args": {"token": "long-enough"}}).args["token"] \
        == "long-enough"


def test_config_digest_tracks_content(manifest: Manifest) -> None:
    first = resolve_config(manifest, None, {"hostname": "a", "dns": {"search": ["x.org"]}})
    same = resolve_config(manifest, None, {"dns": {"search": ["x.org"]}, "hostname": "a"})
    other = resolve_config(manifest, None, {"hostname": "b"})
    assert first.digest == same.digest != other.digest


def test_presets_are_validated() -> None:
    with pytest.raises(ConfigError, match="presets"):
        Presets(values={"hostname": "-bad-"})


def test_presets_load_from_file(tmp_path: Path, manifest: Manifest) -> None:
    path = tmp_path / "presets.json"
    path.write_text(json.dumps({"config": {"hostname": "p"}, "locked": ["hostname"]}))
    presets = Presets.load(path)
    with pytest.raises(LockedKeyError, match="'hostname' is locked"):
        resolve_config(manifest, presets, {"hostname": "q"})
    path.write_text(json.dumps({"config": {}, "lock": []}))
    with pytest.raises(ConfigError, match="/lock"):
        Presets.load(path)


def test_set_dotted_builds_levels() -> None:
    data: dict[str, Any] = {}
    set_dotted(data, "dns.search", ["a"])
    set_dotted(data, "dns.nameservers", ["192.0.2.1"])
    assert data == {"dns": {"search": ["a"], "nameservers": ["192.0.2.1"]}}
    with pytest.raises(ConfigError, match=re.escape("'dns.search' is a list of 1")):
        set_dotted(data, "dns.search.x", 1)
    with pytest.raises(ConfigError, match=re.escape("'dns.search.0' is not an object")):
        set_dotted(data, "dns.search.0.x", 1)
    with pytest.raises(ConfigError, match="not a dotted key"):
        set_dotted(data, "a..b", 1)


def test_interfaces_have_every_key_for_templates(manifest: Manifest) -> None:
    config = resolve_config(manifest, None, {"ip": {"interfaces": [
        {"name": "eth0", "address": "192.0.2.10"},
        {"name": "eth1", "address": "2001:db8::1"},
        {"name": "eth2", "dhcp": True, "mtu": 9000}]}})
    eth0, eth1, eth2 = config.interfaces
    assert eth0 == {"name": "eth0", "dhcp": False, "address": "192.0.2.10", "prefix": 24,
                    "addresses": ["192.0.2.10/24"], "gateway": None, "mac": None,
                    "mtu": None}
    assert eth1["prefix"] == 64
    assert eth2["dhcp"] is True and eth2["prefix"] is None and eth2["mtu"] == 9000
    assert eth1["addresses"] == ["2001:db8::1/64"] and eth2["addresses"] == []


def test_interfaces_take_cidr_addresses(manifest: Manifest) -> None:
    config = resolve_config(manifest, None, {"ip": {"interfaces": [
        {"name": "eth0", "addresses": ["192.0.2.10/26", "2001:db8::10/48"],
         "gateway": "192.0.2.1"}]}})
    (eth0,) = config.interfaces
    assert eth0["addresses"] == ["192.0.2.10/26", "2001:db8::10/48"]
    assert (eth0["address"], eth0["prefix"]) == ("192.0.2.10", 26)


def test_set_dotted_indexes_and_appends() -> None:
    data: dict[str, Any] = {}
    set_dotted(data, "ip.interfaces.0.name", "eth0")
    set_dotted(data, "ip.interfaces.0.addresses", ["192.0.2.10/24"])
    set_dotted(data, "ip.interfaces.1.name", "eth1")
    set_dotted(data, "ip.interfaces.0.addresses", "198.51.100.7/24", append=True)
    set_dotted(data, "dns.nameservers", "1.1.1.1", append=True)
    set_dotted(data, "dns.nameservers", ["9.9.9.9", "8.8.8.8"], append=True)
    assert data == {"ip": {"interfaces": [
        {"name": "eth0", "addresses": ["192.0.2.10/24", "198.51.100.7/24"]},
        {"name": "eth1"}]}, "dns": {"nameservers": ["1.1.1.1", "9.9.9.9", "8.8.8.8"]}}
    set_dotted(data, "ip.interfaces.1", {"name": "eth9", "dhcp": True})
    assert data["ip"]["interfaces"][1] == {"name": "eth9", "dhcp": True}
    with pytest.raises(ConfigError, match="use an index from 0 to 2"):
        set_dotted(data, "ip.interfaces.3.name", "eth3")
    with pytest.raises(ConfigError, match="a list of 3"):
        set_dotted(data, "dns.nameservers.first", "x")
    data["hostname"] = "h"
    with pytest.raises(ConfigError, match="'hostname' is not a list to add to"):
        set_dotted(data, "hostname", "x", append=True)


def _lock_table() -> list[tuple[str, str, str]]:
    """The rows of docs/config.rst's table of locks: (locked, --set, result)."""
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "config.rst").read_text()
    rows = re.findall(r"^   \* - ``(.+?)``\n     - ``(.+?)``\n     - (.+)$", text, re.M)
    assert len(rows) >= 10, "the table of locks in docs/config.rst"
    return rows


@pytest.mark.parametrize(("locked", "item", "result"), _lock_table())
def test_locks_behave_as_the_docs_table_says(manifest: Manifest, locked: str, item: str,
                                             result: str) -> None:
    from cloudlets.cli import parse_set

    presets = Presets(values={
        "hostname": "preset", "dns": {"nameservers": ["192.0.2.53"], "search": ["a.example"]},
        "ip": {"interfaces": [{"name": "eth0", "dhcp": True}]},
        "ssh_authorized_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 provider"],
        "args": {"motd": "preset"}}, locked=frozenset({locked}))
    request = parse_set([item])
    if result.startswith("refused"):
        with pytest.raises(LockedKeyError, match=re.escape(repr(locked))):
            resolve_config(manifest, presets, request)
    else:
        assert result.startswith("accepted"), result
        config = resolve_config(manifest, presets, request)
        merged = config.to_dict()
        node: Any = merged
        for part in locked.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        expected: Any = presets.values
        for part in locked.split("."):
            expected = expected.get(part) if isinstance(expected, dict) else None
        assert node == expected, f"the locked {locked} changed"


def test_config_files_may_be_toml(tmp_path: Path) -> None:
    from cloudlets.config import is_presets_document, load_config_file

    request = tmp_path / "request.toml"
    request.write_text('hostname = "web1"\n[[ip.interfaces]]\nname = "eth0"\n'
                       'addresses = ["192.0.2.10/24"]\n')
    data = load_config_file(request)
    assert data == {"hostname": "web1",
                    "ip": {"interfaces": [{"name": "eth0", "addresses": ["192.0.2.10/24"]}]}}
    assert not is_presets_document(data)
    presets = tmp_path / "presets.toml"
    presets.write_text('locked = ["hostname"]\n[config]\nhostname = "p"\n')
    assert is_presets_document(load_config_file(presets))
    assert Presets.load(presets) == Presets(values={"hostname": "p"},
                                            locked=frozenset({"hostname"}))
    for text, fragment in ((b'hostname = "a\n', "not TOML"), (b"x = '\xff'\n", "not UTF-8"),
                           (b"when = 1979-05-27T07:32:00Z\n", "/when")):
        request.write_bytes(text)
        with pytest.raises(ConfigError, match=re.escape(fragment)) as caught:
            load_config_file(request)
        assert str(request) in str(caught.value)
    (tmp_path / "presets.json").write_text(json.dumps({"config": []}))
    with pytest.raises(ConfigError, match="/config: must be an object"):
        Presets.load(tmp_path / "presets.json")
