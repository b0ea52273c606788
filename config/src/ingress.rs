//! Ingresses (and IngressClasses, and the Services their backends name) -> the L7 routing model.
//!
//! Which Ingresses are Fulcrum's (Kubernetes' rules, in order):
//! 1. `spec.ingressClassName` names one of our classes;
//! 2. else the legacy annotation `kubernetes.io/ingress.class` does;
//! 3. else, with no class at all, one of our IngressClasses is annotated
//!    `ingressclass.kubernetes.io/is-default-class: "true"`.
//!
//! Our classes are the IngressClasses whose `spec.controller` is [`INGRESS_CONTROLLER`], and the
//! configured class name (default `fulcrum`) when no IngressClass of that name exists (manifest
//! files often leave the IngressClass out).
//!
//! Rules of every Ingress of ours are merged per host. Where two Ingresses claim the same host,
//! path and path type, the first in (creation time, namespace, name) order keeps it and the
//! other is reported; so is a backend whose Service or port does not exist (it answers 503).
//! Malformed input (a path that is not absolute, an unknown pathType, an invalid host, a backend
//! with neither service nor resource) is an error naming the file, document, object and field.

use crate::error::ConfigError;
use crate::manifests::{Objects, Source, Sourced};
use crate::model::ObjectRef;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressBackend};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
// Lookups by object name over every Service and EndpointSlice: a hash map, not a B-tree of
// string comparisons (those were a third of translating 10,000 Ingress rules).
use ahash::AHashMap as HashMap;

/// The controller name our IngressClasses carry in `spec.controller`.
pub const INGRESS_CONTROLLER: &str = "fulcrum.io/ingress-controller";
/// The class name served by default.
pub const DEFAULT_CLASS: &str = "fulcrum";
pub const ANNOTATION_LEGACY_CLASS: &str = "kubernetes.io/ingress.class";
pub const ANNOTATION_DEFAULT_CLASS: &str = "ingressclass.kubernetes.io/is-default-class";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum PathType {
    /// The whole path, case-sensitive.
    Exact,
    /// Element by element on `/` (also ImplementationSpecific here).
    Prefix,
}

/// Where a matched request goes: a Service port, by number (a port given by name in the
/// Ingress is resolved through the Service).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct L7Backend {
    pub service: ObjectRef,
    /// The Service's port number; None when it could not be resolved (the route answers 503).
    pub port: Option<u16>,
    /// Why the backend cannot be used, if it cannot (no such Service, no such port).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unresolved: Option<String>,
    /// The Service port's endpoints from its EndpointSlices: the ready ones, or the serving
    /// and terminating ones when none is ready (kube-proxy's fallback). Sorted.
    #[serde(default)]
    pub endpoints: Vec<std::net::SocketAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct L7Path {
    pub path: String,
    pub path_type: PathType,
    pub backend: L7Backend,
    /// The Ingress the path came from.
    pub ingress: ObjectRef,
}

/// A rule's host: exact (lower case), a wildcard covering exactly one label, or any host.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HostMatch {
    Exact(String),
    /// `*.example.com`, stored as the suffix `example.com`.
    Wildcard(String),
    #[default]
    Any,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct L7Host {
    pub host: HostMatch,
    pub paths: Vec<L7Path>,
    /// The TLS Secret whose certificate this host is served with (from an Ingress's `tls`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_secret: Option<ObjectRef>,
    /// Plain HTTP requests to this host are redirected to HTTPS (hosts with TLS, unless
    /// annotated `fulcrum.io/ssl-redirect: "false"`).
    pub ssl_redirect: bool,
}

/// A `kubernetes.io/tls` Secret's certificate chain and key (PEM). The key is never printed.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct L7Certificate {
    pub secret: ObjectRef,
    /// The hosts it is for (from the Ingresses' `tls[].hosts`).
    pub hosts: Vec<HostMatch>,
    #[serde(skip)]
    pub cert_pem: Vec<u8>,
    #[serde(skip)]
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for L7Certificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "L7Certificate({} for {:?}, {} bytes of chain)", self.secret, self.hosts, self.cert_pem.len())
    }
}

