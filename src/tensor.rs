//! GPU tensors: a buffer, a shape, an element type and the device they live on.

use crate::context::DeviceToken;
use crate::spec::{checked_numel, numel, Role, Shape};
use crate::{Context, DType, Error, Result};

/// A dense, row-major tensor in a GPU buffer. The buffer may be one the application owns
/// ([`Tensor::from_buffer`]); no copy is made. A tensor belongs to the device of the context
/// that made or wrapped it, and every call on another device rejects it.
#[derive(Clone, Debug)]
pub struct Tensor {
    buffer: wgpu::Buffer,
    shape: Vec<u64>,
    dtype: DType,
    token: DeviceToken,
}

/// Bytes of `shape` elements of `dtype`; `overflow` is the error when they (rounded up to whole
/// words) do not fit in a u64.
fn data_bytes(shape: &[u64], dtype: DType, overflow: impl FnOnce() -> Error) -> Result<u64> {
    if shape.contains(&0) {
        return Err(Error::ZeroSize { what: "tensor" });
    }
    checked_numel(shape)
        .and_then(|n| n.checked_mul(dtype.size()))
        .filter(|b| b.checked_add(3).is_some()) // rounded up to whole words when bound
        .ok_or_else(overflow)
}

impl Tensor {
    /// Wraps a buffer the application owns, made on `ctx`'s device (that cannot be checked:
    /// wrapping another device's buffer is the caller's error). It must have STORAGE usage and
    /// hold the tensor's bytes rounded up to whole 4-byte words (a larger buffer is fine: only
    /// the first bytes are used). [`Context::download`] needs COPY_SRC usage and
    /// [`Context::poison`] COPY_DST; both check.
    pub fn from_buffer(
        ctx: &Context,
        buffer: wgpu::Buffer,
        shape: &[u64],
        dtype: DType,
    ) -> Result<Self> {
        if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
            return Err(Error::BadBuffer {
                why: format!("usage {:?} lacks STORAGE", buffer.usage()),
            });
        }
        let need = data_bytes(shape, dtype, || Error::BadBuffer {
            why: format!("shape {shape:?} of {dtype:?} has more bytes than a u64 counts"),
        })?;
        let words = need.div_ceil(4) * 4;
        if buffer.size() < words {
            return Err(Error::BadBuffer {
                why: format!(
                    "{} bytes, shape {shape:?} of {dtype:?} needs {need} (bound and copied as {words}: whole 4-byte words)",
                    buffer.size()
                ),
            });
        }
        Ok(Tensor {
            buffer,
            shape: shape.to_vec(),
            dtype,
            token: ctx.device_token().clone(),
        })
    }

    /// The buffer.
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }
    /// The shape.
    pub fn shape(&self) -> &[u64] {
        &self.shape
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        numel(&self.shape)
    }
    /// Bytes of data (not the buffer size).
    pub fn bytes(&self) -> u64 {
        self.numel() * self.dtype.size()
    }
    /// The identity of the device the tensor lives on.
    pub fn device_token(&self) -> &DeviceToken {
        &self.token
    }
}

const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

impl Context {
    /// Bytes of a tensor this context may allocate: at most one storage binding.
    fn tensor_bytes(&self, shape: &[u64], dtype: DType) -> Result<u64> {
        let limit = self
            .capabilities()
            .max_storage_binding
            .min(self.capabilities().max_buffer);
        let too_large = |bytes| Error::TooLarge {
            what: "tensor",
            bytes,
            limit,
        };
        let bytes = data_bytes(shape, dtype, || too_large(u64::MAX))?;
        if bytes > limit {
            return Err(too_large(bytes));
        }
        Ok(bytes)
    }

