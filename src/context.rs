//! The [`Context`]: adapter, device, queue, capabilities and the pipeline cache.
//!
//! Getting a device is kept apart from running kernels: [`Context::new`] picks an adapter and
//! requests a device, [`Context::from_device`] wraps a device an application already owns.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use crate::kernels::KernelKey;
use crate::{Error, Result};

/// Environment variable that restricts adapter choice to adapters whose name contains its value
/// (case-insensitive). `WGPU_BACKEND` restricts the backends as usual in wgpu.
pub const ADAPTER_ENV: &str = "SELATTN_ADAPTER";

/// What the device can do, as far as selattn cares.
#[derive(Clone, Debug)]
pub struct Capabilities {
    /// Adapter name, backend, driver.
    pub info: wgpu::AdapterInfo,
    /// SHADER_F16: f16 storage is possible.
    pub f16: bool,
    /// SUBGROUP operations are available.
    pub subgroups: bool,
    /// Smallest subgroup size the adapter may use.
    pub subgroup_min_size: u32,
    /// Largest subgroup size the adapter may use.
    pub subgroup_max_size: u32,
    /// Cooperative matrix configurations (empty without EXPERIMENTAL_COOPERATIVE_MATRIX).
    pub cooperative_matrix: Vec<wgpu::CooperativeMatrixProperties>,
    /// TIMESTAMP_QUERY (and inside passes).
    pub timestamps: bool,
    /// Workgroup memory in bytes.
    pub workgroup_memory: u32,
    /// Largest workgroup, in invocations.
    pub max_invocations: u32,
    /// Largest storage buffer binding, in bytes.
    pub max_storage_binding: u64,
    /// Largest buffer, in bytes.
    pub max_buffer: u64,
    /// Storage buffers per shader stage.
    pub max_storage_buffers: u32,
    /// Largest number of workgroups per dispatch dimension.
    pub max_workgroups_per_dim: u32,
}

impl Capabilities {
    fn new(
        info: wgpu::AdapterInfo,
        features: wgpu::Features,
        limits: &wgpu::Limits,
        coop: Vec<wgpu::CooperativeMatrixProperties>,
    ) -> Self {
        Capabilities {
            f16: features.contains(wgpu::Features::SHADER_F16),
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            subgroup_min_size: info.subgroup_min_size,
            subgroup_max_size: info.subgroup_max_size,
            cooperative_matrix: if features
                .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
            {
                coop
            } else {
                Vec::new()
            },
            timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
            workgroup_memory: limits.max_compute_workgroup_storage_size,
            max_invocations: limits.max_compute_invocations_per_workgroup,
            max_storage_binding: limits.max_storage_buffer_binding_size,
            max_buffer: limits.max_buffer_size,
            max_storage_buffers: limits.max_storage_buffers_per_shader_stage,
            max_workgroups_per_dim: limits.max_compute_workgroups_per_dimension,
            info,
        }
    }

    /// Capabilities of a device that is not there: `limits`, `features`, a fixed subgroup size
    /// and cooperative matrix configurations as an adapter would report them, named `name`.
    /// Used to enumerate the pipeline variants the planner chooses on devices other than the
    /// ones at hand ([`crate::variants`]).
    pub fn synthetic(
        name: &str,
        features: wgpu::Features,
        limits: &wgpu::Limits,
        subgroup_size: u32,
        cooperative_matrix: Vec<wgpu::CooperativeMatrixProperties>,
    ) -> Self {
        let mut info = wgpu::AdapterInfo::new(wgpu::DeviceType::Other, wgpu::Backend::Noop);
        info.name = name.to_string();
        info.subgroup_min_size = subgroup_size;
        info.subgroup_max_size = subgroup_size;
        Self::new(info, features, limits, cooperative_matrix)
    }

    /// Whether a 16×16×16 f16 → f32 cooperative matrix configuration is reported.
    pub fn coop_16x16_f16(&self) -> bool {
        self.cooperative_matrix.iter().any(|p| {
            p.m_size == 16
                && p.n_size == 16
                && p.k_size == 16
                && p.ab_type == wgpu::CooperativeScalarType::F16
                && p.cr_type == wgpu::CooperativeScalarType::F32
        })
    }
}

/// The OpenGL (or OpenGL ES) version a GL adapter's driver reports, e.g. `(3, 3, false)` for
/// "3.3.0 NVIDIA 580.159.04" or `(3, 1, true)` for "OpenGL ES 3.1 Mesa ...".
fn gl_version(driver_info: &str) -> Option<(u32, u32, bool)> {
    let es = driver_info.contains("OpenGL ES");
    let text = driver_info.trim_start_matches("OpenGL ES").trim_start();
    let mut nums = text
        .split(|c: char| !c.is_ascii_digit())
        .filter(|t| !t.is_empty())
        .map(|t| t.parse::<u32>().ok());
    Some((nums.next()??, nums.next()??, es))
}

