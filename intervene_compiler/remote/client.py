"""The client side of ``remote=True``: send a block as a job, follow its status, bring its values back.

``model.trace(..., remote=True)`` records the block as usual; when it exits, instead of running the model,
``tracing/remote.py`` packs the graph and the prepared inputs into a request (``jobs.py``), submits it to
``ic.CONFIG.API.HOST`` with ``ic.CONFIG.API.APIKEY``, prints one line per status (``<job id> - RECEIVED``,
``QUEUED``, ``RUNNING``, ``LOG: ...``, ``COMPLETED`` or ``ERROR: ...``) as the server pushes them over a websocket,
downloads the result (a tqdm bar for large ones) and hands the saved values to the block, which binds them as a
local run does (``tracing/remote.py``). An error in the user's interventions is raised as the same exception,
naming the same line, as the local run raises.
"""

from __future__ import annotations

import atexit
import json
import sys
import threading
import time
from typing import Any

from ..errors import InterventionError, SourceLoc
from .jobs import error_from, read_result
from .wire import unpack


class RemoteError(InterventionError, RuntimeError):
    """The service refused a request (HTTP 4xx), could not be reached, or lost the job."""


def _base_url(host: str, ssl: bool) -> str:
    host = host.rstrip("/")
    if host.startswith(("http://", "https://")):
        return host
    return f"{'https' if ssl else 'http'}://{host}"


