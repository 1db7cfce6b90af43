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

    /// Why this certificate is not valid at `now` by this machine's clock (expired, or not yet
    /// valid), or `None` when it is valid or unreadable (the handshake then says more).
    pub fn lapsed(&self, now: std::time::SystemTime) -> Option<String> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(self.cert_pem.as_bytes()).ok()?;
        let cert = pem.parse_x509().ok()?;
        let now = now.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs() as i64;
        let validity = cert.validity();
        if now > validity.not_after.timestamp() {
            return Some(format!("it expired on {}", validity.not_after));
        }
        if now < validity.not_before.timestamp() {
            return Some(format!(
                "it is not valid before {} (check this machine's clock)",
                validity.not_before
            ));
        }
        None
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

/// Alerts that refuse the caller's own certificate: none sent, another CA's, expired, revoked,
/// not for client use, or a key that does not match it.
const CERTIFICATE_ALERTS: [rustls::AlertDescription; 9] = {
    use rustls::AlertDescription as Alert;
    [
        Alert::CertificateRequired,
        Alert::BadCertificate,
        Alert::UnsupportedCertificate,
        Alert::CertificateRevoked,
        Alert::CertificateExpired,
        Alert::CertificateUnknown,
        Alert::UnknownCA,
        Alert::AccessDenied,
        Alert::DecryptError,
    ]
};

/// The TLS alert with which the coordinator refused the caller's own certificate, when that is
/// what `error` (a failed connect or call, with its sources) comes down to. It is a hint, not
/// proof: the coordinator may trust the wrong CA or have a wrong clock, and an alert sent before
/// the handshake is encrypted can be forged by anyone on the path. Problems with the
/// coordinator's certificate as this side sees it are not included.
pub fn refused_certificate(
    error: &(dyn std::error::Error + 'static),
) -> Option<rustls::AlertDescription> {
    let mut next = Some(error);
    while let Some(current) = next {
        if let Some(alert) =
            received_alert(current).filter(|alert| CERTIFICATE_ALERTS.contains(alert))
        {
            return Some(alert);
        }
        next = current.source();
    }
    None
}

/// The fatal alert `error` itself reports having received.
fn received_alert(error: &(dyn std::error::Error + 'static)) -> Option<rustls::AlertDescription> {
    if let Some(rustls::Error::AlertReceived(alert)) = error.downcast_ref::<rustls::Error>() {
        return Some(*alert);
    }
    // tokio-rustls wraps rustls' error in an io::Error, but h2 keeps only an io error's kind and
    // text (`h2::proto::Error::Io`), so on a call the alert comes back as rustls' text:
    // "received fatal alert: {alert:?}".
    let io = error.downcast_ref::<std::io::Error>()?;
    if let Some(rustls::Error::AlertReceived(alert)) = io
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        return Some(*alert);
    }
    if io.kind() != std::io::ErrorKind::InvalidData {
        return None;
    }
    let text = io.to_string();
    let name = text.strip_prefix("received fatal alert: ")?;
    CERTIFICATE_ALERTS
        .into_iter()
        .find(|alert| format!("{alert:?}") == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("call failed")]
    struct Wrapper(#[source] std::io::Error);

    #[test]
    fn finds_certificate_alerts_behind_io_errors_only() {
        let refused = Wrapper(std::io::Error::other(rustls::Error::AlertReceived(
            rustls::AlertDescription::UnknownCA,
        )));
        assert_eq!(
            refused_certificate(&refused),
            Some(rustls::AlertDescription::UnknownCA)
        );
        let other_alert = Wrapper(std::io::Error::other(rustls::Error::AlertReceived(
            rustls::AlertDescription::ProtocolVersion,
        )));
        assert_eq!(refused_certificate(&other_alert), None);
        // The coordinator's certificate failing our check is not the caller's to mend.
        let theirs = rustls::Error::InvalidCertificate(rustls::CertificateError::Expired);
        assert_eq!(refused_certificate(&theirs), None);
        // What h2 hands back: the io error's kind and text only.
        let through_h2 = Wrapper(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "received fatal alert: CertificateExpired",
        ));
        assert_eq!(
            refused_certificate(&through_h2),
            Some(rustls::AlertDescription::CertificateExpired)
        );
        let plain = Wrapper(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(refused_certificate(&plain), None);
    }
}
