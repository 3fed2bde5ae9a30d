//! The recovery engine: `lifeboat recover` in the rescue OS.
//!
//! Pre-flight first, before any byte is written: the backup is located,
//! every volume checked for presence and size (the first and last of each
//! archive against their sha256; the rest while they stream), the key
//! checked, a recipe's own check run, the disks mapped, the sizes checked,
//! every command checked to write only mapped disks. Then the plan runs group by group; each group first checks
//! whether its result already exists (from an interrupted run) and is
//! skipped if so. Filesystems made by a recovery carry a marker file until
//! the end, so an old installation with the same UUIDs is never mistaken
//! for a half-finished recovery. Then: restore (each filesystem mounted
//! alone, or the whole tree for a recipe), mount the tree, finalize
//! (bootloader, config patches, initramfs, logs), unmount.

use crate::backup::Store;
use crate::hooks::Hook;
use crate::layout::disk_of;
use crate::migrate::{self, Grow, Pair};
use crate::plan::{self, Done, Step};
use anyhow::{bail, Context, Result};
use lifeboat_contract::{BackupManifest, Disk, Layout};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Marker file at the root of every filesystem this recovery made.
const MARK: &str = ".lifeboat-recovery";
/// Per-archive record that its restore completed.
const RESTORED: &str = ".lifeboat-restored";
/// Where each filesystem is mounted alone while its archives are restored.
const RESTORE_MNT: &str = "/run/lifeboat/restore";
/// Where the backup filesystem is mounted in the rescue OS.
const BACKUP_MNT: &str = "/run/lifeboat/backup";
/// Scratch mount point for marker checks.
const CHECK_MNT: &str = "/run/lifeboat/check";

pub struct Options {
    pub layout: Layout,
    pub backup: BackupManifest,
    pub root: PathBuf,
    pub dry_run: bool,
    /// Unattended: never ask; anything unclear is a refusal.
    pub auto: bool,
    /// Skip the confirmation prompt.
    pub yes: bool,
    pub mapping: Vec<(String, String)>,
    /// `recover.auto_map = "identity"`: match disks by serial or WWN only.
    pub identity_only: bool,
    pub grow: Grow,
    pub keyfile: Option<PathBuf>,
    /// `auto`, `always`, `never`.
    pub rebuild_initramfs: String,
    /// Extra files to copy into the target's log directory.
    pub keep_files: Vec<PathBuf>,
    /// Key file of an encrypted backup.
    pub backup_key: Option<PathBuf>,
    /// The backup tool's recipe, when BACKUP is not the internal tar method.
    pub recipe: Option<crate::recipe::Recipe>,
    /// How to reach a network location: credentials (cifs/http user and
    /// password, sftp key), mount and ssh options.
    pub access: crate::url::Access,
    /// `[hooks]` pre_recovery and post_recovery.
    pub hooks: crate::config::Hooks,
    /// Write-protected disk identities (`recover.protect`, `KIND=value`).
    pub protect: Vec<String>,
    /// Filesystem labels of the configured usb:// media (never targets).
    pub media_labels: Vec<String>,
}

/// Runs commands (or only prints them under --dry-run) and logs all of it.
struct Runner {
    dry_run: bool,
    log: Option<std::fs::File>,
    keyfile: Option<PathBuf>,
    /// Once the targets are mapped: the only devices a step may name.
    allowed: Option<BTreeSet<String>>,
}

impl Runner {
    fn say(&mut self, line: &str) {
        println!("{line}");
        let _ = std::io::stdout().flush();
        if let Some(f) = &mut self.log {
            let _ = writeln!(f, "{line}");
        }
    }

    /// Run a step that writes; its output is logged. Under --dry-run it is
    /// only printed.
    fn run(&mut self, s: &Step) -> Result<()> {
        self.say(&format!("+ {}", s.render()));
        if self.dry_run {
            return Ok(());
        }
        let key = self
            .keyfile
            .as_ref()
            .map(|k| k.to_string_lossy().to_string());
        let argv: Vec<String> = s
            .argv
            .iter()
            .map(|a| match &key {
                Some(k) => a.replace("$LIFEBOAT_KEYFILE", k),
                None => a.clone(),
            })
            .collect();
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(if s.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot run {} (is it in the rescue image?)", argv[0]))?;
        if let Some(text) = &s.stdin {
            child.stdin.take().unwrap().write_all(text.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for l in text.lines() {
            self.say(&format!("  | {l}"));
        }
        if !out.status.success() {
            let target = if s.device.is_empty() {
                String::new()
            } else {
                format!(" writing {}", s.device)
            };
            bail!(
                "`{}` failed ({}){target}; see the output above and /var/log/lifeboat/recover.log",
                s.render().lines().next().unwrap_or(""),
                out.status,
            );
        }
        Ok(())
    }

    fn cmd(&mut self, device: &str, argv: &[&str]) -> Result<()> {
        if let Some(allowed) = &self.allowed {
            if !device.is_empty() && !allowed.contains(device) {
                bail!(
                    "refusing to run `{}`: it writes {device}, which is not a mapped target disk or a device made on one",
                    argv.join(" ")
                );
            }
        }
        self.run(&Step {
            device: device.into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            stdin: None,
        })
    }
}

/// Output of a read-only query, when it succeeds.
fn query(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).to_string())
}

fn norm_uuid(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
        .to_ascii_lowercase()
}

fn blkid(dev: &str) -> BTreeMap<String, String> {
    query("blkid", &["-p", "-o", "export", dev])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Mount points currently mounted (from /proc/self/mountinfo).
fn mounted() -> BTreeSet<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| m.replace("\\040", " "))
        .collect()
}

/// Mount a filesystem somewhere private, run `f` on the mount point, unmount.
fn with_mounted<T>(dev: &str, fstype: &str, ro: bool, f: impl FnOnce(&Path) -> T) -> Option<T> {
    let mnt = Path::new(CHECK_MNT);
    std::fs::create_dir_all(mnt).ok()?;
    let opts = if ro { "ro" } else { "rw" };
    let ok = Command::new("mount")
        .args(["-t", fstype, "-o", opts, dev])
        .arg(mnt)
        .stderr(Stdio::null())
        .status()
        .ok()?
        .success();
    if !ok {
        return None;
    }
    let r = f(mnt);
    let _ = Command::new("umount").arg(mnt).status();
    Some(r)
}

/// The filesystem a group makes, when it carries the recovery marker.
fn marked_fs(g: &plan::Group) -> Option<(&str, &str)> {
    match &g.done {
        Some(Done::Fs {
            device,
            fstype,
            marked: true,
            ..
        }) => Some((device, fstype)),
        _ => None,
    }
}

