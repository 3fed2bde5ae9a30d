//! `lifeboat rehearse`: prove that the latest rescue image and backup
//! really restore. A VM with blank scratch disks sized (and serial-numbered)
//! like the originals boots the rescue image with `lifeboat.recover=auto`,
//! recovers unattended, reboots; then the scratch disks boot through their
//! own bootloader until the recovered system reports in. Every phase is
//! timed (an RTO estimate) and a failure names its phase.
//!
//! The recovered system reports by a one-shot unit that `lifeboat recover`
//! installs only when the rescue kernel has `lifeboat.rehearse=1` (never on
//! a real recovery): it writes a line to a small extra disk (serial
//! `LBPROBE`), removes itself and powers off.

use anyhow::{bail, Context, Result};
use lifeboat_contract::{BackupManifest, Layout, RESCUE_BACKUP_PATH, RESCUE_LAYOUT_PATH};
use lifeboat_qemu::{BootSpec, Vm};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The probe disk's serial and what the recovered system writes there.
pub const PROBE_SERIAL: &str = "LBPROBE";
pub const PROBE_MARK: &str = "LIFEBOAT-REHEARSAL-BOOTED";
/// The boot option that makes `lifeboat recover` install the probe unit.
pub const REHEARSE_OPTION: &str = "lifeboat.rehearse=1";

/// How the rehearsal is run.
pub struct Options {
    /// Directory of the rescue image (manifest.json, kernel, initrd.img).
    pub image: PathBuf,
    /// Read-only disks (files or devices) carrying the backup.
    pub backup_disks: Vec<PathBuf>,
    /// Scratch directory (disks, console logs).
    pub work: PathBuf,
    pub memory_mb: u32,
    /// Give up on the recovery after this long.
    pub recovery_timeout: Duration,
    /// Give up on the recovered system's boot after this long.
    pub boot_timeout: Duration,
    /// `tcg`, `kvm` or `auto` (KVM when it starts a guest, else TCG).
    pub accel: String,
    /// Extra kernel command line for the rescue boot.
    pub append: String,
    /// Progress lines on stderr.
    pub progress: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: String,
    pub seconds: f64,
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub ok: bool,
    pub hostname: String,
    pub backup: String,
    pub image: String,
    pub accel: String,
    pub phases: Vec<Phase>,
    /// Sum of the phases: the recovery time this machine would need.
    pub rto_seconds: f64,
    pub failed_phase: Option<String>,
    pub message: Option<String>,
    /// Console logs and scratch disks.
    pub work: String,
}

impl Report {
    pub fn text(&self) -> String {
        let mut t = format!(
            "rehearsal of {} (backup {}, image {}, {}):\n",
            self.hostname,
            self.backup,
            self.image,
            self.accel.to_uppercase()
        );
        for p in &self.phases {
            t.push_str(&format!(
                "  {:<14} {:>8.1} s  {}\n",
                p.name,
                p.seconds,
                if p.ok { "ok" } else { "FAILED" }
            ));
        }
        t.push_str(&format!(
            "  {:<14} {:>8.1} s  (recovery time estimate{})\n",
            "total",
            self.rto_seconds,
            if self.accel == "tcg" {
                "; TCG emulation is several times slower than real hardware"
            } else {
                ""
            }
        ));
        match (&self.failed_phase, &self.message) {
            (Some(p), m) => t.push_str(&format!(
                "FAIL in phase {p}: {}\nlogs: {}\n",
                m.as_deref().unwrap_or(""),
                self.work
            )),
            (None, _) => t.push_str("PASS: the backup restores and the recovered system boots\n"),
        }
        t
    }
}

/// What the rescue image carries: its layout, backup and configuration.
struct Plan {
    layout: Layout,
    backup: BackupManifest,
    kernel: PathBuf,
    initrd: PathBuf,
    cmdline: String,
}

