//! Golden bytes of the wire protocol: every variant an agent or a backend can put on
//! the wire, as bytes, pinned.
//!
//! Postcard is not self-describing: a variant's number is its position in its enum,
//! and a struct is its fields in order. Reordering variants or fields, or inserting
//! one anywhere but at the end of an enum, still compiles and still round-trips, but
//! every record already written (the outbox of every agent in the field, a message in
//! flight) then decodes as something else or not at all. These files are the bytes
//! this protocol wrote, and each must keep decoding to the same value.
//!
//! Each file in `golden/` is one envelope:
//!
//! - `name`: its variant path (see [`envelope_paths`]), `v1/` first for the legacy
//!   encoding (wire version 1, [`wire::encode_for`]), and after a `+` what this sample
//!   shows beyond the variant (for the nested enums: RData types, HTTP phases, ...).
//! - `wire_version`: its first byte.
//! - `source`: how the value was made: captured from a real run (the MQTT traffic of
//!   a real agent, bridge and backend, measuring real peers), or made by hand where no
//!   run produces the variant.
//! - `hex`: the payload's bytes.
//! - `value`: the envelope as serde_json writes the Rust value (enums externally
//!   tagged): independent of postcard, so it says what the bytes mean.
//!
//! The test checks, for every file: the bytes decode, the decoded value written as
//! JSON is exactly the file (the other fields as they are), and encoding that value
//! again gives the same bytes. And coverage: every variant path of [`ALL_PATHS`] and
//! [`V1_PATHS`], and every variant of the nested enums ([`NESTED`]), has a sample.
//! The functions that name a value's variants match exhaustively, each arm taking
//! its name from a fixed-size array by index: a new variant does not compile until
//! it has an arm, the arm does not compile until the array has the name, and the
//! test fails until the path list has it and a golden file holds a sample of it.
//!
//! THE RULE: a golden file, once committed, is never regenerated, edited or deleted.
//! If it stops decoding to its value, the change broke the wire (or the stores):
//! undo it, or add a new wire version that reads the old bytes. A new variant
//! (appended last) gets new files; a new field means a new wire version (see the
//! module docs of `wire`) and new files for it, the old ones kept.
//!
//! How the files are made (the generator writes only files that do not exist yet):
//!
//! ```sh
//! cargo build --workspace --bins
//! cargo test -p imn-tests --test wire_compat -- --ignored --nocapture capture_wire_golden
//! ```
//!
//! It runs nats-server, imn-backend, imn-bridge and an imn-agent against dnsmasq,
//! `openssl s_server`, an NTP responder and HTTP/TCP/UDP peers on loopback and a chain
//! of network namespaces (so it needs root), taps every MQTT message between agent and
//! bridge, and writes the missing files here. The files committed first were made
//! with the build of commit 0cb083c, in a worktree of that commit (the header of
//! `tests/tests/wire_compat.rs` has the commands).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use imn_proto::kinds::dns::{DnsErrorKind, DnsProtocol, RData, ServerSource};
use imn_proto::kinds::http::{HttpMethod, HttpPhase};
use imn_proto::kinds::traceroute::TraceProtocol;
use imn_proto::results::{ModuleOutcome, ModuleOutput, TcpOutcome};
use imn_proto::wire::{
    self, CommandKind, Envelope, RecordBody, RequestState, LEGACY_WIRE_VERSION, WIRE_VERSION,
};
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------
// Variant names. Each array lists an enum's variants in declaration order; the
// functions below take every name from them by index, so a new variant needs a new
// arm, and the arm a new array slot, before anything compiles.

const ENVELOPE: [&str; 8] = [
    "Hello",
    "Heartbeat",
    "Batch",
    "Ack",
    "Command",
    "Status",
    "Update",
    "Chunk",
];
const UPDATE: [&str; 2] = ["Status", "Fetch"];
const RECORD: [&str; 5] = [
    "State",
    "Result",
    "Event",
    "TracedResult",
    "ScheduledResult",
];
const COMMAND: [&str; 9] = [
    "Run",
    "Cancel",
    "Load",
    "Unload",
    "Configure",
    "Schedules",
    "Update",
    "Settings",
    "LoadWasm",
];
const OUTCOME: [&str; 3] = ["Ok", "Failed", "Timeout"];
const OUTPUT: [&str; 12] = [
    "Echo",
    "Ping",
    "Tcping",
    "Faulty",
    "Heartbeat",
    "Traceroute",
    "Mtr",
    "Dns",
    "Http",
    "TlsCert",
    "Ntp",
    "Wasm",
];
const STATE: [&str; 9] = [
    "Pending",
    "Dispatched",
    "Received",
    "Running",
    "Succeeded",
    "Failed",
    "Timeout",
    "Expired",
    "Cancelled",
];

