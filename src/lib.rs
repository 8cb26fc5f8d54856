//! selattn: fused selective attention kernels for WebGPU.
//!
//! FlashAttention-style attention (online softmax over key tiles, never an Nq×Nk matrix in
//! memory) with per-query temperature, positional temperature, value gating and selective
//! masking, written in WGSL for wgpu, with an exact f64 CPU reference in [`reference`](mod@reference).
//! Gradients of every input come from [`Context::backward`] (P recomputed from the forward's
//! LSE, deterministic), checked against the f64 reference backward in
//! [`reference_backward`](mod@reference_backward).
//!
//! One causal, selective attention call with a per-query temperature, checked against the
//! reference (runs on any adapter, software ones included):
//!
//! ```
//! use selattn::reference::{self, HostInputs};
//! use selattn::{Context, DType, Inputs, Options, Outputs, Shape, Spec};
//!
//! # fn main() -> selattn::Result<()> {
//! let ctx = Context::new()?; // the best adapter; or Context::from_device(..)
//! let shape = Shape::new(1, 2, 16, 8); // B, H, N, D
//! let n = |dims: Vec<u64>| dims.iter().product::<u64>() as usize;
//! let data = |len: usize| (0..len).map(|i| ((i * 7 % 13) as f32 - 6.0) / 6.0).collect();
//! let x = HostInputs {
//!     q: data(n(shape.q_dims())),
//!     k: data(n(shape.kv_dims())),
//!     v: data(n(shape.kv_dims())),
//!     tau: Some(vec![1.5; n(shape.row_dims())]),
//!     ..HostInputs::default()
//! };
//! let q = ctx.upload(&shape.q_dims(), &x.q)?;
//! let k = ctx.upload(&shape.kv_dims(), &x.k)?;
//! let v = ctx.upload(&shape.kv_dims(), &x.v)?;
//! let tau = ctx.upload(&shape.row_dims(), x.tau.as_deref().unwrap_or_default())?;
//! let o = ctx.empty(&shape.q_dims(), DType::F32)?;
//! let f_out = ctx.empty(&shape.f_dims(), DType::F32)?;
//! let options = Options::causal().selective(0);
//!
//! ctx.attention(
//!     &Inputs::new(&q, &k, &v).tau(&tau),
//!     &options,
//!     &Outputs::new(&o).f_out(&f_out),
//! )?;
//! let got = ctx.download(&o)?;
//!
//! let spec = Spec { shape, options, present: x.present(true) };
//! let want = reference::attention(&spec, &x)?;
//! assert!(got.iter().zip(&want.o).all(|(g, w)| (*g as f64 - w).abs() < 1e-4));
//! # Ok(())
//! # }
//! ```
//!
//! Layout: [`device`] picks an adapter and describes what it can do; [`Context`] owns the
//! device, queue and pipeline cache; [`Context::attention`] validates a call ([`Spec`]) and hands
//! a [`Plan`] to the kernel family in [`kernels`] that encodes it; [`KvCache`] holds a KV cache
//! for decode steps. [`reference`](mod@reference) and [`reference_cache`] are the f64 oracles.
#![deny(missing_docs)]

mod async_api;
mod attention;
mod backward;
pub mod cache;
mod context;
pub mod device;
mod dtype;
mod error;
pub mod kernels;
pub mod merge;
pub mod reference;
pub mod reference_backward;
pub mod reference_cache;
pub mod spec;
mod tensor;

pub use async_api::adapters_async;
pub use attention::{Inputs, Output, Outputs};
pub use backward::{Grads, Upstream};
pub use cache::{CacheState, Checkpoint, DecodeOptions, KvCache, KvCacheConfig, Step, Tokens};
pub use context::{Context, DeviceToken};
#[cfg(not(target_arch = "wasm32"))]
pub use device::{adapters, best_adapter};
pub use device::{instance, unusable_reason, Capabilities, ADAPTER_ENV};
pub use dtype::DType;
pub use error::{Error, GpuSource, Result, NO_ADAPTER_HINT};

pub use kernels::backward::BackwardPlan;
pub use kernels::forward::Plan;
pub use merge::{merge_partials, merge_partials_reference, Partial};
pub use spec::{Options, Path, Role, Shape, Spec, Switches};
pub use tensor::Tensor;
