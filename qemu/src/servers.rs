//! Real file servers on 127.0.0.1 for the backup-location tests: nginx
//! (HTTP with WebDAV PUT/MKCOL), nfs-ganesha (NFSv4) and samba (SMB3).
//! A QEMU guest on user networking reaches them at 10.0.2.2:<port>.
//!
//! Each runs with a private configuration under its own directory and is
//! stopped when dropped. `scripts/setup.sh` installs the packages.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running server; killed when dropped.
pub struct Server {
    pub port: u16,
    /// Where it serves from (the web root, the export, the share).
    pub root: PathBuf,
    /// Its configuration and logs.
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn need(bin: &str, package: &str) {
    let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(bin).exists());
    assert!(
        found,
        "{bin} is not installed: apt-get install {package} (scripts/setup.sh installs it)"
    );
}

fn wait_listening(port: u16, what: &str, log: &Path) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "{what} did not listen on 127.0.0.1:{port} within 30 s; its log {}:\n{}",
        log.display(),
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// Start `cmd` so that it dies with this process (PR_SET_PDEATHSIG, from
/// a thread that lives as long as the process: servers kept in statics
/// are never dropped). Servers of an earlier, killed run with the same
/// configuration are stopped first.
fn spawn_tied(mut cmd: Command, conf: &Path) -> Child {
    let _ = Command::new("pkill")
        .arg("-f")
        .arg(conf)
        .stdout(Stdio::null())
        .status();
    std::thread::sleep(Duration::from_millis(200));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let _ = tx.send(cmd.spawn());
        loop {
            std::thread::park();
        }
    });
    rx.recv()
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot start a server ({}): {e}", conf.display()))
}

fn fresh(dir: &Path) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    dir.to_path_buf()
}

/// nginx serving `dir/www` with PUT, DELETE and MKCOL (WebDAV) enabled.
pub fn nginx(dir: &Path) -> Server {
    nginx_with(dir, false)
}

/// [`nginx`] over TLS, with a certificate for 127.0.0.1 and 10.0.2.2
/// signed by a private CA made here: `dir/ca.pem`.
pub fn nginx_tls(dir: &Path) -> Server {
    nginx_with(dir, true)
}

/// A private CA (`dir/ca.pem`) and a server certificate for 127.0.0.1 and
/// 10.0.2.2 signed by it (`dir/srv.pem`, key `dir/srv.key`).
pub fn make_certs(dir: &Path) {
    need("openssl", "openssl");
    let sh = format!(
        "cd {d} && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key \
         -out ca.pem -days 2 -subj /CN=lifeboat-test-ca 2>/dev/null && \
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout srv.key -out srv.csr \
         -subj /CN=127.0.0.1 2>/dev/null && \
         printf 'subjectAltName=IP:127.0.0.1,IP:10.0.2.2\\nbasicConstraints=CA:FALSE\\n' > ext && \
         openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 2 \
         -extfile ext 2>/dev/null",
        d = dir.display()
    );
    let st = Command::new("sh").args(["-c", &sh]).status().unwrap();
    assert!(st.success(), "openssl could not make the test certificates");
}

