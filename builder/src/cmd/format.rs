//! `lifeboat format`: prepare a USB stick (or a stick image file) for
//! `OUTPUT = "USB"` and `usb://` backups: a GPT with a BIOS boot partition,
//! an EFI system partition and an ext4 data partition labelled
//! `LIFEBOAT-000`, GRUB for BIOS and UEFI (see `bootdisk`).

use crate::bootdisk;
use crate::Global;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The whole device (e.g. /dev/sdb), or an image file.
    pub device: PathBuf,
    /// Do not ask for confirmation.
    #[arg(short = 'y', long)]
    pub yes: bool,
    /// Label of the data partition's filesystem.
    #[arg(long, default_value = "LIFEBOAT-000")]
    pub label: String,
    /// Size of a new image file (e.g. 2G, 512M); files only.
    #[arg(long, value_name = "SIZE")]
    pub size: Option<String>,
    /// Make every check (in use, size), say what would be erased and
    /// written, and write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `2G`, `512M`, `1048576` → bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    crate::backup::parse_size(s).with_context(|| format!("--size {s:?}"))
}

/// The block device's kernel name (`sdb`); a partition is refused.
fn block_name(dev: &Path) -> Result<String> {
    let real = std::fs::canonicalize(dev)?;
    let name = real
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .to_string();
    let sys = Path::new("/sys/class/block").join(&name);
    if sys.join("partition").exists() {
        let whole = std::fs::canonicalize(&sys)
            .ok()
            .and_then(|p| {
                p.parent()
                    .and_then(|d| d.file_name())
                    .map(|d| d.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| "the whole disk".into());
        bail!(
            "{} is a partition; give the whole disk (/dev/{whole}): format writes a new partition table",
            dev.display()
        );
    }
    Ok(name)
}

/// Why the block device cannot be formatted now, if it cannot: the same
/// interlocks as recovery (mounts, swap, holders, exclusive open).
pub fn in_use(dev: &Path) -> Result<Option<String>> {
    let name = block_name(dev)?;
    let sys = crate::safety::Sys::live();
    Ok(crate::safety::busy(&sys, &name).or_else(|| crate::safety::exclusive_open_fails(dev)))
}

fn describe(dev: &Path) -> String {
    let out = std::process::Command::new("lsblk")
        .args(["-dno", "SIZE,MODEL,SERIAL"])
        .arg(dev)
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => String::new(),
    }
}

pub fn run(g: &Global, a: Args) -> Result<()> {
    let meta = std::fs::metadata(&a.device);
    let is_block = meta
        .as_ref()
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    if is_block {
        if a.size.is_some() {
            bail!(
                "--size is for image files; {} is a device",
                a.device.display()
            );
        }
        if let Some(why) = in_use(&a.device)? {
            bail!("refusing to format {}: {why}", a.device.display());
        }
    } else {
        match &meta {
            Ok(m) if m.is_file() => {}
            Ok(_) => bail!(
                "{} is neither a block device nor an image file",
                a.device.display()
            ),
            Err(_) if a.size.is_none() => bail!(
                "{} does not exist; give a device, or --size to create an image file",
                a.device.display()
            ),
            Err(_) => {}
        }
        if let Some(s) = &a.size {
            let n = parse_size(s)?;
            let min = bootdisk::disk_size_for(64 << 20);
            if n < min {
                bail!(
                    "--size {s}: a Lifeboat stick needs at least {} MiB",
                    min >> 20
                );
            }
            if a.dry_run {
                println!(
                    "dry run: would create the image file {} of {} MiB and format it with label {}; nothing was written",
                    a.device.display(),
                    n >> 20,
                    a.label
                );
                return Ok(());
            }
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&a.device)
                .and_then(|f| f.set_len(n))
                .with_context(|| format!("cannot create {}", a.device.display()))?;
        }
    }
    let size = if is_block {
        let f = std::fs::File::open(&a.device)?;
        use std::io::Seek;
        let mut f = f;
        f.seek(std::io::SeekFrom::End(0))?
    } else {
        std::fs::metadata(&a.device)?.len()
    };
    let min = bootdisk::disk_size_for(64 << 20);
    if size < min {
        bail!(
            "{} has {} MiB; a Lifeboat stick needs at least {} MiB",
            a.device.display(),
            size >> 20,
            min >> 20
        );
    }
    if a.dry_run {
        println!(
            "dry run: would erase {} ({}) and write a GPT with a BIOS boot partition, an EFI system partition \
             and an ext4 data partition labelled {}, with GRUB for BIOS and UEFI; nothing was written",
            a.device.display(),
            if is_block {
                describe(&a.device)
            } else {
                format!("image file, {} MiB", size >> 20)
            },
            a.label
        );
        return Ok(());
    }
    if !a.yes {
        if !std::io::stdin().is_terminal() {
            bail!(
                "formatting {} erases it; confirm with --yes (not on a terminal, so nobody can be asked)",
                a.device.display()
            );
        }
        eprint!(
            "Everything on {} ({}) will be erased.\nType YES to continue: ",
            a.device.display(),
            if is_block {
                describe(&a.device)
            } else {
                format!("image file, {} MiB", size >> 20)
            }
        );
        std::io::stderr().flush().ok();
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        if line.trim() != "YES" {
            bail!("not confirmed; {} is unchanged", a.device.display());
        }
    }
    let stage = tempfile::tempdir()?;
    let uuid = bootdisk::new_uuid()?;
    bootdisk::stage_empty(stage.path(), &a.label, &uuid)?;
    bootdisk::make(&a.device, &a.label, &uuid, stage.path())?;
    if is_block {
        reread_partitions(&a.device);
    }
    if !g.quiet {
        let geo = bootdisk::geometry(&a.device)?;
        println!("{} formatted for Lifeboat:", a.device.display());
        println!(
            "  1 BIOS boot   {:>8} MiB  GRUB for BIOS",
            (geo.bios.1 * 512) >> 20
        );
        println!(
            "  2 EFI system  {:>8} MiB  FAT32, EFI/BOOT/BOOTX64.EFI",
            (geo.esp.1 * 512) >> 20
        );
        println!(
            "  3 data        {:>8} MiB  ext4, label {}, UUID {uuid}",
            (geo.data.1 * 512) >> 20,
            a.label
        );
        println!(
            "Use it with OUTPUT = \"USB\", OUTPUT_URL = \"usb://{0}\" (and BACKUP_URL = \"usb://{0}\").",
            a.label
        );
    }
    Ok(())
}

/// Ask the kernel to read the new partition table (BLKRRPART).
fn reread_partitions(dev: &Path) {
    const BLKRRPART: libc::c_ulong = 0x125f;
    if let Ok(f) = std::fs::File::open(dev) {
        use std::os::fd::AsRawFd;
        // SAFETY: BLKRRPART takes no argument; the fd is open.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKRRPART as _) };
        if r != 0 {
            eprintln!(
                "lifeboat: warning: the kernel did not re-read the partition table of {} ({}); replug the stick",
                dev.display(),
                std::io::Error::last_os_error()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("two").is_err());
    }
}
