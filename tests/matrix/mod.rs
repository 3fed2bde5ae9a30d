//! The recovery machinery both test tiers share: real Debian source systems
//! (mmdebstrap, installed with their own bootloader on a virtual disk by
//! qemu/fixtures/debian-disk.sh) that boot, get marker files and run
//! `lifeboat mkbackup`; rescue VMs that recover blank disks with
//! `lifeboat.recover=auto`; and the checks of a recovered disk against its
//! source (booted through its own bootloader, or read offline).
//!
//! `tests/recover.rs` (the CI tier, `scripts/test.sh`) runs the one full
//! recovery, the rehearsal of the GPT source; `tests/e2e.rs` (the matrix
//! tier, `scripts/e2e.sh`) runs the cells.
#![allow(dead_code)]

pub mod cell;
pub use cell::*;

use crate::common::*;
use lifeboat_qemu::{BootSpec, Vm};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

pub const PROMPT: &str = "root@lbsrc:~#";
pub const MIN: Duration = Duration::from_secs(60);

/// A backed-up source system.
#[derive(Clone)]
pub struct Source {
    pub work: PathBuf,
    pub backup: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// `sha256sum` lines of the marker files.
    pub markers: String,
    /// `lsblk --json` of the source disk.
    pub lsblk: Value,
    /// VG and LV UUIDs (`lvs`), empty without LVM.
    pub lvm_ids: Vec<String>,
    /// The kernel command line GRUB gave the source.
    pub cmdline: String,
    /// The source's running kernel (`uname -r`).
    pub kver: String,
    /// A command for the recovered system and what its output must hold
    /// (paths prefixed with `$R`: empty in the booted system, the mount
    /// point when the disk is checked offline).
    pub extra: Option<(&'static str, &'static str)>,
    /// The rescue VM needs a NIC (the backup is on a server).
    pub net: bool,
    /// Other rescue images made by the same source (name → kernel, initrd).
    pub images: Vec<(String, PathBuf, PathBuf)>,
    /// Registered with `lifeboat serve` (Servers::serve): the host's token.
    pub serve_token: Option<String>,
    /// Seconds the (main) mkbackup took in the source VM.
    pub backup_s: f64,
    /// The source's /etc/fstab.
    pub fstab: String,
    /// The source's /etc/crypttab (empty without one).
    pub crypttab: String,
    /// How many disks the source has (serials LBSRC0, LBSRC1, ...).
    pub disks: usize,
    /// The source booted with UEFI (OVMF): its rescue VM does too, and the
    /// recovered disk boots with the NVRAM that recovery wrote.
    pub uefi: bool,
    /// The layout's own probe ([`layout_probe`]) and what it printed on
    /// the source (its `probe:` lines); the recovered system must print
    /// the same.
    pub probe: Option<(&'static str, String)>,
}

impl Source {
    /// The same source, recovered with another of its rescue images.
    pub fn with_image(&self, name: &str) -> Source {
        let (_, k, i) = self
            .images
            .iter()
            .find(|(n, _, _)| n == name)
            .unwrap_or_else(|| panic!("no rescue image {name}"));
        Source {
            kernel: k.clone(),
            initrd: i.clone(),
            ..self.clone()
        }
    }
}

/// The file servers of the network variant, alive for the whole run.
pub struct Servers {
    pub nfs: lifeboat_qemu::servers::Server,
    pub cifs: lifeboat_qemu::servers::Server,
    pub http: lifeboat_qemu::servers::Server,
    /// `lifeboat serve`, which the network source registers with.
    pub serve: lifeboat_qemu::servers::Server,
}

pub const SMB_PASSWORD: &str = "smb-harness-pw-0815";

pub fn servers() -> &'static Servers {
    static S: OnceLock<Servers> = OnceLock::new();
    S.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("lifeboat-servers-{}", std::process::id()));
        Servers {
            nfs: lifeboat_qemu::servers::ganesha(&d.join("nfs")),
            cifs: lifeboat_qemu::servers::samba(&d.join("cifs"), SMB_PASSWORD),
            http: lifeboat_qemu::servers::nginx(&d.join("http")),
            serve: lifeboat_qemu::servers::lifeboat_serve(
                &d.join("serve"),
                &lifeboat_bin(),
                0,
                &[],
            ),
        }
    })
}

/// How the source is backed up.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// file:// URL, one full set, with hooks (after a dry run).
    Plain,
    /// Plain, plus a PORTABLE tarball and a second full set on rescue ISOs
    /// (BACKUP_URL = iso://), for the portable and ISO cells.
    PlainMedia,
    /// usb://LABEL URLs (mkbackup mounts the medium itself).
    Usb,
    /// A full and an incremental set, encrypted with a passphrase, cut
    /// into 32 MiB volumes.
    Encrypted,
    /// BACKUP = "restic" (the shipped recipe), repository on the backup disk.
    Restic,
    /// BACKUP = "borg" (the shipped recipe), repository on the backup disk.
    Borg,
    /// Three backups to servers on the host: nfs://, cifs://, http://,
    /// each with its own rescue image.
    Network,
}

pub const PASSPHRASE: &str = "harness passphrase 4711";

pub const LVS: &str =
    "lvs --noheadings -o vg_name,vg_uuid,lv_name,lv_uuid 2>/dev/null | sed 's/^ */lv: /'";
/// The shape, identities and mounts of the first disk, as JSON.
pub const LSBLK: &str =
    "lsblk --json -o NAME,TYPE,FSTYPE,UUID,PARTUUID,LABEL,PARTLABEL,MOUNTPOINT /dev/vda";

/// [`LSBLK`] of the first `n` disks (vda, vdb, ...).
pub fn lsblk_of(n: usize) -> String {
    (1..n).fold(LSBLK.to_string(), |c, i| format!("{c} {}", vd(i)))
}

/// The `i`th virtio disk: /dev/vda for 0.
pub fn vd(i: usize) -> String {
    format!("/dev/vd{}", (b'a' + i as u8) as char)
}

/// Disks whose serial starts with this are attached as NVMe (the test's
/// way to say "a new machine with an NVMe disk").
pub const NVME: &str = "NVME";

/// Attach `disk` as virtio, or as NVMe when its serial starts with [`NVME`].
pub fn attach(spec: BootSpec, disk: &Path, format: &str, serial: Option<&str>) -> BootSpec {
    match serial {
        Some(s) if s.starts_with(NVME) => spec.with_nvme(disk, format, s),
        _ => spec.with_disk(disk, format, serial),
    }
}
pub const FSTAB: &str = "sed 's/^/fstab: /' /etc/fstab";
pub const CRYPTTAB: &str = "test ! -e /etc/crypttab || sed 's/^/crypttab: /' /etc/crypttab";
/// The LUKS passphrase of the luks-* sources (qemu/fixtures/debian-install.sh).
pub const LUKS_PASS: &str = "lifeboat-e2e-passphrase";
pub const CMDLINE: &str = "sed 's/^/cmdline: /' /proc/cmdline";

