//! `OUTPUT = "PORTABLE"`: a tarball with the static `lifeboat` binary, the
//! effective configuration and the plan (layout, backup manifest), so that
//! `./lifeboat recover` runs from any live Linux (SystemRescue, a distro
//! installer's shell) with that system's own disk tools.
//!
//! ```text
//! lifeboat-portable-<host>/lifeboat              static binary
//! lifeboat-portable-<host>/lifeboat.toml         the configuration it was made with
//! lifeboat-portable-<host>/etc/lifeboat/...      the plan (layout.json, backup.json, ...)
//! lifeboat-portable-<host>/lifeboat-portable.json
//! lifeboat-portable-<host>/README.txt
//! ```
//!
//! A `lifeboat` next to `lifeboat-portable.json` reads `lifeboat.toml` and
//! the plan from its own directory instead of `/etc/lifeboat`.

use anyhow::{bail, Context, Result};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub const MARKER: &str = "lifeboat-portable.json";

/// The directory of a portable lifeboat this process runs from, if it is one.
pub fn dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let d = exe.parent()?;
    d.join(MARKER).is_file().then(|| d.to_path_buf())
}

/// Where the rescue image's files (`etc/lifeboat/...`) are: the portable
/// directory, else `/`.
pub fn root() -> PathBuf {
    dir().unwrap_or_else(|| PathBuf::from("/"))
}

fn readme(host: &str) -> String {
    format!(
        "Lifeboat, portable: recover {host} from any live Linux system\n\
         \n\
         1. Boot a live Linux (SystemRescue, a distribution's live or installer image) on the\n   \
            machine with the new disks attached, and the backup reachable (disk, network).\n\
         2. tar xzf lifeboat-portable-{host}.tar.gz && cd lifeboat-portable-{host}\n\
         3. ./lifeboat recover --dry-run      (prints what would be done; writes nothing)\n\
         4. ./lifeboat recover                (asks before it writes; --auto never asks)\n\
         \n\
         The live system's own tools are used (sfdisk, mkfs.*, tar, grub-install in the\n\
         recovered system's chroot); a missing one is named with its package. Disks that\n\
         are mounted or in use are never written. Keys of an encrypted backup: --backup-key FILE.\n"
    )
}

/// Write the tarball `out`. Returns warnings.
pub fn write(
    out: &Path,
    host: &str,
    cfg_text: &str,
    plan_files: &[(String, Vec<u8>)],
) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    let exe = std::env::current_exe().context("cannot find the lifeboat binary")?;
    let bin = std::fs::read(&exe).with_context(|| format!("cannot read {}", exe.display()))?;
    let elf = goblin::elf::Elf::parse(&bin).context("the lifeboat binary is not an ELF file")?;
    if elf.interpreter.is_some() {
        bail!(
            "{} is dynamically linked; a portable lifeboat must be the static build \
             (cargo build --release with .cargo/config.toml's target), or it will not run on other systems",
            exe.display()
        );
    }
    let names: Vec<&str> = plan_files.iter().map(|(p, _)| p.as_str()).collect();
    for need in [
        lifeboat_contract::RESCUE_LAYOUT_PATH,
        lifeboat_contract::RESCUE_BACKUP_PATH,
    ] {
        if !names.contains(&need) {
            warnings.push(format!(
                "the portable tarball has no {need}: make it with `lifeboat mkbackup` (OUTPUT = \"PORTABLE\") so it can recover"
            ));
        }
    }
    let stage = tempfile::tempdir()?;
    let name = format!("lifeboat-portable-{host}");
    let root = stage.path().join(&name);
    std::fs::create_dir_all(&root)?;
    let put = |rel: &str, data: &[u8], mode: u32| -> Result<()> {
        let p = root.join(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(&p, data)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    put("lifeboat", &bin, 0o755)?;
    put("lifeboat.toml", cfg_text.as_bytes(), 0o600)?;
    for (rel, data) in plan_files {
        // Plan files may hold share credentials: owner only.
        put(rel.trim_start_matches('/'), data, 0o600)?;
    }
    put("README.txt", readme(host).as_bytes(), 0o644)?;
    let marker = serde_json::json!({
        "host": host,
        "lifeboat_version": env!("CARGO_PKG_VERSION"),
    });
    put(
        MARKER,
        (serde_json::to_string_pretty(&marker)? + "\n").as_bytes(),
        0o644,
    )?;
    if let Some(d) = out.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let tmp = PathBuf::from(format!("{}.part", out.display()));
    let o = std::process::Command::new("tar")
        .arg("-C")
        .arg(stage.path())
        .args(["--owner=0", "--group=0", "--numeric-owner", "-czf"])
        .arg(&tmp)
        .arg(&name)
        .output()
        .context("cannot run tar")?;
    if !o.status.success() {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "tar could not write {}: {}",
            tmp.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(warnings)
}