fn read_plan(image: &Path, work: &Path) -> Result<Plan> {
    let m = crate::image::load_manifest(image).with_context(|| {
        format!(
            "{} is not a rescue image directory (no valid manifest.json); give --image DIR",
            image.display()
        )
    })?;
    if !m.layers.iter().any(|l| l.name == "plan") {
        bail!(
            "the rescue image in {} carries no recovery plan (made by mkrescue --generic or without a backup); \
             run `lifeboat mkbackup` first",
            image.display()
        );
    }
    let dest = work.join("plan");
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::create_dir_all(&dest)?;
    crate::image::unpack(image, &dest, Some("plan"))?;
    let read = |p: &str| {
        std::fs::read_to_string(dest.join(p)).with_context(|| {
            format!(
                "the rescue image has no {p}: it was not made by mkbackup; run `lifeboat mkbackup`"
            )
        })
    };
    let layout = Layout::from_json(&read(RESCUE_LAYOUT_PATH)?)?;
    let backup = BackupManifest::from_json(&read(RESCUE_BACKUP_PATH)?)?;
    let cmdline = std::fs::read_to_string(dest.join("etc/lifeboat/lifeboat.toml"))
        .ok()
        .and_then(|t| toml::from_str::<crate::config::Config>(&t).ok())
        .map(|c| c.kernel_cmdline)
        .unwrap_or_default();
    Ok(Plan {
        layout,
        backup,
        kernel: image.join(&m.kernel),
        initrd: image.join(&m.initrd),
        cmdline,
    })
}

/// Does KVM start a guest here? (On some machines /dev/kvm exists but the
/// guest hangs right after the BIOS.) Boots the kernel for a few seconds.
fn kvm_works(kernel: &Path, initrd: &Path, work: &Path) -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return false;
    }
    std::env::set_var("LIFEBOAT_QEMU_ACCEL", "kvm");
    let spec = BootSpec {
        append: "console=ttyS0 lifeboat.probe-kvm".into(),
        memory_mb: 512,
        log: Some(work.join("kvm-probe.log")),
        ..BootSpec::new(kernel, initrd)
    };
    let ok = match Vm::boot(&spec) {
        Ok(mut vm) => vm
            .wait_for("Linux version", Duration::from_secs(20))
            .is_ok(),
        Err(_) => false,
    };
    std::env::remove_var("LIFEBOAT_QEMU_ACCEL");
    ok
}

/// The phase markers of the rescue console, in order: (phase that ends
/// when the text appears, text).
const MARKERS: &[(&str, &str)] = &[
    ("rescue boot", "lifeboat: recover: "),
    ("pre-flight", "lifeboat: recover: recreating disks"),
    ("disks", "lifeboat: recover: restoring"),
    ("restore", "lifeboat: recover: finalizing"),
    ("finalize", "rebooting into the recovered system"),
];

/// Lines of `console` after `from` that say what went wrong.
fn error_lines(console: &str, from: usize) -> String {
    let v: Vec<&str> = console[from.min(console.len())..]
        .lines()
        .map(str::trim)
        .filter(|l| {
            let lo = l.to_ascii_lowercase();
            lo.contains("error") || lo.contains("failed") || lo.contains("cannot")
        })
        .take(8)
        .collect();
    v.join(" | ")
}

