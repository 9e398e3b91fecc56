"""Hostile-input class 7: credentials leak. A provider's mirror password, a
signed URL's signature, a token in a fragment: none of them may reach a
rendered image, an output, a log, an error message, the cache or the
catalog. One function (:func:`cloudlets.urls.redact`) hides them wherever a
URL is shown; the fetcher alone gets them; templates get URLs without them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path
from typing import Any

import pytest

from cloudlets import Presets, Renderer
from cloudlets.catalog import ImageCatalog
from cloudlets.cli import main
from cloudlets.errors import FetchError
from cloudlets.fetch import Fetcher, RetryPolicy
from cloudlets.mirrors import MirrorRules
from cloudlets.urls import is_secret_key, redact, redact_text, strip_credentials
from tests.hostile.test_network import resolver
from tests.httpfaults import FaultServer, Route
from tests.netpolicy import host_port, loopback_policy

__all__ = ["resolver"]  # the fixture, imported for pytest

SECRET = "hunter2-S3CR3T"

# -- one redaction, over the whole list ------------------------------------------

#: Query keys whose value is a secret, in the spellings services use.
SECRET_KEYS = [
    "apikey", "api_key", "API-Key", "x-api-key", "key", "sig", "signature", "Signature",
    "session", "sessionid", "session_token", "X-Goog-Signature", "X-Goog-Credential",
    "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "AWSAccessKeyId",
    "token", "access_token", "id_token", "refresh_token", "auth", "authorization",
    "password", "passwd", "pwd", "pass", "secret", "client_secret", "private_key",
    "X%2DAmz%2DSignature", "jwt", "code", "hmac",
]
#: Keys that carry nothing secret: kept as they are, so a URL stays useful.
PLAIN_KEYS = ["a", "arch", "X-Amz-Expires", "X-Goog-Date", "X-Goog-Expires", "version",
              "socket", "path", "name"]


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_every_secret_query_key_is_redacted(key: str) -> None:
    url = f"https://storage.example/b/o.tar.gz?a=1&{key}={SECRET}&arch=x86_64"
    shown = redact(url)
    assert SECRET not in shown and f"{key}=***" in shown
    assert shown.startswith("https://storage.example/b/o.tar.gz?a=1&") and "arch=x86_64" in shown
    assert is_secret_key(key)
    assert SECRET not in redact_text(f"GET {url} failed: HTTP 403")
    assert SECRET not in redact_text(f'"GET /b/o.tar.gz?{key}={SECRET} HTTP/1.1" 403 12')
    assert SECRET not in strip_credentials(url) and "arch=x86_64" in strip_credentials(url)


@pytest.mark.parametrize("key", PLAIN_KEYS)
def test_plain_query_keys_are_kept(key: str) -> None:
    url = f"https://h.example/x?{key}=visible"
    assert not is_secret_key(key)
    assert redact(url) == url and strip_credentials(url) == url


@pytest.mark.parametrize(("url", "shown"), [
    (f"https://bob:{SECRET}@h.example/x", "https://bob:***@h.example/x"),
    (f"https://{SECRET}@h.example/x", "https://***@h.example/x"),  # a token as user
    (f"https://:{SECRET}@h.example/x", "https://***@h.example/x"),
    (f"https://bob:{SECRET}@[::1]:8080/x", "https://bob:***@[::1]:8080/x"),
    (f"https://h.example/x#access_token={SECRET}", "https://h.example/x#***"),
    (f"https://h.example/x#{SECRET}", "https://h.example/x#***"),
    (f"s3://AKIA:{SECRET}@bucket/key", "s3://AKIA:***@bucket/key"),
    (f"https://u:p@h.example/x?X-Goog-Signature={SECRET}#f",
     "https://u:***@h.example/x?X-Goog-Signature=***#***"),
    ("https://h.example/x?arch=x86_64", "https://h.example/x?arch=x86_64"),
    ("/srv/plain/path", "/srv/plain/path"),
])
def test_user_info_and_fragments_are_redacted(url: str, shown: str) -> None:
    assert redact(url) == shown
    assert SECRET not in strip_credentials(url) and "@" not in strip_credentials(url)
    assert "#" not in strip_credentials(url)


def test_an_unparseable_url_is_not_shown() -> None:
    assert SECRET not in redact(f"http://[::1:{SECRET}@x/")


# -- every call site ---------------------------------------------------------------

def _tarball() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path, data in (
                ("boot/vmlinuz", b"kernel"), ("etc/motd", b"{{ hostname }}\n"),
                ("etc/apt/sources.list",
                 b'deb {{ mirror("http://tarballs.test/debian/") }} stable main\n'
                 b'deb {{ mirror("http://plain.test/debian/?token=abc&arch=amd64") }} x\n')):
            info = tarfile.TarInfo(path)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _manifest(url: str, data: bytes) -> dict[str, Any]:
    return {"name": "creds", "version": "1.0", "arch": "x86_64",
            "filesystem": {"url": url, "sha256": hashlib.sha256(data).hexdigest()},
            "boot": {"kernel": "/boot/vmlinuz", "cmdline": "console=ttyS0"},
            "templates": ["/etc/motd", "/etc/apt/sources.list"]}


def _everything_under(root: Path) -> str:
    """Every byte of every file under ``root``, as text (tarballs unpacked)."""
    parts = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        parts.append(data.decode("latin-1"))
        if tarfile.is_tarfile(path):
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    extracted = tar.extractfile(member)
                    if extracted is not None:
                        parts.append(extracted.read().decode("latin-1"))
    return "\n".join(parts)


def test_a_mirror_password_reaches_only_the_fetcher(
        resolver: dict[str, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    data = _tarball()
    home, cache = tmp_path / "home", tmp_path / "cache"
    monkeypatch.setenv("CLOUDLETS_HOME", str(home))
    resolver["tarballs.test"] = ["10.1.1.1"]  # the origin, never reached
    with FaultServer() as server:
        route = server.add("/m/creds.tar.gz", Route(data))
        mirror = server.url("/m/").replace("http://", f"http://mirror:{SECRET}@")
        manifest = tmp_path / "m.json"
        manifest.write_text(json.dumps(_manifest("http://tarballs.test/creds.tar.gz", data)))
        out = io.StringIO()
        err = io.StringIO()
        code = main(["render", str(manifest), "-f", "tar", "-o", str(tmp_path / "out") + "/",
                     "--cache-dir", str(cache), "--mirror", f"http://tarballs.test/={mirror}",
                     "--json"], out=out, err=err)
        assert code == 0, err.getvalue()
        assert route.requests == 1
        assert route.headers[0].get("Authorization", "").startswith("Basic ")  # it was used
        listing, listing_json = io.StringIO(), io.StringIO()
        assert main(["cache", "list", "--cache-dir", str(cache)], out=listing) == 0
        assert main(["cache", "list", "--cache-dir", str(cache), "--json"],
                    out=listing_json) == 0
    result = json.loads(out.getvalue())
    assert result["details"]["tarball"]["mirror_rule"]["mirror"] == \
        redact(mirror) and "mirror:***@" in redact(mirror)
    (entry,) = ImageCatalog(home / "catalog.sqlite3").entries()
    image = _everything_under(tmp_path / "out")
    assert "deb http://127.0.0.1:" in image  # the template saw the mirror ...
    assert "/m/debian/ stable main" in image
    assert "deb http://plain.test/debian/?arch=amd64 x" in image  # ... and no secret at all
    for where, text in (("the rendered image", image), ("--json", out.getvalue()),
                        ("stderr", err.getvalue()), ("cache list", listing.getvalue()),
                        ("cache list --json", listing_json.getvalue()),
                        ("the cache's metadata", _everything_under(cache)),
                        ("the catalog entry", json.dumps(entry.to_dict())),
                        ("the catalog file", _everything_under(home)),
                        ("the logs", caplog.text)):
        assert SECRET not in text, f"the mirror's password reached {where}"
    assert "token=abc" not in image


def test_failures_and_logs_never_show_a_secret(resolver: dict[str, list[str]], tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # urllib3 logs every request line at DEBUG
    resolver["tarballs.test"] = ["10.1.1.1"]
    with FaultServer() as server:
        base = server.url("/")
        # a provider mirror that fails (404), then a redirect to a URL with user
        # info, a signature and a fragment, that fails too (500)
        server.add("/bad/x.tar.gz", Route(b"", statuses=[404]))
        server.add("/hop", Route(b"", redirect=base.replace("http://", f"http://u:{SECRET}@")
                                 + f"end?X-Goog-Signature={SECRET}&X-Goog-Credential={SECRET}"
                                 f"#token={SECRET}"))
        server.add("/end", Route(b"", statuses=[500, 500, 500]))
        rules = MirrorRules([{"prefix": "http://tarballs.test/",
                              "mirrors": [base.replace("http://", f"http://m:{SECRET}@")
                                          + "bad/"]}])
        fetcher = Fetcher(policy=loopback_policy(),
                          retry=RetryPolicy(attempts=2, backoff=0.01, max_delay=0.02))
        with pytest.raises(FetchError) as mirrored:
            fetcher.fetch("http://tarballs.test/x.tar.gz", tmp_path / "a", sha256="0" * 64,
                          mirrors=rules)
        with pytest.raises(FetchError) as redirected:
            fetcher.fetch(f"{base}hop?api_key={SECRET}", tmp_path / "b", sha256="0" * 64)
    for error in (mirrored.value, redirected.value):
        assert SECRET not in str(error) and SECRET not in str(error.url)
    assert "404" in str(mirrored.value) and "500" in str(redirected.value)
    assert "mirror failed" in caplog.text and "/end" in caplog.text
    assert SECRET not in caplog.text


def test_presets_mirrors_and_manifest_urls_are_shown_redacted(
        tmp_path: Path, resolver: dict[str, list[str]]) -> None:
    data = _tarball()
    with FaultServer() as server:
        server.add("/creds.tar.gz", Route(data))
        url = server.url("/creds.tar.gz").replace("http://", f"http://who:{SECRET}@") + \
            f"?X-Amz-Signature={SECRET}"
        manifest = tmp_path / "m.json"
        manifest.write_text(json.dumps(_manifest(url, data)))
        out = io.StringIO()
        assert main(["inspect", str(manifest)], out=out) == 0
        assert main(["inspect", str(manifest), "--json"], out=out) == 0
        assert SECRET not in out.getvalue() and "who:***@" in out.getvalue()
        rule = {"prefix": "http://tarballs.test/",
                "mirrors": [server.url("/").replace("http://", f"http://p:{SECRET}@")]}
        renderer = Renderer(cache_dir=tmp_path / "cache", data_dir=tmp_path / "data",
                            presets=Presets(values={"mirrors": [rule]}))
        result = renderer.render(_manifest("http://tarballs.test/creds.tar.gz", data),
                                 str(tmp_path / "out") + "/", "local", "tar")
        rendered = Renderer(cache_dir=tmp_path / "cache2", data_dir=tmp_path / "data",
                            ex_allow_hosts=[host_port(server.url("/"))]).render(
            _manifest(url, data), str(tmp_path / "out2") + "/", "local", "tar")
    for shown in (json.dumps(result.to_dict()), json.dumps(rendered.to_dict()),
                  _everything_under(tmp_path / "out"), _everything_under(tmp_path / "out2"),
                  repr(MirrorRules([rule])), repr(MirrorRules([rule]).rules[0]),
                  _everything_under(tmp_path / "cache"), _everything_under(tmp_path / "cache2")):
        assert SECRET not in shown
    assert result.details["tarball"]["mirror_rule"]["source"] == "presets"


def test_cache_metadata_from_an_older_version_is_shown_redacted(tmp_path: Path) -> None:
    from cloudlets.cache import TarballCache

    data = _tarball()
    source = tmp_path / "t.tar.gz"
    source.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    cache = TarballCache(tmp_path / "cache", fetcher=Fetcher(policy=loopback_policy(
        allow_file=True)))
    with cache.get(str(source), sha):
        pass
    (meta,) = (tmp_path / "cache").rglob(f"{sha}*.json")
    old = json.loads(meta.read_text())
    old["source_url"] = f"http://u:{SECRET}@old.example/t.tar.gz?sig={SECRET}"
    old["mirror_rule"] = {"prefix": "http://old.example/", "source": "config",
                          "mirror": f"http://u:{SECRET}@m.example/"}
    meta.write_text(json.dumps(old))
    out = io.StringIO()
    assert main(["cache", "list", "--cache-dir", str(tmp_path / "cache"), "--json"],
                out=out) == 0
    assert SECRET not in out.getvalue() and "u:***@m.example" in out.getvalue()


def test_invalid_mirrors_are_refused_without_echoing_their_password(tmp_path: Path) -> None:
    from cloudlets.errors import CloudletsError

    bad = [{"prefix": "http://x.example/", "mirrors": [f"http://u:{SECRET}@m.example/ x"]},
           {"prefix": "http://x.example/", "mirrors": [{"url": f"http://m/?sig={SECRET}"}]},
           {"mirrors": [f"http://u:{SECRET}@m.example/"]}]
    for rules in bad:
        with pytest.raises(CloudletsError) as info:
            Renderer(cache_dir=tmp_path, mirrors=[rules])
        assert SECRET not in str(info.value)
    with pytest.raises(CloudletsError, match="lacks 'prefix'") as info:
        MirrorRules([bad[2]])
    assert SECRET not in str(info.value)
    err = io.StringIO()
    assert main(["render", "m.json", "-f", "tar", "-o", "out/",
                 "--mirror", f"http://u:{SECRET}@m.example/"], out=io.StringIO(), err=err) != 0
    assert "expected PREFIX=URL" in err.getvalue() and SECRET not in err.getvalue()
