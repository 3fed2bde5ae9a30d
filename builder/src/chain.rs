//! HTTP chaining of rescue images for fleets: what `lifeboat serve` keeps
//! per host, the iPXE scripts and `chain.json` it hands out, and the client
//! side of registration (`OUTPUT_URL = "lifeboat+http(s)://server/"`).
//!
//! A registered host is its kernel and shared layers (content-addressed in
//! the server's `layers/<sha256>`, stored once however many hosts use them)
//! plus its plan layer, which never leaves the host's directory: the
//! server re-packs it with the host's secrets and the server's CA bundle
//! into the personal layer, handed out only against the host's token.

use anyhow::{bail, Context, Result};
use lifeboat_contract::Manifest;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const HOST_SCHEMA_VERSION: u32 = 1;

/// One content-addressed blob of a host: its kernel or a shared layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Blob {
    pub name: String,
    pub sha256: String,
    pub size: u64,
}

/// `hosts/<id>/host.json` on the server: what a registration left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostRecord {
    pub schema_version: u32,
    pub id: String,
    pub kver: String,
    pub kernel: Blob,
    /// Shared layers in load order (the plan layer is not among them).
    pub layers: Vec<Blob>,
    /// sha256 of the plan layer as uploaded.
    pub plan_sha256: String,
    /// Kernel arguments of the host's default boot entry.
    pub cmdline: String,
    /// NICs (lower case, colon separated) the host answers to.
    #[serde(default)]
    pub macs: Vec<String>,
    /// SMBIOS system UUID (lower case).
    #[serde(default)]
    pub uuid: Option<String>,
    /// Unix time of the registration.
    pub registered: u64,
}

/// A layer the rescue init downloads: where, and its pinned sha256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fetch {
    pub name: String,
    /// Relative to the server's base URL.
    pub url: String,
    pub sha256: String,
    pub size: u64,
}

/// `hosts/<id>/chain.json`: what a generic boot medium fetches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainInfo {
    pub schema_version: u32,
    pub host: String,
    pub kver: String,
    /// Loaded by the boot loader (iPXE): kernel, microcode, base, modules.
    pub kernel: Fetch,
    pub boot: Vec<Fetch>,
    /// Loaded by the rescue init after the network is up, in order.
    pub fetch: Vec<Fetch>,
    pub cmdline: String,
}

/// Layers the boot loader loads itself: the init and the drivers to reach
/// the network must be there before anything can be fetched.
pub fn loaded_by_boot_loader(name: &str) -> bool {
    name == "microcode" || name == "base" || name.starts_with("modules-")
}

/// A host id: letters, digits, `.`, `_`, `-`; 1 to 64 characters.
pub fn check_id(id: &str) -> Result<()> {
    if id.is_empty()
        || id.len() > 64
        || id.starts_with('.')
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        bail!("{id:?} is not a usable host id (letters, digits, '.', '_', '-'; at most 64)");
    }
    Ok(())
}

pub fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `52:54:00:12:34:56` (any case, `-` or `:`) as iPXE's `${mac:hexhyp}`: `52-54-00-12-34-56`.
pub fn mac_alias(mac: &str) -> Option<String> {
    let parts: Vec<&str> = mac.split([':', '-']).collect();
    if parts.len() != 6
        || !parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return None;
    }
    Some(parts.join("-").to_ascii_lowercase())
}

impl ChainInfo {
    pub fn of(h: &HostRecord, personal_sha256: &str, personal_size: u64) -> ChainInfo {
        let layer = |b: &Blob| Fetch {
            name: b.name.clone(),
            url: format!("layers/{}", b.sha256),
            sha256: b.sha256.clone(),
            size: b.size,
        };
        let mut fetch: Vec<Fetch> = h
            .layers
            .iter()
            .filter(|l| !loaded_by_boot_loader(&l.name))
            .map(layer)
            .collect();
        fetch.push(Fetch {
            name: "personal".into(),
            url: format!("hosts/{}/personal.cpio.zst", h.id),
            sha256: personal_sha256.to_string(),
            size: personal_size,
        });
        ChainInfo {
            schema_version: HOST_SCHEMA_VERSION,
            host: h.id.clone(),
            kver: h.kver.clone(),
            kernel: layer(&h.kernel),
            boot: h
                .layers
                .iter()
                .filter(|l| loaded_by_boot_loader(&l.name))
                .map(layer)
                .collect(),
            fetch,
            cmdline: h.cmdline.clone(),
        }
    }

