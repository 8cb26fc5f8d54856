// Decode over a KV cache (DESIGN.md §2, "Decode"): few queries per sequence, many slots.
//
// score:  selective masking only. One thread per slot j: for the step's queries k (positions
//         p_k = pos_b + k) S_kj = relu(scale q_sel_k . k_sel_j) for 0 < pos_j < p_k; writes
//         FQ[b, i, j] = F[j] + sum over k < i of S_kj (what query i subtracts) and, in place,
//         F[j] += sum over all k of S_kj, so the state stays what a full prefill would produce.
// attend: flash-decoding. One workgroup per (slot split, KV head and row block, sequence); the
//         rows are the group's query heads times the step's queries, so K and V are read once per
//         KV head (GQA), in 16-byte loads. Online softmax over the split; writes one unnormalised
//         partial (o, m, l) per row.
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
    b0: u32,          // first sequence of the group: cache buffers hold b0.., the rest all B
    split0: u32,      // first split of the dispatch in part (segmented caches; 0 otherwise)
    pb0: u32,         // first sequence of part (segmented caches: one buffer per chunk; else 0)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: DecodeParams;
// Per sequence: (len before, position of the first query, queries, len after).
@group(0) @binding(1) var<storage, read> step: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> q: array<vec4<elem>>;       // [B, Hq, n, D]
@group(0) @binding(3) var<storage, read> kc: array<vec4<elem>>;      // [B, Hkv, C, D]
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
override HAS_TAU: bool = false;
override HAS_ALPHA: bool = false;
override HAS_GATE: bool = false;
override SELECTIVE: bool = false;
override WRITE_LSE: bool = false;
override D4: u32 = D / 4u;

const MAX_N: u32 = 8u;

// Logits are kept in natural units (query rows scaled by scale * t, no log2 e): log2 e is applied
// only to differences from a row max, through `exp_shifted`, so huge logits stay finite.
// Whether a slot is allowed is tracked beside its logit, never read off the logit's value.

// exp(s - m) for s <= m, computed from halves so that s - m cannot overflow, and clamped where
// the result is 0 in f32 anyway: finite for every finite s and m.
fn exp_shifted(s: f32, m: f32) -> f32 {
    return exp2(max(0.5 * s - 0.5 * m, -128.0) * (2.0 * LOG2E));
}

// ---------------------------------------------------------------------------------------------
// score

var<workgroup> qsel: array<vec4<f32>, MAX_N * D4>;

@compute @workgroup_size(WG)
fn score(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let b = wg.y;            // sequence within the group (cache buffers: kc, pc, fs)
    let gb = p.b0 + b;       // sequence of the cache (step, q, fq)
    let j = wg.x * WG + tid;
    let st = step[gb];
    for (var e = tid; e < p.n * D4; e += WG) {
        let i = e / D4;
        qsel[e] = vec4<f32>(q[((gb * p.q_heads + p.sel_head) * p.n + i) * D4 + e % D4]) * p.scale;
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
        fq[(gb * p.n + i) * p.capacity + j] = f;
        if i < st.z && selective_counts(pj, st.y + i) {
            f += max(dots[i], 0.0);
        }
    }
    fs[b * p.capacity + j] = f;
}

// ---------------------------------------------------------------------------------------------
// attend
//
// K and V are read as 16-byte chunks (`kraw`, `vraw`: DC chunks per slot row; a chunk is 4 f32
// or 8 f16, CV = 1 or 2 vec4<f32> once unpacked), straight from the cache into registers, with
// every load of a tile (K, V, gates, positions) issued before its first use. Per tile of BC
// slots, two barriers:
//   QK: thread (c, dp) = (tid / DP, tid % DP) dots chunks dp, dp + DP, ... of slot c with every
//       query row of the block (queries in workgroup memory, f32); partial sums to `sdot`.
//   P:  item (r, g): row r, slot subset g (slots g, g + KS, ...): logits, the subset's running
//       max, the probabilities (`ps`). The running max is kept per (row, subset), two parities.
//   PV: thread (x, g) = (tid % DC, tid / DC) accumulates chunk x of every row over the slots of
//       subset g: O is rescaled by its subset's correction, then += p * gate * V.
// At the end of the split the KS subsets are merged in workgroup memory (exactly as the merge
// kernel merges splits) and one partial (o, m, l) per row is written.
//
// Per-thread registers are named variables, not arrays: the Rust side unrolls every
// `//@unroll NAME COUNT` ... `//@end` block COUNT times with `{NAME}` replaced by 0, 1, ...
// (a run-time-indexed array would live in local memory on NVIDIA).

