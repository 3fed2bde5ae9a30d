//! BACKUP_URL / OUTPUT_URL: where backups and images live.
//!
//! Local storage: `file:///path`, and `usb://LABEL[/dir]` (also
//! `usb:///dev/disk/by-label/LABEL[/dir]`): the filesystem with that label,
//! mounted at /run/lifeboat/usb/LABEL when it is not mounted yet (and
//! unmounted again when done).
//!
//! Network shares, mounted with the kernel's own client (no mount.nfs or
//! mount.cifs helper needed, and no password on any command line):
//! `nfs://host[:port]/export[/dir]` (NFSv4 unless the options say `vers=3`)
//! and `cifs://host[:port]/share[/dir]` (user and password from a
//! credentials file, never from the URL). Both are mounted below
//! /run/lifeboat/net/.
//!
//! HTTP storage (`http://`, `https://`) is not mounted: see [`crate::http`].

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A local directory for a URL; unmounts what it mounted when dropped.
#[derive(Debug)]
pub struct Local {
    pub path: PathBuf,
    mounted: Vec<PathBuf>,
}

impl Access {
    /// How BACKUP_URL (and OUTPUT_URL) are reached with this configuration.
    pub fn from_config(cfg: &crate::config::Config) -> Access {
        Access {
            read_only: false,
            credentials: cfg.backup_credentials.clone(),
            options: cfg.backup_mount_options.clone(),
            ssh_options: cfg.backup_ssh_options.clone(),
            ca_file: cfg.backup_ca_file.clone(),
        }
    }
}

impl Local {
    /// `path`, on filesystems mounted at `mounts` (unmounted when dropped).
    pub fn mounted(path: PathBuf, mounts: Vec<PathBuf>) -> Local {
        Local {
            path,
            mounted: mounts,
        }
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        if !self.mounted.is_empty() {
            let _ = Command::new("sync").status();
        }
        for m in self.mounted.drain(..) {
            let _ = Command::new("umount").arg(&m).status();
        }
    }
}

/// `usb://LABEL/dir` → (`LABEL`, `dir`).
pub fn parse_usb(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("usb://")?;
    let rest = rest.strip_prefix("/dev/disk/by-label/").unwrap_or(rest);
    let (label, dir) = rest.split_once('/').unwrap_or((rest, ""));
    if label.is_empty() {
        return None;
    }
    Some((label.to_string(), dir.trim_matches('/').to_string()))
}

/// The directory a URL stands for. `key` names the setting in messages.
pub fn local(url: &str, key: &str) -> Result<Local> {
    local_with(url, key, &Access::default())
}

/// [`local`], with how network shares are mounted.
pub fn local_with(url: &str, key: &str, acc: &Access) -> Result<Local> {
    if let Some(p) = url.strip_prefix("file://") {
        if p.starts_with('/') {
            return Ok(Local {
                path: PathBuf::from(p),
                mounted: vec![],
            });
        }
    }
    if let Some((label, dir)) = parse_usb(url) {
        let dir = if dir.is_empty() {
            "lifeboat".to_string()
        } else {
            dir
        };
        let out = Command::new("blkid")
            .args(["-L", &label])
            .output()
            .context("cannot run blkid")?;
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() || dev.is_empty() {
            bail!("{key} = {url:?}: no filesystem with the label {label} is attached (label it with e2label/mkfs -L, or plug it in)");
        }
        let mp = Command::new("findmnt")
            .args([
                "--noheadings",
                "--first-only",
                "-o",
                "TARGET",
                "--source",
                &dev,
            ])
            .output()
            .context("cannot run findmnt")?;
        let mp = String::from_utf8_lossy(&mp.stdout).trim().to_string();
        if !mp.is_empty() {
            return Ok(Local {
                path: Path::new(&mp).join(dir),
                mounted: vec![],
            });
        }
        let m = PathBuf::from("/run/lifeboat/usb").join(&label);
        std::fs::create_dir_all(&m).with_context(|| format!("cannot create {}", m.display()))?;
        let st = Command::new("mount")
            .arg(&dev)
            .arg(&m)
            .status()
            .context("cannot run mount")?;
        if !st.success() {
            bail!(
                "{key} = {url:?}: cannot mount {dev} (label {label}) at {}",
                m.display()
            );
        }
        return Ok(Local {
            path: m.join(dir),
            mounted: vec![m],
        });
    }
    if let Some(n) = NetUrl::parse(url)? {
        if n.scheme == "nfs" || n.scheme == "cifs" {
            return mount_share(&n, url, key, acc);
        }
    }
    bail!("{key} = {url:?}: supported are file:///absolute/path, usb://LABEL[/dir], nfs://host/export[/dir], \
           cifs://host/share[/dir] and http(s)://host/path (or give --output-dir)")
}

