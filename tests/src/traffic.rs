//! Traffic between namespaces: ping, a verified TCP bulk transfer, and UDP probes.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::Netns;

/// `count` pings from `from` to `dst`; Ok if all were answered.
pub fn ping(from: &Netns, dst: Ipv4Addr, count: u32) -> Result<()> {
    from.run(
        "ping",
        &["-c", &count.to_string(), "-W", "2", "-i", "0.2", "-q", &dst.to_string()],
    )
    .map(drop)
    .with_context(|| format!("ping {} -> {dst}", from.name()))
}

/// `count` IPv6 pings from `from` to `dst`; Ok if all were answered.
pub fn ping6(from: &Netns, dst: Ipv6Addr, count: u32) -> Result<()> {
    from.run("ping", &["-6", "-c", &count.to_string(), "-W", "2", "-i", "0.2", "-q", &dst.to_string()])
        .map(drop)
        .with_context(|| format!("ping -6 {} -> {dst}", from.name()))
}

/// The byte at stream offset `i` of the transfer pattern (a hash of the offset, so the
/// receiver can check every byte however TCP splits the stream).
fn fill_pattern(buf: &mut [u8], start: u64) {
    for (j, b) in buf.iter_mut().enumerate() {
        let i = start + j as u64;
        let mut z = (i >> 3).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        *b = (z >> ((i & 7) * 8)) as u8;
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    pub bytes: u64,
    pub elapsed: Duration,
}

/// Send `bytes` over TCP from a socket in `from` to a listener in `to` at `to_ip`; the
/// receiver checks every byte against the sender's pattern.
pub fn tcp_transfer(from: &Netns, to: &Netns, to_ip: Ipv4Addr, bytes: u64) -> Result<Transfer> {
    transfer(from, to, 0, move |port| SocketAddr::V4(SocketAddrV4::new(to_ip, port)), bytes)
}

/// As `tcp_transfer`, over IPv6.
pub fn tcp_transfer6(from: &Netns, to: &Netns, to_ip: Ipv6Addr, bytes: u64) -> Result<Transfer> {
    transfer(from, to, 0, move |port| SocketAddr::new(IpAddr::V6(to_ip), port), bytes)
}

/// As `tcp_transfer`, to a listener on `port` in `to` reached through `via` (e.g. a Service
/// address that a DNAT rule rewrites to the listener).
pub fn tcp_transfer_via(from: &Netns, to: &Netns, port: u16, via: SocketAddrV4, bytes: u64) -> Result<Transfer> {
    transfer(from, to, port, move |_| SocketAddr::V4(via), bytes)
}

fn transfer(from: &Netns, to: &Netns, port: u16, dst: impl Fn(u16) -> SocketAddr + Send + 'static, bytes: u64) -> Result<Transfer> {
    let (tx, rx) = std::sync::mpsc::channel();
    // The listener's family: which one the destination has (known once the port is).
    let v6 = dst(1).is_ipv6();
    let server = to.spawn(move || -> Result<u64> {
        let any: IpAddr = if v6 { Ipv6Addr::UNSPECIFIED.into() } else { Ipv4Addr::UNSPECIFIED.into() };
        let l = TcpListener::bind((any, port))?;
        tx.send(l.local_addr()?.port())?;
        let (mut s, _) = l.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let (mut buf, mut expect) = (vec![0u8; 65536], vec![0u8; 65536]);
        let mut got = 0u64;
        loop {
            let n = s.read(&mut buf).context("receiving")?;
            if n == 0 {
                return Ok(got);
            }
            fill_pattern(&mut expect[..n], got);
            if buf[..n] != expect[..n] {
                bail!("corrupted data at offset {got}");
            }
            got += n as u64;
        }
    });
    let port = rx.recv_timeout(Duration::from_secs(10)).context("server did not start")?;
    let addr = dst(port);
    let started = Instant::now();
    let client = from.spawn(move || -> Result<()> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_write_timeout(Some(Duration::from_secs(30)))?;
        let mut buf = vec![0u8; 65536];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            fill_pattern(&mut buf[..n], bytes - left);
            s.write_all(&buf[..n]).context("sending")?;
            left -= n as u64;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        Ok(())
    });
    client.join().expect("client thread")??;
    let got = server.join().expect("server thread")??;
    if got != bytes {
        bail!("sent {bytes} bytes, received {got}");
    }
    Ok(Transfer { bytes: got, elapsed: started.elapsed() })
}

