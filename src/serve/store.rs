//! The server's database: files and batches in SQLite (WAL mode) under `--data-dir`, with the
//! schema's version in `PRAGMA user_version`. A database from a newer schema is refused, never
//! touched.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{bail, Context, Result};
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};

use crate::serve::batch::{BatchError, BatchRecord, BatchStatus, Counts};

/// The schema this build writes.
pub const SCHEMA_VERSION: i64 = 1;

const SCHEMA_V1: &str = "
CREATE TABLE files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL
);
CREATE TABLE batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    status TEXT NOT NULL,
    metadata TEXT,
    errors TEXT NOT NULL,
    output_file_id TEXT,
    error_file_id TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    in_progress_at INTEGER,
    finalizing_at INTEGER,
    completed_at INTEGER,
    failed_at INTEGER,
    cancelling_at INTEGER,
    cancelled_at INTEGER,
    total INTEGER NOT NULL,
    completed INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    run_seconds REAL NOT NULL
);
";

/// A stored file's metadata (its bytes live in `files/ID` under the data directory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// `file-...`.
    pub id: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Seconds since the epoch.
    pub created_at: u64,
    /// The name it was uploaded under.
    pub filename: String,
    /// `batch`, or `batch_output` for a batch's output and error files.
    pub purpose: String,
}

