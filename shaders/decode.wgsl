// Decode over a KV cache (DESIGN.md §2, "Decode"): few queries per sequence, many slots.
//
// score:  selective masking only. One thread per slot j: for the step's queries k (positions
//         p_k = pos_b + k) S_kj = relu(scale q_sel_k . k_sel_j) for 0 < pos_j < p_k; writes
//         FQ[b, i, j] = F[j] + sum over k < i of S_kj (what query i subtracts) and, in place,
//         F[j] += sum over all k of S_kj, so the state stays what a full prefill would produce.
// attend: flash-decoding. One workgroup per (slot split, KV head and row block, sequence); the
//         rows are the group's query heads times the step's queries, so K and V are read once per
//         KV head. Online softmax over the split; writes unnormalised partial (o, m, l).
// merge:  one workgroup per query row: combines the splits, writes O and LSE.
//
// Bounds: the host checks every tensor against the cache's shape, len_after <= capacity and
// split_len * splits covers no slot at or past capacity that is read (reads stop at len_after);
// n <= MAX_N; part holds rows * splits * (D4 + 1) vec4.

struct DecodeParams {
    batch: u32,
    q_heads: u32,
    kv_heads: u32,
    group: u32,       // q_heads / kv_heads
    n: u32,           // queries (and new tokens) per sequence in this step
    capacity: u32,
    sel_head: u32,
    sel_kv: u32,      // sel_head / group
    scale: f32,
    splits: u32,
    split_len: u32,   // slots per split, a multiple of BC
    rows: u32,        // group * n: query rows per KV head
    n_rblocks: u32,   // ceil(rows / RB)
    ml_base: u32,     // index in part of the first (m, l) entry
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: DecodeParams;
// Per sequence: (len before, position of the first query, queries, len after).
@group(0) @binding(1) var<storage, read> step: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> q: array<vec4<elem>>;       // [B, Hq, n, D]
@group(0) @binding(3) var<storage, read> kc: array<vec4<elem>>;      // [B, Hkv, C, D]
@group(0) @binding(4) var<storage, read> vc: array<vec4<elem>>;      // [B, Hkv, C, D]
@group(0) @binding(5) var<storage, read> gc: array<f32>;             // [B, Hkv, C]
@group(0) @binding(6) var<storage, read> pc: array<u32>;             // [B, C]
@group(0) @binding(7) var<storage, read> tau: array<f32>;            // [B, Hq, n]
@group(0) @binding(8) var<storage, read> alpha: array<f32>;          // [Hq]
@group(0) @binding(9) var<storage, read_write> fs: array<f32>;       // [B, C]
@group(0) @binding(10) var<storage, read_write> fq: array<f32>;      // [B, n, C]
@group(0) @binding(11) var<storage, read_write> part: array<vec4<f32>>;
@group(0) @binding(12) var<storage, read_write> o: array<vec4<elem>>; // [B, Hq, n, D]
@group(0) @binding(13) var<storage, read_write> lse: array<u32>;     // [B, Hq, n], f32 bits

override D: u32 = 8u;
override WG: u32 = 64u;
override RB: u32 = 1u;        // query rows per workgroup
override BC: u32 = 8u;        // slots per tile
override APT: u32 = 1u;       // accumulators per thread: ceil(RB * D4 / WG) <= MAX_APT
override HAS_TAU: bool = false;
override HAS_ALPHA: bool = false;
override HAS_GATE: bool = false;
override SELECTIVE: bool = false;
override WRITE_LSE: bool = false;
override D4: u32 = D / 4u;

const MAX_N: u32 = 8u;
// exp(s - m) for s <= m, computed from halves so that s - m cannot overflow, and clamped where
// the result is 0 in f32 anyway: finite for every finite s and m.
fn exp_shifted(s: f32, m: f32) -> f32 {
    return exp2(max(0.5 * s - 0.5 * m, -128.0) * (2.0 * LOG2E));
}
const MAX_APT: u32 = 16u;

// ---------------------------------------------------------------------------------------------
// score

var<workgroup> qsel: array<vec4<f32>, MAX_N * D4>;

@compute @workgroup_size(WG)
fn score(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let b = wg.y;
    let j = wg.x * WG + tid;
    let st = step[b];
    for (var e = tid; e < p.n * D4; e += WG) {
        let i = e / D4;
        qsel[e] = vec4<f32>(q[((b * p.q_heads + p.sel_head) * p.n + i) * D4 + e % D4]) * p.scale;
    }
    workgroupBarrier();
    if j >= st.w {
        return;
    }
    let pj = pc[b * p.capacity + j];
    var dots: array<f32, MAX_N>;
    for (var i = 0u; i < MAX_N; i++) {
        dots[i] = 0.0;
    }
    let krow = ((b * p.kv_heads + p.sel_kv) * p.capacity + j) * D4;
    for (var x = 0u; x < D4; x++) {
        let kx = vec4<f32>(kc[krow + x]);
        for (var i = 0u; i < p.n; i++) {
            dots[i] += dot(qsel[i * D4 + x], kx);
        }
    }
    var f = fs[b * p.capacity + j];
    for (var i = 0u; i < p.n; i++) {
        fq[(b * p.n + i) * p.capacity + j] = f;
        if i < st.z && selective_counts(pj, st.y + i) {
            f += max(dots[i], 0.0);
        }
    }
    fs[b * p.capacity + j] = f;
}

// ---------------------------------------------------------------------------------------------
// attend

var<workgroup> qs: array<vec4<f32>, RB * D4>;    // query rows, pre-scaled
var<workgroup> kvs: array<vec4<f32>, BC * D4>;   // K tile, then gated V tile
var<workgroup> sp: array<f32, RB * BC>;          // logits, then probabilities
var<workgroup> kpos: array<u32, BC>;
var<workgroup> row_m: array<f32, RB>;
var<workgroup> row_l: array<f32, RB>;
var<workgroup> row_c: array<f32, RB>;

// Row rr of a KV head's block: query head hk * group + rr / n, query rr % n.
fn row_head(hk: u32, rr: u32) -> u32 {
    return hk * p.group + rr / p.n;
}

@compute @workgroup_size(WG)
fn attend(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let s = wg.x;
    let hk = wg.y / p.n_rblocks;
    let rb = wg.y % p.n_rblocks;
    let b = wg.z;
    let st = step[b];
    let j0 = s * p.split_len;
    let j1 = min(j0 + p.split_len, st.w);

    for (var e = tid; e < RB * D4; e += WG) {
        let r = e / D4;
        let rr = rb * RB + r;
        var x = vec4<f32>(0.0);
        if rr < p.rows {
            let h = row_head(hk, rr);
            let i = rr % p.n;
            var t = 1.0;
            if HAS_TAU {
                t = tau[(b * p.q_heads + h) * p.n + i];
            }
            if HAS_ALPHA {
                t = temperature(t, alpha[h], st.y + i);
            }
            // Natural-log domain (not `row_factor_of`): log2 e only on differences from the max.
            x = vec4<f32>(q[((b * p.q_heads + h) * p.n + i) * D4 + e % D4]) * (p.scale * t);
        }
        qs[e] = x;
    }
    for (var r = tid; r < RB; r += WG) {
        row_m[r] = LOWEST;
        row_l[r] = 0.0;
    }
    var acc: array<vec4<f32>, MAX_APT>;
    for (var a = 0u; a < MAX_APT; a++) {
        acc[a] = vec4<f32>(0.0);
    }

    for (var kt = j0; kt < j1; kt += BC) {
        workgroupBarrier();
        for (var e = tid; e < BC * D4; e += WG) {
            let j = kt + e / D4;
            var x = vec4<f32>(0.0);
            if j < j1 {
                x = vec4<f32>(kc[((b * p.kv_heads + hk) * p.capacity + j) * D4 + e % D4]);
            }
            kvs[e] = x;
        }
        for (var c = tid; c < BC; c += WG) {
            let j = kt + c;
            var pj = 0xffffffffu;
            if j < j1 {
                pj = pc[b * p.capacity + j];
            }
            kpos[c] = pj;
        }
        workgroupBarrier();
        // Logits, masked to slots at or before the query's position.
        for (var e = tid; e < RB * BC; e += WG) {
            let r = e / BC;
            let c = e % BC;
            let rr = rb * RB + r;
            let i = rr % p.n;
            let j = kt + c;
            var sv = LOWEST;
            if rr < p.rows && j < j1 && kpos[c] <= st.y + i {
                var d4 = vec4<f32>(0.0);
                for (var x = 0u; x < D4; x++) {
                    d4 += qs[r * D4 + x] * kvs[c * D4 + x];
                }
                sv = d4.x + d4.y + d4.z + d4.w;
                if SELECTIVE {
                    sv -= fq[(b * p.n + i) * p.capacity + j];
                }
            }
            sp[e] = sv;
        }
        workgroupBarrier();
        // Online softmax, one row per thread.
        for (var r = tid; r < RB; r += WG) {
            let rr = rb * RB + r;
            let i = rr % p.n;
            let m_old = row_m[r];
            var mx = m_old;
            for (var c = 0u; c < BC; c++) {
                mx = max(mx, sp[r * BC + c]);
            }
            var sum = 0.0;
            for (var c = 0u; c < BC; c++) {
                let sv = sp[r * BC + c];
                var pr = 0.0;
                if rr < p.rows && kt + c < j1 && kpos[c] <= st.y + i {
                    pr = exp_shifted(sv, mx);
                }
                sp[r * BC + c] = pr;
                sum += pr;
            }
            let corr = exp_shifted(m_old, mx);
            row_c[r] = corr;
            row_m[r] = mx;
            row_l[r] = row_l[r] * corr + sum;
        }
        for (var e = tid; e < BC * D4; e += WG) {
            let j = kt + e / D4;
            var x = vec4<f32>(0.0);
            if j < j1 {
                let hj = (b * p.kv_heads + hk) * p.capacity + j;
                x = vec4<f32>(vc[hj * D4 + e % D4]);
                if HAS_GATE {
                    x *= gc[hj];
                }
            }
            kvs[e] = x;
        }
        workgroupBarrier();
        // O = O * corr + P V; thread owns outputs tid + a * WG of the RB x D4 block.
        for (var a = 0u; a < APT; a++) {
            let e = tid + a * WG;
            if e < RB * D4 {
                let r = e / D4;
                let x = e % D4;
                var v4 = acc[a] * row_c[r];
                for (var c = 0u; c < BC; c++) {
                    v4 += sp[r * BC + c] * kvs[c * D4 + x];
                }
                acc[a] = v4;
            }
        }
    }
    workgroupBarrier();

    // Partials: row index ((b * Hq + h) * n + i) * splits + s.
    for (var a = 0u; a < APT; a++) {
        let e = tid + a * WG;
        let r = e / D4;
        let rr = rb * RB + r;
        if e < RB * D4 && rr < p.rows {
            let h = row_head(hk, rr);
            let idx = ((b * p.q_heads + h) * p.n + rr % p.n) * p.splits + s;
            part[idx * D4 + e % D4] = acc[a];
        }
    }
    for (var r = tid; r < RB; r += WG) {
        let rr = rb * RB + r;
        if rr < p.rows {
            let h = row_head(hk, rr);
            let idx = ((b * p.q_heads + h) * p.n + rr % p.n) * p.splits + s;
            part[p.ml_base + idx] = vec4<f32>(row_m[r], row_l[r], 0.0, 0.0);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// merge

@compute @workgroup_size(WG)
fn merge(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let row = wg.y * (p.q_heads * p.n) + wg.x;   // (b * Hq + h) * n + i
    let first = row * p.splits;
    var mx = LOWEST;
    for (var s = 0u; s < p.splits; s++) {
        mx = max(mx, part[p.ml_base + first + s].x);
    }
    var l = 0.0;
    for (var s = 0u; s < p.splits; s++) {
        // A split with no allowed slot has l = 0 and a zero accumulator.
        let ml = part[p.ml_base + first + s];
        l += ml.y * exp_shifted(ml.x, mx);
    }
    // A row with no allowed slot: zeros and LSE = -inf.
    let inv = inv_or_zero(l);
    for (var x = tid; x < D4; x += WG) {
        var acc = vec4<f32>(0.0);
        for (var s = 0u; s < p.splits; s++) {
            acc += part[(first + s) * D4 + x] * exp_shifted(part[p.ml_base + first + s].x, mx);
        }
        o[row * D4 + x] = vec4<elem>(acc * inv);
    }
    if WRITE_LSE && tid == 0u {
        lse[row] = lse_bits_ln(mx, l);
    }
}