/// Datagrams received, with the address each came from.
type Datagrams = Vec<(SocketAddr, Vec<u8>)>;

/// A UDP socket in a namespace collecting whatever arrives until stopped.
pub struct UdpProbe {
    stop: Arc<AtomicBool>,
    got: Arc<Mutex<Datagrams>>,
    thread: JoinHandle<Result<Result<()>>>,
}

impl UdpProbe {
    pub fn start(ns: &Netns, addr: impl Into<SocketAddr>) -> Result<Self> {
        let addr: SocketAddr = addr.into();
        let stop = Arc::new(AtomicBool::new(false));
        let got = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let (s2, g2) = (stop.clone(), got.clone());
        let thread = ns.spawn(move || -> Result<()> {
            let sock = match UdpSocket::bind(addr) {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return Err(e.into());
                }
            };
            sock.set_read_timeout(Some(Duration::from_millis(50)))?;
            let _ = tx.send(Ok(()));
            let mut buf = [0u8; 65536];
            while !s2.load(Ordering::SeqCst) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    g2.lock().expect("probe lock").push((from, buf[..n].to_vec()));
                }
            }
            Ok(())
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(Self { stop, got, thread }),
            Ok(Err(e)) => bail!("binding {addr}: {e}"),
            Err(_) => bail!("probe on {addr} did not start"),
        }
    }

    /// Wait (bounded: 10 s) until `count` datagrams have arrived, stop, and return all the
    /// datagrams received (fewer if they never came, more if more came).
    pub fn finish_after(self, count: usize) -> Vec<Vec<u8>> {
        self.finish_after_with_sources(count).into_iter().map(|(_, d)| d).collect()
    }

    /// As `finish_after`, with the address each datagram came from.
    pub fn finish_after_with_sources(self, count: usize) -> Datagrams {
        crate::wait_until(Duration::from_secs(10), || self.got.lock().expect("probe lock").len() >= count);
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("probe thread").and_then(|r| r).expect("probe failed");
        std::mem::take(&mut *self.got.lock().expect("probe lock"))
    }
}

/// Send each payload as one UDP datagram from `bind` (inside `ns`) to `to`.
pub fn send_udp(ns: &Netns, bind: SocketAddrV4, to: SocketAddrV4, payloads: Vec<Vec<u8>>) -> Result<()> {
    ns.enter(move || -> Result<()> {
        let s = UdpSocket::bind(bind).with_context(|| format!("binding {bind}"))?;
        for p in payloads {
            s.send_to(&p, to).with_context(|| format!("sending to {to}"))?;
        }
        Ok(())
    })?
}

/// `GET path` over HTTP/1.1 from inside `ns`; the status code and the body.
pub fn http_get(ns: &Netns, addr: impl Into<SocketAddr>, path: &str) -> Result<(u16, String)> {
    let (addr, path) = (addr.into(), path.to_string());
    ns.enter(move || -> Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).with_context(|| format!("connecting to {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let status = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("no HTTP status")?;
        let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Ok((status, body))
    })?
}

/// A sequence-numbered UDP stream from one namespace to another, to count loss exactly.
pub struct UdpStream {
    stop: Arc<AtomicBool>,
    sender: JoinHandle<Result<Result<u64>>>,
    /// Sequence numbers seen, and the receiver's socket-buffer overflows.
    receiver: JoinHandle<Result<Result<(Vec<u64>, u64)>>>,
    recv_stop: Arc<AtomicBool>,
    /// Datagrams the receiver has taken so far.
    arrived: Arc<AtomicU64>,
}

#[derive(Debug, Clone, Copy)]
pub struct StreamResult {
    pub sent: u64,
    pub received: u64,
    /// Sequence numbers sent but never received.
    pub lost: u64,
    /// Of those, datagrams the receiving kernel dropped because our receiver's socket buffer
    /// was full (the receiving namespace's UDP RcvbufErrors): the test's reader fell behind,
    /// not the network.
    pub receiver_overflows: u64,
}

/// The receiving namespace's UDP RcvbufErrors (read from a thread inside it).
fn udp_rcvbuf_errors() -> Result<u64> {
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (names, values) = (udp.next().context("no Udp: header")?, udp.next().context("no Udp: values")?);
    let at = names.split_whitespace().position(|n| n == "RcvbufErrors").context("no RcvbufErrors")?;
    values.split_whitespace().nth(at).context("short Udp: line")?.parse().context("RcvbufErrors")
}

