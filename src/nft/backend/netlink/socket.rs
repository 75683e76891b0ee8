//! The `NETLINK_NETFILTER` socket: open (in a named network namespace if asked), send a
//! datagram, receive one with a bound. Knows nothing of what the bytes mean.
//!
//! ```text
//!  open(netns, groups) ──► NetlinkSocket ──send(batch)──► kernel
//!                                       ◄──recv(buf)──── answers / announcements
//!  Listener::spawn(name, step) ──► a thread repeating step (a bounded receive) until dropped
//! ```

use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, sockopt};

/// A `NETLINK_NETFILTER` socket, optionally in another network namespace.
#[derive(Debug)]
pub struct NetlinkSocket {
    fd: OwnedFd,
}

impl NetlinkSocket {
    /// Opens a socket in the caller's network namespace, or in the named one
    /// (`/run/netns/<name>`, as `ip netns` makes them). `groups`: multicast groups to join
    /// (a bit mask, group n = bit n-1), 0 for none.
    pub fn open(netns: Option<&str>, groups: u32) -> std::io::Result<NetlinkSocket> {
        let fd = match netns {
            None => Self::create()?,
            Some(name) => {
                let path = format!("/run/netns/{name}");
                let ns =
                    std::fs::File::open(&path).map_err(|e| std::io::Error::new(e.kind(), format!("{path}: {e}")))?;
                // setns changes only the calling thread: a short-lived one enters the
                // namespace and creates the socket, which stays in that namespace.
                std::thread::scope(|s| {
                    s.spawn(|| {
                        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                            .map_err(|e| std::io::Error::other(format!("entering {path}: {e}")))?;
                        Self::create()
                    })
                    .join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("netns thread panicked")))
                })?
            }
        };
        socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups)).map_err(std::io::Error::from)?;
        Ok(NetlinkSocket { fd })
    }

    /// The netlink port the kernel gave this socket: what its announcements of our own
    /// requests carry as their sender.
    pub fn port(&self) -> std::io::Result<u32> {
        let addr: NetlinkAddr = socket::getsockname(self.fd.as_raw_fd()).map_err(std::io::Error::from)?;
        Ok(addr.pid())
    }

    /// Makes `groups` (a bit mask, as in [`open`](Self::open)) the socket's only memberships
    /// among the first 32 groups: a bound netlink socket bound again under its own port
    /// takes the new mask, and the kernel stops (or starts) building announcements for a
    /// group nobody else listens to.
    pub fn set_groups(&self, groups: u32) -> std::io::Result<()> {
        socket::bind(self.fd.as_raw_fd(), &NetlinkAddr::new(self.port()?, groups)).map_err(std::io::Error::from)
    }

    fn create() -> std::io::Result<OwnedFd> {
        let fd = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )?;
        // Room for a whole batch and for the kernel's answers (root may exceed the sysctl
        // limits; others get what the limits allow).
        let size = 8 << 20;
        if socket::setsockopt(&fd, sockopt::SndBufForce, &size).is_err() {
            let _ = socket::setsockopt(&fd, sockopt::SndBuf, &size);
        }
        if socket::setsockopt(&fd, sockopt::RcvBufForce, &size).is_err() {
            let _ = socket::setsockopt(&fd, sockopt::RcvBuf, &size);
        }
        Ok(fd)
    }

    /// Lets one send carry `bytes` (a full sync of a large cluster is several MiB).
    pub fn reserve_send_buffer(&self, bytes: usize) {
        let current = socket::getsockopt(&self.fd, sockopt::SndBuf).unwrap_or(0);
        // The kernel doubles what it is given, and keeps some of it for itself.
        if current < bytes + 64 * 1024 {
            let want = (bytes + 64 * 1024).div_ceil(2) * 2;
            if socket::setsockopt(&self.fd, sockopt::SndBufForce, &want).is_err() {
                let _ = socket::setsockopt(&self.fd, sockopt::SndBuf, &want);
            }
        }
    }

    /// Blocking receives give up after `timeout` (so that a listener can check whether to stop).
    pub fn set_receive_timeout(&self, timeout: std::time::Duration) -> std::io::Result<()> {
        let tv = nix::sys::time::TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _);
        socket::setsockopt(&self.fd, sockopt::ReceiveTimeout, &tv).map_err(std::io::Error::from)
    }

    /// The bound of one blocking receive (zero: none).
    pub fn receive_timeout(&self) -> std::time::Duration {
        socket::getsockopt(&self.fd, sockopt::ReceiveTimeout)
            .map(|tv| std::time::Duration::from_micros(tv.tv_sec() as u64 * 1_000_000 + tv.tv_usec() as u64))
            .unwrap_or_default()
    }

    pub fn send(&self, buf: &[u8]) -> Result<(), Errno> {
        let sent = socket::send(self.fd.as_raw_fd(), buf, MsgFlags::empty())?;
        if sent == buf.len() { Ok(()) } else { Err(Errno::EMSGSIZE) }
    }

    /// One datagram (possibly several messages); `None` when none is waiting and `wait`
    /// is false, or the receive timeout passed.
    pub fn recv(&self, buf: &mut [u8], wait: bool) -> Result<Option<usize>, Errno> {
        let flags = if wait { MsgFlags::empty() } else { MsgFlags::MSG_DONTWAIT };
        match socket::recv(self.fd.as_raw_fd(), buf, flags) {
            Ok(n) => Ok(Some(n)),
            Err(Errno::EAGAIN) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receive_from_a_silent_kernel_gives_up_after_the_bound() {
        let socket = NetlinkSocket::open(None, 0).expect("a netlink socket");
        socket.set_receive_timeout(std::time::Duration::from_millis(200)).unwrap();
        assert_eq!(socket.receive_timeout(), std::time::Duration::from_millis(200));
        let started = std::time::Instant::now();
        let mut buf = [0u8; 256];
        assert_eq!(socket.recv(&mut buf, true), Ok(None), "nothing was asked, nothing comes");
        let waited = started.elapsed();
        assert!(
            waited >= std::time::Duration::from_millis(150) && waited < std::time::Duration::from_secs(3),
            "{waited:?}"
        );
    }
}

/// A listening thread: repeats `step` until its owner drops it, or until `step` breaks.
/// The drop sets a flag the thread checks after each step, then joins it: each step must
/// return within a bounded wait (a socket's receive timeout), which bounds the drop.
#[derive(Debug)]
pub struct Listener {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Listener {
    pub fn spawn(
        name: &str,
        mut step: impl FnMut() -> std::ops::ControlFlow<()> + Send + 'static,
    ) -> std::io::Result<Listener> {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::Builder::new().name(name.into()).spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if step().is_break() {
                        return;
                    }
                }
            })?
        };
        Ok(Listener { stop, thread: Some(thread) })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
