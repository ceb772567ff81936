//! Generates containerd's snapshot service (server side) from `proto/` with protox, so a build
//! needs no protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const SERVICE: &str =
        "github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto";
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile([SERVICE], ["proto"])?;
    // The .proto comments are the reference (proto/); copied into Rust, an indented example in
    // one of them would run as a doctest.
    let mut config = tonic_prost_build::Config::new();
    config.disable_comments(["."]);
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .compile_fds_with_config(descriptors, config)?;
    Ok(())
}
