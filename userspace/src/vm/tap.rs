//! The VM's NIC on the host side: a TAP device that ftd creates and owns. It exists only
//! while ftd runs (a crashed daemon takes the VM's NIC, and with it the VM's only path to
//! the network, with it: fail-stop), and it is set up before the data plane attaches its
//! programs to it.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use crate::netif::NetifError;

/// Opens (creating it if needed) the TAP `name` in this namespace for the VMM, with the
/// given MTU, and brings it up. The VMM sets a deep transmit queue on it
/// (`ft_vmm::net::TAP_QUEUE_LEN`).
pub fn create(name: &str, mtu: u32) -> Result<ft_vmm::net::Tap, NetifError> {
    let tap = ft_vmm::net::Tap::open(name).map_err(|e| NetifError::Ioctl {
        op: "TUNSETIFF",
        name: name.into(),
        source: io::Error::other(e.to_string()),
    })?;
    // SAFETY: plain socket(2) call; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(NetifError::Socket {
            name: name.into(),
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let ioctl = |op: &'static str, req: libc::c_ulong, ifr: &mut libc::ifreq| {
        // SAFETY: the ioctls used here read/write a `struct ifreq`, which `ifr` is, and it
        // outlives the call.
        if unsafe { libc::ioctl(sock.as_raw_fd(), req, ifr as *mut libc::ifreq) } < 0 {
            return Err(NetifError::Ioctl {
                op,
                name: name.into(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    };
    let mut req = crate::netif::ifreq(name);
    req.ifr_ifru.ifru_mtu = mtu as libc::c_int;
    ioctl("SIOCSIFMTU", libc::SIOCSIFMTU, &mut req)?;
    let mut req = crate::netif::ifreq(name);
    ioctl("SIOCGIFFLAGS", libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled the ifru_flags member.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    ioctl("SIOCSIFFLAGS", libc::SIOCSIFFLAGS, &mut req)?;
    // No IPv6 on the VM's NIC: the host would send router solicitations and MLD reports
    // into it at times of its own choosing (input the VM does not need).
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    Ok(tap)
}
