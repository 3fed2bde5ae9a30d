//! `OUTPUT = "ISO"`: a bootable ISO 9660 image of the rescue system, for
//! BIOS (GRUB's i386-pc El Torito image) and UEFI (a FAT ESP image with
//! GRUB for x86_64-efi), isohybrid so `dd` to a USB stick boots both ways.
//! GRUB's own `grub-mkrescue` assembles it with xorriso (the proven ISO
//! tool); the menu is ours.
//!
//! Menu: "Recover automatically" (`lifeboat.recover=auto`), "Recover
//! interactively" (`ask`), "Rescue shell" (`no`), each also with the
//! console on the first serial port; the default entry starts after
//! `boot_timeout` seconds (`-1`: wait for a choice).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// How the ISO is made.
#[derive(Debug, Clone)]
pub struct IsoOptions {
    /// ISO volume label (ISO_VOLID), at most 32 characters.
    pub label: String,
    /// `automatic`, `manual` (interactive) or `shell`.
    pub default: String,
    /// `vga` or `serial`: which variant of the default entry.
    pub console: String,
    /// Seconds before the default entry starts; -1: never.
    pub timeout: i32,
    /// Extra kernel command line (KERNEL_CMDLINE).
    pub cmdline: String,
}

/// (key, title, kernel argument) of the three kinds of menu entries.
pub const ENTRIES: &[(&str, &str, &str)] = &[
    (
        "automatic",
        "Recover automatically",
        "lifeboat.recover=auto",
    ),
    ("manual", "Recover interactively", "lifeboat.recover=ask"),
    ("shell", "Rescue shell", "lifeboat.recover=no"),
];

/// One rescue image in a boot menu: paths on the boot filesystem.
#[derive(Debug, Clone)]
pub struct MenuImage {
    /// Shown after the entry names ("" for the only image of an ISO).
    pub title: String,
    pub kernel: String,
    pub initrd: String,
}

/// The GRUB menu of the ISO.
pub fn grub_cfg(o: &IsoOptions, kernel: &str, initrd: &str) -> Result<String> {
    menu(
        o,
        "Lifeboat rescue ISO",
        &[MenuImage {
            title: String::new(),
            kernel: format!("/boot/{kernel}"),
            initrd: format!("/boot/{initrd}"),
        }],
    )
}

/// A GRUB menu: the six entries of the first image at the top (its
/// default starts after the timeout), every other image in a submenu.
pub fn menu(o: &IsoOptions, header: &str, images: &[MenuImage]) -> Result<String> {
    let Some(def) = ENTRIES.iter().position(|e| e.0 == o.default) else {
        bail!(
            "iso_default = {:?} is not one of automatic, manual, shell",
            o.default
        );
    };
    let serial_first = match o.console.as_str() {
        "vga" => false,
        "serial" => true,
        other => bail!("boot_console = {other:?} is not one of vga, serial"),
    };
    let mut s = String::new();
    s.push_str(&format!("# {header}\n"));
    s.push_str("serial --unit=0 --speed=115200\n");
    s.push_str("terminal_input console serial\nterminal_output console serial\n");
    s.push_str(&format!(
        "set default={}\n",
        def * 2 + serial_first as usize
    ));
    s.push_str(&format!("set timeout={}\n", o.timeout));
    s.push_str("insmod all_video\n");
    let extra = if o.cmdline.trim().is_empty() {
        String::new()
    } else {
        format!(" {}", o.cmdline.trim())
    };
    let quote = |t: &str| t.replace('\'', "");
    for (n, img) in images.iter().enumerate() {
        let indent = if n == 0 {
            ""
        } else {
            s.push_str(&format!("submenu '{}' {{\n", quote(&img.title)));
            "  "
        };
        for (_, title, arg) in ENTRIES {
            for serial in [false, true] {
                // The last console= is /dev/console: the shell and messages go there.
                let (mut t, consoles) = if serial {
                    (
                        format!("{title} (serial console)"),
                        "console=tty0 console=ttyS0,115200n8",
                    )
                } else {
                    (title.to_string(), "console=ttyS0,115200n8 console=tty0")
                };
                if !img.title.is_empty() {
                    t = format!("{t} - {}", img.title);
                }
                s.push_str(&format!(
                    "{indent}menuentry '{}' {{\n{indent}  linux {} {arg} {consoles}{extra}\n{indent}  initrd {}\n{indent}}}\n",
                    quote(&t),
                    img.kernel,
                    img.initrd
                ));
            }
        }
        if n > 0 {
            s.push_str("}\n");
        }
    }
    Ok(s)
}

