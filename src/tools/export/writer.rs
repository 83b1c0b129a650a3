//! The files of an export: one table's rows written as Parquet (Apache's
//! `parquet` crate, its low-level column writer: no Arrow, which would
//! double the build for a writer of flat rows) or CSV (RFC 4180, with a
//! header), into Hive-style day partitions (`TABLE/date=YYYY-MM-DD/NAME`).
//! Rows reach a table in partition order, so one file is open at a time
//! and a Parquet file holds at most one row group in memory: memory stays
//! bounded whatever the size of the export. Each file is written under a
//! hidden temporary name and renamed when complete, so a reader (or a run
//! cut short) never sees half a file under a real name.

use crate::store::{Cell, ColType};
use anyhow::{Context, bail};
use chrono::{DateTime, Datelike, Utc};
use chrono_tz::Tz;
use parquet::basic::Compression;
use parquet::column::writer::ColumnWriter;
use parquet::data_type::ByteArray;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A column of an exported table.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    pub name: &'static str,
    pub ty: ColType,
}

/// Shorthand for the tables' column lists.
pub const fn col(name: &'static str, ty: ColType) -> Column {
    Column { name, ty }
}

pub use crate::config::ExportFormat as Format;

/// One file a run wrote, for the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileInfo {
    pub table: String,
    /// Relative to the export's folder, with `/` separators.
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
}

/// Rows buffered per Parquet row group; a row group is also closed at
/// [`ROW_GROUP_BYTES`] of buffered text, so large `data` cannot grow it.
const ROW_GROUP_ROWS: usize = 65_536;
const ROW_GROUP_BYTES: usize = 32 << 20;

/// The partition name of a row without a time (Hive's convention).
const NO_DATE: &str = "__HIVE_DEFAULT_PARTITION__";

/// One table being written: its files, one per day partition (or one
/// file when the table is not partitioned).
pub struct TableWriter {
    root: PathBuf,
    table: &'static str,
    columns: &'static [Column],
    format: Format,
    /// The file name inside each partition, e.g. `part-0-1200.parquet`.
    file_name: String,
    /// The column whose day (in `tz`) partitions the rows.
    partition_by: Option<usize>,
    tz: Tz,
    current: Option<(String, PartFile)>,
    pub files: Vec<FileInfo>,
}

impl TableWriter {
    /// Writes under `root/dir_name`, which is usually `table` (or a staging
    /// folder that later takes its place).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        root: &Path,
        dir_name: &str,
        table: &'static str,
        columns: &'static [Column],
        format: Format,
        file_stem: &str,
        partition_by: Option<usize>,
        tz: Tz,
    ) -> Self {
        TableWriter {
            root: root.join(dir_name),
            table,
            columns,
            format,
            file_name: format!("{file_stem}.{}", format.extension()),
            partition_by,
            tz,
            current: None,
            files: Vec::new(),
        }
    }

    /// Appends a row; rows must come in the order of their partition.
    pub fn write(&mut self, row: &[Cell]) -> anyhow::Result<()> {
        if row.len() != self.columns.len() {
            bail!(
                "{}: a row of {} values for {} columns",
                self.table,
                row.len(),
                self.columns.len()
            );
        }
        let partition = match self.partition_by {
            Some(i) => match &row[i] {
                Cell::Time(t) => format!("date={}", local_date(*t, self.tz)),
                _ => format!("date={NO_DATE}"),
            },
            None => String::new(),
        };
        match &self.current {
            Some((open, _)) if *open == partition => {}
            Some((open, _)) if *open > partition && !partition.ends_with(NO_DATE) => bail!(
                "{}: rows out of day order ({partition} after {open})",
                self.table
            ),
            _ => {
                self.finish_current()?;
                let dir = self.root.join(&partition);
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                let file = PartFile::create(dir.join(&self.file_name), self.columns, self.format)?;
                self.current = Some((partition, file));
            }
        }
        let (_, file) = self.current.as_mut().expect("opened above");
        file.write(row)
    }

    fn finish_current(&mut self) -> anyhow::Result<()> {
        if let Some((partition, file)) = self.current.take() {
            let (rows, bytes) = file.finish()?;
            let dir = self.root.file_name().unwrap_or_default().to_string_lossy();
            let path = if partition.is_empty() {
                format!("{dir}/{}", self.file_name)
            } else {
                format!("{dir}/{partition}/{}", self.file_name)
            };
            self.files.push(FileInfo {
                table: self.table.to_string(),
                path,
                rows,
                bytes,
            });
        }
        Ok(())
    }

    /// Closes the last file; returns every file written. A table left
    /// without any file gets one without rows (in the partition of rows
    /// without a day), so that readers still find it and its columns.
    pub fn finish(mut self) -> anyhow::Result<Vec<FileInfo>> {
        if self.files.is_empty() && self.current.is_none() && !has_files(&self.root)? {
            let partition = match self.partition_by {
                Some(_) => format!("date={NO_DATE}"),
                None => String::new(),
            };
            let dir = self.root.join(&partition);
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let file = PartFile::create(dir.join(&self.file_name), self.columns, self.format)?;
            self.current = Some((partition, file));
        }
        self.finish_current()?;
        Ok(self.files)
    }
}

