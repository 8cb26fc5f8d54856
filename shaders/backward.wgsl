// Backward pass (DESIGN.md §1b), scalar path: FlashAttention-2's split, P recomputed from LSE.
// On the cooperative-matrix path (f16 storage, coop_backward.wgsl) coop_dkv, coop_dq, coop_selq
// and coop_selk replace dkv, dq, selq and selk; prep, fscan and finish below serve both paths.
//
// Entry points, in dispatch order (the selective C comes from the forward's colsum and scan
// passes, run with this family's BR):
//   prep    one thread per element: copies LSE, tau, alpha, gate and the valid key counts into the
//           f32 workspace `ws`, and Delta_i = dot(dO_i, O_i).
//   dkv     one workgroup per (key tile, KV head, b), over the query heads of the KV head and every
//           query tile: dK, dV, dgate; with selective masking the column sums of dz over the
//           tile's rows and the group's heads, G[b, hk, I, j] (no float atomics: every element
//           has one writer, sums run in a fixed order).
//   dq      one workgroup per (query tile, head, b), over key tiles: dQ and dt_i = sum_j l_ij dz_ij.
//   fscan   one thread per (key, b): E[b, I, j] = dF_out_j - sum over tiles I' > I of sum_hk G,
//           written over G[b, 0, I, j]; dF0_j = dF_out_j - sum over every tile.
//   selq    one workgroup per (query tile, b): dS tile = E + exclusive in-tile suffix of
//           dF = -sum_h dz^h (recomputed for every head), du = dS [u > 0], dq_sel += scale du k_sel.
//   selk    one workgroup per (key tile, b): the same du tiles, dk_sel += scale du^T q_sel.
//   finish  one thread per element: dtau, dgate, dF0 out of ws; dalpha[h] summed in a fixed order.
// With selective masking the selection head's dq (and its KV head's dk) go to ws first (dqb, dkb)
// and selq (selk) write base + selective term, so nothing is read back from an f16 output.
// Nothing of size Nq x Nk is ever stored; ws holds rows, keys and B * Hkv * ceil(Nq / BR) * Nk
// column sums.
// Bounds: every index is below its binding's length for any Params and Layout that passed host
// validation; kv_len values are clamped to Nk in prep.

struct Layout {
    lse: u32,      // [B, Hq, Nq] LSE (a row with no allowed key holds -1e30, never read)
    delta: u32,    // [B, Hq, Nq] dot(dO, O)
    tau: u32,      // [B, Hq, Nq]
    alpha: u32,    // [Hq]
    gate: u32,     // [B, Hkv, Nk]
    valid: u32,    // [B] min(kv_len, Nk) as f32 (exact: Nk < 2^24 is validated)
    g: u32,        // [B, Hkv, n_qtiles, Nk] column sums of dz; E in the hk = 0 slots after fscan,
                   // the coop path's du chunk in the hk >= 1 slots of each batch after that
    dt: u32,       // [B, Hq, Nq]
    dgate: u32,    // [B, Hkv, Nk]
    df0: u32,      // [B, Nk]
    dqb: u32,      // [B, Nq, D] the selection head's dQ without the selective term
    dkb: u32,      // [B, Nk, D] the selection KV head's dK without the selective term
    flags: u32,    // gradients wanted: 1 dq, 2 dk, 4 dv, 8 dgate, 16 dtau, 32 dalpha, 64 df0, 128 dF_out given
    n_lin: u32,    // elements of the per-element passes (prep, finish)
    row_lo: u32,   // query rows [row_lo, row_hi) of this coop selq / selk chunk (else 0, Nq)
    row_hi: u32,
}

