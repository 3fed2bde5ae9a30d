//! From a captured [`Layout`] to the ordered list of commands that
//! recreates it on blank disks with the same identities: partition tables
//! (same disk and partition GUIDs), md arrays (same UUID), LUKS (same UUID),
//! LVM (same PV UUIDs, extent size, LV sizes, thin pools), filesystems (same
//! UUIDs, labels and creation parameters), btrfs subvolumes.
//!
//! Dependency order: disks → partitions → md → LUKS → LVM → filesystems →
//! subvolumes. Every step names the device it writes, so the recovery engine
//! can refuse anything that is not mapped.

use anyhow::{bail, Context, Result};
use lifeboat_contract::{Filesystem, Layout, PartitionTable};
use std::collections::BTreeSet;

/// One command of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The device this step writes.
    pub device: String,
    pub argv: Vec<String>,
    /// Text fed on standard input (sfdisk scripts, LUKS keys as a placeholder).
    pub stdin: Option<String>,
}

impl Step {
    fn new(device: &str, argv: &[&str]) -> Step {
        Step {
            device: device.to_string(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            stdin: None,
        }
    }

    /// Shell-like rendering for `--dry-run` and golden tests.
    pub fn render(&self) -> String {
        let q = |a: &String| {
            if a.is_empty()
                || a.contains(|c: char| c.is_whitespace() || "'\"\\$`*?[]{}();&|<>".contains(c))
            {
                format!("'{}'", a.replace('\'', "'\\''"))
            } else {
                a.clone()
            }
        };
        let cmd = self.argv.iter().map(q).collect::<Vec<_>>().join(" ");
        match &self.stdin {
            Some(s) => format!("{cmd} <<EOF\n{}EOF", s),
            None => cmd,
        }
    }
}

/// The sfdisk script that recreates `t` with the same identifiers.
pub fn sfdisk_script(t: &PartitionTable) -> String {
    let mut s = format!("label: {}\nlabel-id: {}\nunit: sectors\n", t.kind, t.id);
    if t.sector_size != 512 {
        s.push_str(&format!("sector-size: {}\n", t.sector_size));
    }
    if let Some(f) = t.first_lba {
        s.push_str(&format!("first-lba: {f}\n"));
    }
    for p in &t.partitions {
        let mut fields = vec![
            format!("start={}", p.start),
            format!("size={}", p.size),
            format!("type={}", p.type_id),
        ];
        if let Some(u) = &p.uuid {
            if t.kind == "gpt" {
                fields.push(format!("uuid={u}"));
            }
        }
        if let Some(n) = &p.name {
            fields.push(format!("name=\"{}\"", n.replace('"', "")));
        }
        if let Some(a) = &p.attrs {
            fields.push(format!("attrs=\"{a}\""));
        }
        if p.bootable {
            fields.push("bootable".into());
        }
        s.push_str(&format!("{} : {}\n", p.node, fields.join(", ")));
    }
    s
}

/// mkfs for one filesystem, reproducing UUID, label and parameters.
fn mkfs(f: &Filesystem) -> Result<Option<Step>> {
    let d = f.device.as_str();
    let mut a: Vec<String> = Vec::new();
    let uuid = f.uuid.clone();
    match f.fstype.as_str() {
        "ext2" | "ext3" | "ext4" => {
            a.extend(["mke2fs".into(), "-F".into(), "-q".into(), "-t".into(), f.fstype.clone()]);
            if let Some(u) = uuid {
                a.extend(["-U".into(), u]);
            }
            if let Some(l) = &f.label {
                a.extend(["-L".into(), l.clone()]);
            }
            if let Some(b) = f.params.get("block_size") {
                a.extend(["-b".into(), b.clone()]);
            }
            if let Some(i) = f.params.get("inode_size") {
                a.extend(["-I".into(), i.clone()]);
            }
            if let Some(feat) = f.params.get("features") {
                // mke2fs takes the creation-time features; runtime state is not a feature to request.
                let skip = ["needs_recovery", "orphan_present", "mmp"];
                let list: Vec<&str> = feat.split_whitespace().filter(|x| !skip.contains(x)).collect();
                a.extend(["-O".into(), list.join(",")]);
            }
        }
        "xfs" => {
            a.extend(["mkfs.xfs".into(), "-f".into(), "-q".into()]);
            let mut m = Vec::new();
            if let Some(u) = uuid {
                m.push(format!("uuid={u}"));
            }
            for (k, opt) in [("meta-data.crc", "crc"), ("meta-data.finobt", "finobt"), ("meta-data.reflink", "reflink"), ("meta-data.bigtime", "bigtime")] {
                if let Some(v) = f.params.get(k) {
                    m.push(format!("{opt}={v}"));
                }
            }
            if !m.is_empty() {
                a.extend(["-m".into(), m.join(",")]);
            }
            if let Some(i) = f.params.get("meta-data.isize") {
                a.extend(["-i".into(), format!("size={i}")]);
            }
            if let Some(b) = f.params.get("data.bsize") {
                a.extend(["-b".into(), format!("size={b}")]);
            }
            if let Some(l) = &f.label {
                a.extend(["-L".into(), l.clone()]);
            }
        }
        "btrfs" => {
            a.extend(["mkfs.btrfs".into(), "-f".into(), "-q".into()]);
            if let Some(u) = uuid {
                a.extend(["-U".into(), u]);
            }
            if let Some(l) = &f.label {
                a.extend(["-L".into(), l.clone()]);
            }
        }
        "vfat" => {
            a.extend(["mkfs.vfat".into()]);
            if let Some(u) = uuid {
                a.extend(["-i".into(), u.replace('-', "")]);
            }
            if let Some(l) = &f.label {
                a.extend(["-n".into(), l.clone()]);
            }
        }
        "swap" => {
            a.extend(["mkswap".into(), "-f".into()]);
            if let Some(u) = uuid {
                a.extend(["-U".into(), u]);
            }
            if let Some(l) = &f.label {
                a.extend(["-L".into(), l.clone()]);
            }
        }
        // Containers are recreated by their own steps.
        "linux_raid_member" | "crypto_LUKS" | "LVM2_member" => return Ok(None),
        other => bail!("{d}: cannot recreate a {other} filesystem (supported: ext2/3/4, xfs, btrfs, vfat, swap)"),
    }
    a.push(d.to_string());
    Ok(Some(Step {
        device: d.to_string(),
        argv: a,
        stdin: None,
    }))
}

/// A condition that means a group of steps has already been carried out
/// (by an earlier, interrupted run): the recovery engine checks it before
/// running the group and skips the group when it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    /// The disk carries this table: same kind, id and partitions.
    Table {
        disk: String,
        kind: String,
        id: String,
        /// (number, start, size) in sectors.
        partitions: Vec<(u32, u64, u64)>,
    },
    /// The device carries a signature with this UUID (whole-disk use).
    Signature {
        device: String,
        uuid: String,
    },
    /// An md array with this UUID is assembled at `device` (or can be).
    Md {
        device: String,
        uuid: String,
        members: Vec<String>,
    },
    /// A LUKS header with this UUID.
    Luks {
        device: String,
        uuid: String,
    },
    /// `/dev/mapper/<name>` exists.
    Open {
        name: String,
    },
    Pv {
        device: String,
        uuid: String,
    },
    Vg {
        name: String,
    },
    Lv {
        vg: String,
        name: String,
    },
    /// A filesystem of this type and UUID; `marked`: it must also carry
    /// the recovery's marker file (proof that this recovery made it and
    /// not an old installation).
    Fs {
        device: String,
        fstype: String,
        uuid: Option<String>,
        marked: bool,
    },
}

