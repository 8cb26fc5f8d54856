// Fused attention forward (prefill), scalar path: one workgroup per (query tile, query head, batch).
//
// Register-tiled FlashAttention-2. The workgroup is a TY x TX grid of threads; thread (ty, tx)
// owns the TM = 4 query rows r_m = ty + m * TY (m < 4) of the tile, and
//   * in S = Q K^T the 4 keys c_n = tx + n * TX (n < 4), its 4 x 4 logits kept in registers
//     (s_m, one vec4 per row, component n = key c_n), accumulated over D from workgroup memory
//     with every Q vec4 reused for 4 keys and every K vec4 for 4 rows;
//   * in O += P V the D columns (as vec4) x = tx + dn * TX (dn < DN), 4 x DN vec4 accumulators in
//     registers, every V vec4 reused for 4 rows.
// Row max and row sum of a key tile are reduced across the TX threads of a row through
// workgroup memory (no subgroup operations: the path must run on every adapter), so every
// thread of a row holds the same running max m and sum l in registers.
// Per key tile of BC keys: S (Q pre-scaled by scale * t_i), optional selective term
// subtracted, online softmax (log2 e applied only to differences from the row max, so a logit
// near the f32 limit stays finite), O = O * corr + P (gate * V). Three barriers per
// key tile (six with selective masking, whose K tile passes through the same workgroup buffer
// first). Never an Nq x Nk matrix.
// Bounds: every global index below is < the element count of its binding for any Params that
// passed host validation; kv_len values are clamped to k_len here, so a bad kv_len cannot read
// out of bounds. Workgroup indices are bounded by the loop limits noted at each access.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<elem>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<elem>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<elem>>;
@group(0) @binding(4) var<storage, read> tau: array<f32>;
@group(0) @binding(5) var<storage, read> alpha: array<f32>;
@group(0) @binding(6) var<storage, read> gate: array<f32>;
@group(0) @binding(7) var<storage, read> kv_len: array<u32>;
@group(0) @binding(8) var<storage, read> fcarry: array<f32>;   // C [B, n_qtiles, Nk]
@group(0) @binding(9) var<storage, read_write> o: array<vec4<elem>>;
@group(0) @binding(10) var<storage, read_write> lse: array<u32>;   // f32 bits (see lse_bits)

override D: u32;              // head dim, multiple of 8
override BR: u32;             // query rows per workgroup = 4 * TY
override BC: u32;             // keys per tile = 4 * TX
override DN: u32;             // vec4 output columns per thread; TX * DN >= D / 4, DN <= MAX_DN
override CAUSAL: bool = false;
override HAS_TAU: bool = false;
override HAS_ALPHA: bool = false;
override HAS_GATE: bool = false;
override HAS_KVLEN: bool = false;
override SELECTIVE: bool = false;
override WRITE_LSE: bool = false;

override D4: u32 = D / 4u;
override TX: u32 = BC / 4u;   // threads along keys / output columns
override TY: u32 = BR / 4u;   // threads along rows
override WG: u32 = TX * TY;
override D4P: u32 = TX * DN;  // vec4 columns of the K/V tile rows (>= D4; the rest is zero)
override KS: u32 = D4P + 1u;  // K/V tile row stride in vec4: +1 so the TX strided keys hit distinct banks
override PS: u32 = BC + 1u;   // P tile row stride: +1 so the TY rows of a subgroup hit distinct banks

const MAX_DN: u32 = 16u;
// exp(s - m) for s <= m, computed from halves so that s - m cannot overflow, and clamped where
// the result is 0 in f32 anyway: finite for every finite s and m.
fn exp_shifted(s: vec4<f32>, m: vec4<f32>) -> vec4<f32> {
    return exp2(max(0.5 * s - 0.5 * m, vec4<f32>(-128.0)) * (2.0 * LOG2E));
}

