//! `ft-arbiter --metrics-listen`: the arbiter's Prometheus metrics. Requests by
//! operation and answer, refused connections and requests, the durable writes, and per
//! VM its epoch, owner and lease, read from the arbiter's state at scrape time.
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Instant,
};

use axum::{
    Router, extract::State, http::header::CONTENT_TYPE, response::IntoResponse, routing::get,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, prometheus_text},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use super::{proto::Op, proto::Reply, server::Shared};

/// What the server counts (read at scrape time).
#[derive(Default)]
pub struct Stats {
    /// (operation, answer) -> requests.
    requests: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    pub unauthenticated: AtomicU64,
    pub bad_requests: AtomicU64,
    pub connections_refused: AtomicU64,
    pub persists: AtomicU64,
    pub persist_ns: AtomicU64,
}

impl Stats {
    pub fn count(&self, op: &Op, reply: &Reply) {
        let op = match op {
            Op::TestAndSet { .. } => "test_and_set",
            Op::Renew { .. } => "renew",
            Op::Release { .. } => "release",
            Op::Pair { .. } => "pair",
            Op::Read => "read",
        };
        let answer = match reply {
            Reply::Won { .. } => "won",
            Reply::Held { .. } => "held",
            Reply::Stale { .. } => "stale",
            Reply::Renewed { .. } => "renewed",
            Reply::Fenced { .. } => "fenced",
            Reply::Released { .. } => "released",
            Reply::Paired { .. } => "paired",
            Reply::State { .. } => "state",
            Reply::Error { .. } => "error",
        };
        *self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((op, answer))
            .or_default() += 1;
    }
}

/// Serves GET /metrics until the listener fails.
pub(super) async fn serve(listener: tokio::net::TcpListener, sh: Arc<Shared>) {
    let app = Router::new().route("/metrics", get(scrape)).with_state(sh);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("metrics endpoint stopped: {e}");
    }
}

async fn scrape(State(sh): State<Arc<Shared>>) -> impl IntoResponse {
    let vms = sh.vm_view(Instant::now()).await;
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        encode(&sh.stats, &vms),
    )
}

/// One VM as the metrics show it.
#[derive(Clone, Debug)]
pub struct VmView {
    pub vm: String,
    pub epoch: u64,
    pub owner: Option<String>,
    pub follower: Option<String>,
    pub lease_remaining_s: f64,
}

/// The exposition (Prometheus text format 0.0.4, prometheus-client's encoder).
pub fn encode(st: &Stats, vms: &[VmView]) -> String {
    let mut reg = Registry::default();
    let requests = st
        .requests
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    reg.register_collector(Box::new(Snapshot {
        requests,
        counters: [
            (
                "ft_arbiter_unauthenticated_requests",
                "Requests without a valid MAC of the shared secret (refused, connection closed)",
                st.unauthenticated.load(Relaxed),
            ),
            (
                "ft_arbiter_bad_requests",
                "Frames that were not a request of this protocol (refused, connection closed)",
                st.bad_requests.load(Relaxed),
            ),
            (
                "ft_arbiter_connections_refused",
                "Connections closed at once because too many were open",
                st.connections_refused.load(Relaxed),
            ),
            (
                "ft_arbiter_state_writes",
                "State changes written and fsynced before their answer",
                st.persists.load(Relaxed),
            ),
        ],
        write_s: st.persist_ns.load(Relaxed) as f64 / 1e9,
        vms: vms.to_vec(),
    }));
    let mut out = String::new();
    let _ = prometheus_text::encode(&mut out, &reg);
    out
}

/// What one scrape reads, taken at once.
#[derive(Debug)]
struct Snapshot {
    requests: BTreeMap<(&'static str, &'static str), u64>,
    counters: [(&'static str, &'static str, u64); 4],
    write_s: f64,
    vms: Vec<VmView>,
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut m = e.encode_descriptor(
            "ft_arbiter_requests",
            "Requests answered, by operation and answer",
            None,
            MetricType::Counter,
        )?;
        for ((op, answer), n) in &self.requests {
            ConstCounter::new(*n).encode(m.encode_family(&[("op", *op), ("answer", *answer)])?)?;
        }
        for (name, help, v) in &self.counters {
            let m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(*v).encode(m)?;
        }
        let m = e.encode_descriptor(
            "ft_arbiter_state_write_seconds",
            "Time spent writing and fsyncing the state",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.write_s).encode(m)?;
        let mut m = e.encode_descriptor(
            "ft_arbiter_vm_epoch",
            "The VM's current fencing epoch",
            None,
            MetricType::Gauge,
        )?;
        for v in &self.vms {
            ConstGauge::new(v.epoch as i64).encode(m.encode_family(&[("vm", v.vm.as_str())])?)?;
        }
        let mut m = e.encode_descriptor(
            "ft_arbiter_vm_lease_remaining_seconds",
            "Time left on the owner's lease (0: no valid lease)",
            None,
            MetricType::Gauge,
        )?;
        for v in &self.vms {
            ConstGauge::new(v.lease_remaining_s)
                .encode(m.encode_family(&[("vm", v.vm.as_str())])?)?;
        }
        for (name, help, who) in [
            (
                "ft_arbiter_vm_owner",
                "The VM's owner at its epoch (1; its lease may have run out)",
                (|v: &VmView| v.owner.clone()) as fn(&VmView) -> Option<String>,
            ),
            (
                "ft_arbiter_vm_follower",
                "The owner's paired follower (1): it may take over without waiting for the lease",
                |v: &VmView| v.follower.clone(),
            ),
        ] {
            let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for v in &self.vms {
                if let Some(n) = who(v) {
                    ConstGauge::new(1i64)
                        .encode(m.encode_family(&[("vm", v.vm.as_str()), ("node", n.as_str())])?)?;
                }
            }
        }
        Ok(())
    }
}
