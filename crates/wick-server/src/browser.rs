//! What a web page may do with the server: the `Origin` and `Host` checks and CORS.
//!
//! A page on any site can send a "simple" cross-origin POST (`Content-Type: text/plain`, no
//! preflight) to `http://127.0.0.1:8080`; the browser hides the answer but the server has
//! generated it. And a page whose own name resolves to 127.0.0.1 (DNS rebinding) is
//! same-origin with the server, so it can read the answers too. So, before a body is read:
//! - a request whose `Origin` is neither the server's own (its `Host`) nor allowed is refused
//!   (403); requests without `Origin` (curl, SDKs, servers) are not affected;
//! - when the host check is on (by default when bound to a loopback address), the `Host`
//!   header must be a loopback name or address, at any port, or an allowed host;
//! - allowed origins get CORS headers, and their preflights (`OPTIONS`) a 204.
//!
//! Health and metrics paths are never refused: probes and scrapers must keep working.

use axum::extract::{Request, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::{ApiError, AppState};

/// Which pages and host names may reach the API.
#[derive(Debug, Clone, Default)]
pub struct BrowserPolicy {
    /// Web origins (`scheme://host[:port]`, as browsers send `Origin`) that may call the API
    /// and get CORS answers; `*` allows any.
    pub allowed_origins: Vec<String>,
    /// Host names (any port) or `host:port` accepted in `Host` beside the loopback ones;
    /// `*` accepts any.
    pub allowed_hosts: Vec<String>,
    /// Whether `Host` is checked at all: by default when the listener is a loopback address,
    /// or when hosts are listed.
    pub check_host: bool,
}

impl BrowserPolicy {
    /// The policy for a listener on `bind` (an address or name) with these lists.
    pub fn for_listener(
        bind: &str,
        allowed_origins: Vec<String>,
        allowed_hosts: Vec<String>,
    ) -> Self {
        let check_host = is_loopback_host(bind) || !allowed_hosts.is_empty();
        BrowserPolicy {
            allowed_origins,
            allowed_hosts,
            check_host,
        }
    }

    /// The default of a server on a loopback address: no origin but its own, loopback names.
    pub fn loopback() -> Self {
        Self::for_listener("127.0.0.1", Vec::new(), Vec::new())
    }

    /// Whether `host` passes the host check (always, when the check is off).
    fn host_passes(&self, host: &str) -> bool {
        if !self.check_host || is_loopback_host(host) {
            return true;
        }
        let name = host_name(host);
        self.allowed_hosts
            .iter()
            .any(|h| h == "*" || h.eq_ignore_ascii_case(host) || h.eq_ignore_ascii_case(name))
    }

    fn origin_allowed(&self, origin: &str) -> bool {
        let origin = normal_origin(origin);
        self.allowed_origins
            .iter()
            .any(|o| o == "*" || normal_origin(o) == origin)
    }
}

/// Paths that probes and scrapers call; never refused (but still given CORS headers).
fn exempt(path: &str) -> bool {
    matches!(path, "/health" | "/health/live" | "/metrics")
}

/// `host[:port]` without the port (`[::1]:8080` gives `[::1]`).
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// `localhost` (and names under it), 127.0.0.0/8 and `::1`, with or without a port.
pub fn is_loopback_host(host: &str) -> bool {
    // A bare IPv6 address (a listener's, `::1`) has colons but no port.
    if let Ok(ip) = host.trim().parse::<std::net::IpAddr>() {
        return ip.is_loopback();
    }
    let name = host_name(host.trim()).trim_end_matches('.');
    let name = name.trim_start_matches('[').trim_end_matches(']');
    let lower = name.to_ascii_lowercase();
    if lower == "localhost" || lower.ends_with(".localhost") {
        return true;
    }
    name.parse::<std::net::IpAddr>()
        .map(|ip| ip.is_loopback())
        .unwrap_or(false)
}

/// The authority (`host[:port]`) of an origin `scheme://host[:port]` (any scheme: desktop
/// apps and extensions send `tauri://localhost`, `chrome-extension://id`).
fn origin_authority(origin: &str) -> Option<&str> {
    let (scheme, rest) = origin.split_once("://")?;
    let rest = rest.trim_end_matches('/');
    (!scheme.is_empty() && !rest.is_empty() && !rest.contains('/')).then_some(rest)
}

/// An origin compared as browsers write it: lower case, no trailing `/`, no default port.
fn normal_origin(origin: &str) -> String {
    let o = origin.trim().trim_end_matches('/').to_ascii_lowercase();
    for (scheme, port) in [("http://", ":80"), ("https://", ":443")] {
        if o.starts_with(scheme) && o.ends_with(port) {
            return o[..o.len() - port.len()].to_string();
        }
    }
    o
}

/// Whether `origin` can be an `--allowed-origins` entry: `*`, `null`, or
/// `scheme://host[:port]`.
pub fn is_origin(origin: &str) -> bool {
    origin == "*" || origin == "null" || origin_authority(origin).is_some()
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn forbidden(code: &'static str, message: String) -> Response {
    ApiError::Forbidden { message, code }.into_response()
}

/// The middleware: refuses what the policy does not allow, answers allowed preflights and
/// adds CORS headers for allowed origins. Every answer varies on `Origin`.
pub(crate) async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let mut res = check(state.browser(), req, next).await;
    res.headers_mut()
        .append(header::VARY, HeaderValue::from_static("Origin"));
    res
}

async fn check(policy: &BrowserPolicy, req: Request, next: Next) -> Response {
    let path_exempt = exempt(req.uri().path());
    let headers = req.headers();
    // A request without Host is HTTP/1.0 from a program, never a browser's.
    let host = header_str(headers, header::HOST).unwrap_or("");
    if !path_exempt && !host.is_empty() && !policy.host_passes(host) {
        return forbidden(
            "host_not_allowed",
            format!(
                "The Host header {host:?} is not a name this server answers to: against DNS \
                 rebinding it accepts loopback names (localhost, 127.0.0.1, [::1]) and those \
                 given with --allowed-hosts; start it with --allowed-hosts {} to accept this one.",
                host_name(host)
            ),
        );
    }
    let Some(origin) = headers.get(header::ORIGIN).cloned() else {
        return next.run(req).await;
    };
    let origin_text = origin.to_str().unwrap_or("");
    let same_origin = !host.is_empty()
        && origin_authority(origin_text).is_some_and(|a| a.eq_ignore_ascii_case(host));
    if same_origin {
        return next.run(req).await;
    }
    if !policy.origin_allowed(origin_text) {
        if path_exempt {
            return next.run(req).await;
        }
        return forbidden(
            "origin_not_allowed",
            format!(
                "Requests from the web origin {origin_text:?} are not allowed: a page there \
                 cannot drive this server. To let it, start the server with --allowed-origins \
                 {origin_text}."
            ),
        );
    }
    let preflight = req.method() == Method::OPTIONS
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if !preflight {
        let mut res = next.run(req).await;
        cors_headers(res.headers_mut(), origin);
        return res;
    }
    let mut res = StatusCode::NO_CONTENT.into_response();
    let h = res.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    // Whatever headers the page asks to send (authorization, content-type, the SDKs'
    // x-stainless-* and anthropic-version): the API key, not CORS, guards the API.
    if let Some(asked) = headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
    }
    // Chrome's Private Network Access: a public page reaching a loopback or private address.
    if headers.contains_key("access-control-request-private-network") {
        h.insert(
            "access-control-allow-private-network",
            HeaderValue::from_static("true"),
        );
    }
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    h.append(
        header::VARY,
        HeaderValue::from_static("Access-Control-Request-Method, Access-Control-Request-Headers"),
    );
    cors_headers(h, origin);
    res
}

