//! The [`Context`]: one device and queue, its capabilities, the pipeline cache and the buffers
//! every call shares (dummy bindings, selective scratch).
//!
//! Getting a device is kept apart from running kernels: [`Context::new`] picks an adapter
//! ([`crate::device`]) and requests a device, [`Context::from_device`] wraps a device an
//! application already owns.

use std::sync::{Arc, Mutex};

#[cfg(not(target_arch = "wasm32"))]
use crate::device::best_adapter;
use crate::device::{unusable_reason, Capabilities, STORAGE_BUFFERS_NEEDED};
#[cfg(not(target_arch = "wasm32"))]
use crate::error::GpuSource;
use crate::kernels::gpu::{Gpu, Pipelines};
use crate::{Error, Result};

/// The identity of the device a [`Context`] runs on. Every [`crate::Tensor`] and
/// [`crate::KvCache`] carries the one of the context that made it, and every call rejects a
/// tensor with another identity ([`Error::ForeignTensor`]).
///
/// wgpu cannot tell devices of different `wgpu::Instance`s apart (their handles compare by an
/// index that each instance counts from zero), so the identity is ours: one per
/// [`Context::new`], [`Context::from_adapter`] and [`Context::from_device`], shared by
/// [`Context::from_device_shared`] and [`Context::with_bounds_checks`].
///
/// The identity is the address of a shared allocation that lives as long as any context, tensor
/// or cache holding it, so it is never reused while it can still be compared. It holds nothing
/// else (no device handle: on wasm a `wgpu::Device` is neither `Send` nor `Sync`).
#[derive(Clone, Debug)]
pub struct DeviceToken(Arc<Identity>);

/// What a [`DeviceToken`] points to: nothing but an address.
#[derive(Debug)]
struct Identity;

impl PartialEq for DeviceToken {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for DeviceToken {}

/// Adapter, device, queue, capabilities and compiled pipelines.
pub struct Context {
    /// The device.
    pub device: wgpu::Device,
    token: DeviceToken,
    /// Its queue.
    pub queue: wgpu::Queue,
    caps: Capabilities,
    checked: bool,
    pipelines: Pipelines,
    dummy_in: wgpu::Buffer,
    dummy_out: wgpu::Buffer,
    pub(crate) scratch: Mutex<Option<wgpu::Buffer>>,
    /// The backward pass's workspace and selective C, kept between calls (grow only).
    pub(crate) backward_scratch: Mutex<[Option<wgpu::Buffer>; 2]>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("adapter", &self.caps.info.name)
            .field("backend", &self.caps.info.backend)
            .field("checked", &self.checked)
            .finish()
    }
}

/// The device [`Context::from_adapter`] requests on `adapter`: every limit the adapter has and
/// the features selattn can use; an error if the adapter cannot run the kernels.
pub(crate) fn device_request(adapter: &wgpu::Adapter) -> Result<wgpu::DeviceDescriptor<'static>> {
    if let Some(why) = unusable_reason(adapter) {
        return Err(Error::NoAdapter { reasons: vec![why] });
    }
    let wanted = wgpu::Features::SHADER_F16
        | wgpu::Features::SUBGROUP
        | wgpu::Features::SUBGROUP_BARRIER
        | wgpu::Features::TIMESTAMP_QUERY
        | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES
        | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS
        | wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
    let features = adapter.features() & wanted;
    let experimental = if features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
        // SAFETY: cooperative matrices are experimental in wgpu 30; we only use the
        // configurations the adapter reports, and every kernel using them has a tested
        // scalar fallback.
        unsafe { wgpu::ExperimentalFeatures::enabled() }
    } else {
        wgpu::ExperimentalFeatures::disabled()
    };
    Ok(wgpu::DeviceDescriptor {
        label: Some("selattn"),
        required_features: features,
        required_limits: adapter.limits(),
        experimental_features: experimental,
        memory_hints: wgpu::MemoryHints::Performance,
        trace: wgpu::Trace::Off,
    })
}

