//! `/healthz`, `/readyz` and `/metrics` over plain HTTP, for the kubelet's
//! probes and Prometheus. Read-only: it serves what the agent's loop last
//! recorded and changes nothing. A minimal HTTP/1.0 responder is enough for
//! three GETs; it reads at most one small request per connection.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the loop records for the endpoints to show.
#[derive(Debug)]
pub struct Health {
    pub started: Instant,
    /// Last time the agent's loop made progress (any event or tick).
    pub heartbeat: Instant,
    /// Why the node is not ready, or `None` when it is: data plane
    /// programmed, Service proxy synced, CNI config written.
    pub not_ready: Option<String>,
    pub datastore_connected: bool,
    pub peers_by_mode: Vec<(String, u64)>,
    pub services: u64,
    pub full_syncs: u64,
    pub delta_syncs: u64,
    pub last_sync_seconds: f64,
    pub reconcile_errors: u64,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            heartbeat: Instant::now(),
            not_ready: Some("starting".into()),
            datastore_connected: false,
            peers_by_mode: Vec::new(),
            services: 0,
            full_syncs: 0,
            delta_syncs: 0,
            last_sync_seconds: 0.0,
            reconcile_errors: 0,
        }
    }
}

pub type Shared = Arc<Mutex<Health>>;

/// The response to one request line: (status, body).
pub fn respond(h: &Health, path: &str, stale_after: Duration) -> (u16, String) {
    match path {
        "/healthz" => {
            let age = h.heartbeat.elapsed();
            if age > stale_after {
                (503, format!("the agent's loop has not run for {age:?}\n"))
            } else {
                (200, "ok\n".into())
            }
        }
        "/readyz" => match &h.not_ready {
            None => (200, "ready\n".into()),
            Some(why) => (503, format!("not ready: {why}\n")),
        },
        "/metrics" => (200, metrics(h)),
        _ => (404, "not found: try /healthz, /readyz or /metrics\n".into()),
    }
}

fn metrics(h: &Health) -> String {
    let mut s = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, v: String| {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    };
    gauge(
        "tweed_ready",
        "1 when pods can be wired on this node.",
        "gauge",
        u8::from(h.not_ready.is_none()).to_string(),
    );
    gauge(
        "tweed_datastore_connected",
        "1 while the datastore's watches work.",
        "gauge",
        u8::from(h.datastore_connected).to_string(),
    );
    gauge(
        "tweed_services",
        "Services in the proxy's last sync.",
        "gauge",
        h.services.to_string(),
    );
    gauge(
        "tweed_proxy_last_sync_seconds",
        "How long the last Service proxy transaction took.",
        "gauge",
        format!("{:.6}", h.last_sync_seconds),
    );
    gauge(
        "tweed_reconcile_errors_total",
        "Data-plane reconciles that failed (retried at the next resync).",
        "counter",
        h.reconcile_errors.to_string(),
    );
    gauge(
        "tweed_uptime_seconds",
        "Seconds since the agent started.",
        "gauge",
        format!("{:.0}", h.started.elapsed().as_secs_f64()),
    );
    let _ = writeln!(
        s,
        "# HELP tweed_proxy_syncs_total Service proxy transactions, by kind.\n# TYPE tweed_proxy_syncs_total counter\ntweed_proxy_syncs_total{{kind=\"full\"}} {}\ntweed_proxy_syncs_total{{kind=\"delta\"}} {}",
        h.full_syncs, h.delta_syncs
    );
    let _ = writeln!(
        s,
        "# HELP tweed_peers Peers by the path this node routes them on.\n# TYPE tweed_peers gauge"
    );
    for (mode, n) in &h.peers_by_mode {
        let _ = writeln!(s, "tweed_peers{{mode=\"{mode}\"}} {n}");
    }
    s
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "Bad Request",
    }
}

/// Serve until the task is dropped. Bind errors are returned at once.
pub async fn serve(
    addr: SocketAddr,
    health: Shared,
    stale_after: Duration,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /healthz, /readyz, /metrics");
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let health = health.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let mut n = 0;
                let read = tokio::time::timeout(Duration::from_secs(2), async {
                    while n < buf.len() {
                        match sock.read(&mut buf[n..]).await {
                            Ok(0) | Err(_) => break,
                            Ok(k) => n += k,
                        }
                        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                })
                .await;
                if read.is_err() {
                    return;
                }
                let req = String::from_utf8_lossy(&buf[..n]);
                let mut parts = req.split_whitespace();
                let (code, body) = match (parts.next(), parts.next()) {
                    (Some("GET"), Some(path)) => {
                        let path = path.split('?').next().unwrap_or(path);
                        let h = health.lock().expect("health lock");
                        respond(&h, path, stale_after)
                    }
                    _ => (400, "only GET\n".into()),
                };
                let head = format!(
                    "HTTP/1.0 {code} {}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    reason(code),
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(body.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_and_healthy_follow_the_loop() {
        let mut h = Health::default();
        let stale = Duration::from_secs(30);
        assert_eq!(respond(&h, "/healthz", stale).0, 200);
        let (code, body) = respond(&h, "/readyz", stale);
        assert_eq!((code, body.as_str()), (503, "not ready: starting\n"));
        h.not_ready = None;
        assert_eq!(respond(&h, "/readyz", stale).0, 200);
        h.heartbeat = Instant::now() - Duration::from_secs(60);
        assert_eq!(respond(&h, "/healthz", stale).0, 503);
        assert_eq!(respond(&h, "/nope", stale).0, 404);
    }

    #[test]
    fn metrics_are_prometheus_text() {
        let h = Health {
            peers_by_mode: vec![("vxlan".into(), 2), ("direct".into(), 1)],
            services: 7,
            not_ready: None,
            ..Default::default()
        };
        let (_, m) = respond(&h, "/metrics", Duration::from_secs(30));
        assert!(
            m.contains("# TYPE tweed_ready gauge\ntweed_ready 1\n"),
            "{m}"
        );
        assert!(m.contains("tweed_services 7\n"));
        assert!(m.contains("tweed_peers{mode=\"vxlan\"} 2\n"));
        for line in m.lines().filter(|l| !l.starts_with('#')) {
            let mut f = line.rsplitn(2, ' ');
            let v = f.next().unwrap();
            assert!(v.parse::<f64>().is_ok(), "not a sample: {line}");
        }
    }
}