const WANT_DQ: u32 = 1u;
const WANT_DK: u32 = 2u;
const WANT_DV: u32 = 4u;
const WANT_DGATE: u32 = 8u;
const WANT_DTAU: u32 = 16u;
const WANT_DALPHA: u32 = 32u;
const WANT_DF0: u32 = 64u;
const HAS_DFOUT: u32 = 128u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> w: Layout;
@group(0) @binding(2) var<storage, read> q: array<vec4<elem>>;
@group(0) @binding(3) var<storage, read> k: array<vec4<elem>>;
@group(0) @binding(4) var<storage, read> v: array<vec4<elem>>;
@group(0) @binding(5) var<storage, read> dout: array<vec4<elem>>;
@group(0) @binding(6) var<storage, read_write> ws: array<f32>;
@group(0) @binding(7) var<storage, read> fcarry: array<f32>;       // C [B, n_qtiles, Nk]
@group(0) @binding(8) var<storage, read_write> outa: array<vec4<elem>>;   // dQ (dq, selq) or dK (dkv, selk)
@group(0) @binding(9) var<storage, read_write> outb: array<vec4<elem>>;   // dV (dkv)
// prep only
@group(0) @binding(10) var<storage, read> o: array<vec4<elem>>;
@group(0) @binding(11) var<storage, read> lse_in: array<f32>;
@group(0) @binding(12) var<storage, read> tau: array<f32>;
@group(0) @binding(13) var<storage, read> alpha: array<f32>;
@group(0) @binding(14) var<storage, read> gate: array<f32>;
@group(0) @binding(15) var<storage, read> kv_len: array<u32>;
// fscan only
@group(0) @binding(16) var<storage, read> dfout: array<f32>;
// finish only
@group(0) @binding(17) var<storage, read_write> dtau: array<f32>;
@group(0) @binding(18) var<storage, read_write> dalpha: array<f32>;
@group(0) @binding(19) var<storage, read_write> dgate: array<f32>;
@group(0) @binding(20) var<storage, read_write> df0: array<f32>;

override D: u32 = 8u;
override BR: u32 = 1u;          // query rows per tile (also the selective C's tile)
override BC: u32 = 1u;          // keys per tile
override WG: u32 = 64u;         // threads, >= BR and >= BC
override CAUSAL: bool = false;
override HAS_TAU: bool = false;
override HAS_ALPHA: bool = false;
override HAS_GATE: bool = false;
override HAS_KVLEN: bool = false;
override SELECTIVE: bool = false;
override WRITE_LSE: bool = false;   // part of the shared feature set; the backward writes no LSE
override D4: u32 = D / 4u;

override AM: u32 = max(BR, BC);

var<workgroup> qs: array<vec4<f32>, BR * D4>;    // Q tile (raw), or the selection head's
var<workgroup> dos: array<vec4<f32>, BR * D4>;   // dO tile
var<workgroup> ks: array<vec4<f32>, BC * D4>;    // K tile (raw), or the selection KV head's
var<workgroup> vs: array<vec4<f32>, BC * D4>;    // V tile (raw, ungated)
var<workgroup> pt: array<f32, BR * BC>;          // P
var<workgroup> zt: array<f32, BR * BC>;          // dz
var<workgroup> xt: array<f32, BR * BC>;          // P dot(dO, v) (dkv) or l dz (dq)
var<workgroup> ft: array<f32, select(1u, BR * BC, SELECTIVE)>;   // F tile
var<workgroup> st: array<f32, select(1u, BR * BC, SELECTIVE)>;   // sum_h dz, then dS, then du
var<workgroup> rl: array<f32, BR>;               // LSE of the tile's rows
var<workgroup> rd: array<f32, BR>;               // Delta
var<workgroup> rt: array<f32, BR>;               // temperature t_i
var<workgroup> cg: array<f32, BC>;               // gate of the tile's keys
var<workgroup> wu: u32;
// Accumulators in workgroup memory, each element owned by one thread (the loops over
// e = tid + n WG): dK (dkv, selk) or dQ (dq, selq), and dV (dkv).
var<workgroup> acca: array<vec4<f32>, AM * D4>;
var<workgroup> accb: array<vec4<f32>, AM * D4>;

fn hsum(x: vec4<f32>) -> f32 {
    return (x.x + x.y) + (x.z + x.w);
}

fn valid_keys(b: u32) -> u32 {
    if HAS_KVLEN {
        return valid_key_count(u32(ws[w.valid + b]), p.k_len);
    }
    return p.k_len;
}