var<workgroup> qs: array<vec4<f32>, BR * D4>;     // Q tile, scaled
var<workgroup> kvs: array<vec4<f32>, BC * KS>;    // K tile, then gated V tile
var<workgroup> sp: array<f32, BR * PS>;           // selective F, then probabilities
var<workgroup> redm: array<f32, BR * TX>;         // partial row maxima
var<workgroup> redl: array<f32, BR * TX>;         // partial row sums
// Selective masking: the selection head's Q tile (scaled); its K tile goes through kvs.
var<workgroup> qsel: array<vec4<f32>, select(1u, BR * D4, SELECTIVE)>;

fn valid_keys(b: u32) -> u32 {
    if HAS_KVLEN {
        return valid_key_count(kv_len[b], p.k_len);
    }
    return p.k_len;
}

// scale * t_i, t_i = tau (or 1) + alpha[h] * ln(p_i + 1).
fn row_factor(b: u32, h: u32, i: u32) -> f32 {
    var t = 1.0;
    if HAS_TAU {
        t = (tau[(b * p.q_heads + h) * p.q_len + i]);
    }
    if HAS_ALPHA {
        t = temperature(t, alpha[h], p.start + i);
    }
    // Natural-log domain (log2 e not folded into the row factor): log2 e is applied only
    // to differences from the row max, so logits near the f32 limit stay finite.
    return p.scale * t;
}

// Dot products of one (scaled) query vec4 with the same vec4 of the thread's 4 keys.
fn dot4(a: vec4<f32>, k0: vec4<f32>, k1: vec4<f32>, k2: vec4<f32>, k3: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(dot(a, k0), dot(a, k1), dot(a, k2), dot(a, k3));
}

// Allowed keys of query row i among keys j4.
fn allowed(i: u32, j4: vec4<u32>, valid: u32) -> vec4<bool> {
    var ok = (j4 < vec4<u32>(valid)) & vec4<bool>(i < p.q_len);
    if CAUSAL {
        ok = ok & (j4 <= vec4<u32>(p.start + i));
    }
    return ok;
}

// S_ij of the selection head for row i and keys j4 (0 outside 0 < j < p_i, p_i < valid).
fn sel_row(s: vec4<f32>, i: u32, j4: vec4<u32>, valid: u32) -> vec4<f32> {
    let pos = p.start + i;
    let ok = selective_counts4(j4, pos) & vec4<bool>(i < p.q_len && pos < valid);
    return select(vec4<f32>(0.0), max(s, vec4<f32>(0.0)), ok);
}

// Row r of the P tile at the thread's 4 keys.
fn sp_row(r: u32, tx: u32) -> vec4<f32> {
    let e = r * PS + tx;   // r < BR, tx + 3 TX < BC: < BR * PS
    return vec4<f32>(sp[e], sp[e + TX], sp[e + 2u * TX], sp[e + 3u * TX]);
}

fn sp_store(r: u32, tx: u32, x: vec4<f32>) {
    let e = r * PS + tx;
    sp[e] = x.x;
    sp[e + TX] = x.y;
    sp[e + 2u * TX] = x.z;
    sp[e + 3u * TX] = x.w;
}

fn hmax(x: vec4<f32>) -> f32 {
    return max(max(x.x, x.y), max(x.z, x.w));
}

fn hsum(x: vec4<f32>) -> f32 {
    return (x.x + x.y) + (x.z + x.w);
}

// Max over the TX partial maxima of row r, and the running max m.
fn row_max(r: u32, m: f32) -> f32 {
    var mx = m;
    for (var t = 0u; t < TX; t++) {
        mx = max(mx, redm[r * TX + t]);   // r < BR, t < TX
    }
    return mx;
}

fn row_sum(r: u32) -> f32 {
    var s = 0.0;
    for (var t = 0u; t < TX; t++) {
        s += redl[r * TX + t];
    }
    return s;
}

