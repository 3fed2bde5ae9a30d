//! `lifeboat dump`: the effective configuration, annotated with its origin.

use crate::Global;
use anyhow::Result;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print JSON: {"files": [...], "config": {...}, "origin": {"key": "file"}}.
    #[arg(long)]
    pub json: bool,
}

pub fn run(g: &Global, a: Args) -> Result<()> {
    let loaded = g.load_config()?;
    if a.json {
        println!("{}", loaded.dump_json()?);
    } else {
        print!("{}", loaded.dump_text()?);
    }
    Ok(())
}