// Enums nested inside module results.
const TCP_OUTCOME: [&str; 5] = ["Open", "Refused", "Timeout", "Unreachable", "Error"];
const TRACE_PROTOCOL: [&str; 3] = ["Icmp", "Udp", "Tcp"];
const DNS_PROTOCOL: [&str; 2] = ["Udp", "Tcp"];
const SERVER_SOURCE: [&str; 2] = ["Params", "System"];
const DNS_ERROR: [&str; 3] = ["Timeout", "Network", "Malformed"];
const RDATA: [&str; 12] = [
    "A", "Aaaa", "Name", "Mx", "Soa", "Txt", "Srv", "Caa", "Svcb", "Ds", "Dnskey", "Other",
];
const HTTP_METHOD: [&str; 3] = ["Get", "Head", "Options"];
const HTTP_PHASE: [&str; 5] = ["Dns", "Connect", "Tls", "Response", "Body"];

/// Every variant path of the current wire version: each envelope, each record body
/// in a batch, each command, each outcome of each kind of result.
const ALL_PATHS: &[&str] = &[
    "Hello",
    "Heartbeat",
    "Batch/State/Pending",
    "Batch/State/Dispatched",
    "Batch/State/Received",
    "Batch/State/Running",
    "Batch/State/Succeeded",
    "Batch/State/Failed",
    "Batch/State/Timeout",
    "Batch/State/Expired",
    "Batch/State/Cancelled",
    "Batch/Result/Ok/Echo",
    "Batch/Result/Ok/Ping",
    "Batch/Result/Ok/Tcping",
    "Batch/Result/Ok/Faulty",
    "Batch/Result/Ok/Heartbeat",
    "Batch/Result/Ok/Traceroute",
    "Batch/Result/Ok/Mtr",
    "Batch/Result/Ok/Dns",
    "Batch/Result/Ok/Http",
    "Batch/Result/Ok/TlsCert",
    "Batch/Result/Ok/Ntp",
    "Batch/Result/Ok/Wasm",
    "Batch/Result/Failed",
    "Batch/Result/Timeout",
    "Batch/Event",
    "Batch/TracedResult/Ok/Echo",
    "Batch/TracedResult/Ok/Ping",
    "Batch/TracedResult/Ok/Tcping",
    "Batch/TracedResult/Ok/Faulty",
    "Batch/TracedResult/Ok/Heartbeat",
    "Batch/TracedResult/Ok/Traceroute",
    "Batch/TracedResult/Ok/Mtr",
    "Batch/TracedResult/Ok/Dns",
    "Batch/TracedResult/Ok/Http",
    "Batch/TracedResult/Ok/TlsCert",
    "Batch/TracedResult/Ok/Ntp",
    "Batch/TracedResult/Ok/Wasm",
    "Batch/TracedResult/Failed",
    "Batch/TracedResult/Timeout",
    "Batch/ScheduledResult/Ok/Echo",
    "Batch/ScheduledResult/Ok/Ping",
    "Batch/ScheduledResult/Ok/Tcping",
    "Batch/ScheduledResult/Ok/Faulty",
    "Batch/ScheduledResult/Ok/Heartbeat",
    "Batch/ScheduledResult/Ok/Traceroute",
    "Batch/ScheduledResult/Ok/Mtr",
    "Batch/ScheduledResult/Ok/Dns",
    "Batch/ScheduledResult/Ok/Http",
    "Batch/ScheduledResult/Ok/TlsCert",
    "Batch/ScheduledResult/Ok/Ntp",
    "Batch/ScheduledResult/Ok/Wasm",
    "Batch/ScheduledResult/Failed",
    "Batch/ScheduledResult/Timeout",
    "Ack",
    "Command/Run",
    "Command/Cancel",
    "Command/Load",
    "Command/Unload",
    "Command/Configure",
    "Command/Schedules",
    "Command/Update",
    "Command/Settings",
    "Command/LoadWasm",
    "Status",
    "Update/Status",
    "Update/Fetch",
    "Chunk",
];

