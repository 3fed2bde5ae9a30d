//! `lifeboat image ls|unpack|verify`.

use crate::Global;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

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
    /// Check every file's sha256 against the manifest, and every archive's
    /// structure; a signed manifest's signature too.
    Verify {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
        /// The public key the manifest must be signed with (PEM); without
        /// it, a signature is checked against the key in the image's base
        /// layer.
        #[arg(long, value_name = "FILE")]
        pubkey: Option<PathBuf>,
        /// DIR is an unpacked rescue system (`/` in the rescue OS): compare
        /// its files with the file lists of the layers unpacked there.
        #[arg(long, conflicts_with = "pubkey")]
        unpacked: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// Where to write the private key (e.g. /etc/lifeboat/signing.key);
    /// the public key goes to the same name with .pub.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

pub fn keygen(g: &Global, a: KeygenArgs) -> Result<()> {
    let fp = crate::signing::keygen(&a.out)?;
    if !g.quiet {
        println!(
            "signing key {} (fingerprint {fp}), public key {}; set signing_key = \"{}\"",
            a.out.display(),
            a.out.with_extension("pub").display(),
            a.out.display()
        );
    }
    Ok(())
}

/// The manifest's signature: None when unsigned, else the problem if any.
fn manifest_signature(dir: &Path, pubkey: Option<&Path>) -> Result<Option<Option<String>>> {
    let sig = match std::fs::read(dir.join("manifest.json.sig")) {
        Ok(s) => s,
        Err(_) if pubkey.is_some() => {
            return Ok(Some(Some(
                "manifest.json is not signed (no manifest.json.sig), but --pubkey was given".into(),
            )))
        }
        Err(_) => return Ok(None),
    };
    let raw = match pubkey {
        Some(p) => crate::signing::parse_public(&std::fs::read_to_string(p)?)
            .with_context(|| format!("--pubkey {}", p.display()))?,
        None => {
            // The key the base layer carries, read from the layer itself.
            let m = crate::image::load_manifest(dir)?;
            let mut key = None;
            if let Some(base) = m.layers.iter().find(|l| l.name == "base") {
                crate::image::walk_layer(dir, base, |h, data| {
                    if h.name.trim_start_matches("./") == crate::signing::PUBKEY_PATH {
                        key = Some(crate::signing::parse_public(&String::from_utf8_lossy(
                            &data,
                        ))?);
                    }
                    Ok(())
                })?;
            }
            match key {
                Some(k) => k,
                None => {
                    return Ok(Some(Some(
                        "manifest.json.sig is there but the base layer has no signing.pub".into(),
                    )))
                }
            }
        }
    };
    let m = std::fs::read(dir.join("manifest.json"))?;
    Ok(Some(if crate::signing::verify(&raw, &m, &sig) {
        None
    } else {
        Some(format!(
            "manifest.json's signature does not verify with key {}",
            crate::signing::fingerprint(&raw)
        ))
    }))
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
        Command::Verify {
            dir,
            json,
            unpacked: true,
            ..
        } => {
            let c = crate::integrity::check_root(&dir)?;
            if c.layers.is_empty() {
                bail!(
                    "{} holds no layer file lists (etc/lifeboat/layers/): not an unpacked rescue system",
                    dir.display()
                );
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"ok": true, "layers": c.layers, "files": c.files})
                    )?
                );
            } else if !g.quiet {
                println!(
                    "{}: {} file(s) match the file lists of layers {}",
                    dir.display(),
                    c.files,
                    c.layers.join(", ")
                );
            }
            Ok(())
        }
        Command::Verify {
            dir, json, pubkey, ..
        } => {
            let mut problems = crate::image::verify(&dir)?;
            if let Some(Some(p)) = manifest_signature(&dir, pubkey.as_deref())? {
                problems.push(p);
            }
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
