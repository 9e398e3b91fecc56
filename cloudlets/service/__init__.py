"""The Cloudlets Rendering Service: ``cloudlets serve``.

* :mod:`cloudlets.service.config`: the TOML configuration file;
* :mod:`cloudlets.service.auth`: tenants and their hashed bearer tokens;
* :mod:`cloudlets.service.jobs`: render jobs over :mod:`cloudlets.images`,
  and the executor that runs them (an in-process pool of threads);
* :mod:`cloudlets.service.queue`: the executor on Celery with Redis, and the
  render worker of ``cloudlets worker`` (the extra ``cloudlets[celery]``);
* :mod:`cloudlets.service.records`: which tenant owns which image;
* :mod:`cloudlets.service.metrics`: the Prometheus metrics;
* :mod:`cloudlets.service.openapi`: the OpenAPI 3.1 document;
* :mod:`cloudlets.service.app`: the ASGI application (Starlette);
* :mod:`cloudlets.service.errors`: the answers that are not successes.

The web framework, the server and prometheus-client are the optional extra
``cloudlets[service]``; importing this package needs none of them, only
:mod:`cloudlets.service.app` and :mod:`cloudlets.service.metrics` do.
"""

__all__ = ["SERVICE_EXTRA_HINT", "require_service_extra"]

#: What to install for ``cloudlets serve``.
SERVICE_EXTRA_HINT = "pip install cloudlets[service]"


def require_service_extra() -> None:
    """Check that the ``cloudlets[service]`` extra is installed.

    :raises ConfigurationError: naming the missing module and the extra.
    """
    import importlib

    from cloudlets.errors import ConfigurationError

    for module in ("starlette", "uvicorn", "prometheus_client"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigurationError(
                f"cloudlets serve needs {module}, which is not installed: "
                f"{SERVICE_EXTRA_HINT}") from None