/// Disables the HTTP-to-HTTPS redirect of an Ingress's TLS hosts.
pub const ANNOTATION_SSL_REDIRECT: &str = "fulcrum.io/ssl-redirect";

/// Everything the L7 router serves.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct L7State {
    /// Sorted by host; paths in rule order.
    pub hosts: Vec<L7Host>,
    /// The first `spec.defaultBackend` among our Ingresses.
    pub default_backend: Option<L7Backend>,
    /// Our Ingresses, in precedence order.
    pub ingresses: Vec<ObjectRef>,
    /// Certificates of the TLS Secrets our Ingresses name, in precedence order (the first is
    /// the default for a client without SNI or with an unknown name).
    pub certificates: Vec<L7Certificate>,
    /// What was ignored or could not be resolved, for humans (logs, `fulcrum check`).
    pub warnings: Vec<String>,
}

/// Which class this appliance serves.
#[derive(Clone, Debug)]
pub struct ClassSelection {
    pub class_name: String,
    pub controller: String,
}

impl Default for ClassSelection {
    fn default() -> Self {
        ClassSelection { class_name: DEFAULT_CLASS.into(), controller: INGRESS_CONTROLLER.into() }
    }
}

fn ns(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.namespace.clone().unwrap_or_else(|| "default".into())
}

/// The names of the classes we serve, and whether one of them is the cluster's default.
fn our_classes(objects: &Objects, sel: &ClassSelection) -> (BTreeSet<String>, bool) {
    let mut ours = BTreeSet::new();
    let mut default = false;
    let mut named_exists = false;
    for c in &objects.ingress_classes {
        let name = c.object.metadata.name.clone().unwrap_or_default();
        named_exists |= name == sel.class_name;
        let controller = c.object.spec.as_ref().and_then(|s| s.controller.as_deref());
        if controller == Some(sel.controller.as_str()) {
            let is_default = c
                .object
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_DEFAULT_CLASS))
                .is_some_and(|v| v.trim() == "true");
            default |= is_default;
            ours.insert(name);
        }
    }
    if !named_exists {
        ours.insert(sel.class_name.clone());
    }
    (ours, default)
}

/// Whether `ing` is ours, and if not, why (for the warnings).
fn is_ours(ing: &Ingress, ours: &BTreeSet<String>, default: bool) -> Result<(), String> {
    if let Some(c) = ing.spec.as_ref().and_then(|s| s.ingress_class_name.as_deref()) {
        return if ours.contains(c) { Ok(()) } else { Err(format!("class {c:?} (spec.ingressClassName)")) };
    }
    if let Some(c) = ing.metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION_LEGACY_CLASS)) {
        return if ours.contains(c.trim()) { Ok(()) } else { Err(format!("class {c:?} ({ANNOTATION_LEGACY_CLASS})")) };
    }
    if default {
        Ok(())
    } else {
        Err("no class, and no IngressClass of ours is the default".into())
    }
}

/// Validates and normalises a rule's host (RFC 1123 labels, lower case; `*.` only in front).
pub fn parse_host(host: &str) -> Result<HostMatch, String> {
    let h = host.trim().to_ascii_lowercase();
    if h.is_empty() {
        return Ok(HostMatch::Any);
    }
    let (wild, name) = match h.strip_prefix("*.") {
        Some(rest) => (true, rest.to_string()),
        None => (false, h.clone()),
    };
    if name.len() > 253 {
        return Err(format!("host {host:?} is longer than 253 characters"));
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "host {host:?} is not a DNS name (lower-case letters, digits and '-' in dot-separated labels; a wildcard only as a leading \"*.\")"
            ));
        }
    }
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err(format!("host {host:?}: an IP address is not allowed as an Ingress host"));
    }
    Ok(if wild { HostMatch::Wildcard(name) } else { HostMatch::Exact(name) })
}

struct Ctx<'a> {
    source: &'a Source,
    id: ObjectRef,
}

impl Ctx<'_> {
    fn err(&self, field: impl Into<String>, message: impl Into<String>) -> ConfigError {
        self.source.error(message).object(format!("Ingress {}", self.id)).field(field)
    }
}

