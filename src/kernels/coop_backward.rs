//! The cooperative-matrix backward kernels (`shaders/coop_backward.wgsl`): f16 storage,
//! 16×16×16 f16 → f32 MMAs for every matmul of dK, dV and dQ. Chosen automatically for f16
//! storage where the adapter reports that configuration, a fixed subgroup size of at least 16
//! and f16; the scalar entries of `shaders/backward.wgsl` are the fallback, and its prep, fscan
//! and finish run around these on either path. The selective terms run here too (coop_selq,
//! coop_selk, or with the du scratch coop_selq writing du per chunk and coop_selk_du reading it;
//! by default with the du scratch, the split path: coop_seldu writes du with a workgroup per
//! (64 rows, key tile) and coop_selq_du adds the selection head's dQ term from it) where
//! workgroup memory allows. The elementwise passes take four adjacent elements a lane (`quads`),
//! F is computed in that pass (`fq`), the staging buffer is `vec4<f16>` on Vulkan (`kv4`), and
//! coop_seldu keeps its per-lane state in registers (`rq`) with a head's Q and dO staged in one
//! round (`sdq`); each has an environment knob (`SELATTN_BACKWARD_*`) that restores the old form.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::knob_on;
use crate::device::Capabilities;
use crate::Switches;

/// Subgroups per workgroup: each owns 16 keys (dkv) or 16 query rows (dq).
pub const SUBGROUPS: u32 = 4;
/// Keys (dkv) or query rows (dq) per workgroup.
pub const ROWS: u32 = 16 * SUBGROUPS;
/// Largest head dim on this path (fragments and accumulators live in registers).
pub const MAX_D: u32 = 128;
/// Environment variable that keeps `workgroupBarrier()` everywhere
/// (`SELATTN_BACKWARD_SGBAR=0`), for A/B measurements with one binary.
pub const SGBAR_ENV: &str = "SELATTN_BACKWARD_SGBAR";
/// Environment variable that turns the C/G prefetch of dkv off
/// (`SELATTN_BACKWARD_PREFETCH=0`), for A/B measurements with one binary.
pub const PREFETCH_ENV: &str = "SELATTN_BACKWARD_PREFETCH";
/// Environment variable that turns the four-elements-a-lane form of the elementwise passes of
/// dkv, dq and seldu off (`SELATTN_BACKWARD_QUADS=0`: one element a step, row sums by a serial
/// walk; FQ and RQ need it, so they go too), for A/B measurements with one binary. H200
/// 2026-12-03 (second session), with KV4/FQ/SDQ: plain dkv 6.52 -> 3.92 ms, dq 5.41 -> 3.25 (D64).
pub const QUADS_ENV: &str = "SELATTN_BACKWARD_QUADS";
/// Environment variable that makes coop_seldu stage a head's Q and dO in two rounds again
/// (`SELATTN_BACKWARD_SDQ=0`), for A/B measurements with one binary.
pub const SDQ_ENV: &str = "SELATTN_BACKWARD_SDQ";
/// Environment variable that makes dkv and dq compute F by the serial walk again instead of in
/// the quad pass (`SELATTN_BACKWARD_FQ=0`; `SELATTN_BACKWARD_FQ=dq`: in dq only). FQ needs the
/// quad form and 16-row C tiles. H200 2026-12-03, D64 full: dq 5.18 -> 5.07 ms with it, dkv
/// 6.79 -> 7.02 (slower; kept on in both until the dq-only form is tested on the device).
pub const FQ_ENV: &str = "SELATTN_BACKWARD_FQ";
/// Environment variable that stages Q, dO, K and V as scalar f16 again instead of `vec4<f16>`
/// (`SELATTN_BACKWARD_KV4=0`; the vector form is Vulkan only, as in the forward).
pub const KV4_ENV: &str = "SELATTN_BACKWARD_KV4";
/// Environment variable that turns coop_seldu's register form off (`SELATTN_BACKWARD_RQ=0`):
/// with it F, the mask and the head sums of dz live in registers, so that its key tiles can be
/// larger (64 keys with SDQ at D64 and D128). H200 2026-12-03: seldu 6.58 -> 4.74 ms (D64),
/// 13.69 -> 8.63 (D128).
pub const RQ_ENV: &str = "SELATTN_BACKWARD_RQ";
/// Environment variable that turns the pipelined walk of coop_selq_du and coop_selk_du off
/// (`SELATTN_BACKWARD_DUP=0`; on by default since the H200's call B of 2026-12-03): a whole
/// tile's du and K_sel (or Q_sel) staged by every lane in one round, the next tile's loads
/// issued before this tile's MMAs, two barriers a tile instead of 1 + 2 (tile / 16).
pub const DUP_ENV: &str = "SELATTN_BACKWARD_DUP";

