//! Importing a layer stream ([`crate::stream`]) as a new committed layer: a whole layer on a
//! new thin device, or the changes since a base written into a new snapshot of the layer
//! that holds that base's content here. The layer counts as made only once the stream's
//! digest matched; a stream that is cut short, changed, or meant for another base leaves
//! nothing behind.

use std::io::Read;

use super::*;
use crate::stream::{Header, Run, StreamReader, Summary};

/// What to import a stream as.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportLayer {
    /// The new layer's name.
    pub name: String,
    /// The layer holding the content an incremental stream was made against.
    pub parent: Option<String>,
}

impl<K: PoolKernel, F: FsKernel> Engine<K, F> {
    /// Import the stream `input` as layer `request.name`, committed, with the stream's
    /// content id, size, filesystem and labels. Returns the layer and what was read.
    pub fn import<R: Read>(&self, request: &ImportLayer, input: R) -> Result<(Layer, Summary)> {
        let name = LayerName::new(&request.name)?;
        let parent_name = request.parent.as_deref().map(LayerName::new).transpose()?;
        if parent_name.as_ref() == Some(&name) {
            return Err(Error::invalid(format!(
                "layer {name:?} cannot be imported onto itself; name the layer holding the stream's base with --parent"
            )));
        }
        // The header is read before any lock: a slow sender holds nothing up.
        let (reader, header) = StreamReader::open(input)?;
        let (_guard, _parent_guard) = self.locks.lock_with(&name, parent_name.as_ref());
        let parent = self.plan_import(&name, parent_name.as_ref(), &header)?;
        let what = format!("import layer {name:?}");
        let usage = self.ensure_writable(&what)?;
        self.check_space(&usage)?;
        let _virtual = self.reserve_virtual(&what, &usage, header.size)?;
        let id = self.allocate_id()?;
        let record = LayerRecord {
            parent: parent.as_ref().map(|p| p.name.clone()),
            committed: true,
            labels: header.labels.clone(),
            content_id: Some(header.content_id.clone()),
            ..LayerRecord::creating(
                name.clone(),
                id,
                header.size,
                header.filesystem,
                header.fs_uuid.clone(),
                now_ns(),
            )
        };
        let origin = parent.as_ref().map(|p| p.thin_id);
        let started = std::time::Instant::now();
        let mut summary = Summary::default();
        let record = self
            .create_claimed(record, crash::Point::ImportRecordWritten, |record| {
                summary = self.write_stream(record, origin, reader)?;
                Ok(())
            })
            .map_err(|e| e.context(format!("importing layer {name:?}; nothing was kept")))?;
        let total_ms = started.elapsed().as_millis() as u64;
        tracing::info!(layer = %name, parent = ?parent.as_ref().map(|p| p.name.as_str()), runs = summary.runs, data_bytes = summary.data_bytes, total_ms, "layer imported");
        Ok((self.view(record)?, summary))
    }

    /// The parent an import of `header` as `name` goes onto, after the checks that need no
    /// change: the name is free, the stream's base is the parent's content, the sizes and
    /// filesystems agree.
    fn plan_import(
        &self,
        name: &LayerName,
        parent: Option<&LayerName>,
        header: &Header,
    ) -> Result<Option<LayerRecord>> {
        if self.contains(name) {
            self.ensure_not_degraded(name)?;
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("a layer named {name:?} exists already"),
            ));
        }
        check_labels(&header.labels)?;
        check_fs_size(header.filesystem, header.size)?;
        let (base, parent) = match (&header.base, parent) {
            (None, None) => return Ok(None),
            (Some(base), None) => {
                return Err(Error::invalid(format!(
                    "the stream holds only what changed since content {} (layer {:?} where it was exported); name the layer holding that content here with --parent",
                    base.content_id, base.name
                )))
            }
            (None, Some(parent)) => {
                return Err(Error::invalid(format!(
                    "the stream holds a whole layer, not changes to {parent:?}; import it without --parent"
                )))
            }
            (Some(base), Some(parent)) => (base, self.ready_record(parent)?),
        };
        if parent.content_id.as_ref() != Some(&base.content_id) {
            let holds = match &parent.content_id {
                Some(id) => format!("holds content {id}"),
                None => "is not committed, so it holds no fixed content".to_string(),
            };
            return Err(Error::invalid(format!(
                "layer {:?} {holds}, but the stream holds changes to content {} (layer {:?} where it was exported); import it onto the layer that holds that content",
                parent.name.as_str(),
                base.content_id,
                base.name
            )));
        }
        if header.filesystem != parent.filesystem || header.size < parent.size {
            return Err(Error::invalid(format!(
                "the stream's layer ({}, {}) cannot be a snapshot of {:?} ({}, {}); the stream is damaged or was made by another tool",
                header.filesystem,
                header.size,
                parent.name.as_str(),
                parent.filesystem,
                parent.size
            )));
        }
        Ok(Some(parent))
    }

    /// Make `record`'s thin device (a snapshot of `origin`, or empty), write the stream's
    /// runs into it and make them durable; the digest is checked at the stream's end, before
    /// the caller marks the layer ready.
    fn write_stream<R: Read>(
        &self,
        record: &LayerRecord,
        origin: Option<ThinId>,
        mut reader: StreamReader<R>,
    ) -> Result<Summary> {
        let id = record.thin_id;
        self.pool_step(Some(&record.name), PoolOp::make(id, origin))?;
        self.kernel.activate(id, record.size, false)?;
        let written = (|| {
            let mut device = self.kernel.open_thin(id)?;
            while let Some(run) = reader.next_run()? {
                match run {
                    Run::Data { offset, bytes } => device.write_at(offset, &bytes)?,
                    Run::Unmapped { offset, length } => device.zero(offset, length)?,
                }
            }
            device.sync()?;
            crash::point(crash::Point::ImportWritten);
            Ok(reader.summary())
        })();
        let deactivated = self.deactivate_with_retries(id);
        let summary = written?;
        deactivated?;
        Ok(summary)
    }
}