/// Resolves an Ingress backend through its Service (same namespace).
fn backend(
    ctx: &Ctx,
    // Built only for a message: formatting it for every route was a tenth of translating them.
    field: &dyn Fn() -> String,
    b: &IngressBackend,
    services: &HashMap<ObjectRef, &Service>,
    warnings: &mut Vec<String>,
) -> Result<Option<L7Backend>, ConfigError> {
    let at = |suffix: &str| format!("{}{suffix}", field());
    let Some(s) = &b.service else {
        if b.resource.is_some() {
            warnings.push(format!(
                "Ingress {}: {}: resource backends are not supported; ignored",
                ctx.id,
                at(".resource")
            ));
            return Ok(None);
        }
        return Err(ctx.err(field(), "a backend needs a service (or a resource)"));
    };
    if s.name.is_empty() {
        return Err(ctx.err(at(".service.name"), "a backend service needs a name"));
    }
    let service = ObjectRef { namespace: ctx.id.namespace.clone(), name: s.name.clone() };
    let port = s.port.as_ref().ok_or_else(|| ctx.err(at(".service.port"), "a backend service needs a port"))?;
    let ports = services.get(&service).and_then(|svc| svc.spec.as_ref()).and_then(|sp| sp.ports.as_ref());
    let (resolved, why) = match (port.number, port.name.as_deref()) {
        (Some(_), Some(_)) => return Err(ctx.err(at(".service.port"), "give the port by number or by name, not both")),
        (None, None) => return Err(ctx.err(at(".service.port"), "needs a number or a name")),
        (Some(n), None) if !(1..=65535).contains(&n) => {
            return Err(ctx.err(at(".service.port.number"), format!("{n} is not a port (1-65535)")))
        }
        (Some(n), None) => match ports {
            None => (Some(n as u16), Some(format!("Service {service} not found"))),
            Some(ps) if ps.iter().any(|p| p.port == n) => (Some(n as u16), None),
            Some(_) => (Some(n as u16), Some(format!("Service {service} has no port {n}"))),
        },
        (None, Some(name)) => match ports {
            None => (None, Some(format!("Service {service} not found (port {name:?} unresolved)"))),
            Some(ps) => match ps.iter().find(|p| p.name.as_deref() == Some(name)) {
                Some(p) => (Some(p.port as u16), None),
                None => (None, Some(format!("Service {service} has no port named {name:?}"))),
            },
        },
    };
    if let Some(w) = &why {
        warnings.push(format!("Ingress {}: {}: {w}; requests routed there get 503", ctx.id, field()));
    }
    // A port that cannot be used is no port at all: the route answers 503 either way.
    let port = if why.is_some() { None } else { resolved };
    Ok(Some(L7Backend { service, port, unresolved: why, endpoints: Vec::new() }))
}

