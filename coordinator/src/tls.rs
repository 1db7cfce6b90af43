//! The coordinator's TLS acceptor: TLS 1.3 only (rustls with ring), the coordinator's certificate,
//! and a client certificate required and verified against the federation's CA during the
//! handshake (chain, expiry, client-auth usage). Handshakes run on their own tasks with a
//! deadline, so a slow or silent peer holds up nobody, and at most `max_connections` connections
//! are open at once. A missing or failing certificate ends the handshake, which is logged and
//! audited (at a bounded rate per address); other failed handshakes, such as TCP probes, are
//! only logged. No connection without a verified certificate ever reaches the services.
//!
//! Each accepted connection carries a [`PeerInfo`] that tonic puts into every request's
//! extensions; the services read the caller's identity from it (see `grpc.rs`).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tracing::{debug, warn};

/// Longest a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("{what}: no pem {kind} found")]
    MissingPem { what: String, kind: &'static str },
    #[error("{what}: {error}")]
    Pem {
        what: String,
        error: rustls::pki_types::pem::Error,
    },
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error(
        "the trusted ca certificate was made for federation {ca:?}, but this coordinator serves {federation:?}: give --ca-cert the ca.pem of {federation:?}'s ca (`fedlora ca init --federation {federation}`)"
    )]
    CaOfAnotherFederation { ca: String, federation: String },
    #[error(
        "the trusted ca certificate was not made for a federation (a ca from before certificates named their federation, or not made by `fedlora ca init`): make a new ca with `fedlora ca init --dir NEW_DIR --federation {federation}` and issue every certificate again from it"
    )]
    CaOfNoFederation { federation: String },
}

/// The coordinator's side of mutual TLS.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
    /// The federation each trusted CA certificate was made for (`None`: not made for one).
    federations: Vec<Option<String>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("ServerTls")
    }
}

impl ServerTls {
    /// From PEM text: the federation's CA certificate, the coordinator's certificate (chain) and
    /// its private key.
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        let mut federations = Vec::new();
        for ca in certificates(ca_pem, "federation ca certificate")? {
            federations.push(crate::pki::ca_federation(&ca).ok().flatten());
            roots.add(ca)?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|error| TlsError::Pem {
                what: "coordinator key".into(),
                error,
            })?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certificates(cert_pem, "coordinator certificate")?, key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            federations,
        })
    }

    /// Checks that every trusted CA was made for `federation` (`fedlora ca init --federation`),
    /// so that no certificate of another federation passes the handshake. Calls check each
    /// certificate's own federation as well.
    pub fn check_federation(&self, federation: &str) -> Result<(), TlsError> {
        for made_for in &self.federations {
            match made_for {
                Some(name) if name == federation => {}
                Some(name) => {
                    return Err(TlsError::CaOfAnotherFederation {
                        ca: name.clone(),
                        federation: federation.to_string(),
                    });
                }
                None => {
                    return Err(TlsError::CaOfNoFederation {
                        federation: federation.to_string(),
                    });
                }
            }
        }
        Ok(())
    }
}

fn certificates(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::Pem {
            what: what.into(),
            error,
        })?;
    if certs.is_empty() {
        return Err(TlsError::MissingPem {
            what: what.into(),
            kind: "certificate",
        });
    }
    Ok(certs)
}

/// What the coordinator knows about a connection: its address and the client certificate the
/// handshake verified, if one was presented.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    /// DER of the leaf certificate.
    pub certificate: Option<Arc<Vec<u8>>>,
}

/// An accepted TLS connection.
pub struct TlsConnection {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
    /// Held while the connection is open.
    _slot: OwnedSemaphorePermit,
}

impl Connected for TlsConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Whether a handshake failed on the client's certificate (wrong CA, expired, wrong usage).
fn refused_certificate(error: &io::Error) -> bool {
    error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|error| {
            matches!(
                error,
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented
                    | rustls::Error::InvalidCertRevocationList(_)
            )
        })
}

/// Called for each handshake refused over its client certificate: the peer's address and why.
pub type OnRefused = Arc<dyn Fn(Option<SocketAddr>, String) + Send + Sync>;

/// Accepts TCP connections on `listener` and completes their TLS handshakes concurrently; the
/// stream yields the connections that succeeded. Accepting stops when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: &ServerTls,
    max_connections: usize,
    on_refused: OnRefused,
) -> ReceiverStream<io::Result<TlsConnection>> {
    let acceptor = TlsAcceptor::from(tls.config.clone());
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    let (sender, receiver) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            // A free slot first: with all taken, new connections wait in the listen backlog.
            let slot = tokio::select! {
                () = sender.closed() => return,
                slot = slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => return,
                },
            };
            let accepted = tokio::select! {
                () = sender.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, remote) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let sender = sender.clone();
            let on_refused = on_refused.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let certificate = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .map(|leaf| Arc::new(leaf.as_ref().to_vec()));
                        debug!(%remote, with_certificate = certificate.is_some(), "tls connection");
                        let connection = TlsConnection {
                            stream,
                            info: PeerInfo {
                                remote: Some(remote),
                                certificate,
                            },
                            _slot: slot,
                        };
                        let _ = sender.send(Ok(connection)).await;
                    }
                    Ok(Err(error)) => {
                        let reason =
                            format!("tls handshake failed: {}", error.to_string().to_lowercase());
                        if refused_certificate(&error) {
                            warn!(%remote, %reason, "client certificate refused");
                            on_refused(Some(remote), reason);
                        } else {
                            // Probes and plaintext callers: logged, not audited, so that a
                            // load balancer's TCP checks do not fill the audit log.
                            debug!(%remote, %reason, "connection closed during handshake");
                        }
                    }
                    Err(_) => {
                        debug!(%remote, "tls handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(receiver)
}