/// The legacy encoding (wire version 1), which both ends still read and write for
/// peers not upgraded yet: the two envelopes it has its own types for (Hello and
/// Command, every kind), and one of each other envelope.
const V1_PATHS: &[&str] = &[
    "v1/Hello",
    "v1/Heartbeat",
    "v1/Batch/Result/Ok/Ping",
    "v1/Batch/State/Running",
    "v1/Ack",
    "v1/Command/Run",
    "v1/Command/Cancel",
    "v1/Command/Load",
    "v1/Command/Unload",
    "v1/Command/Configure",
    "v1/Command/Schedules",
    "v1/Status",
];

/// The variant paths of an envelope: one, or one per record of a batch.
fn envelope_paths(e: &Envelope) -> Vec<String> {
    match e {
        Envelope::Hello(_) => vec![ENVELOPE[0].to_string()],
        Envelope::Heartbeat(_) => vec![ENVELOPE[1].to_string()],
        Envelope::Batch(b) => b
            .records
            .iter()
            .map(|r| format!("{}/{}", ENVELOPE[2], record_path(&r.body)))
            .collect(),
        Envelope::Ack(_) => vec![ENVELOPE[3].to_string()],
        Envelope::Command(c) => vec![format!("{}/{}", ENVELOPE[4], command_name(&c.kind))],
        Envelope::Status(_) => vec![ENVELOPE[5].to_string()],
        Envelope::Update(u) => vec![format!(
            "{}/{}",
            ENVELOPE[6],
            match u {
                wire::UpdateUp::Status(_) => UPDATE[0],
                wire::UpdateUp::Fetch { .. } => UPDATE[1],
            }
        )],
        Envelope::Chunk(_) => vec![ENVELOPE[7].to_string()],
    }
}

fn record_path(b: &RecordBody) -> String {
    match b {
        RecordBody::State(s) => format!("{}/{}", RECORD[0], state_name(s.state)),
        RecordBody::Result(r) => format!("{}/{}", RECORD[1], outcome_path(&r.outcome)),
        RecordBody::Event(_) => RECORD[2].to_string(),
        RecordBody::TracedResult(r, _) => format!("{}/{}", RECORD[3], outcome_path(&r.outcome)),
        RecordBody::ScheduledResult(run) => {
            format!("{}/{}", RECORD[4], outcome_path(&run.result.outcome))
        }
    }
}

fn command_name(k: &CommandKind) -> &'static str {
    match k {
        CommandKind::Run { .. } => COMMAND[0],
        CommandKind::Cancel { .. } => COMMAND[1],
        CommandKind::Load { .. } => COMMAND[2],
        CommandKind::Unload { .. } => COMMAND[3],
        CommandKind::Configure { .. } => COMMAND[4],
        CommandKind::Schedules { .. } => COMMAND[5],
        CommandKind::Update { .. } => COMMAND[6],
        CommandKind::Settings { .. } => COMMAND[7],
        CommandKind::LoadWasm { .. } => COMMAND[8],
    }
}

fn outcome_path(o: &ModuleOutcome) -> String {
    match o {
        ModuleOutcome::Ok(out) => format!("{}/{}", OUTCOME[0], output_name(out)),
        ModuleOutcome::Failed(_) => OUTCOME[1].to_string(),
        ModuleOutcome::Timeout => OUTCOME[2].to_string(),
    }
}

fn output_name(o: &ModuleOutput) -> &'static str {
    match o {
        ModuleOutput::Echo(_) => OUTPUT[0],
        ModuleOutput::Ping(_) => OUTPUT[1],
        ModuleOutput::Tcping(_) => OUTPUT[2],
        ModuleOutput::Faulty(_) => OUTPUT[3],
        ModuleOutput::Heartbeat(_) => OUTPUT[4],
        ModuleOutput::Traceroute(_) => OUTPUT[5],
        ModuleOutput::Mtr(_) => OUTPUT[6],
        ModuleOutput::Dns(_) => OUTPUT[7],
        ModuleOutput::Http(_) => OUTPUT[8],
        ModuleOutput::TlsCert(_) => OUTPUT[9],
        ModuleOutput::Ntp(_) => OUTPUT[10],
        ModuleOutput::Wasm(_) => OUTPUT[11],
    }
}

