//! The calling side of mutual TLS, shared by the client daemon and the operator CLI: the
//! federation's CA certificate (to check the coordinator) and the caller's own certificate and key
//! (to prove who it is). The coordinator accepts TLS 1.3 only.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientTlsError {
    #[error("{path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: not a pem {what}")]
    NotPem { path: PathBuf, what: &'static str },
    #[error("coordinator address {0:?}: mutual tls needs an https:// address")]
    NotHttps(String),
    #[error("tls configuration: {0}")]
    Config(#[from] tonic::transport::Error),
}

/// PEM text of the federation's CA certificate and of the caller's certificate and key.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for ClientTls {
    // Never print the key.
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("ClientTls { .. }")
    }
}

impl ClientTls {
    /// Reads the three PEM files.
    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, ClientTlsError> {
        let read = |path: &Path, what: &'static str| {
            let text = std::fs::read_to_string(path).map_err(|error| ClientTlsError::Read {
                path: path.to_path_buf(),
                error,
            })?;
            if !text.contains("-----BEGIN ") {
                return Err(ClientTlsError::NotPem {
                    path: path.to_path_buf(),
                    what,
                });
            }
            Ok(text)
        };
        Ok(Self {
            ca_pem: read(ca, "certificate")?,
            cert_pem: read(cert, "certificate")?,
            key_pem: read(key, "private key")?,
        })
    }

    /// `endpoint` set up to verify the coordinator against the CA and to present this
    /// certificate. The coordinator's certificate must name the address's host.
    pub fn configure(&self, url: &str, endpoint: Endpoint) -> Result<Endpoint, ClientTlsError> {
        if !url.starts_with("https://") {
            return Err(ClientTlsError::NotHttps(url.to_string()));
        }
        Ok(endpoint.tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&self.ca_pem))
                .identity(Identity::from_pem(&self.cert_pem, &self.key_pem)),
        )?)
    }
}