/// The database, shared by the HTTP handlers and the queue; every call is short.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl Store {
    /// Opens (or creates) the database at `path` and brings its schema up to date.
    ///
    /// # Errors
    /// When it cannot be opened, or holds a newer schema than this build knows.
    pub fn open(path: &Path) -> Result<Self> {
        let mut conn = Connection::open(path)
            .with_context(|| format!("cannot open the database {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            bail!(
                "the database {} has schema version {version}, newer than this build's \
                 ({SCHEMA_VERSION}): it was written by a newer infer-batch; run that one, or \
                 point --data-dir elsewhere (the database is left as it is)",
                path.display()
            );
        }
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        if version < SCHEMA_VERSION {
            let tx = conn.transaction()?;
            tx.execute_batch(SCHEMA_V1)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            tx.commit()?;
        }
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite itself consistent: go on with it.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a file.
    ///
    /// # Errors
    /// On a database error.
    pub fn insert_file(&self, f: &FileRecord) -> Result<()> {
        self.lock().execute(
            "INSERT INTO files (id, bytes, created_at, filename, purpose) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![f.id, f.bytes, f.created_at, f.filename, f.purpose],
        )?;
        Ok(())
    }

    /// The file `id`, if it exists.
    ///
    /// # Errors
    /// On a database error.
    pub fn file(&self, id: &str) -> Result<Option<FileRecord>> {
        Ok(self
            .lock()
            .query_row(
                "SELECT id, bytes, created_at, filename, purpose FROM files WHERE id = ?1",
                [id],
                file_row,
            )
            .optional()?)
    }

    /// Every file, newest first, of `purpose` when given.
    ///
    /// # Errors
    /// On a database error.
    pub fn files(&self, purpose: Option<&str>) -> Result<Vec<FileRecord>> {
        let conn = self.lock();
        let mut st = conn.prepare(
            "SELECT id, bytes, created_at, filename, purpose FROM files
             WHERE ?1 IS NULL OR purpose = ?1 ORDER BY seq DESC",
        )?;
        let rows = st.query_map([purpose], file_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Forgets the file `id`; whether it was there.
    ///
    /// # Errors
    /// On a database error.
    pub fn delete_file(&self, id: &str) -> Result<bool> {
        Ok(self
            .lock()
            .execute("DELETE FROM files WHERE id = ?1", [id])?
            > 0)
    }

    /// Records a new batch.
    ///
    /// # Errors
    /// On a database error.
    pub fn insert_batch(&self, b: &BatchRecord) -> Result<()> {
        self.lock().execute(
            "INSERT INTO batches (id, endpoint, input_file_id, completion_window, status, metadata,
                errors, created_at, expires_at, total, completed, failed, completion_tokens,
                run_seconds)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 0, 0, 0, 0, 0)",
            params![
                b.id,
                b.endpoint,
                b.input_file_id,
                b.completion_window,
                b.status.as_str(),
                b.metadata.as_ref().map(|m| m.to_string()),
                serde_json::to_string(&b.errors)?,
                b.created_at,
                b.expires_at,
            ],
        )?;
        Ok(())
    }

    /// The batch `id`, if it exists.
    ///
    /// # Errors
    /// On a database error.
    pub fn batch(&self, id: &str) -> Result<Option<BatchRecord>> {
        let conn = self.lock();
        let sql = format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = ?1");
        Ok(conn.query_row(&sql, [id], batch_row).optional()?)
    }

    /// Up to `limit` batches, newest first, after the batch `after` when given; and whether
    /// more follow.
    ///
    /// # Errors
    /// On a database error.
    pub fn batches(&self, after: Option<&str>, limit: u32) -> Result<(Vec<BatchRecord>, bool)> {
        let conn = self.lock();
        let sql = format!(
            "SELECT {BATCH_COLUMNS} FROM batches
             WHERE ?1 IS NULL OR seq < (SELECT seq FROM batches WHERE id = ?1)
             ORDER BY seq DESC LIMIT ?2"
        );
        let mut st = conn.prepare(&sql)?;
        let mut rows: Vec<BatchRecord> = st
            .query_map(params![after, i64::from(limit) + 1], batch_row)?
            .collect::<rusqlite::Result<_>>()?;
        let more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        Ok((rows, more))
    }

    /// The oldest batch in `status`, by creation order.
    ///
    /// # Errors
    /// On a database error.
    pub fn oldest(&self, status: BatchStatus) -> Result<Option<BatchRecord>> {
        let conn = self.lock();
        let sql = format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE status = ?1 ORDER BY seq ASC LIMIT 1"
        );
        Ok(conn
            .query_row(&sql, [status.as_str()], batch_row)
            .optional()?)
    }

    /// [`Store::oldest`], leaving out the batch `except`.
    ///
    /// # Errors
    /// On a database error.
    pub fn oldest_other(&self, status: BatchStatus, except: &str) -> Result<Option<BatchRecord>> {
        let conn = self.lock();
        let sql = format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE status = ?1 AND id != ?2
             ORDER BY seq ASC LIMIT 1"
        );
        Ok(conn
            .query_row(&sql, [status.as_str(), except], batch_row)
            .optional()?)
    }

    /// Moves batch `id` to `status` and stamps that state's time, only if it is still in one of
    /// `from`; whether it moved.
    ///
    /// # Errors
    /// On a database error.
    pub fn transition(
        &self,
        id: &str,
        from: &[BatchStatus],
        status: BatchStatus,
        now: u64,
    ) -> Result<bool> {
        let conn = self.lock();
        let current: Option<String> = conn
            .query_row("SELECT status FROM batches WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?;
        if !current.is_some_and(|c| from.iter().any(|f| f.as_str() == c)) {
            return Ok(false);
        }
        let sql = format!(
            "UPDATE batches SET status = ?2, {} = ?3 WHERE id = ?1",
            status.stamp_column()
        );
        conn.execute(&sql, params![id, status.as_str(), now])?;
        Ok(true)
    }

    /// Marks batch `id` failed validation, with its errors, if it is still validating (a
    /// batch cancelled meanwhile stays cancelled).
    ///
    /// # Errors
    /// On a database error.
    pub fn fail(&self, id: &str, errors: &[BatchError], now: u64) -> Result<()> {
        self.lock().execute(
            "UPDATE batches SET status = 'failed', failed_at = ?2, errors = ?3
             WHERE id = ?1 AND status = 'validating'",
            params![id, now, serde_json::to_string(errors)?],
        )?;
        Ok(())
    }

    /// Records what a running batch has done so far.
    ///
    /// # Errors
    /// On a database error.
    pub fn progress(&self, id: &str, counts: Counts, tokens: u64, seconds: f64) -> Result<()> {
        self.lock().execute(
            "UPDATE batches SET total = ?2, completed = ?3, failed = ?4, completion_tokens = ?5,
                run_seconds = ?6 WHERE id = ?1",
            params![
                id,
                counts.total,
                counts.completed,
                counts.failed,
                tokens,
                seconds
            ],
        )?;
        Ok(())
    }

    /// Ends batch `id` in `status` with its output and error files (and `errors`, when there
    /// are any), in one transaction.
    ///
    /// # Errors
    /// On a database error.
    pub fn finish(
        &self,
        id: &str,
        status: BatchStatus,
        outputs: &[(&str, &FileRecord)],
        errors: &[BatchError],
        counts: Counts,
        now: u64,
    ) -> Result<()> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        if !errors.is_empty() {
            tx.execute(
                "UPDATE batches SET errors = ?2 WHERE id = ?1",
                params![id, serde_json::to_string(errors)?],
            )?;
        }
        for (column, f) in outputs {
            tx.execute(
                "INSERT OR IGNORE INTO files (id, bytes, created_at, filename, purpose)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![f.id, f.bytes, f.created_at, f.filename, f.purpose],
            )?;
            tx.execute(
                &format!("UPDATE batches SET {column} = ?2 WHERE id = ?1"),
                params![id, f.id],
            )?;
        }
        tx.execute(
            &format!(
                "UPDATE batches SET status = ?2, {} = ?3, total = ?4, completed = ?5, failed = ?6
                 WHERE id = ?1",
                status.stamp_column()
            ),
            params![
                id,
                status.as_str(),
                now,
                counts.total,
                counts.completed,
                counts.failed
            ],
        )?;
        tx.commit()?;
        Ok(())
    }
}

