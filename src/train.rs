//! `fedlora train`: a local run of the client's training engine with a progress bar
//! ([`fedlora_client::train::local`] does the work).

use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use fedlora_client::train::local::{Length, LocalEvent, LocalTraining, Start, train_locally};
use fedlora_client::train::{EvalReport, perplexity};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cli::TrainArgs;

/// Runs the training `args` describe, until done or until `stop` is set.
pub fn run(args: &TrainArgs, stop: &AtomicBool) -> Result<()> {
    let job = LocalTraining {
        model: args.site.model.clone(),
        data: args.site.data.clone(),
        text_column: args.site.text_column.clone(),
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
        out: args.out.clone(),
    };
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{bar:30.cyan/blue} {pos:>5}/{len:5} {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    // A line above the bar; printed also where stderr is no terminal (a log), and the bar is not.
    let say = |line: &str| bar.suspend(|| eprintln!("{line}"));
    let report = train_locally(&job, stop, &mut |event| match event {
        LocalEvent::Ready {
            train_windows,
            heldout_windows,
            skipped_examples,
            steps,
            template,
        } => {
            bar.set_length(steps as u64);
            say(&format!(
                "{train_windows} training and {heldout_windows} held-out windows of {} tokens \
                 (instruction layout: {template}); {steps} steps",
                job.config.seq_len
            ));
            if skipped_examples > 0 {
                say(&format!(
                    "{skipped_examples} training examples teach nothing at --seq-len {} and are \
                     skipped: instruction examples whose prompt fills it, documents wholly in \
                     the packed stream's tail",
                    job.config.seq_len
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
    });
    bar.finish_and_clear();
    let report = report.with_context(|| format!("training on {}", args.site.data.display()))?;
    let train = &report.train;
    eprintln!(
        "wrote {}: {} steps, {} tokens in {:.1} s ({:.0} tokens/s), mean training loss {:.4}; \
         held-out {} → {}",
        args.out.display(),
        train.steps,
        train.tokens,
        train.seconds,
        train.tokens as f64 / f64::from(train.seconds.max(1e-9)),
        train.mean_loss,
        describe(report.before.as_ref()),
        describe(report.after.as_ref()),
    );
    Ok(())
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
