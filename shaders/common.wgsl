// Shared by every kernel family; prepended at load time after the element-type prelude
// (`alias elem = f32;` or `enable f16; alias elem = f16;`).

// Parameters of one attention call, mirrored field for field by `kernels::Params` in Rust.
struct Params {
    batch: u32,
    q_heads: u32,
    kv_heads: u32,
    q_len: u32,
    k_len: u32,
    group: u32,      // q_heads / kv_heads
    start: u32,      // absolute position of query row 0
    sel_head: u32,   // selection head (selective masking)
    scale: f32,      // logit scale
    n_qtiles: u32,   // ceil(q_len / BR)
    sel_rows: u32,   // rows of the selective scratch per batch element (n_qtiles, or ceil(q_len / 16))
    _pad1: u32,
}

const LOG2E: f32 = 1.4426950408889634;
const LN2: f32 = 0.6931471805599453;
// Masked logits are this sentinel rather than -inf, so no inf - inf can ever form a NaN;
// every use checks `> MASKED_HALF` explicitly instead of relying on exp2 underflow.
const MASKED: f32 = -1.0e30;
const MASKED_HALF: f32 = -5.0e29;

// No shader holds an infinite or NaN float, at compile time or at run time: Tint (Chrome) rejects
// an infinite constant, and WGSL lets implementations assume every float is finite. The LSE of
// a row with no allowed key is -inf by contract, so LSE buffers are bound as `array<u32>` and
// that value is written as its bit pattern.
const NEG_INF_BITS: u32 = 0xff800000u;

// Masked logits in the forward and decode kernels: the lowest finite f32 (-FLT_MAX, written in
// hex so that the literal is exact: Tint rejects a decimal that rounds from beyond the f32
// range), so no allowed logit is ever below a masked one; whether a key is allowed is tracked
// separately, never read off the logit's value.
const LOWEST: f32 = -0x1.fffffep+127f;

// The bits of LSE = (m + log2(l)) * ln 2 for a row with running max `m` (log2 units) and sum
// `l`, or of -inf when `l` is 0 (nothing allowed). `l` is clamped first so that no branch of
// the select computes log2(0).
fn lse_bits(m: f32, l: f32) -> u32 {
    return select(NEG_INF_BITS, bitcast<u32>((m + log2(max(l, 1.0e-30))) * LN2), l > 0.0);
}

// The same for a row max kept in natural-log units (the forward and decode kernels).
fn lse_bits_ln(m: f32, l: f32) -> u32 {
    return select(NEG_INF_BITS, bitcast<u32>(m + log(max(l, 1.0e-30))), l > 0.0);
}

// 1 / l, or 0 when `l` is 0 (a row with nothing allowed), without ever dividing by 0.
fn inv_or_zero(l: f32) -> f32 {
    return select(0.0, 1.0 / max(l, 1.0e-30), l > 0.0);
}

// ---- The operator's formulas (DESIGN.md §1), written once for every kernel family ----------
// A kernel reads its optional inputs itself (it alone knows whether they are bound) and passes
// the values in.

// Keys a batch element attends to: its kv_len, clamped to Nk.
fn valid_key_count(kv_len: u32, k_len: u32) -> u32 {
    return min(kv_len, k_len);
}

// Temperature of the query at absolute position `pos` with positional coefficient `alpha`:
// t = tau + alpha * ln(pos + 1) (`tau` is 1 without a per-query temperature).
fn temperature(tau: f32, alpha: f32, pos: u32) -> f32 {
    return tau + alpha * log(f32(pos + 1u));
}

// Selective masking: the selection head's score of the key at `key_pos` counts against the
// queries after the one at `query_pos` when 0 < key_pos < query_pos (the first token and the
// query itself are never masked).
fn selective_counts(key_pos: u32, query_pos: u32) -> bool {
    return key_pos > 0u && key_pos < query_pos;
}

// `selective_counts` for four keys at once.
fn selective_counts4(key_pos: vec4<u32>, query_pos: u32) -> vec4<bool> {
    return (key_pos > vec4<u32>(0u)) & (key_pos < vec4<u32>(query_pos));
}
