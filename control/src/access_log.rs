//! The access log's writer: a thread that drains every worker's ring of request events
//! (`fulcrum_dataplane::l7::access_log`), pairs each request's start and end, and appends the
//! requests to the log as JSON lines, one per request, the way ingress-nginx's `log-format-escape-json` or Envoy's `json_format` logs
//! are read by log shippers.
//!
//! The file is opened for appending and opened again when its path no longer names it
//! (logrotate's rename-and-create, or a removal), checked once a second; `copytruncate` works
//! as is, since every write appends. A failed write is reported once until writes work again;
//! the workers never wait for it: records that find their ring full are dropped and counted.

use anyhow::Context;
use fulcrum_config::bootstrap::AccessLogConfig;
use fulcrum_dataplane::l7::access_log::{AccessLog, AccessRecord, Reader};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// How often the rings are drained: at 100,000 requests/s a worker writes about 100 KB in
/// it, a fortieth of the default ring.
const DRAIN_EVERY: Duration = Duration::from_millis(10);

/// How often the path is checked for a rotated file.
const CHECK_PATH_EVERY: Duration = Duration::from_secs(1);

enum Sink {
    Stdout,
    /// The file, and its (device, inode) when opened.
    File {
        path: PathBuf,
        file: File,
        id: (u64, u64),
    },
}

pub struct Writer {
    sink: Sink,
    rings: Vec<(rtrb::Consumer<u8>, Reader)>,
    /// A wall-clock time and the instant it was read at: events count from the instant.
    epoch: (SystemTime, Instant),
    line: String,
    batch: Vec<u8>,
    path_checked: Instant,
    failing: bool,
    pub written: u64,
}

fn open_append(path: &PathBuf) -> std::io::Result<(File, (u64, u64))> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    let m = file.metadata()?;
    Ok((file, (m.dev(), m.ino())))
}

impl Writer {
    /// Opens the log (an error names the path) and makes one ring per worker; the workers'
    /// ends (worker i's at i) go to them.
    pub fn open(cfg: &AccessLogConfig, workers: usize) -> anyhow::Result<(Writer, Vec<AccessLog>)> {
        let sink = if cfg.path == "-" {
            Sink::Stdout
        } else {
            let path = PathBuf::from(&cfg.path);
            let (file, id) =
                open_append(&path).with_context(|| format!("cannot open l7.access_log.path {}", path.display()))?;
            Sink::File { path, file, id }
        };
        let epoch = (SystemTime::now(), Instant::now());
        let (logs, rings) = (0..workers as u16)
            .map(|core| {
                let (tx, rx) = rtrb::RingBuffer::new(cfg.ring_bytes);
                (AccessLog::new(tx, epoch.1), (rx, Reader::new(core)))
            })
            .unzip();
        let w = Writer {
            sink,
            rings,
            epoch,
            line: String::new(),
            batch: Vec::new(),
            path_checked: Instant::now(),
            failing: false,
            written: 0,
        };
        Ok((w, logs))
    }

    /// Writes every record waiting in the rings; returns how many.
    pub fn drain(&mut self) -> usize {
        self.batch.clear();
        let mut n = 0;
        let (epoch, line, batch) = (self.epoch, &mut self.line, &mut self.batch);
        for (ring, reader) in &mut self.rings {
            n += reader.drain(ring, |r| {
                format_line(r, epoch.0 + Duration::from_nanos(r.started_ns), line);
                batch.extend_from_slice(line.as_bytes());
            });
        }
        if self.path_checked.elapsed() >= CHECK_PATH_EVERY {
            self.path_checked = Instant::now();
            self.reopen_if_moved();
        }
        if n > 0 {
            let res = match &mut self.sink {
                Sink::Stdout => std::io::stdout().lock().write_all(&self.batch),
                Sink::File { file, .. } => file.write_all(&self.batch),
            };
            match res {
                Ok(()) => {
                    self.failing = false;
                    self.written += n as u64;
                }
                Err(e) if !self.failing => {
                    self.failing = true;
                    eprintln!("fulcrum: access log: cannot write ({e}); {n} records lost, and more until it works");
                }
                Err(_) => {}
            }
        }
        n
    }

    /// A file moved away or removed (log rotation): a new one at the path.
    fn reopen_if_moved(&mut self) {
        let Sink::File { path, file, id } = &mut self.sink else { return };
        let same = std::fs::metadata(&*path).is_ok_and(|m| (m.dev(), m.ino()) == *id);
        if same {
            return;
        }
        match open_append(path) {
            Ok((f, new_id)) => (*file, *id) = (f, new_id),
            Err(e) => {
                eprintln!("fulcrum: access log: cannot open {} again ({e}); writing to the old file", path.display())
            }
        }
    }

    /// Runs the writer until `stop`, then writes what is left.
    pub fn spawn(mut self, stop: Arc<AtomicBool>) -> std::io::Result<JoinHandle<Writer>> {
        std::thread::Builder::new().name("fulcrum-log".into()).spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if self.drain() == 0 {
                    std::thread::sleep(DRAIN_EVERY);
                }
            }
            self.drain();
            self
        })
    }
}

