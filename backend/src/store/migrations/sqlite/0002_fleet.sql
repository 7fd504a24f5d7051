-- SQLite schema 2: agent releases and the fleet's lifecycle documents.
-- A signed agent release: one row per file (by its SHA-256), one file per (name,
-- version, arch). The file's bytes are the last column, so listing releases reads
-- only the start of each row and never the bytes' overflow pages. A rowid table:
-- rows of megabytes do not belong in a WITHOUT ROWID b-tree.
CREATE TABLE releases (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    arch TEXT NOT NULL,
    sha256 TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    manifest TEXT NOT NULL,
    signature TEXT NOT NULL,
    rollback INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    added_ms INTEGER NOT NULL,
    bytes BLOB NOT NULL,
    UNIQUE (name, version, arch)
);
-- The fleet's lifecycle state (rollouts, each agent's reported update and
-- configuration state, desired configurations): JSON documents by (kind, key).
CREATE TABLE fleet_docs (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    doc TEXT NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (kind, key)
) WITHOUT ROWID;
