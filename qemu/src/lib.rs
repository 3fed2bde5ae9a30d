//! A small QEMU harness: boot a kernel and initrd under TCG (or KVM when
//! `LIFEBOAT_QEMU_ACCEL=kvm`), capture the serial console into memory and a
//! log file, wait for markers with a timeout, and type commands. QEMU is
//! killed when the [`Vm`] is dropped, also when a test panics.

pub mod servers;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootSpec {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
    pub memory_mb: u32,
    pub cpus: u32,
    /// Where the console is logged (in addition to memory).
    pub log: Option<PathBuf>,
    /// Boot with UEFI firmware (OVMF) instead of SeaBIOS.
    pub uefi: bool,
    /// The OVMF variable store (NVRAM). `None`: [`Vm::boot`] makes a fresh
    /// copy of the template and removes it with the VM; a given file is
    /// used and kept (two boots of one machine share their NVRAM).
    pub uefi_vars: Option<PathBuf>,
    pub extra_args: Vec<String>,
}

impl BootSpec {
    /// Add a virtio NIC on QEMU's user-mode network (slirp: DHCP gives
    /// 10.0.2.15, the host is 10.0.2.2). `opts` are extra netdev options
    /// such as `hostfwd=tcp:127.0.0.1:2222-:22`.
    pub fn with_user_net(mut self, opts: &str) -> BootSpec {
        let mut nd = "user,id=n0".to_string();
        if !opts.is_empty() {
            nd.push(',');
            nd.push_str(opts);
        }
        self.extra_args.extend([
            "-netdev".to_string(),
            nd,
            "-device".into(),
            "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56".into(),
        ]);
        self
    }

    /// Boot from the attached disks through their own bootloader.
    pub fn from_disks() -> BootSpec {
        BootSpec::new(Path::new(""), Path::new(""))
    }

    /// Attach `file` as the next virtio disk (`raw` or `qcow2`), with a
    /// serial number when given (the guest sees it in /sys/block/*/serial).
    pub fn with_disk(self, file: &Path, format: &str, serial: Option<&str>) -> BootSpec {
        let serial = serial.map(|s| format!(",serial={s}")).unwrap_or_default();
        self.with_drive(file, format, "virtio-blk-pci", "disk", &serial)
    }

    /// A `-drive` for `file` and the `-device` of model `model` that
    /// holds it; ids are `<prefix><N>`, N counting that model's devices.
    fn with_drive(
        mut self,
        file: &Path,
        format: &str,
        model: &str,
        prefix: &str,
        device_opts: &str,
    ) -> BootSpec {
        let n = self
            .extra_args
            .iter()
            .filter(|a| a.starts_with(&format!("{model},drive=")))
            .count();
        self.extra_args.extend([
            "-drive".to_string(),
            format!(
                "file={},format={format},if=none,id={prefix}{n},cache=unsafe",
                file.display()
            ),
            "-device".into(),
            format!("{model},drive={prefix}{n}{device_opts}"),
        ]);
        self
    }

    /// Add a disk on its own NVMe controller (`/dev/nvme<N>n1` in the
    /// guest). NVMe needs a serial.
    pub fn with_nvme(self, file: &Path, format: &str, serial: &str) -> BootSpec {
        self.with_drive(file, format, "nvme", "nvme", &format!(",serial={serial}"))
    }

    pub fn new(kernel: &Path, initrd: &Path) -> BootSpec {
        BootSpec {
            kernel: kernel.to_path_buf(),
            initrd: initrd.to_path_buf(),
            append: "console=ttyS0".into(),
            memory_mb: 1024,
            cpus: 2,
            log: None,
            uefi: false,
            uefi_vars: None,
            extra_args: vec![],
        }
    }
}

/// The accelerator: TCG unless LIFEBOAT_QEMU_ACCEL says otherwise (KVM
/// hangs right after the BIOS on some CI machines).
pub fn accel() -> String {
    std::env::var("LIFEBOAT_QEMU_ACCEL").unwrap_or_else(|_| "tcg".into())
}