/// What a layout has beyond partitions, filesystems and mounts (which
/// lsblk and fstab compare for all): a command printing it as `probe:`
/// lines, and what those lines (without the tag) must hold on the source,
/// so the probe is known to see the feature before it is compared. The tag
/// is split in the commands (`pro''be:`) so the console's echo of the typed
/// line is never taken for output.
pub fn layout_probe(layout: &str) -> Option<(&'static str, &'static [&'static str])> {
    match layout {
        // The default subvolume, the subvolumes, and which one each btrfs
        // mount shows (its subvol= option).
        "btrfs-subvol" => Some((
            "btrfs subvolume get-default / | sed 's/.* path /pro''be: default /'; \
             btrfs subvolume list / | sed 's/.* path /pro''be: subvolume /'; \
             findmnt -rn -t btrfs -o TARGET,OPTIONS | while read -r t o; do \
             echo \"pro\"\"be: mount $t $(echo $o | tr , '\\n' | grep '^subvol=')\"; done",
            &[
                "default @",
                "subvolume @\n",
                "subvolume @home",
                "mount / subvol=/@\n",
                "mount /home subvol=/@home",
            ],
        )),
        // The thin pool and its thin volumes (`lvs -o lv_name,segtype`).
        "thin-xfs" => Some((
            "lvs --noheadings --separator ' ' -o lv_name,segtype,pool_lv vg0 | sed 's/^ */pro''be: /'",
            &["pool thin-pool", "root thin pool", "srv thin pool"],
        )),
        // The OS's boot entries in NVRAM (`efibootmgr -v`; the firmware's
        // own entries have no file on a partition), and the one that booted.
        "uefi-gpt-ext4" => Some((
            "efibootmgr -v | sed -n 's/^Boot[0-9A-F]\\{4\\}\\*\\? \\(.*HD(.*File(.*\\)/pro''be: entry \\1/p'; \
             c=$(efibootmgr | sed -n 's/^BootCurrent: //p'); \
             efibootmgr | sed -n \"s/^Boot$c\\*\\? /pro\"\"be: current /p\"",
            &[
                "entry debian",
                "File(\\EFI\\debian\\grubx64.efi)",
                "current debian",
            ],
        )),
        _ => None,
    }
}

pub fn prefixed(out: &str, p: &str) -> Vec<String> {
    out.lines()
        .filter(|l| l.starts_with(p))
        .map(|l| l.trim().to_string())
        .collect()
}

/// The lines of /etc/fstab in the output of [`FSTAB`], each trimmed.
pub fn fstab_lines(out: &str) -> String {
    tagged_lines(out, "fstab:")
}

/// The lines of `out` that start with `tag`, without it, each trimmed.
pub fn tagged_lines(out: &str, tag: &str) -> String {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix(tag))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn sh_ok(cmd: &str) -> String {
    let out = Command::new("bash").args(["-c", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Work directories of earlier runs whose process is gone are removed
/// (their disk images are large); this run's stay for inspection.
pub fn clean_stale() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        for e in std::fs::read_dir(std::env::temp_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let n = e.file_name().to_string_lossy().to_string();
            let Some(pid) = n
                .strip_prefix("lifeboat-e2e-")
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    });
}

pub fn work_dir(name: &str) -> PathBuf {
    clean_stale();
    let d = std::env::temp_dir().join(format!("lifeboat-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A setting of a layout (`NAME=value` in qemu/fixtures/layouts/LAYOUT.sh,
/// else in its LAYOUT_BASE's file), as debian-disk.sh reads it.
pub fn layout_setting(layout: &str, name: &str) -> Option<String> {
    fn get(layout: &str, name: &str) -> Option<String> {
        let f = repo().join(format!("qemu/fixtures/layouts/{layout}.sh"));
        let text = std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let key = format!("{name}=");
        text.lines()
            .find_map(|x| x.strip_prefix(key.as_str()).map(|v| v.trim().to_string()))
    }
    get(layout, name).or_else(|| get(&get(layout, "LAYOUT_BASE")?, name))
}

/// The installed Debian disk for `layout` (cached by content hash).
pub fn debian_disk(layout: &str) -> PathBuf {
    static RESCUE: OnceLock<PathBuf> = OnceLock::new();
    let rescue = RESCUE.get_or_init(|| {
        let w = work_dir("installer");
        let out = w.join("rescue");
        build(&w, &out, "", &[]);
        out
    });
    let qemu = Path::new(env!("CARGO_BIN_EXE_lifeboat"))
        .parent()
        .unwrap()
        .join("lifeboat-qemu");
    let out = Command::new("bash")
        .arg(repo().join("qemu/fixtures/debian-disk.sh"))
        .arg(layout)
        .env("LIFEBOAT_RESCUE_DIR", rescue)
        .env("LIFEBOAT_QEMU", qemu)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "debian-disk.sh {layout} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap()
            .trim(),
    )
}

pub fn run(vm: &mut Vm, pos: &mut usize, cmd: &str, t: Duration) -> String {
    let r = vm
        .run_command(*pos, cmd, t)
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    *pos = r.end;
    assert_eq!(r.status, 0, "{cmd} exited {}:\n{}", r.status, r.output);
    r.output
}

pub fn json_in(text: &str) -> Value {
    let start = text.find('{').expect("no JSON in output");
    let end = text.rfind('}').unwrap();
    serde_json::from_str(&text[start..=end]).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The NVRAM (OVMF variable store) of the machine whose first disk is
/// `disk`: what its rescue boot writes, its system boot reads.
pub fn nvram_of(disk: &Path) -> PathBuf {
    disk.with_extension("nvram.fd")
}

/// The `probe:` lines of a [`layout_probe`] command's output, with a line
/// end after each (so an expectation can end with one).
fn probe_lines(out: &str) -> String {
    tagged_lines(out, "probe:")
        .lines()
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Boot the source system, put markers on it and run mkbackup.
pub fn make_source(layout: &str, variant: Variant) -> Source {
    let disk = debian_disk(layout);
    // The UEFI layout boots with the NVRAM its install wrote (the boot
    // entry), kept beside the disk by debian-disk.sh; a copy, so the
    // cached one stays as installed.
    let uefi = layout_setting(layout, "LAYOUT_UEFI").as_deref() == Some("1");
    let work = work_dir(&format!(
        "src-{layout}{}",
        match variant {
            Variant::Encrypted => "-enc",
            Variant::Restic => "-restic",
            Variant::Borg => "-borg",
            Variant::Network => "-net",
            Variant::PlainMedia => "-media",
            _ => "",
        }
    ));
    let ndisks: usize = layout_setting(layout, "LAYOUT_DISKS").map_or(1, |n| n.parse().unwrap());
    let mut overlays = Vec::new();
    for i in 0..ndisks {
        let (d, o) = if i == 0 {
            (disk.clone(), work.join("src.qcow2"))
        } else {
            (
                disk.with_file_name(format!("disk{}.raw", i + 1)),
                work.join(format!("src{i}.qcow2")),
            )
        };
        sh_ok(&format!(
            "qemu-img create -q -f qcow2 -F raw -b {} {}",
            d.display(),
            o.display()
        ));
        overlays.push(o);
    }
    // The backup disk comes after the source's disks.
    let bdev = vd(ndisks);
    // The backup disk carries the lifeboat binaries in and everything out.
    let stage = work.join("stage/bin");
    std::fs::create_dir_all(&stage).unwrap();
    let bin = lifeboat_bin();
    for b in ["lifeboat", "lifeboat-init"] {
        sh_ok(&format!(
            "strip -o {} {}",
            stage.join(b).display(),
            bin.parent().unwrap().join(b).display()
        ));
    }
    // The Debian package too (scripts/package.sh, run by scripts/test.sh).
    std::fs::copy(deb_package(), work.join("stage/lifeboat.deb")).unwrap();
    let backup = work.join("backup.img");
    sh_ok(&format!(
        "truncate -s 4G {b} && mkfs.ext4 -q -F -L LBBACKUP -d {s} {b}",
        b = backup.display(),
        s = work.join("stage").display()
    ));
    let uefi_vars = if uefi {
        let v = work.join("source-nvram.fd");
        let installed = disk.with_file_name("efivars.fd");
        std::fs::copy(&installed, &v).unwrap_or_else(|e| panic!("{}: {e}", installed.display()));
        Some(v)
    } else {
        None
    };
    let mut spec = BootSpec {
        memory_mb: 1536,
        log: Some(work.join("source-console.log")),
        uefi,
        uefi_vars,
        ..BootSpec::from_disks()
    };
    for (i, o) in overlays.iter().enumerate() {
        spec = spec.with_disk(o, "qcow2", Some(&format!("LBSRC{i}")));
    }
    let spec = spec.with_disk(&backup, "raw", None).with_user_net("");
    let mut vm = Vm::boot(&spec).unwrap();
    let mut pos = vm.wait_for(PROMPT, 10 * MIN).unwrap();
    // Kernel messages must not land in the middle of command output.
    run(&mut vm, &mut pos, "dmesg -n 1", MIN);
    // The NIC is set up by ifupdown, as the Debian installer does (for the
    // NIC it found): by DHCP, except on the network source, whose servers'
    // client has a static address. The capture must tell the two apart:
    // the rescue OS asks for a lease on the one and replays the other.
    let method = if variant == Variant::Network {
        "static\\n  address 10.0.2.15/24\\n  gateway 10.0.2.2"
    } else {
        "dhcp"
    };
    run(
        &mut vm,
        &mut pos,
        &format!(
            "i=$(ls /sys/class/net | grep -v '^lo$' | head -1) && \
             printf 'auto lo\\niface lo inet loopback\\n\\nallow-hotplug %s\\niface %s inet {method}\\n' $i $i \
             > /etc/network/interfaces && ifup $i && ip -4 route show default | grep -q 'via 10.0.2.2' && echo net: up"
        ),
        MIN,
    );
    // The rescue images built in these VMs compress their layers with
    // zstd level 1: under TCG that saves about half a minute per image
    // (the default level is covered by the host-side image tests).
    run(
        &mut vm,
        &mut pos,
        &format!(
            "mkdir -p /backup /etc/lifeboat/conf.d && mount {bdev} /backup && \
         printf '[rescue]\ncompression_level = 1\n' > /etc/lifeboat/conf.d/00-e2e-speed.toml"
        ),
        MIN,
    );
    let markers = run(
        &mut vm,
        &mut pos,
        "mkdir -p /home/u && head -c 3M /dev/urandom > /root/marker.bin && head -c 1M /dev/urandom > /home/u/marker.bin \
         && date > /etc/marker.txt && sha256sum /root/marker.bin /home/u/marker.bin /etc/marker.txt",
        MIN,
    );
    let lsblk = json_in(&run(&mut vm, &mut pos, &lsblk_of(ndisks), MIN));
    let lvm_ids = prefixed(&run(&mut vm, &mut pos, LVS, MIN), "lv: ");
    let cmdline = prefixed(&run(&mut vm, &mut pos, CMDLINE, MIN), "cmdline: ").join("\n");
    assert!(cmdline.contains("root="), "{cmdline}");
    let kver = prefixed(
        &run(&mut vm, &mut pos, "uname -r | sed 's/^/kv''er: /'", MIN),
        "kver: ",
    )
    .join("")
    .trim_start_matches("kver: ")
    .to_string();
    let fstab = fstab_lines(&run(&mut vm, &mut pos, FSTAB, MIN));
    assert!(
        fstab.contains(" / "),
        "no / in the source's fstab:\n{fstab}"
    );
    let crypttab = tagged_lines(&run(&mut vm, &mut pos, CRYPTTAB, MIN), "crypttab:");
    let probe = layout_probe(layout)
        .or_else(|| layout_probe(&layout_setting(layout, "LAYOUT_BASE")?))
        .map(|(cmd, want)| {
            let got = probe_lines(&run(&mut vm, &mut pos, cmd, MIN));
            for w in want {
                assert!(
                    got.contains(w),
                    "the {layout} source's probe lacks {w:?}:\n{got}"
                );
            }
            (cmd, got)
        });
    if layout.starts_with("luks-") {
        assert!(
            crypttab.contains("/etc/keys/root.key"),
            "no key file entry in the source's crypttab:\n{crypttab}"
        );
        // Unattended recovery onto LUKS: the key (the passphrase) goes into
        // the rescue image, as the documentation tells a user to do.
        run(
            &mut vm,
            &mut pos,
            "printf 'expose_secrets = true\\n[recover]\\nkeyfile = \"/etc/keys/root.key\"\\n' \
             > /etc/lifeboat/conf.d/20-luks.toml",
            MIN,
        );
    }
    let mut backup_s = 0.0;
    let mut extra = None;
    let mut images = vec![];
    let mut serve_token = None;
    if variant == Variant::Network {
        let sv = servers();
        run(&mut vm, &mut pos, "mkdir -p /etc/lifeboat", MIN);
        run(
            &mut vm,
            &mut pos,
            &format!("printf 'username=root\\npassword={SMB_PASSWORD}\\n' > /etc/lifeboat/cifs.cred && chmod 600 /etc/lifeboat/cifs.cred"),
            MIN,
        );
        let urls = [
            ("nfs", format!("nfs://10.0.2.2:{}/backup", sv.nfs.port), ""),
            (
                "cifs",
                format!("cifs://10.0.2.2:{}/backup/lifeboat", sv.cifs.port),
                "backup_credentials = \"/etc/lifeboat/cifs.cred\"\nbackup_credentials_in_image = true\n",
            ),
            ("http", format!("http://10.0.2.2:{}/backups", sv.http.port), ""),
        ];
        // The nfs and cifs rescue images go to the share too (OUTPUT_URL);
        // an NFS URL is mounted whole, so its directory must exist.
        std::fs::create_dir_all(sv.nfs.root.join("rescue-nfs")).unwrap();
        run(&mut vm, &mut pos, "cp /backup/bin/* /usr/local/sbin/", MIN);
        for (name, url, more) in &urls {
            // nfs and cifs: the rescue image goes to the share too, and the
            // local disk that brought the binaries is not mounted (else it
            // would be part of the system to recover). http: the image goes
            // to that disk, which mkbackup then leaves out of the layout.
            let (out_url, out_arg, before) = if *name == "http" {
                (
                    String::new(),
                    format!("--output-dir /backup/rescue-{name}"),
                    "mkdir -p /backup && (findmnt /backup >/dev/null || mount /dev/vdb /backup)",
                )
            } else {
                (
                    format!("OUTPUT_URL = \"{url}/rescue-{name}\"\n"),
                    String::new(),
                    "(findmnt /backup >/dev/null && umount /backup || true)",
                )
            };
            let toml = format!("BACKUP_URL = \"{url}\"\n{more}{out_url}");
            std::fs::write(work.join(format!("lb-{name}.toml")), &toml).unwrap();
            run(
                &mut vm,
                &mut pos,
                &format!(
                    "printf '{}' > /root/lb-{name}.toml",
                    toml.replace('\n', "\\n")
                ),
                MIN,
            );
            let tb = std::time::Instant::now();
            let out = run(
                &mut vm,
                &mut pos,
                &format!(
                    "{before} && lifeboat -c /root/lb-{name}.toml mkbackup {out_arg} \
                     > /root/mkbackup-{name}.log 2>&1; s=$?; tail -25 /root/mkbackup-{name}.log; test $s = 0"
                ),
                20 * MIN,
            );
            backup_s += tb.elapsed().as_secs_f64();
            assert!(
                !out.contains(SMB_PASSWORD),
                "the share password is in mkbackup's output:\n{out}"
            );
        }
        // The http backup's plan registered with lifeboat serve (a plain
        // mkrescue carries the last mkbackup's plan).
        let sp = sv.serve.port;
        let out = run(
            &mut vm,
            &mut pos,
            &format!(
                "printf 'OUTPUT = \"PXE\"\\nOUTPUT_URL = \"lifeboat+http://10.0.2.2:{sp}/\"\\niso_default = \"automatic\"\\n\
                 boot_console = \"serial\"\\n' > /root/serve.toml && \
                 lifeboat -c /root/lb-http.toml -c /root/serve.toml mkrescue > /root/serve.log 2>&1; s=$?; tail -8 /root/serve.log; test $s = 0"
            ),
            20 * MIN,
        );
        assert!(
            out.contains("as host lbsrc") && out.contains("token (new)"),
            "{out}"
        );
        let t = prefixed(
            &run(
                &mut vm,
                &mut pos,
                &format!("sed 's/^/token: /' /var/lib/lifeboat/serve/10.0.2.2_{sp}_lbsrc.token"),
                MIN,
            ),
            "token: ",
        );
        serve_token = Some(
            t.first()
                .expect("no token")
                .trim_start_matches("token: ")
                .to_string(),
        );
        run(&mut vm, &mut pos, "umount /backup && sync", 10 * MIN);
        for (name, _, _) in &urls {
            let (k, i) = match *name {
                "nfs" => rescue_in(&sv.nfs.root.join("rescue-nfs")),
                "cifs" => rescue_in(&sv.cifs.root.join("lifeboat/rescue-cifs")),
                _ => read_rescue(&backup, &work, &format!("rescue-{name}")),
            };
            images.push((name.to_string(), k, i));
        }
        // The backups are on the servers, not on the disk.
        assert!(sv.nfs.root.join("lbsrc/backup.json").is_file());
        assert!(sv.cifs.root.join("lifeboat/lbsrc/backup.json").is_file());
        assert!(sv.http.root.join("backups/lbsrc/backup.json").is_file());
        extra = Some((
            "echo state: $(grep -rlF 'smb-harness-pw' $R/var/log/lifeboat || echo no-password-in-logs)",
            "state: no-password-in-logs",
        ));
    } else if variant == Variant::Borg {
        run(
            &mut vm,
            &mut pos,
            "mkdir -p /etc/lifeboat && echo borg-pass > /etc/lifeboat/borg.pass && \
             printf 'BACKUP = \"borg\"\\n[external]\\ncopy_as_is = [\"/etc/lifeboat/borg.pass\"]\\n\
             [external.env]\\nBORG_PASSCOMMAND = \"cat /etc/lifeboat/borg.pass\"\\n' > /root/lb.toml",
            MIN,
        );
        let tb = std::time::Instant::now();
        let out = run(
            &mut vm,
            &mut pos,
            "/backup/bin/lifeboat -c /root/lb.toml mkbackup --backup-url file:///backup/store --output-dir /backup/rescue \
             > /backup/mkbackup.log 2>&1; s=$?; grep 'backup with' /backup/mkbackup.log; tail -25 /backup/mkbackup.log; test $s = 0",
            30 * MIN,
        );
        backup_s += tb.elapsed().as_secs_f64();
        assert!(out.contains("backup with borg"), "{out}");
        run(&mut vm, &mut pos, "umount /backup && sync", 10 * MIN);
    } else if variant == Variant::Encrypted {
        run(
            &mut vm,
            &mut pos,
            &format!(
                "echo '{PASSPHRASE}' > /root/lb.key && chmod 600 /root/lb.key && echo gone > /root/gone.txt && \
                 echo v0 > /root/changed.txt && printf 'BACKUP_TYPE = \"incremental\"\\nbackup_volume_size = \"32M\"\\n\
                 backup_key_file = \"/root/lb.key\"\\n' > /root/lb.toml"
            ),
            MIN,
        );
        let tb = std::time::Instant::now();
        run(
            &mut vm,
            &mut pos,
            "/backup/bin/lifeboat -c /root/lb.toml mkbackup --no-rescue --backup-url file:///backup/store > /backup/full.log 2>&1; \
             s=$?; tail -15 /backup/full.log; test $s = 0",
            20 * MIN,
        );
        backup_s += tb.elapsed().as_secs_f64();
        run(
            &mut vm,
            &mut pos,
            "rm /root/gone.txt && echo v1 > /root/changed.txt && echo new > /root/new.txt",
            MIN,
        );
        let tb = std::time::Instant::now();
        let out = run(
            &mut vm,
            &mut pos,
            "/backup/bin/lifeboat -c /root/lb.toml mkbackup --backup-url file:///backup/store --output-dir /backup/rescue \
             > /backup/incr.log 2>&1; s=$?; tail -25 /backup/incr.log; test $s = 0",
            20 * MIN,
        );
        backup_s += tb.elapsed().as_secs_f64();
        assert!(out.contains("incremental backup"), "{out}");
        run(&mut vm, &mut pos, "umount /backup && sync", 10 * MIN);
        extra = Some((
            "echo state: $(cat $R/root/changed.txt) $(cat $R/root/new.txt) $(test -e $R/root/gone.txt && echo gone-present || echo gone-absent) \
             $(grep -rlF 'harness passphrase' $R/var/log/lifeboat || echo no-key-in-logs)",
            "state: v1 new gone-absent no-key-in-logs",
        ));
    } else if variant == Variant::Restic {
        run(
            &mut vm,
            &mut pos,
            "mkdir -p /etc/lifeboat && echo restic-pass > /etc/lifeboat/restic.pass && \
             printf 'BACKUP = \"restic\"\\n[external]\\ncopy_as_is = [\"/etc/lifeboat/restic.pass\"]\\n\
             [external.env]\\nRESTIC_PASSWORD_FILE = \"/etc/lifeboat/restic.pass\"\\n' > /root/lb.toml",
            MIN,
        );
        let tb = std::time::Instant::now();
        let out = run(
            &mut vm,
            &mut pos,
            "/backup/bin/lifeboat -c /root/lb.toml mkbackup --backup-url file:///backup/store --output-dir /backup/rescue \
             > /backup/mkbackup.log 2>&1; s=$?; grep 'backup with' /backup/mkbackup.log; tail -25 /backup/mkbackup.log; test $s = 0",
            30 * MIN,
        );
        backup_s += tb.elapsed().as_secs_f64();
        assert!(out.contains("backup with restic"), "{out}");
        run(&mut vm, &mut pos, "umount /backup && sync", 10 * MIN);
    } else if variant == Variant::Usb {
        // Lifeboat from its Debian package, its units checked by systemd,
        // and mkbackup run as the packaged service. BACKUP_URL and
        // OUTPUT_URL as usb://LABEL: mkbackup mounts the medium by its
        // label itself, and unmounts it when done.
        let out = run(
            &mut vm,
            &mut pos,
            "dpkg -i /backup/lifeboat.deb > /root/dpkg.log 2>&1; s=$?; tail -5 /root/dpkg.log; test $s = 0 && \
             umount /backup && echo installed: $(command -v lifeboat) $(ls /usr/lib/lifeboat/) && \
             mkdir -p /etc/lifeboat/conf.d && \
             printf 'BACKUP_URL = \"usb://LBBACKUP/store\"\\nOUTPUT_URL = \"usb://LBBACKUP/rescue\"\\n' \
             > /etc/lifeboat/conf.d/test.toml",
            2 * MIN,
        );
        assert!(
            out.contains("installed: /usr/bin/lifeboat lifeboat-init"),
            "the package did not install:\n{out}"
        );
        let out = run(
            &mut vm,
            &mut pos,
            // --man=no: the minbase VM has no man-db (and keeps no man pages),
            // so the units' Documentation=man: links cannot be looked up.
            "systemd-analyze verify --man=no lifeboat-mkbackup.timer lifeboat-mkbackup.service \
             lifeboat-checklayout.timer lifeboat-checklayout.service 2>&1; echo verify=$? && \
             systemctl enable lifeboat-mkbackup.timer lifeboat-checklayout.timer 2>&1; \
             echo enabled: $(systemctl is-enabled lifeboat-mkbackup.timer lifeboat-checklayout.timer) && \
             lifeboat validate",
            2 * MIN,
        );
        assert!(
            out.contains("verify=0") && out.contains("enabled: enabled enabled"),
            "systemd does not accept the packaged units:\n{out}"
        );
        assert!(
            !out.contains("lifeboat-") || !out.to_lowercase().contains("error"),
            "systemd-analyze complains:\n{out}"
        );
        let tb = std::time::Instant::now();
        let out = run(
            &mut vm,
            &mut pos,
            "systemctl start lifeboat-mkbackup.service; s=$?; \
             journalctl -u lifeboat-mkbackup.service --no-pager -o cat \
             | grep -E '^(layout saved to|backup .* written to|rescue image for kernel)'; test $s = 0",
            20 * MIN,
        );
        backup_s += tb.elapsed().as_secs_f64();
        assert!(
            out.contains("layout saved to")
                && out.contains("written to")
                && out.contains("rescue image for kernel"),
            "no mkbackup output in the service's journal:\n{out}"
        );
        let m = run(
            &mut vm,
            &mut pos,
            "findmnt /dev/vdb || echo medium-unmounted",
            MIN,
        );
        assert!(
            m.contains("medium-unmounted"),
            "mkbackup left the medium mounted: {m}"
        );
        run(&mut vm, &mut pos, "sync", 10 * MIN);
    } else {
        // Hooks, in the system configuration (so every image built here
        // carries them): the pre_backup hook's file is in the backup, the
        // post_recovery hook writes into the recovered system.
        run(
            &mut vm,
            &mut pos,
            "mkdir -p /etc/lifeboat/conf.d && printf '[hooks]\\npre_backup = [\"echo pre-$LIFEBOAT_HOOK-$LIFEBOAT_WORKFLOW > /root/pre-backup.txt\"]\\n\
             post_backup = [\"echo post_backup says result=$LIFEBOAT_RESULT\"]\\n\
             pre_recovery = [\"echo pre_recovery says target=$LIFEBOAT_TARGET\"]\\n\
             post_recovery = [\"echo $LIFEBOAT_HOOK-$LIFEBOAT_RESULT > $LIFEBOAT_TARGET/root/post-recovery.txt\"]\\n' \
             > /etc/lifeboat/conf.d/hooks.toml && cat /etc/lifeboat/conf.d/hooks.toml",
            MIN,
        );
        // A dry run first: what would be backed up and built; no hook
        // runs, nothing is written.
        let out = run(
            &mut vm,
            &mut pos,
            "/backup/bin/lifeboat mkbackup --dry-run --backup-url file:///backup/store --output-dir /backup/rescue 2>&1; \
             for p in /backup/store /backup/rescue /root/pre-backup.txt; do test -e $p && echo EXISTS:$p; done; echo checked",
            10 * MIN,
        );
        for want in [
            "hooks are not run",
            "dry run: mkbackup would save the layout",
            "full backup of /",
            "(tar)",
            "dry run: mkrescue would build the rescue image of lbsrc",
            "nothing was written",
            "checked",
        ] {
            assert!(
                out.contains(want),
                "mkbackup --dry-run: {want:?} missing:\n{out}"
            );
        }
        assert!(
            !out.contains("EXISTS:/"),
            "mkbackup --dry-run wrote something or ran a hook:\n{out}"
        );
        let tb = std::time::Instant::now();
        let out = run(
            &mut vm,
            &mut pos,
            "/backup/bin/lifeboat mkbackup --backup-url file:///backup/store --output-dir /backup/rescue > /backup/mkbackup.log 2>&1; \
             s=$?; grep hook /backup/mkbackup.log; tail -25 /backup/mkbackup.log; test $s = 0",
            20 * MIN,
        );
        backup_s += tb.elapsed().as_secs_f64();
        assert!(
            out.contains("post_backup says result=success"),
            "the post_backup hook did not report success:\n{out}"
        );
        extra = Some((
            "echo state: $(cat $R/root/pre-backup.txt) $(cat $R/root/post-recovery.txt)",
            "state: pre-pre_backup-mkbackup post_recovery-success",
        ));
        if variant == Variant::PlainMedia {
            // The same backup carried by a portable lifeboat (recovered from
            // another live system): mkrescue alone takes the last mkbackup's plan.
            let out = run(
                &mut vm,
                &mut pos,
                "/backup/bin/lifeboat mkrescue --output PORTABLE --output-dir /backup/portable \
                 > /backup/portable.log 2>&1; s=$?; tail -5 /backup/portable.log; test $s = 0",
                20 * MIN,
            );
            assert!(
                out.contains("portable lifeboat")
                    && out.contains("carrying the plan of the last mkbackup"),
                "{out}"
            );
            // A third full set on the rescue ISO itself (BACKUP_URL = iso://),
            // continued on data ISOs beyond 160 MiB.
            let out = run(
                &mut vm,
                &mut pos,
                "printf 'OUTPUT = \"ISO\"\\nISO_MAX_SIZE = 160\\nISO_VOLID = \"LBISO\"\\niso_default = \"automatic\"\\n\
                 boot_console = \"serial\"\\nboot_timeout = 1\\n' > /root/iso.toml && \
                 /backup/bin/lifeboat -c /root/iso.toml mkbackup --backup-url iso:///backup --output-dir /backup/iso \
                 > /backup/iso.log 2>&1; s=$?; tail -8 /backup/iso.log; test $s = 0",
                20 * MIN,
            );
            assert!(out.contains("backup continued on ISO"), "{out}");
        }
        run(&mut vm, &mut pos, "umount /backup && sync", 10 * MIN);
    }
    drop(vm);
    let (kernel, initrd) = match images.first() {
        Some((_, k, i)) => (k.clone(), i.clone()),
        None => read_rescue(&backup, &work, "rescue"),
    };
    Source {
        work,
        backup,
        kernel,
        initrd,
        markers,
        lsblk,
        lvm_ids,
        cmdline,
        kver,
        extra,
        net: true,
        images,
        serve_token,
        backup_s,
        fstab,
        crypttab,
        disks: ndisks,
        uefi,
        probe,
    }
}

/// The rescue image (kernel, initrd) a mkrescue wrote to `dir`.
pub fn rescue_in(dir: &Path) -> (PathBuf, PathBuf) {
    let m = manifest(dir);
    let (k, i) = (dir.join(&m.kernel), dir.join(&m.initrd));
    assert!(
        k.is_file() && i.is_file(),
        "no rescue image in {}",
        dir.display()
    );
    (k, i)
}

/// Read a rescue image (kernel, initrd) back from directory `name` of the
/// backup disk.
pub fn read_rescue(backup: &Path, work: &Path, name: &str) -> (PathBuf, PathBuf) {
    let ls = sh_ok(&format!(
        "debugfs -R 'ls -p /{name}' {} 2>/dev/null",
        backup.display()
    ));
    let kname = ls
        .split('/')
        .find(|f| f.starts_with("vmlinuz-"))
        .unwrap_or_else(|| panic!("no vmlinuz in /{name} of the backup disk"))
        .to_string();
    let kernel = work.join(format!("{name}-{kname}"));
    let initrd = work.join(format!("{name}-initrd.img"));
    sh_ok(&format!(
        "debugfs -R 'dump /{name}/{kname} {}' {b} 2>/dev/null && debugfs -R 'dump /{name}/initrd.img {}' {b} 2>/dev/null",
        kernel.display(),
        initrd.display(),
        b = backup.display()
    ));
    assert!(std::fs::metadata(&initrd).unwrap().len() > 1 << 20);
    (kernel, initrd)
}

/// A source built once per test process. A failed build is remembered, not
/// retried by every later test that needs it (each retry costs minutes and
/// fails the same way).
/// In a matrix cell, the build counts as phase "source" (a failure there
/// is the cell's failing phase) and the source's mkbackup as "backup".
pub fn shared_source(
    slot: &'static OnceLock<Result<Source, String>>,
    layout: &str,
    variant: Variant,
) -> &'static Source {
    phase("source");
    let built = slot.get_or_init(|| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            make_source(layout, variant)
        }))
        .map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        })
    });
    match built {
        Ok(s) => {
            phase_drop();
            add_phase("backup", s.backup_s);
            s
        }
        Err(e) => panic!("the {layout} source system could not be built: {e}"),
    }
}

