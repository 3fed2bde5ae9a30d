//! The contract between the host-side builder (`lifeboat`) and the rescue
//! OS's PID 1 (`lifeboat-init`).
//!
//! Every type that crosses that boundary is defined here, exactly once. Each
//! top-level document carries a `schema_version`; readers refuse documents
//! from a newer schema and unknown fields (`deny_unknown_fields`), so a stale
//! init never silently misreads what a newer builder wrote.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Schema version of the layer manifest (`manifest.json`).
pub const MANIFEST_SCHEMA_VERSION: u32 = 1;
/// Schema version of the init configuration (`/etc/lifeboat/init.json`).
pub const INIT_CONFIG_SCHEMA_VERSION: u32 = 1;
/// Schema version of the module index (`/lib/lifeboat/modules.json`).
pub const MODULE_INDEX_SCHEMA_VERSION: u32 = 1;

/// Path of the init configuration inside the rescue root.
pub const INIT_CONFIG_PATH: &str = "etc/lifeboat/init.json";
/// Path of the precomputed module index inside the rescue root.
pub const MODULE_INDEX_PATH: &str = "lib/lifeboat/modules.json";
/// Path of the captured disk layout inside the rescue root (written by `mkbackup`).
pub const RESCUE_LAYOUT_PATH: &str = "etc/lifeboat/layout.json";
/// Path of the backup manifest inside the rescue root (written by `mkbackup`).
pub const RESCUE_BACKUP_PATH: &str = "etc/lifeboat/backup.json";
/// Path of the image manifest copy inside the rescue root.
pub const MANIFEST_NAME: &str = "manifest.json";

/// Error raised when a document cannot be accepted.
#[derive(Debug)]
pub enum ContractError {
    /// The JSON did not parse or had unknown/missing fields.
    Parse(serde_json::Error),
    /// The document was written by a newer lifeboat.
    NewerSchema {
        what: &'static str,
        found: u32,
        supported: u32,
    },
}

impl std::fmt::Display for ContractError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ContractError::Parse(e) => write!(f, "{e}"),
            ContractError::NewerSchema {
                what,
                found,
                supported,
            } => write!(
                f,
                "{what} has schema_version {found}, but this lifeboat understands only up to \
                 {supported}; use the lifeboat version that wrote it, or rebuild the image"
            ),
        }
    }
}

impl std::error::Error for ContractError {}

/// Parse a versioned document: the version is checked first, so that a
/// newer document (which may have fields this version does not know) is
/// reported as newer, not as malformed.
fn parse_versioned<T: serde::de::DeserializeOwned>(
    what: &'static str,
    text: &str,
    supported: u32,
) -> Result<T, ContractError> {
    #[derive(Deserialize)]
    struct VersionOnly {
        #[serde(default)]
        schema_version: u32,
    }
    if let Ok(v) = serde_json::from_str::<VersionOnly>(text) {
        check_version(what, v.schema_version, supported)?;
    }
    serde_json::from_str(text).map_err(ContractError::Parse)
}

fn check_version(what: &'static str, found: u32, supported: u32) -> Result<(), ContractError> {
    if found > supported {
        Err(ContractError::NewerSchema {
            what,
            found,
            supported,
        })
    } else {
        Ok(())
    }
}

/// Compression of one layer file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Zstd,
    Xz,
    Gzip,
    /// The kernel's "legacy" lz4 framing (magic 0x184C2102).
    Lz4,
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
            Compression::Xz => "xz",
            Compression::Gzip => "gzip",
            Compression::Lz4 => "lz4",
        }
    }

    /// File name suffix used for a layer with this compression.
    pub fn suffix(self) -> &'static str {
        match self {
            Compression::None => "cpio",
            Compression::Zstd => "cpio.zst",
            Compression::Xz => "cpio.xz",
            Compression::Gzip => "cpio.gz",
            Compression::Lz4 => "cpio.lz4",
        }
    }

    pub fn parse(s: &str) -> Option<Compression> {
        Some(match s {
            "none" => Compression::None,
            "zstd" => Compression::Zstd,
            "xz" => Compression::Xz,
            "gzip" => Compression::Gzip,
            "lz4" => Compression::Lz4,
            _ => return None,
        })
    }
}

