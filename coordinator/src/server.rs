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

use crate::grpc::{AdminService, FederationService};
use crate::rounds::Coordinator;

/// How connections are secured.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerTransport {
    /// Plaintext HTTP/2. Only ever chosen explicitly (`--insecure`); mutual TLS replaces it.
    Insecure,
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
    match transport {
        ServerTransport::Insecure if local.is_some_and(|addr| addr.ip().is_loopback()) => {
            info!(addr = ?local, "serving plaintext grpc on loopback (--insecure)");
        }
        ServerTransport::Insecure => {
            warn!(addr = ?local, "serving plaintext grpc (--insecure): no transport security");
        }
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
    info!(addr = ?local, federation = %coordinator.config().name, "coordinator listening");
    let result = tonic::transport::Server::builder()
        .add_service(FederationServer::new(FederationService::new(
            coordinator.clone(),
        )))
        .add_service(AdminServer::new(AdminService::new(coordinator)))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    ticker.abort();
    info!("coordinator stopped");
    Ok(result?)
}

/// A coordinator serving on a background task, for embedding (the demo, tests).
pub struct RunningServer {
    pub addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl RunningServer {
    /// `http://ADDR`, for clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
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
    let (listener, addr) = bind(addr).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(coordinator, listener, transport, async move {
        let _ = stopped.await;
    }));
    Ok(RunningServer { addr, stop, task })
}
