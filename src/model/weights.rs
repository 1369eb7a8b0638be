//! Safetensors checkpoints in Hugging Face layout: memory-mapped reading (single file or
//! sharded with `model.safetensors.index.json`) and sharded, atomic writing.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype as StDtype, SafeTensors};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Named tensors of a model held in memory.
pub type WeightMap = HashMap<String, Tensor>;

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    metadata: Metadata,
}

/// All safetensors files of a checkpoint, memory-mapped; tensors are materialised one at a time.
pub struct SafetensorsFiles {
    files: Vec<MappedFile>,
    location: HashMap<String, usize>,
}

fn candle_dtype(dtype: StDtype, file: &Path, name: &str) -> Result<DType> {
    Ok(match dtype {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::F64 => DType::F64,
        StDtype::U8 => DType::U8,
        StDtype::U32 => DType::U32,
        StDtype::I64 => DType::I64,
        other => bail!(
            "{}: tensor `{name}` has unsupported dtype {other:?}",
            file.display()
        ),
    })
}

impl SafetensorsFiles {
    /// Opens the checkpoint of a model directory: `model.safetensors.index.json` with its shards,
    /// else `model.safetensors`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX_FILE);
        if index.exists() {
            return Self::open_index(&index);
        }
        let single = dir.join(SINGLE_FILE);
        if single.exists() {
            return Self::open_files(&[single]);
        }
        bail!(
            "{}: no {SINGLE_FILE} or {INDEX_FILE} (paft reads Hugging Face safetensors checkpoints)",
            dir.display()
        )
    }

    fn open_index(index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index)
            .with_context(|| format!("cannot read {}", index.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: missing `weight_map`", index.display()))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shards: Vec<String> = map
            .values()
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        shards.sort();
        shards.dedup();
        for shard in &shards {
            if !dir.join(shard).is_file() {
                bail!(
                    "{}: shard `{shard}` listed in the index is missing",
                    index.display()
                );
            }
        }
        let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
        let files = Self::open_files(&paths)?;
        for (name, shard) in map {
            let shard = shard.as_str().unwrap_or_default();
            match files.location.get(name) {
                Some(&i)
                    if files.files[i].path.file_name().and_then(|f| f.to_str()) == Some(shard) => {}
                Some(_) => bail!(
                    "{}: tensor `{name}` is not in the shard `{shard}` the index names",
                    index.display()
                ),
                None => bail!(
                    "{}: tensor `{name}` listed in the index is not in `{shard}`",
                    index.display()
                ),
            }
        }
        Ok(files)
    }

    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut location = HashMap::new();
        for path in paths {
            let file =
                File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            // SAFETY: the file is opened read-only; paft never writes to a checkpoint it reads.
            let mmap = unsafe { Mmap::map(&file) }
                .with_context(|| format!("cannot mmap {}", path.display()))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
                anyhow::anyhow!(
                    "{} is not a valid safetensors file (truncated or corrupt): {e}",
                    path.display()
                )
            })?;
            for name in metadata.tensors().keys() {
                if location.insert(name.clone(), files.len()).is_some() {
                    bail!(
                        "tensor `{name}` appears in more than one file (second: {})",
                        path.display()
                    );
                }
            }
            files.push(MappedFile {
                path: path.clone(),
                mmap,
                header_len,
                metadata,
            });
        }
        Ok(Self { files, location })
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.location.keys().cloned().collect();
        names.sort();
        names
    }

    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    fn entry(&self, name: &str) -> Result<(&MappedFile, &TensorInfo)> {
        let &i = self
            .location
            .get(name)
            .with_context(|| format!("tensor `{name}` not found in the checkpoint"))?;
        let f = &self.files[i];
        Ok((
            f,
            f.metadata
                .info(name)
                .expect("location map built from metadata"),
        ))
    }

    /// Shape from the header, without reading data.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.entry(name)?.1.shape.clone())
    }

    pub fn file_of(&self, name: &str) -> Result<&Path> {
        Ok(&self.entry(name)?.0.path)
    }

    /// Copies one tensor out of the mapping, converting it to `dtype` when given.
    pub fn load(&self, name: &str, dtype: Option<DType>, device: &Device) -> Result<Tensor> {
        let (f, info) = self.entry(name)?;
        let src = candle_dtype(info.dtype, &f.path, name)?;
        let (start, end) = info.data_offsets;
        let base = 8 + f.header_len;
        let bytes = &f.mmap[base + start..base + end];
        let t = Tensor::from_raw_buffer(bytes, src, &info.shape, device)
            .with_context(|| format!("{}: cannot read tensor `{name}`", f.path.display()))?;
        // The bytes are copied out.
        self.release(name)?;
        match dtype {
            Some(d) if d != src => Ok(t.to_dtype(d)?),
            _ => Ok(t),
        }
    }

    /// The values of an f32 tensor read in place from the mapping (no copy), when the file
    /// stores it as f32 at a 4-byte-aligned offset (safetensors' writer aligns them); None
    /// otherwise. Call [`Self::release`] when done, so its pages leave the resident set.
    pub fn f32_slice(&self, name: &str) -> Result<Option<&[f32]>> {
        let (dtype, bytes) = self.raw(name)?;
        if dtype != DType::F32 || cfg!(target_endian = "big") {
            return Ok(None);
        }
        Ok(bytemuck::try_cast_slice(bytes).ok())
    }

    /// A tensor's stored bytes in place, with their dtype (for reading it a block at a time).
    pub fn raw(&self, name: &str) -> Result<(DType, &[u8])> {
        let (f, info) = self.entry(name)?;
        let (start, end) = info.data_offsets;
        let base = 8 + f.header_len;
        Ok((
            candle_dtype(info.dtype, &f.path, name)?,
            &f.mmap[base + start..base + end],
        ))
    }

    /// [`Self::release`] for the bytes `range` of a tensor's data.
    pub fn release_part(&self, name: &str, range: std::ops::Range<usize>) -> Result<()> {
        let (f, info) = self.entry(name)?;
        let start = 8 + f.header_len + info.data_offsets.0;
        #[cfg(unix)]
        // SAFETY: the mapping is read-only and file-backed; dropped pages are re-read from the
        // file if touched again, so no data is lost and no live reference changes.
        unsafe {
            let _ = f.mmap.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                start + range.start,
                range.len(),
            );
        }
        Ok(())
    }

    /// Drops a tensor's pages from this process's resident set (they are re-read from the file
    /// if touched again): streaming through checkpoints costs one tensor of memory, not a file.
    pub fn release(&self, name: &str) -> Result<()> {
        let (start, end) = self.entry(name)?.1.data_offsets;
        self.release_part(name, 0..end - start)
    }

    pub fn load_all(&self, dtype: Option<DType>, device: &Device) -> Result<WeightMap> {
        self.names()
            .into_iter()
            .map(|n| {
                let t = self.load(&n, dtype, device)?;
                Ok((n, t))
            })
            .collect()
    }
}