// The valid key count as a workgroup-uniform value (ws is read-write storage, so a plain load
// is not uniform; loop bounds around barriers must be).
fn uniform_valid(b: u32, tid: u32) -> u32 {
    if tid == 0u {
        wu = valid_keys(b);
    }
    return workgroupUniformLoad(&wu);
}

fn allowed(i: u32, j: u32, valid: u32) -> bool {
    var ok = i < p.q_len && j < valid;
    if CAUSAL {
        ok = ok && j <= p.start + i;
    }
    return ok;
}

// t_i = tau (or 1) + alpha[h] ln(p_i + 1), the shared formula of common.wgsl.
fn row_temperature(b: u32, h: u32, i: u32) -> f32 {
    var t = 1.0;
    if HAS_TAU {
        t = ws[w.tau + (b * p.q_heads + h) * p.q_len + i];
    }
    var a = 0.0;
    if HAS_ALPHA {
        a = ws[w.alpha + h];
    }
    return temperature(t, a, p.start + i);
}

// scale * q_sel_i . k_sel_j straight from global memory (the selection head's raw logit).
fn sel_logit(b: u32, i: u32, j: u32) -> f32 {
    let qi = ((b * p.q_heads + p.sel_head) * p.q_len + i) * D4;
    let kj = ((b * p.kv_heads + p.sel_head / p.group) * p.k_len + j) * D4;
    var a = vec4<f32>(0.0);
    for (var x = 0u; x < D4; x++) {
        a += vec4<f32>(q[qi + x]) * vec4<f32>(k[kj + x]);
    }
    return p.scale * hsum(a);
}

// Whether S_ij of the selection head exists: 0 < j < p_i < valid.
fn sel_live(i: u32, j: u32, valid: u32) -> bool {
    let pos = p.start + i;
    return i < p.q_len && selective_counts(j, pos) && pos < valid;
}

// Rows of query tile qt of head h: LSE, Delta, t; Q (raw) and dO tiles.
fn load_rows(tid: u32, b: u32, h: u32, row0: u32) {
    for (var r = tid; r < BR; r += WG) {
        let i = row0 + r;
        var l = 0.0;
        var d = 0.0;
        var t = 0.0;
        if i < p.q_len {
            let row = (b * p.q_heads + h) * p.q_len + i;
            l = ws[w.lse + row];
            d = ws[w.delta + row];
            t = row_temperature(b, h, i);
        }
        rl[r] = l;
        rd[r] = d;
        rt[r] = t;
    }
    for (var e = tid; e < BR * D4; e += WG) {
        let i = row0 + e / D4;
        var x = vec4<f32>(0.0);
        var y = vec4<f32>(0.0);
        if i < p.q_len {
            let at = ((b * p.q_heads + h) * p.q_len + i) * D4 + e % D4;
            x = vec4<f32>(q[at]);
            y = vec4<f32>(dout[at]);
        }
        qs[e] = x;
        dos[e] = y;
    }
}

// Q rows of the selection head for query tile row0 into qs.
fn load_qsel(tid: u32, b: u32, row0: u32) {
    for (var e = tid; e < BR * D4; e += WG) {
        let i = row0 + e / D4;
        var x = vec4<f32>(0.0);
        if i < p.q_len {
            x = vec4<f32>(q[((b * p.q_heads + p.sel_head) * p.q_len + i) * D4 + e % D4]);
        }
        qs[e] = x;
    }
}

// K tile of KV head hk into ks (and, with `with_v`, the V tile and the gates).
fn load_keys(tid: u32, b: u32, hk: u32, kt: u32, with_v: bool) {
    for (var e = tid; e < BC * D4; e += WG) {
        let j = kt + e / D4;
        var x = vec4<f32>(0.0);
        var y = vec4<f32>(0.0);
        if j < p.k_len {
            let at = ((b * p.kv_heads + hk) * p.k_len + j) * D4 + e % D4;
            x = vec4<f32>(k[at]);
            if with_v {
                y = vec4<f32>(v[at]);
            }
        }
        ks[e] = x;
        if with_v {
            vs[e] = y;
        }
    }
    if with_v {
        for (var c = tid; c < BC; c += WG) {
            let j = kt + c;
            var g = 1.0;
            if HAS_GATE && j < p.k_len {
                g = ws[w.gate + (b * p.kv_heads + hk) * p.k_len + j];
            }
            cg[c] = g;
        }
    }
}

