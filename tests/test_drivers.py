"""The driver registry: built-ins, set_driver, entry points from another
distribution."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cloudlets import ConfigurationError, DriverNotFoundError, Storage, get_driver, set_driver
from cloudlets.drivers import providers
from cloudlets.drivers.storage.local import LocalStorage
from cloudlets.drivers.types import DriverKind, Format

ROOT = Path(__file__).resolve().parents[1]


def test_builtin_lookup_by_enum_and_string() -> None:
    assert get_driver("storage", "local") is LocalStorage
    assert get_driver(DriverKind.STORAGE, Storage.LOCAL) is LocalStorage


def test_unknown_driver_lists_known_ones() -> None:
    with pytest.raises(DriverNotFoundError) as caught:
        get_driver("storage", "ftp")
    assert "no storage driver named 'ftp'" in str(caught.value)
    assert "local" in str(caught.value)


def test_unknown_kind() -> None:
    with pytest.raises(ConfigurationError, match="unknown driver kind 'network'"):
        get_driver("network", "x")


def test_enums_are_alphabetical_and_documented() -> None:
    for enum_cls in (Format, Storage):
        names = [member.name for member in enum_cls]
        assert names == sorted(names)
    assert set(providers.BUILTIN[DriverKind.FORMAT]) == set(Format)
    assert set(providers.BUILTIN[DriverKind.STORAGE]) == set(Storage)


# A module holding test drivers, importable by set_driver.
class MemoryStorage(LocalStorage):
    name = "memory-test"


class NotADriver:
    name = "broken-test"


class WrongName(LocalStorage):
    name = "something-else"


def test_set_driver_registers_and_refuses_duplicates() -> None:
    try:
        cls = set_driver("storage", "memory-test", __name__, "MemoryStorage")
        assert cls is MemoryStorage
        assert get_driver("storage", "memory-test") is MemoryStorage
        assert "memory-test" in providers.list_drivers("storage")
        with pytest.raises(ConfigurationError, match="already exists"):
            set_driver("storage", "memory-test", __name__, "MemoryStorage")
        set_driver("storage", "memory-test", __name__, "MemoryStorage", replace=True)
    finally:
        providers.unset_driver("storage", "memory-test")
    assert "memory-test" not in providers.list_drivers("storage")


def test_set_driver_refuses_builtin_name_without_replace() -> None:
    with pytest.raises(ConfigurationError, match="already exists"):
        set_driver("storage", "local", __name__, "MemoryStorage")


@pytest.mark.parametrize(("name", "module", "cls", "fragment"), [
    ("broken-test", __name__, "NotADriver", "not a subclass of StorageDriver"),
    ("memory-test", __name__, "WrongName", "declares name 'something-else'"),
    ("memory-test", "no.such.module", "X", "cannot be imported"),
    ("memory-test", __name__, "Missing", "has no Missing"),
])
def test_set_driver_checks_import_and_rolls_back(name: str, module: str, cls: str,
                                                 fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        set_driver("storage", name, module, cls)
    assert name not in providers.list_drivers("storage")


def test_failed_replace_keeps_previous_driver() -> None:
    try:
        set_driver("storage", "memory-test", __name__, "MemoryStorage")
        with pytest.raises(ConfigurationError):
            set_driver("storage", "memory-test", __name__, "WrongName", replace=True)
        assert get_driver("storage", "memory-test") is MemoryStorage
    finally:
        providers.unset_driver("storage", "memory-test")


PLUGIN_SETUP = """
from setuptools import setup
setup(
    name="acme-cloudlets-plugin",
    version="0.1",
    py_modules=["acme_cloudlets"],
    entry_points={
        "cloudlets.formats": ["acme-disk = acme_cloudlets:AcmeDiskFormat",
                              "qcow2 = acme_cloudlets:AcmeQcow2",
                              "raw = acme_cloudlets:Misnamed",
                              "acme-broken = acme_cloudlets:DoesNotExist"],
        "cloudlets.storage": ["acme-store = acme_cloudlets:AcmeStorage"],
    },
)
"""

PLUGIN_MODULE = '''
import shutil
from cloudlets.drivers.base import FormatDriver, OutputFile
from cloudlets.drivers.storage.local import LocalStorage
from cloudlets.drivers.types import FormatCapability


class AcmeDiskFormat(FormatDriver):
    name = "acme-disk"
    description = "Acme's raw disk with an .acme extension"
    capabilities = FormatCapability.BOOTABLE

    def convert(self, context):
        target = context.workdir / f"{context.basename}.acme"
        shutil.copyfile(context.disk.path, target)
        return [OutputFile(role="disk", path=target, name=target.name)]


class AcmeStorage(LocalStorage):
    name = "acme-store"
    description = "Acme's storage"


class AcmeQcow2(AcmeDiskFormat):
    name = "qcow2"
    description = "Acme's take on qcow2"


class Misnamed(AcmeDiskFormat):
    name = "not-raw"
'''

PLUGIN_CONFORMANCE = '''
import pytest
from cloudlets.drivers.providers import get_driver
from cloudlets.testing.formats import FormatDriverConformance
from cloudlets.testing.storage import StorageDriverConformance


class TestAcmeFormat(FormatDriverConformance):
    @pytest.fixture
    def format_driver(self):
        return get_driver("format", "acme-disk")()

    def extract_raw(self, outputs, tmp_path):
        return outputs[0].path


class TestAcmeStorage(StorageDriverConformance):
    @pytest.fixture
    def storage(self, tmp_path):
        return get_driver("storage", "acme-store")(root=tmp_path)

    @pytest.fixture
    def new_location(self):
        names = iter(range(1000))
        return lambda name: f"{next(names)}-{name}"
'''


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A third-party distribution installed with pip into its own directory."""
    work = tmp_path_factory.mktemp("plugin")
    source = work / "src"
    source.mkdir()
    (source / "setup.py").write_text(PLUGIN_SETUP)
    (source / "acme_cloudlets.py").write_text(PLUGIN_MODULE)
    site = work / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(site), str(source)],
        capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr
    assert any(p.name.startswith("acme_cloudlets_plugin") for p in site.glob("*.dist-info"))
    return site


