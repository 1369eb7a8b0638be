//! Which implementation each hot op of the model runs, by device, dtype and mode, in one table:
//! paft's own CPU kernels where they exist, candle's ops (its fused kernels, cuBLAS on CUDA)
//! where candle has them, and composed candle ops otherwise (more memory, but on every device
//! and with gradients). A GPU run can therefore never reach a CPU-only kernel, and every
//! fallback is a row of this table rather than an accident; the first use of each choice is
//! logged (`RUST_LOG=paft::model::dispatch=debug`), which `benchmarks/gpu.sh` reads.

use candle_core::{DType, Device};

use super::llama::Mode;

/// The model's ops that have more than one implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// Inference attention `softmax(q·kᵀ + mask)·v`, reading a KV cache in place.
    Attention,
    /// `x·Wᵀ` for a few rows (decode steps, short continuations).
    SmallMatmul,
    /// The attention softmax with a backward pass (training).
    MaskedSoftmax,
    /// `log_softmax(logits)[target]` with a backward pass (training losses).
    TargetLogProbs,
    RmsNorm,
    Rope,
    /// The MLP's `silu(gate)·up`.
    SwiGlu,
}

impl Op {
    pub const ALL: [Op; 7] = [
        Op::Attention,
        Op::SmallMatmul,
        Op::MaskedSoftmax,
        Op::TargetLogProbs,
        Op::RmsNorm,
        Op::Rope,
        Op::SwiGlu,
    ];
}

/// An implementation of an [`Op`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// paft's hand-written CPU kernel (`attention_kernel`, `small_matmul`, `swiglu`,
    /// `rope_kernel`, `rms_norm_kernel`, `ops`).
    PaftCpu,
    /// candle's own op for it (fused kernel or matmul), on the tensor's device.
    Candle,
    /// Composed from candle's differentiable elementwise and reduction ops, on the tensor's
    /// device.
    Composed,
}

/// The kind of device a tensor lives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceKind {
    Cpu,
    Cuda,
    Metal,
}

impl DeviceKind {
    pub const ALL: [DeviceKind; 3] = [DeviceKind::Cpu, DeviceKind::Cuda, DeviceKind::Metal];

    pub fn of(device: &Device) -> Self {
        match device {
            Device::Cpu => Self::Cpu,
            Device::Cuda(_) => Self::Cuda,
            Device::Metal(_) => Self::Metal,
        }
    }
}

/// The implementation `op` runs for tensors of `dtype` on `device` in `mode`. paft's kernels
/// are CPU-only and f32 (the training ops also f64); candle's fused norm and rope have no
/// backward pass (they would drop gradients silently) and no f64 path, so training and f64 take
/// the composed ops.
pub fn kernel(op: Op, device: DeviceKind, dtype: DType, mode: Mode) -> Kernel {
    let cpu = device == DeviceKind::Cpu;
    let chosen = match op {
        Op::Attention if mode == Mode::Inference && cpu && dtype == DType::F32 => Kernel::PaftCpu,
        Op::Attention => Kernel::Composed,
        Op::SmallMatmul if cpu && dtype == DType::F32 => Kernel::PaftCpu,
        Op::SmallMatmul => Kernel::Candle,
        Op::MaskedSoftmax | Op::TargetLogProbs
            if cpu && matches!(dtype, DType::F32 | DType::F64) =>
        {
            Kernel::PaftCpu
        }
        Op::MaskedSoftmax | Op::TargetLogProbs => Kernel::Composed,
        Op::RmsNorm | Op::Rope if mode == Mode::Inference && cpu && dtype == DType::F32 => {
            Kernel::PaftCpu
        }
        Op::RmsNorm | Op::Rope if mode == Mode::Inference && dtype != DType::F64 => Kernel::Candle,
        Op::RmsNorm | Op::Rope => Kernel::Composed,
        // candle's silu has a backward pass, so training keeps it.
        Op::SwiGlu if mode == Mode::Inference && cpu && dtype == DType::F32 => Kernel::PaftCpu,
        Op::SwiGlu => Kernel::Candle,
    };
    log_first_use(op, device, dtype, mode, chosen);
    chosen
}