/// Environment variable that turns the pipelined staging of coop_dkv and coop_dq on
/// (`SELATTN_BACKWARD_PIPE=1`; `dq` or `dkv` for one of them): the next tile's staged rows
/// loaded into registers before this tile's MMAs, so one staging latency a tile is hidden. Off
/// by default: on the H200 (2026-12-03, call B) the coop_backward test did not finish within
/// 18 s with both, `dq` and `dkv` alone passed, coop_dkv gained (7.04 -> 6.12 ms at D64 full)
/// and coop_dq lost (5.10 -> 5.51).
pub const PIPE_ENV: &str = "SELATTN_BACKWARD_PIPE";

/// Staged 16-byte words per lane and tensor that the DUP and PIPE registers hold (shader `DPK`).
const DUP_WORDS: u32 = 8;
/// du values per lane that the DUP registers hold (shader `DPD`).
const DUP_VALUES: u32 = 32;

/// Whether `SELATTN_BACKWARD_PIPE` asks for the pipelined staging of `entry` (opt-in: `1` for
/// coop_dkv and coop_dq, `dq` or `dkv` for one of them).
fn pipe_wanted(entry: CoopEntry) -> bool {
    match std::env::var(PIPE_ENV).as_deref() {
        Ok("1") => matches!(entry, CoopEntry::Dkv | CoopEntry::Dq),
        Ok("dq") => entry == CoopEntry::Dq,
        Ok("dkv") => entry == CoopEntry::Dkv,
        _ => false,
    }
}

/// Whether the pipelined du readers are on: by default (H200, 2026-12-03, call B: coop_selq_du
/// and coop_selk_du 0.95 + 1.83 -> 0.18 + 0.27 ms at D64 full); `SELATTN_BACKWARD_DUP=0` gives
/// the old form.
pub fn dup_enabled() -> bool {
    super::knob_on(DUP_ENV)
}

/// The two entry points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CoopEntry {
    /// dK, dV, dgate, the selective column sums: one workgroup per 64 keys.
    Dkv,
    /// dQ, dt: one workgroup per 64 query rows.
    Dq,
    /// Selective: the selection head's dQ term, one workgroup per 64 query rows.
    Selq,
    /// Selective: the selection KV head's dK term, one workgroup per 64 keys.
    Selk,
    /// [`CoopEntry::Selq`] that also writes du (the selective gradient of the selection head's
    /// logits, head-summed dz suffix-scanned) for a chunk of query rows into workspace scratch.
    SelqDu,
    /// Selective: the selection KV head's dK term from the du scratch of [`CoopEntry::SelqDu`]
    /// (no dz recomputation), one workgroup per 64 keys, once per chunk of query rows.
    SelkDu,
    /// The split du path: du of a chunk of query rows into the scratch, one workgroup per
    /// (64 query rows, key tile), so key tiles run in parallel instead of one after the other
    /// in one workgroup per 64 rows.
    SelDu,
    /// The split du path: the selection head's dQ term from the du scratch, one workgroup per
    /// 64 query rows of the chunk.
    SelqRead,
}

impl CoopEntry {
    /// Whether this is one of the selective entries (selq, selk and their du variants).
    pub fn selective(self) -> bool {
        matches!(
            self,
            CoopEntry::Selq
                | CoopEntry::Selk
                | CoopEntry::SelqDu
                | CoopEntry::SelkDu
                | CoopEntry::SelDu
                | CoopEntry::SelqRead
        )
    }
}

/// Specialisation of one cooperative-matrix backward entry point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CoopBackwardConfig {
    /// Entry point.
    pub entry: CoopEntry,
    /// Head dim, a multiple of 16 up to [`MAX_D`].
    pub d: u32,
    /// Rows staged per step (dkv: query rows, dq: keys), a multiple of 16.
    pub bt: u32,
    /// Query rows per selective C tile (the plan's BR), dividing 16.
    pub ct: u32,
    /// The adapter's fixed subgroup size.
    pub sgs: u32,
    /// `subgroupBarrier()` (SUBGROUP_BARRIER) where only a subgroup's own blocks of workgroup
    /// memory are handed between its lanes; `workgroupBarrier()` there otherwise.
    pub sgbar: bool,
    /// With C tiles of 16 rows: each chunk's C and G values loaded before its MMAs (the
    /// shader has it for dkv and dq; the planner turns it on for dkv only).
    pub prefetch: bool,
    /// The elementwise passes of dkv, dq and seldu take four adjacent elements a lane (vec4
    /// math, masks by select) and sum rows by subgroup shuffles (`EWQ`).
    pub quads: bool,
    /// coop_seldu only: a head's Q and dO staged in one round (`SDQ`), where workgroup memory
    /// allows (see [`CoopBackwardConfig::seldu`]).
    pub sdq: bool,
    /// dkv and dq: F computed in the quad pass by subgroup shuffles (`FQ`; with `quads` and
    /// 16-row C tiles only).
    pub fq: bool,
    /// The staging buffer typed `vec4<f16>` (two 8-byte stores per 16-byte global word,
    /// cooperative loads through a vector pointer: Vulkan only).
    pub kv4: bool,
    /// coop_seldu only: F, the mask and the head-summed dz of the lane's quads in registers
    /// (`RQ`; with `quads` and 16-row C tiles), its tile chosen for the smaller footprint.
    pub rq: bool,
    /// coop_selq_du and coop_selk_du only: the pipelined walk (`DUP`; see [`DUP_ENV`]). Set by
    /// [`CoopBackwardConfig::with_dup`]; ignored by the other entries.
    pub dup: bool,
    /// coop_dkv and coop_dq: the next tile's loads in registers during this tile's MMAs
    /// (`PIPE`; see [`PIPE_ENV`]).
    pub pipe: bool,
    /// Operator features (`lse` unused).
    pub features: Switches,
}

