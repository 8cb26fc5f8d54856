// KV cache append for a segmented cache (DESIGN.md §2, "KV cache and context pruning": a
// sequence whose slots do not fit one buffer is stored in segments, slot ranges with buffers of
// their own). The same rule as `cache.wgsl`, one token and one segment per dispatch:
//
// candidates: one workgroup per sequence; for token t, if the sequence is at its limit, reduces
//             over the occupied slots of this segment to the best eviction candidate — the largest
//             F, never position 0, never the newest token in the cache, ties to the oldest
//             position — and folds it into the sequence's best so far (`best`, reset by segment
//             0). Positions are unique, so the order is total and the fold over segments picks
//             exactly the slot one reduction over all slots would.
// put:        one workgroup per sequence; writes K, V and gate of tokens t0 .. t1 into their slots
//             when the slot lies in this segment: slot len without eviction, the best candidate
//             with one (the host gives a range of one token whenever the sequence evicts in it);
//             `put_state` writes their positions and F the same way.
//
// Decode over a segmented cache needs no kernel of its own: `decode.wgsl`'s score and attend
// run per (sequence, segment), each segment's splits written side by side in one partials
// buffer (`split0`), and its merge combines all of them once.
//
// Bounds: the host checks len_before + count <= capacity when there is no budget and
// limit <= capacity otherwise, so every slot is < capacity; a slot is written or read only when
// it lies in [seg0, seg0 + seg_cap), the segment's own slots; new-token indices use
// t < count <= n.

struct SegParams {
    batch: u32,
    kv_heads: u32,
    seg_cap: u32,    // slots of this segment (its buffers hold [nb, Hkv, seg_cap, D])
    limit: u32,      // budget, or capacity without one
    n: u32,          // token stride of the new-token tensors
    b0: u32,         // first sequence of this group: the segment buffers hold b0.., the rest all B
    seg0: u32,       // first slot of the segment
    t0: u32,         // first token of the dispatch
    t1: u32,         // one past its last token
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: SegParams;
// Per sequence: (len before, position of the first new token, tokens to append, len after).
@group(0) @binding(1) var<storage, read> step: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> new_k: array<vec4<elem>>;    // [B, Hkv, n, D]
@group(0) @binding(3) var<storage, read> new_v: array<vec4<elem>>;    // [B, Hkv, n, D]
@group(0) @binding(4) var<storage, read> new_gate: array<f32>;        // [B, Hkv, n]
@group(0) @binding(5) var<storage, read> new_f: array<f32>;           // [B, n]
@group(0) @binding(6) var<storage, read_write> kc: array<vec4<elem>>; // [nb, Hkv, Cs, D]
@group(0) @binding(7) var<storage, read_write> vc: array<vec4<elem>>; // [nb, Hkv, Cs, D]
@group(0) @binding(8) var<storage, read_write> gc: array<f32>;        // [nb, Hkv, Cs]
@group(0) @binding(9) var<storage, read_write> fs: array<f32>;        // [nb, Cs]
@group(0) @binding(10) var<storage, read_write> pc: array<u32>;       // [nb, Cs]
// Per sequence: best candidate so far (F bits, position, slot, 0).
@group(0) @binding(11) var<storage, read_write> best: array<vec4<u32>>; // [B]
// The same, read only: `put` and `put_state` bind it so (a buffer every dispatch binds writable
// would put a barrier between every two of them).
@group(0) @binding(23) var<storage, read> best_in: array<vec4<u32>>; // [B]

override D: u32 = 8u;
override WG: u32 = 64u;     // a power of two (tree reduction)
override HAS_GATE: bool = false;
override HAS_F: bool = false;
override D4: u32 = D / 4u;

const NONE: u32 = 0xffffffffu;

var<workgroup> red_f: array<f32, WG>;
var<workgroup> red_p: array<u32, WG>;
var<workgroup> red_s: array<u32, WG>;

// Whether candidate (f, pos) beats the best so far (bp == NONE: no best yet). Largest F wins,
// ties go to the oldest position; positions are unique, so the order is total. The same rule as
// `cache.wgsl`'s (a copy: shared, it would change that shader's text).
fn better(f: f32, pos: u32, bf: f32, bp: u32) -> bool {
    return bp == NONE || f > bf || (f == bf && pos < bp);
}

@compute @workgroup_size(WG)
fn candidates(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let b = wg.x;             // sequence within the group (segment buffers)
    let gb = p.b0 + b;        // sequence of the cache (step plan, best)
    let st = step[gb];
    let t = p.t0;
    // Length before token t: each earlier token either took a new slot or evicted one.
    let len = min(st.x + t, max(p.limit, st.x));
    if t >= st.z || len < p.limit {
        return;
    }
    let base = b * p.seg_cap;
    let newpos = st.y + t;
    var bf = 0.0;
    var bp = NONE;
    var bs = 0u;
    // This segment's occupied slots: [seg0, min(len, seg0 + seg_cap)).
    var end = 0u;
    if len > p.seg0 {
        end = min(len - p.seg0, p.seg_cap);
    }
    for (var j = tid; j < end; j += WG) {
        let pj = pc[base + j];
        if pj != 0u && pj + 1u != newpos {
            let fj = fs[base + j];
            if better(fj, pj, bf, bp) {
                bf = fj;
                bp = pj;
                bs = p.seg0 + j;
            }
        }
    }
    red_f[tid] = bf;
    red_p[tid] = bp;
    red_s[tid] = bs;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if tid < stride {
            let op = red_p[tid + stride];
            if op != NONE && better(red_f[tid + stride], op, red_f[tid], red_p[tid]) {
                red_f[tid] = red_f[tid + stride];
                red_p[tid] = op;
                red_s[tid] = red_s[tid + stride];
            }
        }
        workgroupBarrier();
    }
    if tid == 0u {
        var cur = vec4<u32>(0u, NONE, len - 1u, 0u);
        if p.seg0 > 0u {
            cur = best[gb];
        }
        let rp = red_p[0];
        if rp != NONE && better(red_f[0], rp, bitcast<f32>(cur.x), cur.y) {
            cur = vec4<u32>(bitcast<u32>(red_f[0]), rp, red_s[0], 0u);
        }
        best[gb] = cur;
    }
}

