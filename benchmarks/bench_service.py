"""Benchmark: ``cloudlets serve`` under concurrent creates, against a plain
loop of :meth:`Renderer.render <cloudlets.renderer.Renderer.render>`.

Run by hand (not a test), under the lock the project's benchmarks share::

    PYTHONPATH=. flock /tmp/cloudlets-bench.lock .venv/bin/python \
        benchmarks/bench_service.py [--creates 200] [--clients 20] [--workers 2]
        [--json] [--trace FILE] [--profile FILE [--profile-format raw] [--profile-rate N]]

It writes ``--creates`` small cloudlets (each its own tarball, so none is
found in a cache) served by a loopback tarball server, then, in the same
run:

1. the **plain loop**: one :class:`~cloudlets.renderer.Renderer` renders
   every manifest, one after the other, to the tar format on a local
   directory (the same requests the service gets, with their own data and
   cache directories);
2. the **service**: ``cloudlets serve`` (a subprocess on a free loopback
   port, ``--workers`` render processes) gets the same manifests as
   ``POST /v1/images`` from ``--clients`` client **processes**, released
   together by a barrier (the burst), each taking the next manifest, posting
   it, and polling its image every 0.1 s until it is ready (about 200 polls
   a second in all), on a kept-alive ``http.client`` connection.

Reported: p50/p95/p99 of the POST latency (request sent to answer read, in
the client) and of the time to ready (POST sent to the first poll that
sees ``ready``); the server's own POST duration (``/metrics``' histogram
over the same creates: handler start to last byte handed to the server, as
the bucket the quantile falls in); the API process's CPU per request while
the renders ran (``/proc``); renders per second of both sides (the
service's: first POST sent to last image ready); the POST latency of the
same creates again once all are ready (each answers 200 with its image:
no render running; the clients then post back to back, so this is a
closed loop of 20 at the server's full rate); the load average before and
after; and the check that every image is ready, none lost (every create
answered 202 with an id that ``GET /v1/images`` lists) and none duplicated
(as many distinct ids as creates). ``--trace`` writes each create's send
time and latency; ``--profile`` records the API process with py-spy
(``--nonblocking``: sampled without pausing it, so the profiled run's
latencies stay those of an unprofiled one).

Targets (issue 17 item 10): POST p99 under 50 ms while renders run;
throughput at least 0.9x the plain loop.

What the numbers are: the clients are processes, so no client waits for
another's interpreter lock; they still share the machine's two cores with
the service, its render processes (10 steps nicer) and the machine's other
load, so a latency includes the time the API process and the client wait
for a core. The plain loop runs alone, before the service starts. Results
are in ``docs/service.rst`` ("Create latency under load").
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchstats import percentile  # noqa: E402

from tests.service_fixture import TarballServer, served_cloudlet, start_service  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"


def config(server: TarballServer, workers: int, creates: int) -> str:
    return f"""
