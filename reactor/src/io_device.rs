//! I/O devices and their per-reactor channels, as SPDK's `spdk_io_device` / `spdk_io_channel`.
//!
//! An [`IoDevice`] is registered once with a create and a destroy callback. [`IoDevice::get_channel`]
//! on a reactor returns that reactor's own context, created on first use and shared
//! (refcounted) by every later caller on the same reactor; when the last [`Channel`] handle
//! drops, the destroy callback runs there. [`IoDevice::for_each_channel`] visits every reactor
//! holding a channel, one after another in reactor order, then completes on the caller.

use std::any::Any;
use std::collections::BTreeSet;
use std::marker::PhantomData;
use std::ops::Deref;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::context;
use crate::core::{ReactorCore, ReactorId, Shared};
use crate::message::Message;
use crate::oneshot::{oneshot, OneshotSender, RemoteHandle};
use crate::ReactorError;

type CreateFn<C> = dyn Fn(ReactorId) -> Result<C, i32> + Send + Sync;
type DestroyFn<C> = dyn Fn(ReactorId, C) + Send + Sync;

struct DeviceInner<C> {
    id: u64,
    name: String,
    create: Box<CreateFn<C>>,
    destroy: Box<DestroyFn<C>>,
    registry: Mutex<Registry>,
    _context: PhantomData<fn() -> C>,
}

/// Who holds or is creating a channel of a device, and whether it was unregistered: one lock,
/// so an unregister can never slip in between a create's check and its insert.
#[derive(Default)]
struct Registry {
    /// (runtime, reactor) pairs holding a channel.
    holders: BTreeSet<(u64, ReactorId)>,
    /// Channel creations past the unregistered check whose create callback has not returned.
    creating: usize,
    /// Channels whose last handle dropped and whose destroy callback has not returned.
    destroying: usize,
    /// Set by a successful unregister; no channel is created after it.
    unregistered: bool,
}

impl<C> DeviceInner<C> {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        // Every critical section leaves the registry consistent (no user code runs under the
        // lock), so a poisoned lock is still usable.
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A channel creation in progress; dropping it (a create that failed or panicked) gives the
/// reservation back, so the device can be unregistered again.
struct Creating<'a, C> {
    device: &'a DeviceInner<C>,
}

impl<'a, C> Creating<'a, C> {
    /// Reserves a creation, refused once the device is unregistered.
    fn begin(device: &'a DeviceInner<C>) -> Result<Self, ReactorError> {
        let mut registry = device.registry();
        if registry.unregistered {
            return Err(ReactorError::DeviceGone(device.name.clone()));
        }
        registry.creating += 1;
        Ok(Creating { device })
    }

    /// Turns the reservation into a holder, under the same lock.
    fn finish(self, holder: (u64, ReactorId)) {
        let mut registry = self.device.registry();
        registry.creating -= 1;
        registry.holders.insert(holder);
        drop(registry);
        std::mem::forget(self);
    }
}

impl<C> Drop for Creating<'_, C> {
    fn drop(&mut self) {
        self.device.registry().creating -= 1;
    }
}

/// A registered device whose per-reactor context is `C`. Cloning shares the registration.
pub struct IoDevice<C: 'static> {
    inner: Arc<DeviceInner<C>>,
}

impl<C: 'static> Clone for IoDevice<C> {
    fn clone(&self) -> Self {
        IoDevice {
            inner: Arc::clone(&self.inner),
        }
    }
}

