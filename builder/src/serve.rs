//! `lifeboat serve`: hands every registered host an always-current rescue
//! system over HTTP(S): iPXE scripts, content-addressed layers (ETag,
//! Range), and the personal layer, built on request and only for the
//! host's own token.
//!
//! The tree under `--root` is also servable by a stock web server for the
//! static parts (`boot.ipxe`, `layers/`, `hosts/<id>/boot.ipxe`,
//! `hosts/<id>/chain.json`, MAC links): only the personal layer needs this
//! server.
//!
//! A small HTTP/1.1 server of its own (keep-alive, Content-Length bodies,
//! one thread per connection up to `--max-connections`): enough for iPXE,
//! the rescue init and registration, and no framework to trust.

use crate::chain::{self, ChainInfo, HostRecord};
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Options {
    pub root: PathBuf,
    pub listen: String,
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Base URL written into the static files (default: from the
    /// registration request).
    pub public_url: Option<String>,
    /// A secret that first registrations (and re-registrations without the
    /// host's token) must present.
    pub enroll_token: Option<String>,
    /// PEM certificates put into every personal layer.
    pub ca_bundle: Option<PathBuf>,
    pub max_connections: usize,
    /// Bytes per second per download (0: unlimited).
    pub max_rate: u64,
    /// Seconds to let running requests finish after SIGTERM/SIGINT.
    pub grace: u64,
    pub quiet: bool,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

struct Server {
    o: Options,
    log: Mutex<std::fs::File>,
    /// Registration of one host at a time.
    reg: Mutex<()>,
    tls: Option<Arc<rustls::ServerConfig>>,
    scheme: &'static str,
}

/// How long a new connection waits for a slot before it is refused.
const SLOT_WAIT: Duration = Duration::from_secs(1);
/// At most this many TLS refusals (handshake, then 503) at once.
const MAX_REFUSING: usize = 8;

/// One of a bounded number of places, counted in `n`, held until dropped.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(n: &Arc<AtomicUsize>) -> Slot {
        n.fetch_add(1, Ordering::SeqCst);
        Slot(n.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// Start serving; returns after a graceful shutdown (SIGTERM/SIGINT).
pub fn run(o: Options) -> Result<()> {
    for d in ["layers", "hosts", "tmp"] {
        std::fs::create_dir_all(o.root.join(d))
            .with_context(|| format!("cannot create {}", o.root.join(d).display()))?;
    }
    // Uploads cut off by a crash.
    if let Ok(rd) = std::fs::read_dir(o.root.join("tmp")) {
        for e in rd.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    std::fs::write(o.root.join("boot.ipxe"), chain::generic_ipxe())
        .with_context(|| format!("cannot write into --root {}", o.root.display()))?;
    let tls = match &o.tls {
        Some((c, k)) => Some(tls_config(c, k)?),
        None => None,
    };
    let listener = TcpListener::bind(&o.listen).with_context(|| {
        format!(
            "cannot listen on {} (in use? another lifeboat serve? use --listen ADDR:PORT)",
            o.listen
        )
    })?;
    listener.set_nonblocking(true)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(o.root.join("access.log"))
        .with_context(|| format!("cannot open {}", o.root.join("access.log").display()))?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let addr = listener.local_addr()?;
    if !o.quiet {
        eprintln!(
            "lifeboat serve: {} on {scheme}://{addr}/ (root {}, at most {} connections{})",
            if tls.is_some() { "TLS" } else { "plain HTTP" },
            o.root.display(),
            o.max_connections,
            if o.max_rate > 0 {
                format!(", {} bytes/s per download", o.max_rate)
            } else {
                String::new()
            }
        );
        if tls.is_none() {
            eprintln!("lifeboat serve: warning: plain HTTP: tokens and personal layers cross the network unencrypted; use --tls-cert/--tls-key outside a lab");
        }
        if o.enroll_token.is_none() {
            eprintln!("lifeboat serve: warning: no --enroll-token-file: any machine that reaches this server can register a new host");
        }
    }
    unsafe {
        libc::signal(
            libc::SIGTERM,
            on_signal as extern "C" fn(libc::c_int) as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGINT,
            on_signal as extern "C" fn(libc::c_int) as *const () as libc::sighandler_t,
        );
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let srv = Arc::new(Server {
        o,
        log: Mutex::new(log),
        reg: Mutex::new(()),
        tls,
        scheme,
    });
    let active = Arc::new(AtomicUsize::new(0));
    let refusing = Arc::new(AtomicUsize::new(0));
    let mut last_refusal: Option<Instant> = None;
    while !STOP.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((s, peer)) => {
                let _ = s.set_nonblocking(false);
                // A connection that is just closing (a client that gave up
                // on the handshake) frees its slot within moments: wait that
                // long before refusing, unless the server is refusing
                // already (then every waiter would hold up the next).
                let full = Instant::now();
                while active.load(Ordering::SeqCst) >= srv.o.max_connections
                    && full.elapsed() < SLOT_WAIT
                    && last_refusal.is_none_or(|t| t.elapsed() > SLOT_WAIT * 2)
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if active.load(Ordering::SeqCst) >= srv.o.max_connections {
                    // Bounded: say so instead of queueing without end.
                    last_refusal = Some(Instant::now());
                    srv.refuse(s, peer.to_string(), &refusing);
                    continue;
                }
                let slot = Slot::take(&active);
                let srv = srv.clone();
                // The slot is given back when the thread ends, even by a
                // panic, or at once when no thread could be started.
                let spawned = std::thread::Builder::new().spawn(move || {
                    let _slot = slot;
                    srv.connection(s, peer.to_string());
                });
                if let Err(e) = spawned {
                    eprintln!("lifeboat serve: cannot start a connection thread: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("lifeboat serve: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    drop(listener);
    let n = active.load(Ordering::SeqCst);
    if !srv.o.quiet {
        eprintln!(
            "lifeboat serve: stopping: no new connections; waiting up to {} s for {n} running",
            srv.o.grace
        );
    }
    let t = Instant::now();
    while active.load(Ordering::SeqCst) > 0 && t.elapsed() < Duration::from_secs(srv.o.grace) {
        std::thread::sleep(Duration::from_millis(50));
    }
    if !srv.o.quiet {
        eprintln!(
            "lifeboat serve: stopped ({} connection(s) cut)",
            active.load(Ordering::SeqCst)
        );
    }
    Ok(())
}

fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("--tls-cert: cannot read {}", cert.display()))?
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("--tls-cert: {} is not PEM", cert.display()))?;
    if certs.is_empty() {
        bail!("--tls-cert: {} holds no certificate", cert.display());
    }
    let k = PrivateKeyDer::from_pem_file(key).with_context(|| {
        format!(
            "--tls-key: {} holds no usable private key (PEM)",
            key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, k)
        .context("--tls-cert/--tls-key do not go together")?;
    Ok(Arc::new(cfg))
}

/// One parsed request head.
struct Request {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == name).then(|| percent_decode(v))
        })
    }

    /// The token: `Authorization: Bearer …` or `?token=` (iPXE cannot set headers).
    fn token(&self) -> Option<String> {
        self.header("authorization")
            .and_then(|a| a.strip_prefix("Bearer "))
            .map(|t| t.trim().to_string())
            .or_else(|| self.param("token"))
            .filter(|t| !t.is_empty())
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A connection: its stream and the bytes read past the last request head.
struct Conn {
    s: Box<dyn Stream>,
    buf: Vec<u8>,
    /// Whether the current request's body was read.
    body_read: bool,
}

impl Conn {
    /// Read one request head; `None` at a clean end of the connection.
    fn head(&mut self) -> std::io::Result<Option<Request>> {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 4);
                let mut lines = head.lines();
                let first = lines.next().unwrap_or_default();
                let mut p = first.split_whitespace();
                let (method, target) = (p.next().unwrap_or(""), p.next().unwrap_or(""));
                let (path, query) = target.split_once('?').unwrap_or((target, ""));
                let headers = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .collect();
                return Ok(Some(Request {
                    method: method.to_string(),
                    path: percent_decode(path),
                    query: query.to_string(),
                    headers,
                }));
            }
            if self.buf.len() > 32 * 1024 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "request head too long",
                ));
            }
            let mut b = [0u8; 8192];
            let n = match self.s.read(&mut b) {
                Ok(n) => n,
                Err(e) if self.buf.is_empty() && is_disconnect(&e) => return Ok(None),
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&b[..n]);
        }
    }

    /// Copy a `len` byte body into `out`.
    fn body(&mut self, len: u64, out: &mut dyn Write) -> std::io::Result<()> {
        self.body_read = true;
        let mut left = len;
        let take = (self.buf.len() as u64).min(left) as usize;
        out.write_all(&self.buf[..take])?;
        self.buf.drain(..take);
        left -= take as u64;
        let mut b = vec![0u8; 64 * 1024];
        while left > 0 {
            let want = (b.len() as u64).min(left) as usize;
            let n = self.s.read(&mut b[..want])?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            out.write_all(&b[..n])?;
            left -= n as u64;
        }
        Ok(())
    }
}