fn nginx_with(dir: &Path, tls: bool) -> Server {
    need("nginx", "nginx-light");
    let dir = fresh(dir);
    let mut listen_extra = String::new();
    if tls {
        make_certs(&dir);
        listen_extra = format!(
            " ssl;\n    ssl_certificate {d}/srv.pem;\n    ssl_certificate_key {d}/srv.key",
            d = dir.display()
        );
    }
    let root = dir.join("www");
    std::fs::create_dir_all(&root).unwrap();
    let port = crate::free_port();
    let d = dir.display();
    let conf = format!(
        "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{}}\n\
         http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         server {{\n    listen 127.0.0.1:{port}{listen_extra};\n    root {};\n    client_max_body_size 0;\n\
         dav_methods PUT DELETE MKCOL;\n    dav_access user:rw group:r all:r;\n    create_full_put_path on;\n  }}\n}}\n",
        root.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let mut cmd = Command::new("nginx");
    cmd.arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = spawn_tied(cmd, &dir.join("nginx.conf"));
    wait_listening(port, "nginx", &dir.join("error.log"));
    Server {
        port,
        root,
        dir,
        child: Some(child),
    }
}

/// nfs-ganesha exporting `dir/export` as `/backup` (NFSv4 over TCP, root
/// not squashed, no rpcbind needed).
pub fn ganesha(dir: &Path) -> Server {
    need("ganesha.nfsd", "nfs-ganesha nfs-ganesha-vfs");
    let dir = fresh(dir);
    let root = dir.join("export");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let port = crate::free_port();
    let conf = format!(
        "NFS_CORE_PARAM {{ NFS_Port = {port}; Protocols = 4; Enable_NLM = false; Enable_RQUOTA = false; Bind_addr = 127.0.0.1; }}\n\
         NFSv4 {{ Graceless = true; RecoveryBackend = fs; RecoveryRoot = {state}; }}\n\
         EXPORT {{ Export_Id = 1; Path = {root}; Pseudo = /backup; Access_Type = RW; Squash = No_Root_Squash; \
         SecType = sys; Transports = TCP; Protocols = 4; FSAL {{ Name = VFS; }} }}\n\
         LOG {{ Default_Log_Level = EVENT; }}\n",
        state = dir.join("state").display(),
        root = root.display()
    );
    std::fs::write(dir.join("ganesha.conf"), conf).unwrap();
    let log = dir.join("ganesha.log");
    let mut cmd = Command::new("ganesha.nfsd");
    cmd.arg("-F")
        .arg("-L")
        .arg(&log)
        .arg("-f")
        .arg(dir.join("ganesha.conf"))
        .arg("-p")
        .arg(dir.join("ganesha.pid"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = spawn_tied(cmd, &dir.join("ganesha.conf"));
    wait_listening(port, "nfs-ganesha", &log);
    Server {
        port,
        root,
        dir,
        child: Some(child),
    }
}

/// samba sharing `dir/share` as `backup`; user `root` with `password`.
pub fn samba(dir: &Path, password: &str) -> Server {
    need("smbd", "samba");
    let dir = fresh(dir);
    let root = dir.join("share");
    for d in ["share", "priv", "lock", "state", "cache", "pid", "log"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    let port = crate::free_port();
    let d = dir.display();
    let conf = format!(
        "[global]\n  smb ports = {port}\n  interfaces = 127.0.0.1\n  bind interfaces only = yes\n  disable netbios = yes\n\
         private dir = {d}/priv\n  lock directory = {d}/lock\n  state directory = {d}/state\n  cache directory = {d}/cache\n\
         pid directory = {d}/pid\n  ncalrpc dir = {d}/lock/ncalrpc\n  passdb backend = tdbsam:{d}/priv/passdb.tdb\n\
         log file = {d}/log/smbd.log\n  server min protocol = SMB2\n  server role = standalone server\n  map to guest = never\n\
         [backup]\n  path = {}\n  read only = no\n",
        root.display()
    );
    let conf_path = dir.join("smb.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let mut c = Command::new("smbpasswd")
        .arg("-c")
        .arg(&conf_path)
        .args(["-s", "-a", "root"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("cannot run smbpasswd");
    use std::io::Write;
    writeln!(c.stdin.take().unwrap(), "{password}\n{password}").unwrap();
    assert!(c.wait().unwrap().success(), "smbpasswd failed");
    let mut cmd = Command::new("smbd");
    cmd.arg("-s")
        .arg(&conf_path)
        .args(["--foreground", "--no-process-group"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = spawn_tied(cmd, &conf_path);
    wait_listening(port, "smbd", &dir.join("log/smbd.log"));
    Server {
        port,
        root,
        dir,
        child: Some(child),
    }
}

/// OpenSSH's sshd with its internal SFTP server; root logs in with the key
/// `dir/id_ed25519` (made here). `dir/known_hosts` holds the host key, for
/// `ssh -o UserKnownHostsFile=...`.
pub fn sshd(dir: &Path) -> Server {
    need("sshd", "openssh-server");
    let dir = fresh(dir);
    let root = dir.join("files");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let keygen = |path: &Path| {
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(path)
            .status()
            .expect("cannot run ssh-keygen");
        assert!(st.success(), "ssh-keygen failed");
    };
    keygen(&dir.join("host_key"));
    keygen(&dir.join("id_ed25519"));
    std::fs::copy(dir.join("id_ed25519.pub"), dir.join("authorized_keys")).unwrap();
    let port = crate::free_port();
    let host_pub = std::fs::read_to_string(dir.join("host_key.pub")).unwrap();
    std::fs::write(
        dir.join("known_hosts"),
        format!("[127.0.0.1]:{port} {host_pub}[10.0.2.2]:{port} {host_pub}"),
    )
    .unwrap();
    let d = dir.display();
    let conf = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
         AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n\
         KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nSubsystem sftp internal-sftp\n"
    );
    let conf_path = dir.join("sshd_config");
    std::fs::write(&conf_path, conf).unwrap();
    let mut cmd = Command::new("/usr/sbin/sshd");
    cmd.arg("-D")
        .arg("-f")
        .arg(&conf_path)
        .arg("-E")
        .arg(dir.join("sshd.log"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = spawn_tied(cmd, &conf_path);
    wait_listening(port, "sshd", &dir.join("sshd.log"));
    Server {
        port,
        root,
        dir,
        child: Some(child),
    }
}

/// `lifeboat serve` (the binary `bin`) serving `dir/root` on 127.0.0.1:`port`
/// (0: a free port) with extra `args`; output in `dir/serve.log`. The root
/// is kept, so a second call after a drop restarts the same server.
pub fn lifeboat_serve(dir: &Path, bin: &Path, port: u16, args: &[&str]) -> Server {
    std::fs::create_dir_all(dir).unwrap();
    let root = dir.join("root");
    let port = if port == 0 { crate::free_port() } else { port };
    let log = dir.join("serve.log");
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap();
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .arg("--root")
        .arg(&root)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .args(args)
        .env("LIFEBOAT_CONFIG_DIR", dir.join("etc"))
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    let child = spawn_tied(cmd, &root);
    wait_listening(port, "lifeboat serve", &log);
    Server {
        port,
        root,
        dir: dir.to_path_buf(),
        child: Some(child),
    }
}
