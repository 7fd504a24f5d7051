//! Paris traceroute probes (whole IPv4 or IPv6 packets, for an `IPPROTO_RAW` socket)
//! and the parsing of what comes back: ICMP / ICMPv6 errors quoting a probe, echo
//! replies, and TCP SYN-ACK / RST. Parsing never panics: every field is read with a
//! bounds check, and anything that is not an answer to this trace's probes is ignored.
//!
//! Paris traceroute keeps every field that per-flow load balancers hash constant for
//! the whole trace (addresses, protocol, IPv6 flow label, the first four bytes of the
//! transport header), and tells probes apart by a field they do not hash but ICMP
//! errors quote:
//!
//! - UDP: fixed ports; the UDP checksum is the probe's wire id, reached by setting the
//!   first two payload bytes;
//! - ICMP echo: fixed checksum (so the "ports" that load balancers read, type, code
//!   and checksum, never change); the sequence number is the wire id, and the first
//!   two payload bytes compensate for it in the checksum;
//! - TCP SYN: fixed ports; the sequence number carries the probe index.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use imn_proto::kinds::traceroute::{IcmpExtension, MplsLabel, TraceProtocol};

/// Wire ids of one trace are `base .. base + ID_SPAN`: more than the most probes a
/// trace can send (255 TTLs × 16 probes).
pub const ID_SPAN: u16 = 4096;
/// IPv4 header length of our probes (no options).
const IP_HDR: usize = 20;
/// IPv6 header length (our probes have no extension headers).
const IP6_HDR: usize = 40;
const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_ICMPV6: u8 = 58;
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_UNREACH: u8 = 3;
const ICMP_ECHO: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAM_PROBLEM: u8 = 12;
pub const ICMP6_UNREACH: u8 = 1;
pub const ICMP6_TIME_EXCEEDED: u8 = 3;
const ICMP6_PARAM_PROBLEM: u8 = 4;
const ICMP6_ECHO: u8 = 128;
pub const ICMP6_ECHO_REPLY: u8 = 129;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// The ICMP type numbers of one address family.
struct Types {
    echo: u8,
    echo_reply: u8,
    unreach: u8,
    time_exceeded: u8,
    param_problem: u8,
}

const V4: Types = Types {
    echo: ICMP_ECHO,
    echo_reply: ICMP_ECHO_REPLY,
    unreach: ICMP_UNREACH,
    time_exceeded: ICMP_TIME_EXCEEDED,
    param_problem: ICMP_PARAM_PROBLEM,
};
const V6: Types = Types {
    echo: ICMP6_ECHO,
    echo_reply: ICMP6_ECHO_REPLY,
    unreach: ICMP6_UNREACH,
    time_exceeded: ICMP6_TIME_EXCEEDED,
    param_problem: ICMP6_PARAM_PROBLEM,
};

fn types(v6: bool) -> &'static Types {
    if v6 {
        &V6
    } else {
        &V4
    }
}

/// Whether an ICMP type is destination unreachable.
pub fn is_unreach(v6: bool, icmp_type: u8) -> bool {
    icmp_type == types(v6).unreach
}

/// Whether an ICMP type and code are port unreachable.
pub fn is_port_unreach(v6: bool, icmp_type: u8, code: u8) -> bool {
    is_unreach(v6, icmp_type) && code == if v6 { 4 } else { 3 }
}

/// Everything that identifies one trace's probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub proto: TraceProtocol,
    /// Source and destination, of one family.
    pub src: IpAddr,
    pub dst: IpAddr,
    /// UDP/TCP ports (unused for ICMP).
    pub sport: u16,
    pub dport: u16,
    /// ICMP echo identifier and the checksum every echo request of the trace has.
    pub icmp_id: u16,
    pub icmp_checksum: u16,
    /// The first wire id (UDP checksum, ICMP sequence, IPv4 id): in
    /// `1 ..= 0xffff - ID_SPAN - 1`, so no id is 0 or 0xffff (a UDP checksum of 0
    /// means "none").
    pub base: u16,
    /// TCP sequence number of probe 0.
    pub tcp_seq: u32,
    /// Payload bytes after the transport header.
    pub size: usize,
}

/// The Internet checksum's sum (RFC 1071), not yet folded or inverted.
fn sum16(data: &[u8]) -> u64 {
    let mut sum: u64 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    sum
}

fn fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The checksum over a pseudo-header sum and data.
fn checksum_with(pseudo: u64, data: &[u8]) -> u16 {
    !fold(pseudo + sum16(data))
}

