//! A [`tracing_subscriber::Layer`] over the rings: spans become ring span records,
//! events count per level and target.
//!
//! A span's name and field names are interned once per callsite (a process-wide table,
//! read without a lock). Its start time is taken when it is created and its end time
//! when it closes (the last handle dropped), on whatever thread that happens, so a span
//! entered and exited on many threads, as under tokio, ends exactly once and lasts
//! from creation to close. Its parent is the one the registry gives it (explicit, or
//! the span current when it was created).
//!
//! A span is the span model's own (W3C ids, see [`SpanContext`]): its open record is
//! written when it is created, in the ring of the creating thread, and its attributes
//! and close record when it closes, in the ring of the closing thread. Its parent is
//! the registry's parent span; a span with none continues the trace of a
//! `traceparent` field if it has one (`info_span!("request", traceparent = %header)`,
//! a W3C value; a malformed one is ignored), else it hangs under the thread's innermost
//! open [`Span`](crate::Span), else it starts a trace. [`TracingLayer::context`] gives a
//! span's context, whose [`traceparent`](SpanContext::traceparent) goes on an outgoing
//! request. Field values become attributes: integers and bools
//! as integers, strings (and anything formatted with `Debug` or `Display`, cut to 96
//! bytes) as interned strings, at most [`TracingLayer::MAX_STRING_VALUES`] distinct
//! ones for the process; at most [`MAX_SPAN_ATTRS`] per span. A field named `error`
//! (recorded as anything but `false` or 0) gives the span the error status. metricsd redacts sensitive attribute keys as it
//! does for native spans.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use telemetry_abi::{RegisterKind, SpanStatus};
use tracing_core::field::{Field, Visit};
use tracing_core::span::{Attributes, Id, Record};
use tracing_core::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

use crate::facade_names::{clean_label_key, clean_name, cut};
use crate::global::global;
use crate::handles::{Counter, Handle};
use crate::key::Key;
use crate::local::{self, NO_SPAN, Parent, Started};
use crate::recorder::AttrValue;
use crate::span::MAX_SPAN_ATTRS;
use crate::stats::DropReason;
use crate::trace::SpanContext;

/// The `tracing` backend: add it to a `tracing_subscriber::Registry`.
///
/// ```no_run
/// use tracing_subscriber::layer::SubscriberExt;
///
/// let subscriber = tracing_subscriber::registry().with(nexus_metrics::TracingLayer::new());
/// tracing::subscriber::set_global_default(subscriber).expect("the first subscriber");
/// let span = tracing::info_span!("handle_request", route = "/a");
/// let _entered = span.enter();
/// tracing::info!(rows = 5, "query done"); // counts tracing.events{level="info",...}
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct TracingLayer {
    _private: (),
}

/// Distinct string values the layer interned.
static STRINGS: AtomicU32 = AtomicU32::new(0);

impl TracingLayer {
    /// Distinct string attribute values the layer interns for the process; further
    /// ones are dropped and counted ([`DropReason::KeyLimit`]).
    pub const MAX_STRING_VALUES: u32 = 1024;

    /// The layer (it has no state: everything lives in the process-wide tables).
    pub const fn new() -> Self {
        Self { _private: () }
    }

    /// The trace context of `span`: its W3C ids, to continue its trace elsewhere
    /// (`TracingLayer::context(&span).map(|c| c.traceparent())` is the header value for
    /// an outgoing request). `None` for a disabled span, one this layer dropped, or a
    /// subscriber not built on `tracing_subscriber`'s `Registry`.
    pub fn context(span: &tracing::Span) -> Option<SpanContext> {
        span.with_subscriber(|(id, dispatch)| {
            let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
            let data = registry.span(id)?;
            let extensions = data.extensions();
            let ctx = extensions.get::<SpanData>()?.started.ctx;
            (ctx.span_id != 0).then_some(ctx)
        })
        .flatten()
    }
}

/// Field keys cached per callsite.
const FIELDS: usize = 16;

/// What a callsite's name and fields intern to.
#[derive(Clone, Copy, Debug)]
struct CallsiteKeys {
    site: usize,
    /// The span name's key (0: refused).
    name: u32,
    /// Attribute keys of the first [`FIELDS`] fields (0: refused).
    fields: [u32; FIELDS],
}

