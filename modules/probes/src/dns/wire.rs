//! The `dns` module's presentation of DNS messages: the result types of a whole
//! message, every record's data as dig shows it and typed, rcode and EDNS option names.
//! The codec underneath (the query, the header, question and record reader, the name
//! decoder with its bounds) is the resolver's: [`imn_resolver::wire`].

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

use imn_proto::kinds::dns::{
    class_name, type_name, DnsFlags, DnsMessage, DnsQuestion, DnsRecord, EdnsInfo, EdnsOption,
    RData, SvcParam, SvcbData,
};
use imn_resolver::wire::{
    Header, Question, Reader, Record, FLAG_AA, FLAG_AD, FLAG_CD, FLAG_QR, FLAG_RA, FLAG_RD,
    FLAG_TC, FLAG_Z, OPT_NSID, TYPE_OPT,
};

/// A possibly compressed name in record data, in presentation format.
fn name(r: &mut Reader) -> Option<String> {
    r.name().ok().map(|wire| name_text(&wire))
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
    let h = Header::read(&mut r)?;
    let flags = DnsFlags {
        qr: h.has(FLAG_QR),
        aa: h.has(FLAG_AA),
        tc: h.has(FLAG_TC),
        rd: h.has(FLAG_RD),
        ra: h.has(FLAG_RA),
        z: h.has(FLAG_Z),
        ad: h.has(FLAG_AD),
        cd: h.has(FLAG_CD),
    };
    let mut question = Vec::new();
    for i in 0..h.qdcount {
        // Where a name cannot be read, the error says which question's.
        let q = Question::read(&mut r).map_err(|e| {
            if e.in_name() {
                format!("question {i}: {e}")
            } else {
                e.to_string()
            }
        })?;
        question.push(DnsQuestion {
            name: name_text(&q.name),
            qtype: type_name(q.qtype),
            class: class_name(q.qclass),
        });
    }
    let mut sections: [Vec<DnsRecord>; 3] = Default::default();
    let mut edns = None;
    let counts = [h.ancount, h.nscount, h.arcount];
    for (s, section) in sections.iter_mut().enumerate() {
        let what = ["answer", "authority", "additional"][s];
        for i in 0..counts[s] {
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
    let rcode = (ext << 4) | h.rcode();
    let [answer, authority, additional] = sections;
    Ok(DnsMessage {
        id: h.id,
        opcode: h.opcode(),
        rcode,
        rcode_name: rcode_name(rcode),
        flags,
        qdcount: h.qdcount,
        ancount: h.ancount,
        nscount: h.nscount,
        arcount: h.arcount,
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
    let rec = Record::read(r)?;
    if rec.rtype == TYPE_OPT {
        if rec.name != [0] {
            return Err("OPT record not owned by the root".into());
        }
        return Ok(Rec::Opt(opt(rec.class, rec.ttl, rec.data)?));
    }
    let (rdata, typed) = match rdata(r.buf(), rec.data_at, rec.data, rec.rtype) {
        Some(x) => x,
        None => (generic(rec.data), RData::Other),
    };
    Ok(Rec::Rr(DnsRecord {
        name: name_text(&rec.name),
        rtype: type_name(rec.rtype),
        type_code: rec.rtype,
        class: class_name(rec.class),
        ttl: rec.ttl,
        // The length was read as a u16.
        rdlength: rec.data.len() as u16,
        rdata,
        data: typed,
    }))
}

fn opt(class: u16, ttl: u32, data: &[u8]) -> Result<EdnsInfo, String> {
    let mut options = Vec::new();
    let mut nsid = None;
    let mut r = Reader::new(data);
    while !r.at_end() {
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
    let mut r = Reader::new(msg.get(..end)?).at(start);
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
            let n = name(&mut r)?;
            (n.clone(), RData::Name { target: n })
        }
        15 => {
            let preference = r.u16().ok()?;
            let exchange = name(&mut r)?;
            (
                format!("{preference} {exchange}"),
                RData::Mx {
                    preference,
                    exchange,
                },
            )
        }
        6 => {
            let mname = name(&mut r)?;
            let rname = name(&mut r)?;
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
            while !r.at_end() {
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
            let target = name(&mut r)?;
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
            let value = r.rest();
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
            let digest_hex = hex(r.rest());
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
            let key = base64(r.rest());
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
    if matches!(t, 2 | 5 | 6 | 12 | 15 | 33 | 39) && r.pos() != end {
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
    let target = name(&mut r)?;
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
    while !r.at_end() {
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
                while !ar.at_end() {
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