def _run_with(site: Path, *args: str,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": f"{site}:{ROOT}", "PATH": "/usr/bin:/bin", "HOME": str(site),
           **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=180, env=env, check=False)


def test_entry_point_driver_from_separate_distribution(plugin_site: Path) -> None:
    code = textwrap.dedent("""
        import json
        from cloudlets import get_driver, list_drivers
        fmt = get_driver("format", "acme-disk")
        store = get_driver("storage", "acme-store")
        print(json.dumps({"format": fmt.__module__ + "." + fmt.__name__,
                          "storage": store.__name__,
                          "formats": list_drivers("format")}))
    """)
    result = _run_with(plugin_site, "-c", code)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["format"] == "acme_cloudlets.AcmeDiskFormat"
    assert found["storage"] == "AcmeStorage"
    assert "acme-disk" in found["formats"]


def test_entry_point_driver_listed_by_cli(plugin_site: Path) -> None:
    result = _run_with(plugin_site, "-m", "cloudlets", "drivers", "--json")
    assert result.returncode == 0, result.stderr
    formats = {row["name"]: row for row in json.loads(result.stdout)["format"]}
    assert formats["acme-disk"]["available"] is True
    assert formats["acme-disk"]["class"] == "acme_cloudlets.AcmeDiskFormat"


