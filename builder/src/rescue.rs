//! Building the rescue image: collect programs, modules and firmware into
//! layers, write them (from the cache when unchanged), the kernel, the
//! concatenated initrd and the manifest, and swap the result into place
//! atomically.

use crate::config::Config;
use crate::elf::{self, Resolver};
use crate::kmod::{self, ModulesDb};
use crate::layers::{self, LayerCache, LayerParams};
use crate::programs;
use crate::tree::{Node, Tree};
use anyhow::{bail, Context, Result};
use lifeboat_contract::{
    Compression, FailurePolicy, InitConfig, LayerInfo, Manifest, ModuleEntry, ModuleIndex,
    SshConfig, INIT_CONFIG_PATH, INIT_CONFIG_SCHEMA_VERSION, MANIFEST_SCHEMA_VERSION,
    MODULE_INDEX_PATH, MODULE_INDEX_SCHEMA_VERSION,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Errors callers may want to tell apart.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("kernel not found: {0} (give --kernel PATH, or set rescue.kernel)")]
    KernelNotFound(PathBuf),
    #[error("modules directory not found: {0} (give --modules-dir DIR, or set rescue.modules_dir; it must contain modules.dep)")]
    ModulesDirNotFound(PathBuf),
    #[error("required program(s) not found on this system: {} (install them, or remove them from rescue.programs)", .0.join(", "))]
    MissingPrograms(Vec<String>),
    #[error("cannot tell the kernel release: give --kver VER (the kernel file {0} is not named vmlinuz-<kver>)")]
    NoKver(PathBuf),
}

/// Inputs of one build, after command line and configuration are merged.
#[derive(Debug, Clone)]
pub struct BuildInputs {
    pub kernel: Option<PathBuf>,
    pub kver: Option<String>,
    pub modules_dir: Option<PathBuf>,
    pub output_dir: PathBuf,
    pub use_cache: bool,
    /// Host root the programs are taken from (normally `/`).
    pub root: PathBuf,
    /// Files put into the plan layer as they are (image path, contents):
    /// the layout and backup manifest written by `mkbackup`.
    pub plan_files: Vec<(String, Vec<u8>)>,
    /// A generic chain medium (`mkrescue --generic`): only what boots and
    /// reaches the network (microcode, base, modules, firmware); the tools
    /// and the host's plan come from `lifeboat serve`.
    pub generic: bool,
    /// Progress while the layers are built: a bar on a terminal, a line
    /// per layer otherwise.
    pub progress: bool,
    /// Build even when the kernel image or the modules are of another
    /// release than kver (the init then warns at boot).
    pub allow_kernel_mismatch: bool,
}

/// What a build did, for the report and the tests.
#[derive(Debug, Default)]
pub struct BuildReport {
    pub manifest: Option<Manifest>,
    pub warnings: Vec<String>,
    pub layers_from_cache: Vec<String>,
    pub layers_built: Vec<String>,
    pub seconds: f64,
    /// Seconds spent collecting (closure, modules, firmware) before writing.
    pub collect_seconds: f64,
}

/// Everything that goes into the image, layer by layer, before writing.
pub struct Plan {
    pub kver: String,
    pub kernel: PathBuf,
    pub layers: Vec<(String, Tree, Compression)>,
    pub warnings: Vec<String>,
}

fn kver_from_kernel(p: &Path) -> Option<String> {
    p.file_name()?
        .to_str()?
        .strip_prefix("vmlinuz-")
        .map(|s| s.to_string())
}

fn running_kver() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_string())
}

/// Resolve kernel, kver and modules dir; any missing one is a clear error.
pub fn resolve_kernel(cfg: &Config, inp: &BuildInputs) -> Result<(PathBuf, String, PathBuf)> {
    let kernel_opt = inp.kernel.clone().or_else(|| cfg.rescue.kernel.clone());
    let kver = match inp.kver.clone().or_else(|| cfg.rescue.kver.clone()) {
        Some(k) => k,
        None => match &kernel_opt {
            Some(k) => kver_from_kernel(k).ok_or_else(|| BuildError::NoKver(k.clone()))?,
            None => {
                running_kver().context("cannot read the running kernel release; give --kver")?
            }
        },
    };
    let kernel = kernel_opt.unwrap_or_else(|| PathBuf::from(format!("/boot/vmlinuz-{kver}")));
    if !kernel.is_file() {
        return Err(BuildError::KernelNotFound(kernel).into());
    }
    let mdir = inp
        .modules_dir
        .clone()
        .or_else(|| cfg.rescue.modules_dir.clone())
        .unwrap_or_else(|| PathBuf::from(format!("/lib/modules/{kver}")));
    // Accept both /lib/modules/<kver> and its parent /lib/modules.
    let mdir = if mdir.join(&kver).join("modules.dep").is_file() {
        mdir.join(&kver)
    } else {
        mdir
    };
    if cfg.rescue.modules != "none" && !mdir.join("modules.dep").is_file() {
        return Err(BuildError::ModulesDirNotFound(mdir).into());
    }
    if !inp.allow_kernel_mismatch {
        if let Some(v) = kernel_image_version(&kernel) {
            if v != kver {
                bail!(
                    "the kernel {} is release {v}, but the image is being built for {kver} \
                     (--kver, rescue.kver or the file name): its modules would not load. Give --kver {v} \
                     (and that release's modules), or the kernel of {kver}",
                    kernel.display()
                );
            }
        }
        if cfg.rescue.modules != "none" {
            if let Some((m, v)) = modules_release(&mdir) {
                if v != kver {
                    bail!(
                        "the modules in {} are built for kernel {v} (vermagic of {}), not {kver}: \
                         give --modules-dir with the modules of {kver} (/lib/modules/{kver})",
                        mdir.display(),
                        m.display()
                    );
                }
            }
        }
    }
    Ok((kernel, kver, mdir))
}

/// The release an x86 bzImage says it is (its setup header's
/// kernel_version string), if the file is one.
pub fn kernel_image_version(path: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let mut hdr = [0u8; 0x210];
    f.read_exact(&mut hdr).ok()?;
    if &hdr[0x202..0x206] != b"HdrS" {
        return None;
    }
    let ptr = u16::from_le_bytes([hdr[0x20e], hdr[0x20f]]) as u64;
    if ptr == 0 {
        return None;
    }
    f.seek(SeekFrom::Start(ptr + 0x200)).ok()?;
    let mut s = [0u8; 256];
    let n = f.read(&mut s).ok()?;
    let text = String::from_utf8_lossy(&s[..n]);
    let v = text.split(['\0', ' ']).next()?.trim().to_string();
    (!v.is_empty()).then_some(v)
}

/// The kernel release the modules in `mdir` are built for: the vermagic
/// of the first module modules.dep lists (its path, the release).
pub fn modules_release(mdir: &Path) -> Option<(PathBuf, String)> {
    let dep = std::fs::read_to_string(mdir.join("modules.dep")).ok()?;
    let first = dep
        .lines()
        .find_map(|l| l.split(':').next().filter(|s| !s.is_empty()))?;
    let p = mdir.join(first);
    let data = crate::compress::read_maybe_compressed(&p).ok()?;
    let at = data.windows(9).position(|w| w == b"vermagic=")?;
    let rest = &data[at + 9..];
    let end = rest.iter().position(|b| *b == 0 || *b == b' ')?;
    let v = String::from_utf8_lossy(&rest[..end]).to_string();
    (!v.is_empty()).then_some((p, v))
}

