//! The one HTTP/1.1 accept loop of the control socket and the metrics listener: a
//! connection limit, a header-read timeout, a write timeout for clients that stop reading,
//! the sampler of rates, and a bounded graceful shutdown. What a request gets is the
//! caller's handler.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_io_timeout::TimeoutStream;

use super::server::{sample_loop, Resp, Shared, HEADER_TIMEOUT, MAX_CONNECTIONS, SHUTDOWN_GRACE};

/// Longest a write to a client may make no progress before its connection is closed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A client that stops reading its answers (while pipelining more requests) would
/// otherwise hold its connection slot for ever: a write that makes no progress for
/// [`WRITE_TIMEOUT`] ends the connection.
fn stalled_writes_fail<S: AsyncRead + AsyncWrite>(stream: S) -> Pin<Box<TimeoutStream<S>>> {
    let mut s = TimeoutStream::new(stream);
    s.set_write_timeout(Some(WRITE_TIMEOUT));
    Box::pin(s)
}

/// A listening socket the loop accepts connections from (unix or TCP).
pub(super) trait Acceptor {
    /// One accepted connection.
    type Stream: AsyncRead + AsyncWrite + Send + 'static;
    /// Waits for the next connection.
    fn accept(&self) -> impl Future<Output = io::Result<Self::Stream>>;
}

impl Acceptor for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept(&self) -> io::Result<Self::Stream> {
        tokio::net::UnixListener::accept(self).await.map(|(s, _)| s)
    }
}

impl Acceptor for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept(&self) -> io::Result<Self::Stream> {
        tokio::net::TcpListener::accept(self).await.map(|(s, _)| s)
    }
}

/// Serves `listener` until `shutdown` completes: at most [`MAX_CONNECTIONS`] connections,
/// each request answered by `handler`; then lets open requests finish for at most
/// [`SHUTDOWN_GRACE`]. `what` names the listener in log lines.
pub(super) async fn serve<A, H, F>(
    listener: A,
    shared: Arc<Shared>,
    handler: H,
    what: &'static str,
    shutdown: impl Future<Output = ()>,
) where
    A: Acceptor,
    H: Fn(Arc<Shared>, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Resp> + Send + 'static,
{
    let sampler = tokio::spawn(sample_loop(shared.clone()));
    let (closing_tx, closing_rx) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        // Reap finished connection tasks so the set does not grow.
        while conns.try_join_next().is_some() {}
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = permits.clone().acquire_owned() => p.expect("semaphore is never closed"),
        };
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(stream) => stream,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!("{what} accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        let handler = handler.clone();
        let mut closing = closing_rx.clone();
        conns.spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req| {
                let fut = handler(shared.clone(), req);
                async move { Ok::<_, Infallible>(fut.await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stalled_writes_fail(stream)), svc);
            tokio::pin!(conn);
            // An idle keep-alive connection must not hold up shutdown.
            let closed = async move {
                let _ = closing.wait_for(|c| *c).await;
            };
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = closed => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!("{what} connection: {e}");
            }
        });
    }
    drop(listener);
    sampler.abort();
    let _ = closing_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        conns.abort_all();
    }
}
