//! Synchronous rtnetlink: list links, bring them up, set MTU, add
//! addresses and routes, create VLAN/bond/bridge devices and enslave ports.

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    BondMode, InfoBond, InfoData, InfoKind, InfoVlan, LinkAttribute, LinkFlags, LinkInfo,
    LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::io;
use std::net::{IpAddr, Ipv4Addr};

pub struct Rtnl {
    sock: Socket,
    seq: u32,
}

#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub loopback: bool,
    /// Has `linkinfo` kind (vlan, bond, bridge, ...): not a physical NIC.
    pub virtual_kind: bool,
}

fn nl_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl Rtnl {
    pub fn open() -> io::Result<Rtnl> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Rtnl { sock, seq: 1 })
    }

    /// Send one request; collect the replies until ACK/DONE.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        self.seq += 1;
        header.sequence_number = self.seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        self.sock.send(&buf, 0)?;
        let mut out = Vec::new();
        loop {
            let mut rbuf = Vec::with_capacity(65536);
            let n = self.sock.recv(&mut rbuf, 0)?;
            let mut off = 0;
            while off < n {
                let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rbuf[off..n])
                    .map_err(nl_err)?;
                let len = m.header.length as usize;
                if len == 0 {
                    return Err(nl_err("zero-length netlink message"));
                }
                off += (len + 3) & !3;
                if m.header.sequence_number != self.seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                        };
                    }
                    NetlinkPayload::InnerMessage(inner) => {
                        out.push(inner);
                        if flags & NLM_F_DUMP == 0 && flags & NLM_F_ACK == 0 {
                            return Ok(out);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    pub fn links(&mut self) -> io::Result<Vec<Link>> {
        let replies = self.request(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        let mut out = Vec::new();
        for r in replies {
            let RouteNetlinkMessage::NewLink(l) = r else {
                continue;
            };
            let mut link = Link {
                index: l.header.index,
                name: String::new(),
                mac: None,
                loopback: l.header.flags.contains(LinkFlags::Loopback),
                virtual_kind: false,
            };
            for a in &l.attributes {
                match a {
                    LinkAttribute::IfName(n) => link.name = n.clone(),
                    LinkAttribute::Address(m) if m.len() == 6 => {
                        link.mac = Some(m[..6].try_into().unwrap())
                    }
                    LinkAttribute::PermAddress(m) if m.len() == 6 && m.iter().any(|b| *b != 0) => {
                        link.mac = Some(m[..6].try_into().unwrap())
                    }
                    LinkAttribute::LinkInfo(infos) => {
                        link.virtual_kind = infos.iter().any(|i| matches!(i, LinkInfo::Kind(_)));
                    }
                    _ => {}
                }
            }
            out.push(link);
        }
        Ok(out)
    }

    fn set_link(
        &mut self,
        index: u32,
        attrs: Vec<LinkAttribute>,
        up: Option<bool>,
    ) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        if let Some(up) = up {
            m.header.change_mask = LinkFlags::Up;
            if up {
                m.header.flags = LinkFlags::Up;
            }
        }
        m.attributes = attrs;
        self.request(RouteNetlinkMessage::SetLink(m), NLM_F_ACK)
            .map(|_| ())
    }

    pub fn set_up(&mut self, index: u32) -> io::Result<()> {
        self.set_link(index, vec![], Some(true))
    }

    pub fn set_down(&mut self, index: u32) -> io::Result<()> {
        self.set_link(index, vec![], Some(false))
    }

    pub fn set_mtu(&mut self, index: u32, mtu: u32) -> io::Result<()> {
        self.set_link(index, vec![LinkAttribute::Mtu(mtu)], None)
    }

    /// Enslave `index` to the bond or bridge `master`.
    pub fn set_master(&mut self, index: u32, master: u32) -> io::Result<()> {
        self.set_link(index, vec![LinkAttribute::Controller(master)], None)
    }

    fn new_link(
        &mut self,
        name: &str,
        kind: InfoKind,
        data: Option<InfoData>,
        parent: Option<u32>,
    ) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        if let Some(p) = parent {
            m.attributes.push(LinkAttribute::Link(p));
        }
        let mut info = vec![LinkInfo::Kind(kind)];
        if let Some(d) = data {
            info.push(LinkInfo::Data(d));
        }
        m.attributes.push(LinkAttribute::LinkInfo(info));
        self.request(
            RouteNetlinkMessage::NewLink(m),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(|_| ())
    }

    pub fn del_link(&mut self, index: u32) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        self.request(RouteNetlinkMessage::DelLink(m), NLM_F_ACK)
            .map(|_| ())
    }

    pub fn create_vlan(&mut self, name: &str, parent: u32, id: u16) -> io::Result<()> {
        self.new_link(
            name,
            InfoKind::Vlan,
            Some(InfoData::Vlan(vec![InfoVlan::Id(id)])),
            Some(parent),
        )
    }

    pub fn create_bond(&mut self, name: &str, mode: &str) -> io::Result<()> {
        let mode = match mode {
            "balance-rr" | "0" => BondMode::BalanceRr,
            "active-backup" | "1" => BondMode::ActiveBackup,
            "balance-xor" | "2" => BondMode::BalanceXor,
            "broadcast" | "3" => BondMode::Broadcast,
            "802.3ad" | "4" => BondMode::Ieee8023Ad,
            "balance-tlb" | "5" => BondMode::BalanceTlb,
            "balance-alb" | "6" => BondMode::BalanceAlb,
            other => return Err(io::Error::other(format!("unknown bonding mode {other:?}"))),
        };
        self.new_link(
            name,
            InfoKind::Bond,
            Some(InfoData::Bond(vec![
                InfoBond::Mode(mode),
                InfoBond::MiiMon(100),
            ])),
            None,
        )
    }

    pub fn create_bridge(&mut self, name: &str) -> io::Result<()> {
        self.new_link(name, InfoKind::Bridge, None, None)
    }

    pub fn add_address(&mut self, index: u32, ip: IpAddr, prefix: u8) -> io::Result<()> {
        let mut m = AddressMessage::default();
        m.header.index = index;
        m.header.prefix_len = prefix;
        m.header.scope = AddressScope::Universe;
        match ip {
            IpAddr::V4(v4) => {
                m.header.family = AddressFamily::Inet;
                m.attributes.push(AddressAttribute::Local(ip));
                m.attributes.push(AddressAttribute::Address(ip));
                let host_bits = 32 - prefix as u32;
                let bcast = if prefix < 31 {
                    u32::from(v4) | ((1u64 << host_bits) - 1) as u32
                } else {
                    u32::from(v4)
                };
                m.attributes
                    .push(AddressAttribute::Broadcast(Ipv4Addr::from(bcast)));
            }
            IpAddr::V6(_) => {
                m.header.family = AddressFamily::Inet6;
                m.attributes.push(AddressAttribute::Address(ip));
            }
        }
        match self.request(
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// Add a route; `dst` None means default.
    pub fn add_route(
        &mut self,
        dst: Option<(IpAddr, u8)>,
        gateway: Option<IpAddr>,
        oif: u32,
        metric: Option<u32>,
    ) -> io::Result<()> {
        let mut m = RouteMessage::default();
        let v6 = matches!(dst.map(|d| d.0).or(gateway), Some(IpAddr::V6(_)));
        m.header.address_family = if v6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::Boot;
        m.header.kind = RouteType::Unicast;
        m.header.scope = if gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        if let Some((ip, len)) = dst {
            m.header.destination_prefix_length = len;
            m.attributes
                .push(RouteAttribute::Destination(route_addr(ip)));
        }
        if let Some(g) = gateway {
            m.attributes.push(RouteAttribute::Gateway(route_addr(g)));
        }
        m.attributes.push(RouteAttribute::Oif(oif));
        if let Some(p) = metric {
            m.attributes.push(RouteAttribute::Priority(p));
        }
        match self.request(
            RouteNetlinkMessage::NewRoute(m),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// Global addresses per interface index, as (ip, prefix).
    pub fn addresses(&mut self) -> io::Result<Vec<(u32, IpAddr, u8)>> {
        let replies = self.request(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
        )?;
        let mut out = Vec::new();
        for r in replies {
            let RouteNetlinkMessage::NewAddress(a) = r else {
                continue;
            };
            if a.header.scope != AddressScope::Universe {
                continue;
            }
            let ip = a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let ip = ip.or_else(|| {
                a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(ip) = ip {
                out.push((a.header.index, ip, a.header.prefix_len));
            }
        }
        Ok(out)
    }

    /// IPv4 default gateways as (gateway, oif).
    pub fn default_routes(&mut self) -> io::Result<Vec<(IpAddr, u32)>> {
        let mut req = RouteMessage::default();
        req.header.address_family = AddressFamily::Inet;
        let replies = self.request(RouteNetlinkMessage::GetRoute(req), NLM_F_DUMP)?;
        let mut out = Vec::new();
        for r in replies {
            let RouteNetlinkMessage::NewRoute(m) = r else {
                continue;
            };
            if m.header.destination_prefix_length != 0
                || m.header.table != RouteHeader::RT_TABLE_MAIN
            {
                continue;
            }
            let gw = m.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => Some(IpAddr::V4(*g)),
                _ => None,
            });
            let oif = m.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(o) => Some(*o),
                _ => None,
            });
            if let (Some(g), Some(o)) = (gw, oif) {
                out.push((g, o));
            }
        }
        Ok(out)
    }
}

fn route_addr(ip: IpAddr) -> RouteAddress {
    match ip {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }
}

pub fn fmt_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
