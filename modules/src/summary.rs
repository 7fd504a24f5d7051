//! One line per result, for people: what the CLI prints and the API returns as a
//! result's `summary`.

use crate::results::ModuleOutcome;

/// A module's result as one line. Each module's result type implements it beside its
/// other code (`kinds/<module>.rs`); [`crate::results::ModuleOutput::summary`]
/// dispatches to it. The CLI prints it and the API returns it as a result's `summary`,
/// which the dashboard shows.
pub trait Summary {
    fn summary(&self) -> String;
}

/// The longest summary, in characters: a line, whatever an agent put in its result.
pub const SUMMARY_MAX_CHARS: usize = 300;

/// `s` as one line for people: control characters (newlines, terminal escapes, which
/// come from agents' results) become spaces, and it is cut to [`SUMMARY_MAX_CHARS`].
pub fn tidy(s: String) -> String {
    let s = if s.chars().any(char::is_control) {
        s.chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect()
    } else {
        s
    };
    cap(s, SUMMARY_MAX_CHARS)
}

/// `s` cut to at most `max` characters, ending in `…` when cut.
pub(crate) fn cap(s: String, max: usize) -> String {
    if s.chars().count() <= max {
        return s;
    }
    let mut out: String = s.chars().take(max).collect();
    out.push('…');
    out
}

/// Milliseconds to three decimals, or `-` when there is no figure.
pub(crate) fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |x| format!("{x:.3}"))
}

impl ModuleOutcome {
    /// The result as one line: the module's summary, or why it failed.
    pub fn summary(&self) -> String {
        match self {
            ModuleOutcome::Ok(out) => out.summary(),
            ModuleOutcome::Failed(e) => tidy(format!("failed: {e}")),
            ModuleOutcome::Timeout => "timeout".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{EchoResult, ModuleOutput, PingOutput, PingResult};

    /// Whatever an agent put in its result, a summary is one line of bounded length.
    #[test]
    fn summaries_are_one_bounded_line() {
        let echo = ModuleOutput::Echo(EchoResult {
            message: "a\nb\u{1b}[31mc".into(),
        });
        assert_eq!(echo.summary(), "a b [31mc");
        let long = ModuleOutput::Echo(EchoResult {
            message: "é".repeat(4000),
        });
        let line = long.summary();
        assert_eq!(line.chars().count(), SUMMARY_MAX_CHARS + 1);
        assert!(line.ends_with('…'));
        let failed = ModuleOutcome::Failed("x\r\ny".into());
        assert_eq!(failed.summary(), "failed: x  y");
        let targets = (0..20_000)
            .map(|i| {
                let mut t = PingResult::new("h", &format!("10.0.{}.{}", i / 256, i % 256), 56);
                t.rtts_ms = vec![Some(1.0)];
                t.summarise();
                t
            })
            .collect();
        let ping = ModuleOutput::Ping(PingOutput {
            socket: "raw".into(),
            src_addr: None,
            targets,
        });
        let line = ping.summary();
        assert!(line.chars().count() <= SUMMARY_MAX_CHARS + 1, "{line}");
        assert!(line.starts_with("10.0.0.0 1/1 received"), "{line}");
    }
}
