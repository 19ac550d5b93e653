//! Compiles the .proto files under ../proto that the agent speaks (clients and servers; the
//! servers are used by tests that stand in for probed applications and plugins).
//!
//! `protox` parses them in Rust and carries the well-known types (`google/protobuf/*.proto`)
//! itself, so these need neither `protoc` nor the system's include files (libprotobuf-dev).
//! (containerd-client's own build still runs `protoc`: scripts/setup installs it.)
//!
//! It also builds the per-container log driver (`../logdriver/src/main.rs`, std only) into
//! `$OUT_DIR/nodelet-log-driver`, which the agent embeds and installs (runtime::logdriver).
//! It is compiled here rather than as a Cargo target because Cargo cannot give one binary its
//! own flags: linked statically and not position-independent, one copy per container holds
//! no dynamic loader, no shared-library data and no relocated pages (160 KiB of private
//! memory dynamically linked, 64 KiB static), `panic=abort` leaves out unwinding, and the
//! linker script `../logdriver/layout.ld` gathers the data that start-up writes onto as few
//! pages as it fills (with the driver's own trimming, 42 KiB private per driver started by
//! the shim instead of 64; see there and the driver's doc).

/// Every proto the agent compiles, relative to this crate; add new ones here.
const PROTOS: &[&str] = &[
    "../proto/grpc_health.proto",
    "../proto/csi.proto",
    "../proto/pluginregistration.proto",
];

/// Import root: the project's protos (the well-known types come with protox).
const INCLUDES: &[&str] = &["../proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The agent itself is linked at a fixed address (not position-independent): a PIE's
    // relocated data pages are private copies in every run, about 0.75 MiB of the agent's idle
    // memory; fixed, they stay clean pages of the file.
    println!("cargo:rustc-link-arg-bin=nodelet=-no-pie");
    build_log_driver()?;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, INCLUDES)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}

/// Compiles the log driver with the rustc Cargo uses, for the same target, and exports a
/// hash of it (`NODELET_LOG_DRIVER_ID`) that names the installed copy.
fn build_log_driver() -> Result<(), Box<dyn std::error::Error>> {
    const SOURCE: &str = "../logdriver/src/main.rs";
    const LAYOUT: &str = "../logdriver/layout.ld";
    println!("cargo:rerun-if-changed=../logdriver/src");
    println!("cargo:rerun-if-changed={LAYOUT}");
    let layout = std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR")?).join(LAYOUT);
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("nodelet-log-driver");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let target = std::env::var("TARGET")?;
    let flags = [
        "opt-level=s",
        "panic=abort",
        "codegen-units=1",
        "strip=symbols",
        "target-feature=+crt-static",
        "relocation-model=static",
    ];
    let mut cmd = std::process::Command::new(rustc);
    cmd.args([
        "--edition",
        "2021",
        "--crate-type",
        "bin",
        "--target",
        &target,
    ]);
    cmd.args(["--crate-name", "nodelet_log_driver", "--cap-lints", "warn"]);
    for flag in flags {
        cmd.args(["-C", flag]);
    }
    cmd.arg("-C")
        .arg(format!("link-arg=-Wl,-T,{}", layout.display()));
    let status = cmd.arg("-o").arg(&out).arg(SOURCE).status()?;
    if !status.success() {
        return Err(format!(
            "building {SOURCE} failed ({status}); is libc6-dev (libc.a) installed?"
        )
        .into());
    }
    // FNV-1a: a name for this build of the binary, not a security check.
    let hash = std::fs::read(&out)?
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    println!("cargo:rustc-env=NODELET_LOG_DRIVER_ID={hash:016x}");
    Ok(())
}