    /// The host's iPXE script. `base` is the server's URL ending in `/`;
    /// a token, when given, is passed on to the init.
    pub fn ipxe(&self, base: &str, token: Option<&str>) -> String {
        let mut s = format!(
            "#!ipxe\n# Lifeboat rescue of {} (kernel {}), chained from {base}\n",
            self.host, self.kver
        );
        let pins: Vec<String> = self
            .fetch
            .iter()
            .map(|f| format!("{base}{}#sha256={}&name={}", f.url, f.sha256, f.name))
            .collect();
        let mut args = format!("{} lifeboat.layers={}", self.cmdline.trim(), pins.join(","));
        if let Some(t) = token {
            args.push_str(&format!(" lifeboat.token={t}"));
        }
        let names: Vec<String> = self
            .boot
            .iter()
            .map(|b| format!("initrd={}", b.name))
            .collect();
        s.push_str(&format!(
            "echo Lifeboat: loading the rescue system of {}\n",
            self.host
        ));
        s.push_str(&format!(
            "kernel --name vmlinuz {base}{} {} {}\n",
            self.kernel.url,
            names.join(" "),
            args.trim()
        ));
        for b in &self.boot {
            s.push_str(&format!("initrd --name {} {base}{}\n", b.name, b.url));
        }
        s.push_str("boot\n");
        s
    }
}

/// The generic script every machine can start with: it chains to its own
/// host script by MAC (and SMBIOS UUID), passing the iPXE setting
/// `lifeboat-token` when one is set (e.g. from DHCP or an embedded script).
pub fn generic_ipxe() -> String {
    "#!ipxe\n\
     # Lifeboat: chain to this machine's own rescue system (by MAC, with its SMBIOS UUID)\n\
     isset ${lifeboat-token} && goto with_token || goto without_token\n\
     :without_token\n\
     chain --autofree hosts/${mac:hexhyp}/boot.ipxe?uuid=${uuid} || goto failed\n\
     :with_token\n\
     chain --autofree hosts/${mac:hexhyp}/boot.ipxe?uuid=${uuid}&token=${lifeboat-token:uristring} || goto failed\n\
     :failed\n\
     echo Lifeboat: no rescue system is registered for ${mac} (or its token was refused); run mkrescue with OUTPUT_URL = lifeboat+http://this-server/ on that machine\n\
     shell\n"
        .to_string()
}

/// `lifeboat+http://…` / `lifeboat+https://…` → the server's base URL (ending in `/`).
pub fn server_url(output_url: &str) -> Option<String> {
    let rest = output_url.strip_prefix("lifeboat+")?;
    if !(rest.starts_with("http://") || rest.starts_with("https://")) {
        return None;
    }
    let mut b = rest.to_string();
    if !b.ends_with('/') {
        b.push('/');
    }
    Some(b)
}

/// Where host `id` keeps its token for `server` (mode 0600).
pub fn token_file(state_dir: &Path, server: &str, id: &str) -> PathBuf {
    let name: String = server
        .trim_end_matches('/')
        .split("://")
        .last()
        .unwrap_or(server)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    state_dir.join("serve").join(format!("{name}_{id}.token"))
}

/// What a registration did.
#[derive(Debug, Default)]
pub struct Registered {
    pub uploaded: Vec<String>,
    pub already_there: usize,
    pub token_file: PathBuf,
    pub new_token: bool,
}

