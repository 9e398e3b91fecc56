"""The driver registry: built-in drivers, entry points and :func:`set_driver`.

Built-in drivers are a lazy ``name -> (module, class)`` map: nothing is
imported until a driver is asked for, so an optional dependency of one driver
never breaks another. A provider's own package adds drivers without touching
ours, through the entry-point groups :data:`FORMAT_ENTRY_POINT_GROUP` and
:data:`STORAGE_ENTRY_POINT_GROUP`::

    # the provider's pyproject.toml
    [project.entry-points."cloudlets.formats"]
    acme-disk = "acme_cloudlets.formats:AcmeDiskFormat"

or at run time with :func:`set_driver`.

An entry point may not take the name of a built-in driver: it is ignored
with a warning naming its package, and the built-in is kept, unless the
provider opts in with ``CLOUDLETS_DRIVER_OVERRIDES=format:qcow2,...``
(:data:`OVERRIDES_ENV`) or :func:`allow_override`. :func:`entry_point_report`
says what each installed entry point is and why one cannot be used.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import os
import threading
from typing import Any, Literal, overload

from cloudlets.drivers.base import FormatDriver, StorageDriver
from cloudlets.drivers.types import DriverKind, Format, Storage
from cloudlets.errors import ConfigurationError, DriverNotFoundError

__all__ = [
    "FORMAT_ENTRY_POINT_GROUP",
    "OVERRIDES_ENV",
    "STORAGE_ENTRY_POINT_GROUP",
    "allow_override",
    "driver_class_path",
    "entry_point_report",
    "get_driver",
    "list_drivers",
    "make_driver",
    "set_driver",
    "unset_driver",
]

#: Entry-point group for format drivers.
FORMAT_ENTRY_POINT_GROUP = "cloudlets.formats"
#: Entry-point group for storage drivers.
STORAGE_ENTRY_POINT_GROUP = "cloudlets.storage"
#: Environment variable listing the built-in drivers (``kind:name``, comma
#: separated) that an installed entry point of the same name may replace.
OVERRIDES_ENV = "CLOUDLETS_DRIVER_OVERRIDES"

log = logging.getLogger(__name__)

_GROUPS = {DriverKind.FORMAT: FORMAT_ENTRY_POINT_GROUP,
           DriverKind.STORAGE: STORAGE_ENTRY_POINT_GROUP}
_BASES: dict[DriverKind, type] = {DriverKind.FORMAT: FormatDriver,
                                  DriverKind.STORAGE: StorageDriver}

_F = "cloudlets.drivers.formats"
_S = "cloudlets.drivers.storage"

#: Built-in drivers; a module that does not exist yet is simply not listed.
BUILTIN: dict[DriverKind, dict[str, tuple[str, str]]] = {
    DriverKind.FORMAT: {
        Format.EC2: (f"{_F}.ec2", "EC2Format"),
        Format.OVA: (f"{_F}.ovf", "OVAFormat"),
        Format.OVF: (f"{_F}.ovf", "OVFFormat"),
        Format.QCOW2: (f"{_F}.qcow2", "Qcow2Format"),
        Format.RAW: (f"{_F}.raw", "RawFormat"),
        Format.TAR: (f"{_F}.tar", "TarFormat"),
        Format.VHD: (f"{_F}.vhd", "VHDFormat"),
        Format.XEN: (f"{_F}.xen", "XenFormat"),
    },
    DriverKind.STORAGE: {
        Storage.HTTP: (f"{_S}.http", "HTTPStorage"),
        Storage.LIBCLOUD: (f"{_S}.libcloud", "LibcloudStorage"),
        Storage.LOCAL: (f"{_S}.local", "LocalStorage"),
        Storage.S3: (f"{_S}.s3", "S3Storage"),
        Storage.SAN: (f"{_S}.san", "SANStorage"),
    },
}

_lock = threading.RLock()
_registered: dict[DriverKind, dict[str, type]] = {DriverKind.FORMAT: {}, DriverKind.STORAGE: {}}
_entry_points_loaded: dict[DriverKind, dict[str, Any]] = {}
_allowed_overrides: set[tuple[DriverKind, str]] = set()
_warned: set[tuple[DriverKind, str]] = set()


def _kind(kind: DriverKind | str) -> DriverKind:
    try:
        return DriverKind(kind)
    except ValueError:
        raise ConfigurationError(
            f"unknown driver kind {kind!r} (known: format, storage)") from None


def _module_exists(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _entry_points(kind: DriverKind) -> dict[str, Any]:
    """The installed entry points of ``kind``. Both groups are read in one
    scan of the installed distributions (each scan reads every package's
    metadata: 30 to 50 ms with this project's dependencies, on every fresh
    process that renders)."""
    from importlib.metadata import entry_points

    with _lock:
        if kind not in _entry_points_loaded:
            found = entry_points()
            for each, group in _GROUPS.items():
                _entry_points_loaded[each] = {ep.name: ep for ep in found.select(group=group)}
        return _entry_points_loaded[kind]


def allow_override(kind: DriverKind | str, name: str) -> None:
    """Let an installed entry point replace the built-in driver ``name``
    (as :data:`OVERRIDES_ENV` does from the environment)."""
    with _lock:
        _allowed_overrides.add((_kind(kind), str(name)))


def _override_allowed(kind: DriverKind, name: str) -> bool:
    if (kind, name) in _allowed_overrides:
        return True
    wanted = {item.strip() for item in os.environ.get(OVERRIDES_ENV, "").split(",")}
    return f"{kind}:{name}" in wanted


def _package(point: Any) -> str:
    dist = getattr(point, "dist", None)
    return str(getattr(dist, "name", None) or point.value.partition(":")[0])


def _shadows(kind: DriverKind, name: str, point: Any) -> bool:
    """Whether ``point`` would replace a built-in driver without the
    provider's consent (warned about once)."""
    if name not in BUILTIN[kind] or _override_allowed(kind, name):
        return False
    with _lock:
        first = (kind, name) not in _warned
        _warned.add((kind, name))
    if first:
        log.warning("the entry point %s = %s of package %s takes the name of the built-in "
                    "%s driver %r of cloudlets; the built-in is kept (set %s=%s:%s to use "
                    "the entry point)", name, point.value, _package(point), kind, name,
                    OVERRIDES_ENV, kind, name)
    return True


