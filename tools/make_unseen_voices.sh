#!/usr/bin/env bash
# Writes speech from espeak-ng voices and languages the bundled corpus does
# not have (assets/speech/voices.tsv), converted the way a user might: sox's
# resampling to 24 kHz with its default dither. Not committed; it is a check
# of how the quickstart's model generalises:
#
#   bash tools/make_unseen_voices.sh runs/unseen_voices
#   cargo run --release --example quickstart -- --eval-only --eval-dir runs/unseen_voices
#
# Needs espeak-ng and sox (Debian: apt-get install espeak-ng sox).
set -euo pipefail
out=${1:?usage: make_unseen_voices.sh OUT_DIR}
if [ -e "$out" ] && [ -n "$(ls -A "$out")" ]; then
  echo "$out exists and is not empty; give a new folder" >&2
  exit 1
fi
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# voice espeak-voice pitch text
while IFS='|' read -r name voice pitch text; do
  mkdir -p "$out/$name"
  espeak-ng -v "$voice" -p "$pitch" -w "$tmp/x.wav" "$text" </dev/null
  sox -R "$tmp/x.wav" -r 24000 "$out/$name/${name}_0.wav" </dev/null
done <<'LIST'
da-klatt|da+klatt|50|Jeg cykler til arbejde hver dag, selv når det regner.
ru-michael|ru+Michael|50|Вчера вечером мы долго гуляли по старому парку.
el-anika|el+anika|50|Το καλοκαίρι πηγαίνουμε συχνά στη θάλασσα.
ca-denis|ca+Denis|50|El meu germà petit juga a futbol cada dissabte.
sk-storm|sk+Storm|50|Na jeseň zbierame jablká v záhrade.
eo-shelby|eo+shelby|50|La hundo kuris tra la herbejo kun granda ĝojo.
nb-victor|nb+victor|50|Vi spiste middag ute i hagen i går kveld.
lv-grandma|lv+grandma|50|Mana māsa katru rītu dzer tēju ar medu.
en-us-default|en-us|50|She sells fresh vegetables at the corner shop every morning.
en-gb-mike|en-gb+Mike|50|We should probably leave before the traffic gets worse.
de-default|de|50|Ich habe heute leider keine Zeit, vielleicht morgen.
fr-fr-f5|fr-fr+f5|70|Les enfants jouent dans la cour pendant la récréation.
LIST
echo "wrote $(find "$out" -name '*.wav' | wc -l) clips to $out"
