//! Decode over a KV cache: append with pruning (`shaders/cache.wgsl`), selective scores,
//! split-KV attention and merge (`shaders/decode.wgsl`).

use super::flag;
use super::gpu::{entry, tensor_entry, Gpu};
use super::{Kernel, KernelKey};
use crate::device::Capabilities;
use crate::DType;
use crate::Switches;
use crate::{Error, Result};

/// Most queries (new tokens) per sequence in one decode step.
pub const MAX_QUERIES: u32 = 8;

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

/// Specialisation of the split-KV attention kernel. K and V are read in 16-byte chunks; the
/// thread layout (see `shaders/decode.wgsl`) follows from the head dim, the element size and
/// the workgroup size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AttendConfig {
    /// Head dim.
    pub d: u32,
    /// Threads per workgroup, a power of two of at least [`AttendConfig::chunks`].
    pub wg: u32,
    /// Query rows per workgroup.
    pub rb: u32,
    /// K and V are f16 (8 per chunk; else f32, 4 per chunk). Not a switch of the call but the
    /// cache's storage type, which fixes the kernel's chunk layout, so it stays a field here.
    pub half: bool,
    /// Operator features, from [`AttendConfig::switches`]: the kernel reads `tau`, `alpha`,
    /// `gate` and `selective`; `causal` is always on (a step's queries see the slots at or before
    /// their position); every other switch is off, so equal kernels have equal keys.
    pub features: Switches,
    /// Each tile's loads issued one tile ahead (`PREFETCH` in the shader; see
    /// [`ATTEND_PREFETCH_ENV`]).
    pub prefetch: bool,
}

/// The decode attend kernel issues the next tile's K, V, gate and position loads before the
/// current tile's compute, so they are in flight through its barriers (registers hold two
/// tiles' chunks). By default on for 256-thread workgroups and off for smaller ones (measured on
/// the H200, BENCHMARKS.md); `1` turns it on and `0` off for every plan. Read at each plan.
pub const ATTEND_PREFETCH_ENV: &str = "SELATTN_DECODE_PREFETCH";

/// Chunks per thread in the QK phase, at most (`MAX_KCH` in the shader).
const MAX_KCH: u32 = 8;
/// Slots per subset in the PV phase, at most (`MAX_KPS`).
const MAX_KPS: u32 = 8;
/// Accumulator vec4 per thread, at most (`MAX_ACC`): rows times vec4 per chunk.
const MAX_ACC: u32 = 16;

impl AttendConfig {
    /// The switches of a call that the attend kernel reads (see [`AttendConfig::features`]).
    pub fn switches(s: Switches) -> Switches {
        Switches {
            causal: true,
            selective: s.selective,
            tau: s.tau,
            alpha: s.alpha,
            gate: s.gate,
            ..Switches::NONE
        }
    }

    /// 16-byte chunks per slot row.
    pub fn chunks(&self) -> u32 {
        if self.half {
            self.d / 8
        } else {
            self.d / 4
        }
    }
    /// `vec4<f32>` per chunk once unpacked.
    pub fn cv(&self) -> u32 {
        if self.half {
            2
        } else {
            1
        }
    }
    /// Threads per slot in the QK phase: a power of two, at least 4 (at most the chunks), so
    /// that each thread holds at most `MAX_KCH` chunks.
    pub fn dp(&self) -> u32 {
        let dc = self.chunks();
        dc.div_ceil(MAX_KCH)
            .next_power_of_two()
            .max(4)
            .min(prev_pow2(dc.max(1)))
            .min(self.wg)
    }
    /// Slots per tile.
    pub fn bc(&self) -> u32 {
        self.wg / self.dp()
    }
    /// Slot subsets of the PV phase.
    pub fn ks(&self) -> u32 {
        (self.wg / self.chunks()).max(1)
    }
    /// Slots per subset.
    pub fn kps(&self) -> u32 {
        self.bc().div_ceil(self.ks())
    }
    /// Chunks per thread in the QK phase.
    pub fn kch(&self) -> u32 {
        self.chunks().div_ceil(self.dp())
    }

