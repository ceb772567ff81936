//! `thinstack layer export`, `import`, `checkpoint` and `reset`: a layer's data moved between
//! hosts, or taken back in place.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{IsTerminal, Read};
use std::path::Path;

use serde_json::{json, Value};
use thinstack::api::{CheckpointRequest, Layer, ResetRequest};
use thinstack::client::{Client, ClientError};
use thinstack::units::ByteSize;

use super::{layer_path, output, Output};

/// Write layer `name`'s stream to `output_file` (or standard output). A file is written
/// under a temporary name and renamed once the stream is whole, so a failed export never
/// leaves a file that looks like a stream.
pub fn export(
    client: &mut Client,
    name: &str,
    from: Option<&str>,
    output_file: Option<&Path>,
    compress: bool,
) -> Result<Output, ClientError> {
    let mut query = form_urlencoded::Serializer::new(String::new());
    if let Some(from) = from {
        query.append_pair("from", from);
    }
    if compress {
        query.append_pair("compress", "true");
    }
    let query = query.finish();
    let mut path = layer_path(name, "export");
    if !query.is_empty() {
        path = format!("{path}?{query}");
    }
    let Some(file) = output_file else {
        let stdout = std::io::stdout();
        if stdout.is_terminal() {
            return Err(ClientError::Local(
                "the stream is binary: give --output FILE, or redirect standard output (> FILE, | ssh HOST thinstack layer import ...)".to_string(),
            ));
        }
        client.get_to(&path, &mut stdout.lock())?;
        // Standard output holds the stream: nothing else goes there.
        return Ok(Output {
            json: Value::Null,
            text: String::new(),
            status: 0,
        });
    };
    let written = export_to_file(client, &path, file)?;
    let text = format!(
        "Exported layer {name}{} to {} ({}, {written} bytes).",
        from.map(|f| format!(" (changes since {f})"))
            .unwrap_or_default(),
        file.display(),
        ByteSize::from_bytes(written).human()
    );
    let value = json!({ "name": name, "from": from, "output": file, "bytes": written });
    Ok(output(&value, text))
}

fn export_to_file(client: &mut Client, path: &str, file: &Path) -> Result<u64, ClientError> {
    let mut partial = file.as_os_str().to_owned();
    partial.push(".partial");
    let partial = Path::new(&partial).to_path_buf();
    let local = |what: &str, e: std::io::Error| ClientError::Local(format!("{what}: {e}"));
    let mut out =
        File::create(&partial).map_err(|e| local(&format!("creating {}", partial.display()), e))?;
    let copied = client.get_to(path, &mut out).and_then(|written| {
        out.sync_all()
            .map_err(|e| local(&format!("writing {}", partial.display()), e))?;
        std::fs::rename(&partial, file).map_err(|e| {
            local(
                &format!("renaming {} to {}", partial.display(), file.display()),
                e,
            )
        })?;
        Ok(written)
    });
    if copied.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    copied
}

/// Import the stream in `input_file` (or standard input) as layer `name`.
pub fn import(
    client: &mut Client,
    name: &str,
    parent: Option<&str>,
    input_file: Option<&Path>,
) -> Result<Output, ClientError> {
    let mut path = layer_path(name, "import");
    if let Some(parent) = parent {
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("parent", parent)
            .finish();
        path = format!("{path}?{query}");
    }
    let mut input: Box<dyn Read> = match input_file {
        Some(file) => Box::new(
            File::open(file)
                .map_err(|e| ClientError::Local(format!("opening {}: {e}", file.display())))?,
        ),
        None => Box::new(std::io::stdin().lock()),
    };
    let layer: Layer = client.post_from(&path, &mut input)?;
    let onto = layer
        .parent
        .as_ref()
        .map(|p| format!(" onto {p}"))
        .unwrap_or_default();
    let text = format!(
        "Imported layer {}{onto}: committed, {} {}, content {}.",
        layer.name,
        layer.size,
        layer.filesystem,
        layer
            .content_id
            .as_ref()
            .map_or("-".to_string(), ToString::to_string)
    );
    Ok(output(&layer, text))
}

/// Checkpoint writable layer `name` as `checkpoint`.
pub fn checkpoint(
    client: &mut Client,
    name: &str,
    checkpoint: String,
    labels: BTreeMap<String, String>,
) -> Result<Output, ClientError> {
    let request = CheckpointRequest {
        name: checkpoint,
        labels,
    };
    let layer: Layer = client.post(&layer_path(name, "checkpoint"), &request)?;
    let text = format!(
        "Took checkpoint {} of layer {name}; `thinstack layer reset {name} --to {}` goes back to it.",
        layer.name, layer.name
    );
    Ok(output(&layer, text))
}

/// Reset layer `name` to its parent or to checkpoint `to`.
pub fn reset(client: &mut Client, name: &str, to: Option<String>) -> Result<Output, ClientError> {
    let request = ResetRequest { to: to.clone() };
    let layer: Layer = client.post(&layer_path(name, "reset"), &request)?;
    let what = match to {
        Some(to) => format!("checkpoint {to}"),
        None => format!(
            "its parent {}",
            layer
                .parent
                .as_ref()
                .map_or("-".to_string(), ToString::to_string)
        ),
    };
    let text = format!(
        "Reset layer {} to the content of {what} (thin id {}).",
        layer.name, layer.thin_id
    );
    Ok(output(&layer, text))
}
