//! TCP connect time: a monotonic clock read before `connect`, the kernel's `tcpi_rtt`
//! once connected, and the outcome of every attempt.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use tokio::net::TcpSocket;

use super::Context;
use imn_proto::params::TcpingParams;
use imn_proto::results::{TcpAttempt, TcpOutcome, TcpingResult};

pub async fn run(p: TcpingParams, ctx: &Context) -> Result<TcpingResult, String> {
    // Every attempt connects to this address: checked once, before the first SYN.
    let ip = super::resolve_permitted(ctx, &p.host).await?;
    let addr = SocketAddr::new(ip, p.port);
    let mut r = TcpingResult {
        host: p.host.clone(),
        addr: ip.to_string(),
        port: p.port,
        attempts: Vec::with_capacity(p.count as usize),
        sent: 0,
        open: 0,
        min_ms: None,
        avg_ms: None,
        max_ms: None,
        median_ms: None,
        mdev_ms: None,
        loss_pct: 0.0,
        availability_pct: 0.0,
    };
    let start = tokio::time::Instant::now();
    let interval = Duration::from_millis(p.interval_ms);
    for i in 0..p.count {
        // Absolute deadlines: attempt i starts at start + i * interval.
        tokio::time::sleep_until(start + interval * i).await;
        r.attempts
            .push(attempt(addr, Duration::from_millis(p.timeout_ms)).await);
    }
    r.summarise();
    Ok(r)
}

async fn attempt(addr: SocketAddr, timeout: Duration) -> TcpAttempt {
    let sock = match addr.ip() {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    };
    let sock = match sock {
        Ok(s) => s,
        Err(e) => return failed(TcpOutcome::Error, None, e.to_string()),
    };
    let t0 = Instant::now();
    match tokio::time::timeout(timeout, sock.connect(addr)).await {
        Ok(Ok(stream)) => {
            let connect_ms = t0.elapsed().as_nanos().max(1) as f64 / 1e6;
            TcpAttempt {
                outcome: TcpOutcome::Open,
                connect_ms: Some(connect_ms),
                tcpi_rtt_us: tcpi_rtt_us(stream.as_raw_fd()),
                error: None,
            }
        }
        Ok(Err(e)) => {
            let ms = Some(t0.elapsed().as_nanos().max(1) as f64 / 1e6);
            failed(classify(&e), ms, e.to_string())
        }
        Err(_) => failed(
            TcpOutcome::Timeout,
            None,
            format!("no answer within {timeout:?}"),
        ),
    }
}

fn failed(outcome: TcpOutcome, connect_ms: Option<f64>, error: String) -> TcpAttempt {
    TcpAttempt {
        outcome,
        connect_ms,
        tcpi_rtt_us: None,
        error: Some(error),
    }
}

fn classify(e: &io::Error) -> TcpOutcome {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => TcpOutcome::Refused,
        Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH) | Some(libc::EHOSTDOWN) => {
            TcpOutcome::Unreachable
        }
        Some(libc::ETIMEDOUT) => TcpOutcome::Timeout,
        _ => TcpOutcome::Error,
    }
}

/// The kernel's smoothed RTT estimate of a connected socket, in µs.
fn tcpi_rtt_us(fd: i32) -> Option<u32> {
    // SAFETY: tcp_info is plain data; all-zero is valid.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(info.tcpi_rtt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(port: u16, count: u32) -> TcpingParams {
        TcpingParams {
            host: "127.0.0.1".into(),
            port,
            count,
            timeout_ms: 1000,
            interval_ms: 10,
        }
    }

    #[tokio::test]
    async fn open_port() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                drop(s);
            }
        });
        let r = run(params(port, 3), &Context::default()).await.unwrap();
        assert_eq!((r.sent, r.open), (3, 3));
        assert_eq!(r.availability_pct, 100.0);
        for a in &r.attempts {
            assert_eq!(a.outcome, TcpOutcome::Open);
            assert!(a.connect_ms.unwrap() > 0.0);
            assert!(a.tcpi_rtt_us.is_some());
        }
        assert!(r.median_ms.is_some());
    }

    #[tokio::test]
    async fn closed_port() {
        // Bind then drop: the port is free, so connects are refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let r = run(params(port, 2), &Context::default()).await.unwrap();
        assert_eq!((r.sent, r.open), (2, 0));
        assert!(r.attempts.iter().all(|a| a.outcome == TcpOutcome::Refused));
        assert_eq!(r.availability_pct, 0.0);
        assert_eq!(r.min_ms, None);
    }
}