/// Steps that belong together (e.g. wipe + partition + re-read), with the
/// condition under which they are already done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// What the group makes, for the log (`partition table on /dev/sda`).
    pub what: String,
    pub done: Option<Done>,
    pub steps: Vec<Step>,
}

impl Group {
    fn new(what: String, done: Option<Done>) -> Group {
        Group {
            what,
            done,
            steps: Vec::new(),
        }
    }
}

/// The whole ordered plan as a flat command list. LUKS keys are read from
/// `$LIFEBOAT_KEYFILE` at run time (never stored in the plan).
pub fn commands(l: &Layout) -> Result<Vec<Step>> {
    Ok(groups(l)?.into_iter().flat_map(|g| g.steps).collect())
}

/// Partition types that are containers, not data (MBR extended).
pub(crate) fn is_extended(type_id: &str) -> bool {
    matches!(
        type_id
            .trim_start_matches("0x")
            .to_ascii_lowercase()
            .as_str(),
        "5" | "f" | "85"
    )
}

const LVM_META_DIR: &str = "/run/lifeboat/lvm";

fn lvm_meta_file(vg: &str) -> String {
    format!("{LVM_META_DIR}/{vg}.vg")
}

/// The recorded metadata of `vg`, when the VG can be restored from it:
/// linear and striped LVs, and thin pools whose metadata LV is linear
/// (their thin metadata is rebuilt empty, see [`crate::lvmmeta`]). RAID
/// and mirror LVs carry state that vgcfgrestore cannot recreate.
fn restorable<'a>(l: &'a Layout, vg: &str) -> Option<&'a str> {
    let v = l.lvm.vgs.iter().find(|v| v.name == vg)?;
    let meta = v.metadata.as_deref()?;
    let known = l.lvm.lvs.iter().filter(|lv| lv.vg == vg).all(|lv| {
        matches!(
            lv.segtype.as_str(),
            "linear" | "striped" | "thin-pool" | "thin"
        )
    });
    // The metadata and the LV list must agree on the pools (a pool made
    // or removed between the two captures: LV by LV); a pool the metadata
    // parser does not understand means LV by LV too.
    let listed = l
        .lvm
        .lvs
        .iter()
        .filter(|lv| lv.vg == vg && lv.segtype == "thin-pool")
        .count();
    match thin_pools(l, vg, meta) {
        Ok(p) if known && p.len() == listed => Some(meta),
        _ => None,
    }
}

