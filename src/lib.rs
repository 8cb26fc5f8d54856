//! selattn: fused selective attention kernels for WebGPU.
#![warn(missing_docs)]

mod error;
pub mod npy;
pub mod reference;
pub mod spec;

pub use error::{Error, Result};
pub use spec::{Options, Present, Shape, Spec};

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
