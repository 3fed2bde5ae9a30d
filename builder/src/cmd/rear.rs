//! `lifeboat import-rear` (a ReaR configuration as Lifeboat TOML) and
//! `lifeboat validate` (is the configuration usable?).

use crate::Global;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// ReaR configuration files, read in order (default: /etc/rear/site.conf
    /// and /etc/rear/local.conf, those that exist).
    pub files: Vec<PathBuf>,
    /// ReaR's mapping files (ip_addresses, routes, mac, disk_mappings).
    #[arg(long, value_name = "DIR", default_value = crate::rear::DEFAULT_MAPPINGS)]
    pub mappings: PathBuf,
    /// Write the TOML here (and the network.json / disk-mapping made from
    /// the mapping files next to it) instead of printing it.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Overwrite --output when it exists.
    #[arg(long)]
    pub force: bool,
    /// Convert and check, print the TOML and name the files that would be
    /// written or replaced; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print a JSON report (toml, mapped, unmapped, notes) on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn import(g: &Global, a: ImportArgs) -> Result<()> {
    let files: Vec<PathBuf> = if a.files.is_empty() {
        let v: Vec<PathBuf> = crate::rear::DEFAULT_FILES
            .iter()
            .map(PathBuf::from)
            .filter(|p| p.is_file())
            .collect();
        if v.is_empty() {
            bail!(
                "no ReaR configuration found ({}); name the files: lifeboat import-rear /path/to/local.conf",
                crate::rear::DEFAULT_FILES.join(", ")
            );
        }
        v
    } else {
        for f in &a.files {
            if !f.is_file() {
                bail!("{} does not exist or is not a file", f.display());
            }
        }
        a.files.clone()
    };
    if let Some(o) = &a.output {
        if o.exists() && !a.force && !a.dry_run {
            bail!(
                "{} exists; nothing was written (use --force to replace it, or another --output)",
                o.display()
            );
        }
    }
    let ev = crate::rear::evaluate(&files)?;
    let dir = a
        .output
        .as_ref()
        .and_then(|o| o.parent().map(Path::to_path_buf))
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    let abs = |n: &str| std::path::absolute(dir.join(n)).unwrap_or_else(|_| dir.join(n));
    let paths = crate::rear::Paths {
        network_file: abs("rear-network.json"),
        disk_mapping_file: abs("rear-disk-mapping"),
    };
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let header = format!(
        "# Lifeboat configuration imported from ReaR ({}) by `lifeboat import-rear`.\n\
         # Check it with `lifeboat -c FILE validate`; `lifeboat -c FILE dump` shows every value.\n\n",
        names.join(", ")
    );
    let mappings = a.mappings.is_dir().then_some(a.mappings.as_path());
    let im = crate::rear::convert(&ev.vars, mappings, &paths, &header)?;
    // What we write must load: checked before anything is written.
    let tmp = tempfile::NamedTempFile::new()?;
    std::fs::write(tmp.path(), &im.toml)?;
    crate::config::load(&[tmp.path().to_path_buf()])
        .context("internal error: the imported configuration does not load; please report it with the ReaR files")?;
    let side_files = im.network.is_some() || im.disk_mapping.is_some();
    match &a.output {
        Some(o) if a.dry_run => {
            if !a.json {
                print!("{}", im.toml);
            }
            let mut files = vec![o.clone()];
            if im.network.is_some() {
                files.push(paths.network_file.clone());
            }
            if im.disk_mapping.is_some() {
                files.push(paths.disk_mapping_file.clone());
            }
            for f in &files {
                let what = match (f.exists(), a.force) {
                    (false, _) => "would write",
                    (true, true) => "would replace",
                    (true, false) => "exists, would be refused without --force:",
                };
                eprintln!("dry run: {what} {}", f.display());
            }
            eprintln!("dry run: nothing was written");
        }
        Some(o) => {
            write_private(o, im.toml.as_bytes())?;
            if let Some(n) = &im.network {
                write_private(&paths.network_file, &serde_json::to_vec_pretty(n)?)?;
            }
            if let Some(m) = &im.disk_mapping {
                write_private(&paths.disk_mapping_file, m.as_bytes())?;
            }
            if !g.quiet {
                eprintln!("wrote {}", o.display());
                if im.network.is_some() {
                    eprintln!("wrote {}", paths.network_file.display());
                }
                if im.disk_mapping.is_some() {
                    eprintln!("wrote {}", paths.disk_mapping_file.display());
                }
            }
        }
        None if !a.json => {
            print!("{}", im.toml);
            if side_files {
                eprintln!("note: the mapping files make a network.json/disk-mapping file; give --output FILE to write them");
            }
        }
        None => {}
    }
    if a.json {
        let mut v = serde_json::to_value(&im)?;
        v["files"] = serde_json::json!(names);
        v["messages"] = serde_json::json!(ev.messages);
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    if !g.quiet {
        for m in &ev.messages {
            eprintln!("bash: {m}");
        }
        for n in &im.notes {
            eprintln!("note: {n}");
        }
        for u in &im.unmapped {
            eprintln!("not imported: {}={}: {}", u.name, u.value, u.reason);
        }
        eprintln!(
            "{} setting(s) imported, {} not imported",
            im.mapped.len(),
            im.unmapped.len()
        );
    }
    Ok(())
}

fn write_private(p: &Path, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(p)
        .with_context(|| format!("cannot write {}", p.display()))?;
    std::io::Write::write_all(&mut f, data).with_context(|| format!("cannot write {}", p.display()))
}

#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// Print {"ok": bool, "files": [...], "problems": [...]}.
    #[arg(long)]
    pub json: bool,
}

pub fn validate(g: &Global, a: ValidateArgs) -> Result<()> {
    let loaded = g.load_config()?;
    let problems = crate::config::check(&loaded.config);
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "ok": problems.is_empty(),
                "files": loaded.files,
                "problems": problems,
            }))?
        );
    } else if problems.is_empty() {
        if !g.quiet {
            println!(
                "configuration OK ({} file(s): {})",
                loaded.files.len(),
                loaded
                    .files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    } else {
        for p in &problems {
            eprintln!("{p}");
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("{} problem(s) in the configuration", problems.len())
    }
}
