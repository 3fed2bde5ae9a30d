//! SFTP backup storage: `BACKUP_URL=sftp://[user@]host[:port]/path`.
//!
//! Speaks SFTP version 3 (draft-ietf-secsh-filexfer-02, what OpenSSH
//! serves) over the system's own `ssh -s sftp`, so authentication, host
//! keys and ciphers are ssh's, and sftp-only accounts (`ForceCommand
//! internal-sftp`, chroots) work. Reads stream (several requests in
//! flight), which is what a restore needs; uploads write the same way.
//!
//! The key: `backup_credentials` names an ssh private key (identity file),
//! else ssh's defaults (`~/.ssh/id_*`, ssh config) apply. Host keys: ssh's
//! known_hosts; a host not yet known is accepted (`accept-new`): the
//! volumes' sha256 sums recorded in the rescue image catch any substitute.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

const FXP_INIT: u8 = 1;
const FXP_VERSION: u8 = 2;
const FXP_OPEN: u8 = 3;
const FXP_CLOSE: u8 = 4;
const FXP_READ: u8 = 5;
const FXP_WRITE: u8 = 6;
const FXP_MKDIR: u8 = 14;
const FXP_STAT: u8 = 17;
const FXP_STATUS: u8 = 101;
const FXP_HANDLE: u8 = 102;
const FXP_DATA: u8 = 103;
const FXP_ATTRS: u8 = 105;

const FX_OK: u32 = 0;
const FX_EOF: u32 = 1;
const FX_NO_SUCH_FILE: u32 = 2;

const PF_READ: u32 = 1;
const PF_WRITE: u32 = 2;
const PF_CREAT: u32 = 8;
const PF_TRUNC: u32 = 0x10;

/// Bytes per READ/WRITE request (OpenSSH's limit is 256 KiB; 32 KiB is
/// what every server accepts) and requests kept in flight.
const CHUNK: u32 = 32 * 1024;
const IN_FLIGHT: usize = 32;

/// A directory on an SFTP server.
#[derive(Clone)]
pub struct Remote {
    /// `[user@]host`
    dest: String,
    port: Option<u16>,
    /// Absolute directory on the server, no trailing `/`.
    dir: String,
    identity: Option<PathBuf>,
    ssh_options: Vec<String>,
    /// For messages: `sftp://…/dir/`.
    shown: String,
    /// A connected session between requests (one ssh login serves many).
    idle: Arc<Mutex<Option<Session>>>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sftp::Remote({})", self.shown)
    }
}

impl Remote {
    pub fn new(url: &str, identity: Option<&Path>, ssh_options: &[String]) -> Result<Remote> {
        let n = crate::url::NetUrl::parse(url)?
            .filter(|n| n.scheme == "sftp")
            .with_context(|| format!("{url:?} is not an sftp:// URL"))?;
        let dest = match &n.user {
            Some(u) => format!("{u}@{}", n.host),
            None => n.host.clone(),
        };
        Ok(Remote {
            dest,
            port: n.port,
            dir: n.path.trim_end_matches('/').to_string(),
            identity: identity.map(Path::to_path_buf),
            ssh_options: ssh_options.to_vec(),
            shown: format!("{}/", url.trim_end_matches('/')),
            idle: Arc::new(Mutex::new(None)),
        })
    }

    pub fn join(&self, rel: &str) -> Remote {
        let mut r = self.clone();
        r.dir = format!("{}/{}", self.dir, rel.trim_matches('/'));
        r.shown = format!("{}{}/", self.shown, rel.trim_matches('/'));
        r
    }

    pub fn url(&self, rel: &str) -> String {
        format!("{}{rel}", self.shown)
    }

    fn path(&self, rel: &str) -> String {
        if rel.is_empty() {
            self.dir.clone()
        } else {
            format!("{}/{rel}", self.dir)
        }
    }

    /// Run `f` on the idle session (or a new one); a failure on a reused
    /// session is retried once on a fresh one.
    fn with_session<T>(&self, f: impl Fn(&mut Session) -> Result<T>) -> Result<T> {
        let cached = self.idle.lock().unwrap().take();
        if let Some(mut s) = cached {
            if let Ok(v) = f(&mut s) {
                *self.idle.lock().unwrap() = Some(s);
                return Ok(v);
            }
        }
        let mut s = self.session()?;
        let v = f(&mut s)?;
        *self.idle.lock().unwrap() = Some(s);
        Ok(v)
    }

