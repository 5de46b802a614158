//! The recipes, one module each. Recipes are built on `crate::store`, `crate::reconcile` and
//! `crate::session`; they never import each other.

pub mod config;
pub mod lock;
pub mod queue;
