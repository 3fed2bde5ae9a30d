//! DHCPv4 client: DISCOVER → OFFER → REQUEST → ACK, with retries and
//! exponential backoff. Packets are built and parsed with dhcproto; the
//! state machine and the lease are ours.

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// What the server gave us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    pub server: Ipv4Addr,
    pub lease_secs: Option<u32>,
}

/// A parsed server reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub kind: MessageType,
    pub lease: Lease,
}

fn base(xid: u32, mac: &[u8; 6], hostname: &str) -> Message {
    let mut m = Message::new_with_id(
        xid,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        mac,
    );
    m.set_opcode(Opcode::BootRequest);
    // Ask for broadcast replies: we have no address to receive unicast on yet.
    m.set_flags(Flags::default().set_broadcast());
    let o = m.opts_mut();
    let mut cid = vec![1u8];
    cid.extend_from_slice(mac);
    o.insert(DhcpOption::ClientIdentifier(cid));
    o.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::DomainName,
        OptionCode::AddressLeaseTime,
    ]));
    if !hostname.is_empty() {
        o.insert(DhcpOption::Hostname(hostname.to_string()));
    }
    m
}

pub fn discover(xid: u32, mac: &[u8; 6], hostname: &str) -> Vec<u8> {
    let mut m = base(xid, mac, hostname);
    m.opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Discover));
    encode(&m)
}

pub fn request(xid: u32, mac: &[u8; 6], hostname: &str, offer: &Lease) -> Vec<u8> {
    let mut m = base(xid, mac, hostname);
    let o = m.opts_mut();
    o.insert(DhcpOption::MessageType(MessageType::Request));
    o.insert(DhcpOption::RequestedIpAddress(offer.address));
    o.insert(DhcpOption::ServerIdentifier(offer.server));
    encode(&m)
}

fn encode(m: &Message) -> Vec<u8> {
    let mut buf = Vec::with_capacity(576);
    let mut e = Encoder::new(&mut buf);
    m.encode(&mut e)
        .expect("encoding a DHCP message into a Vec cannot fail");
    buf
}

/// The packet with only the options a lease is made of (message type,
/// server id, subnet mask, router, DNS, lease time), each of a valid
/// length; None when the options area is malformed.
fn keep_lease_options(buf: &[u8]) -> Option<Vec<u8>> {
    if buf.get(236..240)? != [99, 130, 83, 99] {
        return None;
    }
    let mut out = buf[..240].to_vec();
    let mut i = 240;
    while i < buf.len() {
        let code = buf[i];
        if code == 0 {
            i += 1;
            continue;
        }
        if code == 255 {
            break;
        }
        let len = *buf.get(i + 1)? as usize;
        let val = buf.get(i + 2..i + 2 + len)?;
        let ok = match code {
            53 => len == 1,
            1 | 51 | 54 => len == 4,
            3 | 6 => len >= 4 && len.is_multiple_of(4),
            _ => false,
        };
        if ok {
            out.extend_from_slice(&[code, len as u8]);
            out.extend_from_slice(val);
        }
        i += 2 + len;
    }
    out.push(255);
    Some(out)
}

