//! thinstack: thin-provisioned block layers on Linux device-mapper.
//!
//! A dm-thin pool (on sparse loop files by default) holds a base thin device with ext4 or xfs
//! and thin snapshots of it, one per layer. This crate is the library the daemon `thinstackd`
//! and the client `thinstack` are built on.
//!
//! Usage, as the kernel tests do it:
//! 1. Load a [`Config`] (absent file = defaults): [`Config::load`].
//! 2. Open device-mapper: [`kernel::dm::Dm::open`].
//! 3. Create or re-open the pool: [`Pool::open`].
//! 4. Make thin devices and snapshots: [`Pool::create_thin`], [`Pool::snapshot`],
//!    [`Pool::activate_thin`]; filesystems with [`kernel::fs`].
//! 5. Read [`Pool::status`]; [`Pool::teardown`] deactivates and detaches, keeping the files.
#![warn(missing_docs)]

pub mod api;
pub mod audit;
pub mod client;
pub mod config;
pub mod containerd;
pub mod crash;
pub mod daemon;
pub mod doctor;
pub mod engine;
pub mod error;
pub mod kernel;
pub mod names;
pub mod pool;
pub mod records;
pub mod units;
pub mod vocab;

pub use config::Config;
pub use error::{Error, ErrorKind, Result};
pub use pool::{Pool, PoolStatus};
