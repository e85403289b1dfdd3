//! `serve --metrics-listen ADDR:PORT`: a TCP listener for Prometheus that answers
//! `GET /metrics` (and `/v1/metrics`) only. It is read-only: no other path or method is
//! served, so exposing it never exposes the control operations of the unix socket.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Method, StatusCode};
use tokio::sync::oneshot;

use super::http_serve;
use super::server::{error_response, metrics_response, Resp, Shared, SHUTDOWN_GRACE};
use super::{BindError, ControlOps};

/// A running metrics listener; stops when shut down or dropped.
#[derive(Debug)]
pub struct MetricsHandle {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MetricsHandle {
    /// Binds `addr` and serves the metrics of `ops`, labelled `disk`, on a new thread.
    pub fn start(
        addr: SocketAddr,
        ops: Arc<dyn ControlOps>,
        disk: &str,
    ) -> Result<Self, BindError> {
        let sock_err = |source| BindError::Tcp { addr, source };
        let listener = std::net::TcpListener::bind(addr).map_err(sock_err)?;
        listener.set_nonblocking(true).map_err(sock_err)?;
        let local = listener.local_addr().map_err(sock_err)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(2)
            .build()
            .map_err(BindError::Runtime)?;
        let shared = Arc::new(Shared::new(ops, disk.to_owned()));
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("sb-metrics".into())
            .spawn(move || {
                let r = rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    let handler = |shared: Arc<Shared>, req: http::Request<hyper::body::Incoming>| async move {
                        handle(&shared, req.method(), req.uri().path()).await
                    };
                    let stop = async {
                        let _ = stop_rx.await;
                    };
                    http_serve::serve(listener, shared, handler, "metrics listener", stop).await;
                    Ok::<_, std::io::Error>(())
                });
                if let Err(e) = r {
                    tracing::error!("metrics listener stopped: {e}");
                }
                rt.shutdown_timeout(SHUTDOWN_GRACE);
            })
            .map_err(BindError::Runtime)?;
        tracing::info!("metrics listening on http://{local}/metrics");
        Ok(Self {
            addr: local,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The address actually bound (the port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and joins the thread (open requests get about two seconds).
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("metrics listener thread panicked");
            }
        }
    }
}

impl Drop for MetricsHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

async fn handle(shared: &Arc<Shared>, method: &Method, path: &str) -> Resp {
    if path != "/metrics" && path != "/v1/metrics" {
        return error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no such endpoint: {path} (this listener serves GET /metrics only)"),
        );
    }
    if method != Method::GET {
        let mut resp = error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            &format!("{path} accepts GET only, not {method}"),
        );
        resp.headers_mut()
            .insert(http::header::ALLOW, http::HeaderValue::from_static("GET"));
        return resp;
    }
    metrics_response(shared).await
}
