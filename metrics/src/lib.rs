//! The `/metrics` endpoint of `mesh-manager` and `mesh-agent` (`--metrics-listen ADDR`) over a
//! minimal HTTP/1.1 server: OpenMetrics (prometheus-client's encoding) to a client that asks for
//! it in `Accept`, as Prometheus does, else the Prometheus text format 0.0.4 (curl, promtool).
//! Bounded like the API: a request of at most 8 KiB read within 5 s, at most 16 connections at
//! once, one response per connection.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
pub use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

const MAX_REQUEST: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 16;
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The registry as served: the metrics' values are atomics, the lock only guards registration.
pub type Shared = Arc<Mutex<Registry>>;

/// The registry in the text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, registry);
    out
}

/// The OpenMetrics text as Prometheus text format 0.0.4: a counter's family is named after its
/// samples (`x_total`), and the OpenMetrics-only lines (`# UNIT`, `# EOF`) go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::BTreeSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|tag| {
            let rest = line.strip_prefix(tag)?;
            let (name, tail) = rest.split_once(' ')?;
            (counters.contains(name) && !name.ends_with("_total"))
                .then(|| format!("{tag}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Serves `GET /metrics` until the listener fails; every other path is 404. `refresh` runs
/// before each rendering, for values read at scrape time.
pub async fn serve<F>(listener: TcpListener, registry: Shared, refresh: F)
where
    F: Fn() + Send + Sync + 'static,
{
    let refresh = Arc::new(refresh);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("metrics: accept: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        // Full: this connection is closed unanswered rather than queued.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let registry = registry.clone();
        let refresh = refresh.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &registry, &*refresh).await {
                tracing::debug!(%peer, "metrics: {e}");
            }
            drop(slot);
        });
    }
}

async fn answer(
    mut stream: TcpStream,
    registry: &Shared,
    refresh: &(dyn Fn() + Send + Sync),
) -> std::io::Result<()> {
    let head = tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "request not read in time")
        })??;
    let (status, content_type, body) = match request_path(&head) {
        Some("/metrics") => {
            refresh();
            let body = render(&registry.lock().unwrap_or_else(|p| p.into_inner()));
            if wants_openmetrics(&head) {
                ("200 OK", OPENMETRICS, body)
            } else {
                ("200 OK", PROMETHEUS_TEXT, to_prometheus_text(&body))
            }
        }
        Some(_) => (
            "404 Not Found",
            "text/plain",
            "not found: try /metrics\n".to_string(),
        ),
        None => ("400 Bad Request", "text/plain", "bad request\n".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Reads up to the end of the request head, at most [`MAX_REQUEST`] bytes.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() >= MAX_REQUEST {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(buf)
}

/// Whether the request's `Accept` header names OpenMetrics.
fn wants_openmetrics(head: &[u8]) -> bool {
    String::from_utf8_lossy(head).lines().skip(1).any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("accept") && v.contains("application/openmetrics-text")
        })
    })
}

/// The path of a `GET` request line (query string dropped), or None if it is not one.
fn request_path(head: &[u8]) -> Option<&str> {
    let line = std::str::from_utf8(head).ok()?.lines().next()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    (method == "GET" && version.starts_with("HTTP/1."))
        .then(|| target.split('?').next().unwrap_or(target))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn request_lines() {
        assert_eq!(
            request_path(b"GET /metrics HTTP/1.1\r\n\r\n"),
            Some("/metrics")
        );
        assert_eq!(
            request_path(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Some("/metrics")
        );
        assert_eq!(request_path(b"POST /metrics HTTP/1.1\r\n\r\n"), None);
        assert_eq!(request_path(b"GET /metrics\r\n\r\n"), None);
        assert_eq!(request_path(b"\xff\xfe"), None);
    }

    async fn get(addr: std::net::SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_the_registry_and_nothing_else() {
        let mut registry = Registry::with_prefix("meshnet_test");
        let c = Counter::<u64>::default();
        registry.register("requests", "Requests seen", c.clone());
        c.inc();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let refreshed = Counter::<u64>::default();
        let seen = refreshed.clone();
        tokio::spawn(serve(listener, Arc::new(Mutex::new(registry)), move || {
            seen.inc();
        }));

        let om = get(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0\r\n\r\n",
        )
        .await;
        assert!(om.starts_with("HTTP/1.1 200 OK\r\n"), "{om}");
        assert!(om.contains(OPENMETRICS), "{om}");
        assert!(
            om.contains("# TYPE meshnet_test_requests counter\n"),
            "{om}"
        );
        assert!(
            om.ends_with("meshnet_test_requests_total 1\n# EOF\n"),
            "{om}"
        );
        let text = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(text.contains(PROMETHEUS_TEXT), "{text}");
        assert!(
            text.ends_with(
                "# HELP meshnet_test_requests_total Requests seen.\n\
                 # TYPE meshnet_test_requests_total counter\n\
                 meshnet_test_requests_total 1\n"
            ),
            "{text}"
        );
        assert_eq!(refreshed.get(), 2, "refreshed before each rendering");
        let missing = get(addr, "GET / HTTP/1.1\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let huge = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_REQUEST * 2));
        let mut s = TcpStream::connect(addr).await.unwrap();
        // The server stops reading and closes: either the write or the read sees it.
        let _ = s.write_all(huge.as_bytes()).await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        assert!(out.is_empty(), "no answer to an oversized request");
    }
}
