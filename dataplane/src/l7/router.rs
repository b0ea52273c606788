//! HTTP routing by host and path with Ingress v1 semantics, compiled from `L7State` into hash
//! tables so that a request costs a few lookups whatever the number of hosts and paths:
//!
//! - host: the Host header without its port, lower-cased into a stack buffer (no allocation),
//!   looked up exactly, then as a one-label wildcard (`*.example.com` matches `a.example.com`,
//!   not `example.com` nor `a.b.example.com`), then the rules without a host. The most specific
//!   host that has rules is the one used (as nginx server names and Envoy virtual hosts work):
//!   a request it has no path for goes to the default backend, not to less specific hosts.
//! - path (case-sensitive, query string ignored): Exact paths by one lookup of the whole path;
//!   then Prefix paths element by element on `/`, longest first: the path itself (trailing
//!   slash dropped), then cut at each `/` from the right, down to `/`. So `/aaa/bbb` matches
//!   `/aaa/bbb`, `/aaa/bbb/` and `/aaa/bbb/ccc` but not `/aaa/bbbxyz`, and an Exact path wins a
//!   tie with a Prefix of the same string. Cost: at most one lookup per path element.

use fulcrum_config::ingress::{HostMatch, L7Backend, L7State, PathType};
// aHash: keyed per process (HashDoS-resistant, as std's SipHash) and several times faster on
// short strings, which is all a router hashes.
use ahash::AHashMap as HashMap;

/// Where a request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `namespace/name` of the Service.
    pub service: String,
    /// The Service's port number; None when the Ingress named one that does not exist.
    pub port: Option<u16>,
    /// Why the Service or port could not be resolved (the request gets 503).
    pub why_unresolved: Option<String>,
    /// Where requests go (none ready: 503).
    pub endpoints: Vec<std::net::SocketAddr>,
    /// The IPv4 ones: the proxy connects from the appliance's IPv4 address. Sorted out once
    /// here, so that picking one per request allocates nothing.
    pub endpoints_v4: Vec<std::net::SocketAddrV4>,
}

