//! Errors of the VMM. Every message says what happened and what an operator can do.
use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot open /dev/kvm or create the VM ({0}); check that /dev/kvm exists and is accessible (run as root)"
    )]
    Kvm(#[source] kvm_ioctls::Error),
    #[error("KVM ioctl {op} failed: {err}; the host KVM module may not support it")]
    KvmIoctl {
        op: &'static str,
        err: kvm_ioctls::Error,
    },
    #[error(
        "vCPU model: {0}; primary and backup must run the same fixed CPU model (vmm/DEVICES.md, CPU model): use a host whose CPU has these features"
    )]
    CpuModel(String),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error(
        "invalid guest image: {0}; rebuild the guest (cargo build -p ft-vmm builds vmm/guest) or pass the right file"
    )]
    Image(String),
    #[error(
        "guest triple fault (KVM shutdown) at rip={rip:#x}; the guest's IDT/stack is broken — check the guest image"
    )]
    TripleFault { rip: u64 },
    #[error(
        "guest exception {name} (vector {vector}) at rip={rip:#x} error_code={error_code:#x} cr2={cr2:#x}; this is a guest bug"
    )]
    GuestFault {
        vector: u64,
        name: &'static str,
        rip: u64,
        error_code: u64,
        cr2: u64,
    },
    #[error(
        "bad device access by the guest: {what} at {addr:#x} (len {len}) rip={rip:#x}; devices take 8-byte MMIO accesses to documented registers only (see DEVICES.md)"
    )]
    BadDeviceAccess {
        what: &'static str,
        addr: u64,
        len: usize,
        rip: u64,
    },
    #[error("guest halted (HLT in ring 0 with nothing to wake it) at rip={rip:#x}")]
    GuestHalted { rip: u64 },
    #[error("guest panicked (exit code {code}): {message}")]
    GuestPanic { code: u64, message: String },
    #[error("KVM could not run the vCPU: {0}; the VM state is invalid")]
    VcpuFailed(String),
    #[error("log I/O error: {0}")]
    LogIo(#[from] io::Error),
    #[error(
        "log is corrupt at byte {offset}: {what}; the log file was damaged or is not an ft-vmm log"
    )]
    LogCorrupt { offset: u64, what: String },
    #[error(
        "log was recorded with a different configuration (log {log:#x}, this VMM {ours:#x}); replay with the same guest image and --guest-ip/--mac as the recording"
    )]
    LogConfigMismatch { log: u64, ours: u64 },
    #[error(
        "log truncated: it ends after exit {after_exit} without an END entry (an incomplete last entry of {torn_bytes} bytes was dropped); the primary died or the file is incomplete — use go-live to continue from here, or get the complete log"
    )]
    LogTruncated { after_exit: u64, torn_bytes: u64 },
    #[error(
        "log entry for exit {exit} is malformed: {what}; the log was damaged or written by another ft-vmm version — replay with the VMM version that recorded it"
    )]
    BadEntry { exit: u64, what: String },
    #[error(
        "DIVERGENCE at exit {exit} (rip {rip:#x}; state last verified equal at exit {verified}): {what}; the backup no longer mirrors the primary — discard it and create a new one from a snapshot"
    )]
    Divergence {
        /// Where the difference was found.
        exit: u64,
        rip: u64,
        /// The last exit at which the state was verified equal (a checkpoint; 0 = the
        /// start): the first diverging exit lies after it, up to `exit`.
        verified: u64,
        what: String,
    },
    #[error(
        "received frame ({key}) referenced by the log at exit {exit} is not in the frame store: {reason}; the data plane must put every input frame into the store before the backup replays it — check the logging link, or request go-live to continue without the frame"
    )]
    FrameMissing {
        key: crate::vmlog::FrameKey,
        exit: u64,
        reason: &'static str,
    },
    #[error("network backend: {0}")]
    Net(String),
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// A live state transfer failed; the source VM runs on unchanged.
    #[error("state transfer: {0}")]
    Transfer(String),
    #[error("the VMM was asked to stop")]
    Stopped,
    #[error("configuration: {0}")]
    Config(String),
}

impl Error {
    pub(crate) fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |err| Error::KvmIoctl { op, err }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
