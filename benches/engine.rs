//! `cargo bench`: the engine's throughput on this machine, next to PyTorch's when PyTorch is
//! installed (`benches/pytorch_reference.py` implements the same models and steps).
//!
//! Workloads, on real Fashion-MNIST images (the bundled subset), batch 128 unless said:
//! inference (as an evaluation runs it, through one snapshot of the weights); a standard training step; a PGD-10 adversarial training step (PGD-AT); an AW-Net
//! distillation step with two teachers; one PGD-20 attack on one image (latency); PGD-20 on
//! 1,000 images; AW-Net's time over the static model's (inference, and forward + backward in
//! training mode); peak memory. Each number is the median of several timed runs after a warm-up.
//! Set AWNET_BENCH_PYTHON to the Python that has PyTorch (default `python3`),
//! AWNET_BENCH_ONLY=key,key to run some workloads only, and AWNET_BENCH_ROUNDS=n to alternate n
//! rounds of both engines (medians over the rounds, each ratio taken within its round).

use std::process::Command;
use std::time::Instant;

use awnet_lab::attack::{self, AttackConfig, AttackKind};
use awnet_lab::data::{self, Split};
use awnet_lab::model::{Arch, BatchType, Mode, Model, ModelConfig, ModelKind, conv};
use awnet_lab::observe::Outcome;
use awnet_lab::train::{self, Method, Optimizer, Run, RunState, TrainConfig};
use candle_core::{DType, Device};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median seconds of `runs` timed calls after `warmup` untimed ones.
fn time(warmup: usize, runs: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        f();
    }
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn model(kind: ModelKind, seed: u64) -> Model {
    let mut c = ModelConfig::new(Arch::SmallCnn, kind, 1, 28, 10);
    c.width = 32;
    Model::new(c, seed, DType::F32, &Device::Cpu).expect("the small CNN builds")
}

/// The median over `runs` pairs of `f(1)`'s time over `f(0)`'s, each pair called in turn after
/// one untimed call of each: a ratio within each pair, so that the host's drift (up to 2x over
/// minutes on the development machines) cancels.
fn alternate(runs: usize, f: impl Fn(usize)) -> f64 {
    f(0);
    f(1);
    let ratios = (0..runs)
        .map(|_| {
            let [a, b] = [0, 1].map(|k| {
                let start = Instant::now();
                f(k);
                start.elapsed().as_secs_f64()
            });
            b / a
        })
        .collect();
    median(ratios)
}

/// A row label made at run time, for the program's lifetime (a handful per run).
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

struct Row {
    key: &'static str,
    what: &'static str,
    unit: &'static str,
    value: f64,
}

