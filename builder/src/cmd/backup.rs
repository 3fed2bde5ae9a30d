//! `lifeboat backup ls|verify`: inspect and check a backup chain.

use crate::backup::Store;
use crate::Global;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// List the sets, archives and volumes of a backup.
    Ls {
        /// Backup directory, or a BACKUP_URL (file, nfs, cifs, http(s));
        /// default: BACKUP_URL/<hostname>.
        dir: Option<String>,
        /// Print the backup manifest (JSON) instead.
        #[arg(long)]
        json: bool,
    },
    /// Read everything back: every volume's sha256, the compressed stream
    /// and the tar stream. Exit 1 when anything is wrong.
    Verify {
        dir: Option<String>,
        /// Key of an encrypted backup (default: backup_key_file).
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// Print the result as JSON: {"backup", "location", "ok", "archives": [...]}.
        #[arg(long)]
        json: bool,
    },
}

/// The backup to read: a directory, or a URL (then this host's directory
/// below it), default BACKUP_URL. Network shares are mounted read-only
/// while the returned guard lives.
fn backup_store(g: &Global, dir: Option<String>) -> Result<(Store, Option<crate::url::Local>)> {
    let cfg = g.load_config()?.config;
    let url = match dir {
        Some(d) if !d.contains("://") => return Ok((Store::Dir(PathBuf::from(d)), None)),
        Some(u) => u,
        None => match cfg.backup_url.clone() {
            Some(u) => u,
            None => bail!("BACKUP_URL is not set; give the backup directory or URL as an argument"),
        },
    };
    let host = crate::layout::hostname().unwrap_or_default();
    let acc = crate::url::Access {
        read_only: true,
        credentials: cfg.backup_credentials.clone(),
        options: cfg.backup_mount_options.clone(),
        ssh_options: cfg.backup_ssh_options.clone(),
        ca_file: cfg.backup_ca_file.clone(),
    };
    if let Some(r) = Store::remote(&url, &acc, &host)? {
        return Ok((r, None));
    }
    if url.starts_with("tape://") {
        let m = crate::tape::read_manifest(&url)?;
        return Ok((Store::Tape(crate::tape::Remote::new(&url, &m)?), None));
    }
    let l = crate::url::local_with(&url, "BACKUP_URL", &acc)?;
    Ok((Store::Dir(l.path.join(host)), Some(l)))
}

pub fn run(g: &Global, c: Command) -> Result<()> {
    let (dir, verify, key, json) = match c {
        Command::Ls { dir, json } => (backup_store(g, dir)?, false, None, json),
        Command::Verify { dir, key, json } => {
            let k = key.or(g.load_config()?.config.backup_key_file);
            (backup_store(g, dir)?, true, k, json)
        }
    };
    let (dir, _share) = dir;
    let p = dir.show(crate::backup::MANIFEST_FILE);
    let text = dir
        .read_to_string(crate::backup::MANIFEST_FILE)
        .with_context(|| format!("cannot read {p} (no backup there?)"))?;
    let m = lifeboat_contract::BackupManifest::from_json(&text)
        .with_context(|| format!("{p} is not a valid backup manifest"))?;
    if json && !verify {
        println!("{}", serde_json::to_string_pretty(&m)?);
        return Ok(());
    }
    // Text lines go to stdout, unless JSON does.
    let say = |line: String| {
        if !json {
            println!("{line}");
        }
    };
    let mut results = Vec::new();
    say(format!(
        "backup {} of {} in {}",
        m.id,
        m.hostname,
        dir.show("")
    ));
    let encrypted = m.sets.iter().any(|s| s.encryption.is_some());
    let key = match key {
        Some(k) if verify && encrypted => Some(crate::backup::Key::from_file(&k)?),
        _ => None,
    };
    let mut bad = 0;
    for set in &m.sets {
        say(format!(
            "set {} ({}, {}{})",
            set.id,
            set.level,
            set.compression,
            set.encryption
                .as_ref()
                .map(|e| format!(", encrypted {e}"))
                .unwrap_or_default()
        ));
        for a in &set.archives {
            say(format!(
                "  {:<12} {:>12} bytes in {} volume(s), {} bytes of tar",
                a.mountpoint,
                a.bytes,
                a.volumes.len(),
                a.tar_bytes
            ));
            if !verify {
                for v in &a.volumes {
                    say(format!("    {} {} {}", v.file, v.bytes, v.sha256));
                }
                continue;
            }
            match crate::backup::verify_archive(&dir, set, a, key.as_ref()) {
                Ok(n) => {
                    say(format!(
                        "    ok: {n} tar members, every volume matches its sha256"
                    ));
                    results.push(serde_json::json!({
                        "set": set.id, "mountpoint": a.mountpoint, "ok": true, "members": n,
                    }));
                }
                Err(e) => {
                    bad += 1;
                    say(format!("    DAMAGED: {e:#}"));
                    results.push(serde_json::json!({
                        "set": set.id, "mountpoint": a.mountpoint, "ok": false, "error": format!("{e:#}"),
                    }));
                }
            }
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "backup": m.id,
                "hostname": m.hostname,
                "location": dir.show(""),
                "ok": bad == 0,
                "archives": results,
            }))?
        );
    }
    if bad > 0 {
        bail!("{bad} archive(s) of {} cannot be restored", dir.show(""));
    }
    Ok(())
}