fn next_device_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl<C: 'static> IoDevice<C> {
    /// Registers a device. `create` runs on a reactor the first time that reactor asks for a
    /// channel (a negative errno fails the request); `destroy` runs there when its last
    /// channel handle drops (or at stop).
    pub fn register(
        name: impl Into<String>,
        create: impl Fn(ReactorId) -> Result<C, i32> + Send + Sync + 'static,
        destroy: impl Fn(ReactorId, C) + Send + Sync + 'static,
    ) -> IoDevice<C> {
        IoDevice {
            inner: Arc::new(DeviceInner {
                id: next_device_id(),
                name: name.into(),
                create: Box::new(create),
                destroy: Box::new(destroy),
                registry: Mutex::new(Registry::default()),
                _context: PhantomData,
            }),
        }
    }

    /// The name given at registration.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The calling reactor's channel: the existing one (refcount + 1) or a new one.
    pub fn get_channel(&self) -> Result<Channel<C>, ReactorError> {
        let core = context::current()?;
        // A live channel here is a holder, so the device cannot have been unregistered.
        if let Some(existing) = lookup_channel::<C>(&core, self.inner.id) {
            return Ok(Channel { inner: existing });
        }
        let creating = Creating::begin(&self.inner)?;
        let context =
            (self.inner.create)(core.id).map_err(|errno| ReactorError::ChannelCreate {
                device: self.inner.name.clone(),
                reactor: core.id,
                errno,
            })?;
        let inner = Rc::new(ChannelInner {
            context: Some(context),
            device: Arc::clone(&self.inner),
            reactor: core.id,
            core: Rc::downgrade(&core),
            shared: Arc::clone(&core.shared),
        });
        let weak: Weak<dyn Any> = Rc::downgrade(&(Rc::clone(&inner) as Rc<dyn Any>));
        core.channels.borrow_mut().insert(self.inner.id, weak);
        creating.finish((core.shared.runtime_id, core.id));
        core.shared.live_channels.fetch_add(1, Ordering::AcqRel);
        Ok(Channel { inner })
    }

    /// The reactors that hold a channel of this device now, in order. On a reactor: those of
    /// its own runtime (devices are process-wide; several runtimes may use one). Off a
    /// reactor: those of every runtime, deduplicated.
    pub fn channel_holders(&self) -> Vec<ReactorId> {
        let runtime = context::with_current(|core| core.shared.runtime_id);
        let mut holders: Vec<ReactorId> = self
            .inner
            .registry()
            .holders
            .iter()
            .filter(|(holder_runtime, _)| runtime.is_none_or(|runtime| runtime == *holder_runtime))
            .map(|(_, reactor)| *reactor)
            .collect();
        holders.sort_unstable();
        holders.dedup();
        holders
    }

    /// Refuses further channels; `Err(DeviceBusy)` while any channel is still held, being
    /// created, or being destroyed (its destroy callback still running). Checked and set
    /// under the lock creations take, so no channel can appear after an unregister
    /// succeeded, and once it succeeded every destroy callback has returned.
    pub fn unregister(&self) -> Result<(), ReactorError> {
        let mut registry = self.inner.registry();
        if !registry.holders.is_empty() || registry.creating != 0 || registry.destroying != 0 {
            return Err(ReactorError::DeviceBusy(self.inner.name.clone()));
        }
        registry.unregistered = true;
        Ok(())
    }

    /// Visits each reactor holding a channel, one after another in reactor order, calling
    /// `visit` there with its context; then completes on the caller. A visit returning
    /// `Err(errno)` ends the walk with that status. Must be called on a reactor.
    pub fn for_each_channel(
        &self,
        visit: impl Fn(ReactorId, &C) -> Result<(), i32> + Send + Sync + 'static,
    ) -> Result<RemoteHandle<Result<(), i32>>, ReactorError> {
        let shared = Arc::clone(&context::current()?.shared);
        let (done, handle) = oneshot();
        let walk = Arc::new(Walk {
            device: Arc::clone(&self.inner),
            visit: Box::new(visit),
            holders: self.channel_holders(),
            shared,
            done: Mutex::new(Some(done)),
        });
        walk_step(walk, 0);
        Ok(handle)
    }
}

type VisitFn<C> = dyn Fn(ReactorId, &C) -> Result<(), i32> + Send + Sync;

struct Walk<C: 'static> {
    device: Arc<DeviceInner<C>>,
    visit: Box<VisitFn<C>>,
    holders: Vec<ReactorId>,
    shared: Arc<Shared>,
    done: Mutex<Option<OneshotSender<Result<(), i32>>>>,
}

