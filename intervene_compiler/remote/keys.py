"""API keys: stored hashed (SHA-256) in a JSON file, each with the models it may use and its limits.

The file (``intervene-serve --api-keys FILE``)::

    {"keys": [{"name": "alice", "sha256": "<hex>", "models": ["*"],
               "max_request_bytes": 67108864, "max_result_bytes": 268435456,
               "rate_per_minute": 600, "max_seconds": 300}]}

``intervene-serve --api-keys FILE --add-key NAME`` makes a key, prints it once and stores only its hash. A request
without a key or with an unknown one is answered 401, a model the key may not use 403, a request or result over
the key's size 413, more requests than its rate 429.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field

DEFAULTS = {
    "models": ["*"],
    "max_request_bytes": 64 << 20,
    "max_result_bytes": 256 << 20,
    "rate_per_minute": 600,
    "max_seconds": 300.0,
}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class ApiKey:
    name: str
    sha256: str
    models: list[str] = field(default_factory=lambda: ["*"])
    max_request_bytes: int = DEFAULTS["max_request_bytes"]  # type: ignore[assignment]
    max_result_bytes: int = DEFAULTS["max_result_bytes"]  # type: ignore[assignment]
    rate_per_minute: int = DEFAULTS["rate_per_minute"]  # type: ignore[assignment]
    max_seconds: float = DEFAULTS["max_seconds"]  # type: ignore[assignment]

    def may_use(self, model: str) -> bool:
        return "*" in self.models or model in self.models


class KeyRing:
    """The keys of a key file, and each key's recent requests (for its rate)."""

    def __init__(self, path: str):
        self.path = path
        with open(path) as f:
            data = json.load(f)
        self.keys = [ApiKey(**{**DEFAULTS, **entry}) for entry in data.get("keys", [])]
        self._recent: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()

    def find(self, key: str | None) -> ApiKey | None:
        if not key:
            return None
        digest = hash_key(key)
        for k in self.keys:
            if hmac.compare_digest(k.sha256, digest):
                return k
        return None

    def allow_request(self, key: ApiKey) -> bool:
        """Count one request against the key's rate; False when it is over (the request is not counted)."""
        now = time.monotonic()
        with self._lock:
            recent = self._recent[key.name]
            while recent and now - recent[0] > 60.0:
                recent.popleft()
            if len(recent) >= key.rate_per_minute:
                return False
            recent.append(now)
            return True


def add_key(path: str, name: str, **limits) -> str:
    """Make a new key named ``name`` in the key file ``path`` (created if missing); returns the key."""
    data: dict = {"keys": []}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    key = "ic-" + secrets.token_urlsafe(24)
    data["keys"] = [k for k in data.get("keys", []) if k.get("name") != name]
    data["keys"].append({"name": name, "sha256": hash_key(key), **{**DEFAULTS, **limits}})
    tmp = path + ".tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
    return key


__all__ = ["ApiKey", "KeyRing", "add_key", "hash_key"]
