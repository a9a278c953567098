//! Mutual TLS on the internal gRPC port. Every node holds a certificate of
//! the cluster's CA and presents it both as a server and as a client; a node
//! accepts a connection only from a certificate of that CA, and trusts a
//! server only if its certificate names [`SERVER_NAME`] and comes from that
//! CA. The CLI's admin calls present such a certificate too.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// The name every node certificate carries (a DNS subject alternative
/// name), whatever address the node is reached at: membership is proved by
/// the CA's signature, not by a host name.
pub const SERVER_NAME: &str = "kinesin-node";

/// Longest a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The cluster CA and this process's certificate and key (PEM).
#[derive(Clone)]
pub struct InternalTls {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl InternalTls {
    /// Reads and checks the three PEM files: the key belongs to the
    /// certificate, and the certificate is one of the CA's, valid now,
    /// naming [`SERVER_NAME`] and allowed for both server and client use.
    /// A node that would be cut off from its peers is refused at start-up.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<InternalTls, String> {
        let read = |what: &str, path: &Path| {
            std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
        };
        let tls = InternalTls {
            ca: read("internal TLS CA", ca)?,
            cert: read("internal TLS certificate", cert)?,
            key: read("internal TLS key", key)?,
        };
        let certs = |what: &str, path: &Path, pem: &[u8]| {
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("internal TLS {what} {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "internal TLS {what} {} holds no PEM certificate",
                    path.display()
                ));
            }
            Ok(certs)
        };
        let roots = certs("CA", ca, &tls.ca)?;
        let chain = certs("certificate", cert, &tls.cert)?;
        let private_key = PrivateKeyDer::from_pem_slice(&tls.key)
            .map_err(|e| format!("internal TLS key {}: {e}", key.display()))?;
        check_certificate(roots, chain, private_key)
            .map_err(|e| format!("internal TLS certificate {}: {e}", cert.display()))?;
        Ok(tls)
    }

    /// The server side: this node's certificate, and a client certificate
    /// of the cluster CA required from every caller.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
            .client_auth_optional(false)
            .timeout(HANDSHAKE_TIMEOUT)
    }

    fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
            .domain_name(SERVER_NAME)
            .timeout(HANDSHAKE_TIMEOUT)
    }
}

/// Does the chain's first certificate belong to the key, come from one of
/// `roots`, and name [`SERVER_NAME`] for server and client use?
fn check_certificate(
    roots: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<(), rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    CertifiedKey::from_der(chain.clone(), key, &provider)?;
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(root)?;
    }
    let store = Arc::new(store);
    let (end_entity, intermediates) = chain.split_first().expect("a checked, non-empty chain");
    let name = ServerName::try_from(SERVER_NAME).expect("a valid DNS name");
    let now = UnixTime::now();
    WebPkiServerVerifier::builder_with_provider(store.clone(), provider.clone())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?
        .verify_server_cert(end_entity, intermediates, &name, &[], now)?;
    WebPkiClientVerifier::builder_with_provider(store, provider)
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?
        .verify_client_cert(end_entity, intermediates, now)?;
    Ok(())
}

/// How this process dials the internal port of a node: plaintext, or
/// mutual TLS with the cluster's certificates.
#[derive(Clone, Default)]
pub struct Dialer {
    tls: Option<InternalTls>,
}

impl Dialer {
    pub fn plaintext() -> Dialer {
        Dialer { tls: None }
    }

    pub fn tls(tls: InternalTls) -> Dialer {
        Dialer { tls: Some(tls) }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// An endpoint for `addr` (`host:port`), not yet connected.
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint, String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| format!("node address {addr:?} is not usable: {e}"))?;
        match &self.tls {
            Some(tls) => endpoint
                .tls_config(tls.client_config())
                .map_err(|e| format!("internal TLS for {addr}: {e}")),
            None => Ok(endpoint),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::InternalTls;
    use std::path::PathBuf;

    /// Found from the package directory the test runner names: a test
    /// binary built from another checkout that shares the target directory
    /// (as CI's clones do) would look in that checkout.
    fn fixture(name: &str) -> PathBuf {
        std::env::var_os("CARGO_MANIFEST_DIR")
            .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
            .join("../../tests/fixtures/internal-tls")
            .join(name)
    }

    /// Certificates that would cut a node off from its peers are refused
    /// when loaded, naming what is wrong.
    #[test]
    fn only_a_matching_certificate_of_the_ca_loads() {
        let load = |ca: &str, cert: &str, key: &str| {
            InternalTls::load(&fixture(ca), &fixture(cert), &fixture(key)).map(|_| ())
        };
        assert_eq!(load("ca.crt", "node.crt", "node.key"), Ok(()));
        let other_ca = load("ca.crt", "rogue.crt", "rogue.key").unwrap_err();
        assert!(other_ca.contains("rogue.crt"), "{other_ca}");
        let wrong_key = load("ca.crt", "node.crt", "rogue.key").unwrap_err();
        assert!(wrong_key.contains("node.crt"), "{wrong_key}");
        let not_pem = load("ca.crt", "README.md", "node.key").unwrap_err();
        assert!(not_pem.contains("README.md"), "{not_pem}");
    }
}
