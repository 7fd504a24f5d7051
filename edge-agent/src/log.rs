//! The agent's log: one line per event on stderr, in the format tracing-subscriber's
//! default formatter wrote (`2026-12-06T03:51:25.123456Z  INFO imn_agent::agent:
//! message key=value`), with `RUST_LOG` read as `LEVEL` or `target=LEVEL,...` (the
//! longest matching target wins; without a bare `LEVEL`, other targets are off).
//! It replaced tracing-subscriber, which the agent used for nothing else (about 25 KiB
//! of firmware). The agent records no spans, so spans are accepted and ignored.

use std::fmt::Write as _;
use std::io::Write as _;

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// Most `target=LEVEL` directives `RUST_LOG` may hold.
const MAX_DIRECTIVES: usize = 64;

/// Which events are logged: a level per target prefix, and one for the rest.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    default: LevelFilter,
    targets: Vec<(String, LevelFilter)>,
}

fn level(s: &str) -> Option<LevelFilter> {
    Some(match s.trim().to_ascii_lowercase().as_str() {
        "trace" => LevelFilter::TRACE,
        "debug" => LevelFilter::DEBUG,
        "info" => LevelFilter::INFO,
        "warn" => LevelFilter::WARN,
        "error" => LevelFilter::ERROR,
        "off" => LevelFilter::OFF,
        _ => return None,
    })
}

impl Filter {
    /// Parses `RUST_LOG`: `LEVEL`, `target=LEVEL` and `target` (all levels) separated
    /// by commas. `None` for anything else.
    pub fn parse(spec: &str) -> Option<Filter> {
        let mut f = Filter {
            default: LevelFilter::OFF,
            targets: Vec::new(),
        };
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some((target, lvl)) => {
                    let target = target.trim();
                    if target.is_empty() || f.targets.len() == MAX_DIRECTIVES {
                        return None;
                    }
                    f.targets.push((target.to_string(), level(lvl)?));
                }
                None => match level(part) {
                    Some(l) => f.default = l,
                    None if f.targets.len() < MAX_DIRECTIVES => {
                        f.targets.push((part.to_string(), LevelFilter::TRACE))
                    }
                    None => return None,
                },
            }
        }
        Some(f)
    }

    /// The level for a target: its longest matching prefix's, or the default.
    pub fn level_for(&self, target: &str) -> LevelFilter {
        self.targets
            .iter()
            .filter(|(t, _)| target.starts_with(t.as_str()))
            .max_by_key(|(t, _)| t.len())
            .map_or(self.default, |(_, l)| *l)
    }

    fn max(&self) -> LevelFilter {
        self.targets
            .iter()
            .map(|(_, l)| *l)
            .fold(self.default, LevelFilter::max)
    }
}

/// Where lines go: stderr, or a test's buffer.
type Sink = Box<dyn Fn(&str) + Send + Sync>;

pub struct Log {
    filter: Filter,
    sink: Sink,
}

impl Log {
    pub fn new(filter: Filter, sink: Sink) -> Log {
        Log { filter, sink }
    }

    /// Installs the log on stderr, with `RUST_LOG` or else `info`.
    pub fn install() {
        let filter = std::env::var("RUST_LOG")
            .ok()
            .and_then(|v| Filter::parse(&v))
            .unwrap_or(Filter {
                default: LevelFilter::INFO,
                targets: Vec::new(),
            });
        let sink: Sink = Box::new(|line| {
            // One write per line: lines from threads do not interleave.
            let _ = std::io::stderr().write_all(line.as_bytes());
        });
        let _ = tracing::subscriber::set_global_default(Log::new(filter, sink));
    }
}

/// Writes fields as tracing-subscriber did: the message as it is, others `key=value`
/// (strings quoted, `%` values by Display, `?` values by Debug).
struct Fields<'a>(&'a mut String);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if !self.0.ends_with(": ") {
            self.0.push(' ');
        }
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, "{}={value:?}", field.name());
        }
    }
}

/// `2026-12-06T03:51:25.123456Z`, from the system clock.
fn timestamp(out: &mut String) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (year, month, day) = imn_probes::calendar::civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        now.subsec_micros()
    );
}

impl Subscriber for Log {
    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        self.filter.level_for(meta.target()) >= *meta.level()
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.filter.max())
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let meta = event.metadata();
        let mut line = String::with_capacity(160);
        timestamp(&mut line);
        let _ = write!(line, " {:>5} {}: ", meta.level().as_str(), meta.target());
        event.record(&mut Fields(&mut line));
        line.push('\n');
        (self.sink)(&line);
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn rust_log_is_read_like_targets() {
        let f = Filter::parse("warn,imn_agent=debug,imn_agent::sync=trace,rumqttc").unwrap();
        assert_eq!(f.level_for("imn_agent::agent"), LevelFilter::DEBUG);
        assert_eq!(f.level_for("imn_agent::sync"), LevelFilter::TRACE);
        assert_eq!(f.level_for("rumqttc::state"), LevelFilter::TRACE);
        assert_eq!(f.level_for("sled"), LevelFilter::WARN);
        assert_eq!(f.max(), LevelFilter::TRACE);
        // Without a bare level, other targets are off.
        let only = Filter::parse("imn_agent=info").unwrap();
        assert_eq!(only.level_for("sled::tree"), LevelFilter::OFF);
        assert_eq!(Filter::parse("INFO").unwrap().default, LevelFilter::INFO);
        assert!(Filter::parse("imn_agent=loud").is_none());
        assert!(Filter::parse("=debug").is_none());
        let many = (0..100).map(|i| format!("t{i}=info")).collect::<Vec<_>>();
        assert!(Filter::parse(&many.join(",")).is_none());
    }

    /// Lines look as tracing-subscriber's did: tests and operators grep them for
    /// `target: message` and `key=value`.
    #[test]
    fn lines_are_formatted_as_before() {
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let sink = lines.clone();
        let log = Log::new(
            Filter::parse("info,noisy=off").unwrap(),
            Box::new(move |l| sink.lock().unwrap().push(l.to_string())),
        );
        tracing::subscriber::with_default(log, || {
            let id = "edge-1";
            tracing::info!(agent = %id, depth = 500u64, ok = true, name = "x y", "connected");
            tracing::warn!(skew_ms = -42i64, err = ?Some(1), "command refused");
            tracing::debug!("not shown");
            tracing::error!(target: "noisy", "not shown");
        });
        let lines = lines.lock().unwrap();
        assert_eq!(lines.len(), 2, "{lines:?}");
        let (ts, rest) = lines[0].split_once(' ').unwrap();
        assert_eq!(ts.len(), 27, "{ts}");
        assert!(ts.starts_with("20") && ts.ends_with('Z') && ts.as_bytes()[10] == b'T');
        assert_eq!(
            rest,
            " INFO imn_agent::log::tests: connected agent=edge-1 depth=500 ok=true name=\"x y\"\n"
        );
        assert!(
            lines[1].ends_with(
                " WARN imn_agent::log::tests: command refused skew_ms=-42 err=Some(1)\n"
            ),
            "{}",
            lines[1]
        );
    }

    #[test]
    fn timestamps_have_the_format() {
        let mut s = String::new();
        timestamp(&mut s);
        assert_eq!(s.len(), 27, "{s}");
        let b = s.as_bytes();
        assert_eq!(
            (b[4], b[7], b[10], b[13], b[16], b[19], b[26]),
            (b'-', b'-', b'T', b':', b':', b'.', b'Z'),
            "{s}"
        );
    }
}