/// Register the image built in `dir` (manifest `m`) with the server at
/// `base` as host `id`: upload the layers the server lacks, the plan
/// layer, then the host record; keep the issued token in `state_dir`.
#[allow(clippy::too_many_arguments)]
pub fn register(
    base: &str,
    id: &str,
    dir: &Path,
    m: &Manifest,
    cmdline: &str,
    macs: &[String],
    uuid: Option<String>,
    enroll: Option<&str>,
    ca_file: Option<&Path>,
    state_dir: &Path,
) -> Result<Registered> {
    check_id(id).context("the host id for lifeboat serve (serve_host)")?;
    let agent = agent(ca_file)?;
    let tf = token_file(state_dir, base, id);
    let token = std::fs::read_to_string(&tf)
        .ok()
        .map(|s| s.trim().to_string());
    let auth = |r: ureq::Request| {
        let mut r = r;
        if let Some(t) = &token {
            r = r.set("Authorization", &format!("Bearer {t}"));
        }
        if let Some(e) = enroll {
            r = r.set("X-Lifeboat-Enroll", e);
        }
        r
    };
    let plan = m
        .layers
        .iter()
        .find(|l| l.name == "plan")
        .context("the image has no plan layer")?;
    let mut blobs = vec![(
        Blob {
            name: "kernel".into(),
            sha256: m.kernel_sha256.clone(),
            size: std::fs::metadata(dir.join(&m.kernel))
                .with_context(|| format!("cannot read {}", dir.join(&m.kernel).display()))?
                .len(),
        },
        dir.join(&m.kernel),
    )];
    for l in m.layers.iter().filter(|l| l.name != "plan") {
        blobs.push((
            Blob {
                name: l.name.clone(),
                sha256: l.sha256.clone(),
                size: l.size,
            },
            dir.join(&l.file),
        ));
    }
    let list: String = blobs
        .iter()
        .map(|(b, _)| format!("{}\n", b.sha256))
        .collect();
    let missing = call(
        auth(agent.post(&format!("{base}api/v1/missing"))).send_string(&list),
        base,
    )?
    .into_string()?;
    let missing: Vec<&str> = missing
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let mut out = Registered {
        token_file: tf.clone(),
        ..Default::default()
    };
    for (b, path) in &blobs {
        if !missing.contains(&b.sha256.as_str()) {
            out.already_there += 1;
            continue;
        }
        if out.uploaded.iter().any(|u| u == &b.sha256) {
            continue;
        }
        let f =
            std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        call(
            auth(agent.put(&format!("{base}api/v1/layers/{}", b.sha256)))
                .set("Content-Length", &b.size.to_string())
                .send(f),
            base,
        )
        .with_context(|| format!("cannot upload {} ({})", b.name, path.display()))?;
        out.uploaded.push(b.sha256.clone());
    }
    let pf = dir.join(&plan.file);
    call(
        auth(agent.put(&format!("{base}api/v1/hosts/{id}/plan")))
            .set("Content-Length", &plan.size.to_string())
            .set("X-Lifeboat-Sha256", &plan.sha256)
            .send(
                std::fs::File::open(&pf)
                    .with_context(|| format!("cannot read {}", pf.display()))?,
            ),
        base,
    )
    .context("cannot upload the plan layer")?;
    let rec = HostRecord {
        schema_version: HOST_SCHEMA_VERSION,
        id: id.to_string(),
        kver: m.kver.clone(),
        kernel: blobs[0].0.clone(),
        layers: blobs[1..].iter().map(|(b, _)| b.clone()).collect(),
        plan_sha256: plan.sha256.clone(),
        cmdline: cmdline.to_string(),
        macs: macs
            .iter()
            .filter_map(|m| mac_alias(m))
            .map(|m| m.replace('-', ":"))
            .collect(),
        uuid,
        registered: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let answer: serde_json::Value = call(
        auth(agent.put(&format!("{base}api/v1/hosts/{id}")))
            .set("Content-Type", "application/json")
            .send_string(&serde_json::to_string(&rec)?),
        base,
    )
    .context("cannot register the host")?
    .into_string()
    .map_err(anyhow::Error::from)
    .and_then(|t| Ok(serde_json::from_str(&t)?))
    .context("lifeboat serve's answer to the registration is not JSON")?;
    if let Some(t) = answer.get("token").and_then(|t| t.as_str()) {
        if let Some(p) = tf.parent() {
            std::fs::create_dir_all(p).with_context(|| format!("cannot create {}", p.display()))?;
        }
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tf)
            .with_context(|| format!("cannot write {}", tf.display()))?;
        writeln!(f, "{t}")?;
        out.new_token = true;
    }
    Ok(out)
}

