//! Kubernetes manifests (multi-document YAML) → `Objects::parse` → `translate` against the lab
//! bootstrap → `Snapshot::compile`: never panics, and every error names the file it came from.
#![no_main]

use fulcrum_config::manifests::Objects;
use fulcrum_config::{translate::translate, Bootstrap};
use fulcrum_dataplane::snapshot::Snapshot;
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::OnceLock;

fn boots() -> &'static (Bootstrap, Bootstrap) {
    static B: OnceLock<(Bootstrap, Bootstrap)> = OnceLock::new();
    B.get_or_init(|| {
        let boot = Bootstrap::parse(Path::new("bootstrap.yaml"), fulcrum_fuzz::LAB_BOOTSTRAP).expect("lab bootstrap");
        // Snapshot compile with a smaller (prime) Maglev table: same code, ~64x less work per
        // service, so more inputs per second.
        let mut small = boot.clone();
        small.maglev.table_size = 1021;
        (boot, small)
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (boot, small) = boots();
    let path = Path::new("fuzz.yaml");
    let objects = match Objects::parse(path, &text) {
        Ok(o) => o,
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("fuzz.yaml"), "parse error does not name the file: {msg}");
            return;
        }
    };
    let state = match translate(boot, &objects) {
        Ok(s) => s,
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("fuzz.yaml"), "translate error does not name the file: {msg}");
            return;
        }
    };
    let _ = Snapshot::compile(small, &state, 1);
});
