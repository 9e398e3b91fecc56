"""The on-disk memo of validations that found no problem (cloudlets.validmemo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cloudlets import ManifestError
from cloudlets.config import resolve_config
from cloudlets.errors import ConfigError
from cloudlets.manifest import Manifest
from cloudlets.validmemo import MEMO_NAME, ValidatedMemo

ROOT = Path(__file__).resolve().parent.parent

# A fresh process: a Renderer resolving the config of a manifest as a render
# does (the manifest's load, the presets, the request), then which of the
# validator's modules it imported.
_FRESH = """
import json, sys
from cloudlets import CloudletsError, Renderer
renderer = Renderer(cache_dir=sys.argv[1], data_dir=sys.argv[1] + "-data")
try:
    config = renderer.resolve_config(sys.argv[2], json.loads(sys.argv[3]))
    result = {"hostname": config.hostname, "digest": config.digest}
except CloudletsError as exc:
    result = {"error": str(exc)}
result["imported"] = sorted(m for m in ("jsonschema", "referencing") if m in sys.modules)
print(json.dumps(result))
"""


def _fresh(cache: Path, manifest: Path, request: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _FRESH, str(cache), str(manifest),
                           json.dumps(request)], env=env, capture_output=True, text=True,
                          check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_a_fresh_process_validating_known_documents_imports_no_jsonschema(
        tmp_path: Path, complete_manifest: dict[str, Any]) -> None:
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(complete_manifest), encoding="utf-8")
    cache = tmp_path / "cache"
    cache.mkdir()
    request = {"hostname": "web-02", "ip": {"interfaces": [
        {"name": "eth0", "addresses": ["192.0.2.12/24"]}]}, "args": {"motd": "hi"}}
    first = _fresh(cache, manifest, request)
    assert first["imported"] == ["jsonschema", "referencing"]  # a miss validates
    assert (cache / MEMO_NAME).exists()
    again = _fresh(cache, manifest, request)
    assert again["imported"] == []
    assert again["digest"] == first["digest"] and again["hostname"] == "web-02"
    # a new hostname is a new request document, which the quick check of the
    # config schema (cloudlets.quickschema) accepts without jsonschema
    request["hostname"] = "web-03"
    third = _fresh(cache, manifest, request)
    assert third["imported"] == [] and third["hostname"] == "web-03"
    assert third["digest"] != first["digest"]
    # one it cannot accept goes to jsonschema, which names the problem
    bad = _fresh(cache, manifest, dict(request, hostname="-web-"))
    assert bad["imported"] == ["jsonschema", "referencing"]
    assert "hostname" in bad["error"] and "-web-" in bad["error"]
    # the memo is read only by the validator that wrote it
    data = (cache / MEMO_NAME).read_bytes()
    (cache / MEMO_NAME).write_bytes(data.replace(b"documents 1 ", b"documents 1 0", 1))
    assert _fresh(cache, manifest, request)["imported"] == ["jsonschema", "referencing"]


def test_a_memo_never_makes_the_cache_directory(
        tmp_path: Path, complete_manifest: dict[str, Any]) -> None:
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(complete_manifest), encoding="utf-8")
    assert _fresh(tmp_path / "cache", manifest, {})["imported"]
    assert not (tmp_path / "cache").exists()


def _counting(memo: ValidatedMemo) -> list[str]:
    """The keys ``memo`` is asked to add (the validations that ran and found nothing)."""
    added: list[str] = []
    add = memo.add

    def counted(key: str) -> None:
        added.append(key)
        add(key)

    memo.add = counted  # type: ignore[method-assign]
    return added


def _resolve(memo: ValidatedMemo, manifest: dict[str, Any], request: dict[str, Any]) -> None:
    with memo.active():
        resolve_config(Manifest(manifest), None, request)


def test_invalid_documents_are_refused_every_time_with_their_pointers(
        tmp_path: Path, complete_manifest: dict[str, Any]) -> None:
    memo_file = tmp_path / MEMO_NAME
    complete_manifest["boot"]["kernel"] = 7
    complete_manifest["args"]["motd"] = {"type": "no-such-type"}
    for _ in (1, 2):
        memo = ValidatedMemo(memo_file, fingerprint="f")
        with memo.active(), pytest.raises(ManifestError) as caught:
            Manifest.load(json.dumps(complete_manifest))
        pointers = {p.pointer for p in caught.value.problems}
        assert {"/boot/kernel", "/args/motd/type"} <= pointers
    # nothing invalid is remembered (the valid argument schema beside it is)
    memo = ValidatedMemo(memo_file, fingerprint="f")
    with memo.active():
        from cloudlets.jsondoc import _schema_digest, memo_key
        refused_key = memo_key("schema_problems", _schema_digest("manifest-v1.json"),
                               complete_manifest)
        assert refused_key is not None and not memo.seen(refused_key)
    for _ in (1, 2):
        memo = ValidatedMemo(memo_file, fingerprint="f")
        with memo.active(), pytest.raises(ConfigError) as refused:
            resolve_config(Manifest({"name": "x"}), None, {"hostname": "-bad-"})
        assert "/hostname" in {p.pointer for p in refused.value.problems}


@pytest.fixture
def fresh_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's own sets of valid digests emptied, as a new process has them."""
    from cloudlets import manifest as module
    from cloudlets import userschema
    from cloudlets.jsondoc import ValidDigests

    def reset() -> None:
        monkeypatch.setattr(module, "_VALIDATED", ValidDigests(4096))
        monkeypatch.setattr(userschema, "_VALID_SCHEMAS", ValidDigests(4096))

    reset()
    return reset  # type: ignore[return-value]


