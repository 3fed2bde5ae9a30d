//! Load drivers for the devices present (coldplug) and for devices that
//! appear while we do so (kernel uevents), from the builder's precomputed
//! module index: no libkmod, no udev.

use crate::log::{debug, log};
use lifeboat_contract::{alias_matches, normalize_alias, ModuleIndex, MODULE_INDEX_PATH};
use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Loading,
    Done,
    Failed,
}

/// Loads modules with their dependencies; shareable between threads so
/// independent drivers probe their devices in parallel.
pub struct Loader {
    index: ModuleIndex,
    base: String,
    state: Mutex<HashMap<String, State>>,
    count: AtomicUsize,
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
        let state = std::fs::read_to_string("/proc/modules")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(|m| (lifeboat_contract::normalize_module_name(m), State::Done))
            .collect();
        let base = format!("/lib/modules/{}", index.kver);
        Some(Loader {
            index,
            base,
            state: Mutex::new(state),
            count: AtomicUsize::new(0),
        })
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Load `name` with its dependencies and softdeps. Errors are logged,
    /// never fatal: a driver that does not load leaves that device unused.
    pub fn load(&self, name: &str) {
        self.load_depth(name, 0)
    }

    fn load_depth(&self, name: &str, depth: u32) {
        let name = lifeboat_contract::normalize_module_name(name);
        if depth > 16 {
            return;
        }
        {
            let mut st = self.state.lock().unwrap();
            match st.get(&name) {
                // Loading in another thread: calling finit_module again is
                // safe, the kernel waits for that load and says EEXIST.
                Some(State::Done) | Some(State::Failed) => return,
                Some(State::Loading) if depth == 0 => return,
                Some(State::Loading) => {}
                None => {
                    st.insert(name.clone(), State::Loading);
                }
            }
        }
        let Some(entry) = self.index.modules.get(&name).cloned() else {
            if !self.index.builtin.contains(&name) {
                debug(&format!("module {name} is not in the image"));
            }
            self.state.lock().unwrap().insert(name, State::Done);
            return;
        };
        for p in &entry.pre {
            self.load_depth(p, depth + 1);
        }
        for d in &entry.deps {
            self.load_depth(d, depth + 1);
        }
        let path = format!("{}/{}", self.base, entry.path);
        let result = finit_module(&path);
        let mut st = self.state.lock().unwrap();
        match result {
            Ok(true) => {
                self.count.fetch_add(1, Ordering::Relaxed);
                debug(&format!("loaded {name}"));
                st.insert(name.clone(), State::Done);
            }
            Ok(false) => {
                st.insert(name.clone(), State::Done);
            }
            Err(e) => {
                st.insert(name.clone(), State::Failed);
                drop(st);
                log(&format!("cannot load module {name} ({path}): {e}"));
                return;
            }
        }
        drop(st);
        for p in &entry.post {
            self.load_depth(p, depth + 1);
        }
    }

    /// Load several modules in parallel (each with its dependencies).
    pub fn load_all(&self, names: Vec<String>) {
        if names.len() <= 1 {
            for n in names {
                self.load(&n);
            }
            return;
        }
        let queue = Mutex::new(names);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| loop {
                    let next = queue.lock().unwrap().pop();
                    match next {
                        Some(n) => self.load(&n),
                        None => break,
                    }
                });
            }
        });
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

    /// Modules for a batch of modaliases, deduplicated.
    pub fn modules_for_all(&self, modaliases: &[String]) -> Vec<String> {
        let mut v: Vec<String> = modaliases
            .iter()
            .flat_map(|a| self.modules_for(a))
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Ok(true) when loaded now, Ok(false) when it was already there.
fn finit_module(path: &str) -> std::io::Result<bool> {
    let f = std::fs::File::open(path)?;
    use std::os::fd::AsRawFd;
    let empty = CString::new("").unwrap();
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), empty.as_ptr(), 0) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        return Ok(false);
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
    if let Some(l) = Loader::new() {
        l.load_all(names.iter().map(|s| s.to_string()).collect());
    }
}

/// Coldplug, then follow uevents until nothing new arrived for `quiet`
/// (or `max` elapsed), so late USB/NVMe devices get their drivers too.
/// Drivers of independent devices load in parallel.
pub fn run(quiet: Duration, max: Duration) -> usize {
    let Some(loader) = Loader::new() else {
        return 0;
    };
    let events = Uevents::open();
    let t0 = Instant::now();
    let mut seen: HashSet<String> = HashSet::new();
    let batch = |aliases: Vec<String>, seen: &mut HashSet<String>| {
        let fresh: Vec<String> = aliases
            .into_iter()
            .filter(|a| seen.insert(a.clone()))
            .collect();
        if !fresh.is_empty() {
            loader.load_all(loader.modules_for_all(&fresh));
        }
    };
    batch(scan_modaliases(), &mut seen);
    if let Some(ev) = &events {
        let mut last = Instant::now();
        while last.elapsed() < quiet && t0.elapsed() < max {
            // Gather what arrives within a short window, then load it together.
            let mut pending = Vec::new();
            while let Some(fields) = ev.next(Duration::from_millis(if pending.is_empty() {
                100
            } else {
                20
            })) {
                last = Instant::now();
                if let Some((_, a)) = fields.iter().find(|(k, _)| k == "MODALIAS") {
                    pending.push(a.clone());
                }
                if t0.elapsed() >= max {
                    break;
                }
            }
            batch(pending, &mut seen);
        }
    }
    // Anything that appeared between the scan and the socket.
    batch(scan_modaliases(), &mut seen);
    loader.count()
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
            state: Mutex::new(HashMap::new()),
            count: AtomicUsize::new(0),
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