/// Slots of the process-wide callsite tables; a callsite that finds no slot within
/// [`PROBES`] is interned on every use (a lock and a hash).
const SITES: usize = 1024;
const PROBES: usize = 8;

static SPAN_SITES: [OnceLock<CallsiteKeys>; SITES] = [const { OnceLock::new() }; SITES];
/// (event callsite, span callsite or 0, counter key).
static EVENT_SITES: [OnceLock<(usize, usize, u32)>; SITES] = [const { OnceLock::new() }; SITES];

fn site_of(meta: &'static Metadata<'static>) -> usize {
    std::ptr::from_ref(meta) as usize
}

fn slot_of(a: usize, b: usize) -> usize {
    // Metadata are statics at least 8 bytes apart.
    ((a >> 3) ^ (b >> 3).rotate_left(7)).wrapping_mul(0x9E37_79B9) % SITES
}

/// Looks an entry up in `table` from slot `hash` on, making it with `make` on first
/// sight (a value made but beaten to its slot by another callsite's moves on; with no
/// slot left it is made again on every use).
#[inline]
fn lookup<T: Copy>(
    table: &'static [OnceLock<T>; SITES],
    hash: usize,
    is: impl Fn(&T) -> bool,
    make: impl FnOnce() -> T,
) -> T {
    let slot = |probe: usize| &table[(hash + probe) % SITES];
    let mut empty = PROBES;
    for probe in 0..PROBES {
        match slot(probe).get() {
            Some(v) if is(v) => return *v,
            Some(_) => {}
            None => {
                empty = probe;
                break;
            }
        }
    }
    let value = make();
    for probe in empty..PROBES {
        if slot(probe).set(value).is_ok() {
            return value;
        }
        if let Some(v) = slot(probe).get().filter(|v| is(v)) {
            return *v;
        }
    }
    value
}

fn span_keys(meta: &'static Metadata<'static>) -> CallsiteKeys {
    let site = site_of(meta);
    lookup(
        &SPAN_SITES,
        slot_of(site, 0),
        |k| k.site == site,
        || {
            let mut fields = [0; FIELDS];
            for (slot, field) in fields.iter_mut().zip(meta.fields().iter()) {
                *slot = attr_key(field.name());
            }
            CallsiteKeys {
                site,
                name: Handle::register_or_noop(RegisterKind::SPAN, &clean_name(meta.name()), &[])
                    .key,
                fields,
            }
        },
    )
}

fn attr_key(name: &str) -> u32 {
    global()
        .interner
        .intern(RegisterKind::ATTR, &clean_label_key(name), &[])
        .map_or(0, Key::get)
}

fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

/// The counter `tracing.events{level, target, span}` of an event's callsite inside a
/// span's callsite (`span` absent outside any span).
fn event_counter(
    meta: &'static Metadata<'static>,
    span: Option<&'static Metadata<'static>>,
) -> Counter {
    let (site, span_site) = (site_of(meta), span.map_or(0, site_of));
    let (_, _, key) = lookup(
        &EVENT_SITES,
        slot_of(site, span_site),
        |e| e.0 == site && e.1 == span_site,
        || {
            let target = cut(meta.target(), telemetry_abi::MAX_LABEL_VALUE_LEN);
            let span_name = span.map(|s| cut(s.name(), telemetry_abi::MAX_LABEL_VALUE_LEN));
            let mut labels = vec![("level", level_name(meta.level())), ("target", target)];
            if let Some(name) = span_name {
                labels.push(("span", name));
            }
            let handle = Handle::register_or_noop(RegisterKind::COUNTER, "tracing.events", &labels);
            (site, span_site, handle.key)
        },
    );
    match key {
        0 => Counter::from_handle(Handle::invalid()),
        key => Counter::from_handle(Handle::key(key)),
    }
}

/// Entries in the per-thread cache of interned string values.
const STR_CACHE: usize = 64;

