//! The collectors: each reads its source when Prometheus scrapes and encodes it. Names
//! are written in full as exposed (a counter's `_total` included: the encoder appends it
//! to the family name, so [`counter`] strips it first).
use std::{
    fmt,
    sync::{Arc, atomic::Ordering::Relaxed},
};

use ft_common::maps::{COUNTER_INFO, HIST_BUCKETS, HIST_SUM_SLOT, hist_upper_us};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeMetric, NoLabelSet},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use super::{DataPlaneView, RolesView, lease_remaining_s};
use crate::{
    channel::status::ChannelStatus,
    role::NodeRole,
    vm::{VmPhase, VmState},
};

type Res = Result<(), fmt::Error>;

/// A counter; `name` ends in `_total`.
fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: impl EncodeCounterValue) -> Res {
    let family = family_name(name);
    ConstCounter::new(v).encode(e.encode_descriptor(family, help, None, MetricType::Counter)?)
}

/// `name` without its `_total` (the family name of a counter).
pub(super) fn family_name(name: &str) -> &str {
    debug_assert!(
        name.ends_with("_total"),
        "counter {name} must end in _total"
    );
    name.strip_suffix("_total").unwrap_or(name)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: impl EncodeGaugeValue) -> Res {
    ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// A gauge with one series per value of `label`.
fn labelled_gauges<V: EncodeGaugeValue + Copy>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    series: &[(&str, V)],
) -> Res {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (value, v) in series {
        ConstGauge::new(*v).encode(m.encode_family(&[(label, *value)])?)?;
    }
    Ok(())
}

/// Help of the data plane's `COUNTERS` families (`ft_common::maps::COUNTER_INFO`).
pub(super) fn counter_help(family: &str) -> Option<&'static str> {
    Some(match family {
        "ft_client_rx_vm_frames_total" => {
            "Client frames addressed to the VM seen on the client NIC"
        }
        "ft_log_duplicated_frames_total" => {
            "Log frames made by duplicating client frames (primary)"
        }
        "ft_log_duplicated_bytes_total" => {
            "Bytes of the client frames duplicated into the log (primary)"
        }
        "ft_solo_delivered_frames_total" => {
            "Client frames delivered to the VM without a log (solo)"
        }
        "ft_log_received_frames_total" => "Valid log frames handed to the backup daemon",
        "ft_log_received_retransmits_total" => "Of those, retransmissions (repairs of a NACK)",
        "ft_heartbeats_received_total" => "Heartbeats received from the primary (backup)",
        "ft_acks_received_total" => "Acks received from the backup (primary)",
        "ft_nacks_received_total" => "NACKs received from the backup (primary)",
        "ft_log_retransmitted_frames_total" => {
            "Log entries the kernel resent from the retransmission store in answer to a NACK (primary)"
        }
        "ft_output_held_frames_total" => "VM output frames put into the hold ring",
        "ft_output_released_frames_total" => "Held VM output frames released to the client NIC",
        "ft_acks_stale_total" => {
            "Acks that did not advance the cumulative ack (reordered or repeated; harmless)"
        }
        "ft_release_lock_busy_total" => "Release attempts that found another CPU releasing",
        "ft_drops_total" => "Frames the data plane dropped, by reason",
        "ft_release_blocked_no_lease_total" => {
            "Release passes that emitted nothing because this node's lease was not valid"
        }
        "ft_vmlog_received_frames_total" => "VMLOG frames handed to the backup daemon",
        "ft_vmnacks_received_total" => "VMNACK frames passed to the primary daemon",
        "ft_leave_received_total" => "LEAVE frames passed to the primary daemon",
        "ft_kernel_acks_sent_total" => {
            "Acks the backup's XDP sent itself (an in-order log frame buffered in its ring, or a heartbeat's flush)"
        }
        "ft_kernel_acks_deferred_total" => {
            "In-order log frames the backup's XDP confirmed without sending an ack (batching: the daemon's next ack carries them)"
        }
        "ft_release_kicks_total" => {
            "Release passes the daemon triggered with a kick frame on the VM NIC (role change)"
        }
        _ => return None,
    })
}

