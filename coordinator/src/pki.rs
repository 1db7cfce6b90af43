//! The federation's certificate authority, made with rcgen: the coordinator's server certificate,
//! and client and admin certificates whose subject carries the holder's name (CN), role (OU) and
//! federation (O, copied from the CA's, whose CN is `fedlora federation CA {O}`). Identity, role
//! and federation come only from a certificate the CA signed, never from what a caller says.
//!
//! A CA directory holds:
//! - `ca.pem`: the CA certificate, given to the coordinator, every site and every operator;
//! - `ca.key`: the CA's private key (mode 0600); it never leaves this directory;
//! - `issued/SERIAL.json` and `issued/SERIAL.pem`: a record of every certificate issued.
//!
//! Keys are made where they are used: `issue` writes a new key only into the directory it is told
//! to, and a site that keeps its own key sends a CSR instead and gets back only a certificate.
//! Revocation is by serial number, in the coordinator's store, checked on every call.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};

/// What a certificate lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A site: the `Federation` service only.
    Client,
    /// An operator: the `Admin` service only.
    Admin,
    /// The coordinator's server certificate; never accepted from a caller.
    Coordinator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Admin => "admin",
            Self::Coordinator => "coordinator",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "client" => Some(Self::Client),
            "admin" => Some(Self::Admin),
            "coordinator" => Some(Self::Coordinator),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("certificate authority: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error(
        "invalid name {0:?}: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
    )]
    InvalidName(String),
    #[error("{0} already holds a certificate authority; refusing to overwrite it")]
    AlreadyInitialised(PathBuf),
    #[error("no certificate issued to {0:?} in this certificate authority")]
    UnknownHolder(String),
    #[error("malformed certificate: {0}")]
    Malformed(String),
    #[error("invalid validity: {0}")]
    Validity(String),
    #[error("record {path}: {error}")]
    Record {
        path: PathBuf,
        error: serde_json::Error,
    },
}

pub type Result<T, E = PkiError> = std::result::Result<T, E>;

/// One issued certificate, as recorded in the CA directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedRecord {
    pub name: String,
    pub role: Role,
    /// Lowercase hex, as [`PeerIdentity::serial`].
    pub serial: String,
    /// sha256 of the certificate's DER, lowercase hex.
    pub fingerprint: String,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
    /// Whether the key was made here (`false`: issued from the holder's CSR).
    pub key_made_here: bool,
}

/// A certificate and, when it was made here, its key (PEM).
#[derive(Clone)]
pub struct Issued {
    pub record: IssuedRecord,
    pub cert_pem: String,
    pub key_pem: Option<String>,
}

impl fmt::Debug for Issued {
    // Never print the key.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Issued")
            .field("record", &self.record)
            .field("key_made_here", &self.key_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// What to issue.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    pub name: String,
    pub role: Role,
    /// Validity from now. Negative offsets make certificates that are already expired (tests).
    pub valid_from_secs: i64,
    pub valid_for_secs: i64,
    /// Extra DNS names or IP addresses (coordinator certificates: every name clients dial).
    pub subject_alt_names: Vec<String>,
    /// The holder's CSR (PEM): its public key is certified and no key is made here.
    pub csr_pem: Option<String>,
}

impl IssueRequest {
    /// A certificate for `name` in `role`, valid from a minute ago (clock skew) for `days`.
    pub fn new(name: &str, role: Role, days: u32) -> Self {
        Self {
            name: name.to_string(),
            role,
            valid_from_secs: -60,
            valid_for_secs: i64::from(days) * 86_400,
            subject_alt_names: Vec::new(),
            csr_pem: None,
        }
    }
}

/// Who is calling, read from a certificate the federation's CA signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub name: String,
    pub role: Role,
    /// The federation the certificate was issued for (subject O, copied from the CA's).
    pub federation: String,
    /// Lowercase hex of the serial number (the revocation key).
    pub serial: String,
    pub not_after_unix: i64,
}

/// Checks a holder name (it becomes a CN and a file name; `ca` is the CA certificate's file).
pub fn check_name(name: &str) -> Result<()> {
    let ok = name != "ca"
        && !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(PkiError::InvalidName(name.to_string()))
    }
}

/// A certificate authority in a directory.
#[derive(Debug, Clone)]
pub struct CertificateAuthority {
    dir: PathBuf,
}

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";
const ISSUED: &str = "issued";

