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
        .with(RateLimit::default());
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

/// Drops a warning's repeats beyond [`BURST`] per [`WINDOW`] (per call site).
#[derive(Default)]
pub struct RateLimit {
    /// Per warning (see the module doc): its window.
    sites: Mutex<HashMap<String, Window>>,
}

/// The message of an event, its digits taken out.
#[derive(Default)]
struct Shape(String);

impl Visit for Shape {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}")
                .chars()
                .filter(|c| !c.is_ascii_digit())
                .collect();
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

/// Per call site: what windows that ended dropped, not yet said.
static UNSAID: Mutex<Vec<(String, u64)>> = Mutex::new(Vec::new());

impl<S: Subscriber> tracing_subscriber::Layer<S> for RateLimit {
    fn event_enabled(&self, event: &Event<'_>, _cx: Context<'_, S>) -> bool {
        let meta = event.metadata();
        if *meta.level() != Level::WARN {
            return true;
        }
        let now = Instant::now();
        let key = warning_key(event);
        let mut sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: warnings whose numbers are not digits (names, addresses) could each
        // be new; past this many, the oldest windows are forgotten.
        if sites.len() >= 4096 && !sites.contains_key(&key) {
            sites.clear();
        }
        let (pass, ended) = sites
            .entry(key.clone())
            .or_insert_with(|| Window::new(now))
            .admit(now);
        if let Some(n) = ended {
            UNSAID
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((key, n));
        }
        if !pass {
            SUPPRESSED.fetch_add(1, Relaxed);
        }
        pass
    }
}

/// Logs what the rate limit dropped in windows that ended (call it every few seconds;
/// the daemon does). Its own message is an `info`, never itself limited.
pub fn report_suppressed() {
    let unsaid = std::mem::take(&mut *UNSAID.lock().unwrap_or_else(|p| p.into_inner()));
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
    fn repeated_warnings_are_limited_per_call_site_and_errors_never() {
        let seen = std::sync::Arc::new(AtomicU64::new(0));
        struct Count(std::sync::Arc<AtomicU64>);
        impl<S: Subscriber> tracing_subscriber::Layer<S> for Count {
            fn on_event(&self, _: &Event<'_>, _: Context<'_, S>) {
                self.0.fetch_add(1, Relaxed);
            }
        }
        let sub = tracing_subscriber::registry()
            .with(RateLimit::default())
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
