//! Attacks against independent references, analytic optima and their invariants.

use awnet_lab::attack::{self, AttackConfig, AttackKind, Classifier, Threat};
use awnet_lab::model::{Arch, Model, ModelKind};
use awnet_lab::observe::Outcome;
use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;

use crate::common::*;

fn run(model: &dyn Classifier, xs: &Tensor, labels: &[u32], cfg: &AttackConfig) -> Tensor {
    match attack::run(model, xs, labels, cfg, &|| false).unwrap() {
        Outcome::Done(r) => r.adv,
        Outcome::Cancelled => panic!("nothing cancels"),
    }
}

/// Adversarial images from torchattacks (and a PyTorch CW-inf loop) on the ResNet-18 fixture.
#[test]
fn fgsm_pgd_mifgsm_and_cw_match_the_pytorch_reference() {
    let model = awnet_lab::model::pytorch::import_pth(&fixture("resnet18_w4.pth"), Some(16)).unwrap();
    let net = model.frozen().unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("attacks_resnet18_w4.json")).unwrap()).unwrap();
    let shape: Vec<usize> = serde_json::from_value(v["input_shape"].clone()).unwrap();
    let input: Vec<f32> = serde_json::from_value(v["input"].clone()).unwrap();
    let labels: Vec<u32> = serde_json::from_value(v["labels"].clone()).unwrap();
    let xs = Tensor::from_vec(input, shape.as_slice(), &Device::Cpu).unwrap();
    assert_eq!(
        attack::predict(&net, &xs).unwrap(),
        labels,
        "clean predictions agree with PyTorch"
    );
    for (name, kind, threat) in [
        ("fgsm", AttackKind::Fgsm, Threat::Linf),
        ("pgd", AttackKind::Pgd, Threat::Linf),
        ("pgd_l2", AttackKind::Pgd, Threat::L2),
        ("mi_fgsm", AttackKind::MiFgsm, Threat::Linf),
        ("cw", AttackKind::Cw, Threat::Linf),
    ] {
        let a = &v["attacks"][name];
        let s = &a["settings"];
        let mut cfg = AttackConfig::new(kind, s["eps"].as_f64().unwrap());
        cfg.threat = threat;
        cfg.steps = s["steps"].as_u64().map(|n| n as usize);
        cfg.step_size = s["step_size"].as_f64();
        cfg.random_start = false;
        if let Some(d) = s["decay"].as_f64() {
            cfg.decay = d;
        }
        let ours = to_vec(&run(&net, &xs, &labels, &cfg));
        let theirs: Vec<f64> = serde_json::from_value(a["adv"].clone()).unwrap();
        // Sign steps flip where a gradient is ~0, so a few coordinates may differ by a step.
        let same = ours
            .iter()
            .zip(&theirs)
            .filter(|(a, b)| (*a - *b).abs() <= 1e-5)
            .count();
        assert!(
            same as f64 >= 0.995 * ours.len() as f64,
            "{name}: only {same} of {} coordinates agree",
            ours.len()
        );
        let pred = attack::predict(
            &net,
            &Tensor::from_vec(
                ours.iter().map(|&x| x as f32).collect::<Vec<_>>(),
                shape.as_slice(),
                &Device::Cpu,
            )
            .unwrap(),
        )
        .unwrap();
        let expected: Vec<u32> = serde_json::from_value(a["pred"].clone()).unwrap();
        assert_eq!(pred, expected, "{name}: predictions on the adversarial images");
        assert!(
            expected.iter().zip(&labels).any(|(p, l)| p != l),
            "{name}: the reference fooled the model"
        );
    }
}

