//! Factor-level facts shared by the coordinator and the client: which factor a tensor is, the
//! seeded initialisation both sides compute identically, and rank prefixes for clients that train
//! a lower rank than the federation.
//!
//! Rank alignment: a federation has rank `R` and alpha `α`; a client of rank `r ≤ R` trains with
//! alpha `α·r/R` (rsLoRA: `α·√(r/R)`), so its scale `s` is the federation's and its `ΔW = s·B·A`
//! means the same thing at every rank. It starts from the rank-`r` prefix of the global adapter
//! (the first `r` rows of A, the first `r` columns of B); the coordinator zero-pads its update back
//! to `R`. The initialisation draws each A row by row from a stream keyed by (seed, layer, module),
//! so a rank-`r` initialisation is the prefix of the rank-`R` one.

use crate::adapter::{
    Adapter, AdapterError, AdapterTensor, Factor, LoraSpec, ModelDims, TensorSpec, adapter_spec,
    peft_key,
};

/// The join feature a client announces when it can train one factor with the other frozen (the
/// `ffa` and `alternating` strategies need it).
pub const SINGLE_FACTOR: &str = "single_factor";

impl Factor {
    /// The factor a PEFT tensor name holds, from its suffix.
    pub fn of_name(name: &str) -> Option<Self> {
        if name.ends_with(".lora_A.weight") {
            Some(Self::A)
        } else if name.ends_with(".lora_B.weight") {
            Some(Self::B)
        } else if name.ends_with(".lora_magnitude_vector") {
            Some(Self::Magnitude)
        } else {
            None
        }
    }

    /// The axis of the rank dimension (A: rows, B: columns); `None` for DoRA's magnitude.
    pub fn rank_axis(self) -> Option<usize> {
        match self {
            Self::A => Some(0),
            Self::B => Some(1),
            Self::Magnitude => None,
        }
    }
}

/// Which LoRA factors a training round trains. DoRA magnitudes always train.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trained {
    #[default]
    Both,
    A,
    B,
}

impl Trained {
    pub fn includes(self, factor: Factor) -> bool {
        match (self, factor) {
            (Self::Both, _) | (_, Factor::Magnitude) => true,
            (Self::A, Factor::A) | (Self::B, Factor::B) => true,
            (Self::A, Factor::B) | (Self::B, Factor::A) => false,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Both => "both",
            Self::A => "a",
            Self::B => "b",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "both" => Some(Self::Both),
            "a" => Some(Self::A),
            "b" => Some(Self::B),
            _ => None,
        }
    }
}

impl LoraSpec {
    /// The spec a client of rank `rank` trains: that rank, with the alpha that keeps the
    /// federation's scale. Refused for federations with `rank_pattern` (their ranks are per module
    /// and every client trains them all) unless `rank` is the federation's rank.
    pub fn at_rank(&self, rank: usize) -> Result<Self, AdapterError> {
        if rank == self.rank {
            return Ok(self.clone());
        }
        if rank == 0 || rank > self.rank {
            return Err(AdapterError::InvalidConfig(format!(
                "client rank {rank} must be between 1 and the federation's rank {}",
                self.rank
            )));
        }
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            return Err(AdapterError::InvalidConfig(
                "rank_pattern and alpha_pattern federations need every client at the federation's rank"
                    .into(),
            ));
        }
        let ratio = rank as f64 / self.rank as f64;
        let factor = if self.use_rslora { ratio.sqrt() } else { ratio };
        Ok(Self {
            rank,
            alpha: (f64::from(self.alpha) * factor) as f32,
            ..self.clone()
        })
    }
}

/// SplitMix64: a tiny, well-mixed generator, so that the client and the coordinator draw the same
/// numbers without sharing a crate's generator (whose stream may change between versions).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-bound, bound).
    fn uniform(&mut self, bound: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        (2.0 * unit - 1.0) * bound
    }
}

