//! `streamboot generate-docs DIR` (hidden): man pages and shell completions for packaging,
//! made from the same clap definitions the binary parses with (no build script, so no
//! cost on every build).

use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

use super::Cli;

/// Writes DIR/man/streamboot.1 and one page per subcommand (`streamboot-serve.1`,
/// `streamboot-store-gc.1`, ...), and DIR/completions/{streamboot.bash,_streamboot,
/// streamboot.fish}.
pub fn generate(dir: &Path) -> Result<()> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    clap_mangen::generate_to(Cli::command(), &man)
        .with_context(|| format!("writing man pages to {}", man.display()))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut Cli::command(), "streamboot", &completions)
            .with_context(|| format!("writing {shell} completions to {}", completions.display()))?;
    }
    Ok(())
}
