//! Services + EndpointSlices + bootstrap -> DesiredState, with validation.
//!
//! Pure and deterministic: the same objects give the same state, whatever order they came in.
//! Every error names the file, the document, the object and the field.

use crate::bootstrap::{Bootstrap, VipPool};
use crate::error::ConfigError;
use crate::manifests::{self, object_name, Objects, Source, Sourced};
use crate::model::{
    ClientIpAffinity, DesiredState, Endpoint, EndpointState, ForwardingMode, HealthCheck, ObjectRef, Protocol,
    VipService,
};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

/// Requested VIPs, comma-separated, at most one per address family.
pub const ANNOTATION_LB_IPS: &str = "fulcrum.io/load-balancer-ips";
/// `fullnat` or `dsr-ipip`.
pub const ANNOTATION_FORWARDING: &str = "fulcrum.io/forwarding";
/// Active health checks: `tcp` or `http`; with `-path`, `-interval` (seconds), `-timeout`
/// (seconds), `-fall`, `-rise`.
pub const ANNOTATION_HEALTH: &str = "fulcrum.io/health-check";
/// Services with the same value may share a VIP (on different ports).
pub const ANNOTATION_SHARED_IP: &str = "fulcrum.io/allow-shared-ip";
/// The legacy form of `spec.loadBalancerSourceRanges` (comma-separated CIDRs), read when the
/// field is empty, as Kubernetes' cloud providers do.
pub const ANNOTATION_SOURCE_RANGES: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";
/// The label tying an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;
/// Kubernetes' maximum for it (1 day).
pub const MAX_AFFINITY_TIMEOUT: u32 = 86400;

/// Reads manifests (a file or a directory) and translates them.
pub fn load_desired(boot: &Bootstrap, manifests: &Path) -> Result<DesiredState, ConfigError> {
    translate(boot, &manifests::load(manifests)?)
}

/// A `type: LoadBalancer` Service being translated.
struct Lb<'a> {
    source: &'a Source,
    id: ObjectRef,
    service: &'a Service,
    spec: &'a ServiceSpec,
    /// The VIPs and the field each came from.
    vips: Vec<(IpAddr, String)>,
    /// A problem was found: the Service is left out.
    failed: bool,
}

impl Lb<'_> {
    fn err(&self, field: impl Into<String>, message: impl Into<String>) -> ConfigError {
        self.source.error(message).object(format!("Service {}", self.id)).field(field)
    }
    fn annotation(&self, key: &str) -> Option<&str> {
        self.service.metadata.annotations.as_ref()?.get(key).map(|s| s.trim())
    }
    fn where_(&self) -> String {
        format!("Service {} ({})", self.id, self.source)
    }
}

fn annotation_field(key: &str) -> String {
    format!("metadata.annotations[{key:?}]")
}

fn namespace(ns: &Option<String>) -> String {
    ns.clone().unwrap_or_else(|| "default".to_string())
}