thread_local! {
    /// (hash, value, key) of recently interned string values.
    static STR_KEYS: RefCell<[(u64, Box<str>, u32); STR_CACHE]> =
        RefCell::new(std::array::from_fn(|_| (0, Box::from(""), 0)));
}

fn hash_str(s: &str) -> u64 {
    // FNV-1a: short strings, no allocation, no seed needed for a cache index.
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The key of the string value `s` (at most 96 bytes), within the layer's budget.
fn string_key(s: &str) -> Result<u32, DropReason> {
    let hash = hash_str(s);
    let slot = (hash as usize) % STR_CACHE;
    let cached = STR_KEYS
        .try_with(|c| {
            c.try_borrow()
                .ok()
                .and_then(|c| (c[slot].0 == hash && *c[slot].1 == *s).then_some(c[slot].2))
        })
        .ok()
        .flatten();
    if let Some(key) = cached {
        return Ok(key);
    }
    let key = global()
        .interner
        .intern_if(RegisterKind::STRING, s, &[], || {
            // ORDERING: Relaxed: a budget; the interner's lock orders the keys.
            STRINGS
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < TracingLayer::MAX_STRING_VALUES).then_some(n + 1)
                })
                .is_ok()
        })
        .map_err(|e| match e {
            crate::intern::KeyError::Invalid(_) => DropReason::Invalid,
            crate::intern::KeyError::Limit { .. } => DropReason::KeyLimit,
        })?
        .get();
    let _ = STR_KEYS.try_with(|c| {
        if let Ok(mut c) = c.try_borrow_mut() {
            c[slot] = (hash, Box::from(s), key);
        }
    });
    Ok(key)
}

/// What a span's fields gave: its attributes, its status and a `traceparent`.
#[derive(Clone, Copy, Debug)]
struct Pending {
    status: SpanStatus,
    /// Attributes: (attribute key, value).
    attrs: [(u32, AttrValue); MAX_SPAN_ATTRS],
    attr_count: u8,
    /// The remote parent a `traceparent` field named.
    traceparent: Option<SpanContext>,
}

impl Pending {
    const fn new() -> Self {
        Self {
            status: SpanStatus::UNSET,
            attrs: [(0, AttrValue::U64(0)); MAX_SPAN_ATTRS],
            attr_count: 0,
            traceparent: None,
        }
    }
}

/// A span's state while it is open, kept in the registry's extensions.
///
/// Its attributes wait here and are written just before its close record, in the same
/// ring: metricsd may read a close written on another thread before the open (and
/// holds it until the open comes), and attributes that travel with the close are
/// never read after it.
#[derive(Clone, Copy, Debug)]
struct SpanData {
    /// The span name's key.
    name: u32,
    /// Its open record's context (span id 0: dropped, counted then).
    started: Started,
    fields: Pending,
}

/// Records a span's fields as attributes.
struct Fields<'a> {
    keys: &'a CallsiteKeys,
    span: &'a mut Pending,
}

impl Fields<'_> {
    fn key(&self, field: &Field) -> u32 {
        match self.keys.fields.get(field.index()) {
            Some(&key) => key,
            None => attr_key(field.name()),
        }
    }

    fn push(&mut self, field: &Field, value: Result<AttrValue, DropReason>) {
        if field.name() == "error" && !matches!(value, Ok(AttrValue::U64(0))) {
            // Any `error` but `false` (or 0) marks the span failed.
            self.span.status = SpanStatus::ERROR;
        }
        let key = self.key(field);
        let value = match (key, value) {
            (0, _) => Err(DropReason::Invalid),
            (_, v) => v,
        };
        let value = match value {
            Ok(v) => v,
            Err(reason) => return local::count_noop(reason),
        };
        let attrs = &mut self.span.attrs[..usize::from(self.span.attr_count)];
        if let Some(slot) = attrs.iter_mut().find(|(k, _)| *k == key) {
            // Recorded again: the latest value wins.
            slot.1 = value;
            return;
        }
        if usize::from(self.span.attr_count) >= MAX_SPAN_ATTRS {
            return local::count_noop(DropReason::AttrLimit);
        }
        self.span.attrs[usize::from(self.span.attr_count)] = (key, value);
        self.span.attr_count += 1;
    }

    fn push_str(&mut self, field: &Field, s: &str) {
        if field.name() == "traceparent" {
            // The trace context an incoming request carried, not an attribute.
            self.span.traceparent = SpanContext::from_traceparent(s).ok();
            return;
        }
        let s = cut(s, telemetry_abi::MAX_NAME_LEN);
        let value = if s.is_empty() {
            Err(DropReason::Invalid)
        } else {
            string_key(s).map(|k| match Key::new(k) {
                Some(k) => AttrValue::Str(k),
                None => AttrValue::U64(0),
            })
        };
        self.push(field, value);
    }
}