    /// A new, uninitialised tensor.
    pub fn empty(&self, shape: &[u64], dtype: DType) -> Result<Tensor> {
        let bytes = self.tensor_bytes(shape, dtype)?;
        if dtype == DType::F16 && !self.capabilities().f16 {
            return Err(Error::FeatureMissing {
                feature: "SHADER_F16",
            });
        }
        // Round up to 4 bytes: copies and clears work in whole words.
        let size = bytes.div_ceil(4) * 4;
        let buffer = self.scoped("allocating a tensor", || {
            Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("selattn tensor"),
                size,
                usage: USAGE,
                mapped_at_creation: false,
            }))
        })?;
        Ok(Tensor {
            buffer,
            shape: shape.to_vec(),
            dtype,
            token: self.token_clone(),
        })
    }

    fn token_clone(&self) -> DeviceToken {
        self.device_token().clone()
    }

    fn upload_bytes(&self, shape: &[u64], dtype: DType, data: &[u8]) -> Result<Tensor> {
        let need = self.tensor_bytes(shape, dtype)?;
        if data.len() as u64 != need {
            return Err(Error::LengthMismatch {
                what: "upload",
                expected: need / dtype.size(),
                got: data.len() as u64 / dtype.size(),
            });
        }
        let t = self.empty(shape, dtype)?;
        let mut padded;
        let bytes = if !data.len().is_multiple_of(4) {
            padded = data.to_vec();
            padded.resize(data.len().div_ceil(4) * 4, 0);
            &padded[..]
        } else {
            data
        };
        self.scoped("uploading a tensor", || {
            self.queue.write_buffer(&t.buffer, 0, bytes);
            Ok(())
        })?;
        Ok(t)
    }

    /// Uploads f32 data with a shape.
    pub fn upload(&self, shape: &[u64], data: &[f32]) -> Result<Tensor> {
        self.upload_bytes(shape, DType::F32, bytemuck::cast_slice(data))
    }

    /// Uploads f32 data, stored as f16 (rounded to nearest).
    pub fn upload_f16(&self, shape: &[u64], data: &[f32]) -> Result<Tensor> {
        let h: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
        self.upload_bytes(shape, DType::F16, bytemuck::cast_slice(&h))
    }

    /// Uploads u32 data (kv_len).
    pub fn upload_u32(&self, shape: &[u64], data: &[u32]) -> Result<Tensor> {
        self.upload_bytes(shape, DType::U32, bytemuck::cast_slice(data))
    }

    /// Uploads f32 data as the tensor with role `role` in a call of shape `shape` (its dims come
    /// from [`Shape::dims`]). `kv_len` holds u32: upload it with [`Context::upload_u32`].
    ///
    /// ```
    /// use selattn::{Context, Role, Shape};
    /// # fn main() -> selattn::Result<()> {
    /// let ctx = Context::new()?;
    /// let s = Shape::new(1, 2, 4, 8); // B, H, N, D
    /// let q = ctx.upload_as(&s, Role::Q, &[0.5; 64])?;
    /// assert_eq!(q.shape(), [1, 2, 4, 8]);
    /// assert!(ctx.upload_as(&s, Role::Q, &[0.5; 63]).is_err()); // wrong length: typed error
    /// # Ok(())
    /// # }
    /// ```
    pub fn upload_as(&self, shape: &Shape, role: Role, data: &[f32]) -> Result<Tensor> {
        if role == Role::KvLen {
            return Err(Error::DTypeMismatch {
                tensor: "kv_len",
                expected: DType::U32,
                got: DType::F32,
            });
        }
        self.upload(&shape.dims(role), data)
    }

    /// An f32 tensor (contents undefined) for role `role` in a call of shape `shape`; for an
    /// output, or an input filled by the application.
    pub fn empty_as(&self, shape: &Shape, role: Role) -> Result<Tensor> {
        let dtype = if role == Role::KvLen {
            DType::U32
        } else {
            DType::F32
        };
        self.empty(&shape.dims(role), dtype)
    }

    /// Fills a tensor's words with NaN (f32/f16) or 0xFFFFFFFF (u32), to poison outputs in tests.
    /// Needs COPY_DST usage.
    pub fn poison(&self, t: &Tensor) -> Result<()> {
        self.owns("tensor", t)?;
        if !t.buffer.usage().contains(wgpu::BufferUsages::COPY_DST) {
            return Err(Error::BadBuffer {
                why: format!("usage {:?} lacks COPY_DST (poison)", t.buffer.usage()),
            });
        }
        let n = t.bytes().div_ceil(4) as usize;
        self.scoped("poisoning a tensor", || {
            self.queue
                .write_buffer(&t.buffer, 0, bytemuck::cast_slice(&vec![0xFFFF_FFFFu32; n]));
            Ok(())
        })
    }

    /// Reads a tensor back as f32 (f16 is widened). Waits for the GPU; not on wasm (see
    /// [`Context::download_async`]).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn download(&self, t: &Tensor) -> Result<Vec<f32>> {
        let bytes = self.download_bytes(t)?;
        Ok(widen(t.dtype, &bytes))
    }

    /// Reads a u32 tensor back. Not on wasm (see [`Context::download_u32_async`]).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn download_u32(&self, t: &Tensor) -> Result<Vec<u32>> {
        Ok(bytemuck::pod_collect_to_vec(&self.download_bytes(t)?))
    }

    /// Reads a tensor's bytes back. Waits for the GPU. Needs COPY_SRC usage. Not on wasm (see
    /// [`Context::download_bytes_async`]).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn download_bytes(&self, t: &Tensor) -> Result<Vec<u8>> {
        self.owns("tensor", t)?;
        if !t.buffer.usage().contains(wgpu::BufferUsages::COPY_SRC) {
            return Err(Error::BadBuffer {
                why: format!("usage {:?} lacks COPY_SRC (download)", t.buffer.usage()),
            });
        }
        // Whole words: `from_buffer` and `empty` guarantee the buffer holds them.
        let size = t.bytes().div_ceil(4) * 4;
        let (staging, rx) = self.scoped("reading a tensor back", || {
            let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("selattn readback"),
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut enc = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
            enc.copy_buffer_to_buffer(&t.buffer, 0, &staging, 0, size);
            self.queue.submit([enc.finish()]);
            let (tx, rx) = std::sync::mpsc::channel();
            staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
            self.sync()?;
            Ok((staging, rx))
        })?;
        rx.recv()
            .map_err(|e| Error::gpu("waiting for a download", e))?
            .map_err(|e| Error::gpu("mapping a download", e))?;
        let slice = staging.slice(..);
        let view = slice
            .get_mapped_range()
            .map_err(|e| Error::gpu("reading a download", e))?;
        let mut out = view.to_vec();
        drop(view);
        staging.unmap();
        out.truncate(t.bytes() as usize);
        Ok(out)
    }

    /// A mappable copy of `t`'s bytes (rounded up to 4), with the copy submitted.
    pub(crate) fn readback(&self, t: &Tensor) -> Result<wgpu::Buffer> {
        self.owns("tensor", t)?;
        if !t.buffer.usage().contains(wgpu::BufferUsages::COPY_SRC) {
            return Err(Error::BadBuffer {
                why: format!("usage {:?} lacks COPY_SRC (download)", t.buffer.usage()),
            });
        }
        let size = t.bytes().div_ceil(4) * 4;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("selattn readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        enc.copy_buffer_to_buffer(&t.buffer, 0, &staging, 0, size);
        self.queue.submit([enc.finish()]);
        Ok(staging)
    }
}

