//! A single-node Ceph cluster for the rbd kernel tests, started once per machine (VM) by
//! `scripts/ceph-cluster start`, which returns at once when it is up already.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use thinstack::kernel::rbd::ClusterConfig;

/// What `scripts/ceph-cluster start` printed: its configuration file, keyring and pool.
#[derive(Debug, Clone)]
pub struct TestCluster {
    pub conf: PathBuf,
    pub keyring: PathBuf,
    pub pool: String,
}

impl TestCluster {
    /// How the library connects to it, as client.admin.
    pub fn config(&self) -> ClusterConfig {
        ClusterConfig {
            ceph_conf: self.conf.clone(),
            client: "admin".into(),
            keyring: Some(self.keyring.clone()),
            timeout: Duration::from_secs(120),
        }
    }

    /// The TOML of an rbd pool on it, for a test's config.
    pub fn pool_toml(&self, namespace: &str) -> String {
        format!(
            "[pool]\nbackend = \"rbd\"\n[pool.rbd]\npool = {:?}\nnamespace = {namespace:?}\nceph_conf = {:?}\nkeyring = {:?}\ntimeout = \"120s\"\n",
            self.pool,
            self.conf.display().to_string(),
            self.keyring.display().to_string()
        )
    }

    /// The keyring of client `name` (made the first time), which may use the test pool's
    /// images as a host's thinstackd does: `profile rbd` on the monitors and the pool.
    pub fn client_keyring(&self, name: &str) -> PathBuf {
        // Tests run side by side: one makes the file while the others wait, never reading
        // it half written.
        static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _making = MAKING.lock().unwrap_or_else(|e| e.into_inner());
        let keyring = self.conf.with_file_name(format!("client.{name}.keyring"));
        if !keyring.exists() {
            let out = Command::new("timeout")
                .args(["120", "ceph", "-c"])
                .arg(&self.conf)
                .args(["auth", "get-or-create", &format!("client.{name}")])
                .args(["mon", "profile rbd", "osd"])
                .arg(format!("profile rbd pool={}", self.pool))
                .arg("-o")
                .arg(&keyring)
                .output()
                .expect("ceph auth");
            assert!(out.status.success(), "ceph auth get-or-create: {out:?}");
        }
        keyring
    }

    /// [`TestCluster::pool_toml`] as client `client` with its own key.
    pub fn pool_toml_as(&self, namespace: &str, client: &str) -> String {
        let keyring = self.client_keyring(client);
        format!(
            "[pool]\nbackend = \"rbd\"\n[pool.rbd]\npool = {:?}\nnamespace = {namespace:?}\nceph_conf = {:?}\nclient = {client:?}\nkeyring = {:?}\ntimeout = \"120s\"\n",
            self.pool,
            self.conf.display().to_string(),
            keyring.display().to_string()
        )
    }

    /// Run the `rbd` command on it (for cross-checks the library must agree with).
    pub fn rbd(&self, args: &[&str]) -> String {
        let out = Command::new("timeout")
            .arg("300")
            .arg("rbd")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .expect("rbd");
        assert!(out.status.success(), "rbd {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The cluster, started the first time a test asks (a failure to start fails the test).
pub fn cluster() -> &'static TestCluster {
    static CLUSTER: OnceLock<TestCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/ceph-cluster");
        let out = Command::new(&script)
            .arg("start")
            .output()
            .expect("running scripts/ceph-cluster");
        assert!(
            out.status.success(),
            "scripts/ceph-cluster start failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let values: HashMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        let get = |key: &str| {
            values
                .get(key)
                .unwrap_or_else(|| panic!("scripts/ceph-cluster printed no {key}:\n{text}"))
                .to_string()
        };
        TestCluster {
            conf: get("CEPH_CONF").into(),
            keyring: get("CEPH_KEYRING").into(),
            pool: get("CEPH_POOL"),
        }
    })
}