fn is_disconnect(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
    )
}

/// What a handler answers.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Body,
}

enum Body {
    Bytes(Vec<u8>),
    /// A file range: path, start, length.
    File(PathBuf, u64, u64),
}

impl Reply {
    fn new(status: u16, ctype: &str, body: impl Into<Vec<u8>>) -> Reply {
        Reply {
            status,
            headers: vec![("Content-Type".into(), ctype.into())],
            body: Body::Bytes(body.into()),
        }
    }

    fn text(status: u16, msg: &str) -> Reply {
        Reply::new(status, "text/plain; charset=utf-8", format!("{msg}\n"))
    }

    fn len(&self) -> u64 {
        match &self.body {
            Body::Bytes(b) => b.len() as u64,
            Body::File(_, _, n) => *n,
        }
    }
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        201 => "Created",
        206 => "Partial Content",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        416 => "Range Not Satisfiable",
        422 => "Unprocessable Entity",
        503 => "Service Unavailable",
        507 => "Insufficient Storage",
        _ => "Error",
    }
}

/// Hide tokens from the access log.
fn redact(query: &str) -> String {
    query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some(("token", _)) => "token=REDACTED".to_string(),
            _ => kv.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn now_utc() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let s = crate::bootdisk::utc_stamp(t);
    // YYYYMMDD-HHMMSS → YYYY-MM-DDTHH:MM:SSZ
    format!(
        "{}-{}-{}T{}:{}:{}Z",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[9..11],
        &s[11..13],
        &s[13..15]
    )
}

