//! Zero-copy views of an adapter's safetensors bytes, for consumers that stream over many updates
//! (the coordinator's aggregation): the values are read straight from the wire bytes into an
//! accumulator, with no per-update `Vec<f32>` in between.

use std::borrow::Cow;
use std::collections::HashMap;

use safetensors::tensor::{Dtype, SafeTensors, View};

use crate::adapter::{
    Adapter, AdapterError, AdapterTensor, CheckedTensor, TensorSpec, check_against_spec,
};

/// Floating-point types an adapter may use on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireDtype {
    F32,
    Bf16,
    F16,
}

impl WireDtype {
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 | Self::F16 => 2,
        }
    }

    fn from_safetensors(name: &str, dtype: Dtype) -> Result<Self, AdapterError> {
        match dtype {
            Dtype::F32 => Ok(Self::F32),
            Dtype::BF16 => Ok(Self::Bf16),
            Dtype::F16 => Ok(Self::F16),
            other => Err(AdapterError::UnsupportedDtype {
                name: name.to_string(),
                dtype: format!("{other:?}").to_lowercase(),
            }),
        }
    }

    fn safetensors(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::Bf16 => Dtype::BF16,
            Self::F16 => Dtype::F16,
        }
    }
}

/// One tensor of an encoded adapter, borrowed from the bytes.
#[derive(Debug, Clone)]
pub struct TensorBytes<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: WireDtype,
    pub data: &'a [u8],
}

impl TensorBytes<'_> {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.data.len() / self.dtype.size()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Index of the first NaN or infinity, from the exponent bits alone. Blocks are tested with
    /// a branch-free OR (which vectorises); only a block that holds one is searched.
    pub fn first_non_finite(&self) -> Option<usize> {
        const VALUES: usize = 64;
        let size = self.dtype.size();
        let bad = |value: &[u8]| -> bool {
            match self.dtype {
                WireDtype::F32 => {
                    let bits = u32::from_le_bytes([value[0], value[1], value[2], value[3]]);
                    bits & 0x7F80_0000 == 0x7F80_0000
                }
                WireDtype::Bf16 => u16::from_le_bytes([value[0], value[1]]) & 0x7F80 == 0x7F80,
                WireDtype::F16 => u16::from_le_bytes([value[0], value[1]]) & 0x7C00 == 0x7C00,
            }
        };
        self.data
            .chunks(VALUES * size)
            .enumerate()
            .find(|(_, block)| {
                block
                    .chunks_exact(size)
                    .fold(false, |found, value| found | bad(value))
            })
            .and_then(|(index, block)| {
                block
                    .chunks_exact(size)
                    .position(bad)
                    .map(|offset| index * VALUES + offset)
            })
    }

    /// `out[i] += weight · value[start + i]` for `out.len()` values from index `start`.
    pub fn accumulate(&self, start: usize, weight: f64, out: &mut [f64]) {
        let size = self.dtype.size();
        let bytes = &self.data[start * size..(start + out.len()) * size];
        match self.dtype {
            WireDtype::F32 => accumulate_as(bytes, weight, out, f32::from_le_bytes),
            WireDtype::Bf16 => accumulate_as(bytes, weight, out, |pair: [u8; 2]| {
                f32::from_bits(u32::from(u16::from_le_bytes(pair)) << 16)
            }),
            WireDtype::F16 => accumulate_as(bytes, weight, out, |pair: [u8; 2]| {
                half::f16::from_le_bytes(pair).to_f32()
            }),
        }
    }
}

/// `out[i] += weight · decode(bytes[i])`, monomorphised per dtype. Fixed-size blocks (decode 16
/// values, then 16 multiply-adds) let the compiler emit vector code; the tail goes one by one.
#[inline(always)]
fn accumulate_as<const SIZE: usize>(
    bytes: &[u8],
    weight: f64,
    out: &mut [f64],
    decode: impl Fn([u8; SIZE]) -> f32,
) {
    const LANES: usize = 16;
    let raw = |chunk: &[u8]| -> [u8; SIZE] {
        let mut word = [0u8; SIZE];
        word.copy_from_slice(chunk);
        word
    };
    let mut sums = out.chunks_exact_mut(LANES);
    let mut blocks = bytes.chunks_exact(LANES * SIZE);
    for (sums, block) in (&mut sums).zip(&mut blocks) {
        let mut values = [0.0f32; LANES];
        for (value, chunk) in values.iter_mut().zip(block.chunks_exact(SIZE)) {
            *value = decode(raw(chunk));
        }
        for (sum, value) in sums.iter_mut().zip(values) {
            *sum += weight * f64::from(value);
        }
    }
    for (sum, chunk) in sums
        .into_remainder()
        .iter_mut()
        .zip(blocks.remainder().chunks_exact(SIZE))
    {
        *sum += weight * f64::from(decode(raw(chunk)));
    }
}

