//! DNS messages on the wire: the query we build, and a defensive parser of whatever
//! comes back. Every read is bounds-checked, compression pointers must point backwards
//! (and are counted), and nothing here panics on any input.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

use imn_proto::kinds::dns::{
    class_name, type_name, DnsFlags, DnsMessage, DnsQuestion, DnsRecord, EdnsInfo, EdnsOption,
    RData, SvcParam, SvcbData,
};

pub const TYPE_OPT: u16 = 41;
const OPT_NSID: u16 = 3;

/// What to ask.
#[derive(Debug, Clone)]
pub struct Query {
    /// The name in wire format (uncompressed, ending with the root label).
    pub name: Vec<u8>,
    pub qtype: u16,
    pub qclass: u16,
    pub rd: bool,
    pub cd: bool,
    pub dnssec_ok: bool,
    /// 0: no OPT record.
    pub edns_size: u16,
    pub nsid: bool,
}

impl Query {
    /// The query message with this id.
    pub fn encode(&self, id: u16) -> Vec<u8> {
        let mut m = Vec::with_capacity(12 + self.name.len() + 4 + 15);
        m.extend_from_slice(&id.to_be_bytes());
        let mut flags: u16 = 0;
        if self.rd {
            flags |= 0x0100;
        }
        if self.cd {
            flags |= 0x0010;
        }
        m.extend_from_slice(&flags.to_be_bytes());
        let arcount: u16 = u16::from(self.edns_size > 0);
        for n in [1u16, 0, 0, arcount] {
            m.extend_from_slice(&n.to_be_bytes());
        }
        m.extend_from_slice(&self.name);
        m.extend_from_slice(&self.qtype.to_be_bytes());
        m.extend_from_slice(&self.qclass.to_be_bytes());
        if self.edns_size > 0 {
            m.push(0); // root owner
            m.extend_from_slice(&TYPE_OPT.to_be_bytes());
            m.extend_from_slice(&self.edns_size.to_be_bytes());
            m.extend_from_slice(&[0, 0]); // extended rcode, version 0
            let z: u16 = if self.dnssec_ok { 0x8000 } else { 0 };
            m.extend_from_slice(&z.to_be_bytes());
            if self.nsid {
                m.extend_from_slice(&4u16.to_be_bytes());
                m.extend_from_slice(&OPT_NSID.to_be_bytes());
                m.extend_from_slice(&0u16.to_be_bytes());
            } else {
                m.extend_from_slice(&0u16.to_be_bytes());
            }
        }
        m
    }

    /// Whether `buf` is the answer to this query sent with `id`: the id, QR, and the
    /// question when it has one that can be read. A message whose question cannot be
    /// read counts as ours (and is then reported malformed); one that names another
    /// question does not (it may be spoofed or late).
    pub fn is_answer(&self, buf: &[u8], id: u16) -> bool {
        if buf.len() < 4 || u16::from_be_bytes([buf[0], buf[1]]) != id || buf[2] & 0x80 == 0 {
            return false;
        }
        let mut r = Reader::new(buf);
        r.pos = 12;
        let qd = match buf.get(4..6) {
            Some(b) => u16::from_be_bytes([b[0], b[1]]),
            None => return true,
        };
        if qd == 0 {
            return true;
        }
        let Ok(name) = r.name_wire() else {
            return true;
        };
        let (Ok(t), Ok(c)) = (r.u16(), r.u16()) else {
            return true;
        };
        name.eq_ignore_ascii_case(&self.name) && t == self.qtype && c == self.qclass
    }
}

