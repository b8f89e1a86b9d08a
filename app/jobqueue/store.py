"""The job store: the one source of truth of accepted jobs, and the one place their state changes.

SQLite from the standard library (WAL, one connection behind a lock, as the A/B store) for the
records; one PNG file per succeeded job beside it. A job is written here before POST /jobs answers,
the runner takes its work from here, and `transition` is the only writer of `status`:

    queued -> running -> succeeded | failed | canceled
    queued -> canceled
    running -> queued      (only at start-up: the process that ran it is gone; it runs again)
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from app.db import immediate_transaction
from app.jobs import GenerationSpec, LoraSpec

STORE_FILE = "jobs.sqlite3"
IMAGES_DIR = "jobs"

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED = "queued", "running", "succeeded", "failed", "canceled"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED)
ENDED = frozenset({SUCCEEDED, FAILED, CANCELED})
PENDING = (QUEUED, RUNNING)
# to -> the states it may come from
TRANSITIONS = {
    RUNNING: (QUEUED,),
    SUCCEEDED: (RUNNING,),
    FAILED: (QUEUED, RUNNING),
    CANCELED: (QUEUED, RUNNING),
    QUEUED: (RUNNING,),
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id              TEXT PRIMARY KEY,
    status          TEXT NOT NULL,
    owner           TEXT,              -- the caller's key name (null: no keys configured)
    spec            TEXT NOT NULL,     -- json: GenerationSpec, the seed drawn at acceptance included
    loras           TEXT NOT NULL,     -- json: [LoraSpec]
    strict          INTEGER NOT NULL,
    preview         INTEGER NOT NULL,
    webhook_url     TEXT,
    webhook_status  TEXT,              -- pending | delivered | failed (null: no webhook)
    webhook_attempts INTEGER NOT NULL DEFAULT 0,
    step            INTEGER NOT NULL DEFAULT 0,
    steps           INTEGER NOT NULL,
    created_at      TEXT NOT NULL,
    started_at      TEXT,
    finished_at     TEXT,
    finished_ts     REAL,              -- epoch seconds, for JOB_TTL_S
    result          TEXT,              -- json: /generate's reply without `image` (the PNG is a file)
    error           TEXT               -- json: {status, detail}
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status);  -- holds the rowid: oldest first for free
CREATE INDEX IF NOT EXISTS jobs_by_finish ON jobs (finished_ts);
"""

COLUMNS = (
    "id, status, owner, spec, loras, strict, preview, webhook_url, webhook_status, webhook_attempts, step, steps, "
    "created_at, started_at, finished_at, result, error"
)


class Everyone:
    """The `owner` filter that lets every job through (an admin key, or a service without keys)."""


EVERYONE = Everyone()


class UnknownJob(LookupError):
    def __init__(self, job_id: str):
        super().__init__(f"no job {job_id!r}")
        self.job_id = job_id


class NoJobImage(LookupError):
    def __init__(self, job_id: str, status: str):
        super().__init__(f"job {job_id!r} has no image: it is {status} (an image exists once it succeeded)")


class TooManyPendingJobs(Exception):
    def __init__(self, pending: int, limit: int):
        super().__init__(f"{pending} jobs are queued or running (JOBS_MAX_PENDING={limit}); try again later")