impl Target {
    fn from(b: &L7Backend) -> Target {
        Target {
            service: b.service.to_string(),
            port: b.port,
            why_unresolved: b.unresolved.clone(),
            endpoints: b.endpoints.clone(),
            endpoints_v4: b
                .endpoints
                .iter()
                .filter_map(|e| match e {
                    std::net::SocketAddr::V4(a) => Some(*a),
                    std::net::SocketAddr::V6(_) => None,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Default)]
struct PathTable {
    exact: HashMap<String, Target>,
    /// Keyed by the prefix without its trailing slash (`/` is the empty string).
    prefix: HashMap<String, Target>,
    /// Bit n set when some key of `exact` / `prefix` is n bytes long (n < 127; bit 127 stands
    /// for every longer key): a candidate of a length no key has is not looked up, so a deep
    /// request path costs about one lookup per rule it could match, not one per element.
    exact_lens: u128,
    prefix_lens: u128,
    /// The host has TLS: plain HTTP requests are redirected to HTTPS.
    https_redirect: bool,
}

#[inline]
fn len_bit(n: usize) -> u128 {
    1u128 << n.min(127)
}

impl PathTable {
    fn insert(&mut self, path: &str, t: PathType, target: Target) {
        // First come, first kept: the translation already ordered by precedence.
        match t {
            PathType::Exact => {
                self.exact_lens |= len_bit(path.len());
                self.exact.entry(path.to_string()).or_insert(target);
            }
            PathType::Prefix => {
                let key = path.strip_suffix('/').unwrap_or(path);
                self.prefix_lens |= len_bit(key.len());
                self.prefix.entry(key.to_string()).or_insert(target);
            }
        }
    }

    fn route(&self, path: &str) -> Option<&Target> {
        if self.exact_lens & len_bit(path.len()) != 0 {
            if let Some(t) = self.exact.get(path) {
                return Some(t);
            }
        }
        if self.prefix.is_empty() {
            return None;
        }
        // Candidates from the longest: the path without a trailing slash, then cut before
        // each '/' from the right, down to the empty string (the prefix `/`).
        let bytes = path.as_bytes();
        let mut end = if bytes.last() == Some(&b'/') { bytes.len() - 1 } else { bytes.len() };
        loop {
            if self.prefix_lens & len_bit(end) != 0 {
                if let Some(t) = self.prefix.get(&path[..end]) {
                    return Some(t);
                }
            }
            if end == 0 {
                return None;
            }
            end = bytes[..end].iter().rposition(|&b| b == b'/').unwrap_or(0);
        }
    }
}

/// The outcome of routing one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// Matched a rule or the default backend.
    Backend(&'a Target),
    /// No rule and no default backend: 404.
    NotFound,
    /// The request's host or path cannot be routed at all: 400.
    BadRequest(&'static str),
}

#[derive(Debug, Default)]
pub struct Router {
    exact: HashMap<String, PathTable>,
    /// Keyed by what follows the wildcard's `*.`.
    wildcard: HashMap<String, PathTable>,
    any: Option<PathTable>,
    default: Option<Target>,
}

/// Longest Host header value routed (a DNS name is at most 253 characters, plus a port).
const MAX_HOST: usize = 260;

impl Router {
    pub fn compile(state: &L7State) -> Router {
        let mut r = Router { default: state.default_backend.as_ref().map(Target::from), ..Default::default() };
        for h in &state.hosts {
            let table = match &h.host {
                HostMatch::Exact(x) => r.exact.entry(x.clone()).or_default(),
                HostMatch::Wildcard(x) => r.wildcard.entry(x.clone()).or_default(),
                HostMatch::Any => r.any.get_or_insert_with(PathTable::default),
            };
            table.https_redirect |= h.ssl_redirect;
            for p in &h.paths {
                table.insert(&p.path, p.path_type, Target::from(&p.backend));
            }
        }
        r
    }

    /// The most specific host table for a Host header.
    fn table(&self, host: &str) -> Option<&PathTable> {
        self.exact
            .get(host)
            .or_else(|| {
                let dot = host.find('.')?;
                self.wildcard.get(&host[dot + 1..]).filter(|_| dot > 0)
            })
            .or(self.any.as_ref())
    }

    /// Whether plain HTTP requests for this Host header go to HTTPS instead.
    pub fn https_redirect(&self, host: &str) -> bool {
        let mut buf = [0u8; MAX_HOST];
        normalise_host(host, &mut buf).and_then(|h| self.table(h)).is_some_and(|t| t.https_redirect)
    }

    /// Routes a request by its Host header (or `:authority`) and request target.
    pub fn route(&self, host: &str, target: &str) -> Route<'_> {
        let path = match target.bytes().position(|b| b == b'?' || b == b'#') {
            Some(i) => &target[..i],
            None => target,
        };
        if !path.starts_with('/') {
            return Route::BadRequest("the request target is not an absolute path");
        }
        let mut buf = [0u8; MAX_HOST];
        let Some(host) = normalise_host(host, &mut buf) else {
            return Route::BadRequest("invalid Host header");
        };
        let table = self.table(host);
        match table.and_then(|t| t.route(path)).or(self.default.as_ref()) {
            Some(t) => Route::Backend(t),
            None => Route::NotFound,
        }
    }
}

/// The Host header without port and trailing dot, lower case: the header itself when it is
/// already (the usual case, no copy), else lowered into `buf`. None if it is not a plausible
/// host (empty, too long, characters no host has).
fn normalise_host<'a>(host: &'a str, buf: &'a mut [u8; MAX_HOST]) -> Option<&'a str> {
    let h = host.trim().as_bytes();
    let h = if h.first() == Some(&b'[') {
        // An IPv6 literal keeps its brackets; the port follows them.
        let end = h.iter().position(|&b| b == b']')?;
        &h[..=end]
    } else {
        match h.iter().rposition(|&b| b == b':') {
            Some(i) if h[i + 1..].iter().all(u8::is_ascii_digit) => &h[..i],
            Some(_) => return None,
            None => h,
        }
    };
    let h = h.strip_suffix(b".").unwrap_or(h);
    if h.is_empty() || h.len() > MAX_HOST {
        return None;
    }
    let mut class = HOST_OK;
    for &b in h {
        class |= HOST_CHARS[b as usize];
    }
    if class & HOST_BAD != 0 {
        return None;
    }
    let upper = class & HOST_UPPER != 0;
    let out: &[u8] = if upper {
        let out = &mut buf[..h.len()];
        out.copy_from_slice(h);
        out.make_ascii_lowercase();
        out
    } else {
        h
    };
    // SAFETY: every byte was checked above to be one of HOST_CHARS' ASCII characters.
    Some(unsafe { std::str::from_utf8_unchecked(out) })
}

const HOST_OK: u8 = 0;
const HOST_UPPER: u8 = 1;
const HOST_BAD: u8 = 2;

/// Per byte: what it is in a Host header (letters, digits, `-._` and the `[]:` of IPv6
/// literals are allowed), so a header is checked with one table lookup and OR per byte.
const HOST_CHARS: [u8; 256] = {
    let mut t = [HOST_BAD; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'.' | b'_' | b'[' | b']' | b':') {
            t[b] = HOST_OK;
        } else if c.is_ascii_uppercase() {
            t[b] = HOST_UPPER;
        }
        b += 1;
    }
    t
};

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_config::ingress::{L7Host, L7Path};
    use fulcrum_config::model::ObjectRef;

    fn backend(name: &str) -> L7Backend {
        L7Backend {
            service: ObjectRef { namespace: "ns".into(), name: name.into() },
            port: Some(80),
            unresolved: None,
            endpoints: vec![],
        }
    }

    /// One host (any) with the given (path, type, backend name) rules.
    fn router(host: HostMatch, paths: &[(&str, PathType, &str)]) -> Router {
        let paths = paths
            .iter()
            .map(|&(p, t, b)| L7Path {
                path: p.into(),
                path_type: t,
                backend: backend(b),
                ingress: ObjectRef { namespace: "ns".into(), name: "i".into() },
            })
            .collect();
        Router::compile(&L7State { hosts: vec![L7Host { host, paths, ..Default::default() }], ..Default::default() })
    }

    fn routed<'a>(r: &'a Router, host: &str, path: &str) -> Option<&'a str> {
        match r.route(host, path) {
            Route::Backend(t) => Some(t.service.as_str()),
            _ => None,
        }
    }

    use PathType::{Exact, Prefix};

    /// The Kubernetes documentation's table of path matching examples, row by row
    /// (https://kubernetes.io/docs/concepts/services-networking/ingress/#examples).
    #[test]
    fn kubernetes_path_matching_examples() {
        // (rules, request path, matches?)
        type Row<'a> = (&'a [(&'a str, PathType)], &'a str, bool);
        let rows: &[Row] = &[
            (&[("/", Prefix)], "/anything/at/all", true),
            (&[("/foo", Exact)], "/foo", true),
            (&[("/foo", Exact)], "/bar", false),
            (&[("/foo", Exact)], "/foo/", false),
            (&[("/foo/", Exact)], "/foo", false),
            (&[("/foo", Prefix)], "/foo", true),
            (&[("/foo", Prefix)], "/foo/", true),
            (&[("/foo/", Prefix)], "/foo", true),
            (&[("/foo/", Prefix)], "/foo/", true),
            (&[("/aaa/bb", Prefix)], "/aaa/bbb", false),
            (&[("/aaa/bbb", Prefix)], "/aaa/bbb", true),
            (&[("/aaa/bbb/", Prefix)], "/aaa/bbb", true),
            (&[("/aaa/bbb", Prefix)], "/aaa/bbb/", true),
            (&[("/aaa/bbb", Prefix)], "/aaa/bbb/ccc", true),
            (&[("/aaa/bbb", Prefix)], "/aaa/bbbxyz", false),
            (&[("/", Prefix), ("/aaa", Prefix)], "/aaa/ccc", true),
            (&[("/", Prefix), ("/aaa", Prefix), ("/aaa/bbb", Prefix)], "/aaa/bbb", true),
            (&[("/", Prefix), ("/aaa", Prefix), ("/aaa/bbb", Prefix)], "/ccc", true),
            (&[("/aaa", Prefix)], "/ccc", false),
        ];
        for &(rules, request, matches) in rows {
            let named: Vec<_> = rules.iter().map(|&(p, t)| (p, t, p)).collect();
            let r = router(HostMatch::Any, &named);
            let got = routed(&r, "example.com", request);
            assert_eq!(got.is_some(), matches, "rules {rules:?}, request {request}: {got:?}");
        }
        // Which rule wins, where several match: the longest.
        let r = router(HostMatch::Any, &[("/", Prefix, "root"), ("/aaa", Prefix, "aaa"), ("/aaa/bbb", Prefix, "bbb")]);
        assert_eq!(routed(&r, "h", "/aaa/ccc"), Some("ns/aaa"));
        assert_eq!(routed(&r, "h", "/aaa/bbb"), Some("ns/bbb"));
        assert_eq!(routed(&r, "h", "/ccc"), Some("ns/root"));
        // Mixed: /foo Prefix and /foo Exact, request /foo: Exact is preferred.
        let r = router(HostMatch::Any, &[("/foo", Prefix, "prefix"), ("/foo", Exact, "exact")]);
        assert_eq!(routed(&r, "h", "/foo"), Some("ns/exact"));
        assert_eq!(routed(&r, "h", "/foo/x"), Some("ns/prefix"));
    }

    /// The documentation's hostname wildcard table.
    #[test]
    fn kubernetes_hostname_wildcard_examples() {
        let r = router(HostMatch::Wildcard("foo.com".into()), &[("/", Prefix, "w")]);
        assert_eq!(routed(&r, "bar.foo.com", "/"), Some("ns/w"), "shared suffix");
        assert_eq!(routed(&r, "baz.bar.foo.com", "/"), None, "a wildcard covers one label");
        assert_eq!(routed(&r, "foo.com", "/"), None, "a wildcard covers one label");
        assert_eq!(routed(&r, ".foo.com", "/"), None, "the label is not empty");
    }

    #[test]
    fn host_header_port_case_and_precedence() {
        let mut state = L7State::default();
        let path = |b: &str| L7Path {
            path: "/".into(),
            path_type: Prefix,
            backend: backend(b),
            ingress: ObjectRef { namespace: "ns".into(), name: "i".into() },
        };
        state.hosts = vec![
            L7Host { host: HostMatch::Exact("a.example.com".into()), paths: vec![path("exact")], ..Default::default() },
            L7Host { host: HostMatch::Wildcard("example.com".into()), paths: vec![path("wild")], ..Default::default() },
            L7Host { host: HostMatch::Any, paths: vec![path("any")], ..Default::default() },
        ];
        let r = Router::compile(&state);
        assert_eq!(routed(&r, "A.Example.COM:8443", "/x?q=1"), Some("ns/exact"), "port and case ignored");
        assert_eq!(routed(&r, "a.example.com.", "/"), Some("ns/exact"), "trailing dot");
        assert_eq!(routed(&r, "b.example.com", "/"), Some("ns/wild"));
        assert_eq!(routed(&r, "other.org", "/"), Some("ns/any"));
        assert_eq!(routed(&r, "[::1]:80", "/"), Some("ns/any"));
        assert_eq!(r.route("a.example.com", "*"), Route::BadRequest("the request target is not an absolute path"));
        assert_eq!(r.route("a b", "/"), Route::BadRequest("invalid Host header"));
        assert_eq!(r.route("a.example.com:http", "/"), Route::BadRequest("invalid Host header"));
        assert_eq!(r.route(&"a".repeat(300), "/"), Route::BadRequest("invalid Host header"));
    }

    #[test]
    fn most_specific_host_decides_then_default_backend() {
        let hosts = vec![
            L7Host {
                host: HostMatch::Exact("a.example".into()),
                paths: vec![L7Path {
                    path: "/api".into(),
                    path_type: Prefix,
                    backend: backend("api"),
                    ingress: ObjectRef { namespace: "ns".into(), name: "i".into() },
                }],
                ..Default::default()
            },
            L7Host {
                host: HostMatch::Any,
                paths: vec![L7Path {
                    path: "/".into(),
                    path_type: Prefix,
                    backend: backend("any"),
                    ingress: ObjectRef { namespace: "ns".into(), name: "i".into() },
                }],
                ..Default::default()
            },
        ];
        let mut state = L7State { hosts, ..Default::default() };
        let r = Router::compile(&state);
        assert_eq!(r.route("a.example", "/other"), Route::NotFound, "no fall-through to less specific hosts");
        state.default_backend = Some(backend("fallback"));
        let r = Router::compile(&state);
        assert_eq!(routed(&r, "a.example", "/other"), Some("ns/fallback"));
        assert_eq!(routed(&r, "a.example", "/api/v1"), Some("ns/api"));
    }
}