impl Server {
    /// Answer 503 to a connection over the bound. Over TLS the answer
    /// needs a handshake first, so it runs in one of at most
    /// [`MAX_REFUSING`] short-lived threads with a short deadline; past
    /// that the connection is closed unanswered.
    fn refuse(self: &Arc<Self>, tcp: TcpStream, peer: String, refusing: &Arc<AtomicUsize>) {
        const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 2\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        let _ = tcp.set_write_timeout(Some(Duration::from_secs(2)));
        let Some(cfg) = self.tls.clone() else {
            let mut tcp = tcp;
            let _ = tcp.write_all(BUSY);
            self.access(&peer, "-", 503, 0, Duration::ZERO);
            return;
        };
        if refusing.load(Ordering::SeqCst) >= MAX_REFUSING {
            self.access(&peer, "- (closed: busy)", 503, 0, Duration::ZERO);
            return;
        }
        let slot = Slot::take(refusing);
        let srv = self.clone();
        let _ = std::thread::Builder::new().spawn(move || {
            let _slot = slot;
            let _ = tcp.set_read_timeout(Some(Duration::from_secs(2)));
            if let Ok(c) = rustls::ServerConnection::new(cfg) {
                let mut s = rustls::StreamOwned::new(c, tcp);
                let _ = s.write_all(BUSY).and_then(|_| s.flush());
                s.conn.send_close_notify();
                let _ = s.flush();
            }
            srv.access(&peer, "-", 503, 0, Duration::ZERO);
        });
    }

    fn access(&self, peer: &str, what: &str, status: u16, bytes: u64, took: Duration) {
        let line = format!(
            "{} {peer} \"{what}\" {status} {bytes} {:.3}s\n",
            now_utc(),
            took.as_secs_f64()
        );
        if let Ok(mut f) = self.log.lock() {
            let _ = f.write_all(line.as_bytes());
        }
        if !self.o.quiet {
            eprint!("{line}");
        }
    }

    fn connection(&self, tcp: TcpStream, peer: String) {
        let _ = tcp.set_read_timeout(Some(Duration::from_secs(30)));
        let _ = tcp.set_write_timeout(Some(Duration::from_secs(60)));
        let _ = tcp.set_nodelay(true);
        let s: Box<dyn Stream> = match &self.tls {
            Some(cfg) => match rustls::ServerConnection::new(cfg.clone()) {
                Ok(c) => Box::new(rustls::StreamOwned::new(c, tcp)),
                Err(_) => return,
            },
            None => Box::new(tcp),
        };
        let mut c = Conn {
            s,
            buf: Vec::new(),
            body_read: false,
        };
        loop {
            let req = match c.head() {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(_) => return,
            };
            let t = Instant::now();
            let what = format!(
                "{} {}{}",
                req.method,
                req.path,
                if req.query.is_empty() {
                    String::new()
                } else {
                    format!("?{}", redact(&req.query))
                }
            );
            c.body_read = false;
            let reply = match self.handle(&req, &mut c) {
                Ok(r) => r,
                Err(e) => {
                    let msg = format!("{e:#}");
                    let status = if msg.contains("No space left") {
                        507
                    } else {
                        500
                    };
                    Reply::text(status, &msg)
                }
            };
            // A body left unread (a refused upload) ends the connection:
            // its bytes must not be taken for the next request.
            let unread = !c.body_read
                && req
                    .header("content-length")
                    .is_some_and(|v| v.trim() != "0");
            let close = unread
                || STOP.load(Ordering::SeqCst)
                || req
                    .header("connection")
                    .is_some_and(|v| v.eq_ignore_ascii_case("close"));
            let head_only = req.method == "HEAD";
            let (status, len) = (reply.status, reply.len());
            let sent = self.send(&mut c, reply, head_only, close);
            self.access(
                &peer,
                &what,
                status,
                if head_only {
                    0
                } else {
                    sent.as_ref().copied().unwrap_or(0)
                },
                t.elapsed(),
            );
            if sent.is_err() || close || (sent.ok() != Some(len) && !head_only) {
                return;
            }
        }
    }

