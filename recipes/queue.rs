//! `queue::WorkQueue`: a durable, at-least-once, watch-driven work queue (not built yet; see
//! issue 5).
