//! Numerics of the model against independent references.

use std::collections::BTreeMap;

use awnet_lab::model::layers::{BatchNorm, max_pool2x2, scale_channels};
use awnet_lab::model::norm::{Norm, NormCtx};
use awnet_lab::model::{Arch, BatchType, Mode, Model, ModelKind, checkpoint};
use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::common::*;

/// Sum of `ys * weights`: a scalar whose gradient is `weights`, so every output matters.
fn weighted_sum(ys: &Tensor, seed: u64) -> Tensor {
    let w = tensor(ys.dims(), seed, -1.0, 1.0, ys.dtype());
    (ys * w).unwrap().sum_all().unwrap()
}

#[test]
fn weight_varied_conv_equals_per_sample_conv_with_scaled_filters() {
    let x = Var::from_tensor(&tensor(&[3, 2, 7, 7], 1, 0.0, 1.0, DType::F32)).unwrap();
    let w = Var::from_tensor(&tensor(&[4, 2, 3, 3], 2, -0.5, 0.5, DType::F32)).unwrap();
    let s = Var::from_tensor(&tensor(&[3, 4], 3, 0.2, 1.8, DType::F32)).unwrap();
    // Ours: one convolution, then each output channel scaled per sample.
    let fast = scale_channels(&x.as_tensor().conv2d(w.as_tensor(), 1, 1, 1, 1).unwrap(), s.as_tensor()).unwrap();
    // Reference: sample b convolved with its own filters W * s[b].
    let per_sample: Vec<Tensor> = (0..3)
        .map(|b| {
            let wb = w
                .as_tensor()
                .broadcast_mul(&s.as_tensor().get(b).unwrap().reshape((4, 1, 1, 1)).unwrap())
                .unwrap();
            x.as_tensor().narrow(0, b, 1).unwrap().conv2d(&wb, 1, 1, 1, 1).unwrap()
        })
        .collect();
    let slow = Tensor::cat(&per_sample, 0).unwrap();
    assert_close(&to_vec(&fast), &to_vec(&slow), 1e-5, "outputs");
    let g_fast = weighted_sum(&fast, 9).backward().unwrap();
    let g_slow = weighted_sum(&slow, 9).backward().unwrap();
    for (name, v) in [("input", &x), ("filters", &w), ("signals", &s)] {
        let a = to_vec(g_fast.get(v.as_tensor()).unwrap());
        let b = to_vec(g_slow.get(v.as_tensor()).unwrap());
        assert_close(&a, &b, 1e-5, &format!("gradient wrt {name}"));
    }
}

fn random_bn_pair(c: usize) -> (VarMap, Norm) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let norm = Norm::new(c, true, 1e-5, 0.1, vb).unwrap();
    let mut vars: Vec<_> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (i, (name, var)) in vars.iter().enumerate() {
        let (lo, hi) = if name.ends_with("running_var") {
            (0.5, 2.0)
        } else {
            (-1.0, 1.0)
        };
        var.set(&tensor(var.dims(), 40 + i as u64, lo, hi, DType::F64)).unwrap();
    }
    (varmap, norm)
}

#[test]
fn mixbn_at_inference_is_the_probability_weighted_mix() {
    let (_vm, norm) = random_bn_pair(5);
    let Norm::Mix { clean, adv } = &norm else {
        panic!("a pair was asked for")
    };
    let z = tensor(&[4, 5, 3, 3], 7, -2.0, 2.0, DType::F64);
    let p = tensor(&[4, 1], 8, 0.0, 1.0, DType::F64);
    let ours = norm
        .forward(
            &z,
            &NormCtx {
                mode: Mode::Eval,
                p_clean: Some(&p),
            },
        )
        .unwrap();
    let p4 = p.reshape((4, 1, 1, 1)).unwrap();
    let q4 = (1.0 - &p4).unwrap();
    let expected = (clean.forward_eval(&z).unwrap().broadcast_mul(&p4).unwrap()
        + adv.forward_eval(&z).unwrap().broadcast_mul(&q4).unwrap())
    .unwrap();
    assert_close(&to_vec(&ours), &to_vec(&expected), 1e-12, "MixBN");
    // Training selects one BN of the pair by the batch's type.
    let train_adv = norm
        .forward(
            &z,
            &NormCtx {
                mode: Mode::Train(BatchType::Adversarial),
                p_clean: None,
            },
        )
        .unwrap();
    let (_vm2, fresh) = random_bn_pair(5);
    let Norm::Mix { adv: adv2, .. } = &fresh else { panic!() };
    assert_close(
        &to_vec(&train_adv),
        &to_vec(&adv2.forward_train(&z, None, false).unwrap()),
        1e-12,
        "type selection",
    );
}

