//! The core of bk, shared by every tool: records, errors and exit codes, the streaming
//! codec, stores, locking and progress. It links no database driver.

pub mod cleanup;
pub mod cli;
pub mod codec;
pub mod error;
pub mod lock;
pub mod name;
pub mod private;
pub mod progress;
pub mod record;
pub mod retention;
pub mod stderr;
pub mod store;
pub mod table;

pub use error::{Error, Kind, Result};

/// The version written into every manifest.
pub const BK_VERSION: &str = env!("CARGO_PKG_VERSION");
