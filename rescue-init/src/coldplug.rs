//! Load drivers for the devices present (coldplug) and for devices that
//! appear while we do so (kernel uevents), from the builder's precomputed
//! module index: no libkmod, no udev.

use crate::log::{debug, log};
use lifeboat_contract::{alias_matches, normalize_alias, ModuleIndex, MODULE_INDEX_PATH};
use std::collections::HashSet;
use std::ffi::CString;
use std::time::{Duration, Instant};

pub struct Loader {
    index: ModuleIndex,
    base: String,
    loaded: HashSet<String>,
    failed: HashSet<String>,
    pub count: usize,
}

impl Loader {
    pub fn new() -> Option<Loader> {
        let text = match std::fs::read_to_string(format!("/{MODULE_INDEX_PATH}")) {
            Ok(t) => t,
            Err(e) => {
                log(&format!(
                    "no module index /{MODULE_INDEX_PATH} ({e}); drivers will not be loaded"
                ));
                return None;
            }
        };
        let index = match ModuleIndex::from_json(&text) {
            Ok(i) => i,
            Err(e) => {
                log(&format!("cannot use /{MODULE_INDEX_PATH}: {e}"));
                return None;
            }
        };
        let loaded = std::fs::read_to_string("/proc/modules")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(lifeboat_contract::normalize_module_name)
            .collect();
        let base = format!("/lib/modules/{}", index.kver);
        Some(Loader {
            index,
            base,
            loaded,
            failed: HashSet::new(),
            count: 0,
        })
    }

    /// Load `name` with its dependencies and softdeps. Errors are logged,
    /// never fatal: a driver that does not load leaves that device unused.
    pub fn load(&mut self, name: &str) {
        self.load_depth(name, 0)
    }

    fn load_depth(&mut self, name: &str, depth: u32) {
        let name = lifeboat_contract::normalize_module_name(name);
        if depth > 16 || self.loaded.contains(&name) || self.failed.contains(&name) {
            return;
        }
        let Some(entry) = self.index.modules.get(&name).cloned() else {
            if !self.index.builtin.contains(&name) {
                debug(&format!("module {name} is not in the image"));
            }
            self.loaded.insert(name);
            return;
        };
        // Mark first: softdep cycles must not recurse forever.
        self.loaded.insert(name.clone());
        for p in &entry.pre {
            self.load_depth(p, depth + 1);
        }
        for d in &entry.deps {
            self.load_depth(d, depth + 1);
        }
        let path = format!("{}/{}", self.base, entry.path);
        match finit_module(&path) {
            Ok(()) => {
                self.count += 1;
                debug(&format!("loaded {name}"));
            }
            Err(e) => {
                self.loaded.remove(&name);
                self.failed.insert(name.clone());
                log(&format!("cannot load module {name} ({path}): {e}"));
            }
        }
        for p in &entry.post {
            self.load_depth(p, depth + 1);
        }
    }

    /// Modules whose aliases match this modalias.
    pub fn modules_for(&self, modalias: &str) -> Vec<String> {
        let m = normalize_alias(modalias);
        let mut v: Vec<String> = self
            .index
            .aliases
            .iter()
            .filter(|(p, _)| alias_matches(p, &m))
            .map(|(_, n)| n.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    pub fn load_alias(&mut self, modalias: &str) {
        for m in self.modules_for(modalias) {
            self.load(&m);
        }
    }
}

fn finit_module(path: &str) -> std::io::Result<()> {
    let f = std::fs::File::open(path)?;
    use std::os::fd::AsRawFd;
    let empty = CString::new("").unwrap();
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), empty.as_ptr(), 0) };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        return Ok(());
    }
    Err(e)
}