/// How network shares are mounted.
#[derive(Debug, Default, Clone)]
pub struct Access {
    /// Mount read-only (recovery).
    pub read_only: bool,
    /// `username=`/`password=`/`domain=` lines, as for mount.cifs.
    pub credentials: Option<PathBuf>,
    /// Extra mount options (comma separated), e.g. `vers=3` or `nolock`.
    pub options: Option<String>,
    /// Extra `ssh -o` options for sftp:// (e.g. `UserKnownHostsFile=...`).
    pub ssh_options: Vec<String>,
    /// PEM CA certificates trusted for https:// besides the public roots.
    pub ca_file: Option<PathBuf>,
}

/// A parsed `scheme://[user@]host[:port]/path` URL.
#[derive(Debug, Clone, PartialEq)]
pub struct NetUrl {
    pub scheme: String,
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
    /// Starts with `/`; no trailing `/` (except the root itself).
    pub path: String,
}

pub const NET_SCHEMES: &[&str] = &["nfs", "cifs", "http", "https", "sftp"];

impl NetUrl {
    /// `Ok(None)` for URLs of other schemes; errors name what is wrong.
    pub fn parse(url: &str) -> Result<Option<NetUrl>> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Ok(None);
        };
        if !NET_SCHEMES.contains(&scheme) {
            return Ok(None);
        }
        let (auth, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (user, hostport) = match auth.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, auth),
        };
        if let Some(u) = user {
            if u.contains(':') {
                bail!("{scheme}://{}…: a password in the URL would end up in configs, images and logs; \
                       put it in a credentials file (backup_credentials) instead", &u[..u.find(':').unwrap_or(0)]);
            }
        }
        let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
            let (h, p) = h
                .split_once(']')
                .with_context(|| format!("{url:?}: unterminated [IPv6 address]"))?;
            (h.to_string(), p.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() {
            bail!("{url:?} names no host");
        }
        let port = port
            .map(|p| {
                p.parse::<u16>()
                    .with_context(|| format!("{url:?}: port {p:?} is not a number"))
            })
            .transpose()?;
        let mut path = path.to_string();
        while path.len() > 1 && path.ends_with('/') {
            path.pop();
        }
        Ok(Some(NetUrl {
            scheme: scheme.to_string(),
            user: user.map(str::to_string),
            host,
            port,
            path,
        }))
    }

    /// The address to connect to (resolved here: the kernel clients need
    /// an IP address).
    pub fn ip(&self) -> Result<std::net::IpAddr> {
        if let Ok(ip) = self.host.parse() {
            return Ok(ip);
        }
        use std::net::ToSocketAddrs;
        let addrs = (self.host.as_str(), self.port.unwrap_or(0))
            .to_socket_addrs()
            .with_context(|| {
                format!(
                    "cannot resolve the host name {:?} (check DNS in the network setup, or use its IP address in the URL)",
                    self.host
                )
            })?;
        addrs
            .map(|a| a.ip())
            .next()
            .with_context(|| format!("the host name {:?} has no address", self.host))
    }
}

/// Credentials from a mount.cifs style file: `username=`, `password=`,
/// `domain=` (also `user=`, `pass=`, `workgroup=`); `#` comments.
#[derive(Clone, Default, PartialEq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    pub domain: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, password hidden)", self.username)
    }
}