/// Find the lifeboat-init binary.
fn find_init(cfg: &Config) -> Result<PathBuf> {
    if let Some(p) = &cfg.rescue.init {
        if p.is_file() {
            return Ok(p.clone());
        }
        bail!("rescue.init {} does not exist", p.display());
    }
    let mut cands = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(d) = exe.parent() {
            cands.push(d.join("lifeboat-init"));
            // Test binaries live in target/<triple>/<profile>/deps.
            if let Some(pd) = d.parent() {
                cands.push(pd.join("lifeboat-init"));
            }
        }
    }
    cands.push(PathBuf::from("/usr/lib/lifeboat/lifeboat-init"));
    cands.push(PathBuf::from("/usr/libexec/lifeboat/lifeboat-init"));
    for c in &cands {
        if c.is_file() {
            return Ok(c.clone());
        }
    }
    bail!(
        "lifeboat-init not found (looked in {}); build it with `cargo build -p lifeboat-init` or set rescue.init",
        cands.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )
}

/// The lifeboat binary to put into the image.
fn find_self() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the running lifeboat binary")?;
    if exe.file_name().is_some_and(|n| n == "lifeboat") {
        return Ok(exe);
    }
    // Running from a test harness: the CLI sits one level up.
    if let Some(p) = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("lifeboat"))
    {
        if p.is_file() {
            return Ok(p);
        }
    }
    Ok(exe)
}

macro_rules! overlay_files {
    ($($name:literal),* $(,)?) => {
        &[$(($name, include_bytes!(concat!("../../overlays/base/", $name)) as &[u8])),*]
    };
}

/// The rescue root skeleton (overlays/base in the source tree).
const BASE_OVERLAY: &[(&str, &[u8])] = overlay_files!(
    "etc/passwd",
    "etc/group",
    "etc/shadow",
    "etc/nsswitch.conf",
    "etc/hosts",
    "etc/shells",
    "etc/profile",
    "etc/motd",
    "etc/os-release",
    "etc/fstab",
);

fn base_layer(cfg: &Config, root: &Path) -> Result<Tree> {
    let mut t = Tree::new();
    for d in [
        "dev",
        "proc",
        "sys",
        "run",
        "root",
        "mnt/local",
        "var/log",
        "var/tmp",
        "etc/lifeboat",
        "usr/bin",
    ] {
        t.add_dir(d, 0o755);
    }
    t.add_dir("tmp", 0o1777);
    t.entries.get_mut("root").unwrap().perm = 0o700;
    t.add_node("dev/console", Node::CharDev(5, 1), 0o600);
    t.add_node("dev/null", Node::CharDev(1, 3), 0o666);
    t.add_symlink("var/run", "../run");
    // Merged-/usr top-level links exactly as on the host.
    for d in ["bin", "sbin", "lib", "lib64", "lib32", "libx32"] {
        if let Ok(target) = std::fs::read_link(root.join(d)) {
            t.add_symlink(d, &target.to_string_lossy());
        }
    }
    for (name, data) in BASE_OVERLAY {
        let perm = if *name == "etc/shadow" { 0o600 } else { 0o644 };
        t.add_bytes(name, data.to_vec(), perm);
    }
    let init = find_init(cfg)?;
    t.add_file_as("init", &init)?;
    t.entries.get_mut("init").unwrap().perm = 0o755;
    t.add_file_as("usr/bin/lifeboat", &find_self()?)?;
    t.entries.get_mut("usr/bin/lifeboat").unwrap().perm = 0o755;
    // A private CA (https:// backup server or lifeboat serve) is trusted
    // from the start: chained layers are fetched before the plan is there.
    if let Some(ca) = &cfg.backup_ca_file {
        let text = std::fs::read(ca)
            .with_context(|| format!("backup_ca_file: cannot read {}", ca.display()))?;
        t.add_bytes("etc/lifeboat/ca-bundle.pem", text, 0o644);
    }
    // The key plans must be signed with; checked before any is used.
    if let Some(k) = &cfg.signing_key {
        let key = crate::signing::load_key(k)?;
        t.add_bytes(
            crate::signing::PUBKEY_PATH,
            crate::signing::public_pem(&key).into_bytes(),
            0o644,
        );
    }
    Ok(t)
}

/// The programs the recovery plan in `plan_files` runs (each step's
/// argv[0]), when a layout is among them.
fn plan_programs(plan_files: &[(String, Vec<u8>)]) -> Result<Vec<String>> {
    let Some((_, json)) = plan_files
        .iter()
        .find(|(p, _)| p == lifeboat_contract::RESCUE_LAYOUT_PATH)
    else {
        return Ok(Vec::new());
    };
    let layout: lifeboat_contract::Layout =
        serde_json::from_slice(json).context("the layout for the plan layer")?;
    let mut progs = BTreeSet::new();
    // A layout the plan cannot recreate is reported by the recovery (and
    // `lifeboat layout plan`); the image is still made.
    let Ok(groups) = crate::plan::groups(&layout) else {
        return Ok(Vec::new());
    };
    for g in groups {
        for s in g.steps {
            if let Some(p) = s.argv.first() {
                progs.insert(p.clone());
            }
        }
    }
    Ok(progs.into_iter().collect())
}

/// Add the plan's programs to the optional ones; those this system lacks
/// are named in a warning, since the recovery would stop at them.
fn add_plan_programs(
    root: &Path,
    plan: &[String],
    optional: &mut Vec<String>,
    warnings: &mut Vec<String>,
) {
    let lacking: Vec<&str> = plan
        .iter()
        .filter(|p| elf::find_in_path(root, p).is_none())
        .map(String::as_str)
        .collect();
    if !lacking.is_empty() {
        warnings.push(format!(
            "the recovery plan runs {}, which this system lacks: the recovery would stop there; \
             install them (thin_restore is in thin-provisioning-tools, mkfs.xfs in xfsprogs, \
             mkfs.btrfs in btrfs-progs) and make the image again",
            lacking.join(", ")
        ));
    }
    for p in plan {
        if !optional.contains(p) {
            optional.push(p.clone());
        }
    }
}

fn tools_layer(
    cfg: &Config,
    root: &Path,
    plan: &[String],
    warnings: &mut Vec<String>,
) -> Result<Tree> {
    let r = &cfg.rescue;
    let excluded: BTreeSet<&str> = r.exclude_programs.iter().map(|s| s.as_str()).collect();
    let mut required: Vec<&str> = programs::REQUIRED
        .iter()
        .copied()
        .filter(|p| !excluded.contains(p))
        .collect();
    required.extend(r.programs.iter().map(|s| s.as_str()));
    let mut optional: Vec<String> = programs::OPTIONAL
        .iter()
        .filter(|p| !excluded.contains(*p))
        .map(|p| p.to_string())
        .collect();
    optional.extend(r.optional_programs.iter().cloned());
    add_plan_programs(root, plan, &mut optional, warnings);

    let mut roots = Vec::new();
    let mut missing = Vec::new();
    for p in &required {
        match elf::find_in_path(root, p) {
            Some(abs) => roots.push(abs),
            None => missing.push(p.to_string()),
        }
    }
    if !missing.is_empty() {
        return Err(BuildError::MissingPrograms(missing).into());
    }
    let mut opt_missing = Vec::new();
    for p in &optional {
        match elf::find_in_path(root, p) {
            Some(abs) => roots.push(abs),
            None if plan.contains(p) => {} // warned about above
            None => opt_missing.push(p.to_string()),
        }
    }
    if !opt_missing.is_empty() {
        warnings.push(format!(
            "optional programs not found, left out: {}",
            opt_missing.join(", ")
        ));
    }
    let mut resolver = Resolver::new(root);
    let dlopen: Vec<String> = programs::DLOPEN.iter().map(|s| s.to_string()).collect();
    let files = resolver.closure(&roots, &dlopen)?;
    let mut t = Tree::new();
    for f in &files {
        t.add_host_path(root, f)
            .with_context(|| format!("cannot add {f}"))?;
    }
    for p in programs::COPY_AS_IS {
        if root.join(p.trim_start_matches('/')).exists() {
            t.add_host_tree(root, p)?;
        }
    }
    for pat in &r.copy_as_is {
        let found = expand_glob(root, pat);
        if found.is_empty() {
            bail!("rescue.copy_as_is: {pat} does not exist (fix or remove it)");
        }
        for p in &found {
            t.add_host_tree(root, p)?;
            // Programs and shared objects (e.g. Python extension modules)
            // copied as they are need their libraries too.
            let elfs: Vec<String> = t
                .entries
                .iter()
                .filter(|(k, e)| {
                    matches!(e.node, Node::File { .. })
                        && Path::new(&format!("/{k}")).starts_with(p)
                        && is_elf(&root.join(k))
                })
                .map(|(k, _)| format!("/{k}"))
                .collect();
            for f in resolver.closure(&elfs, &[])? {
                t.add_host_path(root, &f)?;
            }
        }
    }
    Ok(t)
}

