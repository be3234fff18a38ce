"""The SQLite schema of the device store, its queries, and the upgrade of older stores."""

from __future__ import annotations

import json
import sqlite3
import time

import torch

from consumer.store.tensor_files import DTYPES

SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    id TEXT PRIMARY KEY, dtype TEXT NOT NULL, shape TEXT NOT NULL,
    requires_grad INTEGER NOT NULL, description TEXT NOT NULL, blob TEXT NOT NULL,
    seq INTEGER NOT NULL, size INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS tags (
    object_id TEXT NOT NULL, tag TEXT NOT NULL, pos INTEGER NOT NULL,
    PRIMARY KEY (object_id, tag)
);
CREATE INDEX IF NOT EXISTS tags_by_tag ON tags(tag);
CREATE TABLE IF NOT EXISTS plans (
    id TEXT PRIMARY KEY, proto BLOB NOT NULL, content_hash TEXT NOT NULL, tags TEXT NOT NULL,
    seq INTEGER NOT NULL, size INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS plan_state (
    plan_id TEXT NOT NULL, name TEXT NOT NULL, dtype TEXT NOT NULL, shape TEXT NOT NULL,
    requires_grad INTEGER NOT NULL, blob TEXT NOT NULL, size INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (plan_id, name)
);
CREATE TABLE IF NOT EXISTS replies (
    command_id TEXT PRIMARY KEY, result_ids TEXT NOT NULL, reply BLOB NOT NULL,
    seq INTEGER NOT NULL, file TEXT, size INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS counter (k INTEGER PRIMARY KEY CHECK (k = 0), n INTEGER NOT NULL);
INSERT OR IGNORE INTO counter VALUES (0, 0);
"""

GET_ONE = "SELECT id, dtype, shape, requires_grad, description, blob, seq FROM objects WHERE id = ?"
GET_ALL = "SELECT id, dtype, shape, requires_grad, description, blob, seq FROM objects ORDER BY seq"
SEARCH = (
    "SELECT id, dtype, shape, requires_grad, description, blob, seq FROM objects "
    "WHERE id IN (SELECT object_id FROM tags WHERE tag IN (SELECT value FROM json_each(?)) "
    "GROUP BY object_id HAVING COUNT(DISTINCT tag) = ?) ORDER BY seq"
)

ADDED_COLUMNS = {  # columns a store written by an older fedplan lacks
    "objects": ("size INTEGER NOT NULL DEFAULT 0",),
    "plans": ("size INTEGER NOT NULL DEFAULT 0",),
    "plan_state": ("size INTEGER NOT NULL DEFAULT 0",),
    "replies": ("file TEXT", "size INTEGER NOT NULL DEFAULT 0", "created REAL NOT NULL DEFAULT 0"),
}
INDEXES = """
CREATE INDEX IF NOT EXISTS replies_by_seq ON replies(seq);
CREATE INDEX IF NOT EXISTS replies_by_created ON replies(created);
"""
USAGE = """
CREATE TABLE IF NOT EXISTS usage (
    k INTEGER PRIMARY KEY CHECK (k = 0), bytes INTEGER NOT NULL, reply_count INTEGER NOT NULL,
    reply_bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO usage VALUES (0, 0, 0, 0);
CREATE TRIGGER IF NOT EXISTS objects_added AFTER INSERT ON objects BEGIN
    UPDATE usage SET bytes = bytes + NEW.size;
END;
CREATE TRIGGER IF NOT EXISTS objects_removed AFTER DELETE ON objects BEGIN
    UPDATE usage SET bytes = bytes - OLD.size;
END;
CREATE TRIGGER IF NOT EXISTS objects_resized AFTER UPDATE OF size ON objects BEGIN
    UPDATE usage SET bytes = bytes - OLD.size + NEW.size;
END;
CREATE TRIGGER IF NOT EXISTS plans_added AFTER INSERT ON plans BEGIN
    UPDATE usage SET bytes = bytes + NEW.size;
END;
CREATE TRIGGER IF NOT EXISTS plans_removed AFTER DELETE ON plans BEGIN
    UPDATE usage SET bytes = bytes - OLD.size;
END;
CREATE TRIGGER IF NOT EXISTS plans_resized AFTER UPDATE OF size ON plans BEGIN
    UPDATE usage SET bytes = bytes - OLD.size + NEW.size;
END;
CREATE TRIGGER IF NOT EXISTS plan_state_added AFTER INSERT ON plan_state BEGIN
    UPDATE usage SET bytes = bytes + NEW.size;
END;
CREATE TRIGGER IF NOT EXISTS plan_state_removed AFTER DELETE ON plan_state BEGIN
    UPDATE usage SET bytes = bytes - OLD.size;
END;
CREATE TRIGGER IF NOT EXISTS plan_state_resized AFTER UPDATE OF size ON plan_state BEGIN
    UPDATE usage SET bytes = bytes - OLD.size + NEW.size;
END;
CREATE TRIGGER IF NOT EXISTS replies_added AFTER INSERT ON replies BEGIN
    UPDATE usage SET bytes = bytes + NEW.size,
        reply_count = reply_count + 1, reply_bytes = reply_bytes + NEW.size;
END;
CREATE TRIGGER IF NOT EXISTS replies_removed AFTER DELETE ON replies BEGIN
    UPDATE usage SET bytes = bytes - OLD.size,
        reply_count = reply_count - 1, reply_bytes = reply_bytes - OLD.size;
END;
CREATE TRIGGER IF NOT EXISTS replies_resized AFTER UPDATE OF size ON replies BEGIN
    UPDATE usage SET bytes = bytes - OLD.size + NEW.size,
        reply_bytes = reply_bytes - OLD.size + NEW.size;
END;
"""
"""Running totals kept by triggers (``recursive_triggers`` on, so REPLACE counts as delete)."""
USED = "SELECT bytes FROM usage WHERE k = 0"
REPLIES_HELD = "SELECT reply_count, reply_bytes FROM usage WHERE k = 0"
_RECOUNT = (
    "UPDATE usage SET bytes = (SELECT COALESCE(SUM(size), 0) FROM objects)"
    " + (SELECT COALESCE(SUM(size), 0) FROM plans)"
    " + (SELECT COALESCE(SUM(size), 0) FROM plan_state)"
    " + (SELECT COALESCE(SUM(size), 0) FROM replies),"
    " reply_count = (SELECT COUNT(*) FROM replies),"
    " reply_bytes = (SELECT COALESCE(SUM(size), 0) FROM replies) WHERE k = 0"
)
REFERENCED = (
    "SELECT blob FROM objects UNION ALL SELECT blob FROM plan_state"
    " UNION ALL SELECT file FROM replies WHERE file IS NOT NULL"
)


def add_missing_columns(db: sqlite3.Connection) -> None:
    """Bring a store written by an older fedplan to this schema (sizes filled in)."""
    db.execute("BEGIN IMMEDIATE")
    for table, columns in ADDED_COLUMNS.items():
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})").fetchall()}
        for column in columns:
            if column.split()[0] not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
    rows = db.execute("SELECT id, dtype, shape FROM objects WHERE size = 0").fetchall()
    sizes = [(_nbytes(dtype, shape), object_id) for object_id, dtype, shape in rows]
    db.executemany("UPDATE objects SET size = ? WHERE id = ?", sizes)
    q = "SELECT plan_id, name, dtype, shape FROM plan_state WHERE size = 0"
    state = [(_nbytes(d, s), p, n) for p, n, d, s in db.execute(q).fetchall()]
    db.executemany("UPDATE plan_state SET size = ? WHERE plan_id = ? AND name = ?", state)
    db.execute("UPDATE plans SET size = length(proto) WHERE size = 0")
    db.execute("UPDATE replies SET size = length(reply) WHERE size = 0 AND file IS NULL")
    db.execute("UPDATE replies SET created = ? WHERE created = 0", (time.time(),))
    db.execute("COMMIT")


def recount(db: sqlite3.Connection) -> None:
    """Set the running totals from the rows (at every open: exact whatever wrote before)."""
    db.execute("BEGIN IMMEDIATE")
    db.execute(_RECOUNT)
    db.execute("COMMIT")


def _nbytes(dtype: str, shape: str) -> int:
    numel = 1
    for d in json.loads(shape):
        numel *= int(d)
    return numel * torch.empty(0, dtype=DTYPES.get(dtype, torch.uint8)).element_size()