/// Why an adapter cannot run our kernels, or `None` if it can.
pub fn unusable_reason(adapter: &wgpu::Adapter) -> Option<String> {
    let info = adapter.get_info();
    if info.backend == wgpu::Backend::Gl {
        // wgpu may report compute support for a GL context that has none (the H100's is an
        // OpenGL 3.3 context; requesting a device there fails). Compute needs GL 4.3 / ES 3.1.
        if let Some((major, minor, es)) = gl_version(&info.driver_info) {
            let needed = if es { (3, 1) } else { (4, 3) };
            if (major, minor) < needed {
                return Some(format!(
                    "{} (Gl, {}): OpenGL{} {major}.{minor} has no compute shaders ({}.{} needed)",
                    info.name,
                    info.driver_info,
                    if es { " ES" } else { "" },
                    needed.0,
                    needed.1
                ));
            }
        }
    }
    let down = adapter.get_downlevel_capabilities();
    if !down.flags.contains(wgpu::DownlevelFlags::COMPUTE_SHADERS) {
        let info = adapter.get_info();
        return Some(format!(
            "{} ({:?}, {}): no compute shaders (an OpenGL context below 4.3 or an equivalent)",
            info.name, info.backend, info.driver_info
        ));
    }
    let l = adapter.limits();
    if l.max_storage_buffers_per_shader_stage < crate::kernels::STORAGE_BUFFERS_NEEDED {
        let info = adapter.get_info();
        return Some(format!(
            "{} ({:?}): {} storage buffers per stage, {} needed",
            info.name,
            info.backend,
            l.max_storage_buffers_per_shader_stage,
            crate::kernels::STORAGE_BUFFERS_NEEDED
        ));
    }
    None
}

/// The wgpu instance over the backends in `WGPU_BACKEND` (all when unset).
pub fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all()),
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    })
}

/// Every adapter wgpu sees, each with `None` if it can run our kernels or the reason it cannot.
/// Blocks; not on wasm (see [`crate::adapters_async`]).
#[cfg(not(target_arch = "wasm32"))]
pub fn adapters() -> Vec<(wgpu::Adapter, Option<String>)> {
    let inst = instance();
    pollster::block_on(inst.enumerate_adapters(wgpu::Backends::all()))
        .into_iter()
        .map(|a| {
            let r = unusable_reason(&a);
            (a, r)
        })
        .collect()
}

fn type_rank(t: wgpu::DeviceType) -> u32 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

/// Picks the best adapter that can run compute: discrete > integrated > virtual > software,
/// Vulkan/Metal/DX12 before GL at equal rank. `SELATTN_ADAPTER` filters by name.
/// Blocks; not on wasm (see [`Context::new_async`]).
#[cfg(not(target_arch = "wasm32"))]
pub fn best_adapter() -> Result<wgpu::Adapter> {
    choose_adapter(adapters())
}

/// The choice [`best_adapter`] makes among `adapters` (as [`adapters`] lists them).
pub(crate) fn choose_adapter(
    adapters: Vec<(wgpu::Adapter, Option<String>)>,
) -> Result<wgpu::Adapter> {
    let filter = std::env::var(ADAPTER_ENV).ok().map(|s| s.to_lowercase());
    let mut reasons = Vec::new();
    let mut ok = Vec::new();
    for (a, why) in adapters {
        let info = a.get_info();
        if let Some(f) = &filter {
            if !info.name.to_lowercase().contains(f.as_str()) {
                reasons.push(format!(
                    "{} ({:?}): name does not match {ADAPTER_ENV}={f}",
                    info.name, info.backend
                ));
                continue;
            }
        }
        match why {
            Some(r) => reasons.push(r),
            None => ok.push(a),
        }
    }
    ok.sort_by_key(|a| {
        let i = a.get_info();
        (
            type_rank(i.device_type),
            (i.backend == wgpu::Backend::Gl) as u32,
        )
    });
    ok.into_iter().next().ok_or(Error::NoAdapter { reasons })
}

