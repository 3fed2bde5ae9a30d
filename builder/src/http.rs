//! HTTP(S) backup storage: `BACKUP_URL=http(s)://host[:port]/path`.
//!
//! Restore streams each volume with a GET (checked against its sha256 while
//! it flows into tar); the pre-flight asks for sizes with HEAD and reads the
//! first and last volume. Backups are uploaded with PUT (WebDAV: parent
//! collections are made with MKCOL first), the manifest last, so an
//! interrupted upload leaves the previous manifest in force.
//!
//! User and password, when the server wants them (Basic auth), come from a
//! credentials file (`username=`/`password=` lines); they are never part of
//! the URL, the image (unless configured) or any message.

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::Path;
use std::time::Duration;

/// One HTTP directory (a base URL ending in `/`).
#[derive(Clone)]
pub struct Remote {
    base: String,
    agent: ureq::Agent,
    auth: Option<String>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Remote({})", self.base)
    }
}

const TRIES: u32 = 3;

fn basic_auth(c: &crate::url::Credentials) -> String {
    // RFC 7617: base64 of "user:password".
    let raw = format!("{}:{}", c.username, c.password);
    let t = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::from("Basic ");
    for ch in raw.as_bytes().chunks(3) {
        let b = [ch[0], *ch.get(1).unwrap_or(&0), *ch.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= ch.len() {
                out.push(t[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A TLS client configuration trusting the public roots and the CA
/// certificates in `ca` (PEM).
pub(crate) fn tls_with_ca(ca: &Path) -> Result<std::sync::Arc<rustls::ClientConfig>> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let mut n = 0;
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("backup_ca_file: cannot read {}", ca.display()))?
    {
        let c = c.with_context(|| format!("backup_ca_file: {} is not PEM", ca.display()))?;
        roots.add(c).with_context(|| {
            format!(
                "backup_ca_file: a certificate in {} is not usable",
                ca.display()
            )
        })?;
        n += 1;
    }
    if n == 0 {
        bail!("backup_ca_file: {} holds no certificate", ca.display());
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(std::sync::Arc::new(cfg))
}

/// A TLS failure that retrying cannot fix.
fn is_tls_trust(e: &str) -> bool {
    let e = e.to_ascii_lowercase();
    e.contains("certificate") || e.contains("unknownissuer")
}

/// What to do about an HTTP error status.
fn status_hint(code: u16) -> &'static str {
    match code {
        401 | 403 => " (check backup_credentials and the server's access rules)",
        405 | 501 => " (the server does not accept this method: enable PUT and MKCOL, e.g. nginx `dav_methods PUT MKCOL;`)",
        409 => " (the parent collection is missing: enable MKCOL or nginx `create_full_put_path on;`)",
        413 => " (raise the server's upload limit, e.g. nginx `client_max_body_size 0;`, or set backup_volume_size)",
        _ => "",
    }
}

impl Remote {
    /// `url` is `http://…` or `https://…`; `credentials` a mount.cifs
    /// style file for Basic auth; `ca_file` PEM certificates of a private
    /// CA trusted besides the public web PKI roots.
    pub fn new(url: &str, credentials: Option<&Path>, ca_file: Option<&Path>) -> Result<Remote> {
        crate::url::NetUrl::parse(url)?
            .filter(|n| n.scheme == "http" || n.scheme == "https")
            .with_context(|| format!("{url:?} is not an http:// or https:// URL"))?;
        let auth = credentials
            .map(crate::url::Credentials::from_file)
            .transpose()?
            .map(|c| basic_auth(&c));
        let mut builder = ureq::AgentBuilder::new();
        if let Some(ca) = ca_file {
            builder = builder.tls_config(tls_with_ca(ca)?);
        }
        let agent = builder
            .timeout_connect(Duration::from_secs(15))
            .timeout_read(Duration::from_secs(120))
            .timeout_write(Duration::from_secs(120))
            .build();
        let mut base = url.to_string();
        if !base.ends_with('/') {
            base.push('/');
        }
        Ok(Remote { base, agent, auth })
    }

    /// The directory `rel` below this one.
    pub fn join(&self, rel: &str) -> Remote {
        let mut r = self.clone();
        r.base = self.url(rel);
        if !r.base.ends_with('/') {
            r.base.push('/');
        }
        r
    }

    pub fn url(&self, rel: &str) -> String {
        let enc: Vec<String> = rel
            .split('/')
            .map(|c| {
                c.bytes()
                    .map(|b| {
                        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                            (b as char).to_string()
                        } else {
                            format!("%{b:02X}")
                        }
                    })
                    .collect()
            })
            .collect();
        format!("{}{}", self.base, enc.join("/"))
    }

    fn req(&self, method: &str, rel: &str) -> ureq::Request {
        let r = self.agent.request(method, &self.url(rel));
        match &self.auth {
            Some(a) => r.set("Authorization", a),
            None => r,
        }
    }

    /// Run a request, retrying transport errors; `Ok(None)` for 404.
    fn call(&self, method: &str, rel: &str) -> Result<Option<ureq::Response>> {
        self.retrying(method, rel, || {
            self.req(method, rel).call().map_err(Box::new)
        })
    }

    /// `send` up to [`TRIES`] times while the transport fails; an HTTP
    /// error status or an untrusted certificate is final; `Ok(None)` for 404.
    fn retrying(
        &self,
        method: &str,
        rel: &str,
        mut send: impl FnMut() -> std::result::Result<ureq::Response, Box<ureq::Error>>,
    ) -> Result<Option<ureq::Response>> {
        let mut last = String::new();
        for attempt in 1..=TRIES {
            match send().map_err(|e| *e) {
                Ok(r) => return Ok(Some(r)),
                Err(ureq::Error::Status(404, _)) => return Ok(None),
                Err(ureq::Error::Status(code, r)) => {
                    let hint = status_hint(code);
                    bail!(
                        "{method} {} failed: HTTP {code} {}{hint}",
                        self.url(rel),
                        r.status_text()
                    );
                }
                Err(e) => {
                    last = e.to_string();
                    if is_tls_trust(&last) {
                        bail!(
                            "{method} {} failed: {last} (the server's certificate is not trusted: give its CA in backup_ca_file)",
                            self.url(rel)
                        );
                    }
                    if attempt < TRIES {
                        std::thread::sleep(Duration::from_secs(attempt as u64 * 2));
                    }
                }
            }
        }
        bail!(
            "{method} {} failed after {TRIES} tries: {last} (check the network and that the server runs)",
            self.url(rel)
        )
    }

    /// The body of `rel`, streaming; `None` when the server has no such file.
    pub fn get(&self, rel: &str) -> Result<Option<Box<dyn Read + Send>>> {
        Ok(self
            .call("GET", rel)?
            .map(|r| Box::new(r.into_reader()) as Box<dyn Read + Send>))
    }

    /// Size of `rel` from a HEAD request; `None` when it does not exist.
    pub fn size(&self, rel: &str) -> Result<Option<u64>> {
        let Some(r) = self.call("HEAD", rel)? else {
            return Ok(None);
        };
        let n = r
            .header("Content-Length")
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| {
                format!("HEAD {}: the server sent no Content-Length", self.url(rel))
            })?;
        Ok(Some(n))
    }

    /// Make the collection `rel_dir` and its parents (WebDAV MKCOL; "already
    /// there" answers are fine).
    pub fn mkcol(&self, rel_dir: &str) -> Result<()> {
        let mut acc = String::new();
        for c in rel_dir.split('/').filter(|c| !c.is_empty()) {
            acc.push_str(c);
            acc.push('/');
            match self.req("MKCOL", &acc).call() {
                Ok(_) | Err(ureq::Error::Status(405 | 409, _)) => {}
                // Servers without WebDAV collections (plain PUT with
                // create_full_put_path) answer otherwise; PUT will tell.
                Err(ureq::Error::Status(_, _)) => {}
                Err(e) => bail!("MKCOL {} failed: {e}", self.url(&acc)),
            }
        }
        Ok(())
    }

    /// Upload the local file `src` as `rel` (its parents are made first).
    pub fn put_file(&self, rel: &str, src: &Path, progress: &mut dyn FnMut(u64)) -> Result<()> {
        if let Some((d, _)) = rel.rsplit_once('/') {
            self.mkcol(d)?;
        }
        let len = std::fs::metadata(src)
            .with_context(|| format!("cannot read {}", src.display()))?
            .len();
        struct Counting<'a> {
            f: std::fs::File,
            cb: &'a mut dyn FnMut(u64),
        }
        impl Read for Counting<'_> {
            fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
                let n = self.f.read(b)?;
                (self.cb)(n as u64);
                Ok(n)
            }
        }
        let put = self.retrying("PUT", rel, || {
            let f = std::fs::File::open(src).map_err(|e| Box::new(ureq::Error::from(e)))?;
            let body = Counting {
                f,
                cb: &mut *progress,
            };
            self.req("PUT", rel)
                .set("Content-Length", &len.to_string())
                .send(body)
                .map_err(Box::new)
        })?;
        if put.is_none() {
            bail!(
                "PUT {} failed: HTTP 404 (the server has no such directory: enable WebDAV MKCOL or nginx `create_full_put_path on;`)",
                self.url(rel)
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_is_rfc7617() {
        let c = crate::url::Credentials::parse("username=Aladdin\npassword=open sesame\n").unwrap();
        assert_eq!(basic_auth(&c), "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
        let c = crate::url::Credentials::parse("username=ab\npassword=c\n").unwrap();
        assert_eq!(basic_auth(&c), "Basic YWI6Yw==");
    }

    #[test]
    fn urls_are_escaped_and_joined() {
        let r = Remote::new("http://10.0.2.2:8080/backups", None, None).unwrap();
        assert_eq!(
            r.url("a b/c.tar"),
            "http://10.0.2.2:8080/backups/a%20b/c.tar"
        );
        assert_eq!(
            r.join("host").url("x"),
            "http://10.0.2.2:8080/backups/host/x"
        );
        assert!(Remote::new("nfs://x/y", None, None).is_err());
    }
}