#[test]
fn batchnorm_train_mode_matches_pytorch_semantics() {
    let varmap = VarMap::new();
    let bn = BatchNorm::new(2, 1e-5, 0.1, VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu)).unwrap();
    let z = tensor(&[3, 2, 2, 2], 5, -1.0, 3.0, DType::F64);
    let y = bn.forward_train(&z, None, false).unwrap();
    // Per channel: zero mean, unit (biased) variance; running stats moved by 0.1 towards the
    // batch mean and unbiased variance.
    let per_c = y.transpose(0, 1).unwrap().reshape((2, 12)).unwrap();
    let mean = to_vec(&per_c.mean(1).unwrap());
    assert_close(&mean, &[0.0, 0.0], 1e-12, "normalised mean");
    let zc = z.transpose(0, 1).unwrap().reshape((2, 12)).unwrap();
    let m = to_vec(&zc.mean(1).unwrap());
    let var_unbiased: Vec<f64> = to_vec(
        &zc.broadcast_sub(&zc.mean_keepdim(1).unwrap())
            .unwrap()
            .sqr()
            .unwrap()
            .sum(1)
            .unwrap(),
    )
    .iter()
    .map(|s| s / 11.0)
    .collect();
    let data = varmap.data().lock().unwrap();
    let rm = to_vec(data["running_mean"].as_tensor());
    let rv = to_vec(data["running_var"].as_tensor());
    assert_close(&rm, &[0.1 * m[0], 0.1 * m[1]], 1e-12, "running mean");
    assert_close(
        &rv,
        &[0.9 + 0.1 * var_unbiased[0], 0.9 + 0.1 * var_unbiased[1]],
        1e-12,
        "running var",
    );
}

#[test]
fn a_sample_gives_the_same_outputs_whatever_batch_it_is_in() {
    for arch in [Arch::SmallCnn, Arch::Resnet18] {
        let model = Model::new(tiny_config(arch, ModelKind::Awnet), 3, DType::F32, &Device::Cpu).unwrap();
        randomise(&model, 4);
        let xs = tensor(&[5, 2, 8, 8], 11, 0.0, 1.0, DType::F32);
        let all = model.forward(&xs, Mode::Eval).unwrap();
        for b in [0, 3] {
            let one = model.forward(&xs.narrow(0, b, 1).unwrap(), Mode::Eval).unwrap();
            let row = |t: &Tensor| to_vec(&t.narrow(0, b, 1).unwrap());
            assert_close(&row(&all.logits), &to_vec(&one.logits), 1e-5, "logits");
            assert_close(
                &row(all.type_logits.as_ref().unwrap()),
                &to_vec(one.type_logits.as_ref().unwrap()),
                1e-5,
                "type logits",
            );
            for (s_all, s_one) in all.signals.iter().zip(&one.signals) {
                assert_close(&row(s_all), &to_vec(s_one), 1e-5, "signals");
            }
        }
        // The taps are really per sample: the router does not give every image the same output.
        let tl = to_vec(all.type_logits.as_ref().unwrap());
        assert!((tl[0] - tl[2]).abs() > 1e-6, "type logits identical across images");
    }
}

