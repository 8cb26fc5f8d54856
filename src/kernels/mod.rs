//! Kernel families: WGSL sources, specialisation keys and dispatch.
//!
//! Each family has one shader in `shaders/` and one module here. A [`KernelKey`] names one
//! pipeline variant; it is the pipeline cache key and the wgpu label, so a validation error or a
//! trace names the variant.

pub mod backward;
pub mod coop;
pub mod coop_backward;
pub mod decode;
pub mod forward;
pub(crate) mod gpu;
pub mod merge;
pub mod selective;

pub use crate::device::STORAGE_BUFFERS_NEEDED;
use crate::{DType, Error, Result, Switches};

/// Shader source files, loaded with `include_str!`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// `shaders/forward.wgsl`.
    Forward,
    /// `shaders/selective.wgsl`.
    Selective,
    /// `shaders/coop_forward.wgsl` (a template: fragments unrolled per head dim).
    CoopForward,
    /// `shaders/coop_colsum.wgsl` (a template like `CoopForward`).
    CoopColsum,
    /// `shaders/cache.wgsl`.
    Cache,
    /// `shaders/cache_segments.wgsl`.
    CacheSegments,
    /// `shaders/decode.wgsl`.
    Decode,
    /// `shaders/merge.wgsl`.
    Merge,
    /// `shaders/backward.wgsl`.
    Backward,
    /// `shaders/coop_backward.wgsl` (a template like `CoopForward`).
    CoopBackward,
}

/// Whether the measurement knob `name` (an environment variable such as
/// `SELATTN_BACKWARD_SPLIT`) leaves its choice on: anything but `0`, or unset. Read at each plan,
/// so one binary can run both forms.
pub(crate) fn knob_on(name: &str) -> bool {
    std::env::var(name).map_or(true, |v| v != "0")
}

const COMMON: &str = include_str!("../../shaders/common.wgsl");

impl Source {
    /// Every source.
    pub const ALL: [Source; 10] = [
        Source::Forward,
        Source::Selective,
        Source::CoopForward,
        Source::CoopColsum,
        Source::Cache,
        Source::CacheSegments,
        Source::Decode,
        Source::Merge,
        Source::Backward,
        Source::CoopBackward,
    ];

    fn body(self) -> &'static str {
        match self {
            Source::Forward => include_str!("../../shaders/forward.wgsl"),
            Source::Selective => include_str!("../../shaders/selective.wgsl"),
            Source::CoopForward => include_str!("../../shaders/coop_forward.wgsl"),
            Source::CoopColsum => include_str!("../../shaders/coop_colsum.wgsl"),
            Source::Cache => include_str!("../../shaders/cache.wgsl"),
            Source::CacheSegments => include_str!("../../shaders/cache_segments.wgsl"),
            Source::Decode => include_str!("../../shaders/decode.wgsl"),
            Source::Merge => include_str!("../../shaders/merge.wgsl"),
            Source::Backward => include_str!("../../shaders/backward.wgsl"),
            Source::CoopBackward => include_str!("../../shaders/coop_backward.wgsl"),
        }
    }

    /// The full WGSL text for an element type: prelude, shared helpers, family body (with the
    /// decode kernel's `//@unroll` blocks expanded for its smallest configuration).
    pub fn text(self, elem: DType) -> Result<String> {
        match self {
            Source::Decode => self.text_of(elem, &decode::unroll(self.body(), &|_| Some(1))?),
            _ => self.text_of(elem, self.body()),
        }
    }

    fn text_of(self, elem: DType, body: &str) -> Result<String> {
        let prelude = match (self, elem) {
            (Source::CoopForward | Source::CoopColsum | Source::CoopBackward, _) => {
                // naga's uniformity analysis is coarser than WGSL's and flags cooperative
                // operations after any loop bounded by the invocation index; the kernel keeps
                // every cooperative operation in workgroup-uniform control flow.
                "enable f16;\nenable wgpu_cooperative_matrix;\ndiagnostic(off, derivative_uniformity);\nalias elem = f16;\n"
            }
            (_, DType::F32) => "alias elem = f32;\n",
            (_, DType::F16) => "enable f16;\nalias elem = f16;\n",
            (_, DType::U32) => {
                return Err(Error::DTypeMismatch {
                    tensor: "q",
                    expected: DType::F32,
                    got: DType::U32,
                })
            }
        };
        Ok(format!("{prelude}{COMMON}\n{body}"))
    }
}

