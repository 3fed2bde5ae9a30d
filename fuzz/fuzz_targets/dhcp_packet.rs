//! DHCP replies as the init receives them from the network: anything on
//! UDP port 68 is parsed; only a valid reply to our request is a lease.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../rescue-init/src/net/dhcp.rs"]
mod dhcp;

fuzz_target!(|data: &[u8]| {
    let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    let _ = dhcp::parse_reply(data, 0x1234_5678, &mac);
    // With the xid and MAC taken from the packet itself, replies get past
    // the "for someone else" check and into the option parsing.
    if data.len() >= 34 {
        let xid = u32::from_be_bytes([data[4], data[5], data[6], data[7]]);
        let mut m = [0u8; 6];
        m.copy_from_slice(&data[28..34]);
        let _ = dhcp::parse_reply(data, xid, &m);
    }
});
