//! Every loss: fixture parity (auraloss, DAC, PyTorch, numpy via
//! tools/make_loss_fixtures.py), zero when prediction equals target where it
//! should be, finite-difference gradients, no NaN on silence or clipping,
//! and bad inputs named.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use melvae_layers::testing::{check_gradients, noise, GradCheck};
use melvae_losses::*;

fn fixture(name: &str) -> Tensor {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("{name}.npy"));
    let a = melvae_dsp::read_npy(&p).unwrap_or_else(|e| panic!("{e}"));
    Tensor::from_vec(a.iter().copied().collect(), a.shape(), &Device::Cpu).unwrap()
}

fn values(name: &str) -> Vec<f32> {
    fixture(name).flatten_all().unwrap().to_vec1().unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn close(got: f64, want: f32, what: &str) {
    let want = want as f64;
    assert!(
        (got - want).abs() <= 1e-4 * want.abs().max(1e-3),
        "{what}: {got} vs reference {want}"
    );
}

fn dev() -> Device {
    Device::Cpu
}

#[test]
fn mrstft_matches_auraloss() {
    let (p, t) = (fixture("wave_pred"), fixture("wave_target"));
    let l = MultiResolutionStftLoss::auraloss_default(&dev()).unwrap();
    let terms = l.terms(&p, &t).unwrap();
    let want = values("mrstft_default");
    close(scalar(&terms.total), want[0], "mrstft total");
    close(
        scalar(&terms.spectral_convergence),
        want[1],
        "spectral convergence",
    );
    close(scalar(&terms.log_magnitude), want[2], "log magnitude");
    let lin = MultiResolutionStftLoss::new(
        &[(1024, 120, 600), (2048, 240, 1200), (512, 50, 240)],
        1.0,
        1.0,
        1.0,
        &dev(),
    )
    .unwrap();
    close(
        scalar(&lin.loss(&p, &t).unwrap()),
        values("mrstft_lin")[0],
        "mrstft with linear term",
    );
}

#[test]
fn multi_scale_mel_matches_dac() {
    let (p, t) = (fixture("wave_pred"), fixture("wave_target"));
    let dac = MultiScaleMelLoss::dac(24000, &dev()).unwrap();
    close(
        scalar(&dac.loss(&p, &t).unwrap()),
        values("mel_dac_24k")[0],
        "DAC config mel loss",
    );
    let default = MultiScaleMelLoss::new(
        44100,
        &[(150, 2048), (80, 512)],
        1e-5,
        2.0,
        1.0,
        1.0,
        &dev(),
    )
    .unwrap();
    close(
        scalar(&default.loss(&p, &t).unwrap()),
        values("mel_default_44k")[0],
        "DAC class-default mel loss",
    );
}

#[test]
fn stereo_and_l1_match_references() {
    let (p, t) = (fixture("stereo_pred"), fixture("stereo_target"));
    let st = StereoLoss {
        inner: MultiResolutionStftLoss::auraloss_default(&dev()).unwrap(),
        w_mid: 1.0,
        w_side: 0.5,
        w_left: 0.25,
        w_right: 0.25,
    };
    close(
        scalar(&st.loss(&p, &t).unwrap()),
        values("stereo_loss")[0],
        "stereo loss",
    );
    close(
        scalar(&l1_loss(&fixture("wave_pred"), &fixture("wave_target")).unwrap()),
        values("l1")[0],
        "l1",
    );
}

#[test]
fn kl_modes_match_numpy() {
    let (mu, lv) = (fixture("kl_mean"), fixture("kl_logvar"));
    let want = values("kl_values");
    close(
        scalar(&kl_loss(&mu, &lv, FreeBits::None).unwrap()),
        want[0],
        "kl none",
    );
    close(
        scalar(&kl_loss(&mu, &lv, FreeBits::Threshold { target: 4.0 }).unwrap()),
        want[1],
        "kl threshold",
    );
    close(
        scalar(&kl_loss(&mu, &lv, FreeBits::PerDimMax { target: 0.8 }).unwrap()),
        want[2],
        "kl per-dim max",
    );
    let zero = Tensor::zeros((3, 4), DType::F32, &dev()).unwrap();
    assert_eq!(scalar(&kl_loss(&zero, &zero, FreeBits::None).unwrap()), 0.0);
}

#[test]
fn kl_schedules() {
    let lin = KlSchedule::Linear {
        start: 0.0,
        end: 1e-3,
        warmup_steps: 1000,
    };
    assert_eq!(lin.weight(0), 0.0);
    assert!((lin.weight(500) - 5e-4).abs() < 1e-15);
    assert_eq!(lin.weight(5000), 1e-3);
    assert_eq!(
        KlSchedule::Linear {
            start: 0.3,
            end: 1.0,
            warmup_steps: 0
        }
        .weight(0),
        1.0
    );
    let cyc = KlSchedule::Cyclical {
        start: 0.0,
        end: 1.0,
        cycle_steps: 100,
        ramp_fraction: 0.5,
    };
    assert_eq!(cyc.weight(0), 0.0);
    assert!((cyc.weight(25) - 0.5).abs() < 1e-12);
    assert_eq!(cyc.weight(60), 1.0);
    assert_eq!(cyc.weight(100), 0.0);
    assert!((cyc.weight(125) - 0.5).abs() < 1e-12);
    let e = KlSchedule::Cyclical {
        start: 0.0,
        end: 1.0,
        cycle_steps: 10,
        ramp_fraction: 0.0,
    }
    .validate()
    .unwrap_err();
    assert!(e.to_string().contains("ramp_fraction"), "{e}");
}

#[test]
fn gan_losses_match_numpy() {
    let real = [fixture("gan_real0"), fixture("gan_real1")];
    let fake = [fixture("gan_fake0"), fixture("gan_fake1")];
    let want = values("gan_values");
    close(
        scalar(&discriminator_loss(GanLoss::Hinge, &real, &fake).unwrap()),
        want[0],
        "hinge D",
    );
    close(
        scalar(&generator_loss(GanLoss::Hinge, &fake).unwrap()),
        want[1],
        "hinge G",
    );
    close(
        scalar(&discriminator_loss(GanLoss::LeastSquares, &real, &fake).unwrap()),
        want[2],
        "LS D",
    );
    close(
        scalar(&generator_loss(GanLoss::LeastSquares, &fake).unwrap()),
        want[3],
        "LS G",
    );
    let fr = vec![
        vec![fixture("fm_real0_0"), fixture("fm_real0_1")],
        vec![fixture("fm_real1_0")],
    ];
    let ff = vec![
        vec![fixture("fm_fake0_0"), fixture("fm_fake0_1")],
        vec![fixture("fm_fake1_0")],
    ];
    close(
        scalar(&feature_matching_loss(FeatureMatching::Absolute, &fr, &ff).unwrap()),
        want[4],
        "feature matching abs",
    );
    close(
        scalar(&feature_matching_loss(FeatureMatching::Relative, &fr, &ff).unwrap()),
        want[5],
        "feature matching rel",
    );
    assert_eq!(
        scalar(&feature_matching_loss(FeatureMatching::Relative, &fr, &fr).unwrap()),
        0.0
    );
}

#[test]
fn flow_matching_matches_numpy() {
    let (x0, x1, t) = (fixture("flow_x0"), fixture("flow_x1"), fixture("flow_t"));
    let (xt, u) = flow_matching_target(&x0, &x1, &t, 1e-4).unwrap();
    let d = |a: &Tensor, b: &Tensor| scalar(&(a - b).unwrap().abs().unwrap().max_all().unwrap());
    assert!(d(&xt, &fixture("flow_xt")) < 1e-6 && d(&u, &fixture("flow_u")) < 1e-6);
    let (v, mask) = (fixture("flow_v"), fixture("flow_mask"));
    close(
        scalar(&flow_matching_loss(&v, &u, Some(&mask)).unwrap()),
        values("flow_loss")[0],
        "flow loss",
    );
    assert_eq!(
        scalar(&flow_matching_loss(&u, &u, Some(&mask)).unwrap()),
        0.0
    );
}

#[test]
fn weighted_flow_matching_weighs_each_position() {
    let d = dev();
    // [batch 2, bands 3, frames 2]: squared errors 1, 4, 9 by band.
    let u = Tensor::zeros((2, 3, 2), DType::F32, &d).unwrap();
    let v = Tensor::new(&[1f32, 2.0, 3.0], &d)
        .unwrap()
        .reshape((1, 3, 1))
        .unwrap()
        .broadcast_as((2, 3, 2))
        .unwrap()
        .contiguous()
        .unwrap();
    let w = |x: [f32; 3]| Tensor::new(&x, &d).unwrap().reshape((1, 3, 1)).unwrap();
    let plain = scalar(&flow_matching_loss(&v, &u, None).unwrap());
    close(
        scalar(&weighted_flow_matching_loss(&v, &u, &w([1.0, 1.0, 1.0])).unwrap()),
        plain as f32,
        "unit weights",
    );
    close(plain, 14.0 / 3.0, "plain");
    close(
        scalar(&weighted_flow_matching_loss(&v, &u, &w([3.0, 0.0, 0.0])).unwrap()),
        1.0,
        "first band only",
    );
    // Half precision is reduced in f32 (a bf16 loss could not be added to
    // the f32 KL), as in flow_matching_loss.
    let half = |x: &Tensor| x.to_dtype(DType::BF16).unwrap();
    let l = weighted_flow_matching_loss(&half(&v), &half(&u), &w([3.0, 0.0, 0.0])).unwrap();
    assert_eq!(l.dtype(), DType::F32);
    close(scalar(&l), 1.0, "bf16");
    let e = weighted_flow_matching_loss(&v, &u, &w([1.0, 1.0, 1.0]).reshape((1, 1, 3)).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("flow matching weights"), "{e}");
}

#[test]
fn token_losses_match_torch() {
    let want = values("tok_values");
    let m = fixture("tok_mask");
    close(
        scalar(&masked_mae(&fixture("tok_pred"), &fixture("tok_target"), Some(&m)).unwrap()),
        want[0],
        "masked mae",
    );
    let bce = masked_bce_with_logits(
        &fixture("tok_logits"),
        &fixture("tok_gate"),
        Some(&m),
        Some(5.0),
    )
    .unwrap();
    close(scalar(&bce), want[1], "masked bce");
    let targets = fixture("tok_cls_targets").to_dtype(DType::U32).unwrap();
    close(
        scalar(&cross_entropy(&fixture("tok_cls_logits"), &targets, Some(99), 0.1).unwrap()),
        want[2],
        "cross-entropy",
    );
    assert_eq!(scalar(&masked_mae(&m, &m, None).unwrap()), 0.0);
}

#[test]
fn zero_when_prediction_equals_target() {
    let x = fixture("wave_target");
    let mr = MultiResolutionStftLoss::auraloss_default(&dev()).unwrap();
    assert!(scalar(&mr.loss(&x, &x).unwrap()) < 1e-6);
    assert_eq!(
        scalar(
            &MultiScaleMelLoss::dac(24000, &dev())
                .unwrap()
                .loss(&x, &x)
                .unwrap()
        ),
        0.0
    );
    assert_eq!(scalar(&l1_loss(&x, &x).unwrap()), 0.0);
    let s = fixture("stereo_target");
    let st = StereoLoss {
        inner: L1Loss,
        w_mid: 1.0,
        w_side: 1.0,
        w_left: 1.0,
        w_right: 1.0,
    };
    assert_eq!(scalar(&st.loss(&s, &s).unwrap()), 0.0);
}

/// Loss value and every gradient finite.
fn finite_with_grads(what: &str, pred: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) {
    let v = Var::from_tensor(pred).unwrap();
    let l = f(v.as_tensor()).unwrap();
    assert!(scalar(&l).is_finite(), "{what}: loss {}", scalar(&l));
    let g = l.backward().unwrap();
    if let Some(g) = g.get(&v) {
        let g: Vec<f32> = g
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            g.iter().all(|x| x.is_finite()),
            "{what}: non-finite gradient"
        );
    }
}

