//! Progress lines on stderr for long operator commands (`roost backup`,
//! `roost restore`, `roost verify`).
//!
//! Short runs stay quiet: nothing is printed until an operation has run for
//! [`QUIET_FOR`], then at most one line per [`EVERY`]. Lines go to stderr so
//! the commands' stdout stays their result, which scripts may read.

use std::time::{Duration, Instant};

/// Nothing is printed before an operation has run this long.
pub const QUIET_FOR: Duration = Duration::from_secs(2);
/// At most one line per this interval.
pub const EVERY: Duration = Duration::from_secs(2);

/// Throttled progress lines for one command.
pub struct Progress {
    label: &'static str,
    started: Instant,
    last: Option<Instant>,
    quiet_for: Duration,
    every: Duration,
}

impl Progress {
    pub fn new(label: &'static str) -> Progress {
        Progress { label, started: Instant::now(), last: None, quiet_for: QUIET_FOR, every: EVERY }
    }

    /// Prints `label: message` when a line is due; `message` is only built then.
    pub fn tick(&mut self, message: impl FnOnce() -> String) {
        if let Some(line) = self.due(Instant::now(), message) {
            eprintln!("{line}");
        }
    }

    /// Whether anything was printed: a long run ends with a final line too.
    pub fn printed(&self) -> bool {
        self.last.is_some()
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    fn due(&mut self, now: Instant, message: impl FnOnce() -> String) -> Option<String> {
        if now.duration_since(self.started) < self.quiet_for {
            return None;
        }
        if self.last.is_some_and(|last| now.duration_since(last) < self.every) {
            return None;
        }
        self.last = Some(now);
        Some(format!(
            "{}: {} ({:.0} s)",
            self.label,
            message(),
            now.duration_since(self.started).as_secs_f64()
        ))
    }
}

/// Bytes as MiB for progress lines.
pub fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_at_first_then_throttled() {
        let mut p = Progress::new("verify");
        let t0 = p.started;
        assert_eq!(p.due(t0 + Duration::from_millis(1500), || "a".into()), None, "short runs stay quiet");
        let line = p.due(t0 + Duration::from_millis(2100), || "records 10".into()).expect("due");
        assert_eq!(line, "verify: records 10 (2 s)");
        assert_eq!(p.due(t0 + Duration::from_millis(3000), || panic!("not built when not due")), None);
        assert!(p.due(t0 + Duration::from_millis(4200), || "b".into()).is_some());
        assert!(p.printed());
        assert_eq!(mib(3 * 1024 * 1024 + 10), "3 MiB");
    }
}
