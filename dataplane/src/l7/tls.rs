//! TLS for the L7 proxy: rustls 0.23 with aws-lc-rs, built from the certificates of the TLS
//! Secrets our Ingresses name. A certificate is chosen by SNI (exact host, then a one-label
//! wildcard), else the default (the first certificate in precedence order); TLS 1.3 and 1.2;
//! ALPN `http/1.1`; resumption by tickets and by a session cache, both shared by every config
//! built in this process, so that a new snapshot (a Secret changed) keeps resumption working.
//! Each connection holds the config it started with: a Secret change applies to new
//! handshakes and never disturbs open connections.

use ahash::AHashMap;
use fulcrum_config::ingress::{HostMatch, L7Certificate};
use rustls::crypto::aws_lc_rs;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache, StoresServerSessions};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use std::sync::{Arc, OnceLock};

/// Picks a certificate by SNI.
#[derive(Debug, Default)]
struct ByName {
    exact: AHashMap<String, Arc<CertifiedKey>>,
    /// Keyed by what follows `*.`.
    wildcard: AHashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ByName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else { return self.default.clone() };
        let name = name.to_ascii_lowercase();
        if let Some(c) = self.exact.get(&name) {
            return Some(c.clone());
        }
        if let Some(dot) = name.find('.').filter(|&d| d > 0) {
            if let Some(c) = self.wildcard.get(&name[dot + 1..]) {
                return Some(c.clone());
            }
        }
        self.default.clone()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static P: OnceLock<Arc<rustls::crypto::CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(aws_lc_rs::default_provider())).clone()
}

/// One ticket key rotation and one session cache for the process: resumption survives config
/// rebuilds.
fn ticketer() -> Option<Arc<dyn rustls::server::ProducesTickets>> {
    static T: OnceLock<Option<Arc<dyn rustls::server::ProducesTickets>>> = OnceLock::new();
    T.get_or_init(|| aws_lc_rs::Ticketer::new().ok()).clone()
}

fn session_cache() -> Arc<dyn StoresServerSessions> {
    static C: OnceLock<Arc<dyn StoresServerSessions>> = OnceLock::new();
    C.get_or_init(|| ServerSessionMemoryCache::new(16 * 1024)).clone()
}

/// A certificate chain and key from PEM.
fn certified_key(c: &L7Certificate) -> Result<Arc<CertifiedKey>, String> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&c.cert_pem).collect::<Result<_, _>>().map_err(|e| format!("tls.crt: {e}"))?;
    if chain.is_empty() {
        return Err("tls.crt holds no certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(&c.key_pem).map_err(|e| format!("tls.key: {e}"))?;
    let signing = provider().key_provider.load_private_key(key).map_err(|e| format!("tls.key: {e}"))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(|e| format!("tls.crt and tls.key do not match: {e}"))?;
    Ok(Arc::new(ck))
}

/// The server config for these certificates; None without any usable one. Certificates that
/// do not load are reported in the returned warnings and left out.
pub fn server_config(certs: &[L7Certificate]) -> (Option<Arc<ServerConfig>>, Vec<String>) {
    let mut warnings = Vec::new();
    let mut by = ByName::default();
    for c in certs {
        let ck = match certified_key(c) {
            Ok(k) => k,
            Err(e) => {
                warnings.push(format!("Secret {}: {e}; not used", c.secret));
                continue;
            }
        };
        for h in &c.hosts {
            match h {
                HostMatch::Exact(n) => {
                    by.exact.entry(n.clone()).or_insert_with(|| ck.clone());
                }
                HostMatch::Wildcard(n) => {
                    by.wildcard.entry(n.clone()).or_insert_with(|| ck.clone());
                }
                HostMatch::Any => {}
            }
        }
        by.default.get_or_insert(ck);
    }
    if by.default.is_none() {
        return (None, warnings);
    }
    let builder = match ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    {
        Ok(b) => b,
        Err(e) => {
            warnings.push(format!("TLS: {e}"));
            return (None, warnings);
        }
    };
    let mut cfg = builder.with_no_client_auth().with_cert_resolver(Arc::new(by));
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.session_storage = session_cache();
    if let Some(t) = ticketer() {
        cfg.ticketer = t;
        cfg.send_tls13_tickets = 2;
    }
    (Some(Arc::new(cfg)), warnings)
}
