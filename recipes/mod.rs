//! The recipes, one module each. Recipes use only `crate::store` (and, once it lands,
//! `crate::reconcile`); they never import each other.

pub mod config;
pub mod lock;
pub mod queue;