pub fn gpt_source() -> &'static Source {
    static S: OnceLock<Result<Source, String>> = OnceLock::new();
    shared_source(&S, "gpt-bios", Variant::Plain)
}

/// The GPT source with a PORTABLE tarball and an iso:// backup besides.
pub fn gpt_media_source() -> &'static Source {
    static S: OnceLock<Result<Source, String>> = OnceLock::new();
    shared_source(&S, "gpt-bios", Variant::PlainMedia)
}

/// Where a test keeps its disks and logs: its cell's work directory, else
/// the source's.
pub fn here(src: &Source) -> PathBuf {
    cell_dir().unwrap_or_else(|| src.work.clone())
}

/// Root on LUKS2 straight on a partition (layout luks-root).
pub fn luks_root_source() -> &'static Source {
    static S: OnceLock<Result<Source, String>> = OnceLock::new();
    shared_source(&S, "luks-root", Variant::Plain)
}

/// LUKS2 on a partition holding an LVM PV (root and home LVs), layout
/// luks-lvm.
pub fn luks_lvm_source() -> &'static Source {
    static S: OnceLock<Result<Source, String>> = OnceLock::new();
    shared_source(&S, "luks-lvm", Variant::Plain)
}

/// Two disks with md RAID1 for / and swap, GRUB on both (layout
/// bios-md-raid1).
pub fn md_raid1_source() -> &'static Source {
    static S: OnceLock<Result<Source, String>> = OnceLock::new();
    shared_source(&S, "bios-md-raid1", Variant::Plain)
}

