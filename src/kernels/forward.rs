//! The fused forward kernel (`shaders/forward.wgsl`) and the plan of one attention call.

use super::coop::CoopConfig;
use super::gpu::{entry, tensor_entry, Gpu};
use super::selective::{ColsumConfig, ScanConfig};
use super::{Kernel, KernelKey, Params};
use crate::device::Capabilities;
use crate::spec::{Path, Resolved};
use crate::Switches;
use crate::{DType, Error, Result};

/// Specialisation of the forward kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ForwardConfig {
    /// Head dim.
    pub d: u32,
    /// Query rows per workgroup.
    pub br: u32,
    /// Keys per tile.
    pub bc: u32,
    /// Output vec4 columns per thread. The workgroup is a `br / 4` x `bc / 4` grid of threads, each
    /// owning 4 query rows x 4 keys of S and 4 query rows x `dn` vec4 columns of O;
    /// `bc / 4 * dn >= d / 4`.
    pub dn: u32,
    /// Operator features.
    pub features: Switches,
}

impl ForwardConfig {
    pub(crate) fn constants(&self) -> Vec<(&'static str, f64)> {
        let mut c = vec![
            ("D", self.d as f64),
            ("BR", self.br as f64),
            ("BC", self.bc as f64),
            ("DN", self.dn as f64),
        ];
        c.extend(self.features.constants());
        c
    }

    /// Threads per workgroup.
    pub fn threads(&self) -> u32 {
        (self.br / 4) * (self.bc / 4)
    }

    /// Workgroup memory in bytes, as declared in the shader.
    pub fn workgroup_bytes(&self) -> u64 {
        let (br, bc, d4) = (self.br as u64, self.bc as u64, self.d as u64 / 4);
        let tx = bc / 4;
        // Row strides in f32: Q D, K/V tile 4 * (tx * dn + 1), P tile bc + 1.
        let ks = 4 * (tx * self.dn as u64 + 1);
        let base = br * 4 * d4 + bc * ks + br * (bc + 1) + 2 * br * tx;
        let sel = if self.features.selective {
            br * 4 * d4
        } else {
            4
        };
        4 * (base + sel)
    }
}

/// Output vec4 columns per thread at most (`MAX_DN` in the shader).
const MAX_DN: u32 = 16;
/// Threads per workgroup we aim for at most.
const MAX_THREADS: u32 = 256;

/// The uniform parameters of a resolved call with `n_qtiles` query tiles (forward and backward).
pub(crate) fn params(r: &Resolved, n_qtiles: u32) -> Params {
    let s = r.shape;
    Params {
        batch: s.batch,
        q_heads: s.q_heads,
        kv_heads: s.kv_heads,
        q_len: s.q_len,
        k_len: s.k_len,
        group: s.group(),
        start: r.start,
        sel_head: r.options.selective.unwrap_or(0),
        scale: r.scale,
        n_qtiles,
        sel_rows: n_qtiles,
        _pad1: 0,
    }
}

