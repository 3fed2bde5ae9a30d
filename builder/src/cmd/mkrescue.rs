//! `lifeboat mkrescue`: build the rescue image.

use crate::rescue::{self, BuildInputs};
use crate::Global;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output kind (overrides OUTPUT): initrd, ISO, USB, RAWDISK, PXE, UKI, PORTABLE.
    #[arg(long)]
    pub output: Option<String>,
    /// Kernel image (default: /boot/vmlinuz-<kver>).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Kernel release (default: from the kernel file name, else `uname -r`).
    #[arg(long, value_name = "VER")]
    pub kver: Option<String>,
    /// Modules directory (default: /lib/modules/<kver>).
    #[arg(long, value_name = "DIR")]
    pub modules_dir: Option<PathBuf>,
    /// Where to write the image (overrides OUTPUT_URL).
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// Module set: generic, hostonly or none (overrides rescue.modules).
    #[arg(long, value_name = "SET")]
    pub modules: Option<String>,
    /// Layer compression: zstd, xz, gzip, lz4, none (overrides rescue.compression).
    #[arg(long)]
    pub compression: Option<String>,
    /// Ignore and do not fill the layer cache.
    #[arg(long)]
    pub no_cache: bool,
    /// A generic medium for any machine: kernel, base, modules and
    /// firmware only; the rest (tools, the machine's own plan) is chained
    /// from `lifeboat serve` at --chain URL.
    #[arg(long, requires = "chain")]
    pub generic: bool,
    /// The `lifeboat serve` a generic medium chains to (http:// or https://).
    #[arg(long, value_name = "URL")]
    pub chain: Option<String>,
    /// Put secrets into the image (plan layer only, files 0600): the backup
    /// key, ssh.password_hash, credentials, private keys found among
    /// copy_as_is/overlays. Same as expose_secrets = true for this run.
    #[arg(long)]
    pub expose_secrets: bool,
    /// Build even when the kernel image or the modules are of another
    /// release than --kver (the rescue OS warns at boot).
    #[arg(long)]
    pub allow_kernel_mismatch: bool,
    /// Check everything (configuration, kernel, modules, the output
    /// medium), say what would be written, replaced or removed, and write
    /// nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// An `iso://` backup to put on the ISO(s): its staging directory and
    /// its directory on the ISO (set by mkbackup).
    #[arg(skip)]
    pub iso_backup: Option<(PathBuf, String)>,
    /// OBDR: the tape backup to write after the boot area (its staging
    /// directory and manifest; set by mkbackup).
    #[arg(skip)]
    pub obdr_set: Option<(PathBuf, lifeboat_contract::BackupManifest)>,
}

pub fn run(g: &Global, a: Args) -> Result<()> {
    // The plan of the last mkbackup (layout and backup manifest), so the
    // image can recover from that backup; mkbackup passes its own.
    let mut plan = Vec::new();
    let (lp, bp) = (
        Path::new(super::layout::DEFAULT_LAYOUT),
        Path::new(super::layout::DEFAULT_BACKUP),
    );
    if let (Ok(l), Ok(b)) = (std::fs::read(lp), std::fs::read(bp)) {
        let m = lifeboat_contract::BackupManifest::from_json(&String::from_utf8_lossy(&b))
            .with_context(|| format!("{} is not a valid backup manifest", bp.display()))?;
        if !g.quiet {
            println!(
                "carrying the plan of the last mkbackup: {} and backup {} ({})",
                lp.display(),
                m.id,
                m.url
            );
        }
        plan.push((lifeboat_contract::RESCUE_LAYOUT_PATH.to_string(), l));
        plan.push((lifeboat_contract::RESCUE_BACKUP_PATH.to_string(), b));
    }
    run_with(g, a, plan)
}

