//! DNS messages on the wire, for the resolver and the `dns` module alike: the query
//! (one encoder, with the module's flags and EDNS options), and a bounds-checked reader
//! of whatever comes back: header, questions, records, and one name decoder. Every read
//! is bounds-checked, a compression pointer must point before itself, the labels and
//! pointers of a name are counted, and nothing here panics on any input.
//!
//! What a reader's caller makes of the parts (the resolver's addresses, the module's
//! presentation of every record) is the caller's.

use std::fmt;

pub const TYPE_A: u16 = 1;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_OPT: u16 = 41;
pub const CLASS_IN: u16 = 1;
/// The EDNS option that asks for (and carries) the name server's id (RFC 5001).
pub const OPT_NSID: u16 = 3;

/// Header flags.
pub const FLAG_QR: u16 = 0x8000;
pub const FLAG_AA: u16 = 0x0400;
pub const FLAG_TC: u16 = 0x0200;
pub const FLAG_RD: u16 = 0x0100;
pub const FLAG_RA: u16 = 0x0080;
pub const FLAG_Z: u16 = 0x0040;
pub const FLAG_AD: u16 = 0x0020;
pub const FLAG_CD: u16 = 0x0010;

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
    /// The resolver's question: `name` (a checked host name: dots separate labels, no
    /// escapes; a final dot is optional), class IN, recursion desired, no EDNS.
    pub fn recursive(name: &str, qtype: u16) -> Query {
        let mut wire = Vec::with_capacity(name.len() + 2);
        for label in name.trim_end_matches('.').split('.') {
            wire.push(label.len() as u8);
            wire.extend_from_slice(label.as_bytes());
        }
        wire.push(0);
        Query {
            name: wire,
            qtype,
            qclass: CLASS_IN,
            rd: true,
            cd: false,
            dnssec_ok: false,
            edns_size: 0,
            nsid: false,
        }
    }

    /// The query message with this id.
    pub fn encode(&self, id: u16) -> Vec<u8> {
        let mut m = Vec::with_capacity(12 + self.name.len() + 4 + 15);
        m.extend_from_slice(&id.to_be_bytes());
        let mut flags: u16 = 0;
        if self.rd {
            flags |= FLAG_RD;
        }
        if self.cd {
            flags |= FLAG_CD;
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
        if reply_id(buf) != Some(id) {
            return false;
        }
        let mut r = Reader::new(buf);
        match Header::read(&mut r) {
            Ok(h) if h.qdcount > 0 => match Question::read(&mut r) {
                Ok(q) => {
                    q.name.eq_ignore_ascii_case(&self.name)
                        && q.qtype == self.qtype
                        && q.qclass == self.qclass
                }
                Err(_) => true,
            },
            _ => true,
        }
    }
}

/// The id of a reply (QR set), from its first four bytes; None for a query or less.
pub fn reply_id(buf: &[u8]) -> Option<u16> {
    match buf {
        [a, b, f, _, ..] if *f & 0x80 != 0 => Some(u16::from_be_bytes([*a, *b])),
        _ => None,
    }
}

/// Why a read failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The message (or the data read) ends before a field.
    Short,
    /// The message ends inside a name.
    NameShort,
    /// The compression pointer at this offset does not point before itself.
    Forward(usize),
    /// A label type other than a length or a pointer (the byte's top two bits).
    LabelType(u8),
    /// A name longer than the rules allow.
    TooLong,
    /// A name of more labels and pointers than the rules allow.
    TooManySteps,
}

impl Error {
    /// Whether the error is in a name.
    pub fn in_name(&self) -> bool {
        *self != Error::Short
    }
}

/// The `dns` module reports these words in its results.
impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Short | Error::NameShort => f.write_str("message ends early"),
            Error::Forward(at) => write!(
                f,
                "compression pointer at byte {at} does not point backwards"
            ),
            Error::LabelType(t) => write!(f, "unknown label type 0x{t:02x}"),
            Error::TooLong => f.write_str("name longer than 255 bytes"),
            Error::TooManySteps => f.write_str("name has too many compression pointers"),
        }
    }
}

impl From<Error> for String {
    fn from(e: Error) -> String {
        e.to_string()
    }
}

/// How far a name may go: the name decoder's bounds.
#[derive(Debug, Clone, Copy)]
pub struct NameRules {
    /// Labels and compression pointers followed, at most, the root label included.
    pub steps: usize,
    /// Whether the name read so far (wire format, without the root label) is too long;
    /// asked after each label.
    pub too_long: fn(&[u8]) -> bool,
}

impl NameRules {
    /// RFC 1035: at most 255 bytes in wire format. Every pointer must point before
    /// itself, so no loop lasts; the step count is a second guard.
    pub const RFC: NameRules = NameRules {
        steps: 256,
        too_long: |wire| wire.len() > 254,
    };
}

/// A bounds-checked cursor over a message (or over part of one).
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    rules: NameRules,
}

