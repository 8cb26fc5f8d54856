// Fused attention forward on cooperative matrices (tensor cores): f16 storage, f32 accumulation.
//
// One workgroup per (query tile of BR rows, query head, batch); BR = 16 x (subgroups per workgroup)
// and each subgroup owns 16 query rows. The subgroup size is the adapter's fixed, reported size
// (the planner only picks this path when subgroup_min_size == subgroup_max_size), passed in as SGS.
// Q fragments (and the selection head's) are loaded once and stay in registers. Per key tile of
// BC keys:
//   1. K (prefetched into registers during the previous tile) staged in workgroup memory, zero
//      past the valid keys; S = Q K^T per subgroup with 16x16x16 MMAs, stored (f32);
//   2. (selective) the selection head's K tile (also prefetched; staged beside K when kbuf has
//      room for both) and S tile, in NSEL column slices; column prefix of its relu'd logits
//      over the tile's rows, added to the carried C, giving F; S * rf - F written back into S;
//   3. loads for this tile's V and the next tile's K are issued, then the softmax runs while they
//      are in flight: per row z = (S * scale * t - F) * u over the allowed prefix of keys, in
//      log2 units (u = log2 e, p = exp2(z - m)) where every |scale * t| of the tile is small
//      enough that no logit or difference can overflow, else ("wide" tiles, and always with
//      selective masking, whose F comes from the inputs) in units u = log2(e) / 512 with
//      p = exp2(512 * max(z - m, -1/4)), finite for every logit that fits in f32 (issue 9).
//      Lazy online softmax: the running max only moves when a tile's max exceeds it
//      by more than 8 (log2 units), so O is rescaled (a round trip through workgroup memory)
//      rarely; P written as f16 (values <= 2^8), row sums kept in f32;
//   4. V (gated) stored to workgroup memory (rows of its own with VSEP); O += P V with MMAs.
// A WGSL cooperative matrix has no per-element access, hence the round trips through memory.
// Bounds: global reads are guarded by q_len / valid-key checks during staging; cooperative loads
// and stores touch workgroup memory only, at offsets < the arrays' override-sized lengths.
// Fragments per head dim are unrolled by the Rust generator (the `{{...}}` markers), which
// overrides cannot express; everything else is an `override`.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<u32>>;    // f16 x 8
@group(0) @binding(2) var<storage, read> k: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read> tau: array<f32>;
@group(0) @binding(5) var<storage, read> alpha: array<f32>;
@group(0) @binding(6) var<storage, read> gate: array<f32>;
@group(0) @binding(7) var<storage, read> kv_len: array<u32>;
@group(0) @binding(8) var<storage, read> fcarry: array<f32>;    // C [B, n_qtiles, Nk]
@group(0) @binding(9) var<storage, read_write> o: array<u32>;   // f16 x 2
@group(0) @binding(10) var<storage, read_write> lse: array<u32>;   // f32 bits (see lse_bits)