// The slot token t of sequence gb takes (st: its plan), or NONE when t does not run or the slot
// is not in this segment; as a slot of the segment otherwise.
fn slot_in_segment(gb: u32, st: vec4<u32>, t: u32) -> u32 {
    if t >= st.z {
        return NONE;
    }
    let len = min(st.x + t, max(p.limit, st.x));
    var slot = len;
    if len >= p.limit {
        // len >= limit >= 3 here, so len - 1 is a valid fallback slot.
        slot = min(best_in[gb].z, len - 1u);
    }
    if slot < p.seg0 || slot - p.seg0 >= p.seg_cap {
        return NONE;
    }
    return slot - p.seg0;
}

// K, V and gate of the new tokens (positions and F: `put_state`; apart so that no kernel binds
// more than 10 storage buffers).
@compute @workgroup_size(WG)
fn put(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let b = wg.x;             // sequence within the group (segment buffers)
    let gb = p.b0 + b;        // sequence of the cache (step plan, new tokens, best)
    let st = step[gb];
    for (var t = p.t0; t < p.t1; t++) {
        let ls = slot_in_segment(gb, st, t);
        if ls == NONE {
            continue;
        }
        for (var e = tid; e < p.kv_heads * D4; e += WG) {
            let hk = e / D4;
            let x = e % D4;
            let dst = ((b * p.kv_heads + hk) * p.seg_cap + ls) * D4 + x;
            let src = ((gb * p.kv_heads + hk) * p.n + t) * D4 + x;
            kc[dst] = new_k[src];
            vc[dst] = new_v[src];
        }
        if HAS_GATE {
            for (var hk = tid; hk < p.kv_heads; hk += WG) {
                gc[(b * p.kv_heads + hk) * p.seg_cap + ls] = new_gate[(gb * p.kv_heads + hk) * p.n + t];
            }
        }
    }
}

// Positions and F of the new tokens.
@compute @workgroup_size(WG)
fn put_state(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let b = wg.x;
    let gb = p.b0 + b;
    let st = step[gb];
    if tid != 0u {
        return;
    }
    for (var t = p.t0; t < p.t1; t++) {
        let ls = slot_in_segment(gb, st, t);
        if ls == NONE {
            continue;
        }
        pc[b * p.seg_cap + ls] = st.y + t;
        var f = 0.0;
        if HAS_F {
            f = new_f[gb * p.n + t];
        }
        fs[b * p.seg_cap + ls] = f;
    }
}

// ---------------------------------------------------------------------------------------------
// merge_segments: decode over a segmented cache with at most 8 segments reached. The attend
// kernel of `decode.wgsl` runs per (sequence, segment) and writes that segment's partials
// (o, m, l) to a buffer of the segment's own (so attend dispatches of different segments write
// different buffers and need no barrier between them). This kernel merges the rows of sequences
// b0 .. b0 + nseq over the partials of their segments, bound as part0 .. part7 (sequence q's
// segment k at q * nseg + k; the first nseg * nseq of them real), and writes O and LSE: the decode
// merge's arithmetic over every split of every segment. One workgroup per (query row, sequence).
//
// Bounds: the host sizes segment k's partials for q_heads * n rows of splits[k] splits (o, then
// (m, l) from ml_base[k]) and checks nseg * nseq <= 8; o and lse hold every sequence's rows.

