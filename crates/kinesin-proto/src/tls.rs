//! Mutual TLS on the internal gRPC port. Every node holds a certificate of
//! the cluster's CA and presents it both as a server and as a client; a node
//! accepts a connection only from a certificate of that CA, and trusts a
//! server only if its certificate names [`SERVER_NAME`] and comes from that
//! CA. The CLI's admin calls present such a certificate too.

use std::path::Path;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
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
    /// Reads and checks the three PEM files: at least one CA certificate,
    /// at least one certificate, and a private key.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<InternalTls, String> {
        let read = |what: &str, path: &Path| {
            std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
        };
        let tls = InternalTls {
            ca: read("internal TLS CA", ca)?,
            cert: read("internal TLS certificate", cert)?,
            key: read("internal TLS key", key)?,
        };
        for (what, path, pem) in [("CA", ca, &tls.ca), ("certificate", cert, &tls.cert)] {
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("internal TLS {what} {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "internal TLS {what} {} holds no PEM certificate",
                    path.display()
                ));
            }
        }
        PrivateKeyDer::from_pem_slice(&tls.key)
            .map_err(|e| format!("internal TLS key {}: {e}", key.display()))?;
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
