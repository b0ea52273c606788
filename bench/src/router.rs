//! `fulcrum-bench router`: the L7 router's cost per request against the number of hosts, to
//! show it does not grow with them. For each host count, N exact hosts (and N/10 wildcards)
//! with 8 paths each (Prefix and Exact, two levels deep); requests pick a random known host
//! and one of a few paths, including misses that fall back to `/`. One JSON line.

use crate::report;
use fulcrum_config::ingress::{HostMatch, L7Backend, L7Host, L7Path, L7State, PathType};
use fulcrum_config::model::ObjectRef;
use fulcrum_dataplane::l7::router::{Route, Router};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct RouterArgs {
    /// Host counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "10,1000,100000")]
    pub hosts: Vec<usize>,
    /// Requests routed per host count.
    #[arg(long, default_value_t = 2_000_000)]
    pub requests: usize,
    #[arg(long)]
    pub core: Option<usize>,
}

fn state(hosts: usize) -> L7State {
    let backend = |i: usize| L7Backend {
        service: ObjectRef { namespace: "bench".into(), name: format!("svc-{i}") },
        port: Some(80),
        unresolved: None,
        endpoints: vec![],
    };
    let ingress = ObjectRef { namespace: "bench".into(), name: "bench".into() };
    let paths = |i: usize| {
        [
            ("/", PathType::Prefix),
            ("/api", PathType::Prefix),
            ("/api/v1", PathType::Prefix),
            ("/api/v2", PathType::Prefix),
            ("/static/", PathType::Prefix),
            ("/healthz", PathType::Exact),
            ("/login", PathType::Exact),
            ("/api/v1/cart", PathType::Exact),
        ]
        .iter()
        .enumerate()
        .map(|(k, &(p, t))| L7Path {
            path: p.into(),
            path_type: t,
            backend: backend(i * 8 + k),
            ingress: ingress.clone(),
        })
        .collect::<Vec<_>>()
    };
    let mut hs: Vec<L7Host> = (0..hosts)
        .map(|i| L7Host {
            host: HostMatch::Exact(format!("host-{i}.example.com")),
            paths: paths(i),
            ..Default::default()
        })
        .collect();
    hs.extend((0..hosts / 10).map(|i| L7Host {
        host: HostMatch::Wildcard(format!("w{i}.example.net")),
        paths: paths(i),
        ..Default::default()
    }));
    L7State { hosts: hs, ..Default::default() }
}

pub fn run(a: &RouterArgs) -> anyhow::Result<()> {
    let core = crate::pin(a.core);
    let requests =
        ["/", "/api/v1/cart", "/api/v1/cart/items/42", "/static/css/site.css", "/healthz", "/nothing/here?q=1"];
    let mut results = Vec::new();
    for &n in &a.hosts {
        let r = Router::compile(&state(n));
        // Requests built up front so that only routing is timed.
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let reqs: Vec<(String, &str)> = (0..4096)
            .map(|k| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let i = (rng >> 11) as usize % n.max(1);
                let host = if k % 10 == 0 && n >= 10 {
                    format!("x{k}.w{}.example.net:443", i / 10)
                } else {
                    format!("Host-{i}.example.com")
                };
                (host, requests[k % requests.len()])
            })
            .collect();
        let mut found = 0usize;
        let t = Instant::now();
        for k in 0..a.requests {
            let (h, p) = &reqs[k & 4095];
            if let Route::Backend(t) = r.route(h, p) {
                found += t.port.is_some() as usize;
            }
        }
        let ns = t.elapsed().as_nanos() as f64 / a.requests as f64;
        anyhow::ensure!(found == a.requests, "{} of {} requests unrouted", a.requests - found, a.requests);
        results.push(serde_json::json!({"hosts": n, "ns_per_request": ns}));
    }
    report::print(serde_json::json!({
        "bench": "router",
        "paths_per_host": 8,
        "results": results,
        "core": core,
        "loadavg": report::loadavg(),
    }));
    Ok(())
}