// The operator switches a forward kernel is specialised on: [`Switches`] with `f0` and `f_out`
// off (the kernels never read them; the selective passes handle F). The scalar and the
// cooperative-matrix kernels share them (and the `override` names in their shaders).
impl Switches {
    /// The switches with those no kernel is specialised on (`f0`, `f_out`) turned off, so
    /// calls that differ only there share a pipeline.
    pub fn for_kernel(self) -> Switches {
        Switches {
            f0: false,
            f_out: false,
            ..self
        }
    }

    pub(crate) fn constants(&self) -> [(&'static str, f64); 7] {
        [
            ("CAUSAL", flag(self.causal)),
            ("HAS_TAU", flag(self.tau)),
            ("HAS_ALPHA", flag(self.alpha)),
            ("HAS_GATE", flag(self.gate)),
            ("HAS_KVLEN", flag(self.kv_len)),
            ("SELECTIVE", flag(self.selective)),
            ("WRITE_LSE", flag(self.lse)),
        ]
    }
}

/// Which kernel and with which specialisation constants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// The fused forward kernel.
    Forward(forward::ForwardConfig),
    /// Selective pass 1: column sums of S per query tile.
    SelColsum(selective::ColsumConfig),
    /// Selective pass 2: exclusive scan over query tiles, F_out.
    SelScan(selective::ScanConfig),
    /// The cooperative-matrix forward kernel.
    CoopForward(coop::CoopConfig),
    /// KV cache append with pruning.
    CacheAppend(decode::AppendConfig),
    /// Segmented KV cache: eviction candidates of one segment for one token.
    CacheCandidates(decode::AppendConfig),
    /// Segmented KV cache: writes tokens' K, V and gate into the slots of one segment.
    CachePut(decode::AppendConfig),
    /// Segmented KV cache: writes tokens' positions and F into the slots of one segment.
    CachePutState(decode::AppendConfig),
    /// Segmented KV cache: merges one sequence's decode partials over its segments.
    CacheMergeSegments(decode::MergeConfig),
    /// Decode: selective scores of the step's queries, F state update.
    DecodeScore(decode::ScoreConfig),
    /// Decode: split-KV attention.
    DecodeAttend(decode::AttendConfig),
    /// Decode: merge of the splits.
    DecodeMerge(decode::MergeConfig),
    /// Merge of partial results over disjoint key ranges, one pair at a time.
    MergePair(merge::MergePairConfig),
    /// One entry point of the backward pass.
    Backward(backward::BackwardConfig),
    /// One entry point of the cooperative-matrix backward pass.
    CoopBackward(coop_backward::CoopBackwardConfig),
}

/// One pipeline variant: kernel, specialisation and storage element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelKey {
    /// The kernel and its constants.
    pub kernel: Kernel,
    /// Element type of Q, K, V, O, tau and gate.
    pub elem: DType,
}

impl KernelKey {
    /// The source file.
    pub fn source(&self) -> Source {
        match self.kernel {
            Kernel::Forward(_) => Source::Forward,
            Kernel::SelColsum(c) if c.coop_sgs > 0 => Source::CoopColsum,
            Kernel::SelColsum(_) | Kernel::SelScan(_) => Source::Selective,
            Kernel::CoopForward(_) => Source::CoopForward,
            Kernel::CacheAppend(_) => Source::Cache,
            Kernel::CacheCandidates(_)
            | Kernel::CachePut(_)
            | Kernel::CachePutState(_)
            | Kernel::CacheMergeSegments(_) => Source::CacheSegments,
            Kernel::DecodeScore(_) | Kernel::DecodeAttend(_) | Kernel::DecodeMerge(_) => {
                Source::Decode
            }
            Kernel::MergePair(_) => Source::Merge,
            Kernel::Backward(_) => Source::Backward,
            Kernel::CoopBackward(_) => Source::CoopBackward,
        }
    }

