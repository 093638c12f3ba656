//! What the tasks of waveform generators (the waveform VAE, the Vocos
//! vocoder) share: crops cut to the model's hop, fixed validation crops,
//! input/output sample files, and the adversarial terms of both players.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use melvae_dsp::{
    save_wav, Audio, MelConfig, MelExtractor, SpectrogramImage, SplitMix64, WavFormat,
};
use melvae_losses::{discriminator_loss, feature_matching_loss, generator_loss, FeatureMatching};
use melvae_models::{
    AdversarialWeights, DiscOutput, Discriminator, Discriminators, DiscriminatorsConfig,
};

use crate::data::{AudioFolder, AudioSet};
use crate::Result;

/// A batch of `indices` of `set` (`[batch, channels, crop]`), the crop cut
/// to a multiple of `hop`, in `dtype` on `device`.
pub(crate) fn crops(
    set: &AudioSet,
    indices: &[usize],
    rng: &mut SplitMix64,
    hop: usize,
    device: &Device,
    dtype: DType,
) -> Result<Tensor> {
    let x = set.batch(indices, rng, device)?;
    let t = x.dim(2)? / hop * hop;
    Ok(x.narrow(2, 0, t)?.to_dtype(dtype)?)
}

/// Fixed validation crops: each held-out clip from a seeded offset (or the
/// first training clips when nothing is held out), at most 8.
pub(crate) fn val_crops(
    data: &AudioFolder,
    hop: usize,
    device: &Device,
    dtype: DType,
) -> Result<Tensor> {
    let set = if data.val.is_empty() {
        &data.train
    } else {
        &data.val
    };
    let n = set.len().min(8);
    let all: Vec<Tensor> = (0..n)
        .map(|i| {
            crops(
                set,
                &[i],
                &mut SplitMix64::new(i as u64),
                hop,
                device,
                dtype,
            )
        })
        .collect::<Result<_>>()?;
    Ok(Tensor::cat(&all, 0)?)
}

/// Writes `stepNNNNNNNN_{input,recon}.{wav,png}` into `dir` for one clip
/// and its reconstruction (each `[1, channels, samples]` at `rate`); the
/// pictures are the log-mels (vocos-24k analysis at `rate`) of the first
/// channel.
pub(crate) fn write_pair(
    dir: &Path,
    step: u64,
    rate: u32,
    input: &Tensor,
    recon: &Tensor,
) -> Result<Vec<PathBuf>> {
    let path = |what: &str| dir.join(format!("step{step:08}_{what}"));
    let written = [
        path("input.wav"),
        path("recon.wav"),
        path("input.png"),
        path("recon.png"),
    ];
    let host = |t: &Tensor| -> Result<Vec<Vec<f32>>> {
        Ok(t.squeeze(0)?.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    };
    let (x, y) = (host(input)?, host(recon)?);
    save_wav(&written[0], &Audio::new(rate, x.clone())?, WavFormat::Pcm16)?;
    save_wav(&written[1], &Audio::new(rate, y.clone())?, WavFormat::Pcm16)?;
    let ex = MelExtractor::new(MelConfig {
        sample_rate: rate,
        ..MelConfig::vocos_24k()
    })?;
    let img = SpectrogramImage::for_mel(ex.config());
    img.save_png(&written[2], &ex.extract(&x[0])?)?;
    img.save_png(&written[3], &ex.extract(&y[0])?)?;
    Ok(written.to_vec())
}

/// The discriminators' loss (`w.loss`) on real `audio` and a detached
/// `fake`, and their view of the real audio (kept for the generator step).
/// Also serves mel models (the "audio" is then a log-mel).
pub(crate) fn discriminator_step(
    disc: &impl Discriminator,
    w: AdversarialWeights,
    audio: &Tensor,
    fake: &Tensor,
) -> Result<(Tensor, DiscOutput)> {
    let real = disc.judge(audio)?;
    let f = disc.judge(&fake.detach())?;
    Ok((
        discriminator_loss(w.loss.into(), &real.logits, &f.logits)?,
        real,
    ))
}

/// The generator's adversarial loss on `fake` and the feature matching
/// (L1 of feature maps) against the real audio's (`real`, or computed from
/// `audio`): `(adv, fm)`, unweighted.
pub(crate) fn generator_terms(
    disc: &impl Discriminator,
    w: AdversarialWeights,
    audio: &Tensor,
    fake: &Tensor,
    real: Option<DiscOutput>,
) -> Result<(Tensor, Tensor)> {
    let real = match real {
        Some(r) => r,
        None => disc.judge(audio)?,
    };
    let f = disc.judge(fake)?;
    let adv = generator_loss(w.loss.into(), &f.logits)?;
    let fm = feature_matching_loss(FeatureMatching::Absolute, &real.features, &f.features)?;
    Ok((adv, fm))
}

/// The discriminators of `cfg` (none without a config) with their own
/// parameters (`disc.*`), seeded apart from the generator's so the two
/// never share initial values by name.
pub(crate) fn build_discriminators(
    cfg: Option<DiscriminatorsConfig>,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<Option<(VarMap, Discriminators)>> {
    cfg.map(|d| {
        let dmap = VarMap::new();
        let vb = melvae_layers::seeded_var_builder(&dmap, seed ^ 0xD15C, dtype, device);
        let disc = Discriminators::new(&d, vb.pp("disc"))?;
        Ok((dmap, disc))
    })
    .transpose()
}