fn main() {
    awnet_lab::tune_runtime();
    let assets = awnet_lab::data::resolve::assets_dir().join(awnet_lab::data::resolve::BUNDLED_SUBSET);
    let ds = data::load(assets.to_str().expect("utf-8 path"), Split::Test, None).expect("the bundled subset loads");
    let dev = Device::Cpu;
    let batch: Vec<usize> = (0..128).collect();
    let xs = ds.images_tensor(&batch, &dev).unwrap();
    let ys: Vec<u32> = batch.iter().map(|&i| u32::from(ds.labels[i])).collect();
    let stat = model(ModelKind::Static, 0);
    let aw = model(ModelKind::Awnet, 0);
    // One round: every wanted workload once (each the median of its timed runs).
    let measure = || {
        let mut rows = Vec::new();
        // AWNET_BENCH_ONLY=key,key runs only those workloads (keys as in the PyTorch reference).
        let only = std::env::var("AWNET_BENCH_ONLY").ok();
        let want = |key: &str| only.as_deref().is_none_or(|o| o.split(',').any(|k| k == key));

        for (key, what, m) in [
            ("infer_static", "inference, static small CNN", &stat),
            ("infer_awnet", "inference, AW-Net small CNN", &aw),
        ] {
            if !want(key) {
                continue;
            }
            // As an evaluation predicts: through one snapshot of the weights for all its batches.
            let frozen = m.frozen().unwrap();
            let net = attack::Snapshot::new(&frozen).unwrap();
            let s = time(2, 7, || {
                attack::predict(&net, &xs).unwrap();
            });
            rows.push(Row {
                key,
                what,
                unit: "img/s",
                value: 128.0 / s,
            });
        }

        // AW-Net's own cost (router, signals, MixBN): its time over the static model's, one call
        // of each in turn so that the host's drift cancels; inference as above, and a training-mode
        // forward and backward pass (clean batch, cross-entropy) through candle's graph. The
        // PyTorch reference measures the same two ratios for its own models.
        if want("awnet_overhead") {
            let frozen = [stat.frozen().unwrap(), aw.frozen().unwrap()];
            let nets = frozen.each_ref().map(|f| attack::Snapshot::new(f).unwrap());
            let infer = alternate(15, |k| {
                attack::predict(&nets[k], &xs).unwrap();
            });
            let labels = candle_core::Tensor::new(ys.as_slice(), &dev).unwrap();
            let models = [&stat, &aw];
            let train = alternate(15, |k| {
                awnet_lab::on_pool(|| {
                    let f = models[k].forward(&xs, Mode::Train(BatchType::Clean)).unwrap();
                    let loss = candle_nn::loss::cross_entropy(&f.logits, &labels).unwrap();
                    loss.backward().unwrap();
                })
            });
            for (key, what, value) in [
                ("awnet_overhead_infer", "AW-Net / static time: inference", infer),
                ("awnet_overhead_train", "  forward + backward, training mode", train),
            ] {
                rows.push(Row {
                    key,
                    what,
                    unit: "x",
                    value,
                });
            }
        }

        let held = &ds;
        let teacher_a = model(ModelKind::Static, 1).frozen().unwrap();
        let teacher_b = model(ModelKind::Static, 2).frozen().unwrap();
        for (key, what, method, runs) in [
            (
                "train_standard",
                "training step, standard (static)",
                Method::Standard,
                7,
            ),
            (
                "train_pgd_at",
                "PGD-10 adversarial training step (PGD-AT, static)",
                Method::PgdAt,
                3,
            ),
            (
                "train_awnet",
                "AW-Net distillation step, PGD-10, two teachers",
                Method::Awnet,
                3,
            ),
        ] {
            if !want(key) {
                continue;
            }
            let m = model(method.model_kind(), 3);
            let mut cfg = TrainConfig::new(method, "bench", 1, 0.1);
            cfg.teacher_clean = Some("a".into());
            cfg.teacher_robust = Some("b".into());
            let run = Run {
                config: cfg,
                train: held,
                monitor: held,
                teachers: Some((&teacher_a, &teacher_b)),
                out: "unused".into(),
            };
            let mut state = RunState {
                w_adv: 0.5,
                ..RunState::default()
            };
            let mut opt = Optimizer::new(&m, run.config.optimizer, 0.9, 5e-4);
            let s = time(1, runs, || {
                train::step(&m, &run, &mut state, &mut opt, &xs, &ys, 0.05, 0).unwrap();
            });
            rows.push(Row {
                key,
                what,
                unit: "img/s",
                value: 128.0 / s,
            });
        }

        // Convolutions alone, batch 128: the small CNN's 32 -> 64 channel 3x3 layer on 14x14 maps
        // (0.925 GFLOP forward; the input gradient and the weight gradient cost the same again
        // each), its 32 -> 32 layer on 28x28, and the router's stride-2 16 -> 32 layer; beside
        // them, a large matrix product, the ceiling they are measured against.
        if want("conv_gflops") {
            for (key, what, c_in, c_out, size, stride) in [
                ("conv", "conv 32->64 3x3 on 14x14, batch 128", 32, 64, 14, 1),
                ("conv28", "conv 32->32 3x3 on 28x28, batch 128", 32, 32, 28, 1),
                ("conv_router", "router conv 16->32 3x3 stride 2, 28x28", 16, 32, 28, 2),
            ] {
                let x = candle_core::Tensor::randn(0f32, 1.0, (128, c_in, size, size), &dev).unwrap();
                let w = candle_core::Tensor::randn(0f32, 0.1, (c_out, c_in, 3, 3), &dev).unwrap();
                let out = (size - 1) / stride + 1;
                let flop = 2.0 * (128 * c_out * out * out * c_in * 9) as f64;
                let fwd = time(2, 9, || {
                    conv::conv2d(&x, &w, stride, 1).unwrap();
                });
                let xv = candle_core::Var::from_tensor(&x).unwrap();
                let wv = candle_core::Var::from_tensor(&w).unwrap();
                let both = time(2, 9, || {
                    let y = conv::conv2d(xv.as_tensor(), wv.as_tensor(), stride, 1).unwrap();
                    y.sum_all().unwrap().backward().unwrap();
                });
                rows.push(Row {
                    key: leak(format!("{key}_fwd_gflops")),
                    what: leak(format!("{what}: forward")),
                    unit: "GFLOP/s",
                    value: flop / fwd / 1e9,
                });
                rows.push(Row {
                    key: leak(format!("{key}_fwd_bwd_gflops")),
                    what: "  the same, forward + both gradients",
                    unit: "GFLOP/s",
                    value: 3.0 * flop / both / 1e9,
                });
            }
            let a = candle_core::Tensor::randn(0f32, 1.0, (2048, 2048), &dev).unwrap();
            let s = time(1, 7, || {
                a.matmul(&a).unwrap();
            });
            rows.push(Row {
                key: "gemm_gflops",
                what: "matrix product 2048 x 2048 x 2048 (the ceiling)",
                unit: "GFLOP/s",
                value: 2.0 * 2048f64.powi(3) / s / 1e9,
            });
        }

        // ResNet-18 (the paper's CIFAR backbone, width 64) on 3x32x32 inputs: the same images padded
        // by 2 pixels and repeated over three channels; batch 32.
        let xr = xs
            .narrow(0, 0, 32)
            .and_then(|x| x.pad_with_zeros(2, 2, 2))
            .and_then(|x| x.pad_with_zeros(3, 2, 2))
            .and_then(|x| x.repeat((1, 3, 1, 1)))
            .unwrap();
        let resnet = || {
            let c = ModelConfig::new(Arch::Resnet18, ModelKind::Static, 3, 32, 10);
            Model::new(c, 4, DType::F32, &Device::Cpu).expect("ResNet-18 builds")
        };
        if want("resnet18_infer") {
            let frozen = resnet().frozen().unwrap();
            let net = attack::Snapshot::new(&frozen).unwrap();
            let s = time(1, 5, || {
                attack::predict(&net, &xr).unwrap();
            });
            rows.push(Row {
                key: "resnet18_infer",
                what: "inference, ResNet-18 (3x32x32, batch 32)",
                unit: "img/s",
                value: 32.0 / s,
            });
        }
        for (key, what, method, runs) in [
            (
                "resnet18_train_standard",
                "training step, ResNet-18 (batch 32)",
                Method::Standard,
                3,
            ),
            (
                "resnet18_train_pgd_at",
                "PGD-10 adversarial training step, ResNet-18 (batch 32)",
                Method::PgdAt,
                2,
            ),
        ] {
            if !want(key) {
                continue;
            }
            let m = resnet();
            let run = Run {
                config: TrainConfig::new(method, "bench", 1, 8.0 / 255.0),
                train: held,
                monitor: held,
                teachers: None,
                out: "unused".into(),
            };
            let mut state = RunState::default();
            let mut opt = Optimizer::new(&m, run.config.optimizer, 0.9, 5e-4);
            let s = time(1, runs, || {
                train::step(&m, &run, &mut state, &mut opt, &xr, &ys[..32], 0.05, 0).unwrap();
            });
            rows.push(Row {
                key,
                what,
                unit: "img/s",
                value: 32.0 / s,
            });
        }

        let net = aw.frozen().unwrap();
        let one = xs.narrow(0, 0, 1).unwrap();
        let mut pgd20 = AttackConfig::new(AttackKind::Pgd, 0.1);
        pgd20.steps = Some(20);
        if want("pgd20_one_image_ms") {
            let s = time(2, 11, || {
                let _ = attack::run(&net, &one, &ys[..1], &pgd20, &|| false).unwrap();
            });
            rows.push(Row {
                key: "pgd20_one_image_ms",
                what: "PGD-20 on one image, AW-Net (latency)",
                unit: "ms",
                value: 1000.0 * s,
            });
        }

        if want("pgd20_eval_1000_s") {
            let all: Vec<usize> = (0..1000).collect();
            let labels: Vec<u32> = all.iter().map(|&i| u32::from(ds.labels[i])).collect();
            let s = time(0, 1, || {
                // As `eval::evaluate` runs: one snapshot for all batches.
                let net = attack::Snapshot::new(&net).unwrap();
                for chunk in all.chunks(128) {
                    let x = ds.images_tensor(chunk, &dev).unwrap();
                    let y = &labels[chunk[0]..chunk[0] + chunk.len()];
                    let Outcome::Done(r) = attack::run(&net, &x, y, &pgd20, &|| false).unwrap() else {
                        unreachable!()
                    };
                    attack::predict(&net, &r.adv).unwrap();
                }
            });
            rows.push(Row {
                key: "pgd20_eval_1000_s",
                what: "PGD-20 on 1,000 images, AW-Net (all attacked)",
                unit: "s",
                value: s,
            });
        }
        rows.push(Row {
            key: "peak_rss_mib",
            what: "peak memory (resident)",
            unit: "MiB",
            value: peak_rss_mib(),
        });
        rows
    };

    // AWNET_BENCH_ROUNDS=n alternates n rounds of this engine and of PyTorch: the host's speed
    // drifts over minutes, so each ratio is taken within a round, and the table shows medians
    // over the rounds with the range of the ratios.
    let n_rounds: usize = std::env::var("AWNET_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let rounds: Vec<(Vec<Row>, Option<serde_json::Value>)> =
        (0..n_rounds).map(|_| (measure(), pytorch_reference())).collect();
    let reference = rounds.iter().find_map(|(_, r)| r.clone());
    let threads = candle_core::utils::get_num_threads();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "awnet-lab {} bench: candle {threads} threads, glibc malloc with raised mmap/trim thresholds, load {}",
        env!("CARGO_PKG_VERSION"),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    match &reference {
        Some(r) => println!(
            "PyTorch {} with {} threads",
            r["torch_version"].as_str().unwrap_or("?"),
            r["threads"]
        ),
        None => println!("PyTorch reference: not run (no PyTorch in AWNET_BENCH_PYTHON or python3)"),
    }
    if n_rounds > 1 {
        println!("{n_rounds} rounds; medians over them, the ratio's range in brackets");
    }
    println!("{:<52} {:>12} {:>12} {:>8}", "workload", "candle", "PyTorch", "ratio");
    for (i, r) in rounds[0].0.iter().enumerate() {
        let ours = median(rounds.iter().map(|(rows, _)| rows[i].value).collect());
        let theirs: Vec<f64> = rounds.iter().filter_map(|(_, p)| p.as_ref()?[r.key].as_f64()).collect();
        let ratios: Vec<f64> = rounds
            .iter()
            .filter_map(|(rows, p)| {
                let (o, t) = (rows[i].value, p.as_ref()?[r.key].as_f64()?);
                Some(if matches!(r.unit, "img/s" | "GFLOP/s") {
                    o / t
                } else {
                    t / o
                })
            })
            .collect();
        let theirs = (!theirs.is_empty()).then(|| median(theirs));
        let ratio = match ratios.len() {
            0 => "-".to_string(),
            1 => format!("{:.2}x", ratios[0]),
            _ => {
                let (lo, hi) = ratios
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)));
                format!("{:.2}x [{lo:.2}-{hi:.2}]", median(ratios.clone()))
            }
        };
        let ours = if r.unit == "x" {
            format!("{ours:.2}")
        } else {
            format!("{ours:.1}")
        };
        println!(
            "{:<52} {:>8} {:<3} {:>8} {:<3} {:>8}",
            r.what,
            ours,
            r.unit,
            theirs.map_or("-".into(), |t| if r.unit == "x" {
                format!("{t:.2}")
            } else {
                format!("{t:.1}")
            }),
            if theirs.is_some() { r.unit } else { "" },
            ratio
        );
    }
    println!("(ratio > 1: candle faster; peak memory and the AW-Net / static rows are compared as PyTorch / candle)");
}

fn pytorch_reference() -> Option<serde_json::Value> {
    let python = std::env::var("AWNET_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/pytorch_reference.py");
    let out = Command::new(python).arg(script).arg("--json").output().ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}