/// One layer of the rescue image, as recorded in `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerInfo {
    /// Layer name: `microcode`, `base`, `tools`, `modules-<kver>`, `firmware`, `plan`, `overlay-<name>`.
    pub name: String,
    /// File name of the layer inside the output directory.
    pub file: String,
    pub compression: Compression,
    /// Size of the layer file in bytes.
    pub size: u64,
    /// sha256 of the layer file, lower-case hex.
    pub sha256: String,
    /// Number of cpio entries (directories, files, links, nodes), without the trailer.
    pub files: u64,
}

/// `manifest.json`: what a rescue image consists of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema_version: u32,
    /// Version of the lifeboat that built the image.
    pub lifeboat_version: String,
    /// Kernel release the image's modules belong to.
    pub kver: String,
    /// File name of the kernel inside the output directory.
    pub kernel: String,
    /// sha256 of the kernel file.
    pub kernel_sha256: String,
    /// File name of the concatenation of all layers.
    pub initrd: String,
    /// sha256 of the concatenated initrd.
    pub initrd_sha256: String,
    /// Timestamp used for every archive entry (SOURCE_DATE_EPOCH).
    pub source_date_epoch: u64,
    /// Layers in load order; later layers win.
    pub layers: Vec<LayerInfo>,
}

impl Manifest {
    pub fn from_json(text: &str) -> Result<Manifest, ContractError> {
        let m: Manifest = parse_versioned("manifest", text, MANIFEST_SCHEMA_VERSION)?;
        check_version("manifest", m.schema_version, MANIFEST_SCHEMA_VERSION)?;
        Ok(m)
    }
}

/// `/etc/lifeboat/init.json`: what PID 1 needs to know about the image it runs from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitConfig {
    pub schema_version: u32,
    /// Kernel release the image was built for; the init warns when the running kernel differs.
    pub kver: String,
    /// Host name of the machine the image was built on.
    pub hostname: String,
    /// Shell to start on the consoles.
    pub shell: String,
    /// The host's network setup, replayed at boot (interfaces matched by MAC).
    #[serde(default)]
    pub network: NetworkConfig,
    /// Remote access.
    #[serde(default)]
    pub ssh: SshConfig,
    /// Block devices the recovery plan needs; the init waits for them.
    #[serde(default)]
    pub disks: Vec<DiskRef>,
    /// How long to wait for `disks`, in seconds.
    #[serde(default = "default_disk_timeout")]
    pub disk_timeout_secs: u32,
    /// What to do after a fatal error when running unattended.
    #[serde(default)]
    pub on_failure: FailurePolicy,
}

fn default_disk_timeout() -> u32 {
    30
}

/// After a fatal error: an emergency shell, or a reboot after a delay
/// (only when unattended; interactively there is always a shell).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase", tag = "action", deny_unknown_fields)]
pub enum FailurePolicy {
    #[default]
    Shell,
    Reboot {
        after_secs: u32,
    },
}

/// A block device the plan needs, identified as precisely as the host allowed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DiskRef {
    /// Kernel name on the source machine (`sda`, `vda`, `nvme0n1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wwn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
}

/// Network configuration captured from the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    #[serde(default)]
    pub interfaces: Vec<NetInterface>,
    #[serde(default)]
    pub routes: Vec<NetRoute>,
    /// Name servers for /etc/resolv.conf.
    #[serde(default)]
    pub dns: Vec<String>,
    /// Search domains for /etc/resolv.conf.
    #[serde(default)]
    pub search: Vec<String>,
}

/// One interface. Physical ones are found by MAC; VLANs, bonds and bridges
/// are created from the interfaces they name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetInterface {
    /// Name on the source host; other entries refer to it by this name.
    pub name: String,
    #[serde(default)]
    pub kind: NetKind,
    /// MAC address (`52:54:00:12:34:56`) of a physical interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Addresses with prefix length (`10.0.2.50/24`, `fd00::5/64`).
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Use DHCP on this interface instead of static addresses.
    #[serde(default)]
    pub dhcp: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase", tag = "type", deny_unknown_fields)]
