//! Small clients the lab and its tests run inside namespaces: an HTTP GET,
//! a wait for a TCP port, a long-lived connection that must not break,
//! and a UDP exchange. Blocking std I/O, every call bounded by a timeout.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

fn timeout_err(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, what)
}

/// Read one HTTP response with a Content-Length body; returns the body.
fn read_response(r: &mut BufReader<TcpStream>) -> std::io::Result<Vec<u8>> {
    let mut status = String::new();
    r.read_line(&mut status)?;
    if !status.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("bad status line {status:?}")));
    }
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Err(std::io::Error::other("connection closed in headers"));
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v
                .trim()
                .parse()
                .map_err(|_| std::io::Error::other("bad content-length"))?;
        }
        if h == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok(body)
}

/// `GET PATH` on ADDR; returns the body.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<Vec<u8>> {
    http_get_port(addr, path, timeout).map(|(body, _)| body)
}

/// `GET PATH` on ADDR; returns the body and the local port the connection
/// used (how `lab trace --verify` finds this connection in nftables' trace).
pub fn http_get_port(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(Vec<u8>, u16)> {
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    let port = s.local_addr()?.port();
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    (&s).write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    Ok((read_response(&mut BufReader::new(s))?, port))
}

/// Wait until ADDR accepts a TCP connection.
pub fn tcp_wait(addr: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(timeout_err(format!(
                    "{addr} did not accept within {timeout:?}: {e}"
                )))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Keep one TCP connection to ADDR for `duration`, sending a request every
/// `interval`; fails on the first request that does not come back. Returns
/// how many requests succeeded.
/// A request may take up to `patience` (TCP retransmits through a path
/// change).
pub fn hold(
    addr: SocketAddr,
    interval: Duration,
    duration: Duration,
    patience: Duration,
) -> std::io::Result<u64> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(patience))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let end = Instant::now() + duration;
    let mut n = 0;
    while Instant::now() < end {
        w.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())?;
        read_response(&mut r).map_err(|e| {
            std::io::Error::other(format!(
                "request {} on the held connection failed: {e}",
                n + 1
            ))
        })?;
        n += 1;
        std::thread::sleep(interval);
    }
    Ok(n)
}

/// Send one datagram and wait for the reply.
pub fn udp(addr: SocketAddr, payload: &[u8], timeout: Duration) -> std::io::Result<Vec<u8>> {
    udp_retry(addr, payload, timeout, Duration::ZERO).map(|(b, _)| b)
}

/// Send a datagram from one connected socket (one conntrack flow, and an
/// ICMP port unreachable surfaces as "connection refused") until a reply
/// comes or `retry_for` has passed; returns the reply and the local port.
pub fn udp_retry(
    addr: SocketAddr,
    payload: &[u8],
    timeout: Duration,
    retry_for: Duration,
) -> std::io::Result<(Vec<u8>, u16)> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.connect(addr)?;
    s.set_read_timeout(Some(timeout))?;
    let port = s.local_addr()?.port();
    let deadline = Instant::now() + retry_for;
    let mut buf = vec![0; 65536];
    loop {
        let r = s.send(payload).and_then(|_| s.recv(&mut buf));
        match r {
            Ok(n) => {
                buf.truncate(n);
                return Ok((buf, port));
            }
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Open `count` separate connections (one request each) and count which
/// pod answered each; failures are counted under "error".
pub fn http_many(
    addr: SocketAddr,
    count: usize,
    timeout: Duration,
) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    for _ in 0..count {
        let who = http_get(addr, "/", timeout)
            .ok()
            .and_then(|b| serde_json::from_slice::<crate::echo::Seen>(&b).ok())
            .map(|s| s.pod)
            .unwrap_or_else(|| "error".into());
        *out.entry(who).or_default() += 1;
    }
    out
}

/// From one UDP socket (one conntrack flow), send `whoami` every
/// `interval` for `duration` and return who answered each time ("-" when
/// nobody did within the interval).
pub fn udp_watch(
    addr: SocketAddr,
    interval: Duration,
    duration: Duration,
) -> std::io::Result<Vec<String>> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(interval))?;
    let end = Instant::now() + duration;
    let mut out = Vec::new();
    let mut buf = vec![0; 65536];
    while Instant::now() < end {
        let sent = Instant::now();
        // A rejected datagram comes back as ICMP, which a later send reports; ignore it.
        let _ = s.send_to(b"whoami", addr);
        match s.recv_from(&mut buf) {
            Ok((n, _)) => out.push(
                serde_json::from_slice::<crate::echo::Seen>(&buf[..n])
                    .map(|s| s.pod)
                    .unwrap_or_else(|_| "?".into()),
            ),
            Err(_) => out.push("-".into()),
        }
        if let Some(rest) = interval.checked_sub(sent.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    Ok(out)
}

/// Time `count` TCP handshakes to ADDR (connect, then close); returns
/// (p50, p99) in microseconds.
pub fn connect_latency(addr: SocketAddr, count: usize) -> std::io::Result<(f64, f64)> {
    let mut us = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
        drop(s);
    }
    us.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| us[((p / 100.0) * (us.len() - 1) as f64).round() as usize];
    Ok((pct(50.0), pct(99.0)))
}