struct MergeSegParams {
    q_heads: u32,
    n: u32,
    b0: u32,                        // first sequence of the dispatch
    nseg: u32,                      // segments per sequence
    nseq: u32,                      // sequences of the dispatch (nseg * nseq <= 8)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
    splits: array<vec4<u32>, 2>,    // splits of segment k: splits[k / 4][k % 4]
    ml_base: array<vec4<u32>, 2>,   // index of segment k's first (m, l) entry
}

@group(0) @binding(12) var<uniform> mp: MergeSegParams;
@group(0) @binding(13) var<storage, read> part0: array<vec4<f32>>;
@group(0) @binding(14) var<storage, read> part1: array<vec4<f32>>;
@group(0) @binding(15) var<storage, read> part2: array<vec4<f32>>;
@group(0) @binding(16) var<storage, read> part3: array<vec4<f32>>;
@group(0) @binding(17) var<storage, read> part4: array<vec4<f32>>;
@group(0) @binding(18) var<storage, read> part5: array<vec4<f32>>;
@group(0) @binding(19) var<storage, read> part6: array<vec4<f32>>;
@group(0) @binding(20) var<storage, read> part7: array<vec4<f32>>;
@group(0) @binding(21) var<storage, read_write> o: array<vec4<elem>>;   // [B, Hq, n, D]
@group(0) @binding(22) var<storage, read_write> lse: array<u32>;        // [B, Hq, n], f32 bits

override WRITE_LSE: bool = false;

// exp(s - m) for s <= m: `decode.wgsl`'s, copied because moving it to `common.wgsl` would change
// the text of every existing shader variant.
fn exp_shifted(s: f32, m: f32) -> f32 {
    return exp2(max(0.5 * s - 0.5 * m, -128.0) * (2.0 * LOG2E));
}

// Entry i of segment k's partials.
fn seg_part(k: u32, i: u32) -> vec4<f32> {
    switch k {
        case 0u: { return part0[i]; }
        case 1u: { return part1[i]; }
        case 2u: { return part2[i]; }
        case 3u: { return part3[i]; }
        case 4u: { return part4[i]; }
        case 5u: { return part5[i]; }
        case 6u: { return part6[i]; }
        default: { return part7[i]; }
    }
}

@compute @workgroup_size(WG)
fn merge_segments(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let r = wg.x;                                   // (h * n + i): row within the sequence
    let row = (mp.b0 + wg.y) * (mp.q_heads * mp.n) + r;   // row of O
    let k0 = wg.y * mp.nseg;                        // binding of the sequence's first segment
    var mx = LOWEST;
    for (var k = 0u; k < mp.nseg; k++) {
        let ns = mp.splits[k / 4u][k % 4u];
        let mb = mp.ml_base[k / 4u][k % 4u];
        for (var s = 0u; s < ns; s++) {
            mx = max(mx, seg_part(k0 + k, mb + r * ns + s).x);
        }
    }
    var l = 0.0;
    for (var k = 0u; k < mp.nseg; k++) {
        let ns = mp.splits[k / 4u][k % 4u];
        let mb = mp.ml_base[k / 4u][k % 4u];
        for (var s = 0u; s < ns; s++) {
            // A split with no allowed slot has l = 0 and a zero accumulator.
            let ml = seg_part(k0 + k, mb + r * ns + s);
            l += ml.y * exp_shifted(ml.x, mx);
        }
    }
    // A row with no allowed slot: zeros and LSE = -inf.
    let inv = inv_or_zero(l);
    for (var x = tid; x < D4; x += WG) {
        var acc = vec4<f32>(0.0);
        for (var k = 0u; k < mp.nseg; k++) {
            let ns = mp.splits[k / 4u][k % 4u];
            let mb = mp.ml_base[k / 4u][k % 4u];
            for (var s = 0u; s < ns; s++) {
                let idx = r * ns + s;
                acc += seg_part(k0 + k, idx * D4 + x) * exp_shifted(seg_part(k0 + k, mb + idx).x, mx);
            }
        }
        o[row * D4 + x] = vec4<elem>(acc * inv);
    }
    if WRITE_LSE && tid == 0u {
        lse[row] = lse_bits_ln(mx, l);
    }
}
