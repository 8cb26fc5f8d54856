// Selective pass 1 on cooperative matrices (the `colsum` of `selective.wgsl`, same contract and
// bindings): T[b, I, j] = sum over rows k of query tile I of S_kj, S_kj = relu(scale q_sel_k .
// k_sel_j) for 0 < j < p_k (and p_k inside the valid prefix). One workgroup per (key tile of BC
// keys, query tile of BR rows, b); BR = 16 x subgroups, each subgroup owns 16 rows.
//   1. the selection head's Q rows are staged (zeros past q_len) and loaded as A fragments;
//   2. the K tile is staged (zeros past Nk) in the same buffer and S = Q K^T with 16x16x16 MMAs
//      (loading B operands straight from global memory measured 2x slower on the H200);
//   3. S (f32) stored to workgroup memory; each column's masked relu sum over the BR rows is
//      written to the scratch: NCH = WG / BC chunks of rows summed by as many threads, then
//      combined. On interior tiles (every row inside q_len and the valid keys, every key before
//      every row's position) the mask is j > 0 alone, folded into the factor (FAST).
// Key tiles that no row of the query tile can reach (kt + 1 >= the tile's last position + 1)
// only write zeros. Fragments per head dim are unrolled by the Rust generator (`{{...}}`).
// KPW: each workgroup walks KPW consecutive key tiles (grid x = ceil(key tiles / KPW)) with the
// Q fragments loaded once, and the next tile's K loaded into registers while the current one is
// reduced (KPW = 1: one tile per workgroup, as first written).

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<u32>>;   // f16 x 8
@group(0) @binding(2) var<storage, read> k: array<vec4<u32>>;   // f16 x 8
@group(0) @binding(3) var<storage, read> kv_len: array<u32>;
@group(0) @binding(5) var<storage, read_write> scratch: array<f32>;   // [B, n_qtiles, Nk]

override D: u32 = 64u;
override BR: u32 = 64u;
override BC: u32 = 64u;
override SGS: u32 = 32u;       // the adapter's fixed subgroup size
override HAS_KVLEN: bool = false;
override WG: u32 = (BR / 16u) * SGS;
override D8: u32 = D / 8u;
override DP: u32 = D + 8u;     // padded f16 row stride (bank conflicts)
override SP: u32 = BC + 4u;    // padded f32 row stride of S
// SUB16: one scratch row per 16 query rows (the forward's subgroup prefix), else one per tile.
override SUB16: bool = false;
// Row chunks per column (the planner keeps BR % NCH == 0); with SUB16 one per 16 rows.
override NCH: u32 = select(max(WG / BC, 1u), BR / 16u, SUB16);
override RCH: u32 = BR / NCH;
override FAST: bool = true;
override KPW: u32 = 1u;
override NLD: u32 = (BC * D8 + WG - 1u) / WG;   // 16-byte loads per thread per tile, <= MAX_LD
const MAX_LD: u32 = 8u;
// The tile's loads fit the prefetch registers; else each tile is loaded while it is staged.
override PRE: bool = NLD <= MAX_LD;

// Every workgroup variable is a multiple of 16 bytes (NVIDIA, see coop_forward.wgsl).
var<workgroup> stage: array<f16, max(BR, BC) * DP>;   // Q rows, then a partial K tile
var<workgroup> sbuf: array<f32, BR * SP>;
var<workgroup> part: array<f32, NCH * BC>;   // chunk sums

// Stores 8 f16 (one 16-byte global word) at stage[at..at+8] (f16 -> f32 -> f16 is exact).
fn put8(at: u32, w: vec4<u32>) {
    let a = unpack2x16float(w.x);
    let b = unpack2x16float(w.y);
    let c = unpack2x16float(w.z);
    let d = unpack2x16float(w.w);
    stage[at] = f16(a.x);
    stage[at + 1u] = f16(a.y);
    stage[at + 2u] = f16(b.x);
    stage[at + 3u] = f16(b.y);
    stage[at + 4u] = f16(c.x);
    stage[at + 5u] = f16(c.y);
    stage[at + 6u] = f16(d.x);
    stage[at + 7u] = f16(d.y);
}

// Element e of the selection head's K tile starting at key kt (16 bytes of row kt + e / D8),
// zero past Nk or past the tile.
fn load_k(b: u32, hk: u32, kt: u32, e: u32) -> vec4<u32> {
    let j = kt + e / D8;
    if e < BC * D8 && j < p.k_len {
        return k[((b * p.kv_heads + hk) * p.k_len + j) * D8 + e % D8];
    }
    return vec4<u32>(0u);
}

