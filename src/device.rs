//! Adapter choice and [`Capabilities`]: which adapters exist, which can run selattn's kernels
//! and why not, and what a device can do as far as the kernels care. Nothing here runs a kernel;
//! the kernels read [`Capabilities`] to plan, and [`crate::Context`] requests the device.

use crate::{Error, Result};

/// Storage buffers the widest kernel binds at once (the forward kernel).
pub const STORAGE_BUFFERS_NEEDED: u32 = 10;

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
    /// SUBGROUP_BARRIER: `subgroupBarrier()` is available (the cooperative-matrix kernel uses it
    /// where only a subgroup's own rows are shared; `workgroupBarrier()` otherwise).
    pub subgroup_barrier: bool,
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
    pub(crate) fn new(
        info: wgpu::AdapterInfo,
        features: wgpu::Features,
        limits: &wgpu::Limits,
        coop: Vec<wgpu::CooperativeMatrixProperties>,
    ) -> Self {
        Capabilities {
            f16: features.contains(wgpu::Features::SHADER_F16),
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            subgroup_barrier: features.contains(wgpu::Features::SUBGROUP_BARRIER),
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
    /// ones at hand (the tooling crate's `variants` module).
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
    if l.max_storage_buffers_per_shader_stage < STORAGE_BUFFERS_NEEDED {
        let info = adapter.get_info();
        return Some(format!(
            "{} ({:?}): {} storage buffers per stage, {} needed",
            info.name, info.backend, l.max_storage_buffers_per_shader_stage, STORAGE_BUFFERS_NEEDED
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
/// Blocks; not on wasm (see [`crate::Context::new_async`]).
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
