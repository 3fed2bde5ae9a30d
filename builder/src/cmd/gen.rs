//! `lifeboat completions SHELL` and `lifeboat man`: generated from the
//! command-line definition itself, so they cannot drift from it.

use crate::Global;
use anyhow::{Context, Result};
use clap::CommandFactory;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct CompletionArgs {
    /// bash, zsh, fish, elvish or powershell.
    pub shell: clap_complete::Shell,
}

pub fn completions(_g: &Global, a: CompletionArgs) -> Result<()> {
    let mut cmd = super::Cli::command();
    clap_complete::generate(a.shell, &mut cmd, "lifeboat", &mut std::io::stdout());
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// Write lifeboat.1 and a lifeboat-<command>.1 per command into DIR
    /// (default: print lifeboat.1).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

pub fn man(_g: &Global, a: ManArgs) -> Result<()> {
    let cmd = super::Cli::command();
    match a.dir {
        Some(d) => {
            std::fs::create_dir_all(&d)
                .with_context(|| format!("cannot create {}", d.display()))?;
            clap_mangen::generate_to(cmd, &d)
                .with_context(|| format!("cannot write the man pages into {}", d.display()))?;
        }
        None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?,
    }
    Ok(())
}