#[test]
fn fresh_awnet_gives_exactly_the_static_backbones_logits() {
    for arch in [Arch::SmallCnn, Arch::Resnet18] {
        let awnet = Model::new(tiny_config(arch, ModelKind::Awnet), 5, DType::F32, &Device::Cpu).unwrap();
        let stat = Model::new(tiny_config(arch, ModelKind::Static), 99, DType::F32, &Device::Cpu).unwrap();
        randomise(&stat, 6);
        // Same backbone weights: every static BN is copied into both BNs of its MixBN pair.
        let static_vars: BTreeMap<String, Var> = stat.named_vars().into_iter().collect();
        for (name, var) in awnet.named_vars() {
            if name.starts_with("router.") {
                // The router keeps its own random features and type head; signal heads stay 0.
                if !name.contains("signal_heads") {
                    var.set(&tensor(var.dims(), 77, -0.5, 0.5, DType::F32)).unwrap();
                }
                continue;
            }
            let plain = name.replace(".clean.", ".").replace(".adv.", ".");
            var.set(static_vars[&plain].as_tensor()).unwrap();
        }
        let xs = tensor(&[4, 2, 8, 8], 12, 0.0, 1.0, DType::F32);
        let a = awnet.forward(&xs, Mode::Eval).unwrap();
        let s = stat.forward(&xs, Mode::Eval).unwrap();
        assert_eq!(
            a.logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            s.logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{arch:?}"
        );
        assert!(
            a.signals.iter().all(|s| to_vec(s).iter().all(|&v| v == 1.0)),
            "fresh signals are exactly 1"
        );
        assert!(s.type_logits.is_none() && s.signals.is_empty());
    }
}

/// Checks the input gradient of `f` against central differences at a sample of coordinates.
fn check_input_gradient(f: &dyn Fn(&Tensor) -> Tensor, shape: &[usize], seed: u64, what: &str) {
    let x0 = tensor(shape, seed, 0.05, 0.95, DType::F64);
    let x = Var::from_tensor(&x0).unwrap();
    let grads = f(x.as_tensor()).backward().unwrap();
    let analytic = to_vec(grads.get(x.as_tensor()).expect("input gradient"));
    assert!(analytic.iter().any(|g| g.abs() > 1e-8), "{what}: zero input gradient");
    let base = to_vec(&x0);
    let n = base.len();
    let h = 1e-6;
    for k in 0..24 {
        let i = (k * 7919 + seed as usize * 31) % n;
        let at = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            let t = Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
            f(&t).to_scalar::<f64>().unwrap()
        };
        let numeric = (at(h) - at(-h)) / (2.0 * h);
        let tol = 1e-6 * (1.0 + numeric.abs().max(analytic[i].abs()));
        assert!(
            (numeric - analytic[i]).abs() <= tol,
            "{what}: d/dx[{i}] analytic {} vs numeric {numeric}",
            analytic[i]
        );
    }
}

#[test]
fn input_gradients_of_every_model_match_finite_differences() {
    for arch in [Arch::SmallCnn, Arch::Resnet18] {
        for kind in [ModelKind::Static, ModelKind::Awnet] {
            let model = Model::new(tiny_config(arch, kind), 8, DType::F64, &Device::Cpu).unwrap();
            randomise(&model, 9);
            // Logits and (AW-Net) the type head, so the gradient through the router is checked too.
            let f = |x: &Tensor| {
                let out = model.forward(x, Mode::Eval).unwrap();
                let mut loss = weighted_sum(&out.logits, 21);
                if let Some(t) = &out.type_logits {
                    loss = (loss + weighted_sum(t, 22)).unwrap();
                }
                loss
            };
            check_input_gradient(&f, &[2, 2, 8, 8], 10, &format!("{arch:?} {kind:?}"));
        }
    }
}

