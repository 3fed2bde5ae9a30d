//! `lifeboat serve` (the fleet server) and `lifeboat fetch-layers` (run by
//! the rescue init to load chained layers).

use crate::Global;
use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory holding layers/, hosts/, boot.ipxe and access.log.
    #[arg(long, value_name = "DIR")]
    pub root: PathBuf,
    /// Address to listen on.
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:8080")]
    pub listen: String,
    /// TLS certificate chain (PEM); with --tls-key serves HTTPS.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Base URL written into the static files for a stock web server
    /// (default: the URL the registering host used).
    #[arg(long, value_name = "URL")]
    pub public_url: Option<String>,
    /// File holding the secret a new host must present to register
    /// (serve_enroll_token_file on the hosts). Without it anyone may register.
    #[arg(long, value_name = "FILE")]
    pub enroll_token_file: Option<PathBuf>,
    /// PEM certificates put into every personal layer
    /// (/etc/lifeboat/ca-bundle.pem in the rescue system).
    #[arg(long, value_name = "FILE")]
    pub ca_bundle: Option<PathBuf>,
    /// Connections served at once; more get 503 and retry.
    #[arg(long, default_value_t = 64)]
    pub max_connections: usize,
    /// Bytes per second per download (0: unlimited).
    #[arg(long, default_value_t = 0)]
    pub max_rate: u64,
    /// Seconds running downloads may finish after SIGTERM/SIGINT.
    #[arg(long, default_value_t = 10)]
    pub grace: u64,
    /// Do not serve: list the registered hosts (with --json as JSON).
    #[arg(long, group = "admin")]
    pub list: bool,
    /// With --list: JSON.
    #[arg(long, requires = "list")]
    pub json: bool,
    /// Do not serve: forget host ID (plan, secrets, token, MAC links).
    #[arg(long, value_name = "ID", group = "admin")]
    pub remove: Option<String>,
    /// Do not serve: give host ID a new token and print it (the old one stops working).
    #[arg(long, value_name = "ID", group = "admin")]
    pub new_token: Option<String>,
    /// Do not serve: delete layers no registered host uses (older than an hour).
    #[arg(long, group = "admin")]
    pub gc: bool,
    /// With --remove or --gc: name what would be deleted, delete nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub fn run(g: &Global, a: Args) -> Result<()> {
    if a.list {
        let hosts = crate::serve::hosts(&a.root)?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&hosts)?);
        } else {
            println!(
                "{:<24} {:<20} {:>6} {:<20} MACs",
                "host", "kernel", "layers", "registered (UTC)"
            );
            for h in &hosts {
                let when = crate::bootdisk::utc_stamp(h.registered);
                println!(
                    "{:<24} {:<20} {:>6} {:<20} {}",
                    h.id,
                    h.kver,
                    h.layers.len(),
                    when,
                    h.macs.join(" ")
                );
            }
        }
        return Ok(());
    }
    if a.dry_run && a.remove.is_none() && !a.gc {
        anyhow::bail!(
            "--dry-run goes with --remove ID or --gc; nothing else here deletes anything"
        );
    }
    if let Some(id) = &a.remove {
        let gone = crate::serve::remove(&a.root, id, a.dry_run)?;
        if a.dry_run {
            for p in &gone {
                println!("would remove {}", p.display());
            }
            println!("dry run: host {id} was not removed");
        } else if !g.quiet {
            println!("host {id} removed (its layers stay until --gc)");
        }
        return Ok(());
    }
    if let Some(id) = &a.new_token {
        let t = crate::serve::new_token(&a.root, id)?;
        println!("{t}");
        if !g.quiet {
            eprintln!("lifeboat serve: host {id} has a new token; put it where its boot gets it, and into /var/lib/lifeboat/serve/ on the host for its next registration");
        }
        return Ok(());
    }
    if a.gc {
        let unused = crate::serve::gc(&a.root, a.dry_run)?;
        let bytes: u64 = unused.iter().map(|(_, b)| b).sum();
        if a.dry_run {
            for (name, b) in &unused {
                println!("would remove layers/{name} ({b} bytes)");
            }
            println!(
                "dry run: {} unused layer(s), {bytes} bytes, were not removed",
                unused.len()
            );
        } else if !g.quiet {
            println!("removed {} unused layer(s), {bytes} bytes", unused.len());
        }
        return Ok(());
    }
    let enroll = match &a.enroll_token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("--enroll-token-file: cannot read {}", f.display()))?
                .trim()
                .to_string(),
        )
        .filter(|s| !s.is_empty())
        .with_context(|| format!("--enroll-token-file: {} is empty", f.display()))
        .map(Some)?,
        None => None,
    };
    if let Some(u) = &a.public_url {
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            anyhow::bail!("--public-url {u:?} is not an http:// or https:// URL");
        }
    }
    crate::serve::run(crate::serve::Options {
        root: a.root,
        listen: a.listen,
        tls: a.tls_cert.zip(a.tls_key),
        public_url: a
            .public_url
            .map(|u| if u.ends_with('/') { u } else { u + "/" }),
        enroll_token: enroll,
        ca_bundle: a.ca_bundle,
        max_connections: a.max_connections.max(1),
        max_rate: a.max_rate,
        grace: a.grace,
        quiet: g.quiet,
    })
}

#[derive(Debug, clap::Args)]
pub struct FetchArgs {
    /// Kernel command line to read lifeboat.layers/chain/token/host from.
    #[arg(long, value_name = "FILE", default_value = "/proc/cmdline")]
    pub cmdline: PathBuf,
    /// Root to unpack into.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub dest: PathBuf,
    /// Where partial downloads are kept (a second run resumes them).
    #[arg(long, value_name = "DIR", default_value = "/run/lifeboat/layers")]
    pub state: PathBuf,
    /// CA certificates (PEM) trusted for https:// besides the public roots
    /// (default: /etc/lifeboat/ca-bundle.pem when present).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

pub fn fetch(_g: &Global, a: FetchArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.cmdline)
        .with_context(|| format!("cannot read {}", a.cmdline.display()))?;
    let req = crate::fetch::parse_cmdline(&text)?;
    let bootif = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("BOOTIF="))
        .map(str::to_string);
    let ca = a.ca_file.or_else(|| {
        let p = a.dest.join("etc/lifeboat/ca-bundle.pem");
        p.is_file().then_some(p)
    });
    let done = crate::fetch::run(&req, &a.dest, &a.state, bootif.as_deref(), ca.as_deref())?;
    eprintln!(
        "lifeboat: {} layer(s) loaded: {}",
        done.len(),
        done.join(", ")
    );
    Ok(())
}
