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
        // The bytes are copied out: let the kernel drop these pages from our resident set, so
        // streaming through checkpoints costs one tensor of memory, not the whole file.
        #[cfg(unix)]
        // SAFETY: the mapping is read-only and file-backed; dropped pages are re-read from the
        // file if touched again, so no data is lost and no live reference changes.
        unsafe {
            let _ = f.mmap.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                base + start,
                end - start,
            );
        }
        match dtype {
            Some(d) if d != src => Ok(t.to_dtype(d)?),
            _ => Ok(t),
        }
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

/// Streams tensors into `model-0000i-of-0000N.safetensors` shards of at most `max_shard_bytes`
/// (a single tensor larger than that gets a shard of its own), then writes the index.
pub struct ShardedWriter {
    dir: PathBuf,
    max_shard_bytes: usize,
    pending: Vec<(String, Tensor)>,
    pending_bytes: usize,
    shards: Vec<(PathBuf, Vec<String>)>,
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
    pub fn new(dir: &Path, max_shard_bytes: usize) -> Self {
        Self {
            dir: dir.to_path_buf(),
            max_shard_bytes: max_shard_bytes.max(1),
            pending: vec![],
            pending_bytes: 0,
            shards: vec![],
            total_bytes: 0,
        }
    }

    pub fn add(&mut self, name: String, tensor: Tensor) -> Result<()> {
        let bytes = tensor.elem_count() * tensor.dtype().size_in_bytes();
        if !self.pending.is_empty() && self.pending_bytes + bytes > self.max_shard_bytes {
            self.flush()?;
        }
        self.pending_bytes += bytes;
        self.total_bytes += bytes;
        self.pending.push((name, tensor));
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let path = self
            .dir
            .join(format!(".shard-{}.safetensors", self.shards.len()));
        let pending = std::mem::take(&mut self.pending);
        let names = pending.iter().map(|(n, _)| n.clone()).collect();
        write_safetensors(&path, pending)?;
        self.shards.push((path, names));
        self.pending_bytes = 0;
        Ok(())
    }

    /// Names the shards and writes the index (only when there is more than one shard).
    pub fn finish(mut self) -> Result<()> {
        self.flush()?;
        let n = self.shards.len();
        if n <= 1 {
            if let Some((path, _)) = self.shards.first() {
                std::fs::rename(path, self.dir.join(SINGLE_FILE))?;
            }
            return Ok(());
        }
        let mut weight_map = BTreeMap::new();
        for (i, (path, names)) in self.shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
            std::fs::rename(path, self.dir.join(&file))?;
            for name in names {
                weight_map.insert(name.clone(), file.clone());
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

/// Writes every tensor of `weights` (sorted by name, converted to `dtype` when given).
pub fn write_weights(
    dir: &Path,
    weights: &WeightMap,
    dtype: Option<DType>,
    max_shard_bytes: usize,
) -> Result<()> {
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let mut writer = ShardedWriter::new(dir, max_shard_bytes);
    for name in names {
        let t = &weights[name];
        let t = match dtype {
            Some(d) if d != t.dtype() => t.to_dtype(d)?,
            _ => t.clone(),
        };
        writer.add(name.clone(), t)?;
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
