//! The graphics adapters this machine offers, and which one `auto` proves on.
//!
//! The list is taken once per process (Vulkan first, then Metal, then DX12:
//! the first API with any adapter), and the proof opens its device from the
//! same list ([`crate::gpu`]). A build without the `wgpu` feature finds
//! none.

use serde::Serialize;

/// What kind of device an adapter is, as its driver says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterKind {
    /// A GPU with memory of its own.
    Discrete,
    /// A GPU sharing the CPU's memory.
    Integrated,
    /// A hosted or virtual GPU.
    Virtual,
    /// A software rasterizer on the CPU: llvmpipe (lavapipe), SwiftShader,
    /// WARP. It runs the proof, far slower than the CPU backend.
    Cpu,
    Other,
}

impl AdapterKind {
    /// Whether `auto` may choose it (real GPUs only).
    pub fn is_gpu(self) -> bool {
        matches!(self, AdapterKind::Discrete | AdapterKind::Integrated)
    }
}

/// One adapter found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Adapter {
    /// As its driver names it, e.g. "NVIDIA GeForce RTX 4090" or
    /// "llvmpipe (LLVM 15.0.6, 256 bits)".
    pub name: String,
    pub kind: AdapterKind,
    /// The graphics API: vulkan, metal or dx12.
    pub api: String,
    /// The driver and its version, where it says.
    pub driver: String,
    /// Its place in [`adapters()`]: the device the proof opens.
    #[serde(skip)]
    pub index: usize,
}

impl std::fmt::Display for Adapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            AdapterKind::Discrete => "discrete GPU",
            AdapterKind::Integrated => "integrated GPU",
            AdapterKind::Virtual => "virtual GPU",
            AdapterKind::Cpu => "software, on the CPU",
            AdapterKind::Other => "other",
        };
        write!(f, "{} ({kind}, {}", self.name, self.api)?;
        if !self.driver.is_empty() {
            write!(f, ", {}", self.driver)?;
        }
        f.write_str(")")
    }
}

/// The adapters found, and (with wgpu) the handles that open them, in the
/// same order.
#[derive(Default)]
struct Found {
    list: Vec<Adapter>,
    #[cfg(feature = "wgpu")]
    handles: Vec<wgpu::Adapter>,
}

static FOUND: std::sync::OnceLock<Found> = std::sync::OnceLock::new();

/// Every adapter found, listed once per process (asking the drivers again
/// while a device is open has crashed Vulkan loaders). The first call asks
/// the drivers: it may take a moment.
pub fn adapters() -> &'static [Adapter] {
    &FOUND.get_or_init(probe).list
}

/// The adapters, if they were listed already (never asks the drivers).
pub fn adapters_listed() -> Option<&'static [Adapter]> {
    FOUND.get().map(|f| f.list.as_slice())
}

/// The handle that opens `adapter`, if it is one of [`adapters()`].
#[cfg(feature = "wgpu")]
pub(crate) fn handle(adapter: &Adapter) -> Option<&'static wgpu::Adapter> {
    let found = FOUND.get_or_init(probe);
    found
        .list
        .get(adapter.index)
        .filter(|a| *a == adapter)
        .and(found.handles.get(adapter.index))
}

