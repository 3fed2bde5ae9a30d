//! Configuration: TOML files read in order, later wins:
//! `/etc/lifeboat/lifeboat.toml`, `/etc/lifeboat/site.toml`,
//! `/etc/lifeboat/conf.d/*.toml` (sorted), then each `-c FILE`.
//! `LIFEBOAT_CONFIG_DIR` replaces `/etc/lifeboat` (for tests and packaging).
//!
//! Every file is checked on its own against the schema, so an unknown key or
//! a wrong type is reported with the file, the key and the line. The merged
//! result remembers which file set each value, for `lifeboat dump`.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The whole configuration. Keys are lower-case; ReaR's upper-case names
/// (`OUTPUT`, `OUTPUT_URL`) are accepted as aliases.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Kind of rescue medium `mkrescue` writes: `initrd` (kernel, layers,
    /// the concatenated initrd.img and manifest.json in a directory), `ISO`,
    /// `USB`, `RAWDISK`, `PXE`, `UKI`, `PORTABLE` or `OBDR` (see the
    /// README's "Outputs").
    #[serde(alias = "OUTPUT")]
    pub output: String,
    /// Where `mkrescue` writes its output: `file:///path`, `usb://LABEL[/dir]`,
    /// `nfs://`, `cifs://`, `http(s)://` (WebDAV PUT), `sftp://`, or
    /// `lifeboat+http(s)://server/` (register with `lifeboat serve`).
    #[serde(alias = "OUTPUT_URL")]
    pub output_url: String,
    /// Backup method of `mkbackup`: `tar` (GNU tar, one archive per local
    /// filesystem; ReaR's `NETFS` means the same), `external` (the commands
    /// of `[external]`), or a recipe: `restic`, `borg`, `rsync`,
    /// `bareos-fd`, or the name of one in /etc/lifeboat/recipes/.
    #[serde(alias = "BACKUP")]
    pub backup: String,
    /// Where `mkbackup` writes the archives (to `<location>/<hostname>/`):
    /// `file:///path`, `usb://LABEL[/dir]`, `nfs://`, `cifs://`,
    /// `http(s)://`, `sftp://`, `tape:///dev/nst0`, `iso://` (on the rescue
    /// ISO). Unset by default: mkbackup refuses.
    #[serde(alias = "BACKUP_URL")]
    pub backup_url: Option<String>,
    /// Extra paths (absolute, in the running system) left out of the
    /// backup, as GNU tar `--exclude` patterns. The backup target itself is
    /// always left out.
    #[serde(alias = "BACKUP_PROG_EXCLUDE")]
    pub backup_exclude: Vec<String>,
    /// `full`, `incremental` (since the last set) or `differential` (since
    /// the last full).
    #[serde(alias = "BACKUP_TYPE")]
    pub backup_type: String,
    /// Make a full backup instead when the last full is this many days old.
    #[serde(alias = "FULLBACKUP_OUTDATED_DAYS")]
    pub backup_full_days: u32,
    /// `zstd` (multithreaded), `gzip` or `xz`.
    pub backup_compression: String,
    /// Compression level of the backup (zstd 1-19, gzip and xz 0-9);
    /// unset: zstd 3, gzip and xz 6.
    pub backup_compression_level: Option<i32>,
    /// Cut archives into volumes of this size (`4G`, `700M`); unset: one file.
    pub backup_volume_size: Option<String>,
    /// Encrypt the backup (age) with the key in this file: an age identity
    /// (`age-keygen` output) or a passphrase on its first line. Only the
    /// path is recorded; recovery asks for the key or takes `--backup-key`.
    pub backup_key_file: Option<PathBuf>,
    /// Credentials for a `cifs://` share or an `http(s)://` server (Basic
    /// auth): a file with `username=`, `password=` and optionally
    /// `domain=` lines, as for mount.cifs. Never put passwords in the URL.
    pub backup_credentials: Option<PathBuf>,
    /// Copy the credentials file into the rescue image (plan layer, mode
    /// 0600) so an unattended recovery can reach the share. Off: recovery
    /// needs `lifeboat recover --credentials FILE`.
    pub backup_credentials_in_image: bool,
    /// Put secrets into the rescue image, in the plan layer only (mode
    /// 0600; the image files holding it are 0600 too): the backup key file
    /// (so an unattended recovery can decrypt), `recover.keyfile` (so it
    /// can make LUKS containers), `ssh.password_hash`, and
    /// secret files found among copy_as_is and overlays (SSH host keys,
    /// private keys, credentials). Off: they are left out, each named in a
    /// warning. `mkrescue --expose-secrets` / `mkbackup --expose-secrets`
    /// turn it on for one run.
    pub expose_secrets: bool,
    /// ed25519 private key (PKCS#8 PEM; `lifeboat keygen --out FILE` or
    /// `openssl genpkey -algorithm ed25519`) that signs the plan and the
    /// image manifest. Its public key goes into the image, and the rescue
    /// OS then refuses a plan or personal layer (from lifeboat serve) that
    /// is unsigned or does not match its signature.
    pub signing_key: Option<PathBuf>,
    /// Extra mount options for `nfs://` and `cifs://` (e.g. `vers=3`,
    /// `nolock`, `vers=3.0`); ReaR's BACKUP_OPTIONS.
    #[serde(alias = "BACKUP_OPTIONS")]
    pub backup_mount_options: Option<String>,
    /// Extra `ssh -o` options for `sftp://` (e.g.
    /// `"UserKnownHostsFile=/etc/lifeboat/known_hosts"`, `"ProxyJump=bastion"`).
    pub backup_ssh_options: Vec<String>,
    /// PEM file of a private CA for an `https://` backup server (trusted
    /// besides the public web PKI roots; it goes into the rescue image,
    /// it is not a secret).
    pub backup_ca_file: Option<PathBuf>,
    /// Where an `http(s)://` backup is staged before it is uploaded (one
    /// set must fit; left out of the backup; emptied afterwards).
    pub backup_stage_dir: PathBuf,
    /// Volume label of the ISO (OUTPUT = "ISO").
    #[serde(alias = "ISO_VOLID")]
    pub iso_volid: String,
    /// BACKUP_URL = "iso://": the largest ISO in MiB; a bigger backup is
    /// continued on further data ISOs (`<volid>_02`, ...). Unset: one ISO.
    #[serde(alias = "ISO_MAX_SIZE")]
    pub iso_max_size: Option<u64>,
    /// Boot menu default: `automatic` (recover unattended), `manual`
    /// (recover interactively) or `shell`.
    #[serde(alias = "ISO_DEFAULT")]
    pub iso_default: String,
    /// Seconds the boot menu waits before the default entry; -1: forever.
    pub boot_timeout: i32,
    /// `vga` or `serial`: the console of the default menu entry.
    pub boot_console: String,
    /// Extra kernel command line of every boot menu entry.
    #[serde(alias = "KERNEL_CMDLINE")]
    pub kernel_cmdline: String,
    /// mkbackup: keep disks with nothing mounted in the layout (default:
    /// left out, like ReaR's AUTOEXCLUDE_DISKS).
    pub layout_all_disks: bool,
    /// OUTPUT = "RAWDISK": `raw`, or `qcow2` (converted by qemu-img).
    pub rawdisk_format: String,
    /// OUTPUT = "UKI": private key (PEM) to sign the UKI for Secure Boot
    /// with sbsign; needs `uki_sign_cert`.
    pub uki_sign_key: Option<PathBuf>,
    /// OUTPUT = "UKI": the certificate (PEM) of `uki_sign_key`.
    pub uki_sign_cert: Option<PathBuf>,
    /// OUTPUT = "PXE": MAC addresses to write pxelinux/GRUB configurations
    /// for, besides those of the captured NICs.
    pub pxe_macs: Vec<String>,
    /// OUTPUT = "USB": rescue images kept per host on the stick (the
    /// oldest beyond this are removed).
    pub usb_retain: usize,
    /// OUTPUT_URL = "lifeboat+http(s)://…": the id this host registers
    /// under with `lifeboat serve` (default: the host name).
    pub serve_host: Option<String>,
    /// OUTPUT_URL = "lifeboat+http(s)://…": file with the server's
    /// enrollment token (`lifeboat serve --enroll-token-file`).
    pub serve_enroll_token_file: Option<PathBuf>,
    /// Workflow `lifeboat udev` runs when the Lifeboat stick is plugged in:
    /// `mkrescue`, `mkbackup` or empty (nothing); ReaR's UDEV_WORKFLOW.
    #[serde(alias = "UDEV_WORKFLOW")]
    pub udev_workflow: String,
    /// Settings of the rescue image.
    pub rescue: Rescue,
    /// The network setup the rescue OS brings up.
    pub network: Network,
    /// sshd in the rescue OS.
    pub ssh: Ssh,
    /// Behaviour of the rescue OS at boot.
    pub boot: Boot,
    /// Behaviour of `lifeboat recover`.
    pub recover: Recover,
    /// Commands of `BACKUP = "external"`, or overrides of a recipe's.
    pub external: crate::recipe::Recipe,
    /// Commands run before and after `mkbackup` and `recover`.
    pub hooks: Hooks,
}

