//! The real endpoint (axum on a socket) over stand-ins for the BPF maps and the role
//! controller, and the real atomics of the channel and the VM; each exposition is parsed
//! with prometheus-parse and checked line by line against the text format's rules.
use std::{
    collections::{HashMap, HashSet},
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use ft_common::maps::{
    C_ACK_RX, C_DROP_HOLD_FULL, C_DUP_FRAMES, COUNTER_INFO, COUNTER_SLOTS, ChanState, HIST_BUCKETS,
    HIST_ENTRIES, HIST_SUM_SLOT, HoldCtl, NodeState, ROLE_PRIMARY, SeqState, hist_upper_us,
};
use prometheus_parse::{LineInfo, Scrape, Value};

use super::{DataPlaneView, RolesView, Sources, collectors, registry, serve_registry};
use crate::{
    channel::status::ChannelStatus,
    role::{FailoverReport, NodeRole},
    vm::{VmPhase, VmState},
};

/// The BPF maps, as plain atomics.
struct FakeDataPlane {
    counters: Vec<AtomicU64>,
    hist: Vec<AtomicU64>,
    last_seq: AtomicU64,
    tail: AtomicU64,
}

impl FakeDataPlane {
    fn new() -> FakeDataPlane {
        let zeros = |n| (0..n).map(|_| AtomicU64::new(0)).collect();
        FakeDataPlane {
            counters: zeros(COUNTER_SLOTS),
            hist: zeros(HIST_ENTRIES),
            last_seq: AtomicU64::new(0),
            tail: AtomicU64::new(0),
        }
    }
    fn add(&self, idx: u32, n: u64) {
        self.counters[idx as usize].fetch_add(n, Relaxed);
    }
}

fn load(v: &[AtomicU64]) -> Vec<u64> {
    v.iter().map(|c| c.load(Relaxed)).collect()
}

impl DataPlaneView for FakeDataPlane {
    fn counters(&self) -> anyhow::Result<Vec<u64>> {
        Ok(load(&self.counters))
    }
    fn hold_histogram(&self) -> anyhow::Result<Vec<u64>> {
        Ok(load(&self.hist))
    }
    fn seq_state(&self) -> SeqState {
        SeqState {
            last_seq: self.last_seq.load(Relaxed),
            ..Default::default()
        }
    }
    fn chan_state(&self) -> ChanState {
        ChanState::default()
    }
    fn hold_ctl(&self) -> anyhow::Result<HoldCtl> {
        Ok(HoldCtl {
            tail: self.tail.load(Relaxed),
            ..Default::default()
        })
    }
    fn node_state(&self) -> anyhow::Result<NodeState> {
        Ok(NodeState {
            epoch: 7,
            lease_deadline_ns: u64::MAX,
            role: ROLE_PRIMARY,
            _pad: 0,
        })
    }
}

struct FakeRoles {
    role: Mutex<NodeRole>,
    changes: AtomicU64,
    blocked: Mutex<Option<Duration>>,
    failover: Mutex<Option<FailoverReport>>,
}

impl Default for FakeRoles {
    fn default() -> Self {
        FakeRoles {
            role: Mutex::new(NodeRole::Primary { epoch: 7 }),
            changes: AtomicU64::new(0),
            blocked: Mutex::new(None),
            failover: Mutex::new(None),
        }
    }
}

impl RolesView for FakeRoles {
    fn changes(&self) -> u64 {
        self.changes.load(Relaxed)
    }
    fn role(&self) -> NodeRole {
        self.role.lock().unwrap().clone()
    }
    fn peer_alive(&self) -> Option<bool> {
        Some(true)
    }
    fn arbiter_blocked(&self) -> Option<Duration> {
        *self.blocked.lock().unwrap()
    }
    fn last_failover(&self) -> Option<FailoverReport> {
        self.failover.lock().unwrap().clone()
    }
}

/// GET `path` as the system tests' fixtures do (HTTP/1.1, `Connection: close`, read to
/// the end): the server must close the connection after the response.
fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out)
        .expect("the server closes the connection after the response");
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
    (head.to_string(), body.to_string())
}

/// The parsed exposition of one scrape.
struct Exposition {
    scrape: Scrape,
}

