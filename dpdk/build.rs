//! Finds DPDK through `pkg-config libdpdk`, compiles the C shim and generates the bindings.
//! Links DPDK statically when `pkg-config --static libdpdk` can be satisfied, else dynamically
//! (FULCRUM_DPDK_LINK=static|dynamic forces one).

use std::env;
use std::path::PathBuf;
use std::process::Command;

const MISSING: &str = "fulcrum-dpdk: DPDK 22.11 development files not found (pkg-config libdpdk). \
On Debian/Ubuntu: apt-get install -y dpdk libdpdk-dev pkg-config libclang-dev";

/// The raw `pkg-config --cflags libdpdk`: the pkg-config crate drops `-include rte_config.h`
/// and `-march=...`, which the DPDK headers need.
fn raw_cflags() -> Vec<String> {
    pkg_config_raw(&["--cflags", "libdpdk"])
}

fn pkg_config_raw(args: &[&str]) -> Vec<String> {
    let pc = env::var("PKG_CONFIG").unwrap_or_else(|_| "pkg-config".into());
    let out = Command::new(&pc).args(args).output().unwrap_or_else(|e| panic!("{MISSING}\n(running {pc}: {e})"));
    if !out.status.success() {
        panic!("{MISSING}\n({pc} {}: {})", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    String::from_utf8(out.stdout).expect("pkg-config output is UTF-8").split_whitespace().map(String::from).collect()
}

/// The `-lNAME` libraries of a link line that the C compiler cannot find (neither
/// libNAME.so nor libNAME.a on its search path).
fn missing_libs(args: &[String]) -> Vec<String> {
    let cc = cc::Build::new().get_compiler();
    let mut missing = Vec::new();
    for name in args.iter().filter_map(|a| a.strip_prefix("-l")).filter(|n| !n.starts_with(':')) {
        let found = ["so", "a"].iter().any(|ext| {
            let file = format!("lib{name}.{ext}");
            Command::new(cc.path())
                .arg(format!("-print-file-name={file}"))
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim() != file)
                .unwrap_or(false)
        });
        if !found && !missing.contains(&format!("-l{name}")) {
            missing.push(format!("-l{name}"));
        }
    }
    missing
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=shim/shim.c");
    println!("cargo:rerun-if-changed=shim/shim.h");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");

    // Probe first without emitting link flags: the shim must come before the DPDK libraries on
    // the link line, so it is compiled (and its cargo:rustc-link-lib printed) first.
    let probe = pkg_config::Config::new().atleast_version("22.11").cargo_metadata(false).probe("libdpdk");
    let lib = match probe {
        Ok(lib) => lib,
        Err(e) => panic!("{MISSING}\n({e})"),
    };
    if !lib.version.starts_with("22.11") {
        println!("cargo:warning=fulcrum-dpdk is written against DPDK 22.11; found {}", lib.version);
    }
    let cflags = raw_cflags();

    let mut cc = cc::Build::new();
    cc.file("shim/shim.c").include("shim").opt_level(3).warnings(true);
    for f in &cflags {
        cc.flag(f);
    }
    cc.compile("fulcrum_dpdk_shim");

    // Now the link flags, after the shim. Dynamic by default: `cargo:rustc-link-lib` is the only
    // form that reaches the binaries of crates that depend on this one (the `fulcrum` binary);
    // `cargo:rustc-link-arg`, which a whole-archive static link of the PMDs needs, applies to
    // this crate's own tests and examples only. FULCRUM_DPDK_LINK=static links those statically
    // (e.g. to carry one self-contained test binary to another machine).
    println!("cargo:rerun-if-env-changed=FULCRUM_DPDK_LINK");
    let want = env::var("FULCRUM_DPDK_LINK").unwrap_or_default();
    let link_static = want == "static";
    let static_args = if link_static { pkg_config_raw(&["--static", "--libs", "libdpdk"]) } else { Vec::new() };
    let missing = missing_libs(&static_args);
    if link_static && !missing.is_empty() {
        println!(
            "cargo:warning=fulcrum-dpdk: a static link needs {} (on Debian: libsystemd-dev provides -lsystemd)",
            missing.join(", ")
        );
    }
    println!("cargo:rustc-env=FULCRUM_DPDK_LINK={}", if link_static { "static" } else { "dynamic" });
    if link_static {
        // Every library and driver archive (drivers --whole-archive so that their constructors
        // register them), then the system libraries they need: verbatim and in order, as link
        // arguments, which rustc puts after the shim archive.
        for arg in static_args {
            println!("cargo:rustc-link-arg={arg}");
        }
    } else {
        // The EAL loads the PMDs as plugins from the directory compiled into librte_eal.
        pkg_config::Config::new()
            .atleast_version("22.11")
            .probe("libdpdk")
            .unwrap_or_else(|e| panic!("{MISSING}\n({e})"));
    }

    let bindings = bindgen::Builder::default()
        .header("shim/shim.h")
        .clang_args(&cflags)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .prepend_enum_name(false)
        .generate_comments(false)
        .derive_default(true)
        .allowlist_function("fl_.*")
        .allowlist_function("rte_eal_init")
        .allowlist_function("rte_eal_cleanup")
        .allowlist_function("rte_eal_get_runtime_dir")
        .allowlist_function("rte_eth_dev_count_avail")
        .allowlist_function("rte_eth_dev_configure")
        .allowlist_function("rte_eth_dev_adjust_nb_rx_tx_desc")
        .allowlist_function("rte_eth_rx_queue_setup")
        .allowlist_function("rte_eth_tx_queue_setup")
        .allowlist_function("rte_eth_dev_start")
        .allowlist_function("rte_eth_dev_stop")
        .allowlist_function("rte_eth_dev_close")
        .allowlist_function("rte_eth_dev_info_get")
        .allowlist_function("rte_eth_dev_is_valid_port")
        .allowlist_function("rte_eth_dev_socket_id")
        .allowlist_function("rte_eth_macaddr_get")
        .allowlist_function("rte_eth_promiscuous_enable")
        .allowlist_function("rte_eth_stats_get")
        .allowlist_function("rte_eth_dev_get_port_by_name")
        .allowlist_function("rte_eth_dev_get_name_by_port")
        .allowlist_function("rte_eth_link_get_nowait")
        .allowlist_function("rte_pktmbuf_pool_create")
        .allowlist_function("rte_mempool_free")
        .allowlist_function("rte_mempool_avail_count")
        .allowlist_function("rte_socket_id")
        .allowlist_function("rte_strerror")
        .allowlist_function("rte_dev_probe")
        .allowlist_function("rte_thread_register")
        .allowlist_function("rte_thread_unregister")
        .allowlist_type("fl_mbuf_layout")
        .allowlist_type("rte_eth_rx_mq_mode")
        .allowlist_var("RTE_ETH_NAME_MAX_LEN")
        .allowlist_var("RTE_MAX_ETHPORTS")
        // Only ever handled by pointer (mbuf fields are read through the FL_MBUF_OFF_* offsets).
        .opaque_type("rte_mbuf")
        .opaque_type("rte_mempool")
        .opaque_type("rte_device")
        .opaque_type("rte_eth_rxseg_split")
        .generate()
        .expect("fulcrum-dpdk: bindgen failed on shim/shim.h (is libclang-dev installed?)");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("bindings.rs");
    bindings.write_to_file(out).expect("write bindings.rs");
}