impl CoopBackwardConfig {
    pub(crate) fn constants(&self) -> Vec<(&'static str, f64)> {
        let mut c = vec![
            ("D", self.d as f64),
            ("BT", self.bt as f64),
            ("CT", self.ct as f64),
            ("SGS", self.sgs as f64),
            ("SELPASS", self.entry.selective() as u32 as f64),
            ("ISDKV", (self.entry == CoopEntry::Dkv) as u32 as f64),
            ("PREFETCH", self.prefetch as u32 as f64),
            ("EWQ", self.quads as u32 as f64),
            ("SDQ", self.sdq as u32 as f64),
            ("FQ", self.fq as u32 as f64),
            ("RQ", self.rq as u32 as f64),
            ("DUP", self.dup_active() as u32 as f64),
            (
                "PIPE",
                (self.pipe && matches!(self.entry, CoopEntry::Dq | CoopEntry::Dkv)) as u32 as f64,
            ),
            (
                "DU",
                matches!(
                    self.entry,
                    CoopEntry::SelqDu | CoopEntry::SelkDu | CoopEntry::SelDu | CoopEntry::SelqRead
                ) as u32 as f64,
            ),
        ];
        c.extend(self.features.constants());
        c
    }

    /// The WGSL entry point.
    pub fn entry_name(&self) -> &'static str {
        match self.entry {
            CoopEntry::Dkv => "coop_dkv",
            CoopEntry::Dq => "coop_dq",
            CoopEntry::Selq | CoopEntry::SelqDu => "coop_selq",
            CoopEntry::Selk => "coop_selk",
            CoopEntry::SelkDu => "coop_selk_du",
            CoopEntry::SelDu => "coop_seldu",
            CoopEntry::SelqRead => "coop_selq_du",
        }
    }

    /// Threads per workgroup.
    pub fn threads(&self) -> u32 {
        SUBGROUPS * self.sgs
    }

    /// Whether the shader runs the DUP form: asked for, and this entry has one.
    fn dup_active(&self) -> bool {
        self.dup && matches!(self.entry, CoopEntry::SelqRead | CoopEntry::SelkDu)
    }

    /// coop_selk_du's configuration `self` with the DUP form where asked for
    /// (`SELATTN_BACKWARD_DUP=1`), with the largest tile whose workgroup memory fits the adapter
    /// and whose share per lane fits the shader's registers; unchanged otherwise. coop_selq_du
    /// takes the result's tile and form (see `BackwardPlan::keys`).
    pub fn with_dup(self, caps: &Capabilities) -> CoopBackwardConfig {
        if !dup_enabled() {
            return self;
        }
        [64u32, 32, 16]
            .into_iter()
            .map(|bt| CoopBackwardConfig {
                bt,
                dup: true,
                ..self
            })
            .find(|c| {
                let t = c.threads();
                (c.bt * (c.d / 8)).div_ceil(t) <= DUP_WORDS
                    && (ROWS * c.bt).div_ceil(t) <= DUP_VALUES
                    && c.workgroup_bytes() <= caps.workgroup_memory as u64
            })
            .unwrap_or(self)
    }

    /// Workgroup memory in bytes, as declared in the shader.
    pub fn workgroup_bytes(&self) -> u64 {
        let selpass = self.entry.selective();
        let b = bytes(
            self.d,
            self.bt,
            self.features.selective,
            selpass,
            self.entry == CoopEntry::Dkv,
        );
        if self.sdq || self.rq {
            // SDQ: Q and dO of 64 rows each staged at once. Both: za16 down to 8 f16. RQ: no
            // acc or fb (4 floats each).
            let (d, bt, rows) = (self.d as u64, self.bt as u64, ROWS as u64);
            let half = SUBGROUPS as u64 * 16 * 24 * 2;
            let fblock = SUBGROUPS as u64 * 16 * 16 * 4;
            let srows = if self.sdq { 2 * rows } else { rows };
            let mut x = b - (2 * bt).max(rows) * (d + 8) * 2 + (2 * bt).max(srows) * (d + 8) * 2;
            x = x - half + 16;
            if self.rq {
                x = x - 2 * (bt / 16) * fblock + 32;
            }
            x
        } else if self.dup_active() {
            // No acc or fb (4 floats each), za16 down to 8 f16, du16 of 64 rows, a stage of
            // max(BT, 64) rows (K_sel or Q_sel only).
            let (d, bt, rows) = (self.d as u64, self.bt as u64, ROWS as u64);
            let half = SUBGROUPS as u64 * 16 * 24 * 2;
            let fblock = SUBGROUPS as u64 * 16 * 16 * 4;
            let stage = |r: u64| r * (d + 8) * 2;
            b - stage((2 * bt).max(rows)) + stage(bt.max(rows)) - 2 * (bt / 16) * fblock + 32 - half
                + 16
                + rows * (bt + 8) * 2
        } else {
            b
        }
    }

    /// The split du writer (coop_seldu) for the selective configuration `q`: with `SDQ` where
    /// its workgroup memory fits the adapter (and `SELATTN_BACKWARD_SDQ` leaves it on).
    pub fn seldu(caps: &Capabilities, q: &CoopBackwardConfig) -> CoopBackwardConfig {
        let fits = |c: &CoopBackwardConfig| c.workgroup_bytes() <= caps.workgroup_memory as u64;
        let sdq = knob_on(SDQ_ENV);
        if q.quads && q.ct == 16 && knob_on(RQ_ENV) {
            // The largest key tile that fits, with SDQ where it also fits.
            for bt in [64u32, 32, 16] {
                for s in [sdq, false] {
                    let c = CoopBackwardConfig {
                        entry: CoopEntry::SelDu,
                        bt,
                        sdq: s,
                        rq: true,
                        ..*q
                    };
                    if fits(&c) {
                        return c;
                    }
                }
            }
        }
        let mut c = CoopBackwardConfig {
            entry: CoopEntry::SelDu,
            sdq,
            ..*q
        };
        if !fits(&c) {
            c.sdq = false;
        }
        c
    }

    /// The selective entries (coop_selq, coop_selk; with `du`, their du-scratch variants) for
    /// head dim `d`, with the dkv/dq configuration `base`'s subgroup size, C tile and features,
    /// or why not.
    pub fn choose_selective(
        caps: &Capabilities,
        base: &CoopBackwardConfig,
        du: bool,
    ) -> Result<(CoopBackwardConfig, CoopBackwardConfig), &'static str> {
        let bt = [64u32, 32, 16]
            .into_iter()
            .find(|&bt| bytes(base.d, bt, true, true, false) <= caps.workgroup_memory as u64)
            .ok_or("workgroup memory too small for the selective terms")?;
        let c = |entry| CoopBackwardConfig { entry, bt, ..*base };
        Ok(if du {
            (c(CoopEntry::SelqDu), c(CoopEntry::SelkDu).with_dup(caps))
        } else {
            (c(CoopEntry::Selq), c(CoopEntry::Selk))
        })
    }

    /// The configurations of both entries for head dim `d` on this adapter, or why not.
    pub fn choose(
        caps: &Capabilities,
        d: u32,
        ct: u32,
        features: Switches,
    ) -> Result<(CoopBackwardConfig, CoopBackwardConfig), &'static str> {
        if !caps.coop_16x16_f16() {
            return Err("no 16x16x16 f16->f32 cooperative matrix configuration");
        }
        if !caps.f16 {
            return Err("no SHADER_F16");
        }
        if !caps.subgroups || caps.subgroup_min_size != caps.subgroup_max_size {
            return Err("subgroup size not fixed by the adapter");
        }
        if !d.is_multiple_of(16) || d > MAX_D {
            return Err("head dim not a multiple of 16 up to 128");
        }
        let sgs = caps.subgroup_min_size;
        // One lane per key (or row) of a 16-wide block.
        if sgs < 16 || !sgs.is_power_of_two() {
            return Err("subgroup size below 16 or not a power of two");
        }
        if SUBGROUPS * sgs > caps.max_invocations {
            return Err("workgroup too large for the adapter");
        }
        if ct == 0 || 16 % ct != 0 {
            return Err("selective tile does not divide 16");
        }
        // dkv holds P^T as f16 besides (t dz)^T; dq only dz: its tiles may be larger.
        let bt_for = |dkv: bool| {
            [64u32, 32, 16].into_iter().find(|&bt| {
                bytes(d, bt, features.selective, false, dkv) <= caps.workgroup_memory as u64
            })
        };
        let bt_dkv = bt_for(true).ok_or("workgroup memory too small")?;
        let bt_dq = bt_for(false).ok_or("workgroup memory too small")?;
        let sgbar = caps.subgroup_barrier && knob_on(SGBAR_ENV);
        let c = |entry, bt| CoopBackwardConfig {
            entry,
            d,
            bt,
            ct,
            sgs,
            sgbar,
            // dkv only: in dq the early load cost more than it hid (H200 profile 2026-12-03:
            // dkv 9.98 -> 8.96 ms, dq 7.64 -> 8.71 ms at D64 full).
            prefetch: entry == CoopEntry::Dkv && knob_on(PREFETCH_ENV),
            // The quad reductions need subgroups of at least 16 lanes (64 quads a block).
            quads: sgs <= 64 && knob_on(QUADS_ENV),
            sdq: false,
            fq: sgs <= 64
                && ct == 16
                && knob_on(QUADS_ENV)
                && knob_on(FQ_ENV)
                && (entry == CoopEntry::Dq || std::env::var(FQ_ENV).map_or(true, |v| v != "dq")),
            kv4: caps.info.backend == wgpu::Backend::Vulkan && knob_on(KV4_ENV),
            rq: false,
            dup: false,
            // Where a lane's share of a staged tensor fits the registers.
            pipe: pipe_wanted(entry) && (bt * (d / 8)).div_ceil(SUBGROUPS * sgs) <= DUP_WORDS,
            features,
        };
        Ok((c(CoopEntry::Dkv, bt_dkv), c(CoopEntry::Dq, bt_dq)))
    }

    // Long on purpose: a straight list of the unrolled WGSL snippets, marker by marker, in the
    // order the template uses them; split up, the shader text would be scattered.
    /// The WGSL for this configuration: the template with its fragments unrolled for D.
    pub fn wgsl(&self, template: &str) -> String {
        let n = self.d / 16;
        let sel = self.features.selective;
        let mut m: BTreeMap<&'static str, String> = BTreeMap::new();
        let a = "coop_mat16x16<f16, A>";
        let bm = "coop_mat16x16<f16, B>";
        let cm = "coop_mat16x16<f32, C>";
        for d in 0..n {
            let o = d * 16;
            let _ = writeln!(
                ent(&mut m, "KDECL"),
                "    var kf{d} = {a}();\n    var vf{d} = {a}();"
            );
            let _ = writeln!(
                ent(&mut m, "KLOAD"),
                "            let ka{d} = koff + {o}u;\n            kf{d} = coopLoadT<{a}>(&stage[ka{d}], DP);"
            );
            let _ = writeln!(
                ent(&mut m, "VLOAD"),
                "            let va{d} = koff + {o}u;\n            vf{d} = coopLoadT<{a}>(&stage[va{d}], DP);"
            );
            let _ = writeln!(
                ent(&mut m, "QDECL"),
                "    var qf{d} = {a}();\n    var of{d} = {a}();"
            );
            let _ = writeln!(
                ent(&mut m, "QLOAD"),
                "            let qa{d} = qoff + {o}u;\n            qf{d} = coopLoadT<{a}>(&stage[qa{d}], DP);"
            );
            let _ = writeln!(
                ent(&mut m, "OLOAD"),
                "            let oa{d} = qoff + {o}u;\n            of{d} = coopLoadT<{a}>(&stage[oa{d}], DP);"
            );
            if sel {
                let _ = writeln!(ent(&mut m, "KDECL"), "    var ksf{d} = {a}();");
                let _ = writeln!(
                    ent(&mut m, "KSLOAD"),
                    "            let ks{d} = koff + {o}u;\n            ksf{d} = coopLoadT<{a}>(&stage[ks{d}], DP);"
                );
                let _ = writeln!(ent(&mut m, "QDECL"), "    var qsf{d} = {a}();");
                let _ = writeln!(
                    ent(&mut m, "QSLOAD"),
                    "            let qs{d} = qoff + {o}u;\n            qsf{d} = coopLoadT<{a}>(&stage[qs{d}], DP);"
                );
            }
            let _ = writeln!(
                ent(&mut m, "ACCDECL"),
                "    var dk{d} = {cm}();\n    var dv{d} = {cm}();"
            );
            let _ = writeln!(ent(&mut m, "DQDECL"), "    var dq{d} = {cm}();");
        }
        // S^T = K Q^T, dP^T = V dO^T, S_sel^T (dkv); S = Q K^T, dP = dO V^T, S_sel (dq).
        for (key, pre, x, y, z) in [
            ("DKV_S", "qo", "kf", "vf", "ksf"),
            ("DQ_S", "ko", "qf", "of", "qsf"),
        ] {
            let (p2, p3) = if key == "DKV_S" {
                ("oo", "so")
            } else {
                ("vo", "so")
            };
            let s = ent(&mut m, key);
            let ind = "                ";
            let _ = writeln!(s, "{ind}var acs = {cm}();\n{ind}var acp = {cm}();");
            if sel {
                let _ = writeln!(s, "{ind}var acf = {cm}();");
            }
            for d in 0..n {
                let o = d * 16;
                let _ = writeln!(
                    s,
                    "{ind}let sx{d} = {pre} + {o}u;\n{ind}acs = coopMultiplyAdd({x}{d}, coopLoad<{bm}>(&stage[sx{d}], DP), acs);"
                );
                let _ = writeln!(
                    s,
                    "{ind}let sy{d} = {p2} + {o}u;\n{ind}acp = coopMultiplyAdd({y}{d}, coopLoad<{bm}>(&stage[sy{d}], DP), acp);"
                );
                if sel {
                    let _ = writeln!(
                        s,
                        "{ind}let sz{d} = {p3} + {o}u;\n{ind}acf = coopMultiplyAdd({z}{d}, coopLoad<{bm}>(&stage[sz{d}], DP), acf);"
                    );
                }
            }
            let _ = writeln!(
                s,
                "{ind}coopStoreT(acs, &sa[bo], SP);\n{ind}coopStoreT(acp, &sb[bo], SP);"
            );
            if sel {
                let _ = writeln!(s, "{ind}coopStoreT(acf, &sf[bo], SP);");
            }
        }
        for d in 0..n {
            let o = d * 16;
            let (d2, d16) = (d * 2, d * 16);
            let ind = "                ";
            let _ = writeln!(
                ent(&mut m, "DKV_ACC"),
                "{ind}let ua{d} = oo + {o}u;\n{ind}dv{d} = coopMultiplyAdd(pa, coopLoadT<{bm}>(&stage[ua{d}], DP), dv{d});\n{ind}let ub{d} = qo + {o}u;\n{ind}dk{d} = coopMultiplyAdd(za, coopLoadT<{bm}>(&stage[ub{d}], DP), dk{d});"
            );
            let _ = writeln!(
                ent(&mut m, "DQ_ACC"),
                "            let ua{d} = ko + {o}u;\n            dq{d} = coopMultiplyAdd(za, coopLoadT<{bm}>(&stage[ua{d}], DP), dq{d});"
            );
            let _ = writeln!(
                ent(&mut m, "DKV_EPI"),
                "    coopStoreT(dk{d}, &sa[bo], SP);
    coopStoreT(dv{d}, &sb[bo], SP);
    workgroupBarrier();
    for (var x = lane; x < 32u; x += SGS) {{
        let r = x / 2u;
        let hx = x % 2u;
        let j = kt + kb0 + r;
        if j < p.k_len {{
            let at = ((b * p.kv_heads + hk) * p.k_len + j) * D8 + {d2}u + hx;
            let src = bo + r * SP + hx * 8u;
            if (w.flags & WANT_DK) != 0u {{
                let dk8 = sa8(src, p.scale);
                if to_base {{
                    ws8(w.dkb + (b * p.k_len + j) * D + {d16}u + hx * 8u, dk8);
                }} else {{
                    outa[at] = pack8(dk8);
                }}
            }}
            if (w.flags & WANT_DV) != 0u {{
                outb[at] = pack8(sb8(src, cg[kb0 + r]));
            }}
        }}
    }}
    workgroupBarrier();"
            );
            let _ = writeln!(
                ent(&mut m, "DQ_EPI"),
                "    coopStoreT(dq{d}, &sa[bo], SP);
    workgroupBarrier();
    for (var x = lane; x < 32u; x += SGS) {{
        let r = x / 2u;
        let hx = x % 2u;
        let i = row0 + rb0 + r;
        if (w.flags & WANT_DQ) != 0u && i < p.q_len {{
            let dq8 = sa8(bo + r * SP + hx * 8u, p.scale * rt[rb0 + r]);
            if to_base {{
                ws8(w.dqb + (b * p.q_len + i) * D + {d16}u + hx * 8u, dq8);
            }} else {{
                outa[((b * p.q_heads + h) * p.q_len + i) * D8 + {d2}u + hx] = pack8(dq8);
            }}
        }}
    }}
    workgroupBarrier();"
            );
        }
        for d in 0..n {
            let o = d * 16;
            let (d2, d16) = (d * 2, d * 16);
            let _ = writeln!(
                ent(&mut m, "SK_DECL"),
                "    var ksf{d} = {a}();\n    var kf{d} = {a}();\n    var vf{d} = {a}();\n    var dks{d} = {cm}();"
            );
            let _ = writeln!(ent(&mut m, "SD_DECL"), "    var dks{d} = {cm}();");
            let _ = writeln!(ent(&mut m, "SD_QDECL"), "    var dqs{d} = {cm}();");
            let _ = writeln!(
                ent(&mut m, "SD_EPI"),
                "    coopStoreT(dks{d}, &sa[bo], SP);
    workgroupBarrier();
    for (var x = lane; x < 32u; x += SGS) {{
        let r = x / 2u;
        let hx = x % 2u;
        let j = kt + kb0 + r;
        if j < p.k_len {{
            let s8 = sa8(bo + r * SP + hx * 8u, p.scale);
            let base = w.dkb + (b * p.k_len + j) * D + {d16}u + hx * 8u;
            var o8: array<f32, 8>;
            for (var n = 0u; n < 8u; n++) {{
                o8[n] = ws[base + n] + s8[n];
            }}
            if last {{
                outa[((b * p.kv_heads + sel_kv) * p.k_len + j) * D8 + {d2}u + hx] = pack8(o8);
            }} else {{
                ws8(base, o8);
            }}
        }}
    }}
    workgroupBarrier();"
            );
            let _ = writeln!(
                ent(&mut m, "SQ_DECL"),
                "    var qsf{d} = {a}();\n    var qf{d} = {a}();\n    var of{d} = {a}();\n    var dqs{d} = {cm}();"
            );
            for (key, var, off) in [
                ("SK_KSLOAD", "ksf", "koff"),
                ("SK_KLOAD", "kf", "koff"),
                ("SK_VLOAD", "vf", "koff"),
                ("SQ_QSLOAD", "qsf", "qoff"),
                ("SQ_QLOAD", "qf", "qoff"),
                ("SQ_OLOAD", "of", "qoff"),
            ] {
                let _ = writeln!(
                    ent(&mut m, key),
                    "                        let l{var}{d} = {off} + {o}u;\n                        {var}{d} = coopLoadT<{a}>(&stage[l{var}{d}], DP);"
                );
            }
            for (key, acc) in [("SK_ACC", "dks"), ("SQ_ACC", "dqs")] {
                let _ = writeln!(
                    ent(&mut m, key),
                    "            let ua{d} = so + {o}u;\n            {acc}{d} = coopMultiplyAdd(ua, coopLoadT<{bm}>(&stage[ua{d}], DP), {acc}{d});"
                );
            }
            let _ = writeln!(
                ent(&mut m, "SK_EPI"),
                "    coopStoreT(dks{d}, &sa[bo], SP);
    workgroupBarrier();
    for (var x = lane; x < 32u; x += SGS) {{
        let r = x / 2u;
        let hx = x % 2u;
        let j = kt + kb0 + r;
        if j < p.k_len {{
            let s8 = sa8(bo + r * SP + hx * 8u, p.scale);
            let base = w.dkb + (b * p.k_len + j) * D + {d16}u + hx * 8u;
            var o8: array<f32, 8>;
            for (var n = 0u; n < 8u; n++) {{
                o8[n] = ws[base + n] + s8[n];
            }}
            outa[((b * p.kv_heads + sel_kv) * p.k_len + j) * D8 + {d2}u + hx] = pack8(o8);
        }}
    }}
    workgroupBarrier();"
            );
            let _ = writeln!(
                ent(&mut m, "SQ_EPI"),
                "    coopStoreT(dqs{d}, &sa[bo], SP);
    workgroupBarrier();
    for (var x = lane; x < 32u; x += SGS) {{
        let r = x / 2u;
        let hx = x % 2u;
        let i = row0 + rb0 + r;
        if (w.flags & WANT_DQ) != 0u && i < p.q_len {{
            let s8 = sa8(bo + r * SP + hx * 8u, p.scale);
            let base = w.dqb + (b * p.q_len + i) * D + {d16}u + hx * 8u;
            var o8: array<f32, 8>;
            for (var n = 0u; n < 8u; n++) {{
                o8[n] = ws[base + n] + s8[n];
            }}
            outa[((b * p.q_heads + sel) * p.q_len + i) * D8 + {d2}u + hx] = pack8(o8);
        }}
    }}
    workgroupBarrier();"
            );
        }
        // S_sel^T = K_sel Q_sel^T (selk), S_sel = Q_sel K_sel^T (selq), per chunk into fb.
        for (key, x) in [("SK_FCOMP", "ksf"), ("SQ_FCOMP", "qsf")] {
            let s = ent(&mut m, key);
            let ind = "            ";
            let _ = writeln!(s, "{ind}var acf = {cm}();");
            for d in 0..n {
                let _ = writeln!(
                    s,
                    "{ind}let fz{d} = so + {o}u;\n{ind}acf = coopMultiplyAdd({x}{d}, coopLoad<{bm}>(&stage[fz{d}], DP), acf);",
                    o = d * 16
                );
            }
            let _ = writeln!(s, "{ind}coopStoreT(acf, &fb[fo], FS);");
        }
        // coop_seldu with RQ: S_sel through the subgroup's sa block.
        let fsa = m["SQ_FCOMP"].replace("&fb[fo], FS", "&sa[bo], SP");
        m.insert("SQ_FCOMP_SA", fsa);
        // S^T, dP^T (selk) or S, dP (selq) of one head.
        for (key, p1, p2, x, y) in [
            ("SK_SCOMP", "qo", "oo", "kf", "vf"),
            ("SQ_SCOMP", "ko", "vo", "qf", "of"),
        ] {
            let s = ent(&mut m, key);
            let ind = "                ";
            let _ = writeln!(s, "{ind}var acs = {cm}();\n{ind}var acp = {cm}();");
            for d in 0..n {
                let o = d * 16;
                let _ = writeln!(
                    s,
                    "{ind}let sx{d} = {p1} + {o}u;\n{ind}acs = coopMultiplyAdd({x}{d}, coopLoad<{bm}>(&stage[sx{d}], DP), acs);\n{ind}let sy{d} = {p2} + {o}u;\n{ind}acp = coopMultiplyAdd({y}{d}, coopLoad<{bm}>(&stage[sy{d}], DP), acp);"
                );
            }
            let _ = writeln!(
                s,
                "{ind}coopStoreT(acs, &sa[bo], SP);\n{ind}coopStoreT(acp, &sb[bo], SP);"
            );
        }
        let _ = write!(
            ent(&mut m, "SGBAR"),
            "{}",
            if self.sgbar {
                "subgroupBarrier()"
            } else {
                "workgroupBarrier()"
            }
        );
        let mut text = template.to_string();
        for k in [
            "KDECL",
            "KLOAD",
            "VLOAD",
            "KSLOAD",
            "ACCDECL",
            "DKV_S",
            "DKV_ACC",
            "DKV_EPI",
            "QDECL",
            "QLOAD",
            "OLOAD",
            "QSLOAD",
            "DQDECL",
            "DQ_S",
            "DQ_ACC",
            "DQ_EPI",
            "SK_DECL",
            "SK_KSLOAD",
            "SK_KLOAD",
            "SK_VLOAD",
            "SK_FCOMP",
            "SK_SCOMP",
            "SK_ACC",
            "SK_EPI",
            "SQ_DECL",
            "SQ_QSLOAD",
            "SQ_QLOAD",
            "SQ_OLOAD",
            "SQ_FCOMP",
            "SQ_FCOMP_SA",
            "SQ_SCOMP",
            "SQ_ACC",
            "SQ_EPI",
            "SD_DECL",
            "SD_QDECL",
            "SD_EPI",
            "SGBAR",
        ] {
            text = text.replace(&format!("{{{{{k}}}}}"), m.get(k).map_or("", |v| v));
        }
        if self.kv4 {
            // The staging buffer as vec4<f16>: put8 stores two vectors, cooperative loads take
            // offsets and strides in vectors (every offset is a multiple of 8 f16).
            let decl = "var<workgroup> stage: array<f16, select(NST * DP, NSTS, SELPASS)>;";
            let stores = "    stage[at] = f16(a.x);
    stage[at + 1u] = f16(a.y);
    stage[at + 2u] = f16(b.x);
    stage[at + 3u] = f16(b.y);
    stage[at + 4u] = f16(c.x);
    stage[at + 5u] = f16(c.y);
    stage[at + 6u] = f16(d.x);
    stage[at + 7u] = f16(d.y);";
            debug_assert!(text.contains(decl) && text.contains(stores));
            text = text
                .replace(
                    decl,
                    "var<workgroup> stage: array<vec4<f16>, select(NST * DP, NSTS, SELPASS) / 4u>;",
                )
                .replace(
                    stores,
                    "    stage[at / 4u] = vec4<f16>(vec4<f32>(a, b));
    stage[at / 4u + 1u] = vec4<f16>(vec4<f32>(c, d));",
                )
                .replace("&stage[", "&stage[(")
                .replace("], DP)", ") / 4u], DP / 4u)");
        }
        text
    }
}

