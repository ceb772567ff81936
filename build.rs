//! Generates containerd's snapshot service (server side) from `proto/` with protox, so a build
//! needs no protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const SERVICE: &str =
        "github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto";
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile([SERVICE], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
