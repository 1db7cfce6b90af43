//! `fedlora ca …`: the federation's certificate authority on the command line. The library side
//! is `fedlora_coordinator::pki`; revocations go to the coordinator's store.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use fedlora_coordinator::pki::{CertificateAuthority, IssueRequest, Issued, Role, write_private};
use fedlora_coordinator::store::RevokedRow;

/// Certificates for the coordinator, sites and operators. Run these on the CA's machine (the
/// CA's key never leaves its directory); give each holder its certificate, its key (or have it
/// send a CSR and keep its key) and the CA certificate.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Make a new certificate authority in --dir (refuses to overwrite one).
    Init(InitArgs),
    /// Certificate for the coordinator: --name and every --san are the names clients dial.
    IssueCoordinator(IssueCoordinatorArgs),
    /// Certificate for a site (client role: the Federation service only).
    IssueClient(IssueArgs),
    /// Certificate for an operator (admin role: the Admin service only).
    IssueAdmin(IssueArgs),
    /// Revoke a holder's certificates (all of them, or one --serial) in the coordinator's store:
    /// refused from its next call on, without a restart.
    Revoke(RevokeArgs),
    /// List issued certificates (and, with --database-url, which are revoked).
    List(ListArgs),
}

#[derive(Debug, Args)]
pub struct CaDir {
    /// The CA's directory (ca.pem, ca.key, issued/).
    #[arg(long, env = "FEDLORA_CA_DIR", default_value = "fedlora-ca")]
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub ca: CaDir,
    /// Federation name, written into the CA's subject.
    #[arg(long, default_value = "default")]
    pub federation: String,
    /// Validity of the CA certificate.
    #[arg(long, default_value_t = 3650)]
    pub days: u32,
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    /// The holder's name: the site's client name, or the operator's name.
    pub name: String,
    #[command(flatten)]
    pub issue: IssueCommon,
}

#[derive(Debug, Args)]
pub struct IssueCoordinatorArgs {
    /// The coordinator's host name (a DNS name or an IP address).
    #[arg(long, default_value = "localhost")]
    pub name: String,
    /// More names or addresses clients use to reach it (repeatable).
    #[arg(long = "san", default_values_t = ["127.0.0.1".to_string(), "::1".to_string()])]
    pub subject_alt_names: Vec<String>,
    #[command(flatten)]
    pub issue: IssueCommon,
}

#[derive(Debug, Args)]
pub struct IssueCommon {
    #[command(flatten)]
    pub ca: CaDir,
    /// Validity in days.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
    /// Certify the public key of this CSR (PEM) instead of making a key here: the holder keeps
    /// its key. The certificate's name and role are the CA's, whatever the CSR says.
    #[arg(long)]
    pub csr: Option<PathBuf>,
    /// Where to write NAME.pem, NAME.key (mode 0600, unless --csr) and a copy of ca.pem.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The holder whose certificates to revoke.
    pub name: String,
    #[command(flatten)]
    pub ca: CaDir,
    /// Revoke only this certificate (hex serial, as `ca list` prints it), e.g. the old one after
    /// a rotation.
    #[arg(long)]
    pub serial: Option<String>,
    /// Why, for the record.
    #[arg(long, default_value = "")]
    pub reason: String,
    /// The coordinator's store, where every call's certificate is checked.
    #[arg(long, env = "FEDLORA_DATABASE_URL")]
    pub database_url: String,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub ca: CaDir,
    /// The coordinator's store, to show revocations.
    #[arg(long, env = "FEDLORA_DATABASE_URL")]
    pub database_url: Option<String>,
}

pub async fn run(command: CaCommand) -> Result<()> {
    match command {
        CaCommand::Init(args) => {
            let ca = CertificateAuthority::init(&args.ca.dir, &args.federation, args.days)?;
            println!(
                "certificate authority created in {}: give {} to the coordinator, every site and every operator; {} stays here",
                ca.dir().display(),
                ca.cert_path().display(),
                ca.dir().join("ca.key").display()
            );
        }
        CaCommand::IssueCoordinator(args) => {
            let request = IssueRequest {
                subject_alt_names: args.subject_alt_names,
                ..IssueRequest::new(&args.name, Role::Coordinator, args.issue.days)
            };
            issue(request, args.issue)?;
        }
        CaCommand::IssueClient(args) => {
            let request = IssueRequest::new(&args.name, Role::Client, args.issue.days);
            issue(request, args.issue)?;
        }
        CaCommand::IssueAdmin(args) => {
            let request = IssueRequest::new(&args.name, Role::Admin, args.issue.days);
            issue(request, args.issue)?;
        }
        CaCommand::Revoke(args) => revoke(args).await?,
        CaCommand::List(args) => list(args).await?,
    }
    Ok(())
}