// F tile of (query tile qt, key tile kt): C (earlier tiles and F0) plus the exclusive prefix of
// S over the tile's rows. Starts and ends with a barrier.
fn fill_f(tid: u32, b: u32, qt: u32, kt: u32, valid: u32) {
    workgroupBarrier();
    let row0 = qt * BR;
    for (var e = tid; e < BR * BC; e += WG) {
        let i = row0 + e / BC;
        let j = kt + e % BC;
        var s = 0.0;
        if sel_live(i, j, valid) {
            s = max(sel_logit(b, i, j), 0.0);
        }
        ft[e] = s;
    }
    workgroupBarrier();
    for (var c = tid; c < BC; c += WG) {
        let j = kt + c;
        var run = 0.0;
        if j < p.k_len {
            run = fcarry[(b * p.n_qtiles + qt) * p.k_len + j];
        }
        for (var r = 0u; r < BR; r++) {
            let e = r * BC + c;
            let s = ft[e];
            ft[e] = run;
            run += s;
        }
    }
    workgroupBarrier();
}

// P, dz and (P dot(dO, v) or l dz) of the loaded tiles into pt, zt, xt. Each thread writes the
// elements tid + n WG.
fn dz_tile(tid: u32, row0: u32, kt: u32, valid: u32, want_l: bool) {
    for (var e = tid; e < BR * BC; e += WG) {
        let r = e / BC;
        let c = e % BC;
        var pp = 0.0;
        var dz = 0.0;
        var x = 0.0;
        if allowed(row0 + r, kt + c, valid) {
            var l4 = vec4<f32>(0.0);
            var d4 = vec4<f32>(0.0);
            for (var y = 0u; y < D4; y++) {
                l4 += qs[r * D4 + y] * ks[c * D4 + y];
                d4 += dos[r * D4 + y] * vs[c * D4 + y];
            }
            let l = p.scale * hsum(l4);
            let dov = hsum(d4);
            var z = rt[r] * l;
            if SELECTIVE {
                z -= ft[e];
            }
            pp = exp(z - rl[r]);
            dz = pp * (cg[c] * dov - rd[r]);
            x = select(pp * dov, l * dz, want_l);
        }
        pt[e] = pp;
        zt[e] = dz;
        xt[e] = x;
    }
}

@compute @workgroup_size(64)
fn prep(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = (wg.y * nwg.x + wg.x) * 64u + lid;
    if e < p.batch * p.q_heads * p.q_len {
        ws[w.lse + e] = max(lse_in[e], MASKED);
        var a = vec4<f32>(0.0);
        for (var x = 0u; x < D4; x++) {
            a += vec4<f32>(dout[e * D4 + x]) * vec4<f32>(o[e * D4 + x]);
        }
        ws[w.delta + e] = hsum(a);
        if HAS_TAU {
            ws[w.tau + e] = tau[e];
        }
    }
    if HAS_GATE && e < p.batch * p.kv_heads * p.k_len {
        ws[w.gate + e] = gate[e];
    }
    if HAS_KVLEN && e < p.batch {
        ws[w.valid + e] = f32(valid_key_count(kv_len[e], p.k_len));
    }
    if HAS_ALPHA && e < p.q_heads {
        ws[w.alpha + e] = alpha[e];
    }
}

