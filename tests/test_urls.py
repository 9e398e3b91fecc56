"""Credentials never reach a message: cloudlets.urls.redact."""

from __future__ import annotations

import pytest

from cloudlets.urls import redact


@pytest.mark.parametrize(("url", "shown"), [
    ("https://bob:hunter2@example.com/x?sig=abc&a=1", "https://bob:***@example.com/x?sig=***&a=1"),
    ("https://token@example.com/x", "https://***@example.com/x"),
    ("http://h/x?X-Amz-Signature=00ff&X-Amz-Expires=60#frag",
     "http://h/x?X-Amz-Signature=***&X-Amz-Expires=60#***"),  # fragments may hold tokens
    # Nothing to hide: returned exactly, empty hosts included.
    ("nbd+unix:///export?socket=/run/nbd.sock", "nbd+unix:///export?socket=/run/nbd.sock"),
    ("file:///srv/images/web.raw", "file:///srv/images/web.raw"),
    ("s3://bucket/key/web.qcow2", "s3://bucket/key/web.qcow2"),
    ("/srv/images/web.raw", "/srv/images/web.raw"),
    (None, ""),
])
def test_redact(url: str | None, shown: str) -> None:
    assert redact(url) == shown
    assert "hunter2" not in redact(url) and "00ff" not in redact(url)
