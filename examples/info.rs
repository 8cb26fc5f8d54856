//! Every adapter wgpu sees, with backend, driver and what selattn can use on it.
//!
//! `cargo run --release --example info`

use selattn::Context;

fn main() {
    let adapters = selattn::adapters();
    if adapters.is_empty() {
        println!(
            "wgpu sees no adapter (on Linux without a GPU: apt-get install mesa-vulkan-drivers)"
        );
    }
    for (adapter, unusable) in adapters {
        let info = adapter.get_info();
        println!(
            "{} — {:?}, {:?}, driver {} {}",
            info.name, info.backend, info.device_type, info.driver, info.driver_info
        );
        if let Some(why) = unusable {
            println!("  cannot run selattn: {why}\n");
            continue;
        }
        match Context::from_adapter(&adapter) {
            Ok(ctx) => {
                let c = ctx.capabilities();
                println!("  f16 storage (SHADER_F16): {}", c.f16);
                println!(
                    "  subgroups: {} (sizes {}..={})",
                    c.subgroups, c.subgroup_min_size, c.subgroup_max_size
                );
                println!("  timestamps: {}", c.timestamps);
                if c.cooperative_matrix.is_empty() {
                    println!("  cooperative matrices: none");
                }
                for m in &c.cooperative_matrix {
                    println!(
                        "  cooperative matrix: {}x{}x{} {:?} -> {:?}",
                        m.m_size, m.n_size, m.k_size, m.ab_type, m.cr_type
                    );
                }
                println!(
                    "  workgroup memory: {} bytes, invocations: {}",
                    c.workgroup_memory, c.max_invocations
                );
                println!(
                    "  storage binding: {} bytes, buffer: {} bytes, storage buffers per stage: {}",
                    c.max_storage_binding, c.max_buffer, c.max_storage_buffers
                );
                println!();
            }
            Err(e) => println!("  device request failed: {e}\n"),
        }
    }
}
