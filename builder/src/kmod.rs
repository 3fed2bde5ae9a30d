//! Native reader for a kernel modules tree (`/lib/modules/<kver>`):
//! modules.dep, modules.alias, modules.softdep, modules.builtin and
//! modules.builtin.modinfo, plus `softdep` lines from modprobe.d. No libkmod:
//! the real `modprobe`/`modinfo` serve only as test oracles.

use anyhow::{bail, Context, Result};
use lifeboat_contract::{alias_matches, normalize_alias, normalize_module_name};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default)]
pub struct ModInfo {
    /// Path relative to the modules dir, as in modules.dep (maybe compressed).
    pub path: String,
    /// Dependencies as listed in modules.dep (module names).
    pub deps: Vec<String>,
}

#[derive(Debug, Default)]
pub struct ModulesDb {
    pub dir: PathBuf,
    pub modules: BTreeMap<String, ModInfo>,
    pub aliases: Vec<(String, String)>,
    /// softdep lines in kmod's order: (module name pattern, pre, post).
    /// Only the first line matching a module counts, as in kmod.
    pub softdeps: Vec<(String, Vec<String>, Vec<String>)>,
    pub builtin: BTreeSet<String>,
    /// Aliases of builtin modules (from modules.builtin.modinfo).
    pub builtin_aliases: Vec<(String, String)>,
    /// alias lines from modprobe.d configuration.
    pub config_aliases: Vec<(String, String)>,
}

/// Module name from a path like `kernel/fs/xfs/xfs.ko.xz`.
pub fn name_from_path(p: &str) -> String {
    let base = p.rsplit('/').next().unwrap_or(p);
    let base = base.split(".ko").next().unwrap_or(base);
    normalize_module_name(base)
}

/// Strip a compression suffix: `x.ko.xz` → `x.ko`.
pub fn uncompressed_path(p: &str) -> String {
    for suf in [".xz", ".zst", ".gz"] {
        if let Some(s) = p.strip_suffix(suf) {
            return s.to_string();
        }
    }
    p.to_string()
}