    /// Write the reply; returns the body bytes sent.
    fn send(&self, c: &mut Conn, r: Reply, head_only: bool, close: bool) -> std::io::Result<u64> {
        let mut head = format!("HTTP/1.1 {} {}\r\n", r.status, reason(r.status));
        for (k, v) in &r.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n", r.len()));
        head.push_str("Server: lifeboat\r\n");
        if close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        c.s.write_all(head.as_bytes())?;
        if head_only {
            c.s.flush()?;
            return Ok(0);
        }
        let sent = match r.body {
            Body::Bytes(b) => {
                c.s.write_all(&b)?;
                b.len() as u64
            }
            Body::File(p, start, len) => {
                use std::io::Seek;
                let mut f = std::fs::File::open(&p)?;
                f.seek(std::io::SeekFrom::Start(start))?;
                let mut buf = vec![0u8; 64 * 1024];
                let (mut done, t) = (0u64, Instant::now());
                while done < len {
                    if STOP.load(Ordering::SeqCst) && self.o.grace == 0 {
                        break;
                    }
                    let want = (buf.len() as u64).min(len - done) as usize;
                    let want = if self.o.max_rate > 0 {
                        want.min((self.o.max_rate as usize / 10).max(1024))
                    } else {
                        want
                    };
                    f.read_exact(&mut buf[..want])?;
                    c.s.write_all(&buf[..want])?;
                    done += want as u64;
                    if self.o.max_rate > 0 {
                        let due = Duration::from_secs_f64(done as f64 / self.o.max_rate as f64);
                        if let Some(w) = due.checked_sub(t.elapsed()) {
                            std::thread::sleep(w);
                        }
                    }
                }
                done
            }
        };
        c.s.flush()?;
        Ok(sent)
    }

    fn handle(&self, req: &Request, c: &mut Conn) -> Result<Reply> {
        let parts: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
        let get = matches!(req.method.as_str(), "GET" | "HEAD");
        match (req.method.as_str(), parts.as_slice()) {
            (_, ["boot.ipxe"]) if get => Ok(Reply::new(200, "text/plain", chain::generic_ipxe())),
            (_, ["layers", sha]) if get => self.layer(req, sha),
            (_, ["hosts", id, what]) if get => self.host_get(req, id, what),
            ("POST", ["api", "v1", "missing"]) => {
                if let Some(r) = self.check_upload_auth(req, None)? {
                    return Ok(r);
                }
                let body = self.small_body(req, c)?;
                let mut out = String::new();
                for l in String::from_utf8_lossy(&body).lines().map(str::trim) {
                    if !chain::is_sha256(l) {
                        return Ok(Reply::text(400, &format!("{l:?} is not a sha256")));
                    }
                    if !self.o.root.join("layers").join(l).is_file() {
                        out.push_str(l);
                        out.push('\n');
                    }
                }
                Ok(Reply::new(200, "text/plain", out))
            }
            ("PUT", ["api", "v1", "layers", sha]) => {
                if let Some(r) = self.check_upload_auth(req, None)? {
                    return Ok(r);
                }
                if !chain::is_sha256(sha) {
                    return Ok(Reply::text(400, "not a sha256"));
                }
                let dst = self.o.root.join("layers").join(sha);
                match self.receive(req, c, &dst, Some(sha), 0o644)? {
                    Some(r) => Ok(r),
                    None => Ok(Reply::text(201, "stored")),
                }
            }
            ("PUT", ["api", "v1", "hosts", id, "plan"]) => {
                if chain::check_id(id).is_err() {
                    return Ok(Reply::text(400, "bad host id"));
                }
                if let Some(r) = self.check_upload_auth(req, Some(id))? {
                    return Ok(r);
                }
                let Some(sha) = req.header("x-lifeboat-sha256").map(str::to_string) else {
                    return Ok(Reply::text(400, "X-Lifeboat-Sha256 missing"));
                };
                let dir = self.host_dir(id);
                std::fs::create_dir_all(&dir)?;
                std::fs::set_permissions(
                    &dir,
                    std::os::unix::fs::PermissionsExt::from_mode(0o700),
                )?;
                match self.receive(
                    req,
                    c,
                    &dir.join(format!("plan-{sha}.cpio")),
                    Some(&sha),
                    0o600,
                )? {
                    Some(r) => Ok(r),
                    None => Ok(Reply::text(201, "stored")),
                }
            }
            ("PUT", ["api", "v1", "hosts", id]) => {
                if chain::check_id(id).is_err() {
                    return Ok(Reply::text(400, "bad host id"));
                }
                let body = self.small_body(req, c)?;
                self.register(req, id, &body)
            }
            (m, _) if !matches!(m, "GET" | "HEAD" | "PUT" | "POST") => {
                Ok(Reply::text(405, &format!("method {m} is not served here")))
            }
            _ => Ok(Reply::text(404, "no such thing here")),
        }
    }