/// Header bytes allowed per tensor of the task: a PEFT name, dtype, shape and offsets take about
/// 150.
pub const HEADER_BYTES_PER_TENSOR: u64 = 512;
/// Header bytes allowed on top, for `__metadata__` and alignment padding.
pub const HEADER_BYTES_SLACK: u64 = 4096;

/// The largest safetensors header an update for `spec` may announce.
pub fn header_limit(spec: &[TensorSpec]) -> u64 {
    HEADER_BYTES_PER_TENSOR
        .saturating_mul(spec.len() as u64)
        .saturating_add(HEADER_BYTES_SLACK)
}

/// The most bytes a valid update for `spec` can take: the header length prefix, the largest
/// header allowed, and every value in f32 (the widest wire dtype). An upload announcing more is
/// refused from its first message, before any chunk is buffered.
pub fn max_update_len(spec: &[TensorSpec]) -> u64 {
    let values = spec
        .iter()
        .map(|tensor| {
            tensor
                .shape
                .iter()
                .fold(1u64, |product, dim| product.saturating_mul(*dim as u64))
        })
        .fold(0u64, u64::saturating_add);
    values
        .saturating_mul(4)
        .saturating_add(8 + header_limit(spec))
}

/// Refuses an update whose header is larger than the task's tensors can need, from its 8-byte
/// length prefix and before anything is parsed: this bounds the tensor count, so a header of a
/// million entries (well within the update byte limit) costs no JSON parse.
pub fn check_header_size(bytes: &[u8], spec: &[TensorSpec]) -> Result<(), AdapterError> {
    let prefix: [u8; 8] = bytes
        .get(..8)
        .and_then(|prefix| prefix.try_into().ok())
        .ok_or_else(|| {
            AdapterError::Malformed(format!(
                "{} bytes is shorter than the 8-byte header length",
                bytes.len()
            ))
        })?;
    let announced = u64::from_le_bytes(prefix);
    let limit = header_limit(spec);
    if announced > limit {
        return Err(AdapterError::Malformed(format!(
            "header of {announced} bytes exceeds the limit of {limit} for the task's {} tensors",
            spec.len()
        )));
    }
    Ok(())
}

/// Validates an update's safetensors bytes against the task's layout without decoding a value
/// into memory: the header parsed (dtype f32, bf16 or f16; data lengths matching shapes), exactly
/// the tensors of `spec` with their shapes, and every value finite. It accepts exactly what
/// `Adapter::from_safetensors` followed by `Adapter::validate` accepts (the `update_validator`
/// fuzz target and `tests::bytes_validator_agrees_with_the_decoder` check that), in a fraction
/// of the time and memory; it is what the coordinator runs on every upload.
pub fn validate_bytes(bytes: &[u8], spec: &[TensorSpec]) -> Result<(), AdapterError> {
    let views = tensor_views(bytes)?;
    check_against_spec(spec, views.iter().map(|view| (view.name.as_str(), view)))
}

impl CheckedTensor for TensorBytes<'_> {
    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn first_non_finite(&self) -> Option<usize> {
        TensorBytes::first_non_finite(self)
    }
}

/// Views of every tensor in safetensors `bytes` (checked: a float dtype, data length matching
/// the shape). The header is parsed; no value is copied.
pub fn tensor_views(bytes: &[u8]) -> Result<Vec<TensorBytes<'_>>, AdapterError> {
    let file = SafeTensors::deserialize(bytes)
        .map_err(|error| AdapterError::Malformed(error.to_string().to_lowercase()))?;
    file.tensors()
        .into_iter()
        .map(|(name, view)| {
            let dtype = WireDtype::from_safetensors(&name, view.dtype())?;
            let shape = view.shape().to_vec();
            let data = view.data();
            if data.len() != shape.iter().product::<usize>() * dtype.size() {
                return Err(AdapterError::Malformed(format!(
                    "tensor {name:?} holds {} bytes for shape {shape:?}",
                    data.len()
                )));
            }
            Ok(TensorBytes {
                name,
                shape,
                dtype,
                data,
            })
        })
        .collect()
}

/// A tensor converted to a wire dtype on encoding.
struct Encoded<'a> {
    tensor: &'a AdapterTensor,
    dtype: WireDtype,
}