/// A directory that appears at its final path only when complete: written into a hidden sibling
/// temp directory, renamed on [`AtomicDir::commit`], and removed if dropped uncommitted.
pub struct AtomicDir {
    tmp: tempfile::TempDir,
    target: PathBuf,
}

impl AtomicDir {
    pub fn new(target: &Path) -> Result<Self> {
        if target.exists()
            && std::fs::read_dir(target)
                .map(|mut d| d.next().is_some())
                .unwrap_or(true)
        {
            bail!(
                "output directory {} already exists and is not empty",
                target.display()
            );
        }
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        let name = target.file_name().and_then(|n| n.to_str()).unwrap_or("out");
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}.partial-"))
            .tempdir_in(&parent)
            .with_context(|| {
                format!(
                    "cannot create a temporary directory in {}",
                    parent.display()
                )
            })?;
        Ok(Self {
            tmp,
            target: target.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    pub fn commit(self) -> Result<PathBuf> {
        if self.target.exists() {
            // An empty directory (checked in `new`) may stand in the way of the rename.
            let _ = std::fs::remove_dir(&self.target);
        }
        let tmp = self.tmp.keep();
        std::fs::rename(&tmp, &self.target).with_context(|| {
            format!(
                "cannot move {} into place at {}",
                tmp.display(),
                self.target.display()
            )
        })?;
        Ok(self.target)
    }
}

/// Writes one safetensors file with the `format: pt` metadata transformers requires, readable by
/// others like any checkpoint (safetensors' own writer creates it private).
pub fn write_safetensors(path: &Path, mut tensors: Vec<(String, Tensor)>) -> Result<()> {
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(tensors, Some(metadata), path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))?;
    }
    Ok(())
}

/// A tensor of a checkpoint about to be written: what its header entry says, before any data.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()
    }
}

/// One output file: its planned tensors, in the order their data follows the header.
struct PlannedShard {
    tensors: Vec<PlannedTensor>,
    temp: PathBuf,
}

