//! ICMP echo for one target or a sweep of many, through one shared engine per address
//! family (see `engine`).
//!
//! A run resolves its targets (names through the system resolver, reporting both the
//! name and the address), checks each address against the run's policy (a refused
//! target gets a `policy_denied` error and no probe), registers with the engines,
//! sends every probe at its absolute deadline from a pacer thread (`session::pace`),
//! and reads the RTTs the receiver thread measured:
//!
//! - receive time: the kernel's receive stamp (`SO_TIMESTAMPNS`, CLOCK_REALTIME);
//! - send time: the kernel's software transmit stamp (`SOF_TIMESTAMPING_TX_SOFTWARE`,
//!   from the error queue, the probe recognised by the cookie in its payload), or,
//!   where the kernel gives none, CLOCK_REALTIME read just before `sendmsg`;
//! - a realtime RTT that is not positive, or longer than the monotonic measure allows
//!   (the clock was stepped), is replaced by the monotonic one; no RTT is below 1 ns.
//!
//! State per target is 32 bytes, per probe 24 (see `session`), so a sweep of 10,000
//! targets costs well under 0.5 KiB per target, results included.

mod engine;
pub(crate) mod packet;
mod session;
pub(crate) mod sys;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;

pub use engine::Engine;
use session::{Lane, Session, Target, ACTIVE};

use super::Context;
use imn_proto::params::PingParams;
use imn_proto::results::{PingOutput, PingResult};

/// Most targets in one run.
pub const MAX_TARGETS: usize = 65_536;
/// Most probes per target.
pub const MAX_COUNT: u32 = 100;
/// Default rate cap (probes/s) when `rate` is not given.
pub const DEFAULT_RATE_CAP: f64 = 10_000.0;
/// Bounds of the rate (probes/s); faster than the maximum is as fast as possible.
const MIN_RATE: f64 = 0.001;
const MAX_RATE: f64 = 1e9;
/// Name lookups in flight at once.
const RESOLVE_CONCURRENCY: usize = 32;

/// Runs a ping with the process-wide engines.
pub async fn run(p: PingParams, ctx: &Context) -> Result<PingOutput, String> {
    run_with(p, ctx, Engine::global).await
}