    fn small_body(&self, req: &Request, c: &mut Conn) -> Result<Vec<u8>> {
        let len: u64 = req
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .context("send Content-Length")?;
        if len > 4 << 20 {
            bail!("request body too big");
        }
        let mut v = Vec::new();
        c.body(len, &mut v)?;
        Ok(v)
    }

    /// Store an upload at `dst` (atomically); check its sha256. `Some(reply)` on refusal.
    fn receive(
        &self,
        req: &Request,
        c: &mut Conn,
        dst: &Path,
        sha: Option<&str>,
        mode: u32,
    ) -> Result<Option<Reply>> {
        let Some(len) = req
            .header("content-length")
            .and_then(|v| v.parse::<u64>().ok())
        else {
            return Ok(Some(Reply::text(411, "send Content-Length")));
        };
        let tmp = tempfile::Builder::new()
            .prefix(".up-")
            .tempfile_in(self.o.root.join("tmp"))?;
        struct Hashing<'a>(&'a mut std::fs::File, Sha256);
        impl Write for Hashing<'_> {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                let n = self.0.write(b)?;
                self.1.update(&b[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                self.0.flush()
            }
        }
        let mut f = tmp.reopen()?;
        let mut h = Hashing(&mut f, Sha256::new());
        c.body(len, &mut h)?;
        let got = hex::encode(h.1.finalize());
        if let Some(want) = sha {
            if got != want {
                return Ok(Some(Reply::text(
                    422,
                    &format!("the upload's sha256 is {got}, not {want}"),
                )));
            }
        }
        f.sync_all()?;
        std::fs::set_permissions(
            tmp.path(),
            std::os::unix::fs::PermissionsExt::from_mode(mode),
        )?;
        tmp.persist(dst)
            .with_context(|| format!("cannot store {}", dst.display()))?;
        Ok(None)
    }

    fn host_dir(&self, id: &str) -> PathBuf {
        self.o.root.join("hosts").join(id)
    }

    /// A host by id, MAC (any form) or SMBIOS UUID.
    fn resolve(&self, id: &str) -> Option<String> {
        let alias = chain::mac_alias(id).unwrap_or_else(|| id.to_ascii_lowercase());
        for cand in [id.to_string(), alias] {
            if chain::check_id(&cand).is_err() {
                continue;
            }
            let p = self.host_dir(&cand);
            if let Ok(t) = std::fs::read_link(&p) {
                let t = t.to_string_lossy().into_owned();
                if chain::check_id(&t).is_ok() && self.host_dir(&t).join("host.json").is_file() {
                    return Some(t);
                }
            } else if p.join("host.json").is_file() {
                return Some(cand);
            }
        }
        None
    }

    fn record(&self, id: &str) -> Result<HostRecord> {
        let p = self.host_dir(id).join("host.json");
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is damaged", p.display()))
    }

    fn token_ok(&self, id: &str, token: Option<&str>) -> bool {
        let Some(t) = token else { return false };
        let Ok(want) = std::fs::read_to_string(self.host_dir(id).join("token.sha256")) else {
            return false;
        };
        let got = hex::encode(Sha256::digest(t.as_bytes()));
        // Compare without an early exit.
        want.trim().len() == got.len()
            && want
                .trim()
                .bytes()
                .zip(got.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    fn enroll_ok(&self, req: &Request) -> bool {
        match &self.o.enroll_token {
            None => true,
            Some(e) => req.header("x-lifeboat-enroll") == Some(e.as_str()),
        }
    }

    /// Uploads: the enrollment secret (when configured), or, for an
    /// existing host, its own token.
    fn check_upload_auth(&self, req: &Request, id: Option<&str>) -> Result<Option<Reply>> {
        if self.o.enroll_token.is_some()
            && req.header("x-lifeboat-enroll") == self.o.enroll_token.as_deref()
        {
            return Ok(None);
        }
        let tok = req.token();
        match id {
            Some(id) if self.host_dir(id).join("token.sha256").is_file() => {
                if self.token_ok(id, tok.as_deref()) {
                    Ok(None)
                } else {
                    Ok(Some(Reply::text(
                        403,
                        &format!(
                            "host {id} is registered: present its token (or the enrollment token)"
                        ),
                    )))
                }
            }
            _ => {
                if self.o.enroll_token.is_none() {
                    return Ok(None);
                }
                // Any registered host may send layers for its re-registration.
                if let Some(t) = tok {
                    if let Ok(rd) = std::fs::read_dir(self.o.root.join("hosts")) {
                        for e in rd.flatten() {
                            let n = e.file_name().to_string_lossy().into_owned();
                            if e.file_type().map(|t| t.is_dir()).unwrap_or(false)
                                && self.token_ok(&n, Some(&t))
                            {
                                return Ok(None);
                            }
                        }
                    }
                }
                Ok(Some(Reply::text(
                    403,
                    "registration needs the enrollment token",
                )))
            }
        }
    }

    fn layer(&self, req: &Request, sha: &str) -> Result<Reply> {
        if !chain::is_sha256(sha) {
            return Ok(Reply::text(404, "no such layer"));
        }
        let p = self.o.root.join("layers").join(sha);
        let Ok(md) = std::fs::metadata(&p) else {
            return Ok(Reply::text(404, "no such layer"));
        };
        Ok(file_reply(
            req,
            &p,
            md.len(),
            sha,
            "public, max-age=31536000, immutable",
        ))
    }

    /// The personal layer: the registered plan layer's files, the host's
    /// secrets directory and the CA bundle, as one zstd cpio.
    fn personal(&self, id: &str, h: &HostRecord) -> Result<Vec<u8>> {
        let dir = self.host_dir(id);
        let plan = dir.join(format!("plan-{}.cpio", h.plan_sha256));
        let mut t = crate::tree::Tree::new();
        let f = std::fs::File::open(&plan)
            .with_context(|| format!("cannot read {}", plan.display()))?;
        let dec =
            crate::compress::decoder(std::io::BufReader::new(f), crate::compress::detect(&plan)?)?;
        let mut r = crate::cpio::Reader::new(std::io::BufReader::new(dec));
        while let Some(hd) = r.next_header()? {
            let data = r.read_data(&hd)?;
            let name = hd.name.trim_start_matches("./").to_string();
            if name.is_empty() || name == "." {
                continue;
            }
            match hd.mode & crate::cpio::S_IFMT {
                crate::cpio::S_IFDIR => t.add_dir(&name, hd.mode & 0o7777),
                crate::cpio::S_IFLNK => t.add_symlink(&name, &String::from_utf8_lossy(&data)),
                crate::cpio::S_IFREG => t.add_bytes(&name, data, hd.mode & 0o7777),
                _ => {}
            }
        }
        let secrets = dir.join("secrets");
        if secrets.is_dir() {
            t.add_host_tree(&secrets, "/")?;
            t.entries.remove("");
        }
        if let Some(ca) = &self.o.ca_bundle {
            let data = std::fs::read(ca)
                .with_context(|| format!("--ca-bundle: cannot read {}", ca.display()))?;
            t.add_bytes("etc/lifeboat/ca-bundle.pem", data, 0o644);
        }
        let mut out = Vec::new();
        {
            let mut enc = zstd::Encoder::new(&mut out, 19)?;
            let mut w = crate::cpio::Writer::new(&mut enc);
            crate::layers::write_entries(&mut w, &t, 0)?;
            w.finish()?;
            enc.finish()?;
        }
        Ok(out)
    }

    fn chain_info(&self, id: &str) -> Result<(HostRecord, ChainInfo, Vec<u8>)> {
        let h = self.record(id)?;
        let p = self.personal(id, &h)?;
        let sha = hex::encode(Sha256::digest(&p));
        let c = ChainInfo::of(&h, &sha, p.len() as u64);
        Ok((h, c, p))
    }

    fn base_url(&self, req: &Request) -> String {
        match req.header("host") {
            Some(h) if !h.is_empty() && !h.contains(['/', ' ', '"']) => {
                format!("{}://{h}/", self.scheme)
            }
            _ => self
                .o
                .public_url
                .clone()
                .unwrap_or_else(|| format!("{}://{}/", self.scheme, self.o.listen)),
        }
    }

    fn host_get(&self, req: &Request, id: &str, what: &str) -> Result<Reply> {
        let Some(real) = self.resolve(id) else {
            return Ok(Reply::text(
                404,
                &format!("no host {id:?} is registered here (run mkrescue with OUTPUT_URL = lifeboat+http://this-server/ on it)"),
            ));
        };
        let token = req.token();
        if token.is_some() && !self.token_ok(&real, token.as_deref()) {
            return Ok(Reply::text(403, &format!("the token is not host {real}'s")));
        }
        match what {
            "boot.ipxe" => {
                let (_, c, _) = self.chain_info(&real)?;
                Ok(Reply::new(
                    200,
                    "text/plain",
                    c.ipxe(&self.base_url(req), token.as_deref()),
                ))
            }
            "chain.json" => {
                let (_, c, _) = self.chain_info(&real)?;
                Ok(Reply::new(
                    200,
                    "application/json",
                    serde_json::to_vec_pretty(&c)?,
                ))
            }
            "personal.cpio.zst" => {
                if token.is_none() {
                    return Ok(Reply::text(
                        403,
                        &format!("host {real}'s personal layer needs its token"),
                    ));
                }
                let (_, c, p) = self.chain_info(&real)?;
                let sha = &c.fetch.last().unwrap().sha256;
                let mut r = Reply::new(200, "application/octet-stream", p);
                r.headers.push(("ETag".into(), format!("\"{sha}\"")));
                r.headers.push(("Cache-Control".into(), "no-store".into()));
                Ok(r)
            }
            _ => Ok(Reply::text(404, "no such thing here")),
        }
    }

    fn register(&self, req: &Request, id: &str, body: &[u8]) -> Result<Reply> {
        let _g = self.reg.lock().unwrap();
        let mut rec: HostRecord = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => return Ok(Reply::text(400, &format!("not a host record: {e}"))),
        };
        if rec.id != id {
            return Ok(Reply::text(400, "the record's id differs from the URL"));
        }
        let dir = self.host_dir(id);
        let known = dir.join("token.sha256").is_file();
        let (tok_ok, enroll) = (
            self.token_ok(id, req.token().as_deref()),
            self.enroll_ok(req),
        );
        let by_enroll = self.o.enroll_token.is_some() && enroll;
        if known && !tok_ok && !by_enroll {
            return Ok(Reply::text(
                403,
                &format!("host {id} is registered: present its token (or the enrollment token)"),
            ));
        }
        if !known && !enroll {
            return Ok(Reply::text(403, "registration needs the enrollment token"));
        }
        for b in std::iter::once(&rec.kernel).chain(rec.layers.iter()) {
            if !chain::is_sha256(&b.sha256) || !self.o.root.join("layers").join(&b.sha256).is_file()
            {
                return Ok(Reply::text(
                    409,
                    &format!("layer {} ({}) was not uploaded", b.name, b.sha256),
                ));
            }
        }
        if !dir.join(format!("plan-{}.cpio", rec.plan_sha256)).is_file() {
            return Ok(Reply::text(409, "the plan layer was not uploaded"));
        }
        rec.macs.retain(|m| chain::mac_alias(m).is_some());
        std::fs::create_dir_all(&dir)?;
        // A new token on the first registration, or when the enrollment
        // token re-registers a host without presenting the host's token.
        let new_token = if !known || !tok_ok {
            Some(issue_token(&dir)?)
        } else {
            None
        };
        write_atomic(
            &dir.join("host.json"),
            &serde_json::to_vec_pretty(&rec)?,
            0o600,
        )?;
        // Old plan layers go.
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with("plan-") && n != format!("plan-{}.cpio", rec.plan_sha256) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        // Aliases by MAC and UUID (symbolic links, for stock web servers too).
        let mut aliases: Vec<String> = rec
            .macs
            .iter()
            .filter_map(|m| chain::mac_alias(m))
            .collect();
        aliases.extend(rec.uuid.iter().map(|u| u.to_ascii_lowercase()));
        for a in aliases {
            if chain::check_id(&a).is_err() || a == id {
                continue;
            }
            let p = self.host_dir(&a);
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.file_type().is_symlink() => {
                    let _ = std::fs::remove_file(&p);
                }
                Ok(_) => continue,
                Err(_) => {}
            }
            std::os::unix::fs::symlink(id, &p)?;
        }
        // Static copies for a stock web server.
        let base = self
            .o
            .public_url
            .clone()
            .unwrap_or_else(|| self.base_url(req));
        let (_, c, _) = self.chain_info(id)?;
        write_atomic(
            &dir.join("boot.ipxe"),
            c.ipxe(&base, None).as_bytes(),
            0o644,
        )?;
        write_atomic(
            &dir.join("chain.json"),
            &serde_json::to_vec_pretty(&c)?,
            0o644,
        )?;
        let answer = serde_json::json!({
            "host": id,
            "token": new_token,
            "layers": rec.layers.len() + 1,
        });
        Ok(Reply::new(
            if known { 200 } else { 201 },
            "application/json",
            answer.to_string(),
        ))
    }
}

