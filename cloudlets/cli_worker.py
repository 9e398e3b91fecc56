"""``cloudlets worker``: a Celery render worker of the rendering service.

Wired into the main parser by :func:`add_worker_parser`. It reads the
service's own configuration file (``[queue] backend = "celery"``), takes
renders from its Redis broker and reports their progress and results
there; the service records them in its catalog. See
:mod:`cloudlets.service.queue`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TextIO

__all__ = ["add_worker_parser", "cmd_worker"]


def add_worker_parser(subparsers: Any) -> None:
    """Add ``worker`` to the ``cloudlets`` parser.

    :param subparsers: what ``ArgumentParser.add_subparsers()`` returned.
    """
    worker = subparsers.add_parser(
        "worker", help="run a Celery render worker of the rendering service",
        description="Take renders from the service's Redis queue and render them with "
                    "this host's tarball cache. Needs the extras: "
                    "pip install cloudlets[service,celery].")
    worker.add_argument("--config", type=Path, required=True,
                        help='the service configuration (TOML), with [queue] backend = '
                             '"celery" and broker_url')
    worker.add_argument("--concurrency", type=int, default=None, metavar="N",
                        help="renders at once (default service.workers)")
    worker.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="the worker's log level")
    worker.set_defaults(handler=cmd_worker, own_logging=True)  # log_to_stderr


def cmd_worker(args: argparse.Namespace, out: TextIO) -> int:
    """Load the configuration, then render until SIGTERM (the renders
    running finish first) or SIGINT.

    :returns: the exit code.
    :raises ConfigurationError: without the ``cloudlets[celery]`` extra, or
        for an invalid configuration (every problem with its key path).
    """
    from cloudlets.service.config import ServiceConfig, ServiceConfigError
    from cloudlets.service.queue import RenderWorker, require_celery_extra

    require_celery_extra()
    config = ServiceConfig.load(args.config)
    if config.queue.backend != "celery":
        raise ServiceConfigError([("queue.backend", 'cloudlets worker needs backend = '
                                                    '"celery" (the embedded pool renders in '
                                                    "the service itself)")], config.source)
    concurrency = args.concurrency or config.workers
    if concurrency < 1:
        raise ServiceConfigError([("--concurrency", "must be at least 1")], "<command line>")
    from cloudlets.cli_serve import log_to_stderr

    log_to_stderr(args.log_level, config.secrets)
    worker = RenderWorker(config)
    out.write(f"cloudlets: worker rendering {concurrency} at once from queue "
              f"{config.queue.name!r} (cache in {config.cache_dir})\n")
    out.flush()
    worker.run(concurrency, args.log_level.upper())
    return 0
