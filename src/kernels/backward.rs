//! The backward kernels (`shaders/backward.wgsl`, scalar path) and the plan of one backward call,
//! which also chooses the cooperative-matrix kernels (`coop_backward`) for f16 storage where the
//! adapter has them: those replace the scalar dkv, dq, selq and selk entries; prep, fscan and
//! finish are shared.
//!
//! FlashAttention-2's split: a dK/dV/dgate pass over query tiles per key tile and a dQ/dtau pass
//! over key tiles per query tile, both recomputing P from the forward's LSE; a preprocessing pass
//! for Delta = dot(dO, O); with selective masking, tiled passes for dF0 and the selection head's
//! extra gradients (column sums per query tile, a suffix scan, an in-tile suffix). Every element
//! has exactly one writer and every sum runs in a fixed order, so repeat runs are bit-identical.

use super::coop_backward::{CoopBackwardConfig, CoopEntry, ROWS};
use super::forward::{check_dispatch, params};
use super::selective::{ColsumConfig, ScanConfig};
use super::{knob_on, Kernel, KernelKey, Params};
use crate::device::Capabilities;
use crate::spec::{Path, Resolved};
use crate::Switches;
use crate::{DType, Error, Result};

/// One entry point of the backward shader.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Entry {
    /// Copies of the small inputs into the workspace, and Delta.
    Prep,
    /// dK, dV, dgate (and the selective column sums of dz).
    Dkv,
    /// dQ and dt.
    Dq,
    /// Selective: suffix scan of the column sums over query tiles, dF0.
    Fscan,
    /// Selective: the selection head's dQ term.
    Selq,
    /// Selective: the selection KV head's dK term.
    Selk,
    /// dtau, dalpha, dgate, dF0 out of the workspace.
    Finish,
}

impl Entry {
    /// The WGSL entry point.
    pub fn name(self) -> &'static str {
        match self {
            Entry::Prep => "prep",
            Entry::Dkv => "dkv",
            Entry::Dq => "dq",
            Entry::Fscan => "fscan",
            Entry::Selq => "selq",
            Entry::Selk => "selk",
            Entry::Finish => "finish",
        }
    }
}

/// Specialisation of one backward entry point. Entries that do not depend on a field have it
/// at a fixed value, so equal kernels share one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackwardConfig {
    /// Entry point.
    pub entry: Entry,
    /// Head dim.
    pub d: u32,
    /// Query rows per tile.
    pub br: u32,
    /// Keys per tile.
    pub bc: u32,
    /// Threads per workgroup of the tiled entries.
    pub wg: u32,
    /// Operator features (`lse` unused).
    pub features: Switches,
}

impl BackwardConfig {
    pub(crate) fn constants(&self) -> Vec<(&'static str, f64)> {
        let mut c = vec![
            ("D", self.d as f64),
            ("BR", self.br as f64),
            ("BC", self.bc as f64),
            ("WG", self.wg as f64),
        ];
        c.extend(self.features.constants());
        c
    }

    /// Workgroup memory in bytes of the tiled entries, as declared in the shader.
    pub fn workgroup_bytes(&self) -> u64 {
        tile_bytes(self.d, self.br, self.bc, self.features.selective)
    }
}

fn tile_bytes(d: u32, br: u32, bc: u32, selective: bool) -> u64 {
    let (d, br, bc) = (d as u64, br as u64, bc as u64);
    let sel = if selective { 2 * br * bc } else { 2 };
    // Q, dO, K, V tiles; P, dz, x (and F, dS) tiles; row and key values; two accumulators.
    4 * (2 * br * d + 2 * bc * d + 3 * br * bc + sel + 3 * br + bc + 1 + 2 * br.max(bc) * d)
}

/// Whether the coop path also runs the selective terms on cooperative matrices.
const COOP_SELECTIVE: bool = true;

/// Environment variable that turns the du scratch of the coop selective terms off
/// (`SELATTN_BACKWARD_DU=0`: coop_selk recomputes dz of every head, as before), for measuring
/// and testing both variants with one binary.
pub const DU_ENV: &str = "SELATTN_BACKWARD_DU";