/// The gpt-bios layout on a Debian 12 whose initramfs is made by dracut.
pub fn dracut_source() -> &'static Source {
    static S: OnceLock<Result<Source, String>> = OnceLock::new();
    shared_source(&S, "dracut-host", Variant::Plain)
}

/// The gpt-bios layout with Debian 11 (bullseye).
pub fn debian11_source() -> &'static Source {
    static S: OnceLock<Result<Source, String>> = OnceLock::new();
    shared_source(&S, "debian11-bios", Variant::Plain)
}

/// The uefi-gpt-ext4 layout with Debian 13 (trixie).
pub fn debian13_source() -> &'static Source {
    static S: OnceLock<Result<Source, String>> = OnceLock::new();
    shared_source(&S, "debian13-uefi", Variant::Plain)
}

/// btrfs root with subvolumes @ (/, the default) and @home, BIOS, GPT
/// (layout btrfs-subvol).
pub fn btrfs_subvol_source() -> &'static Source {
    static S: OnceLock<Result<Source, String>> = OnceLock::new();
    shared_source(&S, "btrfs-subvol", Variant::Plain)
}

/// xfs root and /srv on thin LVs of one thin pool, ext4 /boot, BIOS, MBR
/// (layout thin-xfs).
pub fn thin_xfs_source() -> &'static Source {
    static S: OnceLock<Result<Source, String>> = OnceLock::new();
    shared_source(&S, "thin-xfs", Variant::Plain)
}

