//! End to end: a real Debian system (mmdebstrap, installed with GRUB on a
//! virtual disk by qemu/fixtures/debian-disk.sh) boots, gets marker files,
//! runs `lifeboat mkbackup` with backup and rescue image going to a second
//! disk; a blank VM boots that rescue image with `lifeboat.recover=auto`;
//! then the target disk boots through its own GRUB and must show the same
//! markers, filesystem UUIDs and lsblk shape.

mod common;

use common::*;
use lifeboat_qemu::{BootSpec, Vm};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

const PROMPT: &str = "root@lbsrc:~#";
const MIN: Duration = Duration::from_secs(60);

/// A backed-up source system.
#[derive(Clone)]
struct Source {
    work: PathBuf,
    backup: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    /// `sha256sum` lines of the marker files.
    markers: String,
    /// `lsblk --json` of the source disk.
    lsblk: Value,
    /// VG and LV UUIDs (`lvs`), empty without LVM.
    lvm_ids: Vec<String>,
    /// The kernel command line GRUB gave the source.
    cmdline: String,
    /// A command for the recovered system and what its output must hold
    /// (paths prefixed with `$R`: empty in the booted system, the mount
    /// point when the disk is checked offline).
    extra: Option<(&'static str, &'static str)>,
    /// The rescue VM needs a NIC (the backup is on a server).
    net: bool,
    /// Other rescue images made by the same source (name → kernel, initrd).
    images: Vec<(String, PathBuf, PathBuf)>,
    /// Registered with `lifeboat serve` (Servers::serve): the host's token.
    serve_token: Option<String>,
}