/// Does the result of a group already exist?
fn is_done(d: &Done, backup_id: &str, r: &mut Runner) -> bool {
    match d {
        Done::Table {
            disk,
            kind,
            id,
            partitions,
        } => {
            let Some(text) = query("sfdisk", &["--json", disk]) else {
                return false;
            };
            let Ok(t) = crate::layout::parse_sfdisk(&text) else {
                return false;
            };
            let have: Vec<(u32, u64, u64)> = t
                .partitions
                .iter()
                .map(|p| (p.number, p.start, p.size))
                .collect();
            t.kind == *kind && norm_uuid(&t.id) == norm_uuid(id) && have == *partitions
        }
        Done::Signature { device, uuid } => blkid(device)
            .get("UUID")
            .is_some_and(|u| norm_uuid(u) == norm_uuid(uuid)),
        Done::Md {
            device,
            uuid,
            members,
        } => {
            let same = |text: &str| {
                text.lines()
                    .filter_map(|l| l.strip_prefix("MD_UUID="))
                    .any(|u| norm_uuid(u) == norm_uuid(uuid))
            };
            if query("mdadm", &["--detail", "--export", device]).is_some_and(|t| same(&t)) {
                return true;
            }
            // Members from an interrupted run: assemble them instead.
            let mut a = vec!["--assemble", device.as_str(), "--run"];
            let u = format!("--uuid={uuid}");
            a.push(&u);
            a.extend(members.iter().map(|m| m.as_str()));
            if query("mdadm", &a).is_some() {
                r.say(&format!("  assembled {device} from an earlier run"));
                return true;
            }
            false
        }
        Done::Luks { device, uuid } => query("cryptsetup", &["luksUUID", device])
            .is_some_and(|u| norm_uuid(&u) == norm_uuid(uuid)),
        Done::Open { name } => Path::new("/dev/mapper").join(name).exists(),
        Done::Pv { uuid, .. } => query("lvm", &["pvs", "--noheadings", "-o", "pv_uuid"])
            .is_some_and(|t| t.lines().any(|l| norm_uuid(l) == norm_uuid(uuid))),
        Done::Vg { name } => query("lvm", &["vgs", "--noheadings", "-o", "vg_name"])
            .is_some_and(|t| t.lines().any(|l| l.trim() == name)),
        Done::Lv { vg, name } => query(
            "lvm",
            &[
                "lvs",
                "--noheadings",
                "--separator",
                "/",
                "-o",
                "vg_name,lv_name",
            ],
        )
        .is_some_and(|t| t.lines().any(|l| l.trim() == format!("{vg}/{name}"))),
        Done::Fs {
            device,
            fstype,
            uuid,
            marked,
        } => {
            let b = blkid(device);
            let same_type = b.get("TYPE").is_some_and(|t| t == fstype);
            let same_uuid = match uuid {
                Some(u) => b.get("UUID").is_some_and(|x| norm_uuid(x) == norm_uuid(u)),
                None => true,
            };
            if !(same_type && same_uuid) {
                return false;
            }
            if !marked {
                return true;
            }
            with_mounted(device, fstype, true, |m| {
                std::fs::read_to_string(m.join(MARK)).is_ok_and(|s| s.trim() == backup_id)
            })
            .unwrap_or(false)
        }
    }
}

/// Devices a command may write: the mapped disks, their partitions, and the
/// virtual devices the plan itself creates.
fn writable(l: &Layout) -> BTreeSet<String> {
    let mut w = BTreeSet::new();
    for d in &l.disks {
        w.insert(d.path.clone());
        for p in d.table.iter().flat_map(|t| &t.partitions) {
            w.insert(p.node.clone());
        }
    }
    for m in &l.md {
        w.insert(m.device.clone());
    }
    for c in &l.luks {
        let name = c.mapper_name();
        w.insert(format!("/dev/mapper/{name}"));
    }
    for lv in &l.lvm.lvs {
        w.insert(format!("/dev/{}/{}", lv.vg, lv.name));
    }
    // A thin pool's metadata LV, mapped alone while it is written (its
    // table names only the VG's PVs: check_writes reads it).
    let pools = l
        .lvm
        .lvs
        .iter()
        .filter(|lv| lv.segtype == "thin-pool")
        .count();
    for i in 0..pools {
        w.insert(format!("/dev/mapper/{}", plan::tmeta_dm(i)));
    }
    w
}

/// Compare a target disk with its identity pinned at pre-flight, and check
/// again that nothing uses it; refuse to write it otherwise.
fn recheck(before: &crate::safety::Identity, disk: &str, r: &mut Runner) -> Result<()> {
    let sys = crate::safety::Sys::live();
    let now = crate::safety::identity(&sys, &before.name);
    if let Some(what) = before.differs(&now) {
        bail!(
            "{disk} is not the disk that was checked: {what}. Nothing was written to it; \
             check the disks and run lifeboat recover again"
        );
    }
    if let Some(why) = crate::safety::busy(&sys, &before.name)
        .or_else(|| crate::safety::exclusive_open_fails(Path::new(disk)))
    {
        bail!("{disk} came into use after it was checked: {why}. Nothing was written to it");
    }
    r.say(&format!(
        "checked {disk} again before writing: {}",
        before.describe()
    ));
    Ok(())
}

/// The device an argument names: `/dev/x` itself, or the value of an
/// option like `of=/dev/x` or `--device=/dev/x`.
fn device_in_arg(a: &str) -> Option<&str> {
    if a.starts_with("/dev/") {
        return Some(a);
    }
    a.split_once('=')
        .map(|(_, v)| v)
        .filter(|v| v.starts_with("/dev/"))
}

/// Refuse a plan whose commands name a device outside `allowed`.
fn check_writes(groups: &[plan::Group], allowed: &BTreeSet<String>) -> Result<()> {
    for s in groups.iter().flat_map(|g| &g.steps) {
        // An empty device: the step writes no disk (scratch files in /run).
        // `dmsetup create` reads its table, which names devices, on stdin.
        let table = s
            .stdin
            .as_deref()
            .filter(|_| s.argv.first().is_some_and(|a| a == "dmsetup"))
            .unwrap_or("");
        let named = std::iter::once(s.device.as_str())
            .filter(|d| !d.is_empty())
            .chain(s.argv.iter().filter_map(|a| device_in_arg(a)))
            .chain(table.split_whitespace().filter(|w| w.starts_with("/dev/")));
        for d in named {
            if !allowed.contains(d) {
                bail!(
                    "refusing to run `{}`: it writes {d}, which is not a mapped target disk or a device made on one",
                    s.render().lines().next().unwrap_or("")
                );
            }
        }
    }
    Ok(())
}

/// Disks refused as targets: (kernel name, why).
pub type Refused = Vec<(String, String)>;

/// Disks of this machine that may receive the recovery, and those refused
/// with the reason (in use, write-protected, a Lifeboat medium, read-only).
pub fn candidate_disks(
    exclude: &BTreeSet<String>,
    protect: &[String],
    media_labels: &[String],
) -> Result<(Vec<Disk>, Refused)> {
    let mut v = Vec::new();
    let mut refused = Vec::new();
    let sys = crate::safety::Sys::live();
    let mut names: Vec<String> = std::fs::read_dir("/sys/block")
        .context("cannot read /sys/block")?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| !crate::layout::ignored(n))
        .collect();
    names.sort();
    for n in names {
        if exclude.contains(&n) {
            refused.push((n, "it holds the backup".to_string()));
            continue;
        }
        if std::fs::read_to_string(format!("/sys/block/{n}/ro")).is_ok_and(|s| s.trim() == "1") {
            refused.push((n, "it is read-only".to_string()));
            continue;
        }
        if let Some(why) = crate::safety::busy(&sys, &n) {
            refused.push((n, why));
            continue;
        }
        let id = crate::safety::identity(&sys, &n);
        if let Some(why) = crate::safety::protected(&id, protect, media_labels) {
            refused.push((n, why));
            continue;
        }
        if let Some(why) = crate::safety::exclusive_open_fails(&Path::new("/dev").join(&n)) {
            refused.push((n, why));
            continue;
        }
        let d = crate::layout::disk_from_sysfs(&n)?;
        if d.size_bytes > 0 {
            v.push(d);
        }
    }
    Ok((v, refused))
}