/// A bounds-checked cursor over a message.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    fn u8(&mut self) -> Result<u8, String> {
        let b = *self.buf.get(self.pos).ok_or_else(short)?;
        self.pos += 1;
        Ok(b)
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from(self.u16()?) << 16 | u32::from(self.u16()?))
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).ok_or_else(short)?;
        let b = self.buf.get(self.pos..end).ok_or_else(short)?;
        self.pos = end;
        Ok(b)
    }
    /// A possibly compressed name, uncompressed into wire format.
    fn name_wire(&mut self) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        let mut pos = self.pos;
        let mut jumped = false;
        // Each pointer must point before the pointer itself, so no loop can last; the
        // hop count is a second guard.
        for _ in 0..256 {
            let len = *self.buf.get(pos).ok_or_else(short)?;
            match len {
                0 => {
                    out.push(0);
                    if !jumped {
                        self.pos = pos + 1;
                    }
                    return Ok(out);
                }
                l if l & 0xC0 == 0xC0 => {
                    let lo = *self.buf.get(pos + 1).ok_or_else(short)?;
                    let target = (usize::from(l & 0x3F) << 8) | usize::from(lo);
                    if target >= pos {
                        return Err(format!(
                            "compression pointer at byte {pos} does not point backwards"
                        ));
                    }
                    if !jumped {
                        self.pos = pos + 2;
                        jumped = true;
                    }
                    pos = target;
                }
                l if l & 0xC0 == 0 => {
                    let l = usize::from(l);
                    let label = self.buf.get(pos + 1..pos + 1 + l).ok_or_else(short)?;
                    out.push(l as u8);
                    out.extend_from_slice(label);
                    if out.len() > 254 {
                        return Err("name longer than 255 bytes".into());
                    }
                    pos += 1 + l;
                }
                l => return Err(format!("unknown label type 0x{:02x}", l & 0xC0)),
            }
        }
        Err("name has too many compression pointers".into())
    }
    /// A possibly compressed name, in presentation format.
    fn name(&mut self) -> Result<String, String> {
        Ok(name_text(&self.name_wire()?))
    }
}

fn short() -> String {
    "message ends early".into()
}

/// A wire-format name in presentation format (`a.example.`), with dig's escapes.
pub fn name_text(wire: &[u8]) -> String {
    let mut s = String::new();
    let mut i = 0;
    while let Some(&l) = wire.get(i) {
        if l == 0 {
            break;
        }
        let label = wire.get(i + 1..i + 1 + usize::from(l)).unwrap_or_default();
        for &b in label {
            match b {
                b'.' | b'\\' | b'"' | b'(' | b')' | b';' | b'@' | b'$' => {
                    s.push('\\');
                    s.push(b as char);
                }
                0x21..=0x7e => s.push(b as char),
                _ => {
                    let _ = write!(s, "\\{b:03}");
                }
            }
        }
        s.push('.');
        i += 1 + usize::from(l);
    }
    if s.is_empty() {
        s.push('.');
    }
    s
}

/// A character-string in quotes, as in a zone file.
fn quoted(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() + 2);
    s.push('"');
    for &c in b {
        match c {
            b'"' | b'\\' => {
                s.push('\\');
                s.push(c as char);
            }
            0x20..=0x7e => s.push(c as char),
            _ => {
                let _ = write!(s, "\\{c:03}");
            }
        }
    }
    s.push('"');
    s
}

/// Bytes as text: themselves when UTF-8, else printable ASCII with `\DDD` for the rest.
fn text(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => s.to_string(),
        Err(_) => {
            let q = quoted(b);
            q[1..q.len() - 1].to_string()
        }
    }
}