impl CertificateAuthority {
    /// Opens the CA in `dir` (made by [`CertificateAuthority::init`]).
    pub fn open(dir: &Path) -> Result<Self> {
        let ca = Self {
            dir: dir.to_path_buf(),
        };
        read(&ca.cert_path())?;
        Ok(ca)
    }

    /// Makes a new CA for `federation` in `dir`, valid for `days`. Refuses to overwrite one.
    pub fn init(dir: &Path, federation: &str, days: u32) -> Result<Self> {
        let ca = Self {
            dir: dir.to_path_buf(),
        };
        if ca.cert_path().exists() || ca.key_path().exists() {
            return Err(PkiError::AlreadyInitialised(dir.to_path_buf()));
        }
        if days == 0 {
            return Err(PkiError::Validity("a ca valid for 0 days".into()));
        }
        create_dir(&dir.join(ISSUED))?;
        #[cfg(unix)]
        {
            // Only the CA's owner may look inside.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(
                |error| PkiError::Io {
                    path: dir.to_path_buf(),
                    error,
                },
            )?;
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, ca_common_name(federation));
        subject.push(DnType::OrganizationName, federation);
        params.distinguished_name = subject;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial());
        params.not_before = at(-60)?;
        params.not_after = at(i64::from(days) * 86_400)?;
        let cert = params.self_signed(&key)?;
        write_private(&ca.key_path(), key.serialize_pem().as_bytes())?;
        write(&ca.cert_path(), cert.pem().as_bytes())?;
        Ok(ca)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(CA_CERT)
    }

    fn key_path(&self) -> PathBuf {
        self.dir.join(CA_KEY)
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> Result<String> {
        read(&self.cert_path())
    }

    /// Issues a certificate and records it. The key, when made here, is returned and not kept.
    pub fn issue(&self, request: &IssueRequest) -> Result<Issued> {
        check_name(&request.name)?;
        if request.valid_for_secs <= 0 {
            return Err(PkiError::Validity(format!(
                "a certificate valid for {} s",
                request.valid_for_secs
            )));
        }
        let ca_key = KeyPair::from_pem(&read(&self.key_path())?)?;
        let ca_pem = self.cert_pem()?;
        let federation = federation_of_pem(&ca_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
        let mut params = CertificateParams::default();
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, request.name.as_str());
        subject.push(DnType::OrganizationalUnitName, request.role.as_str());
        // The CA's federation: a coordinator accepts only its own federation's certificates.
        subject.push(DnType::OrganizationName, federation);
        params.distinguished_name = subject;
        params.serial_number = Some(random_serial());
        params.not_before = at(request.valid_from_secs)?;
        params.not_after = at(request
            .valid_from_secs
            .saturating_add(request.valid_for_secs))?;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        match request.role {
            Role::Coordinator => {
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                let mut names = vec![request.name.clone()];
                names.extend(request.subject_alt_names.iter().cloned());
                for name in names {
                    params.subject_alt_names.push(match name.parse() {
                        Ok(ip) => SanType::IpAddress(ip),
                        Err(_) => SanType::DnsName(name.as_str().try_into()?),
                    });
                }
            }
            Role::Client | Role::Admin => {
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
        }
        let (cert, key_pem) = match &request.csr_pem {
            Some(csr) => {
                // Only the CSR's public key is used: name, role and validity are the CA's.
                let csr = CertificateSigningRequestParams::from_pem(csr)?;
                (params.signed_by(&csr.public_key, &issuer)?, None)
            }
            None => {
                let key = KeyPair::generate()?;
                (params.signed_by(&key, &issuer)?, Some(key.serialize_pem()))
            }
        };
        let serial = params
            .serial_number
            .as_ref()
            .map(|serial| hex_of(serial.as_ref()))
            .unwrap_or_default();
        let record = IssuedRecord {
            name: request.name.clone(),
            role: request.role,
            serial: serial.clone(),
            fingerprint: fedlora_proto::adapter::sha256_hex(cert.der()),
            not_before_unix: params.not_before.unix_timestamp(),
            not_after_unix: params.not_after.unix_timestamp(),
            key_made_here: key_pem.is_some(),
        };
        let issued = self.dir.join(ISSUED);
        create_dir(&issued)?;
        let json = serde_json::to_vec_pretty(&record).map_err(|error| PkiError::Record {
            path: issued.join(format!("{serial}.json")),
            error,
        })?;
        write(&issued.join(format!("{serial}.pem")), cert.pem().as_bytes())?;
        write(&issued.join(format!("{serial}.json")), &json)?;
        Ok(Issued {
            record,
            cert_pem: cert.pem(),
            key_pem,
        })
    }

    /// Every certificate issued, oldest first.
    pub fn list(&self) -> Result<Vec<IssuedRecord>> {
        let issued = self.dir.join(ISSUED);
        let entries = match std::fs::read_dir(&issued) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => {
                return Err(PkiError::Io {
                    path: issued,
                    error,
                });
            }
        };
        let mut records = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(|error| PkiError::Io {
                    path: issued.clone(),
                    error,
                })?
                .path();
            if path.extension().is_some_and(|ext| ext == "json") {
                let text = read(&path)?;
                records.push(
                    serde_json::from_str::<IssuedRecord>(&text)
                        .map_err(|error| PkiError::Record { path, error })?,
                );
            }
        }
        records.sort_by(|a, b| (a.not_before_unix, &a.serial).cmp(&(b.not_before_unix, &b.serial)));
        Ok(records)
    }

    /// The certificates issued to `name` (all of them: rotation leaves several).
    pub fn issued_to(&self, name: &str) -> Result<Vec<IssuedRecord>> {
        let records: Vec<IssuedRecord> = self
            .list()?
            .into_iter()
            .filter(|record| record.name == name)
            .collect();
        if records.is_empty() {
            return Err(PkiError::UnknownHolder(name.to_string()));
        }
        Ok(records)
    }
}

