"""Signatures of model versions: HMAC-SHA256 over a version's ``SHA256SUMS``.

``SHA256SUMS`` holds the SHA-256 of every file of a version, so one signature over it covers
them all. It is kept beside it, in ``SHA256SUMS.sig``, as one line: ``hmac-sha256 <hex>``.
The key is a secret the service is configured with (``model_signing_key_file``); the same key
signs (``exfilwatch train``, ``exfilwatch models promote``) and verifies (every load while a
key is configured). During a rotation several keys may be configured: the first signs, any
of them verifies.

>>> old, new = b"o" * 32, b"n" * 32
>>> line = signature(b"sums", old)
>>> line.split()[0], matches(line, b"sums", [new, old]), matches(line, b"sums", [new])
('hmac-sha256', True, False)
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import Final

SCHEME: Final = "hmac-sha256"
#: What is signed starts with this, so a signature made for something else never verifies here.
_CONTEXT: Final = b"exfilwatch model signature v1\n"
#: A signature file is one short line; more than this is not one.
MAX_SIGNATURE_BYTES: Final = 1024


def _digest(sums: bytes, key: bytes) -> bytes:
    return hmac.new(key, _CONTEXT + sums, hashlib.sha256).hexdigest().encode("ascii")


def signature(sums: bytes, key: bytes) -> str:
    """The content of ``SHA256SUMS.sig`` for ``sums`` (the bytes of ``SHA256SUMS``)."""
    return f"{SCHEME} {_digest(sums, key).decode('ascii')}\n"


def matches(text: str, sums: bytes, keys: Sequence[bytes]) -> bool:
    """Whether ``text`` (a signature file's content) signs ``sums`` under one of ``keys``."""
    scheme, _, digest = text.strip().partition(" ")
    given = digest.strip().encode("utf-8", "replace")
    return scheme == SCHEME and any(hmac.compare_digest(given, _digest(sums, k)) for k in keys)