const HOLD_HELP: &str = "Time VM output frames were held by the output rule";

/// The BPF maps: `COUNTERS`, `HOLD_HIST`, and the sequence, hold-ring and node state.
pub(super) struct DataPlaneMetrics {
    pub dp: Arc<dyn DataPlaneView>,
}

impl fmt::Debug for DataPlaneMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataPlaneMetrics")
    }
}

impl Collector for DataPlaneMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> Res {
        let dp = &self.dp;
        match dp.counters() {
            Ok(counters) => encode_counters(&mut e, &counters)?,
            Err(err) => tracing::warn!("metrics: reading COUNTERS: {err:#}"),
        }
        match dp.hold_histogram() {
            Ok(hist) => encode_hold_histogram(&mut e, &hist)?,
            Err(err) => tracing::warn!("metrics: reading HOLD_HIST: {err:#}"),
        }
        let (seq, chan) = (dp.seq_state(), dp.chan_state());
        let (ctl, node) = match (dp.hold_ctl(), dp.node_state()) {
            (Ok(ctl), Ok(node)) => (ctl, node),
            (Err(err), _) | (_, Err(err)) => {
                tracing::warn!("metrics: reading HOLD_CTL/NODE: {err:#}");
                return Ok(());
            }
        };
        let e = &mut e;
        gauge(
            e,
            "ft_log_last_seq",
            "Highest input sequence assigned (primary)",
            seq.last_seq,
        )?;
        gauge(
            e,
            "ft_log_acked_seq",
            "Highest input sequence the backup acked (primary)",
            seq.acked,
        )?;
        gauge(
            e,
            "ft_log_delivered_seq",
            "Highest input sequence delivered in order (backup)",
            chan.delivered,
        )?;
        gauge(
            e,
            "ft_vmlog_last_seq",
            "Highest VMLOG sequence handed to the logging link (primary)",
            chan.vm_last,
        )?;
        gauge(
            e,
            "ft_vmlog_acked_seq",
            "Highest VMLOG sequence the backup acked (primary)",
            seq.vm_acked,
        )?;
        gauge(
            e,
            "ft_output_held_frames",
            "VM output frames in the hold ring now",
            ctl.tail.wrapping_sub(ctl.head),
        )?;
        gauge(e, "ft_epoch", "Fencing epoch of this node", node.epoch)?;
        gauge(
            e,
            "ft_lease_remaining_seconds",
            "Time left on this node's lease (+Inf: static lease)",
            lease_remaining_s(node.lease_deadline_ns),
        )
    }
}