/// A fixed buffer `Debug` output is written into, cut at its size.
struct Text {
    buf: [u8; telemetry_abi::MAX_NAME_LEN],
    len: usize,
}

impl fmt::Write for Text {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let s = cut(s, self.buf.len() - self.len);
        self.buf[self.len..self.len + s.len()].copy_from_slice(s.as_bytes());
        self.len += s.len();
        Ok(())
    }
}

impl Visit for Fields<'_> {
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.push(field, Ok(AttrValue::U64(value)));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.push(field, Ok(AttrValue::I64(value)));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.push(field, Ok(AttrValue::U64(u64::from(value))));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.push_str(field, value);
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let mut text = Text {
            buf: [0; telemetry_abi::MAX_NAME_LEN],
            len: 0,
        };
        let _ = write!(text, "{value}");
        self.push_str(
            field,
            std::str::from_utf8(&text.buf[..text.len]).unwrap_or(""),
        );
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let mut text = Text {
            buf: [0; telemetry_abi::MAX_NAME_LEN],
            len: 0,
        };
        let _ = write!(text, "{value:?}");
        self.push_str(
            field,
            std::str::from_utf8(&text.buf[..text.len]).unwrap_or(""),
        );
    }
}

impl<S> Layer<S> for TracingLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let keys = span_keys(attrs.metadata());
        let mut fields = Pending::new();
        attrs.record(&mut Fields {
            keys: &keys,
            span: &mut fields,
        });
        let started = if keys.name == 0 {
            // A refused name: counted, its children start traces of their own.
            local::count_noop(DropReason::Invalid);
            Started::NONE
        } else {
            let parent = span
                .parent()
                .and_then(|p| p.extensions().get::<SpanData>().map(|d| d.started.ctx))
                .filter(|c| c.span_id != 0);
            let parent = match (fields.traceparent, parent) {
                (Some(remote), _) => Parent::Of(remote),
                (None, Some(local)) => Parent::Of(local),
                // `parent: None` asked for a new trace.
                (None, None) if attrs.is_root() => Parent::Of(NO_SPAN),
                (None, None) => Parent::Current,
            };
            local::span_open_detached(keys.name, parent)
        };
        span.extensions_mut().insert(SpanData {
            name: keys.name,
            started,
            fields,
        });
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let keys = span_keys(span.metadata());
        let mut extensions = span.extensions_mut();
        if let Some(data) = extensions.get_mut::<SpanData>() {
            values.record(&mut Fields {
                keys: &keys,
                span: &mut data.fields,
            });
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let span = ctx.event_span(event).map(|s| s.metadata());
        event_counter(event.metadata(), span).increment(1);
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else {
            return;
        };
        let mut extensions = span.extensions_mut();
        // Read in place: the state is not copied out of its box.
        if let Some(data) = extensions.get_mut::<SpanData>() {
            if data.started.ctx.span_id != 0 {
                let fields = &data.fields;
                local::span_notes(
                    data.started,
                    &fields.attrs[..usize::from(fields.attr_count)],
                );
                local::span_end(data.name, data.started, fields.status);
            }
        }
        // The registry clears a closed span's extensions when it reuses the slot.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_cut_at_a_character_boundary() {
        let mut text = Text {
            buf: [0; telemetry_abi::MAX_NAME_LEN],
            len: 0,
        };
        let long = "é".repeat(100);
        let _ = write!(text, "{long}");
        let s = std::str::from_utf8(&text.buf[..text.len]).expect("utf-8");
        assert_eq!(s.len(), 96);
    }
}
