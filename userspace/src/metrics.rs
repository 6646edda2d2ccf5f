//! Prometheus text exposition of the data plane's counters, the channel status, the VM
//! and the role controller, served at GET /metrics (axum).
use std::{fmt::Write as _, sync::Arc, sync::atomic::Ordering::Relaxed};

use ft_common::maps::{COUNTER_INFO, HIST_BUCKETS, hist_upper_us, role_name};

use crate::daemon::Shared;

pub fn render(sh: &Shared) -> String {
    let mut o = String::new();
    let dp = &sh.dp;
    let counters = dp.counters().unwrap_or_default();
    let mut families: Vec<&str> = Vec::new();
    for (idx, family, reason) in COUNTER_INFO {
        if !families.contains(family) {
            families.push(family);
            let _ = writeln!(o, "# TYPE {family} counter");
        }
        let v = counters.get(*idx as usize).copied().unwrap_or(0);
        if reason.is_empty() {
            let _ = writeln!(o, "{family} {v}");
        } else {
            let _ = writeln!(o, "{family}{{reason=\"{reason}\"}} {v}");
        }
    }
    let hist = dp.hold_histogram().unwrap_or_default();
    let _ = writeln!(
        o,
        "# HELP ft_output_hold_seconds Time VM output frames were held by the output rule"
    );
    let _ = writeln!(o, "# TYPE ft_output_hold_seconds histogram");
    let mut cum = 0u64;
    for i in 0..HIST_BUCKETS {
        cum += hist.get(i as usize).copied().unwrap_or(0);
        match hist_upper_us(i) {
            Some(us) => {
                let _ = writeln!(
                    o,
                    "ft_output_hold_seconds_bucket{{le=\"{}\"}} {cum}",
                    us as f64 / 1e6
                );
            }
            None => {
                let _ = writeln!(o, "ft_output_hold_seconds_bucket{{le=\"+Inf\"}} {cum}");
            }
        }
    }
    let _ = writeln!(o, "ft_output_hold_seconds_count {cum}");
    let (seq, chan) = (dp.seq_state(), dp.chan_state());
    if let (Ok(ctl), Ok(node)) = (dp.hold_ctl(), dp.node_state()) {
        let gauges: [(&str, u64); 8] = [
            ("ft_log_last_seq", seq.last_seq),
            ("ft_log_acked_seq", seq.acked),
            ("ft_log_delivered_seq", chan.delivered),
            ("ft_vmlog_last_seq", chan.vm_last),
            ("ft_vmlog_acked_seq", seq.vm_acked),
            ("ft_output_held_frames", ctl.tail.wrapping_sub(ctl.head)),
            ("ft_epoch", node.epoch),
            ("ft_peer_alive", sh.status.peer_alive.load(Relaxed) as u64),
        ];
        for (name, v) in gauges {
            let _ = writeln!(o, "# TYPE {name} gauge\n{name} {v}");
        }
        let lease = lease_remaining_s(node.lease_deadline_ns);
        let _ = writeln!(
            o,
            "# TYPE ft_lease_remaining_seconds gauge\nft_lease_remaining_seconds {lease}"
        );
        let _ = writeln!(
            o,
            "# TYPE ft_role gauge\nft_role{{role=\"{}\"}} 1",
            role_name(node.role)
        );
    }
    let s = &sh.status;
    for (name, v) in [
        ("ft_channel_acks_sent_total", &s.acks_sent),
        ("ft_channel_nacks_sent_total", &s.nacks_sent),
        ("ft_channel_heartbeats_sent_total", &s.heartbeats_sent),
        ("ft_channel_frames_to_vm_total", &s.frames_to_vm),
        ("ft_channel_vm_deliver_errors_total", &s.vm_deliver_errors),
        ("ft_channel_send_errors_total", &s.send_errors),
        ("ft_channel_peer_down_events_total", &s.peer_down_events),
        ("ft_afxdp_rx_dropped_total", &s.xsk_rx_dropped),
        ("ft_afxdp_rx_ring_full_total", &s.xsk_rx_ring_full),
        ("ft_afxdp_fill_ring_empty_total", &s.xsk_fill_ring_empty),
    ] {
        let _ = writeln!(o, "# TYPE {name} counter\n{name} {}", v.load(Relaxed));
    }
    if let Some(vm) = &sh.vm {
        render_vm(&mut o, vm);
    }
    render_roles(&mut o, &sh.roles);
    o
}

