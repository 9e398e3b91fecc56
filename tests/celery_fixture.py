"""Debian's ``redis-server`` and ``cloudlets worker`` processes, for the
Celery mode's tests and benchmark.

:class:`RedisServer` runs ``redis-server`` on 127.0.0.1 on a free port with
no persistence, its files in a given directory, and can be stopped and
started again on the same port; :func:`start_worker` starts
``[sys.executable, "-m", "cloudlets", "worker", ...]`` and waits, within
:data:`WORKER_STARTUP`, for Celery's "ready"; every wait is bounded.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.service_fixture import REPO, STOP_TIMEOUT, Service, free_port, service_env

#: Seconds a worker gets to connect to Redis and say it is ready.
WORKER_STARTUP = 30.0
#: Debian's redis-server, when installed.
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    """Debian's redis-server on 127.0.0.1, restartable on its port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 - the child holds it
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.directory), "--daemonize", "no",
             "--protected-mode", "yes"], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 15
        while True:
            try:
                if client.ping():
                    return
            except redis.RedisError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"redis-server did not start: "
                            f"{(self.directory / 'redis.log').read_text(errors='replace')}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)
        self.process = None

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)


#: A running ``cloudlets worker``: stopped and read as a service is.
Worker = Service


def start_worker(config: Path, number: int, tokens: dict[str, str], *,
                 concurrency: int = 2) -> Worker:
    """Start ``cloudlets worker --config CONFIG``; its log beside the config."""
    log = config.parent / f"worker-{number}.log"
    with open(log, "a") as stream:
        process = subprocess.Popen(
            [sys.executable, "-m", "cloudlets", "worker", "--config", str(config),
             "--concurrency", str(concurrency)], cwd=REPO,
            env=service_env(tokens), stdout=stream,
            stderr=subprocess.STDOUT, text=True)
    worker = Worker(url="", process=process, config=config, log=log)
    deadline = time.monotonic() + WORKER_STARTUP
    while not re.search(r" ready\.", worker.output()):
        if process.poll() is not None or time.monotonic() > deadline:
            worker.stop(signal.SIGKILL)
            pytest.fail(f"cloudlets worker did not start:\n{worker.output()}")
        time.sleep(0.1)
    return worker