/// UEFI: ESP at /boot/efi, ext4 root, GRUB with a boot entry in NVRAM and
/// at the removable path; the source boots under OVMF (layout
/// uefi-gpt-ext4).
pub fn uefi_gpt_ext4_source() -> &'static Source {
    static S: OnceLock<Result<Source, String>> = OnceLock::new();
    shared_source(&S, "uefi-gpt-ext4", Variant::Plain)
}

pub fn lvm_source() -> &'static Source {
    static S: OnceLock<Result<Source, String>> = OnceLock::new();
    shared_source(&S, "mbr-lvm", Variant::Usb)
}

pub fn enc_source() -> &'static Source {
    static S: OnceLock<Result<Source, String>> = OnceLock::new();
    shared_source(&S, "gpt-bios", Variant::Encrypted)
}

pub fn restic_source() -> &'static Source {
    static S: OnceLock<Result<Source, String>> = OnceLock::new();
    shared_source(&S, "gpt-bios", Variant::Restic)
}

pub fn borg_source() -> &'static Source {
    static S: OnceLock<Result<Source, String>> = OnceLock::new();
    shared_source(&S, "gpt-bios", Variant::Borg)
}

pub fn net_source() -> &'static Source {
    static S: OnceLock<Result<Source, String>> = OnceLock::new();
    shared_source(&S, "gpt-bios", Variant::Network)
}

