//! The backward call: gradients of one attention call on GPU tensors (DESIGN.md §1b).

use crate::attention::check;
use crate::kernels::backward::{BackwardPlan, Entry, Wanted};
use crate::kernels::coop_backward::{CoopEntry, ROWS};
use crate::kernels::gpu::{entry, submit, tensor_entry};
use crate::kernels::{Kernel, KernelKey};
use crate::spec::Options;
use crate::tensor::{check_binding_sizes, check_no_alias};
use crate::{Context, DType, Error, Inputs, Outputs, Result, Tensor};

/// What flows into the backward pass: the forward's O and LSE (from the same inputs and options)
/// and the gradient of the loss with respect to O (and to F_out, when a later chunk used it).
#[derive(Clone, Copy, Debug)]
pub struct Upstream<'a> {
    /// The forward's O `[B, Hq, Nq, D]`, the element type of Q.
    pub o: &'a Tensor,
    /// The forward's LSE `[B, Hq, Nq]`, f32.
    pub lse: &'a Tensor,
    /// dO `[B, Hq, Nq, D]`, the element type of Q.
    pub d_o: &'a Tensor,
    /// dF_out `[B, Nk]`, f32 (selective masking only; zero where absent).
    pub df_out: Option<&'a Tensor>,
}

impl<'a> Upstream<'a> {
    /// O, LSE and dO; no dF_out.
    pub fn new(o: &'a Tensor, lse: &'a Tensor, d_o: &'a Tensor) -> Self {
        Upstream {
            o,
            lse,
            d_o,
            df_out: None,
        }
    }
    /// With the gradient of F_out.
    pub fn df_out(mut self, t: &'a Tensor) -> Self {
        self.df_out = Some(t);
        self
    }
}

/// The gradients a backward call writes; each is optional, and only what is asked for is
/// computed (a caller training only tau and the gate pays for no dQ, dK or dV stores).
/// dQ, dK, dV have the element type of Q; the others are f32. A gradient of an absent optional
/// input is the derivative at its default (tau = 1, alpha = 0, gate = 1, F0 = 0).
#[derive(Clone, Copy, Debug, Default)]
pub struct Grads<'a> {
    /// dQ `[B, Hq, Nq, D]`.
    pub dq: Option<&'a Tensor>,
    /// dK `[B, Hkv, Nk, D]`.
    pub dk: Option<&'a Tensor>,
    /// dV `[B, Hkv, Nk, D]`.
    pub dv: Option<&'a Tensor>,
    /// dtau `[B, Hq, Nq]`.
    pub dtau: Option<&'a Tensor>,
    /// dalpha `[Hq]`.
    pub dalpha: Option<&'a Tensor>,
    /// dgate `[B, Hkv, Nk]`.
    pub dgate: Option<&'a Tensor>,
    /// dF0 `[B, Nk]` (selective masking only): pass it as the previous chunk's dF_out.
    pub df0: Option<&'a Tensor>,
}

impl<'a> Grads<'a> {
    /// No gradient yet.
    pub fn new() -> Self {
        Self::default()
    }
    /// Also dQ.
    pub fn dq(mut self, t: &'a Tensor) -> Self {
        self.dq = Some(t);
        self
    }
    /// Also dK.
    pub fn dk(mut self, t: &'a Tensor) -> Self {
        self.dk = Some(t);
        self
    }
    /// Also dV.
    pub fn dv(mut self, t: &'a Tensor) -> Self {
        self.dv = Some(t);
        self
    }
    /// Also dtau.
    pub fn dtau(mut self, t: &'a Tensor) -> Self {
        self.dtau = Some(t);
        self
    }
    /// Also dalpha.
    pub fn dalpha(mut self, t: &'a Tensor) -> Self {
        self.dalpha = Some(t);
        self
    }
    /// Also dgate.
    pub fn dgate(mut self, t: &'a Tensor) -> Self {
        self.dgate = Some(t);
        self
    }
    /// Also dF0.
    pub fn df0(mut self, t: &'a Tensor) -> Self {
        self.df0 = Some(t);
        self
    }
}

