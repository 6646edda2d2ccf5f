//! Prometheus metrics: the data plane's counters and hold-time histogram (BPF maps), the
//! logging channel, the VM and the role controller, served at GET /metrics.
//!
//! A prometheus-client [`Registry`] of collectors ([`collectors`]) that read the BPF maps
//! and the daemon's atomics at scrape time (nothing is copied in between), encoded in the
//! Prometheus text format 0.0.4 (what Prometheus scrapes as `text/plain`) and served by
//! axum (hyper) on `api.metrics_listen`.
use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    http::{StatusCode, header::CONTENT_TYPE},
    response::{IntoResponse, Response},
    routing::get,
};
use ft_common::maps::{ChanState, HoldCtl, NodeState, SeqState};
use prometheus_client::{encoding::prometheus_text, registry::Registry};

use crate::{
    channel::status::ChannelStatus,
    dataplane::DataPlane,
    role::{FailoverReport, NodeRole, Roles},
    shared::Shared,
    vm::VmState,
};

mod collectors;
#[cfg(test)]
mod tests;

/// The data plane's state that the metrics read (its BPF maps): [`DataPlane`] in the
/// daemon, a stand-in in tests.
pub trait DataPlaneView: Send + Sync + 'static {
    /// `COUNTERS`, summed over CPUs, by index (`ft_common::maps::COUNTER_INFO`).
    fn counters(&self) -> anyhow::Result<Vec<u64>>;
    /// `HOLD_HIST`, summed over CPUs: per-bucket counts (not cumulative), then the sum of
    /// the hold times in ns (`HIST_SUM_SLOT`).
    fn hold_histogram(&self) -> anyhow::Result<Vec<u64>>;
    fn seq_state(&self) -> SeqState;
    fn chan_state(&self) -> ChanState;
    fn hold_ctl(&self) -> anyhow::Result<HoldCtl>;
    fn node_state(&self) -> anyhow::Result<NodeState>;
}

impl DataPlaneView for DataPlane {
    fn counters(&self) -> anyhow::Result<Vec<u64>> {
        Ok(DataPlane::counters(self)?)
    }
    fn hold_histogram(&self) -> anyhow::Result<Vec<u64>> {
        Ok(DataPlane::hold_histogram(self)?)
    }
    fn seq_state(&self) -> SeqState {
        DataPlane::seq_state(self)
    }
    fn chan_state(&self) -> ChanState {
        DataPlane::chan_state(self)
    }
    fn hold_ctl(&self) -> anyhow::Result<HoldCtl> {
        Ok(DataPlane::hold_ctl(self)?)
    }
    fn node_state(&self) -> anyhow::Result<NodeState> {
        Ok(DataPlane::node_state(self)?)
    }
}

/// What the metrics read of the role controller: [`Roles`] in the daemon, a stand-in in
/// tests.
pub trait RolesView: Send + Sync + 'static {
    fn changes(&self) -> u64;
    fn role(&self) -> NodeRole;
    /// Whether the watched peer is heard (None: this role watches no peer).
    fn peer_alive(&self) -> Option<bool>;
    /// How long a needed test-and-set has waited for an arbiter that does not answer
    /// (None: not blocked).
    fn arbiter_blocked(&self) -> Option<Duration>;
    fn last_failover(&self) -> Option<FailoverReport>;
}

impl RolesView for Roles {
    fn changes(&self) -> u64 {
        Roles::changes(self)
    }
    fn role(&self) -> NodeRole {
        self.current()
    }
    fn peer_alive(&self) -> Option<bool> {
        self.peer().map(|p| p.alive)
    }
    fn arbiter_blocked(&self) -> Option<Duration> {
        self.arbiter_wait().map(|w| w.since.elapsed())
    }
    fn last_failover(&self) -> Option<FailoverReport> {
        Roles::last_failover(self)
    }
}

/// Where the metrics come from; every value is read when Prometheus scrapes.
pub struct Sources {
    pub dp: Arc<dyn DataPlaneView>,
    pub status: Arc<ChannelStatus>,
    /// The VMM's state, when ftd runs the VM (the `ft_vm_*`, `ft_vmlog_*` and `ft_join*`
    /// metrics exist only then).
    pub vm: Option<Arc<VmState>>,
    pub roles: Arc<dyn RolesView>,
}

impl Sources {
    pub fn of(sh: &Shared) -> Sources {
        Sources {
            dp: sh.dp.clone(),
            status: sh.status.clone(),
            vm: sh.vm.clone(),
            roles: sh.roles.clone(),
        }
    }
}

/// The daemon's registry: one collector per source, in the order of the exposition.
pub fn registry(src: Sources) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(collectors::DataPlaneMetrics { dp: src.dp }));
    r.register_collector(Box::new(collectors::ChannelMetrics(src.status)));
    if let Some(vm) = src.vm {
        r.register_collector(Box::new(collectors::VmMetrics(vm)));
    }
    r.register_collector(Box::new(collectors::RoleMetrics(src.roles)));
    r.register_collector(Box::new(collectors::ProcessMetrics));
    r
}

/// The Prometheus text exposition (format 0.0.4) of `registry`, read now.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_text::encode(&mut out, registry)?;
    Ok(out)
}

/// Seconds until the lease deadline (`CLOCK_BOOTTIME` ns; `u64::MAX`: a static lease,
/// infinite).
pub fn lease_remaining_s(deadline_ns: u64) -> f64 {
    if deadline_ns == u64::MAX {
        return f64::INFINITY;
    }
    deadline_ns.saturating_sub(ft_fence::monotonic_now_ns()) as f64 / 1e9
}

/// Serves `GET /metrics` for the daemon until the listener fails.
pub async fn serve(listener: tokio::net::TcpListener, sh: Arc<Shared>) {
    serve_registry(listener, registry(Sources::of(&sh))).await
}

/// Serves `GET /metrics` (the exposition of `registry`, encoded per request) until the
/// listener fails; any other path is 404. hyper keeps HTTP/1.1 connections alive unless
/// the request says `Connection: close`, then closes after the response.
pub async fn serve_registry(listener: tokio::net::TcpListener, registry: Registry) {
    let registry = Arc::new(registry);
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move { scrape(&registry) }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("metrics endpoint stopped: {e}");
    }
}

fn scrape(registry: &Registry) -> Response {
    match encode(registry) {
        Ok(body) => ([(CONTENT_TYPE, prometheus_text::CONTENT_TYPE)], body).into_response(),
        Err(e) => {
            tracing::warn!("encoding the metrics: {e}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding the metrics failed\n",
            )
                .into_response()
        }
    }
}
