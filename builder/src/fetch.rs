//! `lifeboat fetch-layers`: run by the rescue init once the network is up.
//! Downloads the layers named on the kernel command line
//! (`lifeboat.layers=URL#sha256=HEX,...`) or listed by a `lifeboat serve`
//! (`lifeboat.chain=URL`: this machine's `hosts/<mac>/chain.json`), with
//! retries and resume (HTTP Range), checks each against its sha256 pin and
//! unpacks it over the root, later layers winning. A pin mismatch stops
//! everything before anything of that layer is unpacked.

use anyhow::{bail, Context, Result};
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// What the kernel command line asks for.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Request {
    pub layers: Vec<Pinned>,
    pub chain: Option<String>,
    pub host: Option<String>,
    pub token: Option<String>,
    pub unattended: bool,
    /// Give up after this long without any progress.
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pinned {
    pub name: String,
    pub url: String,
    pub sha256: String,
}

/// `URL#sha256=HEX[&name=NAME]`.
pub fn parse_pinned(s: &str) -> Result<Pinned> {
    let (url, frag) = s.split_once('#').with_context(|| {
        format!(
            "lifeboat.layers: {s} has no #sha256=<hex> pin (every fetched layer must be pinned)"
        )
    })?;
    let field = |k: &str| {
        frag.split('&')
            .find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
    };
    let sha = field("sha256")
        .filter(|h| crate::chain::is_sha256(h))
        .with_context(|| {
            format!("lifeboat.layers: {s}: the pin must be #sha256=<64 lower-case hex digits>")
        })?;
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        bail!("lifeboat.layers: {url} is not an http:// or https:// URL");
    }
    let name = field("name")
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| url.rsplit('/').next().unwrap_or(url))
        .to_string();
    Ok(Pinned {
        name,
        url: url.to_string(),
        sha256: sha.to_string(),
    })
}

pub fn parse_cmdline(text: &str) -> Result<Request> {
    let mut r = Request {
        timeout: Duration::from_secs(300),
        ..Default::default()
    };
    for w in text.split_whitespace() {
        let (k, v) = w.split_once('=').unwrap_or((w, ""));
        match k {
            "lifeboat.layers" => {
                for s in v.split(',').filter(|s| !s.is_empty()) {
                    r.layers.push(parse_pinned(s)?);
                }
            }
            "lifeboat.chain" => {
                let mut u = v.to_string();
                if !u.ends_with('/') {
                    u.push('/');
                }
                r.chain = Some(u);
            }
            "lifeboat.host" => r.host = Some(v.to_string()).filter(|s| !s.is_empty()),
            "lifeboat.token" => r.token = Some(v.to_string()).filter(|s| !s.is_empty()),
            "lifeboat.recover" => r.unattended = matches!(v, "auto" | "yes" | "1"),
            "lifeboat.fetch_timeout" => {
                r.timeout = Duration::from_secs(v.parse().with_context(|| {
                    format!("lifeboat.fetch_timeout={v} is not a number of seconds")
                })?)
            }
            _ => {}
        }
    }
    Ok(r)
}

/// This machine's NICs (`52-54-00-12-34-56`), boot NIC first when known.
fn local_macs(bootif: Option<&str>) -> Vec<String> {
    let mut v: Vec<String> = bootif
        .and_then(|b| crate::chain::mac_alias(b.strip_prefix("01-").unwrap_or(b)))
        .into_iter()
        .collect();
    if let Ok(rd) = std::fs::read_dir("/sys/class/net") {
        let mut names: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        names.sort();
        for p in names {
            let Ok(a) = std::fs::read_to_string(p.join("address")) else {
                continue;
            };
            if let Some(m) = crate::chain::mac_alias(a.trim()) {
                if m != "00-00-00-00-00-00" && !v.contains(&m) {
                    v.push(m);
                }
            }
        }
    }
    v
}

struct Client {
    agent: ureq::Agent,
    token: Option<String>,
}

impl Client {
    fn get(&self, url: &str) -> ureq::Request {
        let r = self.agent.get(url);
        match &self.token {
            Some(t) => r.set("Authorization", &format!("Bearer {t}")),
            None => r,
        }
    }
}

/// Ask for the host's token on the console (interactive boots only).
fn ask_token(host: &str) -> Option<String> {
    if unsafe { libc::isatty(0) } != 1 {
        return None;
    }
    eprint!("lifeboat: the server wants host {host}'s token (mkrescue stored it in /var/lib/lifeboat/serve/ on that host); token: ");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).ok()?;
    Some(line.trim().to_string()).filter(|s| !s.is_empty())
}

fn human(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", n as f64 / 1024.0)
    }
}

enum Got {
    Done,
    /// The server refused us (401/403).
    Refused(String),
}

