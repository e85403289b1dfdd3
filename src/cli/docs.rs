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
    let mut visible = without_hidden_subcommands(Cli::command());
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut visible, "streamboot", &completions)
            .with_context(|| format!("writing {shell} completions to {}", completions.display()))?;
    }
    Ok(())
}

/// `cmd` without its hidden subcommands (this one among them): the completion generators
/// would offer them.
fn without_hidden_subcommands(cmd: clap::Command) -> clap::Command {
    let visible: Vec<clap::Command> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    let mut top = clap::Command::new("streamboot")
        .version(env!("CARGO_PKG_VERSION"))
        .args(cmd.get_arguments().cloned())
        .subcommands(visible);
    if let Some(a) = cmd.get_about() {
        top = top.about(a.clone());
    }
    top
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_and_completions_leave_out_hidden_subcommands() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path()).unwrap();
        assert!(dir.path().join("man/streamboot-serve.1").exists());
        assert!(dir.path().join("man/streamboot-store-gc.1").exists());
        assert!(!dir.path().join("man/streamboot-generate-docs.1").exists());
        for f in ["streamboot.bash", "_streamboot", "streamboot.fish"] {
            let text = std::fs::read_to_string(dir.path().join("completions").join(f)).unwrap();
            assert!(text.contains("hydrate"), "{f}");
            assert!(text.contains("log-format"), "{f}");
            assert!(!text.contains("generate-docs"), "{f} offers generate-docs");
        }
    }
}
