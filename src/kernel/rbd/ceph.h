/* The C API thinstack's RBD backend uses, from Debian's librbd-dev and librados-dev. build.rs
 * generates src/kernel/rbd/sys.rs's bindings from it, as functions loaded at run time from
 * librbd.so.1 (which brings librados.so.2), so a host without Ceph runs every other backend. */
#include <rados/librados.h>
#include <rbd/librbd.h>
