//! Times every op of the `cpu` kernel at the shapes of the tiny and small benchmark GPTs
//! (`bench/README.md`) and prints bandwidth or arithmetic throughput.
//!
//! `cargo run --release -p codex-kernels --example kernels_bench [-- tiny|small] [threads]`
//!
//! Bandwidth counts each input read once and each output written once (in-place buffers
//! twice); attention counts the multiply-adds of its causal half, forward 2 products and
//! backward 5, as FLOPs.

use std::time::{Duration, Instant};

use codex_kernels::CpuKernel;
use codex_plugin_api::{BufferMut, BufferView, DType};

/// One benchmark model's shapes.
struct Model {
    name: &'static str,
    vocab: usize,
    d: usize,
    heads: usize,
    seq: usize,
    batch: usize,
    params: usize,
}

const MODELS: [Model; 2] = [
    Model {
        name: "tiny",
        vocab: 4096,
        d: 128,
        heads: 4,
        seq: 128,
        batch: 16,
        params: 1_330_000,
    },
    Model {
        name: "small",
        vocab: 8192,
        d: 384,
        heads: 6,
        seq: 256,
        batch: 8,
        params: 13_900_000,
    },
];

/// An owned f32 or u32 buffer.
struct Buf {
    dtype: DType,
    shape: Vec<usize>,
    words: Vec<u32>,
}

impl Buf {
    fn f32(shape: &[usize], seed: u32, lo: f32, hi: f32) -> Buf {
        let n = shape.iter().product();
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        let words = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (lo + (hi - lo) * (s >> 8) as f32 / (1u32 << 24) as f32).to_bits()
            })
            .collect();
        Buf {
            dtype: DType::F32,
            shape: shape.to_vec(),
            words,
        }
    }
    fn zeros(shape: &[usize]) -> Buf {
        Buf::f32(shape, 0, 0.0, 0.0)
    }
    fn u32s(shape: &[usize], modulo: u32) -> Buf {
        let n = shape.iter().product::<usize>();
        Buf {
            dtype: DType::U32,
            shape: shape.to_vec(),
            words: (0..n as u32)
                .map(|i| i.wrapping_mul(2_654_435_761) % modulo)
                .collect(),
        }
    }
    fn bytes(&self) -> usize {
        self.words.len() * 4
    }
    fn view(&self) -> BufferView<'_> {
        BufferView {
            dtype: self.dtype,
            shape: &self.shape,
            data: bytemuck::cast_slice(&self.words),
        }
    }
    fn view_mut(&mut self) -> BufferMut<'_> {
        BufferMut {
            dtype: self.dtype,
            shape: &self.shape,
            data: bytemuck::cast_slice_mut(&mut self.words),
        }
    }
}

/// What a result is measured in.
enum Work {
    Bytes(usize),
    Flops(f64),
}

/// Run `op` repeatedly for about `budget`, return the fastest call: the machines are shared,
/// and the minimum is the figure least disturbed by other processes.
fn time(
    k: &CpuKernel,
    op: &str,
    ins: &[&Buf],
    attrs: &[f64],
    outs: &mut [Buf],
    budget: Duration,
) -> Result<Duration, String> {
    let views: Vec<BufferView<'_>> = ins.iter().map(|b| b.view()).collect();
    let mut muts: Vec<BufferMut<'_>> = outs.iter_mut().map(|b| b.view_mut()).collect();
    let mut once = || -> Result<Duration, String> {
        let t = Instant::now();
        k.call(op, &views, attrs, &mut muts)
            .map_err(|e| e.to_string())?;
        Ok(t.elapsed())
    };
    once()?;
    let start = Instant::now();
    let mut samples = Vec::new();
    while samples.len() < 5 || (start.elapsed() < budget && samples.len() < 1000) {
        samples.push(once()?);
    }
    Ok(samples.into_iter().min().unwrap_or_default())
}

fn report(model: &str, op: &str, shape: &str, t: Duration, work: Work) {
    let secs = t.as_secs_f64();
    let rate = match work {
        Work::Bytes(b) => format!("{:8.1} GB/s", b as f64 / secs / 1e9),
        Work::Flops(f) => format!("{:8.1} GFLOP/s", f / secs / 1e9),
    };
    println!(
        "{model:<6} {op:<22} {shape:<22} {:>9.3} ms {rate}",
        secs * 1e3
    );
}