impl Context {
    /// Validates a backward call against its tensors and this device, and plans it. Every size
    /// the unchecked shaders rely on is verified here (see `spec`'s module docs): the forward's
    /// checks of the inputs, O and LSE, then dO, dF_out and every gradient's shape and type, and
    /// that no gradient aliases an input or another gradient.
    pub fn backward_plan(
        &self,
        inputs: &Inputs,
        options: &Options,
        up: &Upstream,
        grads: &Grads,
    ) -> Result<BackwardPlan> {
        let fwd = self.plan(inputs, options, &Outputs::new(up.o).lse(up.lse))?;
        let r = fwd.resolved;
        let s = r.shape;
        let elem = fwd.elem;
        let selective = r.selective();
        self.owns("dO", up.d_o)?;
        check("dO", up.d_o, s.q_dims(), elem)?;
        if let Some(t) = up.df_out {
            self.owns("dF_out", t)?;
            if !selective {
                return Err(Error::InputWithoutUse {
                    what: "dF_out",
                    why: "selective masking is off",
                });
            }
            check("dF_out", t, s.f_dims(), DType::F32)?;
        }
        if grads.df0.is_some() && !selective {
            return Err(Error::InputWithoutUse {
                what: "dF0",
                why: "selective masking is off",
            });
        }
        let opt = |name, t: Option<&Tensor>, dims: Vec<u64>, dt| match t {
            Some(t) => self.owns(name, t).and_then(|_| check(name, t, dims, dt)),
            None => Ok(()),
        };
        opt("dq", grads.dq, s.q_dims(), elem)?;
        opt("dk", grads.dk, s.kv_dims(), elem)?;
        opt("dv", grads.dv, s.kv_dims(), elem)?;
        opt("dtau", grads.dtau, s.row_dims(), DType::F32)?;
        opt("dalpha", grads.dalpha, s.alpha_dims(), DType::F32)?;
        opt("dgate", grads.dgate, s.gate_dims(), DType::F32)?;
        opt("df0", grads.df0, s.f_dims(), DType::F32)?;
        let limit = self.capabilities().max_storage_binding;
        check_binding_sizes(
            limit,
            &[
                ("dO", Some(up.d_o)),
                ("dq", grads.dq),
                ("dk", grads.dk),
                ("dv", grads.dv),
            ],
        )?;
        check_backward_aliases(inputs, up, grads)?;
        let wanted = Wanted {
            dq: grads.dq.is_some(),
            dk: grads.dk.is_some(),
            dv: grads.dv.is_some(),
            dgate: grads.dgate.is_some(),
            dtau: grads.dtau.is_some(),
            dalpha: grads.dalpha.is_some(),
            df0: grads.df0.is_some(),
            df_out: up.df_out.is_some(),
        };
        BackwardPlan::new(self.capabilities(), &r, elem, wanted)
    }

    /// Scratch bytes a backward call would allocate (see [`BackwardPlan::scratch_bytes`]).
    pub fn backward_scratch_bytes(
        &self,
        inputs: &Inputs,
        options: &Options,
        up: &Upstream,
        grads: &Grads,
    ) -> Result<u64> {
        Ok(self
            .backward_plan(inputs, options, up, grads)?
            .scratch_bytes())
    }

