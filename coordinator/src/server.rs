//! Running the coordinator: the gRPC server on a TCP listener, the deadline ticker, and graceful
//! shutdown. Transport security is decided here, in one place.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedlora_proto::v1::admin_server::AdminServer;
use fedlora_proto::v1::federation_server::FederationServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{info, warn};

use crate::grpc::{AdminService, Authentication, FederationService};
use crate::rounds::Coordinator;
use crate::tls::{self, ServerTls, TlsError};

/// How connections are secured.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ServerTransport {
    /// Plaintext HTTP/2, for loopback only: only ever chosen explicitly (`--insecure`), and
    /// refused on any other address. No caller has an identity.
    Insecure,
    /// TLS 1.3 with client certificates of the federation's CA (see [`crate::tls`]).
    MutualTls(ServerTls),
}

impl ServerTransport {
    /// `http` or `https`.
    pub fn scheme(&self) -> &'static str {
        match self {
            Self::Insecure => "http",
            Self::MutualTls(_) => "https",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The OS error is in the message and not a `source`, so that chains print it once.
    #[error("cannot bind {addr}: {error}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("grpc server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("server task failed: {0}")]
    Task(String),
    #[error(
        "refusing plaintext grpc on {0}: --insecure binds only to loopback (127.0.0.1 or ::1); use mutual tls elsewhere"
    )]
    InsecureNotLoopback(SocketAddr),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Binds `addr` (port 0 picks a free port) and returns the listener and its actual address.
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|error| ServeError::Bind { addr, error })?;
    let local = listener
        .local_addr()
        .map_err(|error| ServeError::Bind { addr, error })?;
    Ok((listener, local))
}

/// Serves both services on `listener` until `shutdown` resolves, then drains in-flight calls.
/// A background task enforces round deadlines once a second.
pub async fn serve(
    coordinator: Arc<Coordinator>,
    listener: TcpListener,
    transport: ServerTransport,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let local = listener.local_addr().ok();
    if let ServerTransport::Insecure = transport {
        match local {
            Some(addr) if addr.ip().is_loopback() => {
                info!(%addr, "serving plaintext grpc on loopback (--insecure)");
            }
            Some(addr) => return Err(ServeError::InsecureNotLoopback(addr)),
            None => {
                return Err(ServeError::Task("the listener has no local address".into()));
            }
        }
    }
    if let ServerTransport::MutualTls(tls) = &transport {
        tls.check_federation(&coordinator.config().name)?;
    }
    let ticker = {
        let coordinator = coordinator.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_secs(1));
            loop {
                interval.tick().await;
                if let Err(error) = coordinator.tick().await {
                    warn!(%error, "deadline check failed");
                }
            }
        })
    };
    info!(addr = ?local, federation = %coordinator.config().name, scheme = transport.scheme(), "coordinator listening");
    let mode = match transport {
        ServerTransport::Insecure => Authentication::InsecureLoopback,
        ServerTransport::MutualTls(_) => Authentication::MutualTls,
    };
    let max_message = coordinator.limits().max_message_bytes;
    let router = tonic::transport::Server::builder()
        // Notice peers that vanished, and let no connection live forever: a revoked or expired
        // certificate is also refused per call, but a fresh handshake re-checks the chain.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_connection_age(Duration::from_secs(3600))
        .add_service(
            FederationServer::new(FederationService::new(coordinator.clone(), mode))
                .max_decoding_message_size(max_message),
        )
        .add_service(
            AdminServer::new(AdminService::new(coordinator.clone(), mode))
                .max_decoding_message_size(max_message),
        );
    let result = match transport {
        ServerTransport::Insecure => {
            router
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
                .await
        }
        ServerTransport::MutualTls(tls) => {
            let handle = tokio::runtime::Handle::current();
            let auditor = coordinator.clone();
            let on_refused: tls::OnRefused = Arc::new(move |remote, reason| {
                let auditor = auditor.clone();
                handle
                    .spawn(async move { auditor.audit_connection_refused(remote, &reason).await });
            });
            router
                .serve_with_incoming_shutdown(
                    tls::incoming(
                        listener,
                        &tls,
                        coordinator.limits().max_connections,
                        on_refused,
                    ),
                    shutdown,
                )
                .await
        }
    };
    ticker.abort();
    info!("coordinator stopped");
    Ok(result?)
}