impl ModulesDb {
    /// Load the modules tree at `dir` (the directory that contains modules.dep).
    /// `modprobe_d` are configuration directories whose `softdep` and `alias` lines apply.
    pub fn load(dir: &Path, modprobe_d: &[PathBuf]) -> Result<ModulesDb> {
        let dep_file = dir.join("modules.dep");
        let dep = std::fs::read_to_string(&dep_file).with_context(|| {
            format!(
                "cannot read {} (is this a modules directory? run depmod for it first)",
                dep_file.display()
            )
        })?;
        let mut db = ModulesDb {
            dir: dir.to_path_buf(),
            ..Default::default()
        };
        for (i, line) in dep.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let Some((path, deps)) = line.split_once(':') else {
                bail!("{}:{}: malformed line {line:?}", dep_file.display(), i + 1);
            };
            let deps = deps.split_whitespace().map(name_from_path).collect();
            db.modules.insert(
                name_from_path(path),
                ModInfo {
                    path: path.trim().to_string(),
                    deps,
                },
            );
        }
        if let Ok(text) = std::fs::read_to_string(dir.join("modules.alias")) {
            for line in text.lines() {
                let mut it = line.split_whitespace();
                if it.next() == Some("alias") {
                    if let (Some(pat), Some(m)) = (it.next(), it.next()) {
                        db.aliases
                            .push((normalize_alias(pat), normalize_module_name(m)));
                    }
                }
            }
        }
        // kmod reads the modprobe.d files and modules.softdep as one list
        // sorted by file name (a name in an earlier directory hides the same
        // name in later ones).
        let mut files: BTreeMap<String, PathBuf> = BTreeMap::new();
        for d in modprobe_d {
            let Ok(rd) = std::fs::read_dir(d) else {
                continue;
            };
            for e in rd.filter_map(|e| e.ok()) {
                let name = e.file_name().to_string_lossy().to_string();
                if name.ends_with(".conf") {
                    files.entry(name).or_insert_with(|| e.path());
                }
            }
        }
        files.insert("modules.softdep".into(), dir.join("modules.softdep"));
        for (name, f) in &files {
            let Ok(text) = std::fs::read_to_string(f) else {
                continue;
            };
            db.parse_softdeps(&text);
            if name == "modules.softdep" {
                continue;
            }
            for line in text.lines() {
                let mut it = line.split_whitespace();
                if it.next() == Some("alias") {
                    if let (Some(pat), Some(m)) = (it.next(), it.next()) {
                        db.config_aliases
                            .push((normalize_alias(pat), normalize_module_name(m)));
                    }
                }
            }
        }
        if let Ok(text) = std::fs::read_to_string(dir.join("modules.builtin")) {
            for l in text.lines().filter(|l| !l.trim().is_empty()) {
                db.builtin.insert(name_from_path(l.trim()));
            }
        }
        if let Ok(data) = std::fs::read(dir.join("modules.builtin.modinfo")) {
            for rec in data.split(|&b| b == 0) {
                let rec = String::from_utf8_lossy(rec);
                if let Some((m, kv)) = rec.split_once('.') {
                    if let Some(a) = kv.strip_prefix("alias=") {
                        db.builtin_aliases
                            .push((normalize_alias(a), normalize_module_name(m)));
                    }
                }
            }
        }
        Ok(db)
    }

    fn parse_softdeps(&mut self, text: &str) {
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("");
            let mut it = line.split_whitespace();
            if it.next() != Some("softdep") {
                continue;
            }
            let Some(m) = it.next() else { continue };
            let (mut pre, mut post) = (Vec::new(), Vec::new());
            let mut mode = "";
            for w in it {
                match w {
                    "pre:" | "post:" => mode = w,
                    // A module name or an alias: resolved (and normalised) later.
                    _ if mode == "pre:" => pre.push(w.to_string()),
                    _ if mode == "post:" => post.push(w.to_string()),
                    _ => {}
                }
            }
            self.softdeps.push((normalize_module_name(m), pre, post));
        }
    }

    /// Soft dependencies (pre, post) of module `m`: the first matching
    /// softdep line only, as kmod does.
    pub fn softdeps_of(&self, m: &str) -> (&[String], &[String]) {
        for (pat, pre, post) in &self.softdeps {
            if alias_matches(pat, m) {
                return (pre, post);
            }
        }
        (&[], &[])
    }

    /// Resolve a module name or a modalias to module names (loadable or builtin).
    /// Like modprobe: an exact module name first, then configured aliases,
    /// then modules.alias, then aliases of builtin modules.
    pub fn resolve(&self, name: &str) -> Vec<String> {
        let n = normalize_module_name(name);
        if self.modules.contains_key(&n) || self.builtin.contains(&n) {
            return vec![n];
        }
        let query = normalize_alias(name);
        for table in [&self.config_aliases, &self.aliases, &self.builtin_aliases] {
            let hits: BTreeSet<String> = table
                .iter()
                .filter(|(p, _)| alias_matches(p, &query))
                .map(|(_, m)| m.clone())
                .collect();
            if !hits.is_empty() {
                return hits.into_iter().collect();
            }
        }
        Vec::new()
    }

    /// Every loadable module needed for `roots` (names), over hard deps and
    /// softdeps (pre and post, themselves closed). Builtins are skipped.
    pub fn closure(&self, roots: &BTreeSet<String>) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut q: VecDeque<String> = roots.iter().cloned().collect();
        while let Some(m) = q.pop_front() {
            let Some(info) = self.modules.get(&m) else {
                continue;
            };
            if !out.insert(m.clone()) {
                continue;
            }
            for d in &info.deps {
                q.push_back(d.clone());
            }
            let (pre, post) = self.softdeps_of(&m);
            for s in pre.iter().chain(post) {
                for r in self.resolve(s) {
                    q.push_back(r);
                }
            }
        }
        out
    }

    /// Modules under the given path prefixes (relative to the modules dir,
    /// e.g. `kernel/drivers/md/`).
    pub fn by_prefix(&self, prefixes: &[&str], exclude: &[&str]) -> BTreeSet<String> {
        self.modules
            .iter()
            .filter(|(_, i)| prefixes.iter().any(|p| i.path.starts_with(p)))
            .filter(|(_, i)| !exclude.iter().any(|p| i.path.starts_with(p)))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Dependencies of `m` in load order (deepest first).
    pub fn load_order_deps(&self, m: &str) -> Vec<String> {
        self.modules
            .get(m)
            .map(|i| i.deps.iter().rev().cloned().collect())
            .unwrap_or_default()
    }
}

/// The modprobe configuration directories kmod reads, in priority order.
pub fn default_modprobe_dirs() -> Vec<PathBuf> {
    [
        "/etc/modprobe.d",
        "/run/modprobe.d",
        "/usr/lib/modprobe.d",
        "/lib/modprobe.d",
    ]
    .iter()
    .map(PathBuf::from)
    .collect()
}

