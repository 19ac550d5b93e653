//! Compiles the .proto files under ../proto that the agent speaks (clients and servers; the
//! servers are used by tests that stand in for probed applications and plugins).
//!
//! `protox` parses them in Rust and carries the well-known types (`google/protobuf/*.proto`)
//! itself, so these need neither `protoc` nor the system's include files (libprotobuf-dev).
//! (containerd-client's own build still runs `protoc`: scripts/setup installs it.)
//!
//! It also builds the per-container log driver (`../logdriver`, `no_std` without libc) into
//! `$OUT_DIR/nodelet-log-driver`, which the agent embeds and installs (runtime::logdriver).
//! It is a Cargo build of its own (`cargo build -p nodelet-log-driver --features binary
//! --profile logdriver`, `--locked`, in a target directory under `OUT_DIR`) because Cargo
//! cannot give one binary of a workspace build its own flags: linked statically and not
//! position-independent, without libc's start-up files or libraries (its `_start` is its own),
//! one copy per container holds no dynamic loader, no relocated pages and no C start-up
//! state; the profile (Cargo.toml) builds it for size, with `panic=abort` and no symbols, and
//! the linker script `../logdriver/layout.ld` puts its line buffers after its few statics.
//! Private memory per driver started by the shim: 160 KiB dynamically linked to glibc, 64 KiB
//! static on glibc, 42 KiB with glibc's start-up data gathered by a linker script, 17 KiB
//! without libc (see the driver's doc).

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

/// Builds the log driver with the Cargo running this build, for the same target, in a target
/// directory of its own under `OUT_DIR`, and exports a hash of it (`NODELET_LOG_DRIVER_ID`)
/// that names the installed copy.
fn build_log_driver() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // The driver's start-up and system calls are written for x86_64 (logdriver/src/main.rs);
    // elsewhere nothing is embedded and the agent runs itself as the driver
    // (runtime::logdriver).
    if std::env::var("CARGO_CFG_TARGET_ARCH")? != "x86_64" {
        std::fs::write(out_dir.join("nodelet-log-driver"), [])?;
        println!("cargo:rustc-env=NODELET_LOG_DRIVER_ID=none");
        return Ok(());
    }
    println!("cargo:rerun-if-changed=../logdriver/src");
    println!("cargo:rerun-if-changed=../logdriver/Cargo.toml");
    println!("cargo:rerun-if-changed=../logdriver/layout.ld");
    let layout =
        std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR")?).join("../logdriver/layout.ld");
    let target_dir = out_dir.join("logdriver-target");
    let target = std::env::var("TARGET")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Static, at a fixed address, and without libc (`_start` is the driver's own): one copy
    // per container holds no loader, no relocated pages and no C start-up state. No RELRO:
    // its 32 bytes of GOT would take a dirty page of their own (the linker pads the region
    // to a page the kernel zero-fills), where without it they share the statics' page. The
    // layout puts the line buffers after the other statics (see `layout.ld`).
    let rustflags = [
        "-Crelocation-model=static".to_owned(),
        "-Ctarget-feature=+crt-static".to_owned(),
        "-Clink-arg=-nostartfiles".to_owned(),
        "-Clink-arg=-nostdlib".to_owned(),
        "-Clink-arg=-static".to_owned(),
        "-Clink-arg=-Wl,-z,norelro".to_owned(),
        format!("-Clink-arg=-Wl,-T,{}", layout.display()),
    ]
    .join("\x1f");
    let mut cmd = std::process::Command::new(cargo);
    cmd.args([
        "build",
        "--locked",
        "--package",
        "nodelet-log-driver",
        "--bin",
    ])
    .args([
        "nodelet-log-driver",
        "--features",
        "binary",
        "--profile",
        "logdriver",
    ])
    .args(["--target", &target])
    .arg("--target-dir")
    .arg(&target_dir)
    .current_dir(std::env::var("CARGO_MANIFEST_DIR")?)
    .env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    // The outer build's settings are not the driver's.
    for var in [
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status()?;
    if !status.success() {
        return Err(format!("building the log driver (../logdriver) failed ({status})").into());
    }
    let built = target_dir
        .join(&target)
        .join("logdriver")
        .join("nodelet-log-driver");
    let out = out_dir.join("nodelet-log-driver");
    std::fs::copy(&built, &out)?;
    // FNV-1a: a name for this build of the binary, not a security check.
    let hash = std::fs::read(&out)?
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    println!("cargo:rustc-env=NODELET_LOG_DRIVER_ID={hash:016x}");
    Ok(())
}
