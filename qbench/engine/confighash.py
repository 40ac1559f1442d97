"""Configuration hashing: every evaluation is identified by a hash of its full resolved configuration."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

HASH_FIELD = "config_hash"


def canonical_json(value: Any) -> str:
    """Deterministic JSON (sorted keys, no whitespace) used for hashing and storage."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 (first 16 hex digits) of the canonical JSON of ``config`` without its own hash field."""
    payload = {key: value for key, value in config.items() if key != HASH_FIELD}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]
