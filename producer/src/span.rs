//! Span guards: a start record when created, an end record when dropped.

use std::cell::Cell;

use telemetry_abi::{RegisterKind, SpanStatus};

use crate::handles::{Handle, Site};
use crate::intern::KeyError;
use crate::key::Key;
use crate::local::{self, Parent, RawAttr, Started};
use crate::stats::DropReason;
use crate::trace::{SpanContext, TraceparentError};

/// Attributes one span may carry; further ones are dropped and counted
/// ([`DropReason::AttrLimit`]).
pub const MAX_SPAN_ATTRS: usize = 8;

/// A registered span name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SpanName(Handle);

impl SpanName {
    /// Registers the span name `name`, or finds the key it already has.
    pub fn try_new(name: &str) -> Result<Self, KeyError> {
        Handle::register(RegisterKind::SPAN, name, &[]).map(Self)
    }

    /// Like [`try_new`](Self::try_new), but a refused name or the key limit gives a
    /// no-op name whose spans are counted as dropped.
    pub fn new(name: &str) -> Self {
        Self(Handle::register_or_noop(RegisterKind::SPAN, name, &[]))
    }

    /// The key, or `None` for a no-op name.
    pub fn key(&self) -> Option<Key> {
        Key::new(self.0.key)
    }

    /// Opens a span under the thread's innermost open span (the root of a new trace
    /// if none).
    pub fn enter(self) -> Span {
        Span::start(self, Parent::Current)
    }

    /// Opens a span under `parent` (a dropped parent: under the thread's innermost
    /// open span).
    pub fn enter_under(self, parent: &Span) -> Span {
        match parent.context() {
            Some(ctx) => Span::start(self, Parent::Of(ctx)),
            None => Span::start(self, Parent::Current),
        }
    }

    /// Opens a span under `parent`, a span of this or another process (say one named
    /// by an incoming request's `traceparent`): the new span joins its trace.
    pub fn enter_child_of(self, parent: SpanContext) -> Span {
        Span::start(self, Parent::Of(parent))
    }

    /// Opens a span continuing the trace of a W3C `traceparent` header value, the
    /// span it names as the parent. A malformed value opens nothing and says why.
    pub fn enter_traceparent(self, traceparent: &str) -> Result<Span, TraceparentError> {
        SpanContext::from_traceparent(traceparent).map(|ctx| self.enter_child_of(ctx))
    }

    #[doc(hidden)]
    #[inline(always)]
    pub fn __site(site: &Site) -> Self {
        Self(site.get(RegisterKind::SPAN))
    }
}

/// How a span ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Status {
    /// Not set.
    #[default]
    Unset,
    /// Succeeded.
    Ok,
    /// Failed.
    Error,
}

impl Status {
    const fn wire(self) -> SpanStatus {
        match self {
            Self::Unset => SpanStatus::UNSET,
            Self::Ok => SpanStatus::OK,
            Self::Error => SpanStatus::ERROR,
        }
    }
}

/// A span attribute value: an integer, or a `&'static str` (registered once as a
/// string key, so its cardinality is bounded by the program text).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanValue {
    /// An unsigned integer.
    U64(u64),
    /// A signed integer.
    I64(i64),
    /// A string known at compile time.
    Str(&'static str),
}

macro_rules! span_value_from {
    ($variant:ident as $wide:ty: $($t:ty),*) => {$(
        impl From<$t> for SpanValue {
            fn from(v: $t) -> Self {
                Self::$variant(<$wide>::from(v))
            }
        }
    )*};
}
span_value_from!(U64 as u64: u64, u32, u16, u8, bool);
span_value_from!(I64 as i64: i64, i32, i16, i8);

impl From<usize> for SpanValue {
    fn from(v: usize) -> Self {
        Self::U64(v as u64)
    }
}

impl From<&'static str> for SpanValue {
    fn from(v: &'static str) -> Self {
        Self::Str(v)
    }
}

/// An open span: written as an open record now (in the calling thread's ring) and a
/// close record when dropped (in the ring of whichever thread drops it), with the span
/// clock's time (`CLOCK_MONOTONIC` unless configured). `Send`: a span may move to
/// another thread (an async task that migrates) and end there; its parent link and
/// duration stay exact.
///
/// Its ids are W3C Trace Context ids (a 128-bit trace id, a 64-bit span id) unique
/// across processes, machines and restarts; [`traceparent`](Self::traceparent) gives
/// the header value to put on an outgoing request.
///
/// A span opened with no usable ring (or a full one) is dropped whole and counted
/// once; its end and attributes are then ignored.
#[must_use = "a span ends when its guard is dropped"]
#[derive(Debug)]
pub struct Span {
    name: u32,
    started: Started,
    attrs: Cell<u8>,
    status: Cell<Status>,
}

impl Span {
    fn start(name: SpanName, parent: Parent) -> Self {
        let started = if name.0.key == 0 {
            name.0.dropped();
            Started::NONE
        } else {
            local::span_start(name.0.key, parent)
        };
        Self {
            name: name.0.key,
            started,
            attrs: Cell::new(0),
            status: Cell::new(Status::Unset),
        }
    }

    /// The span's 64-bit id, or `None` if it was dropped.
    pub fn id(&self) -> Option<u64> {
        (self.started.ctx.span_id != 0).then_some(self.started.ctx.span_id)
    }

    /// The span's trace context, or `None` if it was dropped.
    pub fn context(&self) -> Option<SpanContext> {
        (self.started.ctx.span_id != 0).then_some(self.started.ctx)
    }

    /// The `traceparent` header value naming this span as the parent of the work an
    /// outgoing request asks for, or `None` if it was dropped.
    pub fn traceparent(&self) -> Option<crate::trace::Traceparent> {
        self.context().map(|c| c.traceparent())
    }

    /// Sets the status the end record will carry.
    pub fn set_status(&self, status: Status) {
        self.status.set(status);
    }

    /// Adds attribute `key` (label-key spelling: `[A-Za-z0-9_.]`, up to 32 bytes) with
    /// `value`. At most [`MAX_SPAN_ATTRS`] per span.
    pub fn attr(&self, key: &'static str, value: impl Into<SpanValue>) {
        if self.started.ctx.span_id == 0 {
            return;
        }
        let n = self.attrs.get();
        if usize::from(n) >= MAX_SPAN_ATTRS {
            local::count_noop(DropReason::AttrLimit);
            return;
        }
        self.attrs.set(n + 1);
        let value = match value.into() {
            SpanValue::U64(v) => RawAttr::U64(v),
            SpanValue::I64(v) => RawAttr::I64(v),
            SpanValue::Str(s) => RawAttr::Str(s),
        };
        local::span_attr(self.started, key, value);
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if self.started.ctx.span_id != 0 {
            local::span_end(self.name, self.started, self.status.get().wire());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static_assertions::assert_impl_all!(Span: Send);
    static_assertions::assert_not_impl_any!(Span: Sync);
    static_assertions::assert_impl_all!(SpanName: Send, Sync, Copy);

    #[test]
    fn values_convert() {
        assert_eq!(SpanValue::from(5u8), SpanValue::U64(5));
        assert_eq!(SpanValue::from(-5i32), SpanValue::I64(-5));
        assert_eq!(SpanValue::from(true), SpanValue::U64(1));
        assert_eq!(SpanValue::from("x"), SpanValue::Str("x"));
        assert_eq!(Status::Error.wire(), SpanStatus::ERROR);
    }
}