/// [`kernel`] for a tensor.
pub fn kernel_for(op: Op, x: &candle_core::Tensor, mode: Mode) -> Kernel {
    kernel(op, DeviceKind::of(x.device()), x.dtype(), mode)
}

fn log_first_use(op: Op, device: DeviceKind, dtype: DType, mode: Mode, kernel: Kernel) {
    use std::collections::BTreeSet;
    use std::sync::Mutex;
    type Seen = BTreeSet<(Op, DeviceKind, String, bool)>;
    static SEEN: Mutex<Seen> = Mutex::new(BTreeSet::new());
    let key = (
        op,
        device,
        dtype.as_str().to_string(),
        mode == Mode::Inference,
    );
    if SEEN.lock().map(|mut s| s.insert(key)).unwrap_or(false) {
        tracing::debug!(
            op = ?op,
            device = ?device,
            dtype = dtype.as_str(),
            mode = ?mode,
            kernel = ?kernel,
            "dispatch"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DTYPES: [DType; 4] = [DType::F32, DType::F64, DType::BF16, DType::F16];
    const MODES: [Mode; 2] = [Mode::Inference, Mode::Differentiable];

    /// Every (op, device, dtype, mode): paft's CPU kernels only on the CPU, never an op without
    /// a backward pass in training, and the expected table.
    #[test]
    fn every_combination_has_a_kernel_that_runs_on_its_device() {
        let mut paft_cpu = vec![];
        for op in Op::ALL {
            for device in DeviceKind::ALL {
                for dtype in DTYPES {
                    for mode in MODES {
                        let k = kernel(op, device, dtype, mode);
                        if k == Kernel::PaftCpu {
                            assert_eq!(device, DeviceKind::Cpu, "{op:?} {dtype:?} {mode:?}");
                            paft_cpu.push((op, dtype, mode));
                        }
                        if mode == Mode::Differentiable {
                            // candle's fused attention softmax, norm and rope drop gradients
                            // (its matmul and silu keep them).
                            assert!(
                                k != Kernel::Candle || matches!(op, Op::SmallMatmul | Op::SwiGlu),
                                "{op:?} on {device:?} {dtype:?} has no backward pass in training"
                            );
                        }
                        if dtype == DType::F64 && matches!(op, Op::RmsNorm | Op::Rope) {
                            assert_eq!(k, Kernel::Composed, "candle's fused {op:?} has no f64");
                        }
                    }
                }
            }
        }
        use DType::*;
        use Mode::*;
        let expected = vec![
            (Op::Attention, F32, Inference),
            (Op::SmallMatmul, F32, Inference),
            (Op::SmallMatmul, F32, Differentiable),
            (Op::MaskedSoftmax, F32, Inference),
            (Op::MaskedSoftmax, F32, Differentiable),
            (Op::MaskedSoftmax, F64, Inference),
            (Op::MaskedSoftmax, F64, Differentiable),
            (Op::TargetLogProbs, F32, Inference),
            (Op::TargetLogProbs, F32, Differentiable),
            (Op::TargetLogProbs, F64, Inference),
            (Op::TargetLogProbs, F64, Differentiable),
            (Op::RmsNorm, F32, Inference),
            (Op::Rope, F32, Inference),
            (Op::SwiGlu, F32, Inference),
        ];
        assert_eq!(paft_cpu, expected);
        // GPUs: candle's kernels where candle has them, composed ops elsewhere.
        for dtype in DTYPES {
            let cuda = |op, mode| kernel(op, DeviceKind::Cuda, dtype, mode);
            assert_eq!(cuda(Op::SmallMatmul, Inference), Kernel::Candle);
            assert_eq!(cuda(Op::Attention, Inference), Kernel::Composed);
            assert_eq!(cuda(Op::MaskedSoftmax, Differentiable), Kernel::Composed);
            assert_eq!(cuda(Op::TargetLogProbs, Differentiable), Kernel::Composed);
            let fused_norm = if dtype == F64 {
                Kernel::Composed
            } else {
                Kernel::Candle
            };
            assert_eq!(cuda(Op::RmsNorm, Inference), fused_norm);
            assert_eq!(cuda(Op::Rope, Differentiable), Kernel::Composed);
            assert_eq!(cuda(Op::SwiGlu, Inference), Kernel::Candle);
        }
    }
}
