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
    /// Look through outputs for secrets (private keys, password hashes,
    /// credentials): image directories, layers, initrds, ISOs, USB and raw
    /// disk images, PXE trees, portable tarballs. Exit 1 when any is found.
    Scan {
        /// Files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
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
                    let mark = e
                        .secret
                        .as_ref()
                        .map(|k| format!("  [SECRET: {k}]"))
                        .unwrap_or_default();
                    match e.link {
                        Some(t) => println!(
                            "{:<14} {} {:>9} /{} -> {t}",
                            e.layer, e.mode, e.size, e.path
                        ),
                        None => {
                            println!("{:<14} {} {:>9} /{}{mark}", e.layer, e.mode, e.size, e.path)
                        }
                    }
                }
            }
            Ok(())
        }
        Command::Scan { paths, json } => {
            let mut all = Vec::new();
            for p in &paths {
                all.extend(crate::secrets::scan(p)?);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                for f in &all {
                    println!(
                        "SECRET {}: {}{}",
                        f.kind,
                        f.place,
                        f.layer
                            .as_ref()
                            .map(|l| format!(" (layer {l})"))
                            .unwrap_or_default()
                    );
                }
                if all.is_empty() && !g.quiet {
                    println!("no secrets found");
                }
            }
            if !all.is_empty() {
                return Err(crate::cmd::Exit(1).into());
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