fn is_elf(p: &Path) -> bool {
    let mut m = [0u8; 4];
    std::fs::File::open(p)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut m))
        .is_ok()
        && m == *b"\x7fELF"
}

/// Absolute paths below `root` matching `pattern`, whose components may
/// hold `*`, `?` and `[...]` (as in ReaR's COPY_AS_IS); sorted.
pub fn expand_glob(root: &Path, pattern: &str) -> Vec<String> {
    let mut found = vec![String::new()];
    for comp in pattern.split('/').filter(|c| !c.is_empty()) {
        let mut next = Vec::new();
        for base in &found {
            if !comp.contains(['*', '?', '[']) {
                next.push(format!("{base}/{comp}"));
                continue;
            }
            let dir = root.join(base.trim_start_matches('/'));
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().to_string();
                if lifeboat_contract::alias_matches(comp, &n) {
                    next.push(format!("{base}/{n}"));
                }
            }
        }
        found = next;
    }
    let mut v: Vec<String> = found
        .into_iter()
        .filter(|p| {
            !p.is_empty()
                && root
                    .join(p.trim_start_matches('/'))
                    .symlink_metadata()
                    .is_ok()
        })
        .collect();
    v.sort();
    v
}

#[derive(Serialize, Deserialize, Default)]
struct ModinfoCache {
    /// path → (size, mtime, mtime_nsec, firmware names)
    entries: BTreeMap<String, (u64, i64, i64, Vec<String>)>,
}

/// Firmware names of the given modules, from their .modinfo, cached by file metadata.
fn module_firmware(
    db: &ModulesDb,
    mods: &BTreeSet<String>,
    cache_file: Option<&Path>,
) -> Result<BTreeMap<String, Vec<String>>> {
    let mut cache: ModinfoCache = cache_file
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|d| serde_json::from_slice(&d).ok())
        .unwrap_or_default();
    let mut changed = false;
    let mut out = BTreeMap::new();
    for m in mods {
        let info = &db.modules[m];
        let path = db.dir.join(&info.path);
        let md = std::fs::metadata(&path)
            .with_context(|| format!("module {m}: cannot stat {}", path.display()))?;
        let key = (md.len(), md.mtime(), md.mtime_nsec());
        let fw = match cache.entries.get(&info.path) {
            Some((s, t, n, fw)) if (*s, *t, *n) == key => fw.clone(),
            _ => {
                let fw: Vec<String> = kmod::modinfo(&path)?
                    .into_iter()
                    .filter(|(k, _)| k == "firmware")
                    .map(|(_, v)| v)
                    .collect();
                cache
                    .entries
                    .insert(info.path.clone(), (key.0, key.1, key.2, fw.clone()));
                changed = true;
                fw
            }
        };
        if !fw.is_empty() {
            out.insert(m.clone(), fw);
        }
    }
    if changed {
        if let Some(p) = cache_file {
            if let Some(d) = p.parent() {
                let _ = std::fs::create_dir_all(d);
            }
            if let Ok(tmp) = tempfile::NamedTempFile::new_in(p.parent().unwrap_or(Path::new("."))) {
                if std::fs::write(tmp.path(), serde_json::to_vec(&cache)?).is_ok() {
                    let _ = tmp.persist(p);
                }
            }
        }
    }
    Ok(out)
}

/// Select the module set named by the configuration.
pub fn select_modules(
    cfg: &Config,
    db: &ModulesDb,
    warnings: &mut Vec<String>,
) -> Result<BTreeSet<String>> {
    let r = &cfg.rescue;
    let mut roots: BTreeSet<String> = match r.modules.as_str() {
        "generic" => db.by_prefix(kmod::GENERIC_PREFIXES, kmod::GENERIC_EXCLUDE_PREFIXES),
        "hostonly" => {
            let mut s = BTreeSet::new();
            for a in kmod::host_modaliases(Path::new("/sys")) {
                s.extend(db.resolve(&a));
            }
            for m in kmod::loaded_modules(Path::new("/proc/modules")) {
                if db.modules.contains_key(&m) {
                    s.insert(m);
                }
            }
            s
        }
        "none" => BTreeSet::new(),
        other => bail!("rescue.modules = {other:?} is not one of generic, hostonly, none"),
    };
    // The kernel clients of a network BACKUP_URL.
    let url = cfg.backup_url.as_deref().unwrap_or("");
    let net: &[&str] = if url.starts_with("nfs://") {
        &["nfsv4", "nfsv3"]
    } else if url.starts_with("cifs://") {
        &["cifs"]
    } else {
        &[]
    };
    for m in net {
        roots.extend(db.resolve(m));
    }
    for m in &r.add_modules {
        let hits = db.resolve(m);
        if hits.is_empty() {
            bail!(
                "rescue.add_modules: module {m:?} is not in {} (check the name with modinfo)",
                db.dir.display()
            );
        }
        roots.extend(hits);
    }
    let exclude: BTreeSet<String> = r
        .exclude_modules
        .iter()
        .map(|m| lifeboat_contract::normalize_module_name(m))
        .collect();
    roots.retain(|m| !exclude.contains(m));
    let mut set = db.closure(&roots);
    for m in set.iter().filter(|m| exclude.contains(*m)) {
        warnings.push(format!(
            "module {m} is excluded but needed by an included module; it is included"
        ));
    }
    set.retain(|m| db.modules.contains_key(m));
    Ok(set)
}

fn module_index(db: &ModulesDb, kver: &str, set: &BTreeSet<String>) -> ModuleIndex {
    let mut modules = BTreeMap::new();
    let keep = |names: &[String]| -> Vec<String> {
        names
            .iter()
            .flat_map(|n| db.resolve(n))
            .filter(|n| set.contains(n))
            .collect()
    };
    for m in set {
        modules.insert(
            m.clone(),
            ModuleEntry {
                path: kmod::uncompressed_path(&db.modules[m].path),
                deps: db.load_order_deps(m),
                pre: keep(db.softdeps_of(m).0),
                post: keep(db.softdeps_of(m).1),
            },
        );
    }
    let aliases = db
        .aliases
        .iter()
        .filter(|(_, m)| set.contains(m))
        .cloned()
        .collect();
    ModuleIndex {
        schema_version: MODULE_INDEX_SCHEMA_VERSION,
        kver: kver.to_string(),
        modules,
        aliases,
        builtin: db.builtin.iter().cloned().collect(),
    }
}