#[cfg(feature = "wgpu")]
fn probe() -> Found {
    // A driver that panics while being asked must not take the node down:
    // the machine then simply has no adapter.
    std::panic::catch_unwind(|| {
        for api in [
            wgpu::Backends::VULKAN,
            wgpu::Backends::METAL,
            wgpu::Backends::DX12,
        ] {
            let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
                backends: api,
                ..wgpu::InstanceDescriptor::new_without_display_handle()
            });
            let handles = pollster::block_on(instance.enumerate_adapters(api));
            let infos: Vec<wgpu::AdapterInfo> =
                handles.iter().map(wgpu::Adapter::get_info).collect();
            // Kept for the process's life: instances coming and going on
            // several threads crash some Vulkan loaders.
            std::mem::forget(instance);
            if !infos.is_empty() {
                let list = number(infos.into_iter().map(|i| {
                    let kind = match i.device_type {
                        wgpu::DeviceType::DiscreteGpu => AdapterKind::Discrete,
                        wgpu::DeviceType::IntegratedGpu => AdapterKind::Integrated,
                        wgpu::DeviceType::VirtualGpu => AdapterKind::Virtual,
                        wgpu::DeviceType::Cpu => AdapterKind::Cpu,
                        wgpu::DeviceType::Other => AdapterKind::Other,
                    };
                    let driver = [i.driver.as_str(), i.driver_info.as_str()]
                        .iter()
                        .filter(|s| !s.is_empty())
                        .copied()
                        .collect::<Vec<_>>()
                        .join(" ");
                    (i.name, kind, i.backend.to_str().to_string(), driver)
                }));
                return Found { list, handles };
            }
        }
        Found::default()
    })
    .unwrap_or_default()
}

#[cfg(not(feature = "wgpu"))]
fn probe() -> Found {
    Found::default()
}

/// Numbers adapters by their place in the order found.
#[cfg_attr(not(feature = "wgpu"), allow(dead_code))]
fn number(found: impl Iterator<Item = (String, AdapterKind, String, String)>) -> Vec<Adapter> {
    found
        .enumerate()
        .map(|(index, (name, kind, api, driver))| Adapter {
            name,
            kind,
            api,
            driver,
            index,
        })
        .collect()
}

/// The adapter `auto` proves on: the first discrete GPU, else the first
/// integrated one; `None` means the CPU backend (a software adapter is
/// never chosen over it).
pub fn best_gpu(found: &[Adapter]) -> Option<&Adapter> {
    [AdapterKind::Discrete, AdapterKind::Integrated]
        .iter()
        .find_map(|kind| found.iter().find(|a| a.kind == *kind))
}

/// The adapter `wgpu` (asked by name) proves on: the best GPU, else a
/// virtual one, else a software one (lavapipe: for tests and for those who
/// ask), else any.
pub fn best_any(found: &[Adapter]) -> Option<&Adapter> {
    best_gpu(found).or_else(|| {
        [AdapterKind::Virtual, AdapterKind::Cpu, AdapterKind::Other]
            .iter()
            .find_map(|kind| found.iter().find(|a| a.kind == *kind))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(kinds: &[AdapterKind]) -> Vec<Adapter> {
        number(
            kinds
                .iter()
                .enumerate()
                .map(|(i, k)| (format!("a{i}"), *k, "vulkan".into(), String::new())),
        )
    }

    #[test]
    fn auto_prefers_discrete_then_integrated_and_never_software() {
        use AdapterKind::*;
        let found = list(&[Cpu, Integrated, Discrete, Discrete]);
        let best = best_gpu(&found).expect("a GPU");
        assert_eq!((best.name.as_str(), best.index), ("a2", 2));
        let found = list(&[Cpu, Virtual, Integrated]);
        assert_eq!(best_gpu(&found).map(|a| a.name.as_str()), Some("a2"));
        // lavapipe alone, or a virtual GPU: the CPU backend.
        assert_eq!(best_gpu(&list(&[Cpu])), None);
        assert_eq!(best_gpu(&list(&[Virtual, Cpu])), None);
        // Asked for wgpu by name: the software adapter is what there is.
        assert_eq!(
            best_any(&list(&[Cpu, Virtual])).map(|a| a.kind),
            Some(Virtual)
        );
        assert_eq!(best_any(&list(&[Cpu])).map(|a| a.kind), Some(Cpu));
        assert_eq!(best_any(&[]), None);
    }

    #[test]
    fn adapters_are_numbered_by_their_place() {
        use AdapterKind::*;
        let found = list(&[Discrete, Integrated, Discrete, Cpu, Integrated]);
        let idx: Vec<usize> = found.iter().map(|a| a.index).collect();
        assert_eq!(idx, vec![0, 1, 2, 3, 4]);
    }
}
