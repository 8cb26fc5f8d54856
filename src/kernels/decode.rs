//! Decode over a KV cache: append with pruning (`shaders/cache.wgsl`), selective scores,
//! split-KV attention and merge (`shaders/decode.wgsl`).

use super::flag;
use super::gpu::{entry, Gpu};
use super::{Kernel, KernelKey};
use crate::device::Capabilities;
use crate::DType;
use crate::{Error, Result};

/// Most queries (new tokens) per sequence in one decode step.
pub const MAX_QUERIES: u32 = 8;
/// Accumulators per thread in the attend kernel, at most (`MAX_APT` in the shader).
const MAX_APT: u32 = 16;

/// Specialisation of the append kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AppendConfig {
    /// Head dim.
    pub d: u32,
    /// Threads per workgroup, a power of two.
    pub wg: u32,
    /// A gate is written.
    pub gate: bool,
    /// F of the new tokens is given (else 0).
    pub f: bool,
}

impl AppendConfig {
    pub(crate) fn constants(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("D", self.d as f64),
            ("WG", self.wg as f64),
            ("HAS_GATE", flag(self.gate)),
            ("HAS_F", flag(self.f)),
        ]
    }
}

/// Specialisation of the selective score pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ScoreConfig {
    /// Head dim.
    pub d: u32,
    /// Threads (slots) per workgroup.
    pub wg: u32,
}

impl ScoreConfig {
    pub(crate) fn constants(&self) -> Vec<(&'static str, f64)> {
        vec![("D", self.d as f64), ("WG", self.wg as f64)]
    }
}

/// Specialisation of the split-KV attention kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AttendConfig {
    /// Head dim.
    pub d: u32,
    /// Threads per workgroup.
    pub wg: u32,
    /// Query rows per workgroup.
    pub rb: u32,
    /// Slots per tile.
    pub bc: u32,
    /// Per-query temperature.
    pub tau: bool,
    /// Positional temperature.
    pub alpha: bool,
    /// Value gate.
    pub gate: bool,
    /// Selective masking.
    pub selective: bool,
}

impl AttendConfig {
    /// Accumulators per thread.
    pub fn apt(&self) -> u32 {
        (self.rb * self.d / 4).div_ceil(self.wg)
    }

    pub(crate) fn constants(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("D", self.d as f64),
            ("WG", self.wg as f64),
            ("RB", self.rb as f64),
            ("BC", self.bc as f64),
            ("APT", self.apt() as f64),
            ("HAS_TAU", flag(self.tau)),
            ("HAS_ALPHA", flag(self.alpha)),
            ("HAS_GATE", flag(self.gate)),
            ("SELECTIVE", flag(self.selective)),
        ]
    }

    /// Workgroup memory in bytes, as declared in the shader (the score pass's `qsel` included,
    /// since naga may keep every module-scope workgroup variable).
    pub fn workgroup_bytes(&self) -> u64 {
        let (rb, bc, d) = (self.rb as u64, self.bc as u64, self.d as u64);
        4 * (rb * d + bc * d + rb * bc + bc + 3 * rb + MAX_QUERIES as u64 * d)
    }
}

/// Specialisation of the merge kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MergeConfig {
    /// Head dim.
    pub d: u32,
    /// Threads per workgroup.
    pub wg: u32,
    /// Write LSE.
    pub lse: bool,
}

impl MergeConfig {
    pub(crate) fn constants(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("D", self.d as f64),
            ("WG", self.wg as f64),
            ("WRITE_LSE", flag(self.lse)),
        ]
    }
}

/// Parameters of the append kernel, mirrored field for field by `struct CacheParams` in
/// `shaders/cache.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CacheParams {
    /// B.
    pub batch: u32,
    /// Hkv.
    pub kv_heads: u32,
    /// Slots per sequence.
    pub capacity: u32,
    /// Budget, or capacity without one.
    pub limit: u32,
    /// Token stride of the new-token tensors.
    pub n: u32,
    /// Padding.
    pub _pad0: u32,
    /// Padding.
    pub _pad1: u32,
    /// Padding.
    pub _pad2: u32,
}

