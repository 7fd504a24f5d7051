//! The runtime against small hand-written modules: each limit ends a run with its
//! name, the policy is applied to every address, and a good module's result comes
//! back. Real sockets on loopback.

use std::sync::Arc;
use std::time::{Duration, Instant};

use imn_proto::policy::{Cidr, Rule, TargetPolicy};
use imn_proto::results::ModuleOutput;
use imn_proto::wasm::{Limits, Manifest, Source};
use serde_json::json;

use super::{run, Module};
use crate::Context;

fn manifest(limits: Limits) -> Manifest {
    Manifest {
        source: Source {
            name: "t_mod".into(),
            version: "1.0.0".into(),
            description: String::new(),
            timeout_ms: 5000,
            params_schema: json!({"type": "object"}),
            result_schema: json!({"type": "object"}),
            targets: vec![],
            limits,
        },
        abi: 1,
        size: 8,
        sha256: "0".repeat(64),
        signed_ms: 0,
        key: "0".repeat(64),
    }
}

fn module(wat: &str, limits: Limits) -> Arc<Module> {
    let wasm = wat::parse_str(wat).expect("valid text");
    Arc::new(Module::compile(manifest(limits), &wasm).expect("compiles"))
}

async fn go(wat: &str, limits: Limits, ctx: &Context) -> Result<serde_json::Value, String> {
    match run(module(wat, limits), "{\"x\":1}", ctx).await? {
        ModuleOutput::Wasm(w) => Ok(w.value()),
        other => panic!("not a wasm output: {other:?}"),
    }
}

/// Imports of every test module, and `(data)` at 1024 for its strings.
const IMPORTS: &str = r#"
  (import "imn" "params" (func $params (param i32 i32) (result i32)))
  (import "imn" "result" (func $result (param i32 i32) (result i32)))
  (import "imn" "log" (func $log (param i32 i32 i32) (result i32)))
  (import "imn" "tcp_connect" (func $tcp (param i32 i32 i32 i32) (result i32)))
  (import "imn" "udp_open" (func $udp (param i32 i32 i32) (result i32)))
  (import "imn" "send" (func $send (param i32 i32 i32) (result i32)))
  (import "imn" "recv" (func $recv (param i32 i32 i32 i32) (result i32)))
  (import "imn" "last_error" (func $last_error (param i32 i32) (result i32)))
  (memory (export "memory") 1)
"#;

fn wat(body: &str, data: &str) -> String {
    format!(
        "(module {IMPORTS} (data (i32.const 1024) \"{data}\") (func (export \"run\") (result i32) {body}))"
    )
}

#[tokio::test]
async fn a_result_comes_back_with_the_params_it_read() {
    // Copies its params into memory at 0 and emits {"got":PARAMS}.
    let data = r#"{\"got\":"#;
    let body = r#"
      (local $n i32)
      (local.set $n (call $params (i32.const 8) (i32.const 512)))
      (memory.copy (i32.const 0) (i32.const 1024) (i32.const 7))
      (i32.store8 (i32.add (i32.const 8) (local.get $n)) (i32.const 125))
      (drop (call $result (i32.const 0) (i32.add (local.get $n) (i32.const 9))))
      (i32.const 0)"#;
    // memory.copy from 1024 to 0 copies `{"got":` (7 bytes); byte 7 stays 0: fill it.
    let body = body.replace(
        "(memory.copy (i32.const 0) (i32.const 1024) (i32.const 7))",
        "(memory.copy (i32.const 0) (i32.const 1024) (i32.const 7)) (i32.store8 (i32.const 7) (i32.const 32))",
    );
    let out = go(&wat(&body, data), Limits::default(), &Context::default())
        .await
        .unwrap();
    assert_eq!(out, json!({"got": {"x": 1}}));
}

