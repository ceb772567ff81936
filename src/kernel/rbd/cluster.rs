//! A connection to a Ceph cluster ([`Cluster`]) and one pool's I/O context in it ([`Io`]).

use std::ffi::{c_char, CStr};
use std::path::PathBuf;
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

use super::library::library;
use super::sys::{self, CephLibrary};
use super::{c_string, check};
use crate::error::{Error, Result};

/// How to reach a cluster: the `[pool.rbd]` settings that name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The cluster's configuration file (monitors, and where keyrings are).
    pub ceph_conf: PathBuf,
    /// The cephx client, without `client.` (for example `admin`).
    pub client: String,
    /// A keyring to use instead of the ones the configuration names.
    pub keyring: Option<PathBuf>,
    /// How long a connection, a monitor command or an object operation may take before it
    /// fails with a timeout, rather than hanging an operation for ever on a sick cluster.
    pub timeout: Duration,
}

/// A connected cluster handle; librados makes it safe to share between threads.
pub struct Cluster {
    pub(super) handle: sys::rados_t,
    lib: &'static CephLibrary,
    config: ClusterConfig,
}

// Safety: a rados_t is thread-safe (librados documents concurrent use of one handle).
unsafe impl Send for Cluster {}
unsafe impl Sync for Cluster {}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("config", &self.config)
            .finish()
    }
}

impl Cluster {
    /// Connect as `client.<client>` with the configuration file, waiting at most the timeout.
    pub fn connect(config: &ClusterConfig) -> Result<Arc<Cluster>> {
        let lib = library()?;
        let entity = format!("client.{}", config.client);
        let mut handle: sys::rados_t = ptr::null_mut();
        let name = c_string("client", &entity)?;
        let cluster_name = c_string("cluster", "ceph")?;
        // Safety: out-pointer to a handle; strings outlive the call.
        let rc = unsafe { lib.rados_create2(&mut handle, cluster_name.as_ptr(), name.as_ptr(), 0) };
        check(rc, "creating a cluster handle for", &entity)?;
        let cluster = Cluster {
            handle,
            lib,
            config: config.clone(),
        };
        cluster.configure()?;
        // Safety: a configured handle, connected once.
        let rc = unsafe { lib.rados_connect(handle) };
        check(
            rc,
            "connecting to the cluster of",
            &config.ceph_conf.display().to_string(),
        )
        .map_err(|e| e.context(format!("as {entity}")))?;
        Ok(Arc::new(cluster))
    }

    fn configure(&self) -> Result<()> {
        let conf_path = self.config.ceph_conf.display().to_string();
        let path = c_string("ceph_conf", &conf_path)?;
        // Safety: a created, unconnected handle; the path outlives the call.
        let rc = unsafe { self.lib.rados_conf_read_file(self.handle, path.as_ptr()) };
        check(rc, "reading the Ceph configuration", &conf_path)?;
        if let Some(keyring) = &self.config.keyring {
            self.set("keyring", &keyring.display().to_string())?;
        }
        let seconds = self.config.timeout.as_secs().max(1).to_string();
        for option in [
            "client_mount_timeout",
            "rados_mon_op_timeout",
            "rados_osd_op_timeout",
        ] {
            self.set(option, &seconds)?;
        }
        Ok(())
    }

    fn set(&self, option: &str, value: &str) -> Result<()> {
        let key = c_string("option", option)?;
        let text = c_string("value", value)?;
        // Safety: the handle is valid; strings outlive the call.
        let rc = unsafe {
            self.lib
                .rados_conf_set(self.handle, key.as_ptr(), text.as_ptr())
        };
        check(rc, "setting Ceph option", option)?;
        Ok(())
    }

    /// A configuration value as the client resolved it (`mon_host`, `keyring`, `key`...).
    pub fn conf(&self, option: &str) -> Result<String> {
        let key = c_string("option", option)?;
        let mut buffer = vec![0u8; 4096];
        // Safety: the buffer's length is passed; librados writes a NUL-terminated string.
        let rc = unsafe {
            self.lib.rados_conf_get(
                self.handle,
                key.as_ptr(),
                buffer.as_mut_ptr().cast::<c_char>(),
                buffer.len(),
            )
        };
        check(rc, "reading Ceph option", option)?;
        let text = CStr::from_bytes_until_nul(&buffer)
            .map_err(|_| Error::invalid(format!("Ceph option {option}: value too long")))?;
        Ok(text.to_string_lossy().into_owned())
    }

