//! `lifeboat layout save|show|check`.

use super::Exit;
use crate::Global;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Where `layout save` writes and `show`/`check` read by default.
pub const DEFAULT_LAYOUT: &str = "/var/lib/lifeboat/layout.json";
/// The manifest of the last `mkbackup`, kept so that a later `mkrescue`
/// makes an image that can still recover from that backup.
pub const DEFAULT_BACKUP: &str = "/var/lib/lifeboat/backup.json";

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Capture this machine's disk layout into layout.json.
    Save {
        /// Output file.
        #[arg(short, long, default_value = DEFAULT_LAYOUT)]
        output: PathBuf,
        /// Capture only this disk (repeatable; loop devices allowed).
        #[arg(long = "disk", value_name = "DEV")]
        disks: Vec<String>,
    },
    /// Print a saved layout (or the live one with --live).
    Show {
        #[arg(default_value = DEFAULT_LAYOUT)]
        file: PathBuf,
        #[arg(long)]
        json: bool,
        /// Capture now instead of reading the file.
        #[arg(long)]
        live: bool,
        /// With --live: only this disk (repeatable).
        #[arg(long = "disk", value_name = "DEV")]
        disks: Vec<String>,
    },
    /// Print, in dependency order, the commands that recreate a saved
    /// layout on blank disks with the same identities (nothing is run).
    Plan {
        #[arg(default_value = DEFAULT_LAYOUT)]
        file: PathBuf,
    },
    /// Compare the saved layout with the machine now: exit 0 unchanged,
    /// 1 changed (differences printed), 2 could not check.
    Check {
        #[arg(default_value = DEFAULT_LAYOUT)]
        file: PathBuf,
        #[arg(long)]
        json: bool,
        /// Only this disk (repeatable), as given to `layout save --disk`.
        #[arg(long = "disk", value_name = "DEV")]
        disks: Vec<String>,
    },
}

fn load(file: &Path) -> Result<lifeboat_contract::Layout> {
    let text = std::fs::read_to_string(file).with_context(|| {
        format!(
            "cannot read {} (run `lifeboat layout save` first)",
            file.display()
        )
    })?;
    lifeboat_contract::Layout::from_json(&text)
        .with_context(|| format!("{} is not a valid layout.json", file.display()))
}

/// Write atomically: a temporary file beside the target, then rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = tempfile::NamedTempFile::new_in(&dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    std::fs::write(tmp.path(), data)
        .with_context(|| format!("cannot write {}", tmp.path().display()))?;
    tmp.persist(path)
        .with_context(|| format!("cannot rename into {}", path.display()))?;
    Ok(())
}

pub fn run(g: &Global, c: Command) -> Result<()> {
    match c {
        Command::Save { output, disks } => {
            let l = crate::layout::capture(&disks)?;
            let mut text = serde_json::to_vec_pretty(&l)?;
            text.push(b'\n');
            write_atomic(&output, &text)?;
            if disks.is_empty() {
                if let Ok(t) = std::fs::read_to_string("/etc/fstab") {
                    for w in crate::fstab::cross_check(&l, &t) {
                        eprintln!("lifeboat: warning: {w}");
                    }
                }
            }
            if !g.quiet {
                println!(
                    "layout of {} disk(s) saved to {}",
                    l.disks.len(),
                    output.display()
                );
            }
            Ok(())
        }
        Command::Show {
            file,
            json,
            live,
            disks,
        } => {
            let l = if live {
                crate::layout::capture(&disks)?
            } else {
                load(&file)?
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&l)?);
            } else {
                print!("{}", crate::layout::summary(&l));
            }
            Ok(())
        }
        Command::Plan { file } => {
            let l = load(&file)?;
            for step in crate::plan::commands(&l)? {
                println!("{}", step.render());
            }
            Ok(())
        }
        Command::Check { file, json, disks } => {
            let result = load(&file).and_then(|old| {
                let new = crate::layout::capture(&disks)?;
                Ok(crate::layout::diff(&old, &new))
            });
            let d = match result {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("lifeboat: error: {e:#}");
                    return Err(Exit(2).into());
                }
            };
            if json {
                let v = serde_json::json!({"changed": !d.is_empty(), "differences": d});
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if d.is_empty() {
                if !g.quiet {
                    println!("layout unchanged since {}", file.display());
                }
            } else {
                println!("layout changed since {}:", file.display());
                for l in &d {
                    println!("  {l}");
                }
            }
            if d.is_empty() {
                Ok(())
            } else {
                Err(Exit(1).into())
            }
        }
    }
}