/// Role changes and the phases of the last failover.
fn render_roles(o: &mut String, roles: &crate::role::Roles) {
    let _ = writeln!(
        o,
        "# TYPE ft_role_changes_total counter\nft_role_changes_total {}",
        roles.changes()
    );
    let _ = writeln!(
        o,
        "# TYPE ft_halted gauge\nft_halted {}",
        roles.halted() as u8
    );
    let _ = writeln!(
        o,
        "# HELP ft_arbiter_blocked_seconds How long a needed test-and-set has waited for an arbiter that does not answer (0: not blocked)\n# TYPE ft_arbiter_blocked_seconds gauge\nft_arbiter_blocked_seconds {}",
        roles
            .arbiter_wait()
            .map_or(0.0, |w| w.since.elapsed().as_secs_f64())
    );
    if let Some(f) = roles.last_failover() {
        let _ = writeln!(
            o,
            "# HELP ft_failover_last_phase_seconds Phases of the last failover (detect, test_and_set, drain, announce, total)\n# TYPE ft_failover_last_phase_seconds gauge"
        );
        for (phase, ms) in [
            ("detect", f.detect_ms),
            ("test_and_set", f.test_and_set_ms),
            ("drain", f.drain_ms),
            ("announce", f.announce_ms),
            ("total", f.total_ms),
        ] {
            let _ = writeln!(
                o,
                "ft_failover_last_phase_seconds{{phase=\"{phase}\"}} {}",
                ms / 1e3
            );
        }
    }
}

/// The protected VM: the VMM's progress, the VMM log stream, replay and divergence.
fn render_vm(o: &mut String, vm: &crate::vm::VmState) {
    let (l, st) = (&vm.live, &vm.stats);
    for (name, v) in [
        ("ft_vm_exits_total", l.exits.load(Relaxed)),
        ("ft_vm_rx_frames_total", l.rx_frames.load(Relaxed)),
        ("ft_vm_tx_frames_total", l.tx_frames.load(Relaxed)),
        ("ft_vm_log_entries_total", l.log_entries.load(Relaxed)),
        ("ft_vm_checkpoints_total", l.checkpoints.load(Relaxed)),
        (
            "ft_vm_entries_received_total",
            vm.entries_received.load(Relaxed),
        ),
        (
            "ft_vm_entries_replayed_total",
            l.entries_consumed.load(Relaxed),
        ),
        (
            "ft_vm_checkpoints_verified_total",
            l.checkpoints_verified.load(Relaxed),
        ),
        ("ft_vm_frame_waits_total", l.frame_waits.load(Relaxed)),
        ("ft_vmlog_sent_frames_total", st.frames.load(Relaxed)),
        ("ft_vmlog_sent_bytes_total", st.bytes.load(Relaxed)),
        (
            "ft_vmlog_retransmitted_frames_total",
            st.retransmits.load(Relaxed),
        ),
        ("ft_vmlog_send_errors_total", st.send_errors.load(Relaxed)),
        ("ft_vmlog_window_stalls_total", st.stalls.load(Relaxed)),
        (
            "ft_vmlog_discarded_entries_total",
            st.discarded.load(Relaxed),
        ),
    ] {
        let _ = writeln!(o, "# TYPE {name} counter\n{name} {v}");
    }
    let _ = writeln!(
        o,
        "# TYPE ft_vmlog_window_stall_seconds_total counter\nft_vmlog_window_stall_seconds_total {}",
        st.stall_ns.load(Relaxed) as f64 / 1e9
    );
    let div = vm.divergence.lock().unwrap().clone();
    let _ = writeln!(
        o,
        "# HELP ft_vm_diverged 1 once this backup found its replica different from the primary\n\
         # TYPE ft_vm_diverged gauge\nft_vm_diverged {}",
        div.is_some() as u8
    );
    if let Some(d) = div {
        let _ = writeln!(
            o,
            "# TYPE ft_vm_divergence_exit gauge\nft_vm_divergence_exit {}\n\
             # TYPE ft_vm_divergence_verified_exit gauge\nft_vm_divergence_verified_exit {}",
            d.exit, d.verified
        );
    }
    let _ = writeln!(
        o,
        "# TYPE ft_vm_solo gauge\nft_vm_solo {}\n# TYPE ft_vm_phase gauge\nft_vm_phase{{phase=\"{}\"}} 1",
        vm.solo.load(Relaxed) as u8,
        vm.phase.lock().unwrap()
    );
    render_join(o, vm);
}

