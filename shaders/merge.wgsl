// Exact merge of partial attention results over disjoint key ranges (DESIGN.md §2, "Decode":
// the same combination the decode kernel applies to its splits).
//
// A partial is (O, LSE) of attention over one key range: O normalised, LSE = ln sum exp(z) over
// the range (-inf, or anything not above -1e30, for a row with no allowed key there). LSE is
// bound as `array<u32>` (f32 bits) so that no float in the shader is ever infinite (Tint): an
// LSE whose exponent bits are all ones counts as empty. Two partials a and b of the same row merge as
//   m = max(la, lb), wa = exp(la - m), wb = exp(lb - m)   (from halves: la - m cannot overflow)
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
@group(0) @binding(2) var<storage, read> a_lse: array<u32>;
@group(0) @binding(3) var<storage, read> b_o: array<vec4<elem>>;
@group(0) @binding(4) var<storage, read> b_lse: array<u32>;
@group(0) @binding(5) var<storage, read_write> out_o: array<vec4<elem>>;
@group(0) @binding(6) var<storage, read_write> out_lse: array<u32>;

override WG: u32 = 64u;
override FIRST: bool = true;
override SINGLE: bool = false;   // one partial: b is ignored (out = a)

// Whether an LSE (as bits) belongs to a partial with an allowed key: finite and above -1e30.
fn has_keys(bits: u32) -> bool {
    return (bits & 0x7f800000u) != 0x7f800000u && bitcast<f32>(bits) > MASKED_HALF;
}

// exp(x - m) for x <= m, from halves (x - m cannot overflow), finite for finite x and m.
fn exp_below(x: f32, m: f32) -> f32 {
    return exp(max(0.5 * x - 0.5 * m, -64.0) * 2.0);
}

@compute @workgroup_size(WG)
fn merge_pair(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let row = (wg.y * mp.groups_x + wg.x) * WG + tid;
    if row >= mp.rows {
        return;
    }
    var la_bits: u32;
    if FIRST {
        la_bits = a_lse[row];
    } else {
        la_bits = out_lse[row];
    }
    let lb_bits = b_lse[row];
    let ha = has_keys(la_bits);
    let hb = has_keys(lb_bits) && !SINGLE;
    // Only finite values are ever read as floats.
    let la = bitcast<f32>(select(0u, la_bits, ha));
    let lb = bitcast<f32>(select(0u, lb_bits, hb));
    var m = 0.0;
    if ha && hb {
        m = max(la, lb);
    } else if ha {
        m = la;
    } else if hb {
        m = lb;
    }
    let wa = select(0.0, exp_below(la, m), ha);
    let wb = select(0.0, exp_below(lb, m), hb);
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
    out_lse[row] = select(mp.neg_inf_bits, bitcast<u32>(m + log(max(w, 1.0e-30))), w > 0.0);
}