impl Exposition {
    /// Scrapes `/metrics`, checks the response and the text format's rules, and parses.
    fn get(addr: SocketAddr) -> Exposition {
        let (head, body) = http_get(addr, "/metrics");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let content_type = head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then_some(value.trim())
        });
        assert_eq!(
            content_type,
            Some("text/plain; version=0.0.4; charset=utf-8"),
            "{head}"
        );
        check_format(&body);
        let scrape = Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
        Exposition { scrape }
    }

    /// The value of the series `name{labels}` (a counter or gauge, or a histogram's
    /// `_count`/`_sum`); panics if there is none.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let want: HashMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let s = self
            .scrape
            .samples
            .iter()
            .find(|s| s.metric == name && *s.labels == want)
            .unwrap_or_else(|| panic!("no series {name}{labels:?}"));
        match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            ref v => panic!("{name} is {v:?}"),
        }
    }

    fn has(&self, name: &str) -> bool {
        self.scrape.samples.iter().any(|s| s.metric == name)
    }

    /// A histogram's cumulative buckets `(le, count)`.
    fn histogram(&self, name: &str) -> Vec<(f64, f64)> {
        let s = self.scrape.samples.iter().find(|s| s.metric == name);
        match s.map(|s| &s.value) {
            Some(Value::Histogram(b)) => b.iter().map(|b| (b.less_than, b.count)).collect(),
            v => panic!("{name} is not a histogram: {v:?}"),
        }
    }
}

/// The rules of the text format (0.0.4) that prometheus-parse does not enforce (it skips
/// what it cannot read): every line is a HELP, a TYPE or a sample with a numeric value; a
/// family has one HELP and one TYPE, before its samples, and its samples are together;
/// a sample's name is its family's (plus `_bucket`, `_sum`, `_count` for a histogram).
fn check_format(body: &str) {
    assert!(body.ends_with('\n'), "no final newline");
    let (mut types, mut helps) = (HashMap::new(), HashSet::new());
    let (mut done, mut current) = (HashSet::new(), String::new());
    for line in body.lines() {
        match LineInfo::parse(line) {
            LineInfo::Doc { metric_name, .. } => {
                assert!(helps.insert(metric_name.to_string()), "two HELP: {line}");
            }
            LineInfo::Type {
                metric_name,
                metric_alias,
                sample_type,
            } => {
                let family = metric_alias.unwrap_or(metric_name);
                assert!(helps.contains(&family), "TYPE before HELP: {line}");
                assert!(!types.contains_key(&family), "two TYPE: {line}");
                types.insert(family, sample_type);
            }
            LineInfo::Sample {
                metric_name,
                value,
                timestamp,
                ..
            } => {
                assert!(timestamp.is_none(), "{line}");
                assert!(
                    value == "+Inf" || value.parse::<f64>().is_ok(),
                    "bad value: {line}"
                );
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .filter_map(|s| metric_name.strip_suffix(s))
                    .find(|f| types.get(*f) == Some(&prometheus_parse::SampleType::Histogram))
                    .unwrap_or(metric_name);
                assert!(types.contains_key(family), "sample without TYPE: {line}");
                if family != current {
                    assert!(done.insert(family.to_string()), "family split: {line}");
                    current = family.to_string();
                }
            }
            LineInfo::Empty | LineInfo::Ignored => panic!("not in the text format: {line:?}"),
        }
    }
    assert_eq!(
        types.len(),
        done.len(),
        "families without samples: {:?}",
        types
            .keys()
            .filter(|t| !done.contains(*t))
            .collect::<Vec<_>>()
    );
}