/// A tensor's bytes as f32: f16 widened, u32 converted.
pub(crate) fn widen(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => bytemuck::pod_collect_to_vec(bytes),
        DType::F16 => bytemuck::pod_collect_to_vec::<u8, half::f16>(bytes)
            .into_iter()
            .map(f32::from)
            .collect(),
        DType::U32 => bytemuck::pod_collect_to_vec::<u8, u32>(bytes)
            .into_iter()
            .map(|x| x as f32)
            .collect(),
    }
}

/// Refuses any present tensor whose bytes exceed one storage binding (`limit`), naming it.
pub(crate) fn check_binding_sizes(
    limit: u64,
    tensors: &[(&'static str, Option<&Tensor>)],
) -> Result<()> {
    for &(what, t) in tensors {
        if let Some(t) = t {
            if t.bytes() > limit {
                return Err(Error::TooLarge {
                    what,
                    bytes: t.bytes(),
                    limit,
                });
            }
        }
    }
    Ok(())
}

/// Refuses outputs that share a buffer with an input or with another output: the GPU would race
/// on them. `why` is the error's text.
pub(crate) fn check_no_alias(
    ins: &[Option<&Tensor>],
    outs: &[Option<&Tensor>],
    why: &str,
) -> Result<()> {
    for (n, out) in outs.iter().enumerate() {
        let Some(out) = out else { continue };
        let same = |t: &&Tensor| t.buffer() == out.buffer();
        if ins.iter().flatten().any(same) || outs[n + 1..].iter().flatten().any(same) {
            return Err(Error::BadBuffer { why: why.into() });
        }
    }
    Ok(())
}