impl View for Encoded<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype.safetensors()
    }

    fn shape(&self) -> &[usize] {
        &self.tensor.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let values = self.tensor.data.iter();
        Cow::Owned(match self.dtype {
            WireDtype::F32 => values.flat_map(|value| value.to_le_bytes()).collect(),
            WireDtype::Bf16 => values
                .flat_map(|value| half::bf16::from_f32(*value).to_le_bytes())
                .collect(),
            WireDtype::F16 => values
                .flat_map(|value| half::f16::from_f32(*value).to_le_bytes())
                .collect(),
        })
    }

    fn data_len(&self) -> usize {
        self.tensor.data.len() * self.dtype.size()
    }
}

impl Adapter {
    /// Encodes as safetensors in `dtype` (round to nearest even for bf16 and f16).
    pub fn to_safetensors_as(
        &self,
        dtype: WireDtype,
        metadata: Option<HashMap<String, String>>,
    ) -> Result<Vec<u8>, AdapterError> {
        safetensors::tensor::serialize(
            self.tensors
                .iter()
                .map(|(name, tensor)| (name.as_str(), Encoded { tensor, dtype })),
            metadata,
        )
        .map_err(|error| AdapterError::Malformed(error.to_string().to_lowercase()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn adapter() -> Adapter {
        let mut adapter = Adapter::default();
        adapter.tensors.insert(
            "x.lora_A.weight".into(),
            AdapterTensor {
                shape: vec![2, 3],
                data: vec![1.0, -2.5, 0.125, 3.0, 1e-3, -7.0],
            },
        );
        adapter
    }

    #[test]
    fn oversized_headers_are_refused_before_parsing() {
        let spec = vec![TensorSpec {
            name: "x.lora_A.weight".into(),
            shape: vec![2, 3],
        }];
        let bytes = adapter().to_safetensors(None).unwrap();
        check_header_size(&bytes, &spec).unwrap();
        validate_bytes(&bytes, &spec).unwrap();
        // The same update with its header padded by spaces (valid safetensors) past the limit.
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let padding = header_limit(&spec) as usize + 1 - header_len;
        let mut padded = (header_limit(&spec) + 1).to_le_bytes().to_vec();
        padded.extend_from_slice(&bytes[8..8 + header_len]);
        padded.extend(std::iter::repeat_n(b' ', padding));
        padded.extend_from_slice(&bytes[8 + header_len..]);
        validate_bytes(&padded, &spec).unwrap();
        let error = check_header_size(&padded, &spec).unwrap_err().to_string();
        assert!(
            error.contains("header of 4609 bytes exceeds the limit of 4608"),
            "{error}"
        );
        // The largest valid update: f32 values, the largest header allowed.
        assert_eq!(max_update_len(&spec), 8 + 4608 + 6 * 4);
        assert!(bytes.len() as u64 <= max_update_len(&spec));
        let error = check_header_size(&bytes[..7], &spec)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("shorter than the 8-byte header length"),
            "{error}"
        );
    }

    #[test]
    fn every_dtype_round_trips_and_accumulates() {
        for dtype in [WireDtype::F32, WireDtype::Bf16, WireDtype::F16] {
            let bytes = adapter().to_safetensors_as(dtype, None).unwrap();
            let decoded = Adapter::from_safetensors(&bytes).unwrap();
            let views = tensor_views(&bytes).unwrap();
            assert_eq!(views.len(), 1);
            assert_eq!(views[0].dtype, dtype);
            assert_eq!(views[0].len(), 6);
            assert_eq!(views[0].first_non_finite(), None);
            let mut sums = vec![1.0; 4];
            views[0].accumulate(2, 2.0, &mut sums);
            let values = &decoded.tensors["x.lora_A.weight"].data;
            for (index, sum) in sums.iter().enumerate() {
                assert_eq!(*sum, 1.0 + 2.0 * f64::from(values[2 + index]), "{dtype:?}");
            }
            // Exactly representable values survive every dtype.
            assert_eq!(values[0], 1.0);
            assert_eq!(values[1], -2.5);
        }
    }

    #[test]
    fn non_finite_values_are_found_in_every_dtype() {
        for dtype in [WireDtype::F32, WireDtype::Bf16, WireDtype::F16] {
            for poison in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut adapter = adapter();
                adapter.tensors.get_mut("x.lora_A.weight").unwrap().data[4] = poison;
                let bytes = adapter.to_safetensors_as(dtype, None).unwrap();
                assert_eq!(tensor_views(&bytes).unwrap()[0].first_non_finite(), Some(4));
            }
        }
        // f16 overflows to infinity on encoding: also caught.
        let mut adapter = adapter();
        adapter.tensors.get_mut("x.lora_A.weight").unwrap().data[1] = 1e6;
        let bytes = adapter.to_safetensors_as(WireDtype::F16, None).unwrap();
        assert_eq!(tensor_views(&bytes).unwrap()[0].first_non_finite(), Some(1));
    }
}
