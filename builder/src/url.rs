//! BACKUP_URL / OUTPUT_URL that name local storage: `file:///path`, and
//! `usb://LABEL[/dir]` (also `usb:///dev/disk/by-label/LABEL[/dir]`): the
//! filesystem with that label, mounted at /run/lifeboat/usb/LABEL when it
//! is not mounted yet (and unmounted again when done).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A local directory for a URL; unmounts what it mounted when dropped.
#[derive(Debug)]
pub struct Local {
    pub path: PathBuf,
    mounted: Option<PathBuf>,
}

impl Drop for Local {
    fn drop(&mut self) {
        if let Some(m) = self.mounted.take() {
            let _ = Command::new("sync").status();
            let _ = Command::new("umount").arg(&m).status();
        }
    }
}

/// `usb://LABEL/dir` → (`LABEL`, `dir`).
pub fn parse_usb(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("usb://")?;
    let rest = rest.strip_prefix("/dev/disk/by-label/").unwrap_or(rest);
    let (label, dir) = rest.split_once('/').unwrap_or((rest, ""));
    if label.is_empty() {
        return None;
    }
    Some((label.to_string(), dir.trim_matches('/').to_string()))
}

/// The directory a URL stands for. `key` names the setting in messages.
pub fn local(url: &str, key: &str) -> Result<Local> {
    if let Some(p) = url.strip_prefix("file://") {
        if p.starts_with('/') {
            return Ok(Local {
                path: PathBuf::from(p),
                mounted: None,
            });
        }
    }
    if let Some((label, dir)) = parse_usb(url) {
        let dir = if dir.is_empty() {
            "lifeboat".to_string()
        } else {
            dir
        };
        let out = Command::new("blkid")
            .args(["-L", &label])
            .output()
            .context("cannot run blkid")?;
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() || dev.is_empty() {
            bail!("{key} = {url:?}: no filesystem with the label {label} is attached (label it with e2label/mkfs -L, or plug it in)");
        }
        let mp = Command::new("findmnt")
            .args([
                "--noheadings",
                "--first-only",
                "-o",
                "TARGET",
                "--source",
                &dev,
            ])
            .output()
            .context("cannot run findmnt")?;
        let mp = String::from_utf8_lossy(&mp.stdout).trim().to_string();
        if !mp.is_empty() {
            return Ok(Local {
                path: Path::new(&mp).join(dir),
                mounted: None,
            });
        }
        let m = PathBuf::from("/run/lifeboat/usb").join(&label);
        std::fs::create_dir_all(&m).with_context(|| format!("cannot create {}", m.display()))?;
        let st = Command::new("mount")
            .arg(&dev)
            .arg(&m)
            .status()
            .context("cannot run mount")?;
        if !st.success() {
            bail!(
                "{key} = {url:?}: cannot mount {dev} (label {label}) at {}",
                m.display()
            );
        }
        return Ok(Local {
            path: m.join(dir),
            mounted: Some(m),
        });
    }
    bail!("{key} = {url:?}: supported are file:///absolute/path and usb://LABEL[/dir] (or give --output-dir)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usb_urls() {
        assert_eq!(
            parse_usb("usb://REAR-000"),
            Some(("REAR-000".into(), "".into()))
        );
        assert_eq!(
            parse_usb("usb://LB/backups/x/"),
            Some(("LB".into(), "backups/x".into()))
        );
        assert_eq!(
            parse_usb("usb:///dev/disk/by-label/LB/b"),
            Some(("LB".into(), "b".into()))
        );
        assert_eq!(parse_usb("usb://"), None);
        assert_eq!(parse_usb("file:///x"), None);
    }

    #[test]
    fn file_urls_and_errors() {
        assert_eq!(
            local("file:///srv/b", "BACKUP_URL").unwrap().path,
            PathBuf::from("/srv/b")
        );
        let e = local("nfs://server/x", "BACKUP_URL")
            .unwrap_err()
            .to_string();
        assert!(e.contains("BACKUP_URL") && e.contains("usb://LABEL"), "{e}");
        let e = local("usb://NO-SUCH-LABEL-LIFEBOAT", "BACKUP_URL")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no filesystem with the label NO-SUCH-LABEL-LIFEBOAT"),
            "{e}"
        );
    }
}