/// One record as a JSON line (with its newline) in `out`, its keys in a fixed order (time
/// first, as people read them). Text fields are shown as UTF-8, bytes that are not replaced
/// (U+FFFD); empty ones (a request the proxy could not read) are null.
pub fn format_line(r: &AccessRecord, at: SystemTime, out: &mut String) {
    use std::fmt::Write as _;
    // A JSON string (escaped by serde_json), or null.
    let text = |b: &[u8]| -> String {
        if b.is_empty() {
            "null".into()
        } else {
            serde_json::to_string(&String::from_utf8_lossy(b)).expect("a string serializes")
        }
    };
    let addr = |a: Option<std::net::SocketAddrV4>| a.map_or("null".into(), |a| format!("\"{a}\""));
    let ms = at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    let time = jiff::Timestamp::from_millisecond(ms).map(|t| format!("{t:.3}")).unwrap_or_default();
    out.clear();
    let _ = write!(
        out,
        "{{\"time\":\"{time}\",\"core\":{},\"client\":{},\"tls\":{},\"method\":{},\"host\":{},\"path\":{},\
         \"status\":{},\"bytes_sent\":{},\"duration_ms\":{:.3},\"upstream\":{},\"resends\":{}",
        r.core,
        addr(r.client),
        r.tls,
        text(&r.method),
        text(&r.host),
        text(&r.target),
        r.status,
        r.bytes_sent,
        r.duration_us as f64 / 1000.0,
        addr(r.upstream),
        r.resends,
    );
    if r.cut {
        out.push_str(",\"cut\":true");
    }
    out.push_str("}\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddrV4};

    fn peer() -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 10, 0, 10), 40000)
    }

    fn record() -> AccessRecord {
        AccessRecord {
            started_ns: 0,
            duration_us: 1234,
            core: 1,
            client: Some(peer()),
            tls: false,
            method: b"GET".to_vec(),
            host: b"web.lab".to_vec(),
            target: b"/a?q=\"x\"\xff".to_vec(),
            cut: false,
            status: 200,
            bytes_sent: 615,
            upstream: Some(SocketAddrV4::new(Ipv4Addr::new(10, 10, 0, 11), 8080)),
            resends: 0,
        }
    }

    #[test]
    fn a_record_is_one_json_line() {
        let mut line = String::new();
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_123);
        format_line(&record(), at, &mut line);
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1, "{line:?}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["time"], "2026-11-18T11:06:40.123Z");
        assert_eq!(v["client"], "10.10.0.10:40000");
        assert_eq!(v["path"], "/a?q=\"x\"\u{fffd}", "escaped, the byte that is not UTF-8 replaced");
        assert_eq!((v["status"].as_u64(), v["bytes_sent"].as_u64()), (Some(200), Some(615)));
        assert_eq!(v["duration_ms"].as_f64(), Some(1.234));
        assert_eq!(v["upstream"], "10.10.0.11:8080");
        assert!(v.get("cut").is_none());
        assert!(line.starts_with("{\"time\":\"2026-11-18T11:06:40.123Z\",\"core\":1,"), "keys in order: {line}");
        let long = AccessRecord { cut: true, ..record() };
        format_line(&long, at, &mut line);
        assert_eq!(serde_json::from_str::<serde_json::Value>(&line).unwrap()["cut"], true);
        let unread =
            AccessRecord { method: vec![], host: vec![], target: vec![], upstream: None, status: 408, ..record() };
        format_line(&unread, at, &mut line);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert!(v["method"].is_null() && v["path"].is_null() && v["upstream"].is_null());
    }

    #[test]
    fn rings_drain_to_the_file_and_a_rotated_file_is_replaced() {
        let dir = std::env::temp_dir().join(format!("fulcrum-access-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let cfg = AccessLogConfig { path: path.display().to_string(), ring_bytes: 64 << 10 };
        let (mut w, mut logs) = Writer::open(&cfg, 2).unwrap();
        let request = |log: &mut AccessLog, slot: usize, target: &str| {
            log.start(slot, Instant::now(), peer(), false, "GET", "web.lab", target);
            log.response_head(slot, 200, 80);
            log.done(slot, peer(), false, 20, None);
        };
        request(&mut logs[0], 0, "/zero");
        request(&mut logs[1], 0, "/one");
        assert_eq!(w.drain(), 2);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!((lines[0]["core"].as_u64(), lines[0]["path"].as_str()), (Some(0), Some("/zero")));
        assert_eq!((lines[1]["core"].as_u64(), lines[1]["path"].as_str()), (Some(1), Some("/one")));
        assert_eq!(lines[1]["bytes_sent"].as_u64(), Some(100));
        // logrotate: moved away, then the next lines go to a new file at the path.
        std::fs::rename(&path, dir.join("access.log.1")).unwrap();
        w.path_checked = Instant::now() - CHECK_PATH_EVERY;
        request(&mut logs[0], 3, "/two");
        assert_eq!(w.drain(), 1);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        assert_eq!(std::fs::read_to_string(dir.join("access.log.1")).unwrap().lines().count(), 2);
        assert_eq!(w.written, 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_path_that_cannot_be_opened_is_named() {
        let cfg = AccessLogConfig { path: "/nonexistent-dir/access.log".into(), ring_bytes: 64 << 10 };
        let e = Writer::open(&cfg, 1).err().expect("an error");
        assert!(format!("{e:#}").contains("l7.access_log.path /nonexistent-dir/access.log"), "{e:#}");
    }
}