    /// The complete WGSL of this variant, as given to the device (before constants).
    pub fn wgsl(&self) -> Result<String> {
        let source = self.source();
        Ok(match self.kernel {
            Kernel::CoopForward(c) => c.wgsl(&source.text(self.elem)?),
            Kernel::SelColsum(c) => c.wgsl(&source.text(self.elem)?),
            Kernel::CoopBackward(c) => c.wgsl(&source.text(self.elem)?),
            Kernel::DecodeAttend(c) => {
                source.text_of(self.elem, &decode::unroll(source.body(), &|n| c.unroll(n))?)?
            }
            _ => source.text(self.elem)?,
        })
    }

    /// The entry point.
    pub fn entry(&self) -> &'static str {
        match self.kernel {
            Kernel::Forward(_) => "forward",
            Kernel::SelColsum(c) if c.coop_sgs > 0 => "coop_colsum",
            Kernel::SelColsum(_) => "colsum",
            Kernel::SelScan(_) => "scan",
            Kernel::CoopForward(_) => "coop_forward",
            Kernel::CacheAppend(_) => "append",
            Kernel::CacheCandidates(_) => "candidates",
            Kernel::CachePut(_) => "put",
            Kernel::CachePutState(_) => "put_state",
            Kernel::CacheMergeSegments(_) => "merge_segments",
            Kernel::DecodeScore(_) => "score",
            Kernel::DecodeAttend(_) => "attend",
            Kernel::DecodeMerge(_) => "merge",
            Kernel::MergePair(_) => "merge_pair",
            Kernel::Backward(c) => c.entry.name(),
            Kernel::CoopBackward(c) => c.entry_name(),
        }
    }

    /// The `override` constants, as wgpu takes them.
    pub fn constants(&self) -> Vec<(&'static str, f64)> {
        match self.kernel {
            Kernel::Forward(c) => c.constants(),
            Kernel::SelColsum(c) => c.constants(),
            Kernel::SelScan(c) => c.constants(),
            Kernel::CoopForward(c) => c.constants(),
            Kernel::CacheAppend(c) => c.constants(),
            Kernel::CacheCandidates(c) | Kernel::CachePut(c) | Kernel::CachePutState(c) => {
                c.constants()
            }
            Kernel::CacheMergeSegments(c) => c.constants(),
            Kernel::DecodeScore(c) => c.constants(),
            Kernel::DecodeAttend(c) => c.constants(),
            Kernel::DecodeMerge(c) => c.constants(),
            Kernel::MergePair(c) => c.constants(),
            Kernel::Backward(c) => c.constants(),
            Kernel::CoopBackward(c) => c.constants(),
        }
    }
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// Parameters of one call, mirrored field for field by `struct Params` in `shaders/common.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    /// B.
    pub batch: u32,
    /// Hq.
    pub q_heads: u32,
    /// Hkv.
    pub kv_heads: u32,
    /// Nq.
    pub q_len: u32,
    /// Nk.
    pub k_len: u32,
    /// Hq / Hkv.
    pub group: u32,
    /// Position of query row 0.
    pub start: u32,
    /// Selection head.
    pub sel_head: u32,
    /// Logit scale.
    pub scale: f32,
    /// Query tiles.
    pub n_qtiles: u32,
    /// Rows of the selective scratch per batch element: `n_qtiles`, or with the cooperative
    /// forward's subgroup prefix one per 16 query rows.
    pub sel_rows: u32,
    /// Padding to 16 bytes.
    pub _pad1: u32,
}