/// Where the backup was found.
pub struct Found {
    pub store: Store,
    /// The local disk holding it (never a recovery target).
    pub disk: Option<String>,
    /// A network share mounted for it (unmounted when dropped).
    pub _share: Option<crate::url::Local>,
}

/// Find the backup: mount (read-only) the filesystem or network share
/// holding it, or reach its HTTP server.
pub fn find_backup(m: &BackupManifest, acc: &crate::url::Access) -> Result<Found> {
    let scheme = m.url.split_once("://").map(|x| x.0).unwrap_or("");
    match scheme {
        "http" | "https" | "sftp" => {
            let remote = Store::remote(&m.url, acc, &m.hostname)?.context("not a remote URL")?;
            let size = remote.size(crate::backup::MANIFEST_FILE).with_context(|| {
                format!(
                    "the backup server of {} cannot be reached. Nothing was written.",
                    m.url
                )
            })?;
            if size.is_none() {
                bail!(
                    "{} has no backup of {} ({} is missing). Nothing was written.",
                    m.url,
                    m.hostname,
                    remote.show(crate::backup::MANIFEST_FILE)
                );
            }
            return Ok(Found {
                store: remote,
                disk: None,
                _share: None,
            });
        }
        "tape" => {
            let label = crate::tape::read_label(&m.url)
                .context("the backup tape cannot be read. Nothing was written.")?;
            if label.id != m.id {
                bail!(
                    "the tape in {} holds backup {} of {}, not {} of {}: load the right tape. Nothing was written.",
                    m.url,
                    label.id,
                    label.hostname,
                    m.id,
                    m.hostname
                );
            }
            return Ok(Found {
                store: Store::Tape(crate::tape::Remote::new(&m.url, m)?),
                disk: None,
                _share: None,
            });
        }
        "iso" => {
            let label = m
                .location
                .as_ref()
                .and_then(|l| l.label.clone())
                .context("the backup manifest does not name the ISO's volume label")?;
            let on_iso = crate::iso::url_dir(&m.url).unwrap_or_default();
            let media = crate::iso::mount_media(&label)
                .context("the backup ISOs cannot be read. Nothing was written.")?;
            let guard = crate::url::Local::mounted(
                PathBuf::from("/run/lifeboat/iso"),
                media.iter().map(|(_, p)| p.clone()).collect(),
            );
            let dirs: Vec<PathBuf> = media
                .iter()
                .map(|(_, p)| p.join(&on_iso).join(&m.hostname))
                .collect();
            if !dirs
                .iter()
                .any(|d| d.join(crate::backup::MANIFEST_FILE).is_file())
            {
                bail!(
                    "no ISO labelled {label} with the backup of {} is attached (found: {}): attach lifeboat-{}.iso \
                     (and its _02, _03, ... companions). Nothing was written.",
                    m.hostname,
                    if media.is_empty() {
                        "none".to_string()
                    } else {
                        media.iter().map(|(l, _)| l.as_str()).collect::<Vec<_>>().join(", ")
                    },
                    m.hostname
                );
            }
            return Ok(Found {
                store: Store::Media(dirs),
                disk: None,
                _share: Some(guard),
            });
        }
        "nfs" | "cifs" => {
            let acc = crate::url::Access {
                read_only: true,
                ..acc.clone()
            };
            let share = crate::url::local_with(&m.url, "BACKUP_URL", &acc)
                .context("the backup cannot be reached. Nothing was written.")?;
            let dir = share.path.join(&m.hostname);
            if !dir.join(crate::backup::MANIFEST_FILE).is_file() {
                bail!(
                    "{} is mounted at {} but holds no backup of {} ({} is missing). Nothing was written.",
                    m.url,
                    share.path.display(),
                    m.hostname,
                    dir.join(crate::backup::MANIFEST_FILE).display()
                );
            }
            return Ok(Found {
                store: Store::Dir(dir),
                disk: None,
                _share: Some(share),
            });
        }
        _ => {}
    }
    let (dir, disk) = find_local_backup(m)?;
    Ok(Found {
        store: Store::Dir(dir),
        disk,
        _share: None,
    })
}

/// The backup on a local filesystem (file:// or usb://).
fn find_local_backup(m: &BackupManifest) -> Result<(PathBuf, Option<String>)> {
    let dir = PathBuf::from(&m.dir);
    if dir.join(crate::backup::MANIFEST_FILE).is_file() {
        let disk = crate::backup::locate(&dir)
            .ok()
            .and_then(|l| disk_of(&l.device));
        return Ok((dir, disk));
    }
    let Some(loc) = &m.location else {
        bail!("the backup directory {} is not reachable here and the manifest does not say which filesystem holds it", m.dir);
    };
    let dev = loc
        .uuid
        .as_ref()
        .and_then(|u| query("blkid", &["-o", "device", "-t", &format!("UUID={u}")]))
        .or_else(|| {
            loc.label
                .as_ref()
                .and_then(|l| query("blkid", &["-o", "device", "-t", &format!("LABEL={l}")]))
        })
        .and_then(|t| t.lines().next().map(|s| s.trim().to_string()));
    let Some(dev) = dev else {
        bail!(
            "the backup filesystem ({} UUID={} LABEL={}, mounted at {} when the backup was made) is not attached. \
             Attach the disk holding {} and run `lifeboat recover` again. Nothing was written.",
            loc.fstype,
            loc.uuid.as_deref().unwrap_or("-"),
            loc.label.as_deref().unwrap_or("-"),
            loc.mountpoint,
            m.dir
        );
    };
    let mnt = Path::new(BACKUP_MNT);
    if !mounted().contains(BACKUP_MNT) {
        std::fs::create_dir_all(mnt)?;
        let st = Command::new("mount")
            .args(["-o", "ro", "-t", &loc.fstype, &dev])
            .arg(mnt)
            .status()
            .context("cannot run mount")?;
        if !st.success() {
            bail!(
                "cannot mount the backup filesystem {dev} ({}) read-only at {BACKUP_MNT}",
                loc.fstype
            );
        }
    }
    let dir = crate::backup::dir_below(m, mnt);
    if !dir.is_dir() {
        bail!(
            "{dev} is mounted at {BACKUP_MNT} but holds no {}",
            dir.display()
        );
    }
    Ok((dir, disk_of(&dev)))
}

fn ask_line(prompt: &str) -> Option<String> {
    print!("{prompt}");
    let _ = std::io::stdout().flush();
    let mut s = String::new();
    std::io::stdin().read_line(&mut s).ok()?;
    Some(s.trim().to_string())
}

