//! `fulcrum lab-client` (hidden): the lab's traffic, run inside the client namespace by
//! `fulcrum lab`. Real TCP and UDP through the kernel: HTTP/1.1 GETs on fresh connections to
//! the TCP VIPs (each a new flow through the appliance, so the spread is visible) and to the
//! Ingress address (the appliance's own HTTP proxy, by Host), and datagrams to the UDP VIP.
//! Every second it prints one JSON line of cumulative counts; the backend is
//! read from each answer (the lab's nginx and UDP echo name themselves).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// HTTP targets (VIP:port), requests spread round robin over them.
    #[arg(long, value_name = "ADDR", required = true)]
    pub http: Vec<SocketAddr>,
    /// HTTP targets served by host (ADDR=HOST: the Host header sent), in the same rotation.
    #[arg(long, value_name = "ADDR=HOST", value_parser = parse_ingress)]
    pub ingress: Vec<(SocketAddr, String)>,
    /// UDP echo target (VIP:port).
    #[arg(long, value_name = "ADDR")]
    pub udp: Option<SocketAddr>,
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
}

#[derive(Default, serde::Serialize)]
struct Counts {
    requests: u64,
    errors: u64,
    udp_sent: u64,
    udp_received: u64,
    per_backend: BTreeMap<String, u64>,
    per_target: BTreeMap<String, u64>,
    last_error: Option<String>,
}

fn parse_ingress(s: &str) -> Result<(SocketAddr, String), String> {
    let (addr, host) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected ADDR=HOST"))?;
    let addr = addr.parse().map_err(|e| format!("{addr:?}: {e}"))?;
    if host.is_empty() {
        return Err(format!("{s:?}: empty host"));
    }
    Ok((addr, host.to_string()))
}

/// One GET on a new connection (Host: `host`, else the address); returns the body's first word
/// (the backend's name).
fn get(addr: SocketAddr, host: Option<&str>) -> Result<String, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok();
    let ip = addr.ip().to_string();
    let host = host.unwrap_or(&ip);
    write!(s, "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send {addr}: {e}"))?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).map_err(|e| format!("read {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&resp);
    if !text.starts_with("HTTP/1.1 200") {
        return Err(format!("{addr}: {}", text.lines().next().unwrap_or("empty answer")));
    }
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    Ok(body.split_whitespace().next().unwrap_or("?").to_string())
}

pub fn run(a: &Args) -> anyhow::Result<()> {
    let mut c = Counts::default();
    let udp = match a.udp {
        Some(t) => {
            let bind: SocketAddr = if t.is_ipv4() { "0.0.0.0:0".parse()? } else { "[::]:0".parse()? };
            let s = UdpSocket::bind(bind)?;
            s.connect(t)?;
            s.set_nonblocking(true)?;
            Some(s)
        }
        None => None,
    };
    let start = Instant::now();
    let mut next_report = Duration::from_secs(1);
    let mut i = 0usize;
    let mut buf = [0u8; 512];
    while start.elapsed().as_secs_f64() < a.seconds {
        let n = a.http.len() + a.ingress.len();
        let (target, host) = match a.http.get(i % n) {
            Some(&t) => (t, None),
            None => {
                let (t, h) = &a.ingress[i % n - a.http.len()];
                (*t, Some(h.as_str()))
            }
        };
        i += 1;
        match get(target, host) {
            Ok(b) => {
                c.requests += 1;
                *c.per_backend.entry(b).or_default() += 1;
                *c.per_target.entry(target.to_string()).or_default() += 1;
            }
            Err(e) => {
                c.errors += 1;
                c.last_error = Some(e);
            }
        }
        if let Some(s) = &udp {
            if s.send(b"who?").is_ok() {
                c.udp_sent += 1;
            }
            while let Ok(n) = s.recv(&mut buf) {
                c.udp_received += 1;
                let name = String::from_utf8_lossy(&buf[..n]).split_whitespace().next().unwrap_or("?").to_string();
                *c.per_backend.entry(format!("{name}/udp")).or_default() += 1;
            }
        }
        if start.elapsed() >= next_report {
            next_report += Duration::from_secs(1);
            println!("{}", serde_json::to_string(&c)?);
        }
    }
    // Late UDP answers.
    if let Some(s) = &udp {
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until && c.udp_received < c.udp_sent {
            match s.recv(&mut buf) {
                Ok(n) => {
                    c.udp_received += 1;
                    let name = String::from_utf8_lossy(&buf[..n]).split_whitespace().next().unwrap_or("?").to_string();
                    *c.per_backend.entry(format!("{name}/udp")).or_default() += 1;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
    println!("{}", serde_json::to_string(&c)?);
    Ok(())
}