/// Parse a reply meant for us (`xid` and `mac` must match); anything else is None.
pub fn parse_reply(buf: &[u8], xid: u32, mac: &[u8; 6]) -> Option<Reply> {
    // dhcproto slices chaddr by the packet's hlen (found by fuzzing: an hlen
    // above 16 made it panic). Such a packet is not a reply to us.
    if buf.len() < 240 || buf[2] as usize > 16 {
        return None;
    }
    // dhcproto also asserts on some option lengths and unwraps some
    // values (found by fuzzing). Only the options a lease needs, with
    // lengths checked here, are handed to it.
    let buf = &keep_lease_options(buf)?;
    let m = std::panic::catch_unwind(|| Message::decode(&mut Decoder::new(buf)))
        .ok()?
        .ok()?;
    if m.opcode() != Opcode::BootReply || m.xid() != xid || m.chaddr().get(..6) != Some(&mac[..]) {
        return None;
    }
    let o = m.opts();
    let kind = o.msg_type()?;
    let prefix = match o.get(OptionCode::SubnetMask) {
        Some(DhcpOption::SubnetMask(mask)) => u32::from(*mask).leading_ones() as u8,
        _ => 24,
    };
    let router = match o.get(OptionCode::Router) {
        Some(DhcpOption::Router(r)) => r.first().copied(),
        _ => None,
    };
    let dns = match o.get(OptionCode::DomainNameServer) {
        Some(DhcpOption::DomainNameServer(d)) => d.clone(),
        _ => vec![],
    };
    let domain = match o.get(OptionCode::DomainName) {
        Some(DhcpOption::DomainName(d)) => Some(d.clone()),
        _ => None,
    };
    let server = match o.get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(s)) => *s,
        _ => m.siaddr(),
    };
    let lease_secs = match o.get(OptionCode::AddressLeaseTime) {
        Some(DhcpOption::AddressLeaseTime(t)) => Some(*t),
        _ => None,
    };
    Some(Reply {
        kind,
        lease: Lease {
            address: m.yiaddr(),
            prefix,
            router,
            dns,
            domain,
            server,
            lease_secs,
        },
    })
}

/// A UDP socket on port 68 bound to one interface, allowed to broadcast.
struct Sock {
    fd: i32,
}

impl Sock {
    fn open(ifname: &str) -> std::io::Result<Sock> {
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let s = Sock { fd };
            let one: libc::c_int = 1;
            let p = &one as *const _ as *const libc::c_void;
            let l = std::mem::size_of::<libc::c_int>() as u32;
            libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, p, l);
            if libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_BROADCAST, p, l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let name = std::ffi::CString::new(ifname).unwrap();
            if libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_BINDTODEVICE,
                name.as_ptr() as *const libc::c_void,
                ifname.len() as u32 + 1,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as u16;
            addr.sin_port = 68u16.to_be();
            if libc::bind(
                fd,
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(s)
        }
    }

    fn send_broadcast(&self, data: &[u8]) -> std::io::Result<()> {
        unsafe {
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as u16;
            addr.sin_port = 67u16.to_be();
            addr.sin_addr.s_addr = u32::MAX;
            let n = libc::sendto(
                self.fd,
                data.as_ptr() as *const libc::c_void,
                data.len(),
                0,
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            );
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        let mut pfd = libc::pollfd {
            fd: self.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        if unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().max(1) as i32) } <= 0 {
            return None;
        }
        let mut buf = vec![0u8; 1500];
        let n = unsafe { libc::recv(self.fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        (n > 0).then(|| {
            buf.truncate(n as usize);
            buf
        })
    }
}

impl Drop for Sock {
    fn drop(&mut self) {
        unsafe { libc::close(self.fd) };
    }
}

/// Wait for a reply of `want` kind (a NAK also ends the wait).
fn wait_reply(
    s: &Sock,
    xid: u32,
    mac: &[u8; 6],
    want: MessageType,
    timeout: Duration,
) -> Option<Reply> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        let Some(buf) = s.recv(timeout.saturating_sub(t0.elapsed())) else {
            continue;
        };
        if let Some(r) = parse_reply(&buf, xid, mac) {
            if r.kind == want || r.kind == MessageType::Nak {
                return Some(r);
            }
        }
    }
    None
}

/// Obtain a lease on `ifname` (which must be up), retrying with backoff
/// (1, 2, 4, 8 s per attempt) until `total` has passed.
pub fn obtain(
    ifname: &str,
    mac: &[u8; 6],
    hostname: &str,
    total: Duration,
) -> Result<Lease, String> {
    let s =
        Sock::open(ifname).map_err(|e| format!("cannot open a DHCP socket on {ifname}: {e}"))?;
    let t0 = Instant::now();
    let mut wait = Duration::from_secs(1);
    let mut attempt = 0u32;
    while t0.elapsed() < total {
        attempt += 1;
        let xid = seed(mac, attempt);
        if let Err(e) = s.send_broadcast(&discover(xid, mac, hostname)) {
            return Err(format!("cannot send DHCPDISCOVER on {ifname}: {e}"));
        }
        let left = total.saturating_sub(t0.elapsed());
        if let Some(offer) = wait_reply(&s, xid, mac, MessageType::Offer, wait.min(left)) {
            if offer.kind == MessageType::Offer {
                let _ = s.send_broadcast(&request(xid, mac, hostname, &offer.lease));
                if let Some(ack) =
                    wait_reply(&s, xid, mac, MessageType::Ack, Duration::from_secs(3))
                {
                    if ack.kind == MessageType::Ack {
                        return Ok(ack.lease);
                    }
                }
            }
        }
        wait = (wait * 2).min(Duration::from_secs(8));
    }
    Err(format!(
        "no DHCP lease on {ifname} after {attempt} attempts in {} s",
        total.as_secs()
    ))
}