override DC: u32 = 2u;        // 16-byte chunks per slot row: D * size(elem) / 16
override CV: u32 = 1u;        // vec4<f32> per chunk: 1 (f32) or 2 (f16)
override DP: u32 = 1u;        // threads per slot in QK (BC * DP = WG)
override KS: u32 = 1u;        // slot subsets in PV: WG / DC (threads tid >= KS * DC idle in PV)
override BCP: u32 = BC + 8u;  // padded row of `sdot` (no bank conflicts in QK's stores)
// Loads of the next tile issued before the current tile's QK, P and PV (registers hold two
// tiles' chunks): the next tile's bytes are in flight through the current one's barriers.
override PREFETCH: bool = false;

@group(0) @binding(14) var<storage, read> kraw: array<vec4<u32>>;   // [B, Hkv, C, DC]
@group(0) @binding(15) var<storage, read> vraw: array<vec4<u32>>;   // [B, Hkv, C, DC]

var<workgroup> qs: array<vec4<f32>, RB * D4>;      // query rows, pre-scaled (natural units)
var<workgroup> sdot: array<f32, RB * DP * BCP>;    // QK partial sums [r][dp][c]
var<workgroup> ps: array<f32, RB * BC>;            // probabilities of the tile [r][c]
var<workgroup> kpos: array<u32, BC>;               // positions of the tile's slots
var<workgroup> rowm: array<f32, 2u * RB * KS>;     // running max [parity][r][g]
var<workgroup> red: array<vec4<f32>, WG>;          // end of split: subset reduction
var<workgroup> lred: array<f32, RB * KS>;

// Part `which` (0 or 1) of a chunk as f32: the chunk itself (f32), or its first or last four
// f16 (little-endian pairs: element 2i in the low half of word i).
fn chunk_part(u: vec4<u32>, which: u32) -> vec4<f32> {
    if CV == 1u {
        return bitcast<vec4<f32>>(u);
    }
    if which == 0u {
        return vec4<f32>(unpack2x16float(u.x), unpack2x16float(u.y));
    }
    return vec4<f32>(unpack2x16float(u.z), unpack2x16float(u.w));
}

// Row rr of a KV head's block: query head hk * group + rr / n, query rr % n.
fn row_head(hk: u32, rr: u32) -> u32 {
    return hk * p.group + rr / p.n;
}

// K chunk `ch` of slot j (zero past j1 or the row).
fn load_k(head: u32, j: u32, j1: u32, ch: u32) -> vec4<u32> {
    if j < j1 && ch < DC {
        return kraw[(head + j) * DC + ch];
    }
    return vec4<u32>(0u);
}

// V chunk `vx` of slot kt + c for subset thread `vg` (zero when idle or past j1).
fn load_v(head: u32, kt: u32, c: u32, j1: u32, vg: u32, vx: u32) -> vec4<u32> {
    if vg < KS && c < BC && kt + c < j1 {
        return vraw[(head + kt + c) * DC + vx];
    }
    return vec4<u32>(0u);
}

// Gate of slot kt + c (1 without gates, when idle or past j1).
fn load_g(head: u32, kt: u32, c: u32, j1: u32, vg: u32) -> f32 {
    if HAS_GATE && vg < KS && c < BC && kt + c < j1 {
        return gc[head + kt + c];
    }
    return 1.0;
}

// Position of slot j for the QK thread with qd == 0 (all ones otherwise or past j1).
fn load_p(b: u32, j: u32, j1: u32, qd: u32) -> u32 {
    if qd == 0u && j < j1 {
        return pc[b * p.capacity + j];
    }
    return 0xffffffffu;
}

