//! Operator views over the `Admin` gRPC service: readable tables and JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use fedlora_proto::v1::{RoundInfo, StatusResponse};
use serde_json::{Value, json};

fn finite_or_null(value: f64) -> Value {
    if value.is_finite() {
        json!(value)
    } else {
        Value::Null
    }
}

fn loss_cell(value: f64) -> String {
    if value.is_finite() {
        format!("{value:.3}")
    } else {
        "-".into()
    }
}

pub fn status_json(status: &StatusResponse) -> Value {
    let lora = status.lora.clone().unwrap_or_default();
    json!({
        "federation": status.federation_name,
        "state": status.state,
        "strategy": status.strategy,
        "rounds_total": status.rounds_total,
        "rounds_closed": status.rounds_closed,
        "current_round": status.current_round,
        "current_round_state": status.current_round_state,
        "clients_joined": status.clients_joined,
        "min_clients": status.min_clients,
        "lora": { "rank": lora.rank, "alpha": lora.alpha, "target_modules": lora.target_modules },
    })
}

pub fn render_status(status: &StatusResponse) -> String {
    let lora = status.lora.clone().unwrap_or_default();
    let rows = [
        ("federation", status.federation_name.clone()),
        ("state", status.state.clone()),
        ("strategy", status.strategy.clone()),
        (
            "training rounds",
            format!("{} of {} closed", status.rounds_closed, status.rounds_total),
        ),
        (
            "current round",
            format!("{} {}", status.current_round, status.current_round_state),
        ),
        (
            "clients joined",
            format!(
                "{} (min {} per round)",
                status.clients_joined, status.min_clients
            ),
        ),
        (
            "lora",
            format!(
                "r={} alpha={} on {}",
                lora.rank,
                lora.alpha,
                lora.target_modules.join(",")
            ),
        ),
    ];
    let mut out = String::new();
    for (key, value) in rows {
        let _ = writeln!(out, "{key:<16} {value}");
    }
    out
}

pub fn rounds_json(rounds: &[RoundInfo]) -> Value {
    Value::Array(
        rounds
            .iter()
            .map(|round| {
                json!({
                    "round_id": round.round_id,
                    "kind": round.kind,
                    "state": round.state,
                    "base_round_id": round.base_round_id,
                    "tasks": round.tasks,
                    "updates": round.updates,
                    "examples": round.examples,
                    "mean_train_loss": finite_or_null(round.mean_train_loss),
                    "mean_eval_loss": finite_or_null(round.mean_eval_loss),
                    "created_unix_ms": round.created_unix_ms,
                    "closed_unix_ms": round.closed_unix_ms,
                    "failure": round.failure,
                    "clients": round.clients.iter().map(|client| json!({
                        "client": client.client_name,
                        "eval_loss": finite_or_null(client.eval_loss),
                        "train_loss": finite_or_null(client.train_loss),
                        "num_examples": client.num_examples,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

pub fn render_rounds(rounds: &[RoundInfo]) -> String {
    let mut out = format!(
        "{:>5}  {:<8}  {:<11}  {:>5}  {:>7}  {:>8}  {:>10}  {:>10}  {}\n",
        "round", "kind", "state", "tasks", "updates", "examples", "train loss", "eval loss", "note"
    );
    for round in rounds {
        let note = if !round.failure.is_empty() {
            round.failure.clone()
        } else if round.base_round_id == 0 {
            "starts from the base model".to_string()
        } else {
            format!("starts from round {}", round.base_round_id)
        };
        let _ = writeln!(
            out,
            "{:>5}  {:<8}  {:<11}  {:>5}  {:>7}  {:>8}  {:>10}  {:>10}  {}",
            round.round_id,
            round.kind,
            round.state,
            round.tasks,
            round.updates,
            round.examples,
            loss_cell(round.mean_train_loss),
            loss_cell(round.mean_eval_loss),
            note
        );
    }
    out
}

/// Held-out loss per site (columns) of each global adapter (rows, oldest first), from the
/// evaluations clients reported at the start of each round.
pub fn render_loss_table(rounds: &[RoundInfo]) -> String {
    let mut ordered: Vec<&RoundInfo> = rounds
        .iter()
        .filter(|round| {
            round
                .clients
                .iter()
                .any(|client| client.eval_loss.is_finite())
        })
        .collect();
    ordered.sort_by_key(|round| round.round_id);
    let sites: Vec<String> = {
        let mut names: Vec<String> = ordered
            .iter()
            .flat_map(|round| {
                round
                    .clients
                    .iter()
                    .map(|client| client.client_name.clone())
            })
            .collect();
        names.sort();
        names.dedup();
        names
    };
    let mut out = format!("{:<28}", "held-out loss of");
    for site in &sites {
        let _ = write!(out, "  {site:>10}");
    }
    out.push_str(&format!("  {:>10}\n", "mean"));
    let mut seen: BTreeMap<u64, ()> = BTreeMap::new();
    for round in ordered {
        if seen.insert(round.base_round_id, ()).is_some() {
            continue;
        }
        let label = if round.base_round_id == 0 {
            "base model (no adapter)".to_string()
        } else {
            format!("global after round {}", round.base_round_id)
        };
        let _ = write!(out, "{label:<28}");
        let mut values = Vec::new();
        for site in &sites {
            let loss = round
                .clients
                .iter()
                .find(|client| &client.client_name == site)
                .map_or(f64::NAN, |client| client.eval_loss);
            if loss.is_finite() {
                values.push(loss);
            }
            let _ = write!(out, "  {:>10}", loss_cell(loss));
        }
        let mean = if values.is_empty() {
            f64::NAN
        } else {
            values.iter().sum::<f64>() / values.len() as f64
        };
        let _ = writeln!(out, "  {:>10}", loss_cell(mean));
    }
    out
}