impl<C> Walk<C> {
    fn finish(&self, status: Result<(), i32>) {
        let done = self
            .done
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(done) = done {
            done.send(status);
        }
    }
}

/// Sends the walk to its `index`-th holder, skipping holders that stopped; finishes after
/// the last.
fn walk_step<C: 'static>(walk: Arc<Walk<C>>, mut index: usize) {
    while let Some(&target) = walk.holders.get(index) {
        let next = Arc::clone(&walk);
        let visit_here = move || {
            let status = context::current().ok().and_then(|core| {
                lookup_channel::<C>(&core, next.device.id).map(|channel| {
                    let context = channel
                        .context
                        .as_ref()
                        .expect("channel context lives until drop");
                    (next.visit)(target, context)
                })
            });
            match status {
                Some(Err(errno)) => next.finish(Err(errno)),
                _ => walk_step(next, index + 1),
            }
        };
        match walk.shared.send(target, Message::Run(Box::new(visit_here))) {
            Ok(()) => return,
            Err(_) => index += 1,
        }
    }
    walk.finish(Ok(()));
}

fn lookup_channel<C: 'static>(core: &ReactorCore, device_id: u64) -> Option<Rc<ChannelInner<C>>> {
    let weak = core.channels.borrow().get(&device_id)?.clone();
    weak.upgrade()?.downcast::<ChannelInner<C>>().ok()
}

struct ChannelInner<C: 'static> {
    context: Option<C>,
    device: Arc<DeviceInner<C>>,
    reactor: ReactorId,
    core: Weak<ReactorCore>,
    shared: Arc<Shared>,
}

impl<C: 'static> Drop for ChannelInner<C> {
    fn drop(&mut self) {
        if let Some(core) = self.core.upgrade() {
            let mut channels = core.channels.borrow_mut();
            if channels
                .get(&self.device.id)
                .is_some_and(|weak| weak.strong_count() == 0)
            {
                channels.remove(&self.device.id);
            }
        }
        // No longer a holder (a new channel on this reactor, even one its destroy callback
        // asks for, is a holder of its own), but counted as destroying until the callback
        // returns or unwinds, so an unregister cannot succeed while it runs.
        let destroying = Destroying::begin(&self.device, (self.shared.runtime_id, self.reactor));
        self.shared.live_channels.fetch_sub(1, Ordering::AcqRel);
        if let Some(context) = self.context.take() {
            (self.device.destroy)(self.reactor, context);
        }
        drop(destroying);
    }
}

/// A channel destroy in progress: counted in [`Registry::destroying`] until dropped (after
/// the destroy callback returned, or while it unwinds).
struct Destroying<'a, C> {
    device: &'a DeviceInner<C>,
}

impl<'a, C> Destroying<'a, C> {
    /// Turns `holder` into a destroy in progress, under one lock.
    fn begin(device: &'a DeviceInner<C>, holder: (u64, ReactorId)) -> Self {
        let mut registry = device.registry();
        registry.holders.remove(&holder);
        registry.destroying += 1;
        Destroying { device }
    }
}

impl<C> Drop for Destroying<'_, C> {
    fn drop(&mut self) {
        self.device.registry().destroying -= 1;
    }
}

/// One reactor's handle on its context for a device. Clones share it; the last drop destroys
/// the context. Not `Send`: a channel belongs to its reactor.
pub struct Channel<C: 'static> {
    inner: Rc<ChannelInner<C>>,
}

impl<C: 'static> Clone for Channel<C> {
    fn clone(&self) -> Self {
        Channel {
            inner: Rc::clone(&self.inner),
        }
    }
}

impl<C: 'static> Channel<C> {
    /// The reactor this channel belongs to.
    pub fn reactor(&self) -> ReactorId {
        self.inner.reactor
    }

    /// How many handles share this reactor's context.
    pub fn ref_count(&self) -> usize {
        Rc::strong_count(&self.inner)
    }
}

impl<C: 'static> Deref for Channel<C> {
    type Target = C;

    fn deref(&self) -> &C {
        self.inner
            .context
            .as_ref()
            .expect("channel context lives until drop")
    }
}