#[test]
fn pooling_workaround_matches_candle_forward_and_finite_differences() {
    let x = tensor(&[2, 3, 4, 6], 13, -1.0, 1.0, DType::F64);
    let ours = max_pool2x2(&x).unwrap();
    let candle = x.max_pool2d(2).unwrap();
    assert_eq!(to_vec(&ours), to_vec(&candle));
    check_input_gradient(
        &|x| weighted_sum(&max_pool2x2(x).unwrap(), 14),
        &[2, 3, 4, 6],
        15,
        "max pool",
    );
    let grad_of_sum = |x: &Tensor| {
        let v = Var::from_tensor(x).unwrap();
        let g = max_pool2x2(v.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        to_vec(g.get(v.as_tensor()).unwrap())
    };
    // Each window's gradient goes, whole, to its maximum (candle's own op would give 1/4).
    assert_eq!(grad_of_sum(&x).iter().sum::<f64>(), (2 * 3 * 2 * 3) as f64);
    // Ties (ReLU's zeros, say): the first maximum in row-major order takes it.
    let x = Tensor::from_vec(vec![0f32, 0., 1., 3., 0., 0., 3., 2.], (1, 1, 2, 4), &Device::Cpu).unwrap();
    assert_eq!(grad_of_sum(&x), [1., 0., 0., 1., 0., 0., 0., 0.]);
}

#[test]
fn signals_start_at_one_and_stay_in_range() {
    let model = Model::new(
        tiny_config(Arch::SmallCnn, ModelKind::Awnet),
        1,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let xs = tensor(&[3, 2, 8, 8], 16, 0.0, 1.0, DType::F32);
    let out = model.forward(&xs, Mode::Eval).unwrap();
    assert_eq!(out.signals.len(), 3);
    assert!(out.signals.iter().all(|s| to_vec(s).iter().all(|&v| v == 1.0)));
    randomise(&model, 2);
    let out = model.forward(&xs, Mode::Eval).unwrap();
    let all: Vec<f64> = out.signals.iter().flat_map(to_vec).collect();
    assert!(all.iter().all(|&v| v > 0.0 && v < 2.0) && all.iter().any(|&v| (v - 1.0).abs() > 0.01));
    let p = to_vec(&out.type_probs().unwrap().unwrap().sum(D::Minus1).unwrap());
    assert_close(&p, &[1.0; 3], 1e-6, "type probabilities sum to 1");
}

/// A model copied to a device has the same weights and outputs, in storage of its own; device
/// names other than cpu, cuda and cuda:N are refused, and this build says when it has no CUDA.
/// Every variable's values, in name order.
fn flat(m: &Model) -> Vec<f64> {
    m.named_vars().iter().flat_map(|(_, v)| to_vec(v.as_tensor())).collect()
}

#[test]
fn a_model_moves_between_devices_by_copy() {
    let c = tiny_config(Arch::SmallCnn, ModelKind::Awnet);
    let a = Model::new(c, 4, DType::F32, &Device::Cpu).unwrap();
    randomise(&a, 3);
    let b = a.to_device(&Device::Cpu).unwrap();
    assert_eq!(flat(&a), flat(&b));
    let xs = tensor(&[3, 2, 8, 8], 2, 0.0, 1.0, DType::F32);
    let logits = |m: &Model| to_vec(&m.forward(&xs, Mode::Eval).unwrap().logits);
    assert_eq!(logits(&a), logits(&b));
    let (name, var) = &b.named_vars()[0];
    var.set(&var.as_tensor().zeros_like().unwrap()).unwrap();
    assert_ne!(flat(&a), flat(&b), "{name} is shared");

    assert!(awnet_lab::model::device_named("cpu").unwrap().is_cpu());
    for bad in ["gpu", "cuda:", "cuda:x", "cuda0", ""] {
        let e = awnet_lab::model::device_named(bad).unwrap_err();
        assert!(e.contains("expected cpu, cuda or cuda:N"), "{bad}: {e}");
    }
    if !candle_core::utils::cuda_is_available() {
        let e = awnet_lab::model::device_named("cuda").unwrap_err();
        assert!(e.contains("no CUDA support") && e.contains("--features cuda"), "{e}");
    }
}

#[test]
fn same_seed_same_model_other_seed_other_model() {
    let c = tiny_config(Arch::Resnet18, ModelKind::Awnet);
    let a = Model::new(c.clone(), 4, DType::F32, &Device::Cpu).unwrap();
    let b = Model::new(c.clone(), 4, DType::F32, &Device::Cpu).unwrap();
    let d = Model::new(c, 5, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(flat(&a), flat(&b));
    assert_ne!(flat(&a), flat(&d));
}

#[test]
fn checkpoint_round_trips_bit_exactly_with_its_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let mut model = Model::new(
        tiny_config(Arch::Resnet18, ModelKind::Awnet),
        7,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    randomise(&model, 17);
    model.meta.training = Some(serde_json::json!({"method": "awnet", "epochs": 3}));
    model.meta.metrics = Some(serde_json::json!({"clean_accuracy": 0.5}));
    checkpoint::save(&model, &path).unwrap();
    let back = checkpoint::load(&path).unwrap();
    assert_eq!(back.config, model.config);
    assert_eq!(back.meta.training, model.meta.training);
    assert_eq!(back.meta.metrics, model.meta.metrics);
    assert!(back.meta.written_by.starts_with("awnet-lab "));
    let (file, hash) = back.meta.file.clone().unwrap();
    assert_eq!(file, path);
    assert_eq!(hash.len(), 64);
    let names = |m: &Model| m.named_vars().into_iter().map(|(n, _)| n).collect::<Vec<_>>();
    assert_eq!(names(&back), names(&model));
    for ((n, a), (_, b)) in model.named_vars().iter().zip(back.named_vars().iter()) {
        let bits = |v: &Var| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(a), bits(b), "{n}");
    }
    let xs = tensor(&[2, 2, 8, 8], 18, 0.0, 1.0, DType::F32);
    assert_eq!(
        to_vec(&model.forward(&xs, Mode::Eval).unwrap().logits),
        to_vec(&back.forward(&xs, Mode::Eval).unwrap().logits)
    );
}

#[test]
fn a_checkpoint_for_another_architecture_is_refused_by_name() {
    let path = std::path::Path::new("static.safetensors");
    let model = Model::new(
        tiny_config(Arch::SmallCnn, ModelKind::Static),
        1,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    // A static model's tensors offered to an AW-Net of the same backbone.
    let mut c = model.config.clone();
    c.kind = ModelKind::Awnet;
    let other = Model::new(c, 1, DType::F32, &Device::Cpu).unwrap();
    let tensors: BTreeMap<String, Tensor> = model
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let err = checkpoint::assign(&other, tensors, path, &|_| false)
        .unwrap_err()
        .to_string();
    let (missing, unexpected) = err.split_once("unexpected: ").expect("both lists");
    assert!(
        missing.contains("missing: ")
            && missing.contains("router.type_head.0.weight")
            && missing.contains("stem.bn.clean.weight"),
        "{err}"
    );
    assert!(
        unexpected.contains("stem.bn.bias") && !unexpected.contains("conv"),
        "{err}"
    );
}

#[test]
fn non_finite_weights_are_refused() {
    let model = Model::new(
        tiny_config(Arch::SmallCnn, ModelKind::Static),
        1,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let mut tensors: BTreeMap<String, Tensor> = model
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().copy().unwrap()))
        .collect();
    let w = tensors["fc.weight"].clone();
    let mut v = to_vec(&w);
    v[1] = f64::NAN;
    tensors.insert(
        "fc.weight".into(),
        Tensor::from_vec(v, w.dims(), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap(),
    );
    let err = checkpoint::assign(&model, tensors, std::path::Path::new("x"), &|_| false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("NaN or infinite values: fc.weight"), "{err}");
}

/// The hand-written inference path (`model::plain`) against the candle graph and autograd:
/// logits, type logits, signals, and the input gradient of a weighted sum of logits and type
/// logits, for static models and AW-Net with every path randomised (MixBN pairs that differ,
/// signal heads that are not zero), at two sizes and batch sizes 1, 3 and 12 (at 28x28, 12 images
/// make the large maps' elementwise passes run on rayon's pool); the static ResNet-18 likewise
/// (with and without projection shortcuts, three input channels at 16x16).
#[test]
fn plain_path_matches_the_graph_and_autograd() {
    let full = |kind| {
        let mut c = awnet_lab::ModelConfig::new(Arch::SmallCnn, kind, 1, 28, 10);
        c.width = 8;
        c
    };
    let mut resnet = awnet_lab::ModelConfig::new(Arch::Resnet18, ModelKind::Static, 3, 16, 10);
    resnet.width = 4;
    for (i, config) in [
        tiny_config(Arch::SmallCnn, ModelKind::Static),
        tiny_config(Arch::SmallCnn, ModelKind::Awnet),
        full(ModelKind::Static),
        full(ModelKind::Awnet),
        tiny_config(Arch::Resnet18, ModelKind::Static),
        resnet,
    ]
    .into_iter()
    .enumerate()
    {
        let model = Model::new(config.clone(), 1, DType::F32, &Device::Cpu).unwrap();
        randomise(&model, 10 + i as u64);
        let net = model.frozen().unwrap();
        let plain = net
            .plain()
            .unwrap()
            .expect("a small CNN or a static ResNet-18 in f32 has the plain path");
        // The reference: the graph over the same weights in f64, so that the comparison measures
        // this path's rounding alone.
        let exact = Model::new(config.clone(), 1, DType::F64, &Device::Cpu).unwrap();
        for ((_, a), (_, b)) in model.named_vars().into_iter().zip(exact.named_vars()) {
            b.set(&a.as_tensor().to_dtype(DType::F64).unwrap()).unwrap();
        }
        let exact = exact.frozen().unwrap();
        let (c, s, k) = (config.in_channels, config.image_size, config.num_classes);
        for b in [1, 3, 12] {
            let what = format!("{:?} {:?} {s}x{s}, batch {b}", config.arch, config.kind);
            let x32 = tensor(&[b, c, s, s], 20 + i as u64, 0.0, 1.0, DType::F32);
            let x = Var::from_tensor(&x32.to_dtype(DType::F64).unwrap()).unwrap();
            let reference = exact.forward(x.as_tensor(), Mode::Eval).unwrap();
            let dz = tensor(&[b, k], 30, -1.0, 1.0, DType::F32);
            let dt = tensor(&[b, 2], 31, -1.0, 1.0, DType::F32);
            let f64_of = |t: &candle_core::Tensor| t.to_dtype(DType::F64).unwrap();
            let mut objective = (&reference.logits * f64_of(&dz)).unwrap().sum_all().unwrap();
            if let Some(t) = &reference.type_logits {
                objective = (objective + (t * f64_of(&dt)).unwrap().sum_all().unwrap()).unwrap();
            }
            let want = to_vec(objective.backward().unwrap().get(x.as_tensor()).unwrap());
            let pixels: Vec<f32> = x32.flatten_all().unwrap().to_vec1().unwrap();
            let (out, got) = plain
                .input_grad(&pixels, b, |_| {
                    Ok((dz.flatten_all()?.to_vec1()?, Some(dt.flatten_all()?.to_vec1()?)))
                })
                .unwrap();
            let f64s = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
            // ResNet-18's 20 layers of random weights amplify: logits near 900, input gradients up
            // to 1e5 beside ones near 0.3. Its values are held to a bound relative to the largest
            // (measured: 2.5e-7 here, 3.2e-7 for candle's own f32 graph), the small CNN's to one
            // relative to each value.
            let close = |a: &[f64], b: &[f64], tol: f64, what: &str| {
                if config.arch == Arch::Resnet18 {
                    let top = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
                    let scaled = |v: &[f64]| v.iter().map(|x| x / top).collect::<Vec<_>>();
                    assert_close(&scaled(a), &scaled(b), tol / 10.0, what);
                } else {
                    assert_close(a, b, tol, what);
                }
            };
            close(
                &f64s(&out.logits),
                &to_vec(&reference.logits),
                1e-5,
                &format!("{what}: logits"),
            );
            match (&out.type_logits, &reference.type_logits) {
                (Some(a), Some(b)) => assert_close(&f64s(a), &to_vec(b), 1e-5, &format!("{what}: type logits")),
                (None, None) => {}
                _ => panic!("{what}: type logits on one path only"),
            }
            assert_eq!(out.signals.len(), reference.signals.len(), "{what}: signals");
            for (a, b) in out.signals.iter().zip(&reference.signals) {
                assert_close(&f64s(a), &to_vec(b), 1e-5, &format!("{what}: signals"));
            }
            // The forward pass alone (no tape: the router's layers fused where they can be).
            let alone = plain.forward(&pixels, b).unwrap();
            close(
                &f64s(&alone.logits),
                &to_vec(&reference.logits),
                1e-5,
                &format!("{what}: logits, forward alone"),
            );
            if let (Some(a), Some(t)) = (&alone.type_logits, &reference.type_logits) {
                assert_close(
                    &f64s(a),
                    &to_vec(t),
                    1e-5,
                    &format!("{what}: type logits, forward alone"),
                );
            }
            assert_eq!(alone.type_logits.is_some(), reference.type_logits.is_some(), "{what}");
            assert_eq!(
                alone.signals.len(),
                reference.signals.len(),
                "{what}: signals, forward alone"
            );
            for (a, s) in alone.signals.iter().zip(&reference.signals) {
                assert_close(&f64s(a), &to_vec(s), 1e-5, &format!("{what}: signals, forward alone"));
            }
            assert!(
                want.iter().any(|&g| g.abs() > 1e-3),
                "{what}: a gradient worth comparing"
            );
            close(&f64s(&got), &want, 1e-4, &format!("{what}: input gradient"));
        }
    }
    // AW-Net's ResNet-18 (MixBN, signals) keeps to the graph.
    let aw = Model::new(
        tiny_config(Arch::Resnet18, ModelKind::Awnet),
        1,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert!(aw.frozen().unwrap().plain().unwrap().is_none());
}
