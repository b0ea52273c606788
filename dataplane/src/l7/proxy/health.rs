//! Active health checks, sent by the proxy's TCP stack from the appliance's address and this
//! core's upstream ports, so that a probe takes the path traffic takes (same source, same
//! next hop, same NIC). A TCP check passes when the connection is established; an HTTP check
//! when the status line of a `GET` is 2xx or 3xx. `fall` failures in a row take an endpoint out,
//! `rise` passes bring it back (probes run faster while a change is being confirmed, see
//! `finish_probe`); the worker hands the down set to the control thread as soon as it changes,
//! and the control thread republishes the tables without it.

use super::Proxy;
use crate::l7::stack::{ConnKey, SockRef};
use crate::snapshot::HealthTarget;
use smoltcp::socket::tcp::State;

pub(super) struct Probe {
    target: HealthTarget,
    up: bool,
    fails: u8,
    passes: u8,
    next_ms: u64,
    attempt: Option<Attempt>,
}

struct Attempt {
    sock: SockRef,
    key: ConnKey,
    started_ms: u64,
    sent: bool,
    buf: Vec<u8>,
}

/// Pass (Some(true)), fail (Some(false)) or not decided yet, from an HTTP response's first bytes.
fn http_verdict(buf: &[u8]) -> Option<bool> {
    let line_end = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&buf[..line_end]).ok()?;
    let mut parts = line.split(' ');
    let version_ok = parts.next().is_some_and(|v| v.starts_with("HTTP/1."));
    let code = parts.next().and_then(|c| c.parse::<u16>().ok());
    Some(version_ok && code.is_some_and(|c| (200..400).contains(&c)))
}

impl Proxy {
    /// The endpoints to probe, from the snapshot; probes of targets that stay keep their state.
    pub fn set_health_targets(&mut self, targets: &[HealthTarget]) {
        let mut old: Vec<Probe> = std::mem::take(&mut self.probes);
        for t in targets {
            match old.iter().position(|p| p.target == *t) {
                Some(i) => self.probes.push(old.swap_remove(i)),
                None => self.probes.push(Probe {
                    target: t.clone(),
                    up: true,
                    fails: 0,
                    passes: 0,
                    next_ms: 0,
                    attempt: None,
                }),
            }
        }
        for p in old {
            if let Some(a) = p.attempt {
                self.stack.tcp(a.sock).abort();
                self.stack.mark_dirty(a.sock);
                self.stack.remove_later(a.sock, a.key);
            }
        }
    }

    /// Targets whose endpoint is down by its check, sorted.
    pub fn health_down(&self) -> Vec<HealthTarget> {
        let mut v: Vec<HealthTarget> = self.probes.iter().filter(|p| !p.up).map(|p| p.target.clone()).collect();
        v.sort();
        v
    }

    /// Starts due probes and looks at the ones in flight (at most once per millisecond).
    pub(super) fn run_probes(&mut self, now_ms: u64) {
        if self.probes.is_empty() || now_ms == self.last_probe_ms {
            return;
        }
        self.last_probe_ms = now_ms;
        for i in 0..self.probes.len() {
            let mut attempt = self.probes[i].attempt.take();
            let verdict = match attempt.as_mut() {
                None if now_ms >= self.probes[i].next_ms => {
                    let ep = self.probes[i].target.endpoint;
                    match self
                        .free_upstream_port(ep)
                        .and_then(|(port, key)| self.stack.connect((*ep.ip(), ep.port()), port).map(|sock| (sock, key)))
                    {
                        Some((sock, key)) => {
                            attempt = Some(Attempt { sock, key, started_ms: now_ms, sent: false, buf: Vec::new() });
                            None
                        }
                        None => Some(false), // no port or socket: counted as a failure
                    }
                }
                None => None,
                Some(a) => self.look_at(i, a, now_ms),
            };
            self.probes[i].attempt = attempt;
            if let Some(pass) = verdict {
                self.finish_probe(i, pass, now_ms);
            }
        }
    }

    /// Where probe `i`'s attempt stands: passed, failed, or not decided yet.
    fn look_at(&mut self, i: usize, a: &mut Attempt, now_ms: u64) -> Option<bool> {
        let target = &self.probes[i].target;
        let timed_out = now_ms >= a.started_ms + target.check.timeout_ms as u64;
        let s = self.stack.tcp(a.sock);
        let Some(path) = &target.check.http_path else {
            return match s.state() {
                State::Established => Some(true),
                State::Closed => Some(false),
                _ if timed_out => Some(false),
                _ => None,
            };
        };
        if !a.sent && s.may_send() {
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: fulcrum-health-check\r\nConnection: close\r\n\r\n",
                target.endpoint
            );
            let s = self.stack.tcp_to_send(a.sock);
            if s.send_slice(req.as_bytes()).is_ok_and(|n| n == req.len()) {
                a.sent = true;
                self.stack.mark_dirty(a.sock);
            }
        }
        let s = self.stack.tcp(a.sock);
        while s.can_recv() && a.buf.len() < 512 {
            let room = 512 - a.buf.len();
            let _ = s.recv(|d| {
                let n = d.len().min(room);
                a.buf.extend_from_slice(&d[..n]);
                (n, ())
            });
        }
        match http_verdict(&a.buf) {
            Some(v) => Some(v),
            None if s.state() == State::Closed || (a.sent && !s.may_recv()) || timed_out => Some(false),
            None => None,
        }
    }

    fn finish_probe(&mut self, i: usize, pass: bool, now_ms: u64) {
        let p = &mut self.probes[i];
        let started = match p.attempt.take() {
            Some(a) => {
                let s = self.stack.tcp(a.sock);
                s.abort();
                self.stack.mark_dirty(a.sock);
                self.stack.remove_later(a.sock, a.key);
                a.started_ms
            }
            None => now_ms,
        };
        let c = &p.target.check;
        if pass {
            p.fails = 0;
            p.passes = p.passes.saturating_add(1);
            if !p.up && p.passes >= c.rise {
                p.up = true;
                self.stats.health_transitions += 1;
            }
        } else {
            p.passes = 0;
            p.fails = p.fails.saturating_add(1);
            if p.up && p.fails >= c.fall {
                p.up = false;
                self.stats.health_transitions += 1;
            }
        }
        // While a verdict is being confirmed (some failures of an up endpoint, some passes of a
        // down one), probes run `fall` (or `rise`) times as often: a dead endpoint is out within
        // two intervals of its death when the timeout is at most interval / fall (one interval
        // at most until the first probe after it, then `fall` probes interval / fall apart), and
        // a refusing one always is; likewise back within two intervals.
        let confirming = if p.up { p.fails } else { p.passes };
        let needed = if p.up { c.fall } else { c.rise };
        let gap = if confirming > 0 { c.interval_ms / needed.max(1) as u32 } else { c.interval_ms };
        p.next_ms = started + gap as u64;
        self.stats.health_probes += 1;
        if !pass {
            self.stats.health_failures += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::http_verdict;

    #[test]
    fn http_status_lines() {
        assert_eq!(http_verdict(b"HTTP/1.1 200 OK\r\n"), Some(true));
        assert_eq!(http_verdict(b"HTTP/1.0 302 Found\r\nLocation: /x\r\n"), Some(true));
        assert_eq!(http_verdict(b"HTTP/1.1 503 Service Unavailable\r\n"), Some(false));
        assert_eq!(http_verdict(b"SSH-2.0-OpenSSH\r\n"), Some(false));
        assert_eq!(http_verdict(b"HTTP/1.1 20"), None, "not complete yet");
    }
}
