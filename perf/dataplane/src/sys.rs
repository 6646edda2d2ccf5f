//! Socket, thread and interface-counter helpers shared by the phases.
use std::{
    os::fd::{AsRawFd, OwnedFd, RawFd},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Result;
use ft_testbed::{Testbed, names::*, netns::open_netns, try_run_in_ns};

/// AF_PACKET socket in `ns` on `ifname` receiving only EtherType `proto` (0: receive
/// nothing, send only), 8 MiB buffers. Returns (fd, ifindex).
pub fn packet_sock(ns: &str, ifname: &str, proto: u16) -> Result<(OwnedFd, i32)> {
    let (fd, idx) = ft_testbed::raw::open_packet_socket(ns, ifname, proto, 8 << 20, 8 << 20)?;
    Ok((fd, idx as i32))
}

/// poll(POLLIN) with a timeout in ms; true if readable.
pub fn poll_in(fd: RawFd, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&mut p, 1, ms) };
    rc > 0
}

/// Non-blocking receive; Some((len, pkttype)).
pub fn recv_nb(fd: RawFd, buf: &mut [u8]) -> Option<(usize, u8)> {
    ft_testbed::raw::recv_one(fd, buf).ok().flatten()
}

/// send() on a bound packet socket, retrying briefly on ENOBUFS/EAGAIN. True if sent.
pub fn send_frame(fd: RawFd, frame: &[u8]) -> bool {
    for _ in 0..1000 {
        // SAFETY: buffer pointer/len valid for the call.
        let n = unsafe { libc::send(fd, frame.as_ptr() as *const libc::c_void, frame.len(), 0) };
        if n >= 0 {
            return true;
        }
        let e = std::io::Error::last_os_error().raw_os_error();
        if !matches!(
            e,
            Some(libc::ENOBUFS) | Some(libc::EAGAIN) | Some(libc::EINTR)
        ) {
            return false;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    false
}

/// Spawns `f` on a new thread that first enters network namespace `ns`.
pub fn spawn_in_ns<T: Send + 'static>(
    ns: &str,
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>> {
    let fd = open_netns(ns)?;
    let ns_s = ns.to_string();
    Ok(std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            // SAFETY: setns on a valid, owned netns fd; affects only this fresh thread.
            let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns({ns_s}): {}", std::io::Error::last_os_error());
            drop(fd);
            f()
        })?)
}

/// (rx_packets, rx_dropped, tx_packets, tx_dropped) of `ifname` in the calling thread's
/// network namespace (/proc/thread-self/net/dev).
pub fn netdev_stats(ifname: &str) -> Option<(u64, u64, u64, u64)> {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev").ok()?;
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        if name.trim() != ifname {
            continue;
        }
        let v: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if v.len() >= 12 {
            return Some((v[1], v[3], v[9], v[11]));
        }
    }
    None
}

/// Same, for an interface in another namespace.
pub fn netdev_stats_in(ns: &str, ifname: &str) -> (u64, u64, u64, u64) {
    let ifname = ifname.to_string();
    try_run_in_ns(ns, move || netdev_stats(&ifname))
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// `ethtool -S` counters of an interface (empty on failure).
pub fn ethtool_stats(ns: &str, ifname: &str) -> std::collections::BTreeMap<String, u64> {
    let out = ft_testbed::ns_exec(ns, "ethtool", &["-S", ifname]).unwrap_or_default();
    out.lines()
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(':')?;
            Some((k.trim().to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// The interfaces on the burst path whose `ethtool -S` deltas are reported.
pub fn path_ifaces(tb: &Testbed) -> Vec<(String, String, &'static str)> {
    vec![
        (tb.a.ns.clone(), "A".into(), CLI_IF),
        (tb.a.ns.clone(), "A".into(), LOG_IF),
        (tb.wire_ns.clone(), "wire".into(), WIRE_A),
        (tb.wire_ns.clone(), "wire".into(), WIRE_B),
        (tb.b.ns.clone(), "B".into(), LOG_IF),
    ]
}

pub type EthSnap = Vec<std::collections::BTreeMap<String, u64>>;

pub fn ethtool_snap(tb: &Testbed) -> EthSnap {
    path_ifaces(tb)
        .iter()
        .map(|(ns, _, i)| ethtool_stats(ns, i))
        .collect()
}

/// Non-zero deltas of drop/error/xdp counters between two snapshots.
pub fn ethtool_delta(tb: &Testbed, before: &EthSnap, after: &EthSnap) -> Vec<String> {
    let mut out = Vec::new();
    for ((_, host, ifname), (b, a)) in path_ifaces(tb).iter().zip(before.iter().zip(after)) {
        let mut parts = Vec::new();
        for (k, v) in a {
            let d = v.saturating_sub(b.get(k).copied().unwrap_or(0));
            let interesting = k.contains("drop") || k.contains("err") || k.contains("xdp");
            if d > 0 && interesting && !k.contains("bytes") {
                parts.push(format!("{k}=+{d}"));
            }
        }
        if !parts.is_empty() {
            out.push(format!("ethtool {host}/{ifname}: {}", parts.join(" ")));
        }
    }
    out
}