#[test]
fn silence_clipping_and_zeros_stay_finite() {
    let zeros = Tensor::zeros((2, 1, 4800), DType::F32, &dev()).unwrap();
    let clipped = (fixture("wave_target") * 50.0)
        .unwrap()
        .clamp(-1f32, 1f32)
        .unwrap();
    let mr =
        MultiResolutionStftLoss::new(&[(1024, 120, 600), (512, 50, 240)], 1.0, 1.0, 1.0, &dev())
            .unwrap();
    let mel = MultiScaleMelLoss::dac(24000, &dev()).unwrap();
    for (name, pred, target) in [
        ("zeros/zeros", &zeros, &zeros),
        ("clipped/zeros", &clipped, &zeros),
        ("zeros/clipped", &zeros, &clipped),
    ] {
        finite_with_grads(&format!("mrstft {name}"), pred, |p| mr.loss(p, target));
        finite_with_grads(&format!("mel {name}"), pred, |p| mel.loss(p, target));
        finite_with_grads(&format!("l1 {name}"), pred, |p| l1_loss(p, target));
    }
    let st = Tensor::zeros((1, 2, 2400), DType::F32, &dev()).unwrap();
    let sl = StereoLoss {
        inner: mr.clone(),
        w_mid: 1.0,
        w_side: 1.0,
        w_left: 1.0,
        w_right: 1.0,
    };
    finite_with_grads("stereo zeros", &st, |p| sl.loss(p, &st));
    let z = Tensor::zeros((2, 3, 4), DType::F32, &dev()).unwrap();
    finite_with_grads("kl per-dim", &z, |m| {
        kl_loss(m, &z, FreeBits::PerDimMax { target: 0.5 })
    });
    finite_with_grads("feature matching relative", &z, |f| {
        feature_matching_loss(
            FeatureMatching::Relative,
            &[vec![z.clone()]],
            &[vec![f.clone()]],
        )
    });
    let none = Tensor::zeros((2, 3), DType::F32, &dev()).unwrap();
    finite_with_grads("flow all masked", &z, |v| {
        flow_matching_loss(v, &z, Some(&none))
    });
    let logits = Tensor::new(&[[80f32, -80.0, 0.0]], &dev()).unwrap();
    let gate = Tensor::new(&[[0f32, 1.0, 1.0]], &dev()).unwrap();
    finite_with_grads("bce extreme logits", &logits, |x| {
        masked_bce_with_logits(x, &gate, None, Some(3.0))
    });
}