/// The device-mapper name under which the `i`th thin pool's metadata LV
/// of a VG is mapped while its thin metadata is written.
pub fn tmeta_dm(i: usize) -> String {
    format!("lifeboat-tmeta{i}")
}

/// The thin pools of `vg` from its metadata, each with its metadata LV's
/// device-mapper table on the captured PV devices.
fn thin_pools(l: &Layout, vg: &str, meta: &str) -> Result<Vec<(crate::lvmmeta::ThinPool, String)>> {
    let mut out = Vec::new();
    for p in crate::lvmmeta::thin_pools(meta, vg)? {
        let mut table = String::new();
        for (start, n, uuid, off) in &p.meta_map {
            let dev = l
                .lvm
                .pvs
                .iter()
                .find(|pv| pv.vg == vg && &pv.uuid == uuid)
                .map(|pv| pv.device.as_str())
                .with_context(|| format!("{vg}/{}: PV {uuid} was not captured", p.pool))?;
            table.push_str(&format!("{start} {n} linear {dev} {off}\n"));
        }
        out.push((p, table));
    }
    Ok(out)
}

/// The ordered plan in checkable groups.
pub fn groups(l: &Layout) -> Result<Vec<Group>> {
    let mut out = Vec::new();
    // 1. Clear old signatures on every captured disk, then partition, then
    //    clear old signatures inside the new partitions.
    for d in &l.disks {
        let done = match &d.table {
            Some(t) => Some(Done::Table {
                disk: d.path.clone(),
                kind: t.kind.clone(),
                id: t.id.clone(),
                partitions: t
                    .partitions
                    .iter()
                    .map(|p| (p.number, p.start, p.size))
                    .collect(),
            }),
            None => l
                .filesystems
                .iter()
                .find(|f| f.device == d.path)
                .and_then(|f| f.uuid.clone())
                .map(|uuid| Done::Signature {
                    device: d.path.clone(),
                    uuid,
                }),
        };
        let what = match &d.table {
            Some(t) => format!("{} partition table on {}", t.kind, d.path),
            None => format!("blank {}", d.path),
        };
        let mut g = Group::new(what, done);
        g.steps
            .push(Step::new(&d.path, &["wipefs", "--all", "--force", &d.path]));
        if let Some(t) = &d.table {
            let mut s = Step::new(
                &d.path,
                &["sfdisk", "--no-reread", "--no-tell-kernel", "-q", &d.path],
            );
            s.stdin = Some(sfdisk_script(t));
            g.steps.push(s);
            g.steps
                .push(Step::new(&d.path, &["partx", "--update", &d.path]));
            for p in t.partitions.iter().filter(|p| !is_extended(&p.type_id)) {
                g.steps
                    .push(Step::new(&p.node, &["wipefs", "--all", "--force", &p.node]));
            }
        }
        out.push(g);
    }
    // 2. md arrays.
    for m in &l.md {
        let mut a = vec![
            "mdadm".to_string(),
            "--create".into(),
            m.device.clone(),
            "--run".into(),
            format!("--level={}", m.level),
            format!("--metadata={}", m.metadata),
            format!("--uuid={}", m.uuid),
            format!("--raid-devices={}", m.members.len()),
        ];
        if let Some(n) = &m.name {
            // "host:name": keep the name part; the homehost follows the machine.
            let (host, name) = n.split_once(':').unwrap_or(("", n));
            a.push(format!("--name={name}"));
            if !host.is_empty() {
                a.push(format!("--homehost={host}"));
            }
        }
        a.extend(m.members.iter().cloned());
        if !m.spares.is_empty() {
            a.push(format!("--spare-devices={}", m.spares.len()));
            a.extend(m.spares.iter().cloned());
        }
        let mut g = Group::new(
            format!("md array {} ({})", m.device, m.level),
            Some(Done::Md {
                device: m.device.clone(),
                uuid: m.uuid.clone(),
                members: m.members.clone(),
            }),
        );
        g.steps.push(Step {
            device: m.device.clone(),
            argv: a,
            stdin: None,
        });
        out.push(g);
    }
    // 3. LUKS containers, then open them under their old names.
    for c in &l.luks {
        let mut a = vec![
            "cryptsetup".to_string(),
            "luksFormat".into(),
            "--batch-mode".into(),
            format!("--type=luks{}", c.version),
            format!("--uuid={}", c.uuid),
            format!("--cipher={}", c.cipher),
            format!("--key-size={}", c.key_bits),
            "--key-file=$LIFEBOAT_KEYFILE".into(),
        ];
        if let Some(h) = &c.hash {
            a.push(format!("--hash={h}"));
        }
        if let (Some(p), 2) = (&c.pbkdf, c.version) {
            a.push(format!("--pbkdf={p}"));
        }
        if let (Some(s), 2) = (c.sector_size, c.version) {
            a.push(format!("--sector-size={s}"));
        }
        if let (Some(lbl), 2) = (&c.label, c.version) {
            a.push(format!("--label={lbl}"));
        }
        a.push(c.device.clone());
        let mut g = Group::new(
            format!("LUKS{} container on {}", c.version, c.device),
            Some(Done::Luks {
                device: c.device.clone(),
                uuid: c.uuid.clone(),
            }),
        );
        g.steps.push(Step {
            device: c.device.clone(),
            argv: a,
            stdin: None,
        });
        out.push(g);
        let name = c.mapper_name();
        let mut g = Group::new(
            format!("/dev/mapper/{name}"),
            Some(Done::Open { name: name.clone() }),
        );
        g.steps.push(Step::new(
            &c.device,
            &[
                "cryptsetup",
                "open",
                "--key-file=$LIFEBOAT_KEYFILE",
                &c.device,
                &name,
            ],
        ));
        out.push(g);
    }
    // 4. LVM: PVs with their UUIDs, VGs with their extent size, LVs (thin
    //    pools before thin volumes). A VG whose metadata was recorded and
    //    holds only linear/striped LVs is restored from it instead, which
    //    keeps the VG and LV UUIDs.
    for v in &l.lvm.vgs {
        if let Some(meta) = restorable(l, &v.name) {
            let mut g = Group::new(
                format!("LVM metadata of {} (for vgcfgrestore)", v.name),
                None,
            );
            g.steps.push(Step::new("", &["mkdir", "-p", LVM_META_DIR]));
            let mut w = Step::new(
                "",
                &[
                    "dd",
                    &format!("of={}", lvm_meta_file(&v.name)),
                    "status=none",
                ],
            );
            w.stdin = Some(meta.to_string());
            g.steps.push(w);
            out.push(g);
        }
    }
    for p in &l.lvm.pvs {
        let restore = restorable(l, &p.vg).map(|_| lvm_meta_file(&p.vg));
        let mut g = Group::new(
            format!("LVM physical volume {}", p.device),
            Some(Done::Pv {
                device: p.device.clone(),
                uuid: p.uuid.clone(),
            }),
        );
        g.steps.push(Step::new(
            &p.device,
            &[
                "lvm",
                "pvcreate",
                "--yes",
                "--force",
                "--uuid",
                &p.uuid,
                &restore
                    .as_ref()
                    .map(|f| format!("--restorefile={f}"))
                    .unwrap_or_else(|| "--norestorefile".into()),
                &p.device,
            ],
        ));
        out.push(g);
    }
    for v in &l.lvm.vgs {
        let pvs: Vec<String> = l
            .lvm
            .pvs
            .iter()
            .filter(|p| p.vg == v.name)
            .map(|p| p.device.clone())
            .collect();
        if restorable(l, &v.name).is_some() {
            let mut g = Group::new(
                format!("LVM volume group {} (restored with its UUIDs)", v.name),
                Some(Done::Vg {
                    name: v.name.clone(),
                }),
            );
            let meta = restorable(l, &v.name).unwrap_or_default();
            let pools = thin_pools(l, &v.name, meta)?;
            // Each pool's thin metadata first, empty but for its thin
            // volumes' device ids and the pool's transaction id, written
            // where the metadata LV lies (mapped alone: LVM does not
            // activate it); it needs only the PVs. Done before
            // vgcfgrestore, so a VG that exists (this group's mark) has it.
            for (i, (p, table)) in pools.iter().enumerate() {
                let dev = table.split_whitespace().nth(3).unwrap_or("").to_string();
                let dm = tmeta_dm(i);
                let xml = format!("{LVM_META_DIR}/{}-{}.xml", v.name, p.pool);
                let mut create = Step::new(&dev, &["dmsetup", "create", &dm]);
                create.stdin = Some(table.clone());
                g.steps.push(create);
                let mut w = Step::new("", &["dd", &format!("of={xml}"), "status=none"]);
                w.stdin = Some(p.xml.clone());
                g.steps.push(w);
                g.steps.push(Step::new(
                    &dev,
                    &[
                        "thin_restore",
                        "-i",
                        &xml,
                        "-o",
                        &format!("/dev/mapper/{dm}"),
                    ],
                ));
                g.steps
                    .push(Step::new(&dev, &["dmsetup", "remove", "--retry", &dm]));
            }
            let file = lvm_meta_file(&v.name);
            let mut a = vec!["lvm", "vgcfgrestore", "-f", &file, &v.name];
            if !pools.is_empty() {
                // vgcfgrestore refuses thin pools without it: their thin
                // metadata is not in the file (it was written above).
                a.insert(2, "--force");
            }
            g.steps
                .push(Step::new(pvs.first().map(|s| s.as_str()).unwrap_or(""), &a));
            // Bigger partitions: let the PVs use them.
            for pv in &pvs {
                g.steps.push(Step::new(pv, &["lvm", "pvresize", pv]));
            }
            out.push(g);
            continue;
        }
        let mut a = vec![
            "lvm".to_string(),
            "vgcreate".into(),
            "--yes".into(),
            "-s".into(),
            format!("{}b", v.extent_bytes),
            v.name.clone(),
        ];
        a.extend(pvs.iter().cloned());
        let mut g = Group::new(
            format!("LVM volume group {}", v.name),
            Some(Done::Vg {
                name: v.name.clone(),
            }),
        );
        g.steps.push(Step {
            device: pvs.first().cloned().unwrap_or_default(),
            argv: a,
            stdin: None,
        });
        out.push(g);
    }
    let mut lvs = l.lvm.lvs.clone();
    let rank = |s: &str| match s {
        "thin-pool" => 1,
        "thin" => 2,
        _ => 0,
    };
    lvs.sort_by(|a, b| (rank(&a.segtype), &a.vg, &a.name).cmp(&(rank(&b.segtype), &b.vg, &b.name)));
    for lv in lvs.iter().filter(|lv| restorable(l, &lv.vg).is_none()) {
        let dev = format!("/dev/{}/{}", lv.vg, lv.name);
        let size = format!("{}b", lv.size_bytes);
        // lvcreate's arguments after the common prefix, by segment type.
        let named = || {
            vec![
                "-L".to_string(),
                size.clone(),
                "-n".into(),
                lv.name.clone(),
                lv.vg.clone(),
            ]
        };
        let tail: Vec<String> = match lv.segtype.as_str() {
            "linear" => named(),
            "striped" => [vec!["-i".to_string(), lv.stripes.to_string()], named()].concat(),
            "raid1" | "mirror" => [
                vec![
                    "--type".to_string(),
                    lv.segtype.clone(),
                    "-m".into(),
                    "1".into(),
                ],
                named(),
            ]
            .concat(),
            "thin-pool" => vec![
                "-L".into(),
                size.clone(),
                "-T".into(),
                format!("{}/{}", lv.vg, lv.name),
            ],
            "thin" => {
                let Some(pool) = &lv.pool else {
                    bail!("thin volume {dev} has no pool")
                };
                vec![
                    "-V".into(),
                    size.clone(),
                    "-T".into(),
                    format!("{}/{}", lv.vg, pool),
                    "-n".into(),
                    lv.name.clone(),
                ]
            }
            other => bail!("{dev}: cannot recreate an LV of type {other}"),
        };
        let a = [
            // No dmeventd in the rescue system: asking it to monitor (or
            // unmonitor) would only fail, and fail vgchange (exit 5); the
            // recovered system monitors its own volumes when it boots.
            vec![
                "lvm".to_string(),
                "lvcreate".into(),
                "--yes".into(),
                "--ignoremonitoring".into(),
            ],
            tail,
        ]
        .concat();
        let mut g = Group::new(
            format!("LVM logical volume {dev} ({})", lv.segtype),
            Some(Done::Lv {
                vg: lv.vg.clone(),
                name: lv.name.clone(),
            }),
        );
        g.steps.push(Step {
            device: dev,
            argv: a,
            stdin: None,
        });
        out.push(g);
    }
    // Activate every VG: vgcfgrestore leaves LVs inactive, and a re-run
    // that kept the VG needs its LVs too.
    for v in &l.lvm.vgs {
        let mut g = Group::new(format!("activate LVM volume group {}", v.name), None);
        g.steps.push(Step::new(
            "",
            &[
                "lvm",
                "vgchange",
                "--ignoremonitoring",
                "--activate",
                "y",
                &v.name,
            ],
        ));
        out.push(g);
    }
    // 5. Filesystems and swap; 6. btrfs subvolumes, parents first.
    let mut seen = BTreeSet::new();
    for f in &l.filesystems {
        if !seen.insert(f.device.clone()) {
            continue;
        }
        let Some(mk) = mkfs(f)? else { continue };
        let mut g = Group::new(
            format!("{} on {}", f.fstype, f.device),
            Some(Done::Fs {
                device: f.device.clone(),
                fstype: f.fstype.clone(),
                uuid: f.uuid.clone(),
                marked: f.fstype != "swap",
            }),
        );
        g.steps.push(mk);
        if !f.subvolumes.is_empty() {
            let mnt = "/run/lifeboat/subvol";
            g.steps.push(Step::new(&f.device, &["mkdir", "-p", mnt]));
            g.steps.push(Step::new(
                &f.device,
                &["mount", "-o", "subvolid=5", &f.device, mnt],
            ));
            let mut subs = f.subvolumes.clone();
            subs.sort_by_key(|s| s.id);
            for s in &subs {
                g.steps.push(Step::new(
                    &f.device,
                    &["btrfs", "subvolume", "create", &format!("{mnt}/{}", s.path)],
                ));
            }
            if let Some(def) = f
                .default_subvolume
                .and_then(|id| subs.iter().find(|s| s.id == id))
            {
                g.steps.push(Step::new(
                    &f.device,
                    &[
                        "btrfs",
                        "subvolume",
                        "set-default",
                        &format!("{mnt}/{}", def.path),
                    ],
                ));
            }
            g.steps.push(Step::new(&f.device, &["umount", mnt]));
        }
        out.push(g);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout_parse as lp;
    use lifeboat_contract::Lvm;

    macro_rules! fx {
        ($n:literal) => {
            include_str!(concat!("../../tests/fixtures/layout/", $n))
        };
    }

    fn disk(name: &str, table: Option<PartitionTable>) -> lifeboat_contract::Disk {
        crate::layout::test_disk(name, 700 << 20, table)
    }

    /// The layout recorded in the VM: md RAID1 on vda+vdb, LUKS2 on it, LVM
    /// (linear + thin) inside, xfs and ext4 on LVs, btrfs with subvolumes on vdc;
    /// plus a GPT disk (sfdisk fixture) with ext4 and swap.
    fn recorded() -> Layout {
        let blkid = fx!("vm/blkid.txt");
        let mut fss = Vec::new();
        for block in blkid.split("== ").filter(|b| !b.trim().is_empty()) {
            let (dev, rest) = block.split_once('\n').unwrap();
            if let Some(mut f) = crate::layout::parse_blkid(dev.trim(), rest) {
                match f.fstype.as_str() {
                    "xfs" => f.params = lp::xfs_info(fx!("vm/xfs-info.txt")),
                    "ext4" => f.params = lp::tune2fs(fx!("vm/tune2fs-l.txt")),
                    "btrfs" => {
                        f.subvolumes =
                            lp::btrfs_subvolumes(fx!("vm/btrfs-subvolume-list.txt")).unwrap();
                        f.default_subvolume = lp::btrfs_default(fx!("vm/btrfs-get-default.txt"));
                    }
                    _ => {}
                }
                fss.push(f);
            }
        }
        let gpt = crate::layout::parse_sfdisk(fx!("sfdisk-gpt.json")).unwrap();
        let mut swap = crate::layout::parse_blkid(
            "/dev/loop0p2",
            "TYPE=swap\nUUID=6b1f7a52-7c5e-4a71-a5b3-0c7a1d6e9f00\nLABEL=swap0\n",
        )
        .unwrap();
        swap.used_bytes = None;
        fss.push(swap);
        let mut luks = lp::luks_dump("/dev/md0", fx!("vm/cryptsetup-luksdump.txt")).unwrap();
        luks.name = Some("cr".into());
        Layout {
            schema_version: 1,
            hostname: "lbhost".into(),
            disks: vec![
                disk("loop0", Some(gpt)),
                disk("vda", None),
                disk("vdb", None),
                disk("vdc", None),
            ],
            filesystems: fss,
            mounts: vec![],
            md: vec![lp::mdadm_export("/dev/md0", fx!("vm/mdadm-detail-export.txt")).unwrap()],
            luks: vec![luks],
            lvm: Lvm {
                pvs: lp::lvm_pvs(fx!("vm/lvm-pvs.json")).unwrap(),
                vgs: lp::lvm_vgs(fx!("vm/lvm-vgs.json")).unwrap(),
                lvs: lp::lvm_lvs(fx!("vm/lvm-lvs.json")).unwrap(),
            },
            bootloader: Default::default(),
        }
    }

    #[test]
    fn recorded_layout_gives_the_golden_command_list() {
        let text: String = commands(&recorded())
            .unwrap()
            .iter()
            .map(|s| s.render() + "\n")
            .collect();
        let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/layout/plan-golden.txt");
        if std::env::var_os("LIFEBOAT_UPDATE_GOLDEN").is_some() {
            std::fs::write(&golden, &text).unwrap();
        }
        let want = std::fs::read_to_string(&golden)
            .expect("golden file missing: run with LIFEBOAT_UPDATE_GOLDEN=1");
        assert_eq!(text, want, "plan differs from {}", golden.display());
    }

    #[test]
    fn a_recorded_vg_of_plain_lvs_is_restored_with_its_uuids() {
        let mut l = recorded();
        l.lvm.vgs[0].metadata = Some("vg0 {\n\tid = \"x\"\n}\n".into());
        // With a thin pool the metadata does not describe: LV by LV.
        let text: Vec<String> = commands(&l).unwrap().iter().map(|s| s.render()).collect();
        assert!(text.iter().any(|c| c.contains("lvcreate")));
        assert!(!text.iter().any(|c| c.contains("vgcfgrestore")));
        // Only linear LVs: restored from the metadata, no lvcreate.
        l.lvm.lvs.retain(|lv| lv.segtype == "linear");
        let steps = commands(&l).unwrap();
        let text: Vec<String> = steps.iter().map(|s| s.render()).collect();
        let pos = |needle: &str| {
            text.iter()
                .position(|c| c.contains(needle))
                .unwrap_or_else(|| panic!("{needle} missing in {text:#?}"))
        };
        assert!(pos("dd of=/run/lifeboat/lvm/vg0.vg") < pos("pvcreate"));
        assert!(
            pos("--restorefile=/run/lifeboat/lvm/vg0.vg")
                < pos("vgcfgrestore -f /run/lifeboat/lvm/vg0.vg vg0")
        );
        assert!(pos("vgcfgrestore") < pos("lvm pvresize"));
        assert!(pos("lvm pvresize") < pos("lvm vgchange --ignoremonitoring --activate y vg0"));
        assert!(pos("lvm vgchange --ignoremonitoring --activate y vg0") < pos("mkfs.xfs"));
        assert!(!text
            .iter()
            .any(|c| c.contains("lvcreate") || c.contains("vgcreate")));
        let dd = steps.iter().find(|s| s.argv[0] == "dd").unwrap();
        assert_eq!(dd.stdin.as_deref(), l.lvm.vgs[0].metadata.as_deref());
    }

    #[test]
    fn a_vg_with_a_thin_pool_is_restored_with_its_uuids_and_empty_thin_metadata() {
        use lifeboat_contract::{Lv, Pv, Vg};
        let meta = include_str!("../../tests/fixtures/layout/thin-vg.meta");
        let mut l = recorded();
        let lv = |name: &str, segtype: &str, pool: Option<&str>| Lv {
            vg: "tvg".into(),
            name: name.into(),
            uuid: format!("{name}-uuid"),
            size_bytes: 100 << 20,
            segtype: segtype.into(),
            pool: pool.map(String::from),
            stripes: 1,
        };
        l.lvm.pvs = vec![Pv {
            device: "/dev/vdc".into(),
            uuid: "7ComH8-RgPU-2U9C-iUSs-VLvd-c93g-0IdRCL".into(),
            vg: "tvg".into(),
            size_bytes: 600 << 20,
        }];
        l.lvm.vgs = vec![Vg {
            name: "tvg".into(),
            uuid: "iHsI0k-CLah-XD9Y-GGJt-9jqi-Jkru-enUU0z".into(),
            extent_bytes: 4 << 20,
            size_bytes: 596 << 20,
            metadata: Some(meta.into()),
        }];
        l.lvm.lvs = vec![
            lv("pool", "thin-pool", None),
            lv("a", "thin", Some("pool")),
            lv("b", "thin", Some("pool")),
        ];
        l.filesystems.retain(|f| !f.device.starts_with("/dev/vg0/"));
        let steps = commands(&l).unwrap();
        let text: Vec<String> = steps.iter().map(|s| s.render()).collect();
        let pos = |needle: &str| {
            text.iter()
                .position(|c| c.contains(needle))
                .unwrap_or_else(|| panic!("{needle} missing in {text:#?}"))
        };
        // The thin metadata is written between the PV and the VG, so a VG
        // that exists (the group's mark on a rerun) has it.
        assert!(
            pos("--restorefile=/run/lifeboat/lvm/tvg.vg") < pos("dmsetup create lifeboat-tmeta0")
        );
        assert!(
            pos("dmsetup create")
                < pos(
                    "thin_restore -i /run/lifeboat/lvm/tvg-pool.xml -o /dev/mapper/lifeboat-tmeta0"
                )
        );
        assert!(pos("thin_restore") < pos("dmsetup remove --retry lifeboat-tmeta0"));
        assert!(
            pos("dmsetup remove") < pos("vgcfgrestore --force -f /run/lifeboat/lvm/tvg.vg tvg")
        );
        assert!(
            pos("vgcfgrestore --force") < pos("lvm vgchange --ignoremonitoring --activate y tvg")
        );
        assert!(!text
            .iter()
            .any(|c| c.contains("lvcreate") || c.contains("vgcreate")));
        // The metadata LV's extent on the PV's device as the layout has it,
        // and the XML that thin_restore reads.
        let create = steps
            .iter()
            .find(|s| s.argv[..2] == ["dmsetup", "create"])
            .unwrap();
        assert_eq!(create.device, "/dev/vdc");
        assert_eq!(
            create.stdin.as_deref(),
            Some("0 8192 linear /dev/vdc 624640\n")
        );
        let xml = steps
            .iter()
            .find(|s| s.argv.iter().any(|a| a.ends_with("tvg-pool.xml")) && s.argv[0] == "dd")
            .unwrap();
        assert!(xml
            .stdin
            .as_deref()
            .unwrap()
            .contains("<device dev_id=\"2\""));
        // A PV the layout lacks: not restorable, LV by LV instead.
        l.lvm.pvs[0].uuid = "other".into();
        let text: Vec<String> = commands(&l).unwrap().iter().map(|s| s.render()).collect();
        assert!(!text
            .iter()
            .any(|c| c.contains("vgcfgrestore") || c.contains("thin_restore")));
        assert!(text
            .iter()
            .any(|c| c.contains("lvcreate --yes --ignoremonitoring -V")));
    }

    #[test]
    fn order_respects_dependencies() {
        let steps = commands(&recorded()).unwrap();
        let pos = |needle: &str| {
            steps
                .iter()
                .position(|s| s.render().contains(needle))
                .unwrap_or_else(|| panic!("{needle} missing"))
        };
        assert!(pos("sfdisk") < pos("mdadm --create"));
        assert!(pos("mdadm --create") < pos("luksFormat"));
        assert!(pos("luksFormat") < pos("cryptsetup open"));
        assert!(pos("cryptsetup open") < pos("pvcreate"));
        assert!(pos("pvcreate") < pos("vgcreate"));
        assert!(pos("-T vg0/pool") < pos("-n thin1"));
        assert!(pos("lvcreate") < pos("mkfs.xfs"));
        assert!(pos("mkfs.btrfs") < pos("subvolume create /run/lifeboat/subvol/@home/snaps"));
        let exact = |line: &str| {
            steps
                .iter()
                .position(|s| s.render() == line)
                .unwrap_or_else(|| panic!("{line} missing"))
        };
        assert!(
            exact("btrfs subvolume create /run/lifeboat/subvol/@home")
                < exact("btrfs subvolume create /run/lifeboat/subvol/@home/snaps")
        );
        // Identities are carried over.
        let all: String = steps.iter().map(|s| s.render() + "\n").collect();
        assert!(all.contains("--uuid=830bc2d4:41cf2de9:8d11f80c:54269954"));
        assert!(all.contains("--uuid=f79f4ffa-096a-4c97-8cdc-6ddae2ce3879"));
        assert!(all.contains("-U 452dde20-4008-466c-986d-a097d791cfd8"));
        assert!(all.contains("uuid=5f87f980-81af-4a31-97d0-3884d3103ca3"));
        let gpt = crate::layout::parse_sfdisk(fx!("sfdisk-gpt.json")).unwrap();
        assert!(all.contains(&format!("label-id: {}", gpt.id)));
        // No key material in the plan.
        assert!(!all.contains("lifeboat-test-key"));
    }

    #[test]
    fn summary_names_every_layer_of_the_stack() {
        let text = crate::layout::summary(&recorded());
        for want in [
            "md /dev/md0 raid1 (1.2 metadata) uuid 830bc2d4:41cf2de9:8d11f80c:54269954 on /dev/vda /dev/vdb",
            "luks2 /dev/md0 uuid f79f4ffa-096a-4c97-8cdc-6ddae2ce3879 aes-xts-plain64 512 bits (open as cr)",
            "vg vg0 ",
            "  lv thin1 0.04 GiB thin in pool",
            "fs /dev/vdc btrfs uuid 52df621a-be0c-4983-8b93-da66c98febf1 label bt subvolumes 3",
            "boot: BIOS",
        ] {
            assert!(text.contains(want), "summary lacks {want:?}:\n{text}");
        }
    }

    #[test]
    fn sfdisk_script_roundtrips_through_sfdisk() {
        // The script recreates the recorded table: sfdisk is the oracle.
        let t = crate::layout::parse_sfdisk(fx!("sfdisk-gpt.json")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.img");
        std::fs::write(&img, vec![0u8; 64 << 20]).unwrap();
        let script = sfdisk_script(&t).replace(
            &t.partitions[0].node[..t.partitions[0].node.len() - 2],
            &img.display().to_string(),
        );
        let mut c = std::process::Command::new("sfdisk")
            .args(["-q", "--no-reread", "--no-tell-kernel"])
            .arg(&img)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        c.stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(c.wait().unwrap().success(), "sfdisk rejected:\n{script}");
        let out = std::process::Command::new("sfdisk")
            .arg("--json")
            .arg(&img)
            .output()
            .unwrap();
        let back = crate::layout::parse_sfdisk(&String::from_utf8_lossy(&out.stdout)).unwrap();
        assert_eq!(back.id, t.id);
        for (a, b) in back.partitions.iter().zip(&t.partitions) {
            assert_eq!(
                (a.start, a.size, &a.type_id, &a.uuid, &a.name),
                (b.start, b.size, &b.type_id, &b.uuid, &b.name)
            );
        }
    }
}
