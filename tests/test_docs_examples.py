"""The documentation's runnable examples, run as a reader would run them.

Every ``.. code-block:: python`` or ``.. code-block:: shell`` of
``README.rst`` or a page under ``docs/`` whose options include ``:class:
runnable`` is executed: Python in a new interpreter, shell with ``bash -e -o
pipefail`` (the ``cloudlets`` command and this interpreter first on
``PATH``). Each block runs in its own empty directory holding ``web.json``,
the manifest shown on ``docs/drivers/index.rst`` (its ``:caption: web.json``
block), whose tarball is served from 127.0.0.1; the tarball cache is shared,
so it is fetched once; ``$TMPDIR`` is the block's own.

Every other Python or shell block, and every literal (``::``) block that
starts with a command, is listed in :data:`NOT_RUN` with the reason it is
not run here: a command the docs show is either run or accounted for.

Host names under ``example.net`` that storage examples write to are
replaced in the block's text before it runs:

* ``https://[user:password@]dav.example.net/`` → nginx with WebDAV
  (``tests/nginx_fixture.py``), its basic-auth area, a fresh directory per
  block;
* ``https://s3.example.net`` → the AWS stand-in (``tests/awsstandin.py``:
  moto's S3 and EC2, plus ImportSnapshot), reset before every block that uses
  it, with the bucket ``images`` created; blocks of the EC2 page get it as
  ``AWS_ENDPOINT_URL`` with dummy credentials;
* ``nbd.example.net`` → an nbdkit ``memory`` export of 1 GiB, one per block.

The tarball's server being on loopback, which the default URL policy
refuses, each block allows it as a provider allows its own tarball server:
``cloudlets render`` gets ``--allow-host 127.0.0.1:PORT``, ``Renderer(`` and
``CloudletsNodeDriver(`` get ``ex_allow_hosts=["127.0.0.1:PORT"]``.

A block whose servers cannot run here (nginx, nbdkit, moto missing) is
skipped, naming what is missing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cloudlets.drivers.providers import BUILTIN
from cloudlets.drivers.types import DriverKind
from tests.netpolicy import host_port
from tests.nginx_fixture import Nginx, nginx_server

__all__ = ["nginx_server"]  # the fixture, imported for pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
#: Seconds one example may take.
BLOCK_TIMEOUT = 120
#: Pages that may lack a command-line example, and why.
NO_CLI = {
    # The CLI builds drivers without arguments; this one needs a libcloud driver.
    "drivers/storage/libcloud.rst",
}
#: The Python and shell blocks not run here, by page and first line, and why.
NOT_RUN = {
    ("README.rst", "scripts/dev demo"):
        "installs Debian packages and a venv; tests/test_example.py runs the demo script",
    ("README.rst", "scripts/dev test"): "the whole suite: CI's own command",
    ("README.rst", "pip install ."): "installs packages; test_the_checkout_builds_a_wheel",
    ("README.rst", "python examples/render_example.py --write-manifest tiny-debian.json"):
        "builds from Debian packages; tests/test_example.py::"
        "test_the_example_renders_on_its_own runs both commands",
    ("quickstart.rst", "pip install ."): "installs packages; test_the_checkout_builds_a_wheel",
    ("service.rst", "pip install '.[service]'"): "installs packages",
    ("service.rst", "$ cloudlets serve"): "a server that runs until stopped: test_service.py",
    ("service.rst", "$ cloudlets serve --config service.toml"):
        "a server that runs until stopped: test_service.py",
    ("service.rst", "api-host$    cloudlets serve --config /etc/cloudlets/service.toml"):
        "the scale-out hosts, API and workers, run until stopped: test_service_celery.py",
    ("service.rst", "pip install cloudlets[service,celery]"): "installs packages",
    ("service.rst", '$ curl -s -H "Authorization: Bearer $TOKEN" \\'):
        "needs the running service: test_service.py makes these requests",
    ("service.rst", '$ curl -s -X DELETE -H "Authorization: Bearer $TOKEN" \\'):
        "needs the running service: test_service.py makes these requests",
    ("service.rst", "from cloudlets.client import ServiceClient"):
        "needs the running service: test_service_client.py",
    ("service.rst", "from cloudlets.client import CloudletsServiceNodeDriver"):
        "needs the running service: test_service_client.py",
    ("drivers/storage/san.rst",
     'san = SANStorage(ex_initiator="iqn.2026-01.net.example:renderer")'):
        "a fragment of the runnable example above it (an argument)",
    ("drivers/writing.rst", "import shutil"):
        "a third-party package's module: test_drivers.py installs and runs it",
    ("drivers/writing.rst", "from cloudlets import set_driver"):
        "registers a driver in the reader's process: test_drivers.py",
    ("drivers/writing.rst", "import pytest"):
        "a third-party package's test module: test_drivers.py runs it",
    ("provider.rst", "from libcloud.compute.drivers.ec2 import EC2NodeDriver"):
        "needs AWS credentials and an account: test_compute.py mixes it into a driver",
    ("provider.rst", "cloudlets images --name web"): "image ids of a catalog the reader has",
    ("signing.rst", "from cloudlets import Renderer, SignatureError"):
        "needs a signed manifest and keys: test_signing.py",
    ("fetch.rst", "cloudlets cache list   [--cache-dir DIR] [--json]"): "a synopsis",
    ("performance.rst",
     "PYTHONPATH=. .venv/bin/python benchmarks/run_all.py --json report.json --rst"):
        "benchmarks, run by hand: minutes of both cores (--quick too, about 2 minutes); "
        "tests/test_benchtable.py checks their ratios and tables",
}
#: How a literal block that shows a command starts.
_COMMAND = re.compile(r"^(\$ )?(cloudlets|pip|python3?|scripts/dev|qemu-img|curl|sudo) ")
_PAGE_DIRS = {DriverKind.FORMAT: "drivers/formats", DriverKind.STORAGE: "drivers/storage"}
_LANGUAGES = {"python": "python", "shell": "shell", "bash": "shell", "console": "shell"}
_DIRECTIVE = re.compile(r"^(?P<indent> *)\.\. code-block:: *(?P<language>\S+) *$")
_DAV = re.compile(r"https://(?P<user>[^@/\s]+@)?dav\.example\.net/")


@dataclass(frozen=True)
class Block:
    """One code block of a page."""

    page: str
    line: int
    language: str
    options: dict[str, str]
    code: str

    @property
    def runnable(self) -> bool:
        return "runnable" in self.options.get("class", "").split()

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def code_blocks(path: Path) -> Iterator[Block]:
    """The ``code-block`` directives of a reStructuredText page."""
    lines = path.read_text(encoding="utf-8").splitlines()
    page = path.relative_to(DOCS).as_posix() if path.is_relative_to(DOCS) else path.name
    index = 0
    while index < len(lines):
        match = _DIRECTIVE.match(lines[index])
        if match is None:
            index += 1
            continue
        indent = len(match["indent"])
        options: dict[str, str] = {}
        cursor = index + 1
        while cursor < len(lines) and lines[cursor].strip().startswith(":") \
                and _indent(lines[cursor]) > indent:
            key, _, value = lines[cursor].strip()[1:].partition(":")
            options[key.strip()] = value.strip()
            cursor += 1
        body = []
        while cursor < len(lines) and (not lines[cursor].strip()
                                       or _indent(lines[cursor]) > indent):
            body.append(lines[cursor])
            cursor += 1
        code = textwrap.dedent("\n".join(body)).strip("\n") + "\n"
        yield Block(page, index + 1, match["language"], options, code)
        index = cursor


def _pages() -> list[Path]:
    return [REPO / "README.rst", *sorted(
        p for p in DOCS.rglob("*.rst")
        if not {"_build", "generated"} & set(p.relative_to(DOCS).parts))]


def literal_commands(path: Path) -> Iterator[tuple[int, str]]:
    """The literal (``::``) blocks of a page whose first line is a command:
    ``(line, first line)``."""
    page = path.read_text(encoding="utf-8")
    lines = page.splitlines()
    for index, line in enumerate(lines):
        if not line.rstrip().endswith("::") or line.lstrip().startswith(".."):
            continue
        following = next((ln for ln in lines[index + 1:] if ln.strip()), "")
        if _indent(following) > _indent(line) and _COMMAND.match(following.strip()):
            yield index + 1, following.strip()


def runnable_blocks() -> list[Block]:
    return [b for page in _pages() for b in code_blocks(page) if b.runnable]


# -- what the blocks run against -------------------------------------------------

def _tarball() -> bytes:
    """The root filesystem ``web.json`` names: a kernel, an initrd, two templates."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for directory in ("boot", "etc"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            archive.addfile(info)
        for name, data in (("boot/vmlinuz", b"not really a kernel\n" * 64),
                           ("boot/initrd.img", b"not really an initrd\n" * 64),
                           ("etc/hostname", b"{{ hostname }}\n"),
                           ("etc/motd", b"{{ args.motd }}\n")):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _documented_manifest() -> dict[str, Any]:
    """The ``web.json`` block of the drivers page, as JSON."""
    for block in code_blocks(DOCS / "drivers" / "index.rst"):
        if block.options.get("caption") == "web.json":
            data: dict[str, Any] = json.loads(block.code)
            return data
    raise AssertionError("docs/drivers/index.rst has no code block captioned web.json")


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@dataclass
class Site:
    """The manifest every block renders, and the directories they share."""

    manifest: dict[str, Any]
    cache: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """``web.json`` with its tarball on a loopback HTTP server."""
    root = tmp_path_factory.mktemp("docs-site")
    data = _tarball()
    (root / "web-1.0.tar.gz").write_bytes(data)
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    manifest = _documented_manifest()
    manifest["filesystem"] = {
        "url": f"http://127.0.0.1:{server.server_address[1]}/web-1.0.tar.gz",
        "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    try:
        yield Site(manifest=manifest, cache=tmp_path_factory.mktemp("docs-cache"))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@dataclass
class AWS:
    """The AWS stand-in, served from this process."""

    url: str

    def reset(self) -> None:
        """Forget every bucket, object, snapshot and image; create ``images``."""
        import boto3  # type: ignore[import-untyped, unused-ignore]

        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
        boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                     aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket="images")


