//! `OUTPUT = "PXE"`: a TFTP/HTTP tree that network-boots the rescue image.
//!
//! ```text
//! lifeboat/<host>/vmlinuz, the layers, manifest.json
//! lifeboat/<host>/boot.ipxe        iPXE script (paths relative to itself)
//! pxelinux.cfg/01-<mac>            pxelinux: INITRD with every layer, IPAPPEND 2
//! boot/grub/grub.cfg-01-<mac>      GRUB network boot (grub-mknetdir's prefix)
//! pxelinux.0, ldlinux.c32          when installed here and not in the tree yet
//! ```
//!
//! The MACs are those of the host's physical NICs (network capture or
//! `network.file`) plus `pxe_macs`; without any, the configurations are
//! named `lifeboat-<host>` for the admin to link.

use crate::iso::{IsoOptions, MenuImage};
use anyhow::{bail, Context, Result};
use lifeboat_contract::Manifest;
use std::path::{Path, PathBuf};

/// What was written, for the report.
#[derive(Debug, Default)]
pub struct Written {
    pub files: Vec<PathBuf>,
    pub warnings: Vec<String>,
}

/// `52:54:00:12:34:56` → `01-52-54-00-12-34-56` (pxelinux's and GRUB's
/// name for the configuration of that NIC).
pub fn mac_name(mac: &str) -> Result<String> {
    let parts: Vec<&str> = mac.split([':', '-']).collect();
    if parts.len() != 6
        || parts
            .iter()
            .any(|p| p.len() != 2 || !p.chars().all(|c| c.is_ascii_hexdigit()))
    {
        bail!("{mac:?} is not a MAC address like 52:54:00:12:34:56 (pxe_macs)");
    }
    Ok(format!("01-{}", parts.join("-").to_ascii_lowercase()))
}

/// (label, title, kernel arguments) of one menu entry.
pub type Entry = (String, String, String);

/// The six entries, and the default's label.
pub fn entries(o: &IsoOptions) -> Result<(Vec<Entry>, String)> {
    // The ISO menu checks the same settings; its errors name them.
    crate::iso::grub_cfg(o, "k", "i")?;
    let extra = if o.cmdline.trim().is_empty() {
        String::new()
    } else {
        format!(" {}", o.cmdline.trim())
    };
    let mut v = Vec::new();
    for (key, title, arg) in crate::iso::ENTRIES {
        v.push((
            key.to_string(),
            title.to_string(),
            format!("{arg} console=ttyS0,115200n8 console=tty0{extra}"),
        ));
        v.push((
            format!("{key}-serial"),
            format!("{title} (serial console)"),
            format!("{arg} console=tty0 console=ttyS0,115200n8{extra}"),
        ));
    }
    let def = if o.console == "serial" {
        format!("{}-serial", o.default)
    } else {
        o.default.clone()
    };
    Ok((v, def))
}

