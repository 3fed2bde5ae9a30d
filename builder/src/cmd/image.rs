//! `lifeboat image ls|unpack|verify`.

use crate::Global;
use anyhow::{bail, Result};
use std::path::PathBuf;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// List the files of every layer.
    Ls {
        /// Image directory (holding manifest.json).
        dir: PathBuf,
        /// Only this layer.
        #[arg(long)]
        layer: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Unpack all layers, in order (later wins), into DEST.
    Unpack {
        dir: PathBuf,
        dest: PathBuf,
        /// Only this layer.
        #[arg(long)]
        layer: Option<String>,
    },
    /// Check every file's sha256 against the manifest, and every archive's structure.
    Verify {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(g: &Global, c: Command) -> Result<()> {
    match c {
        Command::Ls { dir, layer, json } => {
            let mut v = crate::image::list(&dir)?;
            if let Some(l) = &layer {
                v.retain(|e| &e.layer == l);
                if v.is_empty() {
                    bail!("image {} has no layer named {l:?}", dir.display());
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for e in v {
                    match e.link {
                        Some(t) => println!(
                            "{:<14} {} {:>9} /{} -> {t}",
                            e.layer, e.mode, e.size, e.path
                        ),
                        None => println!("{:<14} {} {:>9} /{}", e.layer, e.mode, e.size, e.path),
                    }
                }
            }
            Ok(())
        }
        Command::Unpack { dir, dest, layer } => {
            let n = crate::image::unpack(&dir, &dest, layer.as_deref())?;
            if !g.quiet {
                println!("unpacked {n} entries into {}", dest.display());
            }
            Ok(())
        }
        Command::Verify { dir, json } => {
            let problems = crate::image::verify(&dir)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"ok": problems.is_empty(), "problems": problems})
                    )?
                );
            } else if problems.is_empty() && !g.quiet {
                println!("{}: every file matches the manifest", dir.display());
            }
            if !problems.is_empty() {
                if !json {
                    for p in &problems {
                        eprintln!("lifeboat: {p}");
                    }
                }
                bail!(
                    "image {} failed verification ({} problem(s))",
                    dir.display(),
                    problems.len()
                );
            }
            Ok(())
        }
    }
}
