use super::*;

/// A reply to `q` with `records` (owner wire name, type, rdata) in the answer section.
fn reply(q: &[u8], rcode: u8, records: &[(&[u8], u16, &[u8])]) -> Vec<u8> {
    let mut m = q.to_vec();
    m[2] |= 0x84; // QR, AA
    m[3] |= rcode;
    m[7] = records.len() as u8;
    for (owner, t, data) in records {
        m.extend_from_slice(owner);
        m.extend_from_slice(&t.to_be_bytes());
        m.extend_from_slice(&[0, 1, 0, 0, 0x0e, 0x10]);
        m.extend_from_slice(&(data.len() as u16).to_be_bytes());
        m.extend_from_slice(data);
    }
    m
}

#[test]
fn query_encoding() {
    let mut q = Query::recursive("Example.TEST", 28);
    q.edns_size = 1232;
    q.dnssec_ok = true;
    q.nsid = true;
    q.cd = true;
    let m = q.encode(0xBEEF);
    assert_eq!(&m[..12], &[0xBE, 0xEF, 0x01, 0x10, 0, 1, 0, 0, 0, 0, 0, 1]);
    let qn = b"\x07Example\x04TEST\x00\x00\x1c\x00\x01";
    assert_eq!(&m[12..12 + qn.len()], qn);
    assert_eq!(
        &m[12 + qn.len()..],
        &[0, 0, 41, 0x04, 0xD0, 0, 0, 0x80, 0, 0, 4, 0, 3, 0, 0]
    );
    // Without EDNS no OPT record, and ARCOUNT 0.
    let plain = Query::recursive("a.test", 1).encode(1);
    assert_eq!(plain[11], 0);
    assert_eq!(plain.len(), 12 + 8 + 4);
    // The resolver's question: recursion desired, class IN, a final dot or none.
    assert_eq!(
        plain,
        b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\x04test\x00\x00\x01\x00\x01"
    );
    assert_eq!(Query::recursive("a.test.", 1).encode(1), plain);
    // The answer to our query is recognised, case-insensitively; others are not.
    let r = reply(&plain, 0, &[]);
    assert!(Query::recursive("A.TEST", 1).is_answer(&r, 1));
    assert!(!Query::recursive("a.test", 1).is_answer(&r, 2));
    assert!(!Query::recursive("b.test", 1).is_answer(&r, 1));
    assert!(!Query::recursive("a.test", 28).is_answer(&r, 1));
    let mut chaos = Query::recursive("a.test", 1);
    chaos.qclass = 3;
    assert!(!chaos.is_answer(&r, 1));
    assert!(
        !Query::recursive("a.test", 1).is_answer(&plain, 1),
        "a query is no answer"
    );
    // Junk with our id and QR counts as ours (and is then reported malformed).
    assert!(Query::recursive("a.test", 1).is_answer(&[0, 1, 0x80, 0, 0, 1, 0xff], 1));
    assert!(!Query::recursive("a.test", 1).is_answer(&[0, 1, 0x80], 1));
}