    /// The settings it was connected with.
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// Fence the client at `address` (`ip:port/nonce`): the cluster refuses its every
    /// request from now on (until the blocklist entry expires, an hour by default), so a host
    /// that only seemed dead cannot write on.
    pub fn blocklist(&self, address: &str) -> Result<()> {
        let command = serde_json::json!({
            "prefix": "osd blocklist",
            "blocklistop": "add",
            "addr": address,
        });
        self.mon_command(&command.to_string()).map(drop)
    }

    /// Run a monitor command (JSON, as `ceph ... -f json` sends it); returns its output.
    pub fn mon_command(&self, command: &str) -> Result<Vec<u8>> {
        let text = c_string("monitor command", command)?;
        let commands = [text.as_ptr()];
        let (mut out, mut out_len) = (ptr::null_mut::<c_char>(), 0usize);
        let (mut status, mut status_len) = (ptr::null_mut::<c_char>(), 0usize);
        // Safety: one command; librados allocates the outputs, freed below.
        let rc = unsafe {
            self.lib.rados_mon_command(
                self.handle,
                commands.as_ptr() as *mut *const c_char,
                1,
                ptr::null(),
                0,
                &mut out,
                &mut out_len,
                &mut status,
                &mut status_len,
            )
        };
        // Safety: each buffer is librados's (or null), read within its length, then freed.
        let (output, said) = unsafe {
            let output = copy_buffer(out, out_len);
            let said = String::from_utf8_lossy(&copy_buffer(status, status_len)).into_owned();
            self.lib.rados_buffer_free(out);
            self.lib.rados_buffer_free(status);
            (output, said)
        };
        check(rc, "monitor command", command).map_err(|e| {
            if said.is_empty() {
                e
            } else {
                e.context(format!("the monitor said {said:?}"))
            }
        })?;
        Ok(output)
    }

    /// This connection's own addresses, as the cluster lists its clients' (`ip:port/nonce`,
    /// possibly several in brackets).
    pub fn own_addresses(&self) -> Result<String> {
        let mut text: *mut c_char = ptr::null_mut();
        // Safety: librados allocates the string, freed below.
        let rc = unsafe { self.lib.rados_getaddrs(self.handle, &mut text) };
        check(rc, "reading the client's addresses", "the cluster")?;
        // Safety: a NUL-terminated string of librados's, freed once.
        let addresses = unsafe {
            let owned = std::ffi::CStr::from_ptr(text)
                .to_string_lossy()
                .into_owned();
            self.lib.rados_buffer_free(text);
            owned
        };
        Ok(addresses)
    }

