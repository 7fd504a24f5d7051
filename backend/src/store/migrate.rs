//! Schema migrations, one scheme for both stores: numbered SQL files
//! (`migrations/sqlite/NNNN_name.sql`, `migrations/postgres/NNNN_name.sql`) embedded
//! in order. A database records the number of the last migration applied in
//! `schema_version` (one row). Opening a store applies each later migration in a
//! transaction of its own that also records its number, and refuses a database whose
//! number is above the newest this binary knows (a newer backend wrote it).
//!
//! Each store runs the same loop (see `SqliteStore::open` and `PostgresStore::migrate`):
//! begin a transaction (taking the store's lock, so backends opening one database at
//! once take turns), create [`VERSION_TABLE`] if missing, read the version, ask
//! [`next`] what to apply, apply it with [`set_version`], commit, and again until
//! [`next`] says the database is current. A migration is never edited once released:
//! a change is a new file, listed below.

use super::StoreError;

/// One migration: its number and the SQL it runs.
#[derive(Debug)]
pub(crate) struct Migration {
    pub version: i64,
    /// The file's name without `.sql`, `NNNN_what`.
    pub name: &'static str,
    pub sql: &'static str,
}

macro_rules! migrations {
    ($dir:literal: $($version:literal $name:literal),* $(,)?) => {
        &[$(Migration {
            version: $version,
            name: $name,
            sql: include_str!(concat!("migrations/", $dir, "/", $name, ".sql")),
        }),*]
    };
}

/// The SQLite store's migrations, in order. A store made before they existed is
/// brought to version 1 by `sqlite::legacy` and recorded there.
pub(crate) const SQLITE: &[Migration] = migrations!("sqlite":
    1 "0001_init",
    2 "0002_fleet",
    3 "0003_heartbeats",
    4 "0004_rollups",
    5 "0005_prune",
);

/// The PostgreSQL store's migrations, in order (the numbers its `schema_version` has
/// always counted).
pub(crate) const POSTGRES: &[Migration] = migrations!("postgres":
    1 "0001_init",
    2 "0002_dead_letters_budgets_and_body_text",
    3 "0003_run_results",
    4 "0004_fleet",
    5 "0005_heartbeats",
    6 "0006_rollups",
    7 "0007_prune",
    8 "0008_parallel_writers",
);

/// The table a database records its version in: one row, the last migration applied.
pub(crate) const VERSION_TABLE: &str =
    "CREATE TABLE IF NOT EXISTS schema_version (version INT NOT NULL)";

/// Reads the version: no row is version 0 (nothing applied).
pub(crate) const READ_VERSION: &str = "SELECT version FROM schema_version";

/// Records `version` as the database's.
pub(crate) fn set_version(version: i64) -> String {
    format!("DELETE FROM schema_version; INSERT INTO schema_version (version) VALUES ({version})")
}

/// The newest version these migrations make.
pub(crate) fn latest(migrations: &[Migration]) -> i64 {
    migrations.last().map_or(0, |m| m.version)
}

/// The migration to apply to a `store` database at `version`; None when it is
/// current. Err when the database is newer than this binary (it must not be written
/// with a layout this binary does not know).
pub(crate) fn next<'a>(
    store: &str,
    migrations: &'a [Migration],
    version: i64,
) -> Result<Option<&'a Migration>, StoreError> {
    let latest = latest(migrations);
    if version > latest {
        return Err(StoreError::Db(format!(
            "the {store} database is at schema version {version}, newer than this backend's {latest}: upgrade the backend"
        )));
    }
    if version < 0 {
        return Err(StoreError::Db(format!(
            "the {store} database has schema version {version}, which no backend writes"
        )));
    }
    Ok(migrations.iter().find(|m| m.version > version))
}

/// A migration's failure, naming it.
pub(crate) fn failed(m: &Migration, e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(format!("migration {} ({}): {e}", m.version, m.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each list counts 1, 2, 3... with the number in the file name, and lists every
    /// file of its directory (a file added but not listed would never run).
    #[test]
    fn migrations_are_numbered_in_order_and_all_listed() {
        for (dir, list) in [("sqlite", SQLITE), ("postgres", POSTGRES)] {
            for (i, m) in list.iter().enumerate() {
                assert_eq!(m.version, i as i64 + 1, "{dir}: {}", m.name);
                assert!(
                    m.name.starts_with(&format!("{:04}_", m.version)),
                    "{dir}: {} is not numbered {}",
                    m.name,
                    m.version
                );
                assert!(!m.sql.trim().is_empty(), "{dir}: {} is empty", m.name);
            }
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("src/store/migrations")
                .join(dir);
            let mut files: Vec<String> = std::fs::read_dir(&path)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            files.sort();
            let listed: Vec<String> = list.iter().map(|m| format!("{}.sql", m.name)).collect();
            assert_eq!(files, listed, "{dir}");
        }
    }

    #[test]
    fn next_applies_in_order_and_refuses_a_newer_database() {
        assert_eq!(next("PostgreSQL", POSTGRES, 0).unwrap().unwrap().version, 1);
        assert_eq!(next("PostgreSQL", POSTGRES, 2).unwrap().unwrap().version, 3);
        assert_eq!(next("PostgreSQL", POSTGRES, 3).unwrap().unwrap().version, 4);
        assert_eq!(next("PostgreSQL", POSTGRES, 4).unwrap().unwrap().version, 5);
        assert_eq!(next("PostgreSQL", POSTGRES, 5).unwrap().unwrap().version, 6);
        assert_eq!(next("PostgreSQL", POSTGRES, 6).unwrap().unwrap().version, 7);
        assert_eq!(next("PostgreSQL", POSTGRES, 7).unwrap().unwrap().version, 8);
        assert!(next("PostgreSQL", POSTGRES, 8).unwrap().is_none());
        assert_eq!(
            next("SQLite", SQLITE, 1).unwrap().unwrap().name,
            "0002_fleet"
        );
        let latest = latest(SQLITE);
        assert!(next("SQLite", SQLITE, latest).unwrap().is_none());
        let e = next("SQLite", SQLITE, latest + 1).unwrap_err().to_string();
        assert!(
            e.contains(&format!("schema version {}", latest + 1))
                && e.contains(&format!("this backend's {latest}")),
            "{e}"
        );
        assert!(next("SQLite", SQLITE, -1).is_err());
    }
}
