//! Capture the host's network setup (`ip -j -d addr`, `ip -j route`,
//! /etc/resolv.conf) into the contract's [`NetworkConfig`], so the rescue OS
//! can bring the same addresses up on the same NICs (matched by MAC).
//!
//! What the kernel shows is not the whole story: an address leased by
//! dhclient or udhcpc may look static, and their default route too. So the
//! configuration files of ifupdown, NetworkManager and systemd-networkd
//! are read as well: an interface they configure by DHCP gets DHCP in the
//! rescue OS, not a replay of today's lease.

use anyhow::{Context, Result};
use lifeboat_contract::{NetInterface, NetKind, NetRoute, NetworkConfig};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;

/// Run `ip` with JSON output.
fn ip_json(args: &[&str]) -> Result<Value> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("cannot run ip {}", args.join(" ")))?;
    if !out.status.success() {
        anyhow::bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("ip {} printed invalid JSON", args.join(" ")))
}

/// Capture from the live host.
pub fn capture() -> Result<NetworkConfig> {
    let links = ip_json(&["-j", "-d", "addr", "show"])?;
    let routes = ip_json(&["-j", "route", "show"])?;
    let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let mut cfg = from_ip_json(&links, &routes, &resolv);
    let configured = dhcp_configured(&config_files(), &cfg);
    mark_dhcp(&mut cfg, &configured);
    Ok(cfg)
}

/// Network configuration files of one kind, as (path, text).
#[derive(Debug, Default)]
pub struct ConfigFiles {
    /// /etc/network/interfaces and the files it sources.
    pub ifupdown: Vec<(String, String)>,
    /// NetworkManager keyfiles (`*.nmconnection`).
    pub networkmanager: Vec<(String, String)>,
    /// systemd-networkd `*.network` files (netplan renders these too).
    pub networkd: Vec<(String, String)>,
}

/// Largest configuration file read (they are a few hundred bytes).
const MAX_CONFIG: u64 = 1 << 20;

fn read_small(path: &Path) -> Option<String> {
    let f = std::fs::File::open(path).ok()?;
    let mut text = String::new();
    f.take(MAX_CONFIG).read_to_string(&mut text).ok()?;
    Some(text)
}

fn files_in(dir: &str, suffix: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    let mut paths: Vec<_> = rd.flatten().map(|e| e.path()).collect();
    paths.sort();
    for p in paths {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(suffix) && !name.starts_with('.') {
            if let Some(t) = read_small(&p) {
                out.push((p.display().to_string(), t));
            }
        }
    }
    out
}

/// Read this host's network configuration files.
fn config_files() -> ConfigFiles {
    let mut cf = ConfigFiles::default();
    // ifupdown: the main file, then what it sources (one level of globs,
    // as Debian's default `source /etc/network/interfaces.d/*`).
    let mut queue = vec!["/etc/network/interfaces".to_string()];
    let mut seen = std::collections::BTreeSet::new();
    while let Some(p) = queue.pop() {
        if !seen.insert(p.clone()) || seen.len() > 64 {
            continue;
        }
        let Some(text) = read_small(Path::new(&p)) else {
            continue;
        };
        for line in text.lines() {
            let mut w = line.split_whitespace();
            match (w.next(), w.next()) {
                (Some("source"), Some(pat)) => queue.extend(expand_glob(pat)),
                (Some("source-directory"), Some(dir)) => {
                    queue.extend(files_in(dir, "").into_iter().map(|(p, _)| p))
                }
                _ => {}
            }
        }
        cf.ifupdown.push((p, text));
    }
    // A manager's files count only while it runs: systemd ships .network
    // files for containers, and an uninstalled NetworkManager can leave
    // keyfiles behind.
    let (nm, networkd) = managers_running(Path::new("/run"));
    if nm {
        for d in [
            "/etc/NetworkManager/system-connections",
            "/run/NetworkManager/system-connections",
        ] {
            cf.networkmanager.extend(files_in(d, ".nmconnection"));
        }
    }
    if networkd {
        for d in [
            "/etc/systemd/network",
            "/run/systemd/network",
            "/usr/lib/systemd/network",
        ] {
            cf.networkd.extend(files_in(d, ".network"));
        }
    }
    cf
}

/// Whether NetworkManager and systemd-networkd run, from their state under
/// `run` (/run): NetworkManager keeps /run/NetworkManager, networkd writes
/// /run/systemd/netif/state.
fn managers_running(run: &Path) -> (bool, bool) {
    (
        run.join("NetworkManager").is_dir(),
        run.join("systemd/netif/state").is_file(),
    )
}

