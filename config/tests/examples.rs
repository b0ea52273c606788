//! Every example under config/examples must load; every case under config/examples/broken must
//! fail with the message its `# expect:` line gives, naming its file.

use fulcrum_config::model::{EndpointState, ForwardingMode, Protocol, VipService};
use fulcrum_config::{load_desired, manifests, Bootstrap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

fn lab() -> Bootstrap {
    Bootstrap::load(&examples().join("bootstrap.yaml")).expect("lab bootstrap loads")
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn lab_bootstrap() {
    let b = lab();
    assert_eq!(b.ports[0].device, "net_af_xdp0,iface=veth-lb");
    assert_eq!(b.ports[0].mac.to_string(), "02:f1:00:00:00:01");
    assert_eq!(b.ports[0].ipv6.unwrap().to_string(), "fd00:10::2/64");
    assert_eq!(b.ports[0].next_hop.ipv4, Some("10.10.0.1".parse().unwrap()));
    assert_eq!(b.workers.cores, [0]);
    let cidrs: Vec<String> = b.vip_pools[0].cidrs.iter().map(|c| c.to_string()).collect();
    assert_eq!(cidrs, ["10.20.0.0/24", "fd00:20::/120"]);
}

#[test]
fn lab_manifests_read() {
    let o = manifests::load(&examples().join("manifests")).unwrap();
    assert_eq!(o.services.len(), 6, "web, dns-echo, video, api, internal, cart");
    assert_eq!(o.endpoint_slices.len(), 6);
    let skipped: Vec<&str> = o.skipped.iter().map(|(_, k)| k.as_str()).collect();
    assert_eq!(skipped, ["apps/v1/Deployment", "v1/ConfigMap"]);
    let (src, _) = &o.skipped[1];
    assert!(src.file.ends_with("manifests/lab.yaml") && src.document == 11, "{src}");
    let video = o.endpoint_slices.iter().find(|s| s.object.metadata.name.as_deref() == Some("video-2hv9c")).unwrap();
    assert_eq!(video.object.endpoints[1].zone.as_deref(), Some("rack-b"), "v1beta1 topology converted");
    assert_eq!(video.object.endpoints[1].node_name.as_deref(), Some("node-2"));
}

fn find<'a>(s: &'a [VipService], vip: &str, proto: Protocol, port: u16) -> &'a VipService {
    s.iter()
        .find(|v| v.vip == ip(vip) && v.protocol == proto && v.port == port)
        .unwrap_or_else(|| panic!("no {vip} {proto:?}/{port}"))
}

#[test]
fn lab_desired_state() {
    let state = load_desired(&lab(), &examples().join("manifests")).unwrap();
    let keys: Vec<(String, IpAddr, Protocol, u16)> =
        state.services.iter().map(|v| (v.service.to_string(), v.vip, v.protocol, v.port)).collect();
    use Protocol::*;
    assert_eq!(
        keys,
        vec![
            ("demo/dns-echo".into(), ip("10.20.0.1"), Udp, 53),
            ("demo/web".into(), ip("10.20.0.10"), Tcp, 80),
            ("media/video".into(), ip("10.20.0.20"), Tcp, 443),
            ("demo/api".into(), ip("10.20.0.30"), Tcp, 443),
            ("demo/api".into(), ip("10.20.0.30"), Tcp, 9090),
            ("shop/cart".into(), ip("10.20.0.40"), Tcp, 8080),
            ("demo/api".into(), ip("fd00:20::30"), Tcp, 443),
            ("demo/api".into(), ip("fd00:20::30"), Tcp, 9090),
        ]
    );
    let s = &state.services;

    let web = find(s, "10.20.0.10", Tcp, 80);
    assert_eq!(web.port_name, "http");
    assert_eq!(web.mode, ForwardingMode::FullNat);
    let eps: Vec<(IpAddr, u16, EndpointState, Option<&str>)> =
        web.endpoints.iter().map(|e| (e.addr, e.port, e.state, e.target.as_deref())).collect();
    assert_eq!(
        eps,
        vec![
            (ip("10.244.1.10"), 8080, EndpointState::Ready, Some("web-5d9c7b8f6-abcde")),
            (ip("10.244.2.11"), 8080, EndpointState::Ready, Some("web-5d9c7b8f6-fghij")),
            (ip("10.244.3.12"), 8080, EndpointState::Terminating, Some("web-5d9c7b8f6-klmno")),
        ]
    );

    let dns = find(s, "10.20.0.1", Udp, 53);
    let states: Vec<_> = dns.endpoints.iter().map(|e| (e.port, e.state)).collect();
    assert_eq!(states, [(5353, EndpointState::Ready), (5353, EndpointState::NotReady)]);

    let video = find(s, "10.20.0.20", Tcp, 443);
    assert_eq!(video.mode, ForwardingMode::DsrIpip);
    assert_eq!(video.port_name, "");
    assert_eq!(video.endpoints.iter().map(|e| e.addr).collect::<Vec<_>>(), [ip("10.244.1.40"), ip("10.244.2.41")]);

    let grpc6 = find(s, "fd00:20::30", Tcp, 9090);
    assert_eq!(grpc6.port_name, "grpc");
    let v6: Vec<_> = grpc6.endpoints.iter().map(|e| (e.addr, e.target.as_deref())).collect();
    assert_eq!(v6, [(ip("fd00:244::1e"), Some("api-0")), (ip("fd00:244::1f"), Some("api-1"))]);
    assert_eq!(find(s, "10.20.0.30", Tcp, 443).endpoints.len(), 1);

    let cart = find(s, "10.20.0.40", Tcp, 8080);
    assert_eq!(cart.affinity.as_ref().map(|a| a.timeout_seconds), Some(600));
    assert_eq!(cart.endpoints.len(), 2);
    assert!(s.iter().filter(|v| v.service.name != "cart").all(|v| v.affinity.is_none()));
}

#[test]
fn each_manifest_file_alone() {
    // Single files work too (load accepts a file); lab.yaml alone has no slices for video.
    let state = load_desired(&lab(), &examples().join("manifests/lab.yaml")).unwrap();
    assert_eq!(state.services.len(), 7);
    assert!(find(&state.services, "10.20.0.20", Protocol::Tcp, 443).endpoints.is_empty());
}

#[test]
fn broken_cases_fail_with_their_expected_message() {
    let dir = examples().join("broken");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 8, "expected at least 8 broken cases, found {}", files.len());
    let boot = lab();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{}: first line must be `# expect: ...`", file.display()))
            .trim();
        let name = file.file_name().unwrap().to_str().unwrap();
        let result = if name.starts_with("bootstrap-") {
            Bootstrap::load(file).map(|_| ())
        } else {
            load_desired(&boot, file).map(|_| ())
        };
        let message = match result {
            Ok(()) => panic!("{name}: accepted, but should fail with {expect:?}"),
            Err(e) => e.to_string(),
        };
        assert!(message.contains(expect), "{name}: error {message:?} does not contain {expect:?}");
        assert!(
            message.starts_with(&file.display().to_string()),
            "{name}: error does not start with its file: {message}"
        );
    }
}