pub(crate) fn agent(ca_file: Option<&Path>) -> Result<ureq::Agent> {
    let mut b = ureq::AgentBuilder::new()
        .timeout_connect(std::time::Duration::from_secs(15))
        .timeout_read(std::time::Duration::from_secs(60))
        .timeout_write(std::time::Duration::from_secs(120));
    if let Some(ca) = ca_file {
        b = b.tls_config(crate::http::tls_with_ca(ca)?);
    }
    Ok(b.build())
}

fn call(r: std::result::Result<ureq::Response, ureq::Error>, base: &str) -> Result<ureq::Response> {
    match r {
        Ok(r) => Ok(r),
        Err(ureq::Error::Status(code, r)) => {
            let body = r.into_string().unwrap_or_default();
            let hint = match code {
                401 | 403 => " (this host's token or the enrollment token was refused: set serve_enroll_token_file, or ask the server's admin to remove the host)",
                507 => " (the server's disk is full)",
                _ => "",
            };
            bail!(
                "lifeboat serve at {base} answered HTTP {code}: {}{hint}",
                body.trim()
            )
        }
        Err(e) => {
            bail!("cannot reach lifeboat serve at {base}: {e} (is `lifeboat serve` running there?)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> HostRecord {
        let b = |n: &str, c: char| Blob {
            name: n.into(),
            sha256: c.to_string().repeat(64),
            size: 10,
        };
        HostRecord {
            schema_version: 1,
            id: "web1".into(),
            kver: "6.1.0-1-amd64".into(),
            kernel: b("kernel", 'a'),
            layers: vec![
                b("base", 'b'),
                b("tools", 'c'),
                b("modules-6.1.0-1-amd64", 'd'),
                b("firmware", 'e'),
            ],
            plan_sha256: "f".repeat(64),
            cmdline: "lifeboat.recover=auto console=ttyS0".into(),
            macs: vec!["52:54:00:12:34:56".into()],
            uuid: None,
            registered: 0,
        }
    }

    #[test]
    fn boot_loader_loads_base_and_modules_the_init_the_rest() {
        let c = ChainInfo::of(&rec(), &"9".repeat(64), 5);
        let boot: Vec<&str> = c.boot.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(boot, ["base", "modules-6.1.0-1-amd64"]);
        let fetch: Vec<&str> = c.fetch.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(fetch, ["tools", "firmware", "personal"]);
        let s = c.ipxe("http://10.0.2.2:8080/", Some("tok"));
        assert!(s.contains(&format!("kernel --name vmlinuz http://10.0.2.2:8080/layers/{} initrd=base initrd=modules-6.1.0-1-amd64 lifeboat.recover=auto", "a".repeat(64))), "{s}");
        assert!(
            s.contains(&format!(
                "lifeboat.layers=http://10.0.2.2:8080/layers/{c64}#sha256={c64}&name=tools,",
                c64 = "c".repeat(64)
            )),
            "{s}"
        );
        assert!(
            s.contains(&format!(
                "http://10.0.2.2:8080/hosts/web1/personal.cpio.zst#sha256={}&name=personal",
                "9".repeat(64)
            )),
            "{s}"
        );
        assert!(s.contains(" lifeboat.token=tok\n"), "{s}");
        assert!(s.trim_end().ends_with("boot"));
        assert!(!c.ipxe("http://x/", None).contains("token"));
    }

    #[test]
    fn ids_macs_and_urls() {
        assert!(check_id("web-1.example_2").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
        assert_eq!(
            mac_alias("52:54:00:AB:34:56").as_deref(),
            Some("52-54-00-ab-34-56")
        );
        assert_eq!(
            mac_alias("52-54-00-ab-34-56").as_deref(),
            Some("52-54-00-ab-34-56")
        );
        assert_eq!(mac_alias("52:54:00:ab:34"), None);
        assert_eq!(
            server_url("lifeboat+http://h:1").as_deref(),
            Some("http://h:1/")
        );
        assert_eq!(server_url("http://h:1/"), None);
        assert_eq!(server_url("lifeboat+ftp://h/"), None);
        assert_eq!(
            token_file(
                Path::new("/var/lib/lifeboat"),
                "https://srv.example:8443/",
                "web1"
            ),
            Path::new("/var/lib/lifeboat/serve/srv.example_8443_web1.token")
        );
    }
}
