//! Shared fixtures: network namespaces with a tap (torn down on drop, also on panic),
//! stock redis-cli/redis-benchmark runs inside them, VMM threads, a tiny ELF builder.
#![allow(dead_code)]

pub mod synth;

use ft_vmm::abi::*;
use ft_vmm::net::{Tap, in_netns};
use ft_vmm::{Control, RunReport, Vmm, VmmConfig};
use std::process::{Command, Output};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const GUEST_IP: &str = "10.0.0.2";
pub const HOST_IP: &str = "10.0.0.1";
pub const TAP: &str = "ftap0";

/// A network namespace `ftvmm-<tag>-<pid>` with a persistent tap `ftap0` (host side
/// 10.0.0.1/24). Deleted on drop.
pub struct NetNs {
    pub name: String,
}

fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn command")
}

impl NetNs {
    pub fn new(tag: &str) -> NetNs {
        let name = format!("ftvmm-{tag}-{}", std::process::id());
        let _ = sh(&["ip", "netns", "del", &name]);
        let o = sh(&["ip", "netns", "add", &name]);
        assert!(
            o.status.success(),
            "ip netns add: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let ns = NetNs { name };
        ns.must(&["ip", "link", "set", "lo", "up"]);
        ns.must(&["ip", "tuntap", "add", "dev", TAP, "mode", "tap"]);
        // No IPv6 on the tap: the host kernel would send router solicitations and MLD
        // reports to the guest at times of its own choosing (timing-dependent input).
        ns.must(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{TAP}.disable_ipv6=1"),
        ]);
        ns.must(&["ip", "addr", "add", &format!("{HOST_IP}/24"), "dev", TAP]);
        ns.must(&["ip", "link", "set", TAP, "up"]);
        ns
    }

    pub fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.name, "timeout", "120"];
        full.extend_from_slice(args);
        sh(&full)
    }

    pub fn must(&self, args: &[&str]) -> String {
        let o = self.exec(args);
        assert!(
            o.status.success(),
            "{args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// One redis-cli command against the guest; returns trimmed stdout.
    pub fn redis(&self, args: &[&str]) -> String {
        let mut a = vec!["redis-cli", "-h", GUEST_IP];
        a.extend_from_slice(args);
        self.must(&a).trim().to_string()
    }

    /// Waits until the guest answers PING.
    pub fn wait_ready(&self, timeout: Duration) {
        let t = Instant::now();
        while t.elapsed() < timeout {
            let o = self.exec(&["redis-cli", "-h", GUEST_IP, "PING"]);
            if String::from_utf8_lossy(&o.stdout).contains("PONG") {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("guest did not answer PING within {timeout:?}");
    }

    /// A TCP connection made inside the namespace (optionally from `src`, an address of
    /// the namespace).
    pub fn connect(
        &self,
        dst: &str,
        port: u16,
        src: Option<&str>,
    ) -> std::io::Result<std::net::TcpStream> {
        let ns = self.name.clone();
        let dst: std::net::SocketAddr = format!("{dst}:{port}").parse().expect("address");
        let src: Option<std::net::SocketAddr> =
            src.map(|s| format!("{s}:0").parse().expect("address"));
        in_netns(&ns, move || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .map_err(ft_vmm::Error::LogIo)?;
            if let Some(a) = src {
                s.bind(&a.into()).map_err(ft_vmm::Error::LogIo)?;
            }
            s.connect_timeout(&dst.into(), Duration::from_secs(5))
                .map_err(ft_vmm::Error::LogIo)?;
            s.set_tcp_nodelay(true).map_err(ft_vmm::Error::LogIo)?;
            Ok(std::net::TcpStream::from(s))
        })
        .map_err(|e| match e {
            ft_vmm::Error::LogIo(io) => io,
            other => std::io::Error::other(other.to_string()),
        })
    }

    /// Opens the namespace's tap for a VMM.
    pub fn open_tap(&self) -> Tap {
        let ns = self.name.clone();
        in_netns(&ns, || Tap::open(TAP)).expect("open tap in netns")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

pub fn cfg(mode: ft_vmm::Mode) -> VmmConfig {
    VmmConfig {
        mode,
        capture_tx: true,
        checkpoint_interval: 500,
        ..Default::default()
    }
}

/// What a VMM thread returns: its report and captured output frames.
pub type VmmResult = Result<(RunReport, Vec<Vec<u8>>), ft_vmm::Error>;

pub struct VmmThread {
    pub control: Arc<Control>,
    pub handle: JoinHandle<VmmResult>,
}

/// Builds a VMM on a new thread (`setup` attaches sinks/sources/backends) and runs it.
pub fn spawn_vmm(cfg: VmmConfig, setup: impl FnOnce(&mut Vmm) + Send + 'static) -> VmmThread {
    let control = Control::new();
    let c = control.clone();
    let handle = std::thread::spawn(move || {
        let mut vmm = Vmm::new(cfg, ft_vmm::GUEST_ELF, c)?;
        setup(&mut vmm);
        let r = vmm.run()?;
        Ok((r, vmm.captured_tx().map(|c| c.to_vec()).unwrap_or_default()))
    });
    VmmThread { control, handle }
}

impl VmmThread {
    pub fn stop(self) -> VmmResult {
        self.control.request_stop();
        self.handle.join().expect("vmm thread panicked")
    }
}

/// Runs `f` on a thread and fails the test if it takes longer than `limit`.
pub fn with_timeout<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        // The worker ended without a result: it panicked. Re-raise its panic now (with
        // its own message) instead of reporting a hang.
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match worker.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => panic!("worker thread ended without a result"),
        },
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("timed out after {limit:?} (hang)")
        }
    }
}

