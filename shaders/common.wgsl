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
    n_qtiles: u32,   // ceil(q_len / BR): rows of the selective scratch per batch element
    _pad0: u32,
    _pad1: u32,
}

const LOG2E: f32 = 1.4426950408889634;
const LN2: f32 = 0.6931471805599453;
// Masked logits are this sentinel rather than -inf, so no inf - inf can ever form a NaN;
// every use checks `> MASKED_HALF` explicitly instead of relying on exp2 underflow.
const MASKED: f32 = -1.0e30;
const MASKED_HALF: f32 = -5.0e29;

fn neg_inf() -> f32 {
    return bitcast<f32>(0xff800000u);
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

// What a query's logits are multiplied by so that exp2 gives the softmax: scale * t * log2(e).
fn row_factor_of(scale: f32, t: f32) -> f32 {
    return scale * t * LOG2E;
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