const BATCH_COLUMNS: &str = "seq, id, endpoint, input_file_id, completion_window, status, metadata,
    errors, output_file_id, error_file_id, created_at, expires_at, in_progress_at, finalizing_at,
    completed_at, failed_at, cancelling_at, cancelled_at, total, completed, failed,
    completion_tokens, run_seconds";

fn file_row(r: &Row<'_>) -> rusqlite::Result<FileRecord> {
    Ok(FileRecord {
        id: r.get(0)?,
        bytes: r.get(1)?,
        created_at: r.get(2)?,
        filename: r.get(3)?,
        purpose: r.get(4)?,
    })
}

fn batch_row(r: &Row<'_>) -> rusqlite::Result<BatchRecord> {
    let bad = |i: usize, e: String| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e.into())
    };
    let status: String = r.get(5)?;
    let metadata: Option<String> = r.get(6)?;
    let errors: String = r.get(7)?;
    Ok(BatchRecord {
        seq: r.get(0)?,
        id: r.get(1)?,
        endpoint: r.get(2)?,
        input_file_id: r.get(3)?,
        completion_window: r.get(4)?,
        status: BatchStatus::parse(&status).ok_or_else(|| bad(5, status.clone()))?,
        metadata: metadata
            .map(|m| serde_json::from_str(&m))
            .transpose()
            .map_err(|e| bad(6, e.to_string()))?,
        errors: serde_json::from_str(&errors).map_err(|e| bad(7, e.to_string()))?,
        output_file_id: r.get(8)?,
        error_file_id: r.get(9)?,
        created_at: r.get(10)?,
        expires_at: r.get(11)?,
        in_progress_at: r.get(12)?,
        finalizing_at: r.get(13)?,
        completed_at: r.get(14)?,
        failed_at: r.get(15)?,
        cancelling_at: r.get(16)?,
        cancelled_at: r.get(17)?,
        counts: Counts {
            total: r.get(18)?,
            completed: r.get(19)?,
            failed: r.get(20)?,
        },
        completion_tokens: r.get(21)?,
        run_seconds: r.get(22)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::batch::BatchStatus::*;

    fn batch(id: &str) -> BatchRecord {
        BatchRecord::new(
            id.into(),
            "/v1/chat/completions".into(),
            "file-x".into(),
            None,
            1,
        )
    }

    #[test]
    fn batches_keep_creation_order_and_page_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        for id in ["b1", "b2", "b3"] {
            store.insert_batch(&batch(id)).unwrap();
        }
        assert_eq!(store.oldest(Validating).unwrap().unwrap().id, "b1");
        assert_eq!(
            store.oldest_other(Validating, "b1").unwrap().unwrap().id,
            "b2"
        );
        let (page, more) = store.batches(None, 2).unwrap();
        assert_eq!(
            page.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(),
            ["b3", "b2"]
        );
        assert!(more);
        let (page, more) = store.batches(Some("b2"), 2).unwrap();
        assert_eq!(
            page.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(),
            ["b1"]
        );
        assert!(!more);
        assert!(store
            .transition("b1", &[Validating], InProgress, 5)
            .unwrap());
        assert!(!store.transition("b1", &[Validating], Failed, 6).unwrap());
        let b1 = store.batch("b1").unwrap().unwrap();
        assert_eq!((b1.status, b1.in_progress_at), (InProgress, Some(5)));
        assert_eq!(store.oldest(Validating).unwrap().unwrap().id, "b2");
    }

    #[test]
    fn a_newer_schema_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        Store::open(&path).unwrap();
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let err = Store::open(&path).err().unwrap().to_string();
        assert!(err.contains("newer"), "{err}");
        let v: i64 = Connection::open(&path)
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION + 1);
        // And the data survives a reopen by the same version.
        let store = Store::open(&dir.path().join("db2")).unwrap();
        store.insert_batch(&batch("b")).unwrap();
        drop(store);
        assert!(Store::open(&dir.path().join("db2"))
            .unwrap()
            .batch("b")
            .unwrap()
            .is_some());
    }
}
