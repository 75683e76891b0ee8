//! One thread serves every pod of a lab. Sockets are opened from short-lived threads that
//! entered each pod's namespace (a socket keeps the namespace it was created in), then a
//! single `poll` loop in the server thread, itself in the root namespace, answers them:
//!
//! * TCP: a listener per declared port and family; connections are accepted and closed
//!   (the probe's fact is the completed handshake).
//! * UDP: a socket per pod address and port that echoes every datagram back, bound to
//!   the address so the reply leaves from the address the probe targeted.
//! * SCTP: one raw socket (protocol 132) per family records every well-formed INIT to a
//!   declared SCTP port, keyed by its initiate tag, in a set the prober reads.

use std::collections::HashSet;
use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsFd as _;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use socket2::{Domain, Protocol, Socket, Type};

use super::{L4, netns, sctp};

/// INITs seen at destinations: (destination pod index, destination port, initiate tag).
pub type Seen = Arc<Mutex<HashSet<(usize, u16, u32)>>>;

/// What one pod serves.
pub struct PodService<'a> {
    pub netns: &'a str,
    pub ips: &'a [IpAddr],
    pub serve: &'a [(u16, L4)],
}

enum Served {
    Tcp(TcpListener),
    Udp(UdpSocket),
    Sctp { sock: Socket, v4: bool, pod: usize, ports: Vec<u16> },
}

pub struct Server {
    wake: io::PipeWriter,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start(pods: &[PodService<'_>], seen: Seen) -> io::Result<Server> {
        let mut served = Vec::new();
        for (j, pod) in pods.iter().enumerate() {
            if pod.ips.is_empty() || pod.serve.is_empty() {
                continue;
            }
            let sockets = netns::run_in(pod.netns, || open(j, pod))
                .map_err(|e| io::Error::new(e.kind(), format!("serving in {}: {e}", pod.netns)))?;
            served.extend(sockets);
        }
        let (rx, wake) = io::pipe()?;
        let thread =
            std::thread::Builder::new().name("netpol-lab-serve".into()).spawn(move || serve(rx, served, seen))?;
        Ok(Server { wake, thread: Some(thread) })
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

fn open(pod: usize, p: &PodService<'_>) -> io::Result<Vec<Served>> {
    let mut out = Vec::new();
    let families: Vec<bool> =
        [true, false].into_iter().filter(|&v4| p.ips.iter().any(|ip| ip.is_ipv4() == v4)).collect();
    let mut tcp: Vec<u16> = p.serve.iter().filter(|s| s.1 == L4::Tcp).map(|s| s.0).collect();
    let mut udp: Vec<u16> = p.serve.iter().filter(|s| s.1 == L4::Udp).map(|s| s.0).collect();
    let mut sctp_ports: Vec<u16> = p.serve.iter().filter(|s| s.1 == L4::Sctp).map(|s| s.0).collect();
    for v in [&mut tcp, &mut udp, &mut sctp_ports] {
        v.sort_unstable();
        v.dedup();
    }
    for &v4 in &families {
        for &port in &tcp {
            let s = Socket::new(domain(v4), Type::STREAM, Some(Protocol::TCP))?;
            let any: IpAddr = if v4 { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
            if !v4 {
                s.set_only_v6(true)?;
            }
            s.set_reuse_address(true)?;
            s.bind(&SocketAddr::new(any, port).into())?;
            s.listen(1024)?;
            s.set_nonblocking(true)?;
            out.push(Served::Tcp(s.into()));
        }
        if !sctp_ports.is_empty() {
            let s = Socket::new(domain(v4), Type::RAW, Some(Protocol::from(sctp::IPPROTO_SCTP)))?;
            s.set_nonblocking(true)?;
            out.push(Served::Sctp { sock: s, v4, pod, ports: sctp_ports.clone() });
        }
    }
    for ip in p.ips {
        for &port in &udp {
            let s = Socket::new(domain(ip.is_ipv4()), Type::DGRAM, Some(Protocol::UDP))?;
            if ip.is_ipv6() {
                s.set_only_v6(true)?;
            }
            s.bind(&SocketAddr::new(*ip, port).into())?;
            s.set_nonblocking(true)?;
            out.push(Served::Udp(s.into()));
        }
    }
    Ok(out)
}

fn serve(mut wake: io::PipeReader, served: Vec<Served>, seen: Seen) {
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
            let _ = wake.read(&mut buf);
            return;
        }
        for (s, _) in served.iter().zip(&ready[1..]).filter(|(_, r)| **r) {
            match s {
                Served::Tcp(l) => while l.accept().is_ok() {},
                Served::Udp(u) => {
                    while let Ok((n, from)) = u.recv_from(&mut buf) {
                        let _ = u.send_to(&buf[..n], from);
                    }
                }
                Served::Sctp { sock, v4, pod, ports } => {
                    while let Ok(n) = (&*sock).read(&mut buf) {
                        let pkt = &buf[..n];
                        let body = if *v4 { sctp::strip_ipv4_header(pkt) } else { Some(pkt) };
                        if let Some((port, tag)) = body.and_then(sctp::parse_init)
                            && ports.contains(&port)
                        {
                            seen.lock().unwrap_or_else(|e| e.into_inner()).insert((*pod, port, tag));
                        }
                    }
                }
            }
        }
    }
}