/// Machine, kernel, initrd, command line, RNG and the spec's extra
/// arguments (no console wiring).
pub fn base_args(spec: &BootSpec) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "-accel".into(),
        accel(),
        "-m".into(),
        spec.memory_mb.to_string(),
        "-smp".into(),
        spec.cpus.to_string(),
    ];
    // Without a kernel the firmware boots the disks (their own bootloader).
    if !spec.kernel.as_os_str().is_empty() {
        v.extend([
            "-kernel".into(),
            spec.kernel.display().to_string(),
            "-initrd".into(),
            spec.initrd.display().to_string(),
            "-append".into(),
            spec.append.clone(),
        ]);
    }
    v.extend([
        "-no-reboot".to_string(),
        // RDRAND (-cpu max) and a virtio RNG, as real machines and most
        // clouds have: without them TCG guests wait minutes for entropy.
        "-cpu".into(),
        "max".into(),
        "-device".into(),
        "virtio-rng-pci".into(),
    ]);
    if let Some(vars) = &spec.uefi_vars {
        let (code, _) = ovmf();
        v.extend([
            "-drive".into(),
            format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                code.display()
            ),
            "-drive".into(),
            format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
        ]);
    }
    v.extend(spec.extra_args.iter().cloned());
    v
}

/// OVMF code and variable-store templates (Debian package `ovmf`).
pub fn ovmf() -> (PathBuf, PathBuf) {
    for d in ["/usr/share/OVMF", "/usr/share/ovmf"] {
        let (c, v) = (
            Path::new(d).join("OVMF_CODE.fd"),
            Path::new(d).join("OVMF_VARS.fd"),
        );
        if c.exists() && v.exists() {
            return (c, v);
        }
    }
    (
        PathBuf::from("/usr/share/OVMF/OVMF_CODE.fd"),
        PathBuf::from("/usr/share/OVMF/OVMF_VARS.fd"),
    )
}

/// A private, writable copy of the OVMF variable store for one VM.
pub fn ovmf_vars_copy() -> std::io::Result<PathBuf> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let (_, vars) = ovmf();
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let p = std::env::temp_dir().join(format!("lifeboat-ovmf-vars-{}-{n}.fd", std::process::id()));
    std::fs::copy(&vars, &p).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot copy {} (apt-get install ovmf): {e}", vars.display()),
        )
    })?;
    Ok(p)
}

/// What [`Vm::run_command`] saw.
#[derive(Debug, Clone)]
pub struct Ran {
    /// Console offset just past the exit status.
    pub end: usize,
    pub status: i32,
    /// What the command printed (terminal escape sequences removed).
    pub output: String,
}

/// Remove terminal escape sequences (bash's bracketed-paste toggles).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\x1b' && it.peek() == Some(&'[') {
            it.next();
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub struct Vm {
    child: Child,
    commands: u32,
    /// The variable store this VM made itself (removed on drop).
    vars: Option<PathBuf>,
    stdin: Option<ChildStdin>,
    console: Arc<Mutex<Vec<u8>>>,
}

