"""``cloudlets images``, ``cloudlets image show`` and ``cloudlets image
delete`` on a catalog filled by real renders."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from cloudlets.catalog import CatalogEntry, ImageCatalog, ImageStatus
from cloudlets.cli import EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, main
from cloudlets.errors import IntegrityError
from cloudlets.images import Images
from tests.test_catalog import make_cloudlet, make_renderer, wait_for
from tests.test_images import SPAWN, _child_hang

ROOT = Path(__file__).resolve().parents[1]


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def filled(tmp_path: Path) -> tuple[Path, dict[str, CatalogEntry]]:
    """A catalog with web 1.0, 1.10 and 1.9 ready, and a failed db render."""
    catalog = ImageCatalog(tmp_path / "catalog.sqlite3")
    images = Images(make_renderer(tmp_path), catalog)
    output = str(tmp_path / "out") + "/{name}-{version}/"
    entries = {}
    for version in ("1.0", "1.10", "1.9"):
        entries[version] = images.create(
            make_cloudlet(tmp_path / version, name="web", version=version), output,
            "local", "tar")
    broken = make_cloudlet(tmp_path / "db", name="db", version="3")
    broken["filesystem"]["sha256"] = "0" * 64
    with pytest.raises(IntegrityError):
        images.create(broken, output, "local", "tar")
    return catalog.path, entries


def test_images_lists_by_name_and_version(filled: Any) -> None:
    path, entries = filled
    code, out, _ = run("images", "--catalog", str(path))
    assert code == EXIT_OK
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["NAME", "VERSION", "IMAGE", "STATUS"]
    rows = [line.split() for line in lines[1:]]
    assert [(r[0], r[1], r[3]) for r in rows] == [
        ("db", "3", "failed"), ("web", "1.0", "ready"), ("web", "1.9", "ready"),
        ("web", "1.10", "ready")]
    assert rows[1][2] == entries["1.0"].image_id
    assert rows[1][6] == entries["1.0"].manifest_digest[:12]  # the manifest digest is shown


def test_images_json_and_filters(filled: Any) -> None:
    path, entries = filled
    code, out, _ = run("images", "--catalog", str(path), "--json", "--name", "web")
    assert code == EXIT_OK
    data = json.loads(out)
    assert [i["manifest"]["version"] for i in data["images"]] == ["1.0", "1.9", "1.10"]
    first = data["images"][0]
    assert first["manifest"] == {"name": "web", "version": "1.0",
                                 "digest": entries["1.0"].manifest_digest}
    assert first["artifacts"][0]["sha256"] == entries["1.0"].artifacts[0].sha256
    code, out, _ = run("--json", "images", "--catalog", str(path), "--status", "failed")
    (failed,) = json.loads(out)["images"]
    assert failed["manifest"]["name"] == "db" and "sha256" in failed["error"]
    code, out, _ = run("images", "--catalog", str(path), "--version", "1.9", "--json")
    assert [i["image_id"] for i in json.loads(out)["images"]] == [entries["1.9"].image_id]


def test_image_show(filled: Any) -> None:
    path, entries = filled
    entry = entries["1.10"]
    code, out, _ = run("image", "show", entry.image_id, "--catalog", str(path))
    assert code == EXIT_OK
    assert out.startswith(f"{entry.image_id}  web 1.10, manifest {entry.manifest_digest[:12]}")
    assert f"digest:   {entry.manifest_digest}" in out
    assert entry.artifacts[0].location in out and "status:   ready" in out
    code, out, _ = run("image", "show", entry.entry_id, "--json", "--catalog", str(path))
    data = json.loads(out)
    assert data["image_id"] == entry.image_id and data["manifest"]["version"] == "1.10"
    assert data["config_digest"] == entry.config_digest


def test_image_delete_goes_through_the_storage_driver(filled: Any) -> None:
    path, entries = filled
    entry = entries["1.0"]
    location = Path(entry.artifacts[0].location)
    assert location.is_file()
    code, out, _ = run("image", "delete", entry.image_id, "--catalog", str(path))
    assert code == EXIT_OK and not location.exists()
    assert "web 1.0" in out and "1 artifact(s) removed from local" in out
    code, out, _ = run("image", "delete", entry.image_id, "--catalog", str(path))
    assert code == EXIT_OK and "was already deleted; nothing removed" in out
    code, out, _ = run("images", "--catalog", str(path))
    assert entry.image_id not in out
    code, out, _ = run("images", "--catalog", str(path), "--all", "--json")
    statuses = {i["image_id"]: i["status"] for i in json.loads(out)["images"]}
    assert statuses[entry.image_id] == "deleted"


def test_unknown_image_and_usage_errors(filled: Any) -> None:
    path, _ = filled
    code, out, err = run("image", "show", "img-nope", "--catalog", str(path))
    assert code == EXIT_NOT_FOUND and "no image 'img-nope'" in err
    code, out, err = run("image", "delete", "img-nope", "--catalog", str(path), "--json")
    assert code == EXIT_NOT_FOUND and json.loads(out)["error"] == "ImageNotFoundError"
    code, _, _ = run("image", "--catalog", str(path))
    assert code == EXIT_USAGE


def test_read_only_commands_create_no_catalog(tmp_path: Path) -> None:
    missing = tmp_path / "fresh" / "catalog.sqlite3"
    code, out, _ = run("images", "--catalog", str(missing), "--json")
    assert code == EXIT_OK and json.loads(out)["images"] == []
    code, _, err = run("image", "show", "img-x", "--catalog", str(missing))
    assert code == EXIT_NOT_FOUND and "there is no catalog" in err
    assert not (tmp_path / "fresh").exists()


def test_images_reports_a_killed_render_as_failed(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite3"
    ImageCatalog(path)
    marker = tmp_path / "holding"
    child = SPAWN.Process(target=_child_hang, args=(
        str(path), str(tmp_path), make_cloudlet(tmp_path / "src"), str(tmp_path / "out") + "/",
        str(marker)))
    child.start()
    try:
        wait_for(marker)
        code, out, _ = run("images", "--catalog", str(path), "--json")
        (shown,) = json.loads(out)["images"]
        assert shown["status"] == "rendering" and shown["owner"]["pid"] == child.pid
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
    finally:
        if child.is_alive():
            child.kill()
            child.join()
    code, out, _ = run("image", "show", shown["entry_id"], "--catalog", str(path))
    assert code == EXIT_OK and "status:   failed" in out and "is gone" in out
    (entry,) = ImageCatalog(path).entries()
    assert entry.status is ImageStatus.FAILED
    # The killed render could not remove its work directory; the next render does.
    tmp = Path(tempfile.gettempdir())
    assert len(list(tmp.glob(f"cloudlets-render-{child.pid}-*"))) == 1
    make_renderer(tmp_path).render(make_cloudlet(tmp_path / "src2"),
                                   str(tmp_path / "again") + "/", "local", "tar")
    assert list(tmp.glob(f"cloudlets-render-{child.pid}-*")) == []


def test_command_line_entry_point(filled: Any) -> None:
    path, entries = filled
    env = dict(os.environ, PYTHONPATH=str(ROOT), CLOUDLETS_HOME=str(path.parent))
    done = subprocess.run([sys.executable, "-m", "cloudlets", "images", "--json"],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    ids = {i["image_id"] for i in json.loads(done.stdout)["images"]}
    assert {e.image_id for e in entries.values()} <= ids