    /// Runs one backward call and submits it: writes the gradients `grads` asks for. `inputs`
    /// and `options` are the forward's; `up` carries its O and LSE and the upstream gradients.
    /// The scratch ([`Context::backward_scratch_bytes`]) is kept in the context between calls
    /// (it only grows) and cleared at the start of each call; `SELATTN_BACKWARD_KEEP=0`
    /// allocates it per call instead.
    ///
    /// A training step: forward (keeping LSE), backward for dQ and dtau only, checked against
    /// the f64 reference backward (runs on any adapter, software ones included):
    ///
    /// ```
    /// use selattn::reference::HostInputs;
    /// use selattn::{reference_backward, Context, Grads, Inputs, Options, Role, Shape, Spec, Upstream};
    ///
    /// # fn main() -> selattn::Result<()> {
    /// let ctx = Context::new()?;
    /// let shape = Shape::new(1, 2, 8, 8); // B, H, N, D
    /// let n = |r: Role| shape.dims(r).iter().product::<u64>() as usize;
    /// let data = |len: usize, m: usize| (0..len).map(|i| ((i * m % 11) as f32 - 5.0) / 5.0).collect();
    /// let x = HostInputs {
    ///     q: data(n(Role::Q), 3),
    ///     k: data(n(Role::K), 5),
    ///     v: data(n(Role::V), 7),
    ///     tau: Some(vec![0.8; n(Role::Tau)]),
    ///     ..HostInputs::default()
    /// };
    /// let d_o: Vec<f32> = data(n(Role::Q), 2);
    /// let up = |r: Role, d: &[f32]| ctx.upload_as(&shape, r, d);
    /// let (q, k, v, tau) = (up(Role::Q, &x.q)?, up(Role::K, &x.k)?, up(Role::V, &x.v)?, up(Role::Tau, x.tau.as_deref().unwrap_or_default())?);
    /// let inputs = Inputs::new(&q, &k, &v).tau(&tau);
    /// let options = Options::causal();
    /// let out = ctx.attention_alloc(&inputs, &options)?; // O and LSE
    /// let g_o = up(Role::Q, &d_o)?;
    /// let dq = ctx.empty_as(&shape, Role::Q)?;
    /// let dtau = ctx.empty_as(&shape, Role::Tau)?;
    /// ctx.backward(&inputs, &options, &Upstream::new(&out.o, &out.lse, &g_o), &Grads::new().dq(&dq).dtau(&dtau))?;
    ///
    /// let spec = Spec { shape, options, present: x.present(false) };
    /// let want = reference_backward::backward(&spec, &x, &d_o, None)?;
    /// let close = |got: Vec<f32>, want: &[f64]| got.iter().zip(want).all(|(g, w)| (*g as f64 - w).abs() < 1e-4);
    /// assert!(close(ctx.download(&dq)?, &want.dq));
    /// assert!(close(ctx.download(&dtau)?, &want.dtau));
    /// # Ok(())
    /// # }
    /// ```
    pub fn backward(
        &self,
        inputs: &Inputs,
        options: &Options,
        up: &Upstream,
        grads: &Grads,
    ) -> Result<()> {
        submit(&self.device, &self.queue, "selattn backward", |enc| {
            self.encode_backward(enc, inputs, options, up, grads)
        })
    }

    /// Records one backward call into an encoder the application owns (no submit).
    ///
    /// The encoder must have been created from this context's device (`Context::device`).
    /// wgpu 30 offers no way to ask an encoder for its device, so this one precondition can't
    /// be checked here: an encoder of another device is a caller bug that wgpu may report by
    /// panicking. Every tensor and cache is checked (`Error::ForeignTensor`).
    pub fn encode_backward(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        inputs: &Inputs,
        options: &Options,
        up: &Upstream,
        grads: &Grads,
    ) -> Result<()> {
        let plan = self.backward_plan(inputs, options, up, grads)?;
        self.encode_backward_plan(encoder, &plan, inputs, up, grads, None)
    }

