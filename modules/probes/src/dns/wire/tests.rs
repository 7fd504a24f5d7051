use super::*;
use imn_proto::kinds::dns::{
    query_name, DnsErrorKind, DnsProtocol, DnsReply, DnsResult, ServerSource,
};
use imn_resolver::wire::Query;

fn query(name: &str, qtype: u16) -> Query {
    Query {
        name: query_name(name, false).unwrap(),
        qtype,
        qclass: 1,
        rd: true,
        cd: false,
        dnssec_ok: false,
        edns_size: 0,
        nsid: false,
    }
}

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

fn one(t: u16, data: &[u8]) -> DnsRecord {
    let q = query("a.test", t).encode(7);
    let m = reply(&q, 0, &[(&[0xC0, 12], t, data)]);
    let mut msg = parse_message(&m).unwrap();
    assert_eq!(msg.answer.len(), 1);
    msg.answer.remove(0)
}

#[test]
fn every_rdata_type() {
    let a = one(1, &[192, 0, 2, 1]);
    assert_eq!((a.rdata.as_str(), a.rtype.as_str()), ("192.0.2.1", "A"));
    assert_eq!(
        a.data,
        RData::A {
            address: "192.0.2.1".into()
        }
    );
    assert_eq!(
        (a.name.as_str(), a.ttl, a.class.as_str()),
        ("a.test.", 3600, "IN")
    );
    let aaaa = one(
        28,
        &[0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    );
    assert_eq!(aaaa.rdata, "2001:db8::1");
    // CNAME to a compressed name: "www" + pointer to "test." at offset 14.
    let cname = one(5, &[3, b'w', b'w', b'w', 0xC0, 14]);
    assert_eq!(cname.rdata, "www.test.");
    assert_eq!(
        cname.data,
        RData::Name {
            target: "www.test.".into()
        }
    );
    let mx = one(15, b"\x00\x0a\x04mail\xc0\x0e");
    assert_eq!(mx.rdata, "10 mail.test.");
    assert_eq!(
        mx.data,
        RData::Mx {
            preference: 10,
            exchange: "mail.test.".into()
        }
    );
    let mut soa = b"\x02ns\xc0\x0e\x0ahostmaster\xc0\x0e".to_vec();
    for v in [2024010101u32, 1200, 120, 604800, 300] {
        soa.extend_from_slice(&v.to_be_bytes());
    }
    let soa = one(6, &soa);
    assert_eq!(
        soa.rdata,
        "ns.test. hostmaster.test. 2024010101 1200 120 604800 300"
    );
    assert!(matches!(
        soa.data,
        RData::Soa {
            serial: 2024010101,
            minimum: 300,
            ..
        }
    ));
    let txt = one(16, b"\x0bhello world\x06say \"x\x00");
    assert_eq!(txt.rdata, r#""hello world" "say \"x" """#);
    assert_eq!(
        txt.data,
        RData::Txt {
            strings: vec!["hello world".into(), "say \"x".into(), "".into()]
        }
    );
    let srv = one(33, b"\x00\x0a\x00\x14\x13\xc4\x03sip\xc0\x0e");
    assert_eq!(srv.rdata, "10 20 5060 sip.test.");
    assert_eq!(
        srv.data,
        RData::Srv {
            priority: 10,
            weight: 20,
            port: 5060,
            target: "sip.test.".into()
        }
    );
    let caa = one(257, b"\x80\x05issueca.example");
    assert_eq!(caa.rdata, "128 issue \"ca.example\"");
    assert_eq!(
        caa.data,
        RData::Caa {
            flags: 128,
            tag: "issue".into(),
            value: "ca.example".into()
        }
    );
    let ptr = one(12, b"\x04host\x04test\x00");
    assert_eq!(ptr.rdata, "host.test.");
    let ns = one(2, b"\x02ns\xc0\x0e");
    assert_eq!(
        ns.data,
        RData::Name {
            target: "ns.test.".into()
        }
    );
    let ds = one(43, b"\x30\x39\x08\x02\xab\xcd");
    assert_eq!(ds.rdata, "12345 8 2 ABCD");
    // RFC 4034 section 5.4's example key (dskey.example.com.): key tag 60485.
    let key_b64 = "AQOeiiR0GOMYkDshWoSKz9XzfwJr1AYtsmx3TGkJaNXVbfi/2pHm822aJ5iI9BMzNXxeYCmZDRD99WYwYqUSdjMmmAphXdvxegXd/M5+X7OrzKBaMbCVdFLUUh6DhweJBjEVv5f2wwjM9XzcnOf+EPbtG9DMBmADjFDc2w/rljwvFw==";
    let mut key = vec![0x01, 0x00, 0x03, 0x05];
    key.extend_from_slice(&[
        0x01, 0x03, 0x9e, 0x8a, 0x24, 0x74, 0x18, 0xe3, 0x18, 0x90, 0x3b, 0x21, 0x5a, 0x84, 0x8a,
        0xcf, 0xd5, 0xf3, 0x7f, 0x02, 0x6b, 0xd4, 0x06, 0x2d, 0xb2, 0x6c, 0x77, 0x4c, 0x69, 0x09,
        0x68, 0xd5, 0xd5, 0x6d, 0xf8, 0xbf, 0xda, 0x91, 0xe6, 0xf3, 0x6d, 0x9a, 0x27, 0x98, 0x88,
        0xf4, 0x13, 0x33, 0x35, 0x7c, 0x5e, 0x60, 0x29, 0x99, 0x0d, 0x10, 0xfd, 0xf5, 0x66, 0x30,
        0x62, 0xa5, 0x12, 0x76, 0x33, 0x26, 0x98, 0x0a, 0x61, 0x5d, 0xdb, 0xf1, 0x7a, 0x05, 0xdd,
        0xfc, 0xce, 0x7e, 0x5f, 0xb3, 0xab, 0xcc, 0xa0, 0x5a, 0x31, 0xb0, 0x95, 0x74, 0x52, 0xd4,
        0x52, 0x1e, 0x83, 0x87, 0x07, 0x89, 0x06, 0x31, 0x15, 0xbf, 0x97, 0xf6, 0xc3, 0x08, 0xcc,
        0xf5, 0x7c, 0xdc, 0x9c, 0xe7, 0xfe, 0x10, 0xf6, 0xed, 0x1b, 0xd0, 0xcc, 0x06, 0x60, 0x03,
        0x8c, 0x50, 0xdc, 0xdb, 0x0f, 0xeb, 0x96, 0x3c, 0x2f, 0x17,
    ]);
    let dnskey = one(48, &key);
    assert!(matches!(
        dnskey.data,
        RData::Dnskey {
            flags: 256,
            protocol: 3,
            algorithm: 5,
            key_tag: 60485,
            ..
        }
    ));
    assert_eq!(dnskey.rdata, format!("256 3 5 {key_b64}"));
    // RFC 9460 appendix D.2, figure 6 (without mandatory): alpn, ipv4hint, ech, ipv6hint.
    let mut svc = b"\x00\x10\x03foo\x07example\x03org\x00".to_vec();
    svc.extend_from_slice(b"\x00\x00\x00\x04\x00\x01\x00\x04"); // mandatory=alpn,ipv4hint
    svc.extend_from_slice(b"\x00\x01\x00\x09\x02h2\x05h3-19"); // alpn
    svc.extend_from_slice(b"\x00\x02\x00\x00"); // no-default-alpn
    svc.extend_from_slice(b"\x00\x03\x00\x02\x01\xbb"); // port 443
    svc.extend_from_slice(b"\x00\x04\x00\x04\xc0\x00\x02\x01"); // ipv4hint
    svc.extend_from_slice(b"\x00\x05\x00\x03\x01\x02\x03"); // ech
    svc.extend_from_slice(b"\x00\x06\x00\x10\x20\x01\x0d\xb8\0\0\0\0\0\0\0\0\0\0\0\x01");
    svc.extend_from_slice(b"\x02\x9b\x00\x03abc"); // key667
    let https = one(65, &svc);
    assert_eq!(https.rtype, "HTTPS");
    assert_eq!(
        https.rdata,
        "16 foo.example.org. mandatory=alpn,ipv4hint alpn=\"h2,h3-19\" no-default-alpn \
         port=443 ipv4hint=192.0.2.1 ech=AQID ipv6hint=2001:db8::1 key667=\"abc\""
    );
    let RData::Svcb(d) = &https.data else {
        panic!("{:?}", https.data)
    };
    assert_eq!(d.priority, 16);
    assert_eq!(d.target, "foo.example.org.");
    assert_eq!(d.alpn, vec!["h2", "h3-19"]);
    assert_eq!(d.mandatory, vec!["alpn", "ipv4hint"]);
    assert!(d.no_default_alpn);
    assert_eq!(d.port, Some(443));
    assert_eq!(d.ipv4hint, vec!["192.0.2.1"]);
    assert_eq!(d.ipv6hint, vec!["2001:db8::1"]);
    assert_eq!(d.ech.as_deref(), Some("AQID"));
    assert_eq!(d.params.len(), 8);
    // AliasMode SVCB.
    let alias = one(64, b"\x00\x00\x03foo\x04test\x00");
    assert_eq!(alias.rdata, "0 foo.test.");
    // Unknown types, and known types whose data does not fit: RFC 3597.
    let unknown = one(65280, &[0xde, 0xad]);
    assert_eq!(
        (unknown.rtype.as_str(), unknown.rdata.as_str()),
        ("TYPE65280", "\\# 2 DEAD")
    );
    assert_eq!(unknown.data, RData::Other);
    assert_eq!(one(1, &[1, 2, 3]).rdata, "\\# 3 010203");
    assert_eq!(one(15, b"\x00\x0a\x04mail\xc0\x0eX").data, RData::Other);
    assert_eq!(one(99, &[]).rdata, "\\# 0");
}

#[test]
fn header_edns_and_rcodes() {
    let mut q = query("nx.test", 1);
    q.edns_size = 1232;
    let mut m = q.encode(3);
    m[2] = 0x85; // QR AA RD
    m[3] = 0xB3; // RA AD CD, NXDOMAIN
                 // The OPT record: size 4096, ext rcode 1, version 0, DO; NSID "ns1" and a cookie.
    let opt_start = m.len() - 11;
    m.truncate(opt_start);
    m.extend_from_slice(&[0, 0, 41, 0x10, 0, 1, 0, 0x80, 0, 0, 15]);
    m.extend_from_slice(&[0, 3, 0, 3, b'n', b's', b'1', 0, 10, 0, 4, 1, 2, 3, 4]);
    let msg = parse_message(&m).unwrap();
    assert_eq!(msg.id, 3);
    assert_eq!(
        msg.flags,
        DnsFlags {
            qr: true,
            aa: true,
            tc: false,
            rd: true,
            ra: true,
            z: false,
            ad: true,
            cd: true
        }
    );
    // Header rcode 3 plus extended 1 << 4.
    assert_eq!((msg.rcode, msg.rcode_name.as_str()), (19, "BADMODE"));
    let e = msg.edns.unwrap();
    assert_eq!(
        (e.udp_size, e.version, e.ext_rcode, e.dnssec_ok),
        (4096, 0, 1, true)
    );
    assert_eq!(e.nsid.as_deref(), Some("ns1"));
    assert_eq!(e.nsid_hex.as_deref(), Some("6e7331"));
    assert_eq!(e.options[1].name, "COOKIE");
    assert_eq!(e.options[1].data_hex, "01020304");
    assert!(msg.additional.is_empty(), "OPT is reported as edns only");
    assert_eq!(msg.question[0].name, "nx.test.");
    assert_eq!(rcode_name(3), "NXDOMAIN");
}

#[test]
fn names_are_shown_with_escapes() {
    assert_eq!(
        name_text(b"\x03a.b\x02\x00\xff\x04test\x00"),
        "a\\.b.\\000\\255.test."
    );
    assert_eq!(name_text(b"\x00"), ".");
}

#[test]
fn compression_loops_and_bad_pointers_are_refused() {
    let q = query("a.test", 1).encode(1);
    // A pointer to itself, a forward pointer, and a two-pointer loop.
    for owner in [&[0xC0u8, 24][..], &[0xC0, 40][..]] {
        let m = reply(&q, 0, &[(owner, 1, &[1, 2, 3, 4])]);
        let e = parse_message(&m).unwrap_err();
        assert!(e.contains("backwards"), "{e}");
    }
    let mut m = q.clone();
    m[2] |= 0x80;
    m[7] = 1;
    let at = m.len();
    // Label "x" then a pointer to the label itself: x.x.x... backwards? No: it points
    // back to where the record started, which is before the pointer, so it loops until
    // the name grows too long.
    m.extend_from_slice(&[1, b'x', 0xC0, at as u8]);
    m.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 1, 0, 4, 1, 2, 3, 4]);
    let e = parse_message(&m).unwrap_err();
    assert!(
        e.contains("longer than 255") || e.contains("too many"),
        "{e}"
    );
    // An unknown label type.
    let m = reply(&q, 0, &[(&[0x80, 1], 1, &[1, 2, 3, 4])]);
    assert!(parse_message(&m).unwrap_err().contains("label type"));
}