/// Generated files: (name, content).
type GeneratedFiles = Vec<(String, Vec<u8>)>;

/// Run the host's depmod over the selected modules (through a farm of
/// symlinks, so nothing is copied) and return the generated index files.
fn depmod_outputs(
    db: &ModulesDb,
    kver: &str,
    set: &BTreeSet<String>,
    cache: Option<&Path>,
) -> Result<Option<GeneratedFiles>> {
    let Some(depmod) = ["/usr/sbin/depmod", "/sbin/depmod", "/usr/bin/depmod"]
        .iter()
        .find(|p| Path::new(p).exists())
    else {
        return Ok(None);
    };
    // Cache key: the module files' identities plus the builtin lists.
    let mut h = Sha256::new();
    h.update(format!("depmod-v1|{kver}|"));
    for m in set {
        let p = db.dir.join(&db.modules[m].path);
        let md = std::fs::metadata(&p).with_context(|| format!("cannot stat {}", p.display()))?;
        h.update(format!(
            "{}|{}|{}|{}\n",
            db.modules[m].path,
            md.len(),
            md.mtime(),
            md.mtime_nsec()
        ));
    }
    for f in [
        "modules.builtin",
        "modules.builtin.modinfo",
        "modules.order",
    ] {
        if let Ok(md) = std::fs::metadata(db.dir.join(f)) {
            h.update(format!("{f}|{}|{}\n", md.len(), md.mtime()));
        }
    }
    let key = hex::encode(h.finalize());
    let cache_file = cache.map(|c| c.join(format!("depmod-{key}.json")));
    if let Some(cf) = &cache_file {
        if let Ok(d) = std::fs::read(cf) {
            if let Ok(v) = serde_json::from_slice::<Vec<(String, String)>>(&d) {
                let mut out = Vec::new();
                for (n, hexdata) in v {
                    out.push((n, hex::decode(hexdata)?));
                }
                return Ok(Some(out));
            }
        }
    }
    let tmp = tempfile::tempdir().context("cannot create a temporary directory for depmod")?;
    let mdir = tmp.path().join("lib/modules").join(kver);
    std::fs::create_dir_all(&mdir)?;
    for m in set {
        let rel = kmod::uncompressed_path(&db.modules[m].path);
        let link = mdir.join(&rel);
        std::fs::create_dir_all(link.parent().unwrap())?;
        std::os::unix::fs::symlink(db.dir.join(&db.modules[m].path), &link)?;
    }
    for f in [
        "modules.builtin",
        "modules.builtin.modinfo",
        "modules.order",
    ] {
        if db.dir.join(f).exists() {
            std::fs::copy(db.dir.join(f), mdir.join(f))?;
        }
    }
    let out = std::process::Command::new(depmod)
        .arg("-b")
        .arg(tmp.path())
        .arg(kver)
        .output()
        .with_context(|| format!("cannot run {depmod}"))?;
    if !out.status.success() {
        bail!(
            "{depmod} -b {} {kver} failed: {}",
            tmp.path().display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut files = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(&mdir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("modules."))
        .collect();
    names.sort();
    for n in names {
        files.push((n.clone(), std::fs::read(mdir.join(&n))?));
    }
    if let Some(cf) = &cache_file {
        let enc: Vec<(String, String)> = files
            .iter()
            .map(|(n, d)| (n.clone(), hex::encode(d)))
            .collect();
        if let Some(d) = cf.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        let _ = std::fs::write(cf, serde_json::to_vec(&enc)?);
    }
    Ok(Some(files))
}

fn modules_layer(
    cfg: &Config,
    mdir: &Path,
    kver: &str,
    cache_dir: Option<&Path>,
    warnings: &mut Vec<String>,
) -> Result<(Tree, Tree)> {
    let mut t = Tree::new();
    let mut fw = Tree::new();
    if cfg.rescue.modules == "none" && cfg.rescue.add_modules.is_empty() {
        return Ok((t, fw));
    }
    let db = ModulesDb::load(mdir, &kmod::default_modprobe_dirs())?;
    let set = select_modules(cfg, &db, warnings)?;
    let base = format!("lib/modules/{kver}");
    for m in &set {
        let info = &db.modules[m];
        let src = mdir.join(&info.path);
        let dst = format!("{base}/{}", kmod::uncompressed_path(&info.path));
        if info.path != kmod::uncompressed_path(&info.path) {
            t.add_node(&dst, Node::Decompress { src }, 0o644);
        } else {
            t.add_file_as(&dst, &src)?;
            t.entries.get_mut(&crate::tree::norm(&dst)).unwrap().perm = 0o644;
        }
    }
    let index = module_index(&db, kver, &set);
    t.add_bytes(MODULE_INDEX_PATH, serde_json::to_vec_pretty(&index)?, 0o644);
    match depmod_outputs(&db, kver, &set, cache_dir)? {
        Some(files) => {
            for (n, d) in files {
                t.add_bytes(&format!("{base}/{n}"), d, 0o644);
            }
        }
        None => {
            warnings.push("depmod not found: the image has no modules.*.bin, so modprobe will not work in the rescue shell (lifeboat-init is not affected)".into());
        }
    }
    // Firmware named by the included modules.
    let fw_dir = &cfg.rescue.firmware_dir;
    let names = module_firmware(
        &db,
        &set,
        cache_dir
            .map(|d| d.join(format!("modinfo-{kver}.json")))
            .as_deref(),
    )?;
    let mut missing = BTreeSet::new();
    for (m, list) in &names {
        for name in list {
            let mut found = false;
            for suf in ["", ".zst", ".xz"] {
                let cand = format!("{name}{suf}");
                if fw_dir.join(&cand).exists() {
                    let mut sub = Tree::new();
                    sub.add_host_path(fw_dir, &cand)
                        .with_context(|| format!("firmware {cand} for {m}"))?;
                    for (k, e) in sub.entries {
                        fw.add_parents(&format!("lib/firmware/{k}"));
                        fw.entries.entry(format!("lib/firmware/{k}")).or_insert(e);
                    }
                    found = true;
                    break;
                }
            }
            if !found {
                missing.insert(format!("{name} ({m})"));
            }
        }
    }
    if !missing.is_empty() {
        warnings.push(format!(
            "{} firmware file(s) named by included modules are not in {}: {}",
            missing.len(),
            fw_dir.display(),
            missing.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    Ok((t, fw))
}

fn microcode_layer(cfg: &Config) -> Result<Option<Tree>> {
    let mode = cfg.rescue.microcode.as_str();
    if !matches!(mode, "auto" | "yes" | "no") {
        bail!("rescue.microcode = {mode:?} is not one of auto, yes, no");
    }
    if mode == "no" {
        return Ok(None);
    }
    let fw = &cfg.rescue.firmware_dir;
    let mut t = Tree::new();
    for (dir, out, only_bin) in [
        ("intel-ucode", "GenuineIntel.bin", false),
        ("amd-ucode", "AuthenticAMD.bin", true),
    ] {
        let Ok(rd) = std::fs::read_dir(fw.join(dir)) else {
            continue;
        };
        let mut files: Vec<PathBuf> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        if only_bin {
            files.retain(|p| p.extension().is_some_and(|e| e == "bin"));
        }
        files.sort();
        let mut blob = Vec::new();
        for f in files {
            blob.extend(std::fs::read(&f).with_context(|| format!("cannot read {}", f.display()))?);
        }
        if !blob.is_empty() {
            t.add_bytes(&format!("kernel/x86/microcode/{out}"), blob, 0o644);
        }
    }
    if t.is_empty() {
        if mode == "yes" {
            bail!(
                "rescue.microcode = \"yes\" but {} has no intel-ucode/ or amd-ucode/ files",
                fw.display()
            );
        }
        return Ok(None);
    }
    Ok(Some(t))
}

fn plan_layer(
    cfg: &Config,
    cfg_text: &str,
    kver: &str,
    warnings: &mut Vec<String>,
) -> Result<Tree> {
    let hostname = crate::layout::hostname().unwrap_or_else(|| "rescue".into());
    let network = network_config(cfg, warnings)?;
    let on_failure = match cfg.boot.on_failure.as_str() {
        "shell" => FailurePolicy::Shell,
        "reboot" => FailurePolicy::Reboot {
            after_secs: cfg.boot.reboot_delay,
        },
        other => bail!("boot.on_failure = {other:?} is not one of shell, reboot"),
    };
    let init = InitConfig {
        schema_version: INIT_CONFIG_SCHEMA_VERSION,
        kver: kver.to_string(),
        hostname: hostname.clone(),
        shell: "/bin/bash".into(),
        network,
        ssh: SshConfig {
            enabled: cfg.ssh.enabled,
            port: cfg.ssh.port,
            // A password hash is a secret: only with expose_secrets.
            password_hash: cfg.ssh.password_hash.clone().filter(|_| cfg.expose_secrets),
        },
        disks: cfg.boot.require_disks.clone(),
        disk_timeout_secs: cfg.boot.disk_timeout,
        on_failure,
    };
    let mut t = Tree::new();
    t.add_bytes(INIT_CONFIG_PATH, serde_json::to_vec_pretty(&init)?, 0o600);
    t.add_bytes("etc/hostname", format!("{hostname}\n").into_bytes(), 0o644);
    t.add_bytes(
        "etc/lifeboat/lifeboat.toml",
        cfg_text.as_bytes().to_vec(),
        0o600,
    );
    // Keys allowed to log in over ssh.
    let mut keys = String::new();
    for f in &cfg.ssh.authorized_keys {
        match std::fs::read_to_string(f) {
            Ok(text) => {
                for line in text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                {
                    keys.push_str(line);
                    keys.push('\n');
                }
            }
            Err(e) => warnings.push(format!(
                "ssh.authorized_keys: cannot read {} ({e}); skipped",
                f.display()
            )),
        }
    }
    if cfg.ssh.enabled && keys.is_empty() && cfg.ssh.password_hash.is_none() {
        warnings.push("no ssh.authorized_keys and no ssh.password_hash: nobody will be able to log in over ssh".into());
    }
    if !keys.is_empty() {
        t.add_dir("root", 0o700);
        t.add_dir("root/.ssh", 0o700);
        t.add_bytes("root/.ssh/authorized_keys", keys.into_bytes(), 0o600);
    }
    // The scripts the recovery hooks run travel with the plan, so that a
    // signed plan covers them too (mkrescue also lists them in copy_as_is,
    // for their interpreter; this copy, unpacked later, is the one run).
    for s in crate::hooks::recovery_scripts(&cfg.hooks) {
        t.add_file_as(s.trim_start_matches('/'), Path::new(&s))
            .with_context(|| format!("[hooks]: the script {s}"))?;
    }
    // A private CA of an https:// backup server (public, not a secret).
    if let Some(ca) = &cfg.backup_ca_file {
        let text = std::fs::read(ca)
            .with_context(|| format!("backup_ca_file: cannot read {}", ca.display()))?;
        t.add_bytes(ca.to_string_lossy().trim_start_matches('/'), text, 0o644);
    }
    // Credentials of the backup location: only when configured so.
    if let (true, Some(c)) = (cfg.backup_credentials_in_image, &cfg.backup_credentials) {
        let text = std::fs::read(c).with_context(|| {
            format!(
                "backup_credentials: cannot read {} (backup_credentials_in_image is on)",
                c.display()
            )
        })?;
        // An ssh key for sftp://, else user and password lines.
        if !cfg
            .backup_url
            .as_deref()
            .unwrap_or("")
            .starts_with("sftp://")
        {
            crate::url::Credentials::parse(&String::from_utf8_lossy(&text))
                .with_context(|| format!("backup_credentials {}", c.display()))?;
        }
        let rel = c.to_string_lossy().trim_start_matches('/').to_string();
        t.add_bytes(&rel, text, 0o600);
    } else if cfg.backup_credentials.is_some() {
        warnings.push("backup_credentials are not put into the image (backup_credentials_in_image = false): recovery needs `lifeboat recover --credentials FILE`".into());
    }
    Ok(t)
}

/// Collect everything that goes into the image.
pub fn plan(cfg: &Config, cfg_text: &str, inp: &BuildInputs) -> Result<Plan> {
    let (kernel, kver, mdir) = resolve_kernel(cfg, inp)?;
    let comp = Compression::parse(&cfg.rescue.compression).ok_or_else(|| {
        anyhow::anyhow!(
            "rescue.compression = {:?} is not one of zstd, xz, gzip, lz4, none",
            cfg.rescue.compression
        )
    })?;
    let mut warnings = Vec::new();
    let cache = cache_dir(cfg, inp);
    let mut layers = Vec::new();
    if let Some(t) = microcode_layer(cfg)? {
        layers.push(("microcode".to_string(), t, Compression::None));
    }
    layers.push(("base".to_string(), base_layer(cfg, &inp.root)?, comp));
    if !inp.generic {
        let plan = plan_programs(&inp.plan_files)?;
        let mut tools = tools_layer(cfg, &inp.root, &plan, &mut warnings)?;
        let mut excl: Vec<String> = programs::EXCLUDE.iter().map(|s| s.to_string()).collect();
        excl.extend(cfg.rescue.exclude.iter().cloned());
        tools.exclude(&excl);
        layers.push(("tools".to_string(), tools, comp));
    }
    let (mut mods, mut fw) = modules_layer(cfg, &mdir, &kver, cache.as_deref(), &mut warnings)?;
    mods.exclude(&cfg.rescue.exclude);
    fw.exclude(&cfg.rescue.exclude);
    mods.rebase_merged_usr(&inp.root);
    fw.rebase_merged_usr(&inp.root);
    if !mods.is_empty() {
        layers.push((format!("modules-{kver}"), mods, comp));
    }
    if !fw.is_empty() {
        layers.push(("firmware".to_string(), fw, comp));
    }
    if inp.generic {
        finish_layers(cfg, &mut layers, &mut warnings)?;
        return Ok(Plan {
            kver,
            kernel,
            layers,
            warnings,
        });
    }
    let mut plan_tree = plan_layer(cfg, cfg_text, &kver, &mut warnings)?;
    for (path, data) in &inp.plan_files {
        plan_tree.add_bytes(path, data.clone(), 0o600);
    }
    plan_tree.rebase_merged_usr(&inp.root);
    layers.push(("plan".to_string(), plan_tree, comp));
    let mut names = BTreeSet::new();
    for dir in &cfg.rescue.overlays {
        if !dir.is_dir() {
            bail!("rescue.overlays: {} is not a directory", dir.display());
        }
        let mut t = Tree::new();
        t.add_host_tree(dir, "/")?;
        t.entries.remove("");
        let base = dir
            .file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "root".into());
        let mut name = format!("overlay-{base}");
        let mut i = 2;
        while !names.insert(name.clone()) {
            name = format!("overlay-{base}-{i}");
            i += 1;
        }
        layers.push((name, t, comp));
    }
    finish_layers(cfg, &mut layers, &mut warnings)?;
    Ok(Plan {
        kver,
        kernel,
        layers,
        warnings,
    })
}

/// The key files that go into the plan layer: the backup key and the LUKS
/// key of `recover.keyfile`, only with `expose_secrets`.
fn exposed_keys(cfg: &Config) -> Vec<(&'static str, &PathBuf)> {
    if !cfg.expose_secrets {
        return vec![];
    }
    [
        ("backup_key_file", cfg.backup_key_file.as_ref()),
        ("recover.keyfile", cfg.recover.keyfile.as_ref()),
    ]
    .into_iter()
    .filter_map(|(w, k)| k.map(|k| (w, k)))
    .collect()
}

/// Keep secrets where they belong (see `secrets::guard`), then tag every
/// layer with its name.
fn finish_layers(
    cfg: &Config,
    layers: &mut [(String, Tree, Compression)],
    warnings: &mut Vec<String>,
) -> Result<()> {
    if let Some((_, plan, _)) = layers.iter_mut().find(|(n, _, _)| n == "plan") {
        // The backup key and the LUKS key: with them in the image an
        // unattended recovery of an encrypted backup or onto LUKS needs no
        // one to type them.
        for (what, k) in exposed_keys(cfg) {
            match std::fs::read(k) {
                Ok(b) => {
                    let rel = k.to_string_lossy().trim_start_matches('/').to_string();
                    plan.add_parents(&rel);
                    plan.add_bytes(&rel, b, 0o600);
                }
                Err(e) => warnings.push(format!(
                    "{what}: cannot read {} ({e}); not put into the image",
                    k.display()
                )),
            }
        }
    }
    let known: Vec<PathBuf> = [
        &cfg.backup_key_file,
        &cfg.recover.keyfile,
        &cfg.backup_credentials,
        &cfg.serve_enroll_token_file,
        &cfg.uki_sign_key,
        &cfg.signing_key,
    ]
    .into_iter()
    .flatten()
    .cloned()
    .collect();
    let mut allowed = Vec::new();
    if let (true, Some(c)) = (cfg.backup_credentials_in_image, &cfg.backup_credentials) {
        allowed.push(c.to_string_lossy().trim_start_matches('/').to_string());
    }
    for (_, k) in exposed_keys(cfg) {
        allowed.push(k.to_string_lossy().trim_start_matches('/').to_string());
    }
    crate::secrets::guard(layers, &known, cfg.expose_secrets, &allowed, warnings);
    // The tag: the layer's name and the sha256 of each of its files (see
    // `integrity`), hashed for all layers at once.
    let tags = in_parallel(layers, |(name, t, _)| {
        (name != "microcode")
            .then(|| crate::integrity::tag(name, t))
            .transpose()
    });
    for ((name, t, _), tag) in layers.iter_mut().zip(tags) {
        if let Some(text) = tag.with_context(|| format!("the file list of layer {name}"))? {
            let p = format!("{}{name}", crate::layers::LAYER_TAG_DIR);
            t.add_parents(&p);
            t.add_bytes(&p, text, 0o644);
        }
    }
    Ok(())
}

/// `f` on every item, each in a thread of its own; the results in the
/// items' order (a panicking thread gives an error).
fn in_parallel<I: Sync, R: Send>(
    items: &[I],
    f: impl Fn(&I) -> Result<R> + Sync,
) -> Vec<Result<R>> {
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = items.iter().map(|i| s.spawn(move || f(i))).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a worker thread panicked")))
            })
            .collect()
    })
}