fn write_atomic(p: &Path, data: &[u8], mode: u32) -> Result<()> {
    let dir = p.parent().unwrap();
    let mut t = tempfile::Builder::new().prefix(".w-").tempfile_in(dir)?;
    t.write_all(data)?;
    t.as_file().sync_all()?;
    std::fs::set_permissions(t.path(), std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    t.persist(p)
        .with_context(|| format!("cannot write {}", p.display()))?;
    Ok(())
}

/// A file with ETag, conditional GET and single byte ranges.
fn file_reply(req: &Request, p: &Path, size: u64, etag: &str, cache: &str) -> Reply {
    let tag = format!("\"{etag}\"");
    let mut headers = vec![
        (
            "Content-Type".to_string(),
            "application/octet-stream".to_string(),
        ),
        ("ETag".to_string(), tag.clone()),
        ("Accept-Ranges".to_string(), "bytes".to_string()),
        ("Cache-Control".to_string(), cache.to_string()),
    ];
    if req
        .header("if-none-match")
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag || t.trim() == "*"))
    {
        return Reply {
            status: 304,
            headers,
            body: Body::Bytes(vec![]),
        };
    }
    let range_applies = req.header("if-range").is_none_or(|v| v.trim() == tag);
    if let (Some(r), true) = (req.header("range"), range_applies) {
        match parse_range(r, size) {
            Some((start, end)) => {
                headers.push((
                    "Content-Range".into(),
                    format!("bytes {start}-{end}/{size}"),
                ));
                return Reply {
                    status: 206,
                    headers,
                    body: Body::File(p.to_path_buf(), start, end + 1 - start),
                };
            }
            None => {
                headers.push(("Content-Range".into(), format!("bytes */{size}")));
                return Reply {
                    status: 416,
                    headers,
                    body: Body::Bytes(vec![]),
                };
            }
        }
    }
    Reply {
        status: 200,
        headers,
        body: Body::File(p.to_path_buf(), 0, size),
    }
}

