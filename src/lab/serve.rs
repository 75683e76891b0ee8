//! One thread serves every pod of a lab. Sockets are opened from short-lived threads that
//! entered each pod's namespace (a socket keeps the namespace it was created in), then a
//! single `poll` loop in the server thread, itself in the root namespace, answers them:
//!
//! * TCP: a listener per address and declared port; connections are accepted and closed
//!   (the probe's fact is the completed handshake).
//! * UDP: a socket per address and port that echoes every datagram back, bound to the
//!   address so the reply leaves from the address the probe targeted.
//! * SCTP: one raw socket (protocol 132) per address, bound to it, records every
//!   well-formed INIT to a declared SCTP port, keyed by address, port and initiate tag, in
//!   a set the prober reads.
//!
//! Everything is bound to the served address, not the wildcard: a node's namespace holds
//! the addresses of all its hostNetwork pods, which may serve the same port.

use std::collections::HashSet;
use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsFd as _;
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use socket2::{Domain, Protocol, Socket, Type};

use super::{L4, netns, sctp};

/// INITs seen at destinations: (destination address, destination port, initiate tag).
pub type Seen = Arc<Mutex<HashSet<(IpAddr, u16, u32)>>>;

/// What one address of a namespace serves (every pod holding the address, merged).
pub struct AddressService<'a> {
    pub netns: &'a str,
    pub ip: IpAddr,
    pub serve: Vec<(u16, L4)>,
}

enum Served {
    Tcp(TcpListener),
    Udp(UdpSocket),
    Sctp { sock: Socket, ip: IpAddr, ports: Vec<u16> },
}

pub struct Server {
    /// `x`: stop; `s`: catch up (handle everything queued now, then say so on `caught_up`).
    wake: io::PipeWriter,
    caught_up: Mutex<mpsc::Receiver<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start(services: &[AddressService<'_>], seen: Seen) -> io::Result<Server> {
        let mut served = Vec::new();
        let mut by_netns: Vec<(&str, Vec<&AddressService<'_>>)> = Vec::new();
        for s in services.iter().filter(|s| !s.serve.is_empty()) {
            match by_netns.iter_mut().find(|(ns, _)| *ns == s.netns) {
                Some((_, v)) => v.push(s),
                None => by_netns.push((s.netns, vec![s])),
            }
        }
        for (ns, these) in by_netns {
            let sockets = netns::run_in(ns, || these.iter().map(|s| open(s)).collect::<io::Result<Vec<_>>>())
                .map_err(|e| io::Error::new(e.kind(), format!("serving in {ns}: {e}")))?;
            served.extend(sockets.into_iter().flatten());
        }
        let (rx, wake) = io::pipe()?;
        let (done, caught_up) = mpsc::channel();
        let thread =
            std::thread::Builder::new().name("netpol-lab-serve".into()).spawn(move || serve(rx, served, seen, done))?;
        Ok(Server { wake, caught_up: Mutex::new(caught_up), thread: Some(thread) })
    }

    /// Wait (at most `limit`) until the server has handled every datagram, connection and
    /// INIT queued on its sockets right now. A probe whose packet arrived in time then has
    /// its answer out, however far behind the one serving thread was (thousands of UDP
    /// echoes per wave on a loaded machine can take longer than the probes' time-out).
    pub fn catch_up(&self, limit: std::time::Duration) -> bool {
        let caught_up = self.caught_up.lock().unwrap_or_else(|e| e.into_inner());
        while caught_up.try_recv().is_ok() {}
        (&self.wake).write_all(b"s").is_ok() && caught_up.recv_timeout(limit).is_ok()
    }

    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.wake.write_all(b"x");
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn domain(v4: bool) -> Domain {
    if v4 { Domain::IPV4 } else { Domain::IPV6 }
}

fn open(service: &AddressService<'_>) -> io::Result<Vec<Served>> {
    let ip = service.ip;
    let ports = |proto: L4| {
        let mut v: Vec<u16> = service.serve.iter().filter(|s| s.1 == proto).map(|s| s.0).collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let mut out = Vec::new();
    let socket = |ty: Type, proto: Protocol| -> io::Result<Socket> {
        let s = Socket::new(domain(ip.is_ipv4()), ty, Some(proto))?;
        if ip.is_ipv6() && ty != Type::RAW {
            s.set_only_v6(true)?;
        }
        s.set_nonblocking(true)?;
        Ok(s)
    };
    for port in ports(L4::Tcp) {
        let s = socket(Type::STREAM, Protocol::TCP)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::new(ip, port).into())?;
        s.listen(1024)?;
        out.push(Served::Tcp(s.into()));
    }
    for port in ports(L4::Udp) {
        let s = socket(Type::DGRAM, Protocol::UDP)?;
        s.bind(&SocketAddr::new(ip, port).into())?;
        out.push(Served::Udp(s.into()));
    }
    let sctp_ports = ports(L4::Sctp);
    if !sctp_ports.is_empty() {
        // Bound to the address: the socket sees only INITs addressed to it.
        let s = socket(Type::RAW, Protocol::from(sctp::IPPROTO_SCTP))?;
        s.bind(&SocketAddr::new(ip, 0).into())?;
        out.push(Served::Sctp { sock: s, ip, ports: sctp_ports });
    }
    Ok(out)
}

fn serve(mut wake: io::PipeReader, served: Vec<Served>, seen: Seen, caught_up: mpsc::Sender<()>) {
    let mut buf = [0u8; 2048];
    loop {
        let ready: Vec<bool> = {
            let mut fds = Vec::with_capacity(served.len() + 1);
            fds.push(PollFd::new(wake.as_fd(), PollFlags::POLLIN));
            for s in &served {
                let fd = match s {
                    Served::Tcp(l) => l.as_fd(),
                    Served::Udp(u) => u.as_fd(),
                    Served::Sctp { sock, .. } => sock.as_fd(),
                };
                fds.push(PollFd::new(fd, PollFlags::POLLIN));
            }
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    eprintln!("netpol lab: serve loop stopped: {e}");
                    return;
                }
            }
            fds.iter().map(|f| f.revents().is_some_and(|r| !r.is_empty())).collect()
        };
        if ready[0] {
            let n = wake.read(&mut buf).unwrap_or(0);
            let requests = &buf[..n];
            if n == 0 || requests.contains(&b'x') {
                return;
            }
            // Catch up: every socket, ready or not, until it has nothing queued.
            for s in &served {
                answer(s, &mut buf, &seen);
            }
            let _ = caught_up.send(());
            continue;
        }
        for (s, _) in served.iter().zip(&ready[1..]).filter(|(_, r)| **r) {
            answer(s, &mut buf, &seen);
        }
    }
}

/// Handle everything queued on one socket (they are non-blocking: each loop ends at
/// `WouldBlock`).
fn answer(s: &Served, buf: &mut [u8], seen: &Seen) {
    match s {
        Served::Tcp(l) => while l.accept().is_ok() {},
        Served::Udp(u) => {
            while let Ok((n, from)) = u.recv_from(buf) {
                let _ = u.send_to(&buf[..n], from);
            }
        }
        Served::Sctp { sock, ip, ports } => {
            while let Ok(n) = (&*sock).read(buf) {
                let pkt = &buf[..n];
                let body = if ip.is_ipv4() { sctp::strip_ipv4_header(pkt) } else { Some(pkt) };
                if let Some((port, tag)) = body.and_then(sctp::parse_init)
                    && ports.contains(&port)
                {
                    seen.lock().unwrap_or_else(|e| e.into_inner()).insert((*ip, port, tag));
                }
            }
        }
    }
}