/// A receive buffer that rides out a reader starved of CPU for a second on a loaded machine
/// (an XDP-passed frame costs a page of buffer, so the default holds only ~90 datagrams).
const STREAM_RCVBUF: libc::c_int = 16 << 20;

impl UdpStream {
    /// Start sending `pps` datagrams per second from `from` to `to_ip:port` (a receiver in `to`).
    pub fn start(from: &Netns, to: &Netns, to_ip: Ipv4Addr, port: u16, pps: u32) -> Result<Self> {
        use std::os::fd::AsRawFd as _;
        let recv_stop = Arc::new(AtomicBool::new(false));
        let arrived = Arc::new(AtomicU64::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        let (rs, arr) = (recv_stop.clone(), arrived.clone());
        let receiver = to.spawn(move || -> Result<(Vec<u64>, u64)> {
            let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?;
            // SO_RCVBUFFORCE: above rmem_max, as root may.
            let size = STREAM_RCVBUF;
            let rc = unsafe {
                libc::setsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &size as *const _ as *const libc::c_void, std::mem::size_of_val(&size) as u32)
            };
            if rc != 0 {
                bail!("SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
            }
            sock.set_read_timeout(Some(Duration::from_millis(50)))?;
            let overflows_before = udp_rcvbuf_errors()?;
            let _ = tx.send(());
            let mut seen = Vec::new();
            let mut buf = [0u8; 64];
            while !rs.load(Ordering::SeqCst) {
                if let Ok(n) = sock.recv(&mut buf) {
                    if n >= 8 {
                        seen.push(u64::from_be_bytes(buf[..8].try_into().expect("8 bytes")));
                        arr.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            Ok((seen, udp_rcvbuf_errors()? - overflows_before))
        });
        rx.recv_timeout(Duration::from_secs(10)).context("stream receiver did not start")?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let sender = from.spawn(move || -> Result<u64> {
            let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            let dst = SocketAddrV4::new(to_ip, port);
            let batch = 10u64;
            let interval = Duration::from_secs_f64(batch as f64 / pps as f64);
            let mut seq = 0u64;
            let mut next = Instant::now();
            while !st.load(Ordering::SeqCst) {
                for _ in 0..batch {
                    let mut p = [0u8; 32];
                    p[..8].copy_from_slice(&seq.to_be_bytes());
                    sock.send_to(&p, dst)?;
                    seq += 1;
                }
                next += interval;
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
            Ok(seq)
        });
        Ok(Self { stop, sender, receiver, recv_stop, arrived })
    }

    /// Datagrams received so far.
    pub fn received_so_far(&self) -> u64 {
        self.arrived.load(Ordering::SeqCst)
    }

    /// Stop sending, wait (bounded: 10 s) until every datagram sent has arrived, and count.
    pub fn finish(self) -> Result<StreamResult> {
        self.stop.store(true, Ordering::SeqCst);
        let sent = self.sender.join().expect("sender thread")??;
        crate::wait_until(Duration::from_secs(10), || self.arrived.load(Ordering::SeqCst) >= sent);
        self.recv_stop.store(true, Ordering::SeqCst);
        let (mut seen, receiver_overflows) = self.receiver.join().expect("receiver thread")??;
        seen.sort_unstable();
        seen.dedup();
        let received = seen.iter().filter(|s| **s < sent).count() as u64;
        Ok(StreamResult { sent, received, lost: sent - received, receiver_overflows })
    }
}

/// Send raw Ethernet frames on `iface` inside `ns` (AF_PACKET), e.g. malformed tunnel frames.
pub fn send_raw_frames(ns: &Netns, iface: &str, frames: Vec<Vec<u8>>) -> Result<()> {
    let iface = std::ffi::CString::new(iface)?;
    ns.enter(move || -> Result<()> {
        let ifindex = unsafe { libc::if_nametoindex(iface.as_ptr()) };
        if ifindex == 0 {
            bail!("no interface {iface:?}");
        }
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        let mut result = Ok(());
        for f in &frames {
            addr.sll_addr[..6].copy_from_slice(&f[..6.min(f.len())]);
            let n = unsafe {
                libc::sendto(fd, f.as_ptr() as *const _, f.len(), 0, &addr as *const _ as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_ll>() as u32)
            };
            if n < 0 {
                result = Err(anyhow::anyhow!("sending a {}-byte frame: {}", f.len(), std::io::Error::last_os_error()));
                break;
            }
        }
        unsafe { libc::close(fd) };
        result
    })?
}