/// Path prefixes of the `generic` module set: what any supported machine may
/// need to see its disks, keyboard and network.
pub const GENERIC_PREFIXES: &[&str] = &[
    "kernel/drivers/block/",
    "kernel/drivers/ata/",
    "kernel/drivers/scsi/",
    "kernel/drivers/nvme/host/",
    "kernel/drivers/md/",
    "kernel/drivers/virtio/",
    "kernel/drivers/cdrom/",
    "kernel/drivers/mmc/core/",
    "kernel/drivers/mmc/host/sdhci",
    "kernel/drivers/usb/storage/",
    "kernel/drivers/usb/host/",
    "kernel/drivers/usb/common/",
    "kernel/drivers/usb/core/",
    "kernel/drivers/hid/",
    "kernel/drivers/input/keyboard/atkbd",
    "kernel/drivers/input/serio/",
    "kernel/drivers/hv/",
    "kernel/drivers/xen/",
    "kernel/drivers/pci/controller/",
    "kernel/drivers/char/virtio_console",
    "kernel/drivers/char/hw_random/virtio",
    "kernel/drivers/net/virtio_net",
    "kernel/drivers/net/vmxnet3/",
    "kernel/drivers/net/hyperv/",
    "kernel/drivers/net/xen-netfront",
    "kernel/drivers/net/bonding/",
    "kernel/drivers/net/ethernet/intel/",
    "kernel/drivers/net/ethernet/realtek/",
    "kernel/drivers/net/ethernet/broadcom/tg3",
    "kernel/drivers/net/ethernet/broadcom/bnx2.ko",
    "kernel/drivers/net/ethernet/broadcom/bnx2x/",
    "kernel/drivers/net/ethernet/broadcom/bnxt/",
    "kernel/drivers/net/ethernet/amazon/",
    "kernel/drivers/net/ethernet/google/",
    "kernel/drivers/net/ethernet/mellanox/mlx4/",
    "kernel/drivers/net/ethernet/mellanox/mlx5/",
    "kernel/net/8021q/",
    "kernel/net/bridge/bridge",
    "kernel/net/packet/",
    "kernel/fs/ext4/",
    "kernel/fs/xfs/",
    "kernel/fs/btrfs/",
    "kernel/fs/fat/",
    "kernel/fs/exfat/",
    "kernel/fs/isofs/",
    "kernel/fs/udf/",
    "kernel/fs/nls/",
    "kernel/fs/fuse/",
    "kernel/fs/overlayfs/",
    "kernel/fs/squashfs/",
    "kernel/fs/ntfs3/",
    "kernel/fs/nfs/",
    "kernel/fs/smb/client/",
    "kernel/fs/efivarfs/",
    "kernel/crypto/",
    "kernel/arch/x86/crypto/",
];

/// Modules under [`GENERIC_PREFIXES`] that are left out of the generic set
/// as roots (they are still included when something included needs them):
/// iSCSI/FCoE offload drivers that drag in whole NIC stacks, test modules.
pub const GENERIC_EXCLUDE_PREFIXES: &[&str] = &[
    "kernel/drivers/scsi/bnx2fc/",
    "kernel/drivers/scsi/bnx2i/",
    "kernel/drivers/scsi/cxgbi/",
    "kernel/drivers/scsi/qedf/",
    "kernel/drivers/scsi/qedi/",
    "kernel/drivers/scsi/be2iscsi/",
    "kernel/drivers/scsi/fcoe/",
    "kernel/drivers/scsi/csiostor/",
    "kernel/drivers/scsi/libfc/",
    "kernel/drivers/scsi/ibmvscsi",
    "kernel/drivers/net/ethernet/intel/ixgb/",
    "kernel/drivers/block/drbd/",
    "kernel/drivers/block/rbd",
    "kernel/drivers/block/rnbd/",
    "kernel/drivers/block/null_blk/",
    "kernel/drivers/scsi/qla2xxx/tcm_qla2xxx",
    "kernel/drivers/scsi/scsi_debug",
    "kernel/drivers/scsi/ibmvscsi_tgt/",
    "kernel/drivers/hid/hid-picolcd",
    "kernel/crypto/async_tx/raid6test",
    "kernel/crypto/tcrypt",
];