/// PEFT's initialisation of `lora_A` (kaiming-uniform with a = √5: U(−1/√in, 1/√in)), drawn row by
/// row from a stream keyed by `(seed, layer, module)`: the rank-`r` draw is the first `r` rows of
/// any higher-rank draw.
pub fn lora_a_init(
    seed: u64,
    layer: usize,
    module: &str,
    rank: usize,
    in_features: usize,
) -> Vec<f32> {
    let mut key = seed ^ (layer as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    for byte in module.bytes() {
        key = (key ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01B3);
    }
    let mut rng = SplitMix64(key);
    let bound = 1.0 / (in_features as f32).sqrt();
    (0..rank * in_features)
        .map(|_| rng.uniform(bound))
        .collect()
}

/// The factors every client starts a fresh round from: A from [`lora_a_init`], B zero. DoRA's
/// magnitudes are left out: they start at the base weights' row norms, which only clients hold.
pub fn initial_factors(
    dims: &ModelDims,
    lora: &LoraSpec,
    seed: u64,
) -> Result<Adapter, AdapterError> {
    let patterns = lora.patterns()?;
    let mut adapter = Adapter::default();
    for layer in 0..dims.num_layers {
        for module in &lora.target_modules {
            let (in_features, out_features) = dims.module_in_out(module)?;
            let rank = patterns.rank_for(layer, module);
            adapter.tensors.insert(
                peft_key(layer, module, Factor::A)?,
                AdapterTensor {
                    shape: vec![rank, in_features],
                    data: lora_a_init(seed, layer, module, rank, in_features),
                },
            );
            adapter.tensors.insert(
                peft_key(layer, module, Factor::B)?,
                AdapterTensor::zeros(&[out_features, rank]),
            );
        }
    }
    Ok(adapter)
}

impl AdapterTensor {
    /// The first `rank` slots of a factor (A: rows, B: columns); magnitudes are returned whole.
    pub fn rank_prefix(&self, factor: Factor, rank: usize) -> Result<Self, AdapterError> {
        let malformed = || {
            AdapterError::Malformed(format!(
                "cannot take a rank-{rank} prefix of a {factor:?} factor of shape {:?}",
                self.shape
            ))
        };
        match (factor, self.shape.as_slice()) {
            (Factor::Magnitude, _) => Ok(self.clone()),
            (Factor::A, &[full, columns]) if rank <= full => Ok(Self {
                shape: vec![rank, columns],
                data: self.data[..rank * columns].to_vec(),
            }),
            (Factor::B, &[rows, full]) if rank <= full => Ok(Self {
                shape: vec![rows, rank],
                data: self
                    .data
                    .chunks_exact(full.max(1))
                    .flat_map(|row| &row[..rank])
                    .copied()
                    .collect(),
            }),
            _ => Err(malformed()),
        }
    }
}

impl Adapter {
    /// The adapter a client of the lower-rank layout `spec` starts from: each factor's prefix.
    /// Every tensor of `spec` must exist here with a rank at least as large.
    pub fn rank_prefix(&self, spec: &[TensorSpec]) -> Result<Self, AdapterError> {
        let mut prefix = Self::default();
        for expected in spec {
            let tensor = self
                .tensors
                .get(&expected.name)
                .ok_or_else(|| AdapterError::MissingTensor(expected.name.clone()))?;
            let factor = Factor::of_name(&expected.name)
                .ok_or_else(|| AdapterError::UnexpectedTensor(expected.name.clone()))?;
            let rank = factor
                .rank_axis()
                .and_then(|axis| expected.shape.get(axis).copied())
                .unwrap_or(0);
            let sliced = tensor.rank_prefix(factor, rank)?;
            if sliced.shape != expected.shape {
                return Err(AdapterError::ShapeMismatch {
                    name: expected.name.clone(),
                    expected: expected.shape.clone(),
                    got: tensor.shape.clone(),
                });
            }
            prefix.tensors.insert(expected.name.clone(), sliced);
        }
        Ok(prefix)
    }
}

impl Adapter {
    /// A digest of one factor: sha256 over its tensors' names, shapes and f32 values, in name
    /// order. A client sends the digests of the factors it holds with a download request; the
    /// coordinator leaves out each factor whose digest matches the global adapter's, so `ffa`
    /// never resends its frozen A and `alternating` never resends the factor the last round froze.
    pub fn factor_digest(&self, factor: Factor) -> String {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        for (name, tensor) in &self.tensors {
            if Factor::of_name(name) != Some(factor) {
                continue;
            }
            hasher.update((name.len() as u64).to_le_bytes());
            hasher.update(name.as_bytes());
            hasher.update((tensor.shape.len() as u64).to_le_bytes());
            for dim in &tensor.shape {
                hasher.update((*dim as u64).to_le_bytes());
            }
            for value in &tensor.data {
                hasher.update(value.to_le_bytes());
            }
        }
        hex::encode(hasher.finalize())
    }

    /// Removes `factor`'s tensors, returning how many there were.
    pub fn remove_factor(&mut self, factor: Factor) -> usize {
        let before = self.tensors.len();
        self.tensors
            .retain(|name, _| Factor::of_name(name) != Some(factor));
        before - self.tensors.len()
    }

    /// Copies `factor`'s tensors from `held` (a download that left them out). The caller
    /// validates the result against its layout.
    pub fn fill_factor(&mut self, held: &Adapter, factor: Factor) {
        for (name, tensor) in &held.tensors {
            if Factor::of_name(name) == Some(factor) {
                self.tensors.insert(name.clone(), tensor.clone());
            }
        }
    }
}

/// The layout of a client of rank `rank` in a federation of `lora` on `dims`.
pub fn client_spec(
    dims: &ModelDims,
    lora: &LoraSpec,
    rank: usize,
) -> Result<Vec<TensorSpec>, AdapterError> {
    adapter_spec(dims, &lora.at_rank(rank)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn dims() -> ModelDims {
        ModelDims::toy()
    }

    #[test]
    fn factor_digests_see_only_their_factor() {
        let lora = LoraSpec::new(4, 8.0, &["q_proj", "v_proj"]);
        let start = initial_factors(&dims(), &lora, 7).unwrap();
        let mut moved = start.clone();
        for (name, tensor) in &mut moved.tensors {
            if Factor::of_name(name) == Some(Factor::B) {
                tensor.data[0] = 0.5;
            }
        }
        assert_eq!(
            start.factor_digest(Factor::A),
            moved.factor_digest(Factor::A)
        );
        assert_ne!(
            start.factor_digest(Factor::B),
            moved.factor_digest(Factor::B)
        );
        // Same values, other rank: the shapes differ, so do the digests.
        let spec = client_spec(&dims(), &lora, 2).unwrap();
        assert_ne!(
            start.rank_prefix(&spec).unwrap().factor_digest(Factor::A),
            start.factor_digest(Factor::A)
        );
        // Leaving A out and filling it back from a held copy restores the adapter exactly.
        let mut sent = moved.clone();
        assert_eq!(sent.remove_factor(Factor::A), 4);
        assert!(
            sent.validate(&adapter_spec(&dims(), &lora).unwrap())
                .is_err()
        );
        sent.fill_factor(&start, Factor::A);
        assert_eq!(sent, moved);
    }

    #[test]
    fn factor_names_and_axes() {
        let name = peft_key(1, "v_proj", Factor::B).unwrap();
        assert_eq!(Factor::of_name(&name), Some(Factor::B));
        assert_eq!(
            Factor::of_name(&peft_key(0, "q_proj", Factor::A).unwrap()),
            Some(Factor::A)
        );
        assert_eq!(
            Factor::of_name(&peft_key(0, "q_proj", Factor::Magnitude).unwrap()),
            Some(Factor::Magnitude)
        );
        assert_eq!(Factor::of_name("model.embed_tokens.weight"), None);
        assert_eq!(Factor::B.rank_axis(), Some(1));
    }

    #[test]
    fn lower_rank_keeps_the_scale() {
        let lora = LoraSpec::new(16, 32.0, &["q_proj"]);
        for rank in [1, 4, 8, 16] {
            let client = lora.at_rank(rank).unwrap();
            assert!((client.scale() - lora.scale()).abs() < 1e-9, "rank {rank}");
        }
        let rslora = LoraSpec {
            use_rslora: true,
            ..lora.clone()
        };
        assert!((rslora.at_rank(4).unwrap().scale() - rslora.scale()).abs() < 1e-6);
        assert!(lora.at_rank(17).is_err());
        assert!(lora.at_rank(0).is_err());
        let patterned = LoraSpec {
            rank_pattern: vec![("q_proj".into(), 4)],
            ..lora
        };
        assert!(patterned.at_rank(8).is_err());
        assert_eq!(patterned.at_rank(16).unwrap(), patterned);
    }

    #[test]
    fn initialisation_is_deterministic_bounded_and_prefix_stable() {
        let full = lora_a_init(7, 3, "v_proj", 16, 64);
        assert_eq!(full, lora_a_init(7, 3, "v_proj", 16, 64));
        assert_eq!(lora_a_init(7, 3, "v_proj", 4, 64), full[..4 * 64]);
        assert_ne!(lora_a_init(8, 3, "v_proj", 4, 64), full[..4 * 64]);
        assert_ne!(lora_a_init(7, 2, "v_proj", 4, 64), full[..4 * 64]);
        assert_ne!(lora_a_init(7, 3, "q_proj", 4, 64), full[..4 * 64]);
        let bound = 1.0 / 8.0;
        assert!(full.iter().all(|value| value.abs() <= bound));
        let mean = full.iter().sum::<f32>() / full.len() as f32;
        let variance = full.iter().map(|value| value * value).sum::<f32>() / full.len() as f32;
        // U(−b, b): mean 0, variance b²/3.
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!(
            (variance - bound * bound / 3.0).abs() < 0.1 * bound * bound / 3.0,
            "variance {variance}"
        );
    }

    #[test]
    fn initial_factors_match_the_spec_and_their_prefixes() {
        let lora = LoraSpec::new(8, 16.0, &["q_proj", "down_proj"]);
        let full = initial_factors(&dims(), &lora, 11).unwrap();
        full.validate(&adapter_spec(&dims(), &lora).unwrap())
            .unwrap();
        let low = client_spec(&dims(), &lora, 3).unwrap();
        let prefix = full.rank_prefix(&low).unwrap();
        prefix.validate(&low).unwrap();
        assert_eq!(
            prefix,
            initial_factors(&dims(), &lora.at_rank(3).unwrap(), 11).unwrap()
        );
    }

    #[test]
    fn b_prefix_takes_leading_columns() {
        let tensor = AdapterTensor {
            shape: vec![2, 3],
            data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        };
        let prefix = tensor.rank_prefix(Factor::B, 2).unwrap();
        assert_eq!(prefix.shape, vec![2, 2]);
        assert_eq!(prefix.data, vec![1.0, 2.0, 4.0, 5.0]);
        assert!(tensor.rank_prefix(Factor::B, 4).is_err());
        assert!(tensor.rank_prefix(Factor::A, 3).is_err());
    }
}
