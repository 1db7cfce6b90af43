//! A Llama-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU MLP, tied or untied
//! embeddings) built only from candle ops that have a backward pass.
//!
//! Architecture invariant: no candle-nn fused op without a backward (`ops::rms_norm`,
//! `ops::softmax_last_dim`, `rotary_emb::rope*`) appears here: they silently cut the gradient graph,
//! so LoRA layers below them would learn nothing. `tests::every_lora_var_gets_a_gradient` guards it.

use std::collections::HashMap;

use candle_core::{D, DType, Device, Tensor, Var};
use fedlora_proto::adapter::{
    Adapter, AdapterTensor, Factor, LoraSpec, TensorSpec, adapter_spec, peft_key,
};

use super::config::{LlamaConfig, RopeScaling};
use super::frozen::FrozenWeight;
use super::fused::DocumentStarts;
use super::lora::{LoraFactors, LoraLinear, to_adapter_tensor};
use crate::error::{ClientError, Result};

#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            return super::fused::rms_norm(x, &self.weight, self.eps);
        }
        let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
        let inverse_rms = (mean_square + self.eps)?.sqrt()?.recip()?;
        Ok(x.broadcast_mul(&inverse_rms)?.broadcast_mul(&self.weight)?)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: LoraLinear,
    k_proj: LoraLinear,
    v_proj: LoraLinear,
    o_proj: LoraLinear,
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: LoraLinear,
    up_proj: LoraLinear,
    down_proj: LoraLinear,
}

#[derive(Debug, Clone)]
struct Block {
    input_layernorm: RmsNorm,
    attention: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// Longest sequence the RoPE tables cover (configs with 128k contexts would otherwise spend
/// hundreds of MB on tables that local fine-tuning never reaches).
const ROPE_TABLE_MAX: usize = 16_384;

/// How much faster than its f32 FMAs a CPU without AMX must run bf16 dot products (GFLOP/s,
/// `cpu_peak`) for the bf16 base to pay: rounding the activations costs a pass of its own, so it
/// needs a clear margin (25%: a judgement, not a measurement). Measured: 1.8–1.9× on an AMD EPYC
/// Zen 5, where the bf16 base trained 1.5× as fast as the f32 one; 0.5× on an Intel Xeon without
/// AMX, where it trained slower.
const BF16_HINT_RATIO: f64 = 1.25;

/// Precomputed RoPE tables in Hugging Face's rotate-half layout, `[max_positions, head_dim]`.
#[derive(Debug, Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// The same tables for the fused CPU kernel.
    tables: super::fused::RopeTables,
}

impl Rope {
    fn new(config: &LlamaConfig, device: &Device) -> Result<Self> {
        let head_dim = config.head_dim();
        let positions = config.max_position_embeddings.min(ROPE_TABLE_MAX);
        let scaling = config.rope_scaling().map_err(ClientError::Unsupported)?;
        let inverse_frequencies: Vec<f32> =
            RopeScaling::inverse_frequencies(scaling.as_ref(), config.rope_theta, head_dim)
                .into_iter()
                .map(|frequency| frequency as f32)
                .collect();
        let inverse_frequencies = Tensor::from_vec(inverse_frequencies, (1, head_dim / 2), device)?;
        let steps = Tensor::arange(0u32, positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((positions, 1))?;
        let angles = steps.broadcast_mul(&inverse_frequencies)?;
        let angles = Tensor::cat(&[&angles, &angles], D::Minus1)?;
        // YaRN scales cos and sin (`attention_factor`); the other scalings leave them.
        let attention_factor = RopeScaling::attention_factor(scaling.as_ref());
        let (cos, sin) = (
            (angles.cos()? * attention_factor)?,
            (angles.sin()? * attention_factor)?,
        );
        let tables = super::fused::RopeTables {
            cos: std::sync::Arc::new(cos.flatten_all()?.to_vec1::<f32>()?),
            sin: std::sync::Arc::new(sin.flatten_all()?.to_vec1::<f32>()?),
            head_dim,
        };
        Ok(Self { cos, sin, tables })
    }

    /// `x` is `[batch, seq, heads, head_dim]` at positions `offset..offset + seq`, or, with
    /// `documents`, each position at its place in its own document.
    fn apply(
        &self,
        x: &Tensor,
        offset: usize,
        documents: Option<&DocumentStarts>,
    ) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            return super::fused::rope(x, &self.tables, offset, documents);
        }
        self.apply_composed(x, offset, documents)
    }

    /// [`Rope::apply`] in candle's ops (GPU, and reduced precision on the CPU).
    fn apply_composed(
        &self,
        x: &Tensor,
        offset: usize,
        documents: Option<&DocumentStarts>,
    ) -> Result<Tensor> {
        let (batch, seq_len, _, head_dim) = x.dims4()?;
        let (cos, sin) = match documents {
            None => (
                self.cos
                    .narrow(0, offset, seq_len)?
                    .reshape((seq_len, 1, head_dim))?,
                self.sin
                    .narrow(0, offset, seq_len)?
                    .reshape((seq_len, 1, head_dim))?,
            ),
            Some(documents) => {
                let positions =
                    Tensor::from_vec(documents.positions(), batch * seq_len, self.cos.device())?;
                let gather = |table: &Tensor| -> Result<Tensor> {
                    Ok(table
                        .index_select(&positions, 0)?
                        .reshape((batch, seq_len, 1, head_dim))?)
                };
                (gather(&self.cos)?, gather(&self.sin)?)
            }
        };
        let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
        let half = head_dim / 2;
        let first = x.narrow(D::Minus1, 0, half)?;
        let second = x.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&second.neg()?, &first], D::Minus1)?;
        Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
    }
}

/// A Llama-family causal language model with optional LoRA factors on chosen linear layers.
#[derive(Debug, Clone)]
pub struct Llama {
    config: LlamaConfig,
    embed_tokens: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    /// The output head when it is not the embedding table used as it is: the untied `lm_head`
    /// (f32, packed after [`Llama::pack_base_f32`], or bf16 after [`Llama::pack_base_bf16`]), or
    /// a copy of tied embeddings (bf16 after `pack_base_bf16` on the CPU; packed f32 after
    /// `pack_base_f32` where its AVX-512 or AVX2 kernel runs). The base is frozen, so a copy never
    /// goes stale. `None`: tied, and the head is `embed_tokens`.
    head: Option<FrozenWeight>,
    rope: Rope,
    device: Device,
}

impl Llama {
    /// Builds the model from Hugging Face weight names (`model.layers.{i}.self_attn.q_proj.weight`…),
    /// converting every weight to f32. The weights stay frozen: none becomes a `Var`.
    pub fn from_weights(
        config: LlamaConfig,
        weights: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        Self::from_parts(config, weights, HashMap::new(), device)
    }

