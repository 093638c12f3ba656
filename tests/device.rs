//! Device-generic numerics: every case runs on the device named by
//! `MELVAE_TEST_DEVICE` (unset: the CPU; `cuda:0` with `--features cuda`)
//! in f32 and bf16, against an f64 CPU reference with the same parameters
//! and inputs, comparing outputs and gradients within the tolerances of
//! `DeviceTolerance` (relative L2; docs/gpu.md). With `--features flash-attn`
//! on CUDA, the flash-attention path is compared with the math path.
//!
//! `MELVAE_TEST_DEVICE=cuda:0 cargo test --release --features cuda --test device`

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use melvae_dsp::{MelConfig, SplitMix64, TensorMel, TensorStft};
use melvae_layers::testing::{
    compare_on_device, noise, test_device, DeviceReport, DeviceTolerance,
};
use melvae_layers::{
    lengths_to_mask, ActivationKind, AttentionConfig, BlockConfig, CausalConv2d, Conv1d,
    Conv1dConfig, Conv2dConfig, DitBlock, FeedForward, FeedForwardConfig, FfnActivation, GroupNorm,
    LayerNorm, LstmStack, Mode, MultiHeadAttention, ResidualStack, ResidualUnitConfig, RmsNorm,
    Upsample, UpsampleConfig,
};
use melvae_models::{CfmConfig, ConvformerConfig, LowBandWeight, MelVae, MelVaeConfig};

type R = Result<(), String>;

const DTYPES: [DType; 2] = [DType::F32, DType::BF16];

fn device() -> Device {
    test_device().unwrap_or_else(|e| panic!("{e}"))
}

fn e(err: impl std::fmt::Display) -> melvae_layers::Error {
    melvae_layers::Error::Candle(candle_core::Error::Msg(err.to_string()))
}

/// Runs one case in every dtype with the default tolerance times `factor`
/// and prints what it measured (`cargo test -- --nocapture` shows it).
#[allow(clippy::too_many_arguments)]
fn case<M>(
    label: &str,
    factor: f64,
    scale: f64,
    inputs: &[Tensor],
    build: impl Fn(VarBuilder) -> melvae_layers::Result<M> + Copy,
    forward: impl Fn(&M, &[Tensor]) -> melvae_layers::Result<Tensor> + Copy,
) -> R {
    let dev = device();
    for dtype in DTYPES {
        let tol = DeviceTolerance::for_dtype(dtype).scaled(factor);
        let report = compare_on_device(label, &dev, dtype, tol, scale, 11, inputs, build, forward)?;
        print_report(label, dtype, &report);
    }
    Ok(())
}

fn print_report(label: &str, dtype: DType, r: &DeviceReport) {
    let (gname, g) = r.worst_grad().unwrap_or(("-", 0.0));
    println!(
        "{label:<28} {dtype:?}: output {:.2e}, worst gradient {g:.2e} ({gname})",
        r.errors[0].1
    );
}

