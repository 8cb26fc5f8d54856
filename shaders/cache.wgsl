// KV cache append with context pruning (DESIGN.md §2, "KV cache and context pruning").
//
// One workgroup per sequence walks the new tokens in order. For each token: if the sequence is at
// its limit (budget, or capacity without one), the workgroup reduces over the occupied slots to the
// victim — the largest F, never position 0, never the newest token in the cache; ties go to the
// oldest position — and the token is written into the victim's slot; otherwise into slot `len`.
// No host round trip: the victim never leaves the GPU.
//
// Bounds: the host checks len_before + count <= capacity when there is no budget and
// limit <= capacity otherwise, so every slot index here is < capacity; new-token indices use
// t < count <= n. Occupied slots are always [0, len).

struct CacheParams {
    batch: u32,
    kv_heads: u32,
    capacity: u32,
    limit: u32,      // budget, or capacity without one
    n: u32,          // token stride of the new-token tensors
    b0: u32,         // first sequence of this group: the cache buffers hold b0.., the rest all B
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: CacheParams;
// Per sequence: (len before, position of the first new token, tokens to append, len after).
@group(0) @binding(1) var<storage, read> step: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> new_k: array<vec4<elem>>;    // [B, Hkv, n, D]
@group(0) @binding(3) var<storage, read> new_v: array<vec4<elem>>;    // [B, Hkv, n, D]
@group(0) @binding(4) var<storage, read> new_gate: array<f32>;        // [B, Hkv, n]
@group(0) @binding(5) var<storage, read> new_f: array<f32>;           // [B, n]
@group(0) @binding(6) var<storage, read_write> kc: array<vec4<elem>>; // [B, Hkv, C, D]
@group(0) @binding(7) var<storage, read_write> vc: array<vec4<elem>>; // [B, Hkv, C, D]
@group(0) @binding(8) var<storage, read_write> gc: array<f32>;        // [B, Hkv, C]
@group(0) @binding(9) var<storage, read_write> fs: array<f32>;        // [B, C]
@group(0) @binding(10) var<storage, read_write> pc: array<u32>;       // [B, C]

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
// ties go to the oldest position; positions are unique, so the order is total.
fn better(f: f32, pos: u32, bf: f32, bp: u32) -> bool {
    return bp == NONE || f > bf || (f == bf && pos < bp);
}

@compute @workgroup_size(WG)
fn append(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let b = wg.x;             // sequence within the group (cache buffers)
    let gb = p.b0 + b;        // sequence of the cache (step plan, new tokens)
    let st = step[gb];
    var len = st.x;
    let pos0 = st.y;
    let count = st.z;
    let base = b * p.capacity;
    for (var t = 0u; t < count; t++) {
        let newpos = pos0 + t;
        var slot = len;
        if len >= p.limit {
            // Evict. len >= limit >= 3 here, so len - 1 is a valid fallback slot.
            var bf = 0.0;
            var bp = NONE;
            var bs = len - 1u;
            for (var j = tid; j < len; j += WG) {
                let pj = pc[base + j];
                if pj != 0u && pj + 1u != newpos {
                    let fj = fs[base + j];
                    if better(fj, pj, bf, bp) {
                        bf = fj;
                        bp = pj;
                        bs = j;
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
            slot = min(red_s[0], len - 1u);
            workgroupBarrier();
        } else {
            len += 1u;
        }
        for (var e = tid; e < p.kv_heads * D4; e += WG) {
            let hk = e / D4;
            let x = e % D4;
            let dst = ((b * p.kv_heads + hk) * p.capacity + slot) * D4 + x;
            let src = ((gb * p.kv_heads + hk) * p.n + t) * D4 + x;
            kc[dst] = new_k[src];
            vc[dst] = new_v[src];
        }
        if HAS_GATE {
            for (var hk = tid; hk < p.kv_heads; hk += WG) {
                gc[(b * p.kv_heads + hk) * p.capacity + slot] = new_gate[(gb * p.kv_heads + hk) * p.n + t];
            }
        }
        if tid == 0u {
            pc[base + slot] = newpos;
            var f = 0.0;
            if HAS_F {
                f = new_f[gb * p.n + t];
            }
            fs[base + slot] = f;
        }
        // The next token's reduction reads the position and F written here.
        storageBarrier();
    }
}