impl Credentials {
    pub fn parse(text: &str) -> Result<Credentials> {
        let mut c = Credentials::default();
        for line in text.lines() {
            let line = line.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                bail!("line without `=` (expected username=, password=, domain=)");
            };
            let v = v.trim_end_matches(['\r', '\n']);
            match k.trim() {
                "username" | "user" => c.username = v.trim().to_string(),
                "password" | "pass" => c.password = v.to_string(),
                "domain" | "dom" | "workgroup" => c.domain = Some(v.trim().to_string()),
                other => bail!("unknown key {other:?} (expected username=, password=, domain=)"),
            }
        }
        if c.username.is_empty() {
            bail!("no username= line");
        }
        Ok(c)
    }

    pub fn from_file(p: &Path) -> Result<Credentials> {
        let t = std::fs::read_to_string(p)
            .with_context(|| format!("cannot read the credentials file {}", p.display()))?;
        Credentials::parse(&t).with_context(|| format!("credentials file {}", p.display()))
    }
}

/// Where a share is mounted: one directory per URL (its host and path).
fn net_mountpoint(n: &NetUrl) -> PathBuf {
    let name: String = format!("{}-{}{}", n.scheme, n.host, n.path)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    PathBuf::from("/run/lifeboat/net").join(name)
}

/// The kernel mount(2) call for an NFS or CIFS URL: (source, fstype,
/// options). The options may hold a password: never print them.
fn share_mount_args(
    n: &NetUrl,
    ip: std::net::IpAddr,
    acc: &Access,
) -> Result<(String, String, String)> {
    let user_opts = acc.options.clone().unwrap_or_default();
    let has = |k: &str| user_opts.split(',').any(|o| o.split('=').next() == Some(k));
    let mut opts: Vec<String> = Vec::new();
    let host_part = match ip {
        std::net::IpAddr::V6(_) => format!("[{ip}]"),
        _ => ip.to_string(),
    };
    if n.scheme == "nfs" {
        let v3 = user_opts
            .split(',')
            .any(|o| matches!(o, "vers=2" | "vers=3" | "nfsvers=2" | "nfsvers=3"));
        opts.push(format!("addr={ip}"));
        if let Some(p) = n.port {
            opts.push(format!("port={p}"));
        }
        if !user_opts.is_empty() {
            opts.push(user_opts.clone());
        }
        let fstype = if v3 { "nfs" } else { "nfs4" };
        return Ok((
            format!("{host_part}:{}", n.path),
            fstype.into(),
            opts.join(","),
        ));
    }
    // cifs: //host/share, anything after the share is a directory in it.
    let mut comps = n.path.trim_start_matches('/').splitn(2, '/');
    let share = comps.next().unwrap_or("");
    if share.is_empty() {
        bail!(
            "cifs://{}: the URL names no share (cifs://host/share[/dir])",
            n.host
        );
    }
    opts.push(format!("ip={ip}"));
    opts.push(format!("unc=\\\\{host_part}\\{share}"));
    if let Some(p) = n.port {
        opts.push(format!("port={p}"));
    }
    match &acc.credentials {
        Some(f) => {
            let c = Credentials::from_file(f)?;
            let esc = |s: &str| s.replace(',', ",,");
            opts.push(format!("username={}", esc(&c.username)));
            opts.push(format!("password={}", esc(&c.password)));
            if let Some(d) = &c.domain {
                opts.push(format!("domain={}", esc(d)));
            }
        }
        None if n.user.is_some() => opts.push(format!("username={}", n.user.as_deref().unwrap_or(""))),
        None if has("guest") || has("sec") => {}
        None => bail!(
            "cifs://{}{} needs credentials: set backup_credentials to a file with username= and password= lines \
             (at recovery: `lifeboat recover --credentials FILE`)",
            n.host,
            n.path
        ),
    }
    if !user_opts.is_empty() {
        opts.push(user_opts);
    }
    Ok((
        format!("//{host_part}/{share}"),
        "cifs".into(),
        opts.join(","),
    ))
}