/// A coordinator serving on a background task, for embedding (the demo, tests).
pub struct RunningServer {
    pub addr: SocketAddr,
    scheme: &'static str,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl RunningServer {
    /// `http://ADDR` or `https://ADDR`, for clients.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Stops accepting calls, drains the ones in flight, and waits for the server to end.
    pub async fn stop(self) -> Result<(), ServeError> {
        let _ = self.stop.send(());
        self.task
            .await
            .map_err(|error| ServeError::Task(error.to_string()))?
    }
}

/// Binds `addr` and serves on a background task until [`RunningServer::stop`].
pub async fn spawn(
    coordinator: Arc<Coordinator>,
    addr: SocketAddr,
    transport: ServerTransport,
) -> Result<RunningServer, ServeError> {
    if let ServerTransport::MutualTls(tls) = &transport {
        tls.check_federation(&coordinator.config().name)?;
    }
    let (listener, addr) = bind(addr).await?;
    let scheme = transport.scheme();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(coordinator, listener, transport, async move {
        let _ = stopped.await;
    }));
    Ok(RunningServer {
        addr,
        scheme,
        stop,
        task,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
    use super::*;
    use crate::config::FederationConfig;

    /// A coordinator of the default federation on an in-memory store.
    async fn default_coordinator() -> Arc<Coordinator> {
        let store = crate::store::connect("sqlite::memory:").await.unwrap();
        Coordinator::start(store, FederationConfig::default())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn plaintext_is_refused_off_loopback() {
        let coordinator = default_coordinator().await;
        let (listener, _) = bind(([0, 0, 0, 0], 0).into()).await.unwrap();
        let served = serve(
            coordinator,
            listener,
            ServerTransport::Insecure,
            std::future::pending(),
        )
        .await;
        assert!(
            matches!(served, Err(ServeError::InsecureNotLoopback(_))),
            "{served:?}"
        );
    }

    #[tokio::test]
    async fn a_ca_made_for_another_federation_is_refused_at_start() {
        let coordinator = default_coordinator().await;
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::pki::CertificateAuthority::init(dir.path(), "other", 30).unwrap();
        let issued = ca
            .issue(&crate::pki::IssueRequest::new(
                "localhost",
                crate::pki::Role::Coordinator,
                5,
            ))
            .unwrap();
        let issued_key = issued.key_pem.clone().unwrap();
        let tls =
            ServerTls::from_pem(&ca.cert_pem().unwrap(), &issued.cert_pem, &issued_key).unwrap();
        tls.check_federation("other").unwrap();
        let (listener, _) = bind(([127, 0, 0, 1], 0).into()).await.unwrap();
        let served = tokio::time::timeout(
            Duration::from_secs(10),
            serve(
                coordinator,
                listener,
                ServerTransport::MutualTls(tls),
                std::future::pending(),
            ),
        )
        .await
        .expect("refused at once");
        let error = served.unwrap_err().to_string();
        assert!(
            error
                .contains("made for federation \"other\", but this coordinator serves \"default\""),
            "{error}"
        );
        // A CA that names no federation of its own (made elsewhere, or before certificates named
        // their federation, when every CA's O was "fedlora").
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fedlora federation CA radiology");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "fedlora");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let old_key = rcgen::KeyPair::generate().unwrap();
        let old_ca = params.self_signed(&old_key).unwrap();
        let both = format!("{}{}", ca.cert_pem().unwrap(), old_ca.pem());
        let tls = ServerTls::from_pem(&both, &issued.cert_pem, &issued_key).unwrap();
        let error = tls.check_federation("other").unwrap_err().to_string();
        assert!(error.contains("was not made for a federation"), "{error}");
        assert!(
            error.contains("fedlora ca init --dir NEW_DIR --federation other"),
            "{error}"
        );
    }
}