impl Source {
    /// The same source, recovered with another of its rescue images.
    fn with_image(&self, name: &str) -> Source {
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
struct Servers {
    nfs: lifeboat_qemu::servers::Server,
    cifs: lifeboat_qemu::servers::Server,
    http: lifeboat_qemu::servers::Server,
    /// `lifeboat serve`, which the network source registers with.
    serve: lifeboat_qemu::servers::Server,
}

const SMB_PASSWORD: &str = "smb-harness-pw-0815";

fn servers() -> &'static Servers {
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
enum Variant {
    /// file:// URL, one full set.
    Plain,
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

const PASSPHRASE: &str = "harness passphrase 4711";

const LVS: &str =
    "lvs --noheadings -o vg_name,vg_uuid,lv_name,lv_uuid 2>/dev/null | sed 's/^ */lv: /'";
const CMDLINE: &str = "sed 's/^/cmdline: /' /proc/cmdline";

fn prefixed(out: &str, p: &str) -> Vec<String> {
    out.lines()
        .filter(|l| l.starts_with(p))
        .map(|l| l.trim().to_string())
        .collect()
}

fn sh_ok(cmd: &str) -> String {
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
fn clean_stale() {
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

fn work_dir(name: &str) -> PathBuf {
    clean_stale();
    let d = std::env::temp_dir().join(format!("lifeboat-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The installed Debian disk for `layout` (cached by content hash).
fn debian_disk(layout: &str) -> PathBuf {
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

fn run(vm: &mut Vm, pos: &mut usize, cmd: &str, t: Duration) -> String {
    let r = vm
        .run_command(*pos, cmd, t)
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    *pos = r.end;
    assert_eq!(r.status, 0, "{cmd} exited {}:\n{}", r.status, r.output);
    r.output
}

fn json_in(text: &str) -> Value {
    let start = text.find('{').expect("no JSON in output");
    let end = text.rfind('}').unwrap();
    serde_json::from_str(&text[start..=end]).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Boot the source system, put markers on it and run mkbackup.
fn make_source(layout: &str, variant: Variant) -> Source {
    let disk = debian_disk(layout);
    let work = work_dir(&format!(
        "src-{layout}{}",
        match variant {
            Variant::Encrypted => "-enc",
            Variant::Restic => "-restic",
            Variant::Borg => "-borg",
            Variant::Network => "-net",
            _ => "",
        }
    ));
    let overlay = work.join("src.qcow2");
    sh_ok(&format!(
        "qemu-img create -q -f qcow2 -F raw -b {} {}",
        disk.display(),
        overlay.display()
    ));
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
    let mut spec = BootSpec {
        memory_mb: 1536,
        log: Some(work.join("source-console.log")),
        ..BootSpec::from_disks()
    }
    .with_disk(&overlay, "qcow2", Some("LBSRC0"))
    .with_disk(&backup, "raw", None);
    if variant == Variant::Network {
        spec = spec.with_user_net("");
    }
    let mut vm = Vm::boot(&spec).unwrap();
    let mut pos = vm.wait_for(PROMPT, 10 * MIN).unwrap();
    // Kernel messages must not land in the middle of command output.
    run(&mut vm, &mut pos, "dmesg -n 1", MIN);
    // The rescue images built in these VMs compress their layers with
    // zstd level 1: under TCG that saves about half a minute per image
    // (the default level is covered by the host-side image tests).
    run(
        &mut vm,
        &mut pos,
        "mkdir -p /backup /etc/lifeboat/conf.d && mount /dev/vdb /backup && \
         printf '[rescue]\ncompression_level = 1\n' > /etc/lifeboat/conf.d/00-e2e-speed.toml",
        MIN,
    );
    let markers = run(
        &mut vm,
        &mut pos,
        "mkdir -p /home/u && head -c 3M /dev/urandom > /root/marker.bin && head -c 1M /dev/urandom > /home/u/marker.bin \
         && date > /etc/marker.txt && sha256sum /root/marker.bin /home/u/marker.bin /etc/marker.txt",
        MIN,
    );
    let lsblk = json_in(&run(
        &mut vm,
        &mut pos,
        "lsblk --json -o NAME,TYPE,FSTYPE,UUID,PARTUUID,MOUNTPOINT /dev/vda",
        MIN,
    ));
    let lvm_ids = prefixed(&run(&mut vm, &mut pos, LVS, MIN), "lv: ");
    let cmdline = prefixed(&run(&mut vm, &mut pos, CMDLINE, MIN), "cmdline: ").join("\n");
    assert!(cmdline.contains("root="), "{cmdline}");
    let mut extra = None;
    let mut images = vec![];
    let mut serve_token = None;
    if variant == Variant::Network {
        let sv = servers();
        run(
            &mut vm,
            &mut pos,
            "i=$(ls /sys/class/net | grep -v '^lo$' | head -1) && ip link set $i up && ip addr add 10.0.2.15/24 dev $i && \
             ip route add default via 10.0.2.2 && mkdir -p /etc/lifeboat",
            MIN,
        );
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
            let out = run(
                &mut vm,
                &mut pos,
                &format!(
                    "{before} && lifeboat -c /root/lb-{name}.toml mkbackup {out_arg} \
                     > /root/mkbackup-{name}.log 2>&1; s=$?; tail -25 /root/mkbackup-{name}.log; test $s = 0"
                ),
                20 * MIN,
            );
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
        let out = run(
            &mut vm,
            &mut pos,
            "/backup/bin/lifeboat -c /root/lb.toml mkbackup --backup-url file:///backup/store --output-dir /backup/rescue \
             > /backup/mkbackup.log 2>&1; s=$?; grep 'backup with' /backup/mkbackup.log; tail -25 /backup/mkbackup.log; test $s = 0",
            30 * MIN,
        );
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
        run(
            &mut vm,
            &mut pos,
            "/backup/bin/lifeboat -c /root/lb.toml mkbackup --no-rescue --backup-url file:///backup/store > /backup/full.log 2>&1; \
             s=$?; tail -15 /backup/full.log; test $s = 0",
            20 * MIN,
        );
        run(
            &mut vm,
            &mut pos,
            "rm /root/gone.txt && echo v1 > /root/changed.txt && echo new > /root/new.txt",
            MIN,
        );
        let out = run(
            &mut vm,
            &mut pos,
            "/backup/bin/lifeboat -c /root/lb.toml mkbackup --backup-url file:///backup/store --output-dir /backup/rescue \
             > /backup/incr.log 2>&1; s=$?; tail -25 /backup/incr.log; test $s = 0",
            20 * MIN,
        );
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
        let out = run(
            &mut vm,
            &mut pos,
            "/backup/bin/lifeboat -c /root/lb.toml mkbackup --backup-url file:///backup/store --output-dir /backup/rescue \
             > /backup/mkbackup.log 2>&1; s=$?; grep 'backup with' /backup/mkbackup.log; tail -25 /backup/mkbackup.log; test $s = 0",
            30 * MIN,
        );
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
        let out = run(
            &mut vm,
            &mut pos,
            "systemctl start lifeboat-mkbackup.service; s=$?; \
             journalctl -u lifeboat-mkbackup.service --no-pager -o cat \
             | grep -E '^(layout saved to|backup .* written to|rescue image for kernel)'; test $s = 0",
            20 * MIN,
        );
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
            "full backup of / (tar)",
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
            !out.contains("EXISTS:"),
            "mkbackup --dry-run wrote something or ran a hook:\n{out}"
        );
        let out = run(
            &mut vm,
            &mut pos,
            "/backup/bin/lifeboat mkbackup --backup-url file:///backup/store --output-dir /backup/rescue > /backup/mkbackup.log 2>&1; \
             s=$?; grep hook /backup/mkbackup.log; tail -25 /backup/mkbackup.log; test $s = 0",
            20 * MIN,
        );
        assert!(
            out.contains("post_backup says result=success"),
            "the post_backup hook did not report success:\n{out}"
        );
        extra = Some((
            "echo state: $(cat $R/root/pre-backup.txt) $(cat $R/root/post-recovery.txt)",
            "state: pre-pre_backup-mkbackup post_recovery-success",
        ));
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
        extra,
        net: variant == Variant::Network,
        images,
        serve_token,
    }
}

/// The rescue image (kernel, initrd) a mkrescue wrote to `dir`.
fn rescue_in(dir: &Path) -> (PathBuf, PathBuf) {
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
fn read_rescue(backup: &Path, work: &Path, name: &str) -> (PathBuf, PathBuf) {
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
fn shared_source(
    cell: &'static OnceLock<Result<Source, String>>,
    layout: &str,
    variant: Variant,
) -> &'static Source {
    let built = cell.get_or_init(|| {
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
        Ok(s) => s,
        Err(e) => panic!("the {layout} source system could not be built: {e}"),
    }
}

fn gpt_source() -> &'static Source {
    static S: OnceLock<Result<Source, String>> = OnceLock::new();
    shared_source(&S, "gpt-bios", Variant::Plain)
}

fn lvm_source() -> &'static Source {
    static S: OnceLock<Result<Source, String>> = OnceLock::new();
    shared_source(&S, "mbr-lvm", Variant::Usb)
}

fn enc_source() -> &'static Source {
    static S: OnceLock<Result<Source, String>> = OnceLock::new();
    shared_source(&S, "gpt-bios", Variant::Encrypted)
}

fn restic_source() -> &'static Source {
    static S: OnceLock<Result<Source, String>> = OnceLock::new();
    shared_source(&S, "gpt-bios", Variant::Restic)
}

fn borg_source() -> &'static Source {
    static S: OnceLock<Result<Source, String>> = OnceLock::new();
    shared_source(&S, "gpt-bios", Variant::Borg)
}

fn net_source() -> &'static Source {
    static S: OnceLock<Result<Source, String>> = OnceLock::new();
    shared_source(&S, "gpt-bios", Variant::Network)
}

fn blank(path: &Path, size: &str) {
    sh_ok(&format!(
        "rm -f {p} && truncate -s {size} {p}",
        p = path.display()
    ));
}

fn sha(path: &Path) -> String {
    sh_ok(&format!("sha256sum {}", path.display()))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Boot the rescue image of `src` on `disks` (target first; the backup disk
/// is attached read-only after them).
fn rescue_vm(src: &Source, disks: &[(&Path, Option<&str>)], append: &str, log: &str) -> Vm {
    rescue_vm_with(src, &src.backup, disks, append, log)
}

fn rescue_vm_with(
    src: &Source,
    backup: &Path,
    disks: &[(&Path, Option<&str>)],
    append: &str,
    log: &str,
) -> Vm {
    let mut spec = BootSpec {
        memory_mb: 1536,
        append: format!("console=ttyS0 {append}"),
        log: Some(src.work.join(log)),
        ..BootSpec::new(&src.kernel, &src.initrd)
    };
    for (d, serial) in disks {
        spec = spec.with_disk(d, "raw", *serial);
    }
    if src.net {
        spec = spec.with_user_net("");
    }
    spec = spec.with_disk(backup, "raw,readonly=on", None);
    Vm::boot(&spec).unwrap()
}

/// Unattended recovery onto `disks`; returns the console.
fn recover(src: &Source, disks: &[(&Path, Option<&str>)], append: &str, log: &str) -> String {
    let mut vm = rescue_vm(src, disks, &format!("lifeboat.recover=auto {append}"), log);
    await_recovery(&mut vm)
}

/// Wait for an unattended recovery to finish and the VM to stop; returns
/// the console.
fn await_recovery(vm: &mut Vm) -> String {
    let t0 = std::time::Instant::now();
    loop {
        let c = vm.console();
        if c.contains("rebooting into the recovered system") {
            break;
        }
        if let Some(i) = c.find("ERROR: recovery failed") {
            let from = c[..i].rfind("lifeboat: recover:").unwrap_or(0);
            panic!("recovery failed:\n{}", &c[from..]);
        }
        assert!(
            t0.elapsed() < 30 * MIN,
            "recovery did not finish in 30 min:\n{c}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    vm.wait_exit(2 * MIN).unwrap();
    vm.console()
}

/// `sha256sum` output of the three marker files equals the source's.
fn same_markers(sums: &str, src: &Source) {
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
fn check_recovered(src: &Source, target: &Path, log: &str) {
    let spec = BootSpec {
        memory_mb: 1024,
        log: Some(src.work.join(log)),
        ..BootSpec::from_disks()
    }
    .with_disk(target, "raw", None);
    let mut vm = Vm::boot(&spec).unwrap();
    let mut pos = vm
        .wait_for(PROMPT, 10 * MIN)
        .unwrap_or_else(|e| panic!("the recovered disk did not boot to a shell: {e}"));
    run(&mut vm, &mut pos, "dmesg -n 1", MIN);
    let sums = run(
        &mut vm,
        &mut pos,
        "sha256sum /root/marker.bin /home/u/marker.bin /etc/marker.txt",
        MIN,
    );
    same_markers(&sums, src);
    let lsblk = json_in(&run(
        &mut vm,
        &mut pos,
        "lsblk --json -o NAME,TYPE,FSTYPE,UUID,PARTUUID,MOUNTPOINT /dev/vda",
        MIN,
    ));
    assert_eq!(lsblk, src.lsblk, "lsblk shape, UUIDs or mounts differ");
    let lvm_ids = prefixed(&run(&mut vm, &mut pos, LVS, MIN), "lv: ");
    assert_eq!(lvm_ids, src.lvm_ids, "VG/LV names or UUIDs differ");
    // update-grub in the rescue must write the same root= as the original.
    let cmdline = prefixed(&run(&mut vm, &mut pos, CMDLINE, MIN), "cmdline: ").join("\n");
    assert_eq!(
        cmdline, src.cmdline,
        "the recovered GRUB boots another command line"
    );
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
struct Mounts(Vec<PathBuf>);

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
fn check_offline(src: &Source, target: &Path, name: &str) {
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
    let root = src.work.join(format!("offline-{name}"));
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
fn rescue_dir(src: &Source) -> PathBuf {
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
fn rehearse(src: &Source, backup: &Path, work: &Path) -> (bool, Value) {
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

#[test]
fn a_gpt_bios_ext4_swap_same_size_rehearsed() {
    // `lifeboat rehearse` recovers onto scratch disks like the originals
    // (same size and serial) and boots the result through its own GRUB.
    let src = gpt_source();
    let w = src.work.join("rehearse-a");
    let (ok, report) = rehearse(src, &src.backup, &w);
    assert!(ok && report["ok"] == true, "rehearse failed: {report:#}");
    let phases: Vec<&str> = report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        [
            "rescue boot",
            "pre-flight",
            "disks",
            "restore",
            "finalize",
            "system boot"
        ]
    );
    let sum: f64 = report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let s = p["seconds"].as_f64().unwrap();
            assert!(s > 0.0 && p["ok"] == true, "{p}");
            s
        })
        .sum();
    assert!((report["rto_seconds"].as_f64().unwrap() - sum).abs() < 0.01);
    let console = std::fs::read_to_string(w.join("rescue-console.log")).unwrap();
    assert!(
        console.contains("[same serial]"),
        "mapping by serial expected"
    );
    // The pre_recovery hook ran before the disks were touched.
    let hook = console
        .find("pre_recovery says target=/mnt/local")
        .expect("the pre_recovery hook's output is missing");
    let disks = console.find("recreating disks").unwrap();
    assert!(hook < disks, "the pre_recovery hook ran after the disks");
    // The recovered copy: the same system (the probe unit removed itself).
    check_offline(src, &w.join("disk0.raw"), "a");
    let _ = std::fs::remove_dir_all(&w);
}

#[test]
fn rehearse_fails_on_a_damaged_backup_and_names_the_phase() {
    let src = gpt_source();
    let damaged = src.work.join("damaged-backup.img");
    let mnt = src.work.join("damaged-mnt");
    // A copy of the backup disk with one byte of the biggest volume changed.
    sh_ok(&format!(
        "cp --sparse=always {b} {d} && mkdir -p {m} && mount -o loop {d} {m} && \
         f=$(find {m}/store -type f -name '*.tar*' -printf '%s %p\\n' | sort -n | tail -1 | cut -d' ' -f2) && \
         printf Z | dd of=\"$f\" bs=1 seek=100000 conv=notrunc 2>/dev/null && umount {m}",
        b = src.backup.display(),
        d = damaged.display(),
        m = mnt.display()
    ));
    let w = src.work.join("rehearse-damaged");
    let (ok, report) = rehearse(src, &damaged, &w);
    assert!(!ok, "rehearse passed on a damaged backup: {report:#}");
    assert_eq!(report["ok"], false);
    assert_eq!(report["failed_phase"], "pre-flight", "{report:#}");
    let msg = report["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("sha256") || msg.contains("damaged") || msg.contains("nothing was written"),
        "{report:#}"
    );
    // Nothing was written to the scratch disk.
    let (_, zeros, _) = sh(&format!(
        "cmp -n 1048576 {} /dev/zero && echo all-zero",
        w.join("disk0.raw").display()
    ));
    assert!(zeros.contains("all-zero"), "the scratch disk was written");
    let _ = std::fs::remove_file(&damaged);
    let _ = std::fs::remove_dir_all(&w);
}

#[test]
fn c_gpt_bios_onto_a_bigger_disk_leaves_other_disks_alone() {
    let src = gpt_source();
    let target = src.work.join("target-c.raw");
    blank(&target, "4608M");
    // A disk that is not in the mapping: its bytes must not change.
    let other = src.work.join("other-c.raw");
    blank(&other, "2G");
    sh_ok(&format!(
        "head -c 4M /dev/urandom | dd of={} conv=notrunc status=none",
        other.display()
    ));
    let before = sha(&other);
    let console = recover(
        src,
        &[(&target, Some("NEWDISK")), (&other, Some("OTHER"))],
        "lifeboat.map=vda:vda",
        "recover-c.log",
    );
    assert!(
        console.contains("[mapping file]"),
        "explicit mapping expected"
    );
    // Its identity was pinned at pre-flight and compared again right
    // before the first write.
    assert!(
        console
            .contains("checked /dev/vda again before writing: serial NEWDISK, no partition table"),
        "no re-check before the first write"
    );
    // The rescue system's own files were checked against its layers' lists.
    assert!(
        console.contains("lifeboat: rescue system checked: ")
            && console.contains("files match the lists of layers base, modules-"),
        "no integrity check of the rescue system"
    );
    assert_eq!(sha(&other), before, "an unmapped disk was written");
    // The root partition grew by the extra 1.5 GiB.
    let t = sh_ok(&format!("sfdisk --json {}", target.display()));
    let t: Value = serde_json::from_str(&t).unwrap();
    let parts = t["partitiontable"]["partitions"].as_array().unwrap();
    let last = parts.last().unwrap()["size"].as_u64().unwrap();
    assert!(
        last * 512 > (3 << 30) + (1 << 29),
        "root partition not grown: {last} sectors"
    );
    check_offline(src, &target, "c");
}

#[test]
fn b_mbr_boot_plus_lvm() {
    let src = lvm_source();
    let target = src.work.join("target-b.raw");
    blank(&target, "4G");
    assert_eq!(
        src.lvm_ids.len(),
        3,
        "root, home and swap LVs expected: {:?}",
        src.lvm_ids
    );
    let console = recover(src, &[(&target, None)], "", "recover-b.log");
    assert!(
        console.contains("vgcfgrestore"),
        "the VG should be restored with its UUIDs"
    );
    assert!(
        console.contains("[same name and size]"),
        "mapping by name and size expected"
    );
    check_recovered(src, &target, "boot-b.log");
}

#[test]
fn interrupted_restore_is_completed_by_a_second_run() {
    let src = gpt_source();
    let target = src.work.join("target-i.raw");
    blank(&target, "3G");
    let mut vm = rescue_vm(
        src,
        &[(&target, Some("LBSRC0"))],
        "lifeboat.recover=auto",
        "recover-i1.log",
    );
    vm.wait_for("lifeboat: restoring / from set", 20 * MIN)
        .unwrap();
    std::thread::sleep(Duration::from_secs(8));
    drop(vm); // power cut in the middle of the restore
    let console = recover(src, &[(&target, Some("LBSRC0"))], "", "recover-i2.log");
    assert!(
        console.contains("partition table on /dev/vda: already there"),
        "the second run should keep the partition table"
    );
    assert!(console.contains("already there (from an earlier run), kept"));
    check_offline(src, &target, "i");
}

#[test]
fn dry_run_prints_the_plan_and_a_too_small_disk_is_refused_untouched() {
    let src = gpt_source();
    let target = src.work.join("target-d.raw");
    blank(&target, "3G");
    let small = src.work.join("small-d.raw");
    blank(&small, "512M");
    let (t0, s0) = (sha(&target), sha(&small));
    let mut vm = rescue_vm(
        src,
        &[(&target, Some("LBSRC0")), (&small, Some("SMALL"))],
        "",
        "rescue-d.log",
    );
    let mut pos = vm.wait_for("lifeboat: ready", 5 * MIN).unwrap();
    let out = run(
        &mut vm,
        &mut pos,
        "lifeboat recover --dry-run 2>&1",
        5 * MIN,
    );
    let order = [
        "wipefs --all --force /dev/vda",
        "sfdisk --no-reread --no-tell-kernel -q /dev/vda",
        "mkswap -f -U",
        "mke2fs -F -q -t ext4 -U",
        "mount -t ext4 -o defaults /dev/vda3 /run/lifeboat/restore",
        "tar --extract",
        "umount /run/lifeboat/restore",
        "mount -t ext4 -o defaults /dev/vda3 /mnt/local",
        "grub-install --target=i386-pc --recheck /dev/vda",
        "update-grub",
        "umount --recursive /mnt/local",
        "dry run finished; nothing was written",
    ];
    let mut at = 0;
    for o in order {
        let i = out[at..]
            .find(o)
            .unwrap_or_else(|| panic!("{o:?} missing or out of order in:\n{out}"));
        at += i + o.len();
    }
    let r = vm
        .run_command(
            pos,
            "echo '/dev/vda /dev/vdb' > /tmp/map; lifeboat recover --auto --map /tmp/map 2>&1",
            5 * MIN,
        )
        .unwrap();
    pos = r.end;
    assert_ne!(
        r.status, 0,
        "recovery onto a 512 MiB disk must fail:\n{}",
        r.output
    );
    assert!(
        r.output.contains("too small for the data") && r.output.contains("Nothing was written"),
        "{}",
        r.output
    );
    // The plan's disk write-protected by serial: it is refused as a target
    // with the reason, so the expected disk is missing and nothing is done.
    let r = vm
        .run_command(
            pos,
            "printf '[recover]\\nprotect = [\"SERIAL=LBSRC0\"]\\n' > /tmp/protect.toml; \
             lifeboat -c /tmp/protect.toml recover --auto 2>&1",
            5 * MIN,
        )
        .unwrap();
    pos = r.end;
    assert_ne!(r.status, 0, "a protected disk was accepted:\n{}", r.output);
    for want in [
        "not a target: /dev/vda: /dev/vda matches the write-protected identity SERIAL=LBSRC0",
        "no target disk for /dev/vda",
        "serial LBSRC0",
        "Nothing was written",
    ] {
        assert!(r.output.contains(want), "{want:?} missing:\n{}", r.output);
    }
    let _ = pos;
    drop(vm);
    assert_eq!(sha(&target), t0, "dry run wrote the disk");
    assert_eq!(sha(&small), s0, "refused recovery wrote the disk");
}

#[test]
fn encrypted_incremental_split_backup_needs_its_key_and_refuses_damage() {
    let src = enc_source();
    let target = src.work.join("target-e.raw");
    blank(&target, "3G");
    let t0 = sha(&target);
    // The key is nowhere in the rescue image.
    let rescue = src.work.join("rescue-dir");
    sh_ok(&format!(
        "mkdir -p {r} && debugfs -R 'rdump /rescue {r}' {b} 2>/dev/null",
        r = rescue.display(),
        b = src.backup.display()
    ));
    let tree = src.work.join("rescue-tree");
    unpack(&rescue.join("rescue"), &tree);
    let leak = sh_ok(&format!(
        "grep -rlF '{PASSPHRASE}' {} || echo no-leak",
        tree.display()
    ));
    assert!(
        leak.contains("no-leak"),
        "the passphrase is in the rescue image: {leak}"
    );
    // 1. A flipped byte in the first volume: the pre-flight stops, nothing written.
    let bad = src.work.join("backup-bad.img");
    std::fs::copy(&src.backup, &bad).unwrap();
    let sets = sh_ok(&format!(
        "debugfs -R 'ls -p /store/lbsrc' {} 2>/dev/null",
        bad.display()
    ));
    let full = sets
        .split('/')
        .find(|f| f.ends_with("-full"))
        .expect("no full set on the backup disk")
        .to_string();
    let vol = format!("/store/lbsrc/{full}/root.tar.zst.000");
    let blk = sh_ok(&format!(
        "debugfs -R 'bmap {vol} 3' {} 2>/dev/null",
        bad.display()
    ));
    let blk: u64 = blk
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("bmap said {blk:?}"));
    sh_ok(&format!(
        "printf '\\x5a\\x5a\\x5a\\x5a' | dd of={} bs=1 seek={} conv=notrunc status=none",
        bad.display(),
        blk * 4096 + 100
    ));
    let mut vm = rescue_vm_with(
        src,
        &bad,
        &[(&target, Some("LBSRC0"))],
        "lifeboat.recover=auto",
        "recover-e1.log",
    );
    vm.wait_for("recovery failed", 10 * MIN).unwrap();
    let c = vm.console();
    assert!(
        c.contains("root.tar.zst.000 is damaged"),
        "{}",
        &c[c.len().saturating_sub(3000)..]
    );
    drop(vm);
    assert_eq!(sha(&target), t0, "a damaged backup led to writes");
    // 1b. A truncated last volume: the pre-flight stops, nothing written.
    let cut = src.work.join("backup-cut.img");
    std::fs::copy(&src.backup, &cut).unwrap();
    let files = sh_ok(&format!(
        "debugfs -R 'ls -p /store/lbsrc/{full}' {} 2>/dev/null",
        cut.display()
    ));
    let last = files
        .split('/')
        .filter(|f| f.starts_with("root.tar"))
        .max()
        .expect("no root volumes")
        .to_string();
    assert!(
        files
            .split('/')
            .filter(|f| f.starts_with("root.tar"))
            .count()
            > 1,
        "split volumes expected: {files}"
    );
    sh_ok(&format!(
        "debugfs -w -R 'sif /store/lbsrc/{full}/{last} size 1000' {} 2>&1",
        cut.display()
    ));
    let mut vm = rescue_vm_with(
        src,
        &cut,
        &[(&target, Some("LBSRC0"))],
        "lifeboat.recover=auto",
        "recover-e1b.log",
    );
    vm.wait_for("recovery failed", 10 * MIN).unwrap();
    let c = vm.console();
    assert!(
        c.contains(&format!("{last} has 1000 bytes")) && c.contains("truncated"),
        "{}",
        &c[c.len().saturating_sub(3000)..]
    );
    drop(vm);
    assert_eq!(sha(&target), t0, "a truncated backup led to writes");
    // 2. Unattended without the key: refused; 3. a wrong key: refused;
    // 4. the right key: the chain (full + incremental, split, encrypted) restores.
    let mut vm = rescue_vm(
        src,
        &[(&target, Some("LBSRC0"))],
        "lifeboat.recover=auto",
        "recover-e2.log",
    );
    let mut pos = vm.wait_for("recovery failed", 10 * MIN).unwrap();
    assert!(vm.console().contains("is encrypted and no key was given"));
    pos = vm.wait_for_from("lifeboat:~#", pos, MIN).unwrap();
    let r = vm
        .run_command(
            pos,
            "echo wrong > /tmp/k; lifeboat recover --auto --backup-key /tmp/k 2>&1 | tail -5",
            10 * MIN,
        )
        .unwrap();
    pos = r.end;
    assert!(
        r.output.contains("does not open this backup"),
        "{}",
        r.output
    );
    assert_eq!(sha(&target), t0, "a wrong key led to writes");
    let r = vm
        .run_command(
            pos,
            &format!("echo '{PASSPHRASE}' > /tmp/k; lifeboat recover --auto --backup-key /tmp/k > /tmp/r.log 2>&1; s=$?; tail -8 /tmp/r.log; test $s = 0"),
            30 * MIN,
        )
        .unwrap();
    assert_eq!(r.status, 0, "{}", r.output);
    assert!(
        r.output.contains("lifeboat: recovery finished"),
        "{}",
        r.output
    );
    // Both sets of the chain were applied to the root filesystem.
    let mut pos = r.end;
    let n = run(
        &mut vm,
        &mut pos,
        "echo sets=$(grep -c 'lifeboat: restoring / from set' /tmp/r.log)",
        MIN,
    );
    assert!(n.contains("sets=2"), "{n}");
    drop(vm);
    check_offline(src, &target, "e");
}

#[test]
fn recovery_from_a_restic_repository_through_the_shipped_recipe() {
    let src = restic_source();
    let target = src.work.join("target-r.raw");
    blank(&target, "3G");
    let console = recover(src, &[(&target, Some("LBSRC0"))], "", "recover-r.log");
    assert!(
        console.contains("checking the backup with restic"),
        "the recipe's check must run first"
    );
    assert!(console.contains("lifeboat: restoring with restic"));
    check_offline(src, &target, "restic");
}

#[test]
fn recovery_from_a_borg_repository_through_the_shipped_recipe() {
    let src = borg_source();
    let target = src.work.join("target-borg.raw");
    blank(&target, "3G");
    let console = recover(src, &[(&target, Some("LBSRC0"))], "", "recover-borg.log");
    assert!(
        console.contains("checking the backup with borg"),
        "the recipe's check must run first"
    );
    assert!(console.contains("lifeboat: restoring with borg"));
    check_offline(src, &target, "borg");
}

/// Recovery over the network from `name` (nfs, cifs, http): the backup
/// disk is still attached (it carries the rescue images), but the backup
/// itself is only on the server.
fn recover_from_server(name: &str, found: &str) {
    let src = net_source().with_image(name);
    let target = src.work.join(format!("target-{name}.raw"));
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

#[test]
fn recovery_from_an_nfs_server() {
    recover_from_server("nfs", "/run/lifeboat/net/nfs-10.0.2.2_backup/lbsrc");
}

#[test]
fn recovery_from_a_samba_share() {
    recover_from_server(
        "cifs",
        "/run/lifeboat/net/cifs-10.0.2.2_backup_lifeboat/lifeboat/lbsrc",
    );
}

/// `lifeboat backup ls|verify --json` on the host, on the GPT source's
/// real backup (copied off its disk with debugfs): intact, then with its
/// biggest volume damaged (exit 1, the archive named).
#[test]
fn backup_ls_and_verify_answer_in_json_and_name_a_damaged_archive() {
    let src = gpt_source();
    let copy = src.work.join("store-copy");
    let _ = std::fs::remove_dir_all(&copy);
    std::fs::create_dir_all(&copy).unwrap();
    sh_ok(&format!(
        "debugfs -R 'rdump /store/lbsrc {}' {} 2>/dev/null",
        copy.display(),
        src.backup.display()
    ));
    let dir = copy.join("lbsrc");
    let conf = src.work.join("etc-host");
    std::fs::create_dir_all(&conf).unwrap();
    let ls = run_ok(lifeboat(&conf).args(["backup", "ls", "--json"]).arg(&dir));
    let m: Value = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(m["hostname"], "lbsrc", "{m}");
    let archives: usize = m["sets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["archives"].as_array().unwrap().len())
        .sum();
    assert!(archives >= 1, "{m}");
    let v = run_ok(
        lifeboat(&conf)
            .args(["backup", "verify", "--json"])
            .arg(&dir),
    );
    let v: Value = serde_json::from_slice(&v.stdout).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["archives"].as_array().unwrap().len(), archives, "{v}");
    // Damage the biggest volume in its middle.
    let mut files: Vec<(u64, PathBuf)> = walk(&dir)
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "backup.json"))
        .map(|p| (std::fs::metadata(&p).unwrap().len(), p))
        .collect();
    files.sort();
    let (len, victim) = files.pop().unwrap();
    sh_ok(&format!(
        "printf 'X' | dd of={} bs=1 seek={} conv=notrunc status=none",
        victim.display(),
        len / 2
    ));
    let o = lifeboat(&conf)
        .args(["backup", "verify", "--json"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "a damaged backup passed verify");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], false, "{v}");
    let bad: Vec<&Value> = v["archives"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["ok"] == false)
        .collect();
    assert_eq!(bad.len(), 1, "{v}");
    assert!(bad[0]["error"].as_str().unwrap().contains("sha256"), "{v}");
    let _ = std::fs::remove_dir_all(&copy);
}

fn walk(d: &Path) -> Vec<PathBuf> {
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

/// A fleet machine with a blank disk boots QEMU's iPXE from lifeboat
/// serve (its DHCP boot file names its script and token, as a per-host
/// DHCP entry would), gets its personal layer and recovers unattended,
/// streaming the backup from the web server (the http:// recovery test:
/// the same plan as mkbackup's own http image, which is built alike).
#[test]
fn fleet_machine_boots_from_lifeboat_serve_and_recovers_unattended() {
    let src = net_source();
    let token = src
        .serve_token
        .clone()
        .expect("the source did not register");
    let port = servers().serve.port;
    let target = src.work.join("target-serve.raw");
    blank(&target, "3G");
    let t0 = sha(&target);
    let mut spec = BootSpec {
        memory_mb: 1536,
        log: Some(src.work.join("recover-serve.log")),
        ..BootSpec::from_disks()
    }
    .with_disk(&target, "raw", Some("LBSRC0"))
    .with_user_net(&format!(
        "bootfile=http://10.0.2.2:{port}/hosts/lbsrc/boot.ipxe?token={token}"
    ));
    spec.extra_args
        .extend(["-boot".to_string(), "n".to_string()]);
    let mut vm = Vm::boot(&spec).unwrap();
    let console = await_recovery(&mut vm);
    assert_ne!(sha(&target), t0);
    for want in [
        "lifeboat: tools (",
        "lifeboat: personal (",
        "chained layers loaded",
        &format!(
            "backup found in http://10.0.2.2:{}/backups/lbsrc/",
            servers().http.port
        ),
    ] {
        assert!(console.contains(want), "{want:?} missing:\n{console}");
    }
    assert!(
        !console.contains(SMB_PASSWORD),
        "the share password is on the console"
    );
    let log = std::fs::read_to_string(servers().serve.root.join("access.log")).unwrap();
    assert!(
        log.contains("\"GET /hosts/lbsrc/personal.cpio.zst\" 200"),
        "{log}"
    );
    assert!(!log.contains(&token), "the token is in the access log");
    check_offline(src, &target, "serve");
}

/// PORTABLE: another live Linux (the LVM test system, booted from its own
/// disk) recovers the GPT source onto a blank disk by running the
/// extracted `./lifeboat recover`; its own disk is left alone.
#[test]
fn portable_lifeboat_recovers_from_another_live_system() {
    let src = gpt_source();
    let live_disk = debian_disk("mbr-lvm");
    let work = &src.work;
    let live = work.join("live.qcow2");
    sh_ok(&format!(
        "rm -f {o} && qemu-img create -q -f qcow2 -F raw -b {} {o}",
        live_disk.display(),
        o = live.display()
    ));
    // The tarball travels on a disk of its own.
    let carry = work.join("carry");
    std::fs::create_dir_all(&carry).unwrap();
    sh_ok(&format!(
        "debugfs -R 'dump /portable/lifeboat-portable-lbsrc.tar.gz {}/lifeboat-portable-lbsrc.tar.gz' {} 2>/dev/null && \
         printf '[recover]\\nrebuild_initramfs = \"never\"\\n' > {}/fast.toml && \
         rm -f {c}.img && truncate -s 256M {c}.img && mkfs.ext4 -q -F -d {c} {c}.img",
        carry.display(),
        src.backup.display(),
        carry.display(),
        c = carry.display()
    ));
    let target = work.join("target-portable.raw");
    blank(&target, "3G");
    let spec = BootSpec {
        memory_mb: 1536,
        log: Some(work.join("portable-live.log")),
        ..BootSpec::from_disks()
    }
    .with_disk(&live, "qcow2", Some("LBLIVE"))
    .with_disk(&target, "raw", Some("LBSRC0"))
    .with_disk(&work.join("carry.img"), "raw", None)
    .with_disk(&src.backup, "raw,readonly=on", None);
    let mut vm = Vm::boot(&spec).unwrap();
    let mut pos = vm.wait_for(PROMPT, 10 * MIN).unwrap();
    run(&mut vm, &mut pos, "dmesg -n 1", MIN);
    let before = run(
        &mut vm,
        &mut pos,
        "echo live: $(lsblk -no UUID /dev/vda | sort | tr '\\n' ' ')",
        MIN,
    );
    let out = run(
        &mut vm,
        &mut pos,
        "mkdir -p /carry && mount /dev/vdc /carry && cd /root && tar xzf /carry/lifeboat-portable-lbsrc.tar.gz && \
         cd lifeboat-portable-lbsrc && ./lifeboat -c /carry/fast.toml recover --auto > /root/recover.log 2>&1; s=$?; \
         grep -E 'same serial|recovery finished|ERROR' /root/recover.log; tail -5 /root/recover.log; cd /; test $s = 0",
        30 * MIN,
    );
    assert!(out.contains("lifeboat: recovery finished"), "{out}");
    assert!(
        out.contains("[same serial]"),
        "mapping by serial expected: {out}"
    );
    let after = run(
        &mut vm,
        &mut pos,
        "echo live: $(lsblk -no UUID /dev/vda | sort | tr '\\n' ' ')",
        MIN,
    );
    assert_eq!(
        prefixed(&before, "live: "),
        prefixed(&after, "live: "),
        "the live system's disk changed"
    );
    run(&mut vm, &mut pos, "sync", 10 * MIN);
    drop(vm);
    check_recovered(src, &target, "portable-boot.log");
}

/// BACKUP_URL = iso://: the rescue ISO carries the backup, continued on
/// data ISOs (ISO_MAX_SIZE); booted as a CD with the others in more
/// drives, its automatic entry recovers the disk.
#[test]
fn iso_with_the_backup_on_several_discs_recovers_unattended() {
    let src = gpt_source();
    let work = &src.work;
    let ls = sh_ok(&format!(
        "debugfs -R 'ls -p /iso' {} 2>/dev/null",
        src.backup.display()
    ));
    let mut isos: Vec<String> = ls
        .split('/')
        .filter(|f| f.ends_with(".iso"))
        .map(String::from)
        .collect();
    isos.sort();
    assert!(isos.len() >= 2, "one ISO only: {ls}");
    assert_eq!(isos[0], "lifeboat-lbsrc.iso");
    let mut drives = Vec::new();
    for (i, name) in isos.iter().enumerate() {
        let p = work.join(name);
        sh_ok(&format!(
            "debugfs -R 'dump /iso/{name} {}' {} 2>/dev/null",
            p.display(),
            src.backup.display()
        ));
        let max = 160u64 << 20;
        let len = std::fs::metadata(&p).unwrap().len();
        assert!(len <= max, "{name} has {len} bytes, over ISO_MAX_SIZE");
        // xorriso: the first is bootable (El Torito), the others are data.
        let (ok, et, _) = sh(&format!(
            "xorriso -indev {} -report_el_torito plain 2>&1",
            p.display()
        ));
        assert!(ok, "{et}");
        let label = if i == 0 {
            "LBISO".to_string()
        } else {
            format!("LBISO_{:02}", i + 1)
        };
        assert!(et.contains(&format!("Volume id    : '{label}'")), "{et}");
        assert_eq!(et.contains("El Torito boot img"), i == 0, "{et}");
        drives.extend([
            "-drive".to_string(),
            format!(
                "file={},media=cdrom,readonly=on,if=ide,index={i}",
                p.display()
            ),
        ]);
    }
    let target = work.join("target-iso.raw");
    blank(&target, "3G");
    let mut spec = BootSpec {
        memory_mb: 1536,
        log: Some(work.join("recover-iso.log")),
        ..BootSpec::from_disks()
    }
    .with_disk(&target, "raw", Some("LBSRC0"));
    spec.extra_args.extend(drives);
    spec.extra_args
        .extend(["-boot".to_string(), "d".to_string()]);
    let mut vm = Vm::boot(&spec).unwrap();
    let c = await_recovery(&mut vm);
    assert!(c.contains("backup found in /run/lifeboat/iso/LBISO"), "{c}");
    check_offline(src, &target, "iso");
}

/// Boot `src`'s rescue image with a network card that leads nowhere
/// (a UDP socket nobody reads), `mac` chosen by the test.
fn dead_nic_vm(src: &Source, target: &Path, mac: &str, log: &str) -> Vm {
    let mut spec = BootSpec {
        memory_mb: 1536,
        append: "console=ttyS0 lifeboat.recover=auto".into(),
        log: Some(src.work.join(log)),
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
    Vm::boot(&spec).unwrap()
}

/// The unattended recovery's failure: its console from the start of the
/// recovery.
fn await_failure(vm: &mut Vm, what: &str) -> String {
    vm.wait_for("ERROR: recovery failed", 10 * MIN)
        .unwrap_or_else(|e| panic!("{what}: the recovery did not fail as expected: {e}"));
    std::thread::sleep(Duration::from_secs(1));
    vm.console()
}

/// Fault matrix, in the rescue OS: the network is down (a DHCP time-out;
/// the captured static address with the server unreachable) and the
/// expected disk is missing. Each time the recovery stops with a message
/// that says what is wrong, and the disks are not written.
#[test]
fn network_down_and_a_missing_disk_stop_the_recovery_before_any_write() {
    // 1. DHCP: a card whose MAC the captured setup does not know asks for
    //    a lease, nobody answers.
    let src = net_source().with_image("nfs");
    let target = src.work.join("target-dhcp.raw");
    blank(&target, "3G");
    let t0 = sha(&target);
    let mut vm = dead_nic_vm(&src, &target, "52:54:00:de:ad:01", "down-dhcp.log");
    let c = await_failure(&mut vm, "DHCP time-out");
    drop(vm);
    for want in [
        "network: not configured",
        "cannot be reached",
        "no address, no default route",
        "Nothing was written",
    ] {
        assert!(c.contains(want), "DHCP time-out: {want:?} missing:\n{c}");
    }
    assert_eq!(sha(&target), t0, "a disk was written without network");
    // 2. Static: the captured address on its own MAC, the server away.
    let mut vm = dead_nic_vm(&src, &target, "52:54:00:12:34:56", "down-static.log");
    let c = await_failure(&mut vm, "static address");
    drop(vm);
    for want in [
        "10.0.2.15/24",
        "port",
        "cannot be reached",
        "address 10.0.2.15, a default route",
        "Nothing was written",
    ] {
        assert!(c.contains(want), "static: {want:?} missing:\n{c}");
    }
    assert_eq!(sha(&target), t0, "a disk was written without the server");
    // 3. The disk the plan needs is not there (only a small other one).
    let src = gpt_source();
    let other = src.work.join("other-missing.raw");
    blank(&other, "1G");
    let o0 = sha(&other);
    let mut vm = rescue_vm(
        src,
        &[(&other, Some("OTHER"))],
        "lifeboat.recover=auto",
        "missing-disk.log",
    );
    let c = await_failure(&mut vm, "missing disk");
    drop(vm);
    for want in [
        "no target disk for /dev/vda",
        "serial LBSRC0",
        "Disks here: /dev/vda (1.0 GiB, serial OTHER)",
        "Nothing was written",
    ] {
        assert!(c.contains(want), "missing disk: {want:?} missing:\n{c}");
    }
    assert_eq!(sha(&other), o0, "the other disk was written");
}
