//! The cooperative-matrix forward kernel (`shaders/coop_forward.wgsl`): f16 storage, 16×16×16
//! f16 → f32 MMAs. Chosen automatically where the adapter reports that configuration, a fixed
//! subgroup size and f16; the scalar kernel is the fallback everywhere else.

use std::fmt::Write;

use crate::device::Capabilities;
use crate::Switches;

/// Subgroups per workgroup; each owns 16 query rows, so BR = 16 × this.
pub const SUBGROUPS: u32 = 4;
/// Largest head dim on this path: O and Q fragments live in registers (2 × D/16 matrices).
pub const MAX_D: u32 = 128;
/// Environment variable naming tuning choices to turn off, comma-separated, for ablations on a
/// real GPU: `vsep`, `ilp`, `sgbar`, `prefix`, `halves` (see [`CoopConfig`]) and `colsum` (the column-sum
/// pass's interior fast path); `+ilp` turns `ilp` on at every head dim. The softmax and staging
/// forms: `keep`, `quads`, `pairs`, `fixed`, `rot`, `kv4`, `p2` turn one off, `+name` on (see
/// [`CoopConfig`]; `keep,kv4` gives column pairs, `keep,kv4,pairs,fixed` the scalar loops of
/// before); `+vpre` prefetches V a whole tile ahead (not with selective masking). Timing-only
/// knobs that make results wrong (for `bench --no-check`): `x-nosm`, `x-nostage`, `x-nold`,
/// `x-nos`, `x-nopv`, `x-nobar`, `x-nomax`, `x-noexp`, and for selective masking `x-nosels`,
/// `x-noprefix`, `x-noselk` (the shader's `XA` bits, in that order). `colkpwN` sets the
/// column-sum pass's key tiles per workgroup (see `ColsumConfig::coop`). Unset in normal use.
pub const ABLATE_ENV: &str = "SELATTN_COOP_ABLATE";

/// Whether the planner stages the selection head's K tile in the P buffer where it fits
/// ([`CoopConfig::selp`]; `selp` in [`ABLATE_ENV`] turns it off).
pub const DEFAULT_SELP: bool = true;

/// Whether the planner takes the selective column prefix per subgroup ([`CoopConfig::sgprefix`];
/// `sgprefix` in [`ABLATE_ENV`] turns it off).
pub const DEFAULT_SGPREFIX: bool = true;

/// Specialisation of the cooperative-matrix kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CoopConfig {
    /// Head dim, a multiple of 16 up to [`MAX_D`].
    pub d: u32,
    /// Query rows per workgroup (16 per subgroup).
    pub br: u32,
    /// Keys per tile, a multiple of 16.
    pub bc: u32,
    /// The adapter's fixed subgroup size.
    pub sgs: u32,
    /// Operator features.
    pub features: Switches,
    /// V staged in rows of its own (needs the memory; not with selective masking): two
    /// workgroup barriers per key tile fewer.
    pub vsep: bool,
    /// S = Q Kᵀ with the key blocks' accumulators interleaved (independent MMA chains).
    pub ilp: bool,
    /// Selective: the column prefix of interior tiles without per-element predicates.
    pub fast_prefix: bool,
    /// With `vsep`: `subgroupBarrier` (SUBGROUP_BARRIER) between S and the softmax; else a
    /// workgroup barrier.
    pub subgroup_barrier: bool,
    /// Selective: the selection head's S tile in this many column slices (1 or 2); with 2 its
    /// buffer is BR × BC/2, which lets BC = 64 fit 48 KiB at D = 64.
    pub nsel: u32,
    /// Timing-only ablations (`x-...` in [`ABLATE_ENV`]; results are wrong): the shader's `XA`
    /// bits. 0 in normal use.
    pub xa: u32,
    /// Softmax loops with a fixed trip count and masks by select (`SM_FIXED`).
    pub sm_fixed: bool,
    /// Softmax on adjacent column pairs, P written two at a time (`SM_PAIRS`; needs `sm_fixed`).
    pub sm_pairs: bool,
    /// Softmax rows 8..15 of a block start one step later (`SM_ROT`: bank conflicts).
    pub sm_rot: bool,
    /// Softmax on four adjacent columns per step (`SM_QUADS`; needs `sm_fixed`).
    pub sm_quads: bool,
    /// With `sm_quads`: S values kept in registers between the max and exp passes (`SM_KEEP`).
    pub sm_keep: bool,
    /// K/V/Q staged in a `vec4<f16>` array (two 8-byte stores per 16-byte word); cooperative
    /// loads take vec4 offsets and strides.
    pub kv4: bool,
    /// P in a `vec2<f16>` array (one 4-byte store per pair; needs `sm_pairs`).
    pub p2: bool,
    /// V prefetched a whole tile ahead, as K is (`VPRE`; `+vpre` in [`ABLATE_ENV`], off by
    /// default; never with selective masking).
    pub vpre: bool,
    /// Selective: the selection head's K tile staged in the P buffer together with K (`SELP`:
    /// two workgroup barriers per key tile fewer; needs BC × (D + 8) <= BR × (BC + 8)).
    pub selp: bool,
    /// Selective: the carried C per 16 query rows (the column sums' `sub16` form) and each
    /// subgroup's column prefix over its own rows alone (`SGPREFIX`: subgroup barriers, no
    /// chunk totals, one workgroup barrier per key tile instead of three per slice).
    pub sgprefix: bool,
}

