//! The training loop: every method learns, stop and resume are exact, NaN keeps the checkpoint.

use std::cell::Cell;

use awnet_lab::data::{self, Augment, Dataset, Split};
use awnet_lab::model::{Arch, Model, ModelConfig, ModelKind, checkpoint};
use awnet_lab::observe::{Observer, Outcome};
use awnet_lab::train::{self, Method, Optimizer, OptimizerKind, Run, Schedule, TrainConfig, TrainEvent, TrainObserver};
use candle_core::{DType, Device, Var};

use crate::common::*;

/// Records step losses; asks to stop after `stop_after` steps.
#[derive(Default)]
struct Recorder {
    losses: Vec<f64>,
    stop_after: Option<usize>,
    steps: Cell<usize>,
    epochs: usize,
}

impl Observer for Recorder {
    fn stop_requested(&self) -> bool {
        self.stop_after.is_some_and(|n| self.steps.get() >= n)
    }
}

impl TrainObserver for Recorder {
    fn event(&mut self, e: &TrainEvent) {
        match e {
            TrainEvent::Step(s) => {
                self.losses.push(s.loss);
                self.steps.set(self.steps.get() + 1);
            }
            TrainEvent::Epoch(_) => self.epochs += 1,
            _ => {}
        }
    }
}

fn data(n: usize) -> (Dataset, Dataset) {
    let ds = data::load(
        repo().join("assets/fashion-mnist-subset").to_str().unwrap(),
        Split::Test,
        None,
    )
    .unwrap();
    let (train, held) = train::split_holdout(&ds, ds.len() - n).unwrap();
    (train, held)
}

fn tiny(kind: ModelKind, seed: u64) -> Model {
    let mut c = ModelConfig::new(Arch::SmallCnn, kind, 1, 28, 10);
    c.width = 4;
    c.router.channels = [4, 4, 4];
    c.router.type_hidden = 8;
    Model::new(c, seed, DType::F32, &Device::Cpu).unwrap()
}

fn config(method: Method, epochs: usize) -> TrainConfig {
    let mut c = TrainConfig::new(method, "subset", epochs, 0.1);
    c.batch_size = 32;
    c.lr = 0.05;
    c.schedule = Schedule::Constant;
    c.attack_steps = 2;
    c.augment = Augment {
        crop_padding: 1,
        hflip: true,
    };
    c.monitor_n = 16;
    c.monitor_steps = 1;
    c.teacher_clean = Some("t1".into());
    c.teacher_robust = Some("t2".into());
    c
}

#[test]
fn every_method_lowers_its_training_loss() {
    let (train_set, held) = data(320);
    let dir = tempfile::tempdir().unwrap();
    let t_clean = tiny(ModelKind::Static, 11);
    let t_robust = tiny(ModelKind::Static, 12);
    let (tc, tr) = (t_clean.frozen().unwrap(), t_robust.frozen().unwrap());
    // (method, router-term weights of the two AW-Net variants: in the training attack, and in
    // extra examples for the type loss)
    for (method, craft_router_lambda, type_adaptive_lambda) in [
        (Method::Standard, 0.0, 0.0),
        (Method::PgdAt, 0.0, 0.0),
        (Method::Trades, 0.0, 0.0),
        (Method::Awnet, 0.0, 0.0),
        (Method::Awnet, 1.0, 0.0),
        (Method::Awnet, 0.0, 1.0),
        (Method::AwnetFree, 0.0, 0.0),
    ] {
        let mut model = tiny(method.model_kind(), 1);
        let mut cfg = config(method, 2);
        cfg.craft_router_lambda = craft_router_lambda;
        cfg.type_adaptive_lambda = type_adaptive_lambda;
        let run = Run {
            config: cfg,
            train: &train_set,
            monitor: &held,
            teachers: Some((&tc, &tr)),
            out: dir.path().join("m.safetensors"),
        };
        let mut rec = Recorder::default();
        let out = train::train(&mut model, &run, None, &mut rec).unwrap();
        let Outcome::Done(log) = out else {
            panic!("{method:?} did not finish")
        };
        assert_eq!(log.len(), 2, "{method:?}");
        // AW-Net's per-epoch check also runs the adaptive attack; static models have no router.
        let awnet = matches!(method, Method::Awnet | Method::AwnetFree);
        for r in &log {
            assert_eq!(r.adaptive_accuracy.is_some(), awnet, "{method:?}");
            if let (Some(adaptive), Some(worst)) = (r.adaptive_accuracy, r.worst_accuracy) {
                assert!(worst <= adaptive.min(r.robust_accuracy), "{method:?}: {r:?}");
            }
        }
        let n = rec.losses.len();
        let first = rec.losses[..4].iter().sum::<f64>() / 4.0;
        let last = rec.losses[n - 4..].iter().sum::<f64>() / 4.0;
        assert!(last < first, "{method:?}: loss {first} -> {last}");
        let saved = checkpoint::load(&run.out).unwrap();
        assert_eq!(saved.meta.log_summary.as_ref().unwrap().as_array().unwrap().len(), 2);
        assert_eq!(
            saved.meta.training.as_ref().unwrap()["method"],
            serde_json::to_value(method).unwrap()
        );
    }
}