/// `movabs rax, [addr]` (8-byte load from a 64-bit absolute address).
pub fn load_rax(c: &mut Vec<u8>, addr: u64) {
    c.extend_from_slice(&[0x48, 0xA1]);
    c.extend_from_slice(&addr.to_le_bytes());
}

/// `movabs [addr], rax` (8-byte store to a 64-bit absolute address).
pub fn store_rax(c: &mut Vec<u8>, addr: u64) {
    c.extend_from_slice(&[0x48, 0xA3]);
    c.extend_from_slice(&addr.to_le_bytes());
}

/// A minimal guest ELF: header + 32 exception stubs + iretq handlers + `code` at entry.
pub fn build_elf(code: &[u8]) -> Vec<u8> {
    let base = IMAGE_BASE;
    let stubs_off = 0x40u64;
    let irq_off = stubs_off + 32 * EXC_STUB_STRIDE;
    let entry_off = irq_off + 16;
    let mut seg = vec![0u8; entry_off as usize];
    seg[..8].copy_from_slice(&GUEST_MAGIC);
    seg[8..12].copy_from_slice(&GUEST_ABI_VERSION.to_le_bytes());
    let words = [
        base + entry_off,
        base + stubs_off,
        base + irq_off,
        base + irq_off,
        base + entry_off + code.len() as u64,
    ];
    for (i, w) in words.iter().enumerate() {
        seg[16 + 8 * i..24 + 8 * i].copy_from_slice(&w.to_le_bytes());
    }
    for v in 0..32u64 {
        let o = (stubs_off + v * EXC_STUB_STRIDE) as usize;
        // mov eax, MMIO_BASE + REG_FAULT ; mov dword ptr [rax], v ; jmp $
        let a = ((MMIO_BASE + REG_FAULT) as u32).to_le_bytes();
        let s = [
            0xB8, a[0], a[1], a[2], a[3], 0xC7, 0x00, v as u8, 0, 0, 0, 0xEB, 0xFE,
        ];
        seg[o..o + s.len()].copy_from_slice(&s);
    }
    seg[irq_off as usize..irq_off as usize + 2].copy_from_slice(&[0x48, 0xCF]); // iretq
    seg.extend_from_slice(code);
    let mut elf = vec![0u8; 64 + 56];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    elf[6] = 1;
    elf[16..18].copy_from_slice(&2u16.to_le_bytes());
    elf[18..20].copy_from_slice(&62u16.to_le_bytes());
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&(base + entry_off).to_le_bytes());
    elf[32..40].copy_from_slice(&64u64.to_le_bytes());
    elf[52..54].copy_from_slice(&64u16.to_le_bytes());
    elf[54..56].copy_from_slice(&56u16.to_le_bytes());
    elf[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = 64;
    elf[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
    elf[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes());
    elf[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes());
    elf[ph + 16..ph + 24].copy_from_slice(&base.to_le_bytes());
    elf[ph + 24..ph + 32].copy_from_slice(&base.to_le_bytes());
    elf[ph + 32..ph + 40].copy_from_slice(&(seg.len() as u64).to_le_bytes());
    elf[ph + 40..ph + 48].copy_from_slice(&(seg.len() as u64).to_le_bytes());
    elf[ph + 48..ph + 56].copy_from_slice(&1u64.to_le_bytes());
    elf.extend_from_slice(&seg);
    elf
}

/// A sink that can be cut (the primary "crashes": nothing more reaches the backup, and
/// the stream ends without an END entry when the primary goes away).
pub struct CuttableSink {
    pub inner: ft_vmm::vmlog::ChannelSink,
    pub cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ft_vmm::vmlog::LogSink for CuttableSink {
    fn append(
        &mut self,
        hdr: &ft_common::vmlog::EntryHdr,
        payload: &[u8],
    ) -> ft_vmm::error::Result<()> {
        if self.cut.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        self.inner.append(hdr, payload)
    }
    fn flush(&mut self) -> ft_vmm::error::Result<()> {
        if self.cut.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        self.inner.flush()
    }
}

/// INCR `key` with redis-cli until the guest answers (e.g. after a go-live), bounded by
/// `timeout`; the value.
pub fn incr_when_up(ns: &NetNs, key: &str, timeout: Duration) -> i64 {
    let t = std::time::Instant::now();
    loop {
        let o = ns.exec(&["redis-cli", "-h", GUEST_IP, "INCR", key]);
        let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if let Ok(v) = s.parse::<i64>() {
            return v;
        }
        assert!(
            t.elapsed() < timeout,
            "the guest did not answer INCR {key} within {timeout:?}: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
