//! Network-namespace helpers: run closures inside a named netns, `ip -n` wrappers,
//! interface index / MAC lookup.

use anyhow::{Context, Result, anyhow, bail};
use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};

/// Runs `f` on a fresh thread that first joins the network namespace
/// `/var/run/netns/<ns>` (`setns(CLONE_NEWNET)`), so sockets created by `f` live in
/// that namespace. The caller's thread never changes namespace.
///
/// Panics if the namespace cannot be entered (use [`try_run_in_ns`] to get an error)
/// and propagates a panic of `f`.
pub fn run_in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    match try_run_in_ns(ns, f) {
        Ok(v) => v,
        Err(e) => panic!("run_in_ns({ns}): {e:#}"),
    }
}

/// Like [`run_in_ns`] but returns an error if the namespace cannot be entered.
pub fn try_run_in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let fd = open_netns(ns)?;
    std::thread::scope(|s| {
        let h = s.spawn(move || -> Result<T> {
            // SAFETY: setns on a valid, owned netns fd; it only affects this fresh thread.
            let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("setns({ns})"));
            }
            drop(fd);
            Ok(f())
        });
        match h.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

/// Opens `/var/run/netns/<ns>` (O_RDONLY|O_CLOEXEC).
pub fn open_netns(ns: &str) -> Result<OwnedFd> {
    let path = CString::new(format!("/var/run/netns/{ns}"))?;
    // SAFETY: path is a valid NUL-terminated C string.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("open /var/run/netns/{ns}"));
    }
    // SAFETY: fd was just returned by open() and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Runs a command to completion; on failure the error contains the command line,
/// exit status and stderr. Returns stdout.
pub fn run_cmd<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<String> {
    run_cmd_stdin(program, args, None)
}

/// Like [`run_cmd`] but feeds `stdin` to the command.
pub fn run_cmd_stdin<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    stdin: Option<&str>,
) -> Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let line = || {
        let mut s = program.to_string();
        for a in args {
            s.push(' ');
            s.push_str(&a.as_ref().to_string_lossy());
        }
        s
    };
    let mut child = cmd.spawn().with_context(|| format!("spawn `{}`", line()))?;
    if let Some(input) = stdin {
        use std::io::Write;
        let mut si = child.stdin.take().expect("piped stdin");
        si.write_all(input.as_bytes())
            .with_context(|| format!("write stdin of `{}`", line()))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("wait `{}`", line()))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            line(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            stdin
                .map(|s| format!("\n--- stdin ---\n{s}"))
                .unwrap_or_default()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip -n <ns> <args...>`; returns stdout, error includes stderr.
pub fn ip<S: AsRef<str>>(ns: &str, args: &[S]) -> Result<String> {
    let mut v: Vec<&str> = vec!["-n", ns];
    v.extend(args.iter().map(|a| a.as_ref()));
    run_cmd("ip", &v)
}

/// Runs `ip netns exec <ns> <program> <args...>`; returns stdout, error includes stderr.
pub fn ns_exec<S: AsRef<str>>(ns: &str, program: &str, args: &[S]) -> Result<String> {
    let mut v: Vec<&str> = vec!["netns", "exec", ns, program];
    v.extend(args.iter().map(|a| a.as_ref()));
    run_cmd("ip", &v)
}

/// Interface index of `ifname` inside namespace `ns`.
pub fn ifindex(ns: &str, ifname: &str) -> Result<u32> {
    let name = CString::new(ifname)?;
    let idx = try_run_in_ns(ns, || {
        // SAFETY: name is a valid C string.
        unsafe { libc::if_nametoindex(name.as_ptr()) }
    })?;
    if idx == 0 {
        bail!("no interface {ifname} in netns {ns}");
    }
    Ok(idx)
}

/// MAC address of `ifname` inside namespace `ns` (SIOCGIFHWADDR).
pub fn mac(ns: &str, ifname: &str) -> Result<[u8; 6]> {
    if ifname.len() >= libc::IFNAMSIZ {
        bail!("interface name too long: {ifname}");
    }
    try_run_in_ns(ns, || -> Result<[u8; 6]> {
        // SAFETY: plain socket() call; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: fd is a fresh socket we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
            *d = s as libc::c_char;
        }
        // SAFETY: SIOCGIFHWADDR with a valid ifreq pointer that outlives the call.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) };
        if rc != 0 {
            return Err(anyhow!(
                "SIOCGIFHWADDR {ifname} in {ns}: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: after a successful SIOCGIFHWADDR the union holds ifru_hwaddr.
        let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
        let mut m = [0u8; 6];
        for (d, s) in m.iter_mut().zip(sa.sa_data.iter()) {
            *d = *s as u8;
        }
        Ok(m)
    })?
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn fmt_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// Names listed by `ip netns list` (first token of each line).
pub fn list_netns() -> Result<Vec<String>> {
    let out = run_cmd::<&str>("ip", &["netns", "list"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// PIDs of processes inside `ns` (`ip netns pids`).
pub fn netns_pids(ns: &str) -> Vec<i32> {
    run_cmd("ip", &["netns", "pids", ns])
        .map(|o| {
            o.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Writes a sysctl under /proc/sys from inside `ns` (net.* sysctls are per netns).
pub fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    try_run_in_ns(ns, || std::fs::write(&path, value))?
        .with_context(|| format!("sysctl {key}={value} in {ns}"))
}

/// A TCP/IP counter of namespace `ns` from `/proc/net/netstat` or `/proc/net/snmp` (for
/// example `TcpExt` `TCPDSACKOldSent`), read in a thread inside the namespace. An error
/// when the counter does not exist: a misspelled name must not read as 0.
pub fn net_counter(ns: &str, group: &str, name: &str) -> Result<u64> {
    let text = try_run_in_ns(ns, || -> Result<String> {
        let mut s = std::fs::read_to_string("/proc/thread-self/net/netstat")?;
        s.push_str(&std::fs::read_to_string("/proc/thread-self/net/snmp")?);
        Ok(s)
    })??;
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if let Some(i) = names.split_whitespace().position(|n| n == name) {
            let v = values
                .split_whitespace()
                .nth(i)
                .with_context(|| format!("{group} {name}: no value in {values:?}"))?;
            return v.parse().with_context(|| format!("{group} {name} = {v:?}"));
        }
    }
    bail!("no counter {group} {name} in namespace {ns}")
}
