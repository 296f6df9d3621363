//! The accept loop: HTTP/1.1 connections with bounded headers, a deadline for a client to send
//! them, and a cap on open connections. Stops accepting on shutdown and lets requests in
//! flight finish.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Connections served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 512;
/// Bytes a request's head (line and headers) may take.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Seconds a client has to send a request's head, also between requests on a kept-alive
/// connection.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long requests in flight get to finish after shutdown begins.
const DRAIN: Duration = Duration::from_secs(5);

/// Serves `app` on `listener` until `shutdown` resolves.
///
/// # Errors
/// When accepting fails for a reason other than a client going away.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let tracker = tokio_util::task::TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            p = Arc::clone(&slots).acquire_owned() => p.map_err(std::io::Error::other)?,
        };
        let (stream, _) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // A client that reset before we took it is no reason to stop.
                Err(e) if is_per_connection(&e) => continue,
                // Out of descriptors or memory for now: wait for connections to close.
                Err(e) if is_exhaustion(&e) => {
                    tracing::warn!("accept: {e}; waiting");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => return Err(e),
            },
        };
        let service = TowerToHyperService::new(app.clone());
        tracker.spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES);
            // A connection that fails (a client gone, a timeout) concerns that client only.
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(DRAIN, tracker.wait()).await;
    Ok(())
}

fn is_exhaustion(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    e.raw_os_error().is_some_and(|code| {
        [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM]
            .contains(&Errno::from_raw(code))
    })
}

fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted)
}
