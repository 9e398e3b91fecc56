"""Benchmark: cloudlets' Fetcher against ``curl -o``, same file, same server, same run.

Run by hand (not a test)::

    PYTHONPATH=. .venv/bin/python benchmarks/bench_fetch.py [--size-mib 1024] [--rounds 3]

It writes a file of pseudo-random bytes into a temporary directory, serves it
from 127.0.0.1 with nginx (``sendfile on``; a small ``os.sendfile`` server in
Python when nginx is missing, so the server is never the bottleneck), then
downloads it alternately with ``curl -o`` and with ``Fetcher.fetch`` (which
also computes and checks the sha256 and the size). Each client runs in its own
process; its wall time and peak RSS (``ru_maxrss`` from ``wait4``) are
reported. ``--cache`` also times ``TarballCache.get`` (adds an ``fsync`` and a
rename). Targets: the Fetcher within 1.3x of curl, peak RSS under 100 MiB.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

_NGINX_CONF = """
daemon off;
master_process on;
worker_processes 2;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {www};
        default_type application/octet-stream;
    }}
}}
"""

# The server is on loopback, which the default URL policy refuses: allow its host:port.
_PYTHON_CLIENT = """
import sys, urllib.parse
from cloudlets.fetch import Fetcher, UrlPolicy
allow = frozenset({urllib.parse.urlsplit(sys.argv[1]).netloc})
Fetcher(policy=UrlPolicy(allow_hosts=allow)).fetch(sys.argv[1], sys.argv[2], sha256=sys.argv[3],
                                                   size=int(sys.argv[4]))
"""

_CACHE_CLIENT = """
import sys, urllib.parse
from cloudlets.cache import TarballCache
from cloudlets.fetch import Fetcher, UrlPolicy
allow = frozenset({urllib.parse.urlsplit(sys.argv[1]).netloc})
fetcher = Fetcher(policy=UrlPolicy(allow_hosts=allow))
TarballCache(sys.argv[2], fetcher=fetcher).get(sys.argv[1], sys.argv[3],
                                               size=int(sys.argv[4])).close()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_file(path: Path, size: int) -> str:
    """Write ``size`` pseudo-random bytes (fast: a hash chain, not urandom)."""
    hasher = hashlib.sha256()
    block = os.urandom(1 << 20)
    with open(path, "wb") as out:
        written = 0
        counter = 0
        while written < size:
            piece = block[: size - written]
            # vary every block so the file is not one repeated MiB
            piece = counter.to_bytes(8, "little") + piece[8:]
            out.write(piece)
            hasher.update(piece)
            written += len(piece)
            counter += 1
    return hasher.hexdigest()


class _SendfileHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def copyfile(self, source, outputfile) -> None:  # type: ignore[no-untyped-def]
        self.wfile.flush()
        self.connection.sendfile(source)


def start_server(www: Path, tmp: Path) -> tuple[str, object]:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                      else None)
    if nginx:
        port = free_port()
        conf = tmp / "nginx.conf"
        conf.write_text(_NGINX_CONF.format(tmp=tmp, port=port, www=www))
        proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(tmp)],
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            proc.kill()
            raise SystemExit(f"nginx did not start; see {tmp / 'error.log'}")
        return f"http://127.0.0.1:{port}", proc

    def handler(*args: object, **kwargs: object) -> _SendfileHandler:
        return _SendfileHandler(*args, directory=str(www), **kwargs)  # type: ignore[arg-type]

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def stop_server(handle: object) -> None:
    if isinstance(handle, subprocess.Popen):
        handle.terminate()
        handle.wait(10)
    else:
        handle.shutdown()  # type: ignore[attr-defined]


def run(argv: list[str]) -> tuple[float, int]:
    """:returns: wall seconds and peak RSS in KiB of one child process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{argv[0]} failed with exit code {proc.returncode}")
    return elapsed, usage.ru_maxrss


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; :returns: the report (best and median seconds, peak RSS)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", action="store_true", help="also time TarballCache.get")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the files")
    args = parser.parse_args(argv)
    curl = shutil.which("curl")
    if not curl:
        raise SystemExit("curl is needed for the comparison")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-fetch-") as name:
        tmp = Path(name)
        os.chmod(tmp, 0o755)  # nginx workers may run as another user
        www = tmp / "www"
        www.mkdir(mode=0o755)
        size = args.size_mib << 20
        print(f"writing {args.size_mib} MiB test file...", flush=True)
        sha = make_file(www / "rootfs.tar", size)
        os.chmod(www / "rootfs.tar", 0o644)
        base, handle = start_server(www, tmp)
        url = f"{base}/rootfs.tar"
        clients = {
            "curl -o": lambda dest: [curl, "-sS", "--fail", "-o", str(dest), url],
            "Fetcher.fetch": lambda dest: [sys.executable, "-c", _PYTHON_CLIENT, url, str(dest),
                                           sha, str(size)],
        }
        if args.cache:
            clients["TarballCache.get"] = lambda dest: [sys.executable, "-c", _CACHE_CLIENT,
                                                        url, str(dest), sha, str(size)]
        results: dict[str, list[tuple[float, int]]] = {k: [] for k in clients}
        try:
            run(clients["curl -o"](tmp / "warm"))  # warm the page cache
            (tmp / "warm").unlink()
            for round_no in range(args.rounds):
                order = list(clients) if round_no % 2 == 0 else list(reversed(clients))
                for label in order:
                    dest = tmp / "out"
                    results[label].append(run(clients[label](dest)))
                    if dest.is_dir():
                        shutil.rmtree(dest)
                    else:
                        dest.unlink()
        finally:
            stop_server(handle)
        server = "nginx (sendfile)" if isinstance(handle, subprocess.Popen) else \
            "python os.sendfile"
        print(f"\n{args.size_mib} MiB from {server} on 127.0.0.1, {args.rounds} rounds")
        print(f"{'client':<18}{'best s':>9}{'median s':>10}{'MiB/s':>9}{'peak RSS MiB':>14}")
        curl_best = min(t for t, _ in results["curl -o"])
        for label, rows in results.items():
            times = [t for t, _ in rows]
            rss = max(r for _, r in rows) / 1024
            print(f"{label:<18}{min(times):>9.2f}{statistics.median(times):>10.2f}"
                  f"{args.size_mib / min(times):>9.0f}{rss:>14.1f}")
        fetch_best = min(t for t, _ in results["Fetcher.fetch"])
        fetch_rss = max(r for _, r in results["Fetcher.fetch"]) / 1024
        ratio = fetch_best / curl_best
        print(f"\nFetcher / curl: {ratio:.2f}x (target <= 1.3x: "
              f"{'met' if ratio <= 1.3 else 'MISSED'}); Fetcher peak RSS {fetch_rss:.0f} MiB "
              f"(target < 100 MiB: {'met' if fetch_rss < 100 else 'MISSED'})")
    return {"size_mib": args.size_mib, "rounds": args.rounds, "server": server,
            "clients": {label: {"best_s": min(t for t, _ in rows),
                                "median_s": statistics.median(t for t, _ in rows),
                                "rss_mib": max(r for _, r in rows) / 1024}
                        for label, rows in results.items()},
            "ratio": ratio}


if __name__ == "__main__":
    main()