fn audio(batch: usize, samples: usize, seed: u64) -> Tensor {
    // A tone plus noise, so that spectra have structure and a noise floor.
    let n = noise(&[batch, samples], seed).unwrap();
    let t = Tensor::arange(0u32, samples as u32, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let tone = (t * 0.05).unwrap().sin().unwrap();
    (n * 0.1).unwrap().broadcast_add(&tone).unwrap()
}

#[test]
fn tensor_stft_and_mel() -> R {
    let x = audio(2, 2400, 1);
    let stft = melvae_dsp::StftConfig::new(256);
    // |X| = sqrt(re^2 + im^2): quiet bins have an ill-conditioned gradient direction.
    case(
        "tensor stft magnitude",
        1.5,
        0.0,
        std::slice::from_ref(&x),
        |vb| TensorStft::new(stft, vb.device()).map_err(e),
        |s, x| s.magnitude(&x[0]).map_err(e),
    )?;
    let mut mel = MelConfig::vocos_24k();
    mel.stft.n_fft = 256;
    mel.stft.win_length = 256;
    mel.stft.hop_length = 64;
    mel.n_mels = 32;
    // The log compresses: errors are relative to the log-mel's scale.
    case(
        "tensor log-mel",
        1.0,
        0.0,
        &[x],
        |vb| TensorMel::new(mel, vb.device()).map_err(e),
        |m, x| m.forward(&x[0]).map_err(e),
    )
}

#[test]
fn losses() -> R {
    use melvae_losses::{
        flow_matching_loss, gaussian_kl, l1_loss, MultiResolutionStftLoss, MultiScaleMelLoss,
        WaveformLoss,
    };
    let target = audio(2, 4800, 2).reshape((2, 1, 4800)).unwrap();
    let pred = (&target * 0.8)
        .unwrap()
        .add(&(noise(&[2, 1, 4800], 3).unwrap() * 0.05).unwrap())
        .unwrap();
    let resolutions = [(256, 64, 256), (512, 128, 512), (128, 32, 128)];
    // The log-magnitude term divides by |X|: quiet bins amplify the
    // rounding of the input gradient 10-fold.
    case(
        "multi-resolution stft loss",
        10.0,
        0.0,
        &[pred.clone(), target.clone()],
        |vb| MultiResolutionStftLoss::new(&resolutions, 1.0, 1.0, 0.0, vb.device()).map_err(e),
        |l, x| l.loss(&x[0], &x[1]).map_err(e),
    )?;
    let scales = [(16, 128), (32, 512)];
    case(
        "multi-scale mel loss",
        1.0,
        0.0,
        &[pred.clone(), target.clone()],
        |vb| MultiScaleMelLoss::new(24_000, &scales, 1e-5, 1.0, 1.0, 1.0, vb.device()).map_err(e),
        |l, x| l.loss(&x[0], &x[1]).map_err(e),
    )?;
    case(
        "l1 loss",
        1.0,
        0.0,
        &[pred, target],
        |_| Ok(()),
        |_, x| l1_loss(&x[0], &x[1]).map_err(e),
    )?;
    let mean = noise(&[2, 5, 4], 4).unwrap();
    let logvar = (noise(&[2, 5, 4], 5).unwrap() * 2.0).unwrap();
    case(
        "gaussian kl",
        1.0,
        0.0,
        &[mean, logvar],
        |_| Ok(()),
        |_, x| gaussian_kl(&x[0], &x[1]).map_err(e),
    )?;
    let v = noise(&[2, 6, 10], 6).unwrap();
    let u = noise(&[2, 6, 10], 7).unwrap();
    case(
        "flow matching loss",
        1.0,
        0.0,
        &[v, u],
        |_| Ok(()),
        |_, x| flow_matching_loss(&x[0], &x[1], None).map_err(e),
    )
}

#[test]
fn attention() -> R {
    let x = noise(&[2, 24, 32], 8).unwrap();
    let mask = lengths_to_mask(&[17, 24], 24, &Device::Cpu).unwrap();
    // (label, causal, ALiBi alpha, rotary base, key padding)
    type Variant = (&'static str, bool, Option<f64>, Option<f64>, bool);
    let variants: [Variant; 4] = [
        ("attention", false, None, None, false),
        ("attention causal+rotary", true, None, Some(10_000.0), false),
        ("attention alibi+padding", false, Some(1.0), None, true),
        ("attention causal+alibi+pad", true, Some(1.0), None, true),
    ];
    for (label, causal, alibi, rotary, padded) in variants {
        let mut cfg = AttentionConfig::new(32, 4);
        cfg.causal = causal;
        cfg.alibi_alpha = alibi;
        cfg.rotary_base = rotary;
        let inputs = if padded {
            vec![x.clone(), mask.clone()]
        } else {
            vec![x.clone()]
        };
        case(
            label,
            1.0,
            0.3,
            &inputs,
            |vb| MultiHeadAttention::new(cfg, vb),
            |m, x| m.forward(&x[0], x.get(1), Mode::Eval),
        )?;
    }
    Ok(())
}

#[test]
fn convolutions() -> R {
    let x = noise(&[2, 6, 40], 9).unwrap();
    let mut dilated = Conv1dConfig::causal(6, 8, 3);
    dilated.dilation = 3;
    dilated.weight_norm = true;
    case(
        "conv1d causal dilated wn",
        1.0,
        0.3,
        std::slice::from_ref(&x),
        |vb| Conv1d::new(dilated, vb),
        |m, x| m.forward(&x[0]),
    )?;
    let mut strided = Conv1dConfig::causal(6, 6, 4);
    strided.stride = 2;
    strided.groups = 3;
    case(
        "conv1d strided grouped",
        1.0,
        0.3,
        std::slice::from_ref(&x),
        |vb| Conv1d::new(strided, vb),
        |m, x| m.forward(&x[0]),
    )?;
    let up = UpsampleConfig {
        in_channels: 6,
        out_channels: 4,
        kernel_size: 8,
        stride: 4,
        bias: true,
        weight_norm: true,
        causal: true,
    };
    case(
        "upsample x4",
        1.0,
        0.3,
        std::slice::from_ref(&x),
        |vb| Upsample::new(up, vb),
        |m, x| m.forward(&x[0]),
    )?;
    let mut c2 = Conv2dConfig::new(2, 3, (3, 3));
    c2.stride = (2, 2);
    c2.dilation = (1, 1);
    let x2 = noise(&[2, 2, 12, 16], 10).unwrap();
    case(
        "causal conv2d strided",
        1.0,
        0.3,
        &[x2],
        |vb| CausalConv2d::new(c2, vb),
        |m, x| m.forward(&x[0]),
    )?;
    let mut unit = ResidualUnitConfig::seanet(6, 1);
    unit.activation = ActivationKind::Snake;
    case(
        "seanet residual stack",
        1.0,
        0.3,
        &[x],
        |vb| ResidualStack::new(unit, &[1, 3, 9], vb),
        |m, x| m.forward(&x[0]),
    )
}

#[test]
fn norms_ffn_and_blocks() -> R {
    let x = noise(&[2, 10, 16], 12).unwrap();
    case(
        "layer norm",
        1.0,
        0.5,
        std::slice::from_ref(&x),
        |vb| LayerNorm::new(16, 1e-5, true, vb),
        |m, x| m.forward(&x[0]),
    )?;
    case(
        "rms norm",
        1.0,
        0.5,
        std::slice::from_ref(&x),
        |vb| RmsNorm::new(16, 1e-6, vb),
        |m, x| m.forward(&x[0]),
    )?;
    let xc = noise(&[2, 8, 12], 13).unwrap();
    case(
        "group norm",
        1.0,
        0.5,
        &[xc],
        |vb| GroupNorm::new(4, 8, 1e-5, vb),
        |m, x| m.forward(&x[0]),
    )?;
    let mut ffn = FeedForwardConfig::new(16);
    ffn.activation = FfnActivation::SwiGlu;
    case(
        "feed-forward swiglu",
        1.0,
        0.3,
        std::slice::from_ref(&x),
        |vb| FeedForward::new(ffn, vb),
        |m, x| m.forward(&x[0], None, Mode::Eval),
    )?;
    let mut block = BlockConfig::new(16, 2);
    block.attention.rotary_base = Some(10_000.0);
    let c = noise(&[2, 8], 14).unwrap();
    case(
        "dit block",
        1.5,
        0.3,
        &[x.clone(), c],
        |vb| DitBlock::new(block, 8, vb),
        |m, x| m.forward(&x[0], &x[1], None, Mode::Eval),
    )?;
    // The recurrence compounds rounding over time: bf16 gets twice the bound.
    case(
        "lstm 2 layers",
        2.0,
        0.3,
        &[x],
        |vb| LstmStack::new(16, 12, 2, vb),
        |m, x| Ok(m.forward(&x[0], None)?.0),
    )
}

fn mel_vae_config() -> MelVaeConfig {
    MelVaeConfig {
        convformer: ConvformerConfig {
            mel_channels: 16,
            compress_factor: 4,
            channels: 4,
            n_residual_blocks: 1,
            tf_dim: 16,
            tf_heads: 2,
            tf_layers: 1,
            tf_context: Some(256),
            drop_p: 0.0,
            latent_dim: 4,
            kl_loss_weight: 1e-3,
            kl_loss_warmup_steps: 10,
        },
        cfm: CfmConfig {
            mel_channels: 16,
            unet_dim: 16,
            unet_depth: 2,
            unet_heads: 2,
            unet_dropout_rate: 0.0,
            sigma: 1e-4,
            cond_drop_prob: 0.2,
            mel_mean: -5.0,
            mel_std: 3.0,
            time_sampling: Default::default(),
            // The weighted flow loss, in every precision the device runs.
            low_band_weight: Some(LowBandWeight {
                bands: 4,
                weight: 3.0,
            }),
            reconstruction_temperature: 0.8,
        },
    }
}

fn log_mels(seed: u64) -> Tensor {
    (noise(&[2, 16, 32], seed).unwrap() * 3.0)
        .unwrap()
        .affine(1.0, -5.0)
        .unwrap()
}

#[test]
fn mel_vae_forward_and_loss() -> R {
    let cfg = mel_vae_config();
    let mels = log_mels(15);
    let me = |err: melvae_models::Error| e(err);
    // Deep model: twice the per-layer bounds.
    case(
        "mel vae encode",
        2.0,
        0.3,
        std::slice::from_ref(&mels),
        |vb| MelVae::new(cfg.clone(), vb).map_err(me),
        |m, x| {
            let (mean, logvar) = m.encode(&x[0]).map_err(me)?;
            Ok(Tensor::cat(&[mean, logvar], 2)?)
        },
    )?;
    case(
        "mel vae training loss",
        2.0,
        0.3,
        &[mels],
        |vb| MelVae::new(cfg.clone(), vb).map_err(me),
        |m, x| {
            let mut rng = SplitMix64::new(3);
            Ok(m.loss(&x[0], 5, &mut rng, false).map_err(me)?.total)
        },
    )
}

/// Three AdamW steps of the mel VAE on the device follow the f64 CPU run:
/// the losses agree within the model tolerance, and so does the update of
/// all parameters together (half-precision weights through the optimiser's
/// f32 master copy). Per parameter the update is bounded in f32 only: in
/// the first steps Adam moves each weight by about `lr * sign(g)`, so where
/// a gradient is near zero its bf16 rounding error decides the update (the
/// worst is a key bias, whose exact gradient is zero: softmax ignores a
/// constant added to every score).
/// Per-step losses and, per parameter, final minus initial weight.
type LossesAndUpdates = (Vec<f64>, Vec<(String, Tensor)>);

#[test]
fn mel_vae_training_steps() -> R {
    use melvae_layers::testing::{named_vars, randomize, rel_l2};
    use melvae_train::optim::{collect_grads, AdamW, AdamWConfig};
    let dev = device();
    let mels = log_mels(16);
    let run = |device: &Device, dtype: DType| -> Result<LossesAndUpdates, String> {
        let err =
            |x: &dyn std::fmt::Display| format!("mel vae training ({device:?}, {dtype:?}): {x}");
        let vm = candle_nn::VarMap::new();
        let model = MelVae::new(
            mel_vae_config(),
            VarBuilder::from_varmap(&vm, dtype, device),
        )
        .map_err(|x| err(&x))?;
        randomize(&vm, 0.3, 17).map_err(|x| err(&x))?;
        let vars = named_vars(&vm);
        let initial: Vec<Tensor> = vars
            .iter()
            .map(|(_, v)| v.as_tensor().copy())
            .collect::<candle_core::Result<_>>()
            .map_err(|x| err(&x))?;
        let mut opt = AdamW::new(vars.clone(), AdamWConfig::default()).map_err(|x| err(&x))?;
        let mel = mels
            .to_dtype(dtype)
            .and_then(|m| m.to_device(device))
            .map_err(|x| err(&x))?;
        let mut rng = SplitMix64::new(5);
        let mut losses = Vec::new();
        for step in 0..3 {
            let loss = model
                .loss(&mel, step, &mut rng, true)
                .map_err(|x| err(&x))?
                .total;
            losses.push(
                loss.to_dtype(DType::F64)
                    .and_then(|l| l.to_scalar::<f64>())
                    .map_err(|x| err(&x))?,
            );
            let store = loss.backward().map_err(|x| err(&x))?;
            opt.step(&collect_grads(&vars, &store), 1e-2)
                .map_err(|x| err(&x))?;
        }
        // Half-precision weights train through the optimiser's f32 master
        // copy: compare its update, not the rounded weights'.
        let updates = vars
            .into_iter()
            .zip(initial)
            .enumerate()
            .map(|(i, ((n, v), w0))| {
                let w = opt.master(i).unwrap_or(v.as_tensor());
                Ok((n, (w - w0.to_dtype(w.dtype())?)?))
            })
            .collect::<candle_core::Result<_>>()
            .map_err(|x| err(&x))?;
        Ok((losses, updates))
    };
    let (ref_losses, ref_updates) = run(&Device::Cpu, DType::F64)?;
    for dtype in DTYPES {
        let tol = DeviceTolerance::for_dtype(dtype).scaled(2.0);
        let (losses, updates) = run(&dev, dtype)?;
        for (i, (l, r)) in losses.iter().zip(&ref_losses).enumerate() {
            let rel = (l - r).abs() / r.abs();
            if rel.is_nan() || rel > tol.output {
                return Err(format!("mel vae training ({dtype:?}): loss of step {i} {l} vs reference {r} (relative {rel:.2e} > {:.1e})", tol.output));
            }
        }
        let mut worst = (String::new(), 0.0f64);
        let (mut diff2, mut ref2) = (0.0, 0.0);
        for ((name, w), (_, w_ref)) in updates.iter().zip(&ref_updates) {
            // Compare the update (final - initial weight): comparing the
            // weights would hide it under their own rounding.
            let err = rel_l2(w, w_ref).map_err(|x| x.to_string())?;
            let sq = |t: &Tensor| t.sqr()?.sum_all()?.to_scalar::<f64>();
            diff2 += w
                .to_dtype(DType::F64)
                .and_then(|w| sq(&(w - w_ref)?))
                .map_err(|x| x.to_string())?;
            ref2 += sq(w_ref).map_err(|x| x.to_string())?;
            if err > worst.1 {
                worst = (name.clone(), err);
            }
        }
        let all = (diff2 / ref2).sqrt();
        println!("mel vae 3 AdamW steps      {dtype:?}: losses {losses:?} vs {ref_losses:?}, update {all:.2e} (all parameters), worst {:.2e} ({})", worst.1, worst.0);
        if all.is_nan() || all > tol.grad {
            return Err(format!(
                "mel vae training ({dtype:?}): the update of all parameters has relative L2 error {all:.2e} > {:.1e}",
                tol.grad
            ));
        }
        if dtype == DType::F32 && (worst.1.is_nan() || worst.1 > tol.grad) {
            return Err(format!(
                "mel vae training ({dtype:?}): update of {} relative L2 error {:.2e} > {:.1e}",
                worst.0, worst.1, tol.grad
            ));
        }
    }
    Ok(())
}

/// On CUDA with flash-attn: the flash path equals the math path for
/// causal, key-padding and ALiBi attention in bf16 and f16.
#[cfg(feature = "flash-attn")]
#[test]
fn flash_attention_equals_math() -> R {
    use melvae_layers::testing::rel_l2;
    use melvae_layers::{alibi_slopes, attend, attention_probs, uses_flash, AttendOptions};
    let dev = device();
    if !dev.is_cuda() {
        println!("flash_attention_equals_math: skipped, needs MELVAE_TEST_DEVICE=cuda:N");
        return Ok(());
    }
    let (b, h, t, d) = (2, 4, 96, 64);
    let slopes = alibi_slopes(h);
    let mask = lengths_to_mask(&[70, 96], t, &dev).map_err(|x| x.to_string())?;
    for dtype in [DType::BF16, DType::F16] {
        let qkv: Vec<Tensor> = (0..3)
            .map(|i| noise(&[b, h, t, d], 20 + i).and_then(|x| x.to_dtype(dtype)?.to_device(&dev)))
            .collect::<candle_core::Result<_>>()
            .map_err(|x| x.to_string())?;
        for (label, causal, alibi, padded) in [
            ("plain", false, false, false),
            ("causal", true, false, false),
            ("padding", false, false, true),
            ("alibi", false, true, false),
            ("causal+alibi+padding", true, true, true),
        ] {
            let opts = AttendOptions {
                causal,
                alibi: alibi.then_some(&slopes[..]),
                key_mask: padded.then_some(&mask),
                ..Default::default()
            };
            let used = uses_flash(&qkv[0], &qkv[1], &qkv[2], &opts).map_err(|x| x.to_string())?;
            if !used {
                return Err(format!(
                    "{label} {dtype:?}: attend would not take the flash path"
                ));
            }
            let flash = attend(&qkv[0], &qkv[1], &qkv[2], &opts).map_err(|x| x.to_string())?;
            // The math path in f32 from the same (rounded) inputs.
            let f = |x: &Tensor| x.to_dtype(DType::F32);
            let (q, k, v) = (f(&qkv[0]), f(&qkv[1]), f(&qkv[2]));
            let (q, k, v) = (
                q.map_err(|x| x.to_string())?,
                k.map_err(|x| x.to_string())?,
                v.map_err(|x| x.to_string())?,
            );
            let math = attention_probs(&q, &k, 1.0 / (d as f64).sqrt(), &opts)
                .and_then(|p| Ok(p.matmul(&v)?))
                .map_err(|x| x.to_string())?;
            let err = rel_l2(&flash, &math).map_err(|x| x.to_string())?;
            let tol = DeviceTolerance::for_dtype(dtype).output;
            println!("flash vs math {label:<22} {dtype:?}: {err:.2e}");
            if err.is_nan() || err > tol {
                return Err(format!(
                    "flash vs math {label} {dtype:?}: relative L2 error {err:.2e} > {tol:.1e}"
                ));
            }
        }
    }
    Ok(())
}