fn cors_headers(h: &mut HeaderMap, origin: HeaderValue) {
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("x-request-id, retry-after"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names_and_addresses() {
        for h in [
            "localhost",
            "localhost:8080",
            "LOCALHOST.",
            "app.localhost:3000",
            "127.0.0.1",
            "127.1.2.3:9",
            "[::1]:8080",
            "::1",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "attacker.example:8080",
            "localhost.attacker.example",
            "0.0.0.0:8080",
            "10.0.0.1",
            "[::2]:80",
            "",
            "127.0.0.1.nip.io",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn hosts_are_checked_when_bound_to_loopback_or_listed() {
        let p = BrowserPolicy::loopback();
        assert!(p.host_passes("127.0.0.1:8080"));
        assert!(!p.host_passes("attacker.example:8080"));
        let p = BrowserPolicy::for_listener("127.0.0.1", vec![], vec!["wick.lan".into()]);
        assert!(p.host_passes("wick.lan:8080"));
        assert!(p.host_passes("WICK.LAN"));
        assert!(!p.host_passes("other.lan"));
        // Bound to every address: unchecked unless hosts are listed.
        let p = BrowserPolicy::for_listener("0.0.0.0", vec![], vec![]);
        assert!(p.host_passes("attacker.example:8080"));
        let p = BrowserPolicy::for_listener("0.0.0.0", vec![], vec!["wick.example.com:443".into()]);
        assert!(p.host_passes("wick.example.com:443"));
        assert!(!p.host_passes("wick.example.com:8443"));
        assert!(p.host_passes("localhost:8080"));
        let p = BrowserPolicy::for_listener("127.0.0.1", vec![], vec!["*".into()]);
        assert!(p.host_passes("anything:1"));
    }

    #[test]
    fn origins_match_whole() {
        let p = BrowserPolicy::for_listener(
            "127.0.0.1",
            vec!["https://app.example.com/".into()],
            vec![],
        );
        assert!(p.origin_allowed("https://app.example.com"));
        assert!(!p.origin_allowed("https://app.example.com.evil.example"));
        assert!(!p.origin_allowed("http://app.example.com"));
        assert!(!p.origin_allowed("null"));
        assert_eq!(
            origin_authority("http://127.0.0.1:8080"),
            Some("127.0.0.1:8080")
        );
        assert_eq!(origin_authority("null"), None);
        assert_eq!(host_name("[::1]:8080"), "[::1]");
        assert_eq!(host_name("example.com:80"), "example.com");
    }
}
