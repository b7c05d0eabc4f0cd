//! The echo server every lab pod runs: HTTP on a TCP port answers with
//! JSON naming the pod, its node, its own address and the client address
//! it saw; the same port on UDP echoes datagrams (a datagram `whoami`
//! gets the JSON instead). `GET /bytes/N` sends N bytes, for transfer tests.
//! Connections are kept alive, so one TCP connection can carry many requests.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub pod: String,
    pub node: String,
    pub ip: String,
    pub client: String,
    #[serde(rename = "clientPort")]
    pub client_port: u16,
}

#[derive(Debug, Clone)]
pub struct EchoOpts {
    pub pod: String,
    pub node: String,
    /// TCP (HTTP) and UDP on each of these.
    pub listen: Vec<SocketAddr>,
    /// Written once both sockets are bound, so a caller can wait on it.
    pub ready_file: Option<PathBuf>,
}

fn seen(o: &EchoOpts, local: SocketAddr, peer: SocketAddr) -> Seen {
    Seen {
        pod: o.pod.clone(),
        node: o.node.clone(),
        ip: local.ip().to_string(),
        client: peer.ip().to_string(),
        client_port: peer.port(),
    }
}

pub async fn serve(o: EchoOpts) -> std::io::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for addr in o.listen.clone() {
        let tcp = TcpListener::bind(addr).await?;
        let udp = UdpSocket::bind(addr).await?;
        let uo = o.clone();
        tasks.spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
                    continue;
                };
                let reply = if buf[..n].starts_with(b"whoami") {
                    let local = udp.local_addr().unwrap_or(addr);
                    // A wildcard-bound UDP socket does not know which local
                    // address the datagram was for; the pod name tells.
                    serde_json::to_vec(&seen(&uo, local, peer)).expect("json")
                } else {
                    buf[..n].to_vec()
                };
                let _ = udp.send_to(&reply, peer).await;
            }
        });
        let to = o.clone();
        tasks.spawn(async move {
            loop {
                let Ok((sock, peer)) = tcp.accept().await else {
                    continue;
                };
                let o = to.clone();
                tokio::spawn(async move {
                    let _ = conn(sock, peer, &o).await;
                });
            }
        });
    }
    if let Some(f) = &o.ready_file {
        std::fs::write(f, std::process::id().to_string())?;
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

async fn conn(sock: TcpStream, peer: SocketAddr, o: &EchoOpts) -> std::io::Result<()> {
    let local = sock.local_addr()?;
    let (r, mut w) = sock.into_split();
    let mut r = BufReader::new(r);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut close = false;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).await? == 0 {
                return Ok(());
            }
            if h.to_ascii_lowercase().starts_with("connection: close") {
                close = true;
            }
            if h == "\r\n" || h == "\n" {
                break;
            }
        }
        if let Some(n) = path
            .strip_prefix("/bytes/")
            .and_then(|n| n.parse::<usize>().ok())
        {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n\r\n");
            w.write_all(head.as_bytes()).await?;
            let chunk = vec![b'x'; 64 * 1024];
            let mut left = n;
            while left > 0 {
                let k = left.min(chunk.len());
                w.write_all(&chunk[..k]).await?;
                left -= k;
            }
        } else {
            let body = serde_json::to_string(&seen(o, local, peer)).expect("json");
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            w.write_all(head.as_bytes()).await?;
            w.write_all(body.as_bytes()).await?;
        }
        if close {
            return Ok(());
        }
    }
}