/// Read the `.modinfo` section of a module file (decompressing it when needed)
/// and return its key=value records.
pub fn modinfo(path: &Path) -> Result<Vec<(String, String)>> {
    let data = crate::compress::read_maybe_compressed(path)?;
    modinfo_bytes(&data).with_context(|| format!("cannot read .modinfo of {}", path.display()))
}

pub fn modinfo_bytes(data: &[u8]) -> Result<Vec<(String, String)>> {
    let elf = goblin::elf::Elf::parse(data)?;
    let mut out = Vec::new();
    for sh in &elf.section_headers {
        if elf.shdr_strtab.get_at(sh.sh_name) == Some(".modinfo") {
            let start = sh.sh_offset as usize;
            let end = start + sh.sh_size as usize;
            let sec = data.get(start..end).context("truncated .modinfo section")?;
            for rec in sec.split(|&b| b == 0).filter(|r| !r.is_empty()) {
                let rec = String::from_utf8_lossy(rec);
                if let Some((k, v)) = rec.split_once('=') {
                    out.push((k.to_string(), v.to_string()));
                }
            }
        }
    }
    Ok(out)
}

/// Modaliases of the devices of this machine (`/sys/devices/**/modalias`).
pub fn host_modaliases(sys: &Path) -> Vec<String> {
    let mut out = BTreeSet::new();
    for e in walkdir::WalkDir::new(sys.join("devices"))
        .follow_links(false)
        .into_iter()
        .flatten()
    {
        if e.file_name() == "modalias" && e.file_type().is_file() {
            if let Ok(s) = std::fs::read_to_string(e.path()) {
                let s = s.trim();
                if !s.is_empty() {
                    out.insert(s.to_string());
                }
            }
        }
    }
    out.into_iter().collect()
}

/// Names of the modules loaded right now (`/proc/modules`).
pub fn loaded_modules(proc_modules: &Path) -> Vec<String> {
    std::fs::read_to_string(proc_modules)
        .map(|t| {
            t.lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(normalize_module_name)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_db() -> (tempfile::TempDir, ModulesDb) {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("modules.dep"),
            "kernel/a/a-b.ko: kernel/c/c.ko.xz kernel/d/d.ko\nkernel/c/c.ko.xz: kernel/d/d.ko\nkernel/d/d.ko:\nkernel/e/e.ko:\nkernel/f/f.ko:\n",
        )
        .unwrap();
        std::fs::write(
            d.path().join("modules.alias"),
            "alias pci:v00001AF4d* a_b\nalias fs-foo e\n",
        )
        .unwrap();
        std::fs::write(
            d.path().join("modules.softdep"),
            "softdep a_b pre: e post: fs-foo\n",
        )
        .unwrap();
        std::fs::write(d.path().join("modules.builtin"), "kernel/x/builtin1.ko\n").unwrap();
        let confd = d.path().join("modprobe.d");
        std::fs::create_dir(&confd).unwrap();
        std::fs::write(confd.join("x.conf"), "softdep d post: f # comment\n").unwrap();
        let db = ModulesDb::load(d.path(), &[confd]).unwrap();
        (d, db)
    }

    #[test]
    fn parses_and_closes() {
        let (_d, db) = fake_db();
        assert_eq!(db.modules["a_b"].deps, vec!["c", "d"]);
        assert_eq!(db.resolve("pci:v00001AF4d00001001sv"), vec!["a_b"]);
        assert_eq!(db.resolve("a-b"), vec!["a_b"]);
        assert_eq!(db.resolve("builtin1"), vec!["builtin1"]);
        assert!(db.resolve("nothing").is_empty());
        let c = db.closure(&["a_b".to_string()].into());
        assert_eq!(
            c.into_iter().collect::<Vec<_>>(),
            vec!["a_b", "c", "d", "e", "f"]
        );
        assert_eq!(db.load_order_deps("a_b"), vec!["d", "c"]);
    }

    #[test]
    fn names_and_paths() {
        assert_eq!(
            name_from_path("kernel/drivers/md/dm-crypt.ko.xz"),
            "dm_crypt"
        );
        assert_eq!(uncompressed_path("kernel/x.ko.zst"), "kernel/x.ko");
        assert_eq!(uncompressed_path("kernel/x.ko"), "kernel/x.ko");
    }

    #[test]
    fn missing_modules_dep_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let e = ModulesDb::load(d.path(), &[]).unwrap_err();
        assert!(format!("{e:#}").contains("modules.dep"));
    }
}
