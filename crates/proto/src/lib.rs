//! chipsite's internal gRPC API, generated from `proto/` at build time.

#![allow(clippy::all, missing_docs)]

pub mod keyvault {
    pub mod v1 {
        tonic::include_proto!("chipsite.keyvault.v1");
    }
}
pub mod ticket {
    pub mod v1 {
        tonic::include_proto!("chipsite.ticket.v1");
    }
}
pub mod admin {
    pub mod v1 {
        tonic::include_proto!("chipsite.admin.v1");
    }
}

/// Encoded `FileDescriptorSet` of every chipsite proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/chipsite_descriptor.bin"));
