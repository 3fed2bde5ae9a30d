//! Capture the host's network setup (`ip -j -d addr`, `ip -j route`,
//! /etc/resolv.conf) into the contract's [`NetworkConfig`], so the rescue OS
//! can bring the same addresses up on the same NICs (matched by MAC).

use anyhow::{Context, Result};
use lifeboat_contract::{NetInterface, NetKind, NetRoute, NetworkConfig};
use serde_json::Value;
use std::collections::BTreeMap;

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
    Ok(from_ip_json(&links, &routes, &resolv))
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

    #[test]
    fn this_hosts_capture_parses() {
        // The real `ip` on this machine is the oracle for the JSON shapes.
        let cfg = capture().unwrap();
        assert!(cfg.interfaces.iter().all(|i| i.name != "lo"));
    }
}
