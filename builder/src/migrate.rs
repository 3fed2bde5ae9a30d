//! The pure half of recovery: which source disk goes onto which target
//! disk, how partitions and logical volumes change size on a target of a
//! different size, the device renames that follow, and the check that every
//! filesystem's data still fits. Nothing here touches a disk.

use anyhow::{bail, Result};
use lifeboat_contract::{Disk, Layout, PartitionTable};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

const MIB: u64 = 1 << 20;

/// Why a source disk was mapped onto a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    Explicit,
    Serial,
    Wwn,
    NameAndSize,
    UniqueSize,
    /// One source disk, and one disk here that is big enough for it.
    OnlyDisk,
    Asked,
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Why::Explicit => "mapping file",
            Why::Serial => "same serial",
            Why::Wwn => "same WWN",
            Why::NameAndSize => "same name and size",
            Why::UniqueSize => "only disk of the same size",
            Why::OnlyDisk => {
                "automatic: the plan has one disk and this is the only disk here big enough for it"
            }
            Why::Asked => "chosen at the prompt",
        })
    }
}

/// One mapped disk.
#[derive(Debug, Clone)]
pub struct Pair {
    pub source: Disk,
    pub target: Disk,
    pub why: Why,
}

/// Normalise `/dev/sda`, `sda` → `sda`.
pub fn short(dev: &str) -> &str {
    dev.trim_start_matches("/dev/")
}

/// Parse mapping lines `/dev/SRC /dev/DST` (or `SRC:DST,...` from the boot
/// option); `#` starts a comment.
pub fn parse_mapping(text: &str) -> Result<Vec<(String, String)>> {
    let mut v = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        if parts.len() != 2 {
            bail!(
                "disk mapping line {}: {line:?} is not `/dev/SOURCE /dev/TARGET`",
                i + 1
            );
        }
        v.push((short(parts[0]).to_string(), short(parts[1]).to_string()));
    }
    Ok(v)
}

/// `lifeboat.map=vda:sdb,vdb:sdc` from the kernel command line.
pub fn mapping_from_cmdline(cmdline: &str) -> Result<Vec<(String, String)>> {
    let mut v = Vec::new();
    for w in cmdline.split_whitespace() {
        if let Some(list) = w.strip_prefix("lifeboat.map=") {
            for item in list.split(',').filter(|s| !s.is_empty()) {
                let Some((a, b)) = item.split_once(':') else {
                    bail!("lifeboat.map={list}: {item:?} is not SOURCE:TARGET");
                };
                v.push((short(a).to_string(), short(b).to_string()));
            }
        }
    }
    Ok(v)
}

/// Source disks that recovery must recreate: those carrying a partition
/// table or used whole by a filesystem, md, LUKS or LVM.
pub fn disks_in_use(l: &Layout) -> Vec<Disk> {
    let used: BTreeSet<&str> = l
        .filesystems
        .iter()
        .map(|f| f.device.as_str())
        .chain(
            l.md.iter()
                .flat_map(|m| m.members.iter().map(|s| s.as_str())),
        )
        .chain(l.lvm.pvs.iter().map(|p| p.device.as_str()))
        .chain(l.luks.iter().map(|c| c.device.as_str()))
        .collect();
    l.disks
        .iter()
        .filter(|d| d.table.is_some() || used.contains(d.path.as_str()))
        .cloned()
        .collect()
}