#[tokio::test]
async fn an_endless_loop_ends_on_fuel_or_deadline_named() {
    let looping = wat("(loop $l (br $l)) (i32.const 0)", "");
    let small = Limits {
        fuel: 20_000_000,
        ..Limits::default()
    };
    let err = go(&looping, small, &Context::default()).await.unwrap_err();
    assert!(err.starts_with("limit fuel:"), "{err}");

    let ctx = Context {
        deadline: Some(Instant::now() + Duration::from_millis(300)),
        ..Context::default()
    };
    let big = Limits {
        fuel: Limits::MAX.fuel,
        ..Limits::default()
    };
    let t = Instant::now();
    let err = go(&looping, big, &ctx).await.unwrap_err();
    assert!(err.starts_with("limit deadline:"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[tokio::test]
async fn a_gigabyte_is_refused_and_named() {
    let grow = wat(
        "(if (i32.eq (memory.grow (i32.const 16384)) (i32.const -1)) (then unreachable)) (i32.const 0)",
        "",
    );
    let err = go(&grow, Limits::default(), &Context::default())
        .await
        .unwrap_err();
    assert!(err.starts_with("limit memory_pages:"), "{err}");
    assert!(err.contains("16385 pages"), "{err}");
    // A module whose initial memory is over the limit never starts.
    let big = "(module (memory (export \"memory\") 64) (func (export \"run\") (result i32) (i32.const 0)))";
    let err = go(
        big,
        Limits {
            memory_pages: 16,
            ..Limits::default()
        },
        &Context::default(),
    )
    .await
    .unwrap_err();
    assert!(err.starts_with("limit memory_pages:"), "{err}");
}

#[tokio::test]
async fn denied_addresses_are_refused_before_a_packet() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let policy = TargetPolicy {
        rules: vec![Rule {
            name: "test".into(),
            allow: vec![],
            deny: vec![Cidr::parse("127.0.0.1/32").unwrap()],
        }],
        builtin: false,
    };
    let ctx = Context {
        policy: Arc::new(policy),
        ..Context::default()
    };
    // Connect; a negative code is returned as the run's exit code (negated).
    let body = format!(
        "(local $h i32) (local.set $h (call $tcp (i32.const 1024) (i32.const 9) (i32.const {port}) (i32.const 1000)))
         (if (i32.lt_s (local.get $h) (i32.const 0)) (then (return (i32.sub (i32.const 0) (local.get $h)))))
         (i32.const 0)"
    );
    let err = go(&wat(&body, "127.0.0.1"), Limits::default(), &ctx)
        .await
        .unwrap_err();
    assert!(err.starts_with("the module returned 1"), "{err}");
    assert!(err.contains("policy_denied: test.deny"), "{err}");
    listener.set_nonblocking(true).unwrap();
    assert!(
        listener.accept().is_err(),
        "a connection reached the listener"
    );
    // Open, the same module connects (and returns 0 with no result: named).
    let err = go(
        &wat(&body, "127.0.0.1"),
        Limits::default(),
        &Context::default(),
    )
    .await
    .unwrap_err();
    assert!(err.contains("without a result"), "{err}");
}

#[tokio::test]
async fn a_flood_stops_at_the_bytes_limit() {
    let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = sink.local_addr().unwrap().port();
    let body = format!(
        "(local $h i32) (local.set $h (call $udp (i32.const 1024) (i32.const 9) (i32.const {port})))
         (loop $l (drop (call $send (local.get $h) (i32.const 0) (i32.const 1400))) (br $l))
         (i32.const 0)"
    );
    let limits = Limits {
        bytes_sent: 14_000,
        packets_sent: 1000,
        ..Limits::default()
    };
    let err = go(&wat(&body, "127.0.0.1"), limits, &Context::default())
        .await
        .unwrap_err();
    assert!(err.starts_with("limit bytes_sent:"), "{err}");
    sink.set_nonblocking(true).unwrap();
    let mut got = 0;
    let mut buf = [0u8; 2000];
    while sink.recv(&mut buf).is_ok() {
        got += 1;
    }
    assert_eq!(got, 10, "exactly the 10 datagrams within the limit arrived");
    // Packets are counted too, and sockets.
    let limits = Limits {
        packets_sent: 3,
        ..Limits::default()
    };
    let err = go(&wat(&body, "127.0.0.1"), limits, &Context::default())
        .await
        .unwrap_err();
    assert!(err.starts_with("limit packets_sent:"), "{err}");
    let many = format!(
        "(loop $l (drop (call $udp (i32.const 1024) (i32.const 9) (i32.const {port}))) (br $l)) (i32.const 0)"
    );
    let err = go(
        &wat(&many, "127.0.0.1"),
        Limits::default(),
        &Context::default(),
    )
    .await
    .unwrap_err();
    assert!(err.starts_with("limit sockets:"), "{err}");
}

#[tokio::test]
async fn a_trap_mid_run_is_named_with_the_last_log() {
    let body = "(drop (call $log (i32.const 1) (i32.const 1024) (i32.const 11)))
        (drop (i32.div_u (i32.const 1) (i32.const 0))) (i32.const 0)";
    let err = go(
        &wat(body, "before trap"),
        Limits::default(),
        &Context::default(),
    )
    .await
    .unwrap_err();
    assert!(err.starts_with("trap:"), "{err}");
    assert!(err.contains("integer divide by zero"), "{err}");
    assert!(err.contains("last log: before trap"), "{err}");
}

#[test]
fn modules_are_checked_when_compiled() {
    let m = |w: &str| Module::compile(manifest(Limits::default()), &wat::parse_str(w).unwrap());
    let err = m(r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32))) (memory (export "memory") 1) (func (export "run") (result i32) (i32.const 0)))"#).unwrap_err();
    assert!(err.contains("wasi_snapshot_preview1.fd_write"), "{err}");
    let err = m(r#"(module (memory (export "memory") 1) (func (export "main") (result i32) (i32.const 0)))"#).unwrap_err();
    assert!(err.contains("`run`"), "{err}");
    let err = m(r#"(module (func (export "run") (result i32) (i32.const 0)))"#).unwrap_err();
    assert!(err.contains("memory"), "{err}");
    assert!(Module::compile(manifest(Limits::default()), b"\0asm garbage").is_err());
}

/// A module that calls `ping` with the parameters at 1024 (`len` bytes) and returns
/// the error code negated, or emits the result.
fn pinger(params: &str) -> String {
    let escaped = params.replace('"', "\\\"");
    format!(
        r#"(module
          (import "imn" "ping" (func $ping (param i32 i32 i32 i32) (result i32)))
          (import "imn" "result" (func $result (param i32 i32) (result i32)))
          (memory (export "memory") 2)
          (data (i32.const 1024) "{escaped}")
          (func (export "run") (result i32)
            (local $n i32)
            (local.set $n (call $ping (i32.const 1024) (i32.const {len}) (i32.const 4096) (i32.const 60000)))
            (if (i32.lt_s (local.get $n) (i32.const 0)) (then (return (i32.sub (i32.const 0) (local.get $n)))))
            (drop (call $result (i32.const 4096) (local.get $n)))
            (i32.const 0)))"#,
        len = params.len()
    )
}

