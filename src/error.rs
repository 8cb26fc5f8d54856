//! The one error type of the crate. Every variant carries the numbers that made the call invalid;
//! errors wgpu reports are kept as the [`std::error::Error::source`] of [`Error::Gpu`] and
//! [`Error::RequestDevice`].

use std::sync::Arc;

/// An error wgpu reported (or one from waiting on the device): the
/// [`source`](std::error::Error::source) of [`Error::Gpu`] and [`Error::RequestDevice`]. Shared,
/// so that [`Error`] stays `Clone`; two are equal when they are the same error or read the same.
#[derive(Clone, Debug)]
pub struct GpuSource(Arc<dyn std::error::Error + Send + Sync + 'static>);

impl GpuSource {
    /// Wraps `e`.
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        GpuSource(Arc::new(e))
    }
}

impl std::fmt::Display for GpuSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for GpuSource {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for GpuSource {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.to_string() == other.0.to_string()
    }
}

/// Everything that can go wrong in a call into selattn.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No adapter that can run compute shaders was found (or none matched the filter).
    #[error("{}", no_adapter(reasons))]
    NoAdapter {
        /// Why each adapter that was seen was rejected.
        reasons: Vec<String>,
    },
    /// A tensor or cache was made on another device than the context it is used with (each
    /// [`crate::Context::new`] has its own device; see [`crate::Context::from_device_shared`]).
    #[error("{tensor} lives on another device than this context's (made by another Context)")]
    ForeignTensor {
        /// Which tensor (`cache` for a KV cache).
        tensor: &'static str,
    },
    /// [`crate::Context::from_device_shared`] was given a device or queue other than the one
    /// the other context runs on.
    #[error("the device or queue is not the one the other context runs on")]
    NotSameDevice,
    /// Requesting a device from the adapter failed.
    #[error("requesting a device failed: {0}")]
    RequestDevice(#[source] GpuSource),
    /// A size is zero where at least one is required.
    #[error("{what} must be at least 1")]
    ZeroSize {
        /// Which size.
        what: &'static str,
    },
    /// The head dimension is not one the kernels support.
    #[error("head dim {got} is not supported (supported: {supported})")]
    HeadDimUnsupported {
        /// The head dimension given.
        got: u32,
        /// What is supported.
        supported: &'static str,
    },
    /// The number of query heads is not a multiple of the number of KV heads.
    #[error("query heads ({q_heads}) must be a multiple of KV heads ({kv_heads})")]
    HeadsNotMultiple {
        /// Query heads.
        q_heads: u32,
        /// KV heads.
        kv_heads: u32,
    },
    /// A tensor has the wrong shape.
    #[error("{tensor} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Which tensor.
        tensor: &'static str,
        /// The shape it must have.
        expected: Vec<u64>,
        /// The shape it has.
        got: Vec<u64>,
    },
    /// A tensor has the wrong element type.
    #[error("{tensor} has element type {got:?}, expected {expected:?}")]
    DTypeMismatch {
        /// Which tensor.
        tensor: &'static str,
        /// The element type it must have.
        expected: crate::DType,
        /// The element type it has.
        got: crate::DType,
    },
    /// A host slice has the wrong number of elements.
    #[error("{what} has {got} elements, expected {expected}")]
    LengthMismatch {
        /// Which input.
        what: &'static str,
        /// Elements expected.
        expected: u64,
        /// Elements given.
        got: u64,
    },
    /// A per-batch valid key count exceeds the number of keys.
    #[error("kv_len[{batch}] = {kv_len} exceeds the number of keys ({keys})")]
    KvLenTooLarge {
        /// Batch element.
        batch: u32,
        /// The kv_len given.
        kv_len: u32,
        /// Number of keys.
        keys: u32,
    },
    /// Causal attention needs every query position inside the keys: start + Nq <= Nk.
    #[error(
        "causal attention needs start + Nq <= Nk, got start {start} + Nq {queries} > Nk {keys}"
    )]
    StartOutOfRange {
        /// Position of the first query.
        start: u32,
        /// Number of queries.
        queries: u32,
        /// Number of keys.
        keys: u32,
    },
    /// The softmax scale must be finite and positive.
    #[error("scale must be finite and positive, got {scale}")]
    BadScale {
        /// The scale given.
        scale: f32,
    },
    /// Selective masking is defined for causal attention only.
    #[error("selective masking is defined for causal attention only")]
    SelectiveNeedsCausal,
    /// The selection head does not exist.
    #[error("selection head {head} does not exist (there are {q_heads} query heads)")]
    SelectionHeadOutOfRange {
        /// The head asked for.
        head: u32,
        /// Number of query heads.
        q_heads: u32,
    },
    /// An input is present that the call cannot use (for example F0 without selective masking).
    #[error("{what} given but {why}")]
    InputWithoutUse {
        /// Which input.
        what: &'static str,
        /// Why it cannot be used.
        why: &'static str,
    },
    /// A buffer would exceed what the device allows.
    #[error("{what} needs {bytes} bytes, over the device's limit of {limit}")]
    TooLarge {
        /// Which buffer.
        what: &'static str,
        /// Bytes it needs.
        bytes: u64,
        /// The device's limit in bytes.
        limit: u64,
    },
    /// The device does not have a feature this call needs.
    #[error("the device does not have the {feature} feature")]
    FeatureMissing {
        /// The feature.
        feature: &'static str,
    },
    /// A kernel path was forced that cannot run this call on this device.
    #[error("the {path} kernel path cannot run this call: {why}")]
    PathUnavailable {
        /// The path asked for.
        path: &'static str,
        /// Why it cannot run.
        why: &'static str,
    },
    /// A spec says an optional input is present (or absent) and the inputs disagree.
    #[error("the spec says {what} is {}, but it was {}", if *said { "present" } else { "absent" }, if *given { "given" } else { "not given" })]
    PresenceMismatch {
        /// Which input.
        what: &'static str,
        /// What the spec says.
        said: bool,
        /// Whether it was given.
        given: bool,
    },
    /// A user buffer cannot be used as a tensor.
    #[error("buffer cannot be used: {why}")]
    BadBuffer {
        /// What is wrong with it.
        why: String,
    },
    /// The GPU reported an error while building a pipeline, running or reading back; wgpu's own
    /// error, when there is one, is the [`source`](std::error::Error::source).
    #[error("GPU error while {during}{}", source.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    Gpu {
        /// What selattn was doing.
        during: String,
        /// The error wgpu reported.
        #[source]
        source: Option<GpuSource>,
    },
    /// A tensor has the wrong number of dimensions.
    #[error("{tensor} has shape {got:?}, expected {rank} dimensions")]
    RankMismatch {
        /// Which tensor.
        tensor: &'static str,
        /// Dimensions it must have.
        rank: usize,
        /// The shape it has.
        got: Vec<u64>,
    },
    /// A count (not bytes) is over what selattn or the device can handle: tokens, positions,
    /// heads.
    #[error("{what} is {count}, over the limit of {limit}")]
    CountTooLarge {
        /// What is counted.
        what: &'static str,
        /// The count.
        count: u64,
        /// The largest allowed.
        limit: u64,
    },
    /// A dispatch would need more workgroups in one dimension than the device allows.
    #[error("{what} needs {workgroups} workgroups in one dispatch dimension, over the device's limit of {limit}")]
    DispatchTooLarge {
        /// Which dimension of which dispatch.
        what: &'static str,
        /// Workgroups needed.
        workgroups: u64,
        /// The device's per-dimension limit.
        limit: u64,
    },
    /// The device's limit on some resource is below what the kernels need.
    #[error("the device allows {limit} {what}, selattn needs {needed}")]
    DeviceLimit {
        /// Which limit.
        what: &'static str,
        /// What the kernels need.
        needed: u64,
        /// The device's limit.
        limit: u64,
    },
    /// A decode step has a number of queries per sequence outside 1..=max.
    #[error("a decode step takes 1 to {max} queries per sequence, got {got}")]
    QueriesPerStep {
        /// Queries per sequence given.
        got: u64,
        /// The most a step takes.
        max: u32,
    },
    /// Appending would put more tokens in a sequence than the cache has slots, and the cache has
    /// no budget to prune down to.
    #[error("sequence {batch} holds {len} tokens; adding {adding} exceeds the capacity of {capacity} slots and the cache has no budget")]
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
    #[error("budget {budget} is outside {min}..={max} (the first and the newest token are never evicted)")]
    BadBudget {
        /// The budget given.
        budget: u32,
        /// Smallest allowed.
        min: u32,
        /// Largest allowed (the capacity).
        max: u32,
    },
    /// A tensor does not match the cache it is used with.
    #[error("{what} is {got}, but the cache has {cache}")]
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
    #[error("sequence {batch}: the call expects the next token at position {expected}, the cache is at {cache} (stale view of the cache?)")]
    StalePosition {
        /// Sequence.
        batch: u32,
        /// The position of the next token in the cache.
        cache: u64,
        /// The position the call expected.
        expected: u64,
    },
    /// A sequence cannot be truncated back to the given length exactly: a removed token
    /// evicted another (pruning), a removed query added its selective scores to the state of
    /// the kept tokens, or the length is past the sequence's end. Nothing was changed.
    #[error("sequence {batch} cannot be truncated to {to} tokens: {why}")]
    CannotTruncate {
        /// Sequence.
        batch: u32,
        /// The length asked for.
        to: u64,
        /// Why not.
        why: &'static str,
    },
    /// A [`crate::Checkpoint`] that no longer describes its sequence: it belongs to another
    /// cache, a newer checkpoint of the sequence replaced it, or the sequence was reset or
    /// truncated below it since. Nothing was changed.
    #[error("checkpoint of sequence {batch} cannot be rolled back to: {why}")]
    StaleCheckpoint {
        /// Sequence the checkpoint was taken of.
        batch: u32,
        /// Why not.
        why: &'static str,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// [`Error::Gpu`] while `during`, with wgpu's (or any) error as its source.
    pub fn gpu(
        during: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Gpu {
            during: during.into(),
            source: Some(GpuSource::new(source)),
        }
    }

    /// [`Error::Gpu`] while `during`, with no underlying error.
    pub fn gpu_msg(during: impl Into<String>) -> Self {
        Error::Gpu {
            during: during.into(),
            source: None,
        }
    }
}

