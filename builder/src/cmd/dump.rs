//! `lifeboat dump`: the effective configuration, annotated with its origin.

use crate::Global;
use anyhow::Result;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print JSON: {"files": [...], "config": {...}, "origin": {"key": "file"}}.
    #[arg(long, conflicts_with = "reference")]
    pub json: bool,
    /// Print the reference of every configuration key (Markdown; it is
    /// docs/configuration.md) instead.
    #[arg(long)]
    pub reference: bool,
}

pub fn run(g: &Global, a: Args) -> Result<()> {
    if a.reference {
        print!("{}", crate::config_ref::markdown()?);
        return Ok(());
    }
    let loaded = g.load_config()?;
    if a.json {
        println!("{}", loaded.dump_json()?);
    } else {
        print!("{}", loaded.dump_text()?);
    }
    Ok(())
}
