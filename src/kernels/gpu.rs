//! What every kernel family's encode function shares: the pipeline cache ([`Pipelines`]), the
//! device handle an encode function works with ([`Gpu`]), one helper that binds and dispatches
//! ([`Gpu::dispatch`]) and one that submits under an error scope ([`submit`]).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use super::KernelKey;
use crate::Result;

/// A compiled pipeline (its bind group layout is derived from the shader).
pub(crate) type Pipeline = Arc<wgpu::ComputePipeline>;

/// Compiled pipelines by [`KernelKey`], each built on first use.
#[derive(Default)]
pub(crate) struct Pipelines {
    map: RwLock<HashMap<KernelKey, Pipeline>>,
}

impl Pipelines {
    /// Forgets every pipeline (they are rebuilt on next use).
    pub(crate) fn clear(&mut self) {
        self.map.get_mut().map(|p| p.clear()).ok();
    }

    /// The pipeline for `key` on `device`, built on first use, with naga's runtime bounds checks
    /// when `checked`.
    fn get(&self, device: &wgpu::Device, key: &KernelKey, checked: bool) -> Result<Pipeline> {
        if let Ok(map) = self.map.read() {
            if let Some(p) = map.get(key) {
                return Ok(p.clone());
            }
        }
        let label = format!("{key:?}");
        let source = key.wgsl()?;
        let scope = crate::async_api::Scope::push(device);
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(&label),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        };
        let checks = if checked {
            wgpu::ShaderRuntimeChecks::checked()
        } else {
            wgpu::ShaderRuntimeChecks::unchecked()
        };
        // SAFETY: without runtime checks, the shader may index out of bounds if given sizes that
        // disagree with its buffers. Every dispatch goes through `spec::Spec::validate` and the
        // per-tensor shape checks in `kernels`, which bind only buffers that hold exactly the
        // elements the validated shape implies; kv_len values are clamped to Nk in the shader.
        let module = unsafe { device.create_shader_module_trusted(desc, checks) };
        let constants = key.constants();
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: None,
            module: &module,
            entry_point: Some(key.entry()),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &constants,
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        if let Some(e) = scope.pop() {
            return Err(crate::async_api::scope_error(
                format!("building {label}"),
                e,
            ));
        }
        let p = Arc::new(pipeline);
        if let Ok(mut map) = self.map.write() {
            map.insert(*key, p.clone());
        }
        Ok(p)
    }
}

/// The device as an encode function sees it (borrowed from a [`crate::Context`]).
pub(crate) struct Gpu<'a> {
    /// The device.
    pub device: &'a wgpu::Device,
    /// Its pipeline cache.
    pub pipelines: &'a Pipelines,
    /// Build pipelines with runtime bounds checks.
    pub checked: bool,
    /// Bound where an optional input is absent.
    pub dummy_in: &'a wgpu::Buffer,
    /// Bound where an optional output is absent.
    pub dummy_out: &'a wgpu::Buffer,
}