/// Build the image, with extra files in its plan layer (used by `mkbackup`).
pub fn run_with(g: &Global, a: Args, plan_files: Vec<(String, Vec<u8>)>) -> Result<()> {
    let loaded = g.load_config()?;
    let mut cfg = loaded.config.clone();
    // A backup tool run by a recipe must be in the rescue OS.
    if !crate::recipe::is_internal(&cfg.backup) {
        let r = crate::recipe::load(
            &cfg.backup,
            &cfg.external,
            &crate::config::config_dir().join("recipes"),
        )?;
        cfg.rescue.programs.extend(r.programs);
        cfg.rescue.copy_as_is.extend(r.copy_as_is);
        cfg.rescue.exclude.extend(r.exclude);
    }
    // Scripts the recovery hooks name come along (their interpreter through
    // copy_as_is; the scripts themselves are in the plan layer too).
    for s in crate::hooks::recovery_scripts(&cfg.hooks) {
        if !cfg.rescue.copy_as_is.contains(&s) {
            cfg.rescue.copy_as_is.push(s);
        }
    }
    if let Some(o) = a.output {
        cfg.output = o;
    }
    if a.expose_secrets {
        cfg.expose_secrets = true;
    }
    // A password hash is a secret: neither init.json nor the copy of the
    // configuration in the image carry it unless secrets are exposed.
    let mut early_warnings = Vec::new();
    if !cfg.expose_secrets && cfg.ssh.password_hash.take().is_some() {
        early_warnings.push(
            "ssh.password_hash is not put into the image (a password hash is a secret): log in with \
             ssh.authorized_keys, or build with --expose-secrets (expose_secrets = true)"
                .to_string(),
        );
    }
    let kind = cfg.output.to_ascii_uppercase();
    if ![
        "INITRD", "ISO", "USB", "RAWDISK", "PXE", "UKI", "PORTABLE", "OBDR",
    ]
    .contains(&kind.as_str())
    {
        bail!(
            "OUTPUT = {:?} is not supported by this version; supported: initrd, ISO, USB, RAWDISK, PXE, UKI, PORTABLE, OBDR",
            cfg.output
        );
    }
    if kind == "USB" && crate::url::parse_usb(&cfg.output_url).is_none() && a.output_dir.is_none() {
        bail!(
            "OUTPUT = \"USB\" needs OUTPUT_URL = \"usb://LABEL\" (the stick `lifeboat format` prepared; its label is LIFEBOAT-000 unless you chose another), not {:?}",
            cfg.output_url
        );
    }
    if let Some(m) = a.modules {
        cfg.rescue.modules = m;
    }
    let serve = crate::chain::server_url(&cfg.output_url);
    if cfg.output_url.starts_with("lifeboat+") && serve.is_none() {
        bail!(
            "OUTPUT_URL = {:?}: a lifeboat serve URL is lifeboat+http://server[:port]/ or lifeboat+https://server[:port]/",
            cfg.output_url
        );
    }
    if serve.is_some() && !matches!(kind.as_str(), "INITRD" | "PXE") {
        bail!(
            "OUTPUT_URL = {:?} registers this host with lifeboat serve, which boots it over the network: use OUTPUT = \"PXE\" (or \"initrd\"), not {:?}",
            cfg.output_url,
            cfg.output
        );
    }
    let generic = a.generic || a.chain.is_some();
    if generic {
        let c = a.chain.as_deref().unwrap_or("");
        if !(c.starts_with("http://") || c.starts_with("https://")) {
            bail!("--chain {c:?}: give the lifeboat serve URL, http://server:port/ or https://server:port/");
        }
        if serve.is_some() {
            bail!("--generic builds a medium for any machine; it is not registered (leave OUTPUT_URL lifeboat+… out)");
        }
        if !matches!(kind.as_str(), "INITRD" | "ISO" | "USB" | "RAWDISK" | "UKI") {
            bail!("--generic makes a boot medium: OUTPUT ISO, USB, RAWDISK, UKI or initrd (with the NIC's own iPXE use GET /boot.ipxe instead)");
        }
        // Any machine: every storage and network driver.
        cfg.rescue.modules = "generic".into();
        let mut u = c.to_string();
        if !u.ends_with('/') {
            u.push('/');
        }
        cfg.kernel_cmdline = format!("{} lifeboat.chain={u}", cfg.kernel_cmdline)
            .trim()
            .to_string();
    }
    let iso_backup = a.iso_backup.clone();
    let obdr_set = a.obdr_set.clone();
    // OBDR: the tape is BACKUP_URL's.
    let obdr_tape = if kind == "OBDR" {
        match cfg.backup_url.as_deref() {
            Some(u) if u.starts_with("tape://") => {
                crate::tape::path_of(u)?;
                Some(u.to_string())
            }
            other => bail!(
                "OUTPUT = \"OBDR\" writes the rescue ISO to the tape of BACKUP_URL: set BACKUP_URL = \"tape:///dev/nst0\" \
                 (or tape:///path/image.tap); it is {other:?}"
            ),
        }
    } else {
        None
    };
    if iso_backup.is_some() && kind != "ISO" {
        bail!(
            "BACKUP_URL = \"iso://...\" puts the backup on the rescue ISO: it needs OUTPUT = \"ISO\" (it is {:?})",
            cfg.output
        );
    }
    if let Some(c) = a.compression {
        cfg.rescue.compression = c;
    }
    // Keeps a usb:// medium mounted while the image is written.
    let mut _medium = None;
    let host = crate::layout::hostname().unwrap_or_else(|| "rescue".into());
    // OUTPUT_URL is reached with BACKUP_URL's credentials and options.
    let acc = crate::url::Access::from_config(&cfg);
    // http(s):// and sftp://: made in a staging directory, then uploaded
    // (a PXE tree to the URL itself, everything else to URL/<host>/).
    let remote = match &a.output_dir {
        Some(_) => None,
        None if serve.is_some() => None,
        None => crate::backup::Store::remote(
            &cfg.output_url,
            &acc,
            if kind == "PXE" { "" } else { &host },
        )?,
    };
    let mut stages = Vec::new();
    let mut stage_dir = |what: &str| -> Result<PathBuf> {
        let t = tempfile::Builder::new()
            .prefix(&format!("lifeboat-{what}-"))
            .tempdir_in(std::env::temp_dir())?;
        let p = t.path().to_path_buf();
        stages.push(t);
        Ok(p)
    };
    let mut output_dir = match (a.output_dir.clone(), &remote) {
        (Some(d), _) => d,
        (None, Some(_)) => stage_dir("upload")?,
        (None, None) if serve.is_some() => stage_dir("serve")?,
        (None, None) => {
            let l = crate::url::local_with(&cfg.output_url, "OUTPUT_URL", &acc)?;
            let p = l.path.clone();
            _medium = Some(l);
            p
        }
    };
    // PXE: the tree goes to the output location, the image is built aside.
    let mut pxe_tree = None;
    if kind == "PXE" {
        pxe_tree = Some(output_dir.clone());
        output_dir = stage_dir("pxe")?;
    }
    // USB: the stick's root, the images directory on it, and this image's stamp.
    let mut stick = None;
    if kind == "USB" {
        let images = crate::url::parse_usb(&cfg.output_url)
            .map(|(_, d)| d)
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| "lifeboat".into());
        let root = if _medium.is_some() {
            let depth = Path::new(&images).components().count();
            output_dir
                .ancestors()
                .nth(depth)
                .unwrap_or(&output_dir)
                .to_path_buf()
        } else {
            // --output-dir: the stick's mount point itself.
            output_dir.clone()
        };
        if !root.join(crate::bootdisk::MARKER).is_file() {
            bail!(
                "{} is not a stick prepared by `lifeboat format` (no {}); run `lifeboat format /dev/sdX` on it first",
                root.display(),
                crate::bootdisk::MARKER
            );
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let stamp = crate::bootdisk::utc_stamp(now);
        // Built off the stick; only the kernel, the initrd and the
        // manifest go onto it.
        output_dir = stage_dir("usb")?;
        stick = Some((root, images, stamp));
    }
    if a.dry_run {
        let inp = BuildInputs {
            kernel: a.kernel.clone(),
            kver: a.kver.clone(),
            modules_dir: a.modules_dir.clone(),
            output_dir: output_dir.clone(),
            use_cache: false,
            root: PathBuf::from("/"),
            plan_files: vec![],
            generic,
            progress: false,
            allow_kernel_mismatch: a.allow_kernel_mismatch,
        };
        return dry_run(
            &cfg,
            &inp,
            &kind,
            &host,
            DryTargets {
                output_dir: &output_dir,
                pxe_tree: pxe_tree.as_deref(),
                stick: stick.as_ref(),
                remote: remote.as_ref(),
                serve: serve.as_deref(),
                obdr_tape: obdr_tape.as_deref(),
            },
        );
    }
    if kind == "PORTABLE" {
        // No boot image: the binary, the configuration and the plan.
        let p = output_dir.join(format!("lifeboat-portable-{host}.tar.gz"));
        let warnings = crate::portable::write(&p, &host, &toml::to_string(&cfg)?, &plan_files)?;
        if let Some(r) = &remote {
            upload_dir(r, &output_dir, g.quiet)?;
        }
        if !g.quiet {
            for w in &warnings {
                eprintln!("lifeboat: warning: {w}");
            }
            println!(
                "portable lifeboat (run ./lifeboat recover from any live Linux): {}",
                match &remote {
                    Some(r) => r.show(&format!("lifeboat-portable-{host}.tar.gz")),
                    None => p.display().to_string(),
                }
            );
        }
        return Ok(());
    }
    let inp = BuildInputs {
        kernel: a.kernel,
        kver: a.kver,
        modules_dir: a.modules_dir,
        output_dir: output_dir.clone(),
        use_cache: !a.no_cache,
        root: PathBuf::from("/"),
        plan_files,
        generic,
        progress: !g.quiet,
        allow_kernel_mismatch: a.allow_kernel_mismatch,
    };
    let cfg_text = toml::to_string(&cfg)?;
    let o = crate::iso::IsoOptions {
        label: cfg.iso_volid.clone(),
        default: cfg.iso_default.clone(),
        console: cfg.boot_console.clone(),
        timeout: cfg.boot_timeout,
        cmdline: cfg.kernel_cmdline.clone(),
    };
    // Check the menu settings and the tools before the build, not after it.
    crate::iso::grub_cfg(&o, "k", "i")?;
    if kind == "ISO" || kind == "OBDR" {
        crate::iso::check_tools()?;
    }
    if let Some(t) = &obdr_tape {
        crate::tape::check_overwrite(t)?;
    }
    let had_image = output_dir.join("manifest.json").is_file();
    let mut report = rescue::build(&cfg, &cfg_text, &inp).with_context(|| {
        if had_image {
            format!(
                "the rescue image was not built; the previous image in {} was kept as it was",
                output_dir.display()
            )
        } else {
            format!(
                "the rescue image was not built into {}",
                output_dir.display()
            )
        }
    })?;
    report.warnings.splice(0..0, early_warnings);
    let mut medium_line = None;
    let m = report.manifest.clone().unwrap();
    // Where the kernel and layers are (the PXE arm moves output_dir to the tree).
    let built_dir = output_dir.clone();
    match kind.as_str() {
        "OBDR" => {
            let p = output_dir.join(format!("lifeboat-{host}.iso"));
            report.warnings.extend(crate::iso::write(
                &output_dir,
                &m.kernel,
                &m.initrd,
                &p,
                &o,
                &[],
            )?);
            let t = obdr_tape.as_ref().unwrap();
            let label = crate::tape::OBDR_LABEL;
            match &obdr_set {
                Some((stage, bm)) => {
                    crate::tape::write_set(t, stage, bm, g.quiet, Some((label, p.as_path())))?
                }
                None => {
                    // The boot area alone, then the end of data.
                    let mut tape = crate::tape::open(t, true)?;
                    crate::tape::write_obdr_boot(tape.as_mut(), label, &p)?;
                    tape.weof()?;
                }
            }
            medium_line = Some(format!(
                "OBDR tape {t}: label {label}, bootable ISO from block 20{}",
                if obdr_set.is_some() {
                    ", then the backup"
                } else {
                    " (no backup: run mkbackup)"
                }
            ));
        }
        "ISO" => {
            let p = output_dir.join(format!("lifeboat-{host}.iso"));
            // Media of an earlier, bigger backup must not linger.
            let prefix = format!("lifeboat-{host}_");
            if let Ok(rd) = std::fs::read_dir(&output_dir) {
                for e in rd.flatten() {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if n.starts_with(&prefix) && n.ends_with(".iso") {
                        std::fs::remove_file(e.path())?;
                    }
                }
            }
            let mut maps = Vec::new();
            let mut more = Vec::new();
            if let Some((stage, on_iso)) = &iso_backup {
                let mut files = Vec::new();
                for e in walkdir::WalkDir::new(stage).sort_by_file_name() {
                    let e = e?;
                    if e.file_type().is_file() {
                        let rel = e.path().strip_prefix(stage)?.to_string_lossy().into_owned();
                        files.push((rel, e.metadata()?.len()));
                    }
                }
                // The rescue system and GRUB's files for both platforms.
                let first_used = std::fs::metadata(output_dir.join(&m.kernel))?.len()
                    + std::fs::metadata(output_dir.join(&m.initrd))?.len()
                    + (24 << 20);
                let media = crate::iso::split_media(
                    &files,
                    first_used,
                    cfg.iso_max_size.map(|mb| mb << 20),
                )?;
                if media.len() > 1 && cfg.iso_volid.len() > 29 {
                    bail!(
                        "iso_volid = {:?}: with several ISOs the labels get a _NN suffix; use at most 29 characters",
                        cfg.iso_volid
                    );
                }
                for (i, list) in media.iter().enumerate() {
                    let mapped: Vec<(PathBuf, String)> = list
                        .iter()
                        .map(|f| (stage.join(f), format!("/{on_iso}/{f}")))
                        .collect();
                    if i == 0 {
                        maps = mapped;
                    } else {
                        let q = output_dir.join(format!("lifeboat-{host}_{:02}.iso", i + 1));
                        let label = crate::iso::media_label(&cfg.iso_volid, i + 1);
                        crate::iso::write_data(&q, &label, &mapped)?;
                        more.push(format!("{} ({label})", q.display()));
                    }
                }
            }
            report.warnings.extend(crate::iso::write(
                &output_dir,
                &m.kernel,
                &m.initrd,
                &p,
                &o,
                &maps,
            )?);
            let mut line = format!("ISO (BIOS + UEFI, isohybrid): {}", p.display());
            if iso_backup.is_some() {
                line.push_str(" with the backup");
            }
            for q in &more {
                line.push_str(&format!("\n  backup continued on ISO {q}"));
            }
            medium_line = Some(line);
        }
        "RAWDISK" => {
            let qcow2 = match cfg.rawdisk_format.as_str() {
                "raw" => false,
                "qcow2" => true,
                other => bail!("rawdisk_format = {other:?} is not one of raw, qcow2"),
            };
            let p = output_dir.join(format!(
                "lifeboat-{host}.{}",
                if qcow2 { "qcow2" } else { "raw" }
            ));
            crate::bootdisk::write_rawdisk(&output_dir, &m.kernel, &m.initrd, &p, &o, qcow2)?;
            medium_line = Some(format!("disk image (BIOS + UEFI): {}", p.display()));
        }
        "USB" => {
            let (root, images, stamp) = stick.as_ref().unwrap();
            let dest = root.join(images).join(&host).join("rescue").join(stamp);
            let removed = crate::bootdisk::prune_stick(root, images, &host, cfg.usb_retain)?;
            for r in removed {
                report.warnings.push(format!(
                    "removed the old rescue image {} (usb_retain = {})",
                    r.display(),
                    cfg.usb_retain
                ));
            }
            let part = dest.with_file_name(format!(".{stamp}.part"));
            let copied = crate::bootdisk::link_files(
                &output_dir,
                &part,
                &[&m.kernel, &m.initrd, "manifest.json"],
            )
            .and_then(|_| {
                crate::bootdisk::sync_dir(&part)?;
                std::fs::rename(&part, &dest)
                    .with_context(|| format!("cannot write {}", dest.display()))
            });
            if let Err(e) = copied {
                // No half-written image stays on the stick.
                let _ = std::fs::remove_dir_all(&part);
                return Err(e.context(format!(
                    "cannot put the rescue image on the stick {} (is it full? usb_retain = {} keeps that many per host)",
                    root.display(),
                    cfg.usb_retain
                )));
            }
            output_dir = dest;
            crate::bootdisk::write_stick_menu(root, images, &host, stamp, &o)?;
            medium_line = Some(format!(
                "USB stick {}: image {host} {stamp}, boot menu updated",
                root.display()
            ));
        }
        "UKI" => {
            let sign = match (&cfg.uki_sign_key, &cfg.uki_sign_cert) {
                (Some(k), Some(c)) => Some((k.as_path(), c.as_path())),
                (None, None) => None,
                _ => bail!("set both uki_sign_key and uki_sign_cert to sign the UKI (or neither)"),
            };
            let (es, def) = crate::pxe::entries(&o)?;
            let args = &es.iter().find(|e| e.0 == def).unwrap().2;
            let p = output_dir.join(format!("lifeboat-{host}.efi"));
            crate::uki::write(&output_dir, &m.kernel, &m.initrd, args, &host, &p, sign)?;
            medium_line = Some(format!(
                "UKI ({}): {}",
                if sign.is_some() { "signed" } else { "unsigned" },
                p.display()
            ));
        }
        "PXE" => {
            let tree = pxe_tree.as_ref().unwrap();
            let mut macs = cfg.pxe_macs.clone();
            if cfg.network.capture || cfg.network.file.is_some() {
                let net = rescue::network_config(&cfg, &mut report.warnings)?;
                macs.extend(net.interfaces.iter().filter_map(|i| i.mac.clone()));
            }
            let w = crate::pxe::write_tree(&output_dir, &m, tree, &host, &o, &macs)?;
            report.warnings.extend(w.warnings);
            medium_line = Some(format!(
                "PXE tree (pxelinux, GRUB, iPXE): {}",
                match &remote {
                    Some(r) => r.show(""),
                    None => tree.display().to_string(),
                }
            ));
            output_dir = tree.clone();
        }
        _ => {}
    }
    // Outputs holding the plan (the host's configuration, and any exposed
    // secret) are root's alone. A PXE tree stays readable for the TFTP or
    // HTTP server, unless it carries secrets.
    if kind != "PXE" || cfg.expose_secrets {
        crate::secrets::restrict(&built_dir)?;
        crate::secrets::restrict(&output_dir)?;
    }
    if let Some(r) = &remote {
        upload_dir(r, &output_dir, g.quiet)?;
    }
    let mut registered = None;
    if let Some(base) = &serve {
        let id = cfg.serve_host.clone().unwrap_or_else(|| host.clone());
        let (es, def) = crate::pxe::entries(&o)?;
        let cmdline = es.iter().find(|e| e.0 == def).unwrap().2.clone();
        let mut macs = cfg.pxe_macs.clone();
        if cfg.network.capture || cfg.network.file.is_some() {
            let net = rescue::network_config(&cfg, &mut report.warnings)?;
            macs.extend(net.interfaces.iter().filter_map(|i| i.mac.clone()));
        }
        let uuid = std::fs::read_to_string("/sys/class/dmi/id/product_uuid")
            .ok()
            .map(|u| u.trim().to_ascii_lowercase())
            // Boards without a real one report all zeros or all ones.
            .filter(|u| {
                u.chars()
                    .any(|c| c.is_ascii_hexdigit() && c != '0' && c != 'f')
            });
        let enroll = match &cfg.serve_enroll_token_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .with_context(|| {
                        format!("serve_enroll_token_file: cannot read {}", f.display())
                    })?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        let r = crate::chain::register(
            base,
            &id,
            &built_dir,
            report.manifest.as_ref().unwrap(),
            &cmdline,
            &macs,
            uuid,
            enroll.as_deref(),
            cfg.backup_ca_file.as_deref(),
            &state_dir(),
        )?;
        registered = Some((base.clone(), id, r));
    }
    let shown = match (&remote, &registered) {
        (Some(r), _) => r.show(""),
        (None, Some((base, id, _))) => format!("{base}hosts/{id}/"),
        (None, None) => output_dir.display().to_string(),
    };
    for w in &report.warnings {
        if !g.quiet {
            eprintln!("lifeboat: warning: {w}");
        }
    }
    if !g.quiet {
        let m = report.manifest.as_ref().unwrap();
        println!("rescue image for kernel {} written to {shown}", m.kver);
        for l in &m.layers {
            let how = if report.layers_from_cache.contains(&l.name) {
                "cached"
            } else {
                "built"
            };
            println!(
                "  {:<24} {:>10} bytes {:>6} entries  {how}",
                l.file, l.size, l.files
            );
        }
        println!("  {:<24} sha256 {}", m.initrd, m.initrd_sha256);
        if let Some(l) = &medium_line {
            println!("  {l}");
        }
        if let Some((base, id, r)) = &registered {
            println!(
                "  registered with lifeboat serve {base} as host {id}: {} file(s) uploaded, {} already there",
                r.uploaded.len(),
                r.already_there
            );
            println!(
                "  token ({}): {}",
                if r.new_token { "new" } else { "unchanged" },
                r.token_file.display()
            );
            println!(
                "  boot it: iPXE `chain {base}hosts/{id}/boot.ipxe?token=<token>` (e.g. as the DHCP boot file), or {base}boot.ipxe with the iPXE setting lifeboat-token"
            );
        }
        if generic {
            println!(
                "  generic medium: chains to {} (lifeboat.chain= on its kernel command line)",
                a.chain.as_deref().unwrap_or("")
            );
        }
        println!(
            "done in {:.2} s (collecting {:.2} s)",
            report.seconds, report.collect_seconds
        );
    }
    Ok(())
}