@compute @workgroup_size(WG)
fn dkv(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let kt = wg.x * BC;
    let hk = wg.y;
    let b = wg.z;
    let valid = uniform_valid(b, tid);
    for (var e = tid; e < BC * D4; e += WG) {
        acca[e] = vec4<f32>(0.0);
        accb[e] = vec4<f32>(0.0);
    }
    var agate = 0.0;   // thread c < BC: dgate of key kt + c
    load_keys(tid, b, hk, kt, true);
    workgroupBarrier();
    for (var qt = 0u; qt < p.n_qtiles; qt++) {
        let row0 = qt * BR;
        var busy = kt < valid;
        if CAUSAL {
            // some row of the tile sits at or after the tile's first key
            busy = busy && p.start + min(row0 + BR, p.q_len) > kt;
        }
        var gcol = 0.0;   // thread c < BC: sum over the group's heads and the tile's rows of dz
        if busy {
            if SELECTIVE {
                fill_f(tid, b, qt, kt, valid);
            }
            for (var h = hk * p.group; h < (hk + 1u) * p.group; h++) {
                workgroupBarrier();
                load_rows(tid, b, h, row0);
                workgroupBarrier();
                dz_tile(tid, row0, kt, valid, false);
                workgroupBarrier();
                for (var e = tid; e < BC * D4; e += WG) {
                    let c = e / D4;
                    let x = e % D4;
                    var gk = vec4<f32>(0.0);
                    var gv = vec4<f32>(0.0);
                    for (var r = 0u; r < BR; r++) {
                        gk += (zt[r * BC + c] * rt[r]) * qs[r * D4 + x];
                        gv += pt[r * BC + c] * dos[r * D4 + x];
                    }
                    acca[e] += gk;
                    accb[e] += gv;
                }
                if tid < BC {
                    var sg = 0.0;
                    var sz = 0.0;
                    for (var r = 0u; r < BR; r++) {
                        sg += xt[r * BC + tid];
                        sz += zt[r * BC + tid];
                    }
                    agate += sg;
                    gcol += sz;
                }
            }
        }
        if SELECTIVE && tid < BC && kt + tid < p.k_len {
            ws[w.g + ((b * p.kv_heads + hk) * p.n_qtiles + qt) * p.k_len + kt + tid] = gcol;
        }
    }
    // dK_j = scale sum t_i dz_ij q_i; the selection KV head's goes to dkb first (selk adds dk_sel).
    let to_base = SELECTIVE && hk == p.sel_head / p.group;
    for (var e = tid; e < BC * D4; e += WG) {
        let c = e / D4;
        let x = e % D4;
        let j = kt + c;
        {
            if j < p.k_len {
                let at = ((b * p.kv_heads + hk) * p.k_len + j) * D4 + x;
                let dk4 = acca[e] * p.scale;
                if (w.flags & WANT_DK) != 0u {
                    if to_base {
                        let base = w.dkb + ((b * p.k_len + j) * D4 + x) * 4u;
                        ws[base] = dk4.x;
                        ws[base + 1u] = dk4.y;
                        ws[base + 2u] = dk4.z;
                        ws[base + 3u] = dk4.w;
                    } else {
                        outa[at] = vec4<elem>(dk4);
                    }
                }
                if (w.flags & WANT_DV) != 0u {
                    outb[at] = vec4<elem>(accb[e] * cg[c]);
                }
            }
        }
    }
    if (w.flags & WANT_DGATE) != 0u && tid < BC && kt + tid < p.k_len {
        ws[w.dgate + (b * p.kv_heads + hk) * p.k_len + kt + tid] = agate;
    }
}