/// Parameters of the decode kernels, mirrored field for field by `struct DecodeParams` in
/// `shaders/decode.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct DecodeParams {
    /// B.
    pub batch: u32,
    /// Hq.
    pub q_heads: u32,
    /// Hkv.
    pub kv_heads: u32,
    /// Hq / Hkv.
    pub group: u32,
    /// Queries per sequence in the step.
    pub n: u32,
    /// Slots per sequence.
    pub capacity: u32,
    /// Selection head.
    pub sel_head: u32,
    /// KV head of the selection head.
    pub sel_kv: u32,
    /// Logit scale.
    pub scale: f32,
    /// Slot splits.
    pub splits: u32,
    /// Slots per split.
    pub split_len: u32,
    /// Query rows per KV head: group * n.
    pub rows: u32,
    /// Row blocks per KV head.
    pub n_rblocks: u32,
    /// Index (in vec4) of the first (m, l) entry of the partials buffer.
    pub ml_base: u32,
    /// Padding.
    pub _pad0: u32,
    /// Padding.
    pub _pad1: u32,
}

/// Everything decided about one decode step before any GPU work.
#[derive(Clone, Copy, Debug)]
pub struct DecodePlan {
    /// The attend kernel.
    pub attend: AttendConfig,
    /// The merge kernel.
    pub merge: MergeConfig,
    /// The score pass (selective masking only).
    pub score: Option<ScoreConfig>,
    /// Uniform parameters.
    pub params: DecodeParams,
}

impl DecodePlan {
    /// Bytes of the partial (o, m, l) buffer.
    pub fn part_bytes(&self) -> u64 {
        let p = &self.params;
        let rows = p.batch as u64 * p.q_heads as u64 * p.n as u64 * p.splits as u64;
        16 * rows * (self.attend.d as u64 / 4 + 1)
    }

    /// Bytes of the per-query F buffer (selective masking only).
    pub fn fq_bytes(&self) -> u64 {
        let p = &self.params;
        4 * p.batch as u64 * p.n as u64 * p.capacity as u64
    }
}

/// The shape-dependent part of a decode step.
#[derive(Clone, Copy, Debug)]
pub struct DecodeShape {
    /// B.
    pub batch: u32,
    /// Hq.
    pub q_heads: u32,
    /// Hkv.
    pub kv_heads: u32,
    /// D.
    pub head_dim: u32,
    /// Queries per sequence.
    pub n: u32,
    /// Slots per sequence.
    pub capacity: u32,
    /// Longest sequence after the append.
    pub max_len: u32,
}