/// Translates the Ingresses of our class into one routing state.
pub fn translate_ingresses(objects: &Objects, sel: &ClassSelection) -> Result<L7State, ConfigError> {
    let (ours, default_class) = our_classes(objects, sel);
    let mut services = HashMap::with_capacity(objects.services.len());
    for s in &objects.services {
        let m = &s.object.metadata;
        services.insert(ObjectRef::of(m), &s.object);
    }
    let mut state = L7State::default();
    // Precedence: oldest first, then namespace/name (manifests rarely carry creation times).
    let mut ings: Vec<_> = objects.ingresses.iter().collect();
    ings.sort_by_key(|i| {
        let m = &i.object.metadata;
        (m.creation_timestamp.as_ref().map(|t| t.0), ns(m), m.name.clone().unwrap_or_default())
    });
    let mut hosts: BTreeMap<HostMatch, Vec<L7Path>> = BTreeMap::new();
    let mut seen: HashMap<(HostMatch, String, PathType), ObjectRef> = HashMap::new();
    // Host -> (its TLS Secret, whether to redirect HTTP to HTTPS), the first Ingress naming it.
    let mut tls_hosts: HashMap<HostMatch, (ObjectRef, bool)> = HashMap::new();
    for s in ings {
        let ing = &s.object;
        let id = ObjectRef::of(&ing.metadata);
        let ctx = Ctx { source: &s.source, id: id.clone() };
        if id.name.is_empty() {
            return Err(ctx.err("metadata.name", "an Ingress needs a name"));
        }
        if let Err(why) = is_ours(ing, &ours, default_class) {
            state.warnings.push(format!("Ingress {id}: not ours: {why}"));
            continue;
        }
        state.ingresses.push(id.clone());
        let Some(spec) = &ing.spec else { continue };
        if let Some(b) = &spec.default_backend {
            let b = backend(&ctx, &|| "spec.defaultBackend".to_string(), b, &services, &mut state.warnings)?;
            match (&state.default_backend, b) {
                (None, Some(b)) => state.default_backend = Some(b),
                (Some(_), Some(_)) => state
                    .warnings
                    .push(format!("Ingress {id}: spec.defaultBackend: an older Ingress's default backend is used")),
                _ => {}
            }
        }
        let redirect = ing
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_SSL_REDIRECT))
            .is_none_or(|v| v.trim() != "false");
        for (ti, t) in spec.tls.iter().flatten().enumerate() {
            let Some(name) = t.secret_name.as_deref().filter(|n| !n.is_empty()) else {
                state.warnings.push(format!(
                    "Ingress {id}: spec.tls[{ti}]: no secretName; its hosts get the default certificate"
                ));
                continue;
            };
            let mut hosts = Vec::new();
            for (hi, h) in t.hosts.iter().flatten().enumerate() {
                hosts.push(parse_host(h).map_err(|m| ctx.err(format!("spec.tls[{ti}].hosts[{hi}]"), m))?);
            }
            if hosts.is_empty() {
                // Unspecified: the Ingress's own rule hosts.
                for r in spec.rules.iter().flatten() {
                    if let Ok(h) = parse_host(r.host.as_deref().unwrap_or("")) {
                        hosts.push(h);
                    }
                }
            }
            let secret = ObjectRef { namespace: id.namespace.clone(), name: name.to_string() };
            match tls_secret(objects, &secret) {
                Ok((cert_pem, key_pem)) => {
                    for h in &hosts {
                        tls_hosts.entry(h.clone()).or_insert((secret.clone(), redirect));
                    }
                    match state.certificates.iter_mut().find(|c| c.secret == secret) {
                        Some(c) => c.hosts.extend(hosts),
                        None => state.certificates.push(L7Certificate { secret, hosts, cert_pem, key_pem }),
                    }
                }
                Err(why) => state.warnings.push(format!("Ingress {id}: spec.tls[{ti}]: Secret {secret}: {why}")),
            }
        }
        for (ri, rule) in spec.rules.iter().flatten().enumerate() {
            let host = parse_host(rule.host.as_deref().unwrap_or(""))
                .map_err(|m| ctx.err(format!("spec.rules[{ri}].host"), m))?;
            let Some(http) = &rule.http else { continue };
            for (pi, p) in http.paths.iter().enumerate() {
                let field = || format!("spec.rules[{ri}].http.paths[{pi}]");
                let path_type = match p.path_type.as_str() {
                    "Exact" => PathType::Exact,
                    "Prefix" | "ImplementationSpecific" => PathType::Prefix,
                    other => {
                        return Err(ctx.err(
                            format!("{}.pathType", field()),
                            format!("{other:?} is not a path type (Exact, Prefix or ImplementationSpecific)"),
                        ))
                    }
                };
                let path = match p.path.as_deref() {
                    Some(x) if x.starts_with('/') => x.to_string(),
                    None | Some("") if p.path_type == "ImplementationSpecific" => "/".to_string(),
                    Some(x) => {
                        return Err(ctx.err(
                            format!("{}.path", field()),
                            format!("{x:?} must be an absolute path (start with '/')"),
                        ))
                    }
                    None => return Err(ctx.err(format!("{}.path", field()), "required for Exact and Prefix paths")),
                };
                if path.bytes().any(|b| b.is_ascii_control() || b == b' ' || b == b'?' || b == b'#') {
                    return Err(ctx.err(
                        format!("{}.path", field()),
                        format!("{path:?}: no spaces, '?', '#' or control characters"),
                    ));
                }
                let Some(b) =
                    backend(&ctx, &|| format!("{}.backend", field()), &p.backend, &services, &mut state.warnings)?
                else {
                    continue;
                };
                let key = (host.clone(), path.clone(), path_type);
                if let Some(first) = seen.get(&key) {
                    state.warnings.push(format!(
                        "Ingress {id}: {}: {path_type:?} {path} for {} is already routed by Ingress {first}, which takes precedence",
                        field(),
                        host_name(&host)
                    ));
                    continue;
                }
                seen.insert(key, id.clone());
                hosts.entry(host.clone()).or_default().push(L7Path {
                    path,
                    path_type,
                    backend: b,
                    ingress: id.clone(),
                });
            }
        }
    }
    state.hosts = hosts
        .into_iter()
        .map(|(host, paths)| {
            let tls = tls_hosts.get(&host).cloned();
            L7Host { ssl_redirect: tls.as_ref().is_some_and(|t| t.1), tls_secret: tls.map(|t| t.0), host, paths }
        })
        .collect();
    // Slices by Service, once: looking them up per backend keeps this linear in objects.
    let slices = crate::translate::slices_by_service(objects);
    for h in &mut state.hosts {
        for p in &mut h.paths {
            resolve_endpoints(&slices, &services, &mut p.backend);
        }
    }
    if let Some(b) = &mut state.default_backend {
        resolve_endpoints(&slices, &services, b);
    }
    Ok(state)
}

