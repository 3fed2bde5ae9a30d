//! Bring the network up: `ip=` from the kernel command line wins; else the
//! host's captured configuration on NICs with the same MAC; else DHCP on
//! every NIC (or only the PXE boot NIC named by BOOTIF).

pub mod dhcp;
pub mod rtnl;

use crate::cmdline::{Cmdline, IpArg};
use crate::log::log;
use lifeboat_contract::{NetKind, NetworkConfig};
use rtnl::{fmt_mac, Link, Rtnl};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// How long DHCP may take on all NICs together.
const DHCP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Resolv {
    dns: Vec<String>,
    search: Vec<String>,
}

fn parse_prefix(s: &str) -> Result<(IpAddr, u8), String> {
    let (ip, len) = s
        .split_once('/')
        .ok_or_else(|| format!("{s}: address without /prefix"))?;
    let ip: IpAddr = ip.parse().map_err(|_| format!("{s}: not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= max)
        .ok_or_else(|| format!("{s}: bad prefix length"))?;
    Ok((ip, len))
}

fn physical(links: &[Link]) -> Vec<Link> {
    links
        .iter()
        .filter(|l| !l.loopback && !l.virtual_kind && l.mac.is_some())
        .cloned()
        .collect()
}

/// Wait (briefly) until at least one physical NIC exists.
fn wait_for_nics(nl: &mut Rtnl, timeout: Duration) -> Vec<Link> {
    let t0 = Instant::now();
    loop {
        let links = nl.links().unwrap_or_default();
        if !physical(&links).is_empty() || t0.elapsed() > timeout {
            return links;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Bring the network up; returns a summary line per configured interface.
pub fn bring_up(cfg: &NetworkConfig, cmd: &Cmdline, hostname: &str) -> Result<Vec<String>, String> {
    let mut nl = Rtnl::open().map_err(|e| format!("cannot open rtnetlink: {e}"))?;
    let links = wait_for_nics(&mut nl, Duration::from_secs(5));
    if let Some(lo) = links.iter().find(|l| l.loopback) {
        let _ = nl.set_up(lo.index);
        let _ = nl.add_address(lo.index, "127.0.0.1".parse().unwrap(), 8);
    }
    let nics = physical(&links);
    if nics.is_empty() {
        return Err("no network interface found (is its driver in the image?)".into());
    }
    let mut resolv = Resolv::default();
    let mut summary = Vec::new();
    let by_name = |n: &str| nics.iter().find(|l| l.name == n).cloned();
    let boot_nic = cmd
        .bootif
        .and_then(|m| nics.iter().find(|l| l.mac == Some(m)).cloned());

    if !cmd.ip.is_empty() {
        for arg in &cmd.ip {
            match arg {
                IpArg::Off { .. } => summary.push("network disabled by ip=off".to_string()),
                IpArg::Dhcp { iface } => {
                    let targets: Vec<Link> = match iface.as_deref().map(by_name) {
                        Some(Some(l)) => vec![l],
                        Some(None) => {
                            return Err(format!(
                                "ip=: no interface named {}",
                                iface.as_deref().unwrap()
                            ))
                        }
                        None => boot_nic
                            .clone()
                            .map(|l| vec![l])
                            .unwrap_or_else(|| nics.clone()),
                    };
                    summary.extend(dhcp_all(&mut nl, &targets, hostname, &mut resolv)?);
                }
                IpArg::Static {
                    client,
                    prefix,
                    gateway,
                    iface,
                    dns,
                    ..
                } => {
                    let nic = match iface.as_deref() {
                        Some(n) => {
                            by_name(n).ok_or_else(|| format!("ip=: no interface named {n}"))?
                        }
                        None => boot_nic.clone().unwrap_or_else(|| nics[0].clone()),
                    };
                    nl.set_up(nic.index)
                        .map_err(|e| format!("cannot bring {} up: {e}", nic.name))?;
                    nl.add_address(nic.index, IpAddr::V4(*client), *prefix)
                        .map_err(|e| {
                            format!("cannot add {client}/{prefix} to {}: {e}", nic.name)
                        })?;
                    if let Some(g) = gateway {
                        nl.add_route(None, Some(IpAddr::V4(*g)), nic.index, None)
                            .map_err(|e| format!("cannot add default route via {g}: {e}"))?;
                    }
                    resolv.dns.extend(dns.iter().map(|d| d.to_string()));
                    summary.push(format!(
                        "{} {} {client}/{prefix}{} (ip=)",
                        nic.name,
                        fmt_mac(&nic.mac.unwrap()),
                        gateway.map(|g| format!(" via {g}")).unwrap_or_default()
                    ));
                }
            }
        }
    } else if let Some(lines) = apply_captured(&mut nl, cfg, &nics, hostname, &mut resolv)? {
        summary.extend(lines);
    } else {
        let targets = boot_nic.map(|l| vec![l]).unwrap_or_else(|| nics.clone());
        summary.extend(dhcp_all(&mut nl, &targets, hostname, &mut resolv)?);
    }
    write_resolv(&resolv, hostname);
    Ok(summary)
}

/// Replay the captured configuration. None when none of its NICs is here.
fn apply_captured(
    nl: &mut Rtnl,
    cfg: &NetworkConfig,
    nics: &[Link],
    hostname: &str,
    resolv: &mut Resolv,
) -> Result<Option<Vec<String>>, String> {
    // Captured name → local interface (index, local name).
    let mut map: BTreeMap<String, (u32, String)> = BTreeMap::new();
    for i in &cfg.interfaces {
        if let (NetKind::Ethernet, Some(mac)) = (&i.kind, &i.mac) {
            let Some(mac) = crate::cmdline::parse_mac(mac) else {
                continue;
            };
            if let Some(l) = nics.iter().find(|l| l.mac == Some(mac)) {
                map.insert(i.name.clone(), (l.index, l.name.clone()));
            }
        }
    }
    if map.is_empty() {
        if !cfg.interfaces.is_empty() {
            log("none of the captured interfaces' MAC addresses is present here; using DHCP");
        }
        return Ok(None);
    }
    // Create bonds and bridges, then enslave, then VLANs (which may sit on bonds).
    for pass in 0..2 {
        for i in &cfg.interfaces {
            let created = match (&i.kind, pass) {
                (NetKind::Bond { mode, .. }, 0) => {
                    // Loading the bonding driver may have created a default
                    // bond0 (round-robin): replace it with the captured mode.
                    if let Some(old) = nl
                        .links()
                        .unwrap_or_default()
                        .iter()
                        .find(|l| l.name == i.name)
                    {
                        let _ = nl.del_link(old.index);
                    }
                    Some(nl.create_bond(&i.name, mode))
                }
                (NetKind::Bridge { .. }, 0) => Some(nl.create_bridge(&i.name)),
                (NetKind::Vlan { parent, id }, 1) => match map.get(parent) {
                    Some((p, _)) => Some(nl.create_vlan(&i.name, *p, *id)),
                    None => {
                        log(&format!(
                            "VLAN {} skipped: its parent {parent} is not here",
                            i.name
                        ));
                        None
                    }
                },
                _ => None,
            };
            if let Some(r) = created {
                if let Err(e) = r {
                    if e.raw_os_error() != Some(libc::EEXIST) {
                        return Err(format!("cannot create {}: {e}", i.name));
                    }
                }
                let links = nl.links().map_err(|e| e.to_string())?;
                let l = links
                    .iter()
                    .find(|l| l.name == i.name)
                    .ok_or_else(|| format!("{} vanished after creation", i.name))?;
                map.insert(i.name.clone(), (l.index, l.name.clone()));
            }
        }
        if pass == 0 {
            for i in &cfg.interfaces {
                let members = match &i.kind {
                    NetKind::Bond { members, .. } | NetKind::Bridge { members } => members,
                    _ => continue,
                };
                let master = map[&i.name].0;
                for m in members {
                    match map.get(m) {
                        Some((idx, _)) => {
                            let _ = nl.set_down(*idx);
                            nl.set_master(*idx, master)
                                .map_err(|e| format!("cannot add {m} to {}: {e}", i.name))?;
                            let _ = nl.set_up(*idx);
                        }
                        None => log(&format!(
                            "{} member {m} is not here; continuing without it",
                            i.name
                        )),
                    }
                }
            }
        }
    }
    // Links and static addresses first, then DHCP, then routes: a route's
    // gateway is reachable only once the address of its subnet is there.
    let mut lines = Vec::new();
    let mut dhcp_targets = Vec::new();
    let here = nl
        .links()
        .map_err(|e| format!("cannot list interfaces: {e}"))?;
    for i in &cfg.interfaces {
        let Some((idx, local)) = map.get(&i.name).cloned() else {
            continue;
        };
        if let Some(mtu) = i.mtu {
            if let Err(e) = nl.set_mtu(idx, mtu) {
                log(&format!("cannot set MTU {mtu} on {local}: {e}"));
            }
        }
        nl.set_up(idx)
            .map_err(|e| format!("cannot bring {local} up: {e}"))?;
        let mut added = Vec::new();
        for a in &i.addresses {
            let (ip, len) = parse_prefix(a)?;
            match nl.add_address(idx, ip, len) {
                Ok(()) => added.push(a.as_str()),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => added.push(a.as_str()),
                Err(e) => log(&format!("cannot add {a} to {local}: {e}; continuing")),
            }
        }
        if i.dhcp {
            match here.iter().find(|l| l.index == idx && l.mac.is_some()) {
                Some(l) => dhcp_targets.push(l.clone()),
                None => log(&format!("{local} has no MAC address: no DHCP on it")),
            }
        }
        if !added.is_empty() {
            lines.push(format!(
                "{local} {} (captured from {})",
                added.join(" "),
                i.name
            ));
        }
    }
    resolv.dns.extend(cfg.dns.iter().cloned());
    resolv.search.extend(cfg.search.iter().cloned());
    let mut leased = Vec::new();
    if !dhcp_targets.is_empty() {
        match dhcp_all(nl, &dhcp_targets, hostname, resolv) {
            Ok(l) => {
                lines.extend(l);
                leased.extend(dhcp_targets.iter().map(|t| t.index));
            }
            Err(e) if !lines.is_empty() => log(&format!(
                "DHCP failed ({e}); continuing with the static setup"
            )),
            Err(e) => return Err(e),
        }
    }
    for r in &cfg.routes {
        let Some((idx, local)) = map.get(&r.interface) else {
            continue;
        };
        let via = r
            .gateway
            .as_ref()
            .map(|g| format!(" via {g}"))
            .unwrap_or_default();
        // A plan from before DHCP interfaces were told apart may still
        // carry the lease's default route: the new lease brought its own.
        if r.destination == "default" && leased.contains(idx) {
            continue;
        }
        let route = format!("route {}{via} dev {local}", r.destination);
        let dst = if r.destination == "default" {
            None
        } else {
            match parse_prefix(&r.destination) {
                Ok(d) => Some(d),
                Err(e) => {
                    log(&format!("{route} skipped: {e}"));
                    continue;
                }
            }
        };
        let gw = match &r.gateway {
            Some(g) => match g.parse::<IpAddr>() {
                Ok(g) => Some(g),
                Err(_) => {
                    log(&format!("{route} skipped: gateway {g} is not an address"));
                    continue;
                }
            },
            None => None,
        };
        match nl.add_route(dst, gw, *idx, r.metric) {
            Ok(()) => lines.push(route),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => lines.push(route),
            Err(e) => log(&format!("{route} not added: {e}; continuing without it")),
        }
    }
    Ok(Some(lines))
}

/// DHCP on each target in parallel; at least one lease is required.
fn dhcp_all(
    nl: &mut Rtnl,
    targets: &[Link],
    hostname: &str,
    resolv: &mut Resolv,
) -> Result<Vec<String>, String> {
    for t in targets {
        nl.set_up(t.index)
            .map_err(|e| format!("cannot bring {} up: {e}", t.name))?;
    }
    let results: Vec<(Link, Result<dhcp::Lease, String>)> = std::thread::scope(|s| {
        let hs: Vec<_> = targets
            .iter()
            .map(|t| {
                let t = t.clone();
                s.spawn(move || {
                    let r = dhcp::obtain(&t.name, &t.mac.unwrap(), hostname, DHCP_TIMEOUT);
                    (t, r)
                })
            })
            .collect();
        hs.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    for (t, r) in results {
        match r {
            Ok(lease) => {
                nl.add_address(t.index, IpAddr::V4(lease.address), lease.prefix)
                    .map_err(|e| {
                        format!(
                            "cannot add {}/{} to {}: {e}",
                            lease.address, lease.prefix, t.name
                        )
                    })?;
                if let Some(g) = lease.router {
                    if let Err(e) =
                        nl.add_route(None, Some(IpAddr::V4(g)), t.index, Some(100 + t.index))
                    {
                        log(&format!(
                            "cannot add default route via {g} on {}: {e}",
                            t.name
                        ));
                    }
                }
                resolv.dns.extend(lease.dns.iter().map(|d| d.to_string()));
                resolv.search.extend(lease.domain.clone());
                lines.push(format!(
                    "{} {} {}/{}{} (dhcp from {}, lease {} s)",
                    t.name,
                    fmt_mac(&t.mac.unwrap()),
                    lease.address,
                    lease.prefix,
                    lease
                        .router
                        .map(|g| format!(" via {g}"))
                        .unwrap_or_default(),
                    lease.server,
                    lease
                        .lease_secs
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "?".into())
                ));
            }
            Err(e) => errors.push(e),
        }
    }
    if lines.is_empty() {
        return Err(errors.join("; "));
    }
    for e in errors {
        log(&e);
    }
    Ok(lines)
}

fn write_resolv(r: &Resolv, hostname: &str) {
    let mut text = String::from("# written by lifeboat-init\n");
    let mut seen = Vec::new();
    for d in &r.dns {
        if !seen.contains(d) {
            text.push_str(&format!("nameserver {d}\n"));
            seen.push(d.clone());
        }
    }
    if !r.search.is_empty() {
        text.push_str(&format!("search {}\n", r.search.join(" ")));
    }
    let _ = std::fs::write("/etc/resolv.conf", text);
    let hosts = format!(
        "127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    );
    let _ = std::fs::write("/etc/hosts", hosts);
}

/// Every global address, for the console report.
pub fn report() -> Vec<String> {
    let Ok(mut nl) = Rtnl::open() else {
        return vec![];
    };
    let links = nl.links().unwrap_or_default();
    let name = |i: u32| {
        links
            .iter()
            .find(|l| l.index == i)
            .map(|l| l.name.clone())
            .unwrap_or_else(|| i.to_string())
    };
    let mut v: Vec<String> = nl
        .addresses()
        .unwrap_or_default()
        .into_iter()
        .map(|(i, ip, len)| format!("{} {ip}/{len}", name(i)))
        .collect();
    for (g, oif) in nl.default_routes().unwrap_or_default() {
        v.push(format!("default via {g} dev {}", name(oif)));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert_eq!(
            parse_prefix("10.0.2.50/24").unwrap(),
            ("10.0.2.50".parse().unwrap(), 24)
        );
        assert_eq!(parse_prefix("fd00::5/64").unwrap().1, 64);
        assert!(parse_prefix("10.0.2.50").is_err());
        assert!(parse_prefix("10.0.2.50/33").is_err());
    }
}