#[test]
fn pgd_reaches_the_analytic_worst_case_of_a_linear_model() {
    let d = 12;
    let w = tensor(&[2, d], 3, -1.0, 1.0, DType::F32);
    let model = Linear {
        w: w.clone(),
        b: Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
    };
    let x0 = values(d, 4, 0.0, 1.0);
    let xs = Tensor::from_vec(
        x0.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        (1, 1, 3, 4),
        &Device::Cpu,
    )
    .unwrap();
    let wv = to_vec(&w);
    // The loss of label 0 grows with (w1 - w0) . x: each coordinate goes as far as ball and box allow.
    let dir: Vec<f64> = (0..d).map(|i| wv[d + i] - wv[i]).collect();
    let eps = 0.2;
    let optimum: Vec<f64> = (0..d)
        .map(|i| {
            if dir[i] > 0.0 {
                (x0[i] + eps).min(1.0)
            } else {
                (x0[i] - eps).max(0.0)
            }
        })
        .collect();
    for random_start in [false, true] {
        let mut cfg = AttackConfig::new(AttackKind::Pgd, eps);
        cfg.steps = Some(20);
        cfg.random_start = random_start;
        assert_close(&to_vec(&run(&model, &xs, &[0], &cfg)), &optimum, 1e-6, "L-inf optimum");
    }
    // L2, away from the box: the optimum is x + eps * dir / |dir|.
    let xs = Tensor::full(0.5f32, (1, 1, 3, 4), &Device::Cpu).unwrap();
    let norm = dir.iter().map(|v| v * v).sum::<f64>().sqrt();
    let optimum: Vec<f64> = dir.iter().map(|v| 0.5 + 0.3 * v / norm).collect();
    let mut cfg = AttackConfig::new(AttackKind::Pgd, 0.3);
    cfg.threat = Threat::L2;
    // From a random start the misalignment shrinks by 0.3 / 0.35 per step: 200 steps suffice.
    cfg.steps = Some(200);
    cfg.step_size = Some(0.05);
    assert_close(&to_vec(&run(&model, &xs, &[0], &cfg)), &optimum, 1e-5, "L2 optimum");
}

fn tiny_awnet() -> Model {
    let model = Model::new(
        tiny_config(Arch::SmallCnn, ModelKind::Awnet),
        2,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    randomise(&model, 3);
    model
}

const ALL: [AttackKind; 9] = [
    AttackKind::Fgsm,
    AttackKind::Pgd,
    AttackKind::MiFgsm,
    AttackKind::Cw,
    AttackKind::ApgdCe,
    AttackKind::ApgdDlr,
    AttackKind::Square,
    AttackKind::Noise,
    AttackKind::Adaptive,
];

fn quick(kind: AttackKind, eps: f64, threat: Threat, seed: u64) -> AttackConfig {
    let mut cfg = AttackConfig::new(kind, eps);
    cfg.threat = threat;
    cfg.seed = seed;
    cfg.steps = Some(match kind {
        AttackKind::Square => 12,
        _ => 3,
    });
    cfg.restarts = 2;
    cfg.target_classes = 2;
    cfg
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Every attack's output lies inside the eps-ball and inside [0, 1].
    #[test]
    fn every_attack_stays_in_the_ball_and_the_box(seed in 0u64..1000, eps in 0.0f64..0.6, l2 in any::<bool>()) {
        let model = tiny_awnet();
        let net = model.frozen().unwrap();
        let xs = tensor(&[3, 2, 8, 8], seed, 0.0, 1.0, DType::F32);
        let labels = [0u32, 1, 2];
        let x = to_vec(&xs);
        for kind in ALL {
            let threat = if l2 && kind != AttackKind::Square { Threat::L2 } else { Threat::Linf };
            let adv = to_vec(&run(&net, &xs, &labels, &quick(kind, eps, threat, seed)));
            prop_assert!(adv.iter().all(|&v| (0.0..=1.0).contains(&v)), "{kind:?} left [0, 1]");
            for (k, (img, orig)) in adv.chunks(128).zip(x.chunks(128)).enumerate() {
                let d: Vec<f64> = img.iter().zip(orig).map(|(a, b)| a - b).collect();
                let size = match threat {
                    Threat::Linf => d.iter().fold(0.0f64, |m, v| m.max(v.abs())),
                    Threat::L2 => d.iter().map(|v| v * v).sum::<f64>().sqrt(),
                };
                prop_assert!(size <= eps + 1e-5, "{kind:?} {threat:?} image {k}: {size} > {eps}");
            }
        }
    }
}

#[test]
fn at_eps_zero_every_attack_returns_the_image() {
    let model = tiny_awnet();
    let net = model.frozen().unwrap();
    let xs = tensor(&[3, 2, 8, 8], 5, 0.0, 1.0, DType::F32);
    for kind in ALL {
        assert_eq!(
            to_vec(&run(&net, &xs, &[0, 1, 2], &quick(kind, 0.0, Threat::Linf, 1))),
            to_vec(&xs),
            "{kind:?}"
        );
    }
}

#[test]
fn targeted_pgd_reaches_its_target_and_attacks_are_deterministic() {
    let model = tiny_awnet();
    let net = model.frozen().unwrap();
    let xs = tensor(&[3, 2, 8, 8], 6, 0.0, 1.0, DType::F32);
    let mut cfg = quick(AttackKind::Pgd, 0.5, Threat::Linf, 1);
    cfg.steps = Some(30);
    cfg.target = Some(2);
    let adv = run(&net, &xs, &[0, 1, 0], &cfg);
    assert_eq!(attack::predict(&net, &adv).unwrap(), vec![2, 2, 2]);
    for kind in ALL {
        let cfg = quick(kind, 0.2, Threat::Linf, 9);
        assert_eq!(
            to_vec(&run(&net, &xs, &[0, 1, 2], &cfg)),
            to_vec(&run(&net, &xs, &[0, 1, 2], &cfg)),
            "{kind:?}"
        );
    }
}

#[test]
fn adaptive_attack_lowers_the_routers_adversarial_probability() {
    let model = tiny_awnet();
    let net = model.frozen().unwrap();
    let xs = tensor(&[3, 2, 8, 8], 7, 0.0, 1.0, DType::F32);
    let p_adv = |x: &Tensor| {
        let out = net.forward(x, awnet_lab::Mode::Eval).unwrap();
        to_vec(&out.type_probs().unwrap().unwrap().narrow(1, 1, 1).unwrap())
            .iter()
            .sum::<f64>()
    };
    let mut plain = quick(AttackKind::Pgd, 0.3, Threat::Linf, 1);
    plain.steps = Some(20);
    let mut adaptive = plain.clone();
    adaptive.kind = AttackKind::Adaptive;
    adaptive.lambda = 50.0;
    let labels = [0, 1, 2];
    assert!(p_adv(&run(&net, &xs, &labels, &adaptive)) < p_adv(&run(&net, &xs, &labels, &plain)));
    let stat = Model::new(
        tiny_config(Arch::SmallCnn, ModelKind::Static),
        2,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let err = attack::run(&stat.frozen().unwrap(), &xs, &labels, &adaptive, &|| false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("router"), "{err}");
}

#[test]
fn stopping_is_an_outcome() {
    let model = tiny_awnet();
    let xs = tensor(&[2, 2, 8, 8], 8, 0.0, 1.0, DType::F32);
    let out = attack::run(
        &model.frozen().unwrap(),
        &xs,
        &[0, 1],
        &quick(AttackKind::Pgd, 0.1, Threat::Linf, 0),
        &|| true,
    )
    .unwrap();
    assert!(matches!(out, Outcome::Cancelled));
}

/// The network seen through its forward pass only, so attacks take autograd's gradient.
struct GraphOnly<'a>(&'a awnet_lab::model::Network);

impl Classifier for GraphOnly<'_> {
    fn forward(&self, xs: &Tensor) -> Result<awnet_lab::Forward, awnet_lab::model::ModelError> {
        Classifier::forward(self.0, xs)
    }

    fn device(&self) -> Device {
        self.0.device()
    }
}