#[test]
fn header_question_and_records_are_read() {
    let q = Query::recursive("a.test", 15).encode(0x1234);
    let m = reply(
        &q,
        3,
        &[
            (&[0xC0, 12], 15, b"\x00\x0a\x04mail\xc0\x0e"),
            (&[0], 1, &[1, 2, 3, 4]),
        ],
    );
    assert_eq!(reply_id(&m), Some(0x1234));
    assert_eq!(reply_id(&q), None, "a query");
    assert_eq!(reply_id(&m[..3]), None);
    let mut r = Reader::new(&m);
    let h = Header::read(&mut r).unwrap();
    assert_eq!(
        (h.id, h.qdcount, h.ancount, h.nscount, h.arcount),
        (0x1234, 1, 2, 0, 0)
    );
    assert!(h.has(FLAG_QR) && h.has(FLAG_AA) && h.has(FLAG_RD) && !h.has(FLAG_TC));
    assert_eq!((h.rcode(), h.opcode()), (3, 0));
    let question = Question::read(&mut r).unwrap();
    assert_eq!(
        question,
        Question {
            name: b"\x01a\x04test\x00".to_vec(),
            qtype: 15,
            qclass: 1
        }
    );
    let mx = Record::read(&mut r).unwrap();
    assert_eq!(mx.name, b"\x01a\x04test\x00");
    assert_eq!((mx.rtype, mx.class, mx.ttl), (15, 1, 3600));
    assert_eq!(mx.data, b"\x00\x0a\x04mail\xc0\x0e");
    assert_eq!(&m[mx.data_at..mx.data_at + mx.data.len()], mx.data);
    // The exchange, compressed: read at its place in the whole message.
    let mut d = Reader::new(&m).at(mx.data_at);
    assert_eq!(d.u16(), Ok(10));
    assert_eq!(d.name().unwrap(), b"\x04mail\x04test\x00");
    assert_eq!(d.pos(), mx.data_at + mx.data.len());
    let a = Record::read(&mut r).unwrap();
    assert_eq!(
        (a.name.as_slice(), a.rtype, a.data),
        (&[0u8][..], 1, &[1u8, 2, 3, 4][..])
    );
    assert!(r.at_end());
    assert_eq!(Record::read(&mut r), Err(Error::NameShort));
    assert_eq!(r.u8(), Err(Error::Short));
    // The reader's small parts.
    let mut r = Reader::new(&[0, 1, 2, 3, 4, 5, 6]);
    assert_eq!(r.u32(), Ok(0x0001_0203));
    assert_eq!(r.rest(), &[4, 5, 6]);
    assert_eq!(r.bytes(4), Err(Error::Short));
    assert_eq!(r.bytes(usize::MAX), Err(Error::Short));
    assert_eq!(r.bytes(3), Ok(&[4u8, 5, 6][..]));
    assert_eq!(r.rest(), &[] as &[u8]);
    assert_eq!(r.buf().len(), 7);
}

#[test]
fn names_follow_pointers_backwards_only() {
    // "b.a" at 0, then "c" + pointer to 0 at 5: "c.b.a".
    let m = b"\x01b\x01a\x00\x01c\xc0\x00\xff";
    let mut r = Reader::new(m).at(5);
    assert_eq!(r.name().unwrap(), b"\x01c\x01b\x01a\x00");
    assert_eq!(r.pos(), 9, "after the pointer, not where it led");
    // A pointer to itself, and one forward: refused where they are; the position does
    // not move on an error.
    let mut r = Reader::new(b"\x01x\xc0\x02");
    assert_eq!(r.name(), Err(Error::Forward(2)));
    assert_eq!(r.pos(), 0);
    let mut r = Reader::new(b"\xc0\x02\x00");
    assert_eq!(r.name(), Err(Error::Forward(0)));
    // The two label types that do not exist.
    assert_eq!(Reader::new(b"\x80").name(), Err(Error::LabelType(0x80)));
    assert_eq!(Reader::new(b"\x41").name(), Err(Error::LabelType(0x40)));
    // Ends inside a label, a pointer, or before the root.
    for m in [&b"\x03ab"[..], b"\x01a\xc0", b"\x01a", b""] {
        assert_eq!(Reader::new(m).name(), Err(Error::NameShort), "{m:?}");
    }
    assert_eq!(Reader::new(b"\x00").name().unwrap(), b"\x00");
    assert_eq!(
        Error::Forward(7).to_string(),
        "compression pointer at byte 7 does not point backwards"
    );
    assert_eq!(String::from(Error::Short), "message ends early");
    assert_eq!(String::from(Error::NameShort), "message ends early");
    assert_eq!(Error::TooLong.to_string(), "name longer than 255 bytes");
    assert_eq!(
        Error::TooManySteps.to_string(),
        "name has too many compression pointers"
    );
    assert_eq!(
        Error::LabelType(0x40).to_string(),
        "unknown label type 0x40"
    );
    assert!(!Error::Short.in_name() && Error::NameShort.in_name() && Error::TooLong.in_name());
}

