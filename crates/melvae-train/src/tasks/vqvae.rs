//! Training one level of the hierarchical waveform VQ-VAE on a folder of
//! audio (mono at the model's rate): random crops cut to the hop, the
//! multi-resolution STFT loss of the reconstruction plus the quantiser's
//! codebook and commitment losses (the seed's recipe).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use melvae_dsp::SplitMix64;
use melvae_losses::{MultiResolutionStftLoss, WaveformLoss};
use melvae_models::{VqVae, VqVaeConfig};

use crate::data::{AudioDataConfig, AudioFolder, EpochCursor};
use crate::dist::{Communicator, Shard, SingleProcess};
use crate::trainer::{Losses, StepContext, TrainTask};
use crate::{Error, Result};

impl crate::Validate for VqVaeConfig {
    fn validate(&self) -> std::result::Result<(), (String, String)> {
        VqVaeConfig::validate(self).map_err(|e| super::mel_vae::section_err(e, "vqvae"))
    }
}

/// The `vqvae:` section of a resolved config, validated with errors naming
/// file and key.
pub fn vqvae_config(cfg: &crate::ResolvedConfig) -> Result<VqVaeConfig> {
    cfg.get("vqvae")
}

/// One VQ-VAE level as a [`TrainTask`]: random crops of an
/// [`AudioFolder`] cut to the hop; loss = multi-resolution STFT (auraloss'
/// defaults) + codebook + commitment; the batch's code `usage`,
/// `perplexity` and `restarted` (codes restarted) logged beside it; validation on fixed held-out crops
/// (`stft`, which picks the best checkpoint; `stft_silence`: the same loss
/// of silence, a floor any model must beat; `perplexity`, `usage`);
/// input and reconstruction as WAV and mel PNG samples.
pub struct VqVaeTask {
    /// The parameters (`encoder.*`, `vq.*`, `decoder.*`).
    pub varmap: VarMap,
    /// The model.
    pub model: VqVae,
    /// The reconstruction loss (auraloss' default multi-resolution STFT).
    pub stft: MultiResolutionStftLoss,
    data: AudioFolder,
    data_cfg: AudioDataConfig,
    cursor: EpochCursor,
    seed: u64,
    shard: Shard,
    device: Device,
    dtype: DType,
}

impl VqVaeTask {
    /// Builds the model on `device` in `dtype` for `data`, whose rate and
    /// channels must be the model's; crops must hold at least one code.
    pub fn new(
        cfg: VqVaeConfig,
        data: AudioFolder,
        data_cfg: AudioDataConfig,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        data_cfg.require(cfg.net.sample_rate, cfg.net.audio_channels, "vqvae model")?;
        if data_cfg.crop_samples() < cfg.hop() {
            return Err(Error::invalid(
                "data.crop_seconds",
                format!(
                    "crops of {} samples are shorter than one code ({} samples at {}x)",
                    data_cfg.crop_samples(),
                    cfg.hop(),
                    cfg.hop()
                ),
            ));
        }
        let varmap = VarMap::new();
        let model = VqVae::new(
            cfg,
            melvae_layers::seeded_var_builder(&varmap, seed, dtype, device),
        )?;
        Ok(Self {
            stft: MultiResolutionStftLoss::auraloss_default(device)?,
            varmap,
            model,
            data,
            data_cfg,
            cursor: EpochCursor { epoch: 0, pos: 0 },
            seed,
            shard: Shard::WHOLE,
            device: device.clone(),
            dtype,
        })
    }

    fn val_audio(&self) -> Result<Tensor> {
        super::waveform::val_crops(&self.data, self.model.hop(), &self.device, self.dtype)
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

impl TrainTask for VqVaeTask {
    type Batch = Tensor;

    /// Every variable, the quantiser's buffers included (they get no
    /// gradient, and the optimiser leaves them alone).
    fn vars(&self) -> Vec<(String, Var)> {
        melvae_layers::named_vars(&self.varmap)
    }

    fn train_batch(&mut self, rng: &mut SplitMix64) -> Result<Tensor> {
        let batch = self.data_cfg.batch_size;
        let rows = self.shard.rows(batch, "data.batch_size")?;
        let idx = self.cursor.next(&self.data.train, self.seed, batch);
        // Every row is cropped (the same draws on every rank); this rank
        // keeps its own.
        let crops = super::waveform::crops(
            &self.data.train,
            &idx,
            rng,
            self.model.hop(),
            &self.device,
            self.dtype,
        )?;
        Ok(crops.narrow(0, rows.start, rows.len())?)
    }

    /// Data-parallel: the codebook's statistics are the global batch's
    /// (`losses_across`); the STFT loss's spectral convergence is
    /// normalised over each rank's rows, as PyTorch's DDP would.
    fn set_shard(&mut self, shard: Shard) -> Result<()> {
        self.shard = shard.for_batch(self.data_cfg.batch_size)?;
        Ok(())
    }

    fn losses(&mut self, batch: &Tensor, ctx: StepContext) -> Result<Losses> {
        self.losses_across(batch, ctx, &SingleProcess)
    }

    /// The losses; the quantiser's code counts, EMA sums and restarts are
    /// shared over `comm`'s ranks.
    fn losses_across(
        &mut self,
        batch: &Tensor,
        _ctx: StepContext,
        comm: &dyn Communicator,
    ) -> Result<Losses> {
        let mut ranks = crate::dist::ranks(comm, &self.device)?;
        let out = self.model.forward_across(batch, &mut ranks)?;
        let stft = self.stft.loss(&out.recon, batch)?;
        let total = (&stft + &out.vq.loss.to_dtype(stft.dtype())?)?;
        let mut terms = super::quantizer_terms(out.vq)?;
        terms.insert("stft".to_string(), stft);
        Ok(Losses { total, terms })
    }

    fn validate(&mut self, _ctx: StepContext) -> Result<BTreeMap<String, f64>> {
        let audio = self.val_audio()?;
        let out = self.model.forward(&audio, false)?;
        let stft = scalar(&self.stft.loss(&out.recon, &audio)?)?;
        let silence = scalar(&self.stft.loss(&audio.zeros_like()?, &audio)?)?;
        Ok(BTreeMap::from([
            ("stft".to_string(), stft),
            ("stft_silence".to_string(), silence),
            ("perplexity".to_string(), out.vq.perplexity),
            ("usage".to_string(), out.vq.usage),
        ]))
    }

    fn best_metric(&self) -> &str {
        "stft"
    }

    fn samples(&mut self, ctx: StepContext, dir: &Path) -> Result<Vec<PathBuf>> {
        let audio = self.val_audio()?.narrow(0, 0, 1)?;
        let recon = self.model.decode(&self.model.encode(&audio)?)?;
        super::waveform::write_pair(
            dir,
            ctx.step,
            self.model.config().net.sample_rate,
            &audio,
            &recon,
        )
    }

    fn save_model_file(&self, path: &Path, metadata: &BTreeMap<String, String>) -> Result<bool> {
        super::write_model_file::<VqVae>(path, self.model.config(), &self.varmap, metadata)
    }

    fn state(&self) -> serde_json::Value {
        super::quantizer_state(&self.cursor, self.model.quantizer())
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        super::load_quantizer_state(&mut self.cursor, self.model.quantizer_mut(), state)
    }
}