@compute @workgroup_size(WG)
fn attend(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let s = wg.x;
    let hk = wg.y / p.n_rblocks;
    let rb = wg.y % p.n_rblocks;
    let b = wg.z;            // sequence within the group (cache buffers: kraw, vraw, gc, pc)
    let gb = p.b0 + b;       // sequence of the cache (step, q, tau, fq, part)
    let st = step[gb];
    let j0 = s * p.split_len;
    let j1 = min(j0 + p.split_len, st.w);
    let head = (b * p.kv_heads + hk) * p.capacity;   // slot row of slot 0 of this KV head

    for (var e = tid; e < RB * D4; e += WG) {
        let r = e / D4;
        let rr = rb * RB + r;
        var x = vec4<f32>(0.0);
        if rr < p.rows {
            let h = row_head(hk, rr);
            let i = rr % p.n;
            var t = 1.0;
            if HAS_TAU {
                t = tau[(gb * p.q_heads + h) * p.n + i];
            }
            if HAS_ALPHA {
                t = temperature(t, alpha[h], st.y + i);
            }
            // Natural units (not `row_factor_of`): log2 e only on differences from the max.
            x = vec4<f32>(q[((gb * p.q_heads + h) * p.n + i) * D4 + e % D4]) * (p.scale * t);
        }
        qs[e] = x;
    }
    for (var e = tid; e < 2u * RB * KS; e += WG) {
        rowm[e] = LOWEST;
    }
    //@unroll r RB
    var lsum{r} = 0.0;
    //@unroll cv CV
    var acc{r}_{cv} = vec4<f32>(0.0);
    //@end
    //@end
    let qc = tid / DP;   // QK: slot of the tile
    let qd = tid % DP;   //     part of the head dim
    let vx = tid % DC;   // PV: chunk
    let vg = tid / DC;   //     slot subset (idle when >= KS)
    var par = 0u;
    // With PREFETCH, the first tile's loads (then each next tile's, in the loop).
    //@unroll k KCH
    let ch{k} = qd + {k}u * DP;
    var nkr{k} = vec4<u32>(0u);
    //@end
    //@unroll k KPS
    let c{k} = {k}u * KS + vg;
    var nvr{k} = vec4<u32>(0u);
    var ngt{k} = 1.0;
    //@end
    var nkp = 0xffffffffu;
    if PREFETCH {
        //@unroll k KCH
        nkr{k} = load_k(head, j0 + qc, j1, ch{k});
        //@end
        //@unroll k KPS
        nvr{k} = load_v(head, j0, c{k}, j1, vg, vx);
        ngt{k} = load_g(head, j0, c{k}, j1, vg);
        //@end
        nkp = load_p(b, j0 + qc, j1, qd);
    }
    workgroupBarrier();

    for (var kt = j0; kt < j1; kt += BC) {
        // Every load of the tile first: K chunks for QK, V chunks for PV (with PREFETCH, the
        // tile's were loaded before, and the next tile's are loaded here).
        let jq = kt + qc;
        //@unroll k KCH
        var kr{k} = nkr{k};
        //@end
        //@unroll k KPS
        var vr{k} = nvr{k};
        var gt{k} = ngt{k};
        //@end
        // The slot's position, for the mask (to workgroup memory with the QK sums).
        var kp = nkp;
        if PREFETCH {
            let kn = kt + BC;
            //@unroll k KCH
            nkr{k} = load_k(head, kn + qc, j1, ch{k});
            //@end
            //@unroll k KPS
            nvr{k} = load_v(head, kn, c{k}, j1, vg, vx);
            ngt{k} = load_g(head, kn, c{k}, j1, vg);
            //@end
            nkp = load_p(b, kn + qc, j1, qd);
        } else {
            //@unroll k KCH
            kr{k} = load_k(head, jq, j1, ch{k});
            //@end
            //@unroll k KPS
            vr{k} = load_v(head, kt, c{k}, j1, vg, vx);
            gt{k} = load_g(head, kt, c{k}, j1, vg);
            //@end
            kp = load_p(b, jq, j1, qd);
        }
        // QK partial sums.
        //@unroll r RB
        var d{r} = 0.0;
        //@end
        //@unroll k KCH
        if ch{k} < DC {
            //@unroll cv CV
            let kv{k}_{cv} = chunk_part(kr{k}, {cv}u);
            //@unroll r RB
            d{r} += dot(qs[{r}u * D4 + ch{k} * CV + {cv}u], kv{k}_{cv});
            //@end
            //@end
        }
        //@end
        //@unroll r RB
        sdot[({r}u * DP + qd) * BCP + qc] = d{r};
        //@end
        if qd == 0u {
            kpos[qc] = kp;
        }
        workgroupBarrier();
        // Logits (natural units), masked to slots at or before the query's position; running max
        // per (row, subset); probabilities.
        let m_at = par * RB * KS;          // running max before this tile
        let m_to = (1u - par) * RB * KS;   // and after it
        for (var e = tid; e < RB * KS; e += WG) {
            let r = e / KS;
            let g = e % KS;
            let i = (rb * RB + r) % p.n;
            var m = rowm[m_at + e];
            //@unroll k KPS
            let cz{k} = {k}u * KS + g;
            var z{k} = LOWEST;
            var ok{k} = false;
            if cz{k} < BC && kt + cz{k} < j1 {
                let j = kt + cz{k};
                // Only the sequence's first st.z queries run (the others get O = 0, LSE = -inf).
                if i < st.z && kpos[cz{k}] <= st.y + i {
                    var sv = 0.0;
                    for (var dp = 0u; dp < DP; dp++) {
                        sv += sdot[(r * DP + dp) * BCP + cz{k}];
                    }
                    if SELECTIVE {
                        sv -= fq[(gb * p.n + i) * p.capacity + j];
                    }
                    z{k} = sv;
                    ok{k} = true;
                }
            }
            m = max(m, z{k});
            //@end
            //@unroll k KPS
            if cz{k} < BC {
                var pr = 0.0;
                if ok{k} {
                    pr = exp_shifted(z{k}, m);
                }
                ps[r * BC + cz{k}] = pr;
            }
            //@end
            rowm[m_to + e] = m;
        }
        workgroupBarrier();
        // O = O * corr + P (gate V) over the thread's subset.
        if vg < KS {
            //@unroll r RB
            let m_old{r} = rowm[m_at + {r}u * KS + vg];
            let corr{r} = exp_shifted(m_old{r}, rowm[m_to + {r}u * KS + vg]);
            lsum{r} *= corr{r};
            //@unroll cv CV
            acc{r}_{cv} *= corr{r};
            //@end
            //@end
            //@unroll k KPS
            if c{k} < BC {
                //@unroll cv CV
                let v{k}_{cv} = chunk_part(vr{k}, {cv}u);
                //@end
                //@unroll r RB
                let p{k}_{r} = ps[{r}u * BC + c{k}];
                lsum{r} += p{k}_{r};
                //@unroll cv CV
                acc{r}_{cv} += (p{k}_{r} * gt{k}) * v{k}_{cv};
                //@end
                //@end
            }
            //@end
        }
        par = 1u - par;
    }
    workgroupBarrier();

    // Merge the subsets: rescale each to the row's max, then sum in workgroup memory.
    let fin = par * RB * KS;
    if vg < KS {
        //@unroll r RB
        var mrow{r} = LOWEST;
        for (var g = 0u; g < KS; g++) {
            mrow{r} = max(mrow{r}, rowm[fin + {r}u * KS + g]);
        }
        let mine{r} = rowm[fin + {r}u * KS + vg];
        // A subset with no allowed slot has lsum = 0 and a zero accumulator.
        let sc{r} = exp_shifted(mine{r}, mrow{r});
        lsum{r} *= sc{r};
        //@unroll cv CV
        acc{r}_{cv} *= sc{r};
        //@end
        if vx == 0u {
            lred[{r}u * KS + vg] = lsum{r};
        }
        //@end
    }
    //@unroll r RB
    //@unroll cv CV
    if vg < KS {
        red[tid] = acc{r}_{cv};
    }
    workgroupBarrier();
    if tid < DC && rb * RB + {r}u < p.rows {
        let rr = rb * RB + {r}u;
        var sum = vec4<f32>(0.0);
        for (var g = 0u; g < KS; g++) {
            sum += red[g * DC + tid];
        }
        let h = row_head(hk, rr);
        // Partials: row index (((b - pb0) * Hq + h) * n + i) * splits + split0 + s.
        let idx = (((gb - p.pb0) * p.q_heads + h) * p.n + rr % p.n) * p.splits + p.split0 + s;
        part[idx * D4 + tid * CV + {cv}u] = sum;
        if tid == 0u && {cv}u == 0u {
            var mrow = LOWEST;
            var l = 0.0;
            for (var g = 0u; g < KS; g++) {
                mrow = max(mrow, rowm[fin + {r}u * KS + g]);
                l += lred[{r}u * KS + g];
            }
            part[p.ml_base + idx] = vec4<f32>(mrow, l, 0.0, 0.0);
        }
    }
    workgroupBarrier();
    //@end
    //@end
}

// ---------------------------------------------------------------------------------------------
// merge

@compute @workgroup_size(WG)
fn merge(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let row = (p.b0 + wg.y) * (p.q_heads * p.n) + wg.x;   // (b * Hq + h) * n + i
    let first = (row - p.pb0 * (p.q_heads * p.n)) * p.splits;
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
