//! The public entry point: one attention call on GPU tensors.

use crate::kernels::forward::{self, Plan};
use crate::kernels::gpu::submit;
use crate::spec::{Options, Shape, Spec, Switches};
use crate::tensor::{check_binding_sizes, check_no_alias};
use crate::{Context, DType, Error, Result, Tensor};

/// The input tensors of one call. Q, K, V share one element type (f32, or f16 with SHADER_F16);
/// tau, alpha, gate and F0 are f32; kv_len is u32.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// Q `[B, Hq, Nq, D]`.
    pub q: &'a Tensor,
    /// K `[B, Hkv, Nk, D]`.
    pub k: &'a Tensor,
    /// V `[B, Hkv, Nk, D]`.
    pub v: &'a Tensor,
    /// Per-query temperature `[B, Hq, Nq]`.
    pub tau: Option<&'a Tensor>,
    /// Positional-temperature coefficient `[Hq]`.
    pub alpha: Option<&'a Tensor>,
    /// Per-key value gate `[B, Hkv, Nk]`.
    pub gate: Option<&'a Tensor>,
    /// Valid keys per batch element `[B]`, u32. Values above Nk are treated as Nk on the GPU.
    pub kv_len: Option<&'a Tensor>,
    /// Selective state carried in `[B, Nk]`.
    pub f0: Option<&'a Tensor>,
}

impl<'a> Inputs<'a> {
    /// Every input tensor in field order (Q, K, V, tau, alpha, gate, kv_len, F0), `None` where
    /// absent.
    pub(crate) fn tensors(&self) -> [Option<&'a Tensor>; 8] {
        [
            Some(self.q),
            Some(self.k),
            Some(self.v),
            self.tau,
            self.alpha,
            self.gate,
            self.kv_len,
            self.f0,
        ]
    }

    /// Q, K and V with every optional input absent.
    pub fn new(q: &'a Tensor, k: &'a Tensor, v: &'a Tensor) -> Self {
        Inputs {
            q,
            k,
            v,
            tau: None,
            alpha: None,
            gate: None,
            kv_len: None,
            f0: None,
        }
    }
    /// With a per-query temperature.
    pub fn tau(mut self, t: &'a Tensor) -> Self {
        self.tau = Some(t);
        self
    }
    /// With a positional-temperature coefficient per head.
    pub fn alpha(mut self, t: &'a Tensor) -> Self {
        self.alpha = Some(t);
        self
    }
    /// With a per-key value gate.
    pub fn gate(mut self, t: &'a Tensor) -> Self {
        self.gate = Some(t);
        self
    }
    /// With valid key counts per batch element.
    pub fn kv_len(mut self, t: &'a Tensor) -> Self {
        self.kv_len = Some(t);
        self
    }
    /// With selective state carried in from an earlier chunk.
    pub fn f0(mut self, t: &'a Tensor) -> Self {
        self.f0 = Some(t);
        self
    }

    /// The shape these inputs imply (Q and K decide it; everything else is checked against it).
    pub fn shape(&self) -> Result<Shape> {
        let q = self.q.shape();
        let k = self.k.shape();
        if q.len() != 4 {
            return Err(Error::RankMismatch {
                tensor: "q",
                rank: 4,
                got: q.to_vec(),
            });
        }
        if k.len() != 4 {
            return Err(Error::RankMismatch {
                tensor: "k",
                rank: 4,
                got: k.to_vec(),
            });
        }
        let u = |x: u64, what| {
            u32::try_from(x).map_err(|_| Error::CountTooLarge {
                what,
                count: x,
                limit: u32::MAX as u64,
            })
        };
        Ok(Shape {
            batch: u(q[0], "batch")?,
            q_heads: u(q[1], "query heads")?,
            kv_heads: u(k[1], "KV heads")?,
            q_len: u(q[2], "queries")?,
            k_len: u(k[2], "keys")?,
            head_dim: u(q[3], "head dim")?,
        })
    }
}

/// The output tensors of one call.
#[derive(Clone, Copy, Debug)]
pub struct Outputs<'a> {
    /// O `[B, Hq, Nq, D]`, the element type of Q.
    pub o: &'a Tensor,
    /// LSE `[B, Hq, Nq]`, f32, natural log.
    pub lse: Option<&'a Tensor>,
    /// F_out `[B, Nk]`, f32 (selective masking only).
    pub f_out: Option<&'a Tensor>,
}

impl<'a> Outputs<'a> {
    /// Only O.
    pub fn new(o: &'a Tensor) -> Self {
        Outputs {
            o,
            lse: None,
            f_out: None,
        }
    }
    /// Also LSE.
    pub fn lse(mut self, t: &'a Tensor) -> Self {
        self.lse = Some(t);
        self
    }
    /// Also F_out.
    pub fn f_out(mut self, t: &'a Tensor) -> Self {
        self.f_out = Some(t);
        self
    }
}

/// Freshly allocated outputs of [`Context::attention_alloc`].
#[derive(Clone, Debug)]
pub struct Output {
    /// O.
    pub o: Tensor,
    /// LSE.
    pub lse: Tensor,
    /// F_out, with selective masking.
    pub f_out: Option<Tensor>,
}

