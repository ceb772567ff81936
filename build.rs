//! Generates containerd's snapshot service (server side) from `proto/` with protox, so a build
//! needs no protoc, and the bindings of librbd and librados the RBD backend loads at run time
//! (`src/kernel/rbd/sys.rs`) with bindgen.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    containerd_snapshots()?;
    ceph_bindings()?;
    Ok(())
}

/// The librbd and librados functions thinstack calls, and no others: the surface stays what
/// `src/kernel/rbd` wraps and reviews.
const CEPH_FUNCTIONS: &[&str] = &[
    "rados_create2",
    "rados_conf_read_file",
    "rados_conf_set",
    "rados_conf_get",
    "rados_connect",
    "rados_shutdown",
    "rados_ioctx_create",
    "rados_ioctx_destroy",
    "rados_ioctx_set_namespace",
    "rados_ioctx_pool_stat",
    "rados_cluster_stat",
    "rados_mon_command",
    "rados_buffer_free",
    "rados_create_write_op",
    "rados_release_write_op",
    "rados_write_op_create",
    "rados_write_op_omap_set",
    "rados_write_op_omap_cmp",
    "rados_write_op_omap_rm_keys",
    "rados_write_op_remove",
    "rados_write_op_operate",
    "rados_create_read_op",
    "rados_release_read_op",
    "rados_read_op_omap_get_vals2",
    "rados_read_op_operate",
    "rados_omap_get_next2",
    "rados_omap_get_end",
    "rbd_version",
    "rbd_image_options_create",
    "rbd_image_options_destroy",
    "rbd_image_options_set_uint64",
    "rbd_create4",
    "rbd_clone3",
    "rbd_remove",
    "rbd_list2",
    "rbd_image_spec_list_cleanup",
    "rbd_open",
    "rbd_open_read_only",
    "rbd_close",
    "rbd_get_size",
    "rbd_resize2",
    "rbd_get_parent",
    "rbd_linked_image_spec_cleanup",
    "rbd_snap_spec_cleanup",
    "rbd_flatten",
    "rbd_snap_create",
    "rbd_snap_protect",
    "rbd_snap_unprotect",
    "rbd_snap_remove",
    "rbd_snap_exists",
    "rbd_snap_list",
    "rbd_snap_list_end",
    "rbd_snap_get_namespace_type",
    "rbd_list_children3",
    "rbd_linked_image_spec_list_cleanup",
    "rbd_diff_iterate2",
    "rbd_metadata_get",
    "rbd_metadata_set",
    "rbd_namespace_create",
    "rbd_namespace_exists",
    "rbd_trash_move",
    "rbd_trash_remove",
    "rbd_trash_list",
    "rbd_trash_list_cleanup",
    "rbd_lock_get_owners",
    "rbd_lock_get_owners_cleanup",
    "rbd_lock_break",
    "rbd_get_id",
    "rbd_watchers_list",
    "rbd_watchers_list_cleanup",
    "rados_lock_exclusive",
    "rados_list_lockers",
    "rados_break_lock",
    "rados_unlock",
    "rados_getaddrs",
];

/// Bindings of [`CEPH_FUNCTIONS`] as a struct that loads them from a shared library at run
/// time (bindgen's dynamic loading), so linking thinstack needs no Ceph library.
fn ceph_bindings() -> Result<(), Box<dyn std::error::Error>> {
    const HEADER: &str = "src/kernel/rbd/ceph.h";
    println!("cargo:rerun-if-changed={HEADER}");
    let mut builder = bindgen::Builder::default()
        .header(HEADER)
        .dynamic_library_name("CephLibrary")
        .dynamic_link_require_all(true)
        .allowlist_var("RBD_.*|LIBRADOS_.*")
        .layout_tests(false)
        .generate_comments(false)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    for function in CEPH_FUNCTIONS {
        builder = builder.allowlist_function(function);
    }
    let bindings = builder
        .generate()
        .map_err(|e| format!("bindgen over {HEADER} (are librbd-dev and librados-dev installed? scripts/setup installs them): {e}"))?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("ceph.rs");
    bindings.write_to_file(out)?;
    Ok(())
}

/// containerd's snapshot service (server side), from `proto/`.
fn containerd_snapshots() -> Result<(), Box<dyn std::error::Error>> {
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
