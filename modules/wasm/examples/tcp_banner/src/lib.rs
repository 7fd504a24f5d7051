//! `tcp_banner`: connects over TCP and reads what the server says first, up to the end
//! of its first line (LF or CRLF), `max_bytes`, the peer closing, or the timeout.
//!
//! Parameters: `host`, `port` (both required), `timeout_ms` (3000: for the connect,
//! then again for the banner), `max_bytes` (512, at most 4096).
//!
//! Result: the connect time, the time from connected to the first byte, the first line
//! with every byte outside printable ASCII replaced by '?', and a guess at the
//! protocol from how the line starts. A server that sends nothing in time, or closes
//! without a byte, fails the run with a message saying so.

use imn_guest::json::{ObjectWriter, Params};
use imn_guest::{now_ns, TcpStream};

/// The first line of `data`: up to the first LF (without it, nor a CR before it), or
/// all of it.
pub fn first_line(data: &[u8]) -> &[u8] {
    match data.iter().position(|&b| b == b'\n') {
        Some(i) => {
            let line = &data[..i];
            line.strip_suffix(b"\r").unwrap_or(line)
        }
        None => data,
    }
}

/// Bytes as text: printable ASCII (0x20 to 0x7e) as is, any other byte as '?'.
pub fn printable(line: &[u8]) -> String {
    line.iter()
        .map(|&b| {
            if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '?'
            }
        })
        .collect()
}

/// A guess from the banner's start: "ssh" (`SSH-`), "ftp" (`220` and FTP named, not
/// SMTP), "smtp" (any other `220`), "pop3" (`+OK`), "imap" (`* OK`), "vnc" (`RFB `),
/// else "unknown".
pub fn protocol(banner: &str) -> &'static str {
    let upper = banner.to_ascii_uppercase();
    if banner.starts_with("SSH-") {
        "ssh"
    } else if banner.starts_with("220") {
        if !upper.contains("SMTP") && upper.contains("FTP") {
            "ftp"
        } else {
            "smtp"
        }
    } else if banner.starts_with("+OK") {
        "pop3"
    } else if upper.starts_with("* OK") {
        "imap"
    } else if banner.starts_with("RFB ") {
        "vnc"
    } else {
        "unknown"
    }
}

fn measure() -> Result<(), String> {
    let p = Params::load()?;
    p.only(&["host", "port", "timeout_ms", "max_bytes"])?;
    let host = p.required_string("host", 253)?;
    let port = p.required_integer("port", 1, 65535)? as u16;
    let timeout_ms = p.integer("timeout_ms", 3000, 1, 60000)?;
    let max_bytes = p.integer("max_bytes", 512, 1, 4096)? as usize;

    let start = now_ns();
    let conn = TcpStream::connect(host, port, timeout_ms as u32)
        .map_err(|e| format!("connecting to {host} port {port}: {e}"))?;
    let connected = now_ns();

    let mut buf = vec![0u8; max_bytes];
    let mut got = 0;
    let mut first_byte: Option<i64> = None;
    let until = connected.saturating_add(timeout_ms * 1_000_000);
    let mut failure: Option<String> = None;
    while got < max_bytes && !buf[..got].contains(&b'\n') {
        let left = (until.saturating_sub(now_ns()) + 999_999) / 1_000_000;
        if left <= 0 {
            break;
        }
        match conn.recv(&mut buf[got..], left as u32) {
            Ok(0) => {
                if got == 0 {
                    failure = Some("the server closed the connection without a banner".into());
                }
                break;
            }
            Ok(n) => {
                first_byte.get_or_insert_with(now_ns);
                got += n;
            }
            Err(e) if e.is_timeout() => break,
            Err(e) => {
                // A reset after some of the banner: report what came.
                if got == 0 {
                    failure = Some(format!("reading the banner: {e}"));
                }
                break;
            }
        }
    }
    drop(conn);
    let Some(first_byte) = first_byte else {
        return Err(format!(
            "connected to {host} port {port} in {} ms, but {}",
            (connected - start) / 1_000_000,
            failure.unwrap_or_else(|| if imn_guest::deadline_reached() {
                "the run's deadline came before the server sent anything".to_string()
            } else {
                format!("the server sent nothing within {timeout_ms} ms")
            })
        ));
    };
    let banner = printable(first_line(&buf[..got]));
    let mut w = ObjectWriter::new();
    w.string("host", host)
        .uint("port", port.into())
        .ms_from_ns("connect_ms", connected - start)
        .ms_from_ns("banner_ms", first_byte - connected)
        .string("banner", &banner)
        .string("protocol", protocol(&banner));
    imn_guest::emit(&w.finish())?;
    Ok(())
}

imn_guest::entry!(measure);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_line_without_its_end() {
        assert_eq!(
            first_line(b"SSH-2.0-OpenSSH_9.6\r\nmore"),
            b"SSH-2.0-OpenSSH_9.6"
        );
        assert_eq!(first_line(b"220 hi\nmore"), b"220 hi");
        assert_eq!(first_line(b"no end"), b"no end");
        assert_eq!(first_line(b"\r\n"), b"");
        assert_eq!(first_line(b""), b"");
        assert_eq!(first_line(b"a\rb\n"), b"a\rb");
    }

    #[test]
    fn non_printable_bytes_become_question_marks() {
        assert_eq!(printable(b"a\tb\x00\x7f\xc3\xa9~ "), "a?b????~ ");
    }

    #[test]
    fn protocols_by_their_greeting() {
        assert_eq!(protocol("SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13"), "ssh");
        assert_eq!(protocol("220 mx.example.net ESMTP Postfix"), "smtp");
        assert_eq!(protocol("220 (vsFTPd 3.0.5)"), "ftp");
        assert_eq!(protocol("220 ProFTPD Server ready."), "ftp");
        assert_eq!(protocol("220 ftp.example.net ESMTP"), "smtp");
        assert_eq!(protocol("220 welcome"), "smtp");
        assert_eq!(protocol("+OK Dovecot ready."), "pop3");
        assert_eq!(protocol("* OK [CAPABILITY IMAP4rev1] ready"), "imap");
        assert_eq!(protocol("RFB 003.008"), "vnc");
        assert_eq!(protocol("HTTP/1.1 400 Bad Request"), "unknown");
        assert_eq!(protocol(""), "unknown");
    }
}
