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
        let sock = inet_socket(name)?;
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

/// The interface's flags (`IFF_UP`, `IFF_RUNNING` = carrier, ...).
pub fn flags(name: &str) -> Result<u32, NetifError> {
    let sock = inet_socket(name)?;
    let mut req = ifreq(name);
    // SAFETY: SIOCGIFFLAGS fills ifru_flags of the ifreq we pass, which outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(NetifError::Ioctl {
            op: "SIOCGIFFLAGS",
            name: name.into(),
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: the kernel filled ifru_flags for SIOCGIFFLAGS.
    Ok(unsafe { req.ifr_ifru.ifru_flags } as u16 as u32)
}

/// `struct ethtool_drvinfo` (linux/ethtool.h).
#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// The interface's driver, as `ethtool -i` names it.
pub fn driver(name: &str) -> Result<String, NetifError> {
    const ETHTOOL_GDRVINFO: u32 = 3;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    let sock = inet_socket(name)?;
    // SAFETY: ethtool_drvinfo is plain old data; all-zero is a valid value.
    let mut info: EthtoolDrvinfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req = ifreq(name);
    req.ifr_ifru.ifru_data = (&mut info as *mut EthtoolDrvinfo).cast();
    // SAFETY: SIOCETHTOOL with ETHTOOL_GDRVINFO writes at most size_of::<EthtoolDrvinfo>()
    // bytes into `info`, which outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, &mut req) } < 0 {
        return Err(NetifError::Ioctl {
            op: "ETHTOOL_GDRVINFO",
            name: name.into(),
            source: io::Error::last_os_error(),
        });
    }
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

fn inet_socket(name: &str) -> Result<OwnedFd, NetifError> {
    // SAFETY: plain socket(2) call; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(NetifError::Socket {
            name: name.into(),
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The XDP features the interface's driver declares (`NETDEV_A_DEV_XDP_FEATURES`, a
/// `NETDEV_XDP_ACT_*` mask), asked of the `netdev` generic-netlink family (Linux >= 6.3);
/// `None` when the kernel has no such family.
pub fn xdp_features(ifindex: u32) -> io::Result<Option<u64>> {
    let nl = genl::Socket::open()?;
    let Some(family) = nl.family_id("netdev")? else {
        return Ok(None);
    };
    // NETDEV_CMD_DEV_GET = 1, NETDEV_A_DEV_IFINDEX = 1, NETDEV_A_DEV_XDP_FEATURES = 3.
    let reply = nl.request(family, 1, &[(1, &ifindex.to_ne_bytes())])?;
    Ok(genl::attr(&reply, 3).and_then(|v| Some(u64::from_ne_bytes(v.try_into().ok()?))))
}

/// The little generic netlink this needs: a request, its one reply, its attributes.
mod genl {
    use std::{
        io,
        os::fd::{AsRawFd, FromRawFd, OwnedFd},
    };

    const NLMSG_ERROR: u16 = 2;
    const GENL_ID_CTRL: u16 = 0x10;

    pub struct Socket(OwnedFd);

    impl Socket {
        pub fn open() -> io::Result<Socket> {
            // SAFETY: plain socket(2) call.
            let fd = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::NETLINK_GENERIC,
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` is a fresh descriptor we own.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let tv = libc::timeval {
                tv_sec: 2,
                tv_usec: 0,
            };
            // SAFETY: `tv` is a valid timeval for the duration of the call.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &tv as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            Ok(Socket(fd))
        }

        /// The id of a generic-netlink family, None if the kernel has none of that name.
        pub fn family_id(&self, name: &str) -> io::Result<Option<u16>> {
            let mut n = name.as_bytes().to_vec();
            n.push(0);
            // CTRL_CMD_GETFAMILY = 3, CTRL_ATTR_FAMILY_NAME = 2, CTRL_ATTR_FAMILY_ID = 1.
            match self.request(GENL_ID_CTRL, 3, &[(2, &n)]) {
                Ok(reply) => {
                    Ok(attr(&reply, 1).and_then(|v| Some(u16::from_ne_bytes(v.try_into().ok()?))))
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
                Err(e) => Err(e),
            }
        }

        /// Sends one request (`cmd` with `attrs`) to `family` and returns the
        /// attributes of its reply (after the genetlink header).
        pub fn request(&self, family: u16, cmd: u8, attrs: &[(u16, &[u8])]) -> io::Result<Vec<u8>> {
            let mut m = vec![0u8; 16];
            m.extend_from_slice(&[cmd, 1, 0, 0]);
            for (t, v) in attrs {
                m.extend_from_slice(&((4 + v.len()) as u16).to_ne_bytes());
                m.extend_from_slice(&t.to_ne_bytes());
                m.extend_from_slice(v);
                m.resize(m.len().next_multiple_of(4), 0);
            }
            let len = m.len() as u32;
            m[0..4].copy_from_slice(&len.to_ne_bytes());
            m[4..6].copy_from_slice(&family.to_ne_bytes());
            m[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
            m[8..12].copy_from_slice(&1u32.to_ne_bytes());
            // SAFETY: sends `m`, a valid buffer, to the kernel (the socket's default peer).
            if unsafe { libc::send(self.0.as_raw_fd(), m.as_ptr().cast(), m.len(), 0) } < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut buf = vec![0u8; 8192];
            // SAFETY: receives into `buf`, valid for its length.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let buf = &buf[..n as usize];
            if buf.len() < 20 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "short netlink reply",
                ));
            }
            let ty = u16::from_ne_bytes([buf[4], buf[5]]);
            if ty == NLMSG_ERROR {
                let err = i32::from_ne_bytes(buf[16..20].try_into().unwrap());
                return Err(io::Error::from_raw_os_error(-err));
            }
            let len = (u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize).min(buf.len());
            Ok(buf.get(20..len).unwrap_or_default().to_vec())
        }
    }

    /// The payload of attribute `ty` among `attrs` (netlink attributes, 4-aligned).
    pub fn attr(attrs: &[u8], ty: u16) -> Option<&[u8]> {
        let mut rest = attrs;
        while rest.len() >= 4 {
            let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
            let t = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
            if len < 4 || len > rest.len() {
                return None;
            }
            if t == ty {
                return Some(&rest[4..len]);
            }
            rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        }
        None
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn attributes_are_found_and_bad_lengths_stop_the_walk() {
            let a = [8u8, 0, 1, 0, 7, 0, 0, 0, 6, 0, 3, 0, 9, 9, 0, 0];
            assert_eq!(attr(&a, 1), Some(&[7u8, 0, 0, 0][..]));
            assert_eq!(attr(&a, 3), Some(&[9u8, 9][..]));
            assert_eq!(attr(&a, 2), None);
            assert_eq!(attr(&[200, 0, 1, 0, 0, 0], 1), None);
            assert_eq!(attr(&[0, 0, 1, 0], 1), None);
        }
    }
}