/// The `COUNTERS` families in the order of `COUNTER_INFO`, a family's series together.
fn encode_counters(e: &mut DescriptorEncoder, counters: &[u64]) -> Res {
    let mut families: Vec<&str> = Vec::new();
    for (_, family, _) in COUNTER_INFO {
        if !families.contains(family) {
            families.push(family);
        }
    }
    for family in families {
        let help = counter_help(family).unwrap_or("A data-plane counter (BPF map COUNTERS)");
        let mut m = e.encode_descriptor(family_name(family), help, None, MetricType::Counter)?;
        for (idx, _, reason) in COUNTER_INFO.iter().filter(|(_, f, _)| *f == family) {
            let v = counters.get(*idx as usize).copied().unwrap_or(0);
            let labels: Vec<(&str, &str)> = if reason.is_empty() {
                Vec::new()
            } else {
                vec![("reason", *reason)]
            };
            ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

/// `ft_output_hold_seconds` from `HOLD_HIST`: bucket `i` counts hold times below
/// `hist_upper_us(i)` microseconds (and at least the previous bound), the last one is
/// open-ended; `_sum` is the data plane's own sum of the hold times.
fn encode_hold_histogram(e: &mut DescriptorEncoder, hist: &[u64]) -> Res {
    let (mut buckets, mut count) = (Vec::new(), 0u64);
    for i in 0..HIST_BUCKETS {
        let n = hist.get(i as usize).copied().unwrap_or(0);
        let upper_s = hist_upper_us(i).map_or(f64::INFINITY, |us| us as f64 / 1e6);
        buckets.push((upper_s, n));
        count += n;
    }
    let sum = hist.get(HIST_SUM_SLOT as usize).copied().unwrap_or(0) as f64 / 1e9;
    let mut m = e.encode_descriptor(
        "ft_output_hold_seconds",
        HOLD_HELP,
        None,
        MetricType::Histogram,
    )?;
    m.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
}

/// The daemon's half of the logging channel.
#[derive(Debug)]
pub(super) struct ChannelMetrics(pub Arc<ChannelStatus>);

impl Collector for ChannelMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> Res {
        let s = &self.0;
        for (name, help, v) in [
            (
                "ft_channel_acks_sent_total",
                "Acks the backup daemon sent",
                &s.acks_sent,
            ),
            (
                "ft_channel_nacks_sent_total",
                "NACKs the backup daemon sent for missing log entries",
                &s.nacks_sent,
            ),
            (
                "ft_channel_heartbeats_sent_total",
                "Heartbeats the primary daemon sent on the logging link",
                &s.heartbeats_sent,
            ),
            (
                "ft_channel_frames_to_vm_total",
                "Log entries the backup daemon delivered to the VM side in order",
                &s.frames_to_vm,
            ),
            (
                "ft_channel_vm_deliver_errors_total",
                "Log entries the backup daemon failed to deliver to the VM side",
                &s.vm_deliver_errors,
            ),
            (
                "ft_channel_send_errors_total",
                "Logging-link sends that failed",
                &s.send_errors,
            ),
            (
                "ft_channel_peer_down_events_total",
                "Times the peer fell silent past the timeout",
                &s.peer_down_events,
            ),
        ] {
            counter(&mut e, name, help, v.load(Relaxed))?;
        }
        Ok(())
    }
}

/// The protected VM: the VMM's progress, the VMM log stream, replay, divergence and
/// re-protection.
pub(super) struct VmMetrics(pub Arc<VmState>);

impl fmt::Debug for VmMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VmMetrics")
    }
}