/// Writes a checkpoint whose tensors are all known in advance (names, dtypes, shapes) as
/// `model-0000i-of-0000N.safetensors` shards of at most `max_shard_bytes` (a tensor larger than
/// that gets a shard of its own) plus the index, or one `model.safetensors`. Each shard's header
/// is written first, so tensor data streams straight to the file as it is produced, in plan
/// order: nothing is buffered beyond the tensor being written.
pub struct ShardedWriter {
    dir: PathBuf,
    shards: Vec<PlannedShard>,
    /// Shard and tensor index of the next tensor to write, and the bytes of it written so far.
    next: (usize, usize),
    written: usize,
    file: Option<std::io::BufWriter<File>>,
    total_bytes: usize,
}

pub const DEFAULT_SHARD_BYTES: usize = 5 * 1024 * 1024 * 1024;

/// Parses a shard size as transformers' `max_shard_size` writes it: `5GB`, `500MB`, `2GiB`, bytes.
pub fn parse_size(s: &str) -> Result<usize> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .with_context(|| format!("bad size `{s}` (e.g. 5GB, 500MB)"))?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024f64.powi(2),
        "GIB" => 1024f64.powi(3),
        other => bail!("bad size unit `{other}` in `{s}` (B, KB, MB, GB, KiB, MiB, GiB)"),
    };
    let bytes = (n * mult) as usize;
    if bytes == 0 {
        bail!("size `{s}` must be positive");
    }
    Ok(bytes)
}

