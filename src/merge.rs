//! Exact merging of partial attention results computed over disjoint key ranges.
//!
//! An application that splits a long context across devices or calls (key shards) runs
//! attention on each shard with LSE output, then merges: with `m = max LSE_i`,
//! `O = sum_i exp(LSE_i - m) O_i / sum_i exp(LSE_i - m)` and `LSE = m + ln sum_i exp(LSE_i - m)`,
//! which is exactly attention over the union of the shards, whatever the options (temperature,
//! gate, selective masking, causal masking by absolute position: every term of the softmax
//! belongs to exactly one shard). A row with no allowed key in a shard has LSE = -inf there
//! (any LSE at or below -1e30 counts as empty) and contributes nothing; a row empty in every
//! shard gets O = 0 and LSE = -inf, as one call would give.
//!
//! [`merge_partials`] does it on the GPU (the decode kernel merges its own splits the same
//! way); [`merge_partials_reference`] is the f64 reference.

use crate::kernels::gpu::{submit, tensor_entry};
pub use crate::kernels::merge::{MergePairConfig, MergeParams};
use crate::kernels::{Kernel, KernelKey};
use crate::{Context, DType, Error, Outputs, Result, Tensor};

/// One partial result: O `[..., D]` (f32 or f16, normalised as attention returns it) and its
/// LSE `[...]` (f32, natural log) over one key range.
#[derive(Clone, Copy, Debug)]
pub struct Partial<'a> {
    /// Output over the key range.
    pub o: &'a Tensor,
    /// Log-sum-exp of the logits over the key range.
    pub lse: &'a Tensor,
}

fn check_like(what: &'static str, t: &Tensor, shape: &[u64], dtype: DType) -> Result<()> {
    if t.shape() != shape {
        return Err(Error::ShapeMismatch {
            tensor: what,
            expected: shape.to_vec(),
            got: t.shape().to_vec(),
        });
    }
    if t.dtype() != dtype {
        return Err(Error::DTypeMismatch {
            tensor: what,
            expected: dtype,
            got: t.dtype(),
        });
    }
    Ok(())
}

/// Merges partial results over disjoint key ranges into `out.o` and (when given) `out.lse`,
/// exactly as one call over all the keys would give them (see the module docs). Every partial's
/// O has the shape and element type of `out.o`, its LSE the shape of O without the last
/// dimension; at least one partial. With one partial, it is copied. Records and submits the
/// work; outputs must not alias any input.
pub fn merge_partials(ctx: &Context, parts: &[Partial], out: &Outputs) -> Result<()> {
    submit(&ctx.device, &ctx.queue, "selattn merge partials", |enc| {
        encode_merge_partials(ctx, enc, parts, out)
    })
}

