"""Block targets: a local device or file, an NBD export, an iSCSI LUN.

A block target has a fixed size and no names: the image is written from its
first byte and the rest of the target is left alone. The driver

- refuses a target smaller than the image before writing anything (and a
  stream of unknown length as soon as it would pass the end): nothing is
  ever written past the image's last byte;
- writes the first MiB (boot code, partition table, filesystem signatures)
  *last*, once every other byte is written, flushed, read back and its
  sha256 compared: until then the target does not look like a complete
  disk. Overwriting wipes the old first MiB before the first byte of the
  new body, and a failure after that leaves it zero, so a half-written
  disk never looks bootable; a target refused before any write (too
  small, unreachable) keeps what it held;
- treats a target whose first MiB holds anything but zeros as "something
  is stored here": it is not overwritten unless asked, and ``delete`` wipes
  that MiB (as ``wipefs`` would the signatures).

How bytes get there:

- **local device or file** (``/dev/sdb``, ``/srv/lun0.img``, ``file:///...``):
  ``pwrite`` in aligned 4 MiB blocks (optionally ``O_DIRECT`` from a
  page-aligned buffer, the odd tail without it), ``fsync`` at the end;
- **NBD** (``nbd://host[:port]/export``, ``nbd+unix:///export?socket=/path``):
  a native client of the NBD protocol (fixed newstyle handshake,
  ``NBD_OPT_GO``, ``WRITE``/``READ``/``FLUSH``, simple replies), streaming
  from the source in constant memory. It keeps a window of requests in
  flight and takes their replies in any order; writes are sent from a
  second thread while the caller reads and hashes the next chunk, with a
  ``FLUSH`` every 64 MiB that nothing waits for (the server writes back
  as the rest arrives); the read-back runs while the server works on the
  last ``FLUSH``, and is hashed on a second thread while the next reads
  arrive. Every write is answered before that ``FLUSH``, a read or the
  header's write is sent;
- **iSCSI** (``iscsi://[user%password@]host[:port]/iqn/lun``): QEMU's libiscsi
  block driver, through a ``qemu-nbd`` started for the operation on a
  private Unix socket, then the same NBD client. The password goes to
  ``qemu-nbd`` in a mode-0600 file (a QEMU ``secret`` object), never on a
  command line.

Why not ``qemu-img convert -n``: it needs a seekable source file (a render
hands over streams too), it cannot write the header last nor read back a
digest, and it does not bound the write to the image size without a JSON
filename. A native NBD client is a few hundred lines of a small, stable,
documented protocol; iSCSI is not, so it goes through QEMU's client.
"""

from cloudlets.drivers.storage.san.driver import SANStorage, redact_target
from cloudlets.drivers.storage.san.target import HEADER_SIZE

__all__ = ["HEADER_SIZE", "SANStorage", "redact_target"]

# the class path the CLI prints and the catalog records stays the one it had
SANStorage.__module__ = __name__