fn grad_check(inputs: &[(&str, &Var)], f: impl Fn() -> Result<Tensor>) {
    let vars: Vec<(String, Var)> = inputs
        .iter()
        .map(|(n, v)| (n.to_string(), (*v).clone()))
        .collect();
    check_gradients(&vars, GradCheck::default(), || {
        f().map_err(|e| candle_core::Error::Msg(e.to_string()))
    })
    .unwrap();
}

fn var(shape: &[usize], seed: u64, scale: f64) -> Var {
    Var::from_tensor(&(noise(shape, seed).unwrap() * scale).unwrap()).unwrap()
}

#[test]
fn gradients_match_finite_differences() {
    let d = dev();
    // Targets are 2.5 x the prediction: every log-magnitude ratio is ln 2.5,
    // so no L1 term sits at its kink (|a - b| is not differentiable at 0).
    let pred = var(&[2, 1, 200], 2, 0.5);
    let target = (pred.as_tensor().detach() * 2.5).unwrap();
    let mr = MultiResolutionStftLoss::new(&[(64, 16, 48), (32, 8, 32)], 1.0, 1.0, 0.5, &d).unwrap();
    grad_check(&[("pred", &pred)], || mr.loss(pred.as_tensor(), &target));
    let mel = MultiScaleMelLoss::new(8000, &[(8, 64), (4, 32)], 1e-5, 2.0, 1.0, 0.5, &d).unwrap();
    grad_check(&[("pred", &pred)], || mel.loss(pred.as_tensor(), &target));
    let st_p = var(&[1, 2, 150], 4, 0.5);
    let st_t = (st_p.as_tensor().detach() * 2.5).unwrap();
    let sl = StereoLoss {
        inner: mr.clone(),
        w_mid: 1.0,
        w_side: 0.7,
        w_left: 0.3,
        w_right: 0.2,
    };
    grad_check(&[("pred", &st_p)], || sl.loss(st_p.as_tensor(), &st_t));
    grad_check(&[("pred", &pred)], || l1_loss(pred.as_tensor(), &target));

    let (mu, lv) = (var(&[3, 2, 4], 5, 1.5), var(&[3, 2, 4], 6, 0.7));
    for fb in [
        FreeBits::None,
        FreeBits::Threshold { target: 2.0 },
        FreeBits::PerDimMax { target: 0.6 },
    ] {
        grad_check(&[("mean", &mu), ("logvar", &lv)], || {
            kl_loss(mu.as_tensor(), lv.as_tensor(), fb)
        });
    }

    let (r, f) = (noise(&[2, 5], 7).unwrap(), var(&[2, 5], 8, 1.3));
    for kind in [GanLoss::Hinge, GanLoss::LeastSquares] {
        let rv = Var::from_tensor(&r).unwrap();
        grad_check(&[("real", &rv), ("fake", &f)], || {
            discriminator_loss(kind, &[rv.as_tensor().clone()], &[f.as_tensor().clone()])
        });
        grad_check(&[("fake", &f)], || {
            generator_loss(kind, &[f.as_tensor().clone()])
        });
    }
    for kind in [FeatureMatching::Absolute, FeatureMatching::Relative] {
        grad_check(&[("fake", &f)], || {
            feature_matching_loss(kind, &[vec![r.clone()]], &[vec![f.as_tensor().clone()]])
        });
    }

    let (u, v) = (noise(&[2, 3, 4], 9).unwrap(), var(&[2, 3, 4], 10, 1.0));
    let mask = Tensor::new(&[[1f64, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]], &d)
        .unwrap()
        .reshape((2, 1, 4))
        .unwrap();
    grad_check(&[("v", &v)], || {
        flow_matching_loss(v.as_tensor(), &u, Some(&mask))
    });
    let bands = Tensor::new(&[1.5f64, 1.0, 0.5], &d)
        .unwrap()
        .reshape((1, 3, 1))
        .unwrap();
    grad_check(&[("v", &v)], || {
        weighted_flow_matching_loss(v.as_tensor(), &u, &bands)
    });
    let m2 = Tensor::new(&[[1f64, 1.0, 0.0], [1.0, 1.0, 1.0]], &d).unwrap();
    let (pm, tm) = (var(&[2, 3, 2], 11, 1.0), noise(&[2, 3, 2], 12).unwrap());
    grad_check(&[("pred", &pm)], || {
        masked_mae(pm.as_tensor(), &tm, Some(&m2))
    });
    let (lg, gt) = (
        var(&[2, 3], 13, 3.0),
        Tensor::new(&[[0f64, 1.0, 1.0], [1.0, 0.0, 0.0]], &d).unwrap(),
    );
    grad_check(&[("logits", &lg)], || {
        masked_bce_with_logits(lg.as_tensor(), &gt, Some(&m2), Some(2.5))
    });
    let cl = var(&[2, 3, 5], 14, 2.0);
    let ct = Tensor::new(&[[1u32, 4, 7], [0, 2, 3]], &d).unwrap();
    grad_check(&[("logits", &cl)], || {
        cross_entropy(cl.as_tensor(), &ct, Some(7), 0.2)
    });
}