/// Every objective (untargeted and targeted) gives the same losses, input gradients and
/// predictions through the hand-written path as through autograd, on a static model and AW-Net.
#[test]
fn every_objective_has_the_same_gradient_on_both_paths() {
    let stat = Model::new(
        tiny_config(Arch::SmallCnn, ModelKind::Static),
        4,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    randomise(&stat, 5);
    for (model, awnet) in [(&stat, false), (&tiny_awnet(), true)] {
        let net = model.frozen().unwrap();
        assert!(net.plain().unwrap().is_some());
        let xs = tensor(&[4, 2, 8, 8], 9, 0.0, 1.0, DType::F32);
        let labels = [0, 1, 2, 1];
        let targets = [2, 2, 0, 0];
        let mut objectives = vec![attack::Objective::Ce, attack::Objective::Cw, attack::Objective::Dlr];
        if awnet {
            objectives.push(attack::Objective::Adaptive { lambda: 0.7 });
        }
        for obj in objectives {
            for target in [None, Some(&targets[..])] {
                let what = format!("{obj:?}, target {target:?}, AW-Net {awnet}");
                let (l1, g1, p1) = attack::loss_and_grad(&net, &xs, &labels, target, obj).unwrap();
                let (l2, g2, p2) = attack::loss_and_grad(&GraphOnly(&net), &xs, &labels, target, obj).unwrap();
                let f64s = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
                assert_close(&f64s(&l1), &f64s(&l2), 1e-5, &format!("{what}: loss"));
                assert_close(&to_vec(&g1), &to_vec(&g2), 1e-4, &format!("{what}: gradient"));
                assert!(
                    to_vec(&g2).iter().any(|g| g.abs() > 1e-4),
                    "{what}: a gradient worth comparing"
                );
                assert_eq!(p1, p2, "{what}: predictions");
            }
        }
    }
}
