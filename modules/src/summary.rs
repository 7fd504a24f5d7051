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
            ModuleOutcome::Failed(e) => format!("failed: {e}"),
            ModuleOutcome::Timeout => "timeout".to_string(),
        }
    }
}