/// Whether `dir` or its partitions hold a finished file.
fn has_files(dir: &Path) -> anyhow::Result<bool> {
    if !dir.exists() {
        return Ok(false);
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        if path.is_file() || has_files(&path)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `YYYY-MM-DD` of `t` in `tz`.
pub fn local_date(t: DateTime<Utc>, tz: Tz) -> String {
    let d = t.with_timezone(&tz).date_naive();
    format!("{:04}-{:02}-{:02}", d.year(), d.month(), d.day())
}

/// The name a file has while it is written.
pub fn temp_name(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.tmp"))
}

/// One file being written.
struct PartFile {
    path: PathBuf,
    temp: PathBuf,
    rows: u64,
    kind: Kind,
}

enum Kind {
    Parquet(Box<ParquetFile>),
    Csv(Box<csv::Writer<BufWriter<File>>>),
}

impl PartFile {
    fn create(path: PathBuf, columns: &[Column], format: Format) -> anyhow::Result<Self> {
        let temp = temp_name(&path);
        let file =
            File::create(&temp).with_context(|| format!("cannot create {}", temp.display()))?;
        let out = BufWriter::with_capacity(1 << 20, file);
        let kind = match format {
            Format::Parquet => Kind::Parquet(Box::new(ParquetFile::new(out, columns)?)),
            Format::Csv => {
                let mut w = csv::WriterBuilder::new()
                    .terminator(csv::Terminator::CRLF)
                    .from_writer(out);
                w.write_record(columns.iter().map(|c| c.name))?;
                Kind::Csv(Box::new(w))
            }
        };
        Ok(PartFile {
            path,
            temp,
            rows: 0,
            kind,
        })
    }

    fn write(&mut self, row: &[Cell]) -> anyhow::Result<()> {
        self.rows += 1;
        match &mut self.kind {
            Kind::Parquet(p) => p.push(row),
            Kind::Csv(w) => {
                for cell in row {
                    match cell {
                        Cell::Null => w.write_field(b"")?,
                        Cell::Text(s) => w.write_field(s)?,
                        Cell::Int(n) => w.write_field(n.to_string())?,
                        Cell::Float(f) => w.write_field(f.to_string())?,
                        Cell::Bool(b) => w.write_field(if *b { "true" } else { "false" })?,
                        Cell::Time(t) => {
                            w.write_field(t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())?
                        }
                    }
                }
                w.write_record(None::<&[u8]>)?;
                Ok(())
            }
        }
    }

    /// Completes the file and gives it its name: `(rows, bytes)`.
    fn finish(self) -> anyhow::Result<(u64, u64)> {
        let out = match self.kind {
            Kind::Parquet(p) => p.close()?,
            Kind::Csv(w) => w.into_inner().map_err(|e| e.into_error())?,
        };
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        let bytes = file.metadata()?.len();
        std::fs::rename(&self.temp, &self.path)
            .with_context(|| format!("cannot rename {}", self.temp.display()))?;
        Ok((self.rows, bytes))
    }
}

/// A Parquet file: columns buffered for one row group, then written.
struct ParquetFile {
    writer: SerializedFileWriter<BufWriter<File>>,
    columns: Vec<Buffer>,
    rows: usize,
    bytes: usize,
}

/// One column's values of the row group in hand; `defs` says which rows
/// have a value (1) or are null (0).
struct Buffer {
    values: Values,
    defs: Vec<i16>,
}

enum Values {
    Int(Vec<i64>),
    Float(Vec<f64>),
    Bool(Vec<bool>),
    Bytes(Vec<ByteArray>),
}

impl ParquetFile {
    fn new(out: BufWriter<File>, columns: &[Column]) -> anyhow::Result<Self> {
        let fields: String = columns
            .iter()
            .map(|c| {
                let ty = match c.ty {
                    ColType::Text | ColType::Json => "BYTE_ARRAY {} (STRING)",
                    ColType::Int => "INT64 {}",
                    ColType::Float => "DOUBLE {}",
                    ColType::Bool => "BOOLEAN {}",
                    ColType::Time => "INT64 {} (TIMESTAMP(MICROS,true))",
                };
                format!("OPTIONAL {};\n", ty.replace("{}", c.name))
            })
            .collect();
        let schema =
            parquet::schema::parser::parse_message_type(&format!("message nudge {{\n{fields}}}"))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build();
        let writer = SerializedFileWriter::new(out, Arc::new(schema), Arc::new(props))?;
        let columns = columns
            .iter()
            .map(|c| Buffer {
                values: match c.ty {
                    ColType::Text | ColType::Json => Values::Bytes(Vec::new()),
                    ColType::Int | ColType::Time => Values::Int(Vec::new()),
                    ColType::Float => Values::Float(Vec::new()),
                    ColType::Bool => Values::Bool(Vec::new()),
                },
                defs: Vec::new(),
            })
            .collect();
        Ok(ParquetFile {
            writer,
            columns,
            rows: 0,
            bytes: 0,
        })
    }

    fn push(&mut self, row: &[Cell]) -> anyhow::Result<()> {
        for (buf, cell) in self.columns.iter_mut().zip(row) {
            let present = match (&mut buf.values, cell) {
                (_, Cell::Null) => false,
                (Values::Int(v), Cell::Int(n)) => {
                    v.push(*n);
                    true
                }
                (Values::Int(v), Cell::Time(t)) => {
                    v.push(t.timestamp_micros());
                    true
                }
                (Values::Float(v), Cell::Float(f)) => {
                    v.push(*f);
                    true
                }
                (Values::Float(v), Cell::Int(n)) => {
                    v.push(*n as f64);
                    true
                }
                (Values::Bool(v), Cell::Bool(b)) => {
                    v.push(*b);
                    true
                }
                (Values::Bytes(v), Cell::Text(s)) => {
                    self.bytes += s.len();
                    v.push(ByteArray::from(s.as_bytes().to_vec()));
                    true
                }
                (_, other) => bail!("a value of the wrong type for its column: {other:?}"),
            };
            buf.defs.push(i16::from(present));
        }
        self.rows += 1;
        if self.rows >= ROW_GROUP_ROWS || self.bytes >= ROW_GROUP_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the buffered rows as one row group.
    fn flush(&mut self) -> anyhow::Result<()> {
        if self.rows == 0 {
            return Ok(());
        }
        let mut group = self.writer.next_row_group()?;
        for buf in &mut self.columns {
            let mut col = group
                .next_column()?
                .context("the schema has fewer columns than the table")?;
            let defs = Some(buf.defs.as_slice());
            match (col.untyped(), &mut buf.values) {
                (ColumnWriter::Int64ColumnWriter(w), Values::Int(v)) => {
                    w.write_batch(v, defs, None)?;
                    v.clear();
                }
                (ColumnWriter::DoubleColumnWriter(w), Values::Float(v)) => {
                    w.write_batch(v, defs, None)?;
                    v.clear();
                }
                (ColumnWriter::BoolColumnWriter(w), Values::Bool(v)) => {
                    w.write_batch(v, defs, None)?;
                    v.clear();
                }
                (ColumnWriter::ByteArrayColumnWriter(w), Values::Bytes(v)) => {
                    w.write_batch(v, defs, None)?;
                    v.clear();
                }
                _ => bail!("a column buffer does not match its Parquet type"),
            }
            buf.defs.clear();
            col.close()?;
        }
        group.close()?;
        self.rows = 0;
        self.bytes = 0;
        Ok(())
    }

    fn close(mut self) -> anyhow::Result<BufWriter<File>> {
        self.flush()?;
        Ok(self.writer.into_inner()?)
    }
}
