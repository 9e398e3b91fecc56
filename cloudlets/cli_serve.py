"""``cloudlets serve``: the rendering service.

Wired into the main parser by :func:`add_serve_parser`. Without a
configuration file it serves on 127.0.0.1 with a local target under the
data directory and one admin tenant whose generated token is written to a
file only its owner can read; the path is printed, the token is not.
"""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path
from typing import Any, TextIO

from cloudlets.paths import default_data_dir

__all__ = ["add_serve_parser", "cmd_serve", "log_to_stderr"]

#: The admin token file of a service without configuration, in its data directory.
ADMIN_TOKEN_FILE = "admin-token"


def add_serve_parser(subparsers: Any) -> None:
    """Add ``serve`` to the ``cloudlets`` parser.

    :param subparsers: what ``ArgumentParser.add_subparsers()`` returned.
    """
    serve = subparsers.add_parser(
        "serve", help="run the rendering service (REST API, render workers, catalog)",
        description="Run the Cloudlets Rendering Service. Needs the extra: "
                    "pip install cloudlets[service].")
    serve.add_argument("--config", type=Path, default=None,
                       help="the service configuration (TOML); without it: 127.0.0.1, one "
                            "local target under the data directory, a generated admin token")
    serve.add_argument("--listen", default=None, metavar="HOST:PORT",
                       help="where to listen (overrides service.listen; default "
                            "127.0.0.1:8750)")
    serve.add_argument("--data-dir", type=Path, default=None,
                       help="without --config: the data directory (default $CLOUDLETS_HOME, "
                            "else $XDG_DATA_HOME/cloudlets)")
    serve.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"],
                       help="the service's log level")
    serve.set_defaults(handler=cmd_serve, own_logging=True)  # log_to_stderr


def cmd_serve(args: argparse.Namespace, out: TextIO) -> int:
    """Load the configuration, then serve until SIGTERM or SIGINT.

    :returns: the exit code.
    :raises ConfigurationError: without the ``cloudlets[service]`` extra, or
        for an invalid configuration (every problem with its key path).
    """
    from cloudlets.service import require_service_extra

    require_service_extra()
    import uvicorn

    from cloudlets.service.app import create_app
    from cloudlets.service.auth import ensure_admin_token
    from cloudlets.service.config import ServiceConfig, ServiceConfigError, parse_listen

    if args.config is not None:
        if args.data_dir is not None:
            out.write("cloudlets: --data-dir is ignored with --config (service.data_dir "
                      "sets it)\n")
        config = ServiceConfig.load(args.config, listen=args.listen)
    else:
        if args.listen is not None:  # before anything is written
            try:
                parse_listen(args.listen)
            except ValueError as exc:
                raise ServiceConfigError([("--listen", str(exc))], "<command line>") from None
        data_dir = (args.data_dir or default_data_dir() / "service").resolve()
        token_file = data_dir / ADMIN_TOKEN_FILE
        digest = ensure_admin_token(token_file)
        config = ServiceConfig.default(data_dir, digest, listen=args.listen)
        out.write(f"cloudlets: admin token in {token_file} (readable only by you)\n")
    level = log_to_stderr(args.log_level, config.secrets)
    app = create_app(config)
    host, port = config.listen
    shown = f"[{host}]" if ":" in host else host
    out.write(f"cloudlets: serving on http://{shown}:{port}/v1 "
              f"(data in {config.data_dir})\n")
    out.flush()
    server = uvicorn.Server(uvicorn.Config(
        app, host=host, port=port, log_config=None, log_level=level, access_log=False,
        lifespan="on", timeout_graceful_shutdown=max(int(config.shutdown_grace), 1),
        server_header=False))
    # uvicorn stops gracefully on SIGTERM, then raises the signal again for the
    # handler it found: a clean stop is then this command's success, not a kill.
    previous = signal.signal(signal.SIGTERM, _stopped)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if server.started else 5


def log_to_stderr(level_name: str, secrets: frozenset[str]) -> int:
    """Send the root logger's records to stderr, the secrets scrubbed
    (``cloudlets serve`` and ``cloudlets worker``).

    :param level_name: ``debug``, ``info``, ``warning`` or ``error``.
    :param secrets: the values to hide.
    :returns: the level.
    """
    from cloudlets.service.app import SecretFilter

    level = int(getattr(logging, level_name.upper()))
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(SecretFilter(secrets))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    return level


def _stopped(signum: int, frame: Any) -> None:
    """SIGTERM once the service has stopped: nothing left to do."""