pub fn blank(path: &Path, size: &str) {
    sh_ok(&format!(
        "rm -f {p} && truncate -s {size} {p}",
        p = path.display()
    ));
}

pub fn sha(path: &Path) -> String {
    sh_ok(&format!("sha256sum {}", path.display()))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Boot the rescue image of `src` on `disks` (target first; the backup disk
/// is attached read-only after them).
pub fn rescue_vm(src: &Source, disks: &[(&Path, Option<&str>)], append: &str, log: &str) -> Vm {
    rescue_vm_with(src, &src.backup, disks, append, log)
}

pub fn rescue_vm_with(
    src: &Source,
    backup: &Path,
    disks: &[(&Path, Option<&str>)],
    append: &str,
    log: &str,
) -> Vm {
    phase("rescue boot");
    let mut spec = BootSpec {
        memory_mb: 1536,
        append: format!("console=ttyS0 {append}"),
        log: Some(here(src).join(log)),
        ..BootSpec::new(&src.kernel, &src.initrd)
    };
    for (d, serial) in disks {
        spec = attach(spec, d, "raw", *serial);
    }
    if src.net {
        spec = spec.with_user_net("");
    }
    if src.uefi {
        // The new machine's NVRAM, blank before the recovery; the recovered
        // disk boots with it (check_recovered).
        let nvram = match disks.first() {
            Some((d, _)) => nvram_of(d),
            None => here(src).join("rescue.nvram.fd"),
        };
        let (_, template) = lifeboat_qemu::ovmf();
        std::fs::copy(&template, &nvram)
            .unwrap_or_else(|e| panic!("{} -> {}: {e}", template.display(), nvram.display()));
        spec.uefi = true;
        spec.uefi_vars = Some(nvram);
    }
    spec = spec.with_disk(backup, "raw,readonly=on", None);
    Vm::boot(&spec).unwrap()
}

/// Unattended recovery onto `disks`; returns the console.
pub fn recover(src: &Source, disks: &[(&Path, Option<&str>)], append: &str, log: &str) -> String {
    let mut vm = rescue_vm(src, disks, &format!("lifeboat.recover=auto {append}"), log);
    await_recovery(&mut vm)
}

/// Wait for an unattended recovery to finish and the VM to stop; returns
/// the console.
pub fn await_recovery(vm: &mut Vm) -> String {
    let t0 = std::time::Instant::now();
    loop {
        let c = vm.console();
        if open_phase().as_deref() == Some("rescue boot") && c.contains("lifeboat: recover: ") {
            phase("restore");
        }
        if c.contains("rebooting into the recovered system") {
            phase_end();
            break;
        }
        if let Some(i) = c.find("ERROR: recovery failed") {
            let from = c[..i].rfind("lifeboat: recover:").unwrap_or(0);
            panic!("recovery failed:\n{}", &c[from..]);
        }
        if t0.elapsed() > 30 * MIN {
            let tail: Vec<&str> = c.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "recovery did not finish in 30 min; its console ended with:\n{}",
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    vm.wait_exit(2 * MIN).unwrap();
    let c = vm.console();
    rescue_had_network(&c);
    c
}

/// The rescue OS brought its network up: a configured interface and a
/// default route, not "network: not configured" (a recovery from nfs,
/// http, sftp or s3 would have stopped there).
pub fn rescue_had_network(console: &str) {
    let lines: Vec<&str> = console
        .lines()
        .filter_map(|l| l.split_once("network: ").map(|(_, r)| r))
        .collect();
    assert!(
        !lines.is_empty() && lines.iter().all(|l| !l.starts_with("not configured")),
        "the rescue OS had no network: {lines:?}"
    );
    assert!(
        console.lines().any(|l| l.contains("address: default via ")),
        "the rescue OS had no default route"
    );
    assert!(
        !console.contains("Some(\""),
        "a message shows Rust's Debug formatting"
    );
}

/// `sha256sum` output of the three marker files equals the source's.
pub fn same_markers(sums: &str, src: &Source) {
    let lines = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| l.len() > 64 && l.as_bytes()[64] == b' ')
            .map(|l| l.trim().to_string())
            .collect()
    };
    assert_eq!(lines(sums), lines(&src.markers), "marker files differ");
    assert_eq!(lines(sums).len(), 3);
}

/// Boot the recovered disk through its own GRUB and compare with the source.
pub fn check_recovered(src: &Source, target: &Path, log: &str) {
    check_recovered_on(src, target, None, log)
}

/// A recovered UEFI disk on a machine with fresh NVRAM (no boot entries):
/// the firmware finds the removable-path loader \EFI\BOOT\BOOTX64.EFI and
/// the system boots; the markers are there.
pub fn check_boots_with_fresh_nvram(src: &Source, disk: &Path, log: &str) {
    assert!(src.uefi);
    let o = here(src).join("fresh-nvram.qcow2");
    sh_ok(&format!(
        "qemu-img create -q -f qcow2 -F raw -b {} {}",
        disk.display(),
        o.display()
    ));
    let spec = BootSpec {
        memory_mb: 1024,
        log: Some(here(src).join(log)),
        uefi: true,
        uefi_vars: None,
        ..BootSpec::from_disks()
    }
    .with_disk(&o, "qcow2", Some("LBSRC0"));
    let mut vm = Vm::boot(&spec).unwrap();
    let mut pos = vm
        .wait_for(PROMPT, 10 * MIN)
        .unwrap_or_else(|e| panic!("the recovered disk did not boot with fresh NVRAM: {e}"));
    run(&mut vm, &mut pos, "dmesg -n 1", MIN);
    let sums = run(
        &mut vm,
        &mut pos,
        "sha256sum /root/marker.bin /home/u/marker.bin /etc/marker.txt",
        MIN,
    );
    same_markers(&sums, src);
    // OVMF names what it loads: with fresh NVRAM, one of its own entries
    // for the disk (the removable path), never the OS's "debian".
    let c = vm.console();
    let loaded = c
        .lines()
        .find(|l| l.contains("BdsDxe: loading Boot"))
        .unwrap_or_else(|| panic!("OVMF did not say what it booted"))
        .to_string();
    assert!(
        !loaded.contains("\"debian\""),
        "fresh NVRAM should have no OS entry: {loaded}"
    );
}

/// Boot one disk of a recovered mirror (a qcow2 overlay of it) alone, the
/// other removed, through
/// its own GRUB: the system comes up on the degraded arrays with the
/// markers intact, and `/proc/mdstat` shows the arrays running on one of
/// two devices.
pub fn check_boots_alone(src: &Source, disk: &Path, serial: &str, log: &str) {
    let spec = BootSpec {
        memory_mb: 1024,
        log: Some(here(src).join(log)),
        ..BootSpec::from_disks()
    }
    .with_disk(disk, "qcow2", Some(serial));
    let mut vm = Vm::boot(&spec).unwrap();
    let mut pos = vm
        .wait_for(PROMPT, 10 * MIN)
        .unwrap_or_else(|e| panic!("{serial} alone did not boot to a shell: {e}"));
    run(&mut vm, &mut pos, "dmesg -n 1", MIN);
    let sums = run(
        &mut vm,
        &mut pos,
        "sha256sum /root/marker.bin /home/u/marker.bin /etc/marker.txt",
        MIN,
    );
    same_markers(&sums, src);
    let md = run(&mut vm, &mut pos, "cat /proc/mdstat", MIN);
    assert!(
        md.contains("[2/1]") && md.contains("active raid1"),
        "{serial} alone: the arrays should run degraded:\n{md}"
    );
}

/// [`check_recovered`] with the target attached as its serial says (NVMe
/// when it starts with [`NVME`]): the names change, nothing else may.
pub fn check_recovered_on(src: &Source, target: &Path, serial: Option<&str>, log: &str) {
    check_recovered_disks(src, &[(target, serial)], log)
}

/// [`check_recovered_on`] for a machine with several disks (the first
/// one's NVRAM is the machine's).
pub fn check_recovered_disks(src: &Source, targets: &[(&Path, Option<&str>)], log: &str) {
    phase("first boot");
    // A UEFI machine boots with the NVRAM its recovery wrote (fresh before
    // it, never the source's), else fresh NVRAM.
    let (target, serial) = targets[0];
    let nvram = nvram_of(target);
    let mut spec = BootSpec {
        memory_mb: 1024,
        log: Some(here(src).join(log)),
        uefi: src.uefi,
        uefi_vars: (src.uefi && nvram.is_file()).then_some(nvram),
        ..BootSpec::from_disks()
    };
    for (t, s) in targets {
        spec = attach(spec, t, "raw", *s);
    }
    let nvme = serial.is_some_and(|s| s.starts_with(NVME));
    let mut vm = Vm::boot(&spec).unwrap();
    let mut pos = vm
        .wait_for(PROMPT, 10 * MIN)
        .unwrap_or_else(|e| panic!("the recovered disk did not boot to a shell: {e}"));
    phase("check");
    run(&mut vm, &mut pos, "dmesg -n 1", MIN);
    let sums = run(
        &mut vm,
        &mut pos,
        "sha256sum /root/marker.bin /home/u/marker.bin /etc/marker.txt",
        MIN,
    );
    same_markers(&sums, src);
    let lsblk = if nvme {
        // Compared under the source's names: nvme0n1p3 is vda3.
        let out = run(
            &mut vm,
            &mut pos,
            &LSBLK.replace("/dev/vda", "/dev/nvme0n1"),
            MIN,
        );
        json_in(
            &out.replace("\"nvme0n1p", "\"vda")
                .replace("\"nvme0n1\"", "\"vda\""),
        )
    } else {
        json_in(&run(&mut vm, &mut pos, &lsblk_of(src.disks), MIN))
    };
    assert_eq!(lsblk, src.lsblk, "lsblk shape, UUIDs or mounts differ");
    let lvm_ids = prefixed(&run(&mut vm, &mut pos, LVS, MIN), "lv: ");
    assert_eq!(lvm_ids, src.lvm_ids, "VG/LV names or UUIDs differ");
    // update-grub in the rescue must write the same root= as the original.
    let cmdline = prefixed(&run(&mut vm, &mut pos, CMDLINE, MIN), "cmdline: ").join("\n");
    assert_eq!(
        cmdline, src.cmdline,
        "the recovered GRUB boots another command line"
    );
    let fstab = fstab_lines(&run(&mut vm, &mut pos, FSTAB, MIN));
    assert_eq!(fstab, src.fstab, "/etc/fstab differs from the source's");
    let crypttab = tagged_lines(&run(&mut vm, &mut pos, CRYPTTAB, MIN), "crypttab:");
    assert_eq!(
        crypttab, src.crypttab,
        "/etc/crypttab differs from the source's"
    );
    // (A crypttab of comments only, as the cryptsetup package installs it,
    // names no container.)
    if src
        .crypttab
        .lines()
        .any(|l| !l.is_empty() && !l.starts_with('#'))
    {
        // The new containers open with the source's passphrase.
        let out = run(
            &mut vm,
            &mut pos,
            &format!(
                "for d in $(blkid -t TYPE=crypto_LUKS -o device); do printf %s '{LUKS_PASS}' | \
                 cryptsetup open --test-passphrase --key-file=- $d && echo unlocks: $d; done; true"
            ),
            MIN,
        );
        assert!(
            out.contains("unlocks: /dev/"),
            "no LUKS container opens with the source's passphrase:\n{out}"
        );
    }
    if let Some((cmd, want)) = &src.probe {
        let got = probe_lines(&run(&mut vm, &mut pos, cmd, MIN));
        assert_eq!(
            &got, want,
            "the layout's probe differs from the source's: {cmd}"
        );
    }
    if let Some((cmd, want)) = src.extra {
        let out = run(&mut vm, &mut pos, cmd, MIN);
        assert!(out.contains(want), "{cmd}:\n{out}");
    }
    let log_dir = run(&mut vm, &mut pos, "ls /var/log/lifeboat/", MIN);
    assert!(
        log_dir.contains("recover.log") && log_dir.contains("layout.json"),
        "{log_dir}"
    );
    // No recovery marker is left behind.
    let markers = run(
        &mut vm,
        &mut pos,
        "echo left=$(ls -a / | grep -c '^[.]lifeboat-')",
        MIN,
    );
    assert!(markers.contains("left=0"), "{markers}");
}

/// Read-only loop mounts of a disk image's filesystems, unmounted (last
/// first) when dropped.
pub struct Mounts(pub Vec<PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let _ = Command::new("umount").arg(m).status();
        }
    }
}

