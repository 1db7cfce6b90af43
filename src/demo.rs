//! `fedlora demo`: a whole federation on one machine. A coordinator on the embedded store and one
//! client daemon per site talk real gRPC over loopback; each site trains on its own synthetic
//! text; the held-out loss of every global adapter is printed per site at the end.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fedlora_client::daemon::{self, BasePrecision, ClientTransport, DaemonConfig, DaemonEvent};
use fedlora_client::tiny::{TinyModelSpec, write_tiny_model};
use fedlora_coordinator::config::{FederationConfig, TrainingConfig};
use fedlora_coordinator::pki::{CertificateAuthority, IssueRequest, Role};
use fedlora_coordinator::rounds::Coordinator;
use fedlora_coordinator::server::{self, ServerTransport};
use fedlora_coordinator::tls::ServerTls;
use fedlora_proto::adapter::LoraSpec;
use fedlora_proto::tls::ClientTls;
use fedlora_proto::v1::admin_client::AdminClient;
use fedlora_proto::v1::{ListRoundsRequest, RoundInfo};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tonic::transport::Endpoint;

use crate::sites::{SITE_NAMES, write_site_jsonl};

#[derive(Debug, Clone, PartialEq)]
pub struct DemoOptions {
    /// Working directory (model, data, database, sent adapters); a fresh temporary one if `None`.
    pub dir: Option<PathBuf>,
    pub rounds: u32,
    pub sites: usize,
    pub documents_per_site: usize,
    pub model: TinyModelSpec,
    pub lora: LoraSpec,
    pub training: TrainingConfig,
    pub show_progress: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            dir: None,
            rounds: 3,
            sites: 3,
            documents_per_site: 400,
            model: TinyModelSpec {
                hidden_size: 128,
                intermediate_size: 352,
                num_layers: 4,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                max_position_embeddings: 256,
                tie_word_embeddings: false,
                seed: 42,
            },
            lora: LoraSpec::new(8, 16.0, &["q_proj", "v_proj"]),
            training: TrainingConfig {
                local_steps: 40,
                learning_rate: 1e-2,
                batch_size: 8,
                seq_len: 64,
                ..TrainingConfig::default()
            },
            show_progress: true,
        }
    }
}

pub struct DemoReport {
    /// The working directory, when the caller chose one (a temporary one is deleted).
    pub dir: Option<PathBuf>,
    /// Rounds as the Admin service lists them, newest first.
    pub rounds: Vec<RoundInfo>,
    pub elapsed: Duration,
}