override D: u32 = 64u;
override BR: u32 = 64u;
override BC: u32 = 64u;
override SGS: u32 = 32u;       // the adapter's fixed subgroup size
override CAUSAL: bool = false;
override HAS_TAU: bool = false;
override HAS_ALPHA: bool = false;
override HAS_GATE: bool = false;
override HAS_KVLEN: bool = false;
override SELECTIVE: bool = false;
override WRITE_LSE: bool = false;
// Tuning (chosen by the planner; `SELATTN_COOP_ABLATE` turns each off for ablations):
// VSEP: V staged in its own rows of kbuf (where workgroup memory allows; not with SELECTIVE), so
//   the barrier at the top of the key loop goes and the one between S and the softmax guards only
//   the subgroup's own rows (`subgroupBarrier` where the adapter has it: the generator writes one).
// ILP (in the generator): S = Q K^T with the BC / 16 key blocks' accumulators interleaved
//   (independent MMA chains) instead of one block after the other.
override VSEP: bool = false;
// FAST_PREFIX: the selective column prefix without per-element predicates on interior tiles.
override FAST_PREFIX: bool = true;
// NSEL: the selection head's S tile in NSEL column slices of BCS keys (1 or 2), so fsel holds
//   BR x BCS: selective at BC = 64 fits 48 KiB at D = 64. The prefix writes each row's softmax
//   argument S * rf - F straight into S, so F needs no buffer of its own.
override NSEL: u32 = 1u;
// Softmax form: SM_FIXED: loops with a fixed trip count (BC / LPR columns per lane, masked by
//   selects, the exponent clamped so masked columns stay finite) instead of loops to ncol;
//   SM_PAIRS (needs SM_FIXED): each lane takes adjacent column pairs, P written two at a time;
//   SM_ROT: rows 8..15 of a subgroup's block start one step later (bank conflicts).
override SM_FIXED: bool = false;
override SM_PAIRS: bool = false;
override SM_ROT: bool = false;
// SM_QUADS (needs SM_FIXED): four adjacent columns per step (16-byte reads of S); SM_KEEP (needs
//   SM_QUADS): the tile's S values of the lane kept in registers between the max and exp passes.
override SM_QUADS: bool = false;
override SM_KEEP: bool = false;
// VPRE (not with SELECTIVE): V prefetched a whole tile ahead, as K is: V of tile kt is loaded
//   during tile kt - BC and staged from registers just before the loads of tile kt + BC (where K's
//   rows, or V's own, are free), not after the softmax.
override VPRE: bool = false;
const KEEP_MAX: u32 = 16u;   // steps per lane with SM_QUADS: BC / (4 LPR) <= 64 / 4
override CW: u32 = select(select(1u, 2u, SM_PAIRS), 4u, SM_QUADS);   // columns per step
override CPL: u32 = BC / (CW * LPR);           // steps per lane
// XA: timing-only ablations (results wrong; `SELATTN_COOP_ABLATE=x-...`, bench --no-check): bits
//   1 skip the softmax, 2 skip staging K/V in workgroup memory, 4 skip the global K/V loads of the
//   loop, 8 skip S = Q K^T, 16 skip O += P V, 32 skip the loop's barriers, 64 skip the softmax's
//   max pass, 128 skip its exp pass (32: the K-staging and S barriers only); selective: 256 skip
//   the selection head's S tile MMAs, 512 skip the column prefix (S left unscaled), 1024 skip
//   staging the selection head's K tile. 0 in normal use.
override XA: u32 = 0u;
fn xa(bit: u32) -> bool {
    return (XA & bit) != 0u;
}
override BCS: u32 = BC / NSEL;
override SPS: u32 = BCS + 4u;  // padded f32 row stride of fsel

override WG: u32 = (BR / 16u) * SGS;
override LPR: u32 = SGS / 16u;   // lanes per row in the softmax
override CHUNK: u32 = BR / (WG / BCS);   // rows per thread in the selective column prefix
override NLD: u32 = (BC * D8 + WG - 1u) / WG;   // 16-byte loads per thread per tile, <= MAX_LD
const MAX_LD: u32 = 8u;
override D8: u32 = D / 8u;
override DP: u32 = D + 8u;     // padded f16 row stride of staged K/V/Q (bank conflicts)
override SP: u32 = BC + 4u;    // padded f32 row stride of S
// Selective with room for two key tiles in kbuf (BC <= BR / 2): K and the selection head's K
// are staged together, two barriers fewer per tile.
override PAIR: bool = SELECTIVE && 2u * BC <= max(BR, BC);
// SELP (selective, not PAIR; the planner checks BC * DP <= BR * PP): the selection head's K tile
// staged in pbuf (free between the top of the key loop and the softmax) together with K, so
// its S tile needs no staging of its own: two workgroup barriers per key tile fewer.
override SELP: bool = false;
override DPP: u32 = DP;        // the same stride, named apart for the generator
// SGPREFIX (selective): the carried C comes per 16 query rows (the column sums' SUB16 form, a
// scratch row per subgroup block), so each subgroup takes the column prefix over its own 16
// rows alone: lanes take columns, subgroup barriers (SGBAR) instead of workgroup ones, no
// chunk totals; one workgroup barrier after the slices guards K / pbuf for V and P.
override SGPREFIX: bool = false;
override PP: u32 = BC + 8u;    // padded f16 row stride of P
// Softmax units of a wide tile: logits times UW = log2(e) / 512, exponentiated as
// exp2(UX * max(z - m, DIFF_MIN)). A logit that fits in f32 is below FLT_MAX / 355 in these
// units, a selective term too, so F (at most C plus BR = 64 terms, C capped at F_CAP) and every
// difference z - m stay finite; the clamp (2^-128, 0 in f32) keeps the product finite.
const UW: f32 = LOG2E / 512.0;
const UX: f32 = 512.0;
const DIFF_MIN: f32 = -0.25;
const F_CAP: f32 = 1.0e37;
// A tile whose rows all have |scale * t| below this (times D * 65504^2, the largest |q . k| in
// f16, that is a logit below 1e37) runs in log2 units: no logit or difference can overflow.
fn narrow_limit() -> f32 {
    return 1.0e37 / (f32(D) * 4.2908e9);
}
// Lazy rescale threshold: 8 log2 units, so P stays <= 2^8, far inside f16 range.
const RESCALE_LOG2: f32 = 8.0;