/// The device [`Context::from_adapter`] requests on `adapter`: every limit the adapter has and
/// the features selattn can use; an error if the adapter cannot run the kernels.
pub(crate) fn device_request(adapter: &wgpu::Adapter) -> Result<wgpu::DeviceDescriptor<'static>> {
    if let Some(why) = unusable_reason(adapter) {
        return Err(Error::NoAdapter { reasons: vec![why] });
    }
    let wanted = wgpu::Features::SHADER_F16
        | wgpu::Features::SUBGROUP
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

/// A pipeline with its bind group layout.
pub(crate) type Pipeline = Arc<wgpu::ComputePipeline>;

/// Adapter, device, queue, capabilities and compiled pipelines.
pub struct Context {
    /// The device.
    pub device: wgpu::Device,
    /// Its queue.
    pub queue: wgpu::Queue,
    caps: Capabilities,
    checked: bool,
    pipelines: RwLock<HashMap<KernelKey, Pipeline>>,
    pub(crate) dummy_in: wgpu::Buffer,
    pub(crate) dummy_out: wgpu::Buffer,
    pub(crate) scratch: Mutex<Option<wgpu::Buffer>>,
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
            .map_err(|e| Error::RequestDevice(e.to_string()))?;
        let coop = adapter.cooperative_matrix_properties();
        Ok(Self::build(device, queue, adapter.get_info(), coop))
    }

    /// Wraps a device and queue the application already owns. `info` describes the adapter it
    /// came from (`adapter.get_info()`); capabilities are read from the device's own features
    /// and limits, so kernels stay within what the application requested.
    /// `cooperative_matrix` is `adapter.cooperative_matrix_properties()` (or empty).
    pub fn from_device(
        device: wgpu::Device,
        queue: wgpu::Queue,
        info: wgpu::AdapterInfo,
        cooperative_matrix: Vec<wgpu::CooperativeMatrixProperties>,
    ) -> Result<Self> {
        let l = device.limits();
        if l.max_storage_buffers_per_shader_stage < crate::kernels::STORAGE_BUFFERS_NEEDED {
            return Err(Error::TooLarge {
                what: "storage buffers per shader stage",
                bytes: crate::kernels::STORAGE_BUFFERS_NEEDED as u64,
                limit: l.max_storage_buffers_per_shader_stage as u64,
            });
        }
        Ok(Self::build(device, queue, info, cooperative_matrix))
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
        Context {
            device,
            queue,
            caps,
            checked: false,
            pipelines: RwLock::new(HashMap::new()),
            dummy_in,
            dummy_out,
            scratch: Mutex::new(None),
        }
    }

    /// Build every shader of this context with naga's runtime bounds checks on (slower).
    /// Used by tests to compare against the unchecked production shaders.
    pub fn with_bounds_checks(mut self, on: bool) -> Self {
        self.checked = on;
        self.pipelines.get_mut().map(|p| p.clear()).ok();
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

    /// The compiled pipeline for `key`, built on first use.
    pub(crate) fn pipeline(&self, key: &KernelKey) -> Result<Pipeline> {
        if let Ok(map) = self.pipelines.read() {
            if let Some(p) = map.get(key) {
                return Ok(p.clone());
            }
        }
        let label = format!("{key:?}");
        let source = key.wgsl()?;
        let scope = crate::async_api::Scope::push(&self.device);
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(&label),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        };
        let checks = if self.checked {
            wgpu::ShaderRuntimeChecks::checked()
        } else {
            wgpu::ShaderRuntimeChecks::unchecked()
        };
        // SAFETY: without runtime checks, the shader may index out of bounds if given sizes that
        // disagree with its buffers. Every dispatch goes through `spec::Spec::validate` and the
        // per-tensor shape checks in `kernels`, which bind only buffers that hold exactly the
        // elements the validated shape implies; kv_len values are clamped to Nk in the shader.
        let module = unsafe { self.device.create_shader_module_trusted(desc, checks) };
        let constants = key.constants();
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
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
            return Err(Error::Gpu(format!("building {label}: {e}")));
        }
        let p = Arc::new(pipeline);
        if let Ok(mut map) = self.pipelines.write() {
            map.insert(*key, p.clone());
        }
        Ok(p)
    }

    /// Waits until all submitted work is done.
    pub fn sync(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| Error::Gpu(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::gl_version;

    #[test]
    fn gl_versions_from_driver_info() {
        assert_eq!(gl_version("3.3.0 NVIDIA 580.159.04"), Some((3, 3, false)));
        assert_eq!(
            gl_version("4.5 (Core Profile) Mesa 22.3.6"),
            Some((4, 5, false))
        );
        assert_eq!(gl_version("OpenGL ES 3.1 Mesa 23.0"), Some((3, 1, true)));
        assert_eq!(gl_version("no version here"), None);
    }
}
