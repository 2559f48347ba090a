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
//! A finished span waits in its parent, and a tree is written whole into the ring of
//! the thread that closes its root ([`local::emit_tree`]): every span of a trace in
//! one ring, with the ring's ids, whatever threads its spans lived on. Bounds: a tree
//! holds at most [`TracingLayer::MAX_TREE_SPANS`] finished spans; a span whose subtree
//! would pass that is written at once as a tree of its own (counted by
//! [`TracingLayer::split_trees`]). Field values become attributes: integers and bools
//! as integers, strings (and anything formatted with `Debug` or `Display`, cut to 96
//! bytes) as interned strings, at most [`TracingLayer::MAX_STRING_VALUES`] distinct
//! ones for the process; at most [`MAX_SPAN_ATTRS`] per span. A field named `error`
//! (recorded as anything but `false` or 0) gives the span the error status. metricsd redacts sensitive attribute keys as it
//! does for native spans.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

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
use crate::local::{self, FinishedSpan};
use crate::recorder::AttrValue;
use crate::span::MAX_SPAN_ATTRS;
use crate::stats::DropReason;

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
/// Subtrees written apart from their root because the tree was full.
static SPLIT: AtomicU64 = AtomicU64::new(0);

impl TracingLayer {
    /// Finished spans one tree holds until its root closes.
    pub const MAX_TREE_SPANS: usize = 256;
    /// Distinct string attribute values the layer interns for the process; further
    /// ones are dropped and counted ([`DropReason::KeyLimit`]).
    pub const MAX_STRING_VALUES: u32 = 1024;

    /// The layer (it has no state: everything lives in the process-wide tables).
    pub const fn new() -> Self {
        Self { _private: () }
    }

    /// Subtrees written as trees of their own because their tree was full.
    pub fn split_trees() -> u64 {
        // ORDERING: Relaxed: a counter.
        SPLIT.load(Ordering::Relaxed)
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

/// A span's state while it is open, kept in the registry's extensions.
struct SpanData {
    span: FinishedSpan,
    /// Its finished descendants, each after its parent (parent indices into this list,
    /// `u32::MAX` for this span).
    tree: Vec<FinishedSpan>,
}

/// Records a span's fields as attributes.
struct Fields<'a> {
    keys: &'a CallsiteKeys,
    span: &'a mut FinishedSpan,
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

/// A span's finished record to be, as it starts.
fn start(keys: &CallsiteKeys) -> FinishedSpan {
    FinishedSpan {
        name: keys.name,
        parent: u32::MAX,
        start_ns: global().now_ns(),
        end_ns: 0,
        status: SpanStatus::UNSET,
        attrs: [(0, AttrValue::U64(0)); MAX_SPAN_ATTRS],
        attr_count: 0,
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
        let mut data = SpanData {
            span: start(&keys),
            tree: Vec::new(),
        };
        attrs.record(&mut Fields {
            keys: &keys,
            span: &mut data.span,
        });
        span.extensions_mut().insert(data);
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
                span: &mut data.span,
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
        let Some(mut data) = span.extensions_mut().remove::<SpanData>() else {
            return;
        };
        data.span.end_ns = global().now_ns();
        if data.span.name == 0 {
            // A refused name: its subtree has no span to hang from.
            return local::count_noop(DropReason::Invalid);
        }
        if let Some(parent) = span.parent() {
            let mut extensions = parent.extensions_mut();
            if let Some(parent) = extensions.get_mut::<SpanData>() {
                if parent.tree.len() + 1 + data.tree.len() <= TracingLayer::MAX_TREE_SPANS {
                    adopt(&mut parent.tree, data);
                    return;
                }
                // ORDERING: Relaxed: a counter.
                SPLIT.fetch_add(1, Ordering::Relaxed);
            }
        }
        local::emit_tree(&data.span, &data.tree);
    }
}

/// Appends the finished `child` and its tree to `tree`, keeping each span after its
/// parent.
fn adopt(tree: &mut Vec<FinishedSpan>, mut child: SpanData) {
    child.span.parent = u32::MAX;
    tree.push(child.span);
    let at = (tree.len() - 1) as u32;
    let base = tree.len() as u32;
    tree.extend(child.tree.into_iter().map(|mut s| {
        s.parent = match s.parent {
            u32::MAX => at,
            p => p + base,
        };
        s
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(name: u32, parent: u32) -> FinishedSpan {
        FinishedSpan {
            name,
            parent,
            start_ns: 0,
            end_ns: 0,
            status: SpanStatus::UNSET,
            attrs: [(0, AttrValue::U64(0)); MAX_SPAN_ATTRS],
            attr_count: 0,
        }
    }

    #[test]
    fn adopted_trees_keep_parents_before_children() {
        // child (2) with its own child (3) closes into root's tree, which already
        // holds a leaf (1).
        let mut root_tree = vec![span(1, u32::MAX)];
        let child = SpanData {
            span: span(2, 7),
            tree: vec![span(3, u32::MAX), span(4, 0)],
        };
        adopt(&mut root_tree, child);
        let shape: Vec<(u32, u32)> = root_tree.iter().map(|s| (s.name, s.parent)).collect();
        // 1 under the root; 2 under the root; 3 under 2 (index 1); 4 under 3 (index 2).
        assert_eq!(shape, [(1, u32::MAX), (2, u32::MAX), (3, 1), (4, 2)]);
    }

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
