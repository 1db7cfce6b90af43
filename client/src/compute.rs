//! The compute thread: one long-lived thread runs every CPU-heavy job of the process (loading and
//! packing a model, training, evaluation, generation, the benchmarks), and it is worker 0 of the
//! rayon pool that its parallel kernels run on.
//!
//! Why: a parallel loop started from a thread outside rayon's pool is handed to the pool's workers
//! while the caller sleeps on a latch, so every GEMM, fused op and loss chunk of a training step
//! woke two workers and put the caller to sleep and back (on 2 cores, `perf` had 8% of the step
//! in futex and scheduler calls). As a worker of its own pool (`use_current_thread`), the compute
//! thread takes a share of each loop itself and only the other workers are woken. With the
//! main thread as worker 0 (a throwaway build), `fedlora bench-train` ran 17–20% faster in
//! alternating runs (reference preset, Intel Xeon, 2 cores); on a thread of its own, as here,
//! only once its allocations came from glibc's main arena (`src/main.rs`). Jobs queue: the
//! process trains one thing at a time, which is what its cores allow anyway (the demo's sites
//! take turns).
//!
//! Invariants: a job's panic is caught on the compute thread and handed to its caller as
//! [`ComputeError::Panicked`], so the thread lives as long as the process; a job (or a parallel
//! part of one, on another worker of the pool) that itself calls [`run`] runs it inline (no
//! deadlock on its own queue). Jobs run in their caller's tracing span.

use std::any::Any;
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::OnceLock;
use std::sync::mpsc;

/// A job that could not finish.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ComputeError {
    #[error("the job panicked: {0}")]
    Panicked(String),
    #[error("the compute thread ended before the job")]
    Ended,
}

type Job = Box<dyn FnOnce() + Send>;

/// Stack of the compute thread: the main thread's usual size, as deep model graphs' backward
/// passes walk them recursively.
const STACK_BYTES: usize = 8 << 20;

thread_local! {
    static ON_COMPUTE_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// The compute thread's queue, started on first use; `None` if the thread could not be started
/// (jobs then run on their caller's thread).
fn queue() -> Option<&'static mpsc::Sender<Job>> {
    static QUEUE: OnceLock<Option<mpsc::Sender<Job>>> = OnceLock::new();
    QUEUE
        .get_or_init(|| {
            let (sender, jobs) = mpsc::channel::<Job>();
            let started = std::thread::Builder::new()
                .name("fedlora-compute".into())
                .stack_size(STACK_BYTES)
                .spawn(move || serve(jobs));
            match started {
                Ok(_) => Some(sender),
                Err(error) => {
                    tracing::warn!(%error, "cannot start the compute thread; jobs run where they are called");
                    None
                }
            }
        })
        .as_ref()
}

/// The compute thread's loop: joins a new rayon pool as its worker 0 and runs jobs in order.
fn serve(jobs: mpsc::Receiver<Job>) {
    ON_COMPUTE_THREAD.set(true);
    let pool = rayon::ThreadPoolBuilder::new()
        .use_current_thread()
        .thread_name(|index| format!("fedlora-compute-{index}"))
        // A job's parallel parts that call `run` run it inline too.
        .start_handler(|_| ON_COMPUTE_THREAD.set(true))
        .build();
    if let Err(error) = &pool {
        // Jobs still run, their parallel loops on rayon's global pool as before.
        tracing::warn!(%error, "cannot start the compute pool; using rayon's global pool");
    }
    for job in jobs {
        job();
    }
}

/// Runs `job` on the compute thread and returns what it returns, blocking until it is done, in
/// the caller's tracing span. Not for async code, which has [`run_async`].
pub fn run<T, F>(job: F) -> Result<T, ComputeError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let Some(queue) = queue().filter(|_| !ON_COMPUTE_THREAD.get()) else {
        return catch_unwind(AssertUnwindSafe(job)).map_err(panicked);
    };
    let (done, result) = mpsc::sync_channel(1);
    let span = tracing::Span::current();
    let job: Job = Box::new(move || {
        // The caller blocks until this sends, so it is there to receive.
        let _ = done.send(catch_unwind(AssertUnwindSafe(|| span.in_scope(job))));
    });
    if let Err(mpsc::SendError(job)) = queue.send(job) {
        // The thread is gone (it never should be: jobs' panics are caught): run it here.
        job();
    }
    result
        .recv()
        .map_err(|_| ComputeError::Ended)
        .and_then(|outcome| outcome.map_err(panicked))
}