// Q staging (BR rows), then K and V tiles; with VSEP, V in BC more rows from VOFF.
override VOFF: u32 = select(0u, max(BR, BC) * DP, VSEP);
// kbuf (f16, or vec4<f16> with KV4) and pbuf (f16, or vec2<f16> with P2): written by the generator.
{{BUFS}}
var<workgroup> sbuf: array<f32, BR * SP>;
var<workgroup> fsel: array<f32, select(4u, BR * SPS, SELECTIVE)>;
var<workgroup> ctot: array<f32, select(4u, WG, SELECTIVE)>;   // column totals per row chunk
var<workgroup> row_m: array<f32, BR>;
var<workgroup> row_l: array<f32, BR>;
var<workgroup> row_c: array<f32, BR>;
var<workgroup> row_f: array<f32, BR>;
// Every workgroup variable is a multiple of 16 bytes: on NVIDIA's Vulkan driver (580), one
// smaller variable anywhere in the shader misaligns the arrays that cooperative matrices load
// from and the loads return wrong data (found by bisection on an H100, 2026-11-22: a 2-, 4- or
// 6-byte workgroup variable broke a 16x16x16 QK^T that is exact without it).
var<workgroup> rescale: array<atomic<u32>, 4>;

fn valid_keys(b: u32) -> u32 {
    if HAS_KVLEN {
        return valid_key_count(kv_len[b], p.k_len);
    }
    return p.k_len;
}

// scale * t_i (natural units; the softmax multiplies in its units).
fn row_factor(b: u32, h: u32, i: u32) -> f32 {
    var t = 1.0;
    if HAS_TAU {
        t = tau[(b * p.q_heads + h) * p.q_len + i];
    }
    if HAS_ALPHA {
        t = temperature(t, alpha[h], p.start + i);
    }
    return p.scale * t;
}

// exp2(UX * (z - m)) in a wide tile's units, finite for every finite z and m of the softmax.
fn p_wide(z: f32, m: f32) -> f32 {
    return exp2(max(z - m, DIFF_MIN) * UX);
}

// put8(at, w, g): stores 8 f16 (one 16-byte global word) at kbuf[at..at+8], scaled by g;
// put_p1(i, x) / put_p2(i, x, y): P values at pbuf[i] (and i + 1, i even). Written by the generator.
{{PUTS}}

// Element e of the K tile starting at key kt (16 bytes of row kt + e / D8), zero past kend or
// past the tile.
fn load_k(b: u32, hk: u32, kt: u32, kend: u32, e: u32) -> vec4<u32> {
    let j = kt + e / D8;
    if e < BC * D8 && j < kend {
        return k[((b * p.kv_heads + hk) * p.k_len + j) * D8 + e % D8];
    }
    return vec4<u32>(0u);
}

// V (16 bytes, element e of the tile at kt) and its key's gate, as load_k (VPRE's first tile).
fn load_v(b: u32, hk: u32, kt: u32, kend: u32, e: u32) -> vec4<u32> {
    let j = kt + e / D8;
    if e < BC * D8 && j < kend {
        return v[((b * p.kv_heads + hk) * p.k_len + j) * D8 + e % D8];
    }
    return vec4<u32>(0u);
}
fn load_g(b: u32, hk: u32, kt: u32, kend: u32, e: u32) -> f32 {
    let j = kt + e / D8;
    if HAS_GATE && e < BC * D8 && j < kend {
        return gate[(b * p.kv_heads + hk) * p.k_len + j];
    }
    return 1.0;
}