/// Add the signed statement of the plan layer's files and the image's
/// other layers (name, sha256) to the plan tree (see `signing`).
fn sign_plan(
    cfg: &Config,
    key: &ring::signature::Ed25519KeyPair,
    plan: &mut Tree,
    others: &[(String, String)],
) -> Result<()> {
    let mut files = BTreeMap::new();
    for (p, e) in &plan.entries {
        let data = match &e.node {
            Node::Bytes(b) => b.clone(),
            Node::File { src } => {
                std::fs::read(src).with_context(|| format!("cannot read {}", src.display()))?
            }
            Node::Decompress { src } => crate::compress::read_maybe_compressed(src)?,
            _ => continue,
        };
        files.insert(p.clone(), data);
    }
    // The name lifeboat serve knows the host by, else its hostname.
    let host = cfg.serve_host.clone().unwrap_or_else(|| {
        files
            .get("etc/hostname")
            .map(|h| String::from_utf8_lossy(h).trim().to_string())
            .unwrap_or_default()
    });
    // What a server may add to this host's personal layer: the credential
    // and key files the configuration names, and the CA bundle.
    let rel = |p: &PathBuf| p.to_string_lossy().trim_start_matches('/').to_string();
    let mut may_add: Vec<String> = [
        &cfg.backup_credentials,
        &cfg.backup_key_file,
        &cfg.recover.keyfile,
    ]
    .into_iter()
    .flatten()
    .map(rel)
    .collect();
    may_add.push("etc/lifeboat/ca-bundle.pem".into());
    let st = crate::signing::statement(&host, &files, &may_add, others);
    let sig = crate::signing::sign(key, st.as_bytes());
    plan.add_bytes(crate::signing::SUMS_PATH, st.into_bytes(), 0o644);
    plan.add_bytes(crate::signing::SIG_PATH, sig, 0o644);
    Ok(())
}

