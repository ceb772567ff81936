//! Exporting a layer: its blocks as a layer stream ([`crate::stream`]), whole or only what
//! changed since one of its committed ancestors. What changed is read from the pool's
//! metadata ([`PoolKernel::thin_delta`]), never by reading and comparing devices; only the
//! changed ranges of the layer's own device are read.

use std::io::Write;

use super::*;
use crate::kernel::DeltaKind;
use crate::stream::{Base, Header, StreamWriter, Summary};

/// Bytes read from the device at a time.
const READ_CHUNK: u64 = 1 << 20;

impl<K: PoolKernel, F: FsKernel> Engine<K, F> {
    /// Write layer `name` as a stream to the writer `open` gives, once every check has
    /// passed (so a caller answering over HTTP can still answer with an error until then):
    /// every block it maps, or, with `from`, only what differs from that committed
    /// ancestor. A writable layer must be unmounted and inactive, so it cannot change while
    /// it is read. Returns the writer and what was written.
    pub fn export<W: Write>(
        &self,
        name: &str,
        from: Option<&str>,
        compress: bool,
        open: impl FnOnce() -> Result<W>,
    ) -> Result<(W, Summary)> {
        let name = LayerName::new(name)?;
        let from = from.map(LayerName::new).transpose()?;
        if from.as_ref() == Some(&name) {
            return Err(Error::invalid(format!(
                "layer {name:?} cannot be exported as changes against itself; name one of its committed ancestors with --from"
            )));
        }
        let (_guard, _base_guard) = self.locks.lock_with(&name, from.as_ref());
        self.ensure_not_degraded(&name)?;
        let record = self.ready_record(&name)?;
        self.check_exportable(&record)?;
        let base = from
            .map(|base| self.export_base(&record, &base))
            .transpose()?;
        let content_id = match record.committed {
            true => self.ensure_content_id(&record)?,
            // A writable layer's content is named anew at each export: it may change after.
            false => ContentId::random()?,
        };
        let header = Header {
            name: name.to_string(),
            size: record.size,
            filesystem: record.filesystem,
            fs_uuid: record.fs_uuid.clone(),
            block_size: self.kernel.details().block_size,
            content_id,
            base: base.as_ref().map(|(base, content_id)| Base {
                name: base.name.to_string(),
                content_id: content_id.clone(),
                size: base.size,
            }),
            labels: record.labels.clone(),
            created_ns: record.created_ns,
        };
        let base_id = base.as_ref().map(|(base, _)| base.thin_id);
        let started = std::time::Instant::now();
        let runs = self.exclusive_pool(|kernel| kernel.thin_delta(base_id, record.thin_id))?;
        let delta_ms = started.elapsed().as_millis() as u64;
        let (out, summary) = self.with_device(&record, |_| {
            let device = self.kernel.open_thin(record.thin_id)?;
            let writer = StreamWriter::new(open()?, &header, compress)?;
            write_runs(device, writer, &runs, record.size.bytes())
        })?;
        // The phases, for whoever asks where an export's time goes (scripts/bench does).
        let total_ms = started.elapsed().as_millis() as u64;
        tracing::info!(layer = %name, from = ?from_name(&base), runs = summary.runs, data_bytes = summary.data_bytes, delta_ms, total_ms, "layer exported");
        Ok((out, summary))
    }

    /// A writable layer is exported only while nothing can write it.
    fn check_exportable(&self, record: &LayerRecord) -> Result<()> {
        if record.committed {
            return Ok(());
        }
        let name = record.name.as_str();
        if let Some(target) = record.mounts.keys().next() {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "layer {name:?} is writable and mounted at {}; unmount it (or commit it) so it cannot change while it is exported",
                    target.display()
                ),
            ));
        }
        if self.kernel.active_node(record.thin_id)?.is_some() {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "layer {name:?} is writable and active; deactivate it (or commit it) so it cannot change while it is exported"
                ),
            ));
        }
        Ok(())
    }

    /// `base`'s record and content id, when it is a committed ancestor of `record`.
    fn export_base(
        &self,
        record: &LayerRecord,
        base: &LayerName,
    ) -> Result<(LayerRecord, ContentId)> {
        let ancestors = self.ancestors_of(record);
        if !ancestors.contains(base) {
            let names: Vec<&str> = ancestors.iter().map(LayerName::as_str).collect();
            return Err(Error::invalid(format!(
                "layer {base:?} is not an ancestor of {:?}; --from takes one of its committed ancestors ({})",
                record.name.as_str(),
                if names.is_empty() { "it has none".to_string() } else { names.join(", ") }
            )));
        }
        let base_record = self.ready_record(base)?;
        if !base_record.committed {
            return Err(Error::invalid(format!(
                "layer {base:?} is not committed, so its content may change and no other host can hold the same; commit it first, or export from a committed ancestor"
            )));
        }
        let content_id = self.ensure_content_id(&base_record)?;
        Ok((base_record, content_id))
    }

    /// `record`'s parent, its parent's parent, and so on.
    fn ancestors_of(&self, record: &LayerRecord) -> Vec<LayerName> {
        let index = self.index();
        let mut ancestors = Vec::new();
        let mut next = record.parent.clone();
        while let Some(name) = next {
            next = index.layers.get(&name).and_then(|l| l.parent.clone());
            ancestors.push(name);
        }
        ancestors
    }

    /// A committed layer's content id, given (and recorded) now if it was committed before
    /// layers had one. The caller holds the layer's lock.
    pub(super) fn ensure_content_id(&self, record: &LayerRecord) -> Result<ContentId> {
        if let Some(id) = &record.content_id {
            return Ok(id.clone());
        }
        let id = ContentId::random()?;
        self.put(LayerRecord {
            content_id: Some(id.clone()),
            ..record.clone()
        })?;
        Ok(id)
    }
}

fn from_name(base: &Option<(LayerRecord, ContentId)>) -> Option<&str> {
    base.as_ref().map(|(record, _)| record.name.as_str())
}

/// Read `runs` of `device` (of `size` bytes) into `writer`, and finish the stream.
#[tracing::instrument(level = "debug", skip_all)]
fn write_runs<W: Write>(
    mut device: Box<dyn crate::kernel::device_io::ThinIo>,
    mut writer: StreamWriter<W>,
    runs: &[crate::kernel::DeltaRun],
    size: u64,
) -> Result<(W, Summary)> {
    let mut buf = crate::kernel::device_io::AlignedBuf::new(READ_CHUNK as usize);
    for run in runs {
        // A device maps nothing past its size; a stream never names anything past it.
        let end = (run.offset + run.length).min(size);
        if run.kind == DeltaKind::Unmapped {
            if end > run.offset {
                writer.unmapped(run.offset, end - run.offset)?;
            }
            continue;
        }
        let mut offset = run.offset;
        while offset < end {
            let piece = &mut buf[..(end - offset).min(READ_CHUNK) as usize];
            device.read_at(offset, piece)?;
            writer.data(offset, piece)?;
            offset += piece.len() as u64;
        }
    }
    writer.finish()
}