@compute @workgroup_size(WG)
fn coop_forward(
    @builtin(local_invocation_index) tid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(subgroup_id) sg: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    // Causal: the longest query tiles first, so the tail of the grid is short work.
    var qt = wg.x;
    if CAUSAL {
        qt = p.n_qtiles - 1u - wg.x;
    }
    let h = wg.y;
    let b = wg.z;
    let hk = h / p.group;
    let row0 = qt * BR;
    let valid = valid_keys(b);
    let sel = p.sel_head;
    let sel_kv = sel / p.group;
    let rb0 = sg * 16u;          // this subgroup's first row in the tile

    if tid == 0u {
        atomicStore(&rescale[0], 0u);
        atomicStore(&rescale[1], 0u);
    }
    for (var r = tid; r < BR; r += WG) {
        row_m[r] = LOWEST;
        row_l[r] = 0.0;
        row_c[r] = 1.0;
        var f = 0.0;
        if row0 + r < p.q_len {
            f = row_factor(b, h, row0 + r);
        }
        row_f[r] = f;
    }

    // Q fragments (then the selection head's) stay in registers for the whole key loop; they
    // are staged through kbuf. Every subgroup loads at its own offset with no branch on the
    // subgroup: cooperative operations need uniform control flow.
{{QDECL}}
    let qoff = rb0 * DP;
    for (var qp = 0u; qp < select(1u, 2u, SELECTIVE); qp++) {
        var qh = h;
        if qp == 1u {
            qh = sel;
        }
        workgroupBarrier();
        for (var e = tid; e < BR * D8; e += WG) {
            let r = e / D8;
            let i = row0 + r;
            let c8 = e % D8;
            var w = vec4<u32>(0u);
            if i < p.q_len {
                w = q[((b * p.q_heads + qh) * p.q_len + i) * D8 + c8];
            }
            put8(r * DP + c8 * 8u, w, 1.0);
        }
        workgroupBarrier();
        if qp == 0u {
{{QLOAD}}
        } else {
{{QSLOAD}}
        }
    }
    // Wide tile: some row's |scale * t| is too large for log2 units (set after the barriers of
    // the Q staging, which order it after the reset above).
    for (var r = tid; r < BR; r += WG) {
        if abs(row_f[r]) > narrow_limit() {
            atomicStore(&rescale[1], 1u);
        }
    }
    let wide = SELECTIVE || workgroupUniformLoad(&rescale[1]) != 0u;
    let unit = select(LOG2E, UW, wide);
    let rescale_at = select(RESCALE_LOG2, RESCALE_LOG2 / UX, wide);
{{ODECL}}

    var kend = valid;
    if CAUSAL {
        kend = min(kend, p.start + min(row0 + BR, p.q_len));
    }

    // K and V tiles are loaded into registers ahead of use (K one tile early, V before the
    // softmax), so global-load latency overlaps the softmax instead of stalling at a barrier.
    var kpre: array<vec4<u32>, MAX_LD>;
    var vpre: array<vec4<u32>, MAX_LD>;
    var gpre: array<f32, MAX_LD>;
    var spre: array<vec4<u32>, MAX_LD>;   // the selection head's K, when selective
    for (var x = 0u; x < NLD; x++) {
        kpre[x] = load_k(b, hk, 0u, kend, tid + x * WG);
        if VPRE {
            vpre[x] = load_v(b, hk, 0u, kend, tid + x * WG);
            gpre[x] = load_g(b, hk, 0u, kend, tid + x * WG);
        }
        if SELECTIVE {
            spre[x] = load_k(b, sel_kv, 0u, kend, tid + x * WG);
        }
    }

    // Every subgroup has loaded its Q fragments before kbuf takes the first K tile.
    workgroupBarrier();
    for (var kt = 0u; kt < kend; kt += BC) {
        // Without VSEP, V of the previous tile is in the rows K takes now. With VSEP, K's rows
        // were last read by S before the barrier ahead of the previous tile's P V, and V's rows
        // are written only after the next barrier, which every subgroup reaches after its P V.
        if !VSEP {
            workgroupBarrier();
        }
        // 1. K tile (prefetched), zero past kend, and with PAIR the selection head's K tile in
        //    the rows after it; 2. S = Q K^T for this subgroup's 16 rows (and S_sel).
        for (var x = 0u; x < NLD; x++) {
            let e = tid + x * WG;
            if e < BC * D8 && !xa(2u) {
                put8((e / D8) * DP + (e % D8) * 8u, kpre[x], 1.0);
                if PAIR {
                    put8((BC + e / D8) * DP + (e % D8) * 8u, spre[x], 1.0);
                } else if SELP {
                    put8p((e / D8) * DP + (e % D8) * 8u, spre[x]);
                }
            }
        }
        if !xa(32u) {
            workgroupBarrier();
        }
        if !xa(8u) {
{{SLOOP}}
        }
        // The selection head's S tile: from the rows after K (PAIR), from pbuf (SELP), or
        // through K's rows once every subgroup is done with K.
        if SELECTIVE {
            if !PAIR && !SELP {
                workgroupBarrier();
                for (var x = 0u; x < NLD; x++) {
                    let e = tid + x * WG;
                    if e < BC * D8 && !xa(1024u) {
                        put8((e / D8) * DP + (e % D8) * 8u, spre[x], 1.0);
                    }
                }
                workgroupBarrier();
            }
            let su = p.scale * UW;
            // An interior tile (every row inside q_len and the valid keys, every key before
            // every row's position): the predicate is j > 0 alone, folded into the factor.
            let interior = FAST_PREFIX && row0 + BR <= p.q_len && kt + BC <= p.start + row0
                && p.start + row0 + BR <= valid;
            for (var hs = 0u; hs < select(NSEL, 0u, !SGPREFIX); hs++) {
                let hoff = hs * BCS;
                if !xa(256u) {
{{SSLOOP}}
                }
                // This subgroup's rows of fsel (its own S_sel) are read by its own lanes.
{{SGBAR}}
                // F = C (this block's carry) + exclusive prefix over the block's 16 rows, in
                // units of UW as below; each lane walks whole columns.
                let blk = qt * (BR / 16u) + sg;
                for (var c = lane; c < select(BCS, 0u, xa(512u)); c += SGS) {
                    let j = kt + hoff + c;
                    let sj = select(0.0, su, j > 0u);
                    var run = 0.0;
                    if j < p.k_len && blk < p.sel_rows {
                        run = min(fcarry[(b * p.sel_rows + blk) * p.k_len + j] * UW, F_CAP);
                    }
                    if interior {
                        for (var r = rb0; r < rb0 + 16u; r++) {
                            let s = fsel[r * SPS + c];
                            let e = r * SP + hoff + c;
                            sbuf[e] = sbuf[e] * (row_f[r] * UW) - run;
                            run += max(s * sj, 0.0);
                        }
                    } else {
                        for (var r = rb0; r < rb0 + 16u; r++) {
                            let pos = p.start + row0 + r;
                            let s = fsel[r * SPS + c];
                            let e = r * SP + hoff + c;
                            sbuf[e] = sbuf[e] * (row_f[r] * UW) - run;
                            if row0 + r < p.q_len && selective_counts(j, pos) && pos < valid {
                                run += max(s * su, 0.0);
                            }
                        }
                    }
                }
                // fsel's rows are rewritten by the next slice (this subgroup's own).
{{SGBAR}}
            }
            if SGPREFIX {
                // K (and the selection head's K in kbuf or pbuf) are done with in every
                // subgroup before V and P take their rows.
                workgroupBarrier();
            }
            for (var hs = 0u; hs < select(NSEL, 0u, SGPREFIX); hs++) {
                let hoff = hs * BCS;
                if !xa(256u) {
{{SSLOOP}}
                }
                workgroupBarrier();
                // 3. F = C + exclusive column prefix of S_sel inside the tile, in units of UW
                //    (a wide tile); C capped at F_CAP, each term below FLT_MAX / 355: no sum
                //    overflows. Two levels so every thread works: WG / BCS row chunks per
                //    column; chunk totals first, then each chunk walks its rows from C plus the
                //    totals of the chunks above it, writing S * rf - F into S.
                let c = tid % BCS;
                let chunk = tid / BCS;
                let r0 = chunk * CHUNK;
                let j = kt + hoff + c;
                let sj = select(0.0, su, j > 0u);
                var tot = 0.0;
                if xa(512u) {
                    // (timing only: no prefix)
                } else if interior {
                    for (var r = r0; r < r0 + CHUNK; r++) {
                        tot += max(fsel[r * SPS + c] * sj, 0.0);
                    }
                } else {
                    for (var r = r0; r < r0 + CHUNK; r++) {
                        let pos = p.start + row0 + r;
                        if row0 + r < p.q_len && selective_counts(j, pos) && pos < valid {
                            tot += max(fsel[r * SPS + c] * su, 0.0);
                        }
                    }
                }
                ctot[chunk * BCS + c] = tot;
                workgroupBarrier();
                var run = 0.0;
                if j < p.k_len {
                    // C is F0 plus sums of relu'd logits: finite for any input whose F fits.
                    run = min(fcarry[(b * p.n_qtiles + qt) * p.k_len + j] * UW, F_CAP);
                }
                for (var q2 = 0u; q2 < chunk; q2++) {
                    run += ctot[q2 * BCS + c];
                }
                if xa(512u) {
                    // (timing only: no prefix)
                } else if interior {
                    for (var r = r0; r < r0 + CHUNK; r++) {
                        let s = fsel[r * SPS + c];
                        let e = r * SP + hoff + c;
                        sbuf[e] = sbuf[e] * (row_f[r] * UW) - run;
                        run += max(s * sj, 0.0);
                    }
                } else {
                    for (var r = r0; r < r0 + CHUNK; r++) {
                        let pos = p.start + row0 + r;
                        let s = fsel[r * SPS + c];
                        let e = r * SP + hoff + c;
                        sbuf[e] = sbuf[e] * (row_f[r] * UW) - run;
                        if row0 + r < p.q_len && selective_counts(j, pos) && pos < valid {
                            run += max(s * su, 0.0);
                        }
                    }
                }
                // fsel is rewritten by the next slice; S is read by the softmax.
                workgroupBarrier();
            }
        } else if VSEP {
            // S is read back by the softmax only in the subgroup's own rows.
            if !xa(32u) {
{{SGBAR}}
            }
        } else {
            // The V tile next takes K's rows, which every subgroup must be done with.
            workgroupBarrier();
        }
        // Loads for this tile's V and the next tile's K, consumed after the softmax (VPRE: this
        // tile's V staged first, then the next tile's V loaded).
        for (var x = 0u; x < NLD; x++) {
            let e = tid + x * WG;
            if VPRE && e < BC * D8 && !xa(2u) {
                put8(VOFF + (e / D8) * DP + (e % D8) * 8u, vpre[x], gpre[x]);
            }
            let j = select(kt, kt + BC, VPRE) + e / D8;
            var w = vec4<u32>(0u);
            var g = 1.0;
            if e < BC * D8 && j < kend && !xa(4u) {
                let hj = (b * p.kv_heads + hk) * p.k_len + j;
                w = v[hj * D8 + e % D8];
                if HAS_GATE {
                    g = gate[hj];
                }
            }
            vpre[x] = w;
            gpre[x] = g;
            if !xa(4u) {
                kpre[x] = load_k(b, hk, kt + BC, kend, e);
            }
            if SELECTIVE {
                spre[x] = load_k(b, sel_kv, kt + BC, kend, e);
            }
        }
        // 4. Lazy online softmax. Each subgroup takes its own 16 rows, LPR = SGS / 16 lanes per row,
        //    combined with subgroup shuffles (partners are lanes of one subgroup by construction).
        //    A row's allowed keys in the tile are a prefix [0, ncol). The planner's form on the
        //    H200: SM_KEEP (four adjacent columns a step, read once into registers, masks by
        //    select); the older forms (SM_PAIRS, SM_FIXED, interleaved single columns) stay as
        //    fallbacks behind the same code.
        if !xa(1u) {
            let r = rb0 + lane / LPR;
            let part = lane % LPR;
            let i = row0 + r;
            var lim = min(valid, kt + BC);
            if CAUSAL {
                lim = min(lim, p.start + i + 1u);
            }
            var ncol = 0u;
            if i < p.q_len && lim > kt {
                ncol = lim - kt;
            }
            let rf = row_f[r] * unit;
            let rot = select(0u, ((lane / LPR) / 8u) % CPL, SM_ROT);
            // Whether a row has started is read off its sum (>= 1 once any key was allowed: the
            // tile that sets the max contributes exp2(0)), never off the max's value.
            var mx = LOWEST;
            // (With SELECTIVE, S already holds S * rf - F.)
            var zs: array<vec4<f32>, KEEP_MAX>;
            if SM_QUADS {
                for (var k = 0u; k < select(CPL, 0u, xa(64u)); k++) {
                    let c = 4u * (part + LPR * ((k + rot) % CPL));
                    let o = r * SP + c;
                    var z = vec4<f32>(sbuf[o], sbuf[o + 1u], sbuf[o + 2u], sbuf[o + 3u]);
                    if !SELECTIVE {
                        z *= rf;
                    }
                    if SM_KEEP {
                        zs[k] = z;
                    }
                    let zm = select(vec4<f32>(LOWEST), z, vec4<u32>(c) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(ncol));
                    mx = max(mx, max(max(zm.x, zm.y), max(zm.z, zm.w)));
                }
            } else if SM_FIXED {
                for (var k = 0u; k < select(CPL, 0u, xa(64u)); k++) {
                    let c = CW * (part + LPR * ((k + rot) % CPL));
                    var z0 = sbuf[r * SP + c];
                    if !SELECTIVE {
                        z0 *= rf;
                    }
                    mx = max(mx, select(LOWEST, z0, c < ncol));
                    if SM_PAIRS {
                        var z1 = sbuf[r * SP + c + 1u];
                        if !SELECTIVE {
                            z1 *= rf;
                        }
                        mx = max(mx, select(LOWEST, z1, c + 1u < ncol));
                    }
                }
            } else {
                for (var c = part; c < select(ncol, 0u, xa(64u)); c += LPR) {
                    var z = sbuf[r * SP + c];
                    if !SELECTIVE {
                        z *= rf;
                    }
                    mx = max(mx, z);
                }
            }
            for (var x = 1u; x < LPR; x <<= 1u) {
                mx = max(mx, subgroupShuffleXor(mx, x));
            }
            let m_old = row_m[r];
            var m_new = m_old;
            var corr = 1.0;
            if row_l[r] == 0.0 {
                m_new = mx;          // nothing accumulated yet: no rescale needed
            } else if mx > m_old + rescale_at {
                m_new = mx;
                if wide {
                    corr = p_wide(m_old, mx);
                } else {
                    corr = exp2(m_old - mx);
                }
            }
            // P goes to the MMA as f16; the row sum (hence LSE) keeps f32 precision. One loop per
            // unit so that the narrow one (nearly every tile) costs nothing extra.
            var sum = 0.0;
            if SM_QUADS {
                for (var k = 0u; k < select(CPL, 0u, xa(128u)); k++) {
                    let c = 4u * (part + LPR * ((k + rot) % CPL));
                    let o = r * SP + c;
                    var z: vec4<f32>;
                    if SM_KEEP {
                        z = zs[k];
                    } else {
                        z = vec4<f32>(sbuf[o], sbuf[o + 1u], sbuf[o + 2u], sbuf[o + 3u]);
                        if !SELECTIVE {
                            z *= rf;
                        }
                    }
                    let ok = vec4<u32>(c) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(ncol);
                    var e: vec4<f32>;
                    if wide {
                        e = exp2(clamp(z - m_new, vec4<f32>(DIFF_MIN), vec4<f32>(rescale_at)) * UX);
                    } else {
                        e = exp2(min(z - m_new, vec4<f32>(rescale_at)));
                    }
                    let pv = select(vec4<f32>(0.0), e, ok);
                    put_p4(r * PP + c, pv);
                    sum += (pv.x + pv.y) + (pv.z + pv.w);
                }
            } else if SM_FIXED {
                // Allowed columns have z - m_new <= rescale_at (else the max moved), so the clamp
                // changes none of them; masked ones are computed finite and dropped by the select.
                if wide {
                    for (var k = 0u; k < select(CPL, 0u, xa(128u)); k++) {
                        let c = CW * (part + LPR * ((k + rot) % CPL));
                        var z0 = sbuf[r * SP + c];
                        if !SELECTIVE {
                            z0 *= rf;
                        }
                        let p0 = select(0.0, exp2(clamp(z0 - m_new, DIFF_MIN, rescale_at) * UX), c < ncol);
                        if SM_PAIRS {
                            var z1 = sbuf[r * SP + c + 1u];
                            if !SELECTIVE {
                                z1 *= rf;
                            }
                            let p1 = select(0.0, exp2(clamp(z1 - m_new, DIFF_MIN, rescale_at) * UX), c + 1u < ncol);
                            put_p2(r * PP + c, p0, p1);
                            sum += p0 + p1;
                        } else {
                            put_p1(r * PP + c, p0);
                            sum += p0;
                        }
                    }
                } else {
                    for (var k = 0u; k < select(CPL, 0u, xa(128u)); k++) {
                        let c = CW * (part + LPR * ((k + rot) % CPL));
                        let p0 = select(0.0, exp2(min(sbuf[r * SP + c] * rf - m_new, rescale_at)), c < ncol);
                        if SM_PAIRS {
                            let p1 = select(0.0, exp2(min(sbuf[r * SP + c + 1u] * rf - m_new, rescale_at)), c + 1u < ncol);
                            put_p2(r * PP + c, p0, p1);
                            sum += p0 + p1;
                        } else {
                            put_p1(r * PP + c, p0);
                            sum += p0;
                        }
                    }
                }
            } else {
                if wide {
                    for (var c = part; c < BC; c += LPR) {
                        var pf = 0.0;
                        if c < ncol {
                            var z = sbuf[r * SP + c];
                            if !SELECTIVE {
                                z *= rf;
                            }
                            pf = p_wide(z, m_new);
                        }
                        put_p1(r * PP + c, pf);
                        sum += pf;
                    }
                } else {
                    // (Never with SELECTIVE: those tiles are always wide.)
                    for (var c = part; c < select(BC, 0u, xa(128u)); c += LPR) {
                        var pf = 0.0;
                        if c < ncol {
                            pf = exp2(sbuf[r * SP + c] * rf - m_new);
                        }
                        put_p1(r * PP + c, pf);
                        sum += pf;
                    }
                }
            }
            for (var x = 1u; x < LPR; x <<= 1u) {
                sum += subgroupShuffleXor(sum, x);
            }
            // Every lane of the row read row_m[r] above, before the shuffles; one lane writes.
            if part == 0u {
                row_m[r] = m_new;
                row_c[r] = corr;
                row_l[r] = row_l[r] * corr + sum;
                if corr != 1.0 {
                    atomicStore(&rescale[0], 1u);
                }
            }
        }
        for (var x = 0u; x < select(NLD, 0u, VPRE); x++) {
            let e = tid + x * WG;
            if e < BC * D8 && !xa(2u) {
                put8(VOFF + (e / D8) * DP + (e % D8) * 8u, vpre[x], gpre[x]);
            }
        }
        // 5. Rare: rescale O rows whose max moved, through workgroup memory.
        let need = workgroupUniformLoad(&rescale[0]);
        if need != 0u {
            let ooff = rb0 * SP;
{{RESCALE}}
            workgroupBarrier();
            atomicStore(&rescale[0], 0u);
        }
        // 6. O += P V.
        for (var cb = 0u; cb < BC; cb += 16u) {
            let poff = rb0 * PP + cb;
            let voff = VOFF + cb * DP;
            if !xa(16u) {
            let pa = coopLoadT<coop_mat16x16<f16, A>>(&pbuf[poff], PP);
{{PV}}
            }
        }
    }
    workgroupBarrier();

    // 7. Normalise and store O (f16) and LSE; rows with no allowed key give zeros and -inf.
    let ooff = rb0 * SP;
{{EPILOGUE}}
    if WRITE_LSE {
        for (var r = tid; r < BR; r += WG) {
            let i = row0 + r;
            if i < p.q_len {
                let l = row_l[r];
                lse[(b * p.q_heads + h) * p.q_len + i] = lse_bits_ln(row_m[r] / unit, l);
            }
        }
    }
}