// K tile of KV head row `kvh` (= b * kv_heads + head) for keys kt..kt + BC into kvs; keys at or
// past kend and columns past D4 are zero.
fn load_k(tid: u32, kvh: u32, kt: u32, kend: u32) {
    for (var e = tid; e < BC * D4P; e += WG) {
        let c = e / D4P;
        let x = e % D4P;
        let j = kt + c;
        var kx = vec4<f32>(0.0);
        if j < kend && x < D4 {
            kx = vec4<f32>(k[(kvh * p.k_len + j) * D4 + x]);   // kend <= k_len
        }
        kvs[c * KS + x] = kx;   // c < BC, x < D4P < KS
    }
}

// The thread's 4 x 4 logits from the Q tile (or the selection head's) and the K tile in kvs.
fn tile_logits(from_sel: bool, r0: u32, r1: u32, r2: u32, r3: u32, c4: vec4<u32>) -> array<vec4<f32>, 4> {
    var s0 = vec4<f32>(0.0);
    var s1 = vec4<f32>(0.0);
    var s2 = vec4<f32>(0.0);
    var s3 = vec4<f32>(0.0);
    if from_sel {
        // Only reached with SELECTIVE, where qsel holds BR * D4 entries.
        for (var x = 0u; x < D4; x++) {
            let k0 = kvs[c4.x * KS + x];
            let k1 = kvs[c4.y * KS + x];
            let k2 = kvs[c4.z * KS + x];
            let k3 = kvs[c4.w * KS + x];
            s0 += dot4(qsel[r0 * D4 + x], k0, k1, k2, k3);
            s1 += dot4(qsel[r1 * D4 + x], k0, k1, k2, k3);
            s2 += dot4(qsel[r2 * D4 + x], k0, k1, k2, k3);
            s3 += dot4(qsel[r3 * D4 + x], k0, k1, k2, k3);
        }
    } else {
        for (var x = 0u; x < D4; x++) {
            let k0 = kvs[c4.x * KS + x];
            let k1 = kvs[c4.y * KS + x];
            let k2 = kvs[c4.z * KS + x];
            let k3 = kvs[c4.w * KS + x];
            s0 += dot4(qs[r0 * D4 + x], k0, k1, k2, k3);
            s1 += dot4(qs[r1 * D4 + x], k0, k1, k2, k3);
            s2 += dot4(qs[r2 * D4 + x], k0, k1, k2, k3);
            s3 += dot4(qs[r3 * D4 + x], k0, k1, k2, k3);
        }
    }
    return array<vec4<f32>, 4>(s0, s1, s2, s3);
}

