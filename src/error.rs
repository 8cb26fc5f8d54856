//! The one error type of the crate. Every variant carries the numbers that made the call invalid.

use std::fmt;

/// Everything that can go wrong in a call into selattn.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// No adapter that can run compute shaders was found (or none matched the filter).
    NoAdapter {
        /// Why each adapter that was seen was rejected.
        reasons: Vec<String>,
    },
    /// Requesting a device from the adapter failed.
    RequestDevice(String),
    /// A size is zero where at least one is required.
    ZeroSize {
        /// Which size.
        what: &'static str,
    },
    /// The head dimension is not one the kernels support.
    HeadDimUnsupported {
        /// The head dimension given.
        got: u32,
        /// What is supported.
        supported: &'static str,
    },
    /// The number of query heads is not a multiple of the number of KV heads.
    HeadsNotMultiple {
        /// Query heads.
        q_heads: u32,
        /// KV heads.
        kv_heads: u32,
    },
    /// A tensor has the wrong shape.
    ShapeMismatch {
        /// Which tensor.
        tensor: &'static str,
        /// The shape it must have.
        expected: Vec<u64>,
        /// The shape it has.
        got: Vec<u64>,
    },
    /// A tensor has the wrong element type.
    DTypeMismatch {
        /// Which tensor.
        tensor: &'static str,
        /// The element type it must have.
        expected: crate::DType,
        /// The element type it has.
        got: crate::DType,
    },
    /// A host slice has the wrong number of elements.
    LengthMismatch {
        /// Which input.
        what: &'static str,
        /// Elements expected.
        expected: u64,
        /// Elements given.
        got: u64,
    },
    /// A per-batch valid key count exceeds the number of keys.
    KvLenTooLarge {
        /// Batch element.
        batch: u32,
        /// The kv_len given.
        kv_len: u32,
        /// Number of keys.
        keys: u32,
    },
    /// Causal attention needs every query position inside the keys: start + Nq <= Nk.
    StartOutOfRange {
        /// Position of the first query.
        start: u32,
        /// Number of queries.
        queries: u32,
        /// Number of keys.
        keys: u32,
    },
    /// The softmax scale must be finite and positive.
    BadScale {
        /// The scale given.
        scale: f32,
    },
    /// Selective masking is defined for causal attention only.
    SelectiveNeedsCausal,
    /// The selection head does not exist.
    SelectionHeadOutOfRange {
        /// The head asked for.
        head: u32,
        /// Number of query heads.
        q_heads: u32,
    },
    /// An input is present that the call cannot use (for example F0 without selective masking).
    InputWithoutUse {
        /// Which input.
        what: &'static str,
        /// Why it cannot be used.
        why: &'static str,
    },
    /// A buffer would exceed what the device allows.
    TooLarge {
        /// Which buffer.
        what: &'static str,
        /// Bytes it needs.
        bytes: u64,
        /// The device's limit in bytes.
        limit: u64,
    },
    /// The device does not have a feature this call needs.
    FeatureMissing {
        /// The feature.
        feature: &'static str,
    },
    /// A kernel path was forced that cannot run this call on this device.
    PathUnavailable {
        /// The path asked for.
        path: &'static str,
        /// Why it cannot run.
        why: &'static str,
    },
    /// A spec says an optional input is present (or absent) and the inputs disagree.
    PresenceMismatch {
        /// Which input.
        what: &'static str,
        /// What the spec says.
        said: bool,
        /// Whether it was given.
        given: bool,
    },
    /// A user buffer cannot be used as a tensor.
    BadBuffer {
        /// What is wrong with it.
        why: String,
    },
    /// The GPU reported an error while recording, running or reading back. `source` is wgpu's
    /// own error where wgpu reported one (see [`std::error::Error::source`]).
    Gpu {
        /// What was being done, and what went wrong.
        what: String,
        /// wgpu's error, if the failure came from wgpu's validation or allocation.
        source: Option<GpuError>,
    },
    /// A tensor or cache was made on another device than the context it is used with (each
    /// [`crate::Context::new`] has its own device; see [`crate::Context::from_device_shared`]).
    ForeignTensor {
        /// Which tensor.
        tensor: &'static str,
    },
    /// A file could not be read or written (examples and npy I/O).
    Io(String),
    /// Appending would put more tokens in a sequence than the cache has slots, and the cache has
    /// no budget to prune down to.
    CacheFull {
        /// Sequence.
        batch: u32,
        /// Tokens it holds.
        len: u32,
        /// Tokens being appended.
        adding: u32,
        /// Slots per sequence.
        capacity: u32,
    },
    /// A pruning budget below the smallest that leaves a token to evict (the first token and
    /// the newest are never evicted), or above the capacity.
    BadBudget {
        /// The budget given.
        budget: u32,
        /// Smallest allowed.
        min: u32,
        /// Largest allowed (the capacity).
        max: u32,
    },
    /// A tensor does not match the cache it is used with.
    CacheMismatch {
        /// Which size.
        what: &'static str,
        /// The cache's value.
        cache: u32,
        /// The tensor's value.
        got: u32,
    },
    /// A call names a position for a sequence that is not where the cache is: the caller's view
    /// of the cache is stale (for example after a reset).
    StalePosition {
        /// Sequence.
        batch: u32,
        /// The position of the next token in the cache.
        cache: u64,
        /// The position the call expected.
        expected: u64,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NoAdapter { reasons } => {
                write!(f, "no adapter can run selattn's compute kernels")?;
                if reasons.is_empty() {
                    write!(f, "; wgpu saw no adapter at all")?;
                } else {
                    write!(f, "; adapters seen:")?;
                }
                for r in reasons {
                    write!(f, "\n  {r}")?;
                }
                write!(f, "\n{NO_ADAPTER_HINT}")
            }
            Error::RequestDevice(e) => write!(f, "requesting a device failed: {e}"),
            Error::ZeroSize { what } => write!(f, "{what} must be at least 1"),
            Error::HeadDimUnsupported { got, supported } => {
                write!(f, "head dim {got} is not supported (supported: {supported})")
            }
            Error::HeadsNotMultiple { q_heads, kv_heads } => write!(
                f,
                "query heads ({q_heads}) must be a multiple of KV heads ({kv_heads})"
            ),
            Error::ShapeMismatch {
                tensor,
                expected,
                got,
            } => write!(f, "{tensor} has shape {got:?}, expected {expected:?}"),
            Error::DTypeMismatch {
                tensor,
                expected,
                got,
            } => write!(f, "{tensor} has element type {got:?}, expected {expected:?}"),
            Error::LengthMismatch {
                what,
                expected,
                got,
            } => write!(f, "{what} has {got} elements, expected {expected}"),
            Error::KvLenTooLarge {
                batch,
                kv_len,
                keys,
            } => write!(
                f,
                "kv_len[{batch}] = {kv_len} exceeds the number of keys ({keys})"
            ),
            Error::StartOutOfRange {
                start,
                queries,
                keys,
            } => write!(
                f,
                "causal attention needs start + Nq <= Nk, got start {start} + Nq {queries} > Nk {keys}"
            ),
            Error::BadScale { scale } => {
                write!(f, "scale must be finite and positive, got {scale}")
            }
            Error::SelectiveNeedsCausal => {
                write!(f, "selective masking is defined for causal attention only")
            }
            Error::SelectionHeadOutOfRange { head, q_heads } => write!(
                f,
                "selection head {head} does not exist (there are {q_heads} query heads)"
            ),
            Error::InputWithoutUse { what, why } => write!(f, "{what} given but {why}"),
            Error::TooLarge { what, bytes, limit } => write!(
                f,
                "{what} needs {bytes} bytes, over the device's limit of {limit}"
            ),
            Error::FeatureMissing { feature } => {
                write!(f, "the device does not have the {feature} feature")
            }
            Error::PathUnavailable { path, why } => {
                write!(f, "the {path} kernel path cannot run this call: {why}")
            }
            Error::PresenceMismatch { what, said, given } => write!(
                f,
                "the spec says {what} is {}, but it was {}",
                if *said { "present" } else { "absent" },
                if *given { "given" } else { "not given" }
            ),
            Error::BadBuffer { why } => write!(f, "buffer cannot be used: {why}"),
            Error::Gpu { what, source } => match source {
                Some(s) => write!(f, "GPU error: {what}: {s}"),
                None => write!(f, "GPU error: {what}"),
            },
            Error::ForeignTensor { tensor } => write!(
                f,
                "{tensor} lives on another device than this context's (made by another Context)"
            ),
            Error::Io(e) => write!(f, "{e}"),
            Error::CacheFull {
                batch,
                len,
                adding,
                capacity,
            } => write!(
                f,
                "sequence {batch} holds {len} tokens; adding {adding} exceeds the capacity of {capacity} slots and the cache has no budget"
            ),
            Error::BadBudget { budget, min, max } => write!(
                f,
                "budget {budget} is outside {min}..={max} (the first and the newest token are never evicted)"
            ),
            Error::CacheMismatch { what, cache, got } => {
                write!(f, "{what} is {got}, but the cache has {cache}")
            }
            Error::StalePosition {
                batch,
                cache,
                expected,
            } => write!(
                f,
                "sequence {batch}: the call expects the next token at position {expected}, the cache is at {cache} (stale view of the cache?)"
            ),
        }
    }
}

/// How to get an adapter, printed with [`Error::NoAdapter`].
pub const NO_ADAPTER_HINT: &str =
    "to get one: use a GPU with a Vulkan, Metal, DX12 or OpenGL 4.3 driver; \
on Linux without a GPU install Mesa's software drivers (`apt-get install mesa-vulkan-drivers`, \
which provides lavapipe); `WGPU_BACKEND` and `SELATTN_ADAPTER` must not exclude every adapter";

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Gpu {
                source: Some(s), ..
            } => Some(s.0.as_ref()),
            _ => None,
        }
    }
}

impl Error {
    /// A GPU failure without a wgpu error behind it (a lost device, a failed mapping).
    pub fn gpu(what: impl Into<String>) -> Self {
        Error::Gpu {
            what: what.into(),
            source: None,
        }
    }
}

/// A wgpu error carried by [`Error::Gpu`], shared so that [`Error`] stays `Clone`. Two compare
/// equal when their messages do.
#[derive(Clone, Debug)]
pub struct GpuError(pub std::sync::Arc<wgpu::Error>);

impl PartialEq for GpuError {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_string() == other.0.to_string()
    }
}

impl fmt::Display for GpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
