//! UniFFI bindings of peersync-core for Android (Kotlin) and iOS (Swift).
//!
//! Not built yet: issue 5 (thin wrappers over `peersync_core::Device`, listener interfaces,
//! an in-workspace `uniffi-bindgen`, Kotlin and Python tests). The crate exists so the
//! workspace layout is the final one.