/// Where lifeboat keeps its state (`/var/lib/lifeboat`; `LIFEBOAT_STATE_DIR` for tests).
/// Where a build would go (for `--dry-run`).
struct DryTargets<'a> {
    output_dir: &'a Path,
    pxe_tree: Option<&'a Path>,
    stick: Option<&'a (PathBuf, String, String)>,
    remote: Option<&'a crate::backup::Store>,
    serve: Option<&'a str>,
    obdr_tape: Option<&'a str>,
}

/// `mkrescue --dry-run`: the kernel and modules are checked as for a
/// build; what would be written, replaced and removed is printed.
fn dry_run(
    cfg: &crate::config::Config,
    inp: &BuildInputs,
    kind: &str,
    host: &str,
    t: DryTargets,
) -> Result<()> {
    let (kernel, kver, mdir) = rescue::resolve_kernel(cfg, inp)?;
    println!(
        "dry run: mkrescue would build the rescue image of {host} for kernel {kver} ({}, modules {}: {})",
        kernel.display(),
        cfg.rescue.modules,
        mdir.display()
    );
    let dest = match (t.remote, t.serve, t.pxe_tree, t.stick) {
        (Some(r), _, _, _) => format!("uploaded to {}", r.show("")),
        (_, Some(s), _, _) => format!(
            "registered with lifeboat serve {s} as host {}",
            cfg.serve_host.as_deref().unwrap_or(host)
        ),
        (_, _, Some(tree), _) => format!("the PXE tree {}", tree.display()),
        (_, _, _, Some((root, images, stamp))) => format!(
            "the USB stick {} as {images}/{host}/rescue/{stamp}",
            root.display()
        ),
        _ => t.output_dir.display().to_string(),
    };
    println!("  {kind} output: {dest}");
    if t.remote.is_none() && t.serve.is_none() && t.stick.is_none() {
        let dir = t.pxe_tree.unwrap_or(t.output_dir);
        if dir.join("manifest.json").is_file() || dir.join("lifeboat").is_dir() {
            println!(
                "  replaces the image now in {} (it stays until the new one is complete)",
                dir.display()
            );
        }
    }
    if let Some((root, images, _)) = t.stick {
        for p in crate::bootdisk::to_prune(root, images, host, cfg.usb_retain)? {
            println!(
                "  would remove the old rescue image {} (usb_retain = {})",
                p.display(),
                cfg.usb_retain
            );
        }
    }
    if let Some(tape) = t.obdr_tape {
        crate::tape::check_overwrite(tape)?;
        println!("  would overwrite the tape {tape} from its start");
    }
    if !cfg.expose_secrets && cfg.ssh.password_hash.is_some() {
        println!("  ssh.password_hash would be left out (a secret; --expose-secrets)");
    }
    println!("nothing was written");
    Ok(())
}

pub fn state_dir() -> PathBuf {
    std::env::var_os("LIFEBOAT_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/lifeboat"))
}

/// Send every file below `dir` to `remote` (the manifest last, so a
/// reader never sees a manifest without its files).
fn upload_dir(remote: &crate::backup::Store, dir: &Path, quiet: bool) -> Result<()> {
    let mut files = Vec::new();
    for e in walkdir::WalkDir::new(dir).sort_by_file_name() {
        let e = e?;
        if e.file_type().is_file() {
            files.push(e.path().strip_prefix(dir)?.to_string_lossy().into_owned());
        }
    }
    files.sort_by_key(|f| (f.ends_with("manifest.json"), f.clone()));
    for f in &files {
        if !quiet {
            eprintln!("lifeboat: uploading {}", remote.show(f));
        }
        remote
            .put_file(f, &dir.join(f), &mut |_| {})
            .with_context(|| format!("cannot upload {} to OUTPUT_URL", f))?;
    }
    Ok(())
}