/// The same comparisons as `check_recovered`, made on the disk image itself
/// instead of in a boot of it (about 80 s less per test under TCG). For the
/// tests whose subject is how the data got there (backup methods, servers,
/// media, interruptions, a bigger disk); the boot path is proven by test b
/// (MBR + LVM), the portable test and the rehearsal (GPT), which boot what
/// they recovered.
/// Partition table, filesystem types and UUIDs, partition UUIDs, marker
/// files, GRUB in the boot sector and the `root=` of grub.cfg, the state
/// command, recovery logs, no recovery marker left.
pub fn check_offline(src: &Source, target: &Path, name: &str) {
    phase("check");
    assert!(src.lvm_ids.is_empty(), "offline checks do not read LVM");
    let t: Value =
        serde_json::from_str(&sh_ok(&format!("sfdisk --json {}", target.display()))).unwrap();
    let pt = &t["partitiontable"];
    let sector = pt["sectorsize"].as_u64().unwrap_or(512);
    let parts = pt["partitions"]
        .as_array()
        .expect("the recovered disk has no partitions");
    let want = src.lsblk["blockdevices"][0]["children"]
        .as_array()
        .expect("the source's lsblk has no partitions");
    assert_eq!(parts.len(), want.len(), "the partition count differs");
    let mut mountpoints = vec![];
    for (p, w) in parts.iter().zip(want) {
        let off = p["start"].as_u64().unwrap() * sector;
        let ids = sh_ok(&format!(
            "blkid -p -o export -O {off} {} || true",
            target.display()
        ));
        let get = |k: &str| {
            ids.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(str::to_string)
        };
        let node = p["node"].as_str().unwrap();
        let partuuid = if pt["label"] == "gpt" {
            p["uuid"].as_str().map(str::to_lowercase)
        } else {
            let n: String = node
                .chars()
                .rev()
                .take_while(|c| c.is_ascii_digit())
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            let id = pt["id"].as_str().unwrap().trim_start_matches("0x");
            Some(format!("{id}-{:02x}", n.parse::<u32>().unwrap()))
        };
        assert_eq!(get("TYPE").as_deref(), w["fstype"].as_str(), "{node}: type");
        assert_eq!(get("UUID").as_deref(), w["uuid"].as_str(), "{node}: UUID");
        assert_eq!(
            get("LABEL").as_deref(),
            w["label"].as_str(),
            "{node}: LABEL"
        );
        assert_eq!(
            partuuid.as_deref(),
            w["partuuid"].as_str(),
            "{node}: PARTUUID"
        );
        if let Some(m) = w["mountpoint"].as_str().filter(|m| m.starts_with('/')) {
            mountpoints.push((m.to_string(), off));
        }
    }
    // Mount them as the system would (shortest mount point first).
    mountpoints.sort_by_key(|(m, _)| m.len());
    assert_eq!(
        mountpoints.first().map(|(m, _)| m.as_str()),
        Some("/"),
        "no root filesystem"
    );
    let root = here(src).join(format!("offline-{name}"));
    let mut mounts = Mounts(vec![]);
    for (m, off) in &mountpoints {
        let dir = root.join(m.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).unwrap();
        // Plain `ro`: a journal still needing recovery means the rescue
        // OS did not unmount the filesystem cleanly, which is a failure.
        let (ok, _, err) = sh(&format!(
            "mount -o ro,loop,offset={off} {} {}",
            target.display(),
            dir.display()
        ));
        assert!(
            ok,
            "the recovered {m} filesystem does not mount read-only (not cleanly unmounted?): {err}{}",
            sh("dmesg | tail -3").1
        );
        mounts.0.push(dir);
    }
    let r = root.display().to_string();
    let sums = sh_ok(&format!(
        "cd {r} && sha256sum root/marker.bin home/u/marker.bin etc/marker.txt | sed 's#  #  /#'"
    ));
    same_markers(&sums, src);
    let fstab: Vec<String> = std::fs::read_to_string(root.join("etc/fstab"))
        .expect("the recovered system has no /etc/fstab")
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    assert_eq!(
        fstab.join("\n"),
        src.fstab,
        "/etc/fstab differs from the source's"
    );
    let crypttab: Vec<String> = std::fs::read_to_string(root.join("etc/crypttab"))
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    assert_eq!(
        crypttab.join("\n"),
        src.crypttab,
        "/etc/crypttab differs from the source's"
    );
    // GRUB in the boot sector, and grub.cfg boots the original command line.
    let mut mbr = [0u8; 512];
    std::io::Read::read_exact(&mut std::fs::File::open(target).unwrap(), &mut mbr).unwrap();
    assert!(
        mbr.windows(4).any(|w| w == b"GRUB"),
        "no GRUB boot code in the recovered disk's first sector"
    );
    let cfg = std::fs::read_to_string(root.join("boot/grub/grub.cfg"))
        .expect("the recovered system has no /boot/grub/grub.cfg");
    let linux: Vec<&str> = cfg
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("linux"))
        .expect("grub.cfg has no linux line")
        .split_whitespace()
        .collect();
    for arg in src
        .cmdline
        .split_whitespace()
        .filter(|a| *a != "cmdline:" && !a.starts_with("BOOT_IMAGE="))
    {
        assert!(
            linux.contains(&arg),
            "the recovered grub.cfg boots another command line: {linux:?} lacks {arg}"
        );
    }
    if let Some((cmd, want)) = src.extra {
        let out = sh_ok(&format!("R={r}; {cmd}"));
        assert!(out.contains(want), "{cmd}:\n{out}");
    }
    let logs = root.join("var/log/lifeboat");
    for f in ["recover.log", "layout.json"] {
        assert!(logs.join(f).is_file(), "{f} missing in {}", logs.display());
    }
    let left: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(".lifeboat-"))
        .collect();
    assert!(left.is_empty(), "recovery markers left behind: {left:?}");
    drop(mounts);
}

