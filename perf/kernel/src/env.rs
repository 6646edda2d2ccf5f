//! The process's environment: a private network namespace with the test's own
//! interfaces, CPU pinning, and facts about the machine for the results.
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Moves the calling thread (call it first, from `main`, before any other thread exists:
/// threads created later inherit it) into a new network namespace with its loopback up.
/// Everything the benchmark creates or transmits stays there and vanishes with the process.
pub fn enter_private_netns() -> Result<()> {
    // SAFETY: unshare(2) with CLONE_NEWNET only changes the calling thread's network
    // namespace; it reads and writes no memory of ours.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNET) (run as root)");
    }
    ip(&["link", "set", "lo", "up"])
}

/// Runs `ip ARGS` (in this thread's namespace: a child starts in its parent's).
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A veth pair `a` <-> `b`, both up, with `mtu`.
pub fn veth(a: &str, b: &str, mtu: u32) -> Result<()> {
    ip(&["link", "add", a, "type", "veth", "peer", "name", b])?;
    let mtu = mtu.to_string();
    for d in [a, b] {
        ip(&["link", "set", d, "mtu", &mtu, "up"])?;
    }
    Ok(())
}

pub fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("interface {name}: {}", std::io::Error::last_os_error());
    }
    Ok(i)
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is a plain bit array for which all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= libc::CPU_SETSIZE as usize {
        bail!("cpu {cpu} out of range");
    }
    // SAFETY: CPU_SET writes one bit inside `set`; `cpu` < CPU_SETSIZE (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 = the calling thread.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("sched_setaffinity to CPU {cpu}"));
    }
    Ok(())
}

pub fn date_utc() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':').map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "?".into())
}

/// CPU time of the calling thread (ns), kernel time included.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec that we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time (ns) that `ksoftirqd/<cpu>` has run: softirq work deferred out of the
/// measured thread (the kernel's test-run timer would not see it).
pub fn ksoftirqd_ns(cpu: usize) -> Option<u64> {
    let want = format!("ksoftirqd/{cpu}");
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim() == want {
            let s = std::fs::read_to_string(e.path().join("schedstat")).ok()?;
            return s.split_whitespace().next()?.parse().ok();
        }
    }
    None
}