/// Runs the demo federation to completion.
pub async fn run(options: DemoOptions) -> Result<DemoReport> {
    let started = Instant::now();
    if options.sites == 0 || options.sites > SITE_NAMES.len() {
        bail!("the demo has 1 to {} sites", SITE_NAMES.len());
    }
    let (temp, dir) = match &options.dir {
        Some(dir) => (None, dir.clone()),
        None => {
            let temp = tempfile::tempdir().context("creating a temporary directory")?;
            let path = temp.path().to_path_buf();
            (Some(temp), path)
        }
    };
    let model_dir = dir.join("model");
    write_tiny_model(&model_dir, &options.model).context("writing the demo model")?;
    let database = dir.join("coordinator.db");
    if database.exists() {
        bail!(
            "{} already exists: the demo needs a fresh directory",
            database.display()
        );
    }
    let database_url = format!("sqlite://{}", database.display());
    let store = fedlora_coordinator::store::connect(&database_url).await?;
    let config = FederationConfig {
        name: "demo".into(),
        rounds: options.rounds,
        min_clients: options.sites as u32,
        clients_per_round: options.sites as u32,
        round_timeout_secs: 600,
        lora: options.lora.clone(),
        training: options.training.clone(),
        ..FederationConfig::default()
    };
    let coordinator = Coordinator::start(store, config).await?;
    // Mutual TLS as in a real federation: a CA for this run, a certificate for the coordinator,
    // one per site and one for the operator who lists the rounds at the end.
    let ca = CertificateAuthority::init(&dir.join("ca"), "demo", 1)?;
    let ca_pem = ca.cert_pem()?;
    let credentials = |name: &str, role: Role| -> Result<(String, String)> {
        let request = IssueRequest {
            subject_alt_names: vec!["127.0.0.1".into()],
            ..IssueRequest::new(name, role, 1)
        };
        let issued = ca.issue(&request)?;
        let key = issued
            .key_pem
            .context("the demo's certificate authority made no key")?;
        Ok((issued.cert_pem, key))
    };
    let (server_cert, server_key) = credentials("localhost", Role::Coordinator)?;
    let transport =
        ServerTransport::MutualTls(ServerTls::from_pem(&ca_pem, &server_cert, &server_key)?);
    let server = server::spawn(coordinator, ([127, 0, 0, 1], 0).into(), transport).await?;
    let url = server.url();
    let client_tls = |name: &str, role: Role| -> Result<ClientTls> {
        let (cert_pem, key_pem) = credentials(name, role)?;
        Ok(ClientTls {
            ca_pem: ca_pem.clone(),
            cert_pem,
            key_pem,
        })
    };

    let bars = MultiProgress::with_draw_target(if options.show_progress {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let style =
        ProgressStyle::with_template("{prefix:>8} {bar:24.cyan/blue} {pos:>3}/{len:3} {msg}")
            .context("progress style")?
            .progress_chars("=> ");
    let mut daemons = Vec::new();
    for (site_index, site) in SITE_NAMES.iter().take(options.sites).enumerate() {
        let data_path = dir.join(format!("{site}.jsonl"));
        write_site_jsonl(&data_path, site_index, options.documents_per_site, 7)
            .with_context(|| format!("writing {}", data_path.display()))?;
        let bar = bars.add(ProgressBar::new(u64::from(options.training.local_steps)));
        bar.set_style(style.clone());
        bar.set_prefix(site.to_string());
        bar.set_message("loading model and data");
        let observer: daemon::Observer = Arc::new(move |event: &DaemonEvent| show(&bar, event));
        let config = DaemonConfig {
            coordinator: url.clone(),
            transport: ClientTransport::MutualTls(client_tls(site, Role::Client)?),
            client_name: site.to_string(),
            model_dir: model_dir.clone(),
            data_path,
            text_column: "text".into(),
            state_dir: dir.join("sites").join(site),
            max_rank: 64,
            max_eval_windows: 64,
            base: BasePrecision::F32,
        };
        daemons.push(tokio::spawn(daemon::run(
            config,
            observer,
            std::future::pending(),
        )));
    }
    for daemon in daemons {
        daemon.await.context("client task panicked")??;
    }
    let channel = client_tls("operator", Role::Admin)?
        .configure(&url, Endpoint::from_shared(url.clone())?)?
        .connect()
        .await?;
    let mut admin = AdminClient::new(channel);
    let rounds = admin
        .list_rounds(ListRoundsRequest { limit: 1000 })
        .await?
        .into_inner()
        .rounds;
    server.stop().await?;
    drop(temp);
    Ok(DemoReport {
        dir: options.dir,
        rounds,
        elapsed: started.elapsed(),
    })
}

/// Reflects a daemon event on a site's progress bar (shared by the demo and `fedlora client`).
pub fn show(bar: &ProgressBar, event: &DaemonEvent) {
    match event {
        DaemonEvent::Joined { num_examples, .. } => {
            bar.set_message(format!("joined with {num_examples} local examples"));
        }
        DaemonEvent::TaskStarted {
            round_id,
            kind,
            local_steps,
        } => {
            bar.set_length(u64::from(*local_steps).max(1));
            bar.set_position(0);
            bar.set_message(format!("round {round_id}: {kind}"));
        }
        DaemonEvent::Evaluated { round_id, loss, .. } => {
            bar.set_message(format!(
                "round {round_id}: global adapter held-out loss {loss:.3} (perplexity {:.1})",
                fedlora_client::train::perplexity(*loss)
            ));
        }
        DaemonEvent::NotEvaluated { round_id, seq_len } => bar.set_message(format!(
            "round {round_id}: no held-out window at sequence length {seq_len}"
        )),
        DaemonEvent::NotFinite { round_id, loss, .. } => bar.set_message(format!(
            "round {round_id}: global adapter held-out loss {loss}: the model overflows"
        )),
        DaemonEvent::Step {
            round_id,
            step,
            loss,
            tokens_per_second,
        } => {
            bar.set_position(*step as u64);
            bar.set_message(format!(
                "round {round_id}: training, loss {loss:.3}, {tokens_per_second:.0} tokens/s"
            ));
        }
        DaemonEvent::Downloaded {
            round_id,
            bytes,
            reused,
            ..
        } => {
            let reused = if reused.is_empty() {
                String::new()
            } else {
                let names: Vec<String> = reused.iter().map(ToString::to_string).collect();
                format!(" ({} already held)", names.join(", "))
            };
            bar.set_message(format!(
                "round {round_id}: got {} KiB global adapter{reused}",
                bytes / 1024
            ));
        }
        DaemonEvent::Uploaded {
            round_id, bytes, ..
        } => {
            bar.set_message(format!(
                "round {round_id}: sent {} KiB adapter, waiting",
                bytes / 1024
            ));
        }
        DaemonEvent::Retrying { error, .. } => bar.set_message(format!("retrying: {error}")),
        DaemonEvent::CertificateRefused { alert } => {
            bar.set_message(format!("certificate refused ({alert}), retrying"));
        }
        DaemonEvent::Finished { .. } => bar.finish_with_message("done"),
    }
}
