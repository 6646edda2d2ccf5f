//! Where ftd's log goes and in what form (`--log-format`), and the rate limit on
//! repeated warnings.
//!
//! Under systemd (`JOURNAL_STREAM` names our stderr) the log goes to the journal as
//! structured entries (priority, the event's fields, the source location); on a terminal
//! it is coloured text; anywhere else plain text; `json` gives one JSON object a line for
//! a log shipper.
//!
//! A warning that repeats (an arbiter that does not answer, a peer that keeps sending
//! frames under an old key) would fill the journal: each warning passes [`BURST`] times
//! per [`WINDOW`], and the rest are dropped. "Each warning" is its call site and its
//! message with the numbers taken out: the data plane's warnings all reach tracing
//! through one call site of the `log` bridge (aya-log), and "frame of epoch 0 dropped" and
//! "frame of epoch 2 dropped" are the same warning, "frame from unexpected source" another. What was dropped is counted
//! ([`suppressed_total`], the metric `ft_log_suppressed_total`) and said once per window
//! by [`report_suppressed`], which the daemon calls periodically.
use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use tracing::{Event, Level, Subscriber, field::Visit};
use tracing_log::NormalizeEvent;
use tracing_subscriber::{EnvFilter, layer::Context, prelude::*};

/// Warnings one call site may log per window.
pub const BURST: u32 = 5;
/// The rate limit's window.
pub const WINDOW: Duration = Duration::from_secs(60);

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// The journal under systemd, coloured text on a terminal, plain text otherwise.
    Auto,
    /// Plain text (colour only on a terminal).
    Text,
    /// One JSON object per line.
    Json,
    /// Structured entries in the systemd journal.
    Journald,
}

/// Installs the global subscriber (`RUST_LOG` filters; default `info`).
pub fn init(format: LogFormat) {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let format = match format {
        LogFormat::Auto if under_journal() => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        f => f,
    };
    let registry = tracing_subscriber::registry()
        .with(filter())
        .with(RateLimit);
    let journald = match format {
        LogFormat::Journald => match tracing_journald::layer() {
            Ok(l) => Some(l.with_syslog_identifier("ftd".into())),
            Err(e) => {
                eprintln!("ftd: cannot reach the journal ({e}); logging plain text to stderr");
                None
            }
        },
        _ => None,
    };
    let plain = || {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
    };
    match (format, journald) {
        (_, Some(j)) => registry.with(j).init(),
        (LogFormat::Json, _) => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .init(),
        _ => registry.with(plain()).init(),
    }
    let _ = tracing_log::LogTracer::init();
}

/// Whether stderr is the journal's stream (systemd sets `JOURNAL_STREAM` to its
/// `device:inode`; a child that inherited the variable but not the stream is not).
fn under_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    v == format!("{}:{}", meta.dev(), meta.ino())
}

/// One call site's window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    start: Instant,
    passed: u32,
    dropped: u64,
}

impl Window {
    fn new(now: Instant) -> Self {
        Self {
            start: now,
            passed: 0,
            dropped: 0,
        }
    }

    /// Whether an event at `now` passes; a new window starts `WINDOW` after the last one
    /// started. Returns what the window that ended had dropped, if it ended now.
    pub fn admit(&mut self, now: Instant) -> (bool, Option<u64>) {
        let mut ended = None;
        if now.duration_since(self.start) >= WINDOW {
            if self.dropped > 0 {
                ended = Some(self.dropped);
            }
            *self = Window::new(now);
        }
        if self.passed < BURST {
            self.passed += 1;
            (true, ended)
        } else {
            self.dropped += 1;
            (false, ended)
        }
    }
}

static SUPPRESSED: AtomicU64 = AtomicU64::new(0);

/// Warnings dropped by the rate limit since the start.
pub fn suppressed_total() -> u64 {
    SUPPRESSED.load(Relaxed)
}

/// Most warnings with a window of their own; the rest share one (a flood of warnings
/// that differ in something other than numbers cannot grow the table, nor reset it).
pub const MAX_KEYS: usize = 1024;
const OTHER: &str = "(other warnings)";

/// The rate limit's state: a window per warning, and what ended windows dropped that
/// has not been reported. Pure: time is passed in.
#[derive(Default)]
pub struct Limiter {
    windows: HashMap<String, Window>,
    unsaid: Vec<(String, u64)>,
}

impl Limiter {
    /// Whether the warning `key` at `now` is logged.
    pub fn admit(&mut self, key: String, now: Instant) -> bool {
        let key = if self.windows.len() >= MAX_KEYS && !self.windows.contains_key(&key) {
            OTHER.to_string()
        } else {
            key
        };
        let w = self
            .windows
            .entry(key.clone())
            .or_insert_with(|| Window::new(now));
        let (pass, ended) = w.admit(now);
        if let Some(n) = ended {
            self.unsaid.push((key, n));
        }
        pass
    }

    /// What windows that ended by `now` dropped, once each: those a later warning
    /// rolled over, and those of warnings that stopped.
    pub fn report(&mut self, now: Instant) -> Vec<(String, u64)> {
        let mut out = std::mem::take(&mut self.unsaid);
        for (key, w) in self.windows.iter_mut() {
            if now.duration_since(w.start) >= WINDOW && w.dropped > 0 {
                out.push((key.clone(), w.dropped));
                *w = Window::new(now);
            }
        }
        out
    }
}

static LIMITER: Mutex<Option<Limiter>> = Mutex::new(None);

fn with_limiter<T>(f: impl FnOnce(&mut Limiter) -> T) -> T {
    let mut g = LIMITER.lock().unwrap_or_else(|p| p.into_inner());
    f(g.get_or_insert_with(Limiter::default))
}

