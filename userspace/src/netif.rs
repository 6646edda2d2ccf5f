//! Interface lookups (ifindex, MAC, MTU) by ioctl in the current network namespace, and
//! a raw AF_PACKET socket for the few frames userspace sends itself.
use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

#[derive(Debug, thiserror::Error)]
pub enum NetifError {
    #[error(
        "network interface {0:?} does not exist in this network namespace; check [interfaces] in the config"
    )]
    NoSuchInterface(String),
    #[error("{op} on interface {name:?} failed: {source}")]
    Ioctl {
        op: &'static str,
        name: String,
        source: io::Error,
    },
    #[error("cannot open a raw packet socket on {name:?} (needs root / CAP_NET_RAW): {source}")]
    Socket { name: String, source: io::Error },
}

#[derive(Clone, Debug)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
}

pub fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = s as libc::c_char;
    }
    req
}

impl Interface {
    pub fn lookup(name: &str) -> Result<Interface, NetifError> {
        let c = CString::new(name).map_err(|_| NetifError::NoSuchInterface(name.into()))?;
        // SAFETY: `c` is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
        if ifindex == 0 {
            return Err(NetifError::NoSuchInterface(name.into()));
        }
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
        let mut req = ifreq(name);
        // SAFETY: SIOCGIFHWADDR reads into the ifreq we pass, which outlives the call.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } < 0 {
            return Err(NetifError::Ioctl {
                op: "SIOCGIFHWADDR",
                name: name.into(),
                source: io::Error::last_os_error(),
            });
        }
        let mut mac = [0u8; 6];
        // SAFETY: the kernel filled the ifru_hwaddr member for SIOCGIFHWADDR.
        let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
        for (d, s) in mac.iter_mut().zip(sa.sa_data.iter()) {
            *d = *s as u8;
        }
        let mut req = ifreq(name);
        // SAFETY: as above, for SIOCGIFMTU.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &mut req) } < 0 {
            return Err(NetifError::Ioctl {
                op: "SIOCGIFMTU",
                name: name.into(),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: the kernel filled ifru_mtu for SIOCGIFMTU.
        let mtu = unsafe { req.ifr_ifru.ifru_mtu } as u32;
        Ok(Interface {
            name: name.into(),
            ifindex,
            mac,
            mtu,
        })
    }
}

/// AF_PACKET raw socket bound to one interface, for sending whole Ethernet frames.
#[derive(Debug)]
pub struct RawSocket {
    fd: OwnedFd,
    ifindex: u32,
}

impl RawSocket {
    /// A socket that sends on `iface` and receives nothing.
    pub fn open(iface: &Interface) -> Result<RawSocket, NetifError> {
        // Protocol 0: no frame is delivered to this socket.
        Self::bound(iface, 0)
    }

    /// A socket that also receives the frames of one EtherType arriving on `iface`.
    pub fn open_rx(iface: &Interface, ethertype: u16) -> Result<RawSocket, NetifError> {
        Self::bound(iface, ethertype.to_be())
    }

    /// An AF_PACKET socket bound to `iface` for `proto` (network byte order; 0 = none).
    fn bound(iface: &Interface, proto: u16) -> Result<RawSocket, NetifError> {
        let err = |source| NetifError::Socket {
            name: iface.name.clone(),
            source,
        };
        // SAFETY: plain socket(2) call.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                proto as i32,
            )
        };
        if fd < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain old data.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = iface.ifindex as i32;
        // SAFETY: `sll` is a valid sockaddr_ll for the duration of the call.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        Ok(RawSocket {
            fd,
            ifindex: iface.ifindex,
        })
    }

    /// Next received frame (sockets from [`RawSocket::open_rx`]), or `None` after
    /// `timeout` without one.
    pub fn recv(&self, buf: &mut [u8], timeout: std::time::Duration) -> io::Result<Option<usize>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: poll(2) on one pollfd we own.
        if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
            return Ok(None);
        }
        // SAFETY: recv(2) into a valid buffer of the given length.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(n as usize))
    }

    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_ll is plain old data.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex as i32;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&frame[..6.min(frame.len())]);
        // SAFETY: `frame` and `sll` are valid for the duration of the call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// The VM's MAC in a NIC's unicast filter, for as long as this value lives.
///
/// A physical NIC drops unicast frames for MACs it was not told about before XDP runs
/// (the hardware filter); the VM's MAC is not the NIC's own. This is an `AF_PACKET`
/// socket's `PACKET_MR_UNICAST` membership: the kernel adds the address to the NIC's
/// unicast list (`dev_uc_add`; a NIC without unicast filtering goes promiscuous
/// instead) and removes it when the socket closes, so it goes away when ftd stops or
/// dies, whatever the way. `bridge fdb show dev NIC` lists it as `self permanent`.
#[derive(Debug)]
pub struct UnicastFilterEntry {
    _fd: OwnedFd,
}

impl UnicastFilterEntry {
    pub fn add(iface: &Interface, mac: [u8; 6]) -> Result<UnicastFilterEntry, NetifError> {
        let err = |source| NetifError::Ioctl {
            op: "PACKET_ADD_MEMBERSHIP (PACKET_MR_UNICAST)",
            name: iface.name.clone(),
            source,
        };
        // Protocol 0: the socket receives nothing; it only holds the membership.
        // SAFETY: plain socket(2) call.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(NetifError::Socket {
                name: iface.name.clone(),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: packet_mreq is plain old data.
        let mut mreq: libc::packet_mreq = unsafe { std::mem::zeroed() };
        mreq.mr_ifindex = iface.ifindex as i32;
        mreq.mr_type = libc::PACKET_MR_UNICAST as u16;
        mreq.mr_alen = 6;
        mreq.mr_address[..6].copy_from_slice(&mac);
        // SAFETY: `mreq` is a valid packet_mreq for the duration of the call.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_ADD_MEMBERSHIP,
                &mreq as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::packet_mreq>() as u32,
            )
        };
        if r < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        Ok(UnicastFilterEntry { _fd: fd })
    }
}
