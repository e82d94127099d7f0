"""The server's durable state: jobs and their status events in SQLite (WAL), payloads and results as files.

Layout of the data dir::

    jobs.sqlite3              jobs (id, key, model, status, times, error) and events (job, seq, status, message)
    payloads/<job id>.safetensors   the request, kept until the job ends
    results/<job id>.safetensors    the result of a COMPLETED job (written before the status says COMPLETED)

A job's statuses go RECEIVED -> QUEUED -> RUNNING -> COMPLETED | ERROR, each an event row; ``LOG`` events carry
the messages a job's ``session.log`` / ``tracer.log`` wrote. On start (:meth:`JobStore.recover`) a job left
RUNNING by a stopped server is marked ERROR with the reason, and jobs left RECEIVED or QUEUED are handed back to be
queued again: none stays RUNNING, none is lost, and a COMPLETED result stays downloadable.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass

TERMINAL = ("COMPLETED", "ERROR")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    key_name TEXT NOT NULL,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    error TEXT
);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    status TEXT NOT NULL,
    message TEXT,
    time REAL NOT NULL,
    PRIMARY KEY (job_id, seq)
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
"""


@dataclass(frozen=True)
class Job:
    id: str
    key_name: str
    model: str
    status: str
    created: float
    updated: float
    error: str | None


class JobStore:
    """Jobs in ``<data dir>/jobs.sqlite3``; one connection shared by the server's threads under a lock."""

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        for sub in ("payloads", "results"):
            os.makedirs(os.path.join(data_dir, sub), exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            os.path.join(data_dir, "jobs.sqlite3"), check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- files -------------------------------------------------------------------------------------------------
    def payload_path(self, job_id: str) -> str:
        return os.path.join(self.data_dir, "payloads", f"{job_id}.safetensors")

    def result_path(self, job_id: str) -> str:
        return os.path.join(self.data_dir, "results", f"{job_id}.safetensors")

    def write_file(self, path: str, data: bytes) -> None:
        """Write ``data`` atomically (a complete file or none) and durably."""
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    # -- jobs --------------------------------------------------------------------------------------------------
    def create(self, key_name: str, model: str, payload: bytes) -> str:
        """A new RECEIVED job whose payload is on disk."""
        job_id = uuid.uuid4().hex
        self.write_file(self.payload_path(job_id), payload)
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT INTO jobs VALUES (?, ?, ?, 'RECEIVED', ?, ?, NULL)",
                (job_id, key_name, model, now, now),
            )
            self._db.execute("INSERT INTO events VALUES (?, 0, 'RECEIVED', NULL, ?)", (job_id, now))
            self._db.execute("COMMIT")
        return job_id

    def set_status(self, job_id: str, status: str, message: str | None = None) -> None:
        """Move a job to ``status`` (an event too). A job that ended stays ended."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is None or row[0] in TERMINAL:
                    self._db.execute("COMMIT")
                    return
                self._db.execute(
                    "UPDATE jobs SET status = ?, updated = ?, error = ? WHERE id = ?",
                    (status, now, message if status == "ERROR" else None, job_id),
                )
                self._event(job_id, status, message, now)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if status in TERMINAL:
            try:
                os.remove(self.payload_path(job_id))
            except FileNotFoundError:
                pass

    def log(self, job_id: str, message: str) -> None:
        """A LOG event (the job's status does not change)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._event(job_id, "LOG", message, time.time())
            self._db.execute("COMMIT")

    def _event(self, job_id: str, status: str, message: str | None, now: float) -> None:
        (seq,) = self._db.execute(
            "SELECT COALESCE(MAX(seq), -1) + 1 FROM events WHERE job_id = ?", (job_id,)
        ).fetchone()
        self._db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?)", (job_id, seq, status, message, now))

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job(*row) if row else None

    def events(self, job_id: str, after: int = -1) -> list[tuple[int, str, str | None]]:
        """(seq, status, message) of the job's events after ``after``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, status, message FROM events WHERE job_id = ? AND seq > ? ORDER BY seq",
                (job_id, after),
            ).fetchall()
        return [(int(s), str(st), m) for s, st, m in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {str(s): int(n) for s, n in rows}

    def recover(self) -> list[Job]:
        """After a restart: RUNNING jobs end as ERROR (the server stopped while they ran); RECEIVED and QUEUED
        jobs with their payload on disk are returned, oldest first, to be queued again (ERROR without one)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE status NOT IN ('COMPLETED', 'ERROR') ORDER BY created"
            ).fetchall()
        again = []
        for row in rows:
            job = Job(*row)
            if job.status == "RUNNING":
                self.set_status(
                    job.id, "ERROR", _error("the server stopped while the job was running; submit it again")
                )
            elif not os.path.exists(self.payload_path(job.id)):
                self.set_status(
                    job.id, "ERROR", _error("the server stopped before the job's request was stored")
                )
            else:
                again.append(job)
        return again


def _error(message: str) -> str:
    """An ERROR event's message: the error as data (``remote/jobs.py error_document``)."""
    return json.dumps({"type": None, "base": "RuntimeError", "message": message, "loc": None, "hint": None})


__all__ = ["TERMINAL", "Job", "JobStore"]
