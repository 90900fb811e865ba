//! peersync-server: the sync server.
//!
//! - [`store`]: documents, change log and device records behind the [`store::ServerStore`] trait.
//! - [`docs`]: the document hub — pushes, downloads, the automerge sync fallback, the cache.
//! - [`session`]: one device connection, generic over its transport.
//! - [`auth`]: the identity and access seams every session goes through.
//! - [`app`]: routes and the websocket upgrade; [`cli`]: the `peersync` command.
//! - [`views`]: reporting rows kept current in the background while sync is quiet.
//! - [`simulate`], [`replay`], [`bench`]: field scenarios, replayed and measured.

pub mod api;
pub mod app;
pub mod audit;
pub mod auth;
pub mod bench;
pub mod chunks;
pub mod cli;
pub mod conn;
pub mod directory;
pub mod docs;
pub mod erasures;
pub mod keyring;
pub mod metrics;
pub mod procstat;
pub mod progress;
pub mod replay;
pub mod report;
pub mod scenario;
pub mod session;
pub mod simulate;
pub mod store;
pub mod throttle;
pub mod tls;
pub mod views;
