//! `metrics`-style macros. With a literal name and literal labels, the handle is
//! registered on the first call and cached in a `static` at the call site: later calls
//! cost one atomic load plus the record. With expressions, every call looks the name up
//! in the process-wide registry (a lock and a hash): keep the handle instead.

/// A [`Counter`](crate::Counter) handle: `counter!("http.requests", "route" => "/a").increment(1)`.
#[macro_export]
macro_rules! counter {
    ($name:literal $(, $k:literal => $v:literal)* $(,)?) => {{
        static __NEXUS_SITE: $crate::__private::Site =
            $crate::__private::Site::new($name, &[$(($k, $v)),*]);
        $crate::Counter::__site(&__NEXUS_SITE)
    }};
    ($name:expr $(, $k:expr => $v:expr)* $(,)?) => {
        $crate::Counter::new(
            $crate::__private::as_str(&$name),
            &[$(($crate::__private::as_str(&$k), $crate::__private::as_str(&$v))),*],
        )
    };
}

/// A [`Gauge`](crate::Gauge) handle: `gauge!("queue.depth").set(5)`.
#[macro_export]
macro_rules! gauge {
    ($name:literal $(, $k:literal => $v:literal)* $(,)?) => {{
        static __NEXUS_SITE: $crate::__private::Site =
            $crate::__private::Site::new($name, &[$(($k, $v)),*]);
        $crate::Gauge::__site(&__NEXUS_SITE)
    }};
    ($name:expr $(, $k:expr => $v:expr)* $(,)?) => {
        $crate::Gauge::new(
            $crate::__private::as_str(&$name),
            &[$(($crate::__private::as_str(&$k), $crate::__private::as_str(&$v))),*],
        )
    };
}

/// A [`Histogram`](crate::Histogram) handle: `histogram!("latency_ns", "route" => "/a").record(1234)`.
#[macro_export]
macro_rules! histogram {
    ($name:literal $(, $k:literal => $v:literal)* $(,)?) => {{
        static __NEXUS_SITE: $crate::__private::Site =
            $crate::__private::Site::new($name, &[$(($k, $v)),*]);
        $crate::Histogram::__site(&__NEXUS_SITE)
    }};
    ($name:expr $(, $k:expr => $v:expr)* $(,)?) => {
        $crate::Histogram::new(
            $crate::__private::as_str(&$name),
            &[$(($crate::__private::as_str(&$k), $crate::__private::as_str(&$v))),*],
        )
    };
}

/// Opens a [`Span`](crate::Span) that ends when the guard drops:
/// `let _s = span!("handle_request");` (a child of the thread's innermost open span, or
/// a root) or `span!("db.query", parent: &outer)`.
#[macro_export]
macro_rules! span {
    ($name:literal $(,)?) => {{
        static __NEXUS_SITE: $crate::__private::Site = $crate::__private::Site::new($name, &[]);
        $crate::SpanName::__site(&__NEXUS_SITE).enter()
    }};
    ($name:literal, parent: $parent:expr $(,)?) => {{
        static __NEXUS_SITE: $crate::__private::Site = $crate::__private::Site::new($name, &[]);
        $crate::SpanName::__site(&__NEXUS_SITE).enter_under($parent)
    }};
    ($name:expr $(,)?) => {
        $crate::SpanName::new($crate::__private::as_str(&$name)).enter()
    };
    ($name:expr, parent: $parent:expr $(,)?) => {
        $crate::SpanName::new($crate::__private::as_str(&$name)).enter_under($parent)
    };
}
