#!/usr/bin/env bash
# Times a model family's training step in melvae and in its PyTorch twin,
# back to back on this machine, after checking that the twin computes the
# same loss from the same weights and batch.
#
#   bash tools/bench/twin_compare.sh FAMILY [SETTING] [PYTHON]
#
# FAMILY: wave_vae or vqvae (a level of the hierarchical waveform VQ-VAE)
# (example wave_vae_throughput, twin tools/bench/wave_vae_twin.py), vocos
# (the `vocos` package, tools/bench/vocos_twin.py), mel_vae (the mel VAE:
# example mel_vae_throughput, twin tools/bench/mel_vae_twin.py), or one of
# the token models mel_vqvae, gpt, gpt_vae, echolancer, lstm_prior (the
# hierarchy's priors) (example mel_tokens_throughput, twin
# tools/bench/mel_tokens_twin.py); SETTING: a file of configs/settings/
# (default FAMILY_tiny, so echolancer_tiny for echolancer;
# gpt_vae_tiny_stage2 for gpt_vae, vqvae_8_tiny for vqvae, prior_8_tiny
# (with a context) for lstm_prior, tiny for mel_vae, whose settings are
# tiny and setting1); PYTHON: an interpreter with torch,
# numpy, safetensors, librosa (and vocos) (default
# /tmp/refvenv/bin/python). Run it on an idle machine: the load average is
# printed before each side.
set -euo pipefail
cd "$(dirname "$0")/../.."
usage="usage: twin_compare.sh wave_vae|vqvae|vocos|mel_vae|mel_vqvae|gpt|gpt_vae|echolancer|lstm_prior [SETTING] [PYTHON]"
family="${1:?$usage}"
case "$family" in
  wave_vae|vocos)
    example="${family}_throughput"; twin="${family}_twin.py"; default="${family}_tiny" ;;
  mel_vae)
    example=mel_vae_throughput; twin=mel_vae_twin.py; default=tiny ;;
  mel_vqvae|gpt|echolancer)
    example=mel_tokens_throughput; twin=mel_tokens_twin.py; default="${family}_tiny" ;;
  gpt_vae)
    example=mel_tokens_throughput; twin=mel_tokens_twin.py; default=gpt_vae_tiny_stage2 ;;
  vqvae)
    example=wave_vae_throughput; twin=wave_vae_twin.py; default=vqvae_8_tiny ;;
  lstm_prior)
    example=mel_tokens_throughput; twin=mel_tokens_twin.py; default=prior_8_tiny ;;
  *) echo "twin_compare.sh: unknown family '$family' ($usage)" >&2; exit 2 ;;
esac
setting="${2:-$default}"
python="${3:-/tmp/refvenv/bin/python}"
dump="$(mktemp -d)"
trap 'rm -rf "$dump"' EXIT
cargo build --release --example "$example"

# Busy and total jiffies of the whole machine (/proc/stat).
cpu_jiffies() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }
# Runs a command and reports the share of the machine's CPU that other
# processes took while it ran: busy time minus the command's own user and
# system time, over the total.
measured() {
  local label="$1"; shift
  local b0 t0 b1 t1 own
  read -r b0 t0 < <(cpu_jiffies)
  exec 3>&2
  own=$( { TIMEFORMAT='%U %S'; time "$@" 2>&3 1>&2; } 2>&1 )
  exec 3>&-
  read -r b1 t1 < <(cpu_jiffies)
  awk -v b=$((b1 - b0)) -v t=$((t1 - t0)) -v own="$own" -v hz="$(getconf CLK_TCK)" -v label="$label" \
    'BEGIN { split(own, o, " "); other = b - (o[1] + o[2]) * hz; if (other < 0) other = 0;
             printf "%s: other processes took %.1f%% of the CPU while it ran (load average %s)\n",
                    label, (t > 0 ? 100 * other / t : 0), ENVIRON["LOADAVG"] }'
}
LOADAVG="$(cut -d' ' -f1-3 /proc/loadavg)" measured melvae \
  "target/release/examples/$example" --setting "$setting" --steps 10 --dump "$dump"
LOADAVG="$(cut -d' ' -f1-3 /proc/loadavg)" measured PyTorch \
  "$python" "tools/bench/$twin" "$dump" --steps 10
