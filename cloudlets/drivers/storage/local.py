"""Local directory storage: plain paths and ``file://`` URLs.

Writes go to a hidden temporary file in the target directory, are fsynced,
checked against the expected digest, then linked into place (refusing to
clobber) or renamed over the old file when ``overwrite`` is asked for. A
reader never sees a partial artifact at the final path.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, ClassVar
from urllib.parse import unquote, urlsplit

from cloudlets.drivers.base import StorageDriver, UploadSource
from cloudlets.drivers.types import Storage, StorageCapability
from cloudlets.errors import StorageError

__all__ = ["LocalStorage"]


class LocalStorage(StorageDriver):
    """Store artifacts in a local directory.

    :param root: when given, relative locations resolve under it and
        locations outside it are refused.
    """

    name: ClassVar[str] = Storage.LOCAL
    website: ClassVar[str] = "https://en.wikipedia.org/wiki/File_URI_scheme"
    description: ClassVar[str] = "Local files: atomic write (temp, fsync, link/rename)"
    capabilities: ClassVar[StorageCapability] = (
        StorageCapability.STREAM | StorageCapability.VERIFY | StorageCapability.DELETE
        | StorageCapability.READ | StorageCapability.ATOMIC)
    CHUNK_SIZE: ClassVar[int] = 1024 * 1024

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).resolve() if root is not None else None

    def path(self, location: str) -> Path:
        """Map a location (path or ``file://`` URL) to a path.

        :raises StorageError: for another URL scheme, or a path outside :attr:`root`.
        """
        if location.startswith("file://"):
            parts = urlsplit(location)
            if parts.netloc not in ("", "localhost"):
                raise StorageError(f"file URL with a remote host: {location}", location)
            path = Path(unquote(parts.path))
        elif "://" in location:
            raise StorageError(f"local storage cannot write to {location}", location)
        else:
            path = Path(location)
        if self.root is not None:
            path = (self.root / path).resolve() if not path.is_absolute() else path.resolve()
            if path != self.root and self.root not in path.parents:
                raise StorageError(f"{location} is outside the storage root {self.root}",
                                   location)
        elif not path.is_absolute():
            path = Path.cwd() / path
        return path

    def exists(self, location: str) -> bool:
        return self.path(location).exists()

    def _upload(self, source: UploadSource, location: str, *, overwrite: bool) -> str:
        final = self.path(location)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create directory {final.parent}: {exc.strerror}",
                               location) from None
        if final.is_dir():
            raise StorageError(f"{final} is a directory", location)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial",
                                        dir=final.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as handle:
                for chunk in source.chunks(self.CHUNK_SIZE):
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            source.verify(location)
            os.chmod(tmp, 0o644)
            if overwrite:
                os.replace(tmp, final)
            else:
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    raise StorageError(f"refusing to overwrite existing {final}",
                                       location) from None
                tmp.unlink()
            self._fsync_dir(final.parent)
        except OSError as exc:
            raise StorageError(f"cannot write {final}: {exc.strerror or exc}", location) \
                from None
        finally:
            tmp.unlink(missing_ok=True)
        return str(final)

    def _delete(self, location: str) -> None:
        path = self.path(location)
        try:
            path.unlink()
        except FileNotFoundError:
            raise StorageError(f"{path} does not exist", location) from None
        except OSError as exc:
            raise StorageError(f"cannot delete {path}: {exc.strerror}", location) from None

    def _open(self, location: str) -> BinaryIO:
        path = self.path(location)
        try:
            return open(path, "rb")
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror}", location) from None

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