fn du_enabled() -> bool {
    knob_on(DU_ENV)
}

/// Environment variable that turns the split du path off (`SELATTN_BACKWARD_SPLIT=0`: coop_selq
/// walks every key tile of its 64 rows in one workgroup, writing du and adding dq_sel itself),
/// for A/B measurements and tests with one binary.
pub const SPLIT_ENV: &str = "SELATTN_BACKWARD_SPLIT";

/// Environment variable that keeps the scalar column-sum pass (the selective C) on the coop path
/// (`SELATTN_BACKWARD_COOP_COLSUM=0`), for A/B measurements with one binary.
pub const COOP_COLSUM_ENV: &str = "SELATTN_BACKWARD_COOP_COLSUM";

fn coop_colsum_enabled() -> bool {
    knob_on(COOP_COLSUM_ENV)
}

fn split_enabled() -> bool {
    knob_on(SPLIT_ENV)
}

/// Threads per workgroup we use at most.
const MAX_THREADS: u32 = 256;

/// Square tiles (BR = BC) and threads for head dim `d` within the device's limits: the largest
/// tile up to `max_tile` whose workgroup memory fits, with 4 to 8 tile elements per thread.
pub fn choose_tiles(
    caps: &Capabilities,
    d: u32,
    selective: bool,
    max_tile: u32,
) -> Result<(u32, u32, u32)> {
    let max_threads = caps.max_invocations.min(MAX_THREADS);
    for t in [32u32, 16, 8, 4, 2, 1]
        .into_iter()
        .filter(|&t| t <= max_tile)
    {
        if tile_bytes(d, t, t, selective) > caps.workgroup_memory as u64 {
            continue;
        }
        let wg = (t * t / 4).clamp(64, max_threads.max(t));
        if wg <= max_threads {
            return Ok((t, t, wg));
        }
    }
    Err(Error::TooLarge {
        what: "workgroup memory for the smallest backward tile",
        bytes: tile_bytes(d, 1, 1, selective),
        limit: caps.workgroup_memory as u64,
    })
}

/// Which gradients a call computes (and whether dF_out is given).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Wanted {
    /// dQ.
    pub dq: bool,
    /// dK.
    pub dk: bool,
    /// dV.
    pub dv: bool,
    /// dgate.
    pub dgate: bool,
    /// dtau.
    pub dtau: bool,
    /// dalpha.
    pub dalpha: bool,
    /// dF0.
    pub df0: bool,
    /// dF_out is given (else it is zero).
    pub df_out: bool,
}

impl Wanted {
    /// Every gradient.
    pub fn all(selective: bool) -> Wanted {
        Wanted {
            dq: true,
            dk: true,
            dv: true,
            dgate: true,
            dtau: true,
            dalpha: true,
            df0: selective,
            df_out: false,
        }
    }

    fn flags(&self) -> u32 {
        [
            self.dq,
            self.dk,
            self.dv,
            self.dgate,
            self.dtau,
            self.dalpha,
            self.df0,
            self.df_out,
        ]
        .iter()
        .enumerate()
        .map(|(i, &b)| (b as u32) << i)
        .sum()
    }
}

/// Offsets (in f32 elements) of the workspace regions, mirrored by `struct Layout` in
/// `shaders/backward.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Layout {
    /// LSE rows.
    pub lse: u32,
    /// Delta rows.
    pub delta: u32,
    /// tau rows.
    pub tau: u32,
    /// alpha.
    pub alpha: u32,
    /// gate.
    pub gate: u32,
    /// Valid key counts.
    pub valid: u32,
    /// Selective column sums G, then E.
    pub g: u32,
    /// dt rows.
    pub dt: u32,
    /// dgate.
    pub dgate: u32,
    /// dF0.
    pub df0: u32,
    /// The selection head's dQ before its selective term.
    pub dqb: u32,
    /// The selection KV head's dK before its selective term.
    pub dkb: u32,
    /// Gradients wanted, bit per [`Wanted`] field in declaration order.
    pub flags: u32,
    /// Elements of the per-element passes.
    pub n_lin: u32,
    /// First query row of this dispatch's chunk (coop selq / selk with the du scratch; else 0).
    pub row_lo: u32,
    /// End of this dispatch's chunk of query rows (else the query length).
    pub row_hi: u32,
}