def _run(memo: ValidatedMemo, manifest: dict[str, Any], request: dict[str, Any],
         reset: Any) -> list[str]:
    """The validations that ran and found no problem, in a "new process"."""
    reset()
    added = _counting(memo)
    _resolve(memo, manifest, request)
    return added


@pytest.mark.parametrize("damage", [
    lambda data: data[:-3],  # cut short
    lambda data: data[:60] + (b"0" if data[60:61] != b"0" else b"1") + data[61:],  # a byte
    lambda data: b"\xff" + data,
    lambda data: b"",
    lambda data: data.replace(b"documents 1", b"documents 9"),  # another layout
])
def test_a_damaged_memo_means_validate_again(tmp_path: Path, complete_manifest: dict[str, Any],
                                             fresh_process: Any, damage: Any) -> None:
    memo_file = tmp_path / MEMO_NAME
    request = {"hostname": "web"}
    assert len(_run(ValidatedMemo(memo_file, fingerprint="f"), complete_manifest, request,
                    fresh_process)) >= 3  # the manifest, its arguments, the config
    whole = memo_file.read_bytes()
    assert _run(ValidatedMemo(memo_file, fingerprint="f"), complete_manifest, request,
                fresh_process) == []
    memo_file.write_bytes(damage(whole))
    assert len(_run(ValidatedMemo(memo_file, fingerprint="f"), complete_manifest, request,
                    fresh_process)) >= 3
    assert memo_file.read_bytes() == whole  # and the memo is whole again


def test_another_validator_does_not_read_the_memo(tmp_path: Path,
                                                  complete_manifest: dict[str, Any],
                                                  fresh_process: Any) -> None:
    memo_file = tmp_path / MEMO_NAME
    request = {"hostname": "web", "args": {"motd": "hi"}}
    assert _run(ValidatedMemo(memo_file, fingerprint="f"), complete_manifest, request,
                fresh_process)
    assert _run(ValidatedMemo(memo_file, fingerprint="f"), complete_manifest, request,
                fresh_process) == []
    assert _run(ValidatedMemo(memo_file, fingerprint="g"), complete_manifest, request,
                fresh_process)
    assert _run(ValidatedMemo(memo_file), complete_manifest, request, fresh_process)


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_a_memo_others_may_write_is_ignored(tmp_path: Path, mode: int) -> None:
    memo_file = tmp_path / MEMO_NAME
    key = "ab" * 32
    memo = ValidatedMemo(memo_file, fingerprint="f")
    memo.add(key)
    memo.flush()
    assert ValidatedMemo(memo_file, fingerprint="f").seen(key)
    assert memo_file.stat().st_mode & 0o777 == 0o600
    memo_file.chmod(mode)
    assert not ValidatedMemo(memo_file, fingerprint="f").seen(key)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away needs root")
def test_a_memo_another_user_owns_is_ignored(tmp_path: Path) -> None:
    memo_file = tmp_path / MEMO_NAME
    key = "cd" * 32
    memo = ValidatedMemo(memo_file, fingerprint="f")
    memo.add(key)
    memo.flush()
    os.chown(memo_file, 12345, -1)
    assert not ValidatedMemo(memo_file, fingerprint="f").seen(key)


def test_a_memo_that_is_a_link_or_a_fifo_is_ignored(tmp_path: Path) -> None:
    real = tmp_path / "real"
    key = "ef" * 32
    memo = ValidatedMemo(real, fingerprint="f")
    memo.add(key)
    memo.flush()
    (tmp_path / "link").symlink_to(real)
    assert not ValidatedMemo(tmp_path / "link", fingerprint="f").seen(key)
    os.mkfifo(tmp_path / "fifo")
    assert not ValidatedMemo(tmp_path / "fifo", fingerprint="f").seen(key)  # and no hang


def test_the_memo_is_bounded_and_keeps_the_most_recently_used(tmp_path: Path) -> None:
    memo_file = tmp_path / MEMO_NAME
    keys = [f"{n:064x}" for n in range(6)]
    for key in keys[:4]:
        memo = ValidatedMemo(memo_file, fingerprint="f", size=4)
        memo.add(key)
        memo.flush()
    used = ValidatedMemo(memo_file, fingerprint="f", size=4)
    assert used.seen(keys[0])  # in the older half: moves to the end
    used.flush()
    for key in keys[4:]:
        memo = ValidatedMemo(memo_file, fingerprint="f", size=4)
        memo.add(key)
        memo.flush()
    reread = ValidatedMemo(memo_file, fingerprint="f", size=4)
    assert [reread.seen(key) for key in keys] == [True, False, False, True, True, True]
    assert len(memo_file.read_bytes().splitlines()) == 4 + 2
    with pytest.raises(ValueError, match="sha256"):
        reread.add("not-a-digest\n")


def test_an_unwritable_memo_only_costs_the_validation(tmp_path: Path,
                                                      complete_manifest: dict[str, Any]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    memo = ValidatedMemo(blocker / MEMO_NAME)
    with memo.active():
        assert Manifest.load(json.dumps(complete_manifest)).name == "tiny"
    assert blocker.read_text() == "not a directory"