fn cache_dir(cfg: &Config, inp: &BuildInputs) -> Option<PathBuf> {
    if !inp.use_cache {
        return None;
    }
    Some(
        cfg.rescue
            .cache_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/var/cache/lifeboat")),
    )
}

/// Build the image described by `cfg` into `inp.output_dir`.
pub fn build(cfg: &Config, cfg_text: &str, inp: &BuildInputs) -> Result<BuildReport> {
    let t0 = Instant::now();
    let plan = plan(cfg, cfg_text, inp)?;
    let collect_seconds = t0.elapsed().as_secs_f64();
    let out_dir = &inp.output_dir;
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let name = out_dir
        .file_name()
        .context("output directory has no name")?
        .to_string_lossy()
        .to_string();
    // A mount point (an nfs/cifs/usb OUTPUT_URL) cannot be swapped: the
    // image is staged inside it and moved into place file by file.
    let in_place = is_mountpoint(out_dir);
    let staging = tempfile::Builder::new()
        .prefix(&format!(".{name}.tmp-"))
        .tempdir_in(if in_place {
            out_dir.as_path()
        } else {
            parent.as_path()
        })
        .with_context(|| {
            format!(
                "cannot create a temporary directory in {}",
                parent.display()
            )
        })?;
    let cache = cache_dir(cfg, inp);
    let lcache = LayerCache {
        dir: cache.as_ref().map(|d| d.join("layers")),
    };
    let epoch = match cfg.rescue.source_date_epoch {
        Some(e) => e,
        None => match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(s) => s
                .trim()
                .parse()
                .with_context(|| format!("SOURCE_DATE_EPOCH={s:?} is not a number"))?,
            Err(_) => 0,
        },
    };
    let threads = if cfg.rescue.threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    } else {
        cfg.rescue.threads
    };
    let mut report = BuildReport {
        warnings: plan.warnings.clone(),
        collect_seconds,
        ..Default::default()
    };
    let mut infos: Vec<LayerInfo> = Vec::new();
    let mtime =
        u32::try_from(epoch).context("source_date_epoch does not fit the cpio format (32 bits)")?;
    // Layers are independent: build them concurrently (each compressor is
    // itself multithreaded), then record them in load order. With a signing
    // key the plan layer comes last: its signed statement names the others.
    let bar = std::sync::Mutex::new(LayerProgress::new(plan.layers.len(), inp.progress));
    let build_set = |set: &[(&String, &Tree, &Compression)]| -> Vec<Result<layers::Built>> {
        in_parallel(set, |&(lname, tree, comp)| {
            let p = LayerParams {
                compression: *comp,
                level: if *comp == Compression::None {
                    None
                } else {
                    cfg.rescue.compression_level
                },
                threads,
                mtime,
            };
            let t = std::time::Instant::now();
            let r = lcache
                .build(lname, tree, &p, staging.path())
                .with_context(|| format!("cannot build layer {lname}"));
            if let (Ok(b), Ok(mut bar)) = (&r, bar.lock()) {
                bar.done(lname, b.from_cache, t.elapsed().as_secs_f64());
            }
            r
        })
    };
    // The signing key signs the plan (below) and the manifest.
    let key = cfg
        .signing_key
        .as_ref()
        .map(|k| crate::signing::load_key(k))
        .transpose()?;
    let signed_plan = key
        .as_ref()
        .zip(plan.layers.iter().position(|(n, _, _)| n == "plan"));
    let first: Vec<usize> = (0..plan.layers.len())
        .filter(|i| signed_plan.map(|(_, p)| p) != Some(*i))
        .collect();
    let items: Vec<_> = first
        .iter()
        .map(|&i| (&plan.layers[i].0, &plan.layers[i].1, &plan.layers[i].2))
        .collect();
    let mut results: Vec<Option<Result<layers::Built>>> =
        (0..plan.layers.len()).map(|_| None).collect();
    for (&i, r) in first.iter().zip(build_set(&items)) {
        results[i] = Some(r);
    }
    if let Some((key, pi)) = signed_plan {
        let others: Vec<(String, String)> = results
            .iter()
            .flatten()
            .flatten()
            .map(|b| (b.info.name.clone(), b.info.sha256.clone()))
            .collect();
        let (name, tree, comp) = &plan.layers[pi];
        let mut signed = tree.clone();
        sign_plan(cfg, key, &mut signed, &others)?;
        results[pi] = build_set(&[(name, &signed, comp)]).pop();
    }
    drop(bar);
    for r in results.into_iter().flatten() {
        let built = r?;
        if built.from_cache {
            report.layers_from_cache.push(built.info.name.clone());
        } else {
            report.layers_built.push(built.info.name.clone());
        }
        infos.push(built.info);
    }
    // The kernel.
    let kfile = format!("vmlinuz-{}", plan.kver);
    let kdst = staging.path().join(&kfile);
    std::fs::copy(&plan.kernel, &kdst)
        .with_context(|| format!("cannot copy {}", plan.kernel.display()))?;
    let kernel_sha256 = crate::image::sha256_file(&kdst)?;
    // The concatenated initrd, cached by the layer hashes it is made of.
    let mut h = Sha256::new();
    for i in &infos {
        h.update(format!("{}\n", i.sha256));
    }
    let combo = hex::encode(h.finalize());
    let initrd = staging.path().join("initrd.img");
    let cached_initrd = lcache.dir.as_ref().map(|d| {
        (
            d.join(format!("initrd-{combo}.img")),
            d.join(format!("initrd-{combo}.sha256")),
        )
    });
    let mut initrd_sha256 = None;
    if let Some((img, sum)) = &cached_initrd {
        if let (true, Ok(s)) = (img.is_file(), std::fs::read_to_string(sum)) {
            layers::link_or_copy(img, &initrd)?;
            initrd_sha256 = Some(s.trim().to_string());
        }
    }
    let initrd_sha256 = match initrd_sha256 {
        Some(s) => s,
        None => {
            let mut out = std::io::BufWriter::new(
                std::fs::File::create(&initrd)
                    .with_context(|| format!("cannot create {}", initrd.display()))?,
            );
            let mut hh = Sha256::new();
            for i in &infos {
                let layer = staging.path().join(&i.file);
                let data = std::fs::read(&layer)
                    .with_context(|| format!("cannot read {}", layer.display()))?;
                hh.update(&data);
                out.write_all(&data)
                    .with_context(|| format!("cannot write {}", initrd.display()))?;
            }
            let f = out.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            let s = hex::encode(hh.finalize());
            if let Some((img, sum)) = &cached_initrd {
                let _ =
                    layers::link_or_copy(&initrd, img).and_then(|_| Ok(std::fs::write(sum, &s)?));
            }
            s
        }
    };
    let manifest = Manifest {
        schema_version: MANIFEST_SCHEMA_VERSION,
        lifeboat_version: env!("CARGO_PKG_VERSION").to_string(),
        kver: plan.kver.clone(),
        kernel: kfile,
        kernel_sha256,
        initrd: "initrd.img".into(),
        initrd_sha256,
        source_date_epoch: epoch,
        layers: infos,
    };
    let mut mj = serde_json::to_vec_pretty(&manifest)?;
    mj.push(b'\n');
    std::fs::write(staging.path().join("manifest.json"), &mj)?;
    // A detached signature of the manifest (which pins every layer).
    if let Some(key) = &key {
        std::fs::write(
            staging.path().join("manifest.json.sig"),
            crate::signing::sign(key, &mj),
        )?;
    }
    // Files holding configuration (possibly secrets later) are not world-readable.
    let staged = staging.keep();
    if in_place {
        replace_contents(&staged, out_dir)?;
    } else {
        swap_into_place(&staged, out_dir)?;
    }
    report.manifest = Some(manifest);
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// Whether `p` is the root of a mounted filesystem.
fn is_mountpoint(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(m), Ok(up)) = (std::fs::metadata(p), std::fs::metadata(p.join(".."))) else {
        return false;
    };
    m.is_dir() && (m.dev() != up.dev() || m.ino() == up.ino())
}

