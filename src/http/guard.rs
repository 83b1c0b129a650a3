//! Response headers that keep browsers from misreading or framing what nudge
//! serves, and the Host check that keeps a page on another site from
//! reaching nudge through DNS rebinding.

use super::ApiState;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::LazyLock;

/// The staff and wall pages' inline scripts, allowed by hash rather than with
/// `'unsafe-inline'`, so an injected script would not run. Computed from the
/// page itself, so editing the page cannot leave a stale hash behind.
static CSP: LazyLock<String> = LazyLock::new(|| {
    use base64_hashes::script_hashes;
    let scripts: Vec<String> = script_hashes(include_str!("staff.html"))
        .into_iter()
        .chain(script_hashes(include_str!("wall.html")))
        .map(|h| format!("'sha256-{h}'"))
        .collect();
    format!(
        "default-src 'none'; script-src {}; style-src 'unsafe-inline'; connect-src 'self'; \
         img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        scripts.join(" ")
    )
});

mod base64_hashes {
    /// Base64 (standard, padded) of the SHA-256 of each `<script>` body.
    pub fn script_hashes(html: &str) -> Vec<String> {
        use sha2::{Digest, Sha256};
        let mut out = Vec::new();
        let mut rest = html;
        while let Some(start) = rest.find("<script>") {
            let body = &rest[start + "<script>".len()..];
            let Some(end) = body.find("</script>") else {
                break;
            };
            out.push(base64(&Sha256::digest(&body.as_bytes()[..end])));
            rest = &body[end..];
        }
        out
    }

    fn base64(bytes: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = String::new();
        for c in bytes.chunks(3) {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            for i in 0..4 {
                if i <= c.len() {
                    s.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
                } else {
                    s.push('=');
                }
            }
        }
        s
    }

    #[cfg(test)]
    #[test]
    fn base64_matches_the_rfc_examples() {
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(
            script_hashes("<script>x</script><p><script>y</script>").len(),
            2
        );
    }
}

/// nosniff on everything; on HTML also a CSP, no framing and no referrer
/// (an unsubscribe link's token must not leak to another site).
pub async fn security_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    let html = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html"));
    if html {
        if let Ok(csp) = HeaderValue::from_str(&CSP) {
            h.insert(header::CONTENT_SECURITY_POLICY, csp);
        }
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
    }
    res
}

/// With `http.allowed_hosts`, a request naming another host gets 421.
/// `/health` and `/metrics` are exempt: load balancers and Prometheus probe
/// by address, and neither tells anything about a client.
pub async fn check_host(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    if s.allowed_hosts.is_empty() || matches!(req.uri().path(), "/health" | "/metrics") {
        return next.run(req).await;
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if host_allowed(&s.allowed_hosts, &host) {
        next.run(req).await
    } else {
        (
            StatusCode::MISDIRECTED_REQUEST,
            axum::Json(
                serde_json::json!({"error": "this host is not served here (http.allowed_hosts)"}),
            ),
        )
            .into_response()
    }
}

/// `name` allows the host on any port, `name:port` on that port only.
fn host_allowed(allowed: &[String], host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        // `[::1]:8080`, `shop:8080`; a bare IPv6 literal has no port.
        Some((n, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !n.ends_with(':') => n,
        _ => host,
    };
    allowed
        .iter()
        .any(|a| a.eq_ignore_ascii_case(host) || a.eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::host_allowed;

    #[test]
    fn hosts_match_by_name_or_name_and_port() {
        let allowed = [
            "nudge.shop.example".to_string(),
            "localhost:8080".to_string(),
        ];
        assert!(host_allowed(&allowed, "nudge.shop.example"));
        assert!(host_allowed(&allowed, "nudge.shop.example:443"));
        assert!(host_allowed(&allowed, "localhost:8080"));
        assert!(!host_allowed(&allowed, "localhost:9090"));
        assert!(!host_allowed(&allowed, "evil.example"));
        assert!(!host_allowed(&allowed, ""));
    }
}
