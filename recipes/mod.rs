//! The recipes, one module each. Recipes are built on `crate::store`, `crate::reconcile` and
//! `crate::session`, and the exclusive-or-counted ones (lock, semaphore, rwlock, election) on
//! the fair queue in `crate::fair`; they never import each other.

pub mod config;
pub mod election;
pub mod lock;
pub mod queue;
pub mod rwlock;
pub mod semaphore;