def entry_point_report(kind: DriverKind | str) -> list[dict[str, str]]:
    """Every installed entry point of ``kind``: its name, target, package
    and status (``ok``, ``overrides the built-in``, ``ignored: ...`` for one
    that takes a built-in's name, or ``broken: ...`` with the reason)."""
    kind = _kind(kind)
    rows = []
    for name, point in sorted(_entry_points(kind).items()):
        row = {"name": name, "value": point.value, "package": _package(point)}
        if name in BUILTIN[kind] and not _override_allowed(kind, name):
            row["status"] = (f"ignored: takes the name of the built-in {kind} driver "
                             f"(set {OVERRIDES_ENV}={kind}:{name} to use it)")
        else:
            try:
                _check_class(kind, name, point.load(), f"entry point {point.value}")
            except Exception as exc:  # noqa: BLE001 - a third party's import can raise anything
                row["status"] = f"broken: {type(exc).__name__}: {exc}"
            else:
                row["status"] = ("overrides the built-in" if name in BUILTIN[kind] else "ok")
        rows.append(row)
    return rows


def refresh_entry_points() -> None:
    """Forget the cached entry points (after installing a package at run time)."""
    with _lock:
        _entry_points_loaded.clear()


def _check_class(kind: DriverKind, name: str, cls: Any, origin: str) -> type:
    base = _BASES[kind]
    if not isinstance(cls, type) or not issubclass(cls, base):
        raise ConfigurationError(
            f"{kind} driver {name!r} from {origin} is not a subclass of {base.__name__}")
    declared = getattr(cls, "name", None)
    if declared != name:
        raise ConfigurationError(
            f"{kind} driver {name!r} from {origin} declares name {declared!r}")
    return cls


def _import(kind: DriverKind, name: str, module: str, attr: str, *,
            check_name: bool = True) -> type:
    origin = f"{module}:{attr}"
    try:
        loaded = importlib.import_module(module)
    except ImportError as exc:
        raise ConfigurationError(
            f"{kind} driver {name!r} cannot be imported from {module}: {exc}") from exc
    try:
        cls = getattr(loaded, attr)
    except AttributeError:
        raise ConfigurationError(f"{kind} driver {name!r}: {module} has no {attr}") from None
    if not check_name:
        name = getattr(cls, "name", name)
    return _check_class(kind, name, cls, origin)


def get_driver(kind: DriverKind | str, name: str) -> type:
    """Find a driver class.

    Lookup order: drivers added with :func:`set_driver`, then entry points,
    then the built-in drivers. A built-in name is answered without reading
    the entry points at all unless its override is allowed
    (:func:`allow_override`, :data:`OVERRIDES_ENV`): an entry point could not
    replace it anyway, and the scan of every installed distribution's
    metadata costs 30 to 50 ms in each fresh process that renders.
    ``cloudlets drivers`` lists the entry points so ignored.

    :param kind: ``format`` or ``storage``.
    :param name: the driver's name (``qcow2``, ``Format.QCOW2``...).
    :returns: the driver class.
    :raises DriverNotFoundError: when no driver has that name.
    :raises ConfigurationError: when it exists but cannot be loaded.
    """
    kind = _kind(kind)
    name = str(name)
    with _lock:
        if name in _registered[kind]:
            return _registered[kind][name]
    builtin = BUILTIN[kind].get(name)
    if builtin is not None and not _override_allowed(kind, name):
        point = None
    else:
        point = _entry_points(kind).get(name)
    if point is not None:
        try:
            cls = point.load()
        except Exception as exc:
            raise ConfigurationError(
                f"{kind} driver {name!r} from entry point {point.value} failed to load: "
                f"{type(exc).__name__}: {exc}") from exc
        return _check_class(kind, name, cls, f"entry point {point.value}")
    if builtin is not None and _module_exists(builtin[0]):
        return _import(kind, name, *builtin)
    raise DriverNotFoundError(str(kind), name, list_drivers(kind))


