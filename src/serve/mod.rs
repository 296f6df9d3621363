//! `infer-batch serve`: OpenAI's Files and Batches API on a local port.
//!
//! The HTTP side is async (tokio, axum on hyper) and only talks to the database and the queue.
//! The queue runs each batch through this binary's own command line in a supervised process
//! ([`engine_command`]), so the engine never learns about HTTP, and a crash in it never takes
//! the API down: the supervisor restarts its worker, and a killed server resumes the batch from
//! the engine's checkpoint when it starts again.

pub mod api;
pub mod api_error;
pub mod batch;
pub mod batches_api;
pub mod engine_command;
pub mod files_api;
pub mod ids;
pub mod layout;
pub mod listener;
pub mod page;
pub mod queue;
pub mod store;
pub mod validate;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::serve::api::AppState;
use crate::serve::engine_command::EngineCommand;
use crate::serve::layout::DataDir;
use crate::serve::queue::{Queue, QueueSignals};
use crate::serve::store::Store;

/// What `serve` runs with, checked.
#[derive(Debug)]
pub struct ServeConfig {
    /// Where to listen.
    pub addr: SocketAddr,
    /// The data directory.
    pub data_dir: PathBuf,
    /// The key every request must carry, when set.
    pub api_key: Option<Vec<u8>>,
    /// The largest upload, in bytes.
    pub max_upload_bytes: u64,
    /// The longest a request may take.
    pub request_timeout: Duration,
    /// How each batch runs.
    pub engine: EngineCommand,
}

/// Reads the key from `path`: its first line, trimmed; it must not be empty.
///
/// # Errors
/// When the file cannot be read or holds no key.
pub fn read_key(path: &Path) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --api-key-file {}", path.display()))?;
    let key = text.lines().next().unwrap_or("").trim();
    if key.is_empty() {
        bail!("--api-key-file {} holds no key", path.display());
    }
    Ok(key.as_bytes().to_vec())
}

/// Refuses to listen beyond this machine without a key.
///
/// # Errors
/// A non-loopback address with no key.
pub fn check_exposure(host: IpAddr, key: Option<&[u8]>) -> Result<()> {
    if !host.is_loopback() && key.is_none() {
        bail!(
            "refusing to serve on {host} without an API key: anyone who can reach this port could \
             read every file and run batches. Pass --api-key-file FILE (clients then send \
             'Authorization: Bearer KEY'), or keep the default --host 127.0.0.1"
        );
    }
    Ok(())
}

/// Serves until SIGINT or SIGTERM, then stops the engine cleanly (the batch resumes at the
/// next start).
///
/// # Errors
/// When the data directory, the database or the port cannot be opened.
pub fn serve(cfg: ServeConfig) -> Result<()> {
    check_exposure(cfg.addr.ip(), cfg.api_key.as_deref())?;
    let dir = DataDir::create(&cfg.data_dir)?;
    let store = Store::open(&dir.database())?;
    let signals = Arc::new(QueueSignals::default());
    let state = AppState {
        store: store.clone(),
        dir: dir.clone(),
        queue: Arc::clone(&signals),
        max_upload: cfg.max_upload_bytes,
        key: cfg.api_key.as_deref().map(crate::digest::sha256),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(cfg.addr))
        .with_context(|| format!("cannot listen on {}", cfg.addr))?;
    let queue = Queue::new(store, dir, cfg.engine, Arc::clone(&signals));
    // The engine follows this thread (its parent-death signal), so it lives as long as the
    // server does.
    let queue_thread = std::thread::Builder::new()
        .name("batch-queue".into())
        .spawn(move || queue.run())?;
    eprintln!(
        "serving the Batch API on http://{} (data in {})",
        listener.local_addr()?,
        cfg.data_dir.display()
    );
    let app = api::router(state, cfg.request_timeout);
    let stopping = Arc::clone(&signals);
    let shutdown = async move {
        shutdown_signal().await;
        eprintln!("stopping: the running batch is checkpointed and resumes at the next start");
        // The engine is asked to stop now, while requests in flight drain.
        stopping.stop();
    };
    let served = runtime.block_on(listener::serve(listener, app, shutdown));
    signals.stop();
    if queue_thread.join().is_err() {
        tracing::error!("the batch queue panicked");
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(served?)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without handlers the default action (exit) applies, and the engine follows.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
