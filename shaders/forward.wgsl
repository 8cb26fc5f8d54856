// Fused attention forward (prefill), scalar path: one workgroup per (query tile, query head, batch).
//
// Per key tile of BC keys: S = Q K^T (Q pre-scaled by scale * t_i * log2 e), optional selective
// term subtracted, online softmax in the exp2 domain, O += P (gate * V). Never an Nq x Nk matrix.
// Bounds: every global index below is < the element count of its binding for any Params that
// passed host validation; kv_len values are clamped to k_len here, so a bad kv_len cannot read
// out of bounds.

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
@group(0) @binding(10) var<storage, read_write> lse: array<f32>;

override D: u32;              // head dim, multiple of 8
override BR: u32;             // query rows per workgroup
override BC: u32;             // keys per tile
override TR: u32;             // threads along rows; BR % TR == 0
override CAUSAL: bool = false;
override HAS_TAU: bool = false;
override HAS_ALPHA: bool = false;
override HAS_GATE: bool = false;
override HAS_KVLEN: bool = false;
override SELECTIVE: bool = false;
override WRITE_LSE: bool = false;

override D4: u32 = D / 4u;
override TD: u32 = D / 8u;    // threads along D, each owning 8 output columns
override WG: u32 = TR * TD;
override RPT: u32 = BR / TR;  // rows per thread in the P V product, at most MAX_RPT

const MAX_RPT: u32 = 8u;

var<workgroup> qs: array<vec4<f32>, BR * D4>;     // Q tile, scaled
var<workgroup> kvs: array<vec4<f32>, BC * D4>;    // K tile, then gated V tile
var<workgroup> sp: array<f32, BR * BC>;           // logits, then probabilities
var<workgroup> row_m: array<f32, BR>;
var<workgroup> row_l: array<f32, BR>;
var<workgroup> row_c: array<f32, BR>;
// Selective masking: the selection head's Q and K tiles and its S tile (all scaled by log2 e).
var<workgroup> qsel: array<vec4<f32>, select(1u, BR * D4, SELECTIVE)>;
var<workgroup> ksel: array<vec4<f32>, select(1u, BC * D4, SELECTIVE)>;
var<workgroup> ssel: array<f32, select(1u, BR * BC, SELECTIVE)>;

fn valid_keys(b: u32) -> u32 {
    if HAS_KVLEN {
        return min(kv_len[b], p.k_len);
    }
    return p.k_len;
}

