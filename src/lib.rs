//! thinstack: thin-provisioned block layers on Linux device-mapper.
//!
//! A dm-thin pool (on sparse loop files by default) holds a base thin device with ext4 or xfs
//! and thin snapshots of it, one per layer. This crate is the library the daemon `thinstackd`
//! and the client `thinstack` are built on.
//!
//! The layers, from the top (each module uses only those below it; `tests/layering.rs` holds
//! the crate to that):
//! - [`daemon`] and [`client`]: the HTTP API on a Unix socket and its client; [`containerd`],
//!   containerd's snapshot service;
//! - [`api`]: the API's wire types; [`doctor`]: leftovers and their repair; [`audit`];
//!   [`metrics`]: what the daemon serves to Prometheus;
//! - [`engine::Engine`]: layers with crash-safe records, over the kernel seam; [`pool`]: the
//!   real dm-thin pool behind that seam ([`pool::RealPool`]);
//! - [`records`] and [`config`];
//! - [`kernel`]: the seam ([`kernel::PoolKernel`], [`kernel::FsKernel`]), the real kernel's
//!   pieces, and [`kernel::sim::Sim`], an in-memory kernel with the same rules;
//! - [`error`], [`names`], [`units`], [`vocab`] and [`crash`]; [`stream`], the format layers
//!   travel in between hosts (export, import).
//!
//! The engine over the sim, as the unit tests (and `thinstackd --sim`) run it, without root:
//!
//! ```
//! use thinstack::engine::{CreateLayer, Engine, Settings};
//! use thinstack::kernel::sim::Sim;
//! use thinstack::Config;
//!
//! # fn main() -> thinstack::Result<()> {
//! let dir = tempfile::tempdir().unwrap();
//! let config = Config::parse(&format!("state_dir = {:?}", dir.path()), "example")?;
//! let sim = Sim::default();
//! let (engine, _report) = Engine::open(sim.clone(), sim, Settings::from_config(&config))?;
//!
//! engine.create(&CreateLayer { name: "base".into(), ..CreateLayer::default() })?;
//! engine.commit("base")?;
//! let app = CreateLayer {
//!     name: "app".into(),
//!     parent: Some("base".into()),
//!     ..CreateLayer::default()
//! };
//! engine.create(&app)?;
//!
//! let layers = engine.list(&Default::default())?;
//! assert_eq!(layers.len(), 2);
//! assert_eq!(engine.inspect("app")?.parent.unwrap().as_str(), "base");
//! # Ok(())
//! # }
//! ```
//!
//! On the real kernel, the engine's pool is [`pool::RealPool::open`] and its filesystems
//! [`kernel::real::RealFs`] (root, and a kernel with dm-thin).
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
pub mod metrics;
pub mod names;
pub mod pool;
pub mod records;
pub mod stream;
pub mod units;
pub mod vocab;

pub use config::Config;
pub use error::{Error, ErrorKind, Result};
pub use pool::{Pool, PoolStatus};
