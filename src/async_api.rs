//! Async entry points for everything that waits: creating a context, a call's error scope,
//! reading results back, waiting for submitted work. They work everywhere; on `wasm32` (in a
//! browser, where nothing may block) they are the only way to wait, and the blocking versions
//! ([`Context::new`], [`Context::from_adapter`], [`Context::download`], ...) are not compiled.
//!
//! On wasm the synchronous calls that only record and submit work ([`Context::attention`],
//! [`KvCache::append`], [`KvCache::step`]) still exist but cannot wait for their error scope:
//! a validation error they cause goes to an enclosing error scope, or to the device's
//! uncaptured-error handler. Their `_async` versions here return it as [`Error::Gpu`].

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, Waker};

use crate::cache::{Checkpoint, DecodeOptions, KvCache, Step, Tokens};
use crate::context::{device_request, Context};
use crate::device::{choose_adapter, instance, unusable_reason};
use crate::error::GpuSource;
use crate::{Error, Inputs, Options, Outputs, Result, Tensor};

/// An error scope that is waited for off wasm and not pushed at all on wasm (where waiting is
/// impossible in a synchronous call; errors then reach the enclosing scope).
pub(crate) struct Scope {
    #[cfg(not(target_arch = "wasm32"))]
    guard: wgpu::ErrorScopeGuard,
}

impl Scope {
    /// Pushes a validation scope on `device` (off wasm).
    pub(crate) fn push(device: &wgpu::Device) -> Scope {
        #[cfg(target_arch = "wasm32")]
        {
            let _ = device;
            Scope {}
        }
        #[cfg(not(target_arch = "wasm32"))]
        Scope {
            guard: device.push_error_scope(wgpu::ErrorFilter::Validation),
        }
    }

    /// Pops the scope and returns its error (off wasm, blocking); `None` on wasm.
    pub(crate) fn pop(self) -> Option<wgpu::Error> {
        #[cfg(target_arch = "wasm32")]
        {
            None
        }
        #[cfg(not(target_arch = "wasm32"))]
        pollster::block_on(self.guard.pop())
    }
}

/// [`Error::Gpu`] for a wgpu error popped from a scope. Off wasm the wgpu error is kept as the
/// source; on wasm it is not `Send` (it holds a JavaScript value), so its text is kept instead.
pub(crate) fn scope_error(during: impl Into<String>, e: wgpu::Error) -> Error {
    #[cfg(not(target_arch = "wasm32"))]
    {
        Error::gpu(during, e)
    }
    #[cfg(target_arch = "wasm32")]
    {
        Error::gpu_msg(format!("{}: {e}", during.into()))
    }
}

/// A one-shot value delivered by a wgpu callback, awaited as a future (no executor or channel
/// crate needed; on the web the callback runs from the browser's event loop).
struct Oneshot<T> {
    state: Arc<Mutex<(Option<T>, Option<Waker>)>>,
}

impl<T> Oneshot<T> {
    fn new() -> (Oneshot<T>, impl FnOnce(T) + Clone) {
        let state = Arc::new(Mutex::new((None, None::<Waker>)));
        let tx = state.clone();
        let send = move |v: T| {
            if let Ok(mut s) = tx.lock() {
                s.0 = Some(v);
                if let Some(w) = s.1.take() {
                    w.wake();
                }
            }
        };
        (Oneshot { state }, send)
    }
}

impl<T> Future for Oneshot<T> {
    type Output = Result<T>;
    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Result<T>> {
        match self.state.lock() {
            Ok(mut s) => match s.0.take() {
                Some(v) => Poll::Ready(Ok(v)),
                None => {
                    s.1 = Some(cx.waker().clone());
                    Poll::Pending
                }
            },
            Err(_) => Poll::Ready(Err(Error::gpu_msg(
                "waiting for a GPU callback (its state was poisoned)",
            ))),
        }
    }
}

/// Every adapter wgpu sees, each with `None` if it can run our kernels or the reason it cannot
/// (the async form of [`crate::adapters`]; in a browser, the one adapter it offers).
pub async fn adapters_async() -> Vec<(wgpu::Adapter, Option<String>)> {
    instance()
        .enumerate_adapters(wgpu::Backends::all())
        .await
        .into_iter()
        .map(|a| {
            let r = unusable_reason(&a);
            (a, r)
        })
        .collect()
}

impl Context {
    /// [`Context::new`] without blocking: picks the best adapter and requests a device.
    pub async fn new_async() -> Result<Self> {
        let adapter = choose_adapter(adapters_async().await)?;
        Self::from_adapter_async(&adapter).await
    }