/// The rescue image directory mkbackup wrote to /rescue of the backup disk.
pub fn rescue_dir(src: &Source) -> PathBuf {
    let dir = src.work.join("image");
    if !dir.join("rescue/manifest.json").is_file() {
        sh_ok(&format!(
            "rm -rf {d} && mkdir -p {d} && debugfs -R 'rdump /rescue {d}' {b} 2>/dev/null",
            d = dir.display(),
            b = src.backup.display()
        ));
    }
    dir.join("rescue")
}

/// `lifeboat rehearse` of the source's rescue image and backup disk.
pub fn rehearse(src: &Source, backup: &Path, work: &Path) -> (bool, Value) {
    let out = lifeboat(&src.work.join("no-etc"))
        .args([
            "rehearse", "--json", "--keep", "--accel", "tcg", "--memory", "1536",
        ])
        .args(["--timeout", "30", "--boot-timeout", "10"])
        .arg("--image")
        .arg(rescue_dir(src))
        .arg("--backup-disk")
        .arg(backup)
        .arg("--work")
        .arg(work)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "rehearse printed no JSON report ({e}):\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), report)
}

/// Recovery over the network from `name` (nfs, cifs, http): the backup
/// disk is still attached (it carries the rescue images), but the backup
/// itself is only on the server.
pub fn recover_from_server(name: &str, found: &str) {
    let src = net_source().with_image(name);
    let target = here(&src).join(format!("target-{name}.raw"));
    blank(&target, "3G");
    let t0 = sha(&target);
    let console = recover(
        &src,
        &[(&target, Some("LBSRC0"))],
        "",
        &format!("recover-{name}.log"),
    );
    assert_ne!(sha(&target), t0);
    let line = console
        .lines()
        .find(|l| l.contains("backup found in"))
        .unwrap_or_else(|| panic!("no 'backup found' line:\n{console}"));
    assert!(line.contains(found), "{line}");
    assert!(
        !console.contains(SMB_PASSWORD),
        "the share password is on the console"
    );
    check_offline(&src, &target, name);
}

pub fn walk(d: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(d).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            v.extend(walk(&e.path()));
        } else {
            v.push(e.path());
        }
    }
    v
}

/// Boot `src`'s rescue image with a network card that leads nowhere
/// (a UDP socket nobody reads), `mac` chosen by the test.
pub fn dead_nic_vm(src: &Source, target: &Path, mac: &str, log: &str) -> Vm {
    let mut spec = BootSpec {
        memory_mb: 1536,
        append: "console=ttyS0 lifeboat.recover=auto".into(),
        log: Some(here(src).join(log)),
        ..BootSpec::new(&src.kernel, &src.initrd)
    }
    .with_disk(target, "raw", Some("LBSRC0"))
    .with_disk(&src.backup, "raw,readonly=on", None);
    spec.extra_args.extend(
        [
            "-netdev",
            "socket,id=dead,udp=127.0.0.1:9,localaddr=127.0.0.1:0",
            "-device",
            &format!("virtio-net-pci,netdev=dead,mac={mac}"),
        ]
        .map(String::from),
    );
    phase("rescue boot");
    Vm::boot(&spec).unwrap()
}

/// The unattended recovery's failure: its console from the start of the
/// recovery.
pub fn await_failure(vm: &mut Vm, what: &str) -> String {
    vm.wait_for("ERROR: recovery failed", 10 * MIN)
        .unwrap_or_else(|e| panic!("{what}: the recovery did not fail as expected: {e}"));
    std::thread::sleep(Duration::from_secs(1));
    vm.console()
}