def set_driver(kind: DriverKind | str, name: str, module: str, cls: str, *,
               replace: bool = False) -> type:
    """Register a driver at run time.

    The class is imported and checked right away; if that fails nothing is
    registered.

    :param kind: ``format`` or ``storage``.
    :param name: the name to register (must equal the class's ``name``).
    :param module: dotted module path.
    :param cls: class name in that module.
    :param replace: allow replacing an existing driver of that name.
    :returns: the driver class.
    :raises ConfigurationError: on a duplicate name or a broken driver.
    """
    kind = _kind(kind)
    with _lock:
        if not replace and name in list_drivers(kind):
            raise ConfigurationError(
                f"a {kind} driver named {name!r} already exists; pass replace=True to replace it")
        previous = _registered[kind].get(name)
        try:
            driver = _import(kind, name, module, cls)
        except ConfigurationError:
            if previous is not None:
                _registered[kind][name] = previous
            raise
        _registered[kind][name] = driver
        return driver


def unset_driver(kind: DriverKind | str, name: str) -> None:
    """Remove a driver added with :func:`set_driver` (built-ins and entry
    points stay)."""
    kind = _kind(kind)
    with _lock:
        _registered[kind].pop(name, None)


def list_drivers(kind: DriverKind | str) -> list[str]:
    """:returns: the names of every driver available for ``kind``, sorted."""
    kind = _kind(kind)
    with _lock:
        points = dict(_entry_points(kind))
        names = set(_registered[kind]) | set(points)
    for name in sorted(points.keys() & BUILTIN[kind].keys()):
        _shadows(kind, name, points[name])  # warns once that the built-in is kept
    names |= {name for name, (module, _) in BUILTIN[kind].items() if _module_exists(module)}
    return sorted(str(n) for n in names)


@overload
def make_driver(kind: Literal[DriverKind.FORMAT], name_or_spec: object,
                **options: Any) -> FormatDriver: ...


@overload
def make_driver(kind: Literal[DriverKind.STORAGE], name_or_spec: object,
                **options: Any) -> StorageDriver: ...


@overload
def make_driver(kind: DriverKind | str, name_or_spec: object,
                **options: Any) -> FormatDriver | StorageDriver: ...


def make_driver(kind: DriverKind | str, name_or_spec: object,
                **options: Any) -> FormatDriver | StorageDriver:
    """The one way cloudlets turns what a caller gave into a driver instance.

    :param kind: ``format`` or ``storage``.
    :param name_or_spec: a driver instance (returned as it is), a driver
        class, a registered name (``qcow2``), or a ``module:Class`` path (how
        the catalog records a driver that is not registered everywhere).
    :param options: keyword arguments of the driver's constructor; checked
        against its signature before it is called.
    :returns: the driver instance.
    :raises DriverNotFoundError: for an unknown name.
    :raises ConfigurationError: for options the driver does not take, a
        driver that needs arguments and got none, or an object that is not
        a driver of ``kind``.
    """
    kind = _kind(kind)
    base = _BASES[kind]
    if isinstance(name_or_spec, FormatDriver | StorageDriver) and isinstance(name_or_spec, base):
        if options:
            raise ConfigurationError(
                f"{kind} driver {name_or_spec.name!r} is already built; options "
                f"{', '.join(sorted(options))} cannot be applied to it")
        return name_or_spec
    if isinstance(name_or_spec, type) and issubclass(name_or_spec, base):
        cls: type = name_or_spec
        shown = getattr(cls, "name", cls.__name__)
    elif isinstance(name_or_spec, str) and ":" in name_or_spec:
        module, _, attr = name_or_spec.partition(":")
        cls = _import(kind, attr, module, attr, check_name=False)
        shown = getattr(cls, "name", name_or_spec)
    elif isinstance(name_or_spec, str):
        cls = get_driver(kind, name_or_spec)
        shown = name_or_spec
    else:
        raise ConfigurationError(f"not a {kind} driver: {name_or_spec!r}")
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # a C-level constructor: let the call decide
        signature = None
    if signature is not None:
        try:
            signature.bind(**options)
        except TypeError as exc:
            accepted = [p for p in signature.parameters if p != "self"]
            hint = (f"; pass an instance, or the options {', '.join(accepted)}" if not options
                    else f"; it takes {', '.join(accepted) or 'no arguments'}")
            raise ConfigurationError(f"{kind} driver {shown!r}: {exc}{hint}") from None
    try:
        driver = cls(**options)
    except TypeError as exc:
        raise ConfigurationError(
            f"{kind} driver {shown!r} needs arguments; pass an instance: {exc}") from None
    if not isinstance(driver, FormatDriver | StorageDriver) or not isinstance(driver, base):
        raise ConfigurationError(f"{cls!r} is not a {kind} driver")
    return driver


def driver_class_path(driver: object) -> str:
    """The ``module:Class`` path of a driver instance or class, which
    :func:`make_driver` takes back."""
    cls = driver if isinstance(driver, type) else type(driver)
    return f"{cls.__module__}:{cls.__qualname__}"