    fn session(&self) -> Result<Session> {
        let mut c = Command::new("ssh");
        c.args([
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=accept-new",
            "-o",
            "ConnectTimeout=20",
            "-o",
            "ServerAliveInterval=15",
        ]);
        if let Some(p) = self.port {
            c.args(["-p", &p.to_string()]);
        }
        for o in &self.ssh_options {
            c.arg("-o").arg(o);
        }
        if let Some(i) = &self.identity {
            c.arg("-i").arg(i).args(["-o", "IdentitiesOnly=yes"]);
        }
        c.arg(&self.dest).args(["-s", "sftp"]);
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run ssh (the rescue OS needs the ssh client for sftp://)")?;
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut s = Session {
            child,
            stdin,
            stdout,
            next_id: 1,
            shown: self.shown.clone(),
        };
        let mut p = Vec::new();
        p.extend(3u32.to_be_bytes());
        let hello = s.send(FXP_INIT, &p).and_then(|_| s.recv_raw());
        if let Err(e) = hello.and_then(|(t, _)| {
            if t == FXP_VERSION {
                Ok(())
            } else {
                Err(std::io::Error::other(format!("SFTP reply {t} to INIT")))
            }
        }) {
            let err = s.stderr_text();
            bail!(
                "cannot start an SFTP session with {} ({e}): {} (check the key, the user and that the server offers sftp)",
                self.shown,
                err.trim()
            );
        }
        Ok(s)
    }

    /// Size of `rel`; `None` when it does not exist.
    pub fn size(&self, rel: &str) -> Result<Option<u64>> {
        self.with_session(|s| {
            let id = s.request(FXP_STAT, &[string(&self.path(rel))])?;
            let (t, body) = s.reply(id)?;
            match t {
                FXP_ATTRS => Ok(attrs_size(&body)),
                FXP_STATUS if status_code(&body) == FX_NO_SUCH_FILE => Ok(None),
                FXP_STATUS => bail!("stat {}: {}", self.url(rel), status_text(&body)),
                _ => bail!("stat {}: unexpected SFTP reply {t}", self.url(rel)),
            }
        })
    }

    /// The contents of `rel`, streaming; `None` when it does not exist.
    pub fn get(&self, rel: &str) -> Result<Option<Box<dyn Read + Send>>> {
        let cached = self.idle.lock().unwrap().take();
        let mut s = match cached {
            Some(s) => s,
            None => self.session()?,
        };
        let handle = match s.open(&self.path(rel), PF_READ) {
            Ok(Some(h)) => h,
            Ok(None) => {
                *self.idle.lock().unwrap() = Some(s);
                return Ok(None);
            }
            // A stale idle session: once more on a fresh one.
            Err(_) => {
                s = self.session()?;
                match s.open(&self.path(rel), PF_READ)? {
                    Some(h) => h,
                    None => return Ok(None),
                }
            }
        };
        Ok(Some(Box::new(FileReader {
            s: Some(s),
            idle: self.idle.clone(),
            handle,
            next_offset: 0,
            pending: std::collections::VecDeque::new(),
            buf: Vec::new(),
            pos: 0,
            eof: false,
            name: self.url(rel),
        })))
    }

    /// Upload the local file `src` as `rel` (parent directories made).
    pub fn put_file(&self, rel: &str, src: &Path, progress: &mut dyn FnMut(u64)) -> Result<()> {
        let cached = self.idle.lock().unwrap().take();
        let mut s = match cached {
            Some(mut s) => {
                // Still alive? (STAT of the directory itself.)
                let ok = s
                    .request(FXP_STAT, &[string(&self.dir)])
                    .and_then(|id| s.reply(id))
                    .is_ok();
                if ok {
                    s
                } else {
                    self.session()?
                }
            }
            None => self.session()?,
        };
        // mkdir -p of the parents, from the top (errors: exists, or reported by OPEN).
        let full = self.path(rel);
        let mut acc = String::new();
        let parts: Vec<&str> = full.split('/').filter(|c| !c.is_empty()).collect();
        for c in &parts[..parts.len().saturating_sub(1)] {
            acc.push('/');
            acc.push_str(c);
            let id = s.request(FXP_MKDIR, &[string(&acc), 0u32.to_be_bytes().to_vec()])?;
            s.reply(id)?;
        }
        let handle = s
            .open(&full, PF_WRITE | PF_CREAT | PF_TRUNC)?
            .with_context(|| format!("cannot create {}", self.url(rel)))?;
        let mut f =
            std::fs::File::open(src).with_context(|| format!("cannot read {}", src.display()))?;
        let mut offset = 0u64;
        let mut pending = std::collections::VecDeque::new();
        let mut buf = vec![0u8; CHUNK as usize];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            let id = s.request(
                FXP_WRITE,
                &[
                    string_bytes(&handle),
                    offset.to_be_bytes().to_vec(),
                    string_bytes(&buf[..n]),
                ],
            )?;
            pending.push_back((id, n));
            offset += n as u64;
            if pending.len() >= IN_FLIGHT {
                let (id, n) = pending.pop_front().unwrap();
                s.expect_ok(id, &self.url(rel))?;
                progress(n as u64);
            }
        }
        while let Some((id, n)) = pending.pop_front() {
            s.expect_ok(id, &self.url(rel))?;
            progress(n as u64);
        }
        let id = s.request(FXP_CLOSE, &[string_bytes(&handle)])?;
        s.expect_ok(id, &self.url(rel))?;
        *self.idle.lock().unwrap() = Some(s);
        Ok(())
    }
}

