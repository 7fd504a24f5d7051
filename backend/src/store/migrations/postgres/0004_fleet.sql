-- 4: agent releases and the fleet's lifecycle documents.
-- A signed agent release: one row per file (by its SHA-256), one file per (name,
-- version, arch). Listing releases never selects `bytes` (TOASTed apart from the row,
-- so it is not read).
CREATE TABLE releases (
    name TEXT COLLATE "C" NOT NULL,
    version TEXT COLLATE "C" NOT NULL,
    arch TEXT COLLATE "C" NOT NULL,
    sha256 TEXT COLLATE "C" PRIMARY KEY,
    size BIGINT NOT NULL,
    manifest TEXT NOT NULL,
    signature TEXT NOT NULL,
    rollback BOOLEAN NOT NULL,
    expires_ms BIGINT NOT NULL,
    added_ms BIGINT NOT NULL,
    bytes BYTEA NOT NULL,
    UNIQUE (name, version, arch)
);
-- The fleet's lifecycle state (rollouts, each agent's reported update and
-- configuration state, desired configurations): JSON documents by (kind, key). Keys
-- compare byte-wise (COLLATE "C"), as SQLite's do, so both stores list a kind in the
-- same order.
CREATE TABLE fleet_docs (
    kind TEXT COLLATE "C" NOT NULL,
    key TEXT COLLATE "C" NOT NULL,
    doc TEXT NOT NULL,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (kind, key)
);
