//! Process-wide settings for the binaries (CLI and benchmarks), made at the start of `main`
//! before any other thread runs.

/// Everything below, in one call.
pub fn setup() {
    keep_freed_memory();
    elementwise_ops_on_the_calling_thread();
    main_thread_in_the_pool();
}

/// Keeps freed buffers in the process instead of handing them back to the kernel.
///
/// candle allocates every op's output afresh. glibc's malloc serves large buffers with `mmap` and
/// unmaps them on free, and its threshold for that grows only as far as the sizes it has seen, so a
/// forward pass page-faults and zeroes gigabytes again on every call. A fixed 32 MiB threshold
/// (glibc's maximum) and no trimming keep them on the heap for reuse: measured on 2 cores, prefill
/// +10% at batch 1 and +13% at batch 4, an SFT step −9%. (mimalloc, tried first, made
/// the SFT step 46% slower.)
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts malloc's parameters; it is called before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Runs candle's element-wise ops on the thread that calls them, unless the user set
/// `CANDLE_NUM_THREADS`.
///
/// candle 0.11 splits large element-wise ops over its own "barrier pool" (CANDLE_NUM_THREADS − 1
/// threads beside the caller), separate from the rayon pool that runs its matrix products and
/// paft's attention and small-matmul kernels. A forward pass alternates the two many times per
/// layer, and a barrier worker spins for up to 25,000 pauses after each op, so on a machine with
/// as many threads as cores it takes a core from the next matrix product (and the caller spins
/// in turn while the worker waits for a core). Measured on 2 cores, six tasks at 20 documents,
/// one process each: per-document shots 254.2 s → 221.6 s (−13%), shared shots 71.4 s → 65.6 s
/// (−8%); lowering the spin limit to 200 instead recovered only part of it (234.7 s, 67.9 s).
/// Training steps moved within this machine's noise (SFT, LoRA, 4 × 512: 18.8/19.1 s →
/// 19.3/23.9 s; DPO: 35.0/39.7 s → 31.9/41.0 s, alternating). The matrix products keep every
/// rayon thread (RAYON_NUM_THREADS).
pub fn elementwise_ops_on_the_calling_thread() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Read once, when candle first builds the pool, so it has to be set before any tensor op.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Makes the main thread one of rayon's global pool threads (with at least two of them).
///
/// Otherwise every parallel op from the main thread goes to the pool "cold": the main thread
/// queues it, wakes a sleeping worker, blocks on a latch and is woken again when the op ends, and
/// there is one thread more than cores. A forward pass does this hundreds of times. As a pool
/// thread the main thread runs its share of each op itself and wakes only the others.
pub fn main_thread_in_the_pool() {
    // rayon's own default: RAYON_NUM_THREADS, else the CPUs this process may run on.
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1);
    if threads >= 2 {
        // An error means a pool exists already (a test harness, say): keep that one.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .use_current_thread()
            .build_global();
    }
}