/// How long a network backup server may take to accept a connection.
const REACH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The IPv4 addresses and the default route, for messages ("no address,
/// no default route" when the network never came up).
pub fn network_summary() -> String {
    let mut addrs = Vec::new();
    // /proc/net/fib_trie lists local addresses as "/32 host LOCAL".
    let trie = std::fs::read_to_string("/proc/net/fib_trie").unwrap_or_default();
    let mut last = "";
    for l in trie.lines() {
        let t = l.trim();
        if let Some(a) = t.strip_prefix("|-- ") {
            last = a;
        } else if t.contains("host LOCAL") && !last.starts_with("127.") && !addrs.contains(&last) {
            addrs.push(last);
        }
    }
    let route = std::fs::read_to_string("/proc/net/route")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .any(|l| l.split_whitespace().nth(1) == Some("00000000"));
    format!(
        "{}, {}",
        if addrs.is_empty() {
            "no address".to_string()
        } else {
            format!("address {}", addrs.join(", "))
        },
        if route {
            "a default route"
        } else {
            "no default route"
        }
    )
}

/// Mount an nfs:// or cifs:// share with the kernel's client.
fn mount_share(n: &NetUrl, url: &str, key: &str, acc: &Access) -> Result<Local> {
    let mp = net_mountpoint(n);
    let sub = if n.scheme == "cifs" {
        n.path
            .trim_start_matches('/')
            .split_once('/')
            .map(|x| x.1)
            .unwrap_or("")
            .to_string()
    } else {
        String::new()
    };
    let already = Command::new("findmnt")
        .args(["--noheadings", "--mountpoint"])
        .arg(&mp)
        .output()
        .map(|o| o.status.success() && !o.stdout.is_empty())
        .unwrap_or(false);
    if already {
        return Ok(Local {
            path: mp.join(sub),
            mounted: vec![],
        });
    }
    let ip = n.ip().with_context(|| format!("{key} = {url:?}"))?;
    let (source, fstype, data) =
        share_mount_args(n, ip, acc).with_context(|| format!("{key} = {url:?}"))?;
    // The kernel's client may retry an unreachable server for minutes: a
    // plain connect says at once (within REACH_TIMEOUT) when it is not there.
    let v3 = data.contains("vers=3") || data.contains("vers=2");
    let port = n.port.unwrap_or(match (fstype.as_str(), v3) {
        ("cifs", _) => 445,
        (_, true) => 111,
        _ => 2049,
    });
    if let Err(e) =
        std::net::TcpStream::connect_timeout(&std::net::SocketAddr::new(ip, port), REACH_TIMEOUT)
    {
        bail!(
            "{key} = {url:?}: the server {ip} port {port} cannot be reached ({e}, waited up to {} s): \
             the network is down or the server is off. This system's network: {}. Check the cable, DHCP \
             or the ip= boot option, and that the server runs",
            REACH_TIMEOUT.as_secs(),
            network_summary()
        );
    }
    // The client modules may not be loaded yet (the rescue OS loads only
    // what its hardware needs).
    let mods: &[&str] = if fstype == "cifs" {
        &["cifs"]
    } else {
        &["nfs", "nfsv4", "nfsv3"]
    };
    for m in mods {
        let _ = Command::new("modprobe").args(["-q", m]).status();
    }
    std::fs::create_dir_all(&mp).with_context(|| format!("cannot create {}", mp.display()))?;
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL in mount arguments");
    let (cs, ct, cf, cd) = (c(&source), c(&mp.to_string_lossy()), c(&fstype), c(&data));
    let flags = if acc.read_only { libc::MS_RDONLY } else { 0 };
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    let rc = unsafe {
        libc::mount(
            cs.as_ptr(),
            ct.as_ptr(),
            cf.as_ptr(),
            flags,
            cd.as_ptr().cast(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        let _ = std::fs::remove_dir(&mp);
        let hint = match e.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EPERM) => "the server refused access: check the export/share permissions and the credentials",
            Some(libc::ENODEV) => "the kernel has no client for it: the nfs/cifs modules are missing from this system",
            Some(libc::ECONNREFUSED) | Some(libc::ETIMEDOUT) | Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH) => {
                "the server cannot be reached: check the network (ip a, ip r) and that the server runs"
            }
            Some(libc::ENOENT) => "the export or share does not exist on the server",
            _ => "see dmesg for the kernel client's reason",
        };
        bail!(
            "{key} = {url:?}: cannot mount {source} ({fstype}) at {}: {e}; {hint}",
            mp.display()
        );
    }
    let path = mp.join(&sub);
    if !acc.read_only {
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
    }
    Ok(Local {
        path,
        mounted: vec![mp],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usb_urls() {
        assert_eq!(
            parse_usb("usb://REAR-000"),
            Some(("REAR-000".into(), "".into()))
        );
        assert_eq!(
            parse_usb("usb://LB/backups/x/"),
            Some(("LB".into(), "backups/x".into()))
        );
        assert_eq!(
            parse_usb("usb:///dev/disk/by-label/LB/b"),
            Some(("LB".into(), "b".into()))
        );
        assert_eq!(parse_usb("usb://"), None);
        assert_eq!(parse_usb("file:///x"), None);
    }

    #[test]
    fn file_urls_and_errors() {
        assert_eq!(
            local("file:///srv/b", "BACKUP_URL").unwrap().path,
            PathBuf::from("/srv/b")
        );
        let e = local("ftp://server/x", "BACKUP_URL")
            .unwrap_err()
            .to_string();
        assert!(e.contains("BACKUP_URL") && e.contains("usb://LABEL"), "{e}");
        let e = local("usb://NO-SUCH-LABEL-LIFEBOAT", "BACKUP_URL")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no filesystem with the label NO-SUCH-LABEL-LIFEBOAT"),
            "{e}"
        );
    }

    #[test]
    fn network_urls() {
        let n = NetUrl::parse("nfs://10.0.2.2:20490/srv/backup/")
            .unwrap()
            .unwrap();
        assert_eq!(
            n,
            NetUrl {
                scheme: "nfs".into(),
                user: None,
                host: "10.0.2.2".into(),
                port: Some(20490),
                path: "/srv/backup".into()
            }
        );
        let n = NetUrl::parse("cifs://backup@[fd00::1]/share")
            .unwrap()
            .unwrap();
        assert_eq!(
            (n.user.as_deref(), n.host.as_str(), n.port),
            (Some("backup"), "fd00::1", None)
        );
        assert_eq!(NetUrl::parse("file:///x").unwrap(), None);
        let e = NetUrl::parse("cifs://joe:secret@host/share")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("credentials file") && !e.contains("secret"),
            "{e}"
        );
        assert!(NetUrl::parse("nfs://host:x/a").is_err());
        assert!(NetUrl::parse("nfs:///a").is_err());
    }

    #[test]
    fn kernel_mount_options() {
        let ip: std::net::IpAddr = "10.0.2.2".parse().unwrap();
        let n = NetUrl::parse("nfs://10.0.2.2:20490/backup")
            .unwrap()
            .unwrap();
        let (src, t, o) = share_mount_args(&n, ip, &Access::default()).unwrap();
        assert_eq!(
            (src.as_str(), t.as_str(), o.as_str()),
            ("10.0.2.2:/backup", "nfs4", "addr=10.0.2.2,port=20490")
        );
        let acc = Access {
            options: Some("vers=3,nolock".into()),
            ..Default::default()
        };
        assert_eq!(share_mount_args(&n, ip, &acc).unwrap().1, "nfs");
        let d = tempfile::tempdir().unwrap();
        let cred = d.path().join("cred");
        std::fs::write(&cred, "# test\nusername=lb\npassword=a,b c\ndomain=WG\n").unwrap();
        let acc = Access {
            credentials: Some(cred),
            ..Default::default()
        };
        let n = NetUrl::parse("cifs://10.0.2.2:4450/backup/lifeboat")
            .unwrap()
            .unwrap();
        let (src, t, o) = share_mount_args(&n, ip, &acc).unwrap();
        assert_eq!((src.as_str(), t.as_str()), ("//10.0.2.2/backup", "cifs"));
        assert_eq!(
            o,
            "ip=10.0.2.2,unc=\\\\10.0.2.2\\backup,port=4450,username=lb,password=a,,b c,domain=WG"
        );
        let e = format!(
            "{:#}",
            share_mount_args(&n, ip, &Access::default()).unwrap_err()
        );
        assert!(
            e.contains("needs credentials") && e.contains("--credentials"),
            "{e}"
        );
        let c = Credentials::parse("user=x\npass=y\n").unwrap();
        assert!(
            !format!("{c:?}").contains('y'),
            "Debug must hide the password"
        );
        assert!(Credentials::parse("password=y\n").is_err());
        assert!(Credentials::parse("colour=y\n").is_err());
    }
}
