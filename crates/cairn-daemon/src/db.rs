//! The control-state database: SQLite in WAL mode, schema by migrations.
//!
//! One writer connection (`Db::call`) and a few read-only connections (`Db::read`, WAL
//! lets them read while the writer writes), all used from the blocking pool. SQLite
//! serialises writers anyway, and every statement here is short. Times are RFC 3339 UTC with milliseconds
//! (text that sorts in time order).

use std::path::Path;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::Connection;
use rusqlite_migration::{M, Migrations};

const MIGRATIONS: &[&str] = &[
    // 1: tokens, policies, jobs, audit.
    "CREATE TABLE tokens (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        hash TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL,
        revoked_at TEXT
    );
    CREATE TABLE policies (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        spec TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        policy_id TEXT,
        policy_name TEXT,
        kind TEXT NOT NULL,
        trigger TEXT NOT NULL,
        operator TEXT NOT NULL,
        state TEXT NOT NULL,
        due_at TEXT,
        queued_at TEXT NOT NULL,
        started_at TEXT,
        ended_at TEXT,
        duration_ms INTEGER,
        error TEXT,
        skipped_for TEXT,
        target TEXT,
        resources TEXT NOT NULL DEFAULT '[]',
        points TEXT NOT NULL DEFAULT '[]',
        scope_digest TEXT,
        scope_changed INTEGER NOT NULL DEFAULT 0,
        deleted TEXT
    );
    CREATE INDEX jobs_by_policy ON jobs(policy_id, seq);
    CREATE INDEX jobs_by_state ON jobs(state);
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at TEXT NOT NULL,
        principal TEXT NOT NULL,
        method TEXT NOT NULL,
        path TEXT NOT NULL,
        status INTEGER NOT NULL,
        detail TEXT
    );",
    // 2: other locations, DR pairs and their history; the space a job's points are in.
    "ALTER TABLE jobs ADD COLUMN space TEXT NOT NULL DEFAULT 'local';
    CREATE TABLE locations (
        name TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        token TEXT NOT NULL,
        space_id TEXT,
        added_at TEXT NOT NULL,
        added_by TEXT NOT NULL
    );
    CREATE TABLE pairs (
        id TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        server TEXT NOT NULL,
        primary_location TEXT NOT NULL,
        standby_location TEXT NOT NULL,
        policy_id TEXT,
        state TEXT NOT NULL,
        detail TEXT,
        progress REAL,
        restarted_at TEXT NOT NULL,
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE pair_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        pair_id TEXT NOT NULL,
        at TEXT NOT NULL,
        kind TEXT NOT NULL,
        state TEXT,
        operator TEXT NOT NULL,
        detail TEXT,
        job_id TEXT,
        server TEXT,
        cleaned_at TEXT
    );
    CREATE INDEX pair_events_by_pair ON pair_events(pair_id, seq);",
];

pub fn now_text() -> String {
    time_text(&Utc::now())
}

pub fn time_text(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Why the database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("control database {path}: {detail}")]
    Open { path: String, detail: String },
    #[error("control database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("control database task failed: {0}")]
    Task(String),
}

#[derive(Clone)]
pub struct Db {
    conn: Arc<Mutex<Connection>>,
    readers: Arc<Vec<Mutex<Connection>>>,
    next_reader: Arc<std::sync::atomic::AtomicUsize>,
}

/// Read-only connections kept open.
const READERS: usize = 4;

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Db")
    }
}

impl Db {
    /// Opens (creating if needed) and migrates the database at `path`.
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let err = |detail: String| DbError::Open {
            path: path.display().to_string(),
            detail,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        }
        let mut conn = Connection::open(path).map_err(|e| err(e.to_string()))?;
        // It holds other locations' tokens: only the daemon's user may read it (SQLite
        // creates its -wal and -shm files with the database's mode).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| err(format!("cannot make it private (mode 0600): {e}")))?;
        }
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(|e| err(e.to_string()))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| err(e.to_string()))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| err(e.to_string()))?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(|e| err(e.to_string()))?;
        let migrations = Migrations::new(MIGRATIONS.iter().map(|m| M::up(m)).collect());
        migrations
            .to_latest(&mut conn)
            .map_err(|e| err(format!("schema migration failed: {e}")))?;
        let mut readers = Vec::new();
        for _ in 0..READERS {
            let r = Connection::open_with_flags(
                path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(|e| err(e.to_string()))?;
            r.busy_timeout(std::time::Duration::from_secs(10))
                .map_err(|e| err(e.to_string()))?;
            readers.push(Mutex::new(r));
        }
        Ok(Db {
            conn: Arc::new(Mutex::new(conn)),
            readers: Arc::new(readers),
            next_reader: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        })
    }

    /// Runs a read-only `f` on one of the reader connections, on the blocking pool.
    pub async fn read<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, DbError> + Send + 'static,
    {
        let readers = self.readers.clone();
        let start = self
            .next_reader
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::task::spawn_blocking(move || {
            let n = readers.len();
            // A free reader if there is one, else wait for the one in turn.
            for i in 0..n {
                if let Ok(mut c) = readers[(start + i) % n].try_lock() {
                    return f(&mut c);
                }
            }
            let mut c = readers[start % n].lock().unwrap_or_else(|p| p.into_inner());
            f(&mut c)
        })
        .await
        .map_err(|e| DbError::Task(e.to_string()))?
    }

    /// Runs `f` with the connection on the blocking pool.
    pub async fn call<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, DbError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut c)
        })
        .await
        .map_err(|e| DbError::Task(e.to_string()))?
    }

    /// Runs `f` with the connection on this thread (offline commands, startup).
    pub fn call_sync<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        let mut c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_valid() {
        Migrations::new(MIGRATIONS.iter().map(|m| M::up(m)).collect())
            .validate()
            .unwrap();
    }

    #[test]
    fn opens_twice() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x/cairn.db");
        Db::open(&p).unwrap();
        Db::open(&p).unwrap();
    }
}
