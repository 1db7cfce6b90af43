//! What a training run's arithmetic depends on besides its inputs: the build, the CPU's kernels,
//! the device and the thread count. A resumed local run continues the uninterrupted run to the
//! last bit only where these are the same ([`super::local`] records them and says when they
//! differ).

use candle_core::Device;
use serde::{Deserialize, Serialize};

/// The machine and build a run's steps ran on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// fedlora's version.
    pub fedlora: String,
    /// The CPU's model name (`/proc/cpuinfo`), or its architecture where that cannot be read.
    pub cpu: String,
    /// The vector extensions fedlora's kernels choose between, those this CPU has.
    pub kernels: Vec<String>,
    /// Where the model runs: `Cpu`, or a GPU (`Cuda { gpu_id: 0 }`).
    pub device: String,
    /// Threads of the compute pool.
    pub threads: usize,
}

impl Machine {
    /// This process's machine, computing on `device`.
    pub fn current(device: &Device) -> Self {
        Machine {
            fedlora: env!("CARGO_PKG_VERSION").into(),
            cpu: cpu_model().unwrap_or_else(|| std::env::consts::ARCH.into()),
            kernels: kernels(),
            device: format!("{:?}", device.location()),
            threads: rayon::current_num_threads(),
        }
    }

    /// What differs in `self` from `other`, one phrase each ("CPU AMD EPYC 9B45, not Intel …").
    pub fn differences(&self, other: &Machine) -> Vec<String> {
        let mut differences = Vec::new();
        let mut compare = |what: &str, ours: String, theirs: String| {
            if ours != theirs {
                differences.push(format!("{what} {ours}, not {theirs}"));
            }
        };
        compare("fedlora", self.fedlora.clone(), other.fedlora.clone());
        compare("CPU", self.cpu.clone(), other.cpu.clone());
        let list = |kernels: &[String]| match kernels {
            [] => "none".to_string(),
            kernels => kernels.join(" "),
        };
        compare(
            "vector extensions",
            list(&self.kernels),
            list(&other.kernels),
        );
        compare("device", self.device.clone(), other.device.clone());
        compare(
            "threads",
            self.threads.to_string(),
            other.threads.to_string(),
        );
        differences
    }
}

/// The first `model name` of `/proc/cpuinfo` (Linux).
fn cpu_model() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    cpuinfo
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(key, _)| key.trim() == "model name")
        .map(|(_, name)| name.trim().to_string())
        .filter(|name| !name.is_empty())
}

/// The extensions that choose fedlora's kernels (packed GEMM, fused element-wise rows, loss).
fn kernels() -> Vec<String> {
    #[cfg(target_arch = "x86_64")]
    {
        let mut kernels = Vec::new();
        let mut add = |name: &str, present: bool| {
            if present {
                kernels.push(name.to_string());
            }
        };
        add(
            "avx2+fma",
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma"),
        );
        add("avx512f", std::arch::is_x86_feature_detected!("avx512f"));
        add(
            "avx512bf16",
            std::arch::is_x86_feature_detected!("avx512bf16"),
        );
        add("amx-bf16", crate::model::packed_gemm::amx_available());
        kernels
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_each_field_that_differs() {
        let here = Machine::current(&Device::Cpu);
        assert!(here.differences(&here.clone()).is_empty());
        assert!(here.threads >= 1);
        let other = Machine {
            cpu: "Another CPU".into(),
            threads: here.threads + 1,
            ..here.clone()
        };
        let differences = here.differences(&other);
        assert_eq!(differences.len(), 2, "{differences:?}");
        assert_eq!(differences[0], format!("CPU {}, not Another CPU", here.cpu));
        assert!(differences[1].starts_with("threads "), "{differences:?}");
    }
}