    /// As [`Llama::from_weights`], with some projection weights already quantized (QLoRA on a
    /// quantized checkpoint): a projection found in `quantized` is used as it is.
    pub fn from_parts(
        config: LlamaConfig,
        mut weights: HashMap<String, Tensor>,
        mut quantized: HashMap<String, std::sync::Arc<candle_core::quantized::QTensor>>,
        device: &Device,
    ) -> Result<Self> {
        let dims = config.dims();
        let (hidden, vocab) = (config.hidden_size, config.vocab_size);
        // Every weight is checked against the shape the config implies, so that a config.json
        // beside another model's weights is refused here, naming the tensor, and not at the
        // first forward pass with a shape error naming neither.
        let mut take = |name: String, expected: &[usize]| -> Result<Tensor> {
            let tensor = weights
                .remove(&name)
                .ok_or_else(|| ClientError::MissingWeight(name.clone()))?;
            check_shape(&name, tensor.dims(), expected)?;
            Ok(tensor.to_dtype(DType::F32)?.to_device(device)?)
        };
        let eps = config.rms_norm_eps;
        // Qwen2 has biases on q/k/v; Llama's `attention_bias` puts them on q/k/v/o.
        let required_biases: &[&str] = if config.attention_bias {
            &[
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
            ]
        } else if config.model_type == "qwen2" {
            &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
        } else {
            &[]
        };
        let embed_tokens = take("model.embed_tokens.weight".into(), &[vocab, hidden])?;
        let mut blocks = Vec::new();
        for layer in 0..config.num_hidden_layers {
            let prefix = format!("model.layers.{layer}");
            let mut linear = |name: &str| -> Result<LoraLinear> {
                let module = name.rsplit('.').next().unwrap_or(name);
                let (in_features, out_features) = dims.module_in_out(module)?;
                let bias_name = format!("{prefix}.{name}.bias");
                let bias = match take(bias_name, &[out_features]) {
                    Ok(bias) => Some(bias),
                    Err(ClientError::MissingWeight(bias_name)) => {
                        if required_biases.contains(&name) {
                            return Err(ClientError::MissingWeight(bias_name));
                        }
                        None
                    }
                    Err(error) => return Err(error),
                };
                let weight_name = format!("{prefix}.{name}.weight");
                let weight = match quantized.remove(&weight_name) {
                    Some(weight) => {
                        check_shape(
                            &weight_name,
                            weight.shape().dims(),
                            &[out_features, in_features],
                        )?;
                        FrozenWeight::Quantized(weight)
                    }
                    None => FrozenWeight::Dense(take(weight_name, &[out_features, in_features])?),
                };
                Ok(LoraLinear::new(weight, bias))
            };
            let attention = Attention {
                q_proj: linear("self_attn.q_proj")?,
                k_proj: linear("self_attn.k_proj")?,
                v_proj: linear("self_attn.v_proj")?,
                o_proj: linear("self_attn.o_proj")?,
            };
            let mlp = Mlp {
                gate_proj: linear("mlp.gate_proj")?,
                up_proj: linear("mlp.up_proj")?,
                down_proj: linear("mlp.down_proj")?,
            };
            blocks.push(Block {
                input_layernorm: RmsNorm {
                    weight: take(format!("{prefix}.input_layernorm.weight"), &[hidden])?,
                    eps,
                },
                attention,
                post_attention_layernorm: RmsNorm {
                    weight: take(
                        format!("{prefix}.post_attention_layernorm.weight"),
                        &[hidden],
                    )?,
                    eps,
                },
                mlp,
            });
        }
        let norm = RmsNorm {
            weight: take("model.norm.weight".into(), &[hidden])?,
            eps,
        };
        let head = if config.tie_word_embeddings {
            None
        } else {
            Some(FrozenWeight::Dense(take(
                "lm_head.weight".into(),
                &[vocab, hidden],
            )?))
        };
        check_leftovers(&config, weights.keys().chain(quantized.keys()));
        let rope = Rope::new(&config, device)?;
        Ok(Self {
            config,
            embed_tokens,
            blocks,
            norm,
            head,
            rope,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Attaches fresh PEFT-initialised LoRA factors to the modules of `lora` in every layer,
    /// replacing any attached before: each module's rank and alpha after `rank_pattern` and
    /// `alpha_pattern`, with DoRA magnitudes and dropout as `lora` asks.
    pub fn attach_lora(&mut self, lora: &LoraSpec, seed: u64) -> Result<()> {
        let patterns = lora.patterns()?;
        let device = self.device.clone();
        for (layer, block) in self.blocks.iter_mut().enumerate() {
            for (name, linear) in block.linears_mut() {
                linear.detach()?;
                if lora.target_modules.iter().any(|target| target == name) {
                    let (in_features, out_features) = linear.in_out();
                    let mut factors = LoraFactors::peft_init(
                        seed,
                        layer,
                        name,
                        (patterns.rank_for(layer, name), in_features, out_features),
                        patterns.scale_for(layer, name),
                        &device,
                    )?;
                    factors.dropout = lora.dropout;
                    linear.attach(factors, lora.use_dora)?;
                }
            }
        }
        Ok(())
    }

    /// Removes every adapter: the base model again (merged adapters are unmerged first).
    pub fn detach_lora(&mut self) -> Result<()> {
        for linear in self.projections_mut() {
            linear.detach()?;
        }
        Ok(())
    }

    /// Folds the attached adapter into the weights for inference at the base model's cost;
    /// [`Llama::unmerge_lora`] restores the base. Not for training: merged factors are not used.
    pub fn merge_lora(&mut self) -> Result<()> {
        let quantized = self
            .blocks
            .iter()
            .flat_map(|block| block.linears())
            .any(|(_, linear)| linear.lora.is_some() && !linear.can_merge());
        if quantized {
            return Err(ClientError::Unsupported(
                "merging into a quantized base is not supported; load it unquantized".into(),
            ));
        }
        for linear in self.projections_mut() {
            linear.merge()?;
        }
        Ok(())
    }

    /// Undoes [`Llama::merge_lora`].
    pub fn unmerge_lora(&mut self) -> Result<()> {
        for linear in self.projections_mut() {
            linear.unmerge()?;
        }
        Ok(())
    }

    /// Replaces the attached adapter with `adapter` (a PEFT adapter of layout `lora`): switching
    /// between adapters held in memory costs a copy of their factors.
    pub fn set_adapter(&mut self, lora: &LoraSpec, adapter: &Adapter) -> Result<()> {
        // Checked before anything is allocated for the spec's ranks: a config naming a rank its
        // tensors do not have is refused here, not by a failed allocation.
        adapter.validate(&adapter_spec(&self.config.dims(), lora)?)?;
        self.attach_lora(lora, 0)?;
        self.load_adapter(adapter)
    }

    /// The trainable variables, in a fixed order (layer, module, A, B, then DoRA's magnitude).
    pub fn lora_vars(&self) -> Vec<Var> {
        self.blocks
            .iter()
            .flat_map(|block| block.linears())
            .filter_map(|(_, linear)| linear.lora.as_ref())
            .flat_map(|lora| {
                [
                    Some(lora.a.clone()),
                    Some(lora.b.clone()),
                    lora.magnitude.clone(),
                ]
            })
            .flatten()
            .collect()
    }

    /// `(PEFT name, variable)` for every trainable tensor.
    pub fn named_lora_vars(&self) -> Result<Vec<(String, Var)>> {
        let mut named = Vec::new();
        for (layer, block) in self.blocks.iter().enumerate() {
            for (module, linear) in block.linears() {
                if let Some(lora) = &linear.lora {
                    named.push((peft_key(layer, module, Factor::A)?, lora.a.clone()));
                    named.push((peft_key(layer, module, Factor::B)?, lora.b.clone()));
                    if let Some(magnitude) = &lora.magnitude {
                        named.push((
                            peft_key(layer, module, Factor::Magnitude)?,
                            magnitude.clone(),
                        ));
                    }
                }
            }
        }
        Ok(named)
    }

    /// The current LoRA factors as an adapter in PEFT naming.
    pub fn export_adapter(&self) -> Result<Adapter> {
        let mut adapter = Adapter::default();
        for (name, var) in self.named_lora_vars()? {
            adapter
                .tensors
                .insert(name, to_adapter_tensor(var.as_tensor())?);
        }
        Ok(adapter)
    }

    /// Loads factor values from `adapter` into the attached LoRA variables. The adapter must hold
    /// exactly the attached tensors with their shapes.
    pub fn load_adapter(&mut self, adapter: &Adapter) -> Result<()> {
        // New factor values must not meet weights that still hold the old ones folded in.
        self.unmerge_lora()?;
        let named = self.named_lora_vars()?;
        if named.len() != adapter.tensors.len() {
            return Err(ClientError::Protocol(format!(
                "adapter has {} tensors, the model has {} lora factors attached",
                adapter.tensors.len(),
                named.len()
            )));
        }
        // Every name, shape and value checked before the first factor changes: a bad file
        // (a NaN, a tensor of another rank) leaves the attached factors as they were.
        let layout: Vec<TensorSpec> = named
            .iter()
            .map(|(name, var)| TensorSpec {
                name: name.clone(),
                shape: var.dims().to_vec(),
            })
            .collect();
        adapter.validate(&layout)?;
        for (name, var) in named {
            let AdapterTensor { shape, data } = adapter
                .tensors
                .get(&name)
                .ok_or_else(|| fedlora_proto::adapter::AdapterError::MissingTensor(name.clone()))?;
            var.set(&Tensor::from_slice(data, shape.as_slice(), &self.device)?)?;
        }
        Ok(())
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.forward_train(input_ids, None)
    }

    /// As [`Llama::forward`]; with `dropout_seed`, LoRA dropout is applied with masks drawn from
    /// it (pass a new seed for every training step).
    pub fn forward_train(&self, input_ids: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        let hidden = self.hidden_states(input_ids, None, None, dropout_seed)?;
        self.head(&hidden)
    }

    /// Final-norm hidden states `[batch, seq, hidden]` (training: dropout from `dropout_seed`);
    /// [`Llama::head_weight`] turns them into logits. With `documents`, the documents packed
    /// into each row are kept apart: each position attends only to its own document, and
    /// rotary positions restart at each document, so a packed document's states are those it
    /// would have alone.
    pub fn hidden_train(
        &self,
        input_ids: &Tensor,
        documents: Option<&DocumentStarts>,
        dropout_seed: Option<u64>,
    ) -> Result<Tensor> {
        self.hidden_states(input_ids, None, documents, dropout_seed)
    }

    /// The output head `[vocab, hidden]` (the embeddings when tied), as the forward pass uses it.
    pub fn head_weight(&self) -> FrozenWeight {
        self.head
            .clone()
            .unwrap_or_else(|| FrozenWeight::Dense(self.embed_tokens.clone()))
    }

    /// Logits `[batch, vocab]` of the last position only.
    pub fn last_logits(&self, input_ids: &Tensor) -> Result<Tensor> {
        let hidden = self.hidden_states(input_ids, None, None, None)?;
        self.last_position_logits(&hidden)
    }

    /// QLoRA: keeps every projection's frozen weight quantized to `dtype` (e.g. Q8_0, about a
    /// quarter of f32's memory, or Q4K, about an eighth). A projection whose rows (its input
    /// width) are not a whole number of `dtype`'s blocks (256 values for the k-quants) gets Q8_0
    /// if they fit its blocks of 32, as llama.cpp falls back, and stays f32 otherwise;
    /// [`Llama::projection_dtypes`] reports what each got. Embeddings, norms and the output head
    /// stay f32. Gradients still reach the LoRA factors below quantized layers (see `frozen.rs`).
    pub fn quantize_base(&mut self, dtype: candle_core::quantized::GgmlDType) -> Result<()> {
        for linear in self.projections_mut() {
            let (in_features, _) = linear.in_out();
            if let Some(fitting) = quantized_type_for(in_features, dtype) {
                linear.quantize_weight(fitting)?;
            }
        }
        Ok(())
    }

    /// For decoding (`generate --quantize-base`): the output head in Q8_0 too, where its rows are
    /// whole blocks of 32 (else it stays as it is). A tied head gets a quantized copy of the
    /// embedding table, which the lookup keeps in f32. Each token reads the head once, and in f32
    /// a tied SmolLM2-135M head is 113 MB, more than its quantized layers together. Not for
    /// training: QLoRA keeps the head unquantized, as PEFT does.
    pub fn quantize_head(&mut self) -> Result<()> {
        use candle_core::quantized::GgmlDType;
        let head = match &self.head {
            Some(head) => head.clone(),
            None => FrozenWeight::Dense(self.embed_tokens.clone()),
        };
        let (_, in_features) = head.dims2()?;
        if in_features % GgmlDType::Q8_0.block_size() != 0 {
            tracing::warn!(
                in_features,
                "the output head's rows are not whole Q8_0 blocks: kept"
            );
            return Ok(());
        }
        self.head = Some(head.quantized(GgmlDType::Q8_0)?);
        Ok(())
    }

    /// Keeps every frozen projection and the output head in bf16 (rounded once), multiplied with
    /// bf16 activations and f32 accumulation (`packed_gemm`: AMX tiles or AVX-512 BF16 where the
    /// CPU has them).
    /// The arithmetic of PyTorch's bf16 autocast, at the speed of bf16 products; the LoRA factors,
    /// their gradients, norms, attention and the loss stay f32. On a checkpoint stored in bf16
    /// (most are) no weight changes value. Dense weights only. Off the CPU (a GPU), the same
    /// arithmetic runs on the device's own bf16 matmuls: [`Llama::cast_base`].
    pub fn pack_base_bf16(&mut self) -> Result<()> {
        if !self.device.is_cpu() {
            return self.cast_base(DType::BF16);
        }
        if !super::packed_gemm::bf16_simd_available() {
            tracing::warn!(
                "this CPU lacks AVX-512 BF16: the bf16 base runs a portable loop, slower than the \
                 f32 base"
            );
        } else if super::packed_gemm::amx_available() {
            tracing::debug!("bf16 base multiplied on AMX tiles");
        } else if let Some(peak) = super::cpu_peak::measure() {
            let bf16 = peak.bf16_gflops.unwrap_or(0.0);
            if bf16 < BF16_HINT_RATIO * peak.f32_gflops {
                tracing::warn!(
                    bf16_gflops = bf16.round(),
                    f32_gflops = peak.f32_gflops.round(),
                    "this CPU's bf16 dot products (vdpbf16ps) run less than 1.25x as fast as its \
                     f32 FMAs: the bf16 base is unlikely to train faster here than the f32 one \
                     (an Intel Xeon without AMX, at 0.5x, trained slower; its sure gain is a \
                     smaller peak memory)"
                );
            }
        }
        for linear in self.projections_mut() {
            linear.pack_weight_bf16()?;
        }
        // Replaces an untied f32 head (same memory: bf16 packed twice); tied embeddings stay f32
        // for the lookup, and the head gets its own bf16 copy.
        let head = self
            .head
            .clone()
            .unwrap_or_else(|| FrozenWeight::Dense(self.embed_tokens.clone()));
        self.head = Some(head.packed_bf16()?);
        Ok(())
    }

    /// Keeps every dense frozen projection and an untied output head as `dtype` tensors (bf16 on
    /// a GPU), multiplied by the device's own matmul: each product casts the f32 activations to
    /// `dtype` and its result back, so the LoRA factors, norms, attention, the loss and every
    /// gradient stay f32 (PyTorch's bf16 autocast, without custom kernels). Works on any device;
    /// on the CPU [`Llama::pack_base_bf16`] is the fast way to the same arithmetic. Tied
    /// embeddings stay f32.
    pub fn cast_base(&mut self, dtype: DType) -> Result<()> {
        for linear in self.projections_mut() {
            linear.cast_weight(dtype)?;
        }
        if let Some(FrozenWeight::Dense(head)) = &self.head {
            self.head = Some(FrozenWeight::Dense(head.to_dtype(dtype)?));
        }
        Ok(())
    }

    /// Holds the frozen base as `base` says: quantized to its type ([`Llama::quantize_base`]),
    /// packed in f32 ([`Llama::pack_base_f32`]) or bf16 ([`Llama::pack_base_bf16`]), or as
    /// loaded (`F32Unpacked`).
    pub fn apply_base_precision(&mut self, base: super::BasePrecision) -> Result<()> {
        match base {
            super::BasePrecision::F32 => self.pack_base_f32(),
            super::BasePrecision::F32Unpacked => Ok(()),
            super::BasePrecision::Bf16 => self.pack_base_bf16(),
            super::BasePrecision::Quantized(quant) => self.quantize_base(quant.ggml()),
        }
    }

    /// Packs every frozen projection and the output head in f32 for `packed_gemm`'s
    /// AVX-512 or AVX2 kernel, once, instead of letting a general GEMM pack them on every product.
    /// Same values and arithmetic (f32 products, f32 accumulation); twice the memory of those
    /// weights, since each is packed for both of its products. Does nothing on CPUs with neither
    /// AVX-512F nor AVX2 and FMA, or off the CPU.
    ///
    /// A tied head (the embedding table) is packed too: two more copies of the largest matrix
    /// beside the table the lookup keeps. On SmolLM2 dims (49152 × 576) that is 173–192 MiB more
    /// peak RSS for a step 6–7% faster (`bench-train --preset smollm2`, four alternating pairs
    /// each: AMD EPYC Zen 5 with the AVX-512 kernel 541–546 → 573–583 tokens/s, AMD EPYC Zen 3
    /// with the AVX2 kernel 228–232 → 242–252, where candle's GEMM had a fifth of the step's
    /// samples; on the Zen 3 at fac21cb, before the fused attention and other changes to the
    /// rest of the step, it had measured no faster).
    ///
    /// DoRA rebuilds each dense weight from its packing every step for its row norms (a copy of
    /// the weight: cheap next to the products). Merging makes a projection dense; unmerging packs
    /// it again.
    pub fn pack_base_f32(&mut self) -> Result<()> {
        if !self.device.is_cpu() || !super::packed_gemm::f32_simd_available() {
            return Ok(());
        }
        if super::packed_gemm::amx_in_cpu() {
            tracing::info!(
                "this CPU has AMX: the bf16 base (--bf16-base) trains 1.4-1.9x as fast as the \
                 f32 one here"
            );
        } else if super::packed_gemm::bf16_simd_available()
            && let Some(peak) = super::cpu_peak::measure()
            && let Some(bf16) = peak.bf16_gflops
            && bf16 >= BF16_HINT_RATIO * peak.f32_gflops
        {
            tracing::info!(
                bf16_gflops = bf16.round(),
                f32_gflops = peak.f32_gflops.round(),
                "this CPU's bf16 dot products (vdpbf16ps) outrun its f32 FMAs: the bf16 base \
                 (--bf16-base) trains faster here (measured on an AMD EPYC Zen 5: 1.5x)"
            );
        }
        for linear in self.projections_mut() {
            linear.pack_weight_f32()?;
        }
        if let Some(head) = &self.head {
            self.head = Some(head.packed_f32()?);
        } else {
            // Tied: packings of its own beside the embedding table, which the lookup keeps.
            self.head = Some(FrozenWeight::Dense(self.embed_tokens.clone()).packed_f32()?);
        }
        Ok(())
    }

    /// How each frozen projection, and the output head (`lm_head`), is held
    /// ([`FrozenWeight::kind`]).
    pub fn frozen_kinds(&self) -> Vec<(String, &'static str)> {
        let mut kinds: Vec<_> = self
            .projections()
            .map(|(path, linear)| (path, linear.frozen_weight().kind()))
            .collect();
        kinds.push(("lm_head".into(), self.head_weight().kind()));
        kinds
    }

    /// Each projection's module path and frozen weight type (`None`: dense f32).
    pub fn projection_dtypes(&self) -> Vec<(String, Option<candle_core::quantized::GgmlDType>)> {
        self.projections()
            .map(|(path, linear)| (path, linear.quantized_dtype()))
            .collect()
    }

    /// Every projection with its module path (`model.layers.3.self_attn.q_proj`), in layer order.
    fn projections(&self) -> impl Iterator<Item = (String, &LoraLinear)> {
        self.blocks.iter().enumerate().flat_map(|(layer, block)| {
            block.linears().map(move |(module, linear)| {
                (fedlora_proto::adapter::module_path(layer, module), linear)
            })
        })
    }

    /// Every projection, mutably, in layer order.
    fn projections_mut(&mut self) -> impl Iterator<Item = &mut LoraLinear> {
        self.blocks
            .iter_mut()
            .flat_map(|block| block.linears_mut().map(|(_, linear)| linear))
    }

    /// Every weight under its Hugging Face name, with the attached LoRA factors merged into the
    /// adapted projections (W₀ + s·B·A): the model as a plain checkpoint that needs no adapter.
    pub fn merged_weights(&self) -> Result<HashMap<String, Tensor>> {
        self.merged_tensors()?
            .into_iter()
            .map(|tensor| Ok((tensor.name.clone(), tensor.compute()?)))
            .collect()
    }

    /// The tensors of [`Llama::merged_weights`], in checkpoint order (embedding, layer by layer,
    /// final norm, output head), each with its name and shape, computed only when asked: a
    /// writer holds one at a time, never the merged model whole.
    pub fn merged_tensors(&self) -> Result<Vec<MergedTensor<'_>>> {
        let plain = |name: String, tensor: &Tensor| MergedTensor {
            name,
            shape: tensor.dims().to_vec(),
            source: MergedSource::Plain(tensor.clone()),
        };
        let mut tensors = vec![plain(
            "model.embed_tokens.weight".into(),
            &self.embed_tokens,
        )];
        for (layer, block) in self.blocks.iter().enumerate() {
            let prefix = format!("model.layers.{layer}");
            for (module, linear) in block.linears() {
                let block_name = if is_attention(module) {
                    "self_attn"
                } else {
                    "mlp"
                };
                let name = format!("{prefix}.{block_name}.{module}");
                let (out_features, in_features) = linear.frozen_weight().dims2()?;
                tensors.push(MergedTensor {
                    name: format!("{name}.weight"),
                    shape: vec![out_features, in_features],
                    source: MergedSource::Linear(linear),
                });
                if let Some(bias) = linear.bias() {
                    tensors.push(plain(format!("{name}.bias"), bias));
                }
            }
            tensors.push(plain(
                format!("{prefix}.input_layernorm.weight"),
                &block.input_layernorm.weight,
            ));
            tensors.push(plain(
                format!("{prefix}.post_attention_layernorm.weight"),
                &block.post_attention_layernorm.weight,
            ));
        }
        tensors.push(plain("model.norm.weight".into(), &self.norm.weight));
        if let (false, Some(head)) = (self.config.tie_word_embeddings, &self.head) {
            let (out_features, in_features) = head.dims2()?;
            tensors.push(MergedTensor {
                name: "lm_head.weight".into(),
                shape: vec![out_features, in_features],
                source: MergedSource::Head(head),
            });
        }
        Ok(tensors)
    }

    /// An empty key/value cache for incremental decoding with [`Llama::last_logits_cached`].
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: (0..self.blocks.len()).map(|_| None).collect(),
            len: 0,
            max_len: self.max_sequence_len(),
        }
    }

