//! `fedlora train`: a local run of the client's training engine with a progress bar
//! ([`fedlora_client::train::local`] does the work).

use std::path::Path;
use std::sync::atomic::AtomicBool;

use anyhow::{Result, anyhow, bail};
use fedlora_client::error::ClientError;
use fedlora_client::train::local::{
    Length, LocalEvent, LocalTraining, Start, resumable, resume_locally, train_locally,
};
use fedlora_client::train::{EvalReport, perplexity};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cli::{SiteArgs, TrainArgs};

/// Runs the training `args` describe (a new run, or one resumed), until done or until `stop` is
/// set.
pub fn run(args: &TrainArgs, stop: &AtomicBool) -> Result<()> {
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{bar:30.cyan/blue} {pos:>5}/{len:5} {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    // A line above the bar; printed also where stderr is no terminal (a log), and the bar is not.
    let say = |line: &str| bar.suspend(|| eprintln!("{line}"));
    let mut observe = |event: LocalEvent<'_>| match event {
        LocalEvent::Ready {
            train_windows,
            heldout_windows,
            skipped_examples,
            cut_examples,
            steps,
            first_step,
            seq_len,
            template,
        } => {
            bar.set_length(steps as u64);
            bar.set_position(first_step as u64);
            bar.reset_elapsed();
            let resumed = if first_step > 0 {
                format!(", resumed after step {first_step}")
            } else {
                String::new()
            };
            say(&format!(
                "{train_windows} training and {heldout_windows} held-out windows of {seq_len} \
                 tokens (instruction layout: {template}); {steps} steps{resumed}"
            ));
            if skipped_examples > 0 {
                say(&format!(
                    "{skipped_examples} training examples teach nothing at --seq-len {seq_len} \
                     and are skipped: instruction examples whose prompt fills it, documents \
                     wholly in the packed stream's tail"
                ));
            }
            if cut_examples > 0 {
                say(&format!(
                    "{cut_examples} training instruction examples are longer than --seq-len \
                     {seq_len} and are cut: the model does not learn where those answers end \
                     (a longer --seq-len keeps them whole)"
                ));
            }
        }
        LocalEvent::Step {
            step,
            loss,
            tokens_per_second,
        } => {
            bar.set_position(step as u64);
            bar.set_message(format!("loss {loss:.4} · {tokens_per_second:.0} tokens/s"));
        }
        LocalEvent::Evaluated { step, eval } => {
            say(&format!(
                "step {step:>5}: held-out {}",
                describe(eval.as_ref())
            ));
        }
        LocalEvent::Saved { step, dir } => {
            say(&format!("step {step:>5}: wrote {}", dir.display()));
        }
        LocalEvent::ResumedElsewhere { differences } => {
            say(&format!(
                "note: earlier steps of this run ran elsewhere ({}); it continues, but its \
                 adapter can differ in the last bits from an uninterrupted run's",
                differences.join("; ")
            ));
        }
    };
    let (out, report) = match (&args.resume, &args.site, &args.out) {
        (Some(out), _, _) => (out.clone(), resume_locally(out, stop, &mut observe)),
        (None, Some(site), Some(out)) => {
            let job = job(args, site, out);
            (out.clone(), train_locally(&job, stop, &mut observe))
        }
        _ => bail!("give --model, --data and --out for a new run, or --resume OUT"),
    };
    bar.finish_and_clear();
    let report = report.map_err(|error| match error {
        ClientError::Interrupted(_) if resumable(&out) => anyhow!(
            "{error}\ncontinue with: fedlora train --resume {}",
            out.display()
        ),
        error => anyhow!(error),
    })?;
    let train = &report.train;
    // A resumed run reports the steps it ran, and the held-out loss from where it resumed.
    let (steps, from) = match report.first_step {
        0 => (format!("{} steps", train.steps), String::new()),
        first => (
            format!("steps {}–{}", first + 1, first + train.steps),
            format!(" at step {first}"),
        ),
    };
    eprintln!(
        "wrote {}: {steps}, {} tokens in {:.1} s ({:.0} tokens/s), mean training loss {:.4}; \
         held-out{from} {} → {}",
        out.display(),
        train.tokens,
        train.seconds,
        train.tokens as f64 / f64::from(train.seconds.max(1e-9)),
        train.mean_loss,
        describe(report.before.as_ref()),
        describe(report.after.as_ref()),
    );
    Ok(())
}

/// The new run `args` describe.
fn job(args: &TrainArgs, site: &SiteArgs, out: &Path) -> LocalTraining {
    LocalTraining {
        model: site.model.clone(),
        data: site.data.clone(),
        text_column: site.text_column.clone(),
        base: args.base.precision(),
        start: match &args.init_adapter {
            Some(dir) => Start::Adapter(dir.clone()),
            None => Start::Fresh(args.lora.spec()),
        },
        length: match args.steps {
            Some(steps) => Length::Steps(steps),
            None => Length::Epochs(args.epochs),
        },
        config: args.hyper.train_config(args.seed),
        eval_every: args.eval_every,
        save_every: args.save_every,
        max_eval_windows: args.max_eval_windows,
        out: out.to_path_buf(),
    }
}

/// `loss 2.3456 (perplexity 10.45, 1234 tokens)`, or why there is none.
fn describe(eval: Option<&EvalReport>) -> String {
    match eval {
        Some(eval) => format!(
            "loss {:.4} (perplexity {:.2}, {} tokens)",
            eval.loss,
            perplexity(eval.loss),
            eval.tokens
        ),
        None => "loss not measured (no held-out window fits --seq-len)".into(),
    }
}