/// The programs an ISO is made with; checked before the image is built.
pub fn check_tools() -> Result<()> {
    for (tool, pkg) in [
        ("grub-mkrescue", "grub-common"),
        ("xorriso", "xorriso"),
        ("mformat", "mtools"),
    ] {
        if crate::elf::find_in_path(Path::new("/"), tool).is_none() {
            bail!("OUTPUT = \"ISO\" needs {tool} (apt-get install {pkg})");
        }
    }
    Ok(())
}

/// Which GRUB platforms this system can put on the ISO.
pub fn platforms(grub_lib: &Path) -> Vec<&'static str> {
    ["i386-pc", "x86_64-efi"]
        .into_iter()
        .filter(|p| grub_lib.join(p).join("modinfo.sh").is_file())
        .collect()
}

/// Write `iso` from the kernel and initrd in `dir` (a rescue output
/// directory). Returns the warnings.
pub fn write(
    dir: &Path,
    kernel: &str,
    initrd: &str,
    iso: &Path,
    o: &IsoOptions,
    maps: &[(PathBuf, String)],
) -> Result<Vec<String>> {
    if o.label.is_empty() || o.label.len() > 32 {
        bail!(
            "iso_volid = {:?}: an ISO volume label has 1 to 32 characters",
            o.label
        );
    }
    let mut warnings = Vec::new();
    check_tools()?;
    let grub_lib = Path::new("/usr/lib/grub");
    let plats = platforms(grub_lib);
    if plats.is_empty() {
        bail!("OUTPUT = \"ISO\" needs GRUB's platform files: /usr/lib/grub/i386-pc (grub-pc-bin) for BIOS and/or /usr/lib/grub/x86_64-efi (grub-efi-amd64-bin) for UEFI");
    }
    if !plats.contains(&"i386-pc") {
        warnings.push("the ISO boots only with UEFI: /usr/lib/grub/i386-pc is missing (apt-get install grub-pc-bin)".into());
    }
    if !plats.contains(&"x86_64-efi") {
        warnings.push("the ISO boots only with BIOS: /usr/lib/grub/x86_64-efi is missing (apt-get install grub-efi-amd64-bin)".into());
    }
    let stage = tempfile::Builder::new()
        .prefix(".iso-stage-")
        .tempdir_in(dir)
        .with_context(|| format!("cannot make a staging directory in {}", dir.display()))?;
    let boot = stage.path().join("boot");
    std::fs::create_dir_all(boot.join("grub"))?;
    for f in [kernel, initrd] {
        // Hard links when possible: the staging tree is only read.
        let (src, dst) = (dir.join(f), boot.join(f));
        if std::fs::hard_link(&src, &dst).is_err() {
            std::fs::copy(&src, &dst)
                .with_context(|| format!("cannot copy {} for the ISO", src.display()))?;
        }
    }
    std::fs::write(boot.join("grub/grub.cfg"), grub_cfg(o, kernel, initrd)?)?;
    let tmp: PathBuf = iso.with_extension("iso.part");
    let mut c = Command::new("grub-mkrescue");
    c.arg("-o").arg(&tmp);
    // Without --directory grub-mkrescue puts every platform under
    // /usr/lib/grub on the ISO (one --directory would limit it to one).
    c.arg(stage.path()).args(["--", "-volid", &o.label]);
    // Extra files (an iso:// backup), grafted without copying.
    for (src, dst) in maps {
        c.arg("-map").arg(src).arg(dst);
    }
    c
        // Reproducible: fixed dates from SOURCE_DATE_EPOCH when set.
        .env("LC_ALL", "C");
    let out = c.output().context("cannot run grub-mkrescue")?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "grub-mkrescue failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    std::fs::rename(&tmp, iso).with_context(|| format!("cannot write {}", iso.display()))?;
    Ok(warnings)
}