    /// Logits `[batch, vocab]` after the new tokens `input_ids`, which continue the sequence held
    /// in `cache`; their keys and values are appended to it. For generation (no gradients).
    pub fn last_logits_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let hidden = self.hidden_states(input_ids, Some(cache), None, None)?;
        self.last_position_logits(&hidden)
    }

    /// Longest sequence (prompt and generated tokens together) the model runs.
    pub fn max_sequence_len(&self) -> usize {
        let limit = self.config.max_position_embeddings.min(ROPE_TABLE_MAX);
        self.config
            .attention_window()
            .map_or(limit, |window| limit.min(window.max(1)))
    }

    fn last_position_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let seq_len = hidden.dim(1)?;
        Ok(self.head(&hidden.narrow(1, seq_len - 1, 1)?)?.squeeze(1)?)
    }

    fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        match &self.head {
            Some(head) => super::frozen::frozen_matmul_t(hidden, head),
            None => super::frozen::frozen_matmul_t(hidden, &self.embed_tokens.clone().into()),
        }
    }

    /// Final-norm hidden states `[batch, seq, hidden]`, continuing `cache` when given.
    fn hidden_states(
        &self,
        input_ids: &Tensor,
        mut cache: Option<&mut KvCache>,
        documents: Option<&DocumentStarts>,
        dropout_seed: Option<u64>,
    ) -> Result<Tensor> {
        let (batch, seq_len) = input_ids.dims2()?;
        let offset = cache.as_ref().map_or(0, |cache| cache.len);
        let max_len = self.max_sequence_len();
        if seq_len == 0 || offset + seq_len > max_len {
            return Err(ClientError::Unsupported(format!(
                "sequence of {} tokens (1 to {max_len} allowed)",
                offset + seq_len
            )));
        }
        if let Some(documents) = documents
            && (documents.dims() != (batch, seq_len) || cache.is_some())
        {
            return Err(ClientError::InvalidArgument(format!(
                "document starts of a {:?} batch for a [{batch}, {seq_len}] batch{}",
                documents.dims(),
                if cache.is_some() { " with a cache" } else { "" }
            )));
        }
        let mut hidden = self
            .embed_tokens
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((batch, seq_len, self.config.hidden_size))?;
        // The fused CPU attention masks by itself (f32 activations: a bf16 base casts back);
        // candle's ops elsewhere add a mask to the scores.
        let mask = if self.device.is_cpu() && hidden.dtype() == DType::F32 {
            None
        } else {
            Some(match documents {
                Some(documents) => document_mask(documents, &self.device)?,
                None => causal_mask(seq_len, offset, &self.device)?,
            })
        };
        for (layer, block) in self.blocks.iter().enumerate() {
            let slot = cache.as_deref_mut().and_then(|cache| {
                let max_len = cache.max_len;
                cache.layers.get_mut(layer).map(|keys_values| CacheSlot {
                    keys_values,
                    offset,
                    max_len,
                })
            });
            let position = Position {
                offset,
                documents,
                rope: &self.rope,
                mask: mask.as_ref(),
                cache: slot,
                dropout_seed: dropout_seed.map(|seed| mix_seed(seed, layer as u64)),
            };
            hidden = block.forward(&hidden, position, &self.config)?;
        }
        if let Some(cache) = cache {
            cache.len += seq_len;
        }
        self.norm.forward(&hidden)
    }
}