#[test]
fn truncated_messages_are_errors() {
    let q = query("a.test", 15).encode(1);
    let good = reply(&q, 0, &[(&[0xC0, 12], 15, b"\x00\x0a\x04mail\xc0\x0e")]);
    assert!(parse_message(&good).is_ok());
    for n in 0..good.len() {
        assert!(parse_message(&good[..n]).is_err(), "cut at {n}");
    }
    // An rdlength past the end.
    let mut long = good.clone();
    let l = long.len();
    long[l - 10] = 0x40;
    assert!(parse_message(&long).unwrap_err().contains("ends early"));
    // A count larger than the records present.
    let mut more = good.clone();
    more[7] = 2;
    assert!(parse_message(&more)
        .unwrap_err()
        .contains("answer record 1"));
}

#[test]
fn no_input_panics() {
    let q = query("a.test", 65).encode(1);
    let svc = b"\x00\x01\x00\x00\x01\x00\x03\x02h2\x00\x04\x00\x04\x01\x02\x03\x04";
    let good = reply(
        &q,
        0,
        &[
            (&[0xC0, 12], 65, svc),
            (&[0xC0, 12], 15, b"\x00\x0a\x04mail\xc0\x0e"),
            (
                &[0xC0, 12],
                6,
                b"\xc0\x0c\xc0\x0c\0\0\0\x01\0\0\0\x02\0\0\0\x03\0\0\0\x04\0\0\0\x05",
            ),
            (&[0xC0, 12], 16, b"\x02hi"),
            (&[0xC0, 12], 257, b"\x00\x03tagv"),
        ],
    );
    assert_eq!(parse_message(&good).unwrap().answer.len(), 5);
    // Every truncation and many single-byte changes of a good reply.
    for n in 0..good.len() {
        let _ = parse_message(&good[..n]);
        let _ = Query::is_answer(&query("a.test", 65), &good[..n], 1);
        for v in [0u8, 1, 0x3F, 0x40, 0x80, 0xC0, 0xFF] {
            let mut m = good.clone();
            m[n] = v;
            let _ = parse_message(&m);
        }
    }
    let mut x: u32 = 0x1234_5678;
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
        let _ = parse_message(&m);
        // And random rdata of every type after a valid header.
        let t = [1u16, 2, 5, 6, 15, 16, 28, 33, 43, 48, 64, 65, 257][(x % 13) as usize];
        let data = &m[..m.len().min(60)];
        let r = reply(&q, 0, &[(&[0xC0, 12], t, data)]);
        let _ = parse_message(&r);
    }
}

