//! Evaluation: per-example worst case, accuracy against eps on a trained model, reports.

use awnet_lab::attack::{self, AttackConfig, AttackKind};
use awnet_lab::data::{self, Split};
use awnet_lab::eval::{self, AttackSpec, Settings, Subject};
use awnet_lab::observe::{Outcome, Silent};
use candle_core::{DType, Device, Tensor, Var};

use crate::common::*;

#[test]
fn worst_case_is_per_example_never_an_average() {
    let clean = [true, true, true, true, false];
    // A breaks examples 0 and 1, B breaks 2 and 3: each alone leaves 50% of the correct ones.
    let a = vec![false, false, true, true, false];
    let b = vec![true, true, false, false, false];
    let worst = eval::worst_case(&clean, &[a, b]);
    assert_eq!(worst, vec![false; 5]);
}

/// Multinomial logistic regression on the bundled Fashion-MNIST subset: a standard-trained model.
fn train_logistic(ds: &data::Dataset) -> Linear {
    let idx: Vec<usize> = (0..ds.len()).collect();
    let xs = ds.images_tensor(&idx, &Device::Cpu).unwrap().flatten_from(1).unwrap();
    let ys: Vec<u32> = ds.labels.iter().map(|&l| u32::from(l)).collect();
    let w = Var::zeros((10, 784), DType::F32, &Device::Cpu).unwrap();
    let b = Var::zeros(10, DType::F32, &Device::Cpu).unwrap();
    let y = Tensor::from_vec(ys, ds.len(), &Device::Cpu).unwrap();
    for _ in 0..60 {
        let logits = xs
            .matmul(&w.as_tensor().t().unwrap())
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
        let g = loss.backward().unwrap();
        w.set(&(w.as_tensor() - (g.get(w.as_tensor()).unwrap() * 0.5).unwrap()).unwrap())
            .unwrap();
        b.set(&(b.as_tensor() - (g.get(b.as_tensor()).unwrap() * 0.5).unwrap()).unwrap())
            .unwrap();
    }
    Linear {
        w: w.as_detached_tensor(),
        b: b.as_detached_tensor(),
    }
}

fn subset() -> data::Dataset {
    data::load(
        repo().join("assets/fashion-mnist-subset").to_str().unwrap(),
        Split::Test,
        None,
    )
    .unwrap()
}

#[test]
fn a_standard_model_falls_to_near_zero_and_accuracy_never_rises_with_eps() {
    let ds = subset();
    let model = train_logistic(&ds);
    let idx: Vec<usize> = (0..300).collect();
    let xs = ds.images_tensor(&idx, &Device::Cpu).unwrap();
    let labels: Vec<u32> = idx.iter().map(|&i| u32::from(ds.labels[i])).collect();
    let acc = |eps: f64| {
        let mut cfg = AttackConfig::new(AttackKind::Pgd, eps);
        cfg.steps = Some(10);
        let Outcome::Done(r) = attack::run(&model, &xs, &labels, &cfg, &|| false).unwrap() else {
            panic!()
        };
        let pred = attack::predict(&model, &r.adv).unwrap();
        pred.iter().zip(&labels).filter(|(p, l)| p == l).count() as f64 / labels.len() as f64
    };
    let clean = attack::predict(&model, &xs)
        .unwrap()
        .iter()
        .zip(&labels)
        .filter(|(p, l)| p == l)
        .count() as f64
        / 300.0;
    let accs: Vec<f64> = [0.0, 0.01, 0.02, 0.05, 0.1, 0.2].iter().map(|&e| acc(e)).collect();
    assert!(clean > 0.6, "the logistic model learned something: {clean}");
    assert_eq!(accs[0], clean, "eps 0 reproduces clean accuracy");
    assert!(
        accs.windows(2).all(|w| w[1] <= w[0]),
        "accuracy rose with eps: {accs:?}"
    );
    assert!(accs[5] < 0.02, "eps 0.2 leaves {accs:?}");
}

