// Selective masking without an Nq x Nk matrix (DESIGN.md §2).
//
// colsum: T[b, I, j] = sum over rows k of query tile I of S_kj, S_kj = relu(scale q_sel_k . k_sel_j)
//         for 0 < j < p_k (and p_k inside the valid prefix). One workgroup per (key tile, query tile, b).
// scan:   C[b, I, j] = F0[b, j] + sum over I' < I of T[b, I', j], in place; F_out[b, j] = the total.
// BR must equal the query tile of the forward kernel that reads C.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<elem>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<elem>>;
@group(0) @binding(3) var<storage, read> kv_len: array<u32>;
@group(0) @binding(4) var<storage, read> f0: array<f32>;
@group(0) @binding(5) var<storage, read_write> scratch: array<f32>;   // [B, n_qtiles, Nk]
@group(0) @binding(6) var<storage, read_write> f_out: array<f32>;

override D: u32 = 8u;
override BR: u32 = 1u;
override BC: u32 = 1u;
override WG: u32 = 64u;
override HAS_KVLEN: bool = false;
override HAS_F0: bool = false;
override WRITE_F: bool = false;
override D4: u32 = D / 4u;

var<workgroup> qsel: array<vec4<f32>, BR * D4>;
var<workgroup> ksel: array<vec4<f32>, BC * D4>;
var<workgroup> ssel: array<f32, BR * BC>;

@compute @workgroup_size(WG)
fn colsum(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let kt = wg.x * BC;
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
    if kt + 1u < pend {
        for (var e = tid; e < BR * D4; e += WG) {
            let i = row0 + e / D4;
            var x = vec4<f32>(0.0);
            if i < p.q_len {
                x = vec4<f32>(q[((b * p.q_heads + sel) * p.q_len + i) * D4 + e % D4]) * p.scale;
            }
            qsel[e] = x;
        }
        for (var e = tid; e < BC * D4; e += WG) {
            let j = kt + e / D4;
            var x = vec4<f32>(0.0);
            if j < p.k_len {
                x = vec4<f32>(k[((b * p.kv_heads + sel_kv) * p.k_len + j) * D4 + e % D4]);
            }
            ksel[e] = x;
        }
        workgroupBarrier();
        for (var e = tid; e < BR * BC; e += WG) {
            let r = e / BC;
            let c = e % BC;
            let i = row0 + r;
            let j = kt + c;
            let pos = p.start + i;
            var t = 0.0;
            if i < p.q_len && selective_counts(j, pos) && pos < valid {
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
    for (var c = tid; c < BC; c += WG) {
        let j = kt + c;
        if j < p.k_len {
            var sum = 0.0;
            if kt + 1u < pend {
                for (var r = 0u; r < BR; r++) {
                    sum += ssel[r * BC + c];
                }
            }
            scratch[(b * p.sel_rows + qt) * p.k_len + j] = sum;
        }
    }
}

@compute @workgroup_size(WG)
fn scan(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    let b = gid.y;
    if j >= p.k_len {
        return;
    }
    var run = 0.0;
    if HAS_F0 {
        run = f0[b * p.k_len + j];
    }
    // Eight rows' loads issued before their stores, so they are in flight together (the
    // rows are independent; only the running sum is serial).
    let base = b * p.sel_rows;
    var qt = 0u;
    for (; qt + 8u <= p.sel_rows; qt += 8u) {
        var t: array<f32, 8>;
        for (var u = 0u; u < 8u; u++) {
            t[u] = scratch[(base + qt + u) * p.k_len + j];
        }
        for (var u = 0u; u < 8u; u++) {
            scratch[(base + qt + u) * p.k_len + j] = run;
            run += t[u];
        }
    }
    for (; qt < p.sel_rows; qt++) {
        let idx = (base + qt) * p.k_len + j;
        let t = scratch[idx];
        scratch[idx] = run;
        run += t;
    }
    if WRITE_F {
        f_out[b * p.k_len + j] = run;
    }
}