/// Hooks: each entry is a command line run by `sh -c` (a script path is a
/// command too), in order, with the environment described in the README
/// ("Hooks"): `LIFEBOAT_HOOK`, `LIFEBOAT_WORKFLOW`, `LIFEBOAT_HOSTNAME`,
/// `LIFEBOAT_BACKUP_URL`, `LIFEBOAT_TARGET` (recovery), and for the post
/// hooks `LIFEBOAT_RESULT` (`success` or `failure`) and `LIFEBOAT_ERROR`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Hooks {
    /// Before `mkbackup` reads anything; a failure stops the backup.
    /// ReaR: PRE_BACKUP_SCRIPT.
    pub pre_backup: Vec<String>,
    /// After `mkbackup`, whether it worked or not (`LIFEBOAT_RESULT`); a
    /// failure makes mkbackup exit 1 (the backup itself stays).
    /// ReaR: POST_BACKUP_SCRIPT.
    pub post_backup: Vec<String>,
    /// In the rescue OS, after the pre-flight checks and before any disk
    /// is written; a failure stops the recovery with nothing written.
    /// ReaR: PRE_RECOVERY_SCRIPT.
    pub pre_recovery: Vec<String>,
    /// After the recovery, with the recovered system still mounted at
    /// `LIFEBOAT_TARGET` when it worked; also run when it failed. Scripts
    /// named by absolute path are copied into the rescue image.
    /// ReaR: POST_RECOVERY_SCRIPT.
    pub post_recovery: Vec<String>,
    /// Seconds each hook command may run; one that takes longer is stopped
    /// (its whole process group) and counts as failed. 0: no limit.
    pub timeout: u64,
}