/// Whether a Hugging Face weight name is one of the seven frozen projections
/// (`model.layers.{i}.self_attn.q_proj.weight`, ..., `model.layers.{i}.mlp.down_proj.weight`),
/// what QLoRA quantizes.
pub(crate) fn is_projection_weight(name: &str) -> bool {
    name.starts_with("model.layers.") && name.ends_with("_proj.weight")
}

/// The type QLoRA keeps a projection with `in_features` inputs in: `dtype` where its rows are
/// whole blocks of it, else Q8_0 where they are whole blocks of that (as llama.cpp falls back),
/// else none: the projection stays f32, with a warning.
pub(crate) fn quantized_type_for(
    in_features: usize,
    dtype: candle_core::quantized::GgmlDType,
) -> Option<candle_core::quantized::GgmlDType> {
    use candle_core::quantized::GgmlDType;
    let fitting = [dtype, GgmlDType::Q8_0]
        .into_iter()
        .find(|candidate| in_features.is_multiple_of(candidate.block_size()));
    if fitting.is_none() {
        tracing::warn!(
            in_features,
            "a projection's rows are not whole blocks of {dtype:?} or Q8_0: kept in f32"
        );
    }
    fitting
}

fn is_attention(module: &str) -> bool {
    matches!(module, "q_proj" | "k_proj" | "v_proj" | "o_proj")
}