pub fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// Standard base64 with padding.
pub fn base64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(b.len().div_ceil(3) * 4);
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                s.push(A[((n >> shift) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// The name of an rcode.
pub fn rcode_name(rcode: u16) -> String {
    let n = match rcode {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        6 => "YXDOMAIN",
        7 => "YXRRSET",
        8 => "NXRRSET",
        9 => "NOTAUTH",
        10 => "NOTZONE",
        11 => "DSOTYPENI",
        16 => "BADVERS",
        17 => "BADKEY",
        18 => "BADTIME",
        19 => "BADMODE",
        20 => "BADNAME",
        21 => "BADALG",
        22 => "BADTRUNC",
        23 => "BADCOOKIE",
        _ => return format!("RCODE{rcode}"),
    };
    n.into()
}

fn option_name(code: u16) -> String {
    match code {
        3 => "NSID".into(),
        8 => "ECS".into(),
        9 => "EXPIRE".into(),
        10 => "COOKIE".into(),
        11 => "KEEPALIVE".into(),
        12 => "PADDING".into(),
        15 => "EDE".into(),
        _ => format!("OPT{code}"),
    }
}

/// Parses a whole message. Errors say what is wrong and where.
pub fn parse_message(buf: &[u8]) -> Result<DnsMessage, String> {
    let mut r = Reader::new(buf);
    let id = r.u16()?;
    let f = r.u16()?;
    let counts = [r.u16()?, r.u16()?, r.u16()?, r.u16()?];
    let flags = DnsFlags {
        qr: f & 0x8000 != 0,
        aa: f & 0x0400 != 0,
        tc: f & 0x0200 != 0,
        rd: f & 0x0100 != 0,
        ra: f & 0x0080 != 0,
        z: f & 0x0040 != 0,
        ad: f & 0x0020 != 0,
        cd: f & 0x0010 != 0,
    };
    let mut question = Vec::new();
    for i in 0..counts[0] {
        let name = r.name().map_err(|e| format!("question {i}: {e}"))?;
        let (t, c) = (r.u16()?, r.u16()?);
        question.push(DnsQuestion {
            name,
            qtype: type_name(t),
            class: class_name(c),
        });
    }
    let mut sections: [Vec<DnsRecord>; 3] = Default::default();
    let mut edns = None;
    for (s, section) in sections.iter_mut().enumerate() {
        let what = ["answer", "authority", "additional"][s];
        for i in 0..counts[s + 1] {
            let rec = record(&mut r).map_err(|e| format!("{what} record {i}: {e}"))?;
            match rec {
                Rec::Opt(o) if s == 2 && edns.is_none() => edns = Some(o),
                Rec::Opt(_) => {
                    return Err(format!("{what} record {i}: misplaced or second OPT record"))
                }
                Rec::Rr(rr) => section.push(rr),
            }
        }
    }
    let ext = edns
        .as_ref()
        .map_or(0, |e: &EdnsInfo| u16::from(e.ext_rcode));
    let rcode = (ext << 4) | (f & 0x000F);
    let [answer, authority, additional] = sections;
    Ok(DnsMessage {
        id,
        opcode: ((f >> 11) & 0x0F) as u8,
        rcode,
        rcode_name: rcode_name(rcode),
        flags,
        qdcount: counts[0],
        ancount: counts[1],
        nscount: counts[2],
        arcount: counts[3],
        question,
        answer,
        authority,
        additional,
        edns,
    })
}

enum Rec {
    Rr(DnsRecord),
    Opt(EdnsInfo),
}

fn record(r: &mut Reader) -> Result<Rec, String> {
    let name_wire = r.name_wire()?;
    let t = r.u16()?;
    let class = r.u16()?;
    let ttl = r.u32()?;
    let len = r.u16()?;
    let start = r.pos;
    let data = r.bytes(usize::from(len))?;
    if t == TYPE_OPT {
        if name_wire != [0] {
            return Err("OPT record not owned by the root".into());
        }
        return Ok(Rec::Opt(opt(class, ttl, data)?));
    }
    let (rdata, typed) = match rdata(r.buf, start, data, t) {
        Some(x) => x,
        None => (generic(data), RData::Other),
    };
    Ok(Rec::Rr(DnsRecord {
        name: name_text(&name_wire),
        rtype: type_name(t),
        type_code: t,
        class: class_name(class),
        ttl,
        rdlength: len,
        rdata,
        data: typed,
    }))
}

fn opt(class: u16, ttl: u32, data: &[u8]) -> Result<EdnsInfo, String> {
    let mut options = Vec::new();
    let mut nsid = None;
    let mut r = Reader::new(data);
    while r.pos < data.len() {
        let code = r.u16().map_err(|_| "OPT option ends early")?;
        let len = r.u16().map_err(|_| "OPT option ends early")?;
        let value = r
            .bytes(usize::from(len))
            .map_err(|_| "OPT option ends early")?;
        if code == OPT_NSID && nsid.is_none() {
            nsid = Some(value.to_vec());
        }
        options.push(EdnsOption {
            code,
            name: option_name(code),
            data_hex: hex(value),
        });
    }
    Ok(EdnsInfo {
        udp_size: class,
        version: (ttl >> 16) as u8,
        ext_rcode: (ttl >> 24) as u8,
        dnssec_ok: ttl & 0x8000 != 0,
        nsid_hex: nsid.as_deref().map(hex),
        nsid: nsid
            .as_deref()
            .filter(|n| n.iter().all(|b| (0x20..0x7f).contains(b)))
            .map(|n| String::from_utf8_lossy(n).into_owned()),
        options,
    })
}

/// RFC 3597's generic form.
fn generic(data: &[u8]) -> String {
    if data.is_empty() {
        "\\# 0".into()
    } else {
        format!("\\# {} {}", data.len(), hex(data).to_ascii_uppercase())
    }
}

/// Typed data, or None when the type is not one we parse or the data does not fit it
/// (then the caller uses the generic form). `start` is the data's offset in `msg`, for
/// compressed names.
fn rdata(msg: &[u8], start: usize, data: &[u8], t: u16) -> Option<(String, RData)> {
    let end = start + data.len();
    // A reader over the whole message (for compression), positioned at the data.
    let mut r = Reader {
        buf: msg.get(..end)?,
        pos: start,
    };
    let out = match t {
        1 => {
            let a = Ipv4Addr::from(<[u8; 4]>::try_from(data).ok()?).to_string();
            (a.clone(), RData::A { address: a })
        }
        28 => {
            let a = Ipv6Addr::from(<[u8; 16]>::try_from(data).ok()?).to_string();
            (a.clone(), RData::Aaaa { address: a })
        }
        2 | 5 | 12 | 39 => {
            let n = r.name().ok()?;
            (n.clone(), RData::Name { target: n })
        }
        15 => {
            let preference = r.u16().ok()?;
            let exchange = r.name().ok()?;
            (
                format!("{preference} {exchange}"),
                RData::Mx {
                    preference,
                    exchange,
                },
            )
        }
        6 => {
            let mname = r.name().ok()?;
            let rname = r.name().ok()?;
            let v = [
                r.u32().ok()?,
                r.u32().ok()?,
                r.u32().ok()?,
                r.u32().ok()?,
                r.u32().ok()?,
            ];
            (
                format!(
                    "{mname} {rname} {} {} {} {} {}",
                    v[0], v[1], v[2], v[3], v[4]
                ),
                RData::Soa {
                    mname,
                    rname,
                    serial: v[0],
                    refresh: v[1],
                    retry: v[2],
                    expire: v[3],
                    minimum: v[4],
                },
            )
        }
        16 => {
            let mut r = Reader::new(data);
            let mut shown = Vec::new();
            let mut strings = Vec::new();
            while r.pos < data.len() {
                let n = r.u8().ok()?;
                let s = r.bytes(usize::from(n)).ok()?;
                shown.push(quoted(s));
                strings.push(text(s));
            }
            if strings.is_empty() {
                return None;
            }
            (shown.join(" "), RData::Txt { strings })
        }
        33 => {
            let (priority, weight, port) = (r.u16().ok()?, r.u16().ok()?, r.u16().ok()?);
            let target = r.name().ok()?;
            (
                format!("{priority} {weight} {port} {target}"),
                RData::Srv {
                    priority,
                    weight,
                    port,
                    target,
                },
            )
        }
        257 => {
            let mut r = Reader::new(data);
            let flags = r.u8().ok()?;
            let tl = r.u8().ok()?;
            let tag = r.bytes(usize::from(tl)).ok()?;
            if tag.is_empty() || !tag.iter().all(u8::is_ascii_alphanumeric) {
                return None;
            }
            let tag = String::from_utf8_lossy(tag).into_owned();
            let value = &data[r.pos..];
            (
                format!("{flags} {tag} {}", quoted(value)),
                RData::Caa {
                    flags,
                    tag,
                    value: text(value),
                },
            )
        }
        43 => {
            let mut r = Reader::new(data);
            let (key_tag, algorithm, digest_type) = (r.u16().ok()?, r.u8().ok()?, r.u8().ok()?);
            let digest_hex = hex(&data[r.pos..]);
            (
                format!(
                    "{key_tag} {algorithm} {digest_type} {}",
                    digest_hex.to_ascii_uppercase()
                ),
                RData::Ds {
                    key_tag,
                    algorithm,
                    digest_type,
                    digest_hex,
                },
            )
        }
        48 => {
            let mut r = Reader::new(data);
            let (flags, protocol, algorithm) = (r.u16().ok()?, r.u8().ok()?, r.u8().ok()?);
            let key = base64(&data[r.pos..]);
            (
                format!("{flags} {protocol} {algorithm} {key}"),
                RData::Dnskey {
                    flags,
                    protocol,
                    algorithm,
                    public_key_base64: key,
                    key_tag: key_tag(data),
                },
            )
        }
        64 | 65 => svcb(data)?,
        _ => return None,
    };
    // Types read through `r` must use their data exactly: names end inside it, and
    // nothing is left over.
    if matches!(t, 2 | 5 | 6 | 12 | 15 | 33 | 39) && r.pos != end {
        return None;
    }
    Some(out)
}

/// RFC 4034 appendix B.
fn key_tag(rdata: &[u8]) -> u16 {
    let mut ac: u32 = 0;
    for (i, &b) in rdata.iter().enumerate() {
        ac += if i & 1 == 1 {
            u32::from(b)
        } else {
            u32::from(b) << 8
        };
    }
    ac += (ac >> 16) & 0xFFFF;
    (ac & 0xFFFF) as u16
}

fn svc_key_name(key: u16) -> String {
    match key {
        0 => "mandatory".into(),
        1 => "alpn".into(),
        2 => "no-default-alpn".into(),
        3 => "port".into(),
        4 => "ipv4hint".into(),
        5 => "ech".into(),
        6 => "ipv6hint".into(),
        7 => "dohpath".into(),
        8 => "ohttp".into(),
        _ => format!("key{key}"),
    }
}

/// SVCB and HTTPS (RFC 9460). Names in the data are never compressed.
fn svcb(data: &[u8]) -> Option<(String, RData)> {
    let mut r = Reader::new(data);
    let priority = r.u16().ok()?;
    let target = r.name().ok()?;
    let mut d = SvcbData {
        priority,
        target,
        params: Vec::new(),
        mandatory: Vec::new(),
        alpn: Vec::new(),
        no_default_alpn: false,
        port: None,
        ipv4hint: Vec::new(),
        ipv6hint: Vec::new(),
        ech: None,
    };
    let mut shown = format!("{priority} {}", d.target);
    while r.pos < data.len() {
        let key = r.u16().ok()?;
        let len = r.u16().ok()?;
        let v = r.bytes(usize::from(len)).ok()?;
        let value: Option<String> = match key {
            0 => {
                if v.len() % 2 != 0 {
                    return None;
                }
                d.mandatory = v
                    .chunks(2)
                    .map(|k| svc_key_name(u16::from_be_bytes([k[0], k[1]])))
                    .collect();
                Some(d.mandatory.join(","))
            }
            1 => {
                let mut ar = Reader::new(v);
                while ar.pos < v.len() {
                    let n = ar.u8().ok()?;
                    d.alpn.push(text(ar.bytes(usize::from(n)).ok()?));
                }
                // Commas inside an id are escaped twice in presentation format.
                let ids: Vec<String> = d
                    .alpn
                    .iter()
                    .map(|a| a.replace('\\', "\\\\\\\\").replace(',', "\\\\,"))
                    .collect();
                Some(format!("\"{}\"", ids.join(",")))
            }
            2 => {
                if !v.is_empty() {
                    return None;
                }
                d.no_default_alpn = true;
                None
            }
            3 => {
                let p = u16::from_be_bytes(<[u8; 2]>::try_from(v).ok()?);
                d.port = Some(p);
                Some(p.to_string())
            }
            4 => {
                if v.is_empty() || v.len() % 4 != 0 {
                    return None;
                }
                d.ipv4hint = v
                    .chunks(4)
                    .map(|a| Ipv4Addr::new(a[0], a[1], a[2], a[3]).to_string())
                    .collect();
                Some(d.ipv4hint.join(","))
            }
            5 => {
                let b = base64(v);
                d.ech = Some(b.clone());
                Some(b)
            }
            6 => {
                if v.is_empty() || v.len() % 16 != 0 {
                    return None;
                }
                d.ipv6hint = v
                    .chunks(16)
                    .map(|a| {
                        Ipv6Addr::from(<[u8; 16]>::try_from(a).unwrap_or_default()).to_string()
                    })
                    .collect();
                Some(d.ipv6hint.join(","))
            }
            _ if v.is_empty() => None,
            _ => Some(quoted(v)),
        };
        let name = svc_key_name(key);
        match &value {
            Some(s) => {
                let _ = write!(shown, " {name}={s}");
            }
            None => {
                let _ = write!(shown, " {name}");
            }
        }
        d.params.push(SvcParam {
            key: name,
            value: value.unwrap_or_default(),
        });
    }
    Some((shown, RData::Svcb(d)))
}

#[cfg(test)]
mod tests;