/// Everything decided about one backward call before any GPU work.
#[derive(Clone, Copy, Debug)]
pub struct BackwardPlan {
    /// The validated call.
    pub resolved: Resolved,
    /// Storage element type of Q, K, V, O, dO, dQ, dK, dV.
    pub elem: DType,
    /// Query rows per tile.
    pub br: u32,
    /// Keys per tile.
    pub bc: u32,
    /// Threads per workgroup of the tiled entries.
    pub wg: u32,
    /// Operator features.
    pub features: Switches,
    /// The forward's selective passes that rebuild C with this plan's BR.
    pub selective: Option<(ColsumConfig, ScanConfig)>,
    /// Gradients computed.
    pub wanted: Wanted,
    /// Uniform parameters (`n_qtiles` with this plan's BR).
    pub params: Params,
    /// Workspace layout.
    pub layout: Layout,
    /// Workspace elements (f32).
    pub ws_floats: u64,
    /// Key tiles.
    pub n_ktiles: u32,
    /// The kernel path of dK/dV and dQ (never `Auto`).
    pub path: Path,
    /// The cooperative-matrix dkv and dq kernels, when that path was chosen.
    pub coop: Option<(CoopBackwardConfig, CoopBackwardConfig)>,
    /// The cooperative-matrix selq and selk kernels (coop path with selective masking, where
    /// workgroup memory allows; else the scalar selq and selk run).
    pub coop_sel: Option<(CoopBackwardConfig, CoopBackwardConfig)>,
    /// Query rows per chunk of the du scratch (a multiple of 64), or 0 when coop_selk recomputes
    /// dz itself. With it, coop_selq (one dispatch per chunk) writes du, the head-summed
    /// selective gradient of the selection head's logits, for its rows into the G slots of KV
    /// heads 1.. (dead once fscan has run: `(Hkv - 1) * ceil(Nq / BR) * Nk` floats per batch, so
    /// no extra scratch), and coop_selk_du reads it instead of recomputing dz of every head.
    pub du_rows: u32,
    /// With the du scratch: the split path, where coop_seldu writes du with one workgroup per
    /// (64 rows, key tile) and coop_selq_du adds the selection head's dQ term from it, in place
    /// of coop_selq (whose workgroups walk every key tile of their rows one after the other).
    pub du_split: Option<CoopBackwardConfig>,
}