    /// Like [`Context::encode_backward`], with a GPU timestamp written into `query_set` before
    /// every dispatch and one after the last (indices 0, 1, ...; needs
    /// TIMESTAMP_QUERY_INSIDE_PASSES): a per-kernel profile. Returns the label of each dispatch,
    /// in order (dispatch `n` ran between timestamps `n` and `n + 1`). `capacity` is the
    /// query set's count; a call that needs more writes nothing and returns an error.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_backward_profiled(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        inputs: &Inputs,
        options: &Options,
        up: &Upstream,
        grads: &Grads,
        query_set: &wgpu::QuerySet,
        capacity: u32,
    ) -> Result<Vec<String>> {
        self.profile_supported()?;
        let plan = self.backward_plan(inputs, options, up, grads)?;
        let labels = dispatch_labels(&plan);
        Self::profile_room("profiling the backward pass", labels.len(), capacity)?;
        self.encode_backward_plan(encoder, &plan, inputs, up, grads, Some(query_set))?;
        Ok(labels)
    }

    fn encode_backward_plan(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        plan: &BackwardPlan,
        inputs: &Inputs,
        up: &Upstream,
        grads: &Grads,
        profile: Option<&wgpu::QuerySet>,
    ) -> Result<()> {
        let s = plan.resolved.shape;
        // Pipelines first: a failure to build one records nothing.
        let gpu = self.gpu();
        let mut pipes = Vec::new();
        for key in plan.keys() {
            pipes.push((key, gpu.pipeline(&key)?));
        }
        let b = self.backward_buffers(plan, gpu.dummy_in)?;
        if b.cached {
            // Kept buffers hold the last call's values: start from zeros, as a new buffer does.
            encoder.clear_buffer(&b.ws, 0, Some(4 * plan.ws_floats.max(4)));
            if plan.c_floats() > 0 {
                encoder.clear_buffer(&b.carry, 0, Some(4 * plan.c_floats()));
            }
        }
        // The du path's per-chunk writers (coop_selq, or coop_seldu and coop_selq_du): pipeline,
        // entry and per chunk (bind group, rows, row_hi), dispatched with coop_selk_du.
        type Chunks = Vec<(wgpu::BindGroup, u32, u32)>;
        let mut du_writers: Vec<(&wgpu::ComputePipeline, CoopEntry, u32, Chunks)> = Vec::new();
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("selattn backward"),
            timestamp_writes: None,
        });
        let mut stamp = 0u32;
        let mut mark = |pass: &mut wgpu::ComputePass| {
            if let Some(qs) = profile {
                pass.write_timestamp(qs, stamp);
                stamp += 1;
            }
        };
        for (key, pipe) in &pipes {
            let bgl = pipe.get_bind_group_layout(0);
            let (entries, groups) = self.kernel_entries(key, plan, &b, inputs, up, grads)?;
            let du_entry = match key.kernel {
                Kernel::CoopBackward(c) if plan.du_rows > 0 && c.entry.selective() => Some(c.entry),
                _ => None,
            };
            if let Some(de) = du_entry {
                let chunk_groups: Chunks = b
                    .chunk_layouts
                    .iter()
                    .map(|(rows, row_hi, lb)| {
                        let bg = self.bind_group(key, &bgl, &with_layout(&entries, lb));
                        (bg, *rows, *row_hi)
                    })
                    .collect();
                if de != CoopEntry::SelkDu {
                    let bt = match key.kernel {
                        Kernel::CoopBackward(c) => c.bt,
                        _ => 16,
                    };
                    du_writers.push((&**pipe, de, bt, chunk_groups));
                } else {
                    // Chunk by chunk: the writers put du of its rows into the scratch (and add
                    // the selection head's dQ term), coop_selk_du consumes it.
                    for (ci, (kbg, _, _)) in chunk_groups.iter().enumerate() {
                        for (wpipe, we, bt, groups) in &du_writers {
                            let (bg, rows, row_hi) = &groups[ci];
                            let ky = if *we == CoopEntry::SelDu {
                                // Key tiles below the chunk's causal end.
                                // (Selective masking is causal only.)
                                let kend = (s.k_len as u64)
                                    .min(plan.resolved.start as u64 + *row_hi as u64);
                                (kend.div_ceil(*bt as u64) as u32).max(1)
                            } else {
                                1
                            };
                            mark(&mut pass);
                            pass.set_pipeline(wpipe);
                            pass.set_bind_group(0, bg, &[]);
                            pass.dispatch_workgroups(rows.div_ceil(ROWS), ky, s.batch);
                        }
                        mark(&mut pass);
                        pass.set_pipeline(pipe);
                        pass.set_bind_group(0, kbg, &[]);
                        pass.dispatch_workgroups(groups.0, groups.1, groups.2);
                    }
                }
                continue;
            }
            let bg = self.bind_group(key, &bgl, &entries);
            mark(&mut pass);
            pass.set_pipeline(pipe);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(groups.0, groups.1, groups.2);
        }
        mark(&mut pass);
        Ok(())
    }

    /// The bindings and workgroup counts of one kernel of the plan.
    fn kernel_entries<'b>(
        &self,
        key: &KernelKey,
        plan: &BackwardPlan,
        b: &'b Buffers,
        inputs: &Inputs<'b>,
        up: &Upstream<'b>,
        grads: &Grads<'b>,
    ) -> Result<(Vec<wgpu::BindGroupEntry<'b>>, (u32, u32, u32))> {
        let s = plan.resolved.shape;
        Ok(match key.kernel {
            Kernel::SelColsum(c) => (
                vec![
                    entry(0, &b.params),
                    tensor_entry(1, Some(bound(inputs.q)), b.din),
                    tensor_entry(2, Some(bound(inputs.k)), b.din),
                    tensor_entry(3, inputs.kv_len.map(bound), b.din),
                    entry(5, &b.carry),
                ],
                (c.key_groups(s.k_len), plan.params.n_qtiles, s.batch),
            ),
            Kernel::SelScan(c) => (
                vec![
                    entry(0, &b.params),
                    tensor_entry(4, inputs.f0.map(bound), b.din),
                    entry(5, &b.carry),
                    entry(6, &b.dummies[0]),
                ],
                (c.groups(s.k_len), s.batch, 1),
            ),
            Kernel::Backward(c) => self.backward_entries(plan, b, c.entry, inputs, up, grads),
            Kernel::CoopBackward(c)
                if matches!(c.entry, CoopEntry::SelDu | CoopEntry::SelqRead) =>
            {
                // The split du path (grids per chunk are set where the chunks are dispatched).
                let mut e = vec![entry(0, &b.params), entry(1, &b.layout), entry(6, &b.ws)];
                e.push(tensor_entry(3, Some(bound(inputs.k)), b.din));
                if c.entry == CoopEntry::SelDu {
                    e.extend([
                        tensor_entry(2, Some(bound(inputs.q)), b.din),
                        tensor_entry(4, Some(bound(inputs.v)), b.din),
                        tensor_entry(5, Some(bound(up.d_o)), b.din),
                        entry(7, &b.carry),
                    ]);
                } else {
                    e.push(tensor_entry(8, grads.dq.map(bound), &b.dummies[0]));
                }
                (e, (0, 0, 0))
            }
            Kernel::CoopBackward(c) => {
                let e = match c.entry {
                    CoopEntry::Dkv => Entry::Dkv,
                    CoopEntry::Dq => Entry::Dq,
                    CoopEntry::Selq
                    | CoopEntry::SelqDu
                    | CoopEntry::SelDu
                    | CoopEntry::SelqRead => Entry::Selq,
                    CoopEntry::Selk | CoopEntry::SelkDu => Entry::Selk,
                };
                self.backward_entries(plan, b, e, inputs, up, grads)
            }
            _ => {
                return Err(Error::gpu_msg(format!(
                    "encoding the backward pass: the plan named a foreign kernel {key:?}"
                )))
            }
        })
    }

    /// A bind group labelled with its kernel key.
    fn bind_group(
        &self,
        key: &KernelKey,
        layout: &wgpu::BindGroupLayout,
        entries: &[wgpu::BindGroupEntry],
    ) -> wgpu::BindGroup {
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&format!("{key:?}")),
            layout,
            entries,
        })
    }

    /// The uniforms and scratch buffers one backward call binds.
    fn backward_buffers<'d>(
        &self,
        plan: &BackwardPlan,
        din: &'d wgpu::Buffer,
    ) -> Result<Buffers<'d>> {
        let s = plan.resolved.shape;
        let gpu = self.gpu();
        // With the du scratch, coop_selq and coop_selk_du run once per chunk of query rows, each
        // pair with its own Layout (row_lo, row_hi).
        let chunk_layouts: Vec<(u32, u32, wgpu::Buffer)> = if plan.du_rows > 0 {
            (0..s.q_len.div_ceil(plan.du_rows))
                .map(|c| {
                    let row_lo = c * plan.du_rows;
                    let l = crate::kernels::backward::Layout {
                        row_lo,
                        row_hi: (row_lo + plan.du_rows).min(s.q_len),
                        ..plan.layout
                    };
                    let rows = l.row_hi - l.row_lo;
                    let buf = gpu.uniform("selattn backward chunk layout", bytemuck::bytes_of(&l));
                    (rows, l.row_hi, buf)
                })
                .collect()
        } else {
            Vec::new()
        };
        let buffer = |label, floats: u64| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: (4 * floats).max(16),
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        };
        // The workspace and C: kept in the context between calls (allocating and freeing
        // hundreds of MiB per call costs milliseconds), unless SELATTN_BACKWARD_KEEP=0.
        let cached = keep_scratch();
        let (ws, carry) = if cached {
            let mut guard = self.backward_scratch.lock().map_err(|_| {
                Error::gpu_msg("locking the backward scratch (poisoned by a panic)")
            })?;
            let mut get = |slot: usize, label, floats: u64| {
                let need = (4 * floats).max(16);
                match &guard[slot] {
                    Some(b) if b.size() >= need => b.clone(),
                    _ => {
                        let b = buffer(label, floats);
                        guard[slot] = Some(b.clone());
                        b
                    }
                }
            };
            (
                get(0, "selattn backward workspace", plan.ws_floats),
                get(1, "selattn backward selective C", plan.c_floats()),
            )
        } else {
            (
                buffer("selattn backward workspace", plan.ws_floats),
                buffer("selattn backward selective C", plan.c_floats()),
            )
        };
        Ok(Buffers {
            params: gpu.uniform("selattn backward params", bytemuck::bytes_of(&plan.params)),
            layout: gpu.uniform("selattn backward layout", bytemuck::bytes_of(&plan.layout)),
            chunk_layouts,
            ws,
            carry,
            cached,
            // Distinct placeholders for absent writable bindings (two bindings of one buffer in
            // a dispatch may not both be writable).
            dummies: (0..4)
                .map(|_| buffer("selattn backward placeholder", 4))
                .collect(),
            din,
        })
    }

    // Long on purpose: a table, one arm per shader entry, of the slots it binds and its grid
    // (shaders/backward.wgsl); each arm reads on its own.
    /// The bindings and workgroup counts of one entry of the backward shader (scalar or
    /// cooperative: both bind the same slots).
    fn backward_entries<'b>(
        &self,
        plan: &BackwardPlan,
        b: &'b Buffers,
        c: Entry,
        inputs: &Inputs<'b>,
        up: &Upstream<'b>,
        grads: &Grads<'b>,
    ) -> (Vec<wgpu::BindGroupEntry<'b>>, (u32, u32, u32)) {
        let s = plan.resolved.shape;
        let din = b.din;
        let dummies = &b.dummies;
        let lin_groups = |n: u64| {
            let g = n.div_ceil(64).max(1);
            let x = g.min(self.capabilities().max_workgroups_per_dim as u64);
            (x as u32, g.div_ceil(x) as u32)
        };
        let coop = plan.coop.is_some();
        let coop_sel = plan.coop_sel.is_some();
        let mut e = vec![entry(0, &b.params), entry(1, &b.layout), entry(6, &b.ws)];
        let tiled = |e: &mut Vec<_>| {
            e.extend([
                tensor_entry(2, Some(bound(inputs.q)), din),
                tensor_entry(3, Some(bound(inputs.k)), din),
                tensor_entry(4, Some(bound(inputs.v)), din),
                tensor_entry(5, Some(bound(up.d_o)), din),
                entry(
                    7,
                    if plan.selective.is_some() {
                        &b.carry
                    } else {
                        din
                    },
                ),
            ]);
        };
        let groups = match c {
            Entry::Prep => {
                e.extend([
                    tensor_entry(5, Some(bound(up.d_o)), din),
                    tensor_entry(10, Some(bound(up.o)), din),
                    tensor_entry(11, Some(bound(up.lse)), din),
                    tensor_entry(12, inputs.tau.map(bound), din),
                    tensor_entry(13, inputs.alpha.map(bound), din),
                    tensor_entry(14, inputs.gate.map(bound), din),
                    tensor_entry(15, inputs.kv_len.map(bound), din),
                ]);
                let (x, y) = lin_groups(plan.layout.n_lin as u64);
                (x, y, 1)
            }
            Entry::Dkv => {
                tiled(&mut e);
                e.push(tensor_entry(8, grads.dk.map(bound), &dummies[0]));
                e.push(tensor_entry(9, grads.dv.map(bound), &dummies[1]));
                if coop {
                    (s.k_len.div_ceil(ROWS), s.kv_heads, s.batch)
                } else {
                    (plan.n_ktiles, s.kv_heads, s.batch)
                }
            }
            Entry::Dq => {
                tiled(&mut e);
                e.push(tensor_entry(8, grads.dq.map(bound), &dummies[0]));
                if coop {
                    (s.q_len.div_ceil(ROWS), s.q_heads, s.batch)
                } else {
                    (plan.params.n_qtiles, s.q_heads, s.batch)
                }
            }
            Entry::Fscan => {
                e.push(tensor_entry(16, up.df_out.map(bound), din));
                (s.k_len.div_ceil(64), s.batch, 1)
            }
            Entry::Selq => {
                tiled(&mut e);
                e.push(tensor_entry(8, grads.dq.map(bound), &dummies[0]));
                if coop_sel {
                    (s.q_len.div_ceil(ROWS), 1, s.batch)
                } else {
                    (plan.params.n_qtiles, 1, s.batch)
                }
            }
            Entry::Selk => {
                if plan.du_rows > 0 {
                    // coop_selk_du reads Q (and the workspace) only.
                    e.push(tensor_entry(2, Some(bound(inputs.q)), din));
                } else {
                    tiled(&mut e);
                }
                e.push(tensor_entry(8, grads.dk.map(bound), &dummies[0]));
                if coop_sel {
                    (s.k_len.div_ceil(ROWS), 1, s.batch)
                } else {
                    (plan.n_ktiles, 1, s.batch)
                }
            }
            Entry::Finish => {
                e.extend([
                    tensor_entry(17, grads.dtau.map(bound), &dummies[0]),
                    tensor_entry(18, grads.dalpha.map(bound), &dummies[1]),
                    tensor_entry(19, grads.dgate.map(bound), &dummies[2]),
                    tensor_entry(20, grads.df0.map(bound), &dummies[3]),
                ]);
                let (x, y) = lin_groups(plan.layout.n_lin as u64);
                (x, y, 1)
            }
        };
        (e, groups)
    }
}