class RemoteClient:
    """HTTP and websocket calls to one service (``host``, ``api_key``: default ``ic.CONFIG.API``)."""

    def __init__(self, host: str | None = None, api_key: str | None = None, timeout: float = 60.0):
        from ..config import CONFIG

        self.url = _base_url(host or CONFIG.API.HOST, CONFIG.API.SSL)
        self.api_key = api_key if api_key is not None else CONFIG.API.APIKEY
        self.timeout = timeout

    def _headers(self) -> dict:
        return {"X-API-Key": self.api_key} if self.api_key else {}

    def _http(self) -> Any:
        """The shared HTTP client for this service and key (made once: building one loads the TLS trust store,
        which costs tens of milliseconds; it keeps its connections open between jobs; closed at exit)."""
        import httpx

        key = (self.url, self.api_key, self.timeout)
        with _CLIENTS_LOCK:
            http = _CLIENTS.get(key)
            if http is None:
                http = _CLIENTS[key] = httpx.Client(
                    base_url=self.url, headers=self._headers(), timeout=self.timeout
                )
        return http

    def submit(self, message: bytes, loc: SourceLoc | None = None) -> str:
        try:
            r = self._http().post(
                "/v1/jobs", content=message, headers={"content-type": "application/octet-stream"}
            )
        except Exception as e:
            raise _unreachable(self.url, e, loc) from None
        if r.status_code != 200:
            raise RemoteError(
                f"the service refused the job ({r.status_code}): {_detail(r)}",
                loc,
                _FIXES.get(r.status_code, "see the message"),
            )
        return str(r.json()["id"])

    def status(self, job_id: str) -> dict:
        r = self._http().get(f"/v1/jobs/{job_id}")
        if r.status_code != 200:
            raise RemoteError(f"cannot read job {job_id} ({r.status_code}): {_detail(r)}")
        return dict(r.json())

    def events(self, job_id: str, poll: float = 0.05) -> Any:
        """The job's events as the service pushes them (websocket; polling if that fails), until it ends."""
        seen = -1
        try:
            from websockets.sync.client import connect

            ws_url = self.url.replace("http", "ws", 1) + f"/v1/jobs/{job_id}/events"
            with connect(ws_url, additional_headers=self._headers(), open_timeout=self.timeout) as ws:
                for raw in ws:
                    event = json.loads(raw)
                    seen = event["seq"]
                    yield event
                    if event["status"] in ("COMPLETED", "ERROR"):
                        return
        except Exception:  # no websocket (proxy, closed early, the service restarting): poll
            pass
        while True:
            state = self._status_retrying(job_id)
            for event in state["events"]:
                if event["seq"] > seen:
                    seen = event["seq"]
                    yield event
                    if event["status"] in ("COMPLETED", "ERROR"):
                        return
            time.sleep(poll)

    def _status_retrying(self, job_id: str, patience: float = 60.0) -> dict:
        """The job's status; while the service cannot be reached (restarting), retry for ``patience`` seconds,
        then a clear error (never a hang)."""
        import httpx

        start = time.monotonic()
        while True:
            try:
                return self.status(job_id)
            except httpx.TransportError as e:
                if time.monotonic() - start > patience:
                    raise RemoteError(
                        f"lost contact with the intervention service at {self.url} while waiting for job "
                        f"{job_id}: {type(e).__name__}: {e}",
                        None,
                        f"when the service is back, `RemoteClient().status('{job_id}')` tells what became of it",
                    ) from None
                time.sleep(0.5)

    def download(self, job_id: str, progress: bool = True) -> bytes:
        chunks = []
        with self._http().stream("GET", f"/v1/jobs/{job_id}/result") as r:
            if r.status_code != 200:
                r.read()
                raise RemoteError(
                    f"cannot download the result of job {job_id} ({r.status_code}): {_detail(r)}"
                )
            total = int(r.headers.get("content-length") or 0)
            bar = None
            if progress:  # as the walkthrough shows it
                from tqdm.auto import tqdm

                bar = tqdm(
                    total=total or None, unit="B", unit_scale=True, desc="Downloading result", file=sys.stderr
                )
            for chunk in r.iter_bytes():
                chunks.append(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            if bar is not None:
                bar.close()
        return b"".join(chunks)


_CLIENTS: dict[tuple, Any] = {}
_CLIENTS_LOCK = threading.Lock()


@atexit.register
def _close_clients() -> None:
    with _CLIENTS_LOCK:
        for http in _CLIENTS.values():
            http.close()
        _CLIENTS.clear()


_FIXES = {
    400: "the request was malformed or used an operation the service does not allow (the message names it)",
    401: "set your key: `ic.CONFIG.set_default_api_key(key)` (or IC_API_KEY)",
    403: "use a model your key may use",
    404: "use a model the service hosts (GET /v1/models lists them)",
    413: "save less (or smaller values), or ask for a larger limit",
    429: "wait a moment and send fewer jobs per minute",
}


def _detail(r: Any) -> str:
    try:
        return str(r.json().get("detail"))
    except Exception:
        return r.text[:500]


def _unreachable(url: str, e: BaseException, loc: SourceLoc | None) -> RemoteError:
    return RemoteError(
        f"cannot reach the intervention service at {url}: {type(e).__name__}: {e}",
        loc,
        "start it (`intervene-serve ...`) or point `ic.CONFIG.API.HOST` (IC_API_HOST) at it",
    )


def follow(
    client: RemoteClient, job_id: str, loc: SourceLoc | None, timeout: float | None = None
) -> tuple[dict[int, Any], dict[int, SourceLoc | None]]:
    """Follow a job until it ends, printing its status lines (``ic.CONFIG.APP.REMOTE_LOGGING``); its saved values
    (and the saves a false ``tracer.cond`` skipped), or the error a local run raises (``loc``: the block's line,
    for errors that name none)."""
    from ..config import CONFIG

    start = time.monotonic()
    final = None
    for event in client.events(job_id):
        status = event["status"]
        if CONFIG.APP.REMOTE_LOGGING:
            _print_event(job_id, event)
        if status in ("COMPLETED", "ERROR"):
            final = event
            break
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"job {job_id} did not end within {timeout} s (it is {status})")
    if final is None:
        raise RemoteError(f"job {job_id} ended without a final status", loc)
    if final["status"] == "ERROR":
        message = final.get("message")
        if not isinstance(message, dict):
            message = {"message": str(message)}
        raise error_from(message, loc)
    document, tensors = unpack(client.download(job_id, progress=CONFIG.APP.REMOTE_LOGGING))
    return read_result(document, tensors)


def _print_event(job_id: str, event: dict) -> None:
    status = event["status"]
    message = event.get("message")
    if status == "LOG":
        line = f"{job_id} - LOG: {message}"
    elif status == "ERROR":
        text = message.get("message") if isinstance(message, dict) else message
        line = f"{job_id} - ERROR: {text}"
    else:
        line = f"{job_id} - {status}"
    print(line, file=sys.stderr)


__all__ = ["RemoteClient", "RemoteError", "follow"]