@pytest.fixture(scope="module")
def aws() -> Iterator[AWS]:
    pytest.importorskip("boto3", reason="pip install cloudlets[test]")
    pytest.importorskip("moto.server", reason="pip install 'moto[server]'")
    from tests.awsstandin import AWSStandIn, serve

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
        server, thread, url = serve(AWSStandIn(import_polls=0))
        try:
            yield AWS(url)
        finally:
            server.shutdown()
            thread.join(timeout=10)
            server.server_close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_nbdkit(log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A 1 GiB nbdkit ``memory`` export on a free loopback port."""
    binary = shutil.which("nbdkit")
    if binary is None:
        pytest.skip("nbdkit is not installed (apt-get install nbdkit)")
    for _ in range(3):  # another process may take the port between probe and bind
        port = _free_port()
        with open(log, "ab") as handle:
            process = subprocess.Popen(
                [binary, "--foreground", "--exit-with-parent", "-i", "127.0.0.1",
                 "-p", str(port), "memory", "1G"],
                stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return process, port
            except OSError:
                time.sleep(0.02)
        _stop(process)
    raise RuntimeError(f"nbdkit did not start: {log.read_text(errors='replace')[-2000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _allow_tarball_server(code: str, server: str) -> str:
    """``code`` with the loopback tarball ``server`` (``HOST:PORT``) allowed."""
    code = re.sub(r"\bcloudlets render\b", f"cloudlets render --allow-host {server}", code)
    for call in reversed(list(re.finditer(r"\b(Renderer|CloudletsNodeDriver)\(", code))):
        depth, end = 1, call.end()
        while depth:  # to the call's closing parenthesis
            depth += {"(": 1, ")": -1}.get(code[end], 0)
            end += 1
        inside = code[call.end():end - 1].rstrip()
        comma = ", " if inside and not inside.endswith(",") else ""
        code = (code[:call.end()] + inside + f"{comma}ex_allow_hosts=[{server!r}]"
                + code[end - 1:])
    return code


# -- the tests ------------------------------------------------------------------

BLOCKS = runnable_blocks()


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_example_runs(block: Block, site: Site, tmp_path: Path,
                      request: pytest.FixtureRequest) -> None:
    language = _LANGUAGES.get(block.language)
    assert language is not None, f"{block}: runnable {block.language!r} blocks cannot be run"
    work = tmp_path / "work"
    work.mkdir()
    (work / "web.json").write_text(json.dumps(site.manifest, indent=2))
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("AWS_", "CLOUDLETS_")) and key != "SOURCE_DATE_EPOCH"}
    (tmp_path / "tmp").mkdir()
    env.update(CLOUDLETS_CACHE_DIR=str(site.cache), CLOUDLETS_HOME=str(tmp_path / "home"),
               PYTHONPATH=str(REPO), TMPDIR=str(tmp_path / "tmp"),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    code = _allow_tarball_server(block.code, host_port(site.manifest["filesystem"]["url"]))
    servers: list[subprocess.Popen[bytes]] = []
    if _DAV.search(code):
        dav: Nginx = request.getfixturevalue("nginx_server")
        area = dav.url(f"/basic/{tmp_path.name}/").replace("http://", "")
        code = _DAV.sub(lambda m: f"http://{m['user'] or ''}{area}", code)
    if "s3.example.net" in code or block.page == "drivers/formats/ec2.rst":
        stand_in: AWS = request.getfixturevalue("aws")
        stand_in.reset()
        code = code.replace("https://s3.example.net", stand_in.url)
        if block.page == "drivers/formats/ec2.rst":
            env.update(AWS_ENDPOINT_URL=stand_in.url, AWS_ACCESS_KEY_ID="testing",
                       AWS_SECRET_ACCESS_KEY="testing")
    try:
        if "nbd.example.net" in code:
            nbdkit, port = _start_nbdkit(tmp_path / "nbdkit.log")
            servers.append(nbdkit)
            code = code.replace("nbd.example.net", f"127.0.0.1:{port}")
        script = work.parent / ("example.py" if language == "python" else "example.sh")
        script.write_text(code, encoding="utf-8")
        argv = ([sys.executable, str(script)] if language == "python"
                else ["bash", "-e", "-o", "pipefail", str(script)])
        result = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True,
                                timeout=BLOCK_TIMEOUT, check=False)
    finally:
        for server in servers:
            _stop(server)
    print(result.stdout, result.stderr, sep="")  # shown by pytest -rP
    assert result.returncode == 0, (
        f"{block} failed with exit code {result.returncode}\n--- code\n{code}"
        f"--- stdout\n{result.stdout[-4000:]}--- stderr\n{result.stderr[-4000:]}")


def test_every_builtin_driver_has_a_page_with_runnable_examples() -> None:
    expected = {f"{_PAGE_DIRS[kind]}/{name}.rst" for kind in DriverKind for name in BUILTIN[kind]}
    pages = {p.relative_to(DOCS).as_posix() for d in _PAGE_DIRS.values()
             for p in (DOCS / d).glob("*.rst")}
    assert pages == expected
    for page in sorted(pages):
        languages = {_LANGUAGES.get(b.language) for b in code_blocks(DOCS / page) if b.runnable}
        assert "python" in languages, f"{page} has no runnable Python example"
        if page not in NO_CLI:
            assert "shell" in languages, f"{page} has no runnable command-line example"


def test_the_extractor_sees_options_and_bodies(tmp_path: Path) -> None:
    page = tmp_path / "page.rst"
    page.write_text(textwrap.dedent("""\
        Title
        =====

        .. code-block:: python
           :class: runnable other
           :caption: x.py

           print(1)

               print(2)  # still inside

        Text.

        .. code-block:: json

           {}
        """))
    blocks = list(code_blocks(page))
    assert [(b.line, b.language, b.runnable) for b in blocks] == [(4, "python", True),
                                                                  (14, "json", False)]
    assert blocks[0].options == {"class": "runnable other", "caption": "x.py"}
    assert blocks[0].code == "print(1)\n\n    print(2)  # still inside\n"


def _first(text: str) -> str:
    """A block's first line without its trailing comment."""
    return re.sub(r"\s+# .*$", "", text.splitlines()[0]).strip()


def _key(block: Block) -> tuple[str, str]:
    return block.page, _first(block.code)


def test_every_command_shown_is_run_or_accounted_for() -> None:
    shown: list[tuple[str, str]] = []
    for page in _pages():
        name = page.relative_to(DOCS).as_posix() if page.is_relative_to(DOCS) else page.name
        for block in code_blocks(page):
            if _LANGUAGES.get(block.language) and not block.runnable:
                shown.append(_key(block))
        shown.extend((name, _first(first)) for _, first in literal_commands(page))
    unaccounted = sorted(set(shown) - set(NOT_RUN))
    assert not unaccounted, ("make these runnable (.. code-block:: with :class: runnable) "
                             f"or say in NOT_RUN why they are not run: {unaccounted}")
    stale = sorted(set(NOT_RUN) - set(shown))
    assert not stale, f"NOT_RUN names blocks the docs no longer have: {stale}"
    assert any(b.page == "README.rst" for b in BLOCKS), "README.rst has runnable examples"


def test_the_checkout_builds_a_wheel(tmp_path: Path) -> None:
    """The install the README and the quick start give: a wheel from the
    checkout, holding the package data (schemas, py.typed)."""
    import zipfile

    source = tmp_path / "checkout"  # pip writes build/ and *.egg-info into the source tree
    shutil.copytree(REPO / "cloudlets", source / "cloudlets",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "pyproject.toml", "README.rst"):
        shutil.copy2(REPO / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(tmp_path / "dist"), str(source)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "TMPDIR": str(tmp_path)})
    assert build.returncode == 0, build.stderr[-4000:]
    (wheel,) = (tmp_path / "dist").glob("cloudlets-*-py3-none-any.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"cloudlets/py.typed", "cloudlets/schemas/config-v1.json",
            "cloudlets/cli_init.py"} <= names
    assert any(n.endswith("entry_points.txt") for n in names)
