//! sshd in the rescue OS: host keys generated at boot, our own
//! sshd_config, keys only unless a password hash was configured.

use crate::log::log;
use lifeboat_contract::SshConfig;
use std::path::Path;
use std::process::{Command, Stdio};

const SSHD: &str = "/usr/sbin/sshd";

pub fn config_text(c: &SshConfig) -> String {
    let password = c.password_hash.is_some();
    format!(
        "# written by lifeboat-init\n\
         Port {port}\n\
         HostKey /etc/ssh/ssh_host_ed25519_key\n\
         HostKey /etc/ssh/ssh_host_ecdsa_key\n\
         PermitRootLogin {root}\n\
         PubkeyAuthentication yes\n\
         AuthorizedKeysFile .ssh/authorized_keys\n\
         PasswordAuthentication {pw}\n\
         KbdInteractiveAuthentication no\n\
         PermitEmptyPasswords no\n\
         UsePAM no\n\
         PrintMotd no\n\
         PidFile /run/sshd.pid\n\
         Subsystem sftp internal-sftp\n",
        port = c.port,
        root = if password { "yes" } else { "prohibit-password" },
        pw = if password { "yes" } else { "no" },
    )
}

/// Start sshd in a child process that first generates the host keys (which
/// may wait for the kernel's entropy) and then becomes sshd. Returns its pid.
/// A separate process, because PID 1 reaps every child it has: a thread of
/// ours could not wait for ssh-keygen.
pub fn start(c: &SshConfig) -> Option<libc::pid_t> {
    if !Path::new(SSHD).exists() {
        log("sshd is not in this image; no remote access");
        return None;
    }
    match crate::fork_session("sshd")? {
        0 => {}
        pid => return Some(pid),
    }
    match prepare(c) {
        Ok(()) => exec_sshd(c),
        Err(e) => {
            log(&format!("{e}; sshd not started"));
            unsafe { libc::_exit(1) }
        }
    }
}

fn prepare(c: &SshConfig) -> Result<(), String> {
    let _ = std::fs::create_dir_all("/etc/ssh");
    let _ = std::fs::create_dir_all("/run/sshd");
    for (kind, file) in [
        ("ed25519", "/etc/ssh/ssh_host_ed25519_key"),
        ("ecdsa", "/etc/ssh/ssh_host_ecdsa_key"),
    ] {
        if Path::new(file).exists() {
            continue;
        }
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", kind, "-N", "", "-f", file])
            .stdin(Stdio::null())
            .status();
        if !matches!(st, Ok(s) if s.success()) {
            return Err(format!("cannot generate the {kind} host key ({st:?})"));
        }
    }
    if let Some(hash) = &c.password_hash {
        set_root_hash(hash);
    }
    std::fs::write("/etc/ssh/sshd_config", config_text(c))
        .map_err(|e| format!("cannot write /etc/ssh/sshd_config: {e}"))
}

fn exec_sshd(c: &SshConfig) -> ! {
    use std::os::unix::process::CommandExt;
    let keys = std::fs::read_to_string("/root/.ssh/authorized_keys")
        .map(|t| t.lines().count())
        .unwrap_or(0);
    log(&format!(
        "sshd listening on port {} ({keys} authorized key(s){})",
        c.port,
        if c.password_hash.is_some() {
            ", password login allowed"
        } else {
            ", no password login"
        }
    ));
    let mut cmd = Command::new(SSHD);
    cmd.args(["-D", "-e", "-f", "/etc/ssh/sshd_config"])
        .stdin(Stdio::null());
    if let Ok(f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open("/run/lifeboat/sshd.log")
    {
        if let Ok(f2) = f.try_clone() {
            cmd.stdout(f2);
        }
        cmd.stderr(f);
    }
    let e = cmd.exec();
    log(&format!("cannot start sshd: {e}"));
    unsafe { libc::_exit(1) }
}

fn set_root_hash(hash: &str) {
    let Ok(text) = std::fs::read_to_string("/etc/shadow") else {
        return;
    };
    let out: Vec<String> = text
        .lines()
        .map(|l| match l.split_once(':') {
            Some(("root", rest)) => {
                let tail = rest.split_once(':').map(|(_, t)| t).unwrap_or("");
                format!("root:{hash}:{tail}")
            }
            _ => l.to_string(),
        })
        .collect();
    let _ = std::fs::write("/etc/shadow", out.join("\n") + "\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_off_unless_a_hash_is_configured() {
        let c = SshConfig::default();
        let t = config_text(&c);
        assert!(t.contains("PasswordAuthentication no"));
        assert!(t.contains("PermitRootLogin prohibit-password"));
        let c = SshConfig {
            password_hash: Some("$6$x$y".into()),
            port: 2222,
            ..Default::default()
        };
        let t = config_text(&c);
        assert!(t.contains("PasswordAuthentication yes") && t.contains("Port 2222"));
    }
}