impl<'a> Reader<'a> {
    /// At the start of `buf`, reading names by [`NameRules::RFC`].
    pub fn new(buf: &'a [u8]) -> Self {
        Reader {
            buf,
            pos: 0,
            rules: NameRules::RFC,
        }
    }
    /// The same reader at `pos`.
    pub fn at(self, pos: usize) -> Self {
        Reader { pos, ..self }
    }
    /// The same reader with other name rules.
    pub fn with_rules(self, rules: NameRules) -> Self {
        Reader { rules, ..self }
    }
    /// Where the next read starts.
    pub fn pos(&self) -> usize {
        self.pos
    }
    /// The whole buffer read.
    pub fn buf(&self) -> &'a [u8] {
        self.buf
    }
    /// Whether nothing is left to read.
    pub fn at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }
    /// What is left, without reading it.
    pub fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }
    pub fn u8(&mut self) -> Result<u8, Error> {
        let b = *self.buf.get(self.pos).ok_or(Error::Short)?;
        self.pos += 1;
        Ok(b)
    }
    pub fn u16(&mut self) -> Result<u16, Error> {
        Ok(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }
    pub fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from(self.u16()?) << 16 | u32::from(self.u16()?))
    }
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let end = self.pos.checked_add(n).ok_or(Error::Short)?;
        let b = self.buf.get(self.pos..end).ok_or(Error::Short)?;
        self.pos = end;
        Ok(b)
    }
    /// A possibly compressed name, uncompressed into wire format (the root label
    /// included). On an error the position is unchanged.
    pub fn name(&mut self) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        let mut pos = self.pos;
        // Where the name ends in place: set at the first pointer, or at the root label.
        let mut end = None;
        for _ in 0..self.rules.steps {
            let len = *self.buf.get(pos).ok_or(Error::NameShort)?;
            match len {
                0 => {
                    out.push(0);
                    self.pos = end.unwrap_or(pos + 1);
                    return Ok(out);
                }
                l if l & 0xC0 == 0xC0 => {
                    let lo = *self.buf.get(pos + 1).ok_or(Error::NameShort)?;
                    let target = (usize::from(l & 0x3F) << 8) | usize::from(lo);
                    if target >= pos {
                        return Err(Error::Forward(pos));
                    }
                    end = end.or(Some(pos + 2));
                    pos = target;
                }
                l if l & 0xC0 == 0 => {
                    let l = usize::from(l);
                    let label = self.buf.get(pos + 1..pos + 1 + l).ok_or(Error::NameShort)?;
                    out.push(l as u8);
                    out.extend_from_slice(label);
                    if (self.rules.too_long)(&out) {
                        return Err(Error::TooLong);
                    }
                    pos += 1 + l;
                }
                l => return Err(Error::LabelType(l & 0xC0)),
            }
        }
        Err(Error::TooManySteps)
    }
}

/// A message's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    pub flags: u16,
    pub qdcount: u16,
    pub ancount: u16,
    pub nscount: u16,
    pub arcount: u16,
}

impl Header {
    pub fn read(r: &mut Reader) -> Result<Header, Error> {
        Ok(Header {
            id: r.u16()?,
            flags: r.u16()?,
            qdcount: r.u16()?,
            ancount: r.u16()?,
            nscount: r.u16()?,
            arcount: r.u16()?,
        })
    }
    /// Whether a flag (`FLAG_*`) is set.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
    pub fn opcode(&self) -> u8 {
        ((self.flags >> 11) & 0x0F) as u8
    }
    /// The header's four bits of the rcode (EDNS adds eight more).
    pub fn rcode(&self) -> u16 {
        self.flags & 0x000F
    }
}

/// An entry of the question section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// Wire format, uncompressed, as the message spells it.
    pub name: Vec<u8>,
    pub qtype: u16,
    pub qclass: u16,
}

impl Question {
    pub fn read(r: &mut Reader) -> Result<Question, Error> {
        Ok(Question {
            name: r.name()?,
            qtype: r.u16()?,
            qclass: r.u16()?,
        })
    }
}

/// A resource record, its data not yet interpreted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    /// The owner, in wire format, uncompressed.
    pub name: Vec<u8>,
    pub rtype: u16,
    pub class: u16,
    pub ttl: u32,
    pub data: &'a [u8],
    /// Where `data` starts in the message, to read compressed names in it.
    pub data_at: usize,
}

impl<'a> Record<'a> {
    pub fn read(r: &mut Reader<'a>) -> Result<Record<'a>, Error> {
        let name = r.name()?;
        let (rtype, class, ttl) = (r.u16()?, r.u16()?, r.u32()?);
        let len = r.u16()?;
        let data_at = r.pos();
        let data = r.bytes(usize::from(len))?;
        Ok(Record {
            name,
            rtype,
            class,
            ttl,
            data,
            data_at,
        })
    }
}

#[cfg(test)]
mod tests;
