//! The generated bindings of librbd and librados (build.rs, from `ceph.h`): one struct,
//! [`CephLibrary`], whose methods are the C functions, loaded from `librbd.so.1` at run time.
#![allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    dead_code,
    clippy::all
)]

include!(concat!(env!("OUT_DIR"), "/ceph.rs"));