/// Map every source disk onto a target, by the rules in order: explicit
/// mapping, same serial, same WWN, same name and size, the only unused
/// target of the same size, and, when the plan has exactly one disk, the
/// only target at least as big as it (the last three not when
/// `identity_only`). `targets` are the eligible disks (the backup's disk,
/// Lifeboat media and protected disks are already left out). `ask` is
/// asked about the rest (and may decline). Never maps two sources onto one
/// target.
pub fn map_disks(
    sources: &[Disk],
    targets: &[Disk],
    explicit: &[(String, String)],
    identity_only: bool,
    ask: &mut dyn FnMut(&Disk, &[&Disk]) -> Option<String>,
) -> Result<Vec<Pair>> {
    let mut used: BTreeSet<String> = BTreeSet::new();
    let mut out: Vec<Option<Pair>> = vec![None; sources.len()];
    let present = || {
        targets
            .iter()
            .map(|t| {
                format!(
                    "{} ({}{})",
                    t.path,
                    human(t.size_bytes),
                    t.serial
                        .as_ref()
                        .map(|s| format!(", serial {s}"))
                        .unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (src, dst) in explicit {
        let Some(i) = sources.iter().position(|s| s.name == *src) else {
            bail!(
                "the disk mapping names source /dev/{src}, which is not a disk of the recorded layout (recorded: {})",
                sources.iter().map(|s| s.path.as_str()).collect::<Vec<_>>().join(", ")
            );
        };
        let Some(t) = targets.iter().find(|t| t.name == *dst) else {
            bail!(
                "the disk mapping names target /dev/{dst}, which is not a usable disk here (usable: {})",
                present()
            );
        };
        if !used.insert(t.name.clone()) || out[i].is_some() {
            bail!(
                "the disk mapping uses /dev/{dst} or /dev/{src} twice; each disk may appear once"
            );
        }
        out[i] = Some(Pair {
            source: sources[i].clone(),
            target: t.clone(),
            why: Why::Explicit,
        });
    }
    type Rule = (Why, fn(&Disk, &Disk) -> bool);
    let rules: &[Rule] = &[
        (Why::Serial, |s, t| {
            s.serial.is_some() && s.serial == t.serial
        }),
        (Why::Wwn, |s, t| s.wwn.is_some() && s.wwn == t.wwn),
        (Why::NameAndSize, |s, t| {
            s.name == t.name && s.size_bytes == t.size_bytes
        }),
    ];
    let rules = if identity_only { &rules[..2] } else { rules };
    for (why, rule) in rules.iter() {
        for (i, s) in sources.iter().enumerate() {
            if out[i].is_some() {
                continue;
            }
            if let Some(t) = targets
                .iter()
                .find(|t| !used.contains(&t.name) && rule(s, t))
            {
                used.insert(t.name.clone());
                out[i] = Some(Pair {
                    source: s.clone(),
                    target: t.clone(),
                    why: why.clone(),
                });
            }
        }
    }
    for (i, s) in sources.iter().enumerate() {
        if out[i].is_some() || identity_only {
            continue;
        }
        let same: Vec<&Disk> = targets
            .iter()
            .filter(|t| !used.contains(&t.name) && t.size_bytes == s.size_bytes)
            .collect();
        let sources_of_size = sources
            .iter()
            .enumerate()
            .filter(|(j, o)| out[*j].is_none() && o.size_bytes == s.size_bytes)
            .count();
        if same.len() == 1 && sources_of_size == 1 {
            used.insert(same[0].name.clone());
            out[i] = Some(Pair {
                source: s.clone(),
                target: same[0].clone(),
                why: Why::UniqueSize,
            });
        }
    }
    if let ([s], [None], false) = (sources, out.as_slice(), identity_only) {
        let big: Vec<&Disk> = targets
            .iter()
            .filter(|t| !used.contains(&t.name) && t.size_bytes >= s.size_bytes)
            .collect();
        if let [t] = big.as_slice() {
            used.insert(t.name.clone());
            out[0] = Some(Pair {
                source: s.clone(),
                target: (*t).clone(),
                why: Why::OnlyDisk,
            });
        }
    }
    let mut unmapped = Vec::new();
    for (i, s) in sources.iter().enumerate() {
        if out[i].is_some() {
            continue;
        }
        let free: Vec<&Disk> = targets.iter().filter(|t| !used.contains(&t.name)).collect();
        match ask(s, &free) {
            Some(name) => {
                let name = short(&name).to_string();
                let Some(t) = free.iter().find(|t| t.name == name) else {
                    bail!("/dev/{name} is not one of the free disks ({})", present());
                };
                used.insert(t.name.clone());
                out[i] = Some(Pair {
                    source: s.clone(),
                    target: (*t).clone(),
                    why: Why::Asked,
                });
            }
            None => unmapped.push(s),
        }
    }
    if !unmapped.is_empty() {
        bail!(
            "no target disk for {} (matched by {}). Disks here: {}. \
             Nothing was written. Give a mapping: a file of `/dev/SOURCE /dev/TARGET` lines (recover.mapping, \
             /etc/lifeboat/disk-mapping or `lifeboat recover --map FILE`) or the boot option lifeboat.map=SOURCE:TARGET",
            unmapped
                .iter()
                .map(|s| format!("{} ({}{})", s.path, human(s.size_bytes), s.serial.as_ref().map(|x| format!(", serial {x}")).unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(", "),
            if identity_only {
                "serial or WWN only: recover.auto_map = \"identity\""
            } else {
                "serial, WWN, name and size, a unique size, or the only disk big enough"
            },
            if targets.is_empty() { "none".to_string() } else { present() }
        );
    }
    Ok(out.into_iter().flatten().collect())
}

/// `1.5 GiB`.
pub fn human(b: u64) -> String {
    let g = b as f64 / (1u64 << 30) as f64;
    if g >= 1.0 {
        format!("{g:.1} GiB")
    } else {
        format!("{:.0} MiB", b as f64 / MIB as f64)
    }
}

/// Partition device node of partition `n` on disk `name`.
pub fn part_node(name: &str, n: u32) -> String {
    if name.ends_with(|c: char| c.is_ascii_digit()) {
        format!("/dev/{name}p{n}")
    } else {
        format!("/dev/{name}{n}")
    }
}

/// How to use extra space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grow {
    Last,
    Proportional,
}

impl Grow {
    pub fn parse(s: &str) -> Result<Grow> {
        match s {
            "last" => Ok(Grow::Last),
            "proportional" => Ok(Grow::Proportional),
            o => bail!("recover.grow = {o:?} is not one of last, proportional"),
        }
    }
}

fn is_fixed_type(type_id: &str) -> bool {
    let t = type_id.to_ascii_uppercase();
    t == "21686148-6449-6E6F-744E-656564454649" // BIOS boot
        || t == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" // ESP
        || t == "EF"
}

/// Resize a partition table recorded on a disk of `src_bytes` for a disk of
/// `dst_bytes`. Equal size, or a smaller disk the partitions still fit on:
/// unchanged. Bigger: grow the last partition (or every partition of 64 MiB
/// and more, proportionally). Smaller: shrink those proportionally.
pub fn resize_table(
    t: &PartitionTable,
    src_bytes: u64,
    dst_bytes: u64,
    grow: Grow,
) -> Result<PartitionTable> {
    let ss = t.sector_size.max(512) as u64;
    let src_n = src_bytes / ss;
    let dst_n = dst_bytes / ss;
    let align = (MIB / ss).max(1);
    // Last sector a partition may use.
    let reserve = if t.kind == "gpt" { 34 } else { 1 };
    let usable_end = dst_n.saturating_sub(reserve);
    let mut nt = t.clone();
    // The target gets its own backup header position.
    nt.last_lba = None;
    let end = |p: &lifeboat_contract::Partition| p.start + p.size - 1;
    let max_end = t.partitions.iter().map(end).max().unwrap_or(0);
    if dst_n == src_n || t.partitions.is_empty() {
        return Ok(nt);
    }
    if dst_n < src_n && max_end <= usable_end {
        return Ok(nt);
    }
    if dst_n > src_n && grow == Grow::Last {
        let delta = (dst_n - src_n) / align * align;
        for p in nt.partitions.iter_mut() {
            let contains_last = crate::plan::is_extended(&p.type_id) && end(p) >= max_end;
            if end(p) == max_end || contains_last {
                p.size += delta;
            }
        }
        if let Some(p) = nt.partitions.iter().find(|p| end(p) > usable_end) {
            bail!("{}: growing it would pass the end of the disk", p.node);
        }
        return Ok(nt);
    }
    if t.partitions
        .iter()
        .any(|p| crate::plan::is_extended(&p.type_id))
    {
        bail!(
            "the MBR table of this disk has logical partitions, which are only moved by growing the last one; \
             use a target disk at least as large ({}), or recover.grow = \"last\"",
            human(src_bytes)
        );
    }
    let mut order: Vec<usize> = (0..t.partitions.len()).collect();
    order.sort_by_key(|&i| t.partitions[i].start);
    let scalable =
        |p: &lifeboat_contract::Partition| !is_fixed_type(&p.type_id) && p.size * ss >= 64 * MIB;
    let first = t.partitions[order[0]].start;
    let mut fixed = 0u64;
    let mut scal = 0u64;
    let mut prev_end = first.saturating_sub(1);
    for &i in &order {
        let p = &t.partitions[i];
        fixed += p.start.saturating_sub(prev_end + 1); // gap before it
        if scalable(p) {
            scal += p.size;
        } else {
            fixed += p.size;
        }
        prev_end = end(p);
    }
    let avail = (usable_end + 1).saturating_sub(first);
    if scal == 0 || avail <= fixed + order.len() as u64 * align {
        bail!(
            "the partitions of this disk need at least {} but the target has {}",
            human((fixed + order.len() as u64 * align) * ss),
            human(avail * ss)
        );
    }
    // Leave room for rounding every start up to the alignment.
    let room = avail - fixed - order.len() as u64 * align;
    let mut prev_end_new = first.saturating_sub(1);
    let mut prev_end_old = first.saturating_sub(1);
    for &i in &order {
        let old = t.partitions[i].clone();
        let gap = old.start.saturating_sub(prev_end_old + 1);
        let mut start = prev_end_new + 1 + gap;
        if old.start.is_multiple_of(align) {
            start = start.div_ceil(align) * align;
        }
        let size = if scalable(&old) {
            ((old.size as u128 * room as u128 / scal as u128) as u64) / align * align
        } else {
            old.size
        };
        if size == 0 {
            bail!("{}: no room left for it on the target", old.node);
        }
        let p = &mut nt.partitions[i];
        p.start = start;
        p.size = size;
        prev_end_new = start + size - 1;
        prev_end_old = end(&old);
    }
    if prev_end_new > usable_end {
        bail!("internal: proportional resize passed the end of the disk");
    }
    Ok(nt)
}

/// Rename every device of the layout according to the mapping (disks and
/// their partitions), resize tables and LVs for the target sizes, and drop
/// source disks that are not recovered. Returns the new layout and the
/// old → new device names.
pub fn migrate(
    l: &Layout,
    pairs: &[Pair],
    grow: Grow,
) -> Result<(Layout, BTreeMap<String, String>)> {
    let mut names = BTreeMap::new();
    for p in pairs {
        names.insert(p.source.path.clone(), p.target.path.clone());
        for part in p.source.table.iter().flat_map(|t| &t.partitions) {
            names.insert(part.node.clone(), part_node(&p.target.name, part.number));
        }
    }
    let mut v = serde_json::to_value(l)?;
    rename(&mut v, &names);
    let mut nl: Layout = serde_json::from_value(v)?;
    let kept: BTreeSet<String> = pairs.iter().map(|p| p.target.path.clone()).collect();
    nl.disks.retain(|d| kept.contains(&d.path));
    for d in nl.disks.iter_mut() {
        let p = pairs.iter().find(|p| p.target.path == d.path).unwrap();
        if let Some(t) = &d.table {
            d.table = Some(
                resize_table(t, p.source.size_bytes, p.target.size_bytes, grow)
                    .map_err(|e| anyhow::anyhow!("{} → {}: {e}", p.source.path, p.target.path))?,
            );
        }
        d.name = p.target.name.clone();
        d.size_bytes = p.target.size_bytes;
        d.serial = p.target.serial.clone();
        d.wwn = p.target.wwn.clone();
        d.model = p.target.model.clone();
        d.by_id = p.target.by_id.clone();
    }
    shrink_lvs(&mut nl);
    Ok((nl, names))
}

fn rename(v: &mut Value, names: &BTreeMap<String, String>) {
    match v {
        Value::String(s) => {
            if let Some(n) = names.get(s.as_str()) {
                *s = n.clone();
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rename(x, names)),
        Value::Object(o) => o.values_mut().for_each(|x| rename(x, names)),
        _ => {}
    }
}

/// Bytes of a block device in the (migrated) layout, when known.
pub fn device_size(l: &Layout, dev: &str) -> Option<u64> {
    for d in &l.disks {
        if d.path == dev {
            return Some(d.size_bytes);
        }
        if let Some(t) = &d.table {
            if let Some(p) = t.partitions.iter().find(|p| p.node == dev) {
                return Some(p.size * t.sector_size.max(512) as u64);
            }
        }
    }
    if let Some(lv) = l.lvm.lvs.iter().find(|lv| {
        dev == format!("/dev/{}/{}", lv.vg, lv.name)
            || dev
                == format!(
                    "/dev/mapper/{}-{}",
                    lv.vg.replace('-', "--"),
                    lv.name.replace('-', "--")
                )
    }) {
        return Some(lv.size_bytes);
    }
    if let Some(m) = l.md.iter().find(|m| m.device == dev) {
        let sizes: Vec<u64> = m.members.iter().filter_map(|x| device_size(l, x)).collect();
        if sizes.len() != m.members.len() {
            return None;
        }
        let min = sizes.iter().copied().min()?.saturating_sub(MIB);
        let n = sizes.len() as u64;
        return Some(match m.level.as_str() {
            "raid0" | "linear" => min * n,
            "raid5" => min * (n - 1),
            "raid6" => min * (n.saturating_sub(2)),
            "raid10" => min * n / 2,
            _ => min,
        });
    }
    if let Some(c) = l.luks.iter().find(|c| {
        let name = c.mapper_name();
        dev == format!("/dev/mapper/{name}")
    }) {
        return device_size(l, &c.device).map(|s| s.saturating_sub(16 * MIB));
    }
    None
}

/// When a VG's PVs got smaller than its LVs need, scale the LVs down
/// proportionally (whole extents; thin volumes keep their virtual size).
fn shrink_lvs(l: &mut Layout) {
    let vgs = l.lvm.vgs.clone();
    for vg in &vgs {
        let ext = vg.extent_bytes.max(MIB);
        let pv_total: Option<u64> = l
            .lvm
            .pvs
            .iter()
            .filter(|p| p.vg == vg.name)
            .map(|p| device_size(l, &p.device).map(|s| s.saturating_sub(MIB) / ext * ext))
            .sum();
        let Some(cap) = pv_total else { continue };
        let counts = |lv: &lifeboat_contract::Lv| lv.vg == vg.name && lv.segtype != "thin";
        let n = l.lvm.lvs.iter().filter(|lv| counts(lv)).count() as u64;
        let need: u64 = l
            .lvm
            .lvs
            .iter()
            .filter(|lv| counts(lv))
            .map(|lv| lv.size_bytes)
            .sum();
        // Keep an extent per LV spare for metadata (thin pools, mirrors).
        let cap = cap.saturating_sub(n * ext);
        if need <= cap || need == 0 {
            continue;
        }
        for lv in l.lvm.lvs.iter_mut().filter(|lv| counts(lv)) {
            lv.size_bytes =
                ((lv.size_bytes as u128 * cap as u128 / need as u128) as u64) / ext * ext;
        }
        if let Some(v) = l.lvm.vgs.iter_mut().find(|v| v.name == vg.name) {
            v.size_bytes = cap;
            // The recorded metadata has the old sizes: recreate LV by LV.
            v.metadata = None;
        }
    }
}

/// Every filesystem's recorded used bytes must fit where it will be made.
/// Returns one line per filesystem that does not.
pub fn misfits(l: &Layout) -> Vec<String> {
    let mut out = Vec::new();
    for f in &l.filesystems {
        let Some(used) = f.used_bytes else { continue };
        let Some(size) = device_size(l, &f.device) else {
            continue;
        };
        // Room for the filesystem's own metadata and some slack.
        let need = used + used / 20 + 16 * MIB;
        if size < need {
            let at = l
                .mounts
                .iter()
                .find(|m| m.source == f.device)
                .map(|m| format!("{} ", m.target))
                .unwrap_or_default();
            out.push(format!(
                "{at}({} on {}) holds {} but would get only {} (needs about {})",
                f.fstype,
                f.device,
                human(used),
                human(size),
                human(need)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::test_disk;
    use lifeboat_contract::{Filesystem, Mount, Partition};

    fn part(n: u32, node: &str, start: u64, size: u64, ty: &str) -> Partition {
        Partition {
            number: n,
            node: node.into(),
            start,
            size,
            type_id: ty.into(),
            uuid: None,
            name: None,
            attrs: None,
            bootable: false,
        }
    }

    const GIB: u64 = 1 << 30;
    const BIOS: &str = "21686148-6449-6E6F-744E-656564454649";
    const LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69C7C77C80";
    const SWAP: &str = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F";

    fn gpt3(disk: &str) -> PartitionTable {
        // 3 GiB: bios boot 1 MiB, swap 256 MiB, root to the end.
        PartitionTable {
            kind: "gpt".into(),
            id: "A".into(),
            first_lba: Some(2048),
            last_lba: Some(3 * GIB / 512 - 34),
            sector_size: 512,
            partitions: vec![
                part(1, &format!("/dev/{disk}1"), 2048, 2048, BIOS),
                part(2, &format!("/dev/{disk}2"), 4096, 524288, SWAP),
                part(
                    3,
                    &format!("/dev/{disk}3"),
                    528384,
                    3 * GIB / 512 - 34 - 528384 + 1 - 2047,
                    LINUX,
                ),
            ],
        }
    }

    fn sized(name: &str, bytes: u64, serial: Option<&str>) -> Disk {
        let mut d = test_disk(name, bytes, None);
        d.serial = serial.map(String::from);
        d
    }

    fn no_ask(_: &Disk, _: &[&Disk]) -> Option<String> {
        None
    }

    #[test]
    fn mapping_rules_in_order() {
        let src = vec![
            sized("sda", 10 * GIB, Some("S1")),
            sized("sdb", 20 * GIB, None),
        ];
        // Serial wins over name; sdb goes to the only disk of its size.
        let tgt = vec![
            sized("sda", 20 * GIB, None),
            sized("vdb", 10 * GIB, Some("S1")),
            sized("vdc", 30 * GIB, None),
        ];
        let m = map_disks(&src, &tgt, &[], false, &mut no_ask).unwrap();
        assert_eq!(m[0].target.name, "vdb");
        assert_eq!(m[0].why, Why::Serial);
        assert_eq!(m[1].target.name, "sda");
        assert_eq!(m[1].why, Why::UniqueSize);
    }

    #[test]
    fn identity_only_matching_takes_serials_and_leaves_the_rest_to_a_mapping() {
        let src = vec![
            sized("sda", 10 * GIB, Some("S1")),
            sized("sdb", 20 * GIB, None),
        ];
        // sdb has a same-name same-size disk and a unique size here: both
        // heuristics would match it, identity matching does not.
        let tgt = vec![
            sized("vdb", 10 * GIB, Some("S1")),
            sized("sdb", 20 * GIB, None),
        ];
        assert_eq!(
            map_disks(&src, &tgt, &[], false, &mut no_ask)
                .unwrap()
                .len(),
            2
        );
        let e = map_disks(&src, &tgt, &[], true, &mut no_ask)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no target disk for /dev/sdb") && e.contains("recover.auto_map"),
            "{e}"
        );
        // A mapping (or the prompt) still places it.
        let m = map_disks(
            &src,
            &tgt,
            &[("sdb".into(), "sdb".into())],
            true,
            &mut no_ask,
        )
        .unwrap();
        assert_eq!(
            (m[0].why.clone(), m[1].why.clone()),
            (Why::Serial, Why::Explicit)
        );
        let mut pick = |_: &Disk, free: &[&Disk]| Some(free[0].path.clone());
        let m = map_disks(&src, &tgt, &[], true, &mut pick).unwrap();
        assert_eq!(m[1].why, Why::Asked);
    }

    #[test]
    fn ambiguous_or_missing_disks_are_refused_not_guessed() {
        let src = vec![sized("sda", 10 * GIB, None)];
        // Two disks of the right size, neither with the right name.
        let tgt = vec![sized("vda", 10 * GIB, None), sized("vdb", 10 * GIB, None)];
        let e = map_disks(&src, &tgt, &[], false, &mut no_ask)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no target disk for /dev/sda") && e.contains("Nothing was written"),
            "{e}"
        );
        // One source disk and one bigger disk here (another name, NVMe):
        // mapped, and the reason says why.
        let tgt = vec![sized("nvme0n1", 15 * GIB, None)];
        let m = map_disks(&src, &tgt, &[], false, &mut no_ask).unwrap();
        assert_eq!(
            (m[0].target.name.as_str(), m[0].why.clone()),
            ("nvme0n1", Why::OnlyDisk)
        );
        assert!(m[0].why.to_string().contains("only disk here big enough"));
        // Not with identity matching, not onto a smaller disk, not when two
        // disks are big enough, not for a plan of two disks.
        assert!(map_disks(&src, &tgt, &[], true, &mut no_ask).is_err());
        let small = vec![sized("nvme0n1", 8 * GIB, None)];
        assert!(map_disks(&src, &small, &[], false, &mut no_ask).is_err());
        let two = vec![sized("vda", 15 * GIB, None), sized("vdb", 12 * GIB, None)];
        assert!(map_disks(&src, &two, &[], false, &mut no_ask).is_err());
        let one_small = vec![sized("vda", 15 * GIB, None), sized("vdb", 2 * GIB, None)];
        let m = map_disks(&src, &one_small, &[], false, &mut no_ask).unwrap();
        assert_eq!(m[0].target.name, "vda");
        let src2 = vec![sized("sda", 10 * GIB, None), sized("sdb", GIB, None)];
        let e = map_disks(&src2, &tgt, &[], false, &mut no_ask).unwrap_err();
        assert!(e.to_string().contains("no target disk for /dev/sd"), "{e}");
        let tgt = vec![sized("sda", 15 * GIB, None)];
        // A mapping still says what goes where.
        let m = map_disks(
            &src,
            &tgt,
            &[("sda".into(), "sda".into())],
            false,
            &mut no_ask,
        )
        .unwrap();
        assert_eq!(m[0].why, Why::Explicit);
        // The prompt can choose among the free disks only.
        let mut pick = |_: &Disk, free: &[&Disk]| Some(free[1].path.clone());
        let m = map_disks(&src, &two, &[], false, &mut pick).unwrap();
        assert_eq!(
            (m[0].target.name.as_str(), m[0].why.clone()),
            ("vdb", Why::Asked)
        );
    }

    #[test]
    fn never_two_sources_on_one_target() {
        let src = vec![sized("sda", 10 * GIB, None), sized("sdb", 10 * GIB, None)];
        let tgt = vec![sized("vda", 10 * GIB, None)];
        assert!(map_disks(&src, &tgt, &[], false, &mut no_ask).is_err());
        let e = map_disks(
            &src,
            &tgt,
            &[("sda".into(), "vda".into()), ("sdb".into(), "vda".into())],
            false,
            &mut no_ask,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("twice"), "{e}");
        let e = map_disks(
            &src,
            &tgt,
            &[("sda".into(), "nvme9n1".into())],
            false,
            &mut no_ask,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("nvme9n1") && e.contains("not a usable disk"),
            "{e}"
        );
    }

    #[test]
    fn mapping_file_and_boot_option() {
        let m = parse_mapping("# comment\n/dev/sda /dev/nvme0n1\n\nsdb sdc # trailing\n").unwrap();
        assert_eq!(
            m,
            vec![
                ("sda".into(), "nvme0n1".into()),
                ("sdb".into(), "sdc".into())
            ]
        );
        assert!(parse_mapping("/dev/sda\n").is_err());
        let m = mapping_from_cmdline("quiet lifeboat.map=vda:sdb,/dev/vdb:/dev/sdc x").unwrap();
        assert_eq!(
            m,
            vec![("vda".into(), "sdb".into()), ("vdb".into(), "sdc".into())]
        );
        assert!(mapping_from_cmdline("lifeboat.map=vda").is_err());
    }

    #[test]
    fn grow_last_partition_keeps_the_others() {
        let t = gpt3("vda");
        let n = resize_table(&t, 3 * GIB, 9 * GIB / 2, Grow::Last).unwrap();
        assert_eq!(n.partitions[0], t.partitions[0]);
        assert_eq!(n.partitions[1], t.partitions[1]);
        assert_eq!(n.partitions[2].start, t.partitions[2].start);
        assert_eq!(n.partitions[2].size, t.partitions[2].size + 3 * GIB / 1024);
        assert_eq!(n.last_lba, None);
        let last = n.partitions[2].start + n.partitions[2].size - 1;
        assert!(last <= 9 * GIB / 2 / 512 - 34);
    }

    #[test]
    fn shrink_is_proportional_and_aligned() {
        let t = gpt3("vda");
        let n = resize_table(&t, 3 * GIB, 2 * GIB, Grow::Last).unwrap();
        // BIOS boot stays, the others shrink by the same factor, aligned, in order, inside the disk.
        assert_eq!(n.partitions[0], t.partitions[0]);
        let mut prev = 0;
        for p in &n.partitions {
            assert!(p.start > prev && p.start % 2048 == 0, "{p:?}");
            prev = p.start + p.size - 1;
        }
        assert!(prev <= 2 * GIB / 512 - 34);
        let f1 = n.partitions[1].size as f64 / t.partitions[1].size as f64;
        let f2 = n.partitions[2].size as f64 / t.partitions[2].size as f64;
        assert!((f1 - f2).abs() < 0.01 && f1 < 0.7, "{f1} {f2}");
        // Partitions that already fit a smaller disk stay as they are.
        let mut small = t.clone();
        small.partitions[2].size = 1000 * 2048;
        assert_eq!(
            resize_table(&small, 3 * GIB, 2 * GIB, Grow::Last)
                .unwrap()
                .partitions,
            small.partitions
        );
        // Too small for even the fixed parts.
        assert!(resize_table(&t, 3 * GIB, MIB, Grow::Last).is_err());
    }

    fn layout_on(disk: Disk) -> Layout {
        Layout {
            disks: vec![disk],
            filesystems: vec![Filesystem {
                uuid: Some("u".into()),
                used_bytes: Some(GIB),
                ..Filesystem::new("/dev/vda3", "ext4")
            }],
            mounts: vec![Mount {
                target: "/".into(),
                source: "/dev/vda3".into(),
                fstype: "ext4".into(),
                options: "rw".into(),
                root: None,
            }],
            bootloader: lifeboat_contract::Bootloader {
                grub_bios_disks: vec!["/dev/vda".into()],
                ..Default::default()
            },
            ..crate::layout::test_layout()
        }
    }

    #[test]
    fn migrate_renames_everything_and_checks_the_data_fits() {
        let l = layout_on(test_disk("vda", 3 * GIB, Some(gpt3("vda"))));
        let pairs = vec![Pair {
            source: l.disks[0].clone(),
            target: sized("nvme0n1", 6 * GIB, None),
            why: Why::Explicit,
        }];
        let (n, names) = migrate(&l, &pairs, Grow::Last).unwrap();
        assert_eq!(names["/dev/vda3"], "/dev/nvme0n1p3");
        assert_eq!(n.disks[0].path, "/dev/nvme0n1");
        assert_eq!(n.filesystems[0].device, "/dev/nvme0n1p3");
        assert_eq!(n.mounts[0].source, "/dev/nvme0n1p3");
        assert_eq!(n.bootloader.grub_bios_disks, vec!["/dev/nvme0n1"]);
        assert!(!serde_json::to_string(&n).unwrap().contains("vda"));
        assert!(misfits(&n).is_empty());
        // 1 GiB used does not fit a root partition squeezed onto a 1 GiB disk.
        let pairs = vec![Pair {
            source: l.disks[0].clone(),
            target: sized("vda", GIB, None),
            why: Why::Explicit,
        }];
        let (n, _) = migrate(&l, &pairs, Grow::Last).unwrap();
        let m = misfits(&n);
        assert_eq!(m.len(), 1, "{m:?}");
        assert!(
            m[0].starts_with("/ (ext4 on /dev/vda3) holds 1.0 GiB"),
            "{m:?}"
        );
    }
}
