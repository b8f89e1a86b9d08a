"""The A/B test store: past tests (settings and variants, no images) and the choices people made.

SQLite from the standard library, in WAL mode so readers never wait for a writer; one connection
shared by the app's threads behind a lock (the writes are tiny). The schema is created on open.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from app.db import immediate_transaction

STORE_FILE = "ab_tests.sqlite3"

SCHEMA = """
CREATE TABLE IF NOT EXISTS tests (
    test_id    TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    prompt     TEXT NOT NULL,
    settings   TEXT NOT NULL,  -- json: size, steps, guidance, seeds, grid or variants as asked
    variants   TEXT NOT NULL   -- json: [{index, label, lora_configs, loras, seeds}]
);
-- Which brands a test involves, so that a brand's history is an index lookup, not a JSON scan.
CREATE TABLE IF NOT EXISTS test_brands (
    test_id  TEXT NOT NULL REFERENCES tests(test_id) ON DELETE CASCADE,
    brand_id TEXT NOT NULL,
    PRIMARY KEY (brand_id, test_id)
);
CREATE TABLE IF NOT EXISTS choices (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,  -- the order choices were made in
    test_id    TEXT NOT NULL REFERENCES tests(test_id) ON DELETE CASCADE,
    variant    INTEGER NOT NULL,
    chosen_by  TEXT,
    reason     TEXT,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS choices_by_test ON choices (test_id, id);
"""


class UnknownTest(LookupError):
    def __init__(self, test_id: str):
        super().__init__(f"no A/B test {test_id!r}")
        self.test_id = test_id


class VariantOutOfRange(ValueError):
    def __init__(self, test_id: str, variant: int, count: int):
        super().__init__(f"test {test_id!r} has variants 0..{count - 1}; variant {variant} does not exist")


@dataclass(frozen=True)
class AbChoice:
    test_id: str
    variant: int
    chosen_by: str | None
    reason: str | None
    created_at: str


@dataclass(frozen=True)
class AbTestRecord:
    test_id: str
    created_at: str
    prompt: str
    settings: dict
    variants: list[dict]  # each with "index" and "lora_configs" ([{brand_id, weight, version, type}])

    @property
    def brand_ids(self) -> list[str]:
        return sorted({c["brand_id"] for v in self.variants for c in v["lora_configs"]})


@dataclass(frozen=True)
class AbHistoryEntry:
    test: AbTestRecord
    choices: list[AbChoice]  # oldest first


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class AbStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(SCHEMA)

    @classmethod
    def in_dir(cls, data_dir: Path) -> AbStore:
        return cls(Path(data_dir) / STORE_FILE)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # ---- tests ---------------------------------------------------------------------------------

    def add_test(self, test: AbTestRecord) -> None:
        with self._lock, immediate_transaction(self._conn):
            self._conn.execute(
                "INSERT INTO tests (test_id, created_at, prompt, settings, variants) VALUES (?, ?, ?, ?, ?)",
                (test.test_id, test.created_at, test.prompt, json.dumps(test.settings), json.dumps(test.variants)),
            )
            self._conn.executemany(
                "INSERT INTO test_brands (test_id, brand_id) VALUES (?, ?)",
                [(test.test_id, brand_id) for brand_id in test.brand_ids],
            )

    def get_test(self, test_id: str, visible: Callable[[str], bool] | None = None) -> AbTestRecord | None:
        """The test, or None; with `visible`, also None when one of its brands is not visible (a key's)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT test_id, created_at, prompt, settings, variants FROM tests WHERE test_id = ?", (test_id,)
            ).fetchone()
        test = _test(row) if row else None
        if test is not None and visible is not None and not all(visible(b) for b in test.brand_ids):
            return None
        return test

    # ---- choices -------------------------------------------------------------------------------

    def add_choice(self, test_id: str, variant: int, chosen_by: str | None, reason: str | None) -> AbChoice:
        """Record a preferred variant. Raises UnknownTest or VariantOutOfRange."""
        with self._lock, immediate_transaction(self._conn):
            row = self._conn.execute("SELECT variants FROM tests WHERE test_id = ?", (test_id,)).fetchone()
            if row is None:
                raise UnknownTest(test_id)
            count = len(json.loads(row[0]))
            if not 0 <= variant < count:
                raise VariantOutOfRange(test_id, variant, count)
            choice = AbChoice(test_id, variant, chosen_by, reason, now_iso())
            self._conn.execute(
                "INSERT INTO choices (test_id, variant, chosen_by, reason, created_at) VALUES (?, ?, ?, ?, ?)",
                (choice.test_id, choice.variant, choice.chosen_by, choice.reason, choice.created_at),
            )
        return choice

    def choices(self, test_id: str) -> list[AbChoice]:
        with self._lock:
            return self._choices(test_id)

    # ---- a brand's history ---------------------------------------------------------------------

    def history(
        self, brand_id: str, limit: int = 100, visible: Callable[[str], bool] | None = None
    ) -> list[AbHistoryEntry]:
        """Tests that involve `brand_id`, newest first, each with its choices; with `visible`, only the
        tests whose brands are all visible."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT t.test_id, t.created_at, t.prompt, t.settings, t.variants FROM tests t "
                "JOIN test_brands b ON b.test_id = t.test_id WHERE b.brand_id = ? "
                "ORDER BY t.created_at DESC, t.rowid DESC LIMIT ?",
                (brand_id, limit),
            ).fetchall()
            tests = [_test(row) for row in rows]
            return [
                AbHistoryEntry(test, self._choices(test.test_id))
                for test in tests
                if visible is None or all(visible(b) for b in test.brand_ids)
            ]

    def recommended_weight(self, brand_id: str) -> float | None:
        """The brand's weight in the most recently chosen variant of a test involving it, or None.

        A chosen variant without the brand (an explicit variant that left it out) recommends 0.0.
        """
        with self._lock:
            row = self._conn.execute(
                "SELECT c.variant, t.variants FROM choices c JOIN test_brands b ON b.test_id = c.test_id "
                "JOIN tests t ON t.test_id = c.test_id WHERE b.brand_id = ? ORDER BY c.id DESC LIMIT 1",
                (brand_id,),
            ).fetchone()
        if row is None:
            return None
        variant = json.loads(row[1])[row[0]]
        weights = [c["weight"] for c in variant["lora_configs"] if c["brand_id"] == brand_id]
        return weights[0] if weights else 0.0

    # ---- helpers -------------------------------------------------------------------------------

    def _choices(self, test_id: str) -> list[AbChoice]:
        rows = self._conn.execute(
            "SELECT test_id, variant, chosen_by, reason, created_at FROM choices WHERE test_id = ? ORDER BY id",
            (test_id,),
        ).fetchall()
        return [AbChoice(*row) for row in rows]



def _test(row) -> AbTestRecord:
    test_id, created_at, prompt, settings, variants = row
    return AbTestRecord(test_id, created_at, prompt, json.loads(settings), json.loads(variants))