#[test]
fn bad_inputs_name_the_culprit() {
    let d = dev();
    let a = Tensor::zeros((2, 1, 4800), DType::F32, &d).unwrap();
    let b = Tensor::zeros((2, 1, 4000), DType::F32, &d).unwrap();
    let mr = MultiResolutionStftLoss::auraloss_default(&d).unwrap();
    let e = mr.loss(&a, &b).unwrap_err().to_string();
    assert!(
        e.contains("mrstft") && e.contains("[2, 1, 4800]") && e.contains("[2, 1, 4000]"),
        "{e}"
    );
    let e = mr
        .loss(&a.unsqueeze(0).unwrap(), &a.unsqueeze(0).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("[batch, samples]"), "{e}");
    let short = Tensor::zeros((1, 100), DType::F32, &d).unwrap();
    let e = MultiResolutionStftLoss::new(&[(1024, 256, 1024)], 1.0, 1.0, 0.0, &d).unwrap();
    let ok = e.loss(&short, &short);
    assert!(
        ok.is_ok(),
        "reflect padding handles signals shorter than n_fft: {ok:?}"
    );
    let mono = Tensor::zeros((2, 1, 100), DType::F32, &d).unwrap();
    let e = StereoLoss {
        inner: L1Loss,
        w_mid: 1.0,
        w_side: 1.0,
        w_left: 0.0,
        w_right: 0.0,
    }
    .loss(&mono, &mono)
    .unwrap_err();
    assert!(e.to_string().contains("[batch, 2, samples]"), "{e}");
    let logits = Tensor::zeros((2, 3, 5), DType::F32, &d).unwrap();
    let bad = Tensor::new(&[[1u32, 9, 2], [0, 0, 0]], &d).unwrap();
    let e = cross_entropy(&logits, &bad, None, 0.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("target 9 at position 1"), "{e}");
    let e = cross_entropy(
        &logits,
        &Tensor::zeros((2, 4), DType::U32, &d).unwrap(),
        None,
        0.0,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("cross-entropy targets") && e.contains("[2, 3]"),
        "{e}"
    );
    let e = masked_mae(
        &logits,
        &logits,
        Some(&Tensor::ones((3, 2), DType::F32, &d).unwrap()),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("loss mask"), "{e}");
    let e = flow_matching_target(
        &logits,
        &logits,
        &Tensor::zeros(3, DType::F32, &d).unwrap(),
        0.0,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("flow matching t") && e.contains("[2]"), "{e}");
    let e = discriminator_loss(GanLoss::Hinge, std::slice::from_ref(&logits), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 real vs 0 fake"), "{e}");
    let e = MultiScaleMelLoss::new(24000, &[(10, 64)], 0.0, 1.0, 1.0, 0.0, &d)
        .unwrap_err()
        .to_string();
    assert!(e.contains("clamp_eps"), "{e}");
}