@compute @workgroup_size(WG)
fn forward(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let qt = wg.x;
    let h = wg.y;
    let b = wg.z;
    let hk = h / p.group;
    let row0 = qt * BR;
    let valid = valid_keys(b);
    let sel = p.sel_head;
    let sel_kv = sel / p.group;

    // 1. Q tile, pre-scaled; rows past Nq are zero and masked below.
    for (var e = tid; e < BR * D4; e += WG) {
        let r = e / D4;
        let i = row0 + r;
        var x = vec4<f32>(0.0);
        var xs = vec4<f32>(0.0);
        if i < p.q_len {
            x = vec4<f32>(q[((b * p.q_heads + h) * p.q_len + i) * D4 + e % D4]) * row_factor(b, h, i);
            if SELECTIVE {
                xs = vec4<f32>(q[((b * p.q_heads + sel) * p.q_len + i) * D4 + e % D4]) * p.scale;
            }
        }
        qs[e] = x;
        if SELECTIVE {
            qsel[e] = xs;
        }
    }

    let tx = tid % TX;
    let ty = tid / TX;       // < TY
    let r0 = ty;             // the thread's rows r0 < r1 < r2 < r3 < BR
    let r1 = ty + TY;
    let r2 = ty + 2u * TY;
    let r3 = ty + 3u * TY;
    let i4 = vec4<u32>(row0) + vec4<u32>(r0, r1, r2, r3);
    let c4 = vec4<u32>(tx, tx + TX, tx + 2u * TX, tx + 3u * TX);   // the thread's keys, < BC

    var m_run = vec4<f32>(LOWEST);   // running max per row (component m = row r_m)
    var l_run = vec4<f32>(0.0);
    var a0: array<vec4<f32>, MAX_DN>;
    var a1: array<vec4<f32>, MAX_DN>;
    var a2: array<vec4<f32>, MAX_DN>;
    var a3: array<vec4<f32>, MAX_DN>;
    for (var dn = 0u; dn < DN; dn++) {
        a0[dn] = vec4<f32>(0.0);
        a1[dn] = vec4<f32>(0.0);
        a2[dn] = vec4<f32>(0.0);
        a3[dn] = vec4<f32>(0.0);
    }

    // Keys that any row of this tile may see.
    var kend = valid;
    if CAUSAL {
        kend = min(kend, p.start + min(row0 + BR, p.q_len));
    }

    for (var kt = 0u; kt < kend; kt += BC) {
        workgroupBarrier();
        // 2. Selective: the selection head's S tile into sp, turned per column into
        // F = C (earlier tiles, F0 included) + exclusive prefix over this tile's rows, kept in
        // registers (f_m) while the K tile replaces the selection head's.
        var f0 = vec4<f32>(0.0);
        var f1 = vec4<f32>(0.0);
        var f2 = vec4<f32>(0.0);
        var f3 = vec4<f32>(0.0);
        let j4 = vec4<u32>(kt) + c4;
        if SELECTIVE {
            load_k(tid, b * p.kv_heads + sel_kv, kt, kend);
            workgroupBarrier();
            let t = tile_logits(true, r0, r1, r2, r3, c4);
            sp_store(r0, tx, sel_row(t[0], i4.x, j4, valid));
            sp_store(r1, tx, sel_row(t[1], i4.y, j4, valid));
            sp_store(r2, tx, sel_row(t[2], i4.z, j4, valid));
            sp_store(r3, tx, sel_row(t[3], i4.w, j4, valid));
            workgroupBarrier();
            for (var c = tid; c < BC; c += WG) {
                let j = kt + c;
                var run = 0.0;
                if j < p.k_len {
                    run = fcarry[(b * p.sel_rows + qt) * p.k_len + j];
                }
                for (var r = 0u; r < BR; r++) {
                    let e = r * PS + c;   // < BR * PS
                    let t = sp[e];
                    sp[e] = run;
                    run += t;
                }
            }
            workgroupBarrier();
            // sp is next written with P after the barrier that follows step 4.
            f0 = sp_row(r0, tx);
            f1 = sp_row(r1, tx);
            f2 = sp_row(r2, tx);
            f3 = sp_row(r3, tx);
        }
        // 3. K tile; every read of the previous content of kvs came before a barrier above.
        load_k(tid, b * p.kv_heads + hk, kt, kend);
        workgroupBarrier();
        // 4. Logits, 4 rows x 4 keys per thread, masked, selective F subtracted.
        let s = tile_logits(false, r0, r1, r2, r3, c4);
        let ok0 = allowed(i4.x, j4, valid);
        let ok1 = allowed(i4.y, j4, valid);
        let ok2 = allowed(i4.z, j4, valid);
        let ok3 = allowed(i4.w, j4, valid);
        let low = vec4<f32>(LOWEST);
        var s0 = select(low, s[0], ok0);
        var s1 = select(low, s[1], ok1);
        var s2 = select(low, s[2], ok2);
        var s3 = select(low, s[3], ok3);
        if SELECTIVE {
            s0 = select(low, s0 - f0, ok0);
            s1 = select(low, s1 - f1, ok1);
            s2 = select(low, s2 - f2, ok2);
            s3 = select(low, s3 - f3, ok3);
        }
        // 5. Online softmax: partial maxima, reduced over the TX threads of each row.
        redm[r0 * TX + tx] = hmax(s0);
        redm[r1 * TX + tx] = hmax(s1);
        redm[r2 * TX + tx] = hmax(s2);
        redm[r3 * TX + tx] = hmax(s3);
        workgroupBarrier();
        // V tile (gated) over the K tile, which no thread reads any more.
        for (var e = tid; e < BC * D4P; e += WG) {
            let c = e / D4P;
            let x = e % D4P;
            let j = kt + c;
            var vx = vec4<f32>(0.0);
            if j < kend && x < D4 {
                let hj = (b * p.kv_heads + hk) * p.k_len + j;
                vx = vec4<f32>(v[hj * D4 + x]);
                if HAS_GATE {
                    vx *= gate[hj];
                }
            }
            kvs[c * KS + x] = vx;
        }
        let mx = vec4<f32>(row_max(r0, m_run.x), row_max(r1, m_run.y), row_max(r2, m_run.z), row_max(r3, m_run.w));
        // Masked keys give exactly 0; while nothing was allowed yet, m stays LOWEST.
        let p0 = select(vec4<f32>(0.0), exp_shifted(s0, vec4<f32>(mx.x)), ok0);
        let p1 = select(vec4<f32>(0.0), exp_shifted(s1, vec4<f32>(mx.y)), ok1);
        let p2 = select(vec4<f32>(0.0), exp_shifted(s2, vec4<f32>(mx.z)), ok2);
        let p3 = select(vec4<f32>(0.0), exp_shifted(s3, vec4<f32>(mx.w)), ok3);
        sp_store(r0, tx, p0);
        sp_store(r1, tx, p1);
        sp_store(r2, tx, p2);
        sp_store(r3, tx, p3);
        redl[r0 * TX + tx] = hsum(p0);
        redl[r1 * TX + tx] = hsum(p1);
        redl[r2 * TX + tx] = hsum(p2);
        redl[r3 * TX + tx] = hsum(p3);
        let corr = exp_shifted(m_run, mx);
        m_run = mx;
        workgroupBarrier();
        l_run = l_run * corr + vec4<f32>(row_sum(r0), row_sum(r1), row_sum(r2), row_sum(r3));
        // 6. O = O * corr + P V.
        for (var dn = 0u; dn < DN; dn++) {
            a0[dn] *= corr.x;
            a1[dn] *= corr.y;
            a2[dn] *= corr.z;
            a3[dn] *= corr.w;
        }
        for (var c = 0u; c < BC; c++) {
            let pr = vec4<f32>(sp[r0 * PS + c], sp[r1 * PS + c], sp[r2 * PS + c], sp[r3 * PS + c]);
            for (var dn = 0u; dn < DN; dn++) {
                let vx = kvs[c * KS + tx + dn * TX];   // tx + dn * TX < D4P < KS
                a0[dn] += pr.x * vx;
                a1[dn] += pr.y * vx;
                a2[dn] += pr.z * vx;
                a3[dn] += pr.w * vx;
            }
        }
    }

    // 7. Normalise and store; rows with no allowed key give zeros and LSE = -inf.
    let inv = vec4<f32>(inv_or_zero(l_run.x), inv_or_zero(l_run.y), inv_or_zero(l_run.z), inv_or_zero(l_run.w));
    for (var dn = 0u; dn < DN; dn++) {
        let x = tx + dn * TX;
        if x < D4 {
            let hb = (b * p.q_heads + h) * p.q_len;
            if i4.x < p.q_len {
                o[(hb + i4.x) * D4 + x] = vec4<elem>(a0[dn] * inv.x);
            }
            if i4.y < p.q_len {
                o[(hb + i4.y) * D4 + x] = vec4<elem>(a1[dn] * inv.y);
            }
            if i4.z < p.q_len {
                o[(hb + i4.z) * D4 + x] = vec4<elem>(a2[dn] * inv.z);
            }
            if i4.w < p.q_len {
                o[(hb + i4.w) * D4 + x] = vec4<elem>(a3[dn] * inv.w);
            }
        }
    }
    if WRITE_LSE && tx == 0u {
        let hb = (b * p.q_heads + h) * p.q_len;
        for (var m = 0u; m < 4u; m++) {
            if i4[m] < p.q_len {
                lse[hb + i4[m]] = lse_bits_ln(m_run[m], l_run[m]);
            }
        }
    }
}