/// How to get an adapter, printed with [`Error::NoAdapter`].
pub const NO_ADAPTER_HINT: &str = "to get one: use a GPU with a Vulkan, Metal, DX12 or OpenGL 4.3 \
driver; on Linux without a GPU install Mesa's software drivers (`apt-get install \
mesa-vulkan-drivers`, which provides lavapipe); `WGPU_BACKEND` and `SELATTN_ADAPTER` must not \
exclude every adapter";

/// [`Error::NoAdapter`]'s message: every adapter seen and why it is unusable, and the hint.
fn no_adapter(reasons: &[String]) -> String {
    let mut s = String::from("no adapter can run selattn's compute kernels");
    if reasons.is_empty() {
        s.push_str("; wgpu saw no adapter at all");
    } else {
        s.push_str("; adapters seen:");
    }
    for r in reasons {
        s.push_str("\n  ");
        s.push_str(r);
    }
    s.push('\n');
    s.push_str(NO_ADAPTER_HINT);
    s
}

#[cfg(test)]
mod tests {
    use super::Error;
    use std::error::Error as _;

    #[test]
    fn messages_name_their_numbers_and_keep_sources() {
        let e = Error::DeviceLimit {
            what: "storage buffers per shader stage",
            needed: 10,
            limit: 8,
        };
        assert_eq!(
            e.to_string(),
            "the device allows 8 storage buffers per shader stage, selattn needs 10"
        );
        let io = std::io::Error::other("lost");
        let e = Error::gpu("running selattn attention", io);
        assert_eq!(
            e.to_string(),
            "GPU error while running selattn attention: lost"
        );
        assert_eq!(e.source().map(|s| s.to_string()).as_deref(), Some("lost"));
        assert!(Error::gpu_msg("x").source().is_none());
        let e = Error::RankMismatch {
            tensor: "q",
            rank: 4,
            got: vec![2, 3],
        };
        assert_eq!(e.to_string(), "q has shape [2, 3], expected 4 dimensions");
    }
}