/// Re-protection: joins served, the last one's pause and size, a running one's progress.
fn render_join(o: &mut String, vm: &crate::vm::VmState) {
    let _ = writeln!(
        o,
        "# HELP ft_joins_total Backups that joined this node by state transfer\n\
         # TYPE ft_joins_total counter\nft_joins_total {}",
        vm.joined.load(Relaxed)
    );
    let _ = writeln!(
        o,
        "# HELP ft_join_bad_requests_total Connections to the join service that were not a join request (dropped)\n\
         # TYPE ft_join_bad_requests_total counter\nft_join_bad_requests_total {}",
        vm.join_bad_requests.load(Relaxed)
    );
    let _ = writeln!(
        o,
        "# HELP ft_join_auth_failures_total Join hellos refused because they did not prove the channel key\n\
         # TYPE ft_join_auth_failures_total counter\nft_join_auth_failures_total {}",
        vm.join_auth_failures.load(Relaxed)
    );
    let _ = writeln!(
        o,
        "# HELP ft_control_frames_bad_tag_total VMNACK/LEAVE frames the daemon ignored for a wrong or missing tag (XDP drops most first: ft_drops_total{{reason=\"bad_mac\"}})\n\
         # TYPE ft_control_frames_bad_tag_total counter\nft_control_frames_bad_tag_total {}",
        vm.stats.bad_tags.load(Relaxed)
    );
    let j = vm.join.lock().unwrap().clone();
    let Some(j) = j else { return };
    let num = |k: &str| j[k].as_f64().unwrap_or(0.0);
    let running = !matches!(j["phase"].as_str(), Some("done") | Some("failed"));
    let _ = writeln!(
        o,
        "# HELP ft_join_running 1 while a state transfer to or from the peer runs\n\
         # TYPE ft_join_running gauge\nft_join_running {}",
        running as u8
    );
    if running {
        let _ = writeln!(
            o,
            "# TYPE ft_join_sent_bytes gauge\nft_join_sent_bytes {}\n\
             # TYPE ft_join_dirty_pages_per_second gauge\nft_join_dirty_pages_per_second {}\n\
             # TYPE ft_join_remaining_seconds gauge\nft_join_remaining_seconds {}",
            num("bytes_sent"),
            num("dirty_pages_per_s"),
            num("remaining_s")
        );
    } else if j["phase"] == "done" {
        let _ = writeln!(
            o,
            "# HELP ft_join_last_pause_seconds How long the guest paused in the last join's stop phase\n\
             # TYPE ft_join_last_pause_seconds gauge\nft_join_last_pause_seconds {}\n\
             # TYPE ft_join_last_bytes gauge\nft_join_last_bytes {}\n\
             # TYPE ft_join_last_seconds gauge\nft_join_last_seconds {}",
            num("pause_ms") / 1e3,
            num("bytes"),
            num("total_ms") / 1e3
        );
    }
}

pub fn lease_remaining_s(deadline_ns: u64) -> f64 {
    if deadline_ns == u64::MAX {
        return f64::INFINITY;
    }
    deadline_ns.saturating_sub(ft_fence::monotonic_now_ns()) as f64 / 1e9
}

/// Serves GET /metrics until the listener fails. One short request per connection.
/// Serves `GET /metrics` (Prometheus text format) until the listener fails.
pub async fn serve(listener: tokio::net::TcpListener, sh: Arc<Shared>) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let sh = sh.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    render(&sh),
                )
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("metrics endpoint stopped: {e}");
    }
}