    /// Repeat counts of the shader's `//@unroll` blocks.
    pub(crate) fn unroll(&self, name: &str) -> Option<u32> {
        match name {
            "RB" => Some(self.rb),
            "CV" => Some(self.cv()),
            "KCH" => Some(self.kch()),
            "KPS" => Some(self.kps()),
            _ => None,
        }
    }

    /// Whether the per-thread register arrays of the shader hold this configuration.
    pub fn fits_registers(&self) -> bool {
        self.wg >= self.chunks()
            && self.wg.is_power_of_two()
            && self.dp() <= self.chunks()
            && self.kch() <= MAX_KCH
            && self.kps() <= MAX_KPS
            && self.rb * self.cv() <= MAX_ACC
            && self.rb >= 1
    }

    pub(crate) fn constants(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("D", self.d as f64),
            ("WG", self.wg as f64),
            ("RB", self.rb as f64),
            ("BC", self.bc() as f64),
            ("DC", self.chunks() as f64),
            ("CV", self.cv() as f64),
            ("DP", self.dp() as f64),
            ("KS", self.ks() as f64),
            ("HAS_TAU", flag(self.features.tau)),
            ("HAS_ALPHA", flag(self.features.alpha)),
            ("HAS_GATE", flag(self.features.gate)),
            ("SELECTIVE", flag(self.features.selective)),
            ("PREFETCH", flag(self.prefetch)),
        ]
    }

    /// Workgroup memory in bytes, as declared in the shader (the score pass's `qsel` included,
    /// since naga may keep every module-scope workgroup variable).
    pub fn workgroup_bytes(&self) -> u64 {
        let (rb, bc, d, wg, ks) = (
            self.rb as u64,
            self.bc() as u64,
            self.d as u64,
            self.wg as u64,
            self.ks() as u64,
        );
        let dp = self.dp() as u64;
        4 * (rb * d
            + rb * dp * (bc + 8)
            + rb * bc
            + bc
            + 3 * rb * ks
            + 4 * wg
            + MAX_QUERIES as u64 * d)
    }
}

/// Specialisation of the merge kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MergeConfig {
    /// Head dim.
    pub d: u32,
    /// Threads per workgroup.
    pub wg: u32,
    /// Operator features, from [`MergeConfig::switches`]: the kernel reads only `lse` (write
    /// the log-sum-exp); every other switch is off, so equal kernels have equal keys.
    pub features: Switches,
}

impl MergeConfig {
    /// The switches of a call that the merge kernel reads (see [`MergeConfig::features`]).
    pub fn switches(s: Switches) -> Switches {
        Switches {
            lse: s.lse,
            ..Switches::NONE
        }
    }

    pub(crate) fn constants(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("D", self.d as f64),
            ("WG", self.wg as f64),
            ("WRITE_LSE", flag(self.features.lse)),
        ]
    }
}