// Long on purpose: tile choice, split choice and every size the unchecked kernels rely on, in
// the order they depend on each other; splitting it would pass the intermediate sizes around.
/// Plans a decode step: tiles within workgroup memory, the number of splits, sizes checked.
#[allow(clippy::too_many_arguments)]
pub fn plan(
    caps: &Capabilities,
    s: DecodeShape,
    scale: f32,
    selective: Option<u32>,
    tau: bool,
    alpha: bool,
    gate: bool,
    lse: bool,
    splits: Option<u32>,
) -> Result<DecodePlan> {
    let group = s.q_heads / s.kv_heads;
    let rows = group * s.n;
    let d4 = s.head_dim / 4;
    let wg = caps.max_invocations.min(64);
    let mut chosen = None;
    'outer: for rb in [16u32, 8, 4, 2, 1] {
        let rb = rb.min(rows);
        for bc in [32u32, 16, 8, 4] {
            let cfg = AttendConfig {
                d: s.head_dim,
                wg,
                rb,
                bc,
                tau,
                alpha,
                gate,
                selective: selective.is_some(),
            };
            if cfg.apt() <= MAX_APT && cfg.workgroup_bytes() <= caps.workgroup_memory as u64 {
                chosen = Some(cfg);
                break 'outer;
            }
        }
    }
    let attend = chosen.ok_or(Error::TooLarge {
        what: "workgroup memory for the decode kernel",
        bytes: 4 * (2 * s.head_dim as u64 + (MAX_QUERIES as u64) * s.head_dim as u64 + 8),
        limit: caps.workgroup_memory as u64,
    })?;
    let n_rblocks = rows.div_ceil(attend.rb);
    let max_len = s.max_len.max(1);
    let tiles = max_len.div_ceil(attend.bc);
    // Enough workgroups to fill a large GPU, each split at least one tile, and at most 256
    // splits so the partials stay small.
    let per_split = s.batch * s.kv_heads * n_rblocks;
    let want = splits.unwrap_or_else(|| 1024u32.div_ceil(per_split.max(1)));
    let want = want.clamp(1, 256).min(tiles);
    let split_len = max_len.div_ceil(want).div_ceil(attend.bc) * attend.bc;
    let n_splits = max_len.div_ceil(split_len);
    let max = caps.max_workgroups_per_dim;
    for (what, n) in [
        ("slot splits per dispatch", n_splits),
        ("KV heads x row blocks per dispatch", s.kv_heads * n_rblocks),
        ("batch per dispatch", s.batch),
        ("query rows per sequence per dispatch", s.q_heads * s.n),
        ("slot groups per dispatch", s.capacity.div_ceil(wg)),
    ] {
        if n > max {
            return Err(Error::DispatchTooLarge {
                what,
                workgroups: n as u64,
                limit: max as u64,
            });
        }
    }
    let part_rows = s.batch as u64 * s.q_heads as u64 * s.n as u64 * n_splits as u64;
    let ml_base = part_rows * d4 as u64;
    let limit = caps.max_storage_binding.min(caps.max_buffer);
    let part_bytes = 16 * part_rows * (d4 as u64 + 1);
    if part_bytes > limit || ml_base + part_rows > u32::MAX as u64 {
        return Err(Error::TooLarge {
            what: "decode partials",
            bytes: part_bytes,
            limit,
        });
    }
    let sel = selective.unwrap_or(0);
    let plan = DecodePlan {
        attend,
        merge: MergeConfig {
            d: s.head_dim,
            wg,
            lse,
        },
        score: selective.map(|_| ScoreConfig { d: s.head_dim, wg }),
        params: DecodeParams {
            batch: s.batch,
            q_heads: s.q_heads,
            kv_heads: s.kv_heads,
            group,
            n: s.n,
            capacity: s.capacity,
            sel_head: sel,
            sel_kv: sel / group,
            scale,
            splits: n_splits,
            split_len,
            rows,
            n_rblocks,
            ml_base: ml_base as u32,
            _pad0: 0,
            _pad1: 0,
        },
    };
    if plan.score.is_some() && plan.fq_bytes() > limit {
        return Err(Error::TooLarge {
            what: "decode selective scratch",
            bytes: plan.fq_bytes(),
            limit,
        });
    }
    Ok(plan)
}

/// A KV cache's own buffers, as the append and decode kernels bind them.
pub(crate) struct CacheBuffers<'a> {
    pub k: &'a wgpu::Buffer,
    pub v: &'a wgpu::Buffer,
    pub gate: Option<&'a wgpu::Buffer>,
    pub f: &'a wgpu::Buffer,
    pub pos: &'a wgpu::Buffer,
}

/// New tokens for the append kernel; `step` holds each sequence's slot plan.
pub(crate) struct TokenBuffers<'a> {
    pub k: &'a wgpu::Buffer,
    pub v: &'a wgpu::Buffer,
    pub gate: Option<&'a wgpu::Buffer>,
    pub f: Option<&'a wgpu::Buffer>,
    pub step: &'a wgpu::Buffer,
}

