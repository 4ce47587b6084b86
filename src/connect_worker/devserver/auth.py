"""Signing-key checks for the Connect REST endpoints (signing_key_strategy.go, restated)."""

from __future__ import annotations

import hashlib
import hmac
import re

_PREFIX = re.compile(r"^signkey-[A-Za-z0-9]+-")


def hash_signing_key(key: str) -> str:
    """SHA-256 (hex) of the hex-decoded key with its ``signkey-<env>-`` prefix removed."""
    bare = _PREFIX.sub("", key)
    return hashlib.sha256(bytes.fromhex(bare)).hexdigest()


def accepted_tokens(key: str) -> set[str]:
    """Bearer values that authenticate: the plain key, its hash, ``signkey-<env>-<hash>``."""
    tokens = {key}
    match = _PREFIX.match(key)
    try:
        hashed = hash_signing_key(key)
    except ValueError:
        return tokens
    tokens.add(hashed)
    if match is not None:
        tokens.add(match.group(0) + hashed)
    return tokens


def check_authorization(header: str | None, key: str | None) -> tuple[bool, str]:
    """Return (ok, bearer value). Dev mode (no key) accepts anything."""
    bearer = ""
    if header and header.lower().startswith("bearer "):
        bearer = header[7:].strip()
    if key is None:
        return True, bearer
    if not bearer:
        return False, bearer
    # Accept any signkey-<env>- prefix on the hash (servers normalise prefixes).
    candidates = {bearer, _PREFIX.sub("", bearer)}
    ok = any(hmac.compare_digest(c, t) for c in candidates for t in accepted_tokens(key))
    return ok, bearer
