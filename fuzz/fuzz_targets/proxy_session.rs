//! The L7 proxy as a whole, sessions scripted by the input: up to four clients and a backend
//! sending anything, closing, resetting, stopping to read, time moving on and jumping past the
//! timeouts (`fulcrum_dataplane::l7::script`, real TCP on both sides). Never panics; every
//! client's bytes start with an HTTP/1.1 status line; once everyone has closed and the
//! timeouts have passed, the proxy holds nothing more than before.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = fulcrum_dataplane::l7::script::run(data) {
        panic!("{e}");
    }
});