fn family(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

fn describe_pools(pools: &[VipPool]) -> String {
    let list: Vec<String> = pools
        .iter()
        .map(|p| format!("{}: {}", p.name, p.cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ")))
        .collect();
    format!("VIP pools: {}", list.join("; "))
}

/// Translates everything; the result is sorted by (vip, protocol, port). Strict: the first
/// problem with any object is the error (files are fixed and re-read as a whole).
pub fn translate(boot: &Bootstrap, objects: &Objects) -> Result<DesiredState, ConfigError> {
    let t = translate_each(boot, objects);
    match t.problems.into_iter().next() {
        Some(p) => Err(p.error),
        None => Ok(t.state),
    }
}

/// What an object is wrong about, for the user who must fix it (a Kubernetes Event).
#[derive(Debug)]
pub struct Problem {
    /// `Service` or `Ingress`.
    pub kind: &'static str,
    pub object: ObjectRef,
    /// A CamelCase reason as Events carry (`AllocationFailed`, `AddressTaken`, `InvalidSpec`).
    pub reason: &'static str,
    pub error: ConfigError,
}

/// The state of every object that translates, and a problem for each one that does not.
#[derive(Debug, Default)]
pub struct Translation {
    pub state: DesiredState,
    pub problems: Vec<Problem>,
    /// The addresses each LoadBalancer Service got (for its status), by Service.
    pub addresses: BTreeMap<ObjectRef, Vec<IpAddr>>,
    /// LoadBalancer Services left to another implementation by `spec.loadBalancerClass`.
    pub other_class: Vec<ObjectRef>,
}

/// Whether a LoadBalancer Service is ours by its class (see `LoadBalancerConfig`).
pub fn is_our_class(boot: &Bootstrap, spec: &ServiceSpec) -> bool {
    match spec.load_balancer_class.as_deref() {
        None => boot.load_balancer.unclassed,
        Some(c) => c == boot.load_balancer.class,
    }
}

/// Lenient translation, for a live source: an object with a problem is left out (and the
/// problem reported) while everything else is served. Problems come in the order strict
/// translation would meet them.
pub fn translate_each(boot: &Bootstrap, objects: &Objects) -> Translation {
    let Some(l7) = &boot.l7 else { return services_each(boot, objects) };
    let sel = crate::ingress::ClassSelection { class_name: l7.ingress_class.clone(), ..Default::default() };
    let ingresses = || {
        let mut problems = Vec::new();
        (ingresses_each(objects, &sel, &mut problems), problems)
    };
    // Services and Ingresses are translated independently of each other: with many objects, on
    // two threads (half the time of a 10,000-Service build; measured with `fulcrum-bench control`).
    let (mut t, (l7_state, l7_problems)) = if objects.services.len() + objects.ingresses.len() >= PARALLEL_FROM {
        std::thread::scope(|scope| {
            let l7 = scope.spawn(ingresses);
            let t = services_each(boot, objects);
            (t, l7.join().expect("Ingress translation panicked"))
        })
    } else {
        (services_each(boot, objects), ingresses())
    };
    t.state.l7 = l7_state;
    t.problems.extend(l7_problems);
    t
}

/// Objects from which translation uses a second thread (below, starting it costs more than it saves).
const PARALLEL_FROM: usize = 1000;

/// `translate_each` for the Services alone.
fn services_each(boot: &Bootstrap, objects: &Objects) -> Translation {
    let mut t = Translation::default();
    let mut lbs = Vec::new();
    for s in &objects.services {
        let Some(spec) = s.object.spec.as_ref() else { continue };
        if spec.type_.as_deref() != Some("LoadBalancer") {
            continue;
        }
        let meta = &s.object.metadata;
        let id = ObjectRef::of(meta);
        if !is_our_class(boot, spec) {
            t.other_class.push(id);
            continue;
        }
        let lb = Lb { source: &s.source, id, service: &s.object, spec, vips: Vec::new(), failed: false };
        if lb.id.name.is_empty() {
            let error = lb.err("metadata.name", "a Service needs a name");
            t.problems.push(Problem { kind: "Service", object: lb.id, reason: REASON_INVALID, error });
            continue;
        }
        lbs.push(lb);
    }
    lbs.sort_by(|a, b| a.id.cmp(&b.id));
    let mut i = 1;
    while i < lbs.len() {
        if lbs[i - 1].id == lbs[i].id {
            let error = lbs[i].err("metadata.name", format!("defined twice: also in {}", lbs[i - 1].source));
            t.problems.push(Problem { kind: "Service", object: lbs[i].id.clone(), reason: REASON_INVALID, error });
            lbs.remove(i);
        } else {
            i += 1;
        }
    }

    // A Service with an invalid spec takes no address that a valid one could have.
    for lb in lbs.iter_mut() {
        if let Err(error) = validate_spec(boot, lb) {
            lb.failed = true;
            t.problems.push(Problem { kind: "Service", object: lb.id.clone(), reason: REASON_INVALID, error });
        }
    }
    assign_vips(boot, &mut lbs, &mut t.problems);

    let slices = slices_by_service(objects);

    let mut out: Vec<VipService> = Vec::new();
    // (vip, protocol, port) -> (index into lbs, port index)
    let mut claimed: BTreeMap<(IpAddr, Protocol, u16), (usize, usize)> = BTreeMap::new();
    for li in 0..lbs.len() {
        if lbs[li].failed {
            continue;
        }
        let svc_slices = slices.get(&lbs[li].id).map(Vec::as_slice).unwrap_or(&[]);
        match lb_services(boot, &lbs, li, svc_slices, &claimed) {
            Ok(services) => {
                for (v, pi) in services {
                    claimed.insert((v.vip, v.protocol, v.port), (li, pi));
                    out.push(v);
                }
            }
            Err((reason, error)) => {
                lbs[li].failed = true;
                t.problems.push(Problem { kind: "Service", object: lbs[li].id.clone(), reason, error });
            }
        }
    }
    check_shared_ips(&mut lbs, &mut t.problems);
    let failed: ahash::AHashSet<&ObjectRef> = lbs.iter().filter(|lb| lb.failed).map(|lb| &lb.id).collect();
    if !failed.is_empty() {
        out.retain(|v| !failed.contains(&v.service));
    }
    out.sort_by_key(|v| (v.vip, v.protocol, v.port));
    for lb in lbs.iter().filter(|lb| !lb.failed) {
        t.addresses.insert(lb.id.clone(), lb.vips.iter().map(|(ip, _)| *ip).collect());
    }
    t.state.services = out;
    t
}

/// Ingress translation that leaves out an Ingress with a problem and serves the rest.
fn ingresses_each(
    objects: &Objects,
    sel: &crate::ingress::ClassSelection,
    problems: &mut Vec<Problem>,
) -> crate::ingress::L7State {
    let mut without: Option<Objects> = None;
    loop {
        let current = without.as_ref().unwrap_or(objects);
        match crate::ingress::translate_ingresses(current, sel) {
            Ok(state) => return state,
            Err(error) => {
                // The error names the Ingress as `Ingress namespace/name`; leave that one out.
                let object = error
                    .object
                    .as_deref()
                    .and_then(|o| o.strip_prefix("Ingress "))
                    .and_then(|n| n.split_once('/'))
                    .map(|(ns, name)| ObjectRef { namespace: ns.into(), name: name.into() })
                    .unwrap_or(ObjectRef { namespace: String::new(), name: String::new() });
                let mut next = current.clone();
                let before = next.ingresses.len();
                next.ingresses.retain(|i| ObjectRef::of(&i.object.metadata) != object);
                problems.push(Problem { kind: "Ingress", object, reason: REASON_INVALID, error });
                if next.ingresses.len() == before {
                    // Not attributable to one Ingress: serve no routes rather than loop.
                    return Default::default();
                }
                without = Some(next);
            }
        }
    }
}

/// The EndpointSlices of each Service (by their `kubernetes.io/service-name` label), for the
/// Service and the Ingress translations alike. A hash map: a B-tree of string comparisons was a
/// fifth of translating 10,000 Services.
pub(crate) fn slices_by_service(objects: &Objects) -> ahash::AHashMap<ObjectRef, Vec<&Sourced<EndpointSlice>>> {
    let mut slices: ahash::AHashMap<ObjectRef, Vec<&Sourced<EndpointSlice>>> = ahash::AHashMap::new();
    for s in &objects.endpoint_slices {
        let meta = &s.object.metadata;
        if let Some(svc) = meta.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)) {
            slices.entry(ObjectRef { namespace: namespace(&meta.namespace), name: svc.clone() }).or_default().push(s);
        }
    }
    slices
}

/// Event reasons.
pub const REASON_INVALID: &str = "InvalidSpec";
pub const REASON_ALLOCATION_FAILED: &str = "AllocationFailed";
pub const REASON_ADDRESS_TAKEN: &str = "AddressTaken";

/// What can be checked of a Service on its own, before it is given addresses.
fn validate_spec(boot: &Bootstrap, lb: &Lb<'_>) -> Result<(), ConfigError> {
    forwarding_mode(boot, lb)?;
    affinity(lb)?;
    health_check(lb)?;
    source_ranges(lb)?;
    let ports = lb.spec.ports.as_deref().unwrap_or(&[]);
    if ports.is_empty() {
        return Err(lb.err("spec.ports", "a LoadBalancer Service needs at least one port"));
    }
    for (pi, sp) in ports.iter().enumerate() {
        service_port(lb, pi, sp)?;
    }
    Ok(())
}

#[allow(clippy::result_large_err)] // once per Service per rebuild, not per packet
/// The VIP services of `lbs[li]` (with the index of the Service port each comes from).
fn lb_services(
    boot: &Bootstrap,
    lbs: &[Lb<'_>],
    li: usize,
    svc_slices: &[&Sourced<EndpointSlice>],
    claimed: &BTreeMap<(IpAddr, Protocol, u16), (usize, usize)>,
) -> Result<Vec<(VipService, usize)>, (&'static str, ConfigError)> {
    let lb = &lbs[li];
    let invalid = |e| (REASON_INVALID, e);
    let mode = forwarding_mode(boot, lb).map_err(invalid)?;
    let affinity = affinity(lb).map_err(invalid)?;
    let health = health_check(lb).map_err(invalid)?;
    let source_ranges = source_ranges(lb).map_err(invalid)?;
    let ports = lb.spec.ports.as_deref().unwrap_or(&[]);
    if ports.is_empty() {
        return Err(invalid(lb.err("spec.ports", "a LoadBalancer Service needs at least one port")));
    }
    let mut mine: BTreeMap<(IpAddr, Protocol, u16), usize> = BTreeMap::new();
    let mut out = Vec::new();
    for (pi, sp) in ports.iter().enumerate() {
        let (protocol, port) = service_port(lb, pi, sp).map_err(invalid)?;
        for (vip, _) in &lb.vips {
            let what = || format!("{vip} {}/{port}", proto_name(protocol));
            if let Some(&pj) = mine.get(&(*vip, protocol, port)) {
                let msg = format!("{} is claimed twice by this Service (also spec.ports[{pj}])", what());
                return Err(invalid(lb.err(format!("spec.ports[{pi}]"), msg)));
            }
            if let Some(&(lj, pj)) = claimed.get(&(*vip, protocol, port)) {
                let msg = format!("{} is already served by {} (spec.ports[{pj}])", what(), lbs[lj].where_());
                return Err((REASON_ADDRESS_TAKEN, lb.err(format!("spec.ports[{pi}]"), msg)));
            }
            mine.insert((*vip, protocol, port), pi);
            let endpoints = endpoints(lb, pi, sp, protocol, vip.is_ipv6(), svc_slices).map_err(invalid)?;
            out.push((
                VipService {
                    service: lb.id.clone(),
                    port_name: sp.name.clone().unwrap_or_default(),
                    vip: *vip,
                    port,
                    protocol,
                    mode,
                    affinity: affinity.clone(),
                    health: health.clone(),
                    source_ranges: source_ranges.clone(),
                    endpoints,
                },
                pi,
            ));
        }
    }
    Ok(out)
}

/// The addresses a Service asks for: `spec.loadBalancerIP`, else the annotation.
fn requested_vips(boot: &Bootstrap, lb: &Lb<'_>) -> Result<Vec<(IpAddr, String)>, ConfigError> {
    let mut vips: Vec<(IpAddr, String)> = Vec::new();
    let lb_ip = lb.spec.load_balancer_ip.as_deref().map(str::trim).filter(|s| !s.is_empty());
    let requested: Vec<(&str, String)> = if let Some(ip) = lb_ip {
        vec![(ip, "spec.loadBalancerIP".to_string())]
    } else if let Some(list) = lb.annotation(ANNOTATION_LB_IPS) {
        let field = annotation_field(ANNOTATION_LB_IPS);
        list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| (s, field.clone())).collect()
    } else {
        Vec::new()
    };
    for (text, field) in requested {
        let ip: IpAddr = text.parse().map_err(|_| lb.err(&field, format!("{text:?} is not an IP address")))?;
        if let Some((other, _)) = vips.iter().find(|(v, _)| v.is_ipv4() == ip.is_ipv4()) {
            return Err(
                lb.err(&field, format!("{ip} and {other} are both {}: at most one VIP per family", family(&ip)))
            );
        }
        if !boot.in_vip_pools(&ip) {
            return Err(lb.err(&field, format!("{ip} is outside every VIP pool ({})", describe_pools(&boot.vip_pools))));
        }
        vips.push((ip, field));
    }
    Ok(vips)
}

/// Explicit requests first (spec.loadBalancerIP, then the annotation), then addresses remembered
/// in status, then allocation from the pools for the rest, in namespace/name order. A Service
/// that cannot have its addresses is marked failed, with a problem.
#[allow(clippy::needless_range_loop)] // lbs[i] is replaced while the others are read
fn assign_vips(boot: &Bootstrap, lbs: &mut [Lb<'_>], problems: &mut Vec<Problem>) {
    // address -> index of the first Service holding it
    let mut taken: BTreeMap<IpAddr, usize> = BTreeMap::new();
    for i in 0..lbs.len() {
        match requested_vips(boot, &lbs[i]) {
            Ok(vips) => {
                for (ip, _) in &vips {
                    taken.entry(*ip).or_insert(i);
                }
                lbs[i].vips = vips;
            }
            Err(error) => {
                lbs[i].failed = true;
                problems.push(Problem { kind: "Service", object: lbs[i].id.clone(), reason: REASON_INVALID, error });
            }
        }
    }
    // Addresses in status (from an earlier allocation) are kept when still valid and free.
    for i in 0..lbs.len() {
        if !lbs[i].vips.is_empty() || lbs[i].failed {
            continue;
        }
        let lb = &lbs[i];
        let ingress =
            lb.service.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|l| l.ingress.as_ref());
        let mut vips: Vec<(IpAddr, String)> = Vec::new();
        for (k, ing) in ingress.into_iter().flatten().enumerate() {
            let Some(ip) = ing.ip.as_deref().and_then(|s| s.trim().parse::<IpAddr>().ok()) else { continue };
            let free = taken.get(&ip).is_none_or(|&j| shareable(&lbs[j], lb));
            if free && boot.in_vip_pools(&ip) && !vips.iter().any(|(v, _)| v.is_ipv4() == ip.is_ipv4()) {
                vips.push((ip, format!("status.loadBalancer.ingress[{k}].ip")));
            }
        }
        for (ip, _) in &vips {
            taken.entry(*ip).or_insert(i);
        }
        lbs[i].vips = vips;
    }
    // The appliance's own addresses (and the Ingress address) are never handed out.
    let own: BTreeSet<IpAddr> = boot
        .ports
        .iter()
        .flat_map(|p| [p.ipv4.map(|n| IpAddr::V4(n.addr())), p.ipv6.map(|n| IpAddr::V6(n.addr()))])
        .flatten()
        .chain(boot.l7.as_ref().map(|l| IpAddr::V4(l.address)))
        .collect();
    let mut allocator = Allocator::new(boot);
    for i in 0..lbs.len() {
        if !lbs[i].vips.is_empty() || lbs[i].failed {
            continue;
        }
        let (want, required) = match wanted_families(&lbs[i]) {
            Ok(w) => w,
            Err(error) => {
                lbs[i].failed = true;
                problems.push(Problem { kind: "Service", object: lbs[i].id.clone(), reason: REASON_INVALID, error });
                continue;
            }
        };
        let mut vips = Vec::new();
        for v6 in want {
            match allocator.next(v6, |ip| taken.contains_key(ip) || own.contains(ip)) {
                Some(ip) => {
                    vips.push((ip, "spec.loadBalancerIP".to_string()));
                }
                None if required || vips.is_empty() => {
                    let fam = if v6 { "IPv6" } else { "IPv4" };
                    let error = lbs[i].err(
                        "spec.loadBalancerIP",
                        format!(
                            "no address requested and no free {fam} address left ({})",
                            describe_pools(&boot.vip_pools)
                        ),
                    );
                    problems.push(Problem {
                        kind: "Service",
                        object: lbs[i].id.clone(),
                        reason: REASON_ALLOCATION_FAILED,
                        error,
                    });
                    lbs[i].failed = true;
                    break;
                }
                None => {} // PreferDualStack: one family is enough
            }
        }
        if !lbs[i].failed {
            for (ip, _) in &vips {
                taken.insert(*ip, i);
            }
            lbs[i].vips = vips;
        }
    }
}

/// Families to allocate (false = IPv4, true = IPv6) from `spec.ipFamilies`/`ipFamilyPolicy`, and
/// whether all of them are required.
fn wanted_families(lb: &Lb<'_>) -> Result<(Vec<bool>, bool), ConfigError> {
    let mut fams = Vec::new();
    for (k, f) in lb.spec.ip_families.iter().flatten().enumerate() {
        match f.as_str() {
            "IPv4" => fams.push(false),
            "IPv6" => fams.push(true),
            other => return Err(lb.err(format!("spec.ipFamilies[{k}]"), format!("{other:?} is not IPv4 or IPv6"))),
        }
    }
    let policy = lb.spec.ip_family_policy.as_deref().unwrap_or("SingleStack");
    let dual = match policy {
        "SingleStack" => false,
        "PreferDualStack" | "RequireDualStack" => true,
        other => {
            return Err(lb.err(
                "spec.ipFamilyPolicy",
                format!("{other:?} is not one of SingleStack, PreferDualStack, RequireDualStack"),
            ))
        }
    };
    if fams.is_empty() {
        fams.push(false);
    }
    if dual && fams.len() == 1 {
        let other = !fams[0];
        fams.push(other);
    }
    if !dual {
        fams.truncate(1);
    }
    Ok((fams, policy != "PreferDualStack"))
}

/// The first free address of the family, pool by pool, CIDR by CIDR. IPv4 skips network and
/// broadcast addresses; IPv6 skips the subnet-router anycast address (host part zero).
///
/// One scan per family for the whole allocation round: addresses only become taken during a
/// round, so one passed over stays unusable and the next search resumes where the last stopped
/// (allocating N Services is linear, not quadratic, in N).
struct Allocator<'a> {
    v4: Box<dyn Iterator<Item = IpAddr> + 'a>,
    v6: Box<dyn Iterator<Item = IpAddr> + 'a>,
}

