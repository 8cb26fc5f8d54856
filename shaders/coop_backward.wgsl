// Backward pass on cooperative matrices (tensor cores): f16 storage, 16x16x16 f16 -> f32 MMAs.
// FlashAttention-2's split, P recomputed from the forward's LSE (DESIGN.md §1b). Two entry
// points replace the scalar `dkv` and `dq` of `backward.wgsl`; the scalar prep, fscan, selq,
// selk and finish run around them on the same workspace (`struct Layout`, the same text as in
// backward.wgsl, checked by tests/params.rs).
//
//   coop_dkv  one workgroup per (64 keys, KV head, b); subgroup sg owns keys 16 sg .. 16 sg + 15,
//             holding their K, V (and the selection KV head's K) fragments and the dK, dV
//             accumulators in registers. For every query head of the group and every query tile
//             of BT rows (staged in workgroup memory: Q, dO, and the selection head's Q), in
//             chunks of 16 rows: S^T = K Q^T, dP^T = V dO^T (and S_sel^T) by MMA, stored;
//             P^T = exp(t l - F - LSE), dz^T = P^T (g dP^T - Delta) elementwise; dV += P^T dO and
//             dK += (t dz)^T Q by MMA. dgate and the selective column sums G of dz come from the
//             stored tiles, one lane per key, in a fixed order.
//   coop_dq   one workgroup per (64 query rows, head, b); subgroup sg owns rows 16 sg .. 16 sg + 15
//             with Q, dO (and the selection head's Q) fragments and the dQ accumulator in
//             registers; key tiles of BT keys staged (K, V, selection K), in chunks of 16 keys:
//             S, dP (and S_sel) by MMA, dz elementwise, dt_i = sum l dz, dQ += dz K by MMA.
//
// Selective terms: coop_selq (per 64 query rows) and coop_selk (per 64 keys) each sum dz over every
// head; with the du scratch (plan du_rows > 0) coop_selq also writes du of a chunk of query rows
// (override DU) and coop_selk_du reads it, one pair of dispatches per chunk (Layout row_lo/row_hi).
// The split du path (plan du_split, the default with the du scratch) replaces coop_selq by
// coop_seldu (du per (64 rows, key tile): key tiles in parallel) and coop_selq_du (dq_sel from
// the scratch), three dispatches per chunk with coop_selk_du. Forms behind overrides (each with a
// SELATTN_BACKWARD_* knob): EWQ (quads in the elementwise passes), FQ (F in that pass), SDQ and
// RQ (coop_seldu: Q and dO staged in one round; per-lane state in registers).
//
// Selective masking: F = C (the forward's colsum and scan passes, query tiles of CT rows, CT
// dividing 16) + the exclusive prefix of relu(S_sel) over the rows of the C tile, recomputed
// here by MMA; one lane per key walks the 16 rows of a chunk. Logits stay in natural-log units
// (exp of differences only), as in the forward. Deterministic: every element has one writer and
// every sum a fixed order; no atomics.
// Bounds: global reads are guarded by q_len / k_len checks during staging; cooperative loads and
// stores touch workgroup memory only, at offsets below the arrays' override-sized lengths.
// Fragments per head dim are unrolled by the Rust generator (the `{{...}}` markers).

struct Layout {
    lse: u32,
    delta: u32,
    tau: u32,
    alpha: u32,
    gate: u32,
    valid: u32,
    g: u32,
    dt: u32,
    dgate: u32,
    df0: u32,
    dqb: u32,
    dkb: u32,
    flags: u32,
    n_lin: u32,
    row_lo: u32,
    row_hi: u32,
}

const WANT_DQ: u32 = 1u;
const WANT_DK: u32 = 2u;
const WANT_DV: u32 = 4u;
const WANT_DGATE: u32 = 8u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> w: Layout;
@group(0) @binding(2) var<storage, read> q: array<vec4<u32>>;      // f16 x 8
@group(0) @binding(3) var<storage, read> k: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read> v: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read> dout: array<vec4<u32>>;
@group(0) @binding(6) var<storage, read_write> ws: array<f32>;
@group(0) @binding(7) var<storage, read> fcarry: array<f32>;       // C [B, n_qtiles, Nk]
@group(0) @binding(8) var<storage, read_write> outa: array<vec4<u32>>;   // dK (dkv) or dQ (dq)
@group(0) @binding(9) var<storage, read_write> outb: array<vec4<u32>>;   // dV (dkv)

override D: u32 = 64u;
override BT: u32 = 64u;        // rows (dkv: queries, dq: keys) staged per step, multiple of 16
override CT: u32 = 16u;        // query rows per selective C tile, divides 16
override SGS: u32 = 32u;       // the adapter's fixed subgroup size
override CAUSAL: bool = false;
override HAS_TAU: bool = false;
override HAS_ALPHA: bool = false;
override HAS_GATE: bool = false;
override HAS_KVLEN: bool = false;
override SELECTIVE: bool = false;
override WRITE_LSE: bool = false;   // part of the shared feature set; unused here
override SELPASS: bool = false;     // the pipeline is coop_selq, coop_selk or coop_selk_du
override ISDKV: bool = false;
override PREFETCH: bool = false;    // C (and G) of a 16-row C tile loaded before the chunk's MMAs       // the pipeline is coop_dkv (the only user of pa16)
override DU: bool = false;          // coop_selq also writes du to the scratch coop_selk_du reads
// EWQ: the elementwise P/dz passes of coop_dkv, coop_dq and coop_seldu take four adjacent
// elements of a row per lane and step (vec4 math, masks by select, fixed trip count), and the
// row sums (dgate, dt, G with 16-row C tiles) by two subgroup shuffles instead of a serial walk
// by 16 lanes; the older single-element form stays behind it (SELATTN_BACKWARD_QUADS=0).
override EWQ: bool = false;
// SDQ (coop_seldu only, where workgroup memory allows): a head's Q and dO staged in one round
// (2 KB rows; za16, unused there, shrunk to make room) instead of one after the other, two
// workgroup barriers and one staging latency less per head (SELATTN_BACKWARD_SDQ=0: two rounds).
override SDQ: bool = false;
// FQ (with EWQ and 16-row C tiles): coop_dkv and coop_dq compute F in the quad pass (relu of
// the lane's four S_sel, a prefix over the quad lanes by subgroup shuffles) instead of a serial
// 16-step walk by 16 lanes and a barrier (SELATTN_BACKWARD_FQ=0: the walk).
override FQ: bool = false;
// RQ (coop_seldu with EWQ and 16-row C tiles): F, the mask and the head sums of dz of the lane's
// quads live in registers (acc and fb not declared), S_sel goes through sa; the workgroup memory
// saved lets the planner take 64-key tiles with SDQ at D64 and D128 (SELATTN_BACKWARD_RQ=0: off).
override RQ: bool = false;
// DUP (coop_selq_du and coop_selk_du only): the key (selq_du) or row (selk_du) walk pipelined:
// a whole tile's du (64 x BT, as f16 in du16) and K_sel / Q_sel staged by every lane in one
// round, the next tile's global loads issued into registers before this tile's MMAs; two
// workgroup barriers a tile instead of 1 + 2 NB, and 16-lane serial du loads gone. acc, fb and
// za16 are not declared and the stage holds BT rows, so 64-row tiles fit at D64 and D128
// (SELATTN_BACKWARD_DUP=1 turns it on; off by default until measured on a device).
override DUP: bool = false;
override DUS: u32 = BT + 8u;        // DUP: padded f16 row stride of du16
// PIPE (coop_dq and coop_dkv): the next tile's staged rows (dq: K, V, K_sel and gates; dkv: Q,
// dO, Q_sel, LSE, Delta and temperature of the next (head, query tile)) loaded into registers
// before this tile's MMAs, stored into the staging buffer after the next barrier (one staging
// latency a tile hidden; SELATTN_BACKWARD_PIPE=1 turns it on; off by default until measured).
override PIPE: bool = false;
override PKN: u32 = min(DPK, (BT * D8 + WG - 1u) / WG);    // PIPE: words a lane stages per tensor
const DPK: u32 = 8u;                // DUP: staged 16-byte words of K_sel / Q_sel per lane at most
const DPD: u32 = 32u;               // DUP: du values per lane at most
override DPKN: u32 = min(DPK, (BT * D8 + WG - 1u) / WG);   // DUP: words a lane stages
override DPDN: u32 = min(DPD, (KB * BT + WG - 1u) / WG);   // DUP: du values a lane stages
const RQN: u32 = 16u;               // register quads per lane at most: 4 chunks x QPL
const QPL: u32 = 4u;                // quads per lane at most (64 quads, subgroups of 16 or more)

const SG: u32 = 4u;                 // subgroups per workgroup
const KB: u32 = 64u;                // 16 x SG: keys (dkv) or query rows (dq) per workgroup
const SP: u32 = 20u;                // padded f32 row stride of a 16x16 block
const PP: u32 = 24u;                // padded f16 row stride of a 16x16 block
const FS: u32 = 16u;                // f32 row stride of the acc / fb blocks (unpadded: memory)
override WG: u32 = SG * SGS;
override D8: u32 = D / 8u;
override DP: u32 = D + 8u;          // padded f16 row stride of staged rows (bank conflicts)
override NT: u32 = select(2u, 3u, SELECTIVE);   // tensors staged per step
override NST: u32 = max(NT * BT, KB);           // staged rows
override RW: u32 = max(BT, KB);
override NB: u32 = BT / 16u;        // 16-row (or 16-key) chunks per staged tile
override NSTS: u32 = select(max(2u * BT, select(KB, 2u * KB, SDQ)), max(BT, KB), DUP) * DP;   // staged f16 of coop_selq / coop_selk / coop_seldu (DUP: K_sel or Q_sel only)

// Every workgroup variable is a multiple of 16 bytes (see coop_forward.wgsl: NVIDIA's driver
// misaligns cooperative loads otherwise).
var<workgroup> stage: array<f16, select(NST * DP, NSTS, SELPASS)>;
var<workgroup> sa: array<f32, SG * 16u * SP>;                        // S (or S^T), then l dz / P dP
var<workgroup> sb: array<f32, SG * 16u * SP>;                        // dP (or dP^T), then dz
var<workgroup> sf: array<f32, select(4u, SG * 16u * SP, SELECTIVE && !SELPASS)>;  // S_sel, then F
var<workgroup> pa16: array<f16, select(8u, SG * 16u * PP, ISDKV)>;  // P^T (dkv only)
// coop_selq / coop_selk: per subgroup and chunk, sum over heads of dz, and F.
var<workgroup> acc: array<f32, select(4u, NB * SG * 16u * FS, SELPASS && !RQ && !DUP)>;
var<workgroup> fb: array<f32, select(4u, NB * SG * 16u * FS, SELPASS && !RQ && !DUP)>;
var<workgroup> za16: array<f16, select(SG * 16u * PP, 8u, SDQ || RQ || DUP)>;                      // (t dz)^T (dkv), dz (dq), du (selq, selk)
var<workgroup> du16: array<f16, select(8u, KB * DUS, DUP)>;          // DUP: a tile's du (or du^T)
var<workgroup> rl: array<f32, RW>;                                   // LSE of staged rows
var<workgroup> rd: array<f32, RW>;                                   // Delta
var<workgroup> rt: array<f32, RW>;                                   // temperature
var<workgroup> cg: array<f32, RW>;                                   // gates of keys
var<workgroup> wu: array<u32, 4>;