@compute @workgroup_size(WG)
fn coop_colsum(
    @builtin(local_invocation_index) tid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(subgroup_id) sg: u32,
) {
    let kt0 = wg.x * KPW * BC;
    let qt = wg.y;
    let b = wg.z;
    let row0 = qt * BR;
    let sel = p.sel_head;
    let sel_kv = sel / p.group;
    var valid = p.k_len;
    if HAS_KVLEN {
        valid = valid_key_count(kv_len[b], p.k_len);
    }
    // Largest position + 1 of a contributing row: keys at or past it get nothing from this tile.
    let pend = min(p.start + min(row0 + BR, p.q_len), valid);
    let rb0 = sg * 16u;
{{QDECL}}
    var kpre: array<vec4<u32>, MAX_LD>;
    // The first tile has the smallest keys: without work there, none of the group has any.
    if kt0 + 1u < pend {
        for (var e = tid; e < BR * D8; e += WG) {
            let i = row0 + e / D8;
            var w = vec4<u32>(0u);
            if i < p.q_len {
                w = q[((b * p.q_heads + sel) * p.q_len + i) * D8 + e % D8];
            }
            put8((e / D8) * DP + (e % D8) * 8u, w);
        }
        if PRE {
            for (var x = 0u; x < NLD; x++) {
                kpre[x] = load_k(b, sel_kv, kt0, tid + x * WG);
            }
        }
        workgroupBarrier();
        let qoff = rb0 * DP;
{{QLOAD}}
    }
    for (var t = 0u; t < KPW; t++) {
        let kt = kt0 + t * BC;
        if kt >= p.k_len {
            break;
        }
        let work = kt + 1u < pend;
        if work {
            // Every subgroup has its Q fragments (first tile) or is done with the previous
            // tile's K and S (the others): the staging buffer takes this K tile.
            workgroupBarrier();
            if PRE {
                for (var x = 0u; x < NLD; x++) {
                    let e = tid + x * WG;
                    if e < BC * D8 {
                        put8((e / D8) * DP + (e % D8) * 8u, kpre[x]);
                    }
                }
            } else {
                for (var e = tid; e < BC * D8; e += WG) {
                    put8((e / D8) * DP + (e % D8) * 8u, load_k(b, sel_kv, kt, e));
                }
            }
            workgroupBarrier();
            // The next tile's K, in flight during this tile's MMAs and sums.
            if PRE && t + 1u < KPW {
                for (var x = 0u; x < NLD; x++) {
                    kpre[x] = load_k(b, sel_kv, kt + BC, tid + x * WG);
                }
            }
            for (var cb = 0u; cb < BC; cb += 16u) {
                let koff = cb * DP;
                let soff = rb0 * SP + cb;
{{SCOMP}}
            }
            workgroupBarrier();
            let interior = FAST && row0 + BR <= p.q_len && kt + BC <= p.start + row0
                && p.start + row0 + BR <= valid;
            for (var e = tid; e < NCH * BC; e += WG) {
                let c = e % BC;
                let r0 = (e / BC) * RCH;
                let j = kt + c;
                var sum = 0.0;
                if interior {
                    let sj = select(0.0, p.scale, j > 0u);
                    for (var r = r0; r < r0 + RCH; r++) {
                        sum += max(sbuf[r * SP + c] * sj, 0.0);
                    }
                } else {
                    for (var r = r0; r < r0 + RCH; r++) {
                        let pos = p.start + row0 + r;
                        if row0 + r < p.q_len && selective_counts(j, pos) && pos < valid {
                            sum += max(sbuf[r * SP + c] * p.scale, 0.0);
                        }
                    }
                }
                part[e] = sum;
            }
            workgroupBarrier();
        }
        // (part is next written after the next tile's first barrier.)
        if SUB16 {
            // Each 16-row block's sums to its own scratch row (blocks past q_len have none).
            for (var e = tid; e < NCH * BC; e += WG) {
                let j = kt + e % BC;
                let blk = qt * NCH + e / BC;
                if j < p.k_len && blk < p.sel_rows {
                    var sum = 0.0;
                    if work {
                        sum = part[e];
                    }
                    scratch[(b * p.sel_rows + blk) * p.k_len + j] = sum;
                }
            }
            continue;
        }
        for (var c = tid; c < BC; c += WG) {
            let j = kt + c;
            if j < p.k_len {
                var sum = 0.0;
                if work {
                    for (var ch = 0u; ch < NCH; ch++) {
                        sum += part[ch * BC + c];
                    }
                }
                scratch[(b * p.sel_rows + qt) * p.k_len + j] = sum;
            }
        }
    }
}