impl<'a> Allocator<'a> {
    fn new(boot: &'a Bootstrap) -> Allocator<'a> {
        let cidrs = || boot.vip_pools.iter().flat_map(|p| p.cidrs.iter());
        let v4 = cidrs().filter_map(|c| match c {
            ipnet::IpNet::V4(n) => Some(n.hosts().map(IpAddr::V4)),
            _ => None,
        });
        let v6 = cidrs().filter_map(|c| match c {
            ipnet::IpNet::V6(n) => Some(n.hosts().skip(usize::from(n.prefix_len() < 127)).map(IpAddr::V6)),
            _ => None,
        });
        Allocator { v4: Box::new(v4.flatten()), v6: Box::new(v6.flatten()) }
    }

    fn next(&mut self, v6: bool, is_taken: impl Fn(&IpAddr) -> bool) -> Option<IpAddr> {
        let it = if v6 { &mut self.v6 } else { &mut self.v4 };
        it.find(|ip| !is_taken(ip))
    }
}

/// Whether `b` may use an address `a` already has: both carry the same shared-IP annotation.
fn shareable(a: &Lb<'_>, b: &Lb<'_>) -> bool {
    match (a.annotation(ANNOTATION_SHARED_IP), b.annotation(ANNOTATION_SHARED_IP)) {
        (Some(x), Some(y)) => !x.is_empty() && x == y,
        _ => false,
    }
}

fn check_shared_ips(lbs: &mut [Lb<'_>], problems: &mut Vec<Problem>) {
    let mut first: BTreeMap<IpAddr, usize> = BTreeMap::new();
    for i in 0..lbs.len() {
        if lbs[i].failed {
            continue;
        }
        let mut error = None;
        for (ip, field) in &lbs[i].vips {
            match first.get(ip) {
                None => {
                    first.insert(*ip, i);
                }
                Some(&j) if !shareable(&lbs[j], &lbs[i]) => {
                    error = Some(lbs[i].err(
                        field,
                        format!(
                            "address {ip} taken by {} ({}); Services may share a VIP only when both carry the \
                             annotation {ANNOTATION_SHARED_IP} with the same value",
                            lbs[j].id, lbs[j].source
                        ),
                    ));
                    break;
                }
                Some(_) => {}
            }
        }
        if let Some(error) = error {
            lbs[i].failed = true;
            problems.push(Problem { kind: "Service", object: lbs[i].id.clone(), reason: REASON_ADDRESS_TAKEN, error });
        }
    }
}

/// The Service's active health check, from its annotations.
fn health_check(lb: &Lb<'_>) -> Result<Option<HealthCheck>, ConfigError> {
    let Some(kind) = lb.annotation(ANNOTATION_HEALTH) else {
        return Ok(None);
    };
    let key = |k: &str| format!("{ANNOTATION_HEALTH}-{k}");
    let number = |k: &str, default: f64, min: f64, max: f64| -> Result<f64, ConfigError> {
        let name = key(k);
        match lb.annotation(&name) {
            None => Ok(default),
            Some(v) => match v.parse::<f64>() {
                Ok(n) if (min..=max).contains(&n) => Ok(n),
                _ => Err(lb.err(annotation_field(&name), format!("{v:?} is not a number in {min}..={max}"))),
            },
        }
    };
    let http_path = match kind {
        "tcp" => None,
        "http" => {
            let path = lb.annotation(&key("path")).unwrap_or("/");
            if !path.starts_with('/') || path.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
                return Err(lb.err(annotation_field(&key("path")), format!("{path:?} is not an absolute path")));
            }
            Some(path.to_string())
        }
        other => {
            return Err(lb.err(
                annotation_field(ANNOTATION_HEALTH),
                format!("{other:?} is not a health check; allowed values: tcp, http"),
            ))
        }
    };
    let interval = number("interval", 5.0, 0.1, 3600.0)?;
    let fall = number("fall", 2.0, 1.0, 10.0)? as u8;
    // The default timeout lets a dead endpoint leave within two intervals: confirming probes
    // run interval / fall apart, and each may take the timeout (see the prober).
    let timeout = number("timeout", (interval / fall as f64).min(2.0), 0.05, 3600.0)?;
    if timeout > interval {
        return Err(
            lb.err(annotation_field(&key("timeout")), format!("{timeout} s exceeds the interval ({interval} s)"))
        );
    }
    Ok(Some(HealthCheck {
        http_path,
        interval_ms: (interval * 1000.0) as u32,
        timeout_ms: (timeout * 1000.0) as u32,
        fall,
        rise: number("rise", 2.0, 1.0, 10.0)? as u8,
    }))
}

/// The clients a Service admits: `spec.loadBalancerSourceRanges`, else the legacy annotation;
/// none: everyone. Each a CIDR (host bits allowed and cleared, as Kubernetes' validation
/// takes them).
fn source_ranges(lb: &Lb<'_>) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    let field: Vec<(String, String)> = match lb.spec.load_balancer_source_ranges.as_deref() {
        Some(list) if !list.is_empty() => list
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("spec.loadBalancerSourceRanges[{i}]"), r.trim().to_string()))
            .collect(),
        _ => match lb.annotation(ANNOTATION_SOURCE_RANGES) {
            Some(v) => v
                .split(',')
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .map(|r| (annotation_field(ANNOTATION_SOURCE_RANGES), r.to_string()))
                .collect(),
            None => Vec::new(),
        },
    };
    let mut ranges = Vec::with_capacity(field.len());
    for (name, text) in field {
        let net: ipnet::IpNet =
            text.parse().map_err(|_| lb.err(name, format!("{text:?} is not a CIDR (like 203.0.113.0/24)")))?;
        ranges.push(net.trunc());
    }
    ranges.sort();
    ranges.dedup();
    Ok(ranges)
}

