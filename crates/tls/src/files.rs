//! Writing key material to files (the shared helper of `chipsite-model`).

pub use chipsite_model::files::write_private;