fn issue(mut request: IssueRequest, common: IssueCommon) -> Result<()> {
    let ca = CertificateAuthority::open(&common.ca.dir)?;
    let out = common.out.as_path();
    if let Some(csr) = common.csr {
        request.csr_pem = Some(
            std::fs::read_to_string(&csr).with_context(|| format!("reading {}", csr.display()))?,
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let cert_path = out.join(format!("{}.pem", request.name));
    let key_path = out.join(format!("{}.key", request.name));
    if request.csr_pem.is_none() && key_path.exists() {
        bail!(
            "{} exists; move it away first (a new key is never written over an old one)",
            key_path.display()
        );
    }
    let Issued {
        record,
        cert_pem,
        key_pem,
    } = ca.issue(&request)?;
    if let Some(key_pem) = key_pem {
        write_private(&key_path, key_pem.as_bytes())?;
    }
    std::fs::write(&cert_path, cert_pem)
        .with_context(|| format!("writing {}", cert_path.display()))?;
    let ca_copy = out.join("ca.pem");
    if ca_copy != ca.cert_path() {
        std::fs::write(&ca_copy, ca.cert_pem()?)
            .with_context(|| format!("writing {}", ca_copy.display()))?;
    }
    println!(
        "issued a certificate with role {} to {:?} (serial {}, valid for {}): {}{}",
        record.role,
        record.name,
        record.serial,
        time_left(record.not_after_unix),
        cert_path.display(),
        if record.key_made_here {
            format!(", key {} (keep it secret)", key_path.display())
        } else {
            String::new()
        }
    );
    Ok(())
}

async fn revoke(args: RevokeArgs) -> Result<()> {
    let ca = CertificateAuthority::open(&args.ca.dir)?;
    let mut records = ca.issued_to(&args.name)?;
    if let Some(serial) = &args.serial {
        let serial = serial.to_lowercase();
        records.retain(|record| record.serial == serial);
        if records.is_empty() {
            bail!("{:?} holds no certificate with serial {serial}", args.name);
        }
    }
    let store = fedlora_coordinator::store::connect(&args.database_url)
        .await
        .context("opening the coordinator's store")?;
    let now_ms = fedlora_coordinator::rounds::now_ms();
    for record in records {
        let fresh = store
            .revoke_certificate(&RevokedRow {
                serial: record.serial.clone(),
                name: record.name.clone(),
                reason: args.reason.clone(),
                revoked_ms: now_ms,
            })
            .await?;
        println!(
            "{} certificate {} of {:?}",
            if fresh { "revoked" } else { "already revoked:" },
            record.serial,
            record.name
        );
    }
    Ok(())
}

async fn list(args: ListArgs) -> Result<()> {
    let ca = CertificateAuthority::open(&args.ca.dir)?;
    let revoked = match &args.database_url {
        Some(url) => Some(
            fedlora_coordinator::store::connect(url)
                .await
                .context("opening the coordinator's store")?
                .list_revoked()
                .await?,
        ),
        None => None,
    };
    println!(
        "{:<24} {:<12} {:<33} {:>10}  status",
        "name", "role", "serial", "valid for"
    );
    let now = unix_now();
    for record in ca.list()? {
        let status = match &revoked {
            Some(revoked) if revoked.iter().any(|row| row.serial == record.serial) => "revoked",
            _ if record.not_after_unix < now => "expired",
            Some(_) => "valid",
            None => "valid (revocations not checked: no --database-url)",
        };
        println!(
            "{:<24} {:<12} {:<33} {:>10}  {status}",
            record.name,
            record.role.as_str(),
            record.serial,
            time_left(record.not_after_unix)
        );
    }
    Ok(())
}

fn unix_now() -> i64 {
    fedlora_coordinator::rounds::now_ms() / 1000
}

/// Time from now to `not_after_unix`, in days (hours under two days); `-` once past.
fn time_left(not_after_unix: i64) -> String {
    let left = not_after_unix - unix_now();
    match left {
        ..=0 => "-".into(),
        1..172_800 => format!("{} h", left / 3600),
        _ => format!("{} days", left / 86_400),
    }
}