    /// The monitors' addresses for the kernel's client (its messenger v1 addresses), from the
    /// monitor map, comma-separated.
    pub fn kernel_monitor_addresses(self: &Arc<Self>) -> Result<String> {
        let output = self.mon_command(r#"{"prefix": "mon dump", "format": "json"}"#)?;
        let map: serde_json::Value = serde_json::from_slice(&output)
            .map_err(|e| Error::invalid(format!("the monitor map is not JSON: {e}")))?;
        let mut addresses = Vec::new();
        for mon in map["mons"].as_array().into_iter().flatten() {
            for addr in mon["public_addrs"]["addrvec"]
                .as_array()
                .into_iter()
                .flatten()
            {
                if addr["type"] == "v1" {
                    if let Some(text) = addr["addr"].as_str() {
                        addresses.push(text.to_owned());
                    }
                }
            }
        }
        if addresses.is_empty() {
            return Err(Error::new(
                crate::error::ErrorKind::Unsupported,
                "no monitor of the cluster has a messenger v1 address, which the kernel's rbd \
                 client needs: add a v1 address to mon_host",
            ));
        }
        Ok(addresses.join(","))
    }

    /// An I/O context on `pool`, in `namespace` when given, which is made when the pool lacks
    /// it.
    pub fn io_making_namespace(
        self: &Arc<Self>,
        pool: &str,
        namespace: Option<&str>,
    ) -> Result<Io> {
        let io = self.io(pool, None)?;
        let Some(namespace) = namespace else {
            return Ok(io);
        };
        let text = c_string("namespace", namespace)?;
        let mut exists = false;
        // Safety: a valid context (the pool's default namespace) and name; out-pointer.
        let rc = unsafe {
            self.lib
                .rbd_namespace_exists(io.handle, text.as_ptr(), &mut exists)
        };
        check(rc, "looking up namespace", &format!("{pool}/{namespace}"))?;
        if !exists {
            // Safety: as above. Two hosts racing to make it: the loser is told it exists.
            let rc = unsafe { self.lib.rbd_namespace_create(io.handle, text.as_ptr()) };
            if rc != -(nix::errno::Errno::EEXIST as i32) {
                check(rc, "making namespace", &format!("{pool}/{namespace}"))?;
            }
        }
        self.io(pool, Some(namespace))
    }

    /// An I/O context on `pool`, in `namespace` when given.
    pub fn io(self: &Arc<Self>, pool: &str, namespace: Option<&str>) -> Result<Io> {
        let name = c_string("pool", pool)?;
        let mut handle: sys::rados_ioctx_t = ptr::null_mut();
        // Safety: a connected handle; out-pointer to the context.
        let rc = unsafe {
            self.lib
                .rados_ioctx_create(self.handle, name.as_ptr(), &mut handle)
        };
        check(rc, "opening pool", pool)?;
        let io = Io {
            handle,
            cluster: Arc::clone(self),
            pool: pool.to_owned(),
            namespace: namespace.map(str::to_owned),
        };
        if let Some(namespace) = namespace {
            let text = c_string("namespace", namespace)?;
            // Safety: a valid context; librados copies the name.
            unsafe { self.lib.rados_ioctx_set_namespace(io.handle, text.as_ptr()) };
        }
        Ok(io)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Safety: every Io holds an Arc of its cluster, so none outlives this.
        unsafe { self.lib.rados_shutdown(self.handle) };
    }
}

/// Copy `len` bytes librados allocated at `data` (null when empty).
///
/// # Safety
/// `data` must be null or point to at least `len` readable bytes.
unsafe fn copy_buffer(data: *const c_char, len: usize) -> Vec<u8> {
    if data.is_null() || len == 0 {
        return Vec::new();
    }
    std::slice::from_raw_parts(data.cast::<u8>(), len).to_vec()
}

/// One pool (and namespace) of a cluster: its images and objects.
pub struct Io {
    pub(super) handle: sys::rados_ioctx_t,
    pub(super) cluster: Arc<Cluster>,
    pool: String,
    namespace: Option<String>,
}

// Safety: an ioctx may be used from several threads (librados serialises inside).
unsafe impl Send for Io {}
unsafe impl Sync for Io {}

impl std::fmt::Debug for Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.spec())
    }
}

impl Io {
    /// The pool's name.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// The namespace, if any.
    pub fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }

    /// `pool` or `pool/namespace`, as `rbd` spells it.
    pub fn spec(&self) -> String {
        match &self.namespace {
            Some(namespace) => format!("{}/{namespace}", self.pool),
            None => self.pool.clone(),
        }
    }

    /// `pool[/namespace]/image`, for messages.
    pub fn image_spec(&self, image: &str) -> String {
        format!("{}/{image}", self.spec())
    }

    pub(super) fn lib(&self) -> &'static CephLibrary {
        self.cluster.lib
    }

    /// The cluster it belongs to.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// Bytes the pool stores (before replication), and the objects it holds.
    pub fn pool_usage(&self) -> Result<(u64, u64)> {
        // Safety: a plain-data struct librados fills.
        let mut stats: sys::rados_pool_stat_t = unsafe { std::mem::zeroed() };
        // Safety: a valid context; out-pointer to the struct.
        let rc = unsafe { self.lib().rados_ioctx_pool_stat(self.handle, &mut stats) };
        check(rc, "reading the usage of pool", &self.spec())?;
        Ok((stats.num_bytes, stats.num_objects))
    }
}

impl Drop for Io {
    fn drop(&mut self) {
        // Safety: the context is this value's own, destroyed once.
        unsafe { self.lib().rados_ioctx_destroy(self.handle) };
    }
}