fn state_name(s: RequestState) -> &'static str {
    match s {
        RequestState::Pending => STATE[0],
        RequestState::Dispatched => STATE[1],
        RequestState::Received => STATE[2],
        RequestState::Running => STATE[3],
        RequestState::Succeeded => STATE[4],
        RequestState::Failed => STATE[5],
        RequestState::Timeout => STATE[6],
        RequestState::Expired => STATE[7],
        RequestState::Cancelled => STATE[8],
    }
}

/// The variants of the enums nested in module results that a value holds, as
/// `Enum/Variant`.
fn nested_variants(e: &Envelope, seen: &mut BTreeSet<String>) {
    let Envelope::Batch(b) = e else { return };
    for r in &b.records {
        let Some(result) = r.body.as_result() else {
            continue;
        };
        let ModuleOutcome::Ok(out) = &result.outcome else {
            continue;
        };
        let mut add = |kind: &str, name: &str| {
            seen.insert(format!("{kind}/{name}"));
        };
        match out {
            ModuleOutput::Echo(_)
            | ModuleOutput::Ping(_)
            | ModuleOutput::Faulty(_)
            | ModuleOutput::Heartbeat(_)
            | ModuleOutput::Ntp(_)
            | ModuleOutput::Wasm(_) => {}
            ModuleOutput::Tcping(t) => {
                for a in &t.attempts {
                    add("TcpOutcome", tcp_outcome(a.outcome));
                }
            }
            ModuleOutput::Traceroute(t) => add("TraceProtocol", trace_protocol(t.protocol)),
            ModuleOutput::Mtr(m) => add("TraceProtocol", trace_protocol(m.protocol)),
            ModuleOutput::Dns(d) => {
                add("DnsProtocol", dns_protocol(d.protocol));
                add("ServerSource", server_source(d.server_source));
                if let Some(err) = &d.error {
                    add("DnsErrorKind", dns_error(err.kind));
                }
                if let Some(m) = d.message() {
                    for rr in m.answer.iter().chain(&m.authority).chain(&m.additional) {
                        add("RData", rdata(&rr.data));
                    }
                }
            }
            ModuleOutput::Http(h) => {
                add("HttpMethod", http_method(h.method));
                if let Some(p) = h.error_phase {
                    add("HttpPhase", http_phase(p));
                }
            }
            ModuleOutput::TlsCert(t) => {
                if let Some(p) = t.error_phase {
                    add("HttpPhase", http_phase(p));
                }
            }
        }
    }
}

fn tcp_outcome(o: TcpOutcome) -> &'static str {
    match o {
        TcpOutcome::Open => TCP_OUTCOME[0],
        TcpOutcome::Refused => TCP_OUTCOME[1],
        TcpOutcome::Timeout => TCP_OUTCOME[2],
        TcpOutcome::Unreachable => TCP_OUTCOME[3],
        TcpOutcome::Error => TCP_OUTCOME[4],
    }
}

fn trace_protocol(p: TraceProtocol) -> &'static str {
    match p {
        TraceProtocol::Icmp => TRACE_PROTOCOL[0],
        TraceProtocol::Udp => TRACE_PROTOCOL[1],
        TraceProtocol::Tcp => TRACE_PROTOCOL[2],
    }
}

fn dns_protocol(p: DnsProtocol) -> &'static str {
    match p {
        DnsProtocol::Udp => DNS_PROTOCOL[0],
        DnsProtocol::Tcp => DNS_PROTOCOL[1],
    }
}

fn server_source(s: ServerSource) -> &'static str {
    match s {
        ServerSource::Params => SERVER_SOURCE[0],
        ServerSource::System => SERVER_SOURCE[1],
    }
}

fn dns_error(k: DnsErrorKind) -> &'static str {
    match k {
        DnsErrorKind::Timeout => DNS_ERROR[0],
        DnsErrorKind::Network => DNS_ERROR[1],
        DnsErrorKind::Malformed => DNS_ERROR[2],
    }
}

fn rdata(d: &RData) -> &'static str {
    match d {
        RData::A { .. } => RDATA[0],
        RData::Aaaa { .. } => RDATA[1],
        RData::Name { .. } => RDATA[2],
        RData::Mx { .. } => RDATA[3],
        RData::Soa { .. } => RDATA[4],
        RData::Txt { .. } => RDATA[5],
        RData::Srv { .. } => RDATA[6],
        RData::Caa { .. } => RDATA[7],
        RData::Svcb(_) => RDATA[8],
        RData::Ds { .. } => RDATA[9],
        RData::Dnskey { .. } => RDATA[10],
        RData::Other => RDATA[11],
    }
}

