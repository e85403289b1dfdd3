//! The HTTP client every network access is built with, and running its futures from
//! blocking code.

use std::future::Future;
use std::time::Duration;

use reqwest::Client;
use tokio::runtime::{Handle, RuntimeFlavor};

use super::attempt::chain;
use super::url;
use super::HttpOptions;
use crate::source::SourceError;

/// Runs `fut` to completion on the calling thread, with `handle`'s runtime driving I/O and
/// timers.
///
/// From a plain thread (the normal case) this is `Handle::block_on`. From inside a
/// multi-thread tokio runtime it steps out of the async context first (`block_in_place`), so
/// a caller there does not panic. Calling it from the async thread of a current-thread
/// runtime is a caller bug (it would block that runtime) and panics inside tokio.
pub fn block_on<F: Future>(handle: &Handle, fut: F) -> F::Output {
    match Handle::try_current() {
        Ok(outer) if outer.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| handle.block_on(fut))
        }
        _ => handle.block_on(fut),
    }
}

/// The client for `opts`: timeouts, redirect policy, HTTP/1.1 or HTTP/2, extra headers,
/// trusted CAs and client certificate (the bearer token is added per request).
pub fn build_client(opts: &HttpOptions) -> Result<Client, SourceError> {
    let mut builder = Client::builder()
        .connect_timeout(opts.connect_timeout)
        .tcp_nodelay(true)
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .pool_idle_timeout(Some(Duration::from_secs(60)))
        .user_agent(concat!("streamboot/", env!("CARGO_PKG_VERSION")));
    builder = builder
        .redirect(url::redirect_policy(opts.allow_cross_origin_redirects))
        .referer(false);
    builder = if opts.http2 {
        builder.http2_adaptive_window(true)
    } else {
        builder.http1_only()
    };
    builder = opts.auth.configure(builder)?;
    builder
        .build()
        .map_err(|e| SourceError::Invalid(format!("cannot set up the HTTP client: {}", chain(&e))))
}