impl Default for Hooks {
    fn default() -> Self {
        Hooks {
            pre_backup: vec![],
            post_backup: vec![],
            pre_recovery: vec![],
            post_recovery: vec![],
            timeout: 1800,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Recover {
    /// Disk mapping file: lines `/dev/SOURCE /dev/TARGET` (`#` comments).
    /// Also read: `/etc/lifeboat/disk-mapping` in the rescue OS and the
    /// `lifeboat.map=SRC:DST,...` boot option.
    pub mapping: Option<PathBuf>,
    /// On a bigger target disk: `last` (grow the last partition) or
    /// `proportional` (grow every large partition). Smaller disks are
    /// always shrunk proportionally, when the used data fits.
    pub grow: String,
    /// Key file (passphrase) for the new LUKS containers, needed when
    /// unattended. With `expose_secrets` it is put into the rescue image
    /// (plan layer, mode 0600) at the same path, so `lifeboat.recover=auto`
    /// finds it; without, it is left out with a warning.
    pub keyfile: Option<PathBuf>,
    /// Rebuild the target's initramfs: `auto` (when disk names changed),
    /// `always` or `never`.
    pub rebuild_initramfs: String,
    /// Disks recovery must never write, as `KIND=value` with KIND one of
    /// SERIAL, WWN, PTUUID, UUID, PARTUUID, LABEL, PARTLABEL (e.g.
    /// `["SERIAL=WD-WCC4N1234567", "LABEL=archive"]`). The disk holding the
    /// backup, hybrid ISOs, `lifeboat format` sticks and the configured
    /// usb:// media are always protected.
    pub protect: Vec<String>,
    /// How disks are matched when no mapping names them: `any` (same
    /// serial, same WWN, then same name and size, then the only disk of the
    /// same size, then, when the plan has one disk, the only disk here at
    /// least as big) or `identity` (same serial or WWN only; every other
    /// disk needs a mapping, or an answer at the prompt).
    pub auto_map: String,
}

impl Default for Recover {
    fn default() -> Self {
        Recover {
            mapping: None,
            grow: "last".into(),
            keyfile: None,
            rebuild_initramfs: "auto".into(),
            protect: vec![],
            auto_map: "any".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Network {
    /// Record this host's interfaces, addresses, routes and DNS into the
    /// image (replayed on NICs with the same MAC; DHCP otherwise).
    pub capture: bool,
    /// Use this network.json (the init's NetworkConfig) instead of capturing.
    pub file: Option<PathBuf>,
}

impl Default for Network {
    fn default() -> Self {
        Network {
            capture: true,
            file: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Ssh {
    /// Start sshd in the rescue OS (the `lifeboat.ssh=0|1` boot option overrides).
    pub enabled: bool,
    /// Port sshd listens on.
    pub port: u16,
    /// Files whose public keys may log in as root. Missing files are skipped with a warning.
    pub authorized_keys: Vec<PathBuf>,
    /// crypt(3) hash of a root password for the rescue OS. Without it,
    /// password logins are refused.
    pub password_hash: Option<String>,
}

impl Default for Ssh {
    fn default() -> Self {
        Ssh {
            enabled: true,
            port: 22,
            authorized_keys: vec![PathBuf::from("/root/.ssh/authorized_keys")],
            password_hash: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Boot {
    /// Disks that must be present before recovery starts, e.g.
    /// `[{ serial = "S3Z9NB0K" }, { name = "sda", size_bytes = 500107862016 }]`.
    pub require_disks: Vec<lifeboat_contract::DiskRef>,
    /// Seconds to wait for them.
    pub disk_timeout: u32,
    /// After a fatal error when unattended: `shell` or `reboot`.
    pub on_failure: String,
    /// Seconds before that reboot.
    pub reboot_delay: u32,
}

impl Default for Boot {
    fn default() -> Self {
        Boot {
            require_disks: vec![],
            disk_timeout: 30,
            on_failure: "shell".into(),
            reboot_delay: 60,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Rescue {
    /// Kernel image. Default: `/boot/vmlinuz-<kver>`.
    pub kernel: Option<PathBuf>,
    /// Kernel release. Default: taken from the kernel file name
    /// (`vmlinuz-<kver>`), else the running kernel (`uname -r`).
    pub kver: Option<String>,
    /// Modules directory of that kernel. Default: `/lib/modules/<kver>`.
    pub modules_dir: Option<PathBuf>,
    /// Firmware search directory.
    pub firmware_dir: PathBuf,
    /// Module set: `generic` (boots any supported machine), `hostonly`
    /// (this machine's devices and loaded modules) or `none`.
    pub modules: String,
    /// Extra modules (names or aliases), closed over their dependencies.
    pub add_modules: Vec<String>,
    /// Modules never to include.
    pub exclude_modules: Vec<String>,
    /// Programs that must be in the image (names looked up in PATH, or absolute paths).
    pub programs: Vec<String>,
    /// Programs to include when present. Every program the recovery plan
    /// runs (lvm, mdadm, mkfs.xfs, thin_restore, ...) is added by itself;
    /// one this system lacks is named in a warning.
    pub optional_programs: Vec<String>,
    /// Programs of the default set to leave out.
    pub exclude_programs: Vec<String>,
    /// Files and directories copied as they are (directories recursively).
    pub copy_as_is: Vec<String>,
    /// Glob patterns of image paths to leave out (e.g. `/usr/share/doc/*`).
    pub exclude: Vec<String>,
    /// Directories laid over the image, each as its own layer `overlay-<dir name>`.
    pub overlays: Vec<PathBuf>,
    /// Early microcode layer: `auto` (when intel-ucode/amd-ucode exist), `yes`, `no`.
    pub microcode: String,
    /// Layer compression: `zstd`, `xz`, `gzip`, `lz4` or `none`.
    pub compression: String,
    /// Compression level (zstd 1-19, xz/gzip 0-9). Default: zstd 6, xz 6, gzip 6.
    pub compression_level: Option<i32>,
    /// Compressor threads (zstd). 0 means one per CPU.
    pub threads: u32,
    /// Directory of the layer cache. Default: `/var/cache/lifeboat/layers`.
    pub cache_dir: Option<PathBuf>,
    /// Timestamp for every archive entry. Default: `$SOURCE_DATE_EPOCH`, else 0.
    pub source_date_epoch: Option<u64>,
    /// The `lifeboat-init` binary. Default: next to the `lifeboat` binary,
    /// then `/usr/lib/lifeboat/lifeboat-init`.
    pub init: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            output: "initrd".into(),
            output_url: "file:///var/lib/lifeboat/output".into(),
            backup: "tar".into(),
            backup_url: None,
            backup_exclude: vec![],
            backup_type: "full".into(),
            backup_full_days: 7,
            backup_compression: "zstd".into(),
            backup_compression_level: None,
            backup_volume_size: None,
            backup_key_file: None,
            backup_credentials: None,
            backup_credentials_in_image: false,
            expose_secrets: false,
            signing_key: None,
            backup_mount_options: None,
            backup_ssh_options: vec![],
            backup_ca_file: None,
            iso_volid: "LIFEBOAT".into(),
            iso_default: "manual".into(),
            iso_max_size: None,
            boot_timeout: 10,
            boot_console: "vga".into(),
            kernel_cmdline: String::new(),
            backup_stage_dir: PathBuf::from("/var/tmp/lifeboat-upload"),
            layout_all_disks: false,
            rawdisk_format: "raw".into(),
            usb_retain: 3,
            pxe_macs: vec![],
            serve_host: None,
            serve_enroll_token_file: None,
            uki_sign_key: None,
            uki_sign_cert: None,
            udev_workflow: String::new(),
            recover: Recover::default(),
            external: Default::default(),
            rescue: Rescue::default(),
            network: Network::default(),
            ssh: Ssh::default(),
            boot: Boot::default(),
            hooks: Hooks::default(),
        }
    }
}

impl Default for Rescue {
    fn default() -> Self {
        Rescue {
            kernel: None,
            kver: None,
            modules_dir: None,
            firmware_dir: PathBuf::from("/lib/firmware"),
            modules: "generic".into(),
            add_modules: vec![],
            exclude_modules: vec![],
            programs: vec![],
            optional_programs: vec![],
            exclude_programs: vec![],
            copy_as_is: vec![],
            exclude: vec![],
            overlays: vec![],
            microcode: "auto".into(),
            compression: "zstd".into(),
            compression_level: None,
            threads: 0,
            cache_dir: None,
            source_date_epoch: None,
            init: None,
        }
    }
}

/// Upper-case ReaR spellings accepted for top-level keys.
const ALIASES: &[(&str, &str)] = &[
    ("OUTPUT", "output"),
    ("OUTPUT_URL", "output_url"),
    ("BACKUP", "backup"),
    ("BACKUP_URL", "backup_url"),
    ("BACKUP_PROG_EXCLUDE", "backup_exclude"),
    ("BACKUP_TYPE", "backup_type"),
    ("FULLBACKUP_OUTDATED_DAYS", "backup_full_days"),
    ("BACKUP_OPTIONS", "backup_mount_options"),
    ("ISO_VOLID", "iso_volid"),
    ("ISO_DEFAULT", "iso_default"),
    ("ISO_MAX_SIZE", "iso_max_size"),
    ("KERNEL_CMDLINE", "kernel_cmdline"),
    ("UDEV_WORKFLOW", "udev_workflow"),
];

/// The merged configuration and where each value came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// Dotted key → file that set it (keys not listed are defaults).
    pub origin: BTreeMap<String, PathBuf>,
    /// Files read, in order.
    pub files: Vec<PathBuf>,
}

/// The system configuration directory.
pub fn config_dir() -> PathBuf {
    std::env::var_os("LIFEBOAT_CONFIG_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/lifeboat"))
}

/// Files read in order: the system ones that exist, then the explicit ones
/// (which must exist).
pub fn config_files(extra: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let dir = config_dir();
    let mut files = Vec::new();
    for f in ["lifeboat.toml", "site.toml"] {
        let p = dir.join(f);
        if p.is_file() {
            files.push(p);
        }
    }
    let confd = dir.join("conf.d");
    if let Ok(rd) = std::fs::read_dir(&confd) {
        let mut v: Vec<PathBuf> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        v.sort();
        files.extend(v);
    }
    for f in extra {
        if !f.is_file() {
            bail!("config file {} does not exist (given with -c)", f.display());
        }
        files.push(f.clone());
    }
    Ok(files)
}

/// Load and merge the given files.
pub fn load(files: &[PathBuf]) -> Result<Loaded> {
    let mut merged = toml::Table::new();
    let mut origin = BTreeMap::new();
    for f in files {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read config file {}", f.display()))?;
        let table = parse_text(f, &text)?;
        merge(&mut merged, table, "", f, &mut origin);
    }
    let config = finish(merged)?;
    Ok(Loaded {
        config,
        origin,
        files: files.to_vec(),
    })
}

/// One configuration file's text, checked against the schema (errors name
/// the file, line and key), with the ReaR-style aliases renamed.
pub fn parse_text(f: &Path, text: &str) -> Result<toml::Table> {
    toml::from_str::<Config>(text)
        .map_err(|e| anyhow::anyhow!("{}: {}", f.display(), describe(&e, text)))?;
    let mut table: toml::Table =
        toml::from_str(text).map_err(|e| anyhow::anyhow!("{}: {}", f.display(), e))?;
    for (upper, lower) in ALIASES {
        if let Some(v) = table.remove(*upper) {
            table.insert(lower.to_string(), v);
        }
    }
    Ok(table)
}

/// The configuration of merged tables.
pub fn finish(merged: toml::Table) -> Result<Config> {
    toml::Value::Table(merged)
        .try_into()
        .context("merged configuration is invalid")
}

/// Make toml's message carry the line number and the offending key explicitly.
fn describe(e: &toml::de::Error, text: &str) -> String {
    let msg = e.message().to_string();
    let Some(span) = e.span() else { return msg };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    // The dotted key: the nearest [section] above, plus the key on this line.
    let section = text
        .lines()
        .take(line_no)
        .filter_map(|l| l.trim().strip_prefix('[').and_then(|l| l.strip_suffix(']')))
        .last()
        .map(|s| s.trim().to_string());
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_string())
        .filter(|k| !k.is_empty());
    match (key, section) {
        (Some(k), Some(s)) if !line.trim().starts_with('[') => {
            format!("line {line_no}: key `{s}.{k}`: {msg}")
        }
        (Some(k), None) => format!("line {line_no}: key `{k}`: {msg}"),
        _ => format!("line {line_no}: {msg}"),
    }
}

fn merge(
    into: &mut toml::Table,
    from: toml::Table,
    prefix: &str,
    file: &Path,
    origin: &mut BTreeMap<String, PathBuf>,
) {
    for (k, v) in from {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(dst)), toml::Value::Table(src)) => {
                merge(dst, src, &key, file, origin)
            }
            (_, toml::Value::Table(src)) => {
                let mut t = toml::Table::new();
                merge(&mut t, src, &key, file, origin);
                into.insert(k, toml::Value::Table(t));
            }
            (_, v) => {
                origin.insert(key, file.to_path_buf());
                into.insert(k, v);
            }
        }
    }
}

impl Loaded {
    /// The effective configuration as TOML, each value annotated with its origin.
    pub fn dump_text(&self) -> Result<String> {
        let value = toml::Value::try_from(&self.config)?;
        let mut out = String::new();
        out.push_str("# Effective lifeboat configuration.\n");
        if self.files.is_empty() {
            out.push_str("# No configuration files were found; all values are defaults.\n");
        } else {
            out.push_str("# Files read, in order (later wins):\n");
            for f in &self.files {
                out.push_str(&format!("#   {}\n", f.display()));
            }
        }
        let toml::Value::Table(t) = value else {
            unreachable!()
        };
        self.dump_table(&t, "", &mut out);
        Ok(out)
    }

    fn dump_table(&self, t: &toml::Table, prefix: &str, out: &mut String) {
        let unset = self.unset_keys(prefix);
        for (k, v) in t {
            if !v.is_table() {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                let src = self
                    .origin
                    .get(&key)
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "default".into());
                let line = format!("{k} = {v}");
                out.push_str(&format!("{line:<60} # {src}\n"));
            }
        }
        for k in unset {
            out.push_str(&format!("{:<60} # default (unset)\n", format!("# {k} =")));
        }
        for (k, v) in t {
            if let toml::Value::Table(sub) = v {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                out.push_str(&format!("\n[{key}]\n"));
                self.dump_table(sub, &key, out);
            }
        }
    }

    /// Optional keys that are unset in a section (TOML has no null).
    fn unset_keys(&self, prefix: &str) -> Vec<&'static str> {
        match prefix {
            "network" if self.config.network.file.is_none() => return vec!["file"],
            "ssh" if self.config.ssh.password_hash.is_none() => return vec!["password_hash"],
            "rescue" => {}
            _ => return vec![],
        }
        let r = &self.config.rescue;
        let mut v = vec![];
        if r.kernel.is_none() {
            v.push("kernel");
        }
        if r.kver.is_none() {
            v.push("kver");
        }
        if r.modules_dir.is_none() {
            v.push("modules_dir");
        }
        if r.compression_level.is_none() {
            v.push("compression_level");
        }
        if r.cache_dir.is_none() {
            v.push("cache_dir");
        }
        if r.source_date_epoch.is_none() {
            v.push("source_date_epoch");
        }
        if r.init.is_none() {
            v.push("init");
        }
        v
    }

    /// The effective configuration as JSON: `{"config": ..., "origin": {...}}`.
    pub fn dump_json(&self) -> Result<String> {
        let origin: BTreeMap<&String, String> = self
            .origin
            .iter()
            .map(|(k, v)| (k, v.display().to_string()))
            .collect();
        Ok(serde_json::to_string_pretty(&serde_json::json!({
            "files": self.files,
            "config": self.config,
            "origin": origin,
        }))?)
    }
}

/// Problems `lifeboat validate` reports: values outside their choices,
/// URLs that cannot be used, files the configuration names that are
/// missing. Each names the key and says what is allowed.
pub fn check(c: &Config) -> Vec<String> {
    let mut p: Vec<String> = c
        .recover
        .protect
        .iter()
        .filter_map(|rule| crate::safety::check_rule(rule).err())
        .map(|e| e.to_string())
        .collect();
    let mut one_of = |key: &str, v: &str, allowed: &[&str]| {
        if !allowed.iter().any(|a| a.eq_ignore_ascii_case(v)) {
            p.push(format!(
                "{key} = {v:?} is not one of {}",
                allowed.join(", ")
            ));
        }
    };
    one_of(
        "output",
        &c.output,
        &[
            "initrd", "ISO", "USB", "RAWDISK", "PXE", "UKI", "PORTABLE", "OBDR",
        ],
    );
    one_of(
        "backup_type",
        &c.backup_type,
        &["full", "incremental", "differential"],
    );
    one_of(
        "backup_compression",
        &c.backup_compression,
        &["zstd", "gzip", "xz"],
    );
    one_of(
        "iso_default",
        &c.iso_default,
        &["automatic", "manual", "shell"],
    );
    one_of("boot_console", &c.boot_console, &["vga", "serial"]);
    one_of("rawdisk_format", &c.rawdisk_format, &["raw", "qcow2"]);
    one_of(
        "udev_workflow",
        &c.udev_workflow,
        &["", "mkrescue", "mkbackup"],
    );
    one_of(
        "rescue.modules",
        &c.rescue.modules,
        &["generic", "hostonly", "none"],
    );
    one_of(
        "rescue.microcode",
        &c.rescue.microcode,
        &["auto", "yes", "no"],
    );
    one_of(
        "rescue.compression",
        &c.rescue.compression,
        &["zstd", "xz", "gzip", "lz4", "none"],
    );
    one_of("boot.on_failure", &c.boot.on_failure, &["shell", "reboot"]);
    one_of("recover.grow", &c.recover.grow, &["last", "proportional"]);
    one_of(
        "recover.auto_map",
        &c.recover.auto_map,
        &["any", "identity"],
    );
    one_of(
        "recover.rebuild_initramfs",
        &c.recover.rebuild_initramfs,
        &["auto", "always", "never"],
    );
    let schemes = |key: &str, u: &str, allowed: &[&str], p: &mut Vec<String>| {
        let Some((scheme, _)) = u.split_once("://") else {
            p.push(format!("{key} = {u:?} is not a URL (scheme://...)"));
            return;
        };
        if !allowed.contains(&scheme) {
            p.push(format!(
                "{key} = {u:?}: the scheme {scheme}:// is not one of {}",
                allowed
                    .iter()
                    .map(|s| format!("{s}://"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        } else if let Err(e) = crate::url::NetUrl::parse(u) {
            p.push(format!("{key}: {e:#}"));
        }
    };
    schemes(
        "output_url",
        &c.output_url,
        &[
            "file",
            "usb",
            "nfs",
            "cifs",
            "http",
            "https",
            "sftp",
            "lifeboat+http",
            "lifeboat+https",
        ],
        &mut p,
    );
    if let Some(u) = &c.backup_url {
        let mut allowed = vec![
            "file", "usb", "nfs", "cifs", "http", "https", "sftp", "tape", "iso",
        ];
        if !crate::recipe::is_internal(&c.backup) {
            allowed.push("rsync");
        }
        schemes("backup_url", u, &allowed, &mut p);
    }
    if !crate::recipe::is_internal(&c.backup) {
        if let Err(e) = crate::recipe::load(&c.backup, &c.external, &config_dir().join("recipes")) {
            p.push(format!("backup = {:?}: {e:#}", c.backup));
        }
    }
    if let Some(s) = &c.backup_volume_size {
        if let Err(e) = crate::backup::parse_size(s) {
            p.push(format!("backup_volume_size = {s:?}: {e:#}"));
        }
    }
    let files: [(&str, Option<&PathBuf>); 6] = [
        ("backup_key_file", c.backup_key_file.as_ref()),
        ("backup_credentials", c.backup_credentials.as_ref()),
        ("backup_ca_file", c.backup_ca_file.as_ref()),
        ("network.file", c.network.file.as_ref()),
        ("recover.mapping", c.recover.mapping.as_ref()),
        (
            "serve_enroll_token_file",
            c.serve_enroll_token_file.as_ref(),
        ),
    ];
    for (key, f) in files {
        if let Some(f) = f {
            if !f.is_file() {
                p.push(format!(
                    "{key} = {:?}: no such file",
                    f.display().to_string()
                ));
            }
        }
    }
    if let Some(f) = c.network.file.as_ref().filter(|f| f.is_file()) {
        let ok = std::fs::read(f)
            .ok()
            .and_then(|b| serde_json::from_slice::<lifeboat_contract::NetworkConfig>(&b).ok());
        if ok.is_none() {
            p.push(format!(
                "network.file = {:?} is not a network configuration (JSON: interfaces, routes, dns)",
                f.display().to_string()
            ));
        }
    }
    if let Some(f) = c.recover.mapping.as_ref().filter(|f| f.is_file()) {
        if let Err(e) = std::fs::read_to_string(f)
            .map_err(anyhow::Error::from)
            .and_then(|t| crate::migrate::parse_mapping(&t))
        {
            p.push(format!(
                "recover.mapping = {:?}: {e:#}",
                f.display().to_string()
            ));
        }
    }
    for (key, list) in [
        ("hooks.pre_backup", &c.hooks.pre_backup),
        ("hooks.post_backup", &c.hooks.post_backup),
        ("hooks.pre_recovery", &c.hooks.pre_recovery),
        ("hooks.post_recovery", &c.hooks.post_recovery),
    ] {
        for cmd in list {
            let first = cmd.split_whitespace().next().unwrap_or("");
            if cmd.trim().is_empty() {
                p.push(format!("{key}: an empty command"));
            } else if first.starts_with('/') && !Path::new(first).is_file() {
                p.push(format!("{key}: {first} (in `{cmd}`) does not exist"));
            }
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn later_wins_with_origin() {
        let d = tempfile::tempdir().unwrap();
        let a = write(
            d.path(),
            "a.toml",
            "OUTPUT = \"initrd\"\n[rescue]\nkver = \"1\"\ncompression = \"xz\"\n",
        );
        let b = write(d.path(), "b.toml", "[rescue]\nkver = \"2\"\n");
        let l = load(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(l.config.rescue.kver.as_deref(), Some("2"));
        assert_eq!(l.config.rescue.compression, "xz");
        assert_eq!(l.origin["rescue.kver"], b);
        assert_eq!(l.origin["rescue.compression"], a);
        assert_eq!(l.origin["output"], a);
        let text = l.dump_text().unwrap();
        assert!(text.contains("kver = \"2\""), "{text}");
        assert!(
            text.lines()
                .any(|x| x.starts_with("kver = \"2\"") && x.ends_with(&b.display().to_string())),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|x| x.starts_with("modules = \"generic\"") && x.ends_with("# default")),
            "{text}"
        );
    }

    #[test]
    fn unknown_key_names_file_key_and_line() {
        let d = tempfile::tempdir().unwrap();
        let a = write(
            d.path(),
            "bad.toml",
            "[rescue]\nkver = \"1\"\nkernal = \"/x\"\n",
        );
        let e = format!("{:#}", load(&[a]).unwrap_err());
        assert!(e.contains("bad.toml"), "{e}");
        assert!(e.contains("kernal"), "{e}");
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn wrong_type_names_file_key_and_line() {
        let d = tempfile::tempdir().unwrap();
        let a = write(d.path(), "bad.toml", "\n[rescue]\nthreads = \"many\"\n");
        let e = format!("{:#}", load(&[a]).unwrap_err());
        assert!(
            e.contains("bad.toml") && e.contains("line 3") && e.contains("threads"),
            "{e}"
        );
    }
}
