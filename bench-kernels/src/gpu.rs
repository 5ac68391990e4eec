//! The proof's matmul on a graphics adapter, through wgpu (Vulkan, Metal,
//! DX12): one tiled WGSL kernel for C = A x B and one for the fold between
//! rounds, nothing else. (burn's whole wgpu backend, with every tensor
//! operation, fusion and autotuned kernels, added 41 MB to the stripped
//! `troop`; the proof needs these two kernels, and they add a few.)
//!
//! The values are exact whatever the order of the sums (see
//! [`crate::challenge`]), so the root is the CPU's bit for bit.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use wgpu::util::DeviceExt;

use crate::adapters::{Adapter, handle};
use crate::matmul::{Fold, ProveError};

const MATMUL: &str = include_str!("shaders/matmul.wgsl");
const FOLD: &str = include_str!("shaders/fold.wgsl");
/// The side of the tile of C one workgroup computes (matmul.wgsl's TS).
const TILE: u32 = 64;
/// The side of a fold workgroup (fold.wgsl's workgroup size).
const FOLD_SIDE: u32 = 16;

/// An open device with both kernels compiled.
pub(crate) struct Gpu {
    /// Which adapter (its place in [`crate::adapters()`]).
    index: usize,
    device: wgpu::Device,
    queue: wgpu::Queue,
    matmul: wgpu::ComputePipeline,
    fold: wgpu::ComputePipeline,
}

/// The device last opened, kept: a re-proof hours later reuses it instead
/// of opening the device and compiling the kernels again. Dropped when it
/// fails, so the next proof opens a fresh one.
static OPEN: Mutex<Option<Arc<Gpu>>> = Mutex::new(None);

fn backend(e: impl std::fmt::Display) -> ProveError {
    ProveError::Backend(e.to_string())
}

impl Gpu {
    /// The open device of `adapter`, opened now if it is not.
    pub(crate) fn get(adapter: &Adapter) -> Result<Arc<Gpu>, ProveError> {
        let mut open = OPEN.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(g) = open.as_ref().filter(|g| g.index == adapter.index) {
            return Ok(g.clone());
        }
        let g = Arc::new(Gpu::open(adapter)?);
        *open = Some(g.clone());
        Ok(g)
    }