/// Records the append kernel (write and evict) for `params.batch` sequences into `pass`.
pub(crate) fn encode_append(
    gpu: &Gpu<'_>,
    pass: &mut wgpu::ComputePass<'_>,
    cfg: AppendConfig,
    elem: DType,
    params: &CacheParams,
    t: &TokenBuffers<'_>,
    c: &CacheBuffers<'_>,
) -> Result<()> {
    let uniform = gpu.uniform("selattn cache params", bytemuck::bytes_of(params));
    let key = KernelKey {
        kernel: Kernel::CacheAppend(cfg),
        elem,
    };
    let din = gpu.dummy_in;
    let entries = [
        entry(0, &uniform),
        entry(1, t.step),
        entry(2, t.k),
        entry(3, t.v),
        entry(4, t.gate.unwrap_or(din)),
        entry(5, t.f.unwrap_or(din)),
        entry(6, c.k),
        entry(7, c.v),
        entry(8, c.gate.unwrap_or(gpu.dummy_out)),
        entry(9, c.f),
        entry(10, c.pos),
    ];
    let groups = [params.batch, 1, 1];
    gpu.dispatch(pass, "selattn cache append", key, &entries, groups)
}

/// A decode step's query-side buffers and its scratch.
pub(crate) struct StepBuffers<'a> {
    pub q: &'a wgpu::Buffer,
    pub tau: Option<&'a wgpu::Buffer>,
    pub alpha: Option<&'a wgpu::Buffer>,
    pub o: &'a wgpu::Buffer,
    pub lse: Option<&'a wgpu::Buffer>,
    /// Each sequence's slot plan (written by the append).
    pub step: &'a wgpu::Buffer,
    /// Per-query F rows (selective masking; a dummy otherwise).
    pub fq: &'a wgpu::Buffer,
    /// Partial (o, m, l) per split.
    pub part: &'a wgpu::Buffer,
}

/// Records the kernels of a decode step after its append: the selective score pass (F state
/// updated in place), split-KV attention and the merge. `max_len` is the longest sequence
/// after the append.
pub(crate) fn encode_step(
    gpu: &Gpu<'_>,
    pass: &mut wgpu::ComputePass<'_>,
    plan: &DecodePlan,
    elem: DType,
    max_len: u32,
    s: &StepBuffers<'_>,
    c: &CacheBuffers<'_>,
) -> Result<()> {
    let p = plan.params;
    let params = gpu.uniform("selattn cache params", bytemuck::bytes_of(&p));
    let din = gpu.dummy_in;
    if let Some(sc) = plan.score {
        let key = KernelKey {
            kernel: Kernel::DecodeScore(sc),
            elem,
        };
        let entries = [
            entry(0, &params),
            entry(1, s.step),
            entry(2, s.q),
            entry(3, c.k),
            entry(6, c.pos),
            entry(9, c.f),
            entry(10, s.fq),
        ];
        let groups = [max_len.div_ceil(sc.wg), p.batch, 1];
        gpu.dispatch(pass, "selattn decode score", key, &entries, groups)?;
    }
    let key = KernelKey {
        kernel: Kernel::DecodeAttend(plan.attend),
        elem,
    };
    let entries = [
        entry(0, &params),
        entry(1, s.step),
        entry(2, s.q),
        entry(3, c.k),
        entry(4, c.v),
        entry(5, c.gate.unwrap_or(din)),
        entry(6, c.pos),
        entry(7, s.tau.unwrap_or(din)),
        entry(8, s.alpha.unwrap_or(din)),
        entry(10, s.fq),
        entry(11, s.part),
    ];
    let groups = [p.splits, p.kv_heads * p.n_rblocks, p.batch];
    gpu.dispatch(pass, "selattn decode attend", key, &entries, groups)?;
    let key = KernelKey {
        kernel: Kernel::DecodeMerge(plan.merge),
        elem,
    };
    let entries = [
        entry(0, &params),
        entry(11, s.part),
        entry(12, s.o),
        entry(13, s.lse.unwrap_or(gpu.dummy_out)),
    ];
    let groups = [p.q_heads * p.n, p.batch, 1];
    gpu.dispatch(pass, "selattn decode merge", key, &entries, groups)
}