/// Parameters of the `candidates` and `put` kernels of a segmented cache, mirrored field for
/// field by `struct SegParams` in `shaders/cache_segments.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SegParams {
    /// Sequences of the dispatch.
    pub batch: u32,
    /// Hkv.
    pub kv_heads: u32,
    /// Slots of the segment.
    pub seg_cap: u32,
    /// Budget, or capacity without one.
    pub limit: u32,
    /// Token stride of the new-token tensors.
    pub n: u32,
    /// First sequence of the dispatch.
    pub b0: u32,
    /// First slot of the segment.
    pub seg0: u32,
    /// First token of the dispatch.
    pub t0: u32,
    /// One past its last token.
    pub t1: u32,
    /// Padding.
    pub _pad0: u32,
    /// Padding.
    pub _pad1: u32,
    /// Padding.
    pub _pad2: u32,
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
    /// First sequence of the dispatch's group (the cache's buffers hold sequences b0..;
    /// every other tensor is indexed by b0 + the group's own index).
    pub b0: u32,
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
    /// First sequence of the dispatch's group (the cache's buffers hold sequences b0..;
    /// every other tensor is indexed by b0 + the group's own index).
    pub b0: u32,
    /// First split of the dispatch in the partials (a segmented cache's segments write their
    /// splits side by side, merged once; 0 otherwise): the attend kernel writes splits
    /// `split0 .. split0 + grid splits` of `splits`.
    pub split0: u32,
    /// First sequence of the partials buffer (a segmented cache spreads its sequences' partials
    /// over a few buffers, so that attend dispatches of different sequences need no barrier
    /// between them; 0 otherwise).
    pub pb0: u32,
    /// Padding.
    pub _pad0: u32,
    /// Padding.
    pub _pad1: u32,
    /// Padding.
    pub _pad2: u32,
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
/// `features` are the call's switches (`tau`, `alpha`, `gate`, `lse` and `selective` are read;
/// the others are ignored); `sel_head` is the selection head when `features.selective`.
#[allow(clippy::too_many_arguments)]
pub fn plan(
    caps: &Capabilities,
    s: DecodeShape,
    half: bool,
    scale: f32,
    features: Switches,
    sel_head: u32,
    splits: Option<u32>,
    threads: Option<u32>,
    rows_per_wg: Option<u32>,
) -> Result<DecodePlan> {
    let group = s.q_heads / s.kv_heads;
    let rows = group * s.n;
    let d4 = s.head_dim / 4;
    // The largest power-of-two workgroup up to 256 the device allows.
    let wg_max = prev_pow2(caps.max_invocations.clamp(1, 256));
    let mut chosen = None;
    // Loads one tile ahead: on with 256 threads, off with fewer (H200, 2026-12-03, call B:
    // B1 x 131072 2723 -> 2785 GB/s and B16 x 65536 2901 -> 3049 at 256 threads; B16 x 16384 at
    // 128 threads 2671 -> 2539). `1` or `0` in the variable forces it either way.
    let prefetch_knob = std::env::var(ATTEND_PREFETCH_ENV).ok();
    let prefetch = |wg: u32| match prefetch_knob.as_deref() {
        Some("1") => true,
        Some("0") => false,
        _ => wg == 256,
    };
    if let Some(t) = threads {
        if !t.is_power_of_two() || !(32..=wg_max.max(32)).contains(&t) {
            return Err(Error::TooLarge {
                what: "decode threads per workgroup (a power of two from 32 to the device limit)",
                bytes: t as u64,
                limit: wg_max as u64,
            });
        }
    }
    if let Some(r) = rows_per_wg {
        if !r.is_power_of_two() || r > 16 {
            return Err(Error::TooLarge {
                what: "decode query rows per workgroup (a power of two from 1 to 16)",
                bytes: r as u64,
                limit: 16,
            });
        }
    }
    // Rows per workgroup: as many as fit (each K/V tile is read once for all of them), except on
    // CPU adapters, where the kernel's unrolled per-row code costs minutes of LLVM compile time
    // per variant (lavapipe, 2026-11-29: 200 s for 8 rows at D64 f16) and buys nothing.
    let rb_max = rows_per_wg.unwrap_or(match caps.info.device_type {
        wgpu::DeviceType::Cpu => 2,
        _ => 16,
    });
    // Threads: 256, except 128 on a discrete GPU when the batch alone gives at least 128
    // (KV head, row block) workgroups per split and the whole grid stays within 1024 workgroups
    // (more, smaller workgroups per multiprocessor). Measured on the H200, 2026-12-03, f16 D128,
    // Hq 32, Hkv 8, heated (BENCHMARKS.md): B16 x 16384 (5 splits, 640 workgroups) 2260 -> 2704
    // and 2682 GB/s; B16 x 65536 at its 17 splits (2176 workgroups) 2593 -> 2485, so not there;
    // B1 x 131072 is best at 256 (2496 vs 2161).
    let per_split_est =
        s.batch as u64 * s.kv_heads as u64 * rows.div_ceil(rows.min(rb_max).max(1)) as u64;
    let grid_est = per_split_est * split_rule(caps, per_split_est, s.max_len.max(1)) as u64;
    let wg_cap = match caps.info.device_type {
        wgpu::DeviceType::DiscreteGpu
            if per_split_est >= 128 && grid_est <= 1024 && threads.is_none() =>
        {
            128
        }
        _ => 256,
    };
    'outer: for wg in [256u32, 128, 64, 32] {
        if wg > wg_max || wg > wg_cap || threads.is_some_and(|t| t != wg) {
            continue;
        }
        for rb in [16u32, 8, 4, 2, 1] {
            if rb > rb_max {
                continue;
            }
            let cfg = AttendConfig {
                d: s.head_dim,
                wg,
                rb: rb.min(rows),
                half,
                features: AttendConfig::switches(features),
                prefetch: prefetch(wg),
            };
            if cfg.fits_registers() && cfg.workgroup_bytes() <= caps.workgroup_memory as u64 {
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
    let wg = prev_pow2(caps.max_invocations.clamp(1, 64));
    let n_rblocks = rows.div_ceil(attend.rb);
    let max_len = s.max_len.max(1);
    let bc = attend.bc();
    let tiles = max_len.div_ceil(bc);
    // Splits: enough workgroups to fill the device (a discrete GPU wants a few per
    // multiprocessor; a CPU adapter runs a few at a time), and no more: each split ends with a
    // reduction and a partial, so long splits are cheaper. On the H200 (2026-11-29, B1 x 131072,
    // f16 D128, 8 KV heads) 256 workgroups of 4096 slots read 2426 GB/s, 1024 of 1024 slots
    // 1787. So: about `target` workgroups, but splits of at least 4096 slots when the context is
    // long; at least one tile each, at most 256 splits (the partials stay small). Large batches
    // fill the device by themselves.
    let per_split = s.batch as u64 * s.kv_heads as u64 * n_rblocks as u64;
    let want = splits.unwrap_or_else(|| split_rule(caps, per_split, max_len));
    let want = want.clamp(1, 256).min(tiles);
    let split_len = max_len.div_ceil(want).div_ceil(bc) * bc;
    let n_splits = max_len.div_ceil(split_len);
    let max = caps.max_workgroups_per_dim;
    // In u64: the products may pass u32 for sizes the dispatch limit then refuses.
    for (what, n) in [
        ("slot splits per dispatch", n_splits as u64),
        (
            "KV heads x row blocks per dispatch",
            s.kv_heads as u64 * n_rblocks as u64,
        ),
        ("batch per dispatch", s.batch as u64),
        (
            "query rows per sequence per dispatch",
            s.q_heads as u64 * s.n as u64,
        ),
        ("slot groups per dispatch", s.capacity.div_ceil(wg) as u64),
    ] {
        if n > max as u64 {
            return Err(Error::DispatchTooLarge {
                what,
                workgroups: n,
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
    let sel = if features.selective { sel_head } else { 0 };
    let plan = DecodePlan {
        attend,
        merge: MergeConfig {
            d: s.head_dim,
            wg,
            features: MergeConfig::switches(features),
        },
        score: features
            .selective
            .then_some(ScoreConfig { d: s.head_dim, wg }),
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
            b0: 0,
            split0: 0,
            pb0: 0,
            _pad0: 0,
            _pad1: 0,
            _pad2: 0,
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

/// New tokens for the append kernel, each `(buffer, bytes)` (bound as its own bytes: an
/// application's buffer may be larger than a binding); `step` holds each sequence's slot plan.
pub(crate) struct TokenBuffers<'a> {
    pub k: (&'a wgpu::Buffer, u64),
    pub v: (&'a wgpu::Buffer, u64),
    pub gate: Option<(&'a wgpu::Buffer, u64)>,
    pub f: Option<(&'a wgpu::Buffer, u64)>,
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
        tensor_entry(2, Some(t.k), din),
        tensor_entry(3, Some(t.v), din),
        tensor_entry(4, t.gate, din),
        tensor_entry(5, t.f, din),
        entry(6, c.k),
        entry(7, c.v),
        entry(8, c.gate.unwrap_or(gpu.dummy_out)),
        entry(9, c.f),
        entry(10, c.pos),
    ];
    let groups = [params.batch, 1, 1];
    gpu.dispatch(pass, "selattn cache append", key, &entries, groups)
}

/// A decode step's query-side tensors, each `(buffer, bytes)` (bound as its own bytes), and its
/// scratch.
pub(crate) struct StepBuffers<'a> {
    pub q: (&'a wgpu::Buffer, u64),
    pub tau: Option<(&'a wgpu::Buffer, u64)>,
    pub alpha: Option<(&'a wgpu::Buffer, u64)>,
    pub o: (&'a wgpu::Buffer, u64),
    pub lse: Option<(&'a wgpu::Buffer, u64)>,
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
    // One uniform for the three kernels.
    let params = gpu.uniform("selattn cache params", bytemuck::bytes_of(&plan.params));
    let splits = plan.params.splits;
    encode_score_attend(gpu, pass, plan, elem, max_len, splits, s, c, &params)?;
    encode_merge(gpu, pass, plan, elem, s, &params)
}

/// Records the selective score pass (with selective masking) and split-KV attention of a
/// decode step; the partials are left in `s.part`. `params` holds `plan.params`; the attend
/// grid has `splits` splits (`plan.params.splits`, or a segment's own, written from
/// `plan.params.split0` on).
#[allow(clippy::too_many_arguments)]
pub(crate) fn encode_score_attend(
    gpu: &Gpu<'_>,
    pass: &mut wgpu::ComputePass<'_>,
    plan: &DecodePlan,
    elem: DType,
    max_len: u32,
    splits: u32,
    s: &StepBuffers<'_>,
    c: &CacheBuffers<'_>,
    params: &wgpu::Buffer,
) -> Result<()> {
    let p = plan.params;
    let din = gpu.dummy_in;
    if let Some(sc) = plan.score {
        let key = KernelKey {
            kernel: Kernel::DecodeScore(sc),
            elem,
        };
        let entries = [
            entry(0, params),
            entry(1, s.step),
            tensor_entry(2, Some(s.q), din),
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
        entry(0, params),
        entry(1, s.step),
        tensor_entry(2, Some(s.q), din),
        entry(14, c.k),
        entry(15, c.v),
        entry(5, c.gate.unwrap_or(din)),
        entry(6, c.pos),
        tensor_entry(7, s.tau, din),
        tensor_entry(8, s.alpha, din),
        entry(10, s.fq),
        entry(11, s.part),
    ];
    let groups = [splits, p.kv_heads * p.n_rblocks, p.batch];
    gpu.dispatch(pass, "selattn decode attend", key, &entries, groups)
}

/// Records the merge of a decode step's splits (after [`encode_score_attend`]). `params`
/// holds `plan.params`.
pub(crate) fn encode_merge(
    gpu: &Gpu<'_>,
    pass: &mut wgpu::ComputePass<'_>,
    plan: &DecodePlan,
    elem: DType,
    s: &StepBuffers<'_>,
    params: &wgpu::Buffer,
) -> Result<()> {
    let p = plan.params;
    let din = gpu.dummy_in;
    let key = KernelKey {
        kernel: Kernel::DecodeMerge(plan.merge),
        elem,
    };
    let entries = [
        entry(0, params),
        entry(11, s.part),
        tensor_entry(12, Some(s.o), din),
        tensor_entry(13, s.lse, gpu.dummy_out),
    ];
    let groups = [p.q_heads * p.n, p.batch, 1];
    gpu.dispatch(pass, "selattn decode merge", key, &entries, groups)
}

/// The kernels of a segmented cache's append (`shaders/cache_segments.wgsl`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SegKernel {
    /// Eviction candidates of the segment, folded into each sequence's best.
    Candidates,
    /// K, V and gate of the new tokens whose slot is in the segment.
    Put,
    /// Positions and F of the new tokens whose slot is in the segment.
    PutState,
}

/// Records one kernel of a segmented cache's append for `params.batch` sequences: the segment's
/// buffers in `c`, each sequence's best eviction candidate in `best`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn encode_segment_append(
    gpu: &Gpu<'_>,
    pass: &mut wgpu::ComputePass<'_>,
    cfg: AppendConfig,
    elem: DType,
    params: &SegParams,
    which: SegKernel,
    t: &TokenBuffers<'_>,
    c: &CacheBuffers<'_>,
    best: &wgpu::Buffer,
) -> Result<()> {
    let uniform = gpu.uniform("selattn cache segment params", bytemuck::bytes_of(params));
    let din = gpu.dummy_in;
    let groups = [params.batch, 1, 1];
    // Each kernel keyed only on the switches it reads, so equal kernels share a pipeline.
    let (gate, f) = match which {
        SegKernel::Candidates => (false, false),
        SegKernel::Put => (cfg.gate, false),
        SegKernel::PutState => (false, cfg.f),
    };
    let cfg = AppendConfig { gate, f, ..cfg };
    let (kernel, label, entries) = match which {
        SegKernel::Candidates => (
            Kernel::CacheCandidates(cfg),
            "selattn cache candidates",
            vec![
                entry(0, &uniform),
                entry(1, t.step),
                entry(9, c.f),
                entry(10, c.pos),
                entry(11, best),
            ],
        ),
        SegKernel::Put => (
            Kernel::CachePut(cfg),
            "selattn cache put",
            vec![
                entry(0, &uniform),
                entry(1, t.step),
                tensor_entry(2, Some(t.k), din),
                tensor_entry(3, Some(t.v), din),
                tensor_entry(4, t.gate, din),
                entry(6, c.k),
                entry(7, c.v),
                // Without a gate, the segment's own K stands in (never accessed): the shared
                // dummy, writable, would put a barrier between every two puts.
                entry(8, c.gate.unwrap_or(c.k)),
                entry(23, best),
            ],
        ),
        SegKernel::PutState => (
            Kernel::CachePutState(cfg),
            "selattn cache put state",
            vec![
                entry(0, &uniform),
                entry(1, t.step),
                tensor_entry(5, t.f, din),
                entry(9, c.f),
                entry(10, c.pos),
                entry(23, best),
            ],
        ),
    };
    gpu.dispatch(pass, label, KernelKey { kernel, elem }, &entries, groups)
}

/// Environment knob: `0` makes a segmented cache's decode step write every segment's partials
/// into one shared buffer (then merged once) instead of a buffer per (sequence, segment) merged
/// by `merge_segments`; the shared form is also what more than [`MERGE_SEGMENTS`] segments
/// get. A measurement knob, read at each step.
pub const SEGMENT_GATHER_ENV: &str = "SELATTN_DECODE_SEGMENT_GATHER";

/// A cache in several sequence groups (unsegmented) gives each group a partials buffer of its
/// own, runs the append in a pass of its own followed by one transition of every group's slots
/// to read-only, then every group's attend before any merge: the attend dispatches then write
/// different buffers and wgpu puts no barrier between them (H200, 2026-12-03, call B: B16 x 65536
/// 2901 -> 3004 GB/s, with the prefetch 3174). On by default; `0` gives the old form (one shared
/// partials buffer, each group's attend then merge). Read at each step.
pub const GROUP_PARTS_ENV: &str = "SELATTN_DECODE_GROUP_PARTS";

/// Slot splits per segment of a segmented cache's decode step when each (sequence, segment)
/// writes partials of its own (unless the call sets [`DecodeOptions`](crate::cache::DecodeOptions)
/// `splits`): the segments' dispatches run side by side, so fewer, longer splits than one
/// dispatch alone would want, and a shorter merge. H200, 2026-12-03, B16 x 16384 f16 in 3
/// segments (16 MiB buffers): 32 splits per segment (the planner's for one sequence)
/// 1.62 ms/step, 8 splits 0.82 (BENCHMARKS.md).
pub const SEGMENT_SPLITS: u32 = 8;

/// Segments the `merge_segments` kernel of a segmented cache merges at most (its partials
/// bindings).
pub const MERGE_SEGMENTS: usize = 8;

/// Parameters of the `merge_segments` kernel of a segmented cache, mirrored field for field by
/// `struct MergeSegParams` in `shaders/cache_segments.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct MergeSegParams {
    /// Hq.
    pub q_heads: u32,
    /// Queries per sequence.
    pub n: u32,
    /// First sequence of the dispatch.
    pub b0: u32,
    /// Segments per sequence.
    pub nseg: u32,
    /// Sequences of the dispatch (`nseg * nseq` at most [`MERGE_SEGMENTS`]).
    pub nseq: u32,
    /// Padding.
    pub _pad0: u32,
    /// Padding.
    pub _pad1: u32,
    /// Padding.
    pub _pad2: u32,
    /// Splits of each segment's partials.
    pub splits: [u32; MERGE_SEGMENTS],
    /// Index (in vec4) of the first (m, l) entry of each segment's partials.
    pub ml_base: [u32; MERGE_SEGMENTS],
}

/// Records the merge of sequences `params.b0 ..` over their segments' partials (`parts`:
/// sequence by sequence, segment by segment; at most [`MERGE_SEGMENTS`] in all), writing their O
/// and LSE rows.
pub(crate) fn encode_merge_segments(
    gpu: &Gpu<'_>,
    pass: &mut wgpu::ComputePass<'_>,
    cfg: MergeConfig,
    elem: DType,
    params: &MergeSegParams,
    parts: &[&wgpu::Buffer],
    s: &StepBuffers<'_>,
) -> Result<()> {
    let nb = params.nseq as usize;
    if nb == 0 || parts.len() > MERGE_SEGMENTS || parts.len() != params.nseg as usize * nb {
        return Err(Error::gpu_msg(
            "merge_segments: partials buffers do not match nseg x nseq",
        ));
    }
    let uniform = gpu.uniform("selattn cache merge params", bytemuck::bytes_of(params));
    let key = KernelKey {
        kernel: Kernel::CacheMergeSegments(cfg),
        elem,
    };
    let mut entries = vec![entry(12, &uniform)];
    for k in 0..MERGE_SEGMENTS {
        entries.push(entry(
            13 + k as u32,
            parts.get(k).copied().unwrap_or(gpu.dummy_in),
        ));
    }
    entries.push(tensor_entry(21, Some(s.o), gpu.dummy_out));
    entries.push(tensor_entry(22, s.lse, gpu.dummy_out));
    let groups = [params.q_heads * params.n, params.nseq, 1];
    gpu.dispatch(pass, "selattn cache merge segments", key, &entries, groups)
}

/// Default slot splits: about `target` workgroups in all (by device type), but splits of at
/// least 4096 slots (see [`plan`]); before clamping to 1..=256 and the tile count.
fn split_rule(caps: &Capabilities, per_split: u64, max_len: u32) -> u32 {
    let target = match caps.info.device_type {
        wgpu::DeviceType::Cpu => 32u64,
        wgpu::DeviceType::IntegratedGpu => 64,
        _ => 256,
    };
    target
        .div_ceil(per_split.max(1))
        .max(max_len.div_ceil(4096) as u64)
        .min(u32::MAX as u64) as u32
}

/// The largest power of two at most `x` (x >= 1).
fn prev_pow2(x: u32) -> u32 {
    if x.is_power_of_two() {
        x
    } else {
        x.next_power_of_two() / 2
    }
}

/// Expands `//@unroll NAME COUNT` ... `//@end` blocks (nested, one per line) of a WGSL text:
/// the body repeated COUNT times (`count(COUNT)`) with `{NAME}` replaced by 0, 1, ...
pub(crate) fn unroll(text: &str, count: &dyn Fn(&str) -> Option<u32>) -> Result<String> {
    let bad = |why: String| Error::gpu_msg(format!("decode shader template: {why}"));
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::with_capacity(text.len() * 2);
    let mut i = 0;
    while i < lines.len() {
        let t = lines[i].trim_start();
        if let Some(rest) = t.strip_prefix("//@unroll ") {
            let mut it = rest.split_whitespace();
            let (Some(name), Some(n)) = (it.next(), it.next()) else {
                return Err(bad(format!("line {}: //@unroll NAME COUNT", i + 1)));
            };
            let reps = count(n).ok_or_else(|| bad(format!("unknown count {n}")))?;
            let mut depth = 1;
            let mut j = i + 1;
            while j < lines.len() {
                let u = lines[j].trim_start();
                if u.starts_with("//@unroll ") {
                    depth += 1;
                } else if u.starts_with("//@end") {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                j += 1;
            }
            if depth != 0 {
                return Err(bad(format!("line {}: no //@end", i + 1)));
            }
            let body = unroll(&lines[i + 1..j].join("\n"), count)?;
            let key = format!("{{{name}}}");
            for r in 0..reps {
                out.push_str(&body.replace(&key, &r.to_string()));
            }
            i = j + 1;
        } else if t.starts_with("//@end") {
            return Err(bad(format!("line {}: //@end without //@unroll", i + 1)));
        } else {
            out.push_str(lines[i]);
            out.push('\n');
            i += 1;
        }
    }
    Ok(out)
}