@compute @workgroup_size(WG)
fn dq(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let qt = wg.x;
    let h = wg.y;
    let b = wg.z;
    let hk = h / p.group;
    let row0 = qt * BR;
    let valid = uniform_valid(b, tid);
    for (var e = tid; e < BR * D4; e += WG) {
        acca[e] = vec4<f32>(0.0);
    }
    var adt = 0.0;   // thread r < BR: dt of row row0 + r
    load_rows(tid, b, h, row0);
    var kend = valid;
    if CAUSAL {
        kend = min(kend, p.start + min(row0 + BR, p.q_len));
    }
    for (var kt = 0u; kt < kend; kt += BC) {
        if SELECTIVE {
            fill_f(tid, b, qt, kt, valid);
        }
        workgroupBarrier();
        load_keys(tid, b, hk, kt, true);
        workgroupBarrier();
        dz_tile(tid, row0, kt, valid, true);
        workgroupBarrier();
        for (var e = tid; e < BR * D4; e += WG) {
            let r = e / D4;
            let x = e % D4;
            var g = vec4<f32>(0.0);
            for (var c = 0u; c < BC; c++) {
                g += zt[r * BC + c] * ks[c * D4 + x];
            }
            acca[e] += g;
        }
        if tid < BR {
            for (var c = 0u; c < BC; c++) {
                adt += xt[tid * BC + c];
            }
        }
    }
    workgroupBarrier();
    // dq_i = scale t_i sum_j dz_ij k_j; the selection head's goes to dqb first (selq adds dq_sel).
    let to_base = SELECTIVE && h == p.sel_head;
    if (w.flags & WANT_DQ) != 0u {
        for (var e = tid; e < BR * D4; e += WG) {
            {
                let r = e / D4;
                let x = e % D4;
                let i = row0 + r;
                if i < p.q_len {
                    let dq4 = acca[e] * (p.scale * rt[r]);
                    if to_base {
                        let base = w.dqb + ((b * p.q_len + i) * D4 + x) * 4u;
                        ws[base] = dq4.x;
                        ws[base + 1u] = dq4.y;
                        ws[base + 2u] = dq4.z;
                        ws[base + 3u] = dq4.w;
                    } else {
                        outa[((b * p.q_heads + h) * p.q_len + i) * D4 + x] = vec4<elem>(dq4);
                    }
                }
            }
        }
    }
    if tid < BR && row0 + tid < p.q_len {
        ws[w.dt + (b * p.q_heads + h) * p.q_len + row0 + tid] = adt;
    }
}

@compute @workgroup_size(64)
fn fscan(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    let b = gid.y;
    if j >= p.k_len {
        return;
    }
    var run = 0.0;
    if (w.flags & HAS_DFOUT) != 0u {
        run = dfout[b * p.k_len + j];
    }
    for (var t = p.n_qtiles; t > 0u; t--) {
        let qt = t - 1u;
        var tot = 0.0;
        for (var hk = 0u; hk < p.kv_heads; hk++) {
            tot += ws[w.g + ((b * p.kv_heads + hk) * p.n_qtiles + qt) * p.k_len + j];
        }
        ws[w.g + (b * p.kv_heads * p.n_qtiles + qt) * p.k_len + j] = run;
        run -= tot;
    }
    ws[w.df0 + b * p.k_len + j] = run;
}

// du of (query tile qt, key tile kt) into st: dF = -sum_h dz^h recomputed head by head, dS = E +
// exclusive suffix of dF down each column, du = dS where the selection head's S is live and
// positive. Starts and ends with a barrier.
fn du_tile(tid: u32, b: u32, qt: u32, kt: u32, valid: u32) {
    let row0 = qt * BR;
    fill_f(tid, b, qt, kt, valid);
    for (var e = tid; e < BR * BC; e += WG) {
        st[e] = 0.0;
    }
    for (var h = 0u; h < p.q_heads; h++) {
        workgroupBarrier();
        load_rows(tid, b, h, row0);
        load_keys(tid, b, h / p.group, kt, true);
        workgroupBarrier();
        dz_tile(tid, row0, kt, valid, false);
        // each thread adds the elements it wrote
        for (var e = tid; e < BR * BC; e += WG) {
            st[e] += zt[e];
        }
    }
    workgroupBarrier();
    for (var c = tid; c < BC; c += WG) {
        let j = kt + c;
        var run = 0.0;
        if j < p.k_len {
            run = ws[w.g + (b * p.kv_heads * p.n_qtiles + qt) * p.k_len + j];
        }
        for (var r = BR; r > 0u; r--) {
            let e = (r - 1u) * BC + c;
            let df = -st[e];
            st[e] = run;
            run += df;
        }
    }
    workgroupBarrier();
    for (var e = tid; e < BR * BC; e += WG) {
        let i = row0 + e / BC;
        let j = kt + e % BC;
        var du = 0.0;
        if sel_live(i, j, valid) && sel_logit(b, i, j) > 0.0 {
            du = st[e];
        }
        st[e] = du;
    }
    workgroupBarrier();
}

