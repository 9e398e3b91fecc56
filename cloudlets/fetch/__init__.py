"""Fetching tarballs: verified while streaming, resumable, retried, policed.

:class:`Fetcher` downloads one URL (``http``, ``https``, ``file://`` or a local
path) into a destination file and proves it is the expected content:

- the body is streamed in :attr:`Fetcher.CHUNK_SIZE` pieces, in constant memory;
- its sha256 (and its size, when known) is checked while it arrives: a body
  longer than the expected size is cut off at the first extra byte;
- a dropped connection is resumed with an HTTP ``Range`` request (guarded by
  ``If-Range``); a server that answers ``200`` instead restarts cleanly;
- connection errors, timeouts, 5xx and 429 are retried with exponential
  backoff and jitter, bounded in count and total time (:class:`RetryPolicy`);
- every request has a connect and a read timeout;
- the :class:`UrlPolicy` decides which schemes and hosts may be fetched, and
  every redirect is followed by hand, checked against the policy and bounded;
- on failure the destination file is removed, and the error
  (:class:`~cloudlets.errors.FetchError`,
  :class:`~cloudlets.errors.IntegrityError`) names the URL with its
  credentials redacted, the HTTP status and what was expected.

:meth:`Fetcher.fetch` also takes :class:`~cloudlets.mirrors.MirrorRules`: each
candidate URL is tried in order, the origin last.

A :class:`DownloadWatch` passed to :meth:`Fetcher.fetch` lets another thread
read the download while it lands (:meth:`DownloadWatch.reader`); nothing it
reads is verified until the fetch returns.
"""

from cloudlets.fetch.fetcher import Fetcher, FetchResult
from cloudlets.fetch.policy import RetryPolicy, UrlPolicy, check_sha256
from cloudlets.fetch.watch import DownloadCancelled, DownloadRestarted, DownloadWatch

__all__ = ["DownloadCancelled", "DownloadRestarted", "DownloadWatch", "FetchResult", "Fetcher",
           "RetryPolicy", "UrlPolicy", "check_sha256"]