/// `bytes=a-b`, `bytes=a-`, `bytes=-n` → inclusive (start, end); one range only.
fn parse_range(v: &str, size: u64) -> Option<(u64, u64)> {
    let spec = v.trim().strip_prefix("bytes=")?;
    if spec.contains(',') || size == 0 {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 {
            return None;
        }
        (size.saturating_sub(n), size - 1)
    } else {
        let s: u64 = a.parse().ok()?;
        let e = if b.is_empty() {
            size - 1
        } else {
            b.parse::<u64>().ok()?.min(size - 1)
        };
        (s, e)
    };
    (start <= end && start < size).then_some((start, end))
}

/// Registered hosts under `root` (aliases left out), by id.
pub fn hosts(root: &Path) -> Result<Vec<HostRecord>> {
    let mut v = Vec::new();
    let dir = root.join("hosts");
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(v),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
    };
    for e in rd.flatten() {
        if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            continue;
        }
        let p = e.path().join("host.json");
        if let Ok(text) = std::fs::read_to_string(&p) {
            v.push(
                serde_json::from_str(&text)
                    .with_context(|| format!("{} is damaged", p.display()))?,
            );
        }
    }
    v.sort_by(|a: &HostRecord, b| a.id.cmp(&b.id));
    Ok(v)
}