fn http_method(m: HttpMethod) -> &'static str {
    match m {
        HttpMethod::Get => HTTP_METHOD[0],
        HttpMethod::Head => HTTP_METHOD[1],
        HttpMethod::Options => HTTP_METHOD[2],
    }
}

fn http_phase(p: HttpPhase) -> &'static str {
    match p {
        HttpPhase::Dns => HTTP_PHASE[0],
        HttpPhase::Connect => HTTP_PHASE[1],
        HttpPhase::Tls => HTTP_PHASE[2],
        HttpPhase::Response => HTTP_PHASE[3],
        HttpPhase::Body => HTTP_PHASE[4],
    }
}

/// Every nested variant, as `Enum/Variant`.
fn nested_all() -> BTreeSet<String> {
    let lists: [(&str, &[&str]); 8] = [
        ("TcpOutcome", &TCP_OUTCOME),
        ("TraceProtocol", &TRACE_PROTOCOL),
        ("DnsProtocol", &DNS_PROTOCOL),
        ("ServerSource", &SERVER_SOURCE),
        ("DnsErrorKind", &DNS_ERROR),
        ("RData", &RDATA),
        ("HttpMethod", &HTTP_METHOD),
        ("HttpPhase", &HTTP_PHASE),
    ];
    lists
        .iter()
        .flat_map(|(kind, names)| names.iter().map(move |n| format!("{kind}/{n}")))
        .collect()
}

// ---------------------------------------------------------------------------------
// The files.

/// A golden file as written: `serde_json::to_string_pretty` of this, and a newline.
#[derive(Serialize)]
struct Entry<'a> {
    name: &'a str,
    wire_version: u8,
    source: &'a str,
    hex: &'a str,
    value: &'a Envelope,
}

/// A golden file's fields but the value (which is checked as text, so that no JSON
/// number is ever parsed and compared approximately).
#[derive(Deserialize)]
struct Header {
    name: String,
    wire_version: u8,
    source: String,
    hex: String,
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn golden_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .expect("modules/tests/golden")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
}

fn from_hex(s: &str) -> Result<Vec<u8>, String> {
    if s.len() % 2 != 0 {
        return Err("odd number of hex digits".into());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| format!("at {i}: {e}")))
        .collect()
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The first lines where two texts differ, for the failure message.
fn first_difference(want: &str, got: &str) -> String {
    for (i, (w, g)) in want.lines().zip(got.lines()).enumerate() {
        if w != g {
            return format!("line {}:\n  committed: {w}\n  decoded:   {g}", i + 1);
        }
    }
    format!(
        "one is longer ({} lines committed, {} decoded)",
        want.lines().count(),
        got.lines().count()
    )
}

/// A checked golden file: its name and the paths and nested variants its value has.
struct Checked {
    name: String,
    nested: BTreeSet<String>,
}

fn check_file(path: &Path) -> Result<Checked, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let h: Header = serde_json::from_str(&text).map_err(|e| format!("not a golden file: {e}"))?;
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    if stem != h.name.replace('/', ".") {
        return Err(format!(
            "the file name must be the name with '/' as '.': {stem:?} vs {:?}",
            h.name
        ));
    }
    let bytes = from_hex(&h.hex).map_err(|e| format!("hex: {e}"))?;
    let (version, env) =
        wire::decode_versioned(&bytes).map_err(|e| format!("the bytes no longer decode: {e}"))?;
    if version != h.wire_version {
        return Err(format!(
            "decoded as wire version {version}, the file says {}",
            h.wire_version
        ));
    }
    // The value, as JSON, exactly as committed.
    let got = serde_json::to_string_pretty(&Entry {
        name: &h.name,
        wire_version: h.wire_version,
        source: &h.source,
        hex: &h.hex,
        value: &env,
    })
    .map_err(|e| e.to_string())?
        + "\n";
    if got != text {
        return Err(format!(
            "the bytes decode to another value than the committed one: {}",
            first_difference(&text, &got)
        ));
    }
    // And back to the same bytes.
    let again = wire::encode_for(version, &env);
    if again != bytes {
        return Err(format!(
            "the value encodes to other bytes:\n  committed: {}\n  now:       {}",
            h.hex,
            to_hex(&again)
        ));
    }
    // The name is the value's variant path.
    let paths = envelope_paths(&env);
    let prefix = if version == LEGACY_WIRE_VERSION {
        "v1/"
    } else {
        ""
    };
    let base = h.name.split('+').next().unwrap_or_default();
    if paths.len() != 1 || format!("{prefix}{}", paths[0]) != base {
        return Err(format!(
            "the name {:?} is not the value's variant path ({prefix}{paths:?}); a golden file holds one variant",
            h.name
        ));
    }
    let mut nested = BTreeSet::new();
    if version == WIRE_VERSION {
        nested_variants(&env, &mut nested);
    }
    Ok(Checked {
        name: base.to_string(),
        nested,
    })
}