pub(crate) fn check(
    tensor: &'static str,
    t: &Tensor,
    expected: Vec<u64>,
    dtype: DType,
) -> Result<()> {
    if t.shape() != expected.as_slice() {
        return Err(Error::ShapeMismatch {
            tensor,
            expected,
            got: t.shape().to_vec(),
        });
    }
    if t.dtype() != dtype {
        return Err(Error::DTypeMismatch {
            tensor,
            expected: dtype,
            got: t.dtype(),
        });
    }
    Ok(())
}

impl Context {
    /// Validates a call against its tensors and this device, and plans it. This is where every
    /// size the unchecked shaders rely on is verified (see `spec`'s module docs).
    // Long on purpose: one flat list of checks in the order their errors are reported (shape,
    // then every tensor, then limits, then aliasing); the safety boundary reads best in one place.
    pub fn plan(&self, inputs: &Inputs, options: &Options, outputs: &Outputs) -> Result<Plan> {
        for (what, t) in [
            ("q", Some(inputs.q)),
            ("k", Some(inputs.k)),
            ("v", Some(inputs.v)),
            ("tau", inputs.tau),
            ("alpha", inputs.alpha),
            ("gate", inputs.gate),
            ("kv_len", inputs.kv_len),
            ("f0", inputs.f0),
            ("o", Some(outputs.o)),
            ("lse", outputs.lse),
            ("f_out", outputs.f_out),
        ] {
            if let Some(t) = t {
                self.owns(what, t)?;
            }
        }
        let shape = inputs.shape()?;
        let present = Switches {
            causal: options.causal,
            selective: options.selective.is_some(),
            tau: inputs.tau.is_some(),
            alpha: inputs.alpha.is_some(),
            gate: inputs.gate.is_some(),
            kv_len: inputs.kv_len.is_some(),
            f0: inputs.f0.is_some(),
            lse: outputs.lse.is_some(),
            f_out: outputs.f_out.is_some(),
        };
        let r = Spec {
            shape,
            options: *options,
            present,
        }
        .validate()?;
        let elem = inputs.q.dtype();
        if elem == DType::U32 {
            return Err(Error::DTypeMismatch {
                tensor: "q",
                expected: DType::F32,
                got: elem,
            });
        }
        if elem == DType::F16 && !self.capabilities().f16 {
            return Err(Error::FeatureMissing {
                feature: "SHADER_F16",
            });
        }
        check("q", inputs.q, shape.q_dims(), elem)?;
        check("k", inputs.k, shape.kv_dims(), elem)?;
        check("v", inputs.v, shape.kv_dims(), elem)?;
        check("o", outputs.o, shape.q_dims(), elem)?;
        let opt = |name, t: Option<&Tensor>, dims: Vec<u64>, dt| match t {
            Some(t) => check(name, t, dims, dt),
            None => Ok(()),
        };
        opt("tau", inputs.tau, shape.row_dims(), DType::F32)?;
        opt("alpha", inputs.alpha, shape.alpha_dims(), DType::F32)?;
        opt("gate", inputs.gate, shape.gate_dims(), DType::F32)?;
        opt("kv_len", inputs.kv_len, shape.kv_len_dims(), DType::U32)?;
        opt("f0", inputs.f0, shape.f_dims(), DType::F32)?;
        opt("lse", outputs.lse, shape.row_dims(), DType::F32)?;
        opt("f_out", outputs.f_out, shape.f_dims(), DType::F32)?;
        let limit = self.capabilities().max_storage_binding;
        check_binding_sizes(
            limit,
            &[
                ("q", Some(inputs.q)),
                ("k", Some(inputs.k)),
                ("v", Some(inputs.v)),
                ("o", Some(outputs.o)),
            ],
        )?;
        // Outputs must not alias inputs or each other: the GPU would race on them.
        let ins = inputs.tensors();
        let outs = [Some(outputs.o), outputs.lse, outputs.f_out];
        check_no_alias(
            &ins,
            &outs,
            "an output buffer aliases another input or output",
        )?;
        Plan::new(self.capabilities(), &r, elem)
    }

    /// Scratch bytes a call would allocate (see [`Plan::scratch_bytes`]).
    pub fn scratch_bytes(
        &self,
        inputs: &Inputs,
        options: &Options,
        outputs: &Outputs,
    ) -> Result<u64> {
        Ok(self.plan(inputs, options, outputs)?.scratch_bytes())
    }

    /// Runs one attention call and submits it. Returns once the work is queued; read results with
    /// [`Context::download`] (which waits) or call [`Context::sync`].
    pub fn attention(&self, inputs: &Inputs, options: &Options, outputs: &Outputs) -> Result<()> {
        let plan = self.plan(inputs, options, outputs)?;
        submit(&self.device, &self.queue, "selattn attention", |enc| {
            self.encode_plan(enc, &plan, inputs, outputs, None)
        })
    }