/// A `kubernetes.io/tls` Secret's `tls.crt` and `tls.key`.
fn tls_secret(objects: &Objects, id: &ObjectRef) -> Result<(Vec<u8>, Vec<u8>), String> {
    let s = objects
        .secrets
        .iter()
        .map(|s| &s.object)
        .find(|s| ns(&s.metadata) == id.namespace && s.metadata.name.as_deref() == Some(id.name.as_str()))
        .ok_or("not found")?;
    if s.type_.as_deref().is_some_and(|t| t != "kubernetes.io/tls") {
        return Err(format!("type {:?}, not kubernetes.io/tls", s.type_.as_deref().unwrap_or("")));
    }
    let get = |k: &str| -> Result<Vec<u8>, String> {
        if let Some(v) = s.data.as_ref().and_then(|d| d.get(k)) {
            return Ok(v.0.clone());
        }
        if let Some(v) = s.string_data.as_ref().and_then(|d| d.get(k)) {
            return Ok(v.clone().into_bytes());
        }
        Err(format!("no {k}"))
    };
    Ok((get("tls.crt")?, get("tls.key")?))
}

/// Fills a backend's endpoints: the Service port's name selects the EndpointSlice port (TCP).
fn resolve_endpoints(
    slices: &HashMap<ObjectRef, Vec<&Sourced<EndpointSlice>>>,
    services: &HashMap<ObjectRef, &Service>,
    b: &mut L7Backend,
) {
    let Some(port) = b.port else { return };
    let Some(sp) = services
        .get(&b.service)
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.ports.as_ref())
        .and_then(|ps| ps.iter().find(|p| p.port == port as i32))
    else {
        return;
    };
    let name = sp.name.as_deref().unwrap_or("");
    let mut ready = Vec::new();
    let mut serving = Vec::new();
    for s in slices.get(&b.service).into_iter().flatten().map(|s| &s.object) {
        if !matches!(s.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        for p in s.ports.iter().flatten() {
            let tcp = p.protocol.as_deref().unwrap_or("TCP") == "TCP";
            let Some(n) = p.port.and_then(|n| u16::try_from(n).ok()).filter(|&n| n != 0) else { continue };
            if !tcp || p.name.as_deref().unwrap_or("") != name {
                continue;
            }
            for ep in &s.endpoints {
                let Some(addr) = ep.addresses.first().and_then(|a| a.trim().parse::<std::net::IpAddr>().ok()) else {
                    continue;
                };
                let c = ep.conditions.as_ref();
                if c.and_then(|c| c.ready).unwrap_or(true) {
                    ready.push(std::net::SocketAddr::new(addr, n));
                } else if c.and_then(|c| c.serving).unwrap_or(false) {
                    serving.push(std::net::SocketAddr::new(addr, n));
                }
            }
        }
    }
    let mut eps = if ready.is_empty() { serving } else { ready };
    eps.sort();
    eps.dedup();
    b.endpoints = eps;
}