#[test]
fn golden_bytes_decode_to_their_values_and_encode_back() {
    let files = golden_files();
    assert!(!files.is_empty(), "no golden files");
    let mut failures = Vec::new();
    for f in &files {
        if let Err(e) = check_file(f) {
            failures.push(format!(
                "{}: {e}",
                f.file_name().unwrap_or_default().to_string_lossy()
            ));
        }
    }
    println!(
        "{} golden files checked, {} failed",
        files.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "golden wire bytes broken (never regenerate them: see this file's header):\n{}",
        failures.join("\n")
    );
}

#[test]
fn every_variant_has_a_golden_sample() {
    let mut by_path: BTreeMap<String, usize> = BTreeMap::new();
    let mut nested = BTreeSet::new();
    for f in golden_files() {
        // A broken file is the other test's failure; here it counts for nothing.
        if let Ok(c) = check_file(&f) {
            *by_path.entry(c.name).or_default() += 1;
            nested.extend(c.nested);
        }
    }
    let known: BTreeSet<&str> = ALL_PATHS.iter().chain(V1_PATHS).copied().collect();
    let unknown: Vec<&String> = by_path
        .keys()
        .filter(|p| !known.contains(p.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "golden files whose variant path is in neither ALL_PATHS nor V1_PATHS: {unknown:?}"
    );
    let missing: Vec<&&str> = known
        .iter()
        .filter(|p| !by_path.contains_key(**p))
        .collect();
    let nested_missing: Vec<String> = nested_all().difference(&nested).cloned().collect();
    println!(
        "{} variant paths, each with a golden sample ({} samples); {} nested variants seen",
        known.len(),
        by_path.values().sum::<usize>(),
        nested.len()
    );
    assert!(
        missing.is_empty(),
        "variants without a golden sample (add one: see this file's header): {missing:?}"
    );
    assert!(
        nested_missing.is_empty(),
        "nested variants without a golden sample: {nested_missing:?}"
    );
}

/// [`ALL_PATHS`] is exactly every combination the variant arrays make, so a name
/// added to an array must be added to the list (and then get a sample).
#[test]
fn the_path_list_names_every_variant() {
    let outcomes: Vec<String> = OUTPUT
        .iter()
        .map(|o| format!("{}/{o}", OUTCOME[0]))
        .chain(OUTCOME[1..].iter().map(|o| o.to_string()))
        .collect();
    let mut want = BTreeSet::new();
    for (i, e) in ENVELOPE.iter().enumerate() {
        match i {
            2 => {
                for (j, r) in RECORD.iter().enumerate() {
                    match j {
                        0 => want.extend(STATE.iter().map(|s| format!("{e}/{r}/{s}"))),
                        2 => {
                            want.insert(format!("{e}/{r}"));
                        }
                        _ => want.extend(outcomes.iter().map(|o| format!("{e}/{r}/{o}"))),
                    }
                }
            }
            4 => want.extend(COMMAND.iter().map(|c| format!("{e}/{c}"))),
            6 => want.extend(UPDATE.iter().map(|u| format!("{e}/{u}"))),
            _ => {
                want.insert(e.to_string());
            }
        }
    }
    let have: BTreeSet<String> = ALL_PATHS.iter().map(|s| s.to_string()).collect();
    assert_eq!(have.len(), ALL_PATHS.len(), "ALL_PATHS has a name twice");
    let extra: Vec<&String> = have.difference(&want).collect();
    let absent: Vec<&String> = want.difference(&have).collect();
    assert!(
        extra.is_empty() && absent.is_empty(),
        "ALL_PATHS is out of step with the variant arrays: not variants {extra:?}, missing {absent:?}"
    );
    for p in V1_PATHS {
        let rest = p.strip_prefix("v1/").expect("v1/ first");
        assert!(want.contains(rest), "{p} is not a variant path");
    }
}