impl ShardedWriter {
    /// Plans the shards (the same split as transformers' `max_shard_size`: a shard is closed
    /// when the next tensor would take it over the limit).
    pub fn new(dir: &Path, max_shard_bytes: usize, plan: Vec<PlannedTensor>) -> Result<Self> {
        let max = max_shard_bytes.max(1);
        let mut shards: Vec<PlannedShard> = vec![];
        let mut bytes = 0;
        let mut seen = std::collections::HashSet::new();
        for t in plan {
            if !seen.insert(t.name.clone()) {
                bail!("tensor `{}` is planned twice", t.name);
            }
            st_dtype(t.dtype)?;
            let b = t.bytes();
            match shards.last_mut() {
                Some(s) if bytes + b <= max => s.tensors.push(t),
                _ => {
                    let temp = dir.join(format!(".shard-{}.safetensors", shards.len()));
                    shards.push(PlannedShard {
                        tensors: vec![t],
                        temp,
                    });
                    bytes = 0;
                }
            }
            bytes += b;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            total_bytes: shards
                .iter()
                .flat_map(|s| &s.tensors)
                .map(PlannedTensor::bytes)
                .sum(),
            shards,
            next: (0, 0),
            written: 0,
            file: None,
        })
    }

    /// Opens shard `i` and writes its header (with the `format: pt` metadata transformers
    /// requires), in safetensors' own layout: 8-byte length, JSON padded to 8 bytes.
    fn open_shard(&mut self, i: usize) -> Result<()> {
        let shard = &self.shards[i];
        let mut offset = 0;
        let mut infos = vec![];
        for t in &shard.tensors {
            let n = t.bytes();
            infos.push((
                t.name.clone(),
                TensorInfo {
                    dtype: st_dtype(t.dtype)?,
                    shape: t.shape.clone(),
                    data_offsets: (offset, offset + n),
                },
            ));
            offset += n;
        }
        let metadata = Metadata::new(
            Some(HashMap::from([("format".to_string(), "pt".to_string())])),
            infos,
        )?;
        let mut header = serde_json::to_string(&metadata)?.into_bytes();
        header.resize(header.len().next_multiple_of(8), b' ');
        let file = File::create(&shard.temp)
            .with_context(|| format!("cannot create {}", shard.temp.display()))?;
        let mut w = std::io::BufWriter::with_capacity(8 << 20, file);
        use std::io::Write;
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        self.file = Some(w);
        Ok(())
    }

    /// Writes the next planned tensor's data, whole: `bytes` in its dtype, little-endian.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let planned = self.planned(name)?.bytes();
        if self.written != 0 || bytes.len() != planned {
            bail!(
                "tensor `{name}`: {} bytes written at once, {planned} planned",
                bytes.len() + self.written
            );
        }
        self.write_part(name, bytes)
    }

    /// Appends the next part of the planned tensor `name` (tensors stream in, block by block).
    pub fn write_part(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        let planned = self.planned(name)?.bytes();
        let (s, t) = self.next;
        if self.written + bytes.len() > planned {
            bail!(
                "tensor `{name}`: {} bytes written, {planned} planned",
                self.written + bytes.len()
            );
        }
        if t == 0 && self.written == 0 {
            self.open_shard(s)?;
        }
        let path = &self.shards[s].temp;
        let file = self
            .file
            .as_mut()
            .expect("opened with the shard's first tensor");
        file.write_all(bytes)
            .with_context(|| format!("cannot write {}", path.display()))?;
        self.written += bytes.len();
        if self.written == planned {
            self.written = 0;
            self.next = if t + 1 == self.shards[s].tensors.len() {
                self.close_shard()?;
                (s + 1, 0)
            } else {
                (s, t + 1)
            };
        }
        Ok(())
    }

    /// Writes f32 values as (the next part of) the planned tensor `name`, converted to its
    /// planned dtype.
    pub fn write_f32(&mut self, name: &str, values: &[f32]) -> Result<()> {
        match self.planned(name)?.dtype {
            DType::F32 => self.write_part(name, bytemuck::cast_slice(values)),
            DType::BF16 => {
                let v: Vec<u16> = values
                    .iter()
                    .map(|&x| half::bf16::from_f32(x).to_bits())
                    .collect();
                self.write_part(name, bytemuck::cast_slice(&v))
            }
            DType::F16 => {
                let v: Vec<u16> = values
                    .iter()
                    .map(|&x| half::f16::from_f32(x).to_bits())
                    .collect();
                self.write_part(name, bytemuck::cast_slice(&v))
            }
            other => bail!("tensor `{name}`: cannot write f32 values as {other:?}"),
        }
    }

    /// Writes a tensor (converted to its planned dtype when it differs).
    pub fn add(&mut self, name: String, tensor: Tensor) -> Result<()> {
        let dtype = self.planned(&name)?.dtype;
        let t = tensor.to_dtype(dtype)?;
        let bytes = safetensors::View::data(&t);
        self.write(&name, &bytes)
    }

    fn planned(&self, name: &str) -> Result<&PlannedTensor> {
        let (s, t) = self.next;
        match self.shards.get(s).and_then(|sh| sh.tensors.get(t)) {
            Some(p) if p.name == name => Ok(p),
            Some(p) => bail!("tensor `{name}` written where `{}` was planned", p.name),
            None => bail!("tensor `{name}` written after every planned tensor"),
        }
    }

    fn close_shard(&mut self) -> Result<()> {
        if let Some(w) = self.file.take() {
            let file = w.into_inner().map_err(|e| e.into_error())?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
            }
        }
        Ok(())
    }

    /// Checks that every planned tensor was written, names the shards and writes the index
    /// (only when there is more than one shard).
    pub fn finish(mut self) -> Result<()> {
        let (s, t) = self.next;
        if let Some(missing) = self.shards.get(s).and_then(|sh| sh.tensors.get(t)) {
            bail!(
                "tensor `{}` was planned but never written whole",
                missing.name
            );
        }
        self.close_shard()?;
        let n = self.shards.len();
        if n <= 1 {
            if let Some(shard) = self.shards.first() {
                std::fs::rename(&shard.temp, self.dir.join(SINGLE_FILE))?;
            }
            return Ok(());
        }
        let mut weight_map = BTreeMap::new();
        for (i, shard) in self.shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
            std::fs::rename(&shard.temp, self.dir.join(&file))?;
            for t in &shard.tensors {
                weight_map.insert(t.name.clone(), file.clone());
            }
        }
        let index = serde_json::json!({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map});
        std::fs::write(
            self.dir.join(INDEX_FILE),
            serde_json::to_string_pretty(&index)? + "\n",
        )?;
        Ok(())
    }
}

fn st_dtype(d: DType) -> Result<StDtype> {
    Ok(match d {
        DType::F32 => StDtype::F32,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
        DType::F64 => StDtype::F64,
        DType::U8 => StDtype::U8,
        DType::U32 => StDtype::U32,
        DType::I64 => StDtype::I64,
        other => bail!("cannot write dtype {other:?} to safetensors"),
    })
}