impl Gpu<'_> {
    /// The compiled pipeline for `key`.
    pub(crate) fn pipeline(&self, key: &KernelKey) -> Result<Pipeline> {
        self.pipelines.get(self.device, key, self.checked)
    }

    /// Binds `entries` to `key`'s pipeline in `pass` and dispatches `groups` workgroups.
    pub(crate) fn dispatch(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        label: &str,
        key: KernelKey,
        entries: &[wgpu::BindGroupEntry<'_>],
        groups: [u32; 3],
    ) -> Result<()> {
        let pipe = self.pipeline(&key)?;
        let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(label),
            layout: &pipe.get_bind_group_layout(0),
            entries,
        });
        pass.set_pipeline(&pipe);
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        Ok(())
    }

    /// A uniform buffer holding `bytes`.
    pub(crate) fn uniform(&self, label: &str, bytes: &[u8]) -> wgpu::Buffer {
        self.init(label, bytes, wgpu::BufferUsages::UNIFORM)
    }

    /// A storage buffer holding `bytes`.
    pub(crate) fn storage(&self, label: &str, bytes: &[u8]) -> wgpu::Buffer {
        self.init(label, bytes, wgpu::BufferUsages::STORAGE)
    }

    fn init(&self, label: &str, bytes: &[u8], usage: wgpu::BufferUsages) -> wgpu::Buffer {
        wgpu::util::DeviceExt::create_buffer_init(
            self.device,
            &wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: bytes,
                usage,
            },
        )
    }

    /// `slot`'s storage buffer if it holds at least `bytes`, else a new one (16-byte multiple,
    /// at least 16) stored in `slot`: scratch that grows and is reused.
    pub(crate) fn grow(
        &self,
        slot: &mut Option<wgpu::Buffer>,
        bytes: u64,
        label: &str,
    ) -> wgpu::Buffer {
        self.grow_as(slot, bytes, label, wgpu::BufferUsages::STORAGE)
    }

    /// [`Gpu::grow`] for a buffer of another `usage` (all buffers kept in `slot` share it).
    pub(crate) fn grow_as(
        &self,
        slot: &mut Option<wgpu::Buffer>,
        bytes: u64,
        label: &str,
        usage: wgpu::BufferUsages,
    ) -> wgpu::Buffer {
        if let Some(b) = slot.as_ref().filter(|b| b.size() >= bytes) {
            return b.clone();
        }
        let b = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(16).div_ceil(16) * 16,
            usage,
            mapped_at_creation: false,
        });
        *slot = Some(b.clone());
        b
    }
}

/// Runs `f`, which records or submits GPU work, inside out-of-memory, internal and validation
/// error scopes: whatever wgpu reports comes back as [`Error::Gpu`] with wgpu's error as its
/// source, instead of reaching wgpu's default handler (which panics). The one place where
/// selattn's GPU work is watched; a wgpu error wins over `f`'s own result.
pub(crate) fn scoped<T>(
    device: &wgpu::Device,
    during: &str,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    // On wasm nothing may block: no scope is pushed (the `_async` calls report errors there).
    #[cfg(target_arch = "wasm32")]
    {
        let _ = (device, during);
        f()
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let internal = device.push_error_scope(wgpu::ErrorFilter::Internal);
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let r = f();
        let v = pollster::block_on(validation.pop());
        let i = pollster::block_on(internal.pop());
        let o = pollster::block_on(oom.pop());
        match v.or(i).or(o) {
            Some(e) => Err(crate::Error::gpu(during, e)),
            None => r,
        }
    }
}

/// Records work with `record` into a new encoder and submits it, all under [`scoped`]'s error
/// scopes (nothing is submitted when recording fails).
pub(crate) fn submit(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    label: &str,
    record: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<()>,
) -> Result<()> {
    scoped(device, &format!("running {label}"), || {
        let mut enc =
            device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) });
        record(&mut enc)?;
        queue.submit([enc.finish()]);
        Ok(())
    })
}

/// Binding of a tensor's own bytes, `(buffer, bytes)` (not its whole buffer, which may be
/// larger than a binding may be), or of `dummy` when the tensor is absent.
pub(crate) fn tensor_entry<'a>(
    binding: u32,
    t: Option<(&'a wgpu::Buffer, u64)>,
    dummy: &'a wgpu::Buffer,
) -> wgpu::BindGroupEntry<'a> {
    let resource = match t {
        Some((buffer, bytes)) => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer,
            offset: 0,
            size: wgpu::BufferSize::new((bytes.div_ceil(4) * 4).min(buffer.size())),
        }),
        None => dummy.as_entire_binding(),
    };
    wgpu::BindGroupEntry { binding, resource }
}

/// Storage binding at `binding` for a whole buffer.
pub(crate) fn entry(binding: u32, buffer: &wgpu::Buffer) -> wgpu::BindGroupEntry<'_> {
    wgpu::BindGroupEntry {
        binding,
        resource: buffer.as_entire_binding(),
    }
}