/// [`merge_partials`] recorded into an encoder the application owns (no submit).
pub fn encode_merge_partials(
    ctx: &Context,
    encoder: &mut wgpu::CommandEncoder,
    parts: &[Partial],
    out: &Outputs,
) -> Result<()> {
    let first = parts.first().ok_or(Error::ZeroSize { what: "partials" })?;
    if out.f_out.is_some() {
        return Err(Error::InputWithoutUse {
            what: "F_out",
            why: "merging partials has no selective state to write",
        });
    }
    let oshape = out.o.shape().to_vec();
    let elem = out.o.dtype();
    if elem == DType::U32 {
        return Err(Error::DTypeMismatch {
            tensor: "o",
            expected: DType::F32,
            got: DType::U32,
        });
    }
    let d = *oshape.last().ok_or(Error::ShapeMismatch {
        tensor: "o",
        expected: vec![0, 0, 0, 0],
        got: oshape.clone(),
    })?;
    if d == 0 || !d.is_multiple_of(4) {
        return Err(Error::ShapeMismatch {
            tensor: "o (last dimension a multiple of 4)",
            expected: first.o.shape().to_vec(),
            got: oshape.clone(),
        });
    }
    let lshape = oshape[..oshape.len() - 1].to_vec();
    let rows: u64 = lshape.iter().product();
    for p in parts {
        check_like("partial o", p.o, &oshape, elem)?;
        check_like("partial lse", p.lse, &lshape, DType::F32)?;
    }
    if let Some(l) = out.lse {
        check_like("lse", l, &lshape, DType::F32)?;
    }
    let d4 = d / 4;
    if rows == 0 || rows * d4 > u32::MAX as u64 {
        return Err(Error::TooLarge {
            what: "rows of the partials",
            bytes: rows * d4,
            limit: u32::MAX as u64,
        });
    }
    // Outputs alias nothing: not an input, not each other.
    let outs = [Some(out.o), out.lse];
    for o in outs.iter().flatten() {
        if parts
            .iter()
            .any(|p| p.o.buffer() == o.buffer() || p.lse.buffer() == o.buffer())
        {
            return Err(Error::BadBuffer {
                why: "an output of the merge aliases a partial".into(),
            });
        }
    }
    if out.lse.is_some_and(|l| l.buffer() == out.o.buffer()) {
        return Err(Error::BadBuffer {
            why: "O and LSE share a buffer".into(),
        });
    }
    let caps = ctx.capabilities();
    let gpu = ctx.gpu();
    let wg = caps.max_invocations.clamp(1, 64);
    let groups = (rows as u32).div_ceil(wg);
    let max = caps.max_workgroups_per_dim.max(1);
    let gx = groups.min(max);
    let gy = groups.div_ceil(gx);
    if gy > max {
        return Err(Error::TooLarge {
            what: "rows of the partials per dispatch",
            bytes: rows,
            limit: max as u64 * max as u64 * wg as u64,
        });
    }
    let params = MergeParams {
        rows: rows as u32,
        d4: d4 as u32,
        groups_x: gx,
        neg_inf_bits: f32::NEG_INFINITY.to_bits(),
    };
    let ubuf = gpu.uniform("selattn merge params", bytemuck::bytes_of(&params));
    // The LSE accumulator: the caller's, or scratch.
    let scratch;
    let lse_out = match out.lse {
        Some(l) => l,
        None => {
            scratch = ctx.empty(&lshape, DType::F32)?;
            &scratch
        }
    };
    // One partial: copied (its b side bound but ignored).
    let second = parts.get(1).unwrap_or(first);
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("selattn merge partials"),
        timestamp_writes: None,
    });
    for (k, b) in std::iter::once(second)
        .chain(parts.iter().skip(2))
        .enumerate()
    {
        let cfg = MergePairConfig {
            wg,
            first: k == 0,
            single: parts.len() == 1,
        };
        let key = KernelKey {
            kernel: Kernel::MergePair(cfg),
            elem,
        };
        let a = if k == 0 { Some(first) } else { None };
        let entries = [
            wgpu::BindGroupEntry {
                binding: 0,
                resource: ubuf.as_entire_binding(),
            },
            tensor_entry(1, a.map(|p| tb(p.o)), gpu.dummy_in),
            tensor_entry(2, a.map(|p| tb(p.lse)), gpu.dummy_in),
            tensor_entry(3, Some(tb(b.o)), gpu.dummy_in),
            tensor_entry(4, Some(tb(b.lse)), gpu.dummy_in),
            tensor_entry(5, Some(tb(out.o)), gpu.dummy_out),
            tensor_entry(6, Some(tb(lse_out)), gpu.dummy_out),
        ];
        gpu.dispatch(
            &mut pass,
            "selattn merge partials",
            key,
            &entries,
            [gx, gy, 1],
        )?;
    }
    Ok(())
}

/// A tensor as `tensor_entry` binds it: its buffer and its own bytes.
fn tb(t: &Tensor) -> (&wgpu::Buffer, u64) {
    (t.buffer(), t.bytes())
}

/// The f64 reference of [`merge_partials`]: partials as (O `[rows * d]`, LSE `[rows]`), merged
/// row by row. LSE of an empty row is `-inf` (or anything at or below -1e30).
pub fn merge_partials_reference(parts: &[(&[f64], &[f64])], d: usize) -> (Vec<f64>, Vec<f64>) {
    let rows = parts.first().map_or(0, |p| p.1.len());
    let mut o = vec![0.0; rows * d];
    let mut lse = vec![f64::NEG_INFINITY; rows];
    for r in 0..rows {
        let live: Vec<&(&[f64], &[f64])> = parts.iter().filter(|p| p.1[r] > -1e30).collect();
        let Some(m) = live.iter().map(|p| p.1[r]).reduce(f64::max) else {
            continue;
        };
        let w: f64 = live.iter().map(|p| (p.1[r] - m).exp()).sum();
        lse[r] = m + w.ln();
        for p in &live {
            let wi = (p.1[r] - m).exp() / w;
            for x in 0..d {
                o[r * d + x] += wi * p.0[r * d + x];
            }
        }
    }
    (o, lse)
}