impl Vm {
    pub fn boot(spec: &BootSpec) -> std::io::Result<Vm> {
        let mut spec = spec.clone();
        let mut own_vars = None;
        if spec.uefi && spec.uefi_vars.is_none() {
            let v = ovmf_vars_copy()?;
            spec.uefi_vars = Some(v.clone());
            own_vars = Some(v);
        }
        let spec = &spec;
        let mut cmd = Command::new("qemu-system-x86_64");
        // QEMU dies with its parent, even when the parent exits without
        // dropping the Vm (process::exit, a killed test run).
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        cmd.args(base_args(spec))
            .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot start qemu-system-x86_64 (apt-get install qemu-system-x86): {e}"),
            )
        })?;
        let console = Arc::new(Mutex::new(Vec::new()));
        let mut log = match &spec.log {
            Some(p) => Some(std::fs::File::create(p)?),
            None => None,
        };
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let console = console.clone();
            let mut log = log.as_mut().map(|f| f.try_clone().unwrap());
            let mut stream = stream;
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    console.lock().unwrap().extend_from_slice(&buf[..n]);
                    if let Some(f) = log.as_mut() {
                        let _ = f.write_all(&buf[..n]);
                    }
                }
            });
        }
        let stdin = child.stdin.take();
        Ok(Vm {
            child,
            commands: 0,
            vars: own_vars,
            stdin,
            console,
        })
    }

    /// Everything the console printed so far (carriage returns removed).
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.console.lock().unwrap()).replace('\r', "")
    }

    /// Wait until the console contains `marker` after byte offset `from`;
    /// returns the offset just past it. On timeout the error shows the
    /// console's tail.
    pub fn wait_for_from(
        &mut self,
        marker: &str,
        from: usize,
        timeout: Duration,
    ) -> Result<usize, String> {
        let t0 = Instant::now();
        loop {
            let text = self.console();
            if let Some(i) = text.get(from..).and_then(|t| t.find(marker)) {
                return Ok(from + i + marker.len());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!(
                    "QEMU exited ({st}) before {marker:?} appeared; console tail:\n{}",
                    tail(&text, 3000)
                ));
            }
            if t0.elapsed() > timeout {
                return Err(format!(
                    "{marker:?} did not appear within {timeout:?}; console tail:\n{}",
                    tail(&text, 3000)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> Result<usize, String> {
        self.wait_for_from(marker, 0, timeout)
    }

    /// Type `cmd` at the shell prompt and wait until it finished. The
    /// command line is followed by `echo <marker>-$?`; the shell's echo of
    /// the typed line also shows the marker, followed by `-$?`, so the answer
    /// is the occurrence followed by digits and a line end.
    pub fn run_command(
        &mut self,
        from: usize,
        cmd: &str,
        timeout: Duration,
    ) -> Result<Ran, String> {
        self.commands += 1;
        let tag = format!("LIFEBOAT-QEMU-DONE-{}", self.commands);
        self.send_line(&format!("{cmd}; echo {tag}-$?"))
            .map_err(|e| format!("cannot type on the console: {e}"))?;
        let t0 = Instant::now();
        let mut pos = from;
        loop {
            let left = timeout.saturating_sub(t0.elapsed());
            let n = self.wait_for_from(&format!("{tag}-"), pos, left)?;
            pos = n;
            loop {
                let text = self.console();
                let digits: String = text[n..]
                    .chars()
                    .take_while(|c| c.is_ascii_digit())
                    .collect();
                if digits.is_empty() {
                    break;
                }
                if text[n + digits.len()..].starts_with('\n') {
                    // The output starts after the echo of the typed line;
                    // a shell that redraws long lines (trixie's bash) may
                    // garble that echo, but its end, the status echo as
                    // typed, survives.
                    let start = text[..n]
                        .rfind(&format!("{cmd}; echo {tag}"))
                        .map(|i| i + cmd.len())
                        .or_else(|| {
                            text[..n]
                                .rfind(&format!("{tag}-$?"))
                                .map(|i| i + tag.len() + 3)
                        })
                        .unwrap_or(from);
                    return Ok(Ran {
                        end: n + digits.len(),
                        status: digits.parse().unwrap_or(-1),
                        output: strip_ansi(&text[start..n]),
                    });
                }
                if t0.elapsed() > timeout {
                    return Err(format!("{cmd:?} did not finish within {timeout:?}"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Wait until QEMU exits (the guest powered off or rebooted with
    /// `-no-reboot`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus, String> {
        let t0 = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Ok(st);
            }
            if t0.elapsed() > timeout {
                return Err(format!(
                    "QEMU still running after {timeout:?}; console tail:\n{}",
                    tail(&self.console(), 3000)
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Type a line on the serial console.
    pub fn send_line(&mut self, line: &str) -> std::io::Result<()> {
        let s = self
            .stdin
            .as_mut()
            .ok_or_else(|| std::io::Error::other("console input closed"))?;
        s.write_all(line.as_bytes())?;
        s.write_all(b"\n")?;
        s.flush()
    }
}

fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(v) = &self.vars {
            let _ = std::fs::remove_file(v);
        }
    }
}

/// A free TCP port on 127.0.0.1 (for hostfwd).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(2222)
}