@dataclass(frozen=True)
class JobRecord:
    id: str
    status: str
    owner: str | None
    spec: GenerationSpec
    loras: tuple[LoraSpec, ...]
    strict: bool
    preview: bool
    webhook_url: str | None
    webhook_status: str | None
    webhook_attempts: int
    step: int
    steps: int
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    result: dict | None = None
    error: dict | None = None

    @property
    def ended(self) -> bool:
        return self.status in ENDED


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class JobStore:
    def __init__(self, data_dir: Path, on_status: Callable[[str], None] | None = None):
        """`on_status(status)` is called each time a job enters a status (the metrics count it)."""
        self.data_dir = Path(data_dir)
        self._on_status = on_status
        self.images = self.data_dir / IMAGES_DIR
        self.images.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            self.data_dir / STORE_FILE, check_same_thread=False, isolation_level=None, timeout=10
        )
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")  # an accepted job survives a power cut too
            self._conn.executescript(SCHEMA)

    @staticmethod
    def exists(data_dir: Path) -> bool:
        return (Path(data_dir) / STORE_FILE).exists()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # ---- accepting -------------------------------------------------------------------------------

    def add(
        self,
        spec: GenerationSpec,
        loras: list[LoraSpec],
        strict: bool,
        preview: bool,
        webhook_url: str | None,
        owner: str | None,
        max_pending: int,
    ) -> JobRecord:
        """Store a new queued job, or raise TooManyPendingJobs beyond `max_pending`."""
        job_id = uuid.uuid4().hex
        with self._lock, immediate_transaction(self._conn):
            pending = self._conn.execute("SELECT count(*) FROM jobs WHERE status IN (?, ?)", PENDING).fetchone()[0]
            if pending >= max_pending:
                raise TooManyPendingJobs(pending, max_pending)
            self._conn.execute(
                "INSERT INTO jobs (id, status, owner, spec, loras, strict, preview, webhook_url, webhook_status, "
                "steps, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id, QUEUED, owner, json.dumps(asdict(spec)), json.dumps([asdict(s) for s in loras]),
                    int(strict), int(preview), webhook_url, "pending" if webhook_url else None,
                    spec.num_inference_steps, now_iso(),
                ),
            )  # fmt: skip
            record = self._get(job_id)
        self._entered(QUEUED)
        return record

    # ---- the state machine -----------------------------------------------------------------------

    def transition(self, job_id: str, to: str, **fields) -> JobRecord | None:
        """Move a job to `to` from a state that may lead there; the new record, or None when it was not
        in such a state (it ended meanwhile, e.g. canceled while it ran). The only writer of `status`."""
        changes = {"status": to, **_stamps(to), **fields}
        for name in ("result", "error"):
            if name in changes and changes[name] is not None:
                changes[name] = json.dumps(changes[name])
        allowed = TRANSITIONS[to]
        sets = ", ".join(f"{name} = ?" for name in changes)
        marks = ", ".join("?" for _ in allowed)
        with self._lock:
            cursor = self._conn.execute(
                f"UPDATE jobs SET {sets} WHERE id = ? AND status IN ({marks})", (*changes.values(), job_id, *allowed)
            )
            record = self._get(job_id) if cursor.rowcount else None
        if record is not None:
            self._entered(to)
        return record

    def _entered(self, status: str) -> None:
        if self._on_status is not None:
            self._on_status(status)

    def requeue_interrupted(self) -> list[str]:
        """At start-up: jobs left `running` by a process that is gone go back to `queued` (they run again)."""
        with self._lock:
            ids = [row[0] for row in self._conn.execute("SELECT id FROM jobs WHERE status = ?", (RUNNING,))]
        for job_id in ids:
            self.transition(job_id, QUEUED, step=0, started_at=None)
        return ids

    # ---- what the runner writes beside the state -------------------------------------------------

    def set_webhook(self, job_id: str, status: str, attempts: int) -> JobRecord | None:
        with self._lock:
            self._conn.execute(
                "UPDATE jobs SET webhook_status = ?, webhook_attempts = ? WHERE id = ?", (status, attempts, job_id)
            )
            return self._get(job_id)

    def image_path(self, job_id: str) -> Path:
        return self.images / f"{job_id}.png"

    def write_image(self, job_id: str, png: bytes) -> None:
        """The PNG, written whole (a temporary file renamed) and synced before the job may say succeeded."""
        path = self.image_path(job_id)
        partial = path.with_suffix(".part")
        with open(partial, "wb") as f:
            f.write(png)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)

    # ---- reading ---------------------------------------------------------------------------------

    def get(self, job_id: str, owner: str | None | Everyone = EVERYONE) -> JobRecord:
        """The job; `owner`: only if it is that caller's (another caller's job is as unknown as a missing one)."""
        with self._lock:
            record = self._get(job_id)
        if record is None or (owner is not EVERYONE and record.owner != owner):
            raise UnknownJob(job_id)
        return record

    def list(
        self, status: str | None = None, limit: int = 20, owner: str | None | Everyone = EVERYONE
    ) -> list[JobRecord]:
        """Newest first; `owner`: only that caller's jobs."""
        conditions, args = [], []
        if status:
            conditions.append("status = ?")
            args.append(status)
        if owner is not EVERYONE:
            conditions.append("owner IS ?")
            args.append(owner)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {COLUMNS} FROM jobs {where} ORDER BY rowid DESC LIMIT ?", (*args, limit)
            ).fetchall()
        return [_record(row) for row in rows]

    def queued(self, limit: int, exclude: set[str]) -> list[JobRecord]:
        """The oldest queued jobs not in `exclude` (those already handed to the service)."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {COLUMNS} FROM jobs WHERE status = ? ORDER BY rowid LIMIT ?", (QUEUED, limit + len(exclude))
            ).fetchall()
        return [r for r in map(_record, rows) if r.id not in exclude][:limit]

    def undelivered_webhooks(self) -> list[JobRecord]:
        """Ended jobs whose webhook is still pending (the process ended before it was delivered)."""
        marks = ", ".join("?" for _ in ENDED)
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {COLUMNS} FROM jobs WHERE webhook_status = 'pending' AND status IN ({marks}) ORDER BY rowid",
                tuple(ENDED),
            ).fetchall()
        return [_record(row) for row in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall()
        return {status: dict(rows).get(status, 0) for status in STATUSES}

    def purge(self, ttl_s: float, now: float | None = None) -> int:
        """Drop jobs that ended more than `ttl_s` ago, with their images; the number dropped."""
        cutoff = (time.time() if now is None else now) - ttl_s
        with self._lock:
            ids = [r[0] for r in self._conn.execute("SELECT id FROM jobs WHERE finished_ts < ?", (cutoff,))]
            self._conn.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in ids])
        for job_id in ids:
            self.image_path(job_id).unlink(missing_ok=True)
        return len(ids)

    def _get(self, job_id: str) -> JobRecord | None:
        row = self._conn.execute(f"SELECT {COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _record(row) if row else None


def _stamps(to: str) -> dict:
    if to == RUNNING:
        return {"started_at": now_iso(), "step": 0}
    if to in ENDED:
        return {"finished_at": now_iso(), "finished_ts": time.time()}
    return {}


def _record(row) -> JobRecord:
    (job_id, status, owner, spec, loras, strict, preview, webhook_url, webhook_status, webhook_attempts, step, steps,
     created_at, started_at, finished_at, result, error) = row  # fmt: skip
    return JobRecord(
        id=job_id,
        status=status,
        owner=owner,
        spec=GenerationSpec(**json.loads(spec)),
        loras=tuple(LoraSpec(**s) for s in json.loads(loras)),
        strict=bool(strict),
        preview=bool(preview),
        webhook_url=webhook_url,
        webhook_status=webhook_status,
        webhook_attempts=webhook_attempts,
        step=step,
        steps=steps,
        created_at=created_at,
        started_at=started_at,
        finished_at=finished_at,
        result=json.loads(result) if result else None,
        error=json.loads(error) if error else None,
    )