pub fn run(o: &Options) -> Result<Report> {
    std::fs::create_dir_all(&o.work)
        .with_context(|| format!("cannot create the work directory {}", o.work.display()))?;
    for f in ["qemu-system-x86_64", "qemu-img"] {
        if crate::elf::find_in_path(Path::new("/"), f).is_none() {
            bail!("{f} is not installed; rehearse needs QEMU (Debian: apt-get install qemu-system-x86 qemu-utils)");
        }
    }
    let plan = read_plan(&o.image, &o.work)?;
    let say = |s: &str| {
        if o.progress {
            eprintln!("rehearse: {s}");
        }
    };
    // Where the backup is: the rescue reaches network locations itself
    // (QEMU's user network); a local one must be attached.
    let url = &plan.backup.url;
    let network = [
        "nfs://", "cifs://", "http://", "https://", "sftp://", "rsync://",
    ]
    .iter()
    .any(|p| url.starts_with(p))
        || plan.backup.method != "tar";
    if !network && o.backup_disks.is_empty() {
        let loc = plan
            .backup
            .location
            .as_ref()
            .map(|l| {
                format!(
                    "the filesystem {} (label {}, UUID {})",
                    l.mountpoint,
                    l.label.as_deref().unwrap_or("-"),
                    l.uuid.as_deref().unwrap_or("-")
                )
            })
            .unwrap_or_else(|| url.clone());
        bail!(
            "the backup is on {loc}: attach the disk (or image file) that holds it with --backup-disk DEV|FILE \
             (it is attached read-only)"
        );
    }
    for d in &o.backup_disks {
        if !d.exists() {
            bail!("--backup-disk {}: no such file or device", d.display());
        }
    }
    let accel = match o.accel.as_str() {
        "kvm" | "tcg" => o.accel.clone(),
        "auto" => {
            if kvm_works(&plan.kernel, &plan.initrd, &o.work) {
                "kvm".into()
            } else {
                say("KVM is not usable here (or did not start a guest in 20 s): using TCG emulation");
                "tcg".into()
            }
        }
        a => bail!("--accel {a}: use auto, kvm or tcg"),
    };
    std::env::set_var("LIFEBOAT_QEMU_ACCEL", &accel);

    // Scratch disks like the originals; the one with the bootloader first.
    let mut disks = crate::migrate::disks_in_use(&plan.layout);
    let boot_disk = plan.layout.bootloader.grub_bios_disks.first().cloned();
    disks.sort_by_key(|d| Some(&d.path) != boot_disk.as_ref());
    if disks.is_empty() {
        bail!("the layout in the rescue image has no disk in use; nothing to rehearse");
    }
    let mut scratch = Vec::new();
    for (k, d) in disks.iter().enumerate() {
        let f = o.work.join(format!("disk{k}.raw"));
        let _ = std::fs::remove_file(&f);
        let file = std::fs::File::create(&f)
            .with_context(|| format!("cannot create the scratch disk {}", f.display()))?;
        file.set_len(d.size_bytes)?;
        // virtio-blk serials hold at most 20 bytes.
        let serial: Option<String> = d.serial.as_ref().map(|s| {
            s.chars()
                .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
                .take(20)
                .collect()
        });
        say(&format!(
            "scratch disk {} for {} ({}, serial {})",
            f.display(),
            d.path,
            crate::migrate::human(d.size_bytes),
            serial.as_deref().unwrap_or("-")
        ));
        scratch.push((f, serial));
    }
    let probe = o.work.join("probe.raw");
    std::fs::write(&probe, vec![0u8; 1 << 20])?;
    let uefi = plan.layout.bootloader.grub_bios_disks.is_empty()
        && (plan.layout.bootloader.uefi || !plan.layout.bootloader.esps.is_empty());
    let vars = if uefi {
        Some(lifeboat_qemu::ovmf_vars_copy()?)
    } else {
        None
    };
    let attach = |mut spec: BootSpec| {
        for (f, s) in &scratch {
            spec = spec.with_disk(f, "raw", s.as_deref());
        }
        spec
    };

    let mut report = Report {
        ok: false,
        hostname: plan.layout.hostname.clone(),
        backup: plan.backup.id.clone(),
        image: o.image.display().to_string(),
        accel: accel.clone(),
        phases: vec![],
        rto_seconds: 0.0,
        failed_phase: None,
        message: None,
        work: o.work.display().to_string(),
    };
    let finish = |mut r: Report| {
        r.rto_seconds = r.phases.iter().map(|p| p.seconds).sum();
        r.ok = r.failed_phase.is_none();
        if let Some(v) = &vars {
            let _ = std::fs::remove_file(v);
        }
        r
    };

    // ---- Run 1: the rescue image recovers onto the scratch disks.
    let mut spec = BootSpec {
        memory_mb: o.memory_mb,
        append: format!(
            "console=ttyS0 {} lifeboat.recover=auto {REHEARSE_OPTION} {}",
            plan.cmdline, o.append
        )
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" "),
        log: Some(o.work.join("rescue-console.log")),
        uefi,
        uefi_vars: vars.clone(),
        ..BootSpec::new(&plan.kernel, &plan.initrd)
    };
    spec = attach(spec);
    for d in &o.backup_disks {
        spec = spec.with_disk(d, "raw,readonly=on", None);
    }
    if network {
        spec = spec.with_user_net("");
    }
    say(&format!("booting the rescue image ({accel})"));
    let t0 = Instant::now();
    let mut last = t0;
    let mut vm = Vm::boot(&spec).context("cannot start QEMU for the rescue boot")?;
    let mut next = 0;
    let mut phase_start_at = 0usize;
    loop {
        let c = vm.console();
        while next < MARKERS.len() {
            let Some(i) = c[phase_start_at.min(c.len())..].find(MARKERS[next].1) else {
                break;
            };
            let now = Instant::now();
            report.phases.push(Phase {
                name: MARKERS[next].0.into(),
                seconds: (now - last).as_secs_f64(),
                ok: true,
            });
            say(&format!(
                "{} done in {:.1} s",
                MARKERS[next].0,
                (now - last).as_secs_f64()
            ));
            last = now;
            phase_start_at += i;
            next += 1;
        }
        if next == MARKERS.len() {
            break;
        }
        let failed = c.contains("ERROR: ") || c.contains("Kernel panic");
        let exited = vm.wait_exit(Duration::from_millis(1)).is_ok();
        let timed_out = t0.elapsed() > o.recovery_timeout;
        if failed || exited || timed_out {
            // Give the console a moment to carry the whole message.
            std::thread::sleep(Duration::from_secs(2));
            let c = vm.console();
            report.phases.push(Phase {
                name: MARKERS[next].0.into(),
                seconds: last.elapsed().as_secs_f64(),
                ok: false,
            });
            report.failed_phase = Some(MARKERS[next].0.into());
            let why = error_lines(&c, phase_start_at);
            report.message = Some(if timed_out {
                format!(
                    "no progress within {} min{}",
                    o.recovery_timeout.as_secs() / 60,
                    if why.is_empty() {
                        String::new()
                    } else {
                        format!(": {why}")
                    }
                )
            } else if why.is_empty() {
                "the rescue system stopped (see rescue-console.log)".into()
            } else {
                why
            });
            return Ok(finish(report));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    if vm.wait_exit(Duration::from_secs(120)).is_err() {
        say("the rescue system did not reboot in 2 min; stopping it");
    }
    drop(vm);

    // ---- Run 2: the scratch disks boot through their own bootloader.
    say("booting the recovered system from its disks");
    let mut spec = BootSpec {
        memory_mb: o.memory_mb,
        log: Some(o.work.join("system-console.log")),
        uefi,
        uefi_vars: vars.clone(),
        ..BootSpec::from_disks()
    };
    spec = attach(spec).with_disk(&probe, "raw", Some(PROBE_SERIAL));
    let t1 = Instant::now();
    let mut vm = Vm::boot(&spec).context("cannot start QEMU for the system boot")?;
    let exited = vm.wait_exit(o.boot_timeout).is_ok();
    drop(vm);
    let seen = std::fs::read(&probe).unwrap_or_default();
    let line = String::from_utf8_lossy(&seen[..seen.len().min(512)])
        .trim_matches(char::from(0))
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let booted = line.starts_with(PROBE_MARK);
    report.phases.push(Phase {
        name: "system boot".into(),
        seconds: t1.elapsed().as_secs_f64(),
        ok: booted,
    });
    if !booted {
        report.failed_phase = Some("system boot".into());
        report.message = Some(if exited {
            "the recovered system stopped without reporting in (see system-console.log)".into()
        } else {
            format!(
                "the recovered system did not report in within {} min (no bootloader, a kernel that does not \
                 find its root, or a system without systemd; see system-console.log)",
                o.boot_timeout.as_secs() / 60
            )
        });
    } else {
        say(&format!("the recovered system reported: {line}"));
    }
    Ok(finish(report))
}

/// The one-shot unit `lifeboat recover` writes into the recovered system on
/// a rehearsal (removed by itself after its one run).
pub fn probe_unit() -> String {
    format!(
        "[Unit]\n\
         Description=Lifeboat rehearsal: report that the recovered system booted, then power off\n\
         After=multi-user.target\n\n\
         [Service]\n\
         Type=oneshot\n\
         ExecStart=/bin/sh -c 'rm -f /etc/systemd/system/multi-user.target.wants/lifeboat-rehearsal.service \
         /etc/systemd/system/lifeboat-rehearsal.service; \
         echo \"{PROBE_MARK} $$(hostname) up $$(cut -d. -f1 /proc/uptime) s\" > /dev/disk/by-id/virtio-{PROBE_SERIAL}; \
         sync; systemctl poweroff'\n\n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}

/// In `lifeboat recover`: on a rehearsal boot, install the probe unit into
/// the recovered system mounted at `root`. Returns what was done.
pub fn install_probe(root: &Path) -> Result<String> {
    let systemd = ["lib/systemd/systemd", "usr/lib/systemd/systemd"]
        .iter()
        .any(|p| root.join(p).exists());
    if !systemd {
        return Ok(
            "rehearsal: the recovered system has no systemd; its boot cannot be checked".into(),
        );
    }
    let dir = root.join("etc/systemd/system");
    std::fs::create_dir_all(dir.join("multi-user.target.wants"))?;
    std::fs::write(dir.join("lifeboat-rehearsal.service"), probe_unit())?;
    let link = dir.join("multi-user.target.wants/lifeboat-rehearsal.service");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("/etc/systemd/system/lifeboat-rehearsal.service", &link)?;
    Ok("rehearsal: the recovered system will report its boot and power off".into())
}

/// Is this a rehearsal boot (kernel command line)?
pub fn is_rehearsal(cmdline: &str) -> bool {
    cmdline.split_whitespace().any(|w| w == REHEARSE_OPTION)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_unit_is_valid_systemd_syntax_and_removes_itself() {
        let u = probe_unit();
        assert!(u.contains("WantedBy=multi-user.target"));
        assert!(u.contains(
            "rm -f /etc/systemd/system/multi-user.target.wants/lifeboat-rehearsal.service"
        ));
        // systemd's specifier and variable escapes: $$ for a shell $.
        assert!(u.contains("$$(hostname)") && !u.contains(" $(hostname)"));
        let d = tempfile::tempdir().unwrap();
        assert!(install_probe(d.path()).unwrap().contains("no systemd"));
        std::fs::create_dir_all(d.path().join("lib/systemd")).unwrap();
        std::fs::write(d.path().join("lib/systemd/systemd"), "").unwrap();
        install_probe(d.path()).unwrap();
        let link = d
            .path()
            .join("etc/systemd/system/multi-user.target.wants/lifeboat-rehearsal.service");
        assert_eq!(
            std::fs::read_link(link).unwrap(),
            Path::new("/etc/systemd/system/lifeboat-rehearsal.service")
        );
    }

    #[test]
    fn only_the_exact_option_means_a_rehearsal() {
        assert!(is_rehearsal("console=ttyS0 lifeboat.rehearse=1 quiet"));
        assert!(!is_rehearsal("lifeboat.rehearse=0"));
        assert!(!is_rehearsal("xlifeboat.rehearse=1"));
    }

    #[test]
    fn error_lines_are_those_after_the_phase_start() {
        let c =
            "old error\nlifeboat: recover: x\nchecking\nERROR: recovery failed (exit status 1)\n";
        let from = c.find("lifeboat: recover:").unwrap();
        assert_eq!(
            error_lines(c, from),
            "ERROR: recovery failed (exit status 1)"
        );
    }
}
