//! The recipes, one module each. Recipes are built on `crate::store`, `crate::reconcile` and
//! `crate::session`, and the exclusive-or-counted ones (lock, semaphore, rwlock, election) on
//! the fair queue in `crate::fair`, the presence ones (membership, double barrier) on
//! `crate::presence`; they never import each other.

pub mod barrier;
pub mod config;
pub mod counter;
pub mod election;
pub mod lock;
pub mod membership;
pub mod queue;
pub mod rwlock;
pub mod semaphore;