impl BackwardPlan {
    /// Builds the plan; every size the kernels will use is checked here.
    pub fn new(caps: &Capabilities, r: &Resolved, elem: DType, wanted: Wanted) -> Result<Self> {
        let s = r.shape;
        let pr = r.present;
        if pr.kv_len && s.k_len >= 1 << 24 {
            // Valid key counts travel through the f32 workspace.
            return Err(Error::CountTooLarge {
                what: "keys with kv_len in the backward pass",
                count: s.k_len as u64,
                limit: (1 << 24) - 1,
            });
        }
        let features = Switches {
            lse: false,
            ..pr.for_kernel()
        };
        let (path, mut coop, (mut br, bc, wg)) = choose_path(caps, r, elem, features)?;
        // On the coop path with its selective kernels, C tiles of 16 rows (one subgroup's rows)
        // even where the scalar tiles are smaller (D128: 8): the cooperative-matrix column sums
        // need them, and G is half the size. The scalar kernels using BR (selq, selk) do not
        // run then.
        if let Some((dkv, _)) = coop {
            if r.selective() && COOP_SELECTIVE && br < 16 && coop_colsum_enabled() {
                if let Ok(c16) = CoopBackwardConfig::choose(caps, s.head_dim, 16, features) {
                    if CoopBackwardConfig::choose_selective(caps, &c16.0, false).is_ok()
                        && CoopBackwardConfig::choose_selective(caps, &dkv, false).is_ok()
                    {
                        coop = Some(c16);
                        br = 16;
                    }
                }
            }
        }
        let n_qtiles = s.q_len.div_ceil(br);
        let (coop_sel, du_rows) = choose_selective_coop(caps, r, coop, n_qtiles, wanted);
        let du_split = match coop_sel {
            // The split writer's grid spans the key tiles of a chunk: within the limit?
            Some((q, _))
                if du_rows > 0
                    && split_enabled()
                    && s.k_len.div_ceil(q.bt) <= caps.max_workgroups_per_dim =>
            {
                Some(CoopBackwardConfig::seldu(caps, &q))
            }
            _ => None,
        };
        let n_ktiles = s.k_len.div_ceil(bc);
        let rows = s.batch as u64 * s.q_heads as u64 * s.q_len as u64;
        let keys = s.batch as u64 * s.kv_heads as u64 * s.k_len as u64;
        let n_lin = rows.max(keys).max(s.q_heads as u64);
        check_dispatches(caps, r, n_qtiles, n_ktiles, n_lin)?;
        let (layout, ws_floats) = workspace_layout(caps, r, wanted, n_qtiles, n_lin)?;
        let sel_passes = selective_passes(caps, r, br, coop.map(|(dkv, _)| dkv.sgs))?;
        Ok(BackwardPlan {
            resolved: *r,
            elem,
            br,
            bc,
            wg,
            features,
            selective: sel_passes,
            wanted,
            params: params(r, n_qtiles),
            layout,
            ws_floats,
            n_ktiles,
            path,
            coop,
            coop_sel,
            du_rows,
            du_split,
        })
    }

    /// Bytes of scratch memory this call allocates: the workspace (rows, keys, and with selective
    /// masking `B * Hkv * ceil(Nq / BR) * Nk` column sums plus the selection head's dQ and dK
    /// rows) and, with selective masking, C (`B * ceil(Nq / BR) * Nk`). Never Nq x Nk.
    ///
    /// The selective part is `B * (Hkv + 1) * ceil(Nq / BR) * Nk` floats: within issue 14's
    /// `B * Hq * ceil(Nq / BR) * Nk` whenever Hq > Hkv (GQA, MQA), and one `B * ceil(Nq / BR) * Nk`
    /// part above it when Hq = Hkv. Both parts are needed at once: the column sums of dz need one
    /// slot per KV head because the dK/dV workgroups of different KV heads write them with no
    /// float atomics (summed afterwards in a fixed order, for bit-identical runs), and C (the
    /// forward's carry of F) is read by the dK/dV, dQ and selective passes that run while the
    /// sums are live. On the cooperative-matrix path BR is at most 16 (a C tile never spans two
    /// subgroups' rows), so the same formula holds with that BR. The coop path's du chunks
    /// ([`BackwardPlan::du_rows`]) reuse the column-sum slots of KV heads 1.. once fscan has
    /// folded them into E, so they add nothing.
    pub fn scratch_bytes(&self) -> u64 {
        4 * (self.ws_floats + self.c_floats())
    }

    /// Elements of the selective C buffer (0 without selective masking).
    pub fn c_floats(&self) -> u64 {
        if self.selective.is_some() {
            self.params.batch as u64 * self.params.n_qtiles as u64 * self.params.k_len as u64
        } else {
            0
        }
    }

    /// Whether `entry` is dispatched for this call.
    pub fn runs(&self, entry: Entry) -> bool {
        let w = self.wanted;
        let sel = self.selective.is_some();
        let fscan = sel && (w.dq || w.dk || w.df0);
        match entry {
            Entry::Prep => w.dq || w.dk || w.dv || w.dgate || w.dtau || w.dalpha || w.df0,
            Entry::Dkv => w.dk || w.dv || w.dgate || fscan,
            Entry::Dq => w.dq || w.dtau || w.dalpha,
            Entry::Fscan => fscan,
            Entry::Selq => sel && (w.dq || (w.dk && self.du_rows > 0)),
            Entry::Selk => sel && w.dk,
            Entry::Finish => w.dtau || w.dalpha || w.dgate || w.df0,
        }
    }

