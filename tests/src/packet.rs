//! Ethernet / IPv4 / UDP frame builders and parsers (no VLANs, no IP options on build).

use std::net::Ipv4Addr;

/// EtherType IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType ARP.
pub const ETH_P_ARP: u16 = 0x0806;

/// Internet checksum (RFC 1071) of `data`, starting from partial sum `initial`.
pub fn inet_checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
    }
    if let [b] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*b) << 8);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: u16) -> u32 {
    let s = src.octets();
    let d = dst.octets();
    u32::from(u16::from_be_bytes([s[0], s[1]]))
        + u32::from(u16::from_be_bytes([s[2], s[3]]))
        + u32::from(u16::from_be_bytes([d[0], d[1]]))
        + u32::from(u16::from_be_bytes([d[2], d[3]]))
        + u32::from(proto)
        + u32::from(len)
}

/// Builds an Ethernet frame: dst, src, ethertype, payload (no padding added).
pub fn eth_frame(src_mac: [u8; 6], dst_mac: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Builds Ethernet + IPv4 (no options, DF set, TTL 64, id 0) + UDP with correct IPv4
/// header checksum and UDP checksum.
#[allow(clippy::too_many_arguments)]
pub fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src_ip: Ipv4Addr,
    dst_ip: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let ip_len = 20 + udp_len;
    assert!(ip_len <= 0xffff, "UDP payload too large");
    let mut f = Vec::with_capacity(14 + ip_len);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&ETH_P_IP.to_be_bytes());
    // IPv4 header
    f.extend_from_slice(&[0x45, 0x00]);
    f.extend_from_slice(&(ip_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0x00, 64, 17, 0, 0]);
    f.extend_from_slice(&src_ip.octets());
    f.extend_from_slice(&dst_ip.octets());
    let csum = inet_checksum(&f[14..34], 0);
    f[24..26].copy_from_slice(&csum.to_be_bytes());
    // UDP
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    let mut c = inet_checksum(&f[34..], pseudo_sum(src_ip, dst_ip, 17, udp_len as u16));
    if c == 0 {
        c = 0xffff;
    }
    f[40..42].copy_from_slice(&c.to_be_bytes());
    f
}

/// Parsed view of an Ethernet/IPv4/UDP frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpView<'a> {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub payload: &'a [u8],
    /// Offset of the IPv4 header in the frame (14).
    pub ip_offset: usize,
    /// Offset of the UDP header in the frame.
    pub udp_offset: usize,
}

/// Parses Ethernet/IPv4/UDP (accepts IP options; rejects fragments other than the first,
/// and truncated frames). Returns `(src_ip, dst_ip, sport, dport, payload)`.
pub fn parse_udp(frame: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, u16, u16, &[u8])> {
    parse_udp_view(frame).map(|v| (v.src_ip, v.dst_ip, v.sport, v.dport, v.payload))
}

/// Like [`parse_udp`] with more detail.
pub fn parse_udp_view(frame: &[u8]) -> Option<UdpView<'_>> {
    if frame.len() < 14 + 20 + 8 || ethertype(frame)? != ETH_P_IP {
        return None;
    }
    let ip = &frame[14..];
    if ip[0] >> 4 != 4 || ip[9] != 17 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let frag_off = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
    if ihl < 20 || tot < ihl + 8 || tot > ip.len() || frag_off != 0 {
        return None;
    }
    let udp = &ip[ihl..tot];
    let ulen = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if ulen < 8 || ulen > udp.len() {
        return None;
    }
    Some(UdpView {
        dst_mac: frame[0..6].try_into().ok()?,
        src_mac: frame[6..12].try_into().ok()?,
        src_ip: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst_ip: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        sport: u16::from_be_bytes([udp[0], udp[1]]),
        dport: u16::from_be_bytes([udp[2], udp[3]]),
        payload: &udp[8..ulen],
        ip_offset: 14,
        udp_offset: 14 + ihl,
    })
}

/// EtherType of an Ethernet frame (None if shorter than 14 bytes).
pub fn ethertype(frame: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]))
}

/// True if the frame is IPv4/UDP with a valid IPv4 header checksum and a valid (or
/// absent, i.e. zero) UDP checksum. Useful to check that a data plane forwards frames
/// with complete checksums.
pub fn udp_checksums_ok(frame: &[u8]) -> bool {
    let Some(v) = parse_udp_view(frame) else {
        return false;
    };
    let ip = &frame[v.ip_offset..v.udp_offset];
    if inet_checksum(ip, 0) != 0 {
        return false;
    }
    let ulen = 8 + v.payload.len();
    let udp = &frame[v.udp_offset..v.udp_offset + ulen];
    if udp[6] == 0 && udp[7] == 0 {
        return true;
    }
    inet_checksum(udp, pseudo_sum(v.src_ip, v.dst_ip, 17, ulen as u16)) == 0
}

/// Builds a broadcast ARP request frame (who-has `target_ip` tell `sender_ip`).
pub fn arp_request(sender_mac: [u8; 6], sender_ip: Ipv4Addr, target_ip: Ipv4Addr) -> Vec<u8> {
    let mut p = Vec::with_capacity(28);
    p.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    p.extend_from_slice(&sender_mac);
    p.extend_from_slice(&sender_ip.octets());
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&target_ip.octets());
    eth_frame(sender_mac, [0xff; 6], ETH_P_ARP, &p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_roundtrip_and_checksums() {
        let f = udp_frame(
            [2, 0, 0, 0, 0, 1],
            [2, 0, 0, 0, 0, 2],
            Ipv4Addr::new(10, 77, 0, 1),
            Ipv4Addr::new(10, 77, 0, 100),
            1234,
            7000,
            b"PING",
        );
        assert!(udp_checksums_ok(&f));
        let (s, d, sp, dp, pl) = parse_udp(&f).unwrap();
        assert_eq!(
            (s, d, sp, dp, pl),
            (
                Ipv4Addr::new(10, 77, 0, 1),
                Ipv4Addr::new(10, 77, 0, 100),
                1234,
                7000,
                &b"PING"[..]
            )
        );
        let mut bad = f.clone();
        bad[45] ^= 1;
        assert!(!udp_checksums_ok(&bad));
        // odd-length payload
        let f = udp_frame(
            [0; 6],
            [0; 6],
            Ipv4Addr::LOCALHOST,
            Ipv4Addr::LOCALHOST,
            1,
            2,
            b"abc",
        );
        assert!(udp_checksums_ok(&f));
    }
}

/// A TCP segment's addressing, sequence number, flags and payload length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSeg {
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub flags: u8,
    pub payload_len: u32,
}

/// Parses Ethernet/IPv4/TCP (IP and TCP options accepted; fragments and truncated
/// frames rejected).
pub fn parse_tcp(frame: &[u8]) -> Option<TcpSeg> {
    if frame.len() < 14 + 20 + 20 || ethertype(frame)? != ETH_P_IP {
        return None;
    }
    let ip = &frame[14..];
    if ip[0] >> 4 != 4 || ip[9] != 6 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff;
    if ihl < 20 || tot < ihl + 20 || tot > ip.len() || frag != 0 {
        return None;
    }
    let tcp = &ip[ihl..tot];
    let doff = usize::from(tcp[12] >> 4) * 4;
    if doff < 20 || doff > tcp.len() {
        return None;
    }
    Some(TcpSeg {
        src_ip: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst_ip: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        sport: u16::from_be_bytes([tcp[0], tcp[1]]),
        dport: u16::from_be_bytes([tcp[2], tcp[3]]),
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        flags: tcp[13],
        payload_len: (tcp.len() - doff) as u32,
    })
}
