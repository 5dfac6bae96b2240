//! The `codex-ml` binary: the command line of `codex_host`, with the allocator and candle's
//! thread pool tuned first, before any thread exists.

fn main() {
    tune_allocator();
    tune_candle_pool();
    std::process::exit(codex_host::cli::main());
}

/// Let candle's element-wise worker threads sleep soon after their work runs out.
///
/// candle runs element-wise ops on its own pool, whose workers spin up to 25 000 pause
/// instructions (milliseconds) after each op before parking, while matrix products and the
/// kernel run on rayon's pool. With one thread per core in each pool, a spinning candle worker
/// competes with the matmul that follows every element-wise op for a core. On an idle machine
/// the two settings measured the same; with other processes busy on the cores, the default
/// made the `tiny` bench slower in most interleaved runs, by up to 40%. A user's own `CANDLE_BARRIER_POOL_SPIN_LIMIT` wins.
fn tune_candle_pool() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        // Read by candle when its pool starts, on the first element-wise op; no other thread
        // exists yet, so nothing reads the environment concurrently.
        std::env::set_var(VAR, "100");
    }
}

/// Keep freed memory in the process instead of returning it to the kernel.
///
/// Every tensor op allocates its output, and glibc by default serves large blocks with fresh
/// `mmap`s and trims the heap top eagerly, so each op pays the kernel for zeroing new pages
/// (about a third of a training step on these models). Serving blocks up to 32 MiB (glibc's
/// ceiling for this setting) from the heap, never trimming below 1 GiB of free top and
/// growing the heap 512 MiB at a time lets freed blocks be reused; peak resident memory stays
/// what the step needs. Variables the user set (`MALLOC_MMAP_THRESHOLD_` and friends) win.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    let settings = [
        ("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, 32 << 20),
        ("MALLOC_TRIM_THRESHOLD_", libc::M_TRIM_THRESHOLD, 1 << 30),
        ("MALLOC_TOP_PAD_", libc::M_TOP_PAD, 512 << 20),
    ];
    for (env, param, value) in settings {
        if std::env::var_os(env).is_none() {
            // SAFETY: `mallopt` only changes allocator parameters; it runs before any other
            // thread exists, and an out-of-range value is refused by glibc, not undefined.
            unsafe {
                libc::mallopt(param, value);
            }
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}