[service]
data_dir = "state"
workers = {workers}
formats = ["tar"]
[limits]
queue_length = {creates + 10}
renders_per_tenant = {creates + 10}
[targets.local]
driver = "local"
root = "images"
[formats.tar]
[tenants.bench]
token_env = "CLOUDLETS_TOKEN_BENCH"
[fetch]
allow_hosts = ["{server.host}"]
only_hosts = ["127.0.0.1"]
"""


def plain_loop(manifests: list[dict[str, Any]], base: Path) -> float:
    """Render every manifest with one Renderer; :returns: the seconds taken."""
    from cloudlets.fetch import Fetcher, UrlPolicy
    from cloudlets.renderer import Renderer

    fields = UrlPolicy.__dataclass_fields__
    policy = UrlPolicy(allow_hosts=frozenset({"127.0.0.1"})) if "allow_hosts" in fields \
        else UrlPolicy()
    renderer = Renderer(cache_dir=base / "cache", data_dir=base / "data",
                        work_dir=base / "work", ex_fetcher=Fetcher(policy=policy))
    out = base / "out"
    out.mkdir(parents=True)
    start = time.perf_counter()
    for manifest in manifests:
        renderer.render(manifest, f"{out}/", "local", "tar")
    return time.perf_counter() - start


def _client(url: str, work: Any, again: Any, results: Any, barrier: Any) -> None:
    """One client process: POST each manifest ``work`` brings, poll it until
    ready, then (after ``barrier``) POST each of ``again`` once more. Its
    connection is opened and its first body built before the burst.
    Times are ``time.monotonic()`` (the system's one clock, so the processes'
    times compare); what it saw goes on ``results``."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    conn = http.client.HTTPConnection(host or "127.0.0.1", port, timeout=60)

    def call(method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
        conn.request(method, path, body=body, headers=headers)
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read())

    def encode(manifest: dict[str, Any] | None) -> bytes | None:
        return None if manifest is None else json.dumps(
            {"manifest": manifest, "format": "tar", "target": "local"}).encode()

    seen: dict[str, Any] = {"posts": [], "ready": [], "ids": [], "failures": [],
                            "repeats": []}
    # before the burst: the connection open, this process's code warm and its
    # first body built, so the burst is the server's work, not the clients'
    call("GET", "/v1/healthz")
    body = encode(work.get())
    barrier.wait()  # every client is warm: the service's counters are read
    barrier.wait()  # the burst
    while body is not None:
        sent = time.monotonic()
        status, data = call("POST", "/v1/images", body)
        got = time.monotonic()
        if status != 202:
            seen["failures"].append(f"POST {status}: {str(data)[:200]}")
            body = encode(work.get())
            continue
        image_id = data["id"]
        seen["posts"].append((sent, got))
        seen["ids"].append(image_id)
        deadline = got + 600
        while time.monotonic() < deadline:
            status = call("GET", f"/v1/images/{image_id}")[1]["status"]
            if status == "ready":
                seen["ready"].append((sent, time.monotonic()))
                break
            if status == "failed":
                seen["failures"].append(f"{image_id} failed")
                break
            time.sleep(0.1)
        else:
            seen["failures"].append(f"{image_id} not ready in 600 s")
        body = encode(work.get())
    barrier.wait()  # every image is ready: the same creates again
    while (manifest := again.get()) is not None:
        body = json.dumps({"manifest": manifest, "format": "tar", "target": "local"}).encode()
        sent = time.monotonic()
        status, data = call("POST", "/v1/images", body)
        seen["repeats"].append(time.monotonic() - sent)
        if status != 200:
            seen["failures"].append(f"repeat POST {status}: {str(data)[:200]}")
        else:
            seen["ids_again"] = [*seen.get("ids_again", []), data["id"]]
    conn.close()
    results.put(seen)


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of a process (Linux ``/proc``)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def requests_answered(url: str) -> float:
    """How many requests the service has answered (its ``/metrics``)."""
    text = requests.get(f"{url}/metrics", timeout=60).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("cloudlets_http_request_duration_seconds_count{"))


def server_seconds(url: str) -> dict[str, float]:
    """The service's ``POST /v1/images`` duration histogram: cumulative
    counts by upper bound (``+Inf`` as ``inf``)."""
    text = requests.get(f"{url}/metrics", timeout=60).text
    buckets: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("cloudlets_http_request_duration_seconds_bucket{") \
                and 'method="POST"' in line and 'route="/v1/images"' in line:
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[bound] = float(line.rsplit(" ", 1)[1])
    return buckets


def bucket_percentiles(before: dict[str, float],
                       after: dict[str, float]) -> dict[str, str]:
    """p50/p95/p99 of the requests counted between two readings of
    :func:`server_seconds`, as the histogram bucket each falls in."""
    bounds = sorted(after, key=float)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    found: dict[str, str] = {}
    for q in (50, 95, 99):
        for bound, count in zip(bounds, counts, strict=True):
            if total and count >= q / 100 * total:
                found[f"p{q}"] = f"<= {1000 * float(bound):g} ms"
                break
    return found