impl Collector for VmMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> Res {
        let vm = &self.0;
        let (l, st) = (&vm.live, &vm.stats);
        let e = &mut e;
        for (name, help, v) in [
            ("ft_vm_exits_total", "VM exits the VMM handled", &l.exits),
            (
                "ft_vm_rx_frames_total",
                "Frames the guest received",
                &l.rx_frames,
            ),
            (
                "ft_vm_tx_frames_total",
                "Frames the guest sent",
                &l.tx_frames,
            ),
            (
                "ft_vm_log_entries_total",
                "VMM log entries recorded",
                &l.log_entries,
            ),
            (
                "ft_vm_checkpoints_total",
                "Checkpoints recorded",
                &l.checkpoints,
            ),
            (
                "ft_vm_entries_received_total",
                "VMM log entries the backup buffered for replay",
                &vm.entries_received,
            ),
            (
                "ft_vm_entries_replayed_total",
                "VMM log entries the replica consumed",
                &l.entries_consumed,
            ),
            (
                "ft_vm_checkpoints_verified_total",
                "Checkpoints the replica verified against the primary's",
                &l.checkpoints_verified,
            ),
            (
                "ft_vm_frame_waits_total",
                "Times the replay waited for an input frame",
                &l.frame_waits,
            ),
            (
                "ft_vmlog_sent_frames_total",
                "VMLOG frames sent to the backup",
                &st.frames,
            ),
            (
                "ft_vmlog_sent_bytes_total",
                "Bytes of VMLOG frames sent to the backup",
                &st.bytes,
            ),
            (
                "ft_vmlog_retransmitted_frames_total",
                "VMLOG frames resent in answer to a VMNACK",
                &st.retransmits,
            ),
            (
                "ft_vmlog_send_errors_total",
                "VMLOG sends that failed",
                &st.send_errors,
            ),
            (
                "ft_vmlog_window_stalls_total",
                "Flushes of the VMM log that waited for the backup (full window)",
                &st.stalls,
            ),
            (
                "ft_vmlog_discarded_entries_total",
                "VMM log entries discarded because the primary runs alone",
                &st.discarded,
            ),
        ] {
            counter(e, name, help, v.load(Relaxed))?;
        }
        counter(
            e,
            "ft_vmlog_window_stall_seconds_total",
            "Time the VMM log waited for the backup (full window)",
            st.stall_ns.load(Relaxed) as f64 / 1e9,
        )?;
        let div = vm.divergence();
        gauge(
            e,
            "ft_vm_diverged",
            "1 once this backup found its replica different from the primary",
            div.is_some() as u64,
        )?;
        if let Some(d) = div {
            gauge(
                e,
                "ft_vm_divergence_exit",
                "The exit at which the replica was found different",
                d.exit,
            )?;
            gauge(
                e,
                "ft_vm_divergence_verified_exit",
                "The last exit at which the replica was verified equal (the divergence lies after it)",
                d.verified,
            )?;
        }
        gauge(
            e,
            "ft_vm_replay_backlog_bytes",
            "Backup: VMM entries held for the replay beyond its queue (the replay is behind)",
            vm.feed_close().backlog_bytes(),
        )?;
        let phase = vm.phase();
        let phases: Vec<(&str, u64)> = VmPhase::NAMES
            .iter()
            .map(|p| (*p, (*p == phase.name()) as u64))
            .collect();
        labelled_gauges(
            e,
            "ft_vm_phase",
            "The VMM's phase (a state set: 1 for the current one, 0 for the others)",
            "phase",
            &phases,
        )?;
        encode_join(e, vm)
    }
}

/// Re-protection: joins served, the last one's pause and size, a running one's progress.
fn encode_join(e: &mut DescriptorEncoder, vm: &VmState) -> Res {
    counter(
        e,
        "ft_joins_total",
        "Backups that joined this node by state transfer",
        vm.joined(),
    )?;
    counter(
        e,
        "ft_join_bad_requests_total",
        "Connections to the join service that were not a join request (dropped)",
        vm.join_bad_requests.load(Relaxed),
    )?;
    counter(
        e,
        "ft_join_auth_failures_total",
        "Join hellos refused because they did not prove the channel key",
        vm.join_auth_failures.load(Relaxed),
    )?;
    counter(
        e,
        "ft_control_frames_bad_tag_total",
        "VMNACK/LEAVE frames the daemon ignored for a wrong or missing tag (XDP drops most first: ft_drops_total{reason=\"bad_mac\"})",
        vm.stats.bad_tags.load(Relaxed),
    )?;
    let j = vm.join.lock().unwrap().clone();
    let Some(j) = j else { return Ok(()) };
    let num = |k: &str| j[k].as_f64().unwrap_or(0.0);
    let running = !matches!(j["phase"].as_str(), Some("done") | Some("failed"));
    gauge(
        e,
        "ft_join_running",
        "1 while a state transfer to or from the peer runs",
        running as u64,
    )?;
    if running {
        gauge(
            e,
            "ft_join_sent_bytes",
            "Bytes the running join sent so far",
            num("bytes_sent"),
        )?;
        gauge(
            e,
            "ft_join_dirty_pages_per_second",
            "Guest pages dirtied per second during the running join",
            num("dirty_pages_per_s"),
        )?;
        gauge(
            e,
            "ft_join_remaining_seconds",
            "Estimated time left of the running join",
            num("remaining_s"),
        )?;
    } else if j["phase"] == "done" {
        gauge(
            e,
            "ft_join_last_pause_seconds",
            "How long the guest paused in the last join's stop phase",
            num("pause_ms") / 1e3,
        )?;
        gauge(
            e,
            "ft_join_last_bytes",
            "Bytes the last join transferred",
            num("bytes"),
        )?;
        gauge(
            e,
            "ft_join_last_seconds",
            "How long the last join took",
            num("total_ms") / 1e3,
        )?;
    }
    Ok(())
}

