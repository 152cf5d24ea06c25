//! tfplugin5 / tfplugin6 and go-plugin service definitions (generated at build time from the
//! .proto files under `proto/`).

#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// Terraform plugin protocol, major version 5.
pub mod tfplugin5 {
    tonic::include_proto!("tfplugin5");
}

/// Terraform plugin protocol, major version 6.
pub mod tfplugin6 {
    tonic::include_proto!("tfplugin6");
}

/// go-plugin's own services (controller and stdio).
pub mod plugin {
    tonic::include_proto!("plugin");
}

/// The standard gRPC health service.
pub mod health {
    tonic::include_proto!("grpc.health.v1");
}