/// Forget host `id`: its directory (plan, secrets, token) and its aliases.
/// Returns what was removed (or, with `dry_run`, what would be).
pub fn remove(root: &Path, id: &str, dry_run: bool) -> Result<Vec<PathBuf>> {
    chain::check_id(id)?;
    let dir = root.join("hosts").join(id);
    if !dir.join("host.json").is_file() {
        bail!("no host {id:?} is registered in {}", root.display());
    }
    let mut gone = vec![];
    for e in std::fs::read_dir(root.join("hosts"))?.flatten() {
        if std::fs::read_link(e.path()).is_ok_and(|t| t == Path::new(id)) {
            if !dry_run {
                std::fs::remove_file(e.path())?;
            }
            gone.push(e.path());
        }
    }
    if !dry_run {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    gone.push(dir);
    Ok(gone)
}

/// Give host `id` a new token (the old one stops working); returns it.
pub fn new_token(root: &Path, id: &str) -> Result<String> {
    chain::check_id(id)?;
    let dir = root.join("hosts").join(id);
    if !dir.join("host.json").is_file() {
        bail!("no host {id:?} is registered in {}", root.display());
    }
    issue_token(&dir)
}

/// A fresh random token for the host in `dir`; only its sha256 is stored.
fn issue_token(dir: &Path) -> Result<String> {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    let t = hex::encode(b);
    write_atomic(
        &dir.join("token.sha256"),
        hex::encode(Sha256::digest(t.as_bytes())).as_bytes(),
        0o600,
    )?;
    Ok(t)
}

/// Remove layers no registered host uses (those written in the last hour
/// are kept: a registration may be uploading them). Returns (files, bytes).
/// Returns the unused layers removed (or, with `dry_run`, that would be),
/// with their sizes.
pub fn gc(root: &Path, dry_run: bool) -> Result<Vec<(String, u64)>> {
    let mut used = std::collections::BTreeSet::new();
    for h in hosts(root)? {
        used.insert(h.kernel.sha256.clone());
        used.extend(h.layers.iter().map(|l| l.sha256.clone()));
    }
    let mut unused = vec![];
    let dir = root.join("layers");
    for e in std::fs::read_dir(&dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let md = e.metadata()?;
        let young = md
            .modified()
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age < Duration::from_secs(3600));
        if chain::is_sha256(&name) && !used.contains(&name) && !young {
            if !dry_run {
                std::fs::remove_file(e.path())?;
            }
            unused.push((name, md.len()));
        }
    }
    unused.sort();
    Ok(unused)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_parsed_as_rfc9110_says() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=50-500", 100), Some((50, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
    }

    #[test]
    fn tokens_never_reach_the_log() {
        assert_eq!(redact("uuid=x&token=secret"), "uuid=x&token=REDACTED");
        assert_eq!(percent_decode("a%20b%2fc"), "a b/c");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
