//! `streamboot demo`: runs [`crate::demo`] with the CLI's progress bars and a
//! final summary (text, or one JSON line with `--json`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::progress::Bars;
use super::size::human;
use crate::demo::{DemoOptions, Hooks, Summary};

/// Arguments of `demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Never start a VM: a blkio client reads, verifies and writes the device instead.
    #[arg(long)]
    pub no_vm: bool,
    /// Use the synthetic image pair (MBR + data, not bootable; implies --no-vm).
    #[arg(long)]
    pub synthetic: bool,
    /// Work directory (disk, sockets, logs), kept afterwards (default: a temporary
    /// directory, removed when the demo succeeds).
    #[arg(long)]
    pub work: Option<PathBuf>,
    /// Cache for the built images and guest (default: $XDG_CACHE_HOME/streamboot-demo).
    #[arg(long)]
    pub cache: Option<PathBuf>,
}

struct CliHooks {
    json: bool,
    bars: Bars,
}

impl Hooks for CliHooks {
    fn step(&self, msg: &str) {
        if !self.json {
            println!("\n==> {msg}");
        }
    }

    fn info(&self, msg: &str) {
        if !self.json {
            println!("    {msg}");
        }
    }

    fn progress(&self, what: &str, done: u64, total: u64) {
        self.bars.update(what, done, total);
    }

    fn progress_done(&self) {
        self.bars.finish();
    }
}

/// Runs `streamboot demo`.
pub fn run(a: &DemoArgs, json: bool) -> Result<()> {
    let (work, keep) = match &a.work {
        Some(w) => (w.clone(), true),
        None => (
            std::env::temp_dir().join(format!("streamboot-demo-{}", std::process::id())),
            false,
        ),
    };
    let opts = DemoOptions {
        work: work.clone(),
        cache: a.cache.clone().unwrap_or_else(crate::demo::default_cache),
        no_vm: a.no_vm || a.synthetic,
        synthetic: a.synthetic,
    };
    // Sizes are bytes, so one bar style fits every step.
    let hooks = CliHooks {
        json,
        bars: Bars::new(json, true),
    };
    let summary = crate::demo::run(&opts, &hooks).with_context(|| match work.is_dir() {
        true => format!("demo failed (work directory kept: {})", work.display()),
        false => "demo failed".to_string(),
    })?;
    if !keep {
        let _ = std::fs::remove_dir_all(&work);
    }
    if json {
        println!("{}", serde_json::json!({"ok": true, "summary": summary}));
    } else {
        println!("{}", summary_text(&summary, keep));
    }
    Ok(())
}

fn summary_text(s: &Summary, kept: bool) -> String {
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1} ms"));
    let mut t = format!(
        "\n==> summary\n\
         images:            {}, v1 {} → v2 {} ({} chunks)\n\
         guest:             {}{}\n\
         verdicts:          {}\n\
         prepare:           {:.2} s, {} over HTTP\n\
         first guest read:  {} after serve start\n\
         guest done:        {:.2} s after serve start\n\
         ready (all local): {:.2} s after serve start\n\
         fetched:           {} on demand, {} in the background ({} over HTTP while serving, {} requests)\n\
         commit:            {:.2} s\n\
         final disk:        {}\n",
        s.images.name(),
        human(s.v1_size),
        human(s.v2_size),
        human(s.chunk_size),
        s.guest,
        s.no_vm_reason
            .as_ref()
            .map_or(String::new(), |r| format!(" (no VM: {r})")),
        s.verdicts.join("; "),
        s.prepare_secs,
        human(s.wire_prepare.bytes),
        ms(s.first_read_ms),
        s.guest_secs,
        s.ready_secs,
        human(s.bytes_fetched_demand),
        human(s.bytes_fetched_background),
        human(s.wire_serve.bytes),
        s.wire_serve.requests,
        s.commit_secs,
        if s.final_disk_verified {
            "verified: the expected bytes exactly"
        } else {
            "NOT verified"
        },
    );
    if let Some(p) = &s.plain_boot {
        t.push_str(&format!("plain boot:        {p}\n"));
    }
    t.push_str(&format!("total:             {:.1} s", s.total_secs));
    if kept {
        t.push_str(&format!("\nwork directory:    {}", s.work.display()));
    }
    t
}
