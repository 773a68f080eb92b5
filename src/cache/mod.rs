//! The cache: what the mirror keeps and how it fills and trims it.
//!
//! - [`store`]: the `BlobStore` and `Index` interfaces and their backends.
//! - [`download`]: single-flight blob downloads that clients follow as they grow.
//! - [`evictor`]: eviction mechanism; [`policy`]: cache rules as pure
//!   functions of their inputs and `now`.

pub mod download;
pub mod evictor;
pub mod policy;
pub mod store;