fn weights(m: &Model) -> Vec<(String, Vec<u32>)> {
    m.named_vars()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn stop_lands_within_one_step_and_resume_equals_an_uninterrupted_run() {
    let (train_set, held) = data(160);
    let dir = tempfile::tempdir().unwrap();
    for method in [Method::Standard, Method::AwnetFree] {
        let cfg = config(method, 2);
        // Uninterrupted.
        let mut straight = tiny(method.model_kind(), 3);
        let run = Run {
            config: cfg.clone(),
            train: &train_set,
            monitor: &held,
            teachers: None,
            out: dir.path().join("a.safetensors"),
        };
        train::train(&mut straight, &run, None, &mut Recorder::default()).unwrap();
        // Stopped in the first epoch, then in the second, resumed from the file each time.
        let out = dir.path().join(format!("b-{method:?}.safetensors"));
        let run = Run {
            out: out.clone(),
            ..run
        };
        let mut model = tiny(method.model_kind(), 3);
        for stop_at in [2, 4] {
            let mut rec = Recorder {
                stop_after: Some(stop_at),
                ..Recorder::default()
            };
            let state = out
                .is_file()
                .then(|| checkpoint::load_with_state(&out).unwrap())
                .map(|(m, s)| {
                    model = m;
                    s.unwrap()
                });
            let r = train::train(&mut model, &run, state, &mut rec).unwrap();
            assert!(matches!(r, Outcome::Cancelled), "{method:?}");
            assert_eq!(
                rec.steps.get(),
                stop_at,
                "{method:?}: stopped after exactly the steps asked for"
            );
        }
        let (mut resumed, state) = checkpoint::load_with_state(&out).unwrap();
        let r = train::train(&mut resumed, &run, state, &mut Recorder::default()).unwrap();
        assert!(matches!(r, Outcome::Done(ref log) if log.len() == 2));
        assert_eq!(weights(&resumed), weights(&straight), "{method:?}: resumed run differs");
    }
}

#[test]
fn a_nan_loss_stops_with_an_error_and_keeps_the_checkpoint() {
    let (train_set, held) = data(96);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.safetensors");
    let mut model = tiny(ModelKind::Static, 4);
    let run = Run {
        config: config(Method::Standard, 1),
        train: &train_set,
        monitor: &held,
        teachers: None,
        out: out.clone(),
    };
    train::train(&mut model, &run, None, &mut Recorder::default()).unwrap();
    let before = std::fs::read(&out).unwrap();
    let (model, state) = checkpoint::load_with_state(&out).unwrap();
    let mut model = model;
    let fc = model
        .named_vars()
        .into_iter()
        .find(|(n, _)| n == "fc.weight")
        .unwrap()
        .1;
    fc.set(&(fc.as_tensor() * f64::NAN).unwrap()).unwrap();
    let run = Run {
        config: config(Method::Standard, 2),
        ..run
    };
    let err = train::train(&mut model, &run, state, &mut Recorder::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("NaN") && err.contains("last checkpoint is kept"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), before);
}

#[test]
fn sgd_matches_pytorchs_update_and_keeps_no_graph() {
    // torch.optim.SGD(lr, momentum=0.9, weight_decay=0.1) on loss = sum(w * x):
    // buf1 = g + wd w0; w1 = w0 - lr buf1; buf2 = 0.9 buf1 + g + wd w1; w2 = w1 - lr buf2.
    let model = tiny(ModelKind::Static, 5);
    let (name, var) = model.named_vars().into_iter().find(|(n, _)| n == "fc.bias").unwrap();
    let w0 = to_vec(var.as_tensor());
    let x = tensor(var.dims(), 6, -1.0, 1.0, DType::F32);
    let g = to_vec(&x);
    let mut opt = Optimizer::new(&model, OptimizerKind::Sgd, 0.9, 0.1);
    let (lr, wd) = (0.5, 0.1);
    for _ in 0..2 {
        let grads = (var.as_tensor() * &x).unwrap().sum_all().unwrap().backward().unwrap();
        opt.step(&grads, lr).unwrap();
    }
    let mut expected = Vec::new();
    for i in 0..w0.len() {
        let buf1 = g[i] + wd * w0[i];
        let w1 = w0[i] - lr * buf1;
        let buf2 = 0.9 * buf1 + g[i] + wd * w1;
        expected.push(w1 - lr * buf2);
    }
    assert_close(&to_vec(var.as_tensor()), &expected, 1e-6, &name);
    assert!(
        opt.state().values().all(|t| !t.track_op()),
        "a stored buffer keeps a graph alive"
    );
    // Running statistics get no update (they have no gradient).
    let rs: Var = model
        .named_vars()
        .into_iter()
        .find(|(n, _)| n == "block0.bn.running_var")
        .unwrap()
        .1;
    assert!(to_vec(rs.as_tensor()).iter().all(|&v| v == 1.0));
}

/// SGD's step, with and without momentum, on the small CNN's largest weight (several of the
/// in-place step's chunks), in place (f32) and through candle's ops (f64): three steps against
/// the same recurrence in f64.
#[test]
fn sgd_steps_match_the_recurrence() {
    let cases = [(0.9, 0.1), (0.0, 0.1), (0.5, 0.0)];
    for ((momentum, wd), dtype) in cases.into_iter().flat_map(|c| [(c, DType::F32), (c, DType::F64)]) {
        let config = ModelConfig::new(Arch::SmallCnn, ModelKind::Static, 1, 28, 10);
        let model = Model::new(config, 3, dtype, &Device::Cpu).unwrap();
        let (name, var) = model
            .named_vars()
            .into_iter()
            .max_by_key(|(_, v)| v.elem_count())
            .unwrap();
        assert!(var.elem_count() > 1 << 15, "{name}: one chunk only");
        let x = tensor(var.dims(), 7, -1.0, 1.0, dtype);
        let g = to_vec(&x);
        let mut w = to_vec(var.as_tensor());
        let mut opt = Optimizer::new(&model, OptimizerKind::Sgd, momentum, wd);
        let lr = 0.05;
        let mut buf: Option<Vec<f64>> = None;
        for _ in 0..3 {
            let grads = (var.as_tensor() * &x).unwrap().sum_all().unwrap().backward().unwrap();
            opt.step(&grads, lr).unwrap();
            let d: Vec<f64> = g.iter().zip(&w).map(|(g, w)| g + wd * w).collect();
            let d = match (&buf, momentum) {
                (_, 0.0) => d,
                (Some(b), m) => b.iter().zip(&d).map(|(b, d)| m * b + d).collect(),
                (None, _) => d,
            };
            w = w.iter().zip(&d).map(|(w, d)| w - lr * d).collect();
            buf = Some(d);
        }
        assert_close(
            &to_vec(var.as_tensor()),
            &w,
            1e-5,
            &format!("{name} {dtype:?}, momentum {momentum}, wd {wd}"),
        );
    }
}

#[test]
fn a_router_term_in_the_training_attack_needs_an_awnet_method() {
    let (train_set, held) = data(64);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(Method::PgdAt, 1);
    cfg.craft_router_lambda = 1.0;
    let run = Run {
        config: cfg,
        train: &train_set,
        monitor: &held,
        teachers: None,
        out: dir.path().join("m.safetensors"),
    };
    let mut model = tiny(ModelKind::Static, 1);
    let err = train::train(&mut model, &run, None, &mut Recorder::default()).unwrap_err();
    assert!(err.to_string().contains("needs an AW-Net method"), "{err}");
    assert!(!run.out.exists());
}

#[test]
fn the_router_term_changes_what_awnet_trains_on() {
    let (train_set, held) = data(64);
    let dir = tempfile::tempdir().unwrap();
    let trained = |craft_router_lambda: f64, type_adaptive_lambda: f64| {
        let mut cfg = config(Method::AwnetFree, 1);
        cfg.craft_router_lambda = craft_router_lambda;
        cfg.type_adaptive_lambda = type_adaptive_lambda;
        cfg.monitor_n = 0;
        let run = Run {
            config: cfg,
            train: &train_set,
            monitor: &held,
            teachers: None,
            out: dir
                .path()
                .join(format!("m{craft_router_lambda}-{type_adaptive_lambda}.safetensors")),
        };
        let mut model = tiny(ModelKind::Awnet, 1);
        train::train(&mut model, &run, None, &mut Recorder::default()).unwrap();
        weights(&model)
    };
    let (plain, again) = (trained(0.0, 0.0), trained(0.0, 0.0));
    assert_eq!(plain, again, "same seed, same weights");
    assert_ne!(
        plain,
        trained(1.0, 0.0),
        "the router term must change the training attack"
    );
    assert_ne!(
        plain,
        trained(0.0, 1.0),
        "the type loss's adaptive examples must change training"
    );
}