/// Runs a ping with engines from `engine_for(v6)`.
pub async fn run_with(
    p: PingParams,
    ctx: &Context,
    engine_for: impl Fn(bool) -> Result<Arc<Engine>, String>,
) -> Result<PingOutput, String> {
    let PingParams {
        host,
        targets,
        count,
        interval_ms,
        timeout_ms,
        size,
        ttl,
        rate,
    } = p;
    let hosts: Vec<String> = match (host, targets) {
        (Some(h), _) => vec![h],
        (None, Some(t)) => t,
        (None, None) => Vec::new(),
    };
    if hosts.is_empty() {
        return Err("no target: give host or targets".into());
    }
    if hosts.len() > MAX_TARGETS {
        return Err(format!(
            "{} targets: at most {MAX_TARGETS} per run",
            hosts.len()
        ));
    }
    if !(1..=MAX_COUNT).contains(&count) {
        return Err(format!("count must be 1..={MAX_COUNT}, got {count}"));
    }
    if size > 65_507 {
        return Err(format!("size must be at most 65507 bytes, got {size}"));
    }
    if ttl == Some(0) {
        return Err("ttl must be 1..=255".into());
    }

    let mut resolved = resolve_all(&hosts).await;
    let unresolved: Vec<bool> = resolved.iter().map(Result::is_err).collect();
    let refused = permit_all(ctx, &hosts, &mut resolved);

    // Engines for the families in use; a family without one fails its targets only.
    let mut lanes: [Option<Lane>; 2] = [None, None];
    let mut engine_err: [Option<String>; 2] = [None, None];
    for v6 in [false, true] {
        if resolved
            .iter()
            .any(|r| matches!(r, Ok(a) if a.is_ipv6() == v6))
        {
            match engine_for(v6) {
                Ok(e) => {
                    lanes[usize::from(v6)] = Some(Lane {
                        engine: e,
                        id: 0,
                        seq_base: 0,
                    })
                }
                Err(e) => engine_err[usize::from(v6)] = Some(e),
            }
        }
    }
    if lanes.iter().all(Option::is_none) {
        match engine_err.iter().flatten().next() {
            // No target can be probed at all: that is the module's failure.
            Some(e) => return Err(e.clone()),
            // Nothing resolved: report the kind of socket that would have been used.
            None => match engine_for(false) {
                Ok(e) => {
                    lanes[0] = Some(Lane {
                        engine: e,
                        id: 0,
                        seq_base: 0,
                    })
                }
                // Targets the policy refused are the run's answer, socket or not.
                Err(_) if refused.iter().any(Option::is_some) => {}
                Err(e) => return Err(e),
            },
        }
    }

    let token = loop {
        let t = sys::random_u64() as u32;
        if t != 0 {
            break t;
        }
    };
    let mut notes: Vec<(u32, String)> = Vec::new();
    let mut targets = Vec::with_capacity(hosts.len());
    for (i, r) in resolved.iter().enumerate() {
        let (addr, scope, active) = match r {
            Ok(a) => {
                let v6 = a.is_ipv6();
                let scope = match a {
                    SocketAddr::V6(s) => s.scope_id(),
                    SocketAddr::V4(_) => 0,
                };
                match &engine_err[usize::from(v6)] {
                    Some(e) if lanes[usize::from(v6)].is_none() => {
                        notes.push((i as u32, e.clone()));
                        (a.ip(), scope, false)
                    }
                    _ => (a.ip(), scope, true),
                }
            }
            Err(e) => {
                notes.push((i as u32, e.clone()));
                // A refused target keeps its address for the report; it is never probed.
                let addr = refused[i].unwrap_or(IpAddr::from([0u8; 4]));
                (addr, 0, false)
            }
        };
        targets.push(Target {
            addr,
            flags: AtomicU8::new(if active { ACTIVE } else { 0 }),
            reply_ttl: AtomicU16::new(0),
            seq_off: 0,
            dups: AtomicU32::new(0),
            scope,
        });
    }
    drop(resolved);
    let timeout_ns = timeout_ms.max(1).saturating_mul(1_000_000);
    let mut sess = Session::new(token, count, size, timeout_ns, ttl, targets);
    for t in sess.build_index() {
        notes.push((
            t,
            format!(
                "address listed more than {} times in one run",
                (1u32 << 16) / count
            ),
        ));
    }
    let n_active = sess
        .targets
        .iter()
        .filter(|t| t.flags.load(Relaxed) & ACTIVE != 0)
        .count();
    let sess = Arc::new(sess);

    // Register with each engine in use.
    for v6 in [false, true] {
        let span = sess.span(v6);
        let slot = &mut lanes[usize::from(v6)];
        let Some(lane) = slot.as_mut() else { continue };
        if span == 0 {
            continue;
        }
        match lane.engine.inner.register(&sess, span) {
            Ok((id, base)) => {
                lane.id = id;
                lane.seq_base = base;
            }
            Err(e) => {
                for (i, t) in sess.targets.iter().enumerate() {
                    if t.addr.is_ipv6() == v6 && t.flags.load(Relaxed) & ACTIVE != 0 {
                        t.flags.store(0, Relaxed);
                        notes.push((i as u32, e.clone()));
                    }
                }
                *slot = None;
            }
        }
    }
    let socket_kind = lanes
        .iter()
        .flatten()
        .map(|l| l.engine.kind())
        .next()
        .unwrap_or("raw");

    let rate = match rate {
        Some(r) if r.is_finite() && r > 0.0 => r.clamp(MIN_RATE, MAX_RATE),
        _ => default_rate(n_active, interval_ms),
    };
    let interval_ns = interval_ms.saturating_mul(1_000_000);
    let src_addr = if hosts.len() == 1 {
        sess.targets
            .first()
            .filter(|t| t.flags.load(Relaxed) & ACTIVE != 0)
            .and_then(|t| source_for(t.addr, t.scope))
    } else {
        None
    };

    // The pacer runs on its own thread: probes are microseconds apart at high rates.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let pacer_sess = sess.clone();
    let handle = std::thread::Builder::new()
        .name("imn-ping-pace".into())
        .spawn(move || {
            // Leaves the engines even if the pacer panics.
            let registered = Registered {
                lanes,
                token: pacer_sess.token,
            };
            session::pace(&pacer_sess, &registered.lanes, interval_ns, rate);
            drop(registered);
            let _ = done_tx.send(());
        })
        .map_err(|e| format!("cannot start the ping pacer thread: {e}"))?;
    // Dropping this future (a cancelled run) stops the pacer.
    let _cancel = CancelOnDrop {
        sess: sess.clone(),
        thread: handle.thread().clone(),
    };
    done_rx
        .await
        .map_err(|_| "the ping pacer thread failed".to_string())?;

    // Results, in request order.
    let mut errors = std::mem::take(&mut *sess.errors.lock().unwrap_or_else(|e| e.into_inner()));
    errors.extend(notes);
    errors.sort_by_key(|e| e.0);
    let mut errors = errors.into_iter().peekable();
    let count_us = count as usize;
    let mut out = Vec::with_capacity(hosts.len());
    for (i, host) in hosts.into_iter().enumerate() {
        let t = &sess.targets[i];
        let addr = if unresolved[i] {
            String::new()
        } else {
            t.addr.to_string()
        };
        let mut r = PingResult::new(&host, &addr, size);
        if t.flags.load(Relaxed) & ACTIVE != 0 {
            r.rtts_ms = (0..count_us)
                .map(|k| sess.rtt_ns(i * count_us + k).map(|ns| ns as f64 / 1e6))
                .collect();
            r.duplicates = t.dups.load(Relaxed);
            r.reply_ttl = match t.reply_ttl.load(Relaxed) {
                0 => None,
                v => u8::try_from(v - 1).ok(),
            };
        }
        while let Some((_, e)) = errors.next_if(|e| e.0 as usize == i) {
            r.error.get_or_insert(e);
        }
        r.summarise();
        out.push(r);
    }
    Ok(PingOutput {
        socket: socket_kind.into(),
        src_addr,
        targets: out,
    })
}