fn stdin_is_tty() -> bool {
    unsafe { libc::isatty(0) == 1 }
}

/// Replace whole device names (`/dev/sda1` but not `/dev/sda10`) in text.
pub fn rename_devices(text: &str, names: &BTreeMap<String, String>) -> String {
    let mut keys: Vec<&String> = names.keys().filter(|k| names[*k] != **k).collect();
    keys.sort_by_key(|k| std::cmp::Reverse(k.len()));
    let mut out = String::new();
    let mut rest = text;
    'outer: while !rest.is_empty() {
        for k in &keys {
            if let Some(after) = rest.strip_prefix(k.as_str()) {
                if !after.starts_with(|c: char| c.is_ascii_alphanumeric()) {
                    out.push_str(&names[*k]);
                    rest = after;
                    continue 'outer;
                }
            }
        }
        let c = rest.chars().next().unwrap();
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// The whole recovery.
pub fn run(o: Options) -> Result<()> {
    let mut post_ran = false;
    let res = run_inner(&o, &mut post_ran);
    if let (Err(e), false, false) = (&res, post_ran, o.dry_run) {
        // The post hooks hear about a failed recovery too (to notify).
        let c = crate::hooks::HookEnv {
            hostname: &o.layout.hostname,
            backup_url: Some(&o.backup.url),
            target: Some(&o.root),
            error: Some(format!("{e:#}")),
        };
        if let Err(he) =
            crate::hooks::run(Hook::PostRecovery, &o.hooks, &c, &mut |l| println!("{l}"))
        {
            eprintln!("lifeboat: {he:#}");
        }
    }
    res
}

fn run_inner(o: &Options, post_ran: &mut bool) -> Result<()> {
    let mut r = Runner {
        dry_run: o.dry_run,
        log: None,
        keyfile: o.keyfile.clone(),
        allowed: None,
    };
    if !o.dry_run {
        std::fs::create_dir_all("/var/log/lifeboat").ok();
        r.log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open("/var/log/lifeboat/recover.log")
            .ok();
    }
    let id = o.backup.id.clone();
    if !Path::new("/run/udev/control").exists() {
        // No udevd in the rescue OS: device-mapper must make its own nodes
        // (else lvcreate fails with "device not cleared").
        std::env::set_var("DM_DISABLE_UDEV", "1");
    }
    let all_archives: Vec<&lifeboat_contract::BackupArchive> =
        o.backup.sets.iter().flat_map(|s| &s.archives).collect();
    r.say(&format!(
        "lifeboat: recover: {} from backup {} ({} set(s), {} archive(s))",
        o.layout.hostname,
        id,
        o.backup.sets.len(),
        all_archives.len()
    ));
    if o.recipe.is_none() && o.backup.sets.first().map(|s| s.level.as_str()) != Some("full") {
        bail!("the backup chain does not start with a full backup; nothing can be restored. Nothing was written.");
    }

    // ---- Pre-flight: nothing below writes a disk.
    let on_network = [
        "nfs://", "cifs://", "http://", "https://", "sftp://", "tape://", "iso://",
    ]
    .iter()
    .any(|p| o.backup.url.starts_with(p));
    let found = if o.backup.dir.is_empty() && o.backup.location.is_none() && !on_network {
        Found {
            store: Store::Dir(PathBuf::new()),
            disk: None,
            _share: None,
        }
    } else {
        find_backup(&o.backup, &o.access)?
    };
    let backup_disk = found.disk.clone();
    let dir = &found.store;
    r.say(&format!("backup found in {}", dir.show("")));
    for set in &o.backup.sets {
        for a in &set.archives {
            if o.dry_run {
                for v in &a.volumes {
                    if !matches!(dir.size(&v.file), Ok(Some(_))) {
                        r.say(&format!("WARNING: {} is missing", dir.show(&v.file)));
                    }
                }
                continue;
            }
            r.say(&format!(
                "checking {} of set {} ({} volume(s), {} bytes)",
                a.mountpoint,
                set.id,
                a.volumes.len(),
                a.bytes
            ));
            crate::backup::preflight_archive(dir, a)
                .context("the backup cannot be restored; nothing was written")?;
        }
    }
    // The key of an encrypted backup, checked against the backup now.
    let encrypted = o.backup.sets.iter().any(|s| s.encryption.is_some());
    let key = if !encrypted {
        None
    } else if let Some(f) = &o.backup_key {
        Some(crate::backup::Key::from_file(f)?)
    } else if !o.auto && stdin_is_tty() {
        let text = rpassword_like(
            "The backup is encrypted. Passphrase or age identity (AGE-SECRET-KEY-1...): ",
        )?;
        Some(crate::backup::Key::parse(&text)?)
    } else if o.dry_run {
        None
    } else {
        bail!(
            "the backup is encrypted and no key was given: supply it with `lifeboat recover --backup-key FILE` \
             (an age identity or a passphrase file); unattended recovery cannot ask. Nothing was written."
        );
    };
    if key.is_some() {
        crate::backup::check_key(dir, &o.backup, key.as_ref())
            .context("the backup cannot be decrypted; nothing was written")?;
        r.say("backup key checked: it opens the backup");
    }
    let mut exclude = BTreeSet::new();
    if let Some(d) = &backup_disk {
        // The disks under the backup's filesystem (through LVM, RAID, LUKS).
        exclude.extend(crate::safety::Sys::live().disks_under(d));
        exclude.insert(d.clone());
    }
    let (targets, refused) = candidate_disks(&exclude, &o.protect, &o.media_labels)?;
    for (n, why) in &refused {
        r.say(&format!("not a target: /dev/{n}: {why}"));
    }
    let sources = migrate::disks_in_use(&o.layout);
    let interactive = !o.auto && stdin_is_tty();
    let mut ask = |s: &Disk, free: &[&Disk]| -> Option<String> {
        if !interactive || free.is_empty() {
            return None;
        }
        println!(
            "{} ({}, serial {}) has no matching disk. Free disks:",
            s.path,
            migrate::human(s.size_bytes),
            s.serial.as_deref().unwrap_or("-")
        );
        for f in free {
            println!(
                "  {} {} {}",
                f.path,
                migrate::human(f.size_bytes),
                f.model.as_deref().unwrap_or("")
            );
        }
        ask_line(&format!(
            "Recreate {} on which disk (empty: none)? ",
            s.path
        ))
        .filter(|a| !a.is_empty())
    };
    let pairs: Vec<Pair> =
        migrate::map_disks(&sources, &targets, &o.mapping, o.identity_only, &mut ask)?;
    for p in &pairs {
        r.say(&format!(
            "disk {} ({}) -> {} ({}) [{}]",
            p.source.path,
            migrate::human(p.source.size_bytes),
            p.target.path,
            migrate::human(p.target.size_bytes),
            p.why
        ));
    }
    let (layout, names) = migrate::migrate(&o.layout, &pairs, o.grow)?;
    let misfit = migrate::misfits(&layout);
    if !misfit.is_empty() {
        bail!(
            "the target disks are too small for the data:\n  {}\nNothing was written. Use bigger disks, or map onto other disks.",
            misfit.join("\n  ")
        );
    }
    let mounts = crate::backup::mounts_to_back_up(&layout);
    if !mounts.iter().any(|m| m.target == "/") {
        bail!("the layout has no root filesystem among its mounts; cannot restore. Nothing was written.");
    }
    for a in &all_archives {
        if !mounts.iter().any(|m| m.target == a.mountpoint) {
            bail!(
                "the backup has an archive for {} but the layout mounts no filesystem there; nothing was written",
                a.mountpoint
            );
        }
    }
    // A backup tool's own check, before any disk is touched.
    let recipe_env = o.recipe.as_ref().map(|rc| {
        let m: Vec<String> = mounts.iter().map(|m| m.target.clone()).collect();
        let d = match dir {
            Store::Dir(d) if !d.as_os_str().is_empty() => Some(d.as_path()),
            _ => None,
        };
        let mut env = crate::recipe::environment(rc, &o.backup.hostname, &m, &[], d, Some(&o.root));
        if let Ok(u) = crate::recipe::url_environment(&o.backup.url, &o.backup.hostname) {
            env.extend(u);
        }
        env
    });
    if let (Some(rc), Some(env)) = (&o.recipe, &recipe_env) {
        r.say(&format!(
            "checking the backup with {}: {}",
            rc.name, rc.check
        ));
        if !o.dry_run {
            crate::recipe::run("check", &rc.check, env)
                .context("the backup cannot be restored; nothing was written")?;
        }
    }
    let groups = plan::groups(&layout)?;
    let allowed = writable(&layout);
    check_writes(&groups, &allowed)?;
    // A thin pool's metadata mapping left by an interrupted run would stop
    // the plan's `dmsetup create`: nothing else uses it.
    for e in std::fs::read_dir("/dev/mapper")
        .into_iter()
        .flatten()
        .flatten()
    {
        let n = e.file_name().to_string_lossy().to_string();
        if n.starts_with("lifeboat-tmeta") {
            r.say(&format!("# removing {n}, left by an interrupted recovery"));
            let _ = Command::new("dmsetup")
                .args(["remove", "--retry", &n])
                .stdin(Stdio::null())
                .status();
        }
    }
    r.allowed = Some(allowed);
    // The identity of every target, pinned now and compared again right
    // before its first write.
    let sys = crate::safety::Sys::live();
    let mut pinned: BTreeMap<String, crate::safety::Identity> = pairs
        .iter()
        .map(|p| {
            (
                p.target.path.clone(),
                crate::safety::identity(&sys, &p.target.name),
            )
        })
        .collect();
    // Partition and virtual devices of the new layout -> their target disk.
    let disk_of_node: BTreeMap<String, String> = layout
        .disks
        .iter()
        .flat_map(|d| {
            std::iter::once((d.path.clone(), d.path.clone())).chain(
                d.table
                    .iter()
                    .flat_map(|t| &t.partitions)
                    .map(|p| (p.node.clone(), d.path.clone())),
            )
        })
        .collect();
    if !layout.luks.is_empty() && r.keyfile.is_none() {
        if o.auto || !interactive {
            bail!("the layout has LUKS containers but no key was given (recover.keyfile or --keyfile); unattended recovery cannot ask. Nothing was written.");
        }
        let pass = rpassword_like("LUKS passphrase for the new containers: ")?;
        std::fs::create_dir_all("/run/lifeboat")?;
        let p = PathBuf::from("/run/lifeboat/luks.key");
        std::fs::write(&p, pass.as_bytes())?;
        r.keyfile = Some(p);
    }
    for s in groups.iter().flat_map(|g| &g.steps) {
        if !o.dry_run && crate::elf::find_in_path(Path::new("/"), &s.argv[0]).is_none() {
            bail!("{} is needed (`{}`) but is not in this rescue image; add it to rescue.programs. Nothing was written.", s.argv[0], s.render().lines().next().unwrap_or(""));
        }
    }
    if !o.auto && !o.yes && !o.dry_run {
        println!("The plan:");
        for g in &groups {
            println!("  {}", g.what);
        }
        for set in &o.backup.sets {
            for a in &set.archives {
                println!(
                    "  restore {} from set {} ({}, {})",
                    a.mountpoint,
                    set.id,
                    set.level,
                    migrate::human(a.bytes)
                );
            }
        }
        println!("  bootloader, configuration and logs of the recovered system");
        println!("These disks will be ERASED and recreated:");
        for p in &pairs {
            let id = &pinned[&p.target.path];
            println!(
                "  {} ({}, {}{})",
                p.target.path,
                migrate::human(p.target.size_bytes),
                p.target
                    .model
                    .as_deref()
                    .map(|m| format!("{m}, "))
                    .unwrap_or_default(),
                id.describe()
            );
        }
        if !stdin_is_tty() {
            bail!("not confirmed (no terminal); use --yes or lifeboat.recover=auto. Nothing was written.");
        }
        if ask_line("Type YES to continue: ").as_deref() != Some("YES") {
            bail!("not confirmed; nothing was written");
        }
    }

    run_hooks(o, Hook::PreRecovery, &mut r).context("nothing was written")?;

    // ---- Disks.
    r.say("lifeboat: recover: recreating disks");
    for g in &groups {
        if !o.dry_run {
            if let Some(d) = &g.done {
                if is_done(d, &id, &mut r) {
                    r.say(&format!(
                        "# {}: already there (from an earlier run), kept",
                        g.what
                    ));
                    continue;
                }
            }
        }
        r.say(&format!("# {}", g.what));
        for s in &g.steps {
            // Right before the first write to a target disk: is it still the
            // disk that was checked, and still unused?
            if let Some(disk) = disk_of_node.get(&s.device) {
                if let Some(before) = pinned.remove(disk) {
                    recheck(&before, disk, &mut r)?;
                }
            }
            r.run(s)?;
            if s.argv[0] == "partx" && !o.dry_run {
                wait_partitions(&layout, &s.device);
            }
        }
        if let Some((device, fstype)) = marked_fs(g) {
            r.say(&format!("+ mark {device} as made by recovery {id}"));
            if !o.dry_run {
                with_mounted(device, fstype, false, |m| {
                    std::fs::write(m.join(MARK), format!("{id}\n"))
                })
                .with_context(|| format!("cannot mount the new {fstype} on {device}"))??;
            }
        }
    }

    // ---- Restore: each filesystem mounted alone (so a later set's
    // deletions cannot reach into filesystems mounted below it), its
    // archives applied set by set, each finished set recorded in it.
    r.say("lifeboat: recover: restoring");
    let mount_opts = |m: &lifeboat_contract::Mount| {
        let v: Vec<&str> = m
            .options
            .split(',')
            .filter(|x| x.starts_with("subvol="))
            .collect();
        if v.is_empty() {
            "defaults".to_string()
        } else {
            v.join(",")
        }
    };
    if o.recipe.is_none() && !o.dry_run {
        std::fs::create_dir_all(RESTORE_MNT)?;
    }
    for m in mounts.iter().filter(|_| o.recipe.is_none()) {
        let items: Vec<(
            usize,
            &lifeboat_contract::BackupSet,
            &lifeboat_contract::BackupArchive,
        )> = o
            .backup
            .sets
            .iter()
            .enumerate()
            .flat_map(|(k, set)| {
                set.archives
                    .iter()
                    .filter(|a| a.mountpoint == m.target)
                    .map(move |a| (k, set, a))
            })
            .collect();
        if items.is_empty() {
            r.say(&format!(
                "# {}: no archive in the backup; the filesystem stays empty",
                m.target
            ));
            continue;
        }
        let opts = mount_opts(m);
        r.cmd(
            &m.source,
            &[
                "mount",
                "-t",
                &m.fstype,
                "-o",
                &opts,
                &m.source,
                RESTORE_MNT,
            ],
        )?;
        let record = Path::new(RESTORE_MNT).join(RESTORED);
        let mut done: Vec<String> = if o.dry_run {
            vec![]
        } else {
            std::fs::read_to_string(&record)
                .unwrap_or_default()
                .lines()
                .map(String::from)
                .collect()
        };
        for (k, set, a) in items {
            if done.contains(&set.id) {
                r.say(&format!(
                    "# {} of set {} already restored (from an earlier run)",
                    m.target, set.id
                ));
                continue;
            }
            r.say(&format!(
                "lifeboat: restoring {} from set {} ({}, {} bytes in {} volume(s))",
                a.mountpoint,
                set.id,
                set.level,
                a.bytes,
                a.volumes.len()
            ));
            r.say(&format!(
                "+ cat {} | {} -dc | tar --extract --xattrs --acls --selinux --numeric-owner{} -C {RESTORE_MNT}",
                a.volumes.iter().map(|v| dir.show(&v.file)).collect::<Vec<_>>().join(" "),
                set.compression,
                if k > 0 { " --listed-incremental=/dev/null" } else { "" }
            ));
            if !o.dry_run {
                let t = std::time::Instant::now();
                crate::backup::extract(
                    dir,
                    set,
                    a,
                    Path::new(RESTORE_MNT),
                    k > 0,
                    false,
                    key.as_ref(),
                )?;
                r.say(&format!("  restored in {:.1} s", t.elapsed().as_secs_f64()));
                done.push(set.id.clone());
                std::fs::write(&record, done.join("\n") + "\n")?;
                if opts == "defaults" {
                    // A later set may have removed the marker with the
                    // files deleted since the previous set.
                    std::fs::write(Path::new(RESTORE_MNT).join(MARK), format!("{id}\n"))?;
                }
            }
        }
        r.cmd(&m.source, &["umount", RESTORE_MNT])?;
    }

    // ---- Mount the whole tree for the finishing steps.
    r.say("lifeboat: recover: mounting");
    let root = o.root.clone();
    let at = |t: &str| root.join(t.trim_start_matches('/'));
    let mut now_mounted = mounted();
    for m in &mounts {
        let dst = at(&m.target);
        let dst_s = dst.to_string_lossy().trim_end_matches('/').to_string();
        if now_mounted.contains(&dst_s) && !o.dry_run {
            r.say(&format!("# {} already mounted", dst.display()));
            continue;
        }
        if !o.dry_run {
            std::fs::create_dir_all(&dst)
                .with_context(|| format!("cannot create {}", dst.display()))?;
        }
        let o_s = mount_opts(m);
        r.cmd(
            &m.source,
            &["mount", "-t", &m.fstype, "-o", &o_s, &m.source, &dst_s],
        )?;
        now_mounted.insert(dst_s);
    }
    // A recipe restores into the whole tree at once.
    if let (Some(rc), Some(env)) = (&o.recipe, &recipe_env) {
        let record = root.join(RESTORED);
        if !o.dry_run && std::fs::read_to_string(&record).is_ok_and(|t| t.lines().any(|l| l == id))
        {
            r.say("# already restored by an earlier run");
        } else {
            r.say(&format!("lifeboat: restoring with {}", rc.name));
            r.say(&format!("+ {}", rc.restore));
            if !o.dry_run {
                let t = std::time::Instant::now();
                crate::recipe::run("restore", &rc.restore, env)?;
                r.say(&format!("  restored in {:.1} s", t.elapsed().as_secs_f64()));
                std::fs::write(&record, format!("{id}\n"))?;
            }
        }
    }

    // ---- Finalize.
    r.say("lifeboat: recover: finalizing");
    disk_links(&layout, &mut r)?;
    finalize(o, &layout, &pairs, &names, &mut r)?;

    // The user's post hooks, with the recovered system still mounted.
    *post_ran = !o.dry_run;
    run_hooks(o, Hook::PostRecovery, &mut r)
        .context("the system is recovered, but a post_recovery hook failed")?;

    // A rehearsal (`lifeboat rehearse`): the recovered copy reports its boot.
    if !o.dry_run
        && crate::rehearse::is_rehearsal(
            &std::fs::read_to_string("/proc/cmdline").unwrap_or_default(),
        )
    {
        let done = crate::rehearse::install_probe(&root)?;
        r.say(&done);
    }

    // Markers away, then unmount.
    for m in &mounts {
        if !o.dry_run {
            let _ = std::fs::remove_file(at(&m.target).join(RESTORED));
        }
    }
    for g in &groups {
        if let Some((device, fstype)) = marked_fs(g) {
            r.say(&format!("+ remove the recovery marker from {device}"));
            if !o.dry_run {
                with_mounted(device, fstype, false, |m| {
                    std::fs::remove_file(m.join(MARK))
                });
            }
        }
    }
    r.cmd("", &["sync"])?;
    let root_s = root.to_string_lossy().to_string();
    r.cmd("", &["umount", "--recursive", &root_s])?;
    if !o.dry_run {
        let _ = Command::new("umount").arg(BACKUP_MNT).status();
    }
    r.say(if o.dry_run {
        "lifeboat: dry run finished; nothing was written"
    } else {
        "lifeboat: recovery finished"
    });
    Ok(())
}

/// The user's recovery hooks (a successful run so far); under --dry-run
/// only printed.
fn run_hooks(o: &Options, hook: Hook, r: &mut Runner) -> Result<()> {
    if o.dry_run {
        for c in hook.commands(&o.hooks) {
            r.say(&format!("+ {} hook: {c}", hook.name()));
        }
        return Ok(());
    }
    let env = crate::hooks::HookEnv {
        hostname: &o.layout.hostname,
        backup_url: Some(&o.backup.url),
        target: Some(&o.root),
        error: None,
    };
    crate::hooks::run(hook, &o.hooks, &env, &mut |l| r.say(l))
}

/// The /dev/disk/by-uuid and by-partuuid links udev would make: without
/// them the target's grub-mkconfig writes `root=/dev/sda3` instead of
/// `root=UUID=...`.
fn disk_links(l: &Layout, r: &mut Runner) -> Result<()> {
    let mut links: Vec<(String, String)> = Vec::new();
    for f in &l.filesystems {
        if let Some(u) = &f.uuid {
            links.push((format!("/dev/disk/by-uuid/{u}"), f.device.clone()));
        }
    }
    for d in &l.disks {
        for p in d.table.iter().flat_map(|t| &t.partitions) {
            if let Some(u) = &p.uuid {
                links.push((
                    format!("/dev/disk/by-partuuid/{}", u.to_ascii_lowercase()),
                    p.node.clone(),
                ));
            }
        }
    }
    for (link, dev) in links {
        if Path::new(&link).exists() {
            continue;
        }
        r.say(&format!("+ ln -s {dev} {link}"));
        if r.dry_run {
            continue;
        }
        let target = std::fs::canonicalize(&dev).unwrap_or_else(|_| PathBuf::from(&dev));
        if let Some(parent) = Path::new(&link).parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::os::unix::fs::symlink(&target, &link)
            .with_context(|| format!("cannot create {link}"))?;
    }
    Ok(())
}

/// Wait until the kernel shows the partitions of `disk` (devtmpfs).
fn wait_partitions(l: &Layout, disk: &str) {
    let Some(d) = l.disks.iter().find(|d| d.path == disk) else {
        return;
    };
    let t0 = std::time::Instant::now();
    while t0.elapsed() < std::time::Duration::from_secs(10) {
        if d.table
            .iter()
            .flat_map(|t| &t.partitions)
            .all(|p| Path::new(&p.node).exists())
        {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn rpassword_like(prompt: &str) -> Result<String> {
    use std::io::BufRead;
    print!("{prompt}");
    std::io::stdout().flush()?;
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    let have = unsafe { libc::tcgetattr(0, &mut t) } == 0;
    if have {
        let mut n = t;
        n.c_lflag &= !libc::ECHO;
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &n) };
    }
    let mut s = String::new();
    std::io::stdin().lock().read_line(&mut s)?;
    if have {
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
    }
    println!();
    let s = s.trim_end_matches('\n').to_string();
    if s.is_empty() {
        bail!("empty passphrase");
    }
    Ok(s)
}

/// Bootloader, configuration patches, initramfs, SELinux, logs.
fn finalize(
    o: &Options,
    l: &Layout,
    pairs: &[Pair],
    names: &BTreeMap<String, String>,
    r: &mut Runner,
) -> Result<()> {
    let root = &o.root;
    let root_s = root.to_string_lossy().to_string();
    let in_root = |p: &str| root.join(p.trim_start_matches('/'));
    let mut m = mounted();
    for fs in ["/proc", "/sys", "/dev", "/run"] {
        let dst = in_root(fs).to_string_lossy().to_string();
        if m.contains(&dst) && !o.dry_run {
            continue;
        }
        if !o.dry_run {
            std::fs::create_dir_all(&dst)?;
        }
        r.cmd("", &["mount", "--rbind", fs, &dst])?;
        // A slave copy: unmounting it later must not propagate back to
        // the live system's own /sys, /dev, ... (systemd makes them shared).
        r.cmd("", &["mount", "--make-rslave", &dst])?;
        m.insert(dst);
    }
    // Device names that changed.
    let changed: BTreeMap<String, String> = names
        .iter()
        .filter(|(a, b)| a != b)
        .map(|(a, b)| (a.clone(), b.clone()))
        .collect();
    if !changed.is_empty() {
        for f in [
            "etc/fstab",
            "etc/crypttab",
            "etc/default/grub",
            "etc/initramfs-tools/conf.d/resume",
            "etc/mdadm/mdadm.conf",
        ] {
            let p = in_root(f);
            let Ok(text) = std::fs::read_to_string(&p) else {
                continue;
            };
            let new = rename_devices(&text, &changed);
            if new != text {
                r.say(&format!(
                    "+ patch {}: device names {:?}",
                    p.display(),
                    changed
                ));
                if !o.dry_run {
                    std::fs::write(&p, new)?;
                }
            }
        }
    }
    // Bootloader.
    let has = |p: &str| o.dry_run || in_root(p).exists();
    let tool = |a: &str, b: &str| -> Option<String> {
        ["usr/sbin", "usr/bin", "sbin", "bin"]
            .iter()
            .find_map(|d| {
                [a, b]
                    .iter()
                    .find(|n| in_root(&format!("{d}/{n}")).exists())
                    .map(|n| n.to_string())
            })
            .or_else(|| o.dry_run.then(|| a.to_string()))
    };
    let mut bios: Vec<String> = l.bootloader.grub_bios_disks.clone();
    if bios.is_empty() && !l.bootloader.uefi {
        // A BIOS boot partition means GRUB lives on that disk.
        for p in &l.bootloader.bios_boot_partitions {
            if let Some(d) = l.disks.iter().find(|d| {
                d.table
                    .iter()
                    .flat_map(|t| &t.partitions)
                    .any(|x| x.node == *p)
            }) {
                bios.push(d.path.clone());
            }
        }
    }
    let mut boot_done = false;
    let mut sd_done = false;
    let install = tool("grub-install", "grub2-install");
    if !bios.is_empty() {
        let Some(gi) = &install else {
            bail!("the recovered system has no grub-install; install a bootloader by hand (chroot {root_s})");
        };
        for d in &bios {
            r.cmd(
                d,
                &["chroot", &root_s, gi, "--target=i386-pc", "--recheck", d],
            )?;
        }
        boot_done = true;
    }
    if l.bootloader.uefi && !l.bootloader.esps.is_empty() {
        let esp_mount = l
            .mounts
            .iter()
            .find(|m| l.bootloader.esps.contains(&m.source))
            .map(|m| m.target.clone())
            .unwrap_or_else(|| "/boot/efi".into());
        let sd_boot = l
            .bootloader
            .efi_loaders
            .iter()
            .any(|f| f.to_ascii_lowercase().contains("systemd-boot"));
        let grub_efi = l
            .bootloader
            .efi_loaders
            .iter()
            .any(|f| f.to_ascii_lowercase().contains("grub"));
        if sd_boot && !grub_efi {
            // systemd-boot: its entries live on the ESP, restored with it.
            let esp = format!("--esp-path={esp_mount}");
            r.cmd(
                &l.bootloader.esps[0],
                &["chroot", &root_s, "bootctl", "install", &esp],
            )?;
            sd_done = true;
        } else {
            let Some(gi) = &install else {
                bail!("the recovered system has no grub-install; install the EFI bootloader by hand (chroot {root_s})");
            };
            let id = os_id(root).unwrap_or_else(|| "linux".into());
            let efi = format!("--efi-directory={esp_mount}");
            let bid = format!("--bootloader-id={id}");
            let mut a = vec![
                "chroot",
                &root_s,
                gi.as_str(),
                "--target=x86_64-efi",
                &efi,
                &bid,
            ];
            if !Path::new("/sys/firmware/efi").is_dir() {
                // Booted without UEFI: no NVRAM to write; use the removable path.
                a.extend(["--no-nvram", "--removable"]);
            }
            r.cmd(&l.bootloader.esps[0], &a)?;
            boot_done = true;
        }
    }
    if boot_done {
        if has("usr/sbin/update-grub") {
            r.cmd("", &["chroot", &root_s, "update-grub"])?;
        } else if let Some(mk) = tool("grub-mkconfig", "grub2-mkconfig") {
            let out = if in_root("boot/grub2").is_dir() {
                "/boot/grub2/grub.cfg"
            } else {
                "/boot/grub/grub.cfg"
            };
            r.cmd("", &["chroot", &root_s, &mk, "-o", out])?;
        }
    } else if !sd_done {
        r.say("WARNING: the layout records no bootloader (no GRUB in an MBR, no BIOS boot partition, no ESP); install one before rebooting");
    }
    // initramfs.
    let renamed = pairs.iter().any(|p| p.source.name != p.target.name);
    let rebuild = match o.rebuild_initramfs.as_str() {
        "always" => true,
        "never" => false,
        _ => renamed,
    };
    if rebuild {
        if has("usr/sbin/update-initramfs") {
            r.cmd(
                "",
                &["chroot", &root_s, "update-initramfs", "-u", "-k", "all"],
            )?;
        } else if has("usr/bin/dracut") {
            r.cmd(
                "",
                &["chroot", &root_s, "dracut", "--force", "--regenerate-all"],
            )?;
        } else {
            r.say("WARNING: no update-initramfs or dracut in the recovered system; its initramfs was not rebuilt");
        }
    } else {
        r.say("# initramfs kept (same disk names; recover.rebuild_initramfs = \"always\" forces a rebuild)");
    }
    // SELinux.
    if let Ok(c) = std::fs::read_to_string(in_root("etc/selinux/config")) {
        if c.lines().any(|l| {
            let l = l.trim();
            l == "SELINUX=enforcing" || l == "SELINUX=permissive"
        }) {
            r.say("+ touch /.autorelabel (SELinux relabels at first boot)");
            if !o.dry_run {
                std::fs::write(in_root(".autorelabel"), "")?;
            }
        }
    }
    // Logs and the layout go with the system.
    let logdir = in_root("var/log/lifeboat");
    r.say(&format!(
        "+ copy the recovery log, layout and mapping into {}",
        logdir.display()
    ));
    if !o.dry_run {
        std::fs::create_dir_all(&logdir)?;
        let mut map = String::new();
        for p in pairs {
            map.push_str(&format!(
                "{} {} # {}\n",
                p.source.path, p.target.path, p.why
            ));
        }
        std::fs::write(logdir.join("disk-mapping"), map)?;
        std::fs::write(
            logdir.join("layout.json"),
            serde_json::to_vec_pretty(&o.layout)?,
        )?;
        std::fs::write(
            logdir.join("layout-recovered.json"),
            serde_json::to_vec_pretty(l)?,
        )?;
        std::fs::write(
            logdir.join("backup.json"),
            serde_json::to_vec_pretty(&o.backup)?,
        )?;
        for f in &o.keep_files {
            if let Some(n) = f.file_name() {
                let _ = std::fs::copy(f, logdir.join(n));
            }
        }
        let _ = std::fs::copy("/var/log/lifeboat/recover.log", logdir.join("recover.log"));
    }
    Ok(())
}

fn os_id(root: &Path) -> Option<String> {
    let t = std::fs::read_to_string(root.join("etc/os-release")).ok()?;
    t.lines()
        .find_map(|l| l.strip_prefix("ID="))
        .map(|s| s.trim_matches('"').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_are_replaced_whole() {
        let names: BTreeMap<String, String> = [
            ("/dev/sda".to_string(), "/dev/nvme0n1".to_string()),
            ("/dev/sda1".to_string(), "/dev/nvme0n1p1".to_string()),
            ("/dev/sda10".to_string(), "/dev/nvme0n1p10".to_string()),
        ]
        .into();
        let t = "/dev/sda1 / ext4 defaults 0 1\n/dev/sda10 /x xfs 0 0\nUUID=ab /dev/sdab\nGRUB resume=/dev/sda1\n";
        assert_eq!(
            rename_devices(t, &names),
            "/dev/nvme0n1p1 / ext4 defaults 0 1\n/dev/nvme0n1p10 /x xfs 0 0\nUUID=ab /dev/sdab\nGRUB resume=/dev/nvme0n1p1\n"
        );
    }

    #[test]
    fn writes_outside_the_mapped_disks_are_refused() {
        let d = crate::layout::test_disk("vda", 1 << 30, None);
        let l = Layout {
            disks: vec![d],
            ..crate::layout::test_layout()
        };
        let ok = plan::groups(&l).unwrap();
        check_writes(&ok, &writable(&l)).unwrap();
        let mut bad = ok.clone();
        bad[0].steps.push(Step {
            device: "/dev/vda".into(),
            argv: vec!["dd".into(), "of=/dev/vdb".into(), "/dev/vdb".into()],
            stdin: None,
        });
        let e = check_writes(&bad, &writable(&l)).unwrap_err().to_string();
        assert!(
            e.contains("/dev/vdb") && e.contains("not a mapped target"),
            "{e}"
        );
        // A device-mapper table names devices on stdin.
        let mut bad = ok.clone();
        bad[0].steps.push(Step {
            device: "/dev/vda".into(),
            argv: vec!["dmsetup".into(), "create".into(), "x".into()],
            stdin: Some("0 8 linear /dev/vda 0\n8 8 linear /dev/vdb 0\n".into()),
        });
        let e = check_writes(&bad, &writable(&l)).unwrap_err().to_string();
        assert!(e.contains("/dev/vdb"), "{e}");
    }

    #[test]
    fn a_thin_pool_plan_passes_the_write_check() {
        use lifeboat_contract::{Lv, Pv, Vg};
        let mut d = crate::layout::test_disk("vdc", 600 << 20, None);
        d.table = None;
        let lv = |name: &str, segtype: &str, pool: Option<&str>| Lv {
            vg: "tvg".into(),
            name: name.into(),
            uuid: format!("{name}-uuid"),
            size_bytes: 100 << 20,
            segtype: segtype.into(),
            pool: pool.map(String::from),
            stripes: 1,
        };
        let l = Layout {
            disks: vec![d],
            lvm: lifeboat_contract::Lvm {
                pvs: vec![Pv {
                    device: "/dev/vdc".into(),
                    uuid: "7ComH8-RgPU-2U9C-iUSs-VLvd-c93g-0IdRCL".into(),
                    vg: "tvg".into(),
                    size_bytes: 600 << 20,
                }],
                vgs: vec![Vg {
                    name: "tvg".into(),
                    uuid: "v".into(),
                    extent_bytes: 4 << 20,
                    size_bytes: 596 << 20,
                    metadata: Some(include_str!("../../tests/fixtures/layout/thin-vg.meta").into()),
                }],
                lvs: vec![
                    lv("pool", "thin-pool", None),
                    lv("a", "thin", Some("pool")),
                    lv("b", "thin", Some("pool")),
                ],
            },
            ..crate::layout::test_layout()
        };
        let groups = plan::groups(&l).unwrap();
        let text: Vec<String> = groups
            .iter()
            .flat_map(|g| &g.steps)
            .map(|s| s.render())
            .collect();
        assert!(
            text.iter().any(|c| c.starts_with("thin_restore")),
            "{text:#?}"
        );
        check_writes(&groups, &writable(&l)).unwrap();
    }
}
