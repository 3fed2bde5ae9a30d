//! The kernel command line options lifeboat-init understands (documented in
//! the README). Parsed from a string, so it is unit-testable.

use std::net::Ipv4Addr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Recover {
    /// Run the recovery unattended.
    Auto,
    /// Show the plan and ask.
    Ask,
    /// Only offer a shell.
    #[default]
    No,
}

/// One `ip=` option, dracut syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpArg {
    /// `ip=dhcp` / `ip=on` / `ip=any` / `ip=<iface>:dhcp`.
    Dhcp { iface: Option<String> },
    /// `ip=off` / `ip=none` / `ip=<iface>:off`: no network configuration.
    Off { iface: Option<String> },
    /// `ip=<client>:[<peer>]:<gw>:<netmask>:<host>:<iface>:{none|off}[:<dns1>[:<dns2>]]`
    Static {
        client: Ipv4Addr,
        prefix: u8,
        gateway: Option<Ipv4Addr>,
        hostname: Option<String>,
        iface: Option<String>,
        dns: Vec<Ipv4Addr>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cmdline {
    pub recover: Recover,
    /// `lifeboat.shell`: stop at a shell before anything else (no recovery).
    pub shell: bool,
    pub debug: bool,
    /// `lifeboat.layers=URL[,URL...]`.
    pub layers: Vec<String>,
    /// `lifeboat.chain=URL`: a `lifeboat serve` to fetch this machine's layers from.
    pub chain: Option<String>,
    pub ip: Vec<IpArg>,
    /// `BOOTIF=01-52-54-00-12-34-56` (pxelinux IPAPPEND 2): the boot NIC.
    pub bootif: Option<[u8; 6]>,
    /// `lifeboat.ssh=0|1`.
    pub ssh: Option<bool>,
    /// `console=` devices, in order (`ttyS0`, `tty0`).
    pub consoles: Vec<String>,
    /// `lifeboat.console=`: where the shell goes, overriding `console=`.
    pub shell_console: Option<String>,
    /// Problems found while parsing, reported on the console.
    pub warnings: Vec<String>,
}

/// Split like the kernel: whitespace separates, double quotes group.
pub fn split(cmdline: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

fn parse_bool(v: Option<&str>) -> Option<bool> {
    match v {
        None | Some("1") | Some("yes") | Some("true") | Some("on") => Some(true),
        Some("0") | Some("no") | Some("false") | Some("off") => Some(false),
        _ => None,
    }
}

/// Parse a netmask given dotted (`255.255.255.0`) or as a prefix length (`24`).
pub fn parse_netmask(s: &str) -> Option<u8> {
    if let Ok(n) = s.parse::<u8>() {
        return (n <= 32).then_some(n);
    }
    let m: Ipv4Addr = s.parse().ok()?;
    let bits = u32::from(m);
    let prefix = bits.leading_ones() as u8;
    (bits.checked_shl(prefix as u32).unwrap_or(0) == 0).then_some(prefix)
}

pub fn parse_ip(v: &str) -> Result<IpArg, String> {
    let f: Vec<&str> = v.split(':').collect();
    let opt = |i: usize| {
        f.get(i)
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(|s| s.to_string())
    };
    match f.len() {
        1 => match f[0] {
            "dhcp" | "on" | "any" => Ok(IpArg::Dhcp { iface: None }),
            "off" | "none" => Ok(IpArg::Off { iface: None }),
            other => Err(format!("ip={other}: only dhcp/on/any/off/none, <iface>:<method> or the static form are supported")),
        },
        2..=4 => match f[1] {
            "dhcp" | "on" | "any" => Ok(IpArg::Dhcp { iface: opt(0) }),
            "off" | "none" => Ok(IpArg::Off { iface: opt(0) }),
            m => Err(format!("ip={v}: method {m:?} is not supported (use dhcp or off)")),
        },
        _ => {
            let client: Ipv4Addr = f[0].parse().map_err(|_| format!("ip={v}: {:?} is not an IPv4 address", f[0]))?;
            let gateway = match opt(2) {
                Some(g) => Some(g.parse().map_err(|_| format!("ip={v}: gateway {g:?} is not an IPv4 address"))?),
                None => None,
            };
            let prefix = match opt(3) {
                Some(m) => parse_netmask(&m).ok_or_else(|| format!("ip={v}: netmask {m:?} is invalid"))?,
                None => 24,
            };
            let method = opt(6).unwrap_or_else(|| "none".into());
            if !matches!(method.as_str(), "none" | "off" | "static") {
                return Err(format!("ip={v}: method {method:?} cannot go with a static address (use none)"));
            }
            let mut dns = Vec::new();
            for i in [7, 8] {
                if let Some(d) = opt(i) {
                    // Field 7 may be an MTU in the other form; accept only addresses here.
                    if let Ok(a) = d.parse() {
                        dns.push(a);
                    }
                }
            }
            Ok(IpArg::Static { client, prefix, gateway, hostname: opt(4), iface: opt(5), dns })
        }
    }
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut m = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        m[i] = u8::from_str_radix(p, 16).ok()?;
    }
    Some(m)
}

pub fn parse(cmdline: &str) -> Cmdline {
    let mut c = Cmdline::default();
    for word in split(cmdline) {
        let (k, v) = match word.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (word.clone(), None),
        };
        let v = v.as_deref();
        match k.as_str() {
            "lifeboat.recover" => match v {
                Some("auto") | Some("yes") | Some("1") => c.recover = Recover::Auto,
                Some("ask") | None => c.recover = Recover::Ask,
                Some("no") | Some("0") => c.recover = Recover::No,
                Some(x) => c.warnings.push(format!(
                    "lifeboat.recover={x} is not auto, ask or no; ignored"
                )),
            },
            "lifeboat.shell" => c.shell = parse_bool(v).unwrap_or(true),
            "lifeboat.debug" => c.debug = parse_bool(v).unwrap_or(true),
            "lifeboat.layers" => c.layers.extend(
                v.unwrap_or("")
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| s.to_string()),
            ),
            "lifeboat.chain" => c.chain = v.filter(|s| !s.is_empty()).map(|s| s.to_string()),
            "lifeboat.ssh" => match parse_bool(v) {
                Some(b) => c.ssh = Some(b),
                None => c.warnings.push(format!(
                    "lifeboat.ssh={} is not 0 or 1; ignored",
                    v.unwrap_or("")
                )),
            },
            "lifeboat.console" => c.shell_console = v.map(|s| s.to_string()),
            "console" => {
                if let Some(dev) = v {
                    let dev = dev
                        .split(',')
                        .next()
                        .unwrap_or("")
                        .trim_start_matches("/dev/");
                    if !dev.is_empty() {
                        c.consoles.push(dev.to_string());
                    }
                }
            }
            "ip" => match v.map(parse_ip) {
                Some(Ok(a)) => c.ip.push(a),
                Some(Err(e)) => c.warnings.push(e),
                None => c.warnings.push("ip= needs a value".into()),
            },
            "BOOTIF" => {
                // "01-aa-bb-cc-dd-ee-ff": ARP type 1 (Ethernet) then the MAC.
                let s = v.unwrap_or("");
                let mac = s.strip_prefix("01-").unwrap_or(s);
                match parse_mac(mac) {
                    Some(m) => c.bootif = Some(m),
                    None => c
                        .warnings
                        .push(format!("BOOTIF={s} is not 01-xx-xx-xx-xx-xx-xx; ignored")),
                }
            }
            _ => {}
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_with_quotes() {
        assert_eq!(split(r#"a b="c d"  e"#), vec!["a", "b=c d", "e"]);
        assert_eq!(split("  "), Vec::<String>::new());
    }

    #[test]
    fn full_cmdline() {
        let c = parse(
            "BOOT_IMAGE=/vmlinuz console=tty0 console=ttyS0,115200n8 lifeboat.recover=auto lifeboat.debug \
             lifeboat.layers=http://10.0.2.2/a,http://10.0.2.2/b lifeboat.ssh=0 BOOTIF=01-52-54-00-12-34-56 ip=dhcp quiet",
        );
        assert_eq!(c.recover, Recover::Auto);
        assert!(c.debug && !c.shell);
        assert_eq!(c.layers, vec!["http://10.0.2.2/a", "http://10.0.2.2/b"]);
        assert_eq!(c.ssh, Some(false));
        assert_eq!(c.consoles, vec!["tty0", "ttyS0"]);
        assert_eq!(c.bootif, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(c.ip, vec![IpArg::Dhcp { iface: None }]);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn ip_static_forms() {
        assert_eq!(
            parse_ip("10.0.2.60::10.0.2.2:255.255.255.0:rescue:eth0:none").unwrap(),
            IpArg::Static {
                client: "10.0.2.60".parse().unwrap(),
                prefix: 24,
                gateway: Some("10.0.2.2".parse().unwrap()),
                hostname: Some("rescue".into()),
                iface: Some("eth0".into()),
                dns: vec![],
            }
        );
        match parse_ip("192.168.1.5::192.168.1.1:16::ens3:off:1.1.1.1:8.8.8.8").unwrap() {
            IpArg::Static {
                prefix,
                hostname,
                dns,
                ..
            } => {
                assert_eq!(prefix, 16);
                assert_eq!(hostname, None);
                assert_eq!(dns.len(), 2);
            }
            x => panic!("{x:?}"),
        }
        assert_eq!(
            parse_ip("eth1:dhcp").unwrap(),
            IpArg::Dhcp {
                iface: Some("eth1".into())
            }
        );
        assert_eq!(parse_ip("off").unwrap(), IpArg::Off { iface: None });
    }

    #[test]
    fn bad_values_are_reported_not_fatal() {
        let c =
            parse("ip=300.1.1.1::1.1.1.1:24::eth0:none ip=bogus lifeboat.recover=maybe BOOTIF=zz");
        assert!(c.ip.is_empty());
        assert_eq!(c.warnings.len(), 4, "{:?}", c.warnings);
        assert!(
            parse_ip("10.0.0.1::10.0.0.254:255.0.255.0::eth0:none").is_err(),
            "non-contiguous mask accepted"
        );
        assert!(parse_ip("10.0.0.1::10.0.0.254:24::eth0:dhcp").is_err());
    }

    #[test]
    fn netmasks() {
        assert_eq!(parse_netmask("255.255.255.0"), Some(24));
        assert_eq!(parse_netmask("255.255.254.0"), Some(23));
        assert_eq!(parse_netmask("0.0.0.0"), Some(0));
        assert_eq!(parse_netmask("255.255.255.255"), Some(32));
        assert_eq!(parse_netmask("33"), None);
    }
}
