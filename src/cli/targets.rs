//! `streamboot target-urls`: gives a running `serve` fresh URLs of its target (an expired
//! presigned URL) through its control socket (`POST /v1/target-urls`, docs/sources.md).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use crate::control::client;

/// How long the answer may take: serve probes each new URL, retrying a few times.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(180);

/// Arguments of `target-urls`.
#[derive(Clone, Args)]
pub struct TargetUrlsArgs {
    /// Disk served (for the messages; the control socket decides which serve is asked).
    pub disk: PathBuf,
    /// New URLs of the same image (several: mirrors). They carry secrets and are visible
    /// in the process list: prefer --url-file.
    pub urls: Vec<String>,
    /// File with one URL per line (read instead of, or in addition to, URL arguments).
    #[arg(long, value_name = "FILE")]
    pub url_file: Option<PathBuf>,
    /// Control socket of the `serve` running on DISK.
    #[arg(long)]
    pub control: PathBuf,
}

impl std::fmt::Debug for TargetUrlsArgs {
    /// URLs redacted: they carry signatures or credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: Vec<String> = self
            .urls
            .iter()
            .map(|u| crate::net::redact_url(u))
            .collect();
        f.debug_struct("TargetUrlsArgs")
            .field("disk", &self.disk)
            .field("urls", &shown)
            .field("url_file", &self.url_file)
            .field("control", &self.control)
            .finish()
    }
}

/// Sends the URLs; prints the answer (its message, or the JSON answer with `--json`).
pub fn run(a: &TargetUrlsArgs, json_out: bool) -> Result<()> {
    let mut urls = a.urls.clone();
    if let Some(file) = &a.url_file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading --url-file {}", file.display()))?;
        urls.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string),
        );
    }
    if urls.is_empty() {
        bail!("no URL given (URL arguments or --url-file)");
    }
    let answer = client::post_with_timeout(
        &a.control,
        "/v1/target-urls",
        &json!({ "urls": urls }),
        PROBE_TIMEOUT,
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "target-urls for {} through {}: {e}",
            a.disk.display(),
            a.control.display()
        )
    })?;
    if json_out {
        println!("{answer}");
    } else {
        let message = answer.get("message").and_then(|m| m.as_str());
        println!("{}", message.unwrap_or("target URLs replaced"));
    }
    Ok(())
}