pub enum NetKind {
    #[default]
    Ethernet,
    Vlan {
        parent: String,
        id: u16,
    },
    Bond {
        /// Kernel bonding mode name: `active-backup`, `balance-rr`, `802.3ad`, ...
        mode: String,
        members: Vec<String>,
    },
    Bridge {
        members: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetRoute {
    /// `default` or a prefix (`10.1.0.0/16`).
    pub destination: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Interface name (as in [`NetInterface::name`]).
    pub interface: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<u32>,
}

/// sshd in the rescue OS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshConfig {
    pub enabled: bool,
    pub port: u16,
    /// crypt(3) hash for root's password; without it password logins are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
}

impl Default for SshConfig {
    fn default() -> Self {
        SshConfig {
            enabled: true,
            port: 22,
            password_hash: None,
        }
    }
}

impl InitConfig {
    pub fn from_json(text: &str) -> Result<InitConfig, ContractError> {
        let c: InitConfig = parse_versioned("init config", text, INIT_CONFIG_SCHEMA_VERSION)?;
        check_version("init config", c.schema_version, INIT_CONFIG_SCHEMA_VERSION)?;
        Ok(c)
    }
}

/// One loadable module in the precomputed index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleEntry {
    /// Path relative to `/lib/modules/<kver>/`, always uncompressed in the image.
    pub path: String,
    /// Hard dependencies (module names), in load order (deepest first).
    pub deps: Vec<String>,
    /// Soft dependencies to load before this module, when present in the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre: Vec<String>,
    /// Soft dependencies to load after this module, when present in the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub post: Vec<String>,
}

/// `/lib/lifeboat/modules.json`: alias and dependency tables so that the init
/// can load drivers for coldplugged devices without libkmod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleIndex {
    pub schema_version: u32,
    pub kver: String,
    /// Module name (underscores) → entry; only modules present in the image.
    pub modules: BTreeMap<String, ModuleEntry>,
    /// (glob pattern, module name) pairs from modules.alias, restricted to
    /// modules in the image. Patterns are normalised with [`normalize_alias`];
    /// normalise a modalias the same way before matching.
    pub aliases: Vec<(String, String)>,
    /// Names of modules built into the kernel.
    pub builtin: Vec<String>,
}

impl ModuleIndex {
    pub fn from_json(text: &str) -> Result<ModuleIndex, ContractError> {
        let m: ModuleIndex = parse_versioned("module index", text, MODULE_INDEX_SCHEMA_VERSION)?;
        check_version(
            "module index",
            m.schema_version,
            MODULE_INDEX_SCHEMA_VERSION,
        )?;
        Ok(m)
    }
}

/// Schema version of the disk layout (`layout.json`).
pub const LAYOUT_SCHEMA_VERSION: u32 = 1;

/// `layout.json`: the storage of a machine as captured on the live host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layout {
    pub schema_version: u32,
    pub hostname: String,
    pub disks: Vec<Disk>,
    /// Filesystems and swap, by device path.
    #[serde(default)]
    pub filesystems: Vec<Filesystem>,
    /// The mount tree (local filesystems only).
    #[serde(default)]
    pub mounts: Vec<Mount>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub md: Vec<MdArray>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub luks: Vec<Luks>,
    #[serde(default)]
    pub lvm: Lvm,
    #[serde(default)]
    pub bootloader: Bootloader,
}

/// How the machine boots, as far as the disks show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Bootloader {
    /// Disks whose MBR carries GRUB's BIOS boot code.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grub_bios_disks: Vec<String>,
    /// GPT BIOS boot partitions (GRUB's core.img lives there).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bios_boot_partitions: Vec<String>,
    /// EFI system partitions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub esps: Vec<String>,
    /// Booted with UEFI when captured.
    #[serde(default)]
    pub uefi: bool,
    /// `efibootmgr -v` boot entries and order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub efi_entries: Vec<EfiEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub efi_boot_order: Vec<String>,
    /// Boot loaders found on the mounted ESP, relative to it
    /// (`EFI/debian/grubx64.efi`, `EFI/debian/shimx64.efi`,
    /// `EFI/systemd/systemd-bootx64.efi`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub efi_loaders: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EfiEntry {
    /// `0001`.
    pub num: String,
    pub label: String,
    pub active: bool,
    /// Device path as efibootmgr prints it.
    pub path: String,
}