impl CoopConfig {
    pub(crate) fn constants(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("D", self.d as f64),
            ("BR", self.br as f64),
            ("BC", self.bc as f64),
            ("SGS", self.sgs as f64),
            ("VSEP", super::flag(self.vsep)),
            ("FAST_PREFIX", super::flag(self.fast_prefix)),
            ("NSEL", self.nsel as f64),
            ("XA", self.xa as f64),
            ("SM_FIXED", super::flag(self.sm_fixed)),
            ("SM_PAIRS", super::flag(self.sm_pairs)),
            ("SM_ROT", super::flag(self.sm_rot)),
            ("SM_QUADS", super::flag(self.sm_quads)),
            ("SM_KEEP", super::flag(self.sm_keep)),
            ("VPRE", super::flag(self.vpre)),
            ("SELP", super::flag(self.selp)),
            ("SGPREFIX", super::flag(self.sgprefix)),
        ]
        .into_iter()
        .chain(self.features.constants())
        .collect()
    }

    /// Threads per workgroup.
    pub fn threads(&self) -> u32 {
        self.br / 16 * self.sgs
    }

    /// Workgroup memory in bytes, as declared in the shader.
    pub fn workgroup_bytes(&self) -> u64 {
        let (br, bc, d) = (self.br as u64, self.bc as u64, self.d as u64);
        let kbuf = (br.max(bc) + if self.vsep { bc } else { 0 }) * (d + 8) * 2;
        let sbuf = br * (bc + 4) * 4;
        let pbuf = br * (bc + 8) * 2;
        let sel = if self.features.selective {
            br * (bc / self.nsel as u64 + 4) * 4
        } else {
            16
        };
        let ctot = if self.features.selective {
            4 * self.threads() as u64
        } else {
            16
        };
        kbuf + sbuf + pbuf + sel + ctot + 4 * br * 4 + 16
    }

    /// The coop configuration for head dim `d` and a call's switches, if this adapter can run it.
    /// `Err` says why not (for a forced path).
    pub fn choose(
        caps: &Capabilities,
        d: u32,
        features: Switches,
    ) -> Result<CoopConfig, &'static str> {
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
        // The softmax gives each row SGS / 16 lanes of one subgroup.
        if sgs < 16 || !sgs.is_power_of_two() {
            return Err("subgroup size below 16 or not a power of two");
        }
        let br = 16 * SUBGROUPS;
        let ablate = std::env::var(ABLATE_ENV).unwrap_or_default();
        let listed = |what: &str| ablate.split(',').any(|w| w.trim() == what);
        if br / 16 * sgs > caps.max_invocations {
            return Err("workgroup too large for the adapter");
        }
        // Widest key tile that fits. Measured on the H200 (2026-11-29): BC = 32 at D = 128
        // (fewer prefetch registers, twice the tiles) is 14% slower than 64.
        // Selective: the whole selection tile where it fits, else in two column slices.
        let slices: &[u32] = if features.selective && !listed("halves") {
            &[1, 2]
        } else {
            &[1]
        };
        for (bc, nsel) in [64, 32, 16]
            .into_iter()
            .flat_map(|bc| slices.iter().map(move |&n| (bc, n)))
        {
            let mut c = CoopConfig {
                d,
                br,
                bc,
                sgs,
                features,
                vsep: false,
                // Measured on the H200 (2026-11-29, second session): 2.5% faster at D128.
                ilp: if listed("ilp") {
                    false
                } else {
                    listed("+ilp") || d >= 128
                },
                fast_prefix: !listed("prefix"),
                subgroup_barrier: false,
                nsel,
                xa: [
                    "x-nosm",
                    "x-nostage",
                    "x-nold",
                    "x-nos",
                    "x-nopv",
                    "x-nobar",
                    "x-nomax",
                    "x-noexp",
                    "x-nosels",
                    "x-noprefix",
                    "x-noselk",
                ]
                .iter()
                .enumerate()
                .filter(|(_, w)| listed(w))
                .fold(0, |a, (i, _)| a | 1 << i),
                sm_fixed: false,
                sm_pairs: false,
                sm_rot: false,
                sm_quads: false,
                sm_keep: false,
                kv4: false,
                p2: false,
                // Candidate (issue 11, unmeasured): the planner refuses it with selective masking.
                vpre: !features.selective && listed("+vpre"),
                selp: false,
                sgprefix: false,
            };
            // Softmax and staging forms (`+name` turns one on, `name` off).
            let on = |what: &str, default: bool| {
                if listed(&format!("+{what}")) {
                    true
                } else if listed(what) {
                    false
                } else {
                    default
                }
            };
            // Measured on the H200 (2026-12-03, calls 2 and 3; BENCHMARKS.md): fixed loops -16%,
            // column pairs -35% (D64) / -31% (D128), then kv4 + keep -10% (D64) / -9% (D128).
            // keep alone fell off a cliff at D128 (2.8x slower: registers), so it comes with kv4
            // only. The vector-typed buffers only on Vulkan, where the cooperative load takes a
            // vector pointer (SPIR-V); naga's Metal helper takes a scalar one.
            let vulkan = caps.info.backend == wgpu::Backend::Vulkan;
            c.kv4 = vulkan && on("kv4", true);
            c.sm_keep = listed("+keep") || (c.kv4 && on("keep", true));
            c.sm_quads = c.sm_keep || on("quads", false);
            c.p2 = vulkan && !c.sm_quads && on("p2", false);
            c.sm_pairs = !c.sm_quads && (c.p2 || on("pairs", true));
            c.sm_fixed = c.sm_quads || c.sm_pairs || on("fixed", true);
            c.sm_rot = on("rot", true);
            // Each of a row's SGS / 16 lanes takes whole steps of 4 (2) columns.
            let lpr = sgs / 16;
            if !bc.is_multiple_of(4 * lpr) {
                c.sm_keep = false;
                c.sm_quads = false;
            }
            if !bc.is_multiple_of(2 * lpr) {
                c.sm_pairs = false;
                c.p2 = false;
            }
            // Selective: the selection head's K tile in pbuf where it fits (not with PAIR, whose
            // kbuf holds both tiles).
            c.selp = features.selective
                && DEFAULT_SELP
                && !listed("selp")
                && !c.p2
                && 2 * bc > br.max(bc)
                && bc * (d + 8) <= br * (bc + 8);
            // Selective: each subgroup's prefix over its own rows (lanes take columns).
            c.sgprefix = features.selective && DEFAULT_SGPREFIX && !listed("sgprefix");
            if c.sgprefix {
                c.subgroup_barrier = caps.subgroup_barrier && !listed("sgbar");
            }
            // The selective column prefix splits BR rows over WG / (BC / NSEL) chunks.
            let wg = c.threads();
            let bcs = bc / nsel;
            if !bcs.is_multiple_of(16) || !wg.is_multiple_of(bcs) || !br.is_multiple_of(wg / bcs) {
                continue;
            }
            // Tile loads per thread must fit the shader's prefetch registers (MAX_LD = 8).
            if (bc * d / 8).div_ceil(wg) > 8 {
                continue;
            }
            if c.workgroup_bytes() <= caps.workgroup_memory as u64 {
                // A separate V tile where it also fits.
                let v = CoopConfig {
                    vsep: true,
                    subgroup_barrier: caps.subgroup_barrier && !listed("sgbar"),
                    ..c
                };
                if !features.selective
                    && !listed("vsep")
                    && v.workgroup_bytes() <= caps.workgroup_memory as u64
                {
                    c = v;
                }
                return Ok(c);
            }
        }
        Err("workgroup memory too small")
    }

    /// One S tile (16 rows of this subgroup × `cols` keys) = the A fragments `{q}0..` times the
    /// K tile at `kbase` in kbuf, stored to `dst` (row stride `stride`).
    #[allow(clippy::too_many_arguments)]
    fn s_tile(
        &self,
        q: &str,
        acc: &str,
        kbase: &str,
        dst: &str,
        stride: &str,
        cols: u32,
        ind: &str,
    ) -> String {
        let (n, nb) = (self.d / 16, cols / 16);
        let mut t = String::new();
        if !self.ilp {
            let _ = writeln!(t, "{ind}for (var cb = 0u; cb < {cols}u; cb += 16u) {{");
            let _ = writeln!(t, "{ind}    let koff = cb * DP + {kbase};");
            let _ = writeln!(t, "{ind}    var {acc} = coop_mat16x16<f32, C>();");
            for d in 0..n {
                let _ = writeln!(
                    t,
                    "{ind}    let {acc}k{d} = koff + {o}u;\n{ind}    {acc} = coopMultiplyAdd({q}{d}, coopLoad<coop_mat16x16<f16, B>>(&kbuf[{acc}k{d}], DP), {acc});",
                    o = d * 16
                );
            }
            let _ = writeln!(t, "{ind}    let {acc}s = rb0 * {stride} + cb;");
            let _ = writeln!(t, "{ind}    coopStoreT({acc}, &{dst}[{acc}s], {stride});");
            let _ = writeln!(t, "{ind}}}");
            return t;
        }
        let _ = writeln!(t, "{ind}let {acc}b = {kbase};");
        for c in 0..nb {
            let _ = writeln!(t, "{ind}var {acc}{c} = coop_mat16x16<f32, C>();");
        }
        for d in 0..n {
            for c in 0..nb {
                let _ = writeln!(
                    t,
                    "{ind}let {acc}k{c}_{d} = {acc}b + {o}u;\n{ind}{acc}{c} = coopMultiplyAdd({q}{d}, coopLoad<coop_mat16x16<f16, B>>(&kbuf[{acc}k{c}_{d}], DP), {acc}{c});",
                    o = c * 16 * (self.d + 8) + d * 16
                );
            }
        }
        for c in 0..nb {
            let _ = writeln!(
                t,
                "{ind}let {acc}s{c} = rb0 * {stride} + {o}u;\n{ind}coopStoreT({acc}{c}, &{dst}[{acc}s{c}], {stride});",
                o = c * 16
            );
        }
        t
    }

    /// The WGSL for this configuration: the template with its fragments unrolled for D.
    pub fn wgsl(&self, template: &str) -> String {
        let n = self.d / 16;
        let sel = self.features.selective;
        let mut odecl = String::new();
        let mut qdecl = String::new();
        let mut qload = String::new();
        let mut qsload = String::new();
        let mut rescale = String::new();
        let mut pv = String::new();
        let mut epi = String::new();
        // Every index a `let` of its own: naga's SPIR-V writer is happiest with that.
        for d in 0..n {
            let _ = writeln!(qdecl, "    var qf{d} = coop_mat16x16<f16, A>();");
            let _ = writeln!(
                qload,
                "            let qi{d} = qoff + {o}u;\n            qf{d} = coopLoadT<coop_mat16x16<f16, A>>(&kbuf[qi{d}], DP);",
                o = d * 16
            );
            if sel {
                let _ = writeln!(qdecl, "    var qs{d} = coop_mat16x16<f16, A>();");
                let _ = writeln!(
                    qsload,
                    "            let qj{d} = qoff + {o}u;\n            qs{d} = coopLoadT<coop_mat16x16<f16, A>>(&kbuf[qj{d}], DP);",
                    o = d * 16
                );
            }
            let _ = writeln!(odecl, "    var o{d} = coop_mat16x16<f32, C>();");
        }
        let scomp = self.s_tile("qf", "acc", "0u", "sbuf", "SP", self.bc, "        ");
        let sscomp = if sel && self.selp {
            // From pbuf (plain f16, row stride DP under another name, which the kv4 rewrite
            // below leaves alone).
            self.s_tile(
                "qs",
                "accs",
                "hoff * DP",
                "fsel",
                "SPS",
                self.bc / self.nsel,
                "                ",
            )
            .replace("&kbuf[", "&pbuf[")
            .replace("], DP)", "], DPP)")
        } else if sel {
            self.s_tile(
                "qs",
                "accs",
                "select(0u, BC * DP, PAIR) + hoff * DP",
                "fsel",
                "SPS",
                self.bc / self.nsel,
                "                ",
            )
        } else {
            String::new()
        };
        for d in 0..n {
            let _ = writeln!(
                rescale,
                "            coopStoreT(o{d}, &sbuf[ooff], SP);
            workgroupBarrier();
            for (var e = tid; e < BR * 16u; e += WG) {{
                let r = e / 16u;
                sbuf[r * SP + e % 16u] *= row_c[r];
            }}
            workgroupBarrier();
            o{d} = coopLoadT<coop_mat16x16<f32, C>>(&sbuf[ooff], SP);
            workgroupBarrier();"
            );
            let _ = writeln!(
                pv,
                "            let vi{d} = voff + {o}u;\n            o{d} = coopMultiplyAdd(pa, coopLoadT<coop_mat16x16<f16, B>>(&kbuf[vi{d}], DP), o{d});",
                o = d * 16
            );
            let _ = writeln!(
                epi,
                "    coopStoreT(o{d}, &sbuf[ooff], SP);
    workgroupBarrier();
    for (var e = tid; e < BR * 8u; e += WG) {{
        let r = e / 8u;
        let c2 = e % 8u;
        let i = row0 + r;
        if i < p.q_len {{
            let inv = inv_or_zero(row_l[r]);
            let x = vec2<f32>(sbuf[r * SP + 2u * c2], sbuf[r * SP + 2u * c2 + 1u]) * inv;
            o[((b * p.q_heads + h) * p.q_len + i) * (D / 2u) + {o8}u + c2] = pack2x16float(x);
        }}
    }}
    workgroupBarrier();",
                o8 = d * 8
            );
        }
        let bufs = format!(
            "var<workgroup> kbuf: array<{kt}, (max(BR, BC) * DP + select(0u, BC * DP, VSEP)){kd}>;\n\
             var<workgroup> pbuf: array<{pt}, BR * PP{pd}>;",
            kt = if self.kv4 { "vec4<f16>" } else { "f16" },
            kd = if self.kv4 { " / 4u" } else { "" },
            pt = if self.p2 { "vec2<f16>" } else { "f16" },
            pd = if self.p2 { " / 2u" } else { "" },
        );
        let mut puts = String::from(
            "fn put8(at: u32, w: vec4<u32>, g: f32) {
    let a = unpack2x16float(w.x) * g;
    let b = unpack2x16float(w.y) * g;
    let c = unpack2x16float(w.z) * g;
    let d = unpack2x16float(w.w) * g;
",
        );
        if self.kv4 {
            puts.push_str(
                "    kbuf[at / 4u] = vec4<f16>(vec4<f32>(a, b));
    kbuf[at / 4u + 1u] = vec4<f16>(vec4<f32>(c, d));
}
",
            );
        } else {
            puts.push_str(
                "    kbuf[at] = f16(a.x);
    kbuf[at + 1u] = f16(a.y);
    kbuf[at + 2u] = f16(b.x);
    kbuf[at + 3u] = f16(b.y);
    kbuf[at + 4u] = f16(c.x);
    kbuf[at + 5u] = f16(c.y);
    kbuf[at + 6u] = f16(d.x);
    kbuf[at + 7u] = f16(d.y);
}
",
            );
        }
        if self.p2 {
            // put_p1 is only in the code of the other softmax forms (not run with P2).
            puts.push_str(
                "fn put_p1(i: u32, x: f32) {
    let w = pbuf[i / 2u];
    pbuf[i / 2u] = select(vec2<f16>(f16(x), w.y), vec2<f16>(w.x, f16(x)), (i & 1u) == 1u);
}
fn put_p2(i: u32, x: f32, y: f32) {
    pbuf[i / 2u] = vec2<f16>(vec2<f32>(x, y));
}
fn put_p4(i: u32, v: vec4<f32>) {
    pbuf[i / 2u] = vec2<f16>(v.xy);
    pbuf[i / 2u + 1u] = vec2<f16>(v.zw);
}
fn put8p(at: u32, w: vec4<u32>) {
    pbuf[at / 2u] = vec2<f16>(unpack2x16float(w.x));
    pbuf[at / 2u + 1u] = vec2<f16>(unpack2x16float(w.y));
    pbuf[at / 2u + 2u] = vec2<f16>(unpack2x16float(w.z));
    pbuf[at / 2u + 3u] = vec2<f16>(unpack2x16float(w.w));
}",
            );
        } else {
            puts.push_str(
                "fn put_p1(i: u32, x: f32) {
    pbuf[i] = f16(x);
}
fn put_p2(i: u32, x: f32, y: f32) {
    pbuf[i] = f16(x);
    pbuf[i + 1u] = f16(y);
}
fn put_p4(i: u32, v: vec4<f32>) {
    pbuf[i] = f16(v.x);
    pbuf[i + 1u] = f16(v.y);
    pbuf[i + 2u] = f16(v.z);
    pbuf[i + 3u] = f16(v.w);
}
fn put8p(at: u32, w: vec4<u32>) {
    let a = unpack2x16float(w.x);
    let b = unpack2x16float(w.y);
    let c = unpack2x16float(w.z);
    let d = unpack2x16float(w.w);
    pbuf[at] = f16(a.x);
    pbuf[at + 1u] = f16(a.y);
    pbuf[at + 2u] = f16(b.x);
    pbuf[at + 3u] = f16(b.y);
    pbuf[at + 4u] = f16(c.x);
    pbuf[at + 5u] = f16(c.y);
    pbuf[at + 6u] = f16(d.x);
    pbuf[at + 7u] = f16(d.y);
}",
            );
        }
        let text = template
            .replace("{{BUFS}}", &bufs)
            .replace("{{PUTS}}", &puts)
            .replace("{{QDECL}}", &qdecl)
            .replace("{{QLOAD}}", &qload)
            .replace("{{QSLOAD}}", &qsload)
            .replace("{{SSLOOP}}", &sscomp)
            .replace("{{ODECL}}", &odecl)
            .replace("{{SLOOP}}", &scomp)
            .replace("{{RESCALE}}", &rescale)
            .replace("{{PV}}", &pv)
            .replace("{{EPILOGUE}}", &epi)
            .replace(
                "{{SGBAR}}",
                if self.subgroup_barrier {
                    "            subgroupBarrier();"
                } else {
                    "            workgroupBarrier();"
                },
            );
        // Cooperative loads from the vector-typed buffers: offsets and strides in vectors (every
        // offset is a multiple of 8 f16).
        let text = if self.kv4 {
            text.replace("&kbuf[", "&kbuf[(")
                .replace("], DP)", ") / 4u], DP / 4u)")
        } else {
            text
        };
        if self.p2 {
            text.replace("&pbuf[poff], PP)", "&pbuf[poff / 2u], PP / 2u)")
        } else {
            text
        }
    }
}
