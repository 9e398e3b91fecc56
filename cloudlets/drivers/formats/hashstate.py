"""A SHA-256 whose running state can be copied, saved and restored.

:mod:`hashlib` objects can be copied within a process but not exported, and
a format writer that reuses the hash of a constant prefix of its file (the
qcow2 writer, over a cached base filesystem) wants that state in a fresh
process too. OpenSSL's low-level ``SHA256_Init``/``SHA256_Update``/
``SHA256_Final`` (deprecated in OpenSSL 3 but still exported by
``libcrypto.so.3``, the library :mod:`hashlib` itself links) work on a plain
``SHA256_CTX`` struct of :data:`STATE_SIZE` bytes that can be written to a
file and read back. They are called through :mod:`ctypes`, which releases
the GIL for the call, so a hashing thread still leaves the other threads
running. Without the library, :class:`Sha256` falls back to :mod:`hashlib`
(then :meth:`Sha256.state` is ``None``: nothing to save).
"""

from __future__ import annotations

import ctypes
import hashlib
import struct
import threading
from typing import Any

__all__ = ["STATE_SIZE", "Sha256", "available"]

#: ``sizeof(SHA256_CTX)``: h[8], Nl, Nh, data[16], num, md_len (32-bit each).
STATE_SIZE = 112
_COUNT = struct.Struct("<II")  # at 32: Nl, Nh (the bits hashed, low and high words)
_BUFFERED = struct.Struct("<II")  # at 104: num (bytes waiting in data[]), md_len
_NAMES = ("libcrypto.so.3", "libcrypto.so")

_lock = threading.Lock()
_loaded = False
_lib: Any = None


def _load() -> Any:
    """libcrypto with the three functions typed, checked on a known vector;
    ``None`` when it cannot be loaded or gives a wrong answer."""
    global _loaded, _lib
    with _lock:
        if _loaded:
            return _lib
        _loaded = True
        for name in _NAMES:
            try:
                lib = ctypes.CDLL(name)
                functions = lib.SHA256_Init, lib.SHA256_Update, lib.SHA256_Final
            except (OSError, AttributeError):
                continue
            init, update, final = functions
            init.argtypes = [ctypes.c_void_p]
            update.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
            final.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
            for function in functions:
                function.restype = ctypes.c_int
            _lib = lib
            probe = Sha256._with_lib(lib)
            probe.update(b"abc" * 100)
            if probe.hexdigest() == hashlib.sha256(b"abc" * 100).hexdigest():
                break
            _lib = None
        return _lib


def available() -> bool:
    """Whether states can be saved (libcrypto is there and agrees with hashlib)."""
    return _load() is not None


class Sha256:
    """A running SHA-256: OpenSSL's ``SHA256_CTX`` when libcrypto loads
    (:func:`available`), else a :mod:`hashlib` object."""

    def __init__(self) -> None:
        lib = _load()
        self._lib = lib
        self._ctx: ctypes.Array[ctypes.c_char] | None = None
        self._hash: Any = None
        if lib is None:
            self._hash = hashlib.sha256()
        else:
            self._ctx = ctypes.create_string_buffer(STATE_SIZE)
            if lib.SHA256_Init(self._ctx) != 1:  # pragma: no cover - cannot fail
                raise RuntimeError("SHA256_Init failed")

    @classmethod
    def _with_lib(cls, lib: Any) -> Sha256:
        self = cls.__new__(cls)
        self._lib, self._hash = lib, None
        self._ctx = ctypes.create_string_buffer(STATE_SIZE)
        lib.SHA256_Init(self._ctx)
        return self

    @classmethod
    def restore(cls, state: bytes, length: int) -> Sha256 | None:
        """The hash of ``length`` bytes whose :meth:`state` was ``state``;
        ``None`` when libcrypto is not there or ``state`` cannot be the
        state after ``length`` bytes (a truncated or foreign file)."""
        lib = _load()
        if lib is None or len(state) != STATE_SIZE:
            return None
        bits_low, bits_high = _COUNT.unpack_from(state, 32)
        num, md_len = _BUFFERED.unpack_from(state, 104)
        if md_len != 32 or num != length % 64 \
                or bits_low | bits_high << 32 != (length * 8) % (1 << 64):
            return None
        self = cls.__new__(cls)
        self._lib, self._hash = lib, None
        self._ctx = ctypes.create_string_buffer(state, STATE_SIZE)
        return self

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Hash ``data`` next."""
        if self._ctx is None:
            self._hash.update(data)
            return
        view = memoryview(data)
        if not view.nbytes:
            return
        if isinstance(data, bytes):
            pointer: Any = ctypes.c_char_p(data)
        elif view.readonly:
            pointer = ctypes.c_char_p(view.tobytes())
        else:
            pointer = (ctypes.c_char * view.nbytes).from_buffer(view)
        self._lib.SHA256_Update(self._ctx, pointer, view.nbytes)

    def copy(self) -> Sha256:
        """An independent hash with the same state."""
        clone = Sha256.__new__(Sha256)
        clone._lib = self._lib
        clone._hash = self._hash.copy() if self._ctx is None else None
        clone._ctx = None if self._ctx is None else ctypes.create_string_buffer(
            self._ctx.raw, STATE_SIZE)
        return clone

    def state(self) -> bytes | None:
        """The ``SHA256_CTX`` bytes (for :meth:`restore`); ``None`` for a
        :mod:`hashlib` hash."""
        return None if self._ctx is None else self._ctx.raw

    def hexdigest(self) -> str:
        """The digest of everything hashed so far (the hash goes on)."""
        if self._ctx is None:
            return str(self._hash.hexdigest())
        ctx = ctypes.create_string_buffer(self._ctx.raw, STATE_SIZE)
        out = ctypes.create_string_buffer(32)
        self._lib.SHA256_Final(out, ctx)
        return out.raw.hex()