/// `dir/*` or `dir/prefix*` (what ifupdown's `source` lines use); a plain
/// path is itself.
fn expand_glob(pat: &str) -> Vec<String> {
    let Some((dir, file)) = pat.rsplit_once('/') else {
        return vec![pat.to_string()];
    };
    if !file.contains(['*', '?']) {
        return vec![pat.to_string()];
    }
    files_in(dir, "")
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| glob_match(file, p.rsplit('/').next().unwrap_or("")))
        .collect()
}

/// Shell-style match with `*` and `?` (systemd's Name= and ifupdown's
/// source globs).
fn glob_match(pat: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some(b'*') => (0..=n.len()).any(|i| go(&p[1..], &n[i..])),
            Some(b'?') => !n.is_empty() && go(&p[1..], &n[1..]),
            Some(c) => n.first() == Some(c) && go(&p[1..], &n[1..]),
        }
    }
    go(pat.as_bytes(), name.as_bytes())
}

/// INI sections of a keyfile or unit: (section, key, value) triples.
fn ini(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.trim().to_string();
        } else if let Some((k, v)) = line.split_once('=') {
            out.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

/// Names of the captured interfaces that their configuration files set up
/// by IPv4 DHCP.
pub fn dhcp_configured(files: &ConfigFiles, cfg: &NetworkConfig) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let known = |n: &str| cfg.interfaces.iter().any(|i| i.name == n);
    let by_mac = |m: &str| {
        cfg.interfaces
            .iter()
            .filter(|i| {
                i.mac
                    .as_deref()
                    .is_some_and(|x| x.eq_ignore_ascii_case(m.trim()))
            })
            .map(|i| i.name.clone())
            .collect::<Vec<_>>()
    };
    // ifupdown: `iface NAME inet dhcp`.
    for (_, text) in &files.ifupdown {
        for line in text.lines() {
            let w: Vec<&str> = line.split_whitespace().collect();
            if let ["iface", name, "inet", "dhcp", ..] = w.as_slice() {
                if known(name) {
                    out.insert(name.to_string());
                }
            }
        }
    }
    // NetworkManager: [ipv4] method=auto on the interface it names (by
    // interface-name, else by the MAC in [ethernet]).
    for (_, text) in &files.networkmanager {
        let kv = ini(text);
        let get = |sec: &str, key: &str| {
            kv.iter()
                .find(|(s, k, _)| s == sec && k == key)
                .map(|(_, _, v)| v.as_str())
        };
        if get("ipv4", "method").unwrap_or("auto") != "auto" {
            continue;
        }
        if let Some(n) = get("connection", "interface-name") {
            if known(n) {
                out.insert(n.to_string());
            }
        } else if let Some(m) = get("ethernet", "mac-address") {
            out.extend(by_mac(m));
        }
    }
    // systemd-networkd: [Network] DHCP=yes|ipv4|true|both|on|1 on the
    // interfaces [Match] Name= (globs, several per line) or MACAddress= picks.
    for (_, text) in &files.networkd {
        let kv = ini(text);
        let dhcp = kv.iter().any(|(s, k, v)| {
            s == "Network"
                && k == "DHCP"
                && matches!(
                    v.to_ascii_lowercase().as_str(),
                    "yes" | "true" | "on" | "1" | "ipv4" | "both"
                )
        });
        if !dhcp {
            continue;
        }
        for (s, k, v) in &kv {
            if s != "Match" {
                continue;
            }
            match k.as_str() {
                "Name" => {
                    for pat in v.split_whitespace() {
                        for i in &cfg.interfaces {
                            if glob_match(pat, &i.name) {
                                out.insert(i.name.clone());
                            }
                        }
                    }
                }
                "MACAddress" => {
                    for m in v.split_whitespace() {
                        out.extend(by_mac(m));
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// Interfaces configured by DHCP ask again in the rescue OS: their IPv4
/// addresses (today's lease) and default routes (the lease's router) are
/// not replayed.
pub fn mark_dhcp(cfg: &mut NetworkConfig, configured: &BTreeSet<String>) {
    for i in &mut cfg.interfaces {
        if configured.contains(&i.name) {
            i.dhcp = true;
            i.addresses.retain(|a| a.contains(':'));
        }
    }
    let dhcp: BTreeSet<String> = cfg
        .interfaces
        .iter()
        .filter(|i| i.dhcp)
        .map(|i| i.name.clone())
        .collect();
    cfg.routes
        .retain(|r| !(r.destination == "default" && dhcp.contains(&r.interface)));
}

/// Build the configuration from `ip -j -d addr show`, `ip -j route show`
/// and resolv.conf text (split out for tests on recorded outputs).
pub fn from_ip_json(links: &Value, routes: &Value, resolv: &str) -> NetworkConfig {
    let mut cfg = NetworkConfig::default();
    let mut members: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let empty = vec![];
    let links = links.as_array().unwrap_or(&empty);
    for l in links {
        if let (Some(name), Some(master)) = (l["ifname"].as_str(), l["master"].as_str()) {
            members
                .entry(master.to_string())
                .or_default()
                .push(name.to_string());
        }
    }
    for l in links {
        let Some(name) = l["ifname"].as_str() else {
            continue;
        };
        if l["link_type"] == "loopback" || name == "lo" {
            continue;
        }
        let info = &l["linkinfo"];
        let kind = match info["info_kind"].as_str() {
            None => NetKind::Ethernet,
            Some("vlan") => NetKind::Vlan {
                parent: l["link"].as_str().unwrap_or("").to_string(),
                id: info["info_data"]["id"].as_u64().unwrap_or(0) as u16,
            },
            Some("bond") => NetKind::Bond {
                mode: info["info_data"]["mode"]
                    .as_str()
                    .unwrap_or("active-backup")
                    .to_string(),
                members: members.get(name).cloned().unwrap_or_default(),
            },
            Some("bridge") => NetKind::Bridge {
                members: members.get(name).cloned().unwrap_or_default(),
            },
            // veth, tun, wireguard, docker bridges' peers...: not replayed.
            Some(_) => continue,
        };
        let mut addresses = Vec::new();
        let mut dhcp = false;
        for a in l["addr_info"].as_array().unwrap_or(&empty) {
            if a["scope"] != "global" {
                continue;
            }
            if a["dynamic"].as_bool() == Some(true) {
                // Assigned by DHCP (or SLAAC): ask again at boot rather than reuse.
                if a["family"] == "inet" {
                    dhcp = true;
                }
                continue;
            }
            if let (Some(ip), Some(len)) = (a["local"].as_str(), a["prefixlen"].as_u64()) {
                addresses.push(format!("{ip}/{len}"));
            }
        }
        let mac = match kind {
            NetKind::Ethernet => l["permaddr"]
                .as_str()
                .or(l["address"].as_str())
                .map(|s| s.to_string()),
            _ => None,
        };
        cfg.interfaces.push(NetInterface {
            name: name.to_string(),
            kind,
            mac,
            addresses,
            mtu: l["mtu"].as_u64().map(|m| m as u32).filter(|m| *m != 1500),
            dhcp,
        });
    }
    for r in routes.as_array().unwrap_or(&empty) {
        let proto = r["protocol"].as_str().unwrap_or("");
        if proto == "kernel" || proto == "dhcp" || proto == "ra" {
            continue;
        }
        let (Some(dst), Some(dev)) = (r["dst"].as_str(), r["dev"].as_str()) else {
            continue;
        };
        if !cfg.interfaces.iter().any(|i| i.name == dev) {
            continue;
        }
        cfg.routes.push(NetRoute {
            destination: dst.to_string(),
            gateway: r["gateway"].as_str().map(|s| s.to_string()),
            interface: dev.to_string(),
            metric: r["metric"].as_u64().map(|m| m as u32),
        });
    }
    for line in resolv.lines() {
        let mut it = line.split_whitespace();
        match it.next() {
            Some("nameserver") => cfg.dns.extend(it.next().map(|s| s.to_string())),
            Some("search") | Some("domain") => cfg.search.extend(it.map(|s| s.to_string())),
            _ => {}
        }
    }
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_ip_output_becomes_a_plan() {
        // Shapes as printed by iproute2 6.1 (`ip -j -d addr show`, `ip -j route show`).
        let links = serde_json::json!([
            {"ifindex":1,"ifname":"lo","link_type":"loopback","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host"}]},
            {"ifindex":2,"ifname":"eno1","mtu":1500,"master":"bond0","link_type":"ether","address":"52:54:00:aa:bb:01","permaddr":"52:54:00:aa:bb:01","addr_info":[]},
            {"ifindex":3,"ifname":"eno2","mtu":1500,"master":"bond0","link_type":"ether","address":"52:54:00:aa:bb:01","permaddr":"52:54:00:aa:bb:02","addr_info":[]},
            {"ifindex":4,"ifname":"bond0","mtu":9000,"link_type":"ether","address":"52:54:00:aa:bb:01","linkinfo":{"info_kind":"bond","info_data":{"mode":"active-backup"}},"addr_info":[]},
            {"ifindex":5,"ifname":"bond0.10","link":"bond0","mtu":1500,"link_type":"ether","linkinfo":{"info_kind":"vlan","info_data":{"protocol":"802.1Q","id":10}},
             "addr_info":[{"family":"inet","local":"10.10.0.5","prefixlen":24,"scope":"global"},{"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"}]},
            {"ifindex":6,"ifname":"ens3","mtu":1500,"link_type":"ether","address":"52:54:00:12:34:56",
             "addr_info":[{"family":"inet","local":"192.168.1.20","prefixlen":24,"scope":"global","dynamic":true}]},
            {"ifindex":7,"ifname":"veth0","link_type":"ether","linkinfo":{"info_kind":"veth"},"addr_info":[]}
        ]);
        let routes = serde_json::json!([
            {"dst":"default","gateway":"10.10.0.1","dev":"bond0.10","flags":[]},
            {"dst":"default","gateway":"192.168.1.1","dev":"ens3","protocol":"dhcp","metric":100},
            {"dst":"10.10.0.0/24","dev":"bond0.10","protocol":"kernel","scope":"link","prefsrc":"10.10.0.5"},
            {"dst":"172.16.0.0/12","gateway":"10.10.0.254","dev":"bond0.10","metric":5}
        ]);
        let cfg = from_ip_json(
            &links,
            &routes,
            "# x\nnameserver 10.10.0.2\nsearch example.org lab\n",
        );
        let names: Vec<&str> = cfg.interfaces.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, vec!["eno1", "eno2", "bond0", "bond0.10", "ens3"]);
        assert_eq!(
            cfg.interfaces[1].mac.as_deref(),
            Some("52:54:00:aa:bb:02"),
            "permanent MAC wins"
        );
        assert_eq!(
            cfg.interfaces[2].kind,
            NetKind::Bond {
                mode: "active-backup".into(),
                members: vec!["eno1".into(), "eno2".into()]
            }
        );
        assert_eq!(cfg.interfaces[2].mtu, Some(9000));
        assert_eq!(
            cfg.interfaces[3].kind,
            NetKind::Vlan {
                parent: "bond0".into(),
                id: 10
            }
        );
        assert_eq!(cfg.interfaces[3].addresses, vec!["10.10.0.5/24"]);
        assert!(cfg.interfaces[4].dhcp && cfg.interfaces[4].addresses.is_empty());
        assert_eq!(cfg.routes.len(), 2);
        assert_eq!(cfg.routes[0].destination, "default");
        assert_eq!(cfg.routes[1].metric, Some(5));
        assert_eq!(cfg.dns, vec!["10.10.0.2"]);
        assert_eq!(cfg.search, vec!["example.org", "lab"]);
    }

    fn iface(name: &str, mac: &str, addresses: &[&str]) -> NetInterface {
        NetInterface {
            name: name.into(),
            kind: NetKind::Ethernet,
            mac: Some(mac.into()),
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            mtu: None,
            dhcp: false,
        }
    }

    fn f(text: &str) -> Vec<(String, String)> {
        vec![("test".into(), text.into())]
    }

    fn host() -> NetworkConfig {
        NetworkConfig {
            interfaces: vec![
                iface("ens3", "52:54:00:12:34:56", &["10.0.2.15/24", "fd00::5/64"]),
                iface("ens4", "52:54:00:12:34:57", &["192.168.7.2/24"]),
                iface("enp1s0", "52:54:00:12:34:58", &["172.16.0.9/16"]),
            ],
            routes: vec![
                NetRoute {
                    destination: "default".into(),
                    gateway: Some("10.0.2.2".into()),
                    interface: "ens3".into(),
                    metric: None,
                },
                NetRoute {
                    destination: "10.9.0.0/16".into(),
                    gateway: Some("10.0.2.3".into()),
                    interface: "ens3".into(),
                    metric: None,
                },
                NetRoute {
                    destination: "default".into(),
                    gateway: Some("192.168.7.1".into()),
                    interface: "ens4".into(),
                    metric: Some(200),
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn ifupdown_dhcp_is_asked_again_not_replayed() {
        // A Debian installer's /etc/network/interfaces: the lease (from
        // dhclient, with no `dynamic` flag under udhcpc) and its default
        // route look static to `ip`.
        let files = ConfigFiles {
            ifupdown: f(
                "auto lo\niface lo inet loopback\n\n# The primary network interface\n\
                         allow-hotplug ens3\niface ens3 inet dhcp\n\
                         iface ens4 inet static\n  address 192.168.7.2/24\n  gateway 192.168.7.1\n\
                         iface wlan0 inet dhcp\n",
            ),
            ..Default::default()
        };
        let mut cfg = host();
        let set = dhcp_configured(&files, &cfg);
        assert_eq!(set.into_iter().collect::<Vec<_>>(), vec!["ens3"]);
        mark_dhcp(&mut cfg, &dhcp_configured(&files, &host()));
        assert!(cfg.interfaces[0].dhcp);
        assert_eq!(
            cfg.interfaces[0].addresses,
            vec!["fd00::5/64"],
            "IPv6 static stays"
        );
        assert!(!cfg.interfaces[1].dhcp);
        assert_eq!(cfg.interfaces[1].addresses, vec!["192.168.7.2/24"]);
        let routes: Vec<(&str, &str)> = cfg
            .routes
            .iter()
            .map(|r| (r.destination.as_str(), r.interface.as_str()))
            .collect();
        assert_eq!(
            routes,
            vec![("10.9.0.0/16", "ens3"), ("default", "ens4")],
            "the DHCP interface's default route comes from its lease"
        );
    }

    #[test]
    fn networkmanager_and_networkd_dhcp() {
        let files = ConfigFiles {
            networkmanager: vec![
                (
                    "a".into(),
                    "[connection]\nid=Wired\ntype=ethernet\ninterface-name=ens4\n[ipv4]\nmethod=auto\n".into(),
                ),
                (
                    "b".into(),
                    "[connection]\nid=x\n[ethernet]\nmac-address=52:54:00:12:34:58\n[ipv4]\nmethod=manual\naddress1=172.16.0.9/16\n".into(),
                ),
            ],
            networkd: f("[Match]\nName=en*  eth0\n\n[Network]\nDHCP=ipv4\n"),
            ..Default::default()
        };
        let set: Vec<String> = dhcp_configured(&files, &host()).into_iter().collect();
        // networkd's en* matches all three; NM's manual one does not add.
        assert_eq!(set, vec!["enp1s0", "ens3", "ens4"]);
        let nm_only = ConfigFiles {
            networkmanager: files.networkmanager,
            ..Default::default()
        };
        let set: Vec<String> = dhcp_configured(&nm_only, &host()).into_iter().collect();
        assert_eq!(set, vec!["ens4"]);
        let by_mac = ConfigFiles {
            networkd: f("[Match]\nMACAddress=52:54:00:12:34:58\n[Network]\nDHCP=yes\n"),
            ..Default::default()
        };
        let set: Vec<String> = dhcp_configured(&by_mac, &host()).into_iter().collect();
        assert_eq!(set, vec!["enp1s0"]);
        let no = ConfigFiles {
            networkd: f("[Match]\nName=ens3\n[Network]\nDHCP=no\nAddress=10.0.2.15/24\n"),
            ..Default::default()
        };
        assert!(dhcp_configured(&no, &host()).is_empty());
    }

    #[test]
    fn only_running_managers_count() {
        let run = tempfile::tempdir().unwrap();
        assert_eq!(managers_running(run.path()), (false, false));
        // tmpfiles creates /run/systemd/netif whether or not networkd runs.
        std::fs::create_dir_all(run.path().join("systemd/netif")).unwrap();
        assert_eq!(managers_running(run.path()), (false, false));
        std::fs::write(
            run.path().join("systemd/netif/state"),
            "OPER_STATE=routable\n",
        )
        .unwrap();
        assert_eq!(managers_running(run.path()), (false, true));
        std::fs::create_dir_all(run.path().join("NetworkManager")).unwrap();
        assert_eq!(managers_running(run.path()), (true, true));
    }

    #[test]
    fn globs() {
        assert!(glob_match("en*", "ens3"));
        assert!(glob_match("*", ""));
        assert!(glob_match("eth?", "eth0"));
        assert!(!glob_match("eth?", "eth10"));
        assert!(!glob_match("en*", "wlan0"));
    }

    #[test]
    fn this_hosts_capture_parses() {
        // The real `ip` on this machine is the oracle for the JSON shapes.
        let cfg = capture().unwrap();
        assert!(cfg.interfaces.iter().all(|i| i.name != "lo"));
    }
}