    /// [`Context::from_adapter`] without blocking.
    pub async fn from_adapter_async(adapter: &wgpu::Adapter) -> Result<Self> {
        let desc = device_request(adapter)?;
        let (device, queue) = adapter
            .request_device(&desc)
            .await
            .map_err(|e| Error::RequestDevice(GpuSource::new(e)))?;
        let coop = adapter.cooperative_matrix_properties();
        Ok(Self::build(device, queue, adapter.get_info(), coop))
    }

    /// [`Context::attention`], returning a validation error the call caused (also on wasm).
    pub async fn attention_async(
        &self,
        inputs: &Inputs<'_>,
        options: &Options,
        outputs: &Outputs<'_>,
    ) -> Result<()> {
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let r = self.attention(inputs, options, outputs);
        let e = scope.pop().await;
        r?;
        match e {
            Some(e) => Err(scope_error("running selattn attention", e)),
            None => Ok(()),
        }
    }

    /// Waits until all work submitted so far is done.
    pub async fn sync_async(&self) -> Result<()> {
        let (rx, tx) = Oneshot::new();
        self.queue.on_submitted_work_done(move || tx(()));
        #[cfg(not(target_arch = "wasm32"))]
        self.sync()?;
        rx.await
    }

    /// [`Context::download`] without blocking: a tensor as f32 (f16 widened).
    pub async fn download_async(&self, t: &Tensor) -> Result<Vec<f32>> {
        let bytes = self.download_bytes_async(t).await?;
        Ok(crate::tensor::widen(t.dtype(), &bytes))
    }

    /// [`Context::download_u32`] without blocking.
    pub async fn download_u32_async(&self, t: &Tensor) -> Result<Vec<u32>> {
        Ok(bytemuck::pod_collect_to_vec(
            &self.download_bytes_async(t).await?,
        ))
    }

    /// [`Context::download_bytes`] without blocking.
    pub async fn download_bytes_async(&self, t: &Tensor) -> Result<Vec<u8>> {
        let staging = self.readback(t)?;
        let slice = staging.slice(..);
        let (rx, tx) = Oneshot::new();
        slice.map_async(wgpu::MapMode::Read, tx);
        #[cfg(not(target_arch = "wasm32"))]
        self.sync()?;
        rx.await?
            .map_err(|e| Error::gpu("mapping a readback buffer", e))?;
        let view = slice
            .get_mapped_range()
            .map_err(|e| Error::gpu("reading a mapped readback buffer", e))?;
        let mut out = view.to_vec();
        drop(view);
        staging.unmap();
        out.truncate(t.bytes() as usize);
        Ok(out)
    }
}

impl KvCache {
    /// [`KvCache::append`], returning a validation error the call caused (also on wasm).
    pub async fn append_async(
        &mut self,
        ctx: &Context,
        tokens: &Tokens<'_>,
        counts: Option<&[u32]>,
    ) -> Result<()> {
        let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let r = self.append(ctx, tokens, counts);
        let e = scope.pop().await;
        r?;
        match e {
            Some(e) => Err(scope_error("running selattn cache append", e)),
            None => Ok(()),
        }
    }

    /// [`KvCache::step`], returning a validation error the call caused (also on wasm).
    pub async fn step_async(
        &mut self,
        ctx: &Context,
        step: &Step<'_>,
        options: &DecodeOptions,
        outputs: &Outputs<'_>,
    ) -> Result<()> {
        let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let r = self.step(ctx, step, options, outputs);
        let e = scope.pop().await;
        r?;
        match e {
            Some(e) => Err(scope_error("running selattn decode", e)),
            None => Ok(()),
        }
    }

    /// [`KvCache::checkpoint`], returning a validation error the call caused (also on wasm).
    pub async fn checkpoint_async(&mut self, ctx: &Context, batch: u32) -> Result<Checkpoint> {
        let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let r = self.checkpoint(ctx, batch);
        let e = scope.pop().await;
        let cp = r?;
        match e {
            Some(e) => Err(scope_error("running selattn cache checkpoint", e)),
            None => Ok(cp),
        }
    }

    /// [`KvCache::rollback`], returning a validation error the call caused (also on wasm).
    pub async fn rollback_async(&mut self, ctx: &Context, checkpoint: &Checkpoint) -> Result<()> {
        let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let r = self.rollback(ctx, checkpoint);
        let e = scope.pop().await;
        r?;
        match e {
            Some(e) => Err(scope_error("running selattn cache rollback", e)),
            None => Ok(()),
        }
    }
}