fn valid_keys(b: u32) -> u32 {
    if HAS_KVLEN {
        return valid_key_count(u32(ws[w.valid + b]), p.k_len);
    }
    return p.k_len;
}

fn uniform_valid(b: u32, tid: u32) -> u32 {
    if tid == 0u {
        wu[0] = valid_keys(b);
    }
    return workgroupUniformLoad(&wu[0]);
}

fn allowed(i: u32, j: u32, valid: u32) -> bool {
    var ok = i < p.q_len && j < valid;
    if CAUSAL {
        ok = ok && j <= p.start + i;
    }
    return ok;
}

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

fn sel_live(i: u32, j: u32, valid: u32) -> bool {
    let pos = p.start + i;
    return i < p.q_len && selective_counts(j, pos) && pos < valid;
}

// Stores 8 f16 (one 16-byte global word) at stage[at..at+8].
fn put8(at: u32, x: vec4<u32>) {
    let a = unpack2x16float(x.x);
    let b = unpack2x16float(x.y);
    let c = unpack2x16float(x.z);
    let d = unpack2x16float(x.w);
    stage[at] = f16(a.x);
    stage[at + 1u] = f16(a.y);
    stage[at + 2u] = f16(b.x);
    stage[at + 3u] = f16(b.y);
    stage[at + 4u] = f16(c.x);
    stage[at + 5u] = f16(c.y);
    stage[at + 6u] = f16(d.x);
    stage[at + 7u] = f16(d.y);
}

fn sa8(at: u32, m: f32) -> array<f32, 8> {
    return array<f32, 8>(sa[at] * m, sa[at + 1u] * m, sa[at + 2u] * m, sa[at + 3u] * m,
        sa[at + 4u] * m, sa[at + 5u] * m, sa[at + 6u] * m, sa[at + 7u] * m);
}

fn sb8(at: u32, m: f32) -> array<f32, 8> {
    return array<f32, 8>(sb[at] * m, sb[at + 1u] * m, sb[at + 2u] * m, sb[at + 3u] * m,
        sb[at + 4u] * m, sb[at + 5u] * m, sb[at + 6u] * m, sb[at + 7u] * m);
}

fn pack8(x: array<f32, 8>) -> vec4<u32> {
    return vec4<u32>(pack2x16float(vec2<f32>(x[0], x[1])), pack2x16float(vec2<f32>(x[2], x[3])),
        pack2x16float(vec2<f32>(x[4], x[5])), pack2x16float(vec2<f32>(x[6], x[7])));
}

fn sa4(at: u32) -> vec4<f32> {
    return vec4<f32>(sa[at], sa[at + 1u], sa[at + 2u], sa[at + 3u]);
}

fn sb4(at: u32) -> vec4<f32> {
    return vec4<f32>(sb[at], sb[at + 1u], sb[at + 2u], sb[at + 3u]);
}

fn sf4(at: u32) -> vec4<f32> {
    return vec4<f32>(sf[at], sf[at + 1u], sf[at + 2u], sf[at + 3u]);
}

fn pa4(at: u32, x: vec4<f32>) {
    pa16[at] = f16(x.x);
    pa16[at + 1u] = f16(x.y);
    pa16[at + 2u] = f16(x.z);
    pa16[at + 3u] = f16(x.w);
}

fn za4(at: u32, x: vec4<f32>) {
    za16[at] = f16(x.x);
    za16[at + 1u] = f16(x.y);
    za16[at + 2u] = f16(x.z);
    za16[at + 3u] = f16(x.w);
}

// Sum of a row's 16 elements held as quads by four adjacent lanes (lane % 4 = quad); every one
// of the four lanes gets the same bits (a + b = b + a), in a fixed order.
fn quad_sum(x: vec4<f32>) -> f32 {
    var s = (x.x + x.y) + (x.z + x.w);
    s += subgroupShuffleXor(s, 1u);
    s += subgroupShuffleXor(s, 2u);
    return s;
}

// The sum of `x` over the lanes of this lane's group of four (lane & ~3) that come before it,
// in lane order.
fn quad_prefix(lane: u32, x: f32) -> f32 {
    let qb = lane & ~3u;
    let m = lane % 4u;
    let t0 = subgroupShuffle(x, qb);
    let t1 = subgroupShuffle(x, qb + 1u);
    let t2 = subgroupShuffle(x, qb + 2u);
    return (select(0.0, t0, m > 0u) + select(0.0, t1, m > 1u)) + select(0.0, t2, m > 2u);
}

// Whether query row i may see keys j4 (the four of a quad).
fn allowed4(i: u32, j4: vec4<u32>, valid: u32) -> vec4<bool> {
    var ok = j4 < vec4<u32>(valid);
    if CAUSAL {
        ok = ok & (j4 <= vec4<u32>(p.start + i));
    }
    return select(vec4<bool>(false), ok, i < p.q_len);
}

// Whether query rows i4 (the four of a quad) may see key j.
fn allowed4t(i4: vec4<u32>, j: u32, valid: u32) -> vec4<bool> {
    var ok = i4 < vec4<u32>(p.q_len);
    if CAUSAL {
        ok = ok & (vec4<u32>(j) <= vec4<u32>(p.start) + i4);
    }
    return select(vec4<bool>(false), ok, j < valid);
}

fn ws8(at: u32, x: array<f32, 8>) {
    for (var n = 0u; n < 8u; n++) {
        ws[at + n] = x[n];
    }
}

// PIPE, coop_dkv: Q, dO (and Q_sel) rows [row0, row0 + BT) of head h (zero past q_len) into
// registers; returns LSE, Delta and the temperature of row row0 + tid.
fn pipe_dkv_load(b: u32, h: u32, row0: u32, tid: u32,
    pq: ptr<function, array<vec4<u32>, DPK>>, po: ptr<function, array<vec4<u32>, DPK>>,
    ps: ptr<function, array<vec4<u32>, DPK>>) -> vec3<f32> {
    for (var n = 0u; n < PKN; n++) {
        let e = tid + n * WG;
        let i = row0 + e / D8;
        var xq = vec4<u32>(0u);
        var xo = vec4<u32>(0u);
        var xs = vec4<u32>(0u);
        if e < BT * D8 && i < p.q_len {
            let at = ((b * p.q_heads + h) * p.q_len + i) * D8 + e % D8;
            xq = q[at];
            xo = dout[at];
            if SELECTIVE {
                xs = q[((b * p.q_heads + p.sel_head) * p.q_len + i) * D8 + e % D8];
            }
        }
        (*pq)[n] = xq;
        (*po)[n] = xo;
        (*ps)[n] = xs;
    }
    var x = vec3<f32>(0.0);
    let i = row0 + tid;
    if tid < BT && i < p.q_len {
        let row = (b * p.q_heads + h) * p.q_len + i;
        x = vec3<f32>(ws[w.lse + row], ws[w.delta + row], row_temperature(b, h, i));
    }
    return x;
}