/// Reads name, role, serial and expiry from a certificate's DER. It does not verify the chain:
/// the TLS handshake did that against the federation's CA.
pub fn identify(der: &[u8]) -> Result<PeerIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|error| PkiError::Malformed(error.to_string().to_lowercase()))?;
    let subject = cert.subject();
    let text = |attribute: Option<&x509_parser::x509::AttributeTypeAndValue<'_>>| {
        attribute
            .and_then(|value| value.as_str().ok())
            .map(str::to_string)
    };
    let name = text(subject.iter_common_name().next())
        .ok_or_else(|| PkiError::Malformed("no common name".into()))?;
    let role = text(subject.iter_organizational_unit().next())
        .and_then(|role| Role::parse(&role))
        .ok_or_else(|| PkiError::Malformed(format!("certificate of {name:?} names no role")))?;
    let federation = text(subject.iter_organization().next()).ok_or_else(|| {
        PkiError::Malformed(format!("certificate of {name:?} names no federation"))
    })?;
    Ok(PeerIdentity {
        name,
        role,
        federation,
        serial: hex_of(cert.raw_serial()),
        not_after_unix: cert.validity().not_after.timestamp(),
    })
}

/// The federation a CA certificate (PEM) was made for; see [`ca_federation`].
pub fn federation_of_pem(pem: &str) -> Result<String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|error| PkiError::Malformed(error.to_string().to_lowercase()))?;
    ca_federation(&pem.contents)?.ok_or_else(|| {
        PkiError::Malformed("the ca certificate was not made for a federation".into())
    })
}

/// The federation a CA certificate (DER) was made for by `fedlora ca init`: subject O, when
/// the CN agrees (`fedlora federation CA {O}`). `None` for other CAs, and for CAs made before
/// certificates named their federation (their O was always "fedlora").
pub fn ca_federation(der: &[u8]) -> Result<Option<String>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|error| PkiError::Malformed(error.to_string().to_lowercase()))?;
    let subject = cert.subject();
    let organization = subject
        .iter_organization()
        .next()
        .and_then(|value| value.as_str().ok());
    let common_name = subject
        .iter_common_name()
        .next()
        .and_then(|value| value.as_str().ok());
    Ok(match (organization, common_name) {
        (Some(federation), Some(cn)) if cn == ca_common_name(federation) => {
            Some(federation.to_string())
        }
        _ => None,
    })
}

fn ca_common_name(federation: &str) -> String {
    format!("fedlora federation CA {federation}")
}

/// The subject common name of a CA-less DER certificate, for messages.
pub fn describe(der: &[u8]) -> String {
    identify(der).map_or_else(
        |_| "an unreadable certificate".into(),
        |identity| format!("{} certificate of {:?}", identity.role, identity.name),
    )
}