#[test]
fn base64_and_hex() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    assert_eq!(hex(&[0, 0xab]), "00ab");
}

#[test]
fn a_result_round_trips_through_postcard_and_json() {
    let q = query("a.test", 15).encode(9);
    let m = reply(&q, 0, &[(&[0xC0, 12], 15, b"\x00\x0a\x04mail\xc0\x0e")]);
    let mut svc = b"\x00\x01\x00\x00\x01\x00\x03\x02h2".to_vec();
    svc.extend_from_slice(b"\x00\x05\x00\x02\x01\x02");
    let mut msg = parse_message(&m).unwrap();
    msg.answer.push(one(65, &svc));
    msg.answer.push(one(65280, &[1]));
    msg.edns = Some(EdnsInfo {
        udp_size: 1232,
        version: 0,
        ext_rcode: 0,
        dnssec_ok: true,
        nsid_hex: Some("6e73".into()),
        nsid: Some("ns".into()),
        options: vec![EdnsOption {
            code: 3,
            name: "NSID".into(),
            data_hex: "6e73".into(),
        }],
    });
    let r = DnsResult {
        server: "127.0.0.1".into(),
        port: 5353,
        server_source: ServerSource::Params,
        src_addr: Some("127.0.0.1".into()),
        protocol: DnsProtocol::Tcp,
        tcp_after_truncation: true,
        qname: "a.test.".into(),
        qtype: "MX".into(),
        qclass: "IN".into(),
        qbuf: base64(&q),
        attempts: 1,
        timeout_ms: 5000,
        error: Some(imn_proto::kinds::dns::DnsError {
            kind: DnsErrorKind::Malformed,
            message: "x".into(),
        }),
        reply: Some(Box::new(DnsReply {
            rt_ms: 0.25,
            tcp_connect_ms: Some(0.1),
            size: m.len() as u32,
            abuf: base64(&m),
            message: Some(msg),
        })),
    };
    let bytes = postcard::to_stdvec(&r).unwrap();
    assert_eq!(postcard::from_bytes::<DnsResult>(&bytes).unwrap(), r);
    let json = serde_json::to_string(&r).unwrap();
    assert_eq!(serde_json::from_str::<DnsResult>(&json).unwrap(), r);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        v["reply"]["message"]["answer"][0]["data"]["mx"]["exchange"],
        "mail.test."
    );
    assert_eq!(
        v["reply"]["message"]["answer"][1]["data"]["svcb"]["alpn"][0],
        "h2"
    );
    assert_eq!(v["reply"]["message"]["edns"]["do"], true);
    assert_eq!(v["protocol"], "tcp");
    assert_eq!(v["error"]["kind"], "malformed");
    // Through the module output enum too.
    let out = imn_proto::results::ModuleOutput::Dns(Box::new(r));
    let bytes = postcard::to_stdvec(&out).unwrap();
    assert_eq!(
        postcard::from_bytes::<imn_proto::results::ModuleOutput>(&bytes).unwrap(),
        out
    );
}