/// Every modalias under /sys/devices.
pub fn scan_modaliases() -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![std::path::PathBuf::from("/sys/devices")];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() && e.file_name() == "modalias" {
                if let Ok(s) = std::fs::read_to_string(e.path()) {
                    let s = s.trim();
                    if !s.is_empty() {
                        out.push(s.to_string());
                    }
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// A netlink socket receiving kernel uevents.
pub struct Uevents {
    fd: i32,
}

impl Uevents {
    pub fn open() -> Option<Uevents> {
        unsafe {
            let fd = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_KOBJECT_UEVENT,
            );
            if fd < 0 {
                return None;
            }
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as u16;
            addr.nl_groups = 1;
            if libc::bind(
                fd,
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            ) != 0
            {
                libc::close(fd);
                return None;
            }
            Some(Uevents { fd })
        }
    }

    /// Wait up to `timeout` for one uevent; returns its key=value fields.
    pub fn next(&self, timeout: Duration) -> Option<Vec<(String, String)>> {
        let mut pfd = libc::pollfd {
            fd: self.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
            return None;
        }
        let mut buf = vec![0u8; 8192];
        let n = unsafe { libc::recv(self.fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        if n <= 0 {
            return None;
        }
        Some(parse_uevent(&buf[..n as usize]))
    }
}

impl Drop for Uevents {
    fn drop(&mut self) {
        unsafe { libc::close(self.fd) };
    }
}

pub fn parse_uevent(b: &[u8]) -> Vec<(String, String)> {
    b.split(|&c| c == 0)
        .filter_map(|r| std::str::from_utf8(r).ok())
        .filter_map(|r| r.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Load modules by name (e.g. `bonding` before creating a bond).
pub fn load_names(names: &[&str]) {
    if let Some(mut l) = Loader::new() {
        for n in names {
            l.load(n);
        }
    }
}

/// Coldplug, then follow uevents until nothing new arrived for `quiet`
/// (or `max` elapsed), so late USB/NVMe devices get their drivers too.
pub fn run(quiet: Duration, max: Duration) -> usize {
    let Some(mut loader) = Loader::new() else {
        return 0;
    };
    let events = Uevents::open();
    let t0 = Instant::now();
    let mut seen: HashSet<String> = HashSet::new();
    for a in scan_modaliases() {
        if seen.insert(a.clone()) {
            loader.load_alias(&a);
        }
    }
    if let Some(ev) = &events {
        let mut last = Instant::now();
        while last.elapsed() < quiet && t0.elapsed() < max {
            if let Some(fields) = ev.next(Duration::from_millis(100)) {
                last = Instant::now();
                if let Some((_, a)) = fields.iter().find(|(k, _)| k == "MODALIAS") {
                    if seen.insert(a.clone()) {
                        loader.load_alias(a);
                    }
                }
            }
        }
    }
    // Anything that appeared between the scan and the socket.
    for a in scan_modaliases() {
        if seen.insert(a.clone()) {
            loader.load_alias(&a);
        }
    }
    loader.count
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_contract::ModuleEntry;

    #[test]
    fn uevent_fields() {
        let f = parse_uevent(
            b"add@/devices/x\0ACTION=add\0MODALIAS=virtio:d00000001v00001AF4\0SEQNUM=5\0",
        );
        assert!(f.contains(&("MODALIAS".into(), "virtio:d00000001v00001AF4".into())));
        assert!(f.contains(&("ACTION".into(), "add".into())));
    }

    #[test]
    fn aliases_resolve_through_the_index() {
        let mut modules = std::collections::BTreeMap::new();
        modules.insert(
            "virtio_net".to_string(),
            ModuleEntry {
                path: "kernel/drivers/net/virtio_net.ko".into(),
                deps: vec!["net_failover".into()],
                pre: vec![],
                post: vec![],
            },
        );
        let idx = ModuleIndex {
            schema_version: 1,
            kver: "6.1".into(),
            modules,
            aliases: vec![
                ("virtio:d00000001v*".into(), "virtio_net".into()),
                (
                    "pci:v00008086d000010D3sv*sd*bc*sc*i*".into(),
                    "e1000e".into(),
                ),
                ("crypto_crc32c".into(), "crc32c_generic".into()),
            ],
            builtin: vec![],
        };
        let l = Loader {
            index: idx,
            base: "/x".into(),
            loaded: HashSet::new(),
            failed: HashSet::new(),
            count: 0,
        };
        assert_eq!(
            l.modules_for("virtio:d00000001v00001AF4"),
            vec!["virtio_net"]
        );
        assert_eq!(
            l.modules_for("pci:v00008086d000010D3sv00008086sd0000A01Fbc02sc00i00"),
            vec!["e1000e"]
        );
        assert_eq!(
            l.modules_for("crypto-crc32c"),
            vec!["crc32c_generic"],
            "aliases are normalised like kmod"
        );
        assert!(l
            .modules_for("pci:v000010ECd00008168sv0sd0bc02sc00i00")
            .is_empty());
    }
}