/// Drops a warning's repeats beyond [`BURST`] per [`WINDOW`] (see the module doc).
#[derive(Default)]
pub struct RateLimit;

/// The message of an event, every word with a digit in it (numbers, addresses, MACs,
/// ids) replaced by `#`.
#[derive(Default)]
struct Shape(String);

impl Visit for Shape {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}")
                .split_whitespace()
                .map(|w| {
                    if w.chars().any(|c| c.is_ascii_digit()) {
                        "#"
                    } else {
                        w
                    }
                })
                .collect::<Vec<_>>()
                .join(" ");
        }
    }
}

/// The warning an event is: where it was logged (through the `log` bridge: the original
/// record's target, file and line) and its message's shape.
fn warning_key(event: &Event<'_>) -> String {
    let mut shape = Shape::default();
    event.record(&mut shape);
    let site = match event.normalized_metadata() {
        Some(m) => format!(
            "{} {}:{}",
            m.target(),
            m.file().unwrap_or("?"),
            m.line().unwrap_or(0)
        ),
        None => {
            let m = event.metadata();
            format!("{}:{}", m.file().unwrap_or("?"), m.line().unwrap_or(0))
        }
    };
    format!("{site}: {}", shape.0)
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for RateLimit {
    fn event_enabled(&self, event: &Event<'_>, _cx: Context<'_, S>) -> bool {
        if *event.metadata().level() != Level::WARN {
            return true;
        }
        let key = warning_key(event);
        let pass = with_limiter(|l| l.admit(key, Instant::now()));
        if !pass {
            SUPPRESSED.fetch_add(1, Relaxed);
        }
        pass
    }
}

/// Logs what the rate limit dropped in windows that ended (call it every few seconds;
/// the daemon does). Its own message is an `info`, never itself limited.
pub fn report_suppressed() {
    let unsaid = with_limiter(|l| l.report(Instant::now()));
    for (site, n) in unsaid {
        tracing::info!(
            "{n} more warnings like \"{site}\" were not logged (at most {BURST} a minute each)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_passes_its_burst_then_counts_and_reports_the_rest() {
        let t0 = Instant::now();
        let mut w = Window::new(t0);
        for i in 0..BURST {
            assert_eq!(w.admit(t0 + Duration::from_millis(i as u64)), (true, None));
        }
        for _ in 0..7 {
            assert_eq!(w.admit(t0 + Duration::from_secs(1)), (false, None));
        }
        // The next window passes again, and says what the last one dropped.
        assert_eq!(w.admit(t0 + WINDOW), (true, Some(7)));
        assert_eq!(w.admit(t0 + WINDOW), (true, None));
        // A window that dropped nothing has nothing to say.
        assert_eq!(w.admit(t0 + 3 * WINDOW), (true, None));
    }

    #[test]
    fn a_storm_that_stops_is_reported_once_and_the_table_is_bounded() {
        let t0 = Instant::now();
        let mut l = Limiter::default();
        for _ in 0..12 {
            l.admit("w".into(), t0);
        }
        assert_eq!(l.report(t0 + Duration::from_secs(1)), vec![]);
        // No further warning: the ended window is reported anyway, once.
        assert_eq!(
            l.report(t0 + WINDOW),
            vec![("w".to_string(), 12 - BURST as u64)]
        );
        assert_eq!(l.report(t0 + 3 * WINDOW), vec![]);
        // Past MAX_KEYS, new warnings share one window; the old ones keep theirs.
        let mut l = Limiter::default();
        for i in 0..MAX_KEYS {
            assert!(l.admit(format!("k{i}"), t0));
        }
        let passed = (0..100).filter(|i| l.admit(format!("new{i}"), t0)).count();
        assert_eq!(passed, BURST as usize);
        assert!(l.admit("k0".into(), t0));
        assert_eq!(l.windows.len(), MAX_KEYS + 1);
    }

    #[test]
    fn repeated_warnings_are_limited_per_call_site_and_errors_never() {
        let seen = std::sync::Arc::new(AtomicU64::new(0));
        struct Count(std::sync::Arc<AtomicU64>);
        impl<S: Subscriber> tracing_subscriber::Layer<S> for Count {
            fn on_event(&self, _: &Event<'_>, _: Context<'_, S>) {
                self.0.fetch_add(1, Relaxed);
            }
        }
        let sub = tracing_subscriber::registry()
            .with(RateLimit)
            .with(Count(seen.clone()));
        let before = suppressed_total();
        tracing::subscriber::with_default(sub, || {
            for _ in 0..20 {
                tracing::warn!("the same warning");
            }
            for _ in 0..20 {
                tracing::warn!("another call site");
            }
            for _ in 0..20 {
                tracing::error!("errors are never limited");
            }
            // The data plane's warnings, through the `log` bridge (one call site for
            // all): each kind is limited on its own, whatever its numbers.
            for i in 0..20 {
                for args in [
                    format_args!("frame of epoch {i} dropped (ours is 1)"),
                    format_args!("frame from unexpected source 02:09:09:09:09:0{i}"),
                    format_args!("ack {i} beyond what was sent"),
                ] {
                    tracing_log::format_trace(
                        &log::Record::builder()
                            .level(log::Level::Warn)
                            .target("ft")
                            .args(args)
                            .build(),
                    )
                    .unwrap();
                }
            }
        });
        assert_eq!(seen.load(Relaxed), 5 * BURST as u64 + 20);
        assert!(suppressed_total() - before >= 5 * (20 - BURST as u64));
    }
}