/// Replace what `dst` holds with the entries of `src` (a directory inside
/// it or beside it on the same filesystem), each by rename, the manifest
/// last; then remove `src`. Used where `dst` itself cannot be swapped (a
/// mount point, a filesystem without RENAME_EXCHANGE).
fn replace_contents(src: &Path, dst: &Path) -> Result<()> {
    let mut new: Vec<std::ffi::OsString> = std::fs::read_dir(src)?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    new.sort_by_key(|n| (n == "manifest.json", n.clone()));
    let src_name = src.file_name().map(|n| n.to_os_string());
    for e in std::fs::read_dir(dst)?.flatten() {
        let n = e.file_name();
        if Some(&n) == src_name.as_ref() || new.contains(&n) {
            continue;
        }
        let p = e.path();
        let r = if e.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.with_context(|| format!("cannot remove the previous image's {}", p.display()))?;
    }
    for n in &new {
        let (from, to) = (src.join(n), dst.join(n));
        if to.is_dir() {
            std::fs::remove_dir_all(&to)?;
        }
        std::fs::rename(&from, &to)
            .with_context(|| format!("cannot move {} into place", to.display()))?;
    }
    std::fs::remove_dir_all(src).with_context(|| format!("cannot remove {}", src.display()))?;
    Ok(())
}