impl Block {
    fn linears(&self) -> [(&'static str, &LoraLinear); 7] {
        [
            ("q_proj", &self.attention.q_proj),
            ("k_proj", &self.attention.k_proj),
            ("v_proj", &self.attention.v_proj),
            ("o_proj", &self.attention.o_proj),
            ("gate_proj", &self.mlp.gate_proj),
            ("up_proj", &self.mlp.up_proj),
            ("down_proj", &self.mlp.down_proj),
        ]
    }

    fn linears_mut(&mut self) -> [(&'static str, &mut LoraLinear); 7] {
        [
            ("q_proj", &mut self.attention.q_proj),
            ("k_proj", &mut self.attention.k_proj),
            ("v_proj", &mut self.attention.v_proj),
            ("o_proj", &mut self.attention.o_proj),
            ("gate_proj", &mut self.mlp.gate_proj),
            ("up_proj", &mut self.mlp.up_proj),
            ("down_proj", &mut self.mlp.down_proj),
        ]
    }

    fn forward(&self, x: &Tensor, position: Position<'_>, config: &LlamaConfig) -> Result<Tensor> {
        let seed = position.dropout_seed;
        let attended =
            self.attention
                .forward(&self.input_layernorm.forward(x)?, position, config)?;
        let x = (x + attended)?;
        let mlp = &self.mlp;
        let normed = self.post_attention_layernorm.forward(&x)?;
        let gate = mlp.gate_proj.forward_train(&normed, module_seed(seed, 4))?;
        let up = mlp.up_proj.forward_train(&normed, module_seed(seed, 5))?;
        let gated = if gate.device().is_cpu() && gate.dtype() == DType::F32 {
            super::fused::swiglu(&gate, &up)?
        } else {
            (gate.silu()? * up)?
        };
        Ok((x + mlp.down_proj.forward_train(&gated, module_seed(seed, 6))?)?)
    }
}

impl Attention {
    fn forward(&self, x: &Tensor, position: Position<'_>, config: &LlamaConfig) -> Result<Tensor> {
        let Position {
            offset,
            documents,
            rope,
            mask,
            cache,
            dropout_seed: seed,
        } = position;
        let (batch, seq_len, _) = x.dims3()?;
        let heads = config.num_attention_heads;
        let kv_heads = config.num_kv_heads();
        let head_dim = config.head_dim();
        // `[batch, seq, heads, head_dim]`, as the projections write them.
        let q = self
            .q_proj
            .forward_train(x, module_seed(seed, 0))?
            .reshape((batch, seq_len, heads, head_dim))?;
        let k = self
            .k_proj
            .forward_train(x, module_seed(seed, 1))?
            .reshape((batch, seq_len, kv_heads, head_dim))?;
        let v = self
            .v_proj
            .forward_train(x, module_seed(seed, 2))?
            .reshape((batch, seq_len, kv_heads, head_dim))?;
        let q = rope.apply(&q, offset, documents)?;
        let k = rope.apply(&k, offset, documents)?;
        // Every position's keys and values so far: the cache's, then this call's.
        let (k, v) = match cache {
            Some(slot) => slot.append(&k, &v)?,
            None => (k, v),
        };
        let scale = 1.0 / (head_dim as f64).sqrt();
        let Some(mask) = mask else {
            // One fused op in this layout, its output as `o_proj` takes it (`attention.rs`).
            let attended = super::attention::attention(&q, &k, &v, scale, documents)?.reshape((
                batch,
                seq_len,
                heads * head_dim,
            ))?;
            return self.o_proj.forward_train(&attended, module_seed(seed, 3));
        };
        let split =
            |tensor: Tensor| -> Result<Tensor> { Ok(tensor.transpose(1, 2)?.contiguous()?) };
        let (q, k, v) = (split(q)?, split(k)?, split(v)?);
        let k = repeat_kv(k, heads / kv_heads)?;
        let v = repeat_kv(v, heads / kv_heads)?;
        let scores = q.matmul(&k.t()?)?;
        let weights = candle_nn::ops::softmax(&(scores * scale)?.broadcast_add(mask)?, D::Minus1)?;
        let attended =
            weights
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((batch, seq_len, heads * head_dim))?;
        self.o_proj.forward_train(&attended, module_seed(seed, 3))
    }
}

/// Repeats each key/value head `n_rep` times: `[b, kv, t, d]` → `[b, kv·n_rep, t, d]`.
fn repeat_kv(x: Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (batch, kv_heads, seq_len, head_dim) = x.dims4()?;
    Ok(Tensor::cat(&vec![&x; n_rep], 2)?.reshape((batch, kv_heads * n_rep, seq_len, head_dim))?)
}

/// `[t, offset + t]`: query `i` (at position `offset + i`) sees keys up to its own position; −∞
/// elsewhere.
fn causal_mask(seq_len: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let total = offset + seq_len;
    let values: Vec<f32> = (0..seq_len)
        .flat_map(|row| {
            (0..total).map(move |col| {
                if col > offset + row {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(values, (seq_len, total), device)?)
}

/// `[batch, 1, t, t]` (added to scores): position `i` of row `b` sees the keys of its own document up to itself
/// (`documents.start(b, i)..=i`); −∞ elsewhere.
fn document_mask(documents: &DocumentStarts, device: &Device) -> Result<Tensor> {
    let (batch, seq_len) = documents.dims();
    let values: Vec<f32> = (0..batch * seq_len)
        .flat_map(|row| {
            let (b, query) = (row / seq_len, row % seq_len);
            let visible = documents.start(b, query)..=query;
            (0..seq_len).map(move |key| {
                if visible.contains(&key) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(
        values,
        (batch, 1, seq_len, seq_len),
        device,
    )?)
}

/// Keys and values of every layer for the positions seen so far, in the layout the projections
/// write and the fused attention reads, `[batch, positions, kv_heads, head_dim]`. Not `Clone`:
/// each layer's buffers are written in place as positions are added.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    len: usize,
    /// The model's longest sequence: no buffer grows past it.
    max_len: usize,
}

/// One layer's keys and values: buffers `[batch, capacity, kv_heads, head_dim]` whose first `len`
/// positions hold values. A new position is written in place; a full buffer is replaced by one
/// twice its size (up to the model's longest sequence), so the cache itself copies each
/// position `O(1)` times on average, where concatenating it with each new token copied all of it
/// every time. The fused CPU attention reads a batch of one sequence (generation's) in place;
/// several sequences' views are strided, and it copies them, as candle's ops off the CPU copy
/// the cache into their own layout every token.
#[derive(Debug)]
struct LayerCache {
    keys: Tensor,
    values: Tensor,
    len: usize,
}

/// A layer's place in a [`KvCache`], handed to its attention.
struct CacheSlot<'a> {
    keys_values: &'a mut Option<LayerCache>,
    /// Positions the whole cache holds: this layer's must be as many.
    offset: usize,
    max_len: usize,
}

/// Positions the first buffer of a layer's cache holds at least.
const CACHE_MIN_CAPACITY: usize = 64;

impl CacheSlot<'_> {
    /// Appends `k` and `v` (`[batch, t, kv_heads, head_dim]`, positions after those held) and
    /// returns every position's keys and values so far, views of the buffers. Values only: the
    /// cache holds no graph (generation takes no gradients).
    fn append(self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (batch, added, kv_heads, head_dim) = k.dims4()?;
        let held = self.keys_values.as_ref().map_or(0, |layer| layer.len);
        if held != self.offset {
            // A call that failed part way added positions to the layers before the failure.
            return Err(ClientError::InvalidArgument(format!(
                "a key/value cache out of step (a layer holds {held} of its {} positions, after \
                 a failed call): start a new cache",
                self.offset
            )));
        }
        let len = held + added;
        let capacity = self
            .keys_values
            .as_ref()
            .map_or(0, |layer| layer.keys.dim(1).unwrap_or(0));
        if len > capacity {
            let capacity = len
                .next_power_of_two()
                .max(CACHE_MIN_CAPACITY)
                .min(self.max_len)
                .max(len);
            let shape = (batch, capacity, kv_heads, head_dim);
            let grown = LayerCache {
                keys: Tensor::zeros(shape, k.dtype(), k.device())?,
                values: Tensor::zeros(shape, v.dtype(), v.device())?,
                len: held,
            };
            if let Some(old) = self.keys_values.as_ref() {
                grown
                    .keys
                    .slice_set(&old.keys.narrow(1, 0, held)?.contiguous()?, 1, 0)?;
                grown
                    .values
                    .slice_set(&old.values.narrow(1, 0, held)?.contiguous()?, 1, 0)?;
            }
            *self.keys_values = Some(grown);
        }
        let layer = self.keys_values.as_mut().ok_or_else(|| {
            ClientError::Unsupported("key/value cache slot left empty".to_string())
        })?;
        layer.keys.slice_set(&k.contiguous()?, 1, held)?;
        layer.values.slice_set(&v.contiguous()?, 1, held)?;
        layer.len = len;
        Ok((
            layer.keys.narrow(1, 0, len)?,
            layer.values.narrow(1, 0, len)?,
        ))
    }
}

impl KvCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Where a block's input sits in the sequence: RoPE offset, mask, and this layer's cache slot.
struct Position<'a> {
    offset: usize,
    /// Packed documents kept apart (training only, no cache).
    documents: Option<&'a DocumentStarts>,
    rope: &'a Rope,
    /// Added to the scores by candle's attention ops; `None` where the fused CPU op runs (CPU,
    /// f32 activations), which masks by itself.
    mask: Option<&'a Tensor>,
    cache: Option<CacheSlot<'a>>,
    /// Seed of this layer's LoRA dropout masks; `None` outside training.
    dropout_seed: Option<u64>,
}

/// Mixes a sub-stream id into a seed (SplitMix64's finaliser), so every layer and module of every
/// step draws an independent dropout mask.
fn mix_seed(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn module_seed(layer_seed: Option<u64>, module: u64) -> Option<u64> {
    layer_seed.map(|seed| mix_seed(seed, module))
}

/// One tensor of a merged checkpoint ([`Llama::merged_tensors`]): its name and shape, and what
/// computes it.
pub struct MergedTensor<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    source: MergedSource<'a>,
}

enum MergedSource<'a> {
    /// Kept as it is (embedding, norms, biases); a tensor clone shares its storage.
    Plain(Tensor),
    /// A projection, with its LoRA factors merged in.
    Linear(&'a LoraLinear),
    /// An untied output head.
    Head(&'a FrozenWeight),
}

impl MergedTensor<'_> {
    /// The tensor, in f32.
    pub fn compute(&self) -> Result<Tensor> {
        Ok(match &self.source {
            MergedSource::Plain(tensor) => tensor.to_dtype(DType::F32)?,
            MergedSource::Linear(linear) => linear.merged_weight()?,
            MergedSource::Head(head) => head.dequantize()?,
        })
    }
}

/// Refuses a weight whose shape is not the one the model's config implies.
fn check_shape(name: &str, found: &[usize], expected: &[usize]) -> Result<()> {
    if found == expected {
        return Ok(());
    }
    Err(ClientError::WeightShape {
        name: name.to_string(),
        found: found.to_vec(),
        expected: expected.to_vec(),
    })
}

/// What is left of a checkpoint once the model has taken its weights: rotary tables some
/// converters saved (recomputed here), a tied model's saved output head (the embedding is used,
/// as transformers ties it), layers past the config's `num_hidden_layers` (a config cut short to
/// try a model quickly, as transformers allows), and anything else: each logged, as a count, not
/// refused.
fn check_leftovers<'a>(config: &LlamaConfig, names: impl Iterator<Item = &'a String>) {
    let mut unused = Vec::new();
    let mut layers_beyond = 0;
    for name in names {
        let layer = name
            .strip_prefix("model.layers.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|layer| layer.parse::<usize>().ok());
        if let Some(layer) = layer
            && layer >= config.num_hidden_layers
        {
            layers_beyond = layers_beyond.max(layer + 1 - config.num_hidden_layers);
            continue;
        }
        if name.ends_with("rotary_emb.inv_freq") {
            continue;
        }
        if name == "lm_head.weight" && config.tie_word_embeddings {
            tracing::warn!(
                "the checkpoint has an lm_head.weight, but its config ties the output head to the \
                 embedding (tie_word_embeddings): the embedding is used, as transformers does"
            );
            continue;
        }
        unused.push(name.as_str());
    }
    if layers_beyond > 0 {
        tracing::warn!(
            used = config.num_hidden_layers,
            unused = layers_beyond,
            "the weights hold more layers than the config's num_hidden_layers: only the first \
             are used"
        );
    }
    if !unused.is_empty() {
        unused.sort_unstable();
        tracing::warn!(
            count = unused.len(),
            first = unused[0],
            "weights the model does not use"
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use crate::model::BaseModel;
    use crate::testing::{flat, max_abs_difference};
    use crate::tiny::{TinyModelSpec, write_tiny_model};

    use super::*;

    /// Two rows of packed documents: row 0 holds [0, 3) [3, 7) [7, 9), row 1 one document.
    fn two_rows() -> DocumentStarts {
        DocumentStarts::new(
            vec![0, 0, 0, 3, 3, 3, 3, 7, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            2,
            9,
        )
        .unwrap()
    }

    #[test]
    fn document_starts_are_checked() {
        assert_eq!(two_rows().positions()[..9], [0, 1, 2, 0, 1, 2, 3, 0, 1]);
        for (starts, batch, seq) in [
            (vec![0, 0, 1], 1, 3), // 1 neither starts at 2 nor continues 0
            (vec![0, 0], 1, 3),    // too few
            (vec![1, 1], 1, 2),    // the first position starts at 1
        ] {
            assert!(matches!(
                DocumentStarts::new(starts, batch, seq),
                Err(ClientError::InvalidArgument(_))
            ));
        }
    }

    #[test]
    fn fused_rope_and_attention_keep_documents_apart_as_candles_ops_do() {
        let dir = tempfile::tempdir().unwrap();
        let config = write_tiny_model(dir.path(), &TinyModelSpec::default()).unwrap();
        let rope = Rope::new(&config, &Device::Cpu).unwrap();
        let documents = two_rows();
        let head_dim = config.head_dim();
        crate::testing::assert_same_as_composed(
            &[2, 9, 3, head_dim],
            |x| rope.apply(x, 0, Some(&documents)).unwrap(),
            |x| rope.apply_composed(x, 0, Some(&documents)).unwrap(),
        );
        // Restarting positions is rotating each document as if it stood alone.
        let x = Tensor::randn(0f32, 1.0, (1, 4, 2, head_dim), &Device::Cpu).unwrap();
        let alone = rope.apply(&x, 0, None).unwrap();
        let packed = Tensor::cat(&[&x.narrow(1, 0, 3).unwrap(), &x], 1).unwrap();
        let packed = DocumentStarts::new(vec![0, 0, 0, 3, 3, 3, 3], 1, 7)
            .map(|documents| rope.apply(&packed, 0, Some(&documents)).unwrap())
            .unwrap();
        assert!(max_abs_difference(&flat(&alone), &flat(&packed.narrow(1, 3, 4).unwrap())) < 1e-6);
        // The document mask candle's ops add off the CPU gives the fused attention's values and
        // gradients (`x` as queries, keys and values at once).
        let mask = document_mask(&documents, &Device::Cpu).unwrap();
        crate::testing::assert_same_as_composed(
            &[2, 9, 3, head_dim],
            |x| super::super::attention::attention(x, x, x, 0.3, Some(&documents)).unwrap(),
            |x| {
                let x = x.transpose(1, 2).unwrap().contiguous().unwrap();
                let scores = x.matmul(&x.t().unwrap()).unwrap();
                let masked = (scores * 0.3).unwrap().broadcast_add(&mask).unwrap();
                candle_nn::ops::softmax(&masked, D::Minus1)
                    .unwrap()
                    .matmul(&x)
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
            },
        );
    }

    /// A packed row computes each of its documents as if it stood alone (attention and rotary
    /// positions restart at each start), through the whole model with LoRA attached.
    #[test]
    fn packed_documents_get_the_states_they_would_have_alone() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), &TinyModelSpec::default()).unwrap();
        let mut base = BaseModel::load(dir.path(), &Device::Cpu).unwrap();
        let lora = LoraSpec::new(4, 8.0, &fedlora_proto::adapter::LORA_MODULES);
        base.model.attach_lora(&lora, 3).unwrap();
        crate::testing::randomize_lora_b(&base.model, 0.2, 4);
        let model = &base.model;
        let documents: [&[u32]; 3] = [&[1, 40, 41], &[1, 7, 99, 150], &[1, 12]];
        let row: Vec<u32> = documents.concat();
        let packed = Tensor::from_slice(&row, (1, row.len()), &Device::Cpu).unwrap();
        let starts = DocumentStarts::new(vec![0, 0, 0, 3, 3, 3, 3, 7, 7], 1, 9).unwrap();
        let hidden = model.hidden_train(&packed, Some(&starts), None).unwrap();
        let mut first = 0;
        for document in documents {
            let alone = Tensor::from_slice(document, (1, document.len()), &Device::Cpu).unwrap();
            let expected = flat(&model.hidden_train(&alone, None, None).unwrap());
            let got = flat(&hidden.narrow(1, first, document.len()).unwrap());
            let difference = max_abs_difference(&expected, &got);
            assert!(difference < 1e-5, "document at {first}: {difference}");
            first += document.len();
        }
        // Without the starts, the later documents see the earlier ones.
        let mixed = flat(&model.hidden_train(&packed, None, None).unwrap());
        assert!(max_abs_difference(&flat(&hidden), &mixed) > 1e-3);
        // Starts of another shape are refused.
        let wrong = DocumentStarts::new(vec![0; 8], 1, 8).unwrap();
        assert!(model.hidden_train(&packed, Some(&wrong), None).is_err());
    }

    /// A layer's cache returns every position so far, exactly, in a buffer that doubles from
    /// [`CACHE_MIN_CAPACITY`] positions and stops at the model's longest sequence.
    #[test]
    fn cache_buffers_grow_by_doubling_and_hold_every_position_so_far() {
        for (max_len, steps) in [
            (100, &[(5, 64), (1, 64), (60, 100), (1, 100), (30, 100)][..]),
            (
                1000,
                &[(5, 64), (60, 128), (1, 128), (100, 256), (300, 512)],
            ),
        ] {
            assert_cache_grows(max_len, steps);
        }
        // A layer behind the cache's length (a failed call) is refused.
        let k = Tensor::zeros((1, 1, 2, 4), DType::F32, &Device::Cpu).unwrap();
        let mut layer = None;
        let slot = CacheSlot {
            keys_values: &mut layer,
            offset: 3,
            max_len: 100,
        };
        assert!(matches!(
            slot.append(&k, &k),
            Err(ClientError::InvalidArgument(_))
        ));
    }

    /// Appends `steps` (positions added, capacity expected after) to one layer's cache, checking
    /// every returned view against the concatenation, and the first view unchanged at the end.
    fn assert_cache_grows(max_len: usize, steps: &[(usize, usize)]) {
        let (batch, kv_heads, head_dim) = (2, 3, 4);
        let mut layer = None;
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        let mut first = None;
        for &(added, capacity) in steps {
            let shape = (batch, added, kv_heads, head_dim);
            let k = Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
            let v = Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
            let slot = CacheSlot {
                keys_values: &mut layer,
                offset: keys.iter().map(|k: &Tensor| k.dim(1).unwrap()).sum(),
                max_len,
            };
            let (all_k, all_v) = slot.append(&k, &v).unwrap();
            keys.push(k);
            values.push(v);
            let expected_k = Tensor::cat(&keys, 1).unwrap();
            let expected_v = Tensor::cat(&values, 1).unwrap();
            assert_eq!(all_k.dims(), expected_k.dims());
            assert_eq!(flat(&all_k), flat(&expected_k));
            assert_eq!(flat(&all_v), flat(&expected_v));
            let held = layer.as_ref().unwrap();
            assert_eq!(
                (held.keys.dim(1).unwrap(), held.len),
                (capacity, all_k.dim(1).unwrap())
            );
            first.get_or_insert((flat(&all_k), all_k));
        }
        let (values_then, view) = first.unwrap();
        assert_eq!(
            flat(&view),
            values_then,
            "a view changed under later appends"
        );
    }

    /// Decoding with the projections and the head quantized (`generate --quantize-base`:
    /// candle's quantized matmul for each token's row, its input rounded to 8 bits) gives the
    /// logits of recomputing the sequence, and stays within Q8_0's rounding (2% of the largest
    /// logit measured) of the f32 model's.
    #[test]
    fn quantized_cached_decoding_stays_close_to_the_f32_model() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TinyModelSpec {
            intermediate_size: 192,
            ..TinyModelSpec::default()
        };
        write_tiny_model(dir.path(), &spec).unwrap();
        let f32_model = BaseModel::load(dir.path(), &Device::Cpu).unwrap().model;
        let mut quantized = BaseModel::load(dir.path(), &Device::Cpu).unwrap().model;
        quantized
            .quantize_base(candle_core::quantized::GgmlDType::Q8_0)
            .unwrap();
        quantized.quantize_head().unwrap();
        assert!(matches!(quantized.head, Some(FrozenWeight::Quantized(_))));
        let tokens: Vec<u32> = vec![40, 41, 7, 99, 150, 3, 12, 200, 201];
        let mut cache = quantized.new_cache();
        let prompt = Tensor::from_slice(&tokens[..4], (1, 4), &Device::Cpu).unwrap();
        let mut cached = vec![quantized.last_logits_cached(&prompt, &mut cache).unwrap()];
        for token in &tokens[4..] {
            let step = Tensor::from_slice(&[*token], (1, 1), &Device::Cpu).unwrap();
            cached.push(quantized.last_logits_cached(&step, &mut cache).unwrap());
        }
        for (index, logits) in cached.iter().enumerate() {
            let end = 4 + index;
            let full = Tensor::from_slice(&tokens[..end], (1, end), &Device::Cpu).unwrap();
            // Under 16 rows the full sequence takes the quantized matmul too, row by row, so
            // the cache changes nothing but the order of the attention's sums.
            let recomputed = flat(&quantized.last_logits(&full).unwrap());
            let difference = max_abs_difference(&recomputed, &flat(logits));
            assert!(
                difference < 1e-4,
                "position {end}: {difference} from recomputing"
            );
            let expected = flat(&f32_model.last_logits(&full).unwrap());
            let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
            let difference = max_abs_difference(&expected, &flat(logits));
            assert!(
                difference > 0.0 && difference < 0.05 * scale,
                "position {end}: logits differ from f32 by {difference} (largest {scale})"
            );
        }
    }

    /// The path off the CPU or in other dtypes (candle's ops, the `[t, T]` causal mask added to
    /// the scores, the cache transposed into their layout), run here on the CPU: decoding a
    /// prompt then token by token through the cache gives the fused attention's outputs over the
    /// whole sequence (grouped-query attention: the tiny model has 4 heads over 2).
    #[test]
    fn masked_attention_through_the_cache_matches_the_fused_op() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), &TinyModelSpec::default()).unwrap();
        let model = BaseModel::load(dir.path(), &Device::Cpu).unwrap().model;
        let (attention, config) = (&model.blocks[0].attention, &model.config);
        let x = Tensor::randn(0f32, 1.0, (1, 6, config.hidden_size), &Device::Cpu).unwrap();
        let whole = Position {
            offset: 0,
            documents: None,
            rope: &model.rope,
            mask: None,
            cache: None,
            dropout_seed: None,
        };
        let fused = attention.forward(&x, whole, config).unwrap();
        let mut layer = None;
        let mut offset = 0;
        for added in [3, 1, 2] {
            let mask = causal_mask(added, offset, &Device::Cpu).unwrap();
            let slot = CacheSlot {
                keys_values: &mut layer,
                offset,
                max_len: 64,
            };
            let step = Position {
                offset,
                documents: None,
                rope: &model.rope,
                mask: Some(&mask),
                cache: Some(slot),
                dropout_seed: None,
            };
            let input = x.narrow(1, offset, added).unwrap();
            let got = attention.forward(&input, step, config).unwrap();
            let expected = flat(&fused.narrow(1, offset, added).unwrap());
            let difference = max_abs_difference(&expected, &flat(&got));
            assert!(difference < 1e-5, "positions from {offset}: {difference}");
            offset += added;
        }
    }

    /// Incremental decoding with the cache gives the logits of re-running the whole sequence.
    #[test]
    fn cached_decoding_matches_full_recomputation() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), &TinyModelSpec::default()).unwrap();
        let base = BaseModel::load(dir.path(), &Device::Cpu).unwrap();
        let tokens: Vec<u32> = vec![40, 41, 7, 99, 150, 3, 12, 200, 201];
        let mut cache = base.model.new_cache();
        let prompt = Tensor::from_slice(&tokens[..4], (1, 4), &Device::Cpu).unwrap();
        let mut cached = vec![base.model.last_logits_cached(&prompt, &mut cache).unwrap()];
        for token in &tokens[4..] {
            let step = Tensor::from_slice(&[*token], (1, 1), &Device::Cpu).unwrap();
            cached.push(base.model.last_logits_cached(&step, &mut cache).unwrap());
        }
        assert_eq!(cache.len(), tokens.len());
        for (index, logits) in cached.iter().enumerate() {
            let end = 4 + index;
            let full = Tensor::from_slice(&tokens[..end], (1, end), &Device::Cpu).unwrap();
            let expected = flat(&base.model.last_logits(&full).unwrap());
            let difference = max_abs_difference(&expected, &flat(logits));
            assert!(
                difference < 1e-4,
                "position {end}: logits differ by {difference}"
            );
        }
    }
}