/// Download `p` to `part` (resuming what is there) until complete.
fn download(c: &Client, p: &Pinned, part: &Path, timeout: Duration) -> Result<Got> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(part)
        .with_context(|| format!("cannot write {}", part.display()))?;
    let mut last_progress = Instant::now();
    let mut backoff = Duration::from_secs(1);
    let mut etag: Option<String> = None;
    loop {
        let have = f.metadata()?.len();
        let mut req = c.get(&p.url);
        if have > 0 {
            req = req.set("Range", &format!("bytes={have}-"));
            if let Some(t) = &etag {
                req = req.set("If-Range", t);
            }
            eprintln!("lifeboat: resuming {} at byte {have}", p.name);
        }
        let failure = match req.call() {
            Ok(resp) => {
                if resp.header("ETag").is_some() {
                    etag = resp.header("ETag").map(str::to_string);
                }
                let status = resp.status();
                if status == 200 && have > 0 {
                    // The server sent it whole: start over.
                    f.set_len(0)?;
                    f.seek(std::io::SeekFrom::Start(0))?;
                } else if status == 206 {
                    let start = resp
                        .header("Content-Range")
                        .and_then(|v| v.strip_prefix("bytes "))
                        .and_then(|v| v.split('-').next())
                        .and_then(|v| v.parse::<u64>().ok());
                    if start != Some(have) {
                        bail!(
                            "{}: the server answered a resume at byte {have} with Content-Range {:?}",
                            p.url,
                            resp.header("Content-Range")
                        );
                    }
                }
                let total = resp
                    .header("Content-Length")
                    .and_then(|v| v.parse::<u64>().ok());
                let mut r = resp.into_reader();
                let mut buf = vec![0u8; 128 * 1024];
                let mut got = 0u64;
                let res: std::io::Result<()> = loop {
                    match r.read(&mut buf) {
                        Ok(0) => break Ok(()),
                        Ok(n) => {
                            f.write_all(&buf[..n])?;
                            got += n as u64;
                            last_progress = Instant::now();
                            backoff = Duration::from_secs(1);
                        }
                        Err(e) => break Err(e),
                    }
                };
                match (res, total) {
                    (Ok(()), Some(t)) if got < t => {
                        format!("the connection ended after {got} of {t} bytes")
                    }
                    (Ok(()), _) => return Ok(Got::Done),
                    (Err(e), _) => format!("interrupted after {} bytes: {e}", have + got),
                }
            }
            Err(ureq::Error::Status(code @ (401 | 403), r)) => {
                return Ok(Got::Refused(format!(
                    "HTTP {code}: {}",
                    r.into_string().unwrap_or_default().trim()
                )))
            }
            Err(ureq::Error::Status(416, _)) if have > 0 => return Ok(Got::Done),
            Err(ureq::Error::Status(code @ (404 | 410), _)) => bail!(
                "{}: HTTP {code}: the server has no such layer (was the host registered again since this boot started? reboot to get the current list)",
                p.url
            ),
            Err(ureq::Error::Status(code, r)) => {
                format!("HTTP {code} {}", r.status_text())
            }
            Err(e) => e.to_string(),
        };
        if last_progress.elapsed() > timeout {
            bail!(
                "{}: no progress for {} s ({failure}); check the network and that the server runs (lifeboat.fetch_timeout= sets the limit)",
                p.url,
                timeout.as_secs()
            );
        }
        eprintln!(
            "lifeboat: {}: {failure}; retrying in {} s",
            p.name,
            backoff.as_secs()
        );
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

fn sha256_of(p: &Path) -> Result<String> {
    crate::image::sha256_file(p)
}

/// Resolve the list of layers: the pinned ones from the command line, or
/// the host's `chain.json` from the server.
fn resolve(req: &Request, c: &Client, bootif: Option<&str>) -> Result<(Vec<Pinned>, String)> {
    if !req.layers.is_empty() {
        // A personal layer's URL names its host: …/hosts/<id>/….
        let from_url = req.layers.iter().find_map(|p| {
            let (_, rest) = p.url.split_once("/hosts/")?;
            rest.split('/').next().map(str::to_string)
        });
        let host = req
            .host
            .clone()
            .or(from_url)
            .unwrap_or_else(|| "this host".into());
        return Ok((req.layers.clone(), host));
    }
    let base = req
        .chain
        .as_deref()
        .context("neither lifeboat.layers= nor lifeboat.chain= is on the kernel command line")?;
    let ids: Vec<String> = match &req.host {
        Some(h) => vec![h.clone()],
        None => local_macs(bootif),
    };
    if ids.is_empty() {
        bail!("lifeboat.chain: this machine has no network card with a MAC address; boot with lifeboat.host=<id>");
    }
    let t = Instant::now();
    let mut backoff = Duration::from_secs(1);
    loop {
        let mut last = String::new();
        let mut all_404 = true;
        for id in &ids {
            let url = format!("{base}hosts/{id}/chain.json");
            match c.get(&url).call() {
                Ok(r) => {
                    let info: crate::chain::ChainInfo = serde_json::from_reader(r.into_reader())
                        .with_context(|| format!("{url} is not a chain description"))?;
                    eprintln!("lifeboat: {url}: host {} (kernel {})", info.host, info.kver);
                    let running = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
                    if !running.trim().is_empty() && running.trim() != info.kver {
                        eprintln!(
                            "lifeboat: note: host {} was registered with kernel {}, this medium runs {}; its modules stay this medium's",
                            info.host,
                            info.kver,
                            running.trim()
                        );
                    }
                    let v = info
                        .fetch
                        .iter()
                        .map(|f| Pinned {
                            name: f.name.clone(),
                            url: format!("{base}{}", f.url),
                            sha256: f.sha256.clone(),
                        })
                        .collect();
                    return Ok((v, info.host));
                }
                Err(ureq::Error::Status(404, _)) => {
                    last = format!("{url}: not registered");
                }
                Err(ureq::Error::Status(code @ (401 | 403), r)) => bail!(
                    "{url}: HTTP {code}: {}: boot with lifeboat.token=<the host's token> (mkrescue stored it in /var/lib/lifeboat/serve/ on that host)",
                    r.into_string().unwrap_or_default().trim()
                ),
                Err(ureq::Error::Status(code, r)) => {
                    all_404 = false;
                    last = format!("{url}: HTTP {code} {}", r.into_string().unwrap_or_default().trim());
                }
                Err(e) => {
                    all_404 = false;
                    last = format!("{url}: {e}");
                }
            }
        }
        if all_404 {
            bail!(
                "no rescue system is registered at {base} for this machine (tried {}); run mkrescue with OUTPUT_URL = \"lifeboat+{base}\" on it, or boot with lifeboat.host=<id>",
                ids.join(", ")
            );
        }
        if t.elapsed() > req.timeout {
            bail!("{last}; gave up after {} s", req.timeout.as_secs());
        }
        eprintln!("lifeboat: {last}; retrying in {} s", backoff.as_secs());
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Download layer `p` into `state` (resuming a partial download) unless it
/// is there already, and check it against its pin. Returns the file.
fn fetch_one(
    c: &mut Client,
    p: &Pinned,
    state: &Path,
    req: &Request,
    host: &str,
) -> Result<std::path::PathBuf> {
    let part = state.join(format!("{}.part", p.sha256));
    let full = state.join(format!("{}.layer", p.sha256));
    if full.is_file() {
        return Ok(full);
    }
    let t = Instant::now();
    eprintln!("lifeboat: fetching {} from {}", p.name, p.url);
    let mut asked = 0;
    loop {
        match download(c, p, &part, req.timeout)? {
            Got::Done => break,
            Got::Refused(why) => {
                let _ = std::fs::remove_file(&part);
                let msg = format!(
                    "{}: the server refused {} ({why})",
                    p.url,
                    if c.token.is_some() {
                        "host ".to_string() + host + "'s token"
                    } else {
                        "a request without a token".into()
                    }
                );
                if !req.unattended && asked < 3 {
                    if let Some(t) = ask_token(host) {
                        eprintln!("lifeboat: {msg}");
                        c.token = Some(t);
                        asked += 1;
                        continue;
                    }
                }
                bail!(
                    "{msg}: boot with lifeboat.token=<host {host}'s token> (mkrescue stored it in /var/lib/lifeboat/serve/ on that host)"
                );
            }
        }
    }
    let got = sha256_of(&part)?;
    if got != p.sha256 {
        let _ = std::fs::remove_file(&part);
        bail!(
            "layer {} from {}: its sha256 is {got}, the pin says {}: refusing it (nothing of it was unpacked). \
             The server's copy differs from the registered one: register the host again, then reboot",
            p.name,
            p.url,
            p.sha256
        );
    }
    std::fs::rename(&part, &full)?;
    let size = std::fs::metadata(&full)?.len();
    eprintln!(
        "lifeboat: {} ({}) verified, sha256 {} ({:.1} s)",
        p.name,
        human(size),
        &p.sha256[..16],
        t.elapsed().as_secs_f64()
    );
    Ok(full)
}

/// Fetch, check and unpack everything `req` names into `dest`, keeping
/// partial downloads in `state` (so a second run resumes too).
pub fn run(
    req: &Request,
    dest: &Path,
    state: &Path,
    bootif: Option<&str>,
    ca: Option<&Path>,
) -> Result<Vec<String>> {
    std::fs::create_dir_all(state).with_context(|| format!("cannot create {}", state.display()))?;
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(10))
        .timeout_read(Duration::from_secs(20));
    let agent = match ca {
        Some(ca) => agent.tls_config(crate::http::tls_with_ca(ca)?),
        None => agent,
    }
    .build();
    let mut c = Client {
        agent,
        token: req.token.clone(),
    };
    let (list, host) = resolve(req, &c, bootif)?;
    let is_plan = |p: &Pinned| p.name == "personal" || p.name == "plan";
    // An image built with a signing key takes only the plan its key
    // signed, and only the shared layers that plan names: the plan is
    // fetched and checked first, before anything is unpacked.
    let key = crate::signing::image_key(dest)?;
    let mut signed: Option<crate::signing::SignedLayers> = None;
    if let Some(key) = &key {
        for p in list.iter().filter(|p| is_plan(p)) {
            let full = fetch_one(&mut c, p, state, req, &host)?;
            let what = format!("the {} layer of host {host} ({})", p.name, p.url);
            let checked = crate::signing::layer_entries(&full)
                .with_context(|| format!("{what} is not a readable archive"))
                .and_then(|e| {
                    // From a chain: the server's name for this host,
                    // which the signed plan must carry.
                    let id = req.chain.as_ref().map(|_| host.as_str());
                    crate::signing::check_layer(key, &e, id, &what)
                });
            match checked {
                Ok(layers) => {
                    eprintln!(
                        "lifeboat: {} signature verified (key {})",
                        p.name,
                        crate::signing::fingerprint(key)
                    );
                    signed.get_or_insert_with(Default::default).extend(layers);
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&full);
                    return Err(e);
                }
            }
        }
        if signed.as_ref().is_some_and(|s| s.is_empty()) {
            eprintln!("lifeboat: note: the signed plan does not name its shared layers (built by an older lifeboat): they are checked against their pins only");
        }
    }
    let mut done = Vec::new();
    // Each layer is unpacked once it is checked, in order: a bad pin
    // stops before anything of that layer (or a later one) is unpacked,
    // while the layers before it (the tools: a shell) stay usable.
    for p in &list {
        if let (Some(s), false) = (&signed, is_plan(p)) {
            crate::signing::check_pin(s, &p.name, &p.sha256, &p.url)?;
        }
        let full = fetch_one(&mut c, p, state, req, &host)?;
        let comp = crate::compress::detect(&full)?;
        let f = std::fs::File::open(&full)?;
        let dec = crate::compress::decoder(std::io::BufReader::new(f), comp)?;
        let n = crate::image::unpack_archive(dec, &format!("layer {} ({})", p.name, p.url), dest)?;
        // The rescue system lives in RAM: the archive goes once unpacked.
        let _ = std::fs::remove_file(&full);
        eprintln!("lifeboat: {} unpacked ({n} entries)", p.name);
        done.push(p.name.clone());
    }
    // Kept for the rescue system's own look-ups (it is not a secret).
    let _ = std::fs::write(state.join("host"), format!("{host}\n"));
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_names_pinned_layers() {
        let h = "a".repeat(64);
        let r = parse_cmdline(&format!(
            "console=ttyS0 lifeboat.layers=http://10.0.2.2:8080/layers/{h}#sha256={h},https://s/hosts/x/personal.cpio.zst#sha256={h} lifeboat.token=T lifeboat.recover=auto"
        ))
        .unwrap();
        assert_eq!(r.layers.len(), 2);
        assert_eq!(r.layers[1].name, "personal.cpio.zst");
        let named =
            parse_cmdline(&format!("lifeboat.layers=http://s/l#sha256={h}&name=tools")).unwrap();
        assert_eq!(
            (
                named.layers[0].name.as_str(),
                named.layers[0].sha256.as_str()
            ),
            ("tools", h.as_str())
        );
        assert_eq!(r.layers[0].url, format!("http://10.0.2.2:8080/layers/{h}"));
        assert_eq!(r.token.as_deref(), Some("T"));
        assert!(r.unattended);
        let e = parse_cmdline("lifeboat.layers=http://s/x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no #sha256=<hex> pin"), "{e}");
        assert!(parse_cmdline("lifeboat.layers=http://s/x#sha256=abc").is_err());
        assert!(parse_cmdline(&format!("lifeboat.layers=ftp://s/x#sha256={h}")).is_err());
        let r = parse_cmdline("lifeboat.chain=http://s:1 lifeboat.fetch_timeout=5").unwrap();
        assert_eq!(r.chain.as_deref(), Some("http://s:1/"));
        assert_eq!(r.timeout, Duration::from_secs(5));
    }
}