    /// Allocates O, LSE (and F_out with selective masking) and runs the call.
    pub fn attention_alloc(&self, inputs: &Inputs, options: &Options) -> Result<Output> {
        let shape = inputs.shape()?;
        let o = self.empty(&shape.q_dims(), inputs.q.dtype())?;
        let lse = self.empty(&shape.row_dims(), DType::F32)?;
        let f_out = match options.selective {
            Some(_) => Some(self.empty(&shape.f_dims(), DType::F32)?),
            None => None,
        };
        let mut outs = Outputs::new(&o).lse(&lse);
        if let Some(f) = &f_out {
            outs = outs.f_out(f);
        }
        self.attention(inputs, options, &outs)?;
        Ok(Output { o, lse, f_out })
    }

    fn scratch(&self, bytes: u64) -> Result<wgpu::Buffer> {
        let mut guard = self
            .scratch
            .lock()
            .map_err(|_| Error::gpu_msg("locking the selective scratch (poisoned by a panic)"))?;
        if let Some(b) = guard.as_ref() {
            if b.size() >= bytes {
                return Ok(b.clone());
            }
        }
        let b = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("selattn selective scratch"),
            size: bytes.max(16),
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        *guard = Some(b.clone());
        Ok(b)
    }

    /// Records one attention call into an encoder the application owns (no submit).
    ///
    /// The encoder must have been created from this context's device (`Context::device`).
    /// wgpu 30 offers no way to ask an encoder for its device, so this one precondition can't
    /// be checked here: an encoder of another device is a caller bug that wgpu may report by
    /// panicking. Every tensor and cache is checked (`Error::ForeignTensor`).
    pub fn encode_attention(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        inputs: &Inputs,
        options: &Options,
        outputs: &Outputs,
    ) -> Result<()> {
        let plan = self.plan(inputs, options, outputs)?;
        self.scoped("recording attention", || {
            self.encode_plan(encoder, &plan, inputs, outputs, None)
        })
    }

    /// Like [`Context::encode_attention`], with GPU timestamps written at the beginning and end
    /// of the one compute pass that holds every dispatch of the call (needs TIMESTAMP_QUERY).
    pub fn encode_attention_timed(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        inputs: &Inputs,
        options: &Options,
        outputs: &Outputs,
        timestamps: wgpu::ComputePassTimestampWrites<'_>,
    ) -> Result<()> {
        if !self.capabilities().timestamps {
            return Err(Error::FeatureMissing {
                feature: "TIMESTAMP_QUERY",
            });
        }
        let plan = self.plan(inputs, options, outputs)?;
        self.scoped("recording attention", || {
            self.encode_plan(encoder, &plan, inputs, outputs, Some(timestamps))
        })
    }

    /// Like [`Context::encode_attention`], with a GPU timestamp written into `query_set` before
    /// every dispatch and one after the last (indices 0, 1, ...; needs
    /// TIMESTAMP_QUERY_INSIDE_PASSES): a per-kernel profile (selective masking's column sums and
    /// scan, then the attention kernel). Returns the label of each dispatch, in order (dispatch
    /// `n` ran between timestamps `n` and `n + 1`). `capacity` is the query set's count; a call
    /// that needs more writes nothing and returns an error.
    pub fn encode_attention_profiled(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        inputs: &Inputs,
        options: &Options,
        outputs: &Outputs,
        query_set: &wgpu::QuerySet,
        capacity: u32,
    ) -> Result<Vec<String>> {
        self.profile_supported()?;
        let plan = self.plan(inputs, options, outputs)?;
        let labels = forward::dispatch_labels(&plan);
        Self::profile_room("profiling attention", labels.len(), capacity)?;
        self.scoped("recording attention", || {
            self.encode_plan_profiled(encoder, &plan, inputs, outputs, None, Some(query_set))
        })?;
        Ok(labels)
    }

    pub(crate) fn encode_plan(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        plan: &Plan,
        inputs: &Inputs,
        outputs: &Outputs,
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) -> Result<()> {
        self.encode_plan_profiled(encoder, plan, inputs, outputs, timestamps, None)
    }

    fn encode_plan_profiled(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        plan: &Plan,
        inputs: &Inputs,
        outputs: &Outputs,
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
        profile: Option<&wgpu::QuerySet>,
    ) -> Result<()> {
        let scratch = match plan.selective {
            Some(_) => self.scratch(plan.scratch_bytes())?,
            None => self.gpu().dummy_in.clone(),
        };
        let buffers = forward::Buffers {
            q: bound(inputs.q),
            k: bound(inputs.k),
            v: bound(inputs.v),
            tau: inputs.tau.map(bound),
            alpha: inputs.alpha.map(bound),
            gate: inputs.gate.map(bound),
            kv_len: inputs.kv_len.map(bound),
            f0: inputs.f0.map(bound),
            o: bound(outputs.o),
            lse: outputs.lse.map(bound),
            f_out: outputs.f_out.map(bound),
        };
        forward::encode(
            &self.gpu(),
            encoder,
            plan,
            &buffers,
            &scratch,
            timestamps,
            profile,
        )
    }
}

/// A tensor's buffer with the bytes a kernel binds of it.
fn bound(t: &Tensor) -> (&wgpu::Buffer, u64) {
    (t.buffer(), t.bytes())
}