/// Role changes, fencing and the phases of the last failover.
pub(super) struct RoleMetrics(pub Arc<dyn RolesView>);

impl fmt::Debug for RoleMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RoleMetrics")
    }
}

impl Collector for RoleMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> Res {
        let (roles, e) = (&self.0, &mut e);
        counter(
            e,
            "ft_role_changes_total",
            "Changes of this node's role",
            roles.changes(),
        )?;
        let role = roles.role();
        let states: Vec<(&str, u64)> = NodeRole::NAMES
            .iter()
            .map(|r| (*r, (*r == role.name()) as u64))
            .collect();
        labelled_gauges(
            e,
            "ft_role",
            "This node's role (a state set: 1 for the current one, 0 for the others)",
            "role",
            &states,
        )?;
        gauge(
            e,
            "ft_halted",
            "1 once this node halted (fail-stop; its daemon then exits)",
            matches!(role, NodeRole::Halted { .. }) as u64,
        )?;
        if let Some(alive) = roles.peer_alive() {
            gauge(
                e,
                "ft_peer_alive",
                "1 while the peer this node watches (a paired primary its backup, a backup its primary) is heard on the logging link",
                alive as u64,
            )?;
        }
        gauge(
            e,
            "ft_arbiter_blocked_seconds",
            "How long a needed test-and-set has waited for an arbiter that does not answer (0: not blocked)",
            roles.arbiter_blocked().map_or(0.0, |d| d.as_secs_f64()),
        )?;
        if let Some(f) = roles.last_failover() {
            let phases = [
                ("detect", f.detect_ms / 1e3),
                ("test_and_set", f.test_and_set_ms / 1e3),
                ("drain", f.drain_ms / 1e3),
                ("announce", f.announce_ms / 1e3),
                ("total", f.total_ms / 1e3),
            ];
            labelled_gauges(
                e,
                "ft_failover_last_phase_seconds",
                "Phases of the last failover (detect, test_and_set, drain, announce, total)",
                "phase",
                &phases,
            )?;
        }
        Ok(())
    }
}

/// The build and the process: which versions of the protocols this ftd speaks (an
/// upgrade's dashboards show both hosts' builds side by side) and the log's rate limit.
#[derive(Debug)]
pub(super) struct ProcessMetrics;

impl Collector for ProcessMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> Res {
        let mut m = e.encode_descriptor(
            "ft_build_info",
            "This ftd's version and the versions of the protocols it speaks (always 1)",
            None,
            MetricType::Gauge,
        )?;
        let (wire, vmlog, join, control) = (
            ft_common::wire::FT_VERSION.to_string(),
            ft_common::vmlog::VMLOG_VERSION.to_string(),
            crate::vm::join::protocol::JOIN_VERSION.to_string(),
            crate::control::protocol::CONTROL_VERSION.to_string(),
        );
        let labels = [
            ("version", env!("CARGO_PKG_VERSION")),
            ("wire", wire.as_str()),
            ("vmlog", vmlog.as_str()),
            ("join", join.as_str()),
            ("control", control.as_str()),
        ];
        ConstGauge::new(1u64).encode(m.encode_family(&labels)?)?;
        counter(
            &mut e,
            "ft_log_suppressed_total",
            "Repeated warnings the log's rate limit dropped (at most 5 a minute per call site are logged)",
            crate::logging::suppressed_total(),
        )
    }
}
