//! Health check node ports (`spec.healthCheckNodePort`), as kube-proxy
//! serves them: for a LoadBalancer Service with policy Local, every node
//! answers HTTP on that port, 200 while it has a ready endpoint of the
//! Service and 503 otherwise, so a load balancer (or a fabric operator's
//! health checker) sends traffic only to nodes that serve it. The body is
//! kube-proxy's:
//! `{"service":{"namespace":"NS","name":"NAME"},"localEndpoints":N,"serviceProxyHealthy":true}`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What one port answers: the Service's id and its local ready endpoints.
type Answer = Arc<Mutex<(String, usize)>>;

#[derive(Default)]
pub struct HealthChecks {
    ports: BTreeMap<u16, (Answer, JoinHandle<()>)>,
    /// Ports that could not be bound, last time (logged when it changes).
    failed: Vec<u16>,
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        for (_, task) in self.ports.values() {
            task.abort();
        }
    }
}

/// The reply for `id` with `local` ready endpoints here.
pub fn reply(id: &str, local: usize) -> Vec<u8> {
    let (ns, name) = id.split_once('/').unwrap_or(("", id));
    let body = serde_json::json!({
        "service": {"namespace": ns, "name": name},
        "localEndpoints": local,
        "serviceProxyHealthy": true,
    })
    .to_string();
    let status = if local > 0 {
        "200 OK"
    } else {
        "503 Service Unavailable"
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn serve(listener: TcpListener, answer: Answer) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let answer = answer.clone();
        tokio::spawn(async move {
            // The request itself does not matter (any path, as kube-proxy);
            // read its head so the client sees a clean close.
            let mut buf = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf)).await;
            let msg = {
                let a = answer.lock().expect("health check answer");
                reply(&a.0, a.1)
            };
            let _ = conn.write_all(&msg).await;
            let _ = conn.shutdown().await;
        });
    }
}

impl HealthChecks {
    /// Serve exactly `want` (port → (Service id, local ready endpoints)).
    pub async fn converge(&mut self, want: BTreeMap<u16, (String, usize)>) {
        self.ports.retain(|port, (_, task)| {
            let keep = want.contains_key(port);
            if !keep {
                task.abort();
                tracing::info!(port, "health check node port closed");
            }
            keep
        });
        let mut failed = Vec::new();
        for (port, now) in want {
            if let Some((answer, _)) = self.ports.get(&port) {
                *answer.lock().expect("health check answer") = now;
                continue;
            }
            match TcpListener::bind(("0.0.0.0", port)).await {
                Ok(l) => {
                    tracing::info!(port, service = %now.0, "health check node port open");
                    let answer: Answer = Arc::new(Mutex::new(now));
                    let task = tokio::spawn(serve(l, answer.clone()));
                    self.ports.insert(port, (answer, task));
                }
                Err(e) => {
                    if !self.failed.contains(&port) {
                        tracing::warn!(port, service = %now.0, error = %e, "cannot open a health check node port; retrying");
                    }
                    failed.push(port);
                }
            }
        }
        self.failed = failed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_proxys_answer() {
        let ok = String::from_utf8(reply("default/web", 2)).unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        let body: serde_json::Value =
            serde_json::from_str(ok.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"service": {"namespace": "default", "name": "web"}, "localEndpoints": 2, "serviceProxyHealthy": true})
        );
        let none = String::from_utf8(reply("default/web", 0)).unwrap();
        assert!(
            none.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{none}"
        );
        assert!(none.contains(r#""localEndpoints":0"#), "{none}");
        let body = none.split("\r\n\r\n").nth(1).unwrap();
        let len: usize = none
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(len, body.len());
    }

    #[tokio::test]
    async fn ports_open_answer_and_close() {
        let mut hc = HealthChecks::default();
        // Port 0 is refused by the model; here any free port will do.
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        hc.converge([(port, ("default/web".to_string(), 1))].into())
            .await;
        let get = || async move {
            let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await?;
            let mut out = String::new();
            c.read_to_string(&mut out).await?;
            Ok::<String, std::io::Error>(out)
        };
        assert!(get().await.unwrap().starts_with("HTTP/1.1 200"));
        hc.converge([(port, ("default/web".to_string(), 0))].into())
            .await;
        assert!(get().await.unwrap().starts_with("HTTP/1.1 503"));
        hc.converge(BTreeMap::new()).await;
        // The listener is gone once its task is aborted.
        let mut closed = false;
        for _ in 0..50 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(closed, "port {port} still accepts");
    }
}
