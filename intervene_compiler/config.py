"""``ic.CONFIG``: the user's settings for remote execution and the app, as nnsight's ``CONFIG`` holds them.

``CONFIG.API.HOST`` and ``CONFIG.API.APIKEY`` say which intervention service ``remote=True`` talks to and with what
key; ``CONFIG.APP`` holds app settings (``REMOTE_LOGGING``: print a remote job's status lines; ``PYMOUNT`` is
accepted for nnsight code and means nothing here). ``CONFIG.set_default_api_key(key)`` (and
``set_default_host``) keep a value for the next sessions too, in a per-user JSON file written with owner-only
permissions: ``$IC_CONFIG_DIR/config.json``, by default ``~/.config/intervene_compiler/config.json`` (or under
``$XDG_CONFIG_HOME``). Environment variables win over the file: ``IC_API_KEY``, ``IC_API_HOST``. Reading the file
happens when the package is imported and changes nothing.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_HOST = "127.0.0.1:8000"


@dataclass
class ApiConfig:
    """Where ``remote=True`` sends jobs: ``HOST`` (``host:port``, or a URL), ``APIKEY``, and ``SSL``."""

    HOST: str = DEFAULT_HOST
    APIKEY: str | None = None
    SSL: bool = False


@dataclass
class AppConfig:
    """App settings: ``REMOTE_LOGGING`` prints a remote job's status lines; ``DEBUG`` keeps full tracebacks of
    remote errors; ``PYMOUNT`` is accepted (nnsight code sets it) and changes nothing here."""

    REMOTE_LOGGING: bool = True
    DEBUG: bool = False
    PYMOUNT: bool = True


@dataclass
class Config:
    """The settings object ``ic.CONFIG`` (see the module docstring)."""

    API: ApiConfig = field(default_factory=ApiConfig)
    APP: AppConfig = field(default_factory=AppConfig)

    def set_default_api_key(self, key: str) -> None:
        """Use ``key`` from now on, and in later sessions (saved to the config file)."""
        if not isinstance(key, str) or not key.strip():
            raise ValueError("an API key is a non-empty string")
        self.API.APIKEY = key.strip()
        self.save()

    def set_default_host(self, host: str) -> None:
        """Send remote jobs to ``host`` (``host:port`` or a URL) from now on, and in later sessions."""
        if not isinstance(host, str) or not host.strip():
            raise ValueError("a host is a non-empty string, e.g. '127.0.0.1:8000'")
        self.API.HOST = host.strip()
        self.save()

    def save(self) -> Path:
        """Write the settings to the config file (owner-only permissions); returns its path."""
        path = config_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"API": asdict(self.API), "APP": asdict(self.APP)}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        return path

    def reload(self) -> Config:
        """Read the config file and the environment again (what happens at import)."""
        fresh = load()
        self.API, self.APP = fresh.API, fresh.APP
        return self


def config_path() -> Path:
    """The per-user config file (see the module docstring)."""
    folder = os.environ.get("IC_CONFIG_DIR")
    if folder:
        return Path(folder) / "config.json"
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "intervene_compiler" / "config.json"


def _known(cls: type, values: Any) -> dict:
    names = set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    return {k: v for k, v in values.items() if k in names} if isinstance(values, dict) else {}


def load() -> Config:
    """The settings: defaults, then the config file (if readable), then the environment."""
    config = Config()
    try:
        data = json.loads(config_path().read_text())
    except (OSError, ValueError):
        data = {}
    if isinstance(data, dict):
        config.API = ApiConfig(**_known(ApiConfig, data.get("API")))
        config.APP = AppConfig(**_known(AppConfig, data.get("APP")))
    if os.environ.get("IC_API_KEY"):
        config.API.APIKEY = os.environ["IC_API_KEY"]
    if os.environ.get("IC_API_HOST"):
        config.API.HOST = os.environ["IC_API_HOST"]
    return config


CONFIG = load()

__all__ = ["CONFIG", "ApiConfig", "AppConfig", "Config", "config_path", "load"]
