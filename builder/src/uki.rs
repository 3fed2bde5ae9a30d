//! `OUTPUT = "UKI"`: a unified kernel image — systemd-boot's EFI stub with
//! the kernel (`.linux`), the whole initrd (`.initrd`), the command line
//! (`.cmdline`) and an os-release (`.osrel`) as PE sections, so any UEFI
//! firmware (or boot manager) starts the rescue system from one file.
//! The sections are added by objcopy at addresses after the stub's own
//! (read from its PE headers); with `uki_sign_key`/`uki_sign_cert` the
//! result is signed for Secure Boot with sbsign.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where Debian's `systemd-boot-efi` puts the stub.
pub const STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";

/// The first free virtual address after the stub's sections (relative to
/// its image base), aligned to its section alignment; and the image base.
pub fn stub_end(stub: &[u8]) -> Result<(u64, u64, u64)> {
    let pe = goblin::pe::PE::parse(stub).context("the EFI stub is not a PE image")?;
    let oh = pe
        .header
        .optional_header
        .context("the EFI stub has no optional header")?;
    let align = u64::from(oh.windows_fields.section_alignment).max(512);
    let end = pe
        .sections
        .iter()
        .map(|s| u64::from(s.virtual_address) + u64::from(s.virtual_size.max(s.size_of_raw_data)))
        .max()
        .unwrap_or(0);
    Ok((pe.image_base as u64, end.div_ceil(align) * align, align))
}

/// The `.osrel` section: who this is, for boot menus.
pub fn os_release(host: &str) -> String {
    format!(
        "NAME=\"Lifeboat\"\nID=lifeboat\nPRETTY_NAME=\"Lifeboat rescue system of {host}\"\nVERSION_ID=\"{}\"\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// Write the UKI `out` from the kernel and initrd in `dir`.
pub fn write(
    dir: &Path,
    kernel: &str,
    initrd: &str,
    cmdline: &str,
    host: &str,
    out: &Path,
    sign: Option<(&Path, &Path)>,
) -> Result<PathBuf> {
    let stub_path = Path::new(STUB);
    let stub = std::fs::read(stub_path).with_context(|| {
        format!("OUTPUT = \"UKI\" needs systemd-boot's EFI stub {STUB} (apt-get install systemd-boot-efi)")
    })?;
    if crate::elf::find_in_path(Path::new("/"), "objcopy").is_none() {
        bail!("OUTPUT = \"UKI\" needs objcopy (apt-get install binutils)");
    }
    let (base, mut off, align) = stub_end(&stub)?;
    let work = tempfile::Builder::new()
        .prefix(".uki-stage-")
        .tempdir_in(dir)
        .with_context(|| format!("cannot make a staging directory in {}", dir.display()))?;
    let osrel = work.path().join("osrel");
    std::fs::write(&osrel, os_release(host))?;
    let cmd = work.path().join("cmdline");
    std::fs::write(&cmd, cmdline.trim())?;
    let mut c = Command::new("objcopy");
    for (name, file) in [
        (".osrel", osrel),
        (".cmdline", cmd),
        (".linux", dir.join(kernel)),
        (".initrd", dir.join(initrd)),
    ] {
        let len = std::fs::metadata(&file)
            .with_context(|| format!("cannot read {}", file.display()))?
            .len();
        c.arg("--add-section")
            .arg(format!("{name}={}", file.display()))
            .arg("--change-section-vma")
            .arg(format!("{name}={:#x}", base + off));
        off += len.div_ceil(align) * align;
    }
    let unsigned = work.path().join("unsigned.efi");
    c.arg(stub_path).arg(&unsigned);
    let o = c.output().context("cannot run objcopy")?;
    if !o.status.success() {
        bail!(
            "objcopy could not assemble the UKI: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    let tmp = out.with_extension("efi.part");
    match sign {
        Some((key, cert)) => {
            let o = Command::new("sbsign")
                .arg("--key")
                .arg(key)
                .arg("--cert")
                .arg(cert)
                .arg("--output")
                .arg(&tmp)
                .arg(&unsigned)
                .output()
                .context("cannot run sbsign (apt-get install sbsigntool)")?;
            if !o.status.success() {
                bail!(
                    "sbsign could not sign the UKI with uki_sign_key {} and uki_sign_cert {}: {}",
                    key.display(),
                    cert.display(),
                    String::from_utf8_lossy(&o.stderr).trim()
                );
            }
        }
        None => {
            std::fs::rename(&unsigned, &tmp)?;
        }
    }
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(out.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_go_after_the_stub() {
        let Ok(stub) = std::fs::read(STUB) else {
            panic!("{STUB} missing: apt-get install systemd-boot-efi (scripts/setup.sh)");
        };
        let (base, end, align) = stub_end(&stub).unwrap();
        assert!(align >= 512 && end % align == 0);
        let pe = goblin::pe::PE::parse(&stub).unwrap();
        assert_eq!(base, pe.image_base as u64);
        for s in &pe.sections {
            assert!(u64::from(s.virtual_address) + u64::from(s.virtual_size) <= end);
        }
        assert!(os_release("db1").contains("PRETTY_NAME=\"Lifeboat rescue system of db1\""));
    }
}