/// A host as people write it: `a.example`, `*.example`, or `*` for any.
pub fn host_name(h: &HostMatch) -> String {
    match h {
        HostMatch::Exact(x) => x.clone(),
        HostMatch::Wildcard(x) => format!("*.{x}"),
        HostMatch::Any => "*".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests;

    fn parse(yaml: &str) -> Result<L7State, ConfigError> {
        let dir = std::env::temp_dir().join(format!(
            "fulcrum-ingress-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("m.yaml");
        std::fs::write(&f, yaml).unwrap();
        let o = manifests::load(&f).unwrap();
        translate_ingresses(&o, &ClassSelection::default())
    }

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  ports: [{name: http, port: 80, targetPort: 8080}]\n";

    fn ingress(class: &str, body: &str) -> String {
        format!("---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: i, namespace: shop{class}}}\nspec:\n{body}")
    }

    #[test]
    fn ports_by_name_resolve_through_the_service() {
        let y = format!(
            "{SVC}{}",
            ingress(
                "",
                "  ingressClassName: fulcrum\n  rules:\n  - host: Shop.Example\n    http:\n      paths:\n      - {path: /, pathType: Prefix, backend: {service: {name: web, port: {name: http}}}}\n      - {path: /x, pathType: Exact, backend: {service: {name: gone, port: {number: 80}}}}\n"
            )
        );
        let s = parse(&y).unwrap();
        assert_eq!(s.hosts.len(), 1);
        assert_eq!(s.hosts[0].host, HostMatch::Exact("shop.example".into()), "hosts are case-insensitive");
        let p = &s.hosts[0].paths;
        assert_eq!(p[0].backend.port, Some(80));
        assert_eq!(p[0].backend.service.to_string(), "shop/web");
        assert_eq!(p[1].backend.port, None);
        assert!(s.warnings.iter().any(|w| w.contains("Service shop/gone not found")), "{:?}", s.warnings);
    }

    #[test]
    fn classes_by_name_annotation_and_default() {
        let rule = "  rules:\n  - http:\n      paths:\n      - {path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}\n";
        // Named, legacy annotation, other class, no class.
        let y = format!(
            "{SVC}{}{}{}{}",
            ingress("", &format!("  ingressClassName: fulcrum\n{rule}")).replace("name: i,", "name: a,"),
            ingress(", annotations: {kubernetes.io/ingress.class: fulcrum}", rule).replace("name: i,", "name: b,"),
            ingress("", &format!("  ingressClassName: nginx\n{rule}")).replace("name: i,", "name: c,"),
            ingress("", rule).replace("name: i,", "name: d,"),
        );
        let s = parse(&y).unwrap();
        let names: Vec<_> = s.ingresses.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(s.warnings.iter().any(|w| w.contains("shop/c: not ours: class \"nginx\"")), "{:?}", s.warnings);
        // b's identical rule loses to a's.
        assert!(s.warnings.iter().any(|w| w.contains("shop/b") && w.contains("already routed by Ingress shop/a")));
        // With an IngressClass of ours marked default, the class-less one is ours too; a class
        // object named fulcrum with another controller makes "fulcrum" not ours.
        let classes = "---\napiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: lb, annotations: {ingressclass.kubernetes.io/is-default-class: \"true\"}}\nspec: {controller: fulcrum.io/ingress-controller}\n---\napiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: fulcrum}\nspec: {controller: example.com/other}\n";
        let s = parse(&format!("{y}{classes}")).unwrap();
        let names: Vec<_> = s.ingresses.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["d"], "{:?}", s.warnings);
    }

    #[test]
    fn malformed_ingresses_name_the_field() {
        let cases = [
            ("  rules:\n  - http:\n      paths:\n      - {path: foo, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}\n", "spec.rules[0].http.paths[0].path", "absolute"),
            ("  rules:\n  - http:\n      paths:\n      - {path: /, pathType: Regex, backend: {service: {name: web, port: {number: 80}}}}\n", "spec.rules[0].http.paths[0].pathType", "not a path type"),
            ("  rules:\n  - host: a..b\n    http:\n      paths:\n      - {path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}\n", "spec.rules[0].host", "not a DNS name"),
            ("  rules:\n  - host: a.*.b\n    http:\n      paths:\n      - {path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}\n", "spec.rules[0].host", "not a DNS name"),
            ("  rules:\n  - http:\n      paths:\n      - {path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 70000}}}}\n", "spec.rules[0].http.paths[0].backend.service.port.number", "not a port"),
            ("  defaultBackend: {service: {name: web}}\n", "spec.defaultBackend.service.port", "needs a port"),
        ];
        for (body, field, msg) in cases {
            let e = parse(&format!("{SVC}{}", ingress("", &format!("  ingressClassName: fulcrum\n{body}"))))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("field {field}"))
                    && e.contains(msg)
                    && e.contains("Ingress shop/i")
                    && e.contains("document 2"),
                "{e}"
            );
        }
    }

    #[test]
    fn tls_secrets_hosts_and_redirects() {
        let secret = "---\napiVersion: v1\nkind: Secret\nmetadata: {name: shop-tls, namespace: shop}\ntype: kubernetes.io/tls\nstringData: {tls.crt: CERT, tls.key: KEY}\n";
        let opaque = "---\napiVersion: v1\nkind: Secret\nmetadata: {name: opaque, namespace: shop}\ntype: Opaque\nstringData: {tls.crt: C, tls.key: K}\n";
        let rules = "  rules:\n  - host: shop.example\n    http:\n      paths:\n      - {path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}\n  - host: plain.example\n    http:\n      paths:\n      - {path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}\n";
        let body = format!("  ingressClassName: fulcrum\n  tls:\n  - {{hosts: [shop.example], secretName: shop-tls}}\n  - {{hosts: [plain.example], secretName: opaque}}\n  - {{secretName: missing}}\n{rules}");
        let s = parse(&format!("{SVC}{secret}{opaque}{}", ingress("", &body))).unwrap();
        assert_eq!(s.certificates.len(), 1);
        assert_eq!(s.certificates[0].secret.to_string(), "shop/shop-tls");
        assert_eq!(s.certificates[0].cert_pem, b"CERT");
        assert!(!format!("{:?}", s.certificates[0]).contains("KEY"), "keys are never printed");
        assert!(!serde_json::to_string(&s).unwrap().contains("KEY"), "nor serialised");
        let shop = s.hosts.iter().find(|h| h.host == HostMatch::Exact("shop.example".into())).unwrap();
        assert!(shop.ssl_redirect && shop.tls_secret.as_ref().unwrap().name == "shop-tls");
        let plain = s.hosts.iter().find(|h| h.host == HostMatch::Exact("plain.example".into())).unwrap();
        assert!(!plain.ssl_redirect && plain.tls_secret.is_none());
        assert!(s.warnings.iter().any(|w| w.contains("Secret shop/opaque: type \"Opaque\"")), "{:?}", s.warnings);
        assert!(s.warnings.iter().any(|w| w.contains("Secret shop/missing: not found")), "{:?}", s.warnings);
        // Annotated off: TLS still served, no redirect.
        let off = ingress(", annotations: {fulcrum.io/ssl-redirect: \"false\"}", &body);
        let s = parse(&format!("{SVC}{secret}{off}")).unwrap();
        assert!(!s.hosts.iter().find(|h| h.host == HostMatch::Exact("shop.example".into())).unwrap().ssl_redirect);
    }

    #[test]
    fn hosts() {
        assert_eq!(parse_host("*.Foo.com"), Ok(HostMatch::Wildcard("foo.com".into())));
        assert_eq!(parse_host(""), Ok(HostMatch::Any));
        assert!(parse_host("*").is_err());
        assert!(parse_host("10.0.0.1").is_err());
        assert!(parse_host("-a.com").is_err());
    }
}