/// Atomically replace `dst` (a directory, possibly absent) with `src`.
fn swap_into_place(src: &Path, dst: &Path) -> Result<()> {
    if !dst.exists() {
        return std::fs::rename(src, dst)
            .with_context(|| format!("cannot rename {} to {}", src.display(), dst.display()));
    }
    if !dst.is_dir() {
        let _ = std::fs::remove_dir_all(src);
        bail!("output {} exists and is not a directory", dst.display());
    }
    let c_src = std::ffi::CString::new(src.as_os_str().as_encoded_bytes())?;
    let c_dst = std::ffi::CString::new(dst.as_os_str().as_encoded_bytes())?;
    // renameat2(RENAME_EXCHANGE): both names stay valid at every instant.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            c_src.as_ptr(),
            libc::AT_FDCWD,
            c_dst.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        // Filesystems without RENAME_EXCHANGE (cifs, some FUSE): file by file.
        if matches!(
            e.raw_os_error(),
            Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::EXDEV | libc::EBUSY)
        ) {
            return replace_contents(src, dst);
        }
        let _ = std::fs::remove_dir_all(src);
        return Err(e).with_context(|| format!("cannot swap the new image into {}", dst.display()));
    }
    // `src` now holds the previous image.
    std::fs::remove_dir_all(src)
        .with_context(|| format!("cannot remove the previous image at {}", src.display()))?;
    Ok(())
}

/// The network setup the rescue OS brings up: `network.file`, else the
/// captured one (when `network.capture`), else DHCP on every NIC.
pub fn network_config(
    cfg: &Config,
    warnings: &mut Vec<String>,
) -> Result<lifeboat_contract::NetworkConfig> {
    Ok(match &cfg.network.file {
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("network.file: cannot read {}", f.display()))?;
            serde_json::from_str(&text).with_context(|| {
                format!("network.file: {} is not a valid network.json", f.display())
            })?
        }
        None if cfg.network.capture => {
            match crate::netcapture::capture() {
                Ok(n) => n,
                Err(e) => {
                    warnings.push(format!("cannot capture this host's network setup ({e:#}); the rescue OS will use DHCP"));
                    Default::default()
                }
            }
        }
        None => Default::default(),
    })
}

/// Progress of the concurrent layer builds.
struct LayerProgress {
    bar: Option<indicatif::ProgressBar>,
    lines: bool,
}

impl LayerProgress {
    fn new(n: usize, on: bool) -> LayerProgress {
        let tty = on && crate::backup::stderr_is_tty();
        let bar = tty.then(|| {
            let b = indicatif::ProgressBar::new(n as u64);
            if let Ok(st) = indicatif::ProgressStyle::with_template(
                "  building layers {pos}/{len} {wide_bar} {msg}",
            ) {
                b.set_style(st);
            }
            b
        });
        LayerProgress {
            bar,
            lines: on && !tty,
        }
    }

    fn done(&mut self, name: &str, cached: bool, secs: f64) {
        let what = if cached { "from the cache" } else { "built" };
        if let Some(b) = &self.bar {
            b.inc(1);
            b.set_message(format!("{name} {what}"));
        } else if self.lines && !cached {
            eprintln!("  layer {name}: built in {secs:.1} s");
        }
    }
}

impl Drop for LayerProgress {
    fn drop(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plans_programs_go_in_and_those_lacking_are_named() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        for p in ["usr/sbin/lvm", "usr/sbin/dmsetup"] {
            let f = d.path().join(p);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(&f, "").unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let plan: Vec<String> = ["lvm", "dmsetup", "thin_restore"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut optional = vec!["lvm".to_string()];
        let mut warnings = Vec::new();
        add_plan_programs(d.path(), &plan, &mut optional, &mut warnings);
        assert_eq!(optional, ["lvm", "dmsetup", "thin_restore"]);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("the recovery plan runs thin_restore, which this system lacks"),
            "{warnings:?}"
        );
        // No layout among the plan files: nothing to add.
        assert!(plan_programs(&[]).unwrap().is_empty());
        // A layout with an LVM volume group: the plan's commands.
        let l = lifeboat_contract::Layout {
            schema_version: lifeboat_contract::LAYOUT_SCHEMA_VERSION,
            hostname: "h".into(),
            disks: vec![],
            filesystems: vec![],
            mounts: vec![],
            md: vec![],
            luks: vec![],
            bootloader: Default::default(),
            lvm: lifeboat_contract::Lvm {
                pvs: vec![lifeboat_contract::Pv {
                    device: "/dev/vda2".into(),
                    uuid: "u".into(),
                    vg: "vg0".into(),
                    size_bytes: 1 << 30,
                }],
                vgs: vec![lifeboat_contract::Vg {
                    name: "vg0".into(),
                    uuid: "v".into(),
                    extent_bytes: 4 << 20,
                    size_bytes: 1 << 30,
                    metadata: None,
                }],
                lvs: vec![],
            },
        };
        let files = vec![(
            lifeboat_contract::RESCUE_LAYOUT_PATH.to_string(),
            serde_json::to_vec(&l).unwrap(),
        )];
        assert_eq!(plan_programs(&files).unwrap(), ["lvm"]);
    }

    #[test]
    fn copy_as_is_globs_expand_per_component() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for p in [
            "usr/lib/python3.11/os.py",
            "usr/lib/python3.9/os.py",
            "usr/lib/python3/dist-packages/borg/x.py",
            "usr/lib/python3/dist-packages/borgbackup-1.2.4.egg-info/PKG-INFO",
            "usr/lib/python3/dist-packages/msgpack-1.0.egg-info/x",
        ] {
            std::fs::create_dir_all(r.join(p).parent().unwrap()).unwrap();
            std::fs::write(r.join(p), "").unwrap();
        }
        assert_eq!(
            expand_glob(r, "/usr/lib/python3.[0-9]*"),
            ["/usr/lib/python3.11", "/usr/lib/python3.9"]
        );
        assert_eq!(
            expand_glob(r, "/usr/lib/python3/dist-packages/borg*"),
            [
                "/usr/lib/python3/dist-packages/borg",
                "/usr/lib/python3/dist-packages/borgbackup-1.2.4.egg-info"
            ]
        );
        assert_eq!(
            expand_glob(r, "/usr/lib/python3/dist-packages/borg/x.py"),
            ["/usr/lib/python3/dist-packages/borg/x.py"]
        );
        assert!(expand_glob(r, "/usr/lib/perl*").is_empty());
        assert!(expand_glob(r, "/usr/lib/python3/nothing").is_empty());
        assert!(is_elf(Path::new("/proc/self/exe")));
        assert!(!is_elf(&r.join("usr/lib/python3.11/os.py")));
    }

    #[test]
    fn a_mount_point_output_is_replaced_file_by_file() {
        assert!(is_mountpoint(Path::new("/proc")));
        let t = tempfile::tempdir().unwrap();
        assert!(!is_mountpoint(t.path()));
        let dst = t.path();
        std::fs::write(dst.join("old-layer.cpio"), "old").unwrap();
        std::fs::write(dst.join("manifest.json"), "old").unwrap();
        std::fs::create_dir(dst.join("olddir")).unwrap();
        let src = dst.join(".out.tmp-x");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("base.cpio"), "new").unwrap();
        std::fs::write(src.join("manifest.json"), "new").unwrap();
        replace_contents(&src, dst).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dst)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["base.cpio", "manifest.json"]);
        assert_eq!(
            std::fs::read_to_string(dst.join("manifest.json")).unwrap(),
            "new"
        );
    }
}
