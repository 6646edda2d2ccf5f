//! Network backends of the paravirtual NIC.
use crate::error::{Error, Result};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A frame source/sink for the NIC. `recv` never blocks; the VMM polls `poll_fd` when the
/// guest idles.
pub trait NetBackend: Send {
    /// Next received frame into `buf`, or `None` if nothing is pending.
    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>>;
    fn send(&mut self, frame: &[u8]) -> Result<()>;
    /// A file descriptor that becomes readable when `recv` has something.
    fn poll_fd(&self) -> Option<RawFd>;
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// A TAP device (`/dev/net/tun`, IFF_TAP | IFF_NO_PI), non-blocking. Opens an existing
/// persistent tap of that name, or creates a transient one in the caller's network
/// namespace.
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

/// Frames the kernel may queue for the VM while the guest's RX ring is full (the tap's
/// `txqueuelen`; Linux's default of 1,000 overflowed when 1,000 clients sent at once, and
/// every dropped request then waited for a 200 ms TCP retransmission).
pub const TAP_QUEUE_LEN: i32 = 10_000;

const SIOCSIFTXQLEN: libc::c_ulong = 0x8943;

#[repr(C)]
struct IfReqQlen {
    name: [u8; 16],
    qlen: libc::c_int,
    _pad: [u8; 20],
}

/// Sets the transmit queue length of interface `name` (in the caller's namespace).
fn set_txqueuelen(name: &str, len: i32) -> Result<()> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(Error::Net(format!(
            "socket for SIOCSIFTXQLEN: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = IfReqQlen {
        name: [0; 16],
        qlen: len,
        _pad: [0; 20],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: SIOCSIFTXQLEN reads a `struct ifreq` (40 bytes) whose union starts with
    // `ifr_qlen` (int) after the 16-byte name, which `IfReqQlen` matches.
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCSIFTXQLEN, &mut req) } < 0 {
        return Err(Error::Net(format!(
            "setting the transmit queue of {name} to {len} frames: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    pub fn open(name: &str) -> Result<Tap> {
        if name.is_empty() || name.len() > 15 {
            return Err(Error::Net(format!("tap name {name:?} must be 1..15 bytes")));
        }
        // SAFETY: plain open(2) of a NUL-terminated path literal.
        let raw = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(Error::Net(format!(
                "cannot open /dev/net/tun: {}; load the tun module and run as root",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: `raw` is a freshly opened fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads/writes a `struct ifreq` (40 bytes), which `IfReq` matches
        // in size and layout for the name and flags fields.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) };
        if r < 0 {
            return Err(Error::Net(format!(
                "TUNSETIFF {name}: {}; is the tap in use by another process, or of another type (tun)?",
                std::io::Error::last_os_error()
            )));
        }
        set_txqueuelen(name, TAP_QUEUE_LEN)?;
        Ok(Tap {
            fd,
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A second handle on the same queue (`dup(2)`): frames written to either enter the
    /// host as the VM's output.
    pub fn try_clone(&self) -> Result<Tap> {
        let fd = self
            .fd
            .try_clone()
            .map_err(|e| Error::Net(format!("dup of tap {}: {e}", self.name)))?;
        Ok(Tap {
            fd,
            name: self.name.clone(),
        })
    }
}

impl NetBackend for Tap {
    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>> {
        // SAFETY: read(2) into a valid, writable buffer of the given length.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(None),
                _ => Err(Error::Net(format!("read from tap {}: {e}", self.name))),
            };
        }
        Ok(Some(n as usize))
    }

    fn send(&mut self, frame: &[u8]) -> Result<()> {
        // SAFETY: write(2) from a valid buffer of the given length.
        let n = unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            // A full tap queue or a down link drops the frame, like a real NIC; TCP recovers.
            if matches!(
                e.raw_os_error(),
                Some(libc::EAGAIN) | Some(libc::EIO) | Some(libc::ENOBUFS)
            ) {
                return Ok(());
            }
            return Err(Error::Net(format!("write to tap {}: {e}", self.name)));
        }
        Ok(())
    }

    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.fd.as_raw_fd())
    }
}

/// Runs `f` on a helper thread that has joined the network namespace `/var/run/netns/NAME`
/// (as made by `ip netns add`). File descriptors created there (a tap) stay in that
/// namespace wherever they are used afterwards.
pub fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = format!("/var/run/netns/{netns}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).map_err(|e| {
            Error::Net(format!(
                "cannot open {path}: {e}; create it with `ip netns add`"
            ))
        })?;
        // SAFETY: setns(2) on a valid namespace fd; it only affects this helper thread.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(Error::Net(format!(
                "setns {path}: {}",
                std::io::Error::last_os_error()
            )));
        }
        f()
    })
    .join()
    .map_err(|_| Error::Net("netns helper thread panicked".into()))?
}