/// pxelinux configuration; paths relative to the TFTP root.
pub fn pxelinux_cfg(o: &IsoOptions, host: &str, kernel: &str, layers: &[String]) -> Result<String> {
    let (es, def) = entries(o)?;
    let mut s = format!("# Lifeboat rescue image of {host}\nDEFAULT {def}\n");
    if o.timeout == 0 {
        s.push_str("PROMPT 0\n");
    } else {
        // Tenths of a second; 0 waits for a choice.
        s.push_str(&format!(
            "PROMPT 1\nTIMEOUT {}\n",
            if o.timeout < 0 { 0 } else { o.timeout * 10 }
        ));
    }
    s.push_str(&format!(
        "SAY Lifeboat rescue image of {host}: {}\n",
        es.iter()
            .map(|e| e.0.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    for (label, title, args) in &es {
        s.push_str(&format!(
            "LABEL {label}\n  MENU LABEL {title}\n  KERNEL {kernel}\n  INITRD {}\n  APPEND {args}\n  IPAPPEND 2\n",
            layers.join(",")
        ));
    }
    Ok(s)
}

/// iPXE script; paths relative to the script's own URL.
pub fn ipxe_script(o: &IsoOptions, host: &str, kernel: &str, layers: &[String]) -> Result<String> {
    let (es, def) = entries(o)?;
    let mut s = format!("#!ipxe\n# Lifeboat rescue image of {host}\n");
    if o.timeout == 0 {
        s.push_str(&format!("goto {def}\n"));
    } else {
        s.push_str(&format!("menu Lifeboat rescue image of {host}\n"));
        for (label, title, _) in &es {
            s.push_str(&format!("item {label} {title}\n"));
        }
        let t = if o.timeout < 0 {
            String::new()
        } else {
            format!(" --timeout {}", o.timeout * 1000)
        };
        s.push_str(&format!(
            "choose --default {def}{t} entry || goto {def}\ngoto ${{entry}}\n"
        ));
    }
    for (label, _, args) in &es {
        s.push_str(&format!(":{label}\nset args {args}\ngoto boot\n"));
    }
    s.push_str(&format!(":boot\nkernel {kernel} ${{args}}\n"));
    for l in layers {
        s.push_str(&format!("initrd {l}\n"));
    }
    s.push_str("boot\n");
    Ok(s)
}

fn write(path: &Path, text: &str, w: &mut Written) -> Result<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    w.files.push(path.to_path_buf());
    Ok(())
}

/// Lay out the tree in `tree` from the image built in `built`.
pub fn write_tree(
    built: &Path,
    m: &Manifest,
    tree: &Path,
    host: &str,
    o: &IsoOptions,
    macs: &[String],
) -> Result<Written> {
    let mut w = Written::default();
    let rel = format!("lifeboat/{host}");
    let dir = tree.join(&rel);
    // A fresh directory for this host: stale layers of an older build go.
    let part = tree.join(format!("lifeboat/.{host}.part"));
    let _ = std::fs::remove_dir_all(&part);
    let mut names: Vec<&str> = vec![&m.kernel, "manifest.json"];
    names.extend(m.layers.iter().map(|l| l.file.as_str()));
    crate::bootdisk::link_files(built, &part, &names)?;
    let layer_files: Vec<String> = m.layers.iter().map(|l| l.file.clone()).collect();
    std::fs::write(
        part.join("boot.ipxe"),
        ipxe_script(o, host, &m.kernel, &layer_files)?,
    )?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot replace {}", dir.display()))?;
    }
    std::fs::rename(&part, &dir).with_context(|| format!("cannot write {}", dir.display()))?;
    for n in names.iter().chain(std::iter::once(&"boot.ipxe")) {
        w.files.push(dir.join(n));
    }
    let in_tree: Vec<String> = layer_files.iter().map(|l| format!("{rel}/{l}")).collect();
    let pxelinux = pxelinux_cfg(o, host, &format!("{rel}/{}", m.kernel), &in_tree)?;
    let grub = crate::iso::menu(
        o,
        &format!("Lifeboat rescue image of {host} (network boot)"),
        &[MenuImage {
            title: String::new(),
            kernel: format!("/{rel}/{}", m.kernel),
            initrd: in_tree
                .iter()
                .map(|l| format!("/{l}"))
                .collect::<Vec<_>>()
                .join(" "),
        }],
    )?;
    let mut names = Vec::new();
    for mac in macs {
        names.push(mac_name(mac)?);
    }
    names.sort();
    names.dedup();
    if names.is_empty() {
        names.push(format!("lifeboat-{host}"));
        w.warnings.push(format!(
            "no MAC address known (network capture off and pxe_macs empty): link pxelinux.cfg/lifeboat-{host} \
             and boot/grub/grub.cfg-lifeboat-{host} to 01-<mac> of the machine yourself"
        ));
    }
    for n in &names {
        write(&tree.join("pxelinux.cfg").join(n), &pxelinux, &mut w)?;
        write(
            &tree.join("boot/grub").join(format!("grub.cfg-{n}")),
            &grub,
            &mut w,
        )?;
    }
    // The boot loader itself, when this system has it and the tree not yet
    // (an existing one is the admin's: its ldlinux.c32 must match it).
    let pxelinux0 = Path::new("/usr/lib/PXELINUX/pxelinux.0");
    let ldlinux = Path::new("/usr/lib/syslinux/modules/bios/ldlinux.c32");
    if !tree.join("pxelinux.0").exists() && !tree.join("ldlinux.c32").exists() {
        if pxelinux0.is_file() && ldlinux.is_file() {
            for f in [pxelinux0, ldlinux] {
                let d = tree.join(f.file_name().unwrap());
                std::fs::copy(f, &d).with_context(|| format!("cannot copy {}", f.display()))?;
                w.files.push(d);
            }
        } else {
            w.warnings.push(
                "pxelinux.0 is not installed here (apt-get install pxelinux syslinux-common); the tree has \
                 only the configurations — use your TFTP server's pxelinux.0, or iPXE with boot.ipxe"
                    .into(),
            );
        }
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o() -> IsoOptions {
        IsoOptions {
            label: "L".into(),
            default: "automatic".into(),
            console: "serial".into(),
            timeout: 3,
            cmdline: "quiet".into(),
        }
    }

    #[test]
    fn mac_names() {
        assert_eq!(
            mac_name("52:54:00:AB:cd:0F").unwrap(),
            "01-52-54-00-ab-cd-0f"
        );
        assert_eq!(
            mac_name("52-54-00-ab-cd-0f").unwrap(),
            "01-52-54-00-ab-cd-0f"
        );
        assert!(mac_name("52:54:00:ab:cd").is_err());
        assert!(mac_name("52:54:00:ab:cd:zz").is_err());
    }

    #[test]
    fn pxelinux_lists_every_layer_and_appends_the_boot_nic() {
        let c = pxelinux_cfg(
            &o(),
            "db1",
            "lifeboat/db1/vmlinuz",
            &["a.zst".into(), "b.zst".into()],
        )
        .unwrap();
        assert!(c.contains("DEFAULT automatic-serial\n"), "{c}");
        assert!(c.contains("TIMEOUT 30\n"), "{c}");
        assert_eq!(c.matches("\nLABEL ").count(), 6);
        assert_eq!(c.matches("  INITRD a.zst,b.zst\n").count(), 6);
        assert_eq!(c.matches("IPAPPEND 2").count(), 6);
        assert!(
            c.contains("APPEND lifeboat.recover=auto console=tty0 console=ttyS0,115200n8 quiet\n")
        );
        let wait = IsoOptions { timeout: -1, ..o() };
        assert!(pxelinux_cfg(&wait, "h", "k", &[])
            .unwrap()
            .contains("TIMEOUT 0\n"));
        let bad = IsoOptions {
            default: "x".into(),
            ..o()
        };
        assert!(pxelinux_cfg(&bad, "h", "k", &[]).is_err());
    }

    #[test]
    fn ipxe_script_boots_the_default_after_the_timeout() {
        let s = ipxe_script(&o(), "db1", "vmlinuz", &["a.zst".into(), "b.zst".into()]).unwrap();
        assert!(s.starts_with("#!ipxe\n"));
        assert!(
            s.contains(
                "choose --default automatic-serial --timeout 3000 entry || goto automatic-serial\n"
            ),
            "{s}"
        );
        assert!(
            s.contains(":boot\nkernel vmlinuz ${args}\ninitrd a.zst\ninitrd b.zst\nboot\n"),
            "{s}"
        );
        let now = IsoOptions { timeout: 0, ..o() };
        let s = ipxe_script(&now, "db1", "vmlinuz", &[]).unwrap();
        assert!(
            s.contains("goto automatic-serial\n") && !s.contains("choose"),
            "{s}"
        );
    }
}