fn seed(mac: &[u8; 6], attempt: u32) -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]]) ^ t ^ attempt.wrapping_mul(0x9E37_79B9)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn server_reply(kind: MessageType, xid: u32, mac: &[u8; 6]) -> Vec<u8> {
        let mut m = Message::new_with_id(
            xid,
            Ipv4Addr::UNSPECIFIED,
            "10.0.2.15".parse().unwrap(),
            "10.0.2.2".parse().unwrap(),
            Ipv4Addr::UNSPECIFIED,
            mac,
        );
        m.set_opcode(Opcode::BootReply);
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(kind));
        o.insert(DhcpOption::SubnetMask("255.255.255.0".parse().unwrap()));
        o.insert(DhcpOption::Router(vec!["10.0.2.2".parse().unwrap()]));
        o.insert(DhcpOption::DomainNameServer(vec!["10.0.2.3"
            .parse()
            .unwrap()]));
        o.insert(DhcpOption::ServerIdentifier("10.0.2.2".parse().unwrap()));
        o.insert(DhcpOption::AddressLeaseTime(86400));
        encode(&m)
    }

    #[test]
    fn discover_is_a_broadcast_request_with_our_mac() {
        let b = discover(0x1234, &MAC, "rescue");
        let m = Message::decode(&mut Decoder::new(&b)).unwrap();
        assert_eq!(m.opcode(), Opcode::BootRequest);
        assert_eq!(m.xid(), 0x1234);
        assert!(m.flags().broadcast());
        assert_eq!(&m.chaddr()[..6], &MAC);
        assert_eq!(m.opts().msg_type(), Some(MessageType::Discover));
        assert!(
            matches!(m.opts().get(OptionCode::Hostname), Some(DhcpOption::Hostname(h)) if h == "rescue")
        );
        // Wire format: op=1, htype=1 (Ethernet), hlen=6, magic cookie at 236.
        assert_eq!(&b[..3], &[1, 1, 6]);
        assert_eq!(&b[236..240], &[99, 130, 83, 99]);
    }

    #[test]
    fn offer_is_parsed_into_a_lease() {
        let r = parse_reply(&server_reply(MessageType::Offer, 7, &MAC), 7, &MAC).unwrap();
        assert_eq!(r.kind, MessageType::Offer);
        assert_eq!(r.lease.address, "10.0.2.15".parse::<Ipv4Addr>().unwrap());
        assert_eq!(r.lease.prefix, 24);
        assert_eq!(r.lease.router, Some("10.0.2.2".parse().unwrap()));
        assert_eq!(r.lease.dns, vec!["10.0.2.3".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(r.lease.server, "10.0.2.2".parse::<Ipv4Addr>().unwrap());
        assert_eq!(r.lease.lease_secs, Some(86400));
    }

    /// Found by the dhcp_packet fuzz target: a reply whose hardware
    /// address length (hlen) exceeds chaddr's 16 bytes made the decoder's
    /// chaddr() panic; such a packet is ignored.
    #[test]
    fn a_reply_with_a_bad_hardware_address_length_is_ignored_not_a_panic() {
        let mut b = server_reply(MessageType::Offer, 7, &MAC);
        b[2] = 93;
        assert!(parse_reply(&b, 7, &MAC).is_none());
        let artifact: &[u8] = &b[..100];
        assert!(parse_reply(artifact, 7, &MAC).is_none());
    }

    /// The xid and client MAC a packet carries (what parse_reply matches).
    fn addressed_to(p: &[u8]) -> (u32, [u8; 6]) {
        let mut m = [0u8; 6];
        m.copy_from_slice(&p[28..34]);
        (u32::from_be_bytes([p[4], p[5], p[6], p[7]]), m)
    }

    /// Found by the dhcp_packet fuzz target: this packet (a RapidCommit
    /// option with a payload) trips an assertion inside dhcproto.
    #[test]
    fn a_packet_the_decoder_panics_on_is_ignored() {
        const PACKET: &[u8] = &[
            0x02, 0x01, 0x06, 0x00, 0x12, 0x34, 0x56, 0x78, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x2e, 0x2e, 0x2e, 0x2e, 0x2e, 0x2e, 0x2e, 0x2e, 0x2e, 0x2e, 0x2e, 0x2e, 0x2e,
            0x2e, 0x2e, 0x00, 0x0a, 0x00, 0x02, 0x0f, 0x0a, 0x00, 0x02, 0x02, 0x00, 0x00, 0x00,
            0x00, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x90, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x63, 0x82,
            0x53, 0x63, 0x50, 0x01, 0x02, 0x36, 0x06, 0x0a, 0x00, 0x02, 0x02, 0x01, 0x04, 0xff,
            0x10, 0xff,
        ];
        assert!(parse_reply(PACKET, 0x1234_5678, &MAC).is_none());
        let (xid, m) = addressed_to(PACKET);
        assert!(parse_reply(PACKET, xid, &m).is_none());
    }

    /// Found by the dhcp_packet fuzz target after the first fix: an
    /// option whose length dhcproto asserts on (a bulk lease query time).
    #[test]
    fn a_packet_with_an_odd_option_length_is_decoded_without_it() {
        const PACKET: &[u8] = &[
            0x02, 0x01, 0x06, 0x00, 0x12, 0x34, 0x56, 0x78, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0a, 0x00, 0x02, 0x0f,
            0x0a, 0x00, 0x02, 0x02, 0x00, 0x00, 0x00, 0x00, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xf8,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x7c, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0xfd, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x63, 0x82, 0x53, 0x63, 0x35, 0x99,
            0x99, 0x99, 0x99, 0x01, 0x02, 0x36, 0x04, 0x0a, 0x00, 0x02, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xff, 0xf8, 0x04, 0x0a, 0x00, 0x02, 0x02, 0x06, 0x04, 0x0a, 0x00, 0x02,
            0x03, 0x31, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00,
        ];
        let (xid, m) = addressed_to(PACKET);
        let _ = parse_reply(PACKET, xid, &m);
        assert!(keep_lease_options(PACKET).is_none_or(|b| !b[240..].contains(&152)));
    }

    #[test]
    fn request_names_the_offered_address_and_server() {
        let offer = parse_reply(&server_reply(MessageType::Offer, 9, &MAC), 9, &MAC).unwrap();
        let b = request(9, &MAC, "", &offer.lease);
        let m = Message::decode(&mut Decoder::new(&b)).unwrap();
        assert_eq!(m.opts().msg_type(), Some(MessageType::Request));
        assert!(
            matches!(m.opts().get(OptionCode::RequestedIpAddress), Some(DhcpOption::RequestedIpAddress(a)) if *a == offer.lease.address)
        );
        assert!(
            matches!(m.opts().get(OptionCode::ServerIdentifier), Some(DhcpOption::ServerIdentifier(a)) if *a == offer.lease.server)
        );
    }

    #[test]
    fn replies_for_someone_else_are_ignored() {
        assert!(
            parse_reply(&server_reply(MessageType::Offer, 7, &MAC), 8, &MAC).is_none(),
            "wrong xid"
        );
        let other = [0x52, 0x54, 0, 0, 0, 1];
        assert!(
            parse_reply(&server_reply(MessageType::Offer, 7, &other), 7, &MAC).is_none(),
            "wrong MAC"
        );
        assert!(
            parse_reply(&discover(7, &MAC, ""), 7, &MAC).is_none(),
            "a request is not a reply"
        );
        assert!(parse_reply(b"garbage", 7, &MAC).is_none());
    }
}
