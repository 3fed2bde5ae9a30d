//! `lifeboat mkrescue`: build the rescue image.

use crate::rescue::{self, BuildInputs};
use crate::Global;
use anyhow::{bail, Result};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output kind (overrides OUTPUT). Supported: initrd.
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
}

pub fn run(g: &Global, a: Args) -> Result<()> {
    run_with(g, a, Vec::new())
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
    if let Some(o) = a.output {
        cfg.output = o;
    }
    let iso = cfg.output.eq_ignore_ascii_case("iso");
    if !cfg.output.eq_ignore_ascii_case("initrd") && !iso {
        bail!(
            "OUTPUT = {:?} is not supported by this version; supported: initrd, ISO",
            cfg.output
        );
    }
    if let Some(m) = a.modules {
        cfg.rescue.modules = m;
    }
    if let Some(c) = a.compression {
        cfg.rescue.compression = c;
    }
    // Keeps a usb:// medium mounted while the image is written.
    let mut _medium = None;
    let output_dir = match a.output_dir {
        Some(d) => d,
        None => {
            let l = crate::url::local(&cfg.output_url, "OUTPUT_URL")?;
            let p = l.path.clone();
            _medium = Some(l);
            p
        }
    };
    let inp = BuildInputs {
        kernel: a.kernel,
        kver: a.kver,
        modules_dir: a.modules_dir,
        output_dir: output_dir.clone(),
        use_cache: !a.no_cache,
        root: PathBuf::from("/"),
        plan_files,
    };
    let cfg_text = toml::to_string(&cfg)?;
    let mut report = rescue::build(&cfg, &cfg_text, &inp)?;
    let mut iso_path = None;
    if iso {
        let m = report.manifest.as_ref().unwrap();
        let host = crate::layout::hostname().unwrap_or_else(|| "rescue".into());
        let p = output_dir.join(format!("lifeboat-{host}.iso"));
        let o = crate::iso::IsoOptions {
            label: cfg.iso_volid.clone(),
            default: cfg.iso_default.clone(),
            console: cfg.boot_console.clone(),
            timeout: cfg.boot_timeout,
            cmdline: cfg.kernel_cmdline.clone(),
        };
        report.warnings.extend(crate::iso::write(
            &output_dir,
            &m.kernel,
            &m.initrd,
            &p,
            &o,
        )?);
        iso_path = Some(p);
    }
    for w in &report.warnings {
        if !g.quiet {
            eprintln!("lifeboat: warning: {w}");
        }
    }
    if !g.quiet {
        let m = report.manifest.as_ref().unwrap();
        println!(
            "rescue image for kernel {} written to {}",
            m.kver,
            output_dir.display()
        );
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
        if let Some(p) = &iso_path {
            println!("  ISO (BIOS + UEFI, isohybrid): {}", p.display());
        }
        println!(
            "done in {:.2} s (collecting {:.2} s)",
            report.seconds, report.collect_seconds
        );
    }
    Ok(())
}