struct Session {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    next_id: u32,
    shown: String,
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn string(s: &str) -> Vec<u8> {
    string_bytes(s.as_bytes())
}

fn string_bytes(b: &[u8]) -> Vec<u8> {
    let mut v = (b.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(b);
    v
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// A STATUS body (after the id): code.
fn status_code(body: &[u8]) -> u32 {
    u32_at(body, 0).unwrap_or(u32::MAX)
}

fn status_text(body: &[u8]) -> String {
    let code = status_code(body);
    let msg = u32_at(body, 4)
        .and_then(|n| body.get(8..8 + n as usize))
        .map(|m| String::from_utf8_lossy(m).to_string())
        .unwrap_or_default();
    format!("SFTP status {code} {msg}")
}

/// ATTRS body: the size, when present.
fn attrs_size(body: &[u8]) -> Option<u64> {
    let flags = u32_at(body, 0)?;
    if flags & 1 == 0 {
        return None;
    }
    Some(u64::from_be_bytes(body.get(4..12)?.try_into().ok()?))
}

impl Session {
    fn send(&mut self, t: u8, payload: &[u8]) -> std::io::Result<()> {
        let mut p = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
        p.push(t);
        p.extend_from_slice(payload);
        self.stdin.write_all(&p)
    }

    /// Send a request with a fresh id; returns the id.
    fn request(&mut self, t: u8, parts: &[Vec<u8>]) -> Result<u32> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let mut p = id.to_be_bytes().to_vec();
        for x in parts {
            p.extend_from_slice(x);
        }
        self.send(t, &p)
            .with_context(|| format!("the SFTP connection to {} broke", self.shown))?;
        Ok(id)
    }

    fn recv_raw(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        let mut len = [0u8; 4];
        self.stdout.read_exact(&mut len)?;
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 || len > 1 << 20 {
            return Err(std::io::Error::other(format!(
                "bad SFTP packet length {len}"
            )));
        }
        let mut p = vec![0u8; len];
        self.stdout.read_exact(&mut p)?;
        Ok((p[0], p[1..].to_vec()))
    }

    /// The reply to request `id`: (type, body after the id). OpenSSH
    /// answers in order.
    fn reply(&mut self, id: u32) -> Result<(u8, Vec<u8>)> {
        let (t, p) = match self.recv_raw() {
            Ok(x) => x,
            Err(e) => {
                let err = self.stderr_text();
                bail!(
                    "the SFTP connection to {} broke ({e}): {}",
                    self.shown,
                    err.trim()
                );
            }
        };
        let got = u32_at(&p, 0).unwrap_or(0);
        if got != id {
            bail!("SFTP reply {got} for request {id} from {}", self.shown);
        }
        Ok((t, p[4..].to_vec()))
    }

    fn expect_ok(&mut self, id: u32, what: &str) -> Result<()> {
        let (t, body) = self.reply(id)?;
        if t != FXP_STATUS || status_code(&body) != FX_OK {
            bail!("writing {what}: {}", status_text(&body));
        }
        Ok(())
    }

    /// OPEN; `None` for "no such file".
    fn open(&mut self, path: &str, pflags: u32) -> Result<Option<Vec<u8>>> {
        let id = self.request(
            FXP_OPEN,
            &[
                string(path),
                pflags.to_be_bytes().to_vec(),
                0u32.to_be_bytes().to_vec(),
            ],
        )?;
        let (t, body) = self.reply(id)?;
        match t {
            FXP_HANDLE => {
                let n = u32_at(&body, 0).context("short SFTP handle")? as usize;
                Ok(Some(
                    body.get(4..4 + n).context("short SFTP handle")?.to_vec(),
                ))
            }
            FXP_STATUS if status_code(&body) == FX_NO_SUCH_FILE => Ok(None),
            FXP_STATUS => bail!(
                "cannot open {path} on {}: {}",
                self.shown,
                status_text(&body)
            ),
            _ => bail!("unexpected SFTP reply {t} to OPEN"),
        }
    }

    fn stderr_text(&mut self) -> String {
        let _ = self.child.kill();
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

/// Streams a remote file with up to [`IN_FLIGHT`] READs outstanding.
struct FileReader {
    s: Option<Session>,
    idle: Arc<Mutex<Option<Session>>>,
    handle: Vec<u8>,
    next_offset: u64,
    pending: std::collections::VecDeque<u32>,
    buf: Vec<u8>,
    pos: usize,
    eof: bool,
    name: String,
}

impl FileReader {
    /// At the end: close the handle and leave the session for the next
    /// request.
    fn finish(&mut self) {
        if let Some(mut s) = self.s.take() {
            let closed = s
                .request(FXP_CLOSE, &[string_bytes(&self.handle)])
                .and_then(|id| s.expect_ok(id, &self.name));
            if closed.is_ok() {
                *self.idle.lock().unwrap() = Some(s);
            }
        }
    }
}

impl Read for FileReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let io = |e: anyhow::Error| std::io::Error::other(format!("{e:#}"));
        loop {
            if self.pos < self.buf.len() {
                let n = out.len().min(self.buf.len() - self.pos);
                out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            let Some(s) = self.s.as_mut() else {
                return Ok(0);
            };
            while !self.eof && self.pending.len() < IN_FLIGHT {
                let id = s
                    .request(
                        FXP_READ,
                        &[
                            string_bytes(&self.handle),
                            self.next_offset.to_be_bytes().to_vec(),
                            CHUNK.to_be_bytes().to_vec(),
                        ],
                    )
                    .map_err(io)?;
                self.pending.push_back(id);
                self.next_offset += CHUNK as u64;
            }
            let Some(id) = self.pending.pop_front() else {
                self.finish();
                return Ok(0);
            };
            let (t, body) = s.reply(id).map_err(io)?;
            match t {
                FXP_DATA => {
                    let n = u32_at(&body, 0).unwrap_or(0) as usize;
                    let data = body.get(4..4 + n).unwrap_or(&[]);
                    if (n as u32) < CHUNK {
                        // Short reads happen only at the end of a regular
                        // file; what is still in flight answers EOF.
                        self.eof = true;
                    }
                    self.buf = data.to_vec();
                    self.pos = 0;
                }
                FXP_STATUS if status_code(&body) == FX_EOF => {
                    self.eof = true;
                    self.buf.clear();
                    self.pos = 0;
                }
                _ => {
                    return Err(std::io::Error::other(format!(
                        "reading {}: {}",
                        self.name,
                        status_text(&body)
                    )))
                }
            }
        }
    }
}
