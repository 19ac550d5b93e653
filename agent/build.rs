//! Compiles the .proto files under ../proto that the agent speaks (clients and servers; the
//! servers are used by tests that stand in for probed applications and plugins).

/// Every proto the agent compiles, relative to this crate; add new ones here.
const PROTOS: &[&str] = &[
    "../proto/grpc_health.proto",
    "../proto/csi.proto",
    "../proto/pluginregistration.proto",
];

/// Import roots: the project's protos and the system's well-known types (protobuf-compiler).
const INCLUDES: &[&str] = &["../proto", "/usr/include"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(PROTOS, INCLUDES)?;
    Ok(())
}
