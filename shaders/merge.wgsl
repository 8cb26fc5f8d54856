// Exact merge of partial attention results over disjoint key ranges (DESIGN.md §2, "Decode":
// the same combination the decode kernel applies to its splits).
//
// A partial is (O, LSE) of attention over one key range: O normalised, LSE = ln sum exp(z) over
// the range (-inf, or anything not above -1e30, for a row with no allowed key there). Two
// partials a and b of the same row merge as
//   m = max(la, lb), wa = exp(la - m), wb = exp(lb - m)
//   O = (wa Oa + wb Ob) / (wa + wb),  LSE = m + ln(wa + wb)
// which is exactly attention over the union of the ranges. More partials are folded in one at a
// time into the output (FIRST: out = merge(a, b); else out = merge(out, b)).
//
// One thread per row (it reads the row's LSE, then writes it: no other thread touches the row, so
// the in-place fold has no race). Bounds: the host checks every tensor holds rows * D4 vec4 (O)
// and rows (LSE); the grid is ceil(rows / WG) workgroups split over x and y.

struct MergeParams {
    rows: u32,
    d4: u32,
    groups_x: u32,       // workgroups along x
    neg_inf_bits: u32,   // -inf, written for a row empty in every partial
}

@group(0) @binding(0) var<uniform> mp: MergeParams;
@group(0) @binding(1) var<storage, read> a_o: array<vec4<elem>>;
@group(0) @binding(2) var<storage, read> a_lse: array<f32>;
@group(0) @binding(3) var<storage, read> b_o: array<vec4<elem>>;
@group(0) @binding(4) var<storage, read> b_lse: array<f32>;
@group(0) @binding(5) var<storage, read_write> out_o: array<vec4<elem>>;
@group(0) @binding(6) var<storage, read_write> out_lse: array<f32>;

override WG: u32 = 64u;
override FIRST: bool = true;
override SINGLE: bool = false;   // one partial: b is ignored (out = a)

@compute @workgroup_size(WG)
fn merge_pair(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let row = (wg.y * mp.groups_x + wg.x) * WG + tid;
    if row >= mp.rows {
        return;
    }
    var la: f32;
    if FIRST {
        la = a_lse[row];
    } else {
        la = out_lse[row];
    }
    let lb = b_lse[row];
    let ha = la > MASKED_HALF;
    let hb = lb > MASKED_HALF && !SINGLE;
    var m = 0.0;
    if ha && hb {
        m = max(la, lb);
    } else if ha {
        m = la;
    } else if hb {
        m = lb;
    }
    let wa = select(0.0, exp(la - m), ha);
    let wb = select(0.0, exp(lb - m), hb);
    let w = wa + wb;
    let inv = select(0.0, 1.0 / w, w > 0.0);
    for (var x = 0u; x < mp.d4; x++) {
        let e = row * mp.d4 + x;
        var oa = vec4<f32>(0.0);
        if FIRST {
            oa = vec4<f32>(a_o[e]);
        } else {
            oa = vec4<f32>(out_o[e]);
        }
        let ob = vec4<f32>(b_o[e]);
        // A partial with no key contributes nothing, whatever its O holds.
        let z = vec4<f32>(0.0);
        out_o[e] = vec4<elem>((select(z, wa * oa, ha) + select(z, wb * ob, hb)) * inv);
    }
    out_lse[row] = select(bitcast<f32>(mp.neg_inf_bits), m + log(w), w > 0.0);
}
