//! Wait for the block devices the recovery plan needs.

use lifeboat_contract::DiskRef;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockDev {
    pub name: String,
    pub serial: Option<String>,
    pub wwn: Option<String>,
    pub size_bytes: u64,
}

fn read(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

pub fn scan() -> Vec<BlockDev> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("loop") || name.starts_with("ram") || name.starts_with("zram") {
            continue;
        }
        let d = e.path();
        out.push(BlockDev {
            serial: read(&d.join("serial")).or_else(|| read(&d.join("device/serial"))),
            wwn: read(&d.join("wwid"))
                .or_else(|| read(&d.join("device/wwid")))
                .or_else(|| read(&d.join("device/wwn"))),
            size_bytes: read(&d.join("size"))
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0)
                * 512,
            name,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Does `d` satisfy `r`? Serial and WWN identify a disk on their own;
/// otherwise name and size must both match what is given.
pub fn matches(r: &DiskRef, d: &BlockDev) -> bool {
    if let Some(s) = &r.serial {
        return d.serial.as_deref() == Some(s.as_str());
    }
    if let Some(w) = &r.wwn {
        return d.wwn.as_deref() == Some(w.as_str());
    }
    r.name.as_ref().is_none_or(|n| *n == d.name)
        && r.size_bytes.is_none_or(|s| s == d.size_bytes)
        && (r.name.is_some() || r.size_bytes.is_some())
}

pub fn describe(r: &DiskRef) -> String {
    let mut v = Vec::new();
    if let Some(n) = &r.name {
        v.push(format!("name {n}"));
    }
    if let Some(s) = &r.serial {
        v.push(format!("serial {s}"));
    }
    if let Some(w) = &r.wwn {
        v.push(format!("WWN {w}"));
    }
    if let Some(s) = r.size_bytes {
        v.push(format!("{s} bytes"));
    }
    v.join(", ")
}

/// Wait until every ref is present; returns the missing ones on timeout.
pub fn wait(refs: &[DiskRef], timeout: Duration) -> Result<(), Vec<DiskRef>> {
    let t0 = Instant::now();
    loop {
        let devs = scan();
        let missing: Vec<DiskRef> = refs
            .iter()
            .filter(|r| !devs.iter().any(|d| matches(r, d)))
            .cloned()
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if t0.elapsed() >= timeout {
            return Err(missing);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_rules() {
        let d = BlockDev {
            name: "vda".into(),
            serial: Some("LB-1".into()),
            wwn: None,
            size_bytes: 1 << 30,
        };
        assert!(matches(
            &DiskRef {
                serial: Some("LB-1".into()),
                ..Default::default()
            },
            &d
        ));
        assert!(!matches(
            &DiskRef {
                serial: Some("LB-2".into()),
                name: Some("vda".into()),
                ..Default::default()
            },
            &d
        ));
        assert!(matches(
            &DiskRef {
                name: Some("vda".into()),
                size_bytes: Some(1 << 30),
                ..Default::default()
            },
            &d
        ));
        assert!(!matches(
            &DiskRef {
                name: Some("vda".into()),
                size_bytes: Some(2 << 30),
                ..Default::default()
            },
            &d
        ));
        assert!(
            !matches(&DiskRef::default(), &d),
            "an empty ref matches nothing"
        );
    }
}