// scale * t_i * log2(e), t_i = tau (or 1) + alpha[h] * ln(p_i + 1).
fn row_factor(b: u32, h: u32, i: u32) -> f32 {
    var t = 1.0;
    if HAS_TAU {
        t = (tau[(b * p.q_heads + h) * p.q_len + i]);
    }
    if HAS_ALPHA {
        t += alpha[h] * log(f32(p.start + i + 1u));
    }
    return p.scale * t * LOG2E;
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
                xs = vec4<f32>(q[((b * p.q_heads + sel) * p.q_len + i) * D4 + e % D4]) * (p.scale * LOG2E);
            }
        }
        qs[e] = x;
        if SELECTIVE {
            qsel[e] = xs;
        }
    }
    for (var r = tid; r < BR; r += WG) {
        row_m[r] = MASKED;
        row_l[r] = 0.0;
    }

    let td = tid % TD;
    let tr = tid / TD;
    var acc: array<vec4<f32>, 16>;   // 2 * MAX_RPT
    for (var a = 0u; a < 2u * MAX_RPT; a++) {
        acc[a] = vec4<f32>(0.0);
    }

    // Keys that any row of this tile may see.
    var kend = valid;
    if CAUSAL {
        kend = min(kend, p.start + min(row0 + BR, p.q_len));
    }

    for (var kt = 0u; kt < kend; kt += BC) {
        workgroupBarrier();
        // 2. K tile (and the selection head's K tile).
        for (var e = tid; e < BC * D4; e += WG) {
            let j = kt + e / D4;
            var x = vec4<f32>(0.0);
            var xs = vec4<f32>(0.0);
            if j < kend {
                x = vec4<f32>(k[((b * p.kv_heads + hk) * p.k_len + j) * D4 + e % D4]);
                if SELECTIVE {
                    xs = vec4<f32>(k[((b * p.kv_heads + sel_kv) * p.k_len + j) * D4 + e % D4]);
                }
            }
            kvs[e] = x;
            if SELECTIVE {
                ksel[e] = xs;
            }
        }
        workgroupBarrier();
        // 3. Logits (log2 domain), masked; the selection head's S tile.
        for (var e = tid; e < BR * BC; e += WG) {
            let r = e / BC;
            let c = e % BC;
            let i = row0 + r;
            let j = kt + c;
            let pos = p.start + i;
            var ok = i < p.q_len && j < valid;
            if CAUSAL {
                ok = ok && j <= pos;
            }
            var s = MASKED;
            if ok {
                var d4 = vec4<f32>(0.0);
                for (var x = 0u; x < D4; x++) {
                    d4 += qs[r * D4 + x] * kvs[c * D4 + x];
                }
                s = d4.x + d4.y + d4.z + d4.w;
            }
            sp[e] = s;
            if SELECTIVE {
                var t = 0.0;
                // S_kj for 0 < j < p_k, rows inside the valid prefix only.
                if i < p.q_len && j > 0u && j < pos && pos < valid {
                    var d4 = vec4<f32>(0.0);
                    for (var x = 0u; x < D4; x++) {
                        d4 += qsel[r * D4 + x] * ksel[c * D4 + x];
                    }
                    t = max(d4.x + d4.y + d4.z + d4.w, 0.0);
                }
                ssel[e] = t;
            }
        }
        workgroupBarrier();
        // 4. Selective: subtract F = C (earlier tiles, F0 included) + exclusive prefix in this tile.
        if SELECTIVE {
            for (var c = tid; c < BC; c += WG) {
                let j = kt + c;
                var run = 0.0;
                if j < p.k_len {
                    run = fcarry[(b * p.n_qtiles + qt) * p.k_len + j] * LOG2E;
                }
                for (var r = 0u; r < BR; r++) {
                    let e = r * BC + c;
                    if sp[e] > MASKED_HALF {
                        sp[e] -= run;
                    }
                    run += ssel[e];
                }
            }
            workgroupBarrier();
        }
        // 5. Online softmax, one row per thread; V tile (gated) loaded meanwhile.
        for (var r = tid; r < BR; r += WG) {
            let m_old = row_m[r];
            var mx = m_old;
            for (var c = 0u; c < BC; c++) {
                mx = max(mx, sp[r * BC + c]);
            }
            var sum = 0.0;
            for (var c = 0u; c < BC; c++) {
                let s = sp[r * BC + c];
                var pr = 0.0;
                if s > MASKED_HALF {
                    pr = exp2(s - mx);
                }
                sp[r * BC + c] = pr;
                sum += pr;
            }
            // When nothing was allowed yet, m stays MASKED and the accumulators are zero.
            let corr = select(1.0, exp2(m_old - mx), m_old > MASKED_HALF);
            row_c[r] = corr;
            row_m[r] = mx;
            row_l[r] = row_l[r] * corr + sum;
        }
        for (var e = tid; e < BC * D4; e += WG) {
            let j = kt + e / D4;
            var x = vec4<f32>(0.0);
            if j < kend {
                let hj = (b * p.kv_heads + hk) * p.k_len + j;
                x = vec4<f32>(v[hj * D4 + e % D4]);
                if HAS_GATE {
                    x *= gate[hj];
                }
            }
            kvs[e] = x;
        }
        workgroupBarrier();
        // 6. O = O * corr + P V, 8 columns by RPT rows per thread.
        for (var rr = 0u; rr < RPT; rr++) {
            let r = tr + rr * TR;
            let corr = row_c[r];
            var a0 = acc[2u * rr] * corr;
            var a1 = acc[2u * rr + 1u] * corr;
            for (var c = 0u; c < BC; c++) {
                let pr = sp[r * BC + c];
                a0 += pr * kvs[c * D4 + 2u * td];
                a1 += pr * kvs[c * D4 + 2u * td + 1u];
            }
            acc[2u * rr] = a0;
            acc[2u * rr + 1u] = a1;
        }
    }
    workgroupBarrier();

    // 7. Normalise and store; rows with no allowed key give zeros and LSE = -inf.
    for (var rr = 0u; rr < RPT; rr++) {
        let r = tr + rr * TR;
        let i = row0 + r;
        if i < p.q_len {
            let l = row_l[r];
            let inv = select(0.0, 1.0 / l, l > 0.0);
            let base = ((b * p.q_heads + h) * p.q_len + i) * D4 + 2u * td;
            o[base] = vec4<elem>(acc[2u * rr] * inv);
            o[base + 1u] = vec4<elem>(acc[2u * rr + 1u] * inv);
        }
    }
    if WRITE_LSE {
        for (var r = tid; r < BR; r += WG) {
            let i = row0 + r;
            if i < p.q_len {
                let l = row_l[r];
                lse[(b * p.q_heads + h) * p.q_len + i] = select(neg_inf(), (row_m[r] + log2(l)) * LN2, l > 0.0);
            }
        }
    }
}