/// The label of each dispatch [`Context::encode_backward_plan`] records, in order (the du
/// pairs once per chunk).
fn dispatch_labels(plan: &BackwardPlan) -> Vec<String> {
    let s = plan.resolved.shape;
    let chunks = if plan.du_rows > 0 {
        s.q_len.div_ceil(plan.du_rows)
    } else {
        0
    };
    let mut out = Vec::new();
    let mut writers = Vec::new();
    for key in plan.keys() {
        let name = match key.kernel {
            Kernel::SelColsum(_) => "sel_colsum".to_string(),
            Kernel::SelScan(_) => "sel_scan".to_string(),
            Kernel::Backward(c) => format!("{:?}", c.entry).to_lowercase(),
            Kernel::CoopBackward(c) => c.entry_name().to_string(),
            _ => format!("{:?}", key.kernel),
        };
        match key.kernel {
            Kernel::CoopBackward(c)
                if plan.du_rows > 0
                    && matches!(
                        c.entry,
                        CoopEntry::SelqDu | CoopEntry::SelDu | CoopEntry::SelqRead
                    ) =>
            {
                writers.push(name)
            }
            Kernel::CoopBackward(c) if plan.du_rows > 0 && c.entry == CoopEntry::SelkDu => {
                for _ in 0..chunks {
                    out.extend(writers.iter().cloned());
                    out.push(name.clone());
                }
            }
            _ => out.push(name),
        }
    }
    out
}