/// An md RAID array (`mdadm --detail --export`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MdArray {
    pub device: String,
    pub level: String,
    pub metadata: String,
    pub uuid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Active members in role order.
    pub members: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spares: Vec<String>,
}

/// A LUKS container (`cryptsetup luksDump`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Luks {
    pub device: String,
    /// Name of the opened mapping (`/dev/mapper/<name>`) when captured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Key file named for it in /etc/crypttab (lives inside the backup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyfile: Option<String>,
    pub version: u32,
    pub uuid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub cipher: String,
    pub key_bits: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pbkdf: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sector_size: Option<u32>,
}

/// LVM as reported by `pvs/vgs/lvs --reportformat json --units b`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Lvm {
    #[serde(default)]
    pub pvs: Vec<Pv>,
    #[serde(default)]
    pub vgs: Vec<Vg>,
    #[serde(default)]
    pub lvs: Vec<Lv>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pv {
    pub device: String,
    pub uuid: String,
    pub vg: String,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vg {
    pub name: String,
    pub uuid: String,
    pub extent_bytes: u64,
    pub size_bytes: u64,
    /// `vgcfgbackup` text: with it the recovery restores the VG with the
    /// same VG and LV UUIDs (`pvcreate --restorefile` + `vgcfgrestore`;
    /// thin pools get empty thin metadata through `thin_restore`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lv {
    pub vg: String,
    pub name: String,
    pub uuid: String,
    pub size_bytes: u64,
    /// `linear`, `striped`, `raid1`, `mirror`, `thin-pool`, `thin`, ...
    pub segtype: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    pub stripes: u32,
}

/// A btrfs subvolume (`btrfs subvolume list -p`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subvolume {
    pub id: u64,
    pub parent: u64,
    pub path: String,
}

/// Schema version of the backup manifest (`backup.json`).
pub const BACKUP_SCHEMA_VERSION: u32 = 2;

/// `backup.json`: the backup chain `mkbackup` wrote, where, and the
/// checksum of every volume. A copy travels inside the rescue image, so
/// the recovery checks the volumes against what was recorded when they
/// were made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupManifest {
    pub schema_version: u32,
    /// The newest set's id: names this backup as a whole.
    pub id: String,
    pub hostname: String,
    /// `tar`.
    pub method: String,
    /// BACKUP_URL as configured (`file:///path`).
    pub url: String,
    /// Directory holding the sets and this manifest.
    pub dir: String,
    /// The filesystem that holds `dir`, so the rescue OS can mount it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<BackupLocation>,
    /// The full backup, then the incremental or differential sets, in the
    /// order they are restored.
    pub sets: Vec<BackupSet>,
}

/// The filesystem a `file://` backup lives on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupLocation {
    /// Mount point of that filesystem on the source machine.
    pub mountpoint: String,
    pub fstype: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Device it was mounted from (informational: names change).
    pub device: String,
}

/// One `mkbackup` run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupSet {
    /// Unique name (host, time, level); also its subdirectory of `dir`.
    pub id: String,
    /// `full`, `incremental` (since the previous set) or `differential`
    /// (since the full).
    pub level: String,
    pub created_unix: u64,
    /// `zstd`, `gzip`, `xz`.
    pub compression: String,
    /// `age-x25519 <recipient>` or `age-scrypt` when the volumes are
    /// encrypted (never the key itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<String>,
    pub archives: Vec<BackupArchive>,
}

/// One archive: one filesystem's contents, in one or more volumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupArchive {
    /// Where the filesystem was mounted (`/`, `/boot`, `/home`).
    pub mountpoint: String,
    /// The filesystem's UUID, tying the archive to the layout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_uuid: Option<String>,
    pub fstype: String,
    /// The compressed stream, cut into volumes (one when not split).
    pub volumes: Vec<BackupVolume>,
    /// Compressed size (all volumes).
    pub bytes: u64,
    /// Uncompressed tar stream size.
    pub tar_bytes: u64,
}

/// One file of an archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupVolume {
    /// Path relative to the backup directory.
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