def test_entry_points_cannot_shadow_builtins_unless_allowed(plugin_site: Path) -> None:
    code = textwrap.dedent("""
        import json, logging
        logging.basicConfig(level=logging.WARNING)
        from cloudlets import get_driver, list_drivers
        from cloudlets.drivers import providers
        found = [get_driver("format", n).__module__ for n in ("qcow2", "raw")]
        # a built-in name is answered without scanning the installed packages
        scanned = bool(providers._entry_points_loaded)
        listed = list_drivers("format")
        print(json.dumps({"found": found, "scanned": scanned, "listed": "acme-disk" in listed}))
    """)
    result = _run_with(plugin_site, "-c", code)
    assert result.returncode == 0, result.stderr
    # The built-ins are kept: neither the shadowing nor the misnamed one disables them.
    report = json.loads(result.stdout)
    assert report == {"found": ["cloudlets.drivers.formats.qcow2", "cloudlets.drivers.formats.raw"],
                      "scanned": False, "listed": True}
    # listing the drivers reads the entry points and says which one is ignored
    assert "acme-cloudlets-plugin" in result.stderr and "built-in is kept" in result.stderr
    allowed = _run_with(plugin_site, "-c", code, env={"CLOUDLETS_DRIVER_OVERRIDES": "format:qcow2"})
    assert allowed.returncode == 0, allowed.stderr
    report = json.loads(allowed.stdout)
    assert report["found"][0] == "acme_cloudlets" and report["scanned"] is True
    assert "driver 'qcow2' of cloudlets" not in allowed.stderr  # allowed: no warning
    assert "driver 'raw' of cloudlets" in allowed.stderr
    listed = _run_with(plugin_site, "-m", "cloudlets", "drivers", "--json")
    points = {row["name"]: row for row in json.loads(listed.stdout)["entry_points"]["format"]}
    assert points["qcow2"]["status"].startswith("ignored: takes the name of the built-in")
    assert points["acme-disk"]["status"] == "ok"
    assert points["acme-broken"]["status"].startswith("broken: ")
    assert "DoesNotExist" in points["acme-broken"]["status"]
    human = _run_with(plugin_site, "-m", "cloudlets", "drivers")
    assert "format acme-broken = acme_cloudlets:DoesNotExist (acme-cloudlets-plugin): broken" \
        in human.stdout


def test_third_party_runs_the_conformance_suites(plugin_site: Path, tmp_path: Path) -> None:
    test_file = tmp_path / "test_acme_conformance.py"
    test_file.write_text(PLUGIN_CONFORMANCE)
    result = _run_with(plugin_site, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                       "-p", "no:randomly", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout and "failed" not in result.stdout


# -- the one driver factory and the one deletion loop ---------------------------

def test_make_driver_takes_names_classes_instances_and_paths(tmp_path: Path) -> None:
    from cloudlets.drivers.providers import driver_class_path, make_driver
    from cloudlets.drivers.storage.local import LocalStorage
    from cloudlets.errors import ConfigurationError, DriverNotFoundError

    by_name = make_driver("storage", "local")
    assert isinstance(by_name, LocalStorage)
    built = LocalStorage(root=str(tmp_path))
    assert make_driver("storage", built) is built
    assert isinstance(make_driver("storage", LocalStorage), LocalStorage)
    path = driver_class_path(built)
    assert path == "cloudlets.drivers.storage.local:LocalStorage"
    rebuilt = make_driver("storage", path, root=str(tmp_path))
    assert isinstance(rebuilt, LocalStorage) and rebuilt is not built
    qcow2 = make_driver("format", "qcow2", ex_compress=True)
    assert qcow2.name == "qcow2"
    with pytest.raises(ConfigurationError, match=r"ex_colour.*it takes .*ex_compress"):
        make_driver("format", "qcow2", ex_colour="blue")
    with pytest.raises(ConfigurationError, match="already built"):
        make_driver("storage", built, root="x")
    with pytest.raises(ConfigurationError, match="not a format driver"):
        make_driver("format", built)
    with pytest.raises(ConfigurationError, match="not a storage driver"):
        make_driver("storage", 42)
    with pytest.raises(DriverNotFoundError):
        make_driver("format", "nope")
    with pytest.raises(ConfigurationError, match="cannot be imported"):
        make_driver("storage", "no.such.module:Driver")


def test_delete_locations_reports_removed_missing_and_failed(tmp_path: Path) -> None:
    from cloudlets.drivers.base import delete_locations
    from cloudlets.drivers.storage.local import LocalStorage

    storage = LocalStorage(root=str(tmp_path))
    for name in ("a", "b"):
        storage.upload(name.encode(), name)
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "inside").write_text("x")
    report = delete_locations(storage, ["a", "gone", "blocked", "b", "a"])
    assert report.removed == ("a", "b") and report.missing == ("gone",)
    assert [location for location, _ in report.failed] == ["blocked"]
    assert not report.complete
    assert not (tmp_path / "a").exists() and (tmp_path / "blocked").exists()
