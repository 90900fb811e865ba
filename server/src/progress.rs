//! A progress line on standard error. On a terminal it rewrites itself in place. In a log
//! (standard error redirected to a file or a pipe) carriage returns would pile every update
//! onto one line thousands of characters long, so there it writes a line of its own at most
//! every ten seconds, and always the last.

use std::fmt::Display;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a log gets a progress line.
const LOG_EVERY: Duration = Duration::from_secs(10);

pub struct Progress {
    prefix: String,
    terminal: bool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// What the work reached last.
    latest: Option<String>,
    /// When a log last got a line, and what it said.
    logged: Option<(Instant, String)>,
}

impl Progress {
    /// Lines read `{prefix}{text}`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self::to(prefix, std::io::stderr().is_terminal())
    }

    fn to(prefix: impl Into<String>, terminal: bool) -> Self {
        Self { prefix: prefix.into(), terminal, state: Mutex::default() }
    }

    /// The work has reached `text`.
    pub fn update(&self, text: impl Display) {
        write(self.render(Some(text.to_string()), Instant::now()));
    }

    /// The work has ended where it last reached: the line is completed (once).
    pub fn done(&self) {
        write(self.render(None, Instant::now()));
    }

    /// What to write for an update to `text`, or (with `None`) for the end.
    fn render(&self, text: Option<String>, now: Instant) -> Option<String> {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let last = text.is_none();
        if let Some(text) = text {
            state.latest = Some(text);
        }
        // The end takes the line, so that ending twice (by `done` and on drop) writes it once.
        let latest = if last { state.latest.take()? } else { state.latest.clone()? };
        if self.terminal {
            // Padding wipes what a longer earlier line left behind.
            let end = if last { "\n" } else { "" };
            return Some(format!("\r{}{latest:<60}{end}", self.prefix));
        }
        let due = match &state.logged {
            None => true,
            Some((_, said)) if last => *said != latest,
            Some((at, _)) => now.duration_since(*at) >= LOG_EVERY,
        };
        if !due {
            return None;
        }
        let line = format!("{}{latest}\n", self.prefix);
        state.logged = Some((now, latest));
        Some(line)
    }
}

/// Dropped, the line is completed: an early return or an error message after it starts on a
/// line of its own.
impl Drop for Progress {
    fn drop(&mut self) {
        self.done();
    }
}

/// Progress is never worth failing for: a closed stderr loses only the progress.
fn write(line: Option<String>) {
    if let Some(line) = line {
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::Progress;

    fn says(s: &str) -> Option<String> {
        Some(s.to_string())
    }

    #[test]
    fn a_terminal_sees_one_line_rewritten() {
        let p = Progress::to("replaying: ", true);
        let now = Instant::now();
        assert_eq!(p.render(says("1 of 9 events"), now), Some(format!("\rreplaying: {:<60}", "1 of 9 events")));
        assert_eq!(p.render(says("9 of 9 events"), now), Some(format!("\rreplaying: {:<60}", "9 of 9 events")));
        assert_eq!(p.render(None, now), Some(format!("\rreplaying: {:<60}\n", "9 of 9 events")));
        assert_eq!(p.render(None, now), None, "ended once only");
    }

    #[test]
    fn a_log_gets_a_line_every_ten_seconds_and_the_last() {
        let p = Progress::to("replaying: ", false);
        let start = Instant::now();
        assert_eq!(p.render(says("1 of 9 events"), start), says("replaying: 1 of 9 events\n"));
        assert_eq!(p.render(says("2 of 9 events"), start + Duration::from_secs(9)), None);
        assert_eq!(p.render(says("3 of 9 events"), start + Duration::from_secs(10)), says("replaying: 3 of 9 events\n"));
        assert_eq!(p.render(says("8 of 9 events"), start + Duration::from_secs(11)), None);
        assert_eq!(p.render(None, start + Duration::from_secs(12)), says("replaying: 8 of 9 events\n"));
    }

    #[test]
    fn the_end_is_not_repeated_and_nothing_shown_ends_nothing() {
        let p = Progress::to("P1: ", false);
        let start = Instant::now();
        assert_eq!(p.render(None, start), None);
        assert!(p.render(says("50 of 50 phones synced"), start).is_some());
        assert_eq!(p.render(None, start + Duration::from_secs(1)), None);
        let p = Progress::to("P1: ", true);
        assert_eq!(p.render(None, start), None);
    }
}
