//! `fulcrum route`: where one request would go, by the Ingress rules of our class in the
//! manifests. One JSON line: `{"status":200,"service":"NAMESPACE/NAME","port":PORT}`, 404 when
//! nothing matches, 503 when the rule's Service or port does not exist, 400 for a request that
//! cannot be routed at all (the same router the data plane uses).

use fulcrum_config::ingress::{translate_ingresses, ClassSelection, DEFAULT_CLASS};
use fulcrum_dataplane::l7::router::{Route, Router};
use serde_json::Value;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Kubernetes manifests: a YAML file or a directory of them.
    #[arg(long, value_name = "PATH")]
    pub manifests: PathBuf,
    /// The request's Host header (a port is ignored).
    #[arg(long)]
    pub host: String,
    /// The request target (a query string is ignored).
    #[arg(long)]
    pub path: String,
    /// The request method (Ingress rules do not depend on it; it must be an HTTP token).
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// The Ingress class served.
    #[arg(long, default_value = DEFAULT_CLASS)]
    pub class: String,
    /// Also print the warnings (ignored Ingresses, unresolved backends) to stderr.
    #[arg(long)]
    pub verbose: bool,
}

/// RFC 9110 token characters.
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

pub fn run(a: &Args) -> anyhow::Result<()> {
    let objects = fulcrum_config::manifests::load(&a.manifests)?;
    let sel = ClassSelection { class_name: a.class.clone(), ..ClassSelection::default() };
    let state = translate_ingresses(&objects, &sel)?;
    if a.verbose {
        for w in &state.warnings {
            eprintln!("fulcrum: {w}");
        }
    }
    let router = Router::compile(&state);
    let out = if !is_token(&a.method) {
        line(400, &[("reason", "the method is not an HTTP token".into())])
    } else {
        match router.route(&a.host, &a.path) {
            Route::Backend(t) => match (t.port, &t.why_unresolved) {
                (Some(port), None) => line(200, &[("service", t.service.as_str().into()), ("port", port.into())]),
                (_, why) => line(503, &[("service", t.service.as_str().into()), ("reason", why.as_deref().into())]),
            },
            Route::NotFound => line(404, &[]),
            Route::BadRequest(why) => line(400, &[("reason", why.into())]),
        }
    };
    println!("{out}");
    Ok(())
}

/// `{"status":S,...}` with the fields in the order given (the status first, as documented).
fn line(status: u16, fields: &[(&str, Value)]) -> String {
    let mut s = format!("{{\"status\":{status}");
    for (k, v) in fields {
        s.push_str(&format!(",{}:{v}", Value::from(*k)));
    }
    s.push('}');
    s
}