fn ent<'a>(m: &'a mut BTreeMap<&'static str, String>, k: &'static str) -> &'a mut String {
    m.entry(k).or_default()
}

fn bytes(d: u32, bt: u32, selective: bool, selpass: bool, dkv: bool) -> u64 {
    let (d, bt) = (d as u64, bt as u64);
    let rows = ROWS as u64;
    let block = SUBGROUPS as u64 * 16 * 20 * 4;
    // acc / fb blocks of the selective passes: unpadded rows (FS = 16), so 32-key tiles fit at
    // D128 in 48 KiB.
    let fblock = SUBGROUPS as u64 * 16 * 16 * 4;
    let half = SUBGROUPS as u64 * 16 * 24 * 2;
    let rowvals = 4 * bt.max(rows) * 4;
    if selpass {
        // stage (Q_h and dO_h, or K and V tiles), sa, sb, sf unused, pa16 unused, za16,
        // acc and fb (one block per chunk), rows, wu.
        let stage = (2 * bt).max(rows) * (d + 8) * 2;
        stage + 2 * block + 16 + 16 + half + 2 * (bt / 16) * fblock + rowvals + 16
    } else {
        let nt = if selective { 3 } else { 2 };
        let stage = (nt * bt).max(rows) * (d + 8) * 2;
        let blocks = 2 * block + if selective { block } else { 16 };
        // pa16 (P^T) in dkv only; 8 f16 elsewhere.
        let halves = if dkv { 2 * half } else { half + 16 };
        stage + blocks + halves + 16 + 16 + rowvals + 16
    }
}