    /// The key of one entry point.
    pub fn key(&self, entry: Entry) -> KernelKey {
        match (entry, self.coop, self.coop_sel) {
            (Entry::Selq, _, Some(_)) if self.du_split.is_some() => {
                if let Some(c) = self.du_split {
                    return KernelKey {
                        kernel: Kernel::CoopBackward(c),
                        elem: self.elem,
                    };
                }
            }
            (Entry::Dkv, Some((c, _)), _)
            | (Entry::Dq, Some((_, c)), _)
            | (Entry::Selq, _, Some((c, _)))
            | (Entry::Selk, _, Some((_, c))) => {
                return KernelKey {
                    kernel: Kernel::CoopBackward(c),
                    elem: self.elem,
                }
            }
            _ => {}
        }
        let tiled = !matches!(entry, Entry::Prep | Entry::Fscan | Entry::Finish);
        let features = match entry {
            Entry::Fscan | Entry::Finish => Switches::NONE,
            Entry::Prep => self.features.inputs(),
            _ => self.features,
        };
        KernelKey {
            kernel: Kernel::Backward(BackwardConfig {
                entry,
                d: if matches!(entry, Entry::Fscan | Entry::Finish) {
                    8
                } else {
                    self.resolved.shape.head_dim
                },
                br: if tiled { self.br } else { 1 },
                bc: if tiled { self.bc } else { 1 },
                wg: if tiled { self.wg } else { 64 },
                features,
            }),
            elem: self.elem,
        }
    }

    /// Every pipeline this call dispatches, in dispatch order.
    pub fn keys(&self) -> Vec<KernelKey> {
        let mut keys = vec![];
        let push = |e: Entry, keys: &mut Vec<KernelKey>| {
            if self.runs(e) {
                keys.push(self.key(e));
            }
        };
        push(Entry::Prep, &mut keys);
        if let Some((colsum, scan)) = self.selective {
            if self.runs(Entry::Dkv) || self.runs(Entry::Dq) {
                for kernel in [Kernel::SelColsum(colsum), Kernel::SelScan(scan)] {
                    keys.push(KernelKey {
                        kernel,
                        elem: self.elem,
                    });
                }
            }
        }
        for e in [
            Entry::Dkv,
            Entry::Dq,
            Entry::Fscan,
            Entry::Selq,
            Entry::Selk,
            Entry::Finish,
        ] {
            push(e, &mut keys);
            if let (Entry::Selq, Some(c)) = (e, self.du_split) {
                // The split path's reader: dq_sel from the du scratch, after the writer.
                if self.runs(e) {
                    keys.push(KernelKey {
                        // (The selective tile of coop_selq, not the writer's: SDQ and RQ
                        // may have given coop_seldu a larger one; with DUP, coop_selk_du's
                        // tile and form.)
                        kernel: Kernel::CoopBackward(CoopBackwardConfig {
                            entry: CoopEntry::SelqRead,
                            sdq: false,
                            rq: false,
                            ..self.coop_sel.map_or(c, |(q, k)| if k.dup { k } else { q })
                        }),
                        elem: self.elem,
                    });
                }
            }
        }
        keys
    }
}

/// A pair of cooperative-matrix configs (dkv/dq, or selq/selk).
type CoopPair = (CoopBackwardConfig, CoopBackwardConfig);

/// The path (scalar or cooperative-matrix), its dkv/dq configs and the scalar tiles `(br, bc, wg)`.
type PathChoice = (Path, Option<CoopPair>, (u32, u32, u32));