/// `BACKUP_URL = "iso:///backup"`: the directory on the ISO (default `backup`).
pub fn url_dir(url: &str) -> Option<String> {
    let rest = url.strip_prefix("iso://")?;
    let d = rest.trim_matches('/');
    Some(if d.is_empty() {
        "backup".into()
    } else {
        d.into()
    })
}

/// Volume label of medium `n` (1-based) of a set labelled `volid`.
pub fn media_label(volid: &str, n: usize) -> String {
    if n <= 1 {
        volid.to_string()
    } else {
        format!("{volid}_{n:02}")
    }
}

/// Make a data-only ISO (no boot images) `out` labelled `label`, with
/// each `(source, path on the ISO)` of `maps`.
pub fn write_data(out: &Path, label: &str, maps: &[(PathBuf, String)]) -> Result<()> {
    let tmp = out.with_extension("iso.part");
    let _ = std::fs::remove_file(&tmp);
    let mut c = Command::new("xorriso");
    c.arg("-outdev").arg(&tmp).args(["-volid", label]);
    for (src, dst) in maps {
        c.arg("-map").arg(src).arg(dst);
    }
    let o = c
        .output()
        .context("cannot run xorriso (apt-get install xorriso)")?;
    if !o.status.success() {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "xorriso could not write {}: {}",
            out.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}

/// Which files of an `iso://` backup (paths relative to `stage`) go on
/// which medium: the manifest and everything that is not a volume on the
/// first with the rescue system (`first_used` bytes), volumes in order
/// while they fit, then further media of `max` bytes each.
pub fn split_media(
    files: &[(String, u64)],
    first_used: u64,
    max: Option<u64>,
) -> Result<Vec<Vec<String>>> {
    let Some(max) = max else {
        return Ok(vec![files.iter().map(|f| f.0.clone()).collect()]);
    };
    // ISO 9660 metadata, rounding to 2 KiB blocks, and a margin.
    let room = |used: u64| max.saturating_sub(used + (4 << 20));
    let is_volume = |f: &str| f.contains(".tar");
    let mut media: Vec<Vec<String>> = vec![vec![]];
    let mut used = first_used;
    for (f, n) in files.iter().filter(|f| !is_volume(&f.0)) {
        media[0].push(f.clone());
        used += n.div_ceil(2048) * 2048;
    }
    if used > room(0) {
        bail!(
            "ISO_MAX_SIZE = {} MiB cannot hold the rescue system and the backup manifest ({} MiB)",
            max >> 20,
            used >> 20
        );
    }
    for (f, n) in files.iter().filter(|f| is_volume(&f.0)) {
        let n = n.div_ceil(2048) * 2048;
        if n > room(0) {
            bail!(
                "the backup volume {f} has {} MiB, more than fits an ISO of ISO_MAX_SIZE = {} MiB: \
                 set a smaller backup_volume_size",
                n >> 20,
                max >> 20
            );
        }
        if used + n > room(0) {
            media.push(vec![]);
            used = 0;
        }
        media.last_mut().unwrap().push(f.clone());
        used += n;
    }
    Ok(media)
}

/// Mount (read-only) every attached ISO 9660 filesystem of the set
/// labelled `volid` (`volid`, `volid_02`, ...) below /run/lifeboat/iso.
/// Returns (label, mount point) in label order.
pub fn mount_media(volid: &str) -> Result<Vec<(String, PathBuf)>> {
    let out = Command::new("blkid")
        .args(["-c", "/dev/null", "-t", "TYPE=iso9660", "-o", "device"])
        .output()
        .context("cannot run blkid")?;
    let mut found: Vec<(String, String)> = Vec::new();
    for dev in String::from_utf8_lossy(&out.stdout).lines() {
        let l = Command::new("blkid")
            .args(["-c", "/dev/null", "-s", "LABEL", "-o", "value", dev])
            .output()
            .context("cannot run blkid")?;
        let label = String::from_utf8_lossy(&l.stdout).trim().to_string();
        let ours = label == volid
            || label
                .strip_prefix(volid)
                .and_then(|r| r.strip_prefix('_'))
                .is_some_and(|n| n.len() == 2 && n.chars().all(|c| c.is_ascii_digit()));
        if ours && !found.iter().any(|(l, _)| *l == label) {
            found.push((label, dev.to_string()));
        }
    }
    found.sort();
    let mut v = Vec::new();
    for (label, dev) in found {
        let m = Path::new("/run/lifeboat/iso").join(&label);
        std::fs::create_dir_all(&m)?;
        let st = Command::new("mount")
            .args(["-t", "iso9660", "-o", "ro", &dev])
            .arg(&m)
            .status()
            .context("cannot run mount")?;
        if !st.success() {
            bail!("cannot mount the ISO {label} ({dev}) at {}", m.display());
        }
        v.push((label, m));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_split_keeps_the_manifest_first_and_volumes_whole() {
        const M: u64 = 1 << 20;
        let files = vec![
            ("h/backup.json".to_string(), 2000),
            ("h/s1/root.tar.zst.000".to_string(), 40 * M),
            ("h/s1/root.tar.zst.001".to_string(), 40 * M),
            ("h/s1/root.tar.zst.002".to_string(), 10 * M),
            ("h/s1/root.snar".to_string(), 3000),
        ];
        let all = split_media(&files, 30 * M, None).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].len(), 5);
        // 100 MiB media, 30 MiB of rescue system on the first.
        let m = split_media(&files, 30 * M, Some(100 * M)).unwrap();
        assert_eq!(
            m,
            vec![
                vec![
                    "h/backup.json".to_string(),
                    "h/s1/root.snar".into(),
                    "h/s1/root.tar.zst.000".into()
                ],
                vec![
                    "h/s1/root.tar.zst.001".to_string(),
                    "h/s1/root.tar.zst.002".into()
                ],
            ]
        );
        let e = split_media(&files, 30 * M, Some(40 * M))
            .unwrap_err()
            .to_string();
        assert!(e.contains("backup_volume_size"), "{e}");
        assert_eq!(url_dir("iso:///backup").as_deref(), Some("backup"));
        assert_eq!(url_dir("iso://").as_deref(), Some("backup"));
        assert_eq!(url_dir("iso:///x/y/").as_deref(), Some("x/y"));
        assert_eq!(media_label("LB", 1), "LB");
        assert_eq!(media_label("LB", 2), "LB_02");
    }

    #[test]
    fn menu_has_every_entry_twice_and_the_right_default() {
        let o = IsoOptions {
            label: "LIFEBOAT".into(),
            default: "shell".into(),
            console: "serial".into(),
            timeout: 3,
            cmdline: "quiet".into(),
        };
        let c = grub_cfg(&o, "vmlinuz-6.1", "initrd.img").unwrap();
        assert_eq!(c.matches("menuentry").count(), 6);
        assert!(
            c.contains("set default=5\n") && c.contains("set timeout=3\n"),
            "{c}"
        );
        assert!(c.contains(
            "linux /boot/vmlinuz-6.1 lifeboat.recover=no console=tty0 console=ttyS0,115200n8 quiet"
        ));
        assert!(c.contains("linux /boot/vmlinuz-6.1 lifeboat.recover=auto console=ttyS0,115200n8 console=tty0 quiet"));
        let bad = IsoOptions {
            default: "boot".into(),
            ..o.clone()
        };
        assert!(grub_cfg(&bad, "k", "i")
            .unwrap_err()
            .to_string()
            .contains("automatic, manual, shell"));
        let bad = IsoOptions {
            console: "lpt".into(),
            ..o
        };
        assert!(grub_cfg(&bad, "k", "i").is_err());
    }
}
