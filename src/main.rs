use std::process::ExitCode;

use clap::Parser;
use fedlora::cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

/// Keeps freed memory in the process instead of returning it to the OS. Training frees and
/// re-allocates the same large tensors every step; by default glibc serves them with fresh
/// `mmap`s and unmaps them on free, so every step page-faults its working set back in
/// (`fedlora bench-train`: 312 tokens/s with 23 s of system time over 8 steps, 565 tokens/s with
/// 2.6 s when retained). Same effect as `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(
    unsafe_code,
    reason = "mallopt is called once, before any other thread exists"
)]
fn retain_freed_memory() {
    // SAFETY: mallopt only changes allocator parameters; it is called at the start of main,
    // before the runtime or any other thread starts, so nothing allocates concurrently.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn retain_freed_memory() {}

/// Serves every thread's allocations from glibc's main arena, in processes that train. Training
/// runs on the compute thread (`fedlora_client::compute`), not the main thread; in an arena of
/// its own (a 64 MiB heap at most, growing by `mprotect`) the step's large buffers faulted their
/// pages in again and again despite [`retain_freed_memory`]: `bench-train` took 860–980 thousand
/// minor page faults over 6 steps against 262 thousand, and ran at 756–789 against 835–844
/// tokens/s (reference preset, Intel Xeon, alternating runs). `fedlora serve` keeps glibc's
/// default, an arena per core, for its many request threads; the demo's in-process coordinator
/// and a daemon's runtime threads share the one arena (their allocations are few; not measured).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(
    unsafe_code,
    reason = "mallopt is called once, before any other thread exists"
)]
fn one_malloc_arena(cli: &Cli) {
    if cli.runs_compute_jobs() {
        // SAFETY: as in `retain_freed_memory`: called at the start of main, before any other
        // thread starts.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn one_malloc_arena(_cli: &Cli) {}

/// Runs candle's element-wise ops on the calling thread unless `CANDLE_NUM_THREADS` says
/// otherwise. candle 0.11 keeps a second thread pool for them beside rayon's (which runs
/// fedlora's GEMM kernels, fused ops and candle's GEMM), each as large as the machine; the two
/// pools' threads then wait on each other's cores. Measured on a 2-core AMD EPYC (Zen 3),
/// `bench-train --steps 6 --warmup 1`, alternating runs: SmolLM2 dims 115–122 → 125–149
/// tokens/s, the reference preset unchanged (440–450 against 416–461). Not with a quantized
/// base: that pool also runs candle's quantized matmuls (QLoRA's products when decoding).
#[allow(
    unsafe_code,
    reason = "the environment is written once, before any other thread exists"
)]
fn one_pool_for_candle(cli: &Cli) {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() && !cli.quantized_base() {
        // SAFETY: called at the start of main, after parsing the command line (which starts no
        // thread) and before the runtime or any other thread starts, so nothing reads the
        // environment concurrently.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}

fn main() -> ExitCode {
    retain_freed_memory();
    let cli = Cli::parse();
    one_malloc_arena(&cli);
    one_pool_for_candle(&cli);
    // The demo draws progress bars: keep the log quiet there unless RUST_LOG says otherwise.
    let default_level = match cli.command {
        Command::Demo(_) => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fedlora::cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