impl BackupManifest {
    pub fn from_json(text: &str) -> Result<BackupManifest, ContractError> {
        let m: BackupManifest = parse_versioned("backup manifest", text, BACKUP_SCHEMA_VERSION)?;
        check_version("backup manifest", m.schema_version, BACKUP_SCHEMA_VERSION)?;
        Ok(m)
    }
}

impl Luks {
    /// Name of its dm-crypt mapping: the captured one, else `luks-<uuid>`.
    pub fn mapper_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("luks-{}", self.uuid))
    }
}

impl Filesystem {
    /// A filesystem with only its device and type known.
    pub fn new(device: &str, fstype: &str) -> Filesystem {
        Filesystem {
            device: device.to_string(),
            fstype: fstype.to_string(),
            uuid: None,
            label: None,
            used_bytes: None,
            params: BTreeMap::new(),
            subvolumes: vec![],
            default_subvolume: None,
        }
    }
}

impl Layout {
    pub fn from_json(text: &str) -> Result<Layout, ContractError> {
        let l: Layout = parse_versioned("layout", text, LAYOUT_SCHEMA_VERSION)?;
        check_version("layout", l.schema_version, LAYOUT_SCHEMA_VERSION)?;
        Ok(l)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// Kernel name (`sda`, `nvme0n1`).
    pub name: String,
    pub path: String,
    pub size_bytes: u64,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wwn: Option<String>,
    /// Names under /dev/disk/by-id pointing at this disk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub by_id: Vec<String>,
    pub removable: bool,
    pub rotational: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<PartitionTable>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionTable {
    /// `gpt` or `dos`.
    pub kind: String,
    /// GPT disk GUID or MBR disk identifier (`0x1234abcd`).
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_lba: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_lba: Option<u64>,
    pub sector_size: u32,
    pub partitions: Vec<Partition>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    pub number: u32,
    /// Device node on the source machine.
    pub node: String,
    /// Start and size in sectors of `sector_size`.
    pub start: u64,
    pub size: u64,
    /// GPT type GUID or MBR type (hex, e.g. `83`).
    pub type_id: String,
    /// GPT PARTUUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// GPT partition name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// GPT attributes as sfdisk prints them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attrs: Option<String>,
    /// MBR boot flag.
    #[serde(default)]
    pub bootable: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filesystem {
    pub device: String,
    /// `ext4`, `xfs`, `btrfs`, `vfat`, `swap`, `crypto_LUKS`, `LVM2_member`, `linux_raid_member`, ...
    pub fstype: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Bytes in use when captured (for shrinking onto smaller disks); not compared by `layout check`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<u64>,
    /// Creation parameters worth reproducing (ext: features, block_size,
    /// inode_size, reserved_blocks; xfs: isize, bsize, crc, reflink, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subvolumes: Vec<Subvolume>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_subvolume: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    pub target: String,
    pub source: String,
    pub fstype: String,
    pub options: String,
    /// The directory of the filesystem mounted there, when not its root
    /// (a btrfs subvolume such as `/@home`, or a bind mount).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
}

/// Normalise a module name the way kmod does: dashes become underscores.
pub fn normalize_module_name(name: &str) -> String {
    name.replace('-', "_")
}

/// Normalise an alias (or alias pattern) the way kmod does before lookups:
/// dashes become underscores, except inside `[...]` classes.
pub fn normalize_alias(alias: &str) -> String {
    let mut out = String::with_capacity(alias.len());
    let mut in_class = false;
    for c in alias.chars() {
        match c {
            '[' => {
                in_class = true;
                out.push(c)
            }
            ']' => {
                in_class = false;
                out.push(c)
            }
            '-' if !in_class => out.push('_'),
            c => out.push(c),
        }
    }
    out
}

/// Match a modalias against an alias pattern using fnmatch-style globbing
/// (`*`, `?`, `[...]`), as modprobe does for modules.alias.
pub fn alias_matches(pattern: &str, text: &str) -> bool {
    glob_match(pattern.as_bytes(), text.as_bytes())
}

fn glob_match(p: &[u8], t: &[u8]) -> bool {
    // Iterative matcher with single-star backtracking.
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() {
            match p[pi] {
                b'*' => {
                    star = Some((pi, ti));
                    pi += 1;
                    continue;
                }
                b'?' => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, next)) = class_match(&p[pi..], t[ti]) {
                        if matched {
                            pi += next;
                            ti += 1;
                            continue;
                        }
                    } else if t[ti] == b'[' {
                        pi += 1;
                        ti += 1;
                        continue;
                    }
                }
                c if c == t[ti] => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, st)) => {
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

/// Match a `[...]` class at the start of `p`; returns (matched, pattern length).
fn class_match(p: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = i < p.len() && (p[i] == b'!' || p[i] == b'^');
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while i < p.len() {
        if p[i] == b']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if i + 2 < p.len() && p[i + 1] == b'-' && p[i + 2] != b']' {
            if p[i] <= c && c <= p[i + 2] {
                matched = true;
            }
            i += 3;
        } else {
            if p[i] == c {
                matched = true;
            }
            i += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_basics() {
        assert!(alias_matches(
            "pci:v00008086d*sv*sd*bc*sc*i*",
            "pci:v00008086d000010D3sv00008086sd00000000bc02sc00i00"
        ));
        assert!(!alias_matches("pci:v00008086d*", "pci:v000010ECd00008168"));
        assert!(alias_matches(
            "virtio:d00000002v*",
            "virtio:d00000002v00001AF4"
        ));
        assert!(alias_matches("a?c", "abc"));
        assert!(!alias_matches("a?c", "ac"));
        assert!(alias_matches("acpi*:PNP0A0[38]:*", "acpi:PNP0A08:"));
        assert!(!alias_matches("acpi*:PNP0A0[38]:*", "acpi:PNP0A05:"));
        assert!(alias_matches("x[a-c]y", "xby"));
        assert!(!alias_matches("x[!a-c]y", "xby"));
        assert!(alias_matches("*", ""));
        assert!(!alias_matches("", "a"));
    }

    #[test]
    fn alias_normalisation_keeps_classes() {
        assert_eq!(normalize_alias("crypto-crc32c"), "crypto_crc32c");
        assert_eq!(normalize_alias("a-[x-z]-b"), "a_[x-z]_b");
    }

    #[test]
    fn init_config_defaults_and_roundtrip() {
        let j = r#"{"schema_version":1,"kver":"x","hostname":"h","shell":"/bin/sh"}"#;
        let c = InitConfig::from_json(j).unwrap();
        assert!(c.ssh.enabled);
        assert_eq!(c.disk_timeout_secs, 30);
        assert_eq!(c.on_failure, FailurePolicy::Shell);
        let mut c2 = c.clone();
        c2.network.interfaces.push(NetInterface {
            name: "bond0".into(),
            kind: NetKind::Bond {
                mode: "active-backup".into(),
                members: vec!["eth0".into(), "eth1".into()],
            },
            mac: None,
            addresses: vec!["10.0.0.5/24".into()],
            mtu: Some(9000),
            dhcp: false,
        });
        c2.on_failure = FailurePolicy::Reboot { after_secs: 60 };
        let back = InitConfig::from_json(&serde_json::to_string(&c2).unwrap()).unwrap();
        assert_eq!(back, c2);
    }

    #[test]
    fn newer_schema_is_refused() {
        let j = r#"{"schema_version":99,"kver":"x","hostname":"h","shell":"/bin/sh"}"#;
        let e = InitConfig::from_json(j).unwrap_err();
        assert!(e.to_string().contains("schema_version 99"), "{e}");
        // A newer document with fields this version does not know is
        // reported as newer, not as malformed.
        let j = r#"{"schema_version":7,"hostname":"h","disks":[],"new_thing":{"x":1}}"#;
        let e = Layout::from_json(j).unwrap_err().to_string();
        assert!(
            e.contains("layout has schema_version 7") && e.contains("understands only up to"),
            "{e}"
        );
    }

    #[test]
    fn unknown_field_is_refused() {
        let j = r#"{"schema_version":1,"kver":"x","hostname":"h","shell":"/bin/sh","extra":1}"#;
        let e = InitConfig::from_json(j).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let j = r#"{"schema_version":1,"kver":"x","hostname":"h","shell":"/bin/sh","network":{"interfaces":[{"name":"eth0","kind":{"type":"vlan","parent":"eth1","id":5},"typo":1}]}}"#;
        let e = InitConfig::from_json(j).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }
}
