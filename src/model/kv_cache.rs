//! Per-layer key/value cache with the position and validity of every cached key, so that a
//! prefix can be prefilled once and then extended by a batch of continuations.

use anyhow::{bail, Result};
use candle_core::Tensor;

#[derive(Clone, Debug)]
pub struct KvCache {
    pub(crate) layers: Vec<Option<(Tensor, Tensor)>>,
    /// Per row: the position of each cached key.
    pub(crate) key_positions: Vec<Vec<u32>>,
    /// Per row: whether each cached key is a real token (false for padding).
    pub(crate) key_valid: Vec<Vec<bool>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            key_positions: vec![],
            key_valid: vec![],
        }
    }

    pub fn is_empty(&self) -> bool {
        self.key_positions.first().is_none_or(|r| r.is_empty())
    }

    /// Number of cached key slots (including padding).
    pub fn len(&self) -> usize {
        self.key_positions.first().map_or(0, |r| r.len())
    }

    /// Rows in the cache; 0 before the first forward.
    pub fn batch_size(&self) -> usize {
        self.key_positions.len()
    }

    /// Position the next real token of each row takes.
    pub fn next_positions(&self) -> Vec<u32> {
        self.key_positions
            .iter()
            .zip(&self.key_valid)
            .map(|(p, v)| {
                p.iter()
                    .zip(v)
                    .filter(|(_, &ok)| ok)
                    .map(|(&p, _)| p + 1)
                    .max()
                    .unwrap_or(0)
            })
            .collect()
    }

    /// A cache whose rows are `rows` of this one (a row may repeat: forking a prefix
    /// for `n` continuations is `select_rows(&[0; n])`). Tensors are copied once.
    pub fn select_rows(&self, rows: &[usize]) -> Result<Self> {
        let b = self.batch_size();
        if let Some(&bad) = rows.iter().find(|&&r| r >= b) {
            bail!("cache row {bad} out of range (batch {b})");
        }
        let idx = Tensor::new(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            &candle_core::Device::Cpu,
        )?;
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref()
                    .map(|(k, v)| {
                        let idx = idx.to_device(k.device())?;
                        Ok::<_, anyhow::Error>((k.index_select(&idx, 0)?, v.index_select(&idx, 0)?))
                    })
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            key_positions: rows
                .iter()
                .map(|&r| self.key_positions[r].clone())
                .collect(),
            key_valid: rows.iter().map(|&r| self.key_valid[r].clone()).collect(),
        })
    }

    /// Copies a batch-1 cache into `n` rows.
    pub fn fork(&self, n: usize) -> Result<Self> {
        if self.batch_size() != 1 {
            bail!(
                "fork needs a cache with one row, this one has {}",
                self.batch_size()
            );
        }
        self.select_rows(&vec![0; n])
    }
}