/// The uniforms and scratch buffers of one backward call.
struct Buffers<'d> {
    params: wgpu::Buffer,
    layout: wgpu::Buffer,
    /// Per du chunk: its query rows, its end row and its Layout uniform.
    chunk_layouts: Vec<(u32, u32, wgpu::Buffer)>,
    ws: wgpu::Buffer,
    carry: wgpu::Buffer,
    /// `ws` and `carry` are the context's kept buffers (cleared at the start of the call).
    cached: bool,
    dummies: Vec<wgpu::Buffer>,
    din: &'d wgpu::Buffer,
}

/// Environment variable that allocates the backward scratch per call
/// (`SELATTN_BACKWARD_KEEP=0`) instead of keeping it in the context, for A/B measurements.
pub const KEEP_ENV: &str = "SELATTN_BACKWARD_KEEP";

fn keep_scratch() -> bool {
    crate::kernels::knob_on(KEEP_ENV)
}

/// `entries` with binding 1 (the Layout uniform) replaced by `layout`.
fn with_layout<'a>(
    entries: &[wgpu::BindGroupEntry<'a>],
    layout: &'a wgpu::Buffer,
) -> Vec<wgpu::BindGroupEntry<'a>> {
    entries
        .iter()
        .map(|x| {
            if x.binding == 1 {
                entry(1, layout)
            } else {
                x.clone()
            }
        })
        .collect()
}

/// No gradient buffer may alias an input, an upstream tensor or another gradient.
fn check_backward_aliases(inputs: &Inputs, up: &Upstream, grads: &Grads) -> Result<()> {
    let ins: Vec<Option<&Tensor>> = (inputs.tensors().into_iter())
        .chain([Some(up.o), Some(up.lse), Some(up.d_o), up.df_out])
        .collect();
    let outs = [
        grads.dq,
        grads.dk,
        grads.dv,
        grads.dtau,
        grads.dalpha,
        grads.dgate,
        grads.df0,
    ];
    check_no_alias(
        &ins,
        &outs,
        "a gradient buffer aliases an input or another gradient",
    )
}

/// A tensor's buffer with the bytes a kernel binds of it.
fn bound(t: &Tensor) -> (&wgpu::Buffer, u64) {
    (t.buffer(), t.bytes())
}