    /// Forgets the kept device (after it failed).
    pub(crate) fn forget() {
        *OPEN.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn open(adapter: &Adapter) -> Result<Gpu, ProveError> {
        let handle = handle(adapter)
            .ok_or_else(|| backend(format!("adapter {} was not found on this machine", adapter)))?;
        let (device, queue) = pollster::block_on(handle.request_device(&wgpu::DeviceDescriptor {
            label: Some("troop proof"),
            // The adapter's own limits: the largest buffers it allows
            // (an n = 4096 matrix is 64 MiB, n = 16384 is 1 GiB).
            required_limits: handle.limits(),
            memory_hints: wgpu::MemoryHints::Performance,
            ..Default::default()
        }))
        .map_err(|e| backend(format!("opening {adapter}: {e}")))?;
        let pipeline = |label: &str, source: &str| {
            let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(label),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(label),
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            })
        };
        let matmul = pipeline("troop matmul", MATMUL);
        let fold = pipeline("troop fold", FOLD);
        Ok(Gpu {
            index: adapter.index,
            device,
            queue,
            matmul,
            fold,
        })
    }

    /// Whether a side x side matrix fits one of this device's buffers.
    fn check_size(&self, side: usize) -> Result<u64, ProveError> {
        let n = side;
        let bytes = (n * n * 4) as u64;
        let limits = self.device.limits();
        let most = limits
            .max_buffer_size
            .min(limits.max_storage_buffer_binding_size);
        if bytes > most {
            return Err(backend(format!(
                "a {n} x {n} matrix is {} MiB, more than this adapter's largest buffer ({} MiB)",
                bytes >> 20,
                most >> 20
            )));
        }
        Ok(bytes)
    }

    /// Waits until the queue has done everything submitted.
    fn wait(&self) -> Result<(), ProveError> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(backend)
    }

    /// `rounds` chained products, `fold` between them: the last product,
    /// and the seconds from the first upload to the last value read back.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn chain(
        &self,
        a: &[f32],
        b: &[f32],
        n: usize,
        rounds: u32,
        bound: i32,
        fold: Fold,
        deadline: Option<Instant>,
        start: Instant,
        progress: &mut dyn FnMut(u32, u32),
    ) -> Result<(Vec<f32>, f64), ProveError> {
        let side = n.div_ceil(TILE as usize) * TILE as usize;
        let bytes = self.check_size(side)?;
        let t0 = Instant::now();
        let d = &self.device;
        let storage = |label, data: &[f32], usage| {
            d.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: &padded(data, n, side),
                usage: wgpu::BufferUsages::STORAGE | usage,
            })
        };
        let buf_a = storage("a", a, wgpu::BufferUsages::COPY_DST);
        let buf_b = storage("b", b, wgpu::BufferUsages::empty());
        let buf_c = d.create_buffer(&wgpu::BufferDescriptor {
            label: Some("c"),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let read = d.create_buffer(&wgpu::BufferDescriptor {
            label: Some("read back"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut params = Vec::with_capacity(16);
        params.extend_from_slice(&(n as u32).to_le_bytes());
        params.extend_from_slice(&(side as u32).to_le_bytes());
        params.extend_from_slice(&bound.to_le_bytes());
        params.extend_from_slice(&[0u8; 4]);
        let params = d.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("params"),
            contents: &params,
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let bind = |pipeline: &wgpu::ComputePipeline, buffers: &[&wgpu::Buffer]| {
            let entries: Vec<wgpu::BindGroupEntry> = buffers
                .iter()
                .enumerate()
                .map(|(i, b)| wgpu::BindGroupEntry {
                    binding: i as u32,
                    resource: b.as_entire_binding(),
                })
                .collect();
            d.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &pipeline.get_bind_group_layout(0),
                entries: &entries,
            })
        };
        let mm_group = bind(&self.matmul, &[&buf_a, &buf_b, &buf_c, &params]);
        let fold_group = bind(&self.fold, &[&buf_c, &buf_a, &params]);
        let tiles = side as u32 / TILE;
        let folds = (side as u32).div_ceil(FOLD_SIDE);
        for round in 0..rounds {
            if round > 0 {
                if deadline.is_some_and(|dl| Instant::now() > dl) {
                    return Err(ProveError::Timeout(start.elapsed().as_secs()));
                }
                if fold == Fold::Host {
                    let mut c = self.read(&buf_c, &read, n, side)?;
                    crate::matmul::fold_slice(&mut c, n, bound);
                    self.queue.write_buffer(&buf_a, 0, &padded(&c, n, side));
                }
            }
            let mut enc = d.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                if round > 0 && fold == Fold::Device {
                    pass.set_pipeline(&self.fold);
                    pass.set_bind_group(0, &fold_group, &[]);
                    pass.dispatch_workgroups(folds, folds, 1);
                }
                pass.set_pipeline(&self.matmul);
                pass.set_bind_group(0, &mm_group, &[]);
                pass.dispatch_workgroups(tiles, tiles, 1);
            }
            self.queue.submit([enc.finish()]);
            self.wait()?;
            progress(round + 1, rounds);
        }
        let c = self.read(&buf_c, &read, n, side)?;
        Ok((c, t0.elapsed().as_secs_f64()))
    }

    /// Copies `src` (side x side) to the host through `read`, without its
    /// padding (n x n).
    fn read(
        &self,
        src: &wgpu::Buffer,
        read: &wgpu::Buffer,
        n: usize,
        side: usize,
    ) -> Result<Vec<f32>, ProveError> {
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(src, 0, read, 0, (side * side * 4) as u64);
        self.queue.submit([enc.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        read.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|_| backend("the read back was never answered"))?
            .map_err(|e| backend(format!("reading back: {e}")))?;
        let values = {
            let view = read
                .get_mapped_range(..)
                .map_err(|e| backend(format!("reading back: {e}")))?;
            let mut out = Vec::with_capacity(n * n);
            for row in view.chunks_exact(side * 4).take(n) {
                out.extend(
                    row[..n * 4]
                        .chunks_exact(4)
                        .map(|w| f32::from_le_bytes([w[0], w[1], w[2], w[3]])),
                );
            }
            out
        };
        read.unmap();
        Ok(values)
    }
}

/// An n x n matrix as the bytes of a side x side one, zeros around it.
fn padded(v: &[f32], n: usize, side: usize) -> Vec<u8> {
    let mut out = vec![0u8; side * side * 4];
    for (src, dst) in v.chunks_exact(n).zip(out.chunks_exact_mut(side * 4)) {
        for (x, d) in src.iter().zip(dst.chunks_exact_mut(4)) {
            d.copy_from_slice(&x.to_le_bytes());
        }
    }
    out
}

/// [`Gpu::chain`] on `adapter`'s kept device; a failure forgets the device.
#[allow(clippy::too_many_arguments)]
pub(crate) fn chain(
    adapter: &Adapter,
    a: &[f32],
    b: &[f32],
    n: usize,
    rounds: u32,
    bound: i32,
    fold: Fold,
    deadline: Option<Instant>,
    start: Instant,
    progress: &mut dyn FnMut(u32, u32),
) -> Result<(Vec<f32>, f64), ProveError> {
    let gpu = Gpu::get(adapter)?;
    let out = gpu.chain(a, b, n, rounds, bound, fold, deadline, start, progress);
    if matches!(out, Err(ProveError::Backend(_))) {
        Gpu::forget();
    }
    out
}