#[tokio::test]
async fn ping_packets_count_as_the_engine_would_send_them() {
    // `count` absent is the engine's default, 4: over a limit of 3.
    let limits = Limits {
        packets_sent: 3,
        ..Limits::default()
    };
    let err = go(
        &pinger(r#"{"host":"127.0.0.1"}"#),
        limits,
        &Context::default(),
    )
    .await
    .unwrap_err();
    assert!(err.starts_with("limit packets_sent:"), "{err}");
    // `host` with an empty `targets` (the engine pings `host`) is refused outright.
    let err = go(
        &pinger(r#"{"host":"127.0.0.1","targets":[],"count":100}"#),
        Limits::default(),
        &Context::default(),
    )
    .await
    .unwrap_err();
    assert!(err.contains("give host or targets, not both"), "{err}");
    // Bytes: 10 × (1400 + 28) over 10,000.
    let limits = Limits {
        bytes_sent: 10_000,
        ..Limits::default()
    };
    let err = go(
        &pinger(r#"{"targets":["127.0.0.1"],"count":10,"size":1400}"#),
        limits,
        &Context::default(),
    )
    .await
    .unwrap_err();
    assert!(err.starts_with("limit bytes_sent:"), "{err}");
}

#[tokio::test]
async fn a_loop_of_cheap_calls_meets_its_deadline() {
    let spin = "(loop $l (drop (call $clock) ) (br $l)) (i32.const 0)";
    let w = format!(
        "(module (import \"imn\" \"clock_mono_ns\" (func $clock (result i64))) (memory (export \"memory\") 1) (func (export \"run\") (result i32) {spin}))"
    );
    let ctx = Context {
        deadline: Some(Instant::now() + Duration::from_millis(300)),
        ..Context::default()
    };
    let t = Instant::now();
    let err = go(
        &w,
        Limits {
            fuel: Limits::MAX.fuel,
            ..Limits::default()
        },
        &ctx,
    )
    .await
    .unwrap_err();
    assert!(err.starts_with("limit deadline:"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[tokio::test]
async fn a_cancelled_run_lets_go_of_its_thread_and_sockets() {
    let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = sink.local_addr().unwrap().port();
    // udp_open, then wait to receive for as long as the run may.
    let body = format!(
        "(local $h i32) (local.set $h (call $udp (i32.const 1024) (i32.const 9) (i32.const {port})))
         (drop (call $recv (local.get $h) (i32.const 0) (i32.const 512) (i32.const 2147483647)))
         (i32.const 0)"
    );
    let m = module(&wat(&body, "127.0.0.1"), Limits::default());
    let ctx = Context {
        deadline: Some(Instant::now() + Duration::from_secs(60)),
        ..Context::default()
    };
    let r = tokio::time::timeout(Duration::from_millis(300), run(m.clone(), "{}", &ctx)).await;
    assert!(r.is_err(), "the run was still waiting");
    // Dropping the run's future (what the supervisor does at a timeout or a cancel)
    // ends the blocking thread within a slice: it drops its hold on the module.
    let t = Instant::now();
    while Arc::strong_count(&m) > 1 {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "the run's thread is still going"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn unspecified_addresses_and_lookups_are_not_free() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let connect = |host: &str| {
        let body = format!(
            "(local $h i32) (local.set $h (call $tcp (i32.const 1024) (i32.const {}) (i32.const {port}) (i32.const 1000)))
             (if (i32.lt_s (local.get $h) (i32.const 0)) (then (return (i32.sub (i32.const 0) (local.get $h)))))
             (i32.const 0)",
            host.len()
        );
        wat(&body, host)
    };
    // 0.0.0.0 would reach the device itself: refused whatever the policy.
    let err = go(&connect("0.0.0.0"), Limits::default(), &Context::default())
        .await
        .unwrap_err();
    assert!(err.starts_with("the module returned 1"), "{err}");
    assert!(err.contains("unspecified address"), "{err}");
    listener.set_nonblocking(true).unwrap();
    assert!(
        listener.accept().is_err(),
        "a connection reached the listener"
    );
    // A name's lookup counts as packets (two queries): one packet is not enough.
    let err = go(
        &connect("localhost"),
        Limits {
            packets_sent: 1,
            ..Limits::default()
        },
        &Context::default(),
    )
    .await
    .unwrap_err();
    assert!(err.starts_with("limit packets_sent:"), "{err}");
}
