//! Bootstrap YAML → `Bootstrap::parse`: never panics; an error names the file; what parses
//! serializes back to YAML that parses to the same value; a worker configuration can be derived
//! from it and the lab manifests translate against it without panicking.
#![no_main]

use fulcrum_config::manifests::Objects;
use fulcrum_config::{translate::translate, Bootstrap};
use fulcrum_dataplane::worker::WorkerConfig;
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::OnceLock;

fn lab_objects() -> &'static Objects {
    static O: OnceLock<Objects> = OnceLock::new();
    O.get_or_init(|| Objects::parse(Path::new("lab.yaml"), fulcrum_fuzz::LAB_MANIFESTS).expect("lab manifests"))
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let path = Path::new("fuzz-bootstrap.yaml");
    let boot = match Bootstrap::parse(path, &text) {
        Ok(b) => b,
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("fuzz-bootstrap.yaml"), "error does not name the file: {msg}");
            return;
        }
    };
    let yaml = serde_yaml_ng::to_string(&boot).expect("a parsed bootstrap serializes");
    let again = Bootstrap::parse(path, &yaml)
        .unwrap_or_else(|e| panic!("a parsed bootstrap, serialized, does not parse again: {e}\n{yaml}"));
    assert_eq!(again, boot, "bootstrap does not round-trip through YAML:\n{yaml}");
    let cores = boot.workers.cores.len().clamp(1, u16::MAX as usize) as u16;
    let _ = WorkerConfig::from_bootstrap(&boot, cores - 1, cores);
    let _ = translate(&boot, lab_objects());
});