fn octets(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The sum of the pseudo-header of UDP, TCP and ICMPv6 (IPv4's and IPv6's add up to
/// the same: addresses, protocol, length).
fn pseudo_header(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u64 {
    sum16(&octets(src))
        + sum16(&octets(dst))
        + u64::from(proto)
        + (len as u64 >> 16)
        + (len as u64 & 0xffff)
}

/// Sets `seg[at..at + 2]` (zero on entry, as is the checksum field) so that the
/// checksum of `pseudo + seg` is `want`.
fn compensate(seg: &mut [u8], at: usize, pseudo: u64, want: u16) {
    let s = fold(pseudo + sum16(seg));
    // One's complement: want = !(s + x)  <=>  x = !want - s = !want + !s.
    let x = fold(u64::from(!want) + u64::from(!s));
    seg[at..at + 2].copy_from_slice(&x.to_be_bytes());
}

impl Flow {
    fn v6(&self) -> bool {
        self.dst.is_ipv6()
    }

    /// Wire id of probe `k`.
    pub fn wire_id(&self, k: u16) -> u16 {
        self.base.wrapping_add(k)
    }

    /// The probe index of a wire id, if it is one of ours.
    fn index_of(&self, wire: u16) -> Option<u16> {
        let k = wire.wrapping_sub(self.base);
        (k < ID_SPAN).then_some(k)
    }

    /// The transport header and payload of probe `k`.
    pub fn segment(&self, k: u16) -> Vec<u8> {
        let wire = self.wire_id(k);
        match self.proto {
            TraceProtocol::Icmp => {
                let len = 8 + self.size.max(2);
                let mut seg = vec![0u8; len];
                seg[0] = types(self.v6()).echo;
                seg[4..6].copy_from_slice(&self.icmp_id.to_be_bytes());
                seg[6..8].copy_from_slice(&wire.to_be_bytes());
                // ICMPv6's checksum covers a pseudo-header; ICMP's does not.
                let pseudo = if self.v6() {
                    pseudo_header(self.src, self.dst, PROTO_ICMPV6, len)
                } else {
                    0
                };
                compensate(&mut seg, 8, pseudo, self.icmp_checksum);
                let c = checksum_with(pseudo, &seg);
                seg[2..4].copy_from_slice(&c.to_be_bytes());
                seg
            }
            TraceProtocol::Udp => {
                let len = 8 + self.size.max(2);
                let mut seg = vec![0u8; len];
                seg[0..2].copy_from_slice(&self.sport.to_be_bytes());
                seg[2..4].copy_from_slice(&self.dport.to_be_bytes());
                seg[4..6].copy_from_slice(&(len as u16).to_be_bytes());
                let pseudo = pseudo_header(self.src, self.dst, PROTO_UDP, len);
                compensate(&mut seg, 8, pseudo, wire);
                let c = checksum_with(pseudo, &seg);
                seg[6..8].copy_from_slice(&c.to_be_bytes());
                seg
            }
            TraceProtocol::Tcp => {
                let len = 20 + self.size;
                let mut seg = vec![0u8; len];
                seg[0..2].copy_from_slice(&self.sport.to_be_bytes());
                seg[2..4].copy_from_slice(&self.dport.to_be_bytes());
                let seq = self.tcp_seq.wrapping_add(u32::from(k));
                seg[4..8].copy_from_slice(&seq.to_be_bytes());
                seg[12] = 5 << 4;
                seg[13] = TCP_SYN;
                seg[14..16].copy_from_slice(&65_535u16.to_be_bytes());
                let pseudo = pseudo_header(self.src, self.dst, PROTO_TCP, len);
                let c = checksum_with(pseudo, &seg);
                seg[16..18].copy_from_slice(&c.to_be_bytes());
                seg
            }
        }
    }

    fn proto_number(&self) -> u8 {
        match self.proto {
            TraceProtocol::Icmp if self.v6() => PROTO_ICMPV6,
            TraceProtocol::Icmp => PROTO_ICMP,
            TraceProtocol::Udp => PROTO_UDP,
            TraceProtocol::Tcp => PROTO_TCP,
        }
    }

    /// Probe `k` with `ttl` (hop limit) as a whole IP packet (for `IP_HDRINCL` /
    /// `IPV6_HDRINCL`).
    pub fn packet(&self, k: u16, ttl: u8) -> Vec<u8> {
        let seg = self.segment(k);
        let mut p;
        if self.v6() {
            p = Vec::with_capacity(IP6_HDR + seg.len());
            // Traffic class and flow label 0, as every probe of the trace.
            p.extend_from_slice(&[0x60, 0, 0, 0]);
            p.extend_from_slice(&(seg.len() as u16).to_be_bytes());
            p.extend_from_slice(&[self.proto_number(), ttl]);
            p.extend_from_slice(&octets(self.src));
            p.extend_from_slice(&octets(self.dst));
        } else {
            let total = IP_HDR + seg.len();
            p = Vec::with_capacity(total);
            p.extend_from_slice(&[0x45, 0]);
            p.extend_from_slice(&(total as u16).to_be_bytes());
            p.extend_from_slice(&self.wire_id(k).to_be_bytes());
            p.extend_from_slice(&[0, 0, ttl, self.proto_number(), 0, 0]);
            p.extend_from_slice(&octets(self.src));
            p.extend_from_slice(&octets(self.dst));
            let c = checksum_with(0, &p);
            p[10..12].copy_from_slice(&c.to_be_bytes());
        }
        p.extend_from_slice(&seg);
        p
    }

    /// What a received IPv4 packet (as a raw socket delivers it, header included)
    /// says about this trace's probes; None if it is not an answer to one of them.
    pub fn classify(&self, data: &[u8]) -> Option<Answer> {
        if self.v6() {
            return None;
        }
        let outer = Ip::parse_v4(data, true)?;
        self.classify_outer(&outer)
    }

    /// The same for IPv6, where raw sockets deliver what follows the IPv6 header: the
    /// sender, the hop limit and the protocol come from the socket.
    pub fn classify_v6(
        &self,
        data: &[u8],
        proto: u8,
        from: Ipv6Addr,
        hop_limit: u8,
    ) -> Option<Answer> {
        if !self.v6() {
            return None;
        }
        let outer = Ip {
            proto,
            ttl: hop_limit,
            src: IpAddr::V6(from),
            dst: self.src,
            payload: data,
        };
        self.classify_outer(&outer)
    }

    fn classify_outer(&self, outer: &Ip<'_>) -> Option<Answer> {
        match outer.proto {
            PROTO_ICMP | PROTO_ICMPV6 if (outer.proto == PROTO_ICMPV6) == self.v6() => {
                self.classify_icmp(outer)
            }
            PROTO_TCP if self.proto == TraceProtocol::Tcp => self.classify_tcp(outer),
            _ => None,
        }
    }

    fn classify_icmp(&self, outer: &Ip<'_>) -> Option<Answer> {
        let icmp = outer.payload;
        if icmp.len() < 8 {
            return None;
        }
        let ty = types(self.v6());
        let (t, code) = (icmp[0], icmp[1]);
        let base = |k: u16, kind: AnswerKind| Answer {
            k,
            from: outer.src,
            ttl: outer.ttl,
            size: icmp.len() as u32,
            kind,
        };
        if t == ty.echo_reply && self.proto == TraceProtocol::Icmp {
            if code != 0 || be16(icmp, 4)? != self.icmp_id || outer.src != self.dst {
                return None;
            }
            let k = self.index_of(be16(icmp, 6)?)?;
            return Some(base(k, AnswerKind::EchoReply));
        }
        if t != ty.unreach && t != ty.time_exceeded && t != ty.param_problem {
            return None;
        }
        let quoted = icmp.get(8..)?;
        let inner = if self.v6() {
            Ip::parse_v6(quoted)?
        } else {
            Ip::parse_v4(quoted, false)?
        };
        if inner.proto != self.proto_number() || inner.dst != self.dst || inner.src != self.src {
            return None;
        }
        let l4 = inner.payload;
        let k = match self.proto {
            TraceProtocol::Udp => {
                if be16(l4, 0)? != self.sport || be16(l4, 2)? != self.dport {
                    return None;
                }
                self.index_of(be16(l4, 6)?)?
            }
            TraceProtocol::Icmp => {
                if *l4.first()? != ty.echo || be16(l4, 4)? != self.icmp_id {
                    return None;
                }
                self.index_of(be16(l4, 6)?)?
            }
            TraceProtocol::Tcp => {
                if be16(l4, 0)? != self.sport || be16(l4, 2)? != self.dport {
                    return None;
                }
                let off = be32(l4, 4)?.wrapping_sub(self.tcp_seq);
                u16::try_from(off).ok().filter(|k| *k < ID_SPAN)?
            }
        };
        Some(base(
            k,
            AnswerKind::IcmpError {
                icmp_type: t,
                code,
                quoted_ttl: inner.ttl,
                ext: extension(icmp, self.v6()),
            },
        ))
    }

    fn classify_tcp(&self, outer: &Ip<'_>) -> Option<Answer> {
        let tcp = outer.payload;
        if tcp.len() < 20 || outer.src != self.dst {
            return None;
        }
        if be16(tcp, 0)? != self.dport || be16(tcp, 2)? != self.sport {
            return None;
        }
        let flags = tcp[13];
        let answers = flags & TCP_ACK != 0 && (flags & TCP_SYN != 0 || flags & TCP_RST != 0);
        if !answers {
            return None;
        }
        let off = be32(tcp, 8)?.wrapping_sub(1).wrapping_sub(self.tcp_seq);
        let k = u16::try_from(off).ok().filter(|k| *k < ID_SPAN)?;
        Some(Answer {
            k,
            from: outer.src,
            ttl: outer.ttl,
            size: tcp.len() as u32,
            kind: AnswerKind::Tcp { flags },
        })
    }
}

/// An answer to probe `k`.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub k: u16,
    pub from: IpAddr,
    /// TTL (hop limit) of the answer as received.
    pub ttl: u8,
    /// Bytes after the answer's IP header.
    pub size: u32,
    pub kind: AnswerKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AnswerKind {
    IcmpError {
        icmp_type: u8,
        code: u8,
        /// TTL of the probe as the answering router quoted it.
        quoted_ttl: u8,
        ext: Option<IcmpExtension>,
    },
    EchoReply,
    Tcp {
        flags: u8,
    },
}

/// TCP flags as Atlas writes them: the letters of the flags set, in a fixed order.
pub fn tcp_flags_text(flags: u8) -> String {
    let mut s = String::new();
    for (bit, c) in [
        (TCP_SYN, 'S'),
        (TCP_RST, 'R'),
        (TCP_ACK, 'A'),
        (TCP_FIN, 'F'),
        (TCP_PSH, 'P'),
    ] {
        if flags & bit != 0 {
            s.push(c);
        }
    }
    s
}

/// Atlas's error code for an ICMP message that is not time exceeded or an echo
/// reply; None for those.
pub fn atlas_err(v6: bool, icmp_type: u8, code: u8) -> Option<String> {
    let ty = types(v6);
    if icmp_type == ty.time_exceeded || icmp_type == ty.echo_reply {
        return None;
    }
    if icmp_type != ty.unreach {
        return Some(format!("{icmp_type}.{code}"));
    }
    let letter = match (v6, code) {
        (false, 0) | (true, 0) => "N",
        (false, 1) | (true, 3) => "H",
        (false, 2) => "P",
        (false, 3) | (true, 4) => "p",
        (false, 9 | 10 | 13) | (true, 1) => "A",
        _ => return Some(code.to_string()),
    };
    Some(letter.into())
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// An IP header and what follows it.
struct Ip<'a> {
    proto: u8,
    ttl: u8,
    src: IpAddr,
    dst: IpAddr,
    payload: &'a [u8],
}

impl<'a> Ip<'a> {
    /// `whole`: the packet is complete, so its total length bounds the payload; a
    /// quoted packet is usually cut short, and its payload is what is there.
    fn parse_v4(data: &'a [u8], whole: bool) -> Option<Ip<'a>> {
        let first = *data.first()?;
        if first >> 4 != 4 {
            return None;
        }
        let ihl = usize::from(first & 0x0f) * 4;
        if ihl < 20 || data.len() < ihl {
            return None;
        }
        let end = if whole {
            let total = usize::from(be16(data, 2)?);
            if total < ihl {
                return None;
            }
            total.min(data.len())
        } else {
            data.len()
        };
        Some(Ip {
            ttl: data[8],
            proto: data[9],
            src: Ipv4Addr::new(data[12], data[13], data[14], data[15]).into(),
            dst: Ipv4Addr::new(data[16], data[17], data[18], data[19]).into(),
            payload: data.get(ihl..end)?,
        })
    }

    /// A quoted IPv6 packet (our probes carry no extension headers).
    fn parse_v6(data: &'a [u8]) -> Option<Ip<'a>> {
        if data.len() < IP6_HDR || data[0] >> 4 != 6 {
            return None;
        }
        let addr = |at: usize| -> Option<IpAddr> {
            let b: [u8; 16] = data.get(at..at + 16)?.try_into().ok()?;
            Some(Ipv6Addr::from(b).into())
        };
        Some(Ip {
            proto: data[6],
            ttl: data[7],
            src: addr(8)?,
            dst: addr(24)?,
            payload: &data[IP6_HDR..],
        })
    }
}

/// Bytes of the original datagram before an extension structure that a router
/// without RFC 4884 support put at a fixed offset.
const LEGACY_EXT_OFFSET: usize = 128;

/// The RFC 4884 extension structure of an ICMP / ICMPv6 time exceeded, destination
/// unreachable or parameter problem message (the whole ICMP message), with the MPLS
/// label stacks of RFC 4950; None if it has none or it is malformed.
pub fn extension(icmp: &[u8], v6: bool) -> Option<IcmpExtension> {
    let t = *icmp.first()?;
    // The length of the original datagram: in 32-bit words for ICMP (byte 5, or 4
    // for parameter problem), in 64-bit words for ICMPv6 (byte 4).
    let bytes = if v6 {
        if t != ICMP6_UNREACH && t != ICMP6_TIME_EXCEEDED {
            return None;
        }
        usize::from(*icmp.get(4)?) * 8
    } else {
        match t {
            ICMP_UNREACH | ICMP_TIME_EXCEEDED => usize::from(*icmp.get(5)?) * 4,
            ICMP_PARAM_PROBLEM => usize::from(*icmp.get(4)?) * 4,
            _ => return None,
        }
    };
    let body = icmp.get(8..)?;
    let (start, rfc4884) = if bytes != 0 {
        (bytes, true)
    } else if body.len() >= LEGACY_EXT_OFFSET + 4 {
        (LEGACY_EXT_OFFSET, false)
    } else {
        return None;
    };
    let ext = body.get(start..)?;
    if ext.len() < 4 || ext[0] >> 4 != 2 {
        return None;
    }
    // A checksum of 0 is "not computed"; the legacy offset is only trusted with a
    // valid one, as there the bytes may as well be the original datagram's.
    let cks = be16(ext, 2)?;
    if (cks != 0 || !rfc4884) && fold(sum16(ext)) != 0xffff {
        return None;
    }
    let mut mpls = Vec::new();
    let mut at = 4;
    while at + 4 <= ext.len() {
        let len = usize::from(be16(ext, at)?);
        if len < 4 || at + len > ext.len() {
            return None;
        }
        let (class, ctype) = (ext[at + 2], ext[at + 3]);
        if class == 1 && ctype == 1 {
            for e in ext[at + 4..at + len].chunks_exact(4) {
                let v = u32::from_be_bytes([e[0], e[1], e[2], e[3]]);
                mpls.push(MplsLabel {
                    label: v >> 12,
                    exp: ((v >> 9) & 0x7) as u8,
                    s: (v >> 8) & 1 == 1,
                    ttl: (v & 0xff) as u8,
                });
            }
        }
        at += len;
    }
    Some(IcmpExtension { rfc4884, mpls })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(proto: TraceProtocol) -> Flow {
        Flow {
            proto,
            src: Ipv4Addr::new(198, 19, 240, 1).into(),
            dst: Ipv4Addr::new(198, 19, 240, 50).into(),
            sport: 40_007,
            dport: 33_434,
            icmp_id: 0x4242,
            icmp_checksum: 0x1007,
            base: 0x2000,
            tcp_seq: 0xfffff000,
            size: 48,
        }
    }

    /// An ICMP message from `from`, quoting `quoted` (an IPv4 packet), in an IPv4
    /// packet with TTL 61.
    fn icmp_from(from: IpAddr, t: u8, code: u8, quoted: &[u8], ext: Option<&[u8]>) -> Vec<u8> {
        let mut icmp = vec![t, code, 0, 0, 0, 0, 0, 0];
        let mut orig = quoted.to_vec();
        if let Some(ext) = ext {
            orig.resize(128, 0);
            icmp[5] = 32; // 128 bytes, in words
            icmp.extend_from_slice(&orig);
            icmp.extend_from_slice(ext);
        } else {
            icmp.extend_from_slice(&orig);
        }
        let c = checksum_with(0, &icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0, 0, 61, PROTO_ICMP, 0, 0]);
        ip.extend_from_slice(&octets(from));
        ip.extend_from_slice(&Ipv4Addr::new(198, 19, 240, 1).octets());
        ip.extend_from_slice(&icmp);
        ip
    }

    /// What a router quotes: the probe's IP header (TTL 1 on arrival) and 8 bytes.
    fn quote(probe: &[u8]) -> Vec<u8> {
        let mut q = probe[..28].to_vec();
        q[8] = 1;
        q
    }

    #[test]
    fn time_exceeded_quoting_each_protocol_is_matched() {
        let router: IpAddr = Ipv4Addr::new(198, 19, 240, 2).into();
        for proto in [TraceProtocol::Udp, TraceProtocol::Icmp, TraceProtocol::Tcp] {
            let f = flow(proto);
            for k in [0u16, 1, 17, ID_SPAN - 1] {
                let probe = f.packet(k, 3);
                let reply = icmp_from(router, ICMP_TIME_EXCEEDED, 0, &quote(&probe), None);
                let a = f
                    .classify(&reply)
                    .unwrap_or_else(|| panic!("{proto:?} {k}"));
                assert_eq!((a.k, a.from, a.ttl), (k, router, 61));
                assert_eq!(a.size as usize, reply.len() - 20);
                assert!(matches!(
                    a.kind,
                    AnswerKind::IcmpError {
                        icmp_type: 11,
                        code: 0,
                        quoted_ttl: 1,
                        ext: None
                    }
                ));
                // Another trace's flow (other ports / id / destination) is not ours.
                let mut other = f.clone();
                other.sport += 1;
                other.icmp_id += 1;
                assert!(other.classify(&reply).is_none());
                let mut other = f.clone();
                other.dst = Ipv4Addr::new(198, 19, 240, 51).into();
                assert!(other.classify(&reply).is_none());
            }
        }
    }

    #[test]
    fn destination_answers_are_matched() {
        // UDP: port unreachable from the destination.
        let f = flow(TraceProtocol::Udp);
        let probe = f.packet(5, 9);
        let r = icmp_from(f.dst, ICMP_UNREACH, 3, &probe, None);
        let a = f.classify(&r).unwrap();
        assert_eq!((a.k, a.from), (5, f.dst));
        assert!(matches!(
            a.kind,
            AnswerKind::IcmpError {
                icmp_type: 3,
                code: 3,
                ..
            }
        ));
        // ICMP: an echo reply, the request's payload echoed.
        let f = flow(TraceProtocol::Icmp);
        let mut seg = f.segment(7);
        seg[0] = ICMP_ECHO_REPLY;
        let mut ip = vec![0x45, 0, 0, (20 + seg.len()) as u8, 0, 0, 0, 0, 60, 1, 0, 0];
        ip.extend_from_slice(&octets(f.dst));
        ip.extend_from_slice(&octets(f.src));
        ip.extend_from_slice(&seg);
        let a = f.classify(&ip).unwrap();
        assert_eq!((a.k, a.kind.clone(), a.ttl), (7, AnswerKind::EchoReply, 60));
        // TCP: SYN-ACK and RST-ACK acknowledging seq + 1.
        let f = flow(TraceProtocol::Tcp);
        for flags in [TCP_SYN | TCP_ACK, TCP_RST | TCP_ACK, TCP_RST] {
            let mut tcp = vec![0u8; 20];
            tcp[0..2].copy_from_slice(&f.dport.to_be_bytes());
            tcp[2..4].copy_from_slice(&f.sport.to_be_bytes());
            let ack = f.tcp_seq.wrapping_add(4097).wrapping_add(1);
            tcp[8..12].copy_from_slice(&ack.to_be_bytes());
            tcp[13] = flags;
            let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0, 0, 64, PROTO_TCP, 0, 0];
            ip.extend_from_slice(&octets(f.dst));
            ip.extend_from_slice(&octets(f.src));
            ip.extend_from_slice(&tcp);
            if flags & TCP_ACK == 0 {
                assert!(f.classify(&ip).is_none());
                continue;
            }
            // 4097 is outside the span of ids: not ours.
            assert!(f.classify(&ip).is_none());
            let ack = f.tcp_seq.wrapping_add(12).wrapping_add(1);
            ip[28..32].copy_from_slice(&ack.to_be_bytes());
            let a = f.classify(&ip).unwrap();
            assert_eq!((a.k, a.kind), (12, AnswerKind::Tcp { flags }));
        }
        assert_eq!(tcp_flags_text(TCP_SYN | TCP_ACK), "SA");
        assert_eq!(tcp_flags_text(TCP_RST | TCP_ACK), "RA");
    }

    #[test]
    fn mpls_extension_is_parsed() {
        // Linux routers cannot add RFC 4950 extensions, so these bytes are crafted:
        // version 2, one object of class 1 c-type 1 with two label stack entries.
        let mut ext = vec![0x20, 0, 0, 0, 0, 12, 1, 1];
        let entry = |label: u32, exp: u32, s: u32, ttl: u32| {
            ((label << 12) | (exp << 9) | (s << 8) | ttl).to_be_bytes()
        };
        ext.extend_from_slice(&entry(16_005, 0, 0, 1));
        ext.extend_from_slice(&entry(1_048_575, 5, 1, 254));
        let c = checksum_with(0, &ext);
        ext[2..4].copy_from_slice(&c.to_be_bytes());
        let f = flow(TraceProtocol::Udp);
        let probe = f.packet(3, 4);
        let r = icmp_from(
            Ipv4Addr::new(10, 0, 0, 1).into(),
            ICMP_TIME_EXCEEDED,
            0,
            &quote(&probe),
            Some(&ext),
        );
        let a = f.classify(&r).unwrap();
        let AnswerKind::IcmpError { ext: Some(e), .. } = a.kind else {
            panic!("{a:?}")
        };
        assert!(e.rfc4884);
        assert_eq!(
            e.mpls,
            vec![
                MplsLabel {
                    label: 16_005,
                    exp: 0,
                    s: false,
                    ttl: 1
                },
                MplsLabel {
                    label: 1_048_575,
                    exp: 5,
                    s: true,
                    ttl: 254
                },
            ]
        );
        // Without the length field, at the legacy offset 128: still found.
        let mut legacy = r.clone();
        legacy[20 + 5] = 0;
        let e = extension(&legacy[20..], false).unwrap();
        assert!(!e.rfc4884 && e.mpls.len() == 2);
        // A bad extension checksum at the legacy offset: not an extension.
        legacy[20 + 8 + 128 + 2] ^= 0xff;
        assert_eq!(extension(&legacy[20..], false), None);
        // An object longer than the message: rejected.
        let mut bad = r.clone();
        let n = bad.len();
        bad[n - 12 + 1] = 200;
        assert_eq!(extension(&bad[20..], false), None);
    }

    #[test]
    fn paris_flows_keep_what_load_balancers_hash() {
        for v6 in [false, true] {
            for proto in [TraceProtocol::Udp, TraceProtocol::Icmp, TraceProtocol::Tcp] {
                for size in [2usize, 3, 48, 1000] {
                    let mut f = if v6 { flow6(proto) } else { flow(proto) };
                    f.size = size;
                    let hdr = if v6 { IP6_HDR } else { IP_HDR };
                    let first = f.packet(0, 1);
                    for k in 0..ID_SPAN {
                        let p = f.packet(k, (k % 255 + 1) as u8);
                        // A valid IPv4 header, and a valid transport checksum.
                        if !v6 {
                            assert_eq!(checksum_with(0, &p[..20]), 0);
                        }
                        let seg = &p[hdr..];
                        let pseudo = match proto {
                            TraceProtocol::Icmp if !v6 => 0,
                            TraceProtocol::Icmp => {
                                pseudo_header(f.src, f.dst, PROTO_ICMPV6, seg.len())
                            }
                            TraceProtocol::Udp => pseudo_header(f.src, f.dst, PROTO_UDP, seg.len()),
                            TraceProtocol::Tcp => pseudo_header(f.src, f.dst, PROTO_TCP, seg.len()),
                        };
                        assert_eq!(checksum_with(pseudo, seg), 0, "{proto:?} {size} {k}");
                        // The first four bytes of the transport header never change:
                        // the ports, or ICMP type, code and checksum; nor do the
                        // addresses (and IPv6's flow label).
                        assert_eq!(seg[..4], first[hdr..hdr + 4], "{proto:?} {k}");
                        if v6 {
                            assert_eq!(p[..4], first[..4]);
                            assert_eq!(p[8..40], first[8..40]);
                        } else {
                            assert_eq!(p[12..20], first[12..20]);
                        }
                        match proto {
                            TraceProtocol::Icmp => {
                                assert_eq!(be16(seg, 2), Some(f.icmp_checksum));
                                assert_eq!(be16(seg, 6), Some(f.wire_id(k)));
                            }
                            TraceProtocol::Udp => assert_eq!(be16(seg, 6), Some(f.wire_id(k))),
                            TraceProtocol::Tcp => {
                                assert_eq!(be32(seg, 4), Some(f.tcp_seq.wrapping_add(k.into())))
                            }
                        }
                    }
                }
            }
        }
    }

    fn flow6(proto: TraceProtocol) -> Flow {
        Flow {
            src: "2001:2:0:f0::1".parse().unwrap(),
            dst: "2001:2:0:f3::2".parse().unwrap(),
            ..flow(proto)
        }
    }

    #[test]
    fn icmpv6_errors_and_replies_are_matched() {
        let router: Ipv6Addr = "2001:2:0:f1::1".parse().unwrap();
        for proto in [TraceProtocol::Udp, TraceProtocol::Icmp, TraceProtocol::Tcp] {
            let f = flow6(proto);
            let probe = f.packet(9, 2);
            // Time exceeded: ICMPv6 type 3, quoting the probe (hop limit 1 on arrival).
            let mut icmp = vec![ICMP6_TIME_EXCEEDED, 0, 0, 0, 0, 0, 0, 0];
            let mut q = probe.clone();
            q[7] = 1;
            icmp.extend_from_slice(&q);
            let a = f.classify_v6(&icmp, PROTO_ICMPV6, router, 63).unwrap();
            assert_eq!((a.k, a.from, a.ttl), (9, IpAddr::V6(router), 63));
            assert!(matches!(
                a.kind,
                AnswerKind::IcmpError {
                    icmp_type: 3,
                    code: 0,
                    quoted_ttl: 1,
                    ext: None
                }
            ));
            // Not for an IPv4 trace, nor through the IPv4 entry point.
            assert!(flow(proto)
                .classify_v6(&icmp, PROTO_ICMPV6, router, 63)
                .is_none());
            assert!(f.classify(&icmp).is_none());
            // Cut short: nothing.
            for n in 0..8 + 40 + 8 {
                assert!(f
                    .classify_v6(&icmp[..n], PROTO_ICMPV6, router, 63)
                    .is_none());
            }
        }
        let f = flow6(TraceProtocol::Udp);
        let mut icmp = vec![ICMP6_UNREACH, 4, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&f.packet(2, 30));
        let IpAddr::V6(dst) = f.dst else { panic!() };
        let a = f.classify_v6(&icmp, PROTO_ICMPV6, dst, 60).unwrap();
        assert!(is_port_unreach(true, 1, 4) && !is_port_unreach(false, 1, 4));
        assert_eq!(a.k, 2);
        assert_eq!(atlas_err(true, 1, 4).as_deref(), Some("p"));
        assert_eq!(atlas_err(true, 1, 3).as_deref(), Some("H"));
        assert_eq!(atlas_err(true, 3, 0), None);
        let f = flow6(TraceProtocol::Icmp);
        let mut reply = f.segment(5);
        reply[0] = ICMP6_ECHO_REPLY;
        let a = f.classify_v6(&reply, PROTO_ICMPV6, dst, 64).unwrap();
        assert_eq!((a.k, a.kind), (5, AnswerKind::EchoReply));
        // ICMPv6 extensions count the original datagram in 64-bit words.
        let mut ext = vec![0x20, 0, 0, 0, 0, 8, 1, 1];
        ext.extend_from_slice(&((300u32 << 12) | (1 << 8) | 7).to_be_bytes());
        let c = checksum_with(0, &ext);
        ext[2..4].copy_from_slice(&c.to_be_bytes());
        let mut msg = vec![ICMP6_TIME_EXCEEDED, 0, 0, 0, 16, 0, 0, 0];
        let mut orig = f.packet(1, 1);
        orig.resize(128, 0);
        msg.extend_from_slice(&orig);
        msg.extend_from_slice(&ext);
        let e = extension(&msg, true).unwrap();
        assert!(e.rfc4884);
        assert_eq!(
            e.mpls,
            vec![MplsLabel {
                label: 300,
                exp: 0,
                s: true,
                ttl: 7
            }]
        );
    }

    #[test]
    fn truncated_and_garbage_packets_are_rejected_without_panic() {
        let f = flow(TraceProtocol::Udp);
        let reply = icmp_from(
            Ipv4Addr::new(10, 0, 0, 1).into(),
            ICMP_TIME_EXCEEDED,
            0,
            &quote(&f.packet(1, 1)),
            None,
        );
        assert!(f.classify(&reply).is_some());
        for n in 0..reply.len() {
            // Cut before the quoted UDP checksum: nothing to match on.
            if n < 20 + 8 + 28 {
                assert!(f.classify(&reply[..n]).is_none(), "cut at {n}");
            }
        }
        let mut x: u64 = 0x9e37_79b9;
        for proto in [TraceProtocol::Udp, TraceProtocol::Icmp, TraceProtocol::Tcp] {
            let f = flow(proto);
            for len in 0..300usize {
                for _ in 0..100 {
                    let mut data: Vec<u8> = (0..len)
                        .map(|_| {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            match x % 6 {
                                0 => 0x45,
                                1 => 0,
                                2 => 11,
                                3 => 1,
                                _ => x as u8,
                            }
                        })
                        .collect();
                    if len > 0 {
                        data[0] = 0x45;
                    }
                    let _ = f.classify(&data);
                    if len > 28 {
                        data[20] = ICMP_TIME_EXCEEDED;
                        data[28] = 0x46;
                        let _ = f.classify(&data);
                    }
                    let _ = extension(&data, false);
                    let _ = extension(&data, true);
                }
            }
        }
        assert_eq!(atlas_err(false, 3, 1).as_deref(), Some("H"));
        assert_eq!(atlas_err(false, 11, 0), None);
    }
}