/// The first `(what, workgroups)` over the adapter's workgroups-per-dimension limit, as
/// [`Error::DispatchTooLarge`].
pub(crate) fn check_dispatch(caps: &Capabilities, dims: &[(&'static str, u64)]) -> Result<()> {
    let limit = caps.max_workgroups_per_dim as u64;
    match dims.iter().find(|&&(_, n)| n > limit) {
        Some(&(what, workgroups)) => Err(Error::DispatchTooLarge {
            what,
            workgroups,
            limit,
        }),
        None => Ok(()),
    }
}

/// Tile sizes for head dim `d` within the device's workgroup memory and invocation limits.
///
/// Each thread owns 4 query rows; `tx` threads share a row (4 * `tx` keys per tile, `tx * dn` vec4
/// output columns), `ty` threads share a key column (4 * `ty` query rows per workgroup).
pub fn choose_tiles(caps: &Capabilities, d: u32, features: Switches) -> Result<ForwardConfig> {
    let d4 = d.div_ceil(4);
    let max_threads = caps.max_invocations.min(MAX_THREADS);
    // Threads along a row and output vec4 columns per thread.
    let txs: Vec<(u32, u32)> = [8u32, 4, 2, 1]
        .into_iter()
        .map(|tx| (tx, d4.div_ceil(tx)))
        .filter(|&(_, dn)| dn <= MAX_DN)
        .collect();
    let cfg = |ty: u32, tx: u32, dn: u32| ForwardConfig {
        d,
        br: 4 * ty,
        bc: 4 * tx,
        dn,
        features,
    };
    // Among the tiles that fit: accumulators that stay in registers (dn <= 8) first, then no
    // padded output columns, then the most threads, then the most query rows (fewer K/V reloads).
    let mut best: Option<ForwardConfig> = None;
    for ty in [16u32, 8, 4, 2, 1] {
        for &(tx, dn) in &txs {
            let c = cfg(ty, tx, dn);
            if c.threads() > max_threads || c.workgroup_bytes() > caps.workgroup_memory as u64 {
                continue;
            }
            let score = |c: &ForwardConfig| (c.dn <= 8, c.bc / 4 * c.dn == d4, c.threads(), c.br);
            if best.as_ref().is_none_or(|b| score(&c) > score(b)) {
                best = Some(c);
            }
        }
    }
    if let Some(c) = best {
        return Ok(c);
    }
    Err(Error::TooLarge {
        what: "workgroup memory for the smallest tile",
        bytes: txs
            .first()
            .map_or(0, |&(tx, dn)| cfg(1, tx, dn).workgroup_bytes()),
        limit: caps.workgroup_memory as u64,
    })
}

/// Everything decided about one call before any GPU work: kernels, sizes, scratch.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// The validated call.
    pub resolved: Resolved,
    /// Storage element type.
    pub elem: DType,
    /// The forward kernel.
    pub forward: ForwardConfig,
    /// Selective passes, when selective masking is on.
    pub selective: Option<(ColsumConfig, ScanConfig)>,
    /// Uniform parameters.
    pub params: Params,
    /// The kernel path chosen (never `Auto`).
    pub path: Path,
    /// The cooperative-matrix kernel, when that path was chosen.
    pub coop: Option<CoopConfig>,
}

impl Plan {
    // Long on purpose: path choice, tiles, dispatch limits and the selective passes depend on
    // each other in this order; every size the unchecked kernels rely on is checked in one place.
    /// Builds the plan; every size the kernels will use is checked here.
    pub fn new(caps: &Capabilities, r: &Resolved, elem: DType) -> Result<Plan> {
        let s = r.shape;
        let pr = r.present;
        let features = pr.for_kernel();
        let forward = choose_tiles(caps, s.head_dim, features)?;
        // Cooperative matrices take f16 operands: only f16 storage runs there, so f32 results
        // keep f32 accuracy.
        let coop_for = |f: &ForwardConfig| {
            if elem != DType::F16 {
                return Err("f32 storage runs on the scalar path");
            }
            CoopConfig::choose(caps, f.d, f.features)
        };
        let (path, coop) = match r.options.path.from_env() {
            Path::Scalar => (Path::Scalar, None),
            Path::Coop => match coop_for(&forward) {
                Ok(c) => (Path::Coop, Some(c)),
                Err(why) => return Err(Error::PathUnavailable { path: "coop", why }),
            },
            Path::Auto => match coop_for(&forward) {
                Ok(c) => (Path::Coop, Some(c)),
                Err(_) => (Path::Scalar, None),
            },
        };
        let mut coop = coop;
        let br = coop.map_or(forward.br, |c| c.br);
        let n_qtiles = s.q_len.div_ceil(br);
        check_dispatch(
            caps,
            &[
                ("query tiles per dispatch", n_qtiles as u64),
                ("query heads per dispatch", s.q_heads as u64),
                ("batch per dispatch", s.batch as u64),
            ],
        )?;
        let selective = if r.selective() {
            let wg = caps.max_invocations.min(64);
            let memory = caps.workgroup_memory as u64;
            // With the subgroup prefix, the column sums per 16 rows (SUB16).
            let coop_colsum = coop.and_then(|c| {
                ColsumConfig::coop(s.head_dim, br, c.sgs, pr.kv_len, memory)
                    .map(|cs| ColsumConfig {
                        sub16: c.sgprefix,
                        ..cs
                    })
                    .filter(|cs| cs.workgroup_bytes() <= memory)
            });
            let colsum = coop_colsum
                .into_iter()
                .chain([32u32, 16, 8, 4, 2, 1].into_iter().map(|bc| ColsumConfig {
                    d: s.head_dim,
                    br,
                    bc,
                    wg,
                    kv_len: pr.kv_len,
                    coop_sgs: 0,
                    kpw: 1,
                    sub16: false,
                }))
                .find(|c| c.workgroup_bytes() <= memory)
                .ok_or(Error::TooLarge {
                    what: "workgroup memory for the selective column sums",
                    bytes: 4 * (br as u64 + 1) * s.head_dim as u64,
                    limit: caps.workgroup_memory as u64,
                })?;
            check_dispatch(
                caps,
                &[
                    ("key tiles per dispatch", s.k_len.div_ceil(colsum.bc) as u64),
                    ("key groups per dispatch", s.k_len.div_ceil(wg) as u64),
                ],
            )?;
            // The subgroup prefix needs the cooperative column sums' SUB16 form.
            if let Some(c) = coop.as_mut() {
                c.sgprefix = c.sgprefix && colsum.sub16;
                c.cpre = c.cpre && c.sgprefix;
            }
            // The scan in row parts: 8 parts of the rows per column, 32 columns per workgroup
            // of 256 threads (H200, 2026-12-03, call B: 0.27 -> 0.17 ms at 1x16x16384x64).
            // `pscan` in the coop ablation knob gives the one-thread-per-column scan back.
            let pscan = !std::env::var(super::coop::ABLATE_ENV)
                .unwrap_or_default()
                .split(',')
                .any(|w| w.trim() == "pscan");
            let scan = if pscan && caps.max_invocations >= 256 {
                ScanConfig {
                    wg: 256,
                    f0: pr.f0,
                    f_out: pr.f_out,
                    parts: 8,
                }
            } else {
                ScanConfig {
                    wg,
                    f0: pr.f0,
                    f_out: pr.f_out,
                    parts: 1,
                }
            };
            check_dispatch(
                caps,
                &[("scan groups per dispatch", scan.groups(s.k_len) as u64)],
            )?;
            Some((colsum, scan))
        } else {
            None
        };
        let plan = Plan {
            resolved: *r,
            elem,
            path,
            coop,
            forward,
            selective,
            params: params(r, n_qtiles),
        };
        let mut plan = plan;
        plan.params.sel_rows = s.q_len.div_ceil(plan.sel_block_rows());
        let limit = caps.max_storage_binding.min(caps.max_buffer);
        if plan.scratch_bytes() > limit {
            return Err(Error::TooLarge {
                what: "selective scratch",
                bytes: plan.scratch_bytes(),
                limit,
            });
        }
        Ok(plan)
    }

    /// Query rows per row of the selective scratch: the query tile's BR, or 16 with the
    /// cooperative kernel's subgroup prefix.
    pub fn sel_block_rows(&self) -> u32 {
        match self.coop {
            Some(c) if c.sgprefix => 16,
            Some(c) => c.br,
            None => self.forward.br,
        }
    }

    /// Bytes of scratch memory this call allocates: `B * ceil(Nq / R) * Nk * 4` with selective
    /// masking (R = [`Plan::sel_block_rows`], at least 16), nothing otherwise. Never Nq x Nk.
    pub fn scratch_bytes(&self) -> u64 {
        if self.selective.is_some() {
            4 * self.params.batch as u64 * self.params.sel_rows as u64 * self.params.k_len as u64
        } else {
            0
        }
    }

    /// The forward pipeline key.
    pub fn forward_key(&self) -> KernelKey {
        KernelKey {
            kernel: match self.coop {
                Some(c) => Kernel::CoopForward(c),
                None => Kernel::Forward(self.forward),
            },
            elem: self.elem,
        }
    }

    /// Every pipeline this call dispatches, in dispatch order.
    pub fn keys(&self) -> Vec<KernelKey> {
        let mut keys = Vec::new();
        if let Some((colsum, scan)) = self.selective {
            for kernel in [Kernel::SelColsum(colsum), Kernel::SelScan(scan)] {
                keys.push(KernelKey {
                    kernel,
                    elem: self.elem,
                });
            }
        }
        keys.push(self.forward_key());
        keys
    }
}

/// The buffers of one call, each with the bytes it binds (see [`tensor_entry`]); absent
/// optional tensors are `None` and get the dummy binding.
pub(crate) struct Buffers<'a> {
    pub q: (&'a wgpu::Buffer, u64),
    pub k: (&'a wgpu::Buffer, u64),
    pub v: (&'a wgpu::Buffer, u64),
    pub tau: Option<(&'a wgpu::Buffer, u64)>,
    pub alpha: Option<(&'a wgpu::Buffer, u64)>,
    pub gate: Option<(&'a wgpu::Buffer, u64)>,
    pub kv_len: Option<(&'a wgpu::Buffer, u64)>,
    pub f0: Option<(&'a wgpu::Buffer, u64)>,
    pub o: (&'a wgpu::Buffer, u64),
    pub lse: Option<(&'a wgpu::Buffer, u64)>,
    pub f_out: Option<(&'a wgpu::Buffer, u64)>,
}

/// Records a validated `plan` into one compute pass of `encoder`: with selective masking the
/// column sums and the scan first (into `scratch`), then the forward (or cooperative-matrix)
/// kernel. With `profile`, a timestamp is written into it before every dispatch and one after
/// the last (indices 0, 1, ...; see [`dispatch_labels`]).
pub(crate) fn encode(
    gpu: &Gpu<'_>,
    encoder: &mut wgpu::CommandEncoder,
    plan: &Plan,
    b: &Buffers<'_>,
    scratch: &wgpu::Buffer,
    timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
    profile: Option<&wgpu::QuerySet>,
) -> Result<()> {
    let s = plan.resolved.shape;
    let params = gpu.uniform("selattn params", bytemuck::bytes_of(&plan.params));
    let (dummy, dummy_out) = (gpu.dummy_in, gpu.dummy_out);
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("selattn attention"),
        timestamp_writes: timestamps,
    });
    let mut stamp = 0u32;
    let mut mark = |pass: &mut wgpu::ComputePass| {
        if let Some(qs) = profile {
            pass.write_timestamp(qs, stamp);
            stamp += 1;
        }
    };
    if let Some((colsum, scan)) = plan.selective {
        let key = KernelKey {
            kernel: Kernel::SelColsum(colsum),
            elem: plan.elem,
        };
        let entries = [
            entry(0, &params),
            tensor_entry(1, Some(b.q), dummy),
            tensor_entry(2, Some(b.k), dummy),
            tensor_entry(3, b.kv_len, dummy),
            entry(5, scratch),
        ];
        let groups = [colsum.key_groups(s.k_len), plan.params.n_qtiles, s.batch];
        mark(&mut pass);
        gpu.dispatch(&mut pass, "selattn colsum", key, &entries, groups)?;

        let key = KernelKey {
            kernel: Kernel::SelScan(scan),
            elem: plan.elem,
        };
        let entries = [
            entry(0, &params),
            tensor_entry(4, b.f0, dummy),
            entry(5, scratch),
            tensor_entry(6, b.f_out, dummy_out),
        ];
        let groups = [scan.groups(s.k_len), s.batch, 1];
        mark(&mut pass);
        gpu.dispatch(&mut pass, "selattn scan", key, &entries, groups)?;
    }
    let entries = [
        entry(0, &params),
        tensor_entry(1, Some(b.q), dummy),
        tensor_entry(2, Some(b.k), dummy),
        tensor_entry(3, Some(b.v), dummy),
        tensor_entry(4, b.tau, dummy),
        tensor_entry(5, b.alpha, dummy),
        tensor_entry(6, b.gate, dummy),
        tensor_entry(7, b.kv_len, dummy),
        entry(8, scratch),
        tensor_entry(9, Some(b.o), dummy),
        tensor_entry(10, b.lse, dummy_out),
    ];
    let groups = [plan.params.n_qtiles, s.q_heads, s.batch];
    mark(&mut pass);
    gpu.dispatch(
        &mut pass,
        "selattn forward",
        plan.forward_key(),
        &entries,
        groups,
    )?;
    mark(&mut pass);
    Ok(())
}

/// The label of each dispatch [`encode`] records, in order.
pub(crate) fn dispatch_labels(plan: &Plan) -> Vec<String> {
    let mut out = Vec::new();
    if plan.selective.is_some() {
        out.push("sel_colsum".to_string());
        out.push("sel_scan".to_string());
    }
    out.push("forward".to_string());
    out
}