#[test]
fn evaluation_reports_everything_with_its_record_and_checks() {
    let ds = subset();
    let model = train_logistic(&ds);
    let subject = Subject {
        model: &model,
        is_awnet: false,
        name: "logistic".into(),
        file: "none".into(),
        sha256: "0".into(),
    };
    let mut pgd = AttackConfig::new(AttackKind::Pgd, 0.05);
    pgd.steps = Some(5);
    let mut fgsm = AttackConfig::new(AttackKind::Fgsm, 0.05);
    fgsm.seed = 1;
    let settings = Settings {
        attacks: vec![AttackSpec::Single(fgsm), AttackSpec::Single(pgd)],
        batch_size: 64,
        seed: 3,
        checks: true,
        check_n: 40,
    };
    let Outcome::Done(r) = eval::evaluate(&subject, None, &ds, Split::Test, 150, &settings, &mut Silent).unwrap()
    else {
        panic!()
    };
    assert_eq!(r.record.n_images, 150);
    assert_eq!(r.record.strength, "quick");
    assert_eq!(r.attacks.len(), 2);
    let worst = r.worst_case_accuracy.unwrap();
    assert!(worst <= r.attacks[0].robust_accuracy.min(r.attacks[1].robust_accuracy));
    assert_eq!(r.w_robust.unwrap(), (r.clean_accuracy + worst) / 2.0);
    assert!(
        r.attacks
            .iter()
            .all(|a| a.robust_accuracy <= r.clean_accuracy && a.router.is_none())
    );
    let names: Vec<&str> = r.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names.len(), 8, "{names:?}");
    for c in &r.checks {
        assert_eq!(c.passed, Some(true), "{}: {}", c.name, c.detail);
    }
    // Deterministic for a fixed seed.
    let Outcome::Done(again) = eval::evaluate(&subject, None, &ds, Split::Test, 150, &settings, &mut Silent).unwrap()
    else {
        panic!()
    };
    for (a, b) in again.attacks.iter().zip(&r.attacks) {
        assert_eq!(a.robust, b.robust, "{}", a.label);
    }
    let details = |r: &eval::Report| r.checks.iter().map(|c| c.detail.clone()).collect::<Vec<_>>();
    assert_eq!(
        details(&again),
        details(&r),
        "the sanity checks (noise, Square) repeat too"
    );
}

#[test]
fn awnet_evaluation_measures_the_router() {
    let ds = subset();
    let model = awnet_lab::Model::new(
        {
            let mut c = awnet_lab::ModelConfig::new(awnet_lab::Arch::SmallCnn, awnet_lab::ModelKind::Awnet, 1, 28, 10);
            c.width = 4;
            c.router.channels = [4, 4, 4];
            c
        },
        1,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    randomise(&model, 5);
    let net = model.frozen().unwrap();
    let subject = Subject {
        model: &net,
        is_awnet: true,
        name: "tiny".into(),
        file: "none".into(),
        sha256: "0".into(),
    };
    let mut pgd = AttackConfig::new(AttackKind::Pgd, 0.1);
    pgd.steps = Some(3);
    let settings = Settings {
        attacks: vec![AttackSpec::Single(pgd)],
        batch_size: 32,
        seed: 0,
        checks: false,
        check_n: 10,
    };
    let Outcome::Done(r) = eval::evaluate(&subject, None, &ds, Split::Test, 60, &settings, &mut Silent).unwrap() else {
        panic!()
    };
    if r.n_clean_correct > 0 {
        let s = r.attacks[0].router.as_ref().unwrap();
        assert_eq!(s.n, r.n_clean_correct);
        assert_eq!(s.p_adv_clean.len(), s.n);
        assert_eq!(s.mean_signal_clean.len(), 3);
        assert_eq!(s.filter_signal_adversarial[2].len(), 8);
        assert!((0.0..=1.0).contains(&s.auc) && s.roc.first() == Some(&(0.0, 0.0)));
    }
    assert!(r.checks.is_empty());

    // The same seed gives the same result to the bit; the clean accuracy does not depend on the
    // batch size either (MixBN mixes per sample). Attack starts are drawn per batch, so robust
    // results are compared at the same batch size.
    let again = |batch_size: usize| {
        let s = Settings {
            batch_size,
            ..settings.clone()
        };
        let Outcome::Done(r) = eval::evaluate(&subject, None, &ds, Split::Test, 60, &s, &mut Silent).unwrap() else {
            panic!()
        };
        r
    };
    let (a, b) = (again(32), again(32));
    assert_eq!(a.clean_accuracy, b.clean_accuracy);
    assert_eq!(a.attacks[0].robust, b.attacks[0].robust);
    assert_eq!(a.attacks[0].router, b.attacks[0].router);
    assert_eq!(again(60).clean_accuracy, a.clean_accuracy);
}

#[test]
fn accuracy_against_eps_starts_at_clean_accuracy_and_never_rises() {
    let ds = subset();
    let model = train_logistic(&ds);
    let subject = Subject {
        model: &model,
        is_awnet: false,
        name: "logistic".into(),
        file: "none".into(),
        sha256: "0".into(),
    };
    let mut pgd = AttackConfig::new(AttackKind::Pgd, 0.0);
    pgd.steps = Some(5);
    let settings = Settings {
        attacks: vec![AttackSpec::Single(pgd)],
        batch_size: 100,
        seed: 0,
        checks: false,
        check_n: 0,
    };
    let eps = [0.0, 0.01, 0.03, 0.1];
    let Outcome::Done(reports) =
        eval::sweep(&subject, None, &ds, Split::Test, 200, &settings, &eps, &mut Silent).unwrap()
    else {
        panic!()
    };
    let acc: Vec<f64> = reports.iter().map(|r| r.worst_case_accuracy.unwrap()).collect();
    assert_eq!(acc[0], reports[0].clean_accuracy);
    assert!(acc.windows(2).all(|w| w[1] <= w[0]), "{acc:?}");
    assert!(acc[3] < acc[0]);
    let labels: Vec<String> = reports.iter().map(|r| r.attacks[0].label.clone()).collect();
    assert!(labels[2].contains("eps 0.0300"), "{labels:?}");
}