fn forwarding_mode(boot: &Bootstrap, lb: &Lb<'_>) -> Result<ForwardingMode, ConfigError> {
    match lb.annotation(ANNOTATION_FORWARDING) {
        None => Ok(boot.forwarding.default_mode),
        Some("fullnat") => Ok(ForwardingMode::FullNat),
        Some("dsr-ipip") => Ok(ForwardingMode::DsrIpip),
        Some(other) => Err(lb.err(
            annotation_field(ANNOTATION_FORWARDING),
            format!("{other:?} is not a forwarding mode; allowed values: fullnat, dsr-ipip"),
        )),
    }
}

fn affinity(lb: &Lb<'_>) -> Result<Option<ClientIpAffinity>, ConfigError> {
    match lb.spec.session_affinity.as_deref() {
        None | Some("None") => Ok(None),
        Some("ClientIP") => {
            let t = lb
                .spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match t {
                None => Ok(Some(ClientIpAffinity { timeout_seconds: DEFAULT_AFFINITY_TIMEOUT })),
                Some(t) if (1..=MAX_AFFINITY_TIMEOUT as i32).contains(&t) => {
                    Ok(Some(ClientIpAffinity { timeout_seconds: t as u32 }))
                }
                Some(t) => Err(lb.err(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!("{t} is out of range 1..={MAX_AFFINITY_TIMEOUT}"),
                )),
            }
        }
        Some(other) => Err(lb.err("spec.sessionAffinity", format!("{other:?} is not one of None, ClientIP"))),
    }
}