#[test]
fn the_endpoint_serves_what_the_sources_hold_at_scrape_time() {
    let (dp, roles) = (
        Arc::new(FakeDataPlane::new()),
        Arc::new(FakeRoles::default()),
    );
    let (status, vm) = (
        Arc::new(ChannelStatus::default()),
        Arc::new(VmState::default()),
    );
    vm.set_phase(VmPhase::Recording);
    let reg = registry(Sources {
        dp: dp.clone(),
        status: status.clone(),
        vm: Some(vm.clone()),
        roles: roles.clone(),
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || rt.block_on(serve_registry(listener, reg)));

    let m = Exposition::get(addr);
    for (name, labels) in [
        ("ft_log_duplicated_frames_total", &[][..]),
        ("ft_acks_received_total", &[]),
        ("ft_drops_total", &[("reason", "hold_full")]),
        ("ft_drops_total", &[("reason", "bad_mac")]),
        ("ft_channel_acks_sent_total", &[]),
        ("ft_vm_exits_total", &[]),
        ("ft_joins_total", &[]),
        ("ft_join_auth_failures_total", &[]),
        ("ft_role_changes_total", &[]),
        ("ft_arbiter_blocked_seconds", &[]),
        ("ft_output_hold_seconds_count", &[]),
        ("ft_vm_diverged", &[]),
    ] {
        assert_eq!(m.value(name, labels), 0.0, "{name}");
    }
    assert_eq!(m.value("ft_epoch", &[]), 7.0);
    // State sets: every state, 1 for the current one.
    for r in NodeRole::NAMES {
        let want = (r == "primary") as u8 as f64;
        assert_eq!(m.value("ft_role", &[("role", r)]), want, "ft_role {r}");
    }
    for p in VmPhase::NAMES {
        let want = (p == "recording") as u8 as f64;
        assert_eq!(
            m.value("ft_vm_phase", &[("phase", p)]),
            want,
            "ft_vm_phase {p}"
        );
    }
    assert_eq!(m.value("ft_peer_alive", &[]), 1.0);
    assert_eq!(m.value("ft_lease_remaining_seconds", &[]), f64::INFINITY);
    assert!(!m.has("ft_failover_last_phase_seconds") && !m.has("ft_join_running"));
    // Every reason of ft_drops_total, once.
    let drops = COUNTER_INFO
        .iter()
        .filter(|(_, f, _)| *f == "ft_drops_total")
        .count();
    let drops_seen = m
        .scrape
        .samples
        .iter()
        .filter(|s| s.metric == "ft_drops_total")
        .map(|s| s.labels.get("reason").unwrap().to_string())
        .collect::<HashSet<_>>();
    assert_eq!(drops_seen.len(), drops);

    // The sources move; the next scrape reads them.
    dp.add(C_DUP_FRAMES, 11);
    dp.add(C_ACK_RX, 3);
    dp.add(C_DROP_HOLD_FULL, 2);
    dp.last_seq.store(11, Relaxed);
    dp.tail.store(4, Relaxed);
    dp.hist[0].fetch_add(5, Relaxed); // < 1 us
    dp.hist[4].fetch_add(2, Relaxed); // [8, 16) us
    dp.hist[HIST_BUCKETS as usize - 1].fetch_add(1, Relaxed); // open-ended
    dp.hist[HIST_SUM_SLOT as usize].fetch_add(1_234_567_891, Relaxed); // ns
    status.acks_sent.fetch_add(5, Relaxed);
    vm.live.exits.fetch_add(1000, Relaxed);
    vm.stats.stall_ns.fetch_add(1_500_000_000, Relaxed);
    vm.count_join(7, Duration::from_millis(12));
    vm.join_auth_failures.fetch_add(2, Relaxed);
    *vm.join.lock().unwrap() = Some(serde_json::json!({
        "phase": "done", "pause_ms": 12.5, "bytes": 1024, "total_ms": 2000.0
    }));
    vm.diverged(crate::vm::Divergence {
        exit: 4242,
        verified: 4000,
        what: "checkpoint mismatch".into(),
    });
    roles.changes.fetch_add(1, Relaxed);
    *roles.blocked.lock().unwrap() = Some(Duration::from_millis(1500));
    *roles.failover.lock().unwrap() = Some(FailoverReport {
        total_ms: 250.0,
        ..Default::default()
    });

    let m = Exposition::get(addr);
    for (name, labels, want) in [
        ("ft_log_duplicated_frames_total", &[][..], 11.0),
        ("ft_acks_received_total", &[], 3.0),
        ("ft_drops_total", &[("reason", "hold_full")], 2.0),
        ("ft_drops_total", &[("reason", "bad_mac")], 0.0),
        ("ft_log_last_seq", &[], 11.0),
        ("ft_output_held_frames", &[], 4.0),
        ("ft_channel_acks_sent_total", &[], 5.0),
        ("ft_vm_exits_total", &[], 1000.0),
        ("ft_vmlog_window_stall_seconds_total", &[], 1.5),
        ("ft_joins_total", &[], 1.0),
        ("ft_join_auth_failures_total", &[], 2.0),
        ("ft_join_running", &[], 0.0),
        ("ft_join_last_pause_seconds", &[], 0.0125),
        ("ft_join_last_bytes", &[], 1024.0),
        ("ft_role_changes_total", &[], 1.0),
        ("ft_arbiter_blocked_seconds", &[], 1.5),
        (
            "ft_failover_last_phase_seconds",
            &[("phase", "total")],
            0.25,
        ),
        ("ft_output_hold_seconds_count", &[], 8.0),
        ("ft_vm_diverged", &[], 1.0),
        ("ft_vm_divergence_exit", &[], 4242.0),
        ("ft_vm_divergence_verified_exit", &[], 4000.0),
        ("ft_vm_phase", &[("phase", "diverged")], 1.0),
        ("ft_vm_phase", &[("phase", "recording")], 0.0),
    ] {
        assert_eq!(m.value(name, labels), want, "{name}{labels:?}");
    }
    // The histogram keeps the data plane's bucket boundaries.
    let h = m.histogram("ft_output_hold_seconds");
    assert_eq!(h.len(), HIST_BUCKETS as usize);
    for (i, (le, cum)) in h.iter().enumerate() {
        let want_le = hist_upper_us(i as u32).map_or(f64::INFINITY, |us| us as f64 / 1e6);
        assert_eq!(*le, want_le, "bucket {i}");
        let want_cum = match i {
            0..4 => 5.0,
            _ if i + 1 < HIST_BUCKETS as usize => 7.0,
            _ => 8.0,
        };
        assert_eq!(*cum, want_cum, "bucket {i}");
    }
    // _sum is the data plane's own sum of the hold times (ns), not derived from buckets.
    let sum = m.value("ft_output_hold_seconds_sum", &[]);
    assert!((sum - 1.234_567_891).abs() < 1e-12, "{sum}");

    let (head, _) = http_get(addr, "/nope");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    assert!(!server.is_finished());
}

#[test]
fn every_data_plane_counter_has_a_name_and_help() {
    for (_, family, _) in COUNTER_INFO {
        assert_ne!(
            collectors::family_name(family),
            *family,
            "{family}: no _total"
        );
        assert!(
            collectors::counter_help(family).is_some(),
            "{family}: no help"
        );
    }
}

/// Every series the shipped alert rules and dashboard (`deploy/`) query is one ftd
/// serves: a renamed metric or a misspelled name in a rule would otherwise be an alert
/// that never fires.
#[test]
fn the_alert_rules_and_the_dashboard_query_only_metrics_that_exist() {
    let (dp, roles) = (
        Arc::new(FakeDataPlane::new()),
        Arc::new(FakeRoles::default()),
    );
    let vm = Arc::new(VmState::default());
    *roles.failover.lock().unwrap() = Some(FailoverReport::default());
    let sources = || Sources {
        dp: dp.clone(),
        status: Arc::new(ChannelStatus::default()),
        vm: Some(vm.clone()),
        roles: roles.clone(),
    };
    // A running join's gauges and a finished one's are exclusive: scrape both.
    let mut served = HashSet::new();
    for join in [
        serde_json::json!({"phase": "memory", "bytes_sent": 1}),
        serde_json::json!({"phase": "done", "bytes": 1, "pause_ms": 1.0, "total_ms": 2.0}),
    ] {
        *vm.join.lock().unwrap() = Some(join);
        let text = super::encode(&registry(sources())).unwrap();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            served.insert(name.to_string());
        }
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
    let mut queried = HashSet::new();
    for file in [
        "prometheus/ft-alerts.yml",
        "prometheus/ft-alerts.test.yml",
        "grafana/ft-appliance.json",
    ] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("ft_") {
            // A metric name starts at a word boundary ("ft_" inside a word is not one).
            let boundary = rest[..i]
                .chars()
                .next_back()
                .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'));
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            if boundary {
                queried.insert((file, name));
            }
        }
    }
    assert!(queried.len() > 20, "{queried:?}");
    let missing: Vec<_> = queried
        .iter()
        .filter(|(_, n)| !served.contains(n))
        .collect();
    assert!(missing.is_empty(), "not served by ftd: {missing:?}");
}