/// A name of `labels` labels of `len` bytes each, in wire format.
fn long_name(labels: usize, len: u8) -> Vec<u8> {
    let mut w = Vec::new();
    for _ in 0..labels {
        w.push(len);
        w.extend(std::iter::repeat_n(b'a', usize::from(len)));
    }
    w.push(0);
    w
}

#[test]
fn name_rules_bound_length_and_steps() {
    // 255 bytes in wire format is the most RFC 1035 allows.
    let max = long_name(127, 1); // 254 bytes and the root
    assert_eq!(max.len(), 255);
    assert_eq!(Reader::new(&max).name().unwrap(), max);
    let over = long_name(4, 63); // 256 bytes
    assert_eq!(Reader::new(&over).name(), Err(Error::TooLong));
    // Steps: a chain of pointers each to the one before, after a root label at 0.
    let mut chain = vec![0u8];
    for i in 0..300usize {
        let at = if i == 0 { 0 } else { 1 + 2 * (i - 1) };
        chain.extend_from_slice(&[0xC0 | (at >> 8) as u8, at as u8]);
    }
    let last = chain.len() - 2;
    // 255 pointers and the root label: 256 steps, the most allowed.
    assert_eq!(Reader::new(&chain).at(1 + 2 * 254).name().unwrap(), [0]);
    assert_eq!(
        Reader::new(&chain).at(1 + 2 * 255).name(),
        Err(Error::TooManySteps)
    );
    assert_eq!(
        Reader::new(&chain).at(last).name(),
        Err(Error::TooManySteps)
    );
    // Other rules: fewer steps, another length.
    let strict = NameRules {
        steps: 3,
        too_long: |w| w.len() > 4,
    };
    let mut r = Reader::new(&chain).with_rules(strict).at(3);
    assert_eq!(r.name().unwrap(), [0]);
    let mut r = Reader::new(&chain).with_rules(strict).at(5);
    assert_eq!(r.name(), Err(Error::TooManySteps));
    let mut r = Reader::new(b"\x02ab\x01c\x00").with_rules(strict);
    assert_eq!(r.name(), Err(Error::TooLong));
    let mut r = Reader::new(b"\x03abc\x00").with_rules(strict);
    assert_eq!(r.name().unwrap(), b"\x03abc\x00");
}

#[test]
fn no_input_panics() {
    let q = Query::recursive("a.test", 65).encode(1);
    let good = reply(
        &q,
        0,
        &[
            (&[0xC0, 12], 15, b"\x00\x0a\x04mail\xc0\x0e"),
            (&[0xC0, 12], 16, b"\x02hi"),
        ],
    );
    // Reads a whole message as far as it goes.
    fn read_all(m: &[u8]) {
        let mut r = Reader::new(m);
        let Ok(h) = Header::read(&mut r) else { return };
        for _ in 0..h.qdcount {
            if Question::read(&mut r).is_err() {
                return;
            }
        }
        for _ in 0..u32::from(h.ancount) + u32::from(h.nscount) + u32::from(h.arcount) {
            let Ok(rec) = Record::read(&mut r) else {
                return;
            };
            let _ = Reader::new(m).at(rec.data_at).name();
        }
        let _ = Query::recursive("a.test", 65).is_answer(m, 1);
    }
    read_all(&good);
    for n in 0..good.len() {
        read_all(&good[..n]);
        for v in [0u8, 1, 0x3F, 0x40, 0x80, 0xC0, 0xFF] {
            let mut m = good.clone();
            m[n] = v;
            read_all(&m);
        }
    }
    let mut x: u32 = 0x9e37_79b9;
    for _ in 0..50_000 {
        let len = (x % 120) as usize;
        let m: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        read_all(&m);
        // Names anywhere in it, too.
        for at in 0..m.len() {
            let _ = Reader::new(&m).at(at).name();
        }
    }
    // Positions past the end are only short.
    assert_eq!(Reader::new(&good).at(usize::MAX).u8(), Err(Error::Short));
    assert_eq!(
        Reader::new(&good).at(usize::MAX).name(),
        Err(Error::NameShort)
    );
    assert!(Reader::new(&good).at(usize::MAX).at_end());
}
