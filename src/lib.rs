//! selattn: fused selective attention kernels for WebGPU.
//!
//! FlashAttention-style attention (online softmax over key tiles, never an Nq×Nk matrix in
//! memory) with per-query temperature, positional temperature, value gating and selective
//! masking, written in WGSL for wgpu, with an exact f64 CPU reference in [`reference`].
#![warn(missing_docs)]

mod async_api;
mod attention;
pub mod cache;
mod context;
mod error;
pub mod kernels;
pub mod npy;
pub mod reference;
pub mod reference_cache;
pub mod spec;
mod tensor;
pub mod testing;
pub mod variants;

pub use async_api::adapters_async;
pub use attention::{Inputs, Output, Outputs};
pub use cache::{CacheState, DecodeOptions, KvCache, KvCacheConfig, Step, Tokens};
#[cfg(not(target_arch = "wasm32"))]
pub use context::{adapters, best_adapter};
pub use context::{instance, unusable_reason, Capabilities, Context, ADAPTER_ENV};
pub use error::{Error, Result};
pub use kernels::forward::Plan;
pub use spec::{Options, Path, Present, Shape, Spec};
pub use tensor::Tensor;

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 16-bit float (needs SHADER_F16).
    F16,
    /// 32-bit unsigned integer (kv_len).
    U32,
}