/// Writes every tensor of `weights` (sorted by name, converted to `dtype` when given).
pub fn write_weights(
    dir: &Path,
    weights: &WeightMap,
    dtype: Option<DType>,
    max_shard_bytes: usize,
) -> Result<()> {
    // safetensors' own order: wider dtypes first (so every tensor stays aligned), then by name.
    let mut plan: Vec<PlannedTensor> = weights
        .iter()
        .map(|(name, t)| PlannedTensor {
            name: name.clone(),
            dtype: dtype.unwrap_or(t.dtype()),
            shape: t.dims().to_vec(),
        })
        .collect();
    plan.sort_by(|a, b| {
        (b.dtype.size_in_bytes(), &a.name).cmp(&(a.dtype.size_in_bytes(), &b.name))
    });
    let order: Vec<String> = plan.iter().map(|p| p.name.clone()).collect();
    let mut writer = ShardedWriter::new(dir, max_shard_bytes, plan)?;
    for name in order {
        let t = weights[&name].clone();
        writer.add(name, t)?;
    }
    writer.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WeightMap {
        let dev = Device::Cpu;
        (0..5)
            .map(|i| {
                let t = Tensor::arange(0f32, 100.0, &dev)
                    .unwrap()
                    .affine(1.0, i as f64)
                    .unwrap()
                    .reshape((10, 10))
                    .unwrap();
                (format!("t{i}"), t)
            })
            .collect()
    }

    #[test]
    fn sharded_round_trip_with_index() {
        let tmp = tempfile::tempdir().unwrap();
        let w = sample();
        write_weights(tmp.path(), &w, None, 900).unwrap();
        assert!(tmp.path().join(INDEX_FILE).exists());
        assert!(tmp.path().join("model-00001-of-00003.safetensors").exists());
        let files = SafetensorsFiles::open_dir(tmp.path()).unwrap();
        assert_eq!(files.names().len(), 5);
        for (name, t) in &w {
            let back = files.load(name, None, &Device::Cpu).unwrap();
            assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
        }
        let bf = files.load("t3", Some(DType::BF16), &Device::Cpu).unwrap();
        assert_eq!(bf.dtype(), DType::BF16);
    }

    #[test]
    fn single_file_when_small() {
        let tmp = tempfile::tempdir().unwrap();
        write_weights(tmp.path(), &sample(), Some(DType::F16), DEFAULT_SHARD_BYTES).unwrap();
        assert!(tmp.path().join(SINGLE_FILE).exists());
        assert!(!tmp.path().join(INDEX_FILE).exists());
        let files = SafetensorsFiles::open_dir(tmp.path()).unwrap();
        assert_eq!(
            files.load("t0", None, &Device::Cpu).unwrap().dtype(),
            DType::F16
        );
    }

    #[test]
    fn the_writer_streams_parts_in_plan_order_and_refuses_anything_else() {
        let tmp = tempfile::tempdir().unwrap();
        let plan = |names: &[&str]| -> Vec<PlannedTensor> {
            names
                .iter()
                .map(|n| PlannedTensor {
                    name: n.to_string(),
                    dtype: DType::F32,
                    shape: vec![2, 3],
                })
                .collect()
        };
        let mut w = ShardedWriter::new(tmp.path(), 1000, plan(&["a", "b"])).unwrap();
        assert!(w.write_f32("b", &[0.0; 6]).is_err(), "out of order");
        w.write_f32("a", &[1.0, 2.0]).unwrap();
        w.write_f32("a", &[3.0, 4.0, 5.0, 6.0]).unwrap();
        assert!(w.write_f32("b", &[0.0; 7]).is_err(), "too long");
        assert!(
            w.write("b", bytemuck::cast_slice(&[0f32; 5])).is_err(),
            "too short"
        );
        w.write_f32("b", &[7.0; 6]).unwrap();
        assert!(w.write_f32("c", &[0.0]).is_err(), "not planned");
        w.finish().unwrap();
        let files = SafetensorsFiles::open_dir(tmp.path()).unwrap();
        let a = files.load("a", None, &Device::Cpu).unwrap();
        assert_eq!(
            a.to_vec2::<f32>().unwrap(),
            [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
        );
        assert_eq!(files.f32_slice("b").unwrap().unwrap(), [7.0; 6]);

        let other = tempfile::tempdir().unwrap();
        let mut w = ShardedWriter::new(other.path(), 1000, plan(&["a", "b"])).unwrap();
        w.write_f32("a", &[0.0; 6]).unwrap();
        let err = w.finish().unwrap_err().to_string();
        assert!(
            err.contains("`b`") && err.contains("never written"),
            "{err}"
        );
        assert!(ShardedWriter::new(other.path(), 1000, plan(&["a", "a"])).is_err());
    }

    #[test]
    fn sizes_parse_like_transformers() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1234").unwrap(), 1234);
        assert!(parse_size("5XB").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn atomic_dir_leaves_nothing_when_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("out");
        {
            let d = AtomicDir::new(&target).unwrap();
            std::fs::write(d.path().join("x"), b"1").unwrap();
        }
        assert!(!target.exists());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
        let d = AtomicDir::new(&target).unwrap();
        std::fs::write(d.path().join("x"), b"1").unwrap();
        d.commit().unwrap();
        assert!(target.join("x").exists());
        assert!(AtomicDir::new(&target).is_err());
    }
}