/// [`run`] for async callers: the task waits without blocking its runtime's thread. A job whose
/// caller is dropped before it starts is skipped; one already running finishes.
pub async fn run_async<T, F>(job: F) -> Result<T, ComputeError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    if ON_COMPUTE_THREAD.get() {
        return catch_unwind(AssertUnwindSafe(job)).map_err(panicked);
    }
    let (done, result) = tokio::sync::oneshot::channel();
    let span = tracing::Span::current();
    let job: Job = Box::new(move || {
        // A caller that was cancelled (its future dropped: a daemon shut down, a test timed
        // out) no longer wants the job; don't keep the queue behind it.
        if done.is_closed() {
            return;
        }
        let _ = done.send(catch_unwind(AssertUnwindSafe(|| span.in_scope(job))));
    });
    let job = match queue() {
        Some(queue) => queue.send(job).err().map(|mpsc::SendError(job)| job),
        None => Some(job),
    };
    if let Some(job) = job {
        // No compute thread: a blocking thread of the runtime, as before it existed.
        tokio::task::spawn_blocking(job);
    }
    result
        .await
        .map_err(|_| ComputeError::Ended)
        .and_then(|outcome| outcome.map_err(panicked))
}

/// A caught panic's message.
fn panicked(payload: Box<dyn Any + Send>) -> ComputeError {
    let message = payload
        .downcast_ref::<&str>()
        .map(|text| (*text).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into());
    ComputeError::Panicked(message)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn jobs_run_as_worker_zero_of_a_pool_and_their_loops_use_it() {
        let (index, threads, sum, pool_threads) = run(|| {
            let sum: u64 = (0..10_000u64).into_par_iter().map(|value| value * 2).sum();
            // Which pool's threads ran the loop's parts.
            let names: std::collections::BTreeSet<String> = (0..64)
                .into_par_iter()
                .map(|_| {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    std::thread::current().name().unwrap_or("").to_string()
                })
                .collect();
            (
                rayon::current_thread_index(),
                rayon::current_num_threads(),
                sum,
                names,
            )
        })
        .unwrap();
        assert_eq!(index, Some(0), "the compute thread is the pool's worker 0");
        assert_eq!(sum, 9_999 * 10_000);
        let expected = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(
            threads,
            std::env::var("RAYON_NUM_THREADS")
                .ok()
                .and_then(|n| n.parse().ok())
                .filter(|&n| n > 0)
                .unwrap_or(expected)
        );
        for name in &pool_threads {
            assert!(
                name.starts_with("fedlora-compute"),
                "a loop part ran on {name:?}, outside the compute pool"
            );
        }
    }

    #[test]
    fn a_panicking_job_is_an_error_and_the_thread_goes_on() {
        let error = run(|| -> u32 { panic!("boom {}", 7) }).unwrap_err();
        assert!(error.to_string().contains("boom 7"), "{error}");
        assert_eq!(run(|| 41 + 1).unwrap(), 42);
    }

    #[test]
    fn a_job_calling_run_runs_it_inline() {
        let inner = run(|| run(rayon::current_thread_index).unwrap()).unwrap();
        assert_eq!(inner, Some(0));
    }

    #[test]
    fn a_parallel_part_calling_run_runs_it_inline() {
        let inner =
            run(|| rayon::broadcast(|_| run(rayon::current_thread_index).unwrap())).unwrap();
        let threads = run(rayon::current_num_threads).unwrap();
        assert_eq!(inner, (0..threads).map(Some).collect::<Vec<_>>());
    }

    #[test]
    fn broadcasts_reach_every_worker_including_the_compute_thread() {
        let indices = run(|| rayon::broadcast(|context| context.index())).unwrap();
        let threads = run(rayon::current_num_threads).unwrap();
        assert_eq!(indices, (0..threads).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_cancelled_callers_job_is_skipped() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let (started, is_started) = mpsc::channel();
        let (release, is_released) = mpsc::channel::<()>();
        let blocker = std::thread::spawn(move || {
            run(move || {
                started.send(()).unwrap();
                is_released.recv().unwrap();
            })
            .unwrap()
        });
        is_started.recv().unwrap();
        // Queued behind the blocker, then cancelled before the blocker is released.
        let ran = Arc::new(AtomicBool::new(false));
        let flag = ran.clone();
        let cancelled = run_async(move || flag.store(true, Ordering::SeqCst));
        let waited = tokio::time::timeout(std::time::Duration::from_millis(20), cancelled).await;
        assert!(waited.is_err(), "the job cannot have run yet");
        release.send(()).unwrap();
        blocker.join().unwrap();
        // Jobs run in order: once this one has, the cancelled one was skipped or ran.
        run(|| ()).unwrap();
        assert!(!ran.load(Ordering::SeqCst), "the cancelled job ran");
    }

    #[tokio::test]
    async fn async_callers_get_results_and_panics() {
        assert_eq!(
            run_async(rayon::current_thread_index).await.unwrap(),
            Some(0)
        );
        let error = run_async(|| -> () { panic!("async boom") })
            .await
            .unwrap_err();
        assert!(error.to_string().contains("async boom"), "{error}");
    }
}
