//! The waveform VAE's config sections (its training task follows).

use melvae_models::WaveVaeConfig;

impl crate::Validate for WaveVaeConfig {
    fn validate(&self) -> std::result::Result<(), (String, String)> {
        WaveVaeConfig::validate(self).map_err(|e| super::mel_vae::section_err(e, "wave_vae"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ResolvedConfig;

    #[test]
    fn bundled_defaults_parse_and_errors_name_the_file() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/defaults");
        for (file, channels, hop) in [("wave_vae.yaml", 1, 320), ("wave_vae_music.yaml", 2, 2048)] {
            let p = dir.join(file);
            let text = std::fs::read_to_string(&p).unwrap();
            let r = ResolvedConfig::from_yaml(&text, &p.display().to_string()).unwrap();
            let c: WaveVaeConfig = r.get("wave_vae").unwrap();
            assert_eq!((c.audio_channels, c.hop()), (channels, hop), "{file}");
        }
        let r = ResolvedConfig::from_yaml(
            "wave_vae: {sample_rate: 24000, audio_channels: 3, channels: 4, channel_mults: [2], strides: [2], latent_dim: 2}\n",
            "exp.yaml",
        )
        .unwrap();
        let e = r.get::<WaveVaeConfig>("wave_vae").unwrap_err().to_string();
        assert!(
            e.contains("exp.yaml") && e.contains("wave_vae.audio_channels"),
            "{e}"
        );
        let r = ResolvedConfig::from_yaml(
            "wave_vae: {sample_rate: 24000, audio_channels: 1, channels: 4, channel_mults: [2], strides: [2], latent_dim: 2, bottleneck: {kind: gru}}\n",
            "exp.yaml",
        )
        .unwrap();
        let e = r.get::<WaveVaeConfig>("wave_vae").unwrap_err().to_string();
        assert!(
            e.contains("wave_vae.bottleneck") && e.contains("gru"),
            "{e}"
        );
    }
}