def through_service(url: str, manifests: list[dict[str, Any]], clients: int,
                    pid: int) -> dict[str, Any]:
    """POST every manifest from ``clients`` processes, then poll to ready."""
    context = multiprocessing.get_context("spawn")
    work, again, results = context.Queue(), context.Queue(), context.Queue()
    for manifest in manifests:
        work.put(manifest)
        again.put(manifest)
    for _ in range(clients):
        work.put(None)
        again.put(None)
    for unread in (work, again):  # a run that failed half-way still exits
        unread.cancel_join_thread()
    barrier = context.Barrier(clients + 1)
    processes = [context.Process(target=_client, args=(url, work, again, results, barrier),
                                 daemon=True) for _ in range(clients)]
    for process in processes:
        process.start()
    barrier.wait(timeout=120)  # every client is up and warm
    before, answered, cpu = server_seconds(url), requests_answered(url), cpu_seconds(pid)
    barrier.wait(timeout=60)  # the creates arrive together
    barrier.wait(timeout=1200)  # every image is ready
    api_cpu = cpu_seconds(pid) - cpu
    during, answered = server_seconds(url), requests_answered(url) - answered
    seen = [results.get(timeout=1200) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    posts = [pair for one in seen for pair in one["posts"]]
    ready = [pair for one in seen for pair in one["ready"]]
    ids = [image_id for one in seen for image_id in one["ids"]]
    again_ids = {image_id for one in seen for image_id in one.get("ids_again", [])}
    failures = [text for one in seen for text in one["failures"]]
    failures += [f"repeat POST answered {image_id}, not an id of the creates"
                 for image_id in sorted(again_ids - set(ids))]
    start = min((sent for sent, _ in posts), default=0.0)
    end = max((done for _, done in ready), default=start)
    listed: set[str] = set()
    cursor: str | None = "0"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    while cursor is not None:
        page = requests.get(f"{url}/v1/images", params={"limit": 100, "cursor": cursor},
                            headers=headers, timeout=60).json()
        listed |= {image["id"] for image in page["images"]}
        cursor = page.get("next")
    return {"trace": sorted((sent - start, got - sent) for sent, got in posts),
            "posts": [got - sent for sent, got in posts],
            "ready": [done - sent for sent, done in ready], "ids": ids,
            "failures": failures, "repeats": [t for one in seen for t in one["repeats"]],
            "elapsed": end - start, "listed": listed,
            "server_post_ms": bucket_percentiles(before, during),
            "api_cpu_ms_per_request": round(1000 * api_cpu / max(answered - 2, 1), 2),
            "requests": int(answered)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; :returns: the report, ``ok`` when no image was lost."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--creates", type=int, default=200)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--trace", type=Path, default=None,
                        help="write each create's send time and latency (JSON) to this file")
    parser.add_argument("--profile", type=Path, default=None,
                        help="record the API process with py-spy into this file")
    parser.add_argument("--profile-format", default="speedscope",
                        choices=["speedscope", "flamegraph", "raw"])
    parser.add_argument("--profile-rate", type=int, default=200,
                        help="py-spy's samples per second (default 200)")
    args = parser.parse_args(argv)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        base = Path(tmp)
        server = TarballServer(base / "tarballs")
        server.gate.set()
        try:
            manifests = [served_cloudlet(server, name=f"bench{i}", version="1.0")
                         for i in range(args.creates)]
            plain = plain_loop(manifests, base / "plain")
            os.environ["CLOUDLETS_TOKEN_BENCH"] = TOKEN
            service = start_service(base / "service" / "etc",
                                    config(server, args.workers, args.creates),
                                    tokens={"bench": TOKEN})
            profiler = None
            try:
                if args.profile is not None:  # py-spy on the API process, not its renders'
                    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
                    # --nonblocking: py-spy reads the process's memory without
                    # pausing it; paused for each sample, the API answered late
                    # (a POST p99 of 143 ms profiled against 47 ms unprofiled)
                    profiler = subprocess.Popen(
                        [spy, "record", "--pid", str(service.process.pid), "--nonblocking",
                         "--rate", str(args.profile_rate), "--format", args.profile_format,
                         "--output", str(args.profile)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                run = through_service(service.url, manifests, args.clients,
                                      service.process.pid)
            finally:
                if profiler is not None:
                    profiler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
                    profiler.wait(timeout=60)
                service.stop()
        finally:
            server.close()
    ids, creates = run["ids"], args.creates
    report = {
        "creates": creates, "clients": args.clients, "workers": args.workers,
        "post_ms": {f"p{q}": round(1000 * percentile(run["posts"], q / 100), 1)
                    for q in (50, 95, 99)} if run["posts"] else {},
        "idle_post_ms": {f"p{q}": round(1000 * percentile(run["repeats"], q / 100), 1)
                         for q in (50, 95, 99)} if run["repeats"] else {},
        "server_post_ms": run["server_post_ms"],
        "api_cpu_ms_per_request": run["api_cpu_ms_per_request"],
        "requests_while_rendering": run["requests"],
        "ready_s": {f"p{q}": round(percentile(run["ready"], q / 100), 2)
                    for q in (50, 95, 99)} if run["ready"] else {},
        "service_renders_per_s": round(len(run["ready"]) / run["elapsed"], 2),
        "plain_renders_per_s": round(creates / plain, 2),
        "ready": len(run["ready"]), "distinct_ids": len(set(ids)),
        "lost": creates - len(set(ids) & run["listed"]),
        "duplicated": len(ids) - len(set(ids)), "failures": run["failures"][:10],
    }
    if args.trace is not None:  # each create: when it was sent (s from the first), its latency
        args.trace.write_text(json.dumps(run["trace"]))
    report["load_before"] = load_before
    report["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    report["ratio"] = round(report["service_renders_per_s"] / report["plain_renders_per_s"], 2)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key:>22}: {value}")
    report["ok"] = report["ready"] == creates and report["lost"] == 0 \
        and report["duplicated"] == 0
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