/// Chooses the path and tiles the options ask for, falling back to the scalar path where the
/// cooperative one is unavailable and not demanded.
fn choose_path(
    caps: &Capabilities,
    r: &Resolved,
    elem: DType,
    features: Switches,
) -> Result<PathChoice> {
    let s = r.shape;
    let selective = r.selective();
    // The cooperative-matrix path takes f16 storage only (f32 keeps f32 accuracy). Its
    // selective tiles (the C of the forward's passes, and the scalar selq/selk entries) are
    // at most 16 rows, so that a C tile never spans two subgroups' rows.
    let coop_for = |br: u32| {
        if elem != DType::F16 {
            return Err("f32 storage runs on the scalar path");
        }
        CoopBackwardConfig::choose(caps, s.head_dim, br, features)
    };
    let (path, coop, (br, bc, wg)) = match r.options.path.from_env() {
        Path::Scalar => (
            Path::Scalar,
            None,
            choose_tiles(caps, s.head_dim, selective, 32)?,
        ),
        want => {
            let tiles = choose_tiles(caps, s.head_dim, selective, 16)?;
            match (coop_for(tiles.0), want) {
                (Ok(c), _) => (Path::Coop, Some(c), tiles),
                (Err(why), Path::Coop) => return Err(Error::PathUnavailable { path: "coop", why }),
                (Err(_), _) => (
                    Path::Scalar,
                    None,
                    choose_tiles(caps, s.head_dim, selective, 32)?,
                ),
            }
        }
    };
    Ok((path, coop, (br, bc, wg)))
}

/// The cooperative selective configs (if any) and the du chunk rows (0: no du scratch).
fn choose_selective_coop(
    caps: &Capabilities,
    r: &Resolved,
    coop: Option<CoopPair>,
    n_qtiles: u32,
    wanted: Wanted,
) -> (Option<CoopPair>, u32) {
    let s = r.shape;
    let selective = r.selective();
    // du chunk: the most whole 64-row blocks whose du fit in the free G slots of a batch.
    let du_rows = {
        let free = (s.kv_heads as u64 - 1) * n_qtiles as u64;
        let all = s.q_len.div_ceil(ROWS) as u64 * ROWS as u64;
        (free / ROWS as u64 * ROWS as u64).min(all) as u32
    };
    let du_rows = if coop.is_some() && selective && wanted.dk && du_enabled() {
        du_rows
    } else {
        0
    };
    let mut du_rows = du_rows;
    let coop_sel = match coop {
        Some((dkv, _)) if selective && COOP_SELECTIVE => {
            CoopBackwardConfig::choose_selective(caps, &dkv, du_rows > 0).ok()
        }
        _ => None,
    };
    if coop_sel.is_none() {
        du_rows = 0;
    }
    (coop_sel, du_rows)
}

/// Checks every dispatch dimension the plan will use against the adapter's limit.
fn check_dispatches(
    caps: &Capabilities,
    r: &Resolved,
    n_qtiles: u32,
    n_ktiles: u32,
    n_lin: u64,
) -> Result<()> {
    let s = r.shape;
    let max = caps.max_workgroups_per_dim;
    check_dispatch(
        caps,
        &[
            ("query tiles per dispatch", n_qtiles as u64),
            ("key tiles per dispatch", n_ktiles as u64),
            ("query heads per dispatch", s.q_heads as u64),
            ("batch per dispatch", s.batch as u64),
            ("key groups per dispatch", s.k_len.div_ceil(64) as u64),
            (
                "query row groups per dispatch",
                s.q_len.div_ceil(ROWS) as u64,
            ),
            (
                "element groups per dispatch",
                n_lin.div_ceil(64).div_ceil(max as u64),
            ),
        ],
    )
}