fn proto_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    }
}

fn parse_protocol(p: Option<&str>) -> Result<Protocol, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Err("SCTP is not supported (TCP and UDP are)".to_string()),
        other => Err(format!("{other:?} is not one of TCP, UDP")),
    }
}

fn service_port(lb: &Lb<'_>, i: usize, sp: &ServicePort) -> Result<(Protocol, u16), ConfigError> {
    let protocol =
        parse_protocol(sp.protocol.as_deref()).map_err(|m| lb.err(format!("spec.ports[{i}].protocol"), m))?;
    let port = u16::try_from(sp.port).ok().filter(|&p| p != 0).ok_or_else(|| {
        lb.err(format!("spec.ports[{i}].port"), format!("{} is not a port number (1-65535)", sp.port))
    })?;
    Ok((protocol, port))
}

fn rank(s: EndpointState) -> u8 {
    match s {
        EndpointState::Ready => 2,
        EndpointState::Terminating => 1,
        EndpointState::NotReady => 0,
    }
}

/// The endpoints of Service port `pi` for one VIP family, from the Service's slices.
fn endpoints(
    lb: &Lb<'_>,
    pi: usize,
    sp: &ServicePort,
    protocol: Protocol,
    v6: bool,
    slices: &[&Sourced<EndpointSlice>],
) -> Result<Vec<Endpoint>, ConfigError> {
    let name = sp.name.as_deref().unwrap_or("");
    let ip_slices = || slices.iter().copied().filter(|s| matches!(s.object.address_type.as_str(), "IPv4" | "IPv6"));
    // Slices that list ports (placeholder slices of Services without endpoints list none).
    let with_ports = || ip_slices().filter(|s| s.object.ports.as_ref().is_some_and(|p| !p.is_empty()));
    let matches = |p: &k8s_openapi::api::discovery::v1::EndpointPort| {
        p.name.as_deref().unwrap_or("") == name && parse_protocol(p.protocol.as_deref()).ok() == Some(protocol)
    };
    if with_ports().next().is_some() && !with_ports().any(|s| s.object.ports.iter().flatten().any(matches)) {
        let searched: Vec<String> = with_ports()
            .map(|s| {
                let ports: Vec<String> = s
                    .object
                    .ports
                    .iter()
                    .flatten()
                    .map(|p| {
                        let port = p.port.map_or("-".to_string(), |n| n.to_string());
                        format!(
                            "{:?} {}/{port}",
                            p.name.as_deref().unwrap_or(""),
                            p.protocol.as_deref().unwrap_or("TCP")
                        )
                    })
                    .collect();
                format!("{} [{}] ({})", object_name("EndpointSlice", &s.object.metadata), ports.join(", "), s.source)
            })
            .collect();
        return Err(lb.err(
            format!("spec.ports[{pi}].name"),
            format!(
                "no EndpointSlice port named {name:?} with protocol {}; searched {}",
                proto_name(protocol),
                searched.join("; ")
            ),
        ));
    }

    let want = if v6 { "IPv6" } else { "IPv4" };
    // Every (address, port) once: the readiest, the first seen among equals. (Sorted at the end
    // rather than kept in a B-tree: this runs for every Service port.)
    let mut all: Vec<Endpoint> = Vec::new();
    for s in ip_slices().filter(|s| s.object.address_type == want) {
        let slice_err = |field: String, msg: String| {
            s.source.error(msg).object(object_name("EndpointSlice", &s.object.metadata)).field(field)
        };
        for (k, p) in s.object.ports.iter().flatten().enumerate() {
            if !matches(p) {
                continue;
            }
            // kube-proxy ignores ports without a number as well.
            let Some(n) = p.port else { continue };
            let port = u16::try_from(n)
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| slice_err(format!("ports[{k}].port"), format!("{n} is not a port number (1-65535)")))?;
            for (j, ep) in s.object.endpoints.iter().enumerate() {
                let Some(text) = ep.addresses.first() else {
                    return Err(slice_err(format!("endpoints[{j}].addresses"), "an endpoint needs an address".into()));
                };
                let addr: IpAddr = text.trim().parse().map_err(|_| {
                    slice_err(format!("endpoints[{j}].addresses[0]"), format!("{text:?} is not an IP address"))
                })?;
                if addr.is_ipv6() != v6 {
                    return Err(slice_err(
                        format!("endpoints[{j}].addresses[0]"),
                        format!("{addr} is not an {want} address (addressType is {want})"),
                    ));
                }
                let c = ep.conditions.as_ref();
                let state = if c.and_then(|c| c.ready).unwrap_or(true) {
                    EndpointState::Ready
                } else if c.and_then(|c| c.serving) == Some(true) && c.and_then(|c| c.terminating) == Some(true) {
                    EndpointState::Terminating
                } else {
                    EndpointState::NotReady
                };
                let target = ep.target_ref.as_ref().and_then(|r| r.name.clone()).or_else(|| ep.hostname.clone());
                all.push(Endpoint { addr, port, state, weight: 1, target });
            }
        }
    }
    // Stable: equals keep the order they were seen in.
    all.sort_by_key(|e| (e.addr, e.port, std::cmp::Reverse(rank(e.state))));
    all.dedup_by(|later, first| (later.addr, later.port) == (first.addr, first.port));
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot() -> Bootstrap {
        Bootstrap::parse(Path::new("b.yaml"), include_str!("../examples/bootstrap.yaml")).unwrap()
    }

    fn run_with(boot: &Bootstrap, docs: &[String]) -> Result<DesiredState, ConfigError> {
        translate(boot, &Objects::parse(Path::new("t.yaml"), &docs.join("---\n")).unwrap())
    }

    fn run(docs: &[String]) -> Result<DesiredState, ConfigError> {
        run_with(&boot(), docs)
    }

    fn err(docs: &[String]) -> String {
        run(docs).expect_err("must be rejected").to_string()
    }

    /// A LoadBalancer Service in namespace `demo`; `meta` and `spec` are extra YAML flow entries.
    fn svc(name: &str, meta: &str, spec: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo{meta}}}\n\
             spec: {{type: LoadBalancer{spec}}}\n"
        )
    }

    fn slice(name: &str, service: &str, family: &str, ports: &str, endpoints: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: demo, \
             labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: {family}\nports: {ports}\n\
             endpoints: {endpoints}\n"
        )
    }

    fn vips(state: &DesiredState) -> Vec<(String, String, u16)> {
        state.services.iter().map(|s| (s.service.to_string(), s.vip.to_string(), s.port)).collect()
    }

    const HTTP: &str = ", ports: [{name: http, port: 80, targetPort: 8080}]";

    #[test]
    fn source_ranges_from_the_field_or_the_annotation() {
        let ranges = |docs: &[String]| -> Vec<String> {
            let s = run(docs).unwrap();
            s.services[0].source_ranges.iter().map(ToString::to_string).collect()
        };
        // Host bits cleared, sorted, duplicates gone; the field wins over the annotation.
        let field = format!(", loadBalancerSourceRanges: [\"fd00:10::7/64\", 10.10.3.4/16, 10.10.0.0/16]{HTTP}");
        let annotated = |v: &str| format!(", annotations: {{{ANNOTATION_SOURCE_RANGES}: \"{v}\"}}");
        assert_eq!(ranges(&[svc("a", &annotated("192.0.2.0/24"), &field)]), ["10.10.0.0/16", "fd00:10::/64"]);
        assert_eq!(
            ranges(&[svc("a", &annotated(" 192.0.2.0/24, 198.51.100.0/24 "), HTTP)]),
            ["192.0.2.0/24", "198.51.100.0/24"]
        );
        assert!(ranges(&[svc("a", "", HTTP)]).is_empty(), "none: any client");
        let e = err(&[svc("a", "", &format!(", loadBalancerSourceRanges: [10.0.0.0/8, 10.1.2.3]{HTTP}"))]);
        assert!(e.ends_with("Service demo/a: field spec.loadBalancerSourceRanges[1]: \"10.1.2.3\" is not a CIDR (like 203.0.113.0/24)"), "{e}");
        let e = err(&[svc("a", &annotated("10.0.0.0/33"), HTTP)]);
        assert!(
            e.contains(&format!("field metadata.annotations[{ANNOTATION_SOURCE_RANGES:?}]: \"10.0.0.0/33\"")),
            "{e}"
        );
    }

    #[test]
    fn allocation_is_ordered_stable_and_skips_requested_addresses() {
        let docs = vec![
            svc("b", "", HTTP),
            svc("a", "", HTTP),
            svc("c", "", &format!(", loadBalancerIP: 10.20.0.1{HTTP}")),
            "apiVersion: v1\nkind: Service\nmetadata: {name: z}\nspec: {ports: [{port: 80}]}\n".to_string(),
        ];
        let want = vec![
            ("demo/c".to_string(), "10.20.0.1".to_string(), 80),
            ("demo/a".to_string(), "10.20.0.2".to_string(), 80),
            ("demo/b".to_string(), "10.20.0.3".to_string(), 80),
        ];
        assert_eq!(vips(&run(&docs).unwrap()), want);
        let mut reversed = docs.clone();
        reversed.reverse();
        assert_eq!(vips(&run(&reversed).unwrap()), want);
    }

    #[test]
    fn allocation_by_family_and_from_status() {
        let docs = vec![
            svc("v6", "", &format!(", ipFamilies: [IPv6]{HTTP}")),
            svc("dual", "", &format!(", ipFamilyPolicy: RequireDualStack{HTTP}")),
            format!("{}status: {{loadBalancer: {{ingress: [{{ip: 10.20.0.77}}]}}}}\n", svc("kept", "", HTTP)),
            format!("{}status: {{loadBalancer: {{ingress: [{{ip: 192.0.2.1}}]}}}}\n", svc("stale", "", HTTP)),
        ];
        let got = vips(&run(&docs).unwrap());
        let want: Vec<(String, String, u16)> = [
            ("demo/dual", "10.20.0.1"),
            ("demo/stale", "10.20.0.2"),
            ("demo/kept", "10.20.0.77"),
            ("demo/dual", "fd00:20::1"),
            ("demo/v6", "fd00:20::2"),
        ]
        .iter()
        .map(|(s, v)| (s.to_string(), v.to_string(), 80))
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn exhausted_pool_is_an_error() {
        let mut b = boot();
        b.vip_pools[0].cidrs = vec!["10.20.0.4/31".parse().unwrap()];
        let docs: Vec<String> = ["a", "b", "c"].iter().map(|n| svc(n, "", HTTP)).collect();
        let e = run_with(&b, &docs).unwrap_err().to_string();
        assert!(e.contains("Service demo/c: field spec.loadBalancerIP: no address requested and no free IPv4"), "{e}");
        assert_eq!(vips(&run_with(&b, &docs[..2]).unwrap())[1].1, "10.20.0.5");
    }

    #[test]
    fn lenient_translation_leaves_out_only_the_service_with_a_problem() {
        let mut b = boot();
        b.vip_pools[0].cidrs = vec!["10.20.0.4/31".parse().unwrap()];
        let docs: Vec<String> = vec![
            svc("a", "", HTTP),
            svc("b", ", annotations: {fulcrum.io/forwarding: teleport}", HTTP),
            svc("c", "", HTTP),
            svc("d", "", HTTP),
        ];
        let objects = Objects::parse(Path::new("t.yaml"), &docs.join("---\n")).unwrap();
        let t = translate_each(&b, &objects);
        let served: Vec<String> = t.state.services.iter().map(|v| format!("{} {}", v.service.name, v.vip)).collect();
        assert_eq!(served, ["a 10.20.0.4", "c 10.20.0.5"]);
        let problems: Vec<(String, &str)> = t.problems.iter().map(|p| (p.object.name.clone(), p.reason)).collect();
        assert_eq!(problems, [("b".to_string(), REASON_INVALID), ("d".to_string(), REASON_ALLOCATION_FAILED)]);
        assert_eq!(t.addresses.keys().map(|k| k.name.as_str()).collect::<Vec<_>>(), ["a", "c"]);
        // Strict translation stops at the first of them.
        assert!(translate(&b, &objects).unwrap_err().to_string().contains("Service demo/b"));
    }

    #[test]
    fn load_balancer_class_selects_services() {
        let docs = [
            svc("mine", "", &format!(", loadBalancerClass: fulcrum.io/lb{HTTP}")),
            svc("theirs", "", &format!(", loadBalancerClass: example.com/other{HTTP}")),
            svc("plain", "", HTTP),
        ];
        let objects = Objects::parse(Path::new("t.yaml"), &docs.join("---\n")).unwrap();
        let mut b = boot();
        let names = |b: &Bootstrap| {
            let t = translate_each(b, &objects);
            assert!(t.problems.is_empty());
            (
                t.addresses.keys().map(|k| k.name.clone()).collect::<Vec<_>>(),
                t.other_class.iter().map(|k| k.name.clone()).collect::<Vec<_>>(),
            )
        };
        assert_eq!(names(&b), (vec!["mine".into(), "plain".into()], vec!["theirs".to_string()]));
        b.load_balancer.unclassed = false;
        assert_eq!(names(&b), (vec!["mine".to_string()], vec!["theirs".to_string(), "plain".to_string()]));
    }

    #[test]
    fn the_ingress_address_is_never_allocated() {
        let mut b = boot();
        b.vip_pools[0].cidrs = vec!["10.20.0.4/31".parse().unwrap()];
        b.l7 = Some(serde_yaml_ng::from_str("address: 10.20.0.4").unwrap());
        let state = run_with(&b, &[svc("a", "", HTTP)]).unwrap();
        assert_eq!(vips(&state)[0].1, "10.20.0.5");
    }

    #[test]
    fn health_check_annotations() {
        let with = |ann: &str| run(&[svc("web", &format!(", annotations: {{{ann}}}"), HTTP)]);
        let h = with(
            "fulcrum.io/health-check: http, fulcrum.io/health-check-path: /healthz, \
                      fulcrum.io/health-check-interval: '0.5', fulcrum.io/health-check-rise: '3'",
        )
        .unwrap()
        .services[0]
            .health
            .clone()
            .unwrap();
        assert_eq!(
            h,
            HealthCheck { http_path: Some("/healthz".into()), interval_ms: 500, timeout_ms: 250, fall: 2, rise: 3 }
        );
        let t = with("fulcrum.io/health-check: tcp").unwrap().services[0].health.clone().unwrap();
        assert_eq!((t.http_path, t.interval_ms, t.timeout_ms), (None, 5000, 2000));
        assert!(with("").unwrap().services[0].health.is_none());
        let e = with("fulcrum.io/health-check: icmp").unwrap_err().to_string();
        assert!(
            e.contains(r#"field metadata.annotations["fulcrum.io/health-check"]: "icmp" is not a health check"#),
            "{e}"
        );
        let e = with(
            "fulcrum.io/health-check: tcp, fulcrum.io/health-check-interval: '1', fulcrum.io/health-check-timeout: '2'",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("exceeds the interval"), "{e}");
        let e = with("fulcrum.io/health-check: http, fulcrum.io/health-check-path: 'x y'").unwrap_err().to_string();
        assert!(e.contains("is not an absolute path"), "{e}");
    }

    #[test]
    fn requested_vip_outside_pools() {
        let e = err(&[svc("web", "", &format!(", loadBalancerIP: 10.30.0.1{HTTP}"))]);
        assert_eq!(
            e,
            "t.yaml: document 1: Service demo/web: field spec.loadBalancerIP: 10.30.0.1 is outside every VIP pool \
             (VIP pools: lab: 10.20.0.0/24, fd00:20::/120)"
        );
        let e = err(&[svc("web", ", annotations: {fulcrum.io/load-balancer-ips: 'fd00:30::1'}", HTTP)]);
        assert!(
            e.contains("field metadata.annotations[\"fulcrum.io/load-balancer-ips\"]: fd00:30::1 is outside"),
            "{e}"
        );
        let e = err(&[svc("web", ", annotations: {fulcrum.io/load-balancer-ips: '10.20.0.1,10.20.0.2'}", HTTP)]);
        assert!(e.contains("at most one VIP per family"), "{e}");
        let e = err(&[svc("web", "", &format!(", loadBalancerIP: nope{HTTP}"))]);
        assert!(e.contains("\"nope\" is not an IP address"), "{e}");
    }

    #[test]
    fn ports_protocols_and_sctp() {
        let spec = ", loadBalancerIP: 10.20.0.9, ports: [{name: a, port: 53, protocol: UDP}, {name: b, port: 53}]";
        let s = run(&[svc("dns", "", spec)]).unwrap();
        let got: Vec<_> = s.services.iter().map(|v| (v.protocol, v.port, v.port_name.as_str())).collect();
        assert_eq!(got, vec![(Protocol::Tcp, 53, "b"), (Protocol::Udp, 53, "a")]);
        let e = err(&[
            svc("x", "", HTTP),
            svc("dns", "", ", ports: [{name: a, port: 53, protocol: UDP}, {name: b, port: 9, protocol: SCTP}]"),
        ]);
        assert_eq!(
            e,
            "t.yaml: document 2: Service demo/dns: field spec.ports[1].protocol: SCTP is not supported (TCP and UDP are)"
        );
        let e = err(&[svc("dup", "", ", ports: [{name: a, port: 80}, {name: b, port: 80}]")]);
        assert!(
            e.contains("field spec.ports[1]: 10.20.0.1 TCP/80 is claimed twice by this Service (also spec.ports[0])"),
            "{e}"
        );
        let e = err(&[svc("none", "", "")]);
        assert!(e.contains("field spec.ports: a LoadBalancer Service needs at least one port"), "{e}");
    }

    #[test]
    fn endpoint_conditions_dedup_and_order() {
        let ports = "[{name: http, port: 8080}]";
        let docs = vec![
            svc("web", "", HTTP),
            slice(
                "web-1",
                "web",
                "IPv4",
                ports,
                "[{addresses: [10.0.0.9], conditions: {ready: false, serving: true, terminating: true}, \
                  targetRef: {name: pod-9}},\
                  {addresses: [10.0.0.3], conditions: {}, hostname: h3},\
                  {addresses: [10.0.0.5], conditions: {ready: false, serving: false, terminating: true}},\
                  {addresses: [10.0.0.7], conditions: {ready: false, serving: true, terminating: false}}]",
            ),
            slice(
                "web-2",
                "web",
                "IPv4",
                ports,
                "[{addresses: [10.0.0.9], conditions: {ready: true}, targetRef: {name: pod-9b}},\
                  {addresses: [10.0.0.3], conditions: {ready: false}}]",
            ),
            slice("web-fqdn", "web", "FQDN", ports, "[{addresses: [web.example]}]"),
            slice("other", "not-web", "IPv4", ports, "[{addresses: [10.9.9.9]}]"),
        ];
        let s = run(&docs).unwrap();
        assert_eq!(s.services.len(), 1);
        let eps: Vec<_> = s.services[0]
            .endpoints
            .iter()
            .map(|e| (e.addr.to_string(), e.port, e.state, e.weight, e.target.clone()))
            .collect();
        use EndpointState::*;
        assert_eq!(
            eps,
            vec![
                ("10.0.0.3".into(), 8080, Ready, 1, Some("h3".into())),
                ("10.0.0.5".into(), 8080, NotReady, 1, None),
                ("10.0.0.7".into(), 8080, NotReady, 1, None),
                ("10.0.0.9".into(), 8080, Ready, 1, Some("pod-9b".into())),
            ]
        );
        // Without the ready copy in web-2, 10.0.0.9 is terminating.
        let mut only_first = docs.clone();
        only_first.remove(2);
        let s = run(&only_first).unwrap();
        let e9 = s.services[0].endpoints.iter().find(|e| e.addr.to_string() == "10.0.0.9").unwrap();
        assert_eq!((e9.state, e9.target.as_deref()), (Terminating, Some("pod-9")));
    }

    #[test]
    fn port_names_must_match_some_slice() {
        let e = err(&[
            svc("web", "", HTTP),
            slice("web-1", "web", "IPv4", "[{name: web, port: 8080}]", "[{addresses: [10.0.0.1]}]"),
            slice("web-2", "web", "IPv4", "[{name: http, port: 8080, protocol: UDP}]", "[{addresses: [10.0.0.2]}]"),
        ]);
        assert!(e.starts_with("t.yaml: document 1: Service demo/web: field spec.ports[0].name: no EndpointSlice port named \"http\" with protocol TCP; searched EndpointSlice demo/web-1 [\"web\" TCP/8080] (t.yaml: document 2); EndpointSlice demo/web-2"), "{e}");
        // No slices at all, or only a placeholder without ports: valid, no endpoints.
        assert!(run(&[svc("web", "", HTTP)]).unwrap().services[0].endpoints.is_empty());
        let placeholder = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: p, namespace: demo, \
                           labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: []\nports: null\n";
        assert!(run(&[svc("web", "", HTTP), placeholder.to_string()]).unwrap().services[0].endpoints.is_empty());
        // Unnamed service port matches an unnamed or empty-named slice port; a slice in another
        // namespace does not count.
        let other_ns =
            slice("x", "web", "IPv4", "[{name: zzz, port: 1}]", "[]").replace("namespace: demo", "namespace: prod");
        for p in ["[{port: 8080}]", "[{name: '', port: 8080}]"] {
            let s = run(&[
                svc("web", "", ", ports: [{port: 80}]"),
                slice("w", "web", "IPv4", p, "[{addresses: [10.0.0.1]}]"),
                other_ns.clone(),
            ])
            .unwrap();
            assert_eq!(s.services[0].endpoints[0].port, 8080, "{p}");
            assert_eq!(s.services[0].port_name, "");
        }
    }

    #[test]
    fn dual_stack_endpoints_follow_the_vip_family() {
        let docs = vec![
            svc("api", ", annotations: {fulcrum.io/load-balancer-ips: 'fd00:20::5, 10.20.0.5'}", HTTP),
            slice("a4", "api", "IPv4", "[{name: http, port: 8080}]", "[{addresses: [10.0.0.1]}]"),
            slice(
                "a6",
                "api",
                "IPv6",
                "[{name: http, port: 8080}]",
                "[{addresses: ['fd00::2']}, {addresses: ['fd00::1']}]",
            ),
        ];
        let s = run(&docs).unwrap();
        assert_eq!(s.services.len(), 2);
        assert_eq!(s.services[0].vip.to_string(), "10.20.0.5");
        assert_eq!(s.services[0].endpoints.len(), 1);
        assert_eq!(s.services[1].vip.to_string(), "fd00:20::5");
        let v6: Vec<_> = s.services[1].endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(v6, ["fd00::1", "fd00::2"]);
        let mut bad = docs.clone();
        bad[2] = bad[2].replace("fd00::2", "10.1.1.1");
        let e = err(&bad);
        assert!(
            e.contains("EndpointSlice demo/a6: field endpoints[0].addresses[0]: 10.1.1.1 is not an IPv6 address"),
            "{e}"
        );
    }

    #[test]
    fn affinity_and_forwarding() {
        let s = run(&[svc(
            "a",
            ", annotations: {fulcrum.io/forwarding: dsr-ipip}",
            &format!(", sessionAffinity: ClientIP{HTTP}"),
        )])
        .unwrap();
        assert_eq!(s.services[0].affinity, Some(ClientIpAffinity { timeout_seconds: 10800 }));
        assert_eq!(s.services[0].mode, ForwardingMode::DsrIpip);
        let with_t = |t: i64| {
            run(&[svc(
                "a",
                "",
                &format!(
                    ", sessionAffinity: ClientIP, sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {t}}}}}{HTTP}"
                ),
            )])
        };
        assert_eq!(with_t(86400).unwrap().services[0].affinity, Some(ClientIpAffinity { timeout_seconds: 86400 }));
        for t in [0, 86401] {
            let e = with_t(t).unwrap_err().to_string();
            assert!(e.contains("field spec.sessionAffinityConfig.clientIP.timeoutSeconds: "), "{e}");
        }
        let e = err(&[svc("a", ", annotations: {fulcrum.io/forwarding: dsr}", HTTP)]);
        assert!(
            e.ends_with("Service demo/a: field metadata.annotations[\"fulcrum.io/forwarding\"]: \"dsr\" is not a forwarding mode; allowed values: fullnat, dsr-ipip"),
            "{e}"
        );
        let mut b = boot();
        b.forwarding.default_mode = ForwardingMode::DsrIpip;
        let s = run_with(&b, &[svc("a", "", HTTP), svc("f", ", annotations: {fulcrum.io/forwarding: fullnat}", HTTP)])
            .unwrap();
        assert_eq!(s.services[0].mode, ForwardingMode::DsrIpip);
        assert_eq!(s.services[0].affinity, None);
        assert_eq!(s.services[1].mode, ForwardingMode::FullNat);
    }

    #[test]
    fn overlapping_and_shared_vips() {
        let ip = |p: u16| format!(", loadBalancerIP: 10.20.0.10, ports: [{{port: {p}}}]");
        let e = err(&[svc("a", "", &ip(80)), svc("b", "", &ip(80))]);
        assert!(e.starts_with("t.yaml: document 2: Service demo/b: field spec.ports[0]: 10.20.0.10 TCP/80 is already served by Service demo/a (t.yaml: document 1)"), "{e}");
        let e = err(&[svc("a", "", &ip(80)), svc("b", "", &ip(443))]);
        assert!(e.contains("Service demo/b: field spec.loadBalancerIP: address 10.20.0.10 taken by demo/a"), "{e}");
        let shared = |v: &str| format!(", annotations: {{fulcrum.io/allow-shared-ip: {v}}}");
        let s = run(&[svc("a", &shared("k"), &ip(80)), svc("b", &shared("k"), &ip(443))]).unwrap();
        assert_eq!(vips(&s), [("demo/a".into(), "10.20.0.10".into(), 80), ("demo/b".into(), "10.20.0.10".into(), 443)]);
        let e = err(&[svc("a", &shared("k"), &ip(80)), svc("b", &shared("j"), &ip(443))]);
        assert!(e.contains("taken by demo/a"), "{e}");
        // Same key but the same port: still a conflict.
        let e = err(&[svc("a", &shared("k"), &ip(80)), svc("b", &shared("k"), &ip(80))]);
        assert!(e.contains("already served by Service demo/a"), "{e}");
    }

    #[test]
    fn namespace_defaults_and_duplicates() {
        let doc =
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {type: LoadBalancer, ports: [{port: 80}]}\n";
        let s = run(&[doc.to_string()]).unwrap();
        assert_eq!(s.services[0].service, ObjectRef { namespace: "default".into(), name: "web".into() });
        let e = err(&[doc.to_string(), doc.to_string()]);
        assert!(
            e.contains(
                "document 2: Service default/web: field metadata.name: defined twice: also in t.yaml: document 1"
            ),
            "{e}"
        );
    }

    fn order_docs() -> Vec<String> {
        vec![
            svc("a", "", HTTP),
            svc("b", "", &format!(", ipFamilyPolicy: PreferDualStack{HTTP}")),
            svc("c", "", &format!(", loadBalancerIP: 10.20.0.2{HTTP}")),
            slice(
                "a-1",
                "a",
                "IPv4",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.0.0.2]}, {addresses: [10.0.0.1], conditions: {ready: false}}]",
            ),
            slice("a-2", "a", "IPv4", "[{name: http, port: 8080}]", "[{addresses: [10.0.0.1]}]"),
            slice("b-6", "b", "IPv6", "[{name: http, port: 8080}]", "[{addresses: ['fd00::1']}]"),
        ]
    }

    proptest::proptest! {
        #[test]
        fn document_order_does_not_matter(docs in proptest::prelude::Strategy::prop_shuffle(proptest::strategy::Just(order_docs()))) {
            let base = run(&order_docs()).unwrap();
            proptest::prop_assert_eq!(base.services.len(), 4);
            let a = &base.services[0];
            proptest::prop_assert_eq!((a.vip.to_string(), a.endpoints[0].state), ("10.20.0.1".to_string(), EndpointState::Ready));
            proptest::prop_assert_eq!(run(&docs).unwrap(), base);
        }
    }
}