fn bench(k: &CpuKernel, m: &Model, budget: Duration) -> Result<(), String> {
    let n = m.batch * m.seq;
    let (d, hd) = (m.d, m.d / m.heads);
    let nm = m.name;
    let all = |ins: &[&Buf], outs: &[Buf]| {
        ins.iter().map(|b| b.bytes()).sum::<usize>() + outs.iter().map(Buf::bytes).sum::<usize>()
    };

    // Layer norm over the residual stream.
    let (x, w, b) = (
        Buf::f32(&[n, d], 1, -2.0, 2.0),
        Buf::f32(&[d], 2, 0.5, 1.5),
        Buf::f32(&[d], 3, -0.1, 0.1),
    );
    let mut outs = vec![Buf::zeros(&[n, d]), Buf::zeros(&[n]), Buf::zeros(&[n])];
    let t = time(
        k,
        "layer_norm.fwd",
        &[&x, &w, &b],
        &[1e-5],
        &mut outs,
        budget,
    )?;
    report(
        nm,
        "layer_norm.fwd",
        &format!("[{n}, {d}]"),
        t,
        Work::Bytes(all(&[&x, &w, &b], &outs)),
    );
    let dy = Buf::f32(&[n, d], 4, -1.0, 1.0);
    let ins = [&dy, &x, &w, &outs[1], &outs[2]];
    let mut grads = vec![Buf::zeros(&[n, d]), Buf::zeros(&[d]), Buf::zeros(&[d])];
    let t = time(k, "layer_norm.bwd", &ins, &[], &mut grads, budget)?;
    report(
        nm,
        "layer_norm.bwd",
        &format!("[{n}, {d}]"),
        t,
        Work::Bytes(all(&ins, &grads)),
    );

    let mut outs = vec![Buf::zeros(&[n, d]), Buf::zeros(&[n])];
    let t = time(k, "rms_norm.fwd", &[&x, &w], &[1e-5], &mut outs, budget)?;
    report(
        nm,
        "rms_norm.fwd",
        &format!("[{n}, {d}]"),
        t,
        Work::Bytes(all(&[&x, &w], &outs)),
    );
    let ins = [&dy, &x, &w, &outs[1]];
    let mut grads = vec![Buf::zeros(&[n, d]), Buf::zeros(&[d])];
    let t = time(k, "rms_norm.bwd", &ins, &[], &mut grads, budget)?;
    report(
        nm,
        "rms_norm.bwd",
        &format!("[{n}, {d}]"),
        t,
        Work::Bytes(all(&ins, &grads)),
    );

    // GELU and the bias gradient of the MLP's hidden layer.
    let h = Buf::f32(&[n, 4 * d], 5, -4.0, 4.0);
    let dh = Buf::f32(&[n, 4 * d], 6, -1.0, 1.0);
    for form in ["gelu_erf", "gelu_tanh"] {
        let mut y = vec![Buf::zeros(&[n, 4 * d])];
        let t = time(k, &format!("{form}.fwd"), &[&h], &[], &mut y, budget)?;
        report(
            nm,
            &format!("{form}.fwd"),
            &format!("[{n}, {}]", 4 * d),
            t,
            Work::Bytes(all(&[&h], &y)),
        );
        let t = time(k, &format!("{form}.bwd"), &[&h, &dh], &[], &mut y, budget)?;
        report(
            nm,
            &format!("{form}.bwd"),
            &format!("[{n}, {}]", 4 * d),
            t,
            Work::Bytes(all(&[&h, &dh], &y)),
        );
    }
    let mut y = vec![Buf::zeros(&[4 * d])];
    let t = time(k, "sum_rows", &[&dh], &[], &mut y, budget)?;
    report(
        nm,
        "sum_rows",
        &format!("[{n}, {}]", 4 * d),
        t,
        Work::Bytes(all(&[&dh], &y)),
    );

    // Softmax over attention-score rows.
    let rows = m.batch * m.heads * m.seq;
    let s = Buf::f32(&[rows, m.seq], 7, -5.0, 5.0);
    let mut p = vec![Buf::zeros(&[rows, m.seq])];
    let t = time(k, "softmax_last_dim.fwd", &[&s], &[], &mut p, budget)?;
    report(
        nm,
        "softmax_last_dim.fwd",
        &format!("[{rows}, {}]", m.seq),
        t,
        Work::Bytes(all(&[&s], &p)),
    );
    let mut ds = vec![Buf::zeros(&[rows, m.seq])];
    let t = time(
        k,
        "softmax_last_dim.bwd",
        &[&p[0], &s],
        &[],
        &mut ds,
        budget,
    )?;
    report(
        nm,
        "softmax_last_dim.bwd",
        &format!("[{rows}, {}]", m.seq),
        t,
        Work::Bytes(all(&[&p[0], &s], &ds)),
    );

    // Causal attention.
    let shape = [m.batch, m.heads, m.seq, hd];
    let (q, kk, v) = (
        Buf::f32(&shape, 8, -1.0, 1.0),
        Buf::f32(&shape, 9, -1.0, 1.0),
        Buf::f32(&shape, 10, -1.0, 1.0),
    );
    let scale = 1.0 / (hd as f64).sqrt();
    let mut outs = vec![Buf::zeros(&shape), Buf::zeros(&shape[..3])];
    let pairs = (m.batch * m.heads) as f64 * (m.seq * (m.seq + 1) / 2) as f64 * hd as f64;
    let t = time(
        k,
        "causal_attention.fwd",
        &[&q, &kk, &v],
        &[scale],
        &mut outs,
        budget,
    )?;
    let shape_s = format!("{shape:?}");
    report(
        nm,
        "causal_attention.fwd",
        &shape_s,
        t,
        Work::Flops(2.0 * 2.0 * pairs),
    );
    let dout = Buf::f32(&shape, 11, -1.0, 1.0);
    let ins = [&q, &kk, &v, &outs[0], &outs[1], &dout];
    let mut grads = vec![Buf::zeros(&shape), Buf::zeros(&shape), Buf::zeros(&shape)];
    let t = time(
        k,
        "causal_attention.bwd",
        &ins,
        &[scale],
        &mut grads,
        budget,
    )?;
    report(
        nm,
        "causal_attention.bwd",
        &shape_s,
        t,
        Work::Flops(5.0 * 2.0 * pairs),
    );

    // Cross-entropy over the LM head's logits.
    let logits = Buf::f32(&[n, m.vocab], 12, -4.0, 4.0);
    let targets = Buf::u32s(&[n], m.vocab as u32);
    let mut outs = vec![
        Buf::zeros(&[1]),
        Buf::zeros(&[1]),
        Buf::zeros(&[1]),
        Buf::zeros(&[n]),
    ];
    let t = time(
        k,
        "cross_entropy.fwd",
        &[&logits, &targets],
        &[-100.0],
        &mut outs,
        budget,
    )?;
    report(
        nm,
        "cross_entropy.fwd",
        &format!("[{n}, {}]", m.vocab),
        t,
        Work::Bytes(all(&[&logits, &targets], &outs)),
    );
    let ins = [&logits, &targets, &outs[3]];
    let mut dl = vec![Buf::zeros(&[n, m.vocab])];
    let t = time(
        k,
        "cross_entropy.bwd",
        &ins,
        &[-100.0, 1.0 / n as f64],
        &mut dl,
        budget,
    )?;
    report(
        nm,
        "cross_entropy.bwd",
        &format!("[{n}, {}]", m.vocab),
        t,
        Work::Bytes(all(&ins, &dl)),
    );

    // AdamW over every parameter at once.
    let g = Buf::f32(&[m.params], 13, -0.01, 0.01);
    let mut state = vec![
        Buf::f32(&[m.params], 14, -0.1, 0.1),
        Buf::zeros(&[m.params]),
        Buf::zeros(&[m.params]),
    ];
    let attrs = [6e-4, 0.9, 0.95, 1e-8, 0.1, 1.0];
    let t = time(k, "adamw.step", &[&g], &attrs, &mut state, budget)?;
    let bytes = g.bytes() + 2 * state.iter().map(Buf::bytes).sum::<usize>();
    report(
        nm,
        "adamw.step",
        &format!("[{}]", m.params),
        t,
        Work::Bytes(bytes),
    );
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = args.first().map(String::as_str).unwrap_or("all");
    let params = match args.get(1) {
        Some(t) => format!("{{\"threads\": {t}}}"),
        None => String::new(),
    };
    let k = match CpuKernel::new(&params) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("kernels_bench: {e}");
            std::process::exit(2);
        }
    };
    println!("{k:?}, rayon threads {}", rayon::current_num_threads());
    for m in MODELS.iter().filter(|m| which == "all" || which == m.name) {
        if let Err(e) = bench(&k, m, Duration::from_millis(400)) {
            eprintln!("kernels_bench: {}: {e}", m.name);
            std::process::exit(1);
        }
    }
}