/// One target's interval spread over all targets, capped.
pub fn default_rate(n_targets: usize, interval_ms: u64) -> f64 {
    if interval_ms == 0 {
        return DEFAULT_RATE_CAP;
    }
    (n_targets.max(1) as f64 * 1000.0 / interval_ms as f64).min(DEFAULT_RATE_CAP)
}

/// A run's registrations, removed on drop.
struct Registered {
    lanes: [Option<Lane>; 2],
    token: u32,
}

impl Drop for Registered {
    fn drop(&mut self) {
        for lane in self.lanes.iter().flatten() {
            lane.engine.inner.deregister(self.token);
        }
    }
}

struct CancelOnDrop {
    sess: Arc<Session>,
    thread: std::thread::Thread,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.sess.cancel.store(true, Relaxed);
        self.thread.unpark();
    }
}

/// The source address the kernel would pick towards `addr` (a UDP connect sends
/// nothing).
fn source_for(addr: IpAddr, scope: u32) -> Option<String> {
    let (bind, dst): (SocketAddr, SocketAddr) = match addr {
        IpAddr::V4(a) => ((std::net::Ipv4Addr::UNSPECIFIED, 0).into(), (a, 9).into()),
        IpAddr::V6(a) => (
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
            std::net::SocketAddrV6::new(a, 9, 0, scope).into(),
        ),
    };
    let s = UdpSocket::bind(bind).ok()?;
    s.connect(dst).ok()?;
    Some(s.local_addr().ok()?.ip().to_string())
}

/// Resolves every host, literals directly and names through the system resolver,
/// a bounded number at a time.
async fn resolve_all(hosts: &[String]) -> Vec<Result<SocketAddr, String>> {
    let mut out: Vec<Result<SocketAddr, String>> = Vec::with_capacity(hosts.len());
    let mut pending = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let bare = h.trim().trim_start_matches('[').trim_end_matches(']');
        match bare.parse::<IpAddr>() {
            Ok(ip) => out.push(Ok(SocketAddr::new(ip.to_canonical(), 0))),
            Err(_) => {
                out.push(Err(String::new()));
                pending.push(i);
            }
        }
    }
    let mut set = tokio::task::JoinSet::new();
    let mut next = 0;
    while next < pending.len() || !set.is_empty() {
        while next < pending.len() && set.len() < RESOLVE_CONCURRENCY {
            let i = pending[next];
            next += 1;
            let host = hosts[i].trim().to_string();
            set.spawn(async move { (i, resolve(&host).await) });
        }
        match set.join_next().await {
            Some(Ok((i, r))) => out[i] = r,
            // A lookup task that panicked leaves its entry empty, handled below.
            Some(Err(_)) => {}
            None => break,
        }
    }
    for r in out.iter_mut() {
        if matches!(r, Err(m) if m.is_empty()) {
            *r = Err("resolution failed".into());
        }
    }
    out
}

/// Checks every resolved address against the run's policy. A refused one becomes its
/// target's error (`policy_denied: …`), so no engine is opened for it and no probe
/// goes to it; returns the refused addresses, for the report.
fn permit_all(
    ctx: &Context,
    hosts: &[String],
    resolved: &mut [Result<SocketAddr, String>],
) -> Vec<Option<IpAddr>> {
    resolved
        .iter_mut()
        .zip(hosts)
        .map(|(r, host)| {
            let ip = r.as_ref().ok()?.ip();
            *r = Err(ctx.permit(host.trim(), ip).err()?);
            Some(ip)
        })
        .collect()
}

async fn resolve(host: &str) -> Result<SocketAddr, String> {
    if host.is_empty() {
        return Err("empty host name".into());
    }
    // An IPv4-mapped IPv6 address is pinged over IPv4.
    imn_resolver::lookup(host)
        .await?
        .first()
        .map(|ip| SocketAddr::new(ip.to_canonical(), 0))
        .ok_or_else(|| format!("{host:?} has no address"))
}

#[cfg(test)]
mod tests;
