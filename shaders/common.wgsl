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