/// The workspace regions, each present only when a kernel reads or writes it, and the
/// workspace's size in floats; both checked against the binding limit.
fn workspace_layout(
    caps: &Capabilities,
    r: &Resolved,
    wanted: Wanted,
    n_qtiles: u32,
    n_lin: u64,
) -> Result<(Layout, u64)> {
    let s = r.shape;
    let pr = r.present;
    let selective = r.selective();
    let rows = s.batch as u64 * s.q_heads as u64 * s.q_len as u64;
    let keys = s.batch as u64 * s.kv_heads as u64 * s.k_len as u64;
    // Workspace regions, each present only when a kernel reads or writes it.
    let mut at = 0u64;
    let mut region = |n: u64, on: bool| {
        let o = at;
        if on {
            at += n;
        }
        o
    };
    let (b, hq, hkv, nq, nk, d) = (
        s.batch as u64,
        s.q_heads as u64,
        s.kv_heads as u64,
        s.q_len as u64,
        s.k_len as u64,
        s.head_dim as u64,
    );
    let layout = Layout {
        lse: region(rows, true) as u32,
        delta: region(rows, true) as u32,
        tau: region(rows, pr.tau) as u32,
        alpha: region(hq, pr.alpha) as u32,
        gate: region(keys, pr.gate) as u32,
        valid: region(b, pr.kv_len) as u32,
        g: region(b * hkv * n_qtiles as u64 * nk, selective) as u32,
        dt: region(rows, true) as u32,
        dgate: region(keys, wanted.dgate) as u32,
        df0: region(b * nk, selective) as u32,
        dqb: region(b * nq * d, selective && wanted.dq) as u32,
        dkb: region(b * nk * d, selective && wanted.dk) as u32,
        flags: wanted.flags(),
        n_lin: n_lin as u32,
        row_lo: 0,
        row_hi: s.q_len,
    };
    let ws_floats = at;
    let limit = caps.max_storage_binding.min(caps.max_buffer);
    if 4 * ws_floats > limit || n_lin > u32::MAX as u64 {
        return Err(Error::TooLarge {
            what: "backward workspace",
            bytes: 4 * ws_floats,
            limit,
        });
    }
    if 4 * b * n_qtiles as u64 * nk > limit {
        return Err(Error::TooLarge {
            what: "selective scratch",
            bytes: 4 * b * n_qtiles as u64 * nk,
            limit,
        });
    }
    Ok((layout, ws_floats))
}

/// With selective masking, the column-sum and scan passes' configs.
fn selective_passes(
    caps: &Capabilities,
    r: &Resolved,
    br: u32,
    coop_sgs: Option<u32>,
) -> Result<Option<(ColsumConfig, ScanConfig)>> {
    let s = r.shape;
    let pr = r.present;
    let selective = r.selective();
    let d = s.head_dim as u64;
    let sel_passes = if selective {
        let cwg = caps.max_invocations.min(64);
        let memory = caps.workgroup_memory as u64;
        // On the coop path (BR = 16: one subgroup per C tile) the forward's cooperative-matrix
        // column sums, unless SELATTN_BACKWARD_COOP_COLSUM=0.
        let coop_colsum = match coop_sgs {
            Some(sgs) if br == 16 && coop_colsum_enabled() => {
                ColsumConfig::coop(s.head_dim, br, sgs, pr.kv_len, memory)
                    .filter(|c| c.wg <= caps.max_invocations)
            }
            _ => None,
        };
        let colsum = coop_colsum
            .into_iter()
            .chain([32u32, 16, 8, 4, 2, 1].into_iter().map(|bc| ColsumConfig {
                d: s.head_dim,
                br,
                bc,
                wg: cwg,
                kv_len: pr.kv_len,
                coop_sgs: 0,
                kpw: 1,
                sub16: false,
            }))
            .find(|c| c.workgroup_bytes() <= memory)
            .ok_or(Error::TooLarge {
                what: "workgroup memory for the selective column sums",
                bytes: 4 * (br as u64 + 1) * d,
                limit: caps.workgroup_memory as u64,
            })?;
        check_dispatch(
            caps,
            &[("key tiles per dispatch", s.k_len.div_ceil(colsum.bc) as u64)],
        )?;
        let scan = ScanConfig {
            wg: cwg,
            f0: pr.f0,
            f_out: false,
        };
        Some((colsum, scan))
    } else {
        None
    };
    Ok(sel_passes)
}
