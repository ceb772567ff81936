//! The cephx secret the kernel's rbd client needs: librados reads keyrings itself, but the
//! kernel must be handed the key.

use std::path::Path;
use std::sync::Arc;

use super::cluster::Cluster;
use crate::error::{Error, ErrorKind, Result};

/// The secret key of the cluster's client: the `key` option when the configuration sets one,
/// otherwise the client's entry in the first keyring file (of the `keyring` option's list)
/// that has it.
pub fn secret_of(cluster: &Arc<Cluster>) -> Result<String> {
    let key = cluster.conf("key")?;
    if !key.trim().is_empty() {
        return Ok(key.trim().to_owned());
    }
    let entity = format!("client.{}", cluster.config().client);
    let keyrings = cluster.conf("keyring")?;
    for path in keyrings.split([',', ';', ' ']).filter(|p| !p.is_empty()) {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        if let Some(key) = key_in_keyring(&text, &entity) {
            return Ok(key);
        }
    }
    Err(Error::new(
        ErrorKind::Permission,
        format!(
            "no key for {entity} in the keyrings the Ceph configuration names ({keyrings}); the \
             kernel's rbd client needs it: set pool.rbd.keyring to a keyring that holds it"
        ),
    ))
}

/// The `key` of `[entity]` in a keyring file's text.
fn key_in_keyring(text: &str, entity: &str) -> Option<String> {
    let mut in_section = false;
    for line in text.lines().map(str::trim) {
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_section = section.trim() == entity;
        } else if in_section {
            if let Some((name, value)) = line.split_once('=') {
                if name.trim() == "key" {
                    return Some(value.trim().to_owned());
                }
            }
        }
    }
    None
}

/// Whether `path` is a keyring that holds a key for `client.<client>`, for configuration
/// checks.
pub fn keyring_has_client(path: &Path, client: &str) -> Result<bool> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading keyring {}", path.display()), e))?;
    Ok(key_in_keyring(&text, &format!("client.{client}")).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_of_the_named_entity_is_found_and_no_other() {
        let text = "[client.other]\n\tkey = OTHER==\n[client.admin]\n\tkey = AQBsecret==\n\tcaps mon = \"allow *\"\n";
        assert_eq!(
            key_in_keyring(text, "client.admin").as_deref(),
            Some("AQBsecret==")
        );
        assert_eq!(
            key_in_keyring(text, "client.other").as_deref(),
            Some("OTHER==")
        );
        assert_eq!(key_in_keyring(text, "client.thinstack"), None);
    }
}