@compute @workgroup_size(WG)
fn selq(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let qt = wg.x;
    let b = wg.z;
    let row0 = qt * BR;
    let valid = uniform_valid(b, tid);
    for (var e = tid; e < BR * D4; e += WG) {
        acca[e] = vec4<f32>(0.0);
    }
    // S_kj lives for j < p_k only.
    let kend = min(valid, p.start + min(row0 + BR, p.q_len));
    for (var kt = 0u; kt < kend; kt += BC) {
        du_tile(tid, b, qt, kt, valid);
        load_keys(tid, b, p.sel_head / p.group, kt, false);
        workgroupBarrier();
        for (var e = tid; e < BR * D4; e += WG) {
            let r = e / D4;
            let x = e % D4;
            var g = vec4<f32>(0.0);
            for (var c = 0u; c < BC; c++) {
                g += st[r * BC + c] * ks[c * D4 + x];
            }
            acca[e] += g;
        }
    }
    for (var e = tid; e < BR * D4; e += WG) {
        {
            let i = row0 + e / D4;
            let x = e % D4;
            if i < p.q_len {
                let base = w.dqb + ((b * p.q_len + i) * D4 + x) * 4u;
                let q4 = vec4<f32>(ws[base], ws[base + 1u], ws[base + 2u], ws[base + 3u]);
                outa[((b * p.q_heads + p.sel_head) * p.q_len + i) * D4 + x] = vec4<elem>(q4 + acca[e] * p.scale);
            }
        }
    }
}

@compute @workgroup_size(WG)
fn selk(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let kt = wg.x * BC;
    let b = wg.z;
    let valid = uniform_valid(b, tid);
    for (var e = tid; e < BC * D4; e += WG) {
        acca[e] = vec4<f32>(0.0);
    }
    for (var qt = 0u; qt < p.n_qtiles; qt++) {
        let row0 = qt * BR;
        // some row of the tile sits after the tile's first key
        if kt < valid && p.start + min(row0 + BR, p.q_len) > kt + 1u {
            du_tile(tid, b, qt, kt, valid);
            load_qsel(tid, b, row0);
            workgroupBarrier();
            for (var e = tid; e < BC * D4; e += WG) {
                let c = e / D4;
                let x = e % D4;
                var g = vec4<f32>(0.0);
                for (var r = 0u; r < BR; r++) {
                    g += st[r * BC + c] * qs[r * D4 + x];
                }
                acca[e] += g;
            }
        }
    }
    for (var e = tid; e < BC * D4; e += WG) {
        {
            let j = kt + e / D4;
            let x = e % D4;
            if j < p.k_len {
                let base = w.dkb + ((b * p.k_len + j) * D4 + x) * 4u;
                let k4 = vec4<f32>(ws[base], ws[base + 1u], ws[base + 2u], ws[base + 3u]);
                outa[((b * p.kv_heads + p.sel_head / p.group) * p.k_len + j) * D4 + x] = vec4<elem>(k4 + acca[e] * p.scale);
            }
        }
    }
}

@compute @workgroup_size(64)
fn finish(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = (wg.y * nwg.x + wg.x) * 64u + lid;
    if (w.flags & WANT_DTAU) != 0u && e < p.batch * p.q_heads * p.q_len {
        dtau[e] = ws[w.dt + e];
    }
    if (w.flags & WANT_DGATE) != 0u && e < p.batch * p.kv_heads * p.k_len {
        dgate[e] = ws[w.dgate + e];
    }
    if (w.flags & WANT_DF0) != 0u && e < p.batch * p.k_len {
        df0[e] = ws[w.df0 + e];
    }
    if (w.flags & WANT_DALPHA) != 0u && e < p.q_heads {
        // dalpha[h] = sum_b sum_i ln(p_i + 1) dt_i, in a fixed order.
        var s = 0.0;
        for (var b = 0u; b < p.batch; b++) {
            for (var i = 0u; i < p.q_len; i++) {
                s += log(f32(p.start + i + 1u)) * ws[w.dt + (b * p.q_heads + e) * p.q_len + i];
            }
        }
        dalpha[e] = s;
    }
}