impl Context {
    /// Picks the best adapter (see [`best_adapter`]) and requests a device with its limits.
    /// Blocks; not on wasm (see [`Context::new_async`]).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new() -> Result<Self> {
        let adapter = best_adapter()?;
        Self::from_adapter(&adapter)
    }

    /// Requests a device on `adapter` with every limit the adapter has and the features selattn
    /// can use (f16, subgroups, timestamps, cooperative matrices).
    /// Blocks; not on wasm (see [`Context::from_adapter_async`]).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_adapter(adapter: &wgpu::Adapter) -> Result<Self> {
        let desc = device_request(adapter)?;
        let (device, queue) = pollster::block_on(adapter.request_device(&desc))
            .map_err(|e| Error::RequestDevice(GpuSource::new(e)))?;
        let coop = adapter.cooperative_matrix_properties();
        Ok(Self::build(device, queue, adapter.get_info(), coop))
    }

    /// Wraps a device and queue the application already owns. `info` describes the adapter it
    /// came from (`adapter.get_info()`); capabilities are read from the device's own features
    /// and limits, so kernels stay within what the application requested.
    /// `cooperative_matrix` is `adapter.cooperative_matrix_properties()` (or empty).
    /// The context gets a device identity of its own ([`DeviceToken`]): a second context over
    /// the same device that should share tensors is made with [`Context::from_device_shared`].
    pub fn from_device(
        device: wgpu::Device,
        queue: wgpu::Queue,
        info: wgpu::AdapterInfo,
        cooperative_matrix: Vec<wgpu::CooperativeMatrixProperties>,
    ) -> Result<Self> {
        let l = device.limits();
        if l.max_storage_buffers_per_shader_stage < STORAGE_BUFFERS_NEEDED {
            return Err(Error::DeviceLimit {
                what: "storage buffers per shader stage",
                needed: STORAGE_BUFFERS_NEEDED as u64,
                limit: l.max_storage_buffers_per_shader_stage as u64,
            });
        }
        Ok(Self::build(device, queue, info, cooperative_matrix))
    }

    /// Like [`Context::from_device`], for a device that `other` already wraps: the two contexts
    /// share tensors and caches (each keeps its own pipeline cache). The device must be the one
    /// `other` runs on; that is checked as far as wgpu can tell (devices of different wgpu
    /// instances may compare equal, so passing one of those is the caller's error).
    pub fn from_device_shared(
        device: wgpu::Device,
        queue: wgpu::Queue,
        info: wgpu::AdapterInfo,
        cooperative_matrix: Vec<wgpu::CooperativeMatrixProperties>,
        other: &Context,
    ) -> Result<Self> {
        if device != other.device || queue != other.queue {
            return Err(Error::NotSameDevice);
        }
        let mut c = Self::from_device(device, queue, info, cooperative_matrix)?;
        c.token = other.token.clone();
        Ok(c)
    }

    /// The identity of this context's device (see [`DeviceToken`]).
    pub fn device_token(&self) -> &DeviceToken {
        &self.token
    }

    /// Checks that a tensor was made on this context's device.
    pub(crate) fn owns(&self, tensor: &'static str, t: &crate::Tensor) -> Result<()> {
        if t.device_token() != &self.token {
            return Err(Error::ForeignTensor { tensor });
        }
        Ok(())
    }

    /// Runs `f`, which records or submits GPU work, under error scopes (see
    /// [`crate::kernels::gpu::scoped`]).
    /// A profiled call's first check: timestamps between dispatches need
    /// TIMESTAMP_QUERY_INSIDE_PASSES.
    pub(crate) fn profile_supported(&self) -> Result<()> {
        if self
            .device
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES)
        {
            Ok(())
        } else {
            Err(Error::FeatureMissing {
                feature: "TIMESTAMP_QUERY_INSIDE_PASSES",
            })
        }
    }

    /// A profiled call's room check: one timestamp before each of `dispatches` dispatches and
    /// one after the last must fit the caller's query set of `capacity`.
    pub(crate) fn profile_room(what: &str, dispatches: usize, capacity: u32) -> Result<()> {
        if dispatches as u64 + 1 > capacity as u64 {
            return Err(Error::gpu_msg(format!(
                "{what}: {} timestamps needed, the query set holds {capacity}",
                dispatches + 1
            )));
        }
        Ok(())
    }

    pub(crate) fn scoped<T>(&self, during: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        crate::kernels::gpu::scoped(&self.device, during, f)
    }

    pub(crate) fn build(
        device: wgpu::Device,
        queue: wgpu::Queue,
        info: wgpu::AdapterInfo,
        coop: Vec<wgpu::CooperativeMatrixProperties>,
    ) -> Self {
        let caps = Capabilities::new(info, device.features(), &device.limits(), coop);
        let dummy = |label| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: 16,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        };
        let dummy_in = dummy("selattn dummy input");
        let dummy_out = dummy("selattn dummy output");
        let token = DeviceToken(Arc::new(Identity));
        Context {
            token,
            device,
            queue,
            caps,
            checked: false,
            pipelines: Pipelines::default(),
            dummy_in,
            dummy_out,
            scratch: Mutex::new(None),
            backward_scratch: Mutex::new([None, None]),
        }
    }

    /// Build every shader of this context with naga's runtime bounds checks on (slower).
    /// Used by tests to compare against the unchecked production shaders.
    pub fn with_bounds_checks(mut self, on: bool) -> Self {
        self.checked = on;
        self.pipelines.clear();
        self
    }

    /// Whether shaders are built with runtime bounds checks.
    pub fn bounds_checks(&self) -> bool {
        self.checked
    }

    /// What the device can do.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// A short description of the adapter: name, backend, driver.
    pub fn describe(&self) -> String {
        let i = &self.caps.info;
        format!(
            "{} ({:?}, {} {})",
            i.name, i.backend, i.driver, i.driver_info
        )
    }

    /// What the kernels' encode functions need: device, pipeline cache, dummy bindings.
    pub(crate) fn gpu(&self) -> Gpu<'_> {
        Gpu {
            device: &self.device,
            pipelines: &self.pipelines,
            checked: self.checked,
            dummy_in: &self.dummy_in,
            dummy_out: &self.dummy_out,
        }
    }

    /// Drops the scratch buffers this context keeps between calls (the forward's selective
    /// scratch and the backward's workspace and C, which only grow) so their memory can be
    /// returned, for example after a large backward call in an application that goes on with
    /// small ones. Work already submitted or recorded keeps what it uses alive until it is
    /// done; the next call that needs scratch allocates it again, with no other effect.
    pub fn release_scratch(&self) {
        // A poisoned lock (a panic while holding it) still holds a valid Option: take it anyway.
        let mut s = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        *s = None;
        let mut b = self
            .backward_scratch
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *b = [None, None];
    }

    /// Waits until all submitted work is done.
    pub fn sync(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| Error::gpu("waiting for the device", e))
    }
}