@compute @workgroup_size(WG)
fn coop_dkv(
    @builtin(local_invocation_index) tid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(subgroup_id) sg: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let kt = wg.x * KB;
    let hk = wg.y;
    let b = wg.z;
    let valid = uniform_valid(b, tid);
    let sel = p.sel_head;
    let sel_kv = sel / p.group;
    let kb0 = sg * 16u;            // this subgroup's first key in the tile
    let bo = sg * 16u * SP;        // its f32 blocks
    let bp = sg * 16u * PP;        // its f16 blocks
    let jl = kt + kb0 + lane;      // lane < 16: the key this lane sums for
    // G rows of this workgroup's keys start at zero; the chunks add to them (same invocation).
    // (EWQ with 16-row C tiles: the lanes that add, one per quad row.)
    if SELECTIVE && EWQ && CT == 16u {
        for (var k = 0u; k < 64u / SGS; k++) {
            let qd = lane + k * SGS;
            let j = kt + kb0 + qd / 4u;
            if qd % 4u == 0u && j < p.k_len {
                for (var t = 0u; t < p.n_qtiles; t++) {
                    ws[w.g + ((b * p.kv_heads + hk) * p.n_qtiles + t) * p.k_len + j] = 0.0;
                }
            }
        }
    } else if SELECTIVE && lane < 16u && jl < p.k_len {
        for (var t = 0u; t < p.n_qtiles; t++) {
            ws[w.g + ((b * p.kv_heads + hk) * p.n_qtiles + t) * p.k_len + jl] = 0.0;
        }
    }
    for (var c = tid; c < KB; c += WG) {
        let j = kt + c;
        var g = 1.0;
        if HAS_GATE && j < p.k_len {
            g = ws[w.gate + (b * p.kv_heads + hk) * p.k_len + j];
        }
        cg[c] = g;
    }
    var agate = 0.0;
    var agq = array<f32, QPL>(0.0, 0.0, 0.0, 0.0);   // EWQ: dgate of the lane's quads' keys

    // K, V (and the selection KV head's K) fragments, staged one tensor at a time.
{{KDECL}}
    for (var kp = 0u; kp < NT; kp++) {
        workgroupBarrier();
        for (var e = tid; e < KB * D8; e += WG) {
            let j = kt + e / D8;
            var x = vec4<u32>(0u);
            if j < p.k_len {
                if kp == 1u {
                    x = v[((b * p.kv_heads + hk) * p.k_len + j) * D8 + e % D8];
                } else {
                    let hh = select(hk, sel_kv, kp == 2u);
                    x = k[((b * p.kv_heads + hh) * p.k_len + j) * D8 + e % D8];
                }
            }
            put8((e / D8) * DP + (e % D8) * 8u, x);
        }
        workgroupBarrier();
        let koff = kb0 * DP;
        if kp == 0u {
{{KLOAD}}
        } else if kp == 1u {
{{VLOAD}}
        } else {
{{KSLOAD}}
        }
    }
{{ACCDECL}}

    let live = kt < valid;
    // PIPE: the first query tile not skipped below (the causal skip holds for a prefix), its
    // loads in registers before the walk.
    var rfirst = 0u;
    var pq: array<vec4<u32>, DPK>;
    var po: array<vec4<u32>, DPK>;
    var ps: array<vec4<u32>, DPK>;
    var prow = vec3<f32>(0.0);
    if PIPE && live {
        if CAUSAL {
            while rfirst < p.q_len && p.start + min(rfirst + BT, p.q_len) <= kt {
                rfirst += BT;
            }
        }
        if rfirst < p.q_len {
            prow = pipe_dkv_load(b, hk * p.group, rfirst, tid, &pq, &po, &ps);
        }
    }
    for (var h = hk * p.group; h < (hk + 1u) * p.group; h++) {
        if !live {
            break;
        }
        for (var row0 = 0u; row0 < p.q_len; row0 += BT) {
            // Causal: skip query tiles whose every row sits before the tile's first key.
            if CAUSAL && p.start + min(row0 + BT, p.q_len) <= kt {
                continue;
            }
            workgroupBarrier();
            if PIPE {
                for (var n = 0u; n < PKN; n++) {
                    let e = tid + n * WG;
                    if e < BT * D8 {
                        let r = e / D8;
                        let c8 = e % D8;
                        put8(r * DP + c8 * 8u, pq[n]);
                        put8((BT + r) * DP + c8 * 8u, po[n]);
                        if SELECTIVE {
                            put8((2u * BT + r) * DP + c8 * 8u, ps[n]);
                        }
                    }
                }
                if tid < BT {
                    rl[tid] = prow.x;
                    rd[tid] = prow.y;
                    rt[tid] = prow.z;
                }
                workgroupBarrier();
                // The next (head, query tile)'s loads in flight during this tile's chunks.
                var nr = row0 + BT;
                var nh = h;
                if nr >= p.q_len {
                    nr = rfirst;
                    nh = h + 1u;
                }
                if nh < (hk + 1u) * p.group {
                    prow = pipe_dkv_load(b, nh, nr, tid, &pq, &po, &ps);
                }
            }
            for (var e = select(tid, BT * D8, PIPE); e < BT * D8; e += WG) {
                let r = e / D8;
                let i = row0 + r;
                let c8 = e % D8;
                var xq = vec4<u32>(0u);
                var xo = vec4<u32>(0u);
                var xs = vec4<u32>(0u);
                if i < p.q_len {
                    let at = ((b * p.q_heads + h) * p.q_len + i) * D8 + c8;
                    xq = q[at];
                    xo = dout[at];
                    if SELECTIVE {
                        xs = q[((b * p.q_heads + sel) * p.q_len + i) * D8 + c8];
                    }
                }
                put8(r * DP + c8 * 8u, xq);
                put8((BT + r) * DP + c8 * 8u, xo);
                if SELECTIVE {
                    put8((2u * BT + r) * DP + c8 * 8u, xs);
                }
            }
            for (var r = select(tid, BT, PIPE); r < BT; r += WG) {
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
            // The staged tile is read by every subgroup; the chunks below hand only each
            // subgroup's own blocks between its lanes.
            if !PIPE {
                workgroupBarrier();
            }
            for (var c0 = 0u; c0 < BT; c0 += 16u) {
                let i0 = row0 + c0;
                if i0 >= p.q_len {
                    break;
                }
                if CAUSAL && p.start + min(i0 + 16u, p.q_len) <= kt {
                    continue;
                }
                // PREFETCH (C tiles of 16 rows): this chunk's C and G values of the lane's key,
                // loaded before the MMAs so their global latency overlaps them.
                var fc = 0.0;
                var gp = 0.0;
                if PREFETCH && SELECTIVE && CT == 16u && lane < 16u && jl < p.k_len && !(FQ && EWQ) {
                    fc = fcarry[(b * p.n_qtiles + i0 / CT) * p.k_len + jl];
                    if !EWQ {
                        gp = ws[w.g + ((b * p.kv_heads + hk) * p.n_qtiles + i0 / CT) * p.k_len + jl];
                    }
                }
                // PREFETCH with EWQ: G of each quad's key (for the quad's sum added below).
                var gq = array<f32, QPL>(0.0, 0.0, 0.0, 0.0);
                if PREFETCH && SELECTIVE && EWQ && CT == 16u {
                    for (var k = 0u; k < 64u / SGS; k++) {
                        let qd = lane + k * SGS;
                        let j = kt + kb0 + qd / 4u;
                        if qd % 4u == 0u && j < p.k_len {
                            gq[k] = ws[w.g + ((b * p.kv_heads + hk) * p.n_qtiles + i0 / CT) * p.k_len + j];
                        }
                    }
                }
                // FQ: C of each quad's key, loaded before the MMAs.
                var fcq = array<f32, QPL>(0.0, 0.0, 0.0, 0.0);
                if SELECTIVE && FQ && EWQ && CT == 16u {
                    for (var k = 0u; k < 64u / SGS; k++) {
                        let j = kt + kb0 + (lane + k * SGS) / 4u;
                        if j < p.k_len {
                            fcq[k] = fcarry[(b * p.n_qtiles + i0 / CT) * p.k_len + j];
                        }
                    }
                }
                {{SGBAR}};
                let qo = c0 * DP;
                let oo = (BT + c0) * DP;
                let so = (2u * BT + c0) * DP;
{{DKV_S}}
                {{SGBAR}};
                // Selective: F^T in place of S_sel^T; lane r walks key r's 16 rows.
                if SELECTIVE && !(FQ && EWQ && CT == 16u) {
                    if lane < 16u {
                        var run = 0.0;
                        for (var r = 0u; r < 16u; r++) {
                            let i = i0 + r;
                            if r % CT == 0u {
                                run = 0.0;
                                if jl < p.k_len && i < p.q_len {
                                    if PREFETCH && CT == 16u {
                                        run = fc;
                                    } else {
                                        run = fcarry[(b * p.n_qtiles + i / CT) * p.k_len + jl];
                                    }
                                }
                            }
                            let e = bo + lane * SP + r;
                            let s = sf[e];
                            sf[e] = run;
                            if sel_live(i, jl, valid) {
                                run += max(p.scale * s, 0.0);
                            }
                        }
                    }
                    {{SGBAR}};
                }
                // P^T, dz^T: element (key r, row c).
                if EWQ {
                    for (var k = 0u; k < 64u / SGS; k++) {
                        let qd = lane + k * SGS;
                        let r = qd / 4u;
                        let c = (qd % 4u) * 4u;
                        let e = bo + r * SP + c;
                        let cc = c0 + c;
                        let ok = allowed4t(vec4<u32>(i0 + c) + vec4<u32>(0u, 1u, 2u, 3u), kt + kb0 + r, valid);
                        let tv = vec4<f32>(rt[cc], rt[cc + 1u], rt[cc + 2u], rt[cc + 3u]);
                        let lv = vec4<f32>(rl[cc], rl[cc + 1u], rl[cc + 2u], rl[cc + 3u]);
                        let dv = vec4<f32>(rd[cc], rd[cc + 1u], rd[cc + 2u], rd[cc + 3u]);
                        let dov = sb4(e);
                        var z = tv * (p.scale * sa4(e));
                        if SELECTIVE && FQ && CT == 16u {
                            // F of key r at the quad's rows: C + the exclusive prefix of the
                            // live relu(scale S_sel) down the chunk's 16 rows.
                            let i4 = vec4<u32>(i0 + c) + vec4<u32>(0u, 1u, 2u, 3u);
                            let j = kt + kb0 + r;
                            let pos4 = vec4<u32>(p.start) + i4;
                            let live = select(vec4<bool>(false), (i4 < vec4<u32>(p.q_len))
                                & (vec4<u32>(j) < pos4) & (pos4 < vec4<u32>(valid)), j > 0u);
                            let u = select(vec4<f32>(0.0), max(p.scale * sf4(e), vec4<f32>(0.0)), live);
                            z -= fcq[k] + (quad_prefix(lane, (u.x + u.y) + (u.z + u.w))
                                + vec4<f32>(0.0, u.x, u.x + u.y, (u.x + u.y) + u.z));
                        } else if SELECTIVE {
                            z -= sf4(e);
                        }
                        let pp = select(vec4<f32>(0.0), exp(z - lv), ok);
                        let dz = pp * (cg[kb0 + r] * dov - dv);
                        pa4(bp + r * PP + c, pp);
                        za4(bp + r * PP + c, dz * tv);
                        agq[k] += quad_sum(pp * dov);
                        if SELECTIVE {
                            if CT == 16u {
                                // G of key r over this chunk (one C tile): the quad's sum.
                                let zs = quad_sum(dz);
                                let j = kt + kb0 + r;
                                if c == 0u && j < p.k_len {
                                    let at = w.g + ((b * p.kv_heads + hk) * p.n_qtiles + i0 / CT) * p.k_len + j;
                                    if PREFETCH {
                                        ws[at] = gq[k] + zs;
                                    } else {
                                        ws[at] += zs;
                                    }
                                }
                            } else {
                                sb[e] = dz.x;
                                sb[e + 1u] = dz.y;
                                sb[e + 2u] = dz.z;
                                sb[e + 3u] = dz.w;
                            }
                        }
                    }
                    {{SGBAR}};
                    if SELECTIVE && CT != 16u && lane < 16u && jl < p.k_len {
                        for (var t0 = 0u; t0 < 16u; t0 += CT) {
                            if i0 + t0 < p.q_len {
                                var z = 0.0;
                                for (var c = t0; c < t0 + CT; c++) {
                                    z += sb[bo + lane * SP + c];
                                }
                                let at = w.g + ((b * p.kv_heads + hk) * p.n_qtiles + (i0 + t0) / CT) * p.k_len + jl;
                                ws[at] += z;
                            }
                        }
                    }
                    let pa = coopLoadT<coop_mat16x16<f16, A>>(&pa16[bp], PP);
                    let za = coopLoadT<coop_mat16x16<f16, A>>(&za16[bp], PP);
{{DKV_ACC}}
                    continue;
                }
                for (var x = lane; x < 256u; x += SGS) {
                    let r = x / 16u;
                    let c = x % 16u;
                    let e = bo + r * SP + c;
                    var pp = 0.0;
                    var dz = 0.0;
                    var xg = 0.0;
                    if allowed(i0 + c, kt + kb0 + r, valid) {
                        let l = p.scale * sa[e];
                        let dov = sb[e];
                        var z = rt[c0 + c] * l;
                        if SELECTIVE {
                            z -= sf[e];
                        }
                        pp = exp(z - rl[c0 + c]);
                        dz = pp * (cg[kb0 + r] * dov - rd[c0 + c]);
                        xg = pp * dov;
                    }
                    pa16[bp + r * PP + c] = f16(pp);
                    za16[bp + r * PP + c] = f16(dz * rt[c0 + c]);
                    sa[e] = xg;
                    sb[e] = dz;
                }
                {{SGBAR}};
                if lane < 16u {
                    var s = 0.0;
                    for (var c = 0u; c < 16u; c++) {
                        s += sa[bo + lane * SP + c];
                    }
                    agate += s;
                    if SELECTIVE && jl < p.k_len {
                        for (var t0 = 0u; t0 < 16u; t0 += CT) {
                            if i0 + t0 < p.q_len {
                                var z = 0.0;
                                for (var c = t0; c < t0 + CT; c++) {
                                    z += sb[bo + lane * SP + c];
                                }
                                let at = w.g + ((b * p.kv_heads + hk) * p.n_qtiles + (i0 + t0) / CT) * p.k_len + jl;
                                if PREFETCH && CT == 16u {
                                    ws[at] = gp + z;
                                } else {
                                    ws[at] += z;
                                }
                            }
                        }
                    }
                }
                let pa = coopLoadT<coop_mat16x16<f16, A>>(&pa16[bp], PP);
                let za = coopLoadT<coop_mat16x16<f16, A>>(&za16[bp], PP);
{{DKV_ACC}}
            }
        }
    }
    workgroupBarrier();

    // dK = scale sum t dz q (the selection KV head's into dkb first: selk adds its term), dV.
    let to_base = SELECTIVE && hk == sel_kv;
{{DKV_EPI}}
    if EWQ {
        if (w.flags & WANT_DGATE) != 0u {
            for (var k = 0u; k < 64u / SGS; k++) {
                let qd = lane + k * SGS;
                let j = kt + kb0 + qd / 4u;
                if qd % 4u == 0u && j < p.k_len {
                    ws[w.dgate + (b * p.kv_heads + hk) * p.k_len + j] = agq[k];
                }
            }
        }
    } else if (w.flags & WANT_DGATE) != 0u && lane < 16u && jl < p.k_len {
        ws[w.dgate + (b * p.kv_heads + hk) * p.k_len + jl] = agate;
    }
}

// PIPE, coop_dq: K, V (and K_sel) rows [kt, kt + BT) (zero at and past kend) and the gate of
// key kt + tid into registers.
fn pipe_dq_load(b: u32, hk: u32, kt: u32, kend: u32, tid: u32,
    pk: ptr<function, array<vec4<u32>, DPK>>, pv: ptr<function, array<vec4<u32>, DPK>>,
    ps: ptr<function, array<vec4<u32>, DPK>>) -> f32 {
    let sel_kv = p.sel_head / p.group;
    for (var n = 0u; n < PKN; n++) {
        let e = tid + n * WG;
        let j = kt + e / D8;
        var xk = vec4<u32>(0u);
        var xv = vec4<u32>(0u);
        var xs = vec4<u32>(0u);
        if e < BT * D8 && j < kend {
            let at = ((b * p.kv_heads + hk) * p.k_len + j) * D8 + e % D8;
            xk = k[at];
            xv = v[at];
            if SELECTIVE {
                xs = k[((b * p.kv_heads + sel_kv) * p.k_len + j) * D8 + e % D8];
            }
        }
        (*pk)[n] = xk;
        (*pv)[n] = xv;
        (*ps)[n] = xs;
    }
    var g = 1.0;
    let j = kt + tid;
    if HAS_GATE && tid < BT && j < p.k_len {
        g = ws[w.gate + (b * p.kv_heads + hk) * p.k_len + j];
    }
    return g;
}

@compute @workgroup_size(WG)
fn coop_dq(
    @builtin(local_invocation_index) tid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(subgroup_id) sg: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let h = wg.y;
    let b = wg.z;
    let hk = h / p.group;
    let row0 = wg.x * KB;
    let valid = uniform_valid(b, tid);
    let sel = p.sel_head;
    let sel_kv = sel / p.group;
    let rb0 = sg * 16u;
    let bo = sg * 16u * SP;
    let bp = sg * 16u * PP;
    let il = row0 + rb0 + lane;    // lane < 16: the row this lane sums for
    for (var r = tid; r < KB; r += WG) {
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
    // Q, dO (and the selection head's Q) fragments, staged one tensor at a time.
{{QDECL}}
    for (var qp = 0u; qp < NT; qp++) {
        workgroupBarrier();
        for (var e = tid; e < KB * D8; e += WG) {
            let i = row0 + e / D8;
            var x = vec4<u32>(0u);
            if i < p.q_len {
                if qp == 1u {
                    x = dout[((b * p.q_heads + h) * p.q_len + i) * D8 + e % D8];
                } else {
                    let hh = select(h, sel, qp == 2u);
                    x = q[((b * p.q_heads + hh) * p.q_len + i) * D8 + e % D8];
                }
            }
            put8((e / D8) * DP + (e % D8) * 8u, x);
        }
        workgroupBarrier();
        let qoff = rb0 * DP;
        if qp == 0u {
{{QLOAD}}
        } else if qp == 1u {
{{OLOAD}}
        } else {
{{QSLOAD}}
        }
    }
{{DQDECL}}
    var adt = 0.0;
    var adq = array<f32, QPL>(0.0, 0.0, 0.0, 0.0);   // EWQ: dt of the lane's quads' rows

    var kend = valid;
    if CAUSAL {
        kend = min(kend, p.start + min(row0 + KB, p.q_len));
    }
    var pk: array<vec4<u32>, DPK>;
    var pv: array<vec4<u32>, DPK>;
    var ps: array<vec4<u32>, DPK>;
    var pg = 1.0;
    if PIPE {
        pg = pipe_dq_load(b, hk, 0u, kend, tid, &pk, &pv, &ps);
    }
    for (var kt = 0u; kt < kend; kt += BT) {
        workgroupBarrier();
        if PIPE {
            for (var n = 0u; n < PKN; n++) {
                let e = tid + n * WG;
                if e < BT * D8 {
                    let r = e / D8;
                    let c8 = e % D8;
                    put8(r * DP + c8 * 8u, pk[n]);
                    put8((BT + r) * DP + c8 * 8u, pv[n]);
                    if SELECTIVE {
                        put8((2u * BT + r) * DP + c8 * 8u, ps[n]);
                    }
                }
            }
            if tid < BT {
                cg[tid] = pg;
            }
            workgroupBarrier();
            // The next tile's loads in flight during this tile's chunks.
            if kt + BT < kend {
                pg = pipe_dq_load(b, hk, kt + BT, kend, tid, &pk, &pv, &ps);
            }
        }
        for (var e = select(tid, BT * D8, PIPE); e < BT * D8; e += WG) {
            let r = e / D8;
            let j = kt + r;
            let c8 = e % D8;
            var xk = vec4<u32>(0u);
            var xv = vec4<u32>(0u);
            var xs = vec4<u32>(0u);
            if j < kend {
                let at = ((b * p.kv_heads + hk) * p.k_len + j) * D8 + c8;
                xk = k[at];
                xv = v[at];
                if SELECTIVE {
                    xs = k[((b * p.kv_heads + sel_kv) * p.k_len + j) * D8 + c8];
                }
            }
            put8(r * DP + c8 * 8u, xk);
            put8((BT + r) * DP + c8 * 8u, xv);
            if SELECTIVE {
                put8((2u * BT + r) * DP + c8 * 8u, xs);
            }
        }
        for (var c = select(tid, BT, PIPE); c < BT; c += WG) {
            let j = kt + c;
            var g = 1.0;
            if HAS_GATE && j < p.k_len {
                g = ws[w.gate + (b * p.kv_heads + hk) * p.k_len + j];
            }
            cg[c] = g;
        }
        // The staged tile is read by every subgroup; the chunks below hand only each
        // subgroup's own blocks between its lanes.
        if !PIPE {
            workgroupBarrier();
        }
        for (var c0 = 0u; c0 < BT; c0 += 16u) {
            let j0 = kt + c0;
            if j0 >= kend {
                break;
            }
            // PREFETCH (C tiles of 16 rows): this chunk's C value of the lane's key, loaded
            // before the MMAs so its global latency overlaps them.
            var fc = 0.0;
            if PREFETCH && SELECTIVE && CT == 16u && lane < 16u {
                let jf = j0 + lane;
                let irow = row0 + rb0;
                if jf < p.k_len && irow < p.q_len {
                    fc = fcarry[(b * p.n_qtiles + irow / CT) * p.k_len + jf];
                }
            }
            // FQ: C of the lane's four keys (the same for each of its quads), before the MMAs.
            var fcv = vec4<f32>(0.0);
            if SELECTIVE && FQ && EWQ && CT == 16u {
                let irow = row0 + rb0;
                let jq = j0 + (lane % 4u) * 4u;
                if irow < p.q_len {
                    let base = (b * p.n_qtiles + irow / CT) * p.k_len;
                    for (var n = 0u; n < 4u; n++) {
                        if jq + n < p.k_len {
                            fcv[n] = fcarry[base + jq + n];
                        }
                    }
                }
            }
            {{SGBAR}};
            let ko = c0 * DP;
            let vo = (BT + c0) * DP;
            let so = (2u * BT + c0) * DP;
{{DQ_S}}
            {{SGBAR}};
            // Selective: F in place of S_sel; lane c walks key c's column down the 16 rows.
            if SELECTIVE && !(FQ && EWQ && CT == 16u) {
                if lane < 16u {
                    let j = j0 + lane;
                    var run = 0.0;
                    for (var r = 0u; r < 16u; r++) {
                        let i = row0 + rb0 + r;
                        if r % CT == 0u {
                            run = 0.0;
                            if j < p.k_len && i < p.q_len {
                                if PREFETCH && CT == 16u {
                                    run = fc;
                                } else {
                                    run = fcarry[(b * p.n_qtiles + i / CT) * p.k_len + j];
                                }
                            }
                        }
                        let e = bo + r * SP + lane;
                        let s = sf[e];
                        sf[e] = run;
                        if sel_live(i, j, valid) {
                            run += max(p.scale * s, 0.0);
                        }
                    }
                }
                {{SGBAR}};
            }
            // P, dz: element (row r, key c).
            if EWQ {
                var fr = vec4<f32>(0.0);   // FQ: live relu(scale S_sel) of the rows of earlier k
                for (var k = 0u; k < 64u / SGS; k++) {
                    let qd = lane + k * SGS;
                    let r = qd / 4u;
                    let c = (qd % 4u) * 4u;
                    let e = bo + r * SP + c;
                    let rr = rb0 + r;
                    let cc = c0 + c;
                    let j4 = vec4<u32>(j0 + c) + vec4<u32>(0u, 1u, 2u, 3u);
                    let ok = allowed4(row0 + rr, j4, valid);
                    let l = p.scale * sa4(e);
                    var z = rt[rr] * l;
                    if SELECTIVE && FQ && CT == 16u {
                        // F at the quad: C + the exclusive prefix down the chunk's 16 rows
                        // (rows r of one k sit four lanes apart: a scan by shuffles up).
                        let i = row0 + rr;
                        let pos = p.start + i;
                        let live = select(vec4<bool>(false), (j4 > vec4<u32>(0u)) & (j4 < vec4<u32>(pos)),
                            i < p.q_len && pos < valid);
                        var inc = select(vec4<f32>(0.0), max(p.scale * sf4(e), vec4<f32>(0.0)), live);
                        for (var d = 4u; d < SGS; d *= 2u) {
                            let y = subgroupShuffleUp(inc, d);
                            inc += select(vec4<f32>(0.0), y, lane >= d);
                        }
                        let ex = select(vec4<f32>(0.0), subgroupShuffleUp(inc, 4u), lane >= 4u);
                        z -= fcv + (fr + ex);
                        fr += subgroupShuffle(inc, SGS - 4u + lane % 4u);
                    } else if SELECTIVE {
                        z -= sf4(e);
                    }
                    let pp = select(vec4<f32>(0.0), exp(z - rl[rr]), ok);
                    let gv = vec4<f32>(cg[cc], cg[cc + 1u], cg[cc + 2u], cg[cc + 3u]);
                    let dz = pp * (gv * sb4(e) - rd[rr]);
                    za4(bp + r * PP + c, dz);
                    adq[k] += quad_sum(l * dz);
                }
                {{SGBAR}};
                let za = coopLoadT<coop_mat16x16<f16, A>>(&za16[bp], PP);
{{DQ_ACC}}
                continue;
            }
            for (var x = lane; x < 256u; x += SGS) {
                let r = x / 16u;
                let c = x % 16u;
                let e = bo + r * SP + c;
                var dz = 0.0;
                var ldz = 0.0;
                if allowed(row0 + rb0 + r, j0 + c, valid) {
                    let l = p.scale * sa[e];
                    let dov = sb[e];
                    var z = rt[rb0 + r] * l;
                    if SELECTIVE {
                        z -= sf[e];
                    }
                    let pp = exp(z - rl[rb0 + r]);
                    dz = pp * (cg[c0 + c] * dov - rd[rb0 + r]);
                    ldz = l * dz;
                }
                za16[bp + r * PP + c] = f16(dz);
                sa[e] = ldz;
            }
            {{SGBAR}};
            if lane < 16u {
                var s = 0.0;
                for (var c = 0u; c < 16u; c++) {
                    s += sa[bo + lane * SP + c];
                }
                adt += s;
            }
            let za = coopLoadT<coop_mat16x16<f16, A>>(&za16[bp], PP);
{{DQ_ACC}}
        }
    }
    workgroupBarrier();

    // dq_i = scale t_i sum_j dz_ij k_j (the selection head's into dqb first: selq adds its term).
    let to_base = SELECTIVE && h == sel;
{{DQ_EPI}}
    if EWQ {
        for (var k = 0u; k < 64u / SGS; k++) {
            let qd = lane + k * SGS;
            let i = row0 + rb0 + qd / 4u;
            if qd % 4u == 0u && i < p.q_len {
                ws[w.dt + (b * p.q_heads + h) * p.q_len + i] = adq[k];
            }
        }
    } else if lane < 16u && il < p.q_len {
        ws[w.dt + (b * p.q_heads + h) * p.q_len + il] = adt;
    }
}

// ---- Selective terms (DESIGN.md §1b): dS = E + exclusive suffix of dF = -sum_h dz^h over the rows
// of each C tile, du = dS where S_sel is live and positive; dq_sel += scale du k_sel (coop_selq),
// dk_sel += scale du^T q_sel (coop_selk). E (after the scalar fscan) sits in the hk = 0 slots of G.
// dz of every head is recomputed by MMA and summed in workgroup memory in head order.

// du scratch of batch b (coop_selq with DU writes it, coop_selk_du reads it): rows [row_lo, row_hi)
// by Nk keys in the G slots of KV heads 1.. (dead after fscan), sized by the plan.
fn du_base(b: u32) -> u32 {
    return w.g + (b * p.kv_heads + 1u) * p.n_qtiles * p.k_len;
}

fn e_carry(b: u32, t: u32, j: u32) -> f32 {
    if t * CT < p.q_len && j < p.k_len {
        return ws[w.g + (b * p.kv_heads * p.n_qtiles + t) * p.k_len + j];
    }
    return 0.0;
}

// coop_selk: one workgroup per (64 keys, b); subgroup sg owns keys 16 sg .. 16 sg + 15. Per query
// tile of BT rows: F^T and the du mask per chunk (K_sel fragments x staged Q_sel), the sum over
// every head of dz^T per chunk, then du^T by suffix and dk_sel += du^T Q_sel.
@compute @workgroup_size(WG)
fn coop_selk(
    @builtin(local_invocation_index) tid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(subgroup_id) sg: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let kt = wg.x * KB;
    let b = wg.z;
    let valid = uniform_valid(b, tid);
    let sel = p.sel_head;
    let sel_kv = sel / p.group;
    let kb0 = sg * 16u;
    let bo = sg * 16u * SP;
    let bp = sg * 16u * PP;
    let jl = kt + kb0 + lane;
{{SK_DECL}}
    // The selection KV head's K fragments.
    workgroupBarrier();
    for (var e = tid; e < KB * D8; e += WG) {
        let j = kt + e / D8;
        var x = vec4<u32>(0u);
        if j < p.k_len {
            x = k[((b * p.kv_heads + sel_kv) * p.k_len + j) * D8 + e % D8];
        }
        put8((e / D8) * DP + (e % D8) * 8u, x);
    }
    workgroupBarrier();
    {
        let koff = kb0 * DP;
{{SK_KSLOAD}}
    }
    var msk: array<u32, 4>;
    let live = kt < valid;
    for (var row0 = 0u; row0 < p.q_len; row0 += BT) {
        if !live {
            break;
        }
        if p.start + min(row0 + BT, p.q_len) <= kt + 1u {
            continue;
        }
        // A. S_sel^T per chunk, then F^T and the mask (lane per key), sums zeroed.
        workgroupBarrier();
        for (var e = tid; e < BT * D8; e += WG) {
            let i = row0 + e / D8;
            var x = vec4<u32>(0u);
            if i < p.q_len {
                x = q[((b * p.q_heads + sel) * p.q_len + i) * D8 + e % D8];
            }
            put8((e / D8) * DP + (e % D8) * 8u, x);
        }
        workgroupBarrier();
        for (var c = 0u; c < NB; c++) {
            let i0 = row0 + c * 16u;
            if i0 >= p.q_len {
                break;
            }
            let fo = (c * SG + sg) * 16u * FS;
            let so = c * 16u * DP;
{{SK_FCOMP}}
            for (var x = lane; x < 256u; x += SGS) {
                acc[fo + (x / 16u) * FS + x % 16u] = 0.0;
            }
        }
        workgroupBarrier();
        if lane < 16u {
            for (var c = 0u; c < NB; c++) {
                let i0 = row0 + c * 16u;
                let fo = (c * SG + sg) * 16u * FS + lane * FS;
                var run = 0.0;
                var m = 0u;
                for (var r = 0u; r < 16u; r++) {
                    let i = i0 + r;
                    if r % CT == 0u {
                        run = 0.0;
                        if jl < p.k_len && i < p.q_len {
                            run = fcarry[(b * p.n_qtiles + i / CT) * p.k_len + jl];
                        }
                    }
                    var s = 0.0;
                    if i < p.q_len {
                        s = fb[fo + r];
                    }
                    fb[fo + r] = run;
                    if sel_live(i, jl, valid) {
                        let u = p.scale * s;
                        run += max(u, 0.0);
                        if u > 0.0 {
                            m |= 1u << r;
                        }
                    }
                }
                msk[c] = m;
            }
        }
        // B. sum over every head of dz^T.
        var last = 0xffffffffu;
        for (var h = 0u; h < p.q_heads; h++) {
            let hk = h / p.group;
            if hk != last {
                last = hk;
                for (var kp = 0u; kp < 2u; kp++) {
                    workgroupBarrier();
                    for (var e = tid; e < KB * D8; e += WG) {
                        let j = kt + e / D8;
                        var x = vec4<u32>(0u);
                        if j < p.k_len {
                            let at = ((b * p.kv_heads + hk) * p.k_len + j) * D8 + e % D8;
                            if kp == 0u {
                                x = k[at];
                            } else {
                                x = v[at];
                            }
                        }
                        put8((e / D8) * DP + (e % D8) * 8u, x);
                    }
                    workgroupBarrier();
                    let koff = kb0 * DP;
                    if kp == 0u {
{{SK_KLOAD}}
                    } else {
{{SK_VLOAD}}
                    }
                }
                for (var c = tid; c < KB; c += WG) {
                    let j = kt + c;
                    var g = 1.0;
                    if HAS_GATE && j < p.k_len {
                        g = ws[w.gate + (b * p.kv_heads + hk) * p.k_len + j];
                    }
                    cg[c] = g;
                }
            }
            workgroupBarrier();
            for (var e = tid; e < BT * D8; e += WG) {
                let r = e / D8;
                let i = row0 + r;
                let c8 = e % D8;
                var xq = vec4<u32>(0u);
                var xo = vec4<u32>(0u);
                if i < p.q_len {
                    let at = ((b * p.q_heads + h) * p.q_len + i) * D8 + c8;
                    xq = q[at];
                    xo = dout[at];
                }
                put8(r * DP + c8 * 8u, xq);
                put8((BT + r) * DP + c8 * 8u, xo);
            }
            for (var r = tid; r < BT; r += WG) {
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
            for (var c = 0u; c < NB; c++) {
                let c0 = c * 16u;
                let i0 = row0 + c0;
                if i0 >= p.q_len {
                    break;
                }
                workgroupBarrier();
                let qo = c0 * DP;
                let oo = (BT + c0) * DP;
{{SK_SCOMP}}
                workgroupBarrier();
                let fo = (c * SG + sg) * 16u * FS;
                for (var x = lane; x < 256u; x += SGS) {
                    let r = x / 16u;
                    let cc = x % 16u;
                    let e = bo + r * SP + cc;
                    if allowed(i0 + cc, kt + kb0 + r, valid) {
                        let l = p.scale * sa[e];
                        let z = rt[c0 + cc] * l - fb[fo + r * FS + cc];
                        let pp = exp(z - rl[c0 + cc]);
                        acc[fo + r * FS + cc] += pp * (cg[kb0 + r] * sb[e] - rd[c0 + cc]);
                    }
                }
            }
        }
        // C. du^T = E + exclusive suffix of -sum dz, masked; dk_sel += du^T Q_sel.
        workgroupBarrier();
        for (var e = tid; e < BT * D8; e += WG) {
            let i = row0 + e / D8;
            var x = vec4<u32>(0u);
            if i < p.q_len {
                x = q[((b * p.q_heads + sel) * p.q_len + i) * D8 + e % D8];
            }
            put8((e / D8) * DP + (e % D8) * 8u, x);
        }
        for (var c = 0u; c < NB; c++) {
            let i0 = row0 + c * 16u;
            if i0 >= p.q_len {
                break;
            }
            workgroupBarrier();
            if lane < 16u {
                let fo = (c * SG + sg) * 16u * FS + lane * FS;
                let m = msk[c];
                var run = 0.0;
                for (var n = 16u; n > 0u; n--) {
                    let r = n - 1u;
                    if r % CT == CT - 1u {
                        run = e_carry(b, (i0 + r) / CT, jl);
                    }
                    var du = 0.0;
                    if (m & (1u << r)) != 0u {
                        du = run;
                    }
                    za16[bp + lane * PP + r] = f16(du);
                    run -= acc[fo + r];
                }
            }
            workgroupBarrier();
            let so = c * 16u * DP;
            let ua = coopLoadT<coop_mat16x16<f16, A>>(&za16[bp], PP);
{{SK_ACC}}
        }
    }
    workgroupBarrier();
{{SK_EPI}}
}

// coop_selq: one workgroup per (64 query rows, b); subgroup sg owns rows 16 sg .. 16 sg + 15. Per
// key tile of BT keys: F and the du mask per chunk (Q_sel fragments x staged K_sel), the sum over
// every head of dz per chunk, then du by suffix and dq_sel += du K_sel.
@compute @workgroup_size(WG)
fn coop_selq(
    @builtin(local_invocation_index) tid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(subgroup_id) sg: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let b = wg.z;
    let row0 = w.row_lo + wg.x * KB;
    let valid = uniform_valid(b, tid);
    let dub = du_base(b);
    let sel = p.sel_head;
    let sel_kv = sel / p.group;
    let rb0 = sg * 16u;
    let bo = sg * 16u * SP;
    let bp = sg * 16u * PP;
{{SQ_DECL}}
    // The selection head's Q fragments.
    workgroupBarrier();
    for (var e = tid; e < KB * D8; e += WG) {
        let i = row0 + e / D8;
        var x = vec4<u32>(0u);
        if i < p.q_len {
            x = q[((b * p.q_heads + sel) * p.q_len + i) * D8 + e % D8];
        }
        put8((e / D8) * DP + (e % D8) * 8u, x);
    }
    workgroupBarrier();
    {
        let qoff = rb0 * DP;
{{SQ_QSLOAD}}
    }
    var msk: array<u32, 4>;
    // S_kj lives for j < p_k only.
    let kend = min(valid, p.start + min(row0 + KB, p.q_len));
    for (var kt = 0u; kt < kend; kt += BT) {
        // A. S_sel per chunk, then F and the mask (lane per key column), sums zeroed.
        workgroupBarrier();
        for (var e = tid; e < BT * D8; e += WG) {
            let j = kt + e / D8;
            var x = vec4<u32>(0u);
            if j < kend {
                x = k[((b * p.kv_heads + sel_kv) * p.k_len + j) * D8 + e % D8];
            }
            put8((e / D8) * DP + (e % D8) * 8u, x);
        }
        workgroupBarrier();
        for (var c = 0u; c < NB; c++) {
            if kt + c * 16u >= kend {
                break;
            }
            let fo = (c * SG + sg) * 16u * FS;
            let so = c * 16u * DP;
{{SQ_FCOMP}}
            for (var x = lane; x < 256u; x += SGS) {
                acc[fo + (x / 16u) * FS + x % 16u] = 0.0;
            }
        }
        workgroupBarrier();
        if lane < 16u {
            for (var c = 0u; c < NB; c++) {
                let j = kt + c * 16u + lane;
                let fo = (c * SG + sg) * 16u * FS + lane;
                var run = 0.0;
                var m = 0u;
                for (var r = 0u; r < 16u; r++) {
                    let i = row0 + rb0 + r;
                    if r % CT == 0u {
                        run = 0.0;
                        if j < p.k_len && i < p.q_len {
                            run = fcarry[(b * p.n_qtiles + i / CT) * p.k_len + j];
                        }
                    }
                    let s = fb[fo + r * FS];
                    fb[fo + r * FS] = run;
                    if j < kend && sel_live(i, j, valid) {
                        let u = p.scale * s;
                        run += max(u, 0.0);
                        if u > 0.0 {
                            m |= 1u << r;
                        }
                    }
                }
                msk[c] = m;
            }
        }
        // B. sum over every head of dz.
        for (var h = 0u; h < p.q_heads; h++) {
            let hk = h / p.group;
            for (var qp = 0u; qp < 2u; qp++) {
                workgroupBarrier();
                for (var e = tid; e < KB * D8; e += WG) {
                    let i = row0 + e / D8;
                    var x = vec4<u32>(0u);
                    if i < p.q_len {
                        let at = ((b * p.q_heads + h) * p.q_len + i) * D8 + e % D8;
                        if qp == 0u {
                            x = q[at];
                        } else {
                            x = dout[at];
                        }
                    }
                    put8((e / D8) * DP + (e % D8) * 8u, x);
                }
                workgroupBarrier();
                let qoff = rb0 * DP;
                if qp == 0u {
{{SQ_QLOAD}}
                } else {
{{SQ_OLOAD}}
                }
            }
            workgroupBarrier();
            for (var e = tid; e < BT * D8; e += WG) {
                let r = e / D8;
                let j = kt + r;
                let c8 = e % D8;
                var xk = vec4<u32>(0u);
                var xv = vec4<u32>(0u);
                if j < kend {
                    let at = ((b * p.kv_heads + hk) * p.k_len + j) * D8 + c8;
                    xk = k[at];
                    xv = v[at];
                }
                put8(r * DP + c8 * 8u, xk);
                put8((BT + r) * DP + c8 * 8u, xv);
            }
            for (var c = tid; c < BT; c += WG) {
                let j = kt + c;
                var g = 1.0;
                if HAS_GATE && j < p.k_len {
                    g = ws[w.gate + (b * p.kv_heads + hk) * p.k_len + j];
                }
                cg[c] = g;
            }
            for (var r = tid; r < KB; r += WG) {
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
            for (var c = 0u; c < NB; c++) {
                let c0 = c * 16u;
                let j0 = kt + c0;
                if j0 >= kend {
                    break;
                }
                workgroupBarrier();
                let ko = c0 * DP;
                let vo = (BT + c0) * DP;
{{SQ_SCOMP}}
                workgroupBarrier();
                let fo = (c * SG + sg) * 16u * FS;
                for (var x = lane; x < 256u; x += SGS) {
                    let r = x / 16u;
                    let cc = x % 16u;
                    let e = bo + r * SP + cc;
                    if allowed(row0 + rb0 + r, j0 + cc, valid) {
                        let l = p.scale * sa[e];
                        let z = rt[rb0 + r] * l - fb[fo + r * FS + cc];
                        let pp = exp(z - rl[rb0 + r]);
                        acc[fo + r * FS + cc] += pp * (cg[c0 + cc] * sb[e] - rd[rb0 + r]);
                    }
                }
            }
        }
        // C. du = E + exclusive suffix of -sum dz down each column, masked; dq_sel += du K_sel.
        workgroupBarrier();
        for (var e = tid; e < BT * D8; e += WG) {
            let j = kt + e / D8;
            var x = vec4<u32>(0u);
            if j < kend {
                x = k[((b * p.kv_heads + sel_kv) * p.k_len + j) * D8 + e % D8];
            }
            put8((e / D8) * DP + (e % D8) * 8u, x);
        }
        for (var c = 0u; c < NB; c++) {
            if kt + c * 16u >= kend {
                break;
            }
            workgroupBarrier();
            if lane < 16u {
                let j = kt + c * 16u + lane;
                let fo = (c * SG + sg) * 16u * FS + lane;
                let m = msk[c];
                var run = 0.0;
                for (var n = 16u; n > 0u; n--) {
                    let r = n - 1u;
                    if r % CT == CT - 1u {
                        run = e_carry(b, (row0 + rb0 + r) / CT, j);
                    }
                    var du = 0.0;
                    if (m & (1u << r)) != 0u {
                        du = run;
                    }
                    za16[bp + r * PP + lane] = f16(du);
                    let i = row0 + rb0 + r;
                    if DU && j < kend && i < p.q_len {
                        ws[dub + (i - w.row_lo) * p.k_len + j] = du;
                    }
                    run -= acc[fo + r * FS];
                }
            }
            workgroupBarrier();
            let so = c * 16u * DP;
            let ua = coopLoadT<coop_mat16x16<f16, A>>(&za16[bp], PP);
{{SQ_ACC}}
        }
    }
    workgroupBarrier();
{{SQ_EPI}}
}

// coop_seldu (the split du path, plan du_split): one workgroup per (64 query rows of the chunk,
// key tile of BT keys, b); subgroup sg owns rows 16 sg .. 16 sg + 15. The body of coop_selq's key
// loop for one key tile: F and the du mask (Q_sel fragments x staged K_sel), the sum over every
// head of dz, then du by suffix, written to the du scratch (no dq_sel term: coop_selq_du adds it
// from the scratch). Key tiles are independent (C and E come from the earlier passes), so the
// grid spans them: a workgroup per (row block, key tile) instead of a serial walk over key tiles.
@compute @workgroup_size(WG)
fn coop_seldu(
    @builtin(local_invocation_index) tid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(subgroup_id) sg: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let b = wg.z;
    let row0 = w.row_lo + wg.x * KB;
    let valid = uniform_valid(b, tid);
    // S_kj lives for j < p_k only; key tiles past the rows' end have nothing to do.
    let kend = min(valid, p.start + min(row0 + KB, p.q_len));
    let kt = wg.y * BT;
    if kt >= kend {
        return;
    }
    let dub = du_base(b);
    let sel = p.sel_head;
    let sel_kv = sel / p.group;
    let rb0 = sg * 16u;
    let bo = sg * 16u * SP;
    let bp = sg * 16u * PP;
{{SQ_DECL}}
    // The selection head's Q fragments.
    workgroupBarrier();
    for (var e = tid; e < KB * D8; e += WG) {
        let i = row0 + e / D8;
        var x = vec4<u32>(0u);
        if i < p.q_len {
            x = q[((b * p.q_heads + sel) * p.q_len + i) * D8 + e % D8];
        }
        put8((e / D8) * DP + (e % D8) * 8u, x);
    }
    workgroupBarrier();
    {
        let qoff = rb0 * DP;
{{SQ_QSLOAD}}
    }
    var msk: array<u32, 4>;
    // RQ: F, the mask and the head sums of dz of quad (chunk c, k) at [c * QPL + k].
    var fzr: array<vec4<f32>, RQN>;
    var azr: array<vec4<f32>, RQN>;
    var mkr: array<vec4<bool>, RQN>;
    let irow = row0 + rb0;         // the subgroup's first row (RQ: its C tile)
    {
        // A. S_sel per chunk, then F and the mask (lane per key column), sums zeroed.
        workgroupBarrier();
        for (var e = tid; e < BT * D8; e += WG) {
            let j = kt + e / D8;
            var x = vec4<u32>(0u);
            if j < kend {
                x = k[((b * p.kv_heads + sel_kv) * p.k_len + j) * D8 + e % D8];
            }
            put8((e / D8) * DP + (e % D8) * 8u, x);
        }
        workgroupBarrier();
        if RQ {
            for (var c = 0u; c < NB; c++) {
                if kt + c * 16u >= kend {
                    break;
                }
                let so = c * 16u * DP;
                {{SGBAR}};
{{SQ_FCOMP_SA}}
                {{SGBAR}};
                let jq = kt + c * 16u + (lane % 4u) * 4u;
                let j4 = vec4<u32>(jq) + vec4<u32>(0u, 1u, 2u, 3u);
                var fcv = vec4<f32>(0.0);
                if irow < p.q_len {
                    let base = (b * p.n_qtiles + irow / CT) * p.k_len;
                    for (var n = 0u; n < 4u; n++) {
                        if jq + n < p.k_len {
                            fcv[n] = fcarry[base + jq + n];
                        }
                    }
                }
                // F = C + the exclusive prefix of the live relu(scale S_sel) down the rows
                // (rows of one k four lanes apart: a scan by shuffles up; earlier k in fr).
                var fr = vec4<f32>(0.0);
                for (var k = 0u; k < 64u / SGS; k++) {
                    let r = (lane + k * SGS) / 4u;
                    let i = irow + r;
                    let pos = p.start + i;
                    let u = p.scale * sa4(bo + r * SP + (lane % 4u) * 4u);
                    let live = select(vec4<bool>(false),
                        (j4 > vec4<u32>(0u)) & (j4 < vec4<u32>(pos)) & (j4 < vec4<u32>(kend)),
                        i < p.q_len && pos < valid);
                    var inc = select(vec4<f32>(0.0), max(u, vec4<f32>(0.0)), live);
                    mkr[c * QPL + k] = live & (u > vec4<f32>(0.0));
                    for (var d = 4u; d < SGS; d *= 2u) {
                        let y = subgroupShuffleUp(inc, d);
                        inc += select(vec4<f32>(0.0), y, lane >= d);
                    }
                    let ex = select(vec4<f32>(0.0), subgroupShuffleUp(inc, 4u), lane >= 4u);
                    fzr[c * QPL + k] = fcv + (fr + ex);
                    fr += subgroupShuffle(inc, SGS - 4u + lane % 4u);
                }
            }
        }
        for (var c = 0u; c < select(NB, 0u, RQ); c++) {
            if kt + c * 16u >= kend {
                break;
            }
            let fo = (c * SG + sg) * 16u * FS;
            let so = c * 16u * DP;
{{SQ_FCOMP}}
            for (var x = lane; x < 256u; x += SGS) {
                acc[fo + (x / 16u) * FS + x % 16u] = 0.0;
            }
        }
        workgroupBarrier();
        if lane < 16u && !RQ {
            for (var c = 0u; c < NB; c++) {
                let j = kt + c * 16u + lane;
                let fo = (c * SG + sg) * 16u * FS + lane;
                var run = 0.0;
                var m = 0u;
                for (var r = 0u; r < 16u; r++) {
                    let i = row0 + rb0 + r;
                    if r % CT == 0u {
                        run = 0.0;
                        if j < p.k_len && i < p.q_len {
                            run = fcarry[(b * p.n_qtiles + i / CT) * p.k_len + j];
                        }
                    }
                    let s = fb[fo + r * FS];
                    fb[fo + r * FS] = run;
                    if j < kend && sel_live(i, j, valid) {
                        let u = p.scale * s;
                        run += max(u, 0.0);
                        if u > 0.0 {
                            m |= 1u << r;
                        }
                    }
                }
                msk[c] = m;
            }
        }
        // B. sum over every head of dz.
        for (var h = 0u; h < p.q_heads; h++) {
            let hk = h / p.group;
            if SDQ {
                workgroupBarrier();
                for (var e = tid; e < KB * D8; e += WG) {
                    let i = row0 + e / D8;
                    var xq = vec4<u32>(0u);
                    var xo = vec4<u32>(0u);
                    if i < p.q_len {
                        let at = ((b * p.q_heads + h) * p.q_len + i) * D8 + e % D8;
                        xq = q[at];
                        xo = dout[at];
                    }
                    put8((e / D8) * DP + (e % D8) * 8u, xq);
                    put8((KB + e / D8) * DP + (e % D8) * 8u, xo);
                }
                workgroupBarrier();
                {
                    let qoff = rb0 * DP;
{{SQ_QLOAD}}
                }
                {
                    let qoff = (KB + rb0) * DP;
{{SQ_OLOAD}}
                }
            }
            for (var qp = 0u; qp < select(2u, 0u, SDQ); qp++) {
                workgroupBarrier();
                for (var e = tid; e < KB * D8; e += WG) {
                    let i = row0 + e / D8;
                    var x = vec4<u32>(0u);
                    if i < p.q_len {
                        let at = ((b * p.q_heads + h) * p.q_len + i) * D8 + e % D8;
                        if qp == 0u {
                            x = q[at];
                        } else {
                            x = dout[at];
                        }
                    }
                    put8((e / D8) * DP + (e % D8) * 8u, x);
                }
                workgroupBarrier();
                let qoff = rb0 * DP;
                if qp == 0u {
{{SQ_QLOAD}}
                } else {
{{SQ_OLOAD}}
                }
            }
            workgroupBarrier();
            for (var e = tid; e < BT * D8; e += WG) {
                let r = e / D8;
                let j = kt + r;
                let c8 = e % D8;
                var xk = vec4<u32>(0u);
                var xv = vec4<u32>(0u);
                if j < kend {
                    let at = ((b * p.kv_heads + hk) * p.k_len + j) * D8 + c8;
                    xk = k[at];
                    xv = v[at];
                }
                put8(r * DP + c8 * 8u, xk);
                put8((BT + r) * DP + c8 * 8u, xv);
            }
            for (var c = tid; c < BT; c += WG) {
                let j = kt + c;
                var g = 1.0;
                if HAS_GATE && j < p.k_len {
                    g = ws[w.gate + (b * p.kv_heads + hk) * p.k_len + j];
                }
                cg[c] = g;
            }
            for (var r = tid; r < KB; r += WG) {
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
            // The staged tile is read by every subgroup; the chunks below hand only each
            // subgroup's own blocks between its lanes.
            workgroupBarrier();
            for (var c = 0u; c < NB; c++) {
                let c0 = c * 16u;
                let j0 = kt + c0;
                if j0 >= kend {
                    break;
                }
                {{SGBAR}};
                let ko = c0 * DP;
                let vo = (BT + c0) * DP;
{{SQ_SCOMP}}
                {{SGBAR}};
                let fo = (c * SG + sg) * 16u * FS;
                if EWQ {
                    for (var k = 0u; k < 64u / SGS; k++) {
                        let qd = lane + k * SGS;
                        let r = qd / 4u;
                        let cq = (qd % 4u) * 4u;
                        let e = bo + r * SP + cq;
                        let rr = rb0 + r;
                        let a = fo + r * FS + cq;
                        let cc = c0 + cq;
                        let ok = allowed4(row0 + rr, vec4<u32>(j0 + cq) + vec4<u32>(0u, 1u, 2u, 3u), valid);
                        var fv: vec4<f32>;
                        if RQ {
                            fv = fzr[c * QPL + k];
                        } else {
                            fv = vec4<f32>(fb[a], fb[a + 1u], fb[a + 2u], fb[a + 3u]);
                        }
                        let z = rt[rr] * (p.scale * sa4(e)) - fv;
                        let pp = select(vec4<f32>(0.0), exp(z - rl[rr]), ok);
                        let gv = vec4<f32>(cg[cc], cg[cc + 1u], cg[cc + 2u], cg[cc + 3u]);
                        let dz = pp * (gv * sb4(e) - rd[rr]);
                        if RQ {
                            azr[c * QPL + k] += dz;
                        } else {
                            acc[a] += dz.x;
                            acc[a + 1u] += dz.y;
                            acc[a + 2u] += dz.z;
                            acc[a + 3u] += dz.w;
                        }
                    }
                    continue;
                }
                for (var x = lane; x < 256u; x += SGS) {
                    let r = x / 16u;
                    let cc = x % 16u;
                    let e = bo + r * SP + cc;
                    if allowed(row0 + rb0 + r, j0 + cc, valid) {
                        let l = p.scale * sa[e];
                        let z = rt[rb0 + r] * l - fb[fo + r * FS + cc];
                        let pp = exp(z - rl[rb0 + r]);
                        acc[fo + r * FS + cc] += pp * (cg[c0 + cc] * sb[e] - rd[rb0 + r]);
                    }
                }
            }
        }
        // C. du = E + exclusive suffix of -sum dz down each column, masked, to the scratch
        // (each lane reads sums other lanes of its subgroup wrote).
        {{SGBAR}};
        if RQ {
            // Rows of one k four lanes apart: a suffix scan by shuffles down; later k in `later`.
            for (var c = 0u; c < NB; c++) {
                if kt + c * 16u >= kend {
                    break;
                }
                let jq = kt + c * 16u + (lane % 4u) * 4u;
                let t = irow / CT;
                let ev = vec4<f32>(e_carry(b, t, jq), e_carry(b, t, jq + 1u), e_carry(b, t, jq + 2u),
                    e_carry(b, t, jq + 3u));
                var later = vec4<f32>(0.0);
                for (var kk = 0u; kk < 64u / SGS; kk++) {
                    let k = 64u / SGS - 1u - kk;
                    var inc = azr[c * QPL + k];
                    for (var d = 4u; d < SGS; d *= 2u) {
                        let y = subgroupShuffleDown(inc, d);
                        inc += select(vec4<f32>(0.0), y, lane + d < SGS);
                    }
                    let ex = select(vec4<f32>(0.0), subgroupShuffleDown(inc, 4u), lane + 4u < SGS);
                    let du = select(vec4<f32>(0.0), ev - (later + ex), mkr[c * QPL + k]);
                    later += subgroupShuffle(inc, lane % 4u);
                    let i = irow + (lane + k * SGS) / 4u;
                    if i < p.q_len {
                        for (var n = 0u; n < 4u; n++) {
                            if jq + n < kend {
                                ws[dub + (i - w.row_lo) * p.k_len + jq + n] = du[n];
                            }
                        }
                    }
                }
            }
        }
        for (var c = 0u; c < select(NB, 0u, RQ); c++) {
            if kt + c * 16u >= kend {
                break;
            }
            if lane < 16u {
                let j = kt + c * 16u + lane;
                let fo = (c * SG + sg) * 16u * FS + lane;
                let m = msk[c];
                var run = 0.0;
                for (var n = 16u; n > 0u; n--) {
                    let r = n - 1u;
                    if r % CT == CT - 1u {
                        run = e_carry(b, (row0 + rb0 + r) / CT, j);
                    }
                    var du = 0.0;
                    if (m & (1u << r)) != 0u {
                        du = run;
                    }
                    let i = row0 + rb0 + r;
                    if j < kend && i < p.q_len {
                        ws[dub + (i - w.row_lo) * p.k_len + j] = du;
                    }
                    run -= acc[fo + r * FS];
                }
            }
        }
    }
}

// DUP, coop_selq_du: K_sel rows [kt, kt + BT) and du of the workgroup's 64 rows there (zero at
// and past kend or the chunk's end) into registers, one key a lane along a row (coalesced).
fn dup_q_load(b: u32, kt: u32, kend: u32, row0: u32, tid: u32,
    xk: ptr<function, array<vec4<u32>, DPK>>, xd: ptr<function, array<f32, DPD>>) {
    let sel_kv = p.sel_head / p.group;
    for (var n = 0u; n < DPKN; n++) {
        let e = tid + n * WG;
        let j = kt + e / D8;
        var x = vec4<u32>(0u);
        if e < BT * D8 && j < kend {
            x = k[((b * p.kv_heads + sel_kv) * p.k_len + j) * D8 + e % D8];
        }
        (*xk)[n] = x;
    }
    let dub = du_base(b);
    for (var n = 0u; n < DPDN; n++) {
        let e = tid + n * WG;
        let i = row0 + e / BT;
        let j = kt + e % BT;
        var du = 0.0;
        if e < KB * BT && j < kend && i < w.row_hi {
            du = ws[dub + (i - w.row_lo) * p.k_len + j];
        }
        (*xd)[n] = du;
    }
}

// DUP, coop_selk_du: Q_sel rows [row0, row0 + BT) and du of the workgroup's 64 keys there (zero
// where not live or at and past the chunk's end) into registers, one key a lane (coalesced).
fn dup_k_load(b: u32, row0: u32, kt: u32, valid: u32, tid: u32,
    xk: ptr<function, array<vec4<u32>, DPK>>, xd: ptr<function, array<f32, DPD>>) {
    for (var n = 0u; n < DPKN; n++) {
        let e = tid + n * WG;
        let i = row0 + e / D8;
        var x = vec4<u32>(0u);
        if e < BT * D8 && i < w.row_hi {
            x = q[((b * p.q_heads + p.sel_head) * p.q_len + i) * D8 + e % D8];
        }
        (*xk)[n] = x;
    }
    let dub = du_base(b);
    for (var n = 0u; n < DPDN; n++) {
        let e = tid + n * WG;
        let i = row0 + e / KB;
        let j = kt + e % KB;
        var du = 0.0;
        if e < KB * BT && i < w.row_hi && j < p.k_len && sel_live(i, j, valid) {
            du = ws[dub + (i - w.row_lo) * p.k_len + j];
        }
        (*xd)[n] = du;
    }
}

// DUP: the registers of dup_q_load / dup_k_load into stage (rows of D) and du16 (du: row-major
// 64 x BT with rows along the workgroup's 64; selk: transposed, 64 keys x BT rows).
fn dup_put(tid: u32, transposed: bool,
    xk: ptr<function, array<vec4<u32>, DPK>>, xd: ptr<function, array<f32, DPD>>) {
    for (var n = 0u; n < DPKN; n++) {
        let e = tid + n * WG;
        if e < BT * D8 {
            put8((e / D8) * DP + (e % D8) * 8u, (*xk)[n]);
        }
    }
    for (var n = 0u; n < DPDN; n++) {
        let e = tid + n * WG;
        if e < KB * BT {
            if transposed {
                du16[(e % KB) * DUS + e / KB] = f16((*xd)[n]);
            } else {
                du16[(e / BT) * DUS + e % BT] = f16((*xd)[n]);
            }
        }
    }
}

// coop_selq_du (the split du path): one workgroup per (64 query rows of the chunk, b); subgroup
// sg owns rows 16 sg .. 16 sg + 15. dq_sel += du K_sel over the key tiles below the rows' causal
// end, du read from the scratch coop_seldu wrote for the same chunk; adds the selection head's
// ordinary dQ (dqb) and writes dQ of the selection head.
@compute @workgroup_size(WG)
fn coop_selq_du(
    @builtin(local_invocation_index) tid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(subgroup_id) sg: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let b = wg.z;
    let row0 = w.row_lo + wg.x * KB;
    let valid = uniform_valid(b, tid);
    let dub = du_base(b);
    let sel = p.sel_head;
    let sel_kv = sel / p.group;
    let rb0 = sg * 16u;
    let bo = sg * 16u * SP;
    let bp = sg * 16u * PP;
{{SD_QDECL}}
    let kend = min(valid, p.start + min(row0 + KB, p.q_len));
    if DUP {
        var xk: array<vec4<u32>, DPK>;
        var xd: array<f32, DPD>;
        dup_q_load(b, 0u, kend, row0, tid, &xk, &xd);
        for (var kt = 0u; kt < kend; kt += BT) {
            workgroupBarrier();
            dup_put(tid, false, &xk, &xd);
            workgroupBarrier();
            // The next tile's loads in flight during this tile's MMAs.
            if kt + BT < kend {
                dup_q_load(b, kt + BT, kend, row0, tid, &xk, &xd);
            }
            for (var c = 0u; c < NB; c++) {
                if kt + c * 16u >= kend {
                    break;
                }
                let so = c * 16u * DP;
                let ua = coopLoadT<coop_mat16x16<f16, A>>(&du16[rb0 * DUS + c * 16u], DUS);
{{SQ_ACC}}
            }
        }
    }
    for (var kt = 0u; kt < select(kend, 0u, DUP); kt += BT) {
        workgroupBarrier();
        for (var e = tid; e < BT * D8; e += WG) {
            let j = kt + e / D8;
            var x = vec4<u32>(0u);
            if j < kend {
                x = k[((b * p.kv_heads + sel_kv) * p.k_len + j) * D8 + e % D8];
            }
            put8((e / D8) * DP + (e % D8) * 8u, x);
        }
        for (var c = 0u; c < NB; c++) {
            if kt + c * 16u >= kend {
                break;
            }
            workgroupBarrier();
            if lane < 16u {
                let j = kt + c * 16u + lane;
                for (var r = 0u; r < 16u; r++) {
                    let i = row0 + rb0 + r;
                    var du = 0.0;
                    if j < kend && i < w.row_hi {
                        du = ws[dub + (i - w.row_lo) * p.k_len + j];
                    }
                    za16[bp + r * PP + lane] = f16(du);
                }
            }
            workgroupBarrier();
            let so = c * 16u * DP;
            let ua = coopLoadT<coop_mat16x16<f16, A>>(&za16[bp], PP);
{{SQ_ACC}}
        }
    }
    workgroupBarrier();
{{SQ_EPI}}
}

// coop_selk_du: one workgroup per (64 keys, b); subgroup sg owns keys 16 sg .. 16 sg + 15.
// dk_sel += du^T Q_sel over the query rows [row_lo, row_hi) of this chunk, du read from the
// scratch coop_selq (DU) wrote for the same chunk (so dz is summed over heads once, there). The
// sum is carried in the dkb rows of the workspace between chunks (dispatched in row order) and
// written out by the last chunk.
@compute @workgroup_size(WG)
fn coop_selk_du(
    @builtin(local_invocation_index) tid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(subgroup_id) sg: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let kt = wg.x * KB;
    let b = wg.z;
    let valid = uniform_valid(b, tid);
    let sel = p.sel_head;
    let sel_kv = sel / p.group;
    let kb0 = sg * 16u;
    let bo = sg * 16u * SP;
    let bp = sg * 16u * PP;
    let jl = kt + kb0 + lane;
    let dub = du_base(b);
{{SD_DECL}}
    let live = kt < valid;
    if DUP && live {
        // The first tile with a live row for these keys (the skip below holds for a prefix).
        var rs = w.row_lo;
        while rs < w.row_hi && p.start + min(rs + BT, p.q_len) <= kt + 1u {
            rs += BT;
        }
        var xk: array<vec4<u32>, DPK>;
        var xd: array<f32, DPD>;
        if rs < w.row_hi {
            dup_k_load(b, rs, kt, valid, tid, &xk, &xd);
        }
        for (var row0 = rs; row0 < w.row_hi; row0 += BT) {
            workgroupBarrier();
            dup_put(tid, true, &xk, &xd);
            workgroupBarrier();
            if row0 + BT < w.row_hi {
                dup_k_load(b, row0 + BT, kt, valid, tid, &xk, &xd);
            }
            for (var c = 0u; c < NB; c++) {
                if row0 + c * 16u >= w.row_hi {
                    break;
                }
                let so = c * 16u * DP;
                let ua = coopLoadT<coop_mat16x16<f16, A>>(&du16[kb0 * DUS + c * 16u], DUS);
{{SK_ACC}}
            }
        }
    }
    for (var row0 = w.row_lo; row0 < select(w.row_hi, w.row_lo, DUP); row0 += BT) {
        if !live {
            break;
        }
        if p.start + min(row0 + BT, p.q_len) <= kt + 1u {
            continue;
        }
        workgroupBarrier();
        for (var e = tid; e < BT * D8; e += WG) {
            let i = row0 + e / D8;
            var x = vec4<u32>(0u);
            if i < w.row_hi {
                x = q[((b * p.q_heads + sel) * p.q_len + i) * D8 + e % D8];
            }
            put8((e / D8) * DP + (e % D8) * 8u, x);
        }
        for (var c = 0u; c < NB; c++) {
            let i0 = row0 + c * 16u;
            if i0 >= w.row_hi {
                break;
            }
            workgroupBarrier();
            if lane < 16u {
                for (var r = 0u; r < 16u; r++) {
                    let i = i0 + r;
                    var du = 0.0;
                    if i < w.row_hi && jl < p.k_len && sel_live(i, jl, valid) {
                        du = ws[dub + (i - w.row_lo) * p.k_len + jl];
                    }
                    za16[bp + lane * PP + r] = f16(du);
                }
            }
            workgroupBarrier();
            let so = c * 16u * DP;
            let ua = coopLoadT<coop_mat16x16<f16, A>>(&za16[bp], PP);
{{SK_ACC}}
        }
    }
    workgroupBarrier();
    let last = w.row_hi >= p.q_len;
{{SD_EPI}}
}