fn hex_of(bytes: &[u8]) -> String {
    // Leading zero bytes are not part of the number (DER may add one to keep it positive).
    let start = bytes
        .iter()
        .position(|byte| *byte != 0)
        .unwrap_or(bytes.len());
    let digits: String = bytes[start..]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    if digits.is_empty() {
        "0".into()
    } else {
        digits
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive, and 16 significant bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// Now plus `offset_secs`, refusing dates X.509 cannot hold.
fn at(offset_secs: i64) -> Result<time::OffsetDateTime> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs() as i64;
    let date = time::OffsetDateTime::from_unix_timestamp(now.saturating_add(offset_secs))
        .map_err(|error| PkiError::Validity(error.to_string().to_lowercase()))?;
    if date.year() > 9999 {
        return Err(PkiError::Validity(format!(
            "{} days is too long",
            offset_secs / 86_400
        )));
    }
    Ok(date)
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|error| PkiError::Io {
        path: path.to_path_buf(),
        error,
    })
}

fn create_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|error| PkiError::Io {
        path: path.to_path_buf(),
        error,
    })
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|error| PkiError::Io {
        path: path.to_path_buf(),
        error,
    })
}

/// Writes a private key readable by its owner only (created with mode 0600, never widened).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let io = |error| PkiError::Io {
        path: path.to_path_buf(),
        error,
    };
    let mut file = options.open(path).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn issues_and_reads_back_identities() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::init(dir.path(), "test", 30).unwrap();
        assert!(matches!(
            CertificateAuthority::init(dir.path(), "test", 30),
            Err(PkiError::AlreadyInitialised(_))
        ));
        let clinic = ca
            .issue(&IssueRequest::new("clinic-1", Role::Client, 10))
            .unwrap();
        assert!(clinic.key_pem.is_some());
        let der = pem_der(&clinic.cert_pem);
        let identity = identify(&der).unwrap();
        assert_eq!(identity.name, "clinic-1");
        assert_eq!(identity.role, Role::Client);
        assert_eq!(identity.federation, "test");
        assert_eq!(federation_of_pem(&ca.cert_pem().unwrap()).unwrap(), "test");
        assert_eq!(identity.serial, clinic.record.serial);
        assert_eq!(identity.serial.len(), 32);
        assert!(identity.not_after_unix - clinic.record.not_before_unix > 9 * 86_400);

        // A site that keeps its key sends a CSR; name and role are still the CA's.
        let site_key = KeyPair::generate().unwrap();
        let mut csr_params = CertificateParams::default();
        csr_params
            .distinguished_name
            .push(DnType::CommonName, "someone-else");
        let csr = csr_params
            .serialize_request(&site_key)
            .unwrap()
            .pem()
            .unwrap();
        let request = IssueRequest {
            csr_pem: Some(csr),
            ..IssueRequest::new("bank", Role::Admin, 10)
        };
        let bank = ca.issue(&request).unwrap();
        assert!(bank.key_pem.is_none());
        assert!(!bank.record.key_made_here);
        let identity = identify(&pem_der(&bank.cert_pem)).unwrap();
        assert_eq!(
            (identity.name.as_str(), identity.role),
            ("bank", Role::Admin)
        );

        let listed = ca.list().unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(ca.issued_to("bank").unwrap(), [bank.record]);
        assert!(matches!(
            ca.issued_to("nobody"),
            Err(PkiError::UnknownHolder(_))
        ));
        assert!(matches!(
            ca.issue(&IssueRequest::new("../etc", Role::Client, 1)),
            Err(PkiError::InvalidName(_))
        ));
        assert!(matches!(
            ca.issue(&IssueRequest::new("ca", Role::Client, 1)),
            Err(PkiError::InvalidName(_))
        ));
        assert!(matches!(
            ca.issue(&IssueRequest::new("zero", Role::Client, 0)),
            Err(PkiError::Validity(_))
        ));
        assert!(matches!(
            ca.issue(&IssueRequest::new("forever", Role::Client, u32::MAX)),
            Err(PkiError::Validity(_))
        ));
        assert!(!format!("{clinic:?}").contains("PRIVATE KEY"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(CA_KEY))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    fn pem_der(pem: &str) -> Vec<u8> {
        let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        parsed.contents
    }
}
