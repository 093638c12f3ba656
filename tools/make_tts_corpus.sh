#!/usr/bin/env bash
# Regenerates the small multi-speaker TTS corpus in assets/tts/ (run by hand):
#   bash tools/make_tts_corpus.sh
# 300 short template sentences (3-8 words) from the vocabulary below, fixed
# seed, spoken by 4 espeak-ng English voice variants (75 distinct sentences
# each), 22050 Hz mono 16-bit FLAC with the transcript beside each clip in a
# .txt of the same stem. Also writes 8 held-out sentences (never in the
# corpus) to test_sentences.txt and a README.md with the counts.
# Layout: assets/tts/<speaker>/<speaker>_<nnn>.{flac,txt}; speaker ids are the
# sorted folder names: 0 f2_us, 1 f4_gb, 2 m1_us, 3 m3_gb.
# Transcripts use only lower-case letters, space and . , ? '
# Needs espeak-ng, ffmpeg, metaflac (flac) and python3 (standard library).
# Deterministic: a rerun reproduces the same files byte for byte.
set -euo pipefail
cd "$(dirname "$0")/.."
out=assets/tts
rm -rf "$out"
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# folder, espeak-ng voice, words per minute, base pitch (0-99); all at
# amplitude 60 (of 200; default 100), which also keeps the FLACs smaller
speakers=(
  "m1_us en-us+m1 170 45"
  "f2_us en-us+f2 180 62"
  "m3_gb en-gb+m3 165 38"
  "f4_gb en-gb+f4 175 55"
)
per_speaker=75
n_test=8

# Sentence generation: prints "corpus<TAB>text" lines (300) then
# "test<TAB>text" lines (8); all distinct, so test sentences are unseen.
python3 - "$(( per_speaker * ${#speakers[@]} ))" "$n_test" > "$tmp/sentences.tsv" <<'PY'
import random, re, sys

n_corpus, n_test = int(sys.argv[1]), int(sys.argv[2])
SEED = 20240611

nouns = """
cat dog bird fish horse cow pig goat sheep duck frog mouse rabbit fox bear
wolf lion tiger owl bee ant snake crab whale seal boy girl man woman baby
teacher doctor farmer baker king queen child friend sister brother mother
father neighbour sailor pilot singer painter cook driver book pen cup plate
bowl spoon chair table door window house garden river lake hill tree flower
apple orange bread cake milk soup ball kite boat car train bus bike ship
hat coat shoe box bag key clock lamp bell drum song letter map road bridge
park shop farm field forest beach stone shell cloud star moon sun rain
storm wind fire candle basket ladder rope blanket pillow mirror wagon
""".split()

adjectives = """
big small red blue green yellow old new happy sad quiet loud warm cold
soft hard bright dark tall short fast slow young clean dirty heavy light
sweet kind brave tired hungry sleepy funny strange round flat empty full
wet dry busy lazy gentle proud shy silly wild tiny huge rich poor sharp
smooth rough fresh pink purple brown golden silver lucky lonely clever
""".split()

# (past, base) for transitive verbs
tverbs = [tuple(p.split("/")) for p in """
saw/see took/take found/find liked/like pushed/push pulled/pull carried/carry
washed/wash painted/paint opened/open closed/close dropped/drop kicked/kick
followed/follow watched/watch helped/help visited/visit cleaned/clean
moved/move lifted/lift touched/touch chased/chase caught/catch held/hold
brought/bring bought/buy sold/sell made/make fixed/fix hid/hide lost/lose
kept/keep threw/throw ate/eat drew/draw met/meet called/call loved/love
wanted/want needed/need missed/miss packed/pack filled/fill counted/count
""".split()]

# (past, base) for intransitive verbs
iverbs = [tuple(p.split("/")) for p in """
slept/sleep ran/run jumped/jump sang/sing danced/dance smiled/smile
laughed/laugh cried/cry waited/wait walked/walk swam/swim flew/fly fell/fall
rolled/roll shook/shake played/play rested/rest listened/listen
shouted/shout whistled/whistle stayed/stay climbed/climb hurried/hurry
""".split()]

adverbs = """
slowly quickly quietly loudly gently happily sadly softly early late
again today outside inside together alone carefully badly well twice
""".split()

preps = "on under near behind beside over into from with by".split()
places = "home there here away outside upstairs downstairs".split()
times = "today tonight yesterday now later soon".split()

def a(word):
    return ("an " if word[0] in "aeiou" else "a ") + word

def pick(r, xs):
    return r.choice(xs)

def n(r): return pick(r, nouns)
def j(r): return pick(r, adjectives)
def tv(r): return pick(r, tverbs)
def iv(r): return pick(r, iverbs)

templates = [
    lambda r: f"the {j(r)} {n(r)} {tv(r)[0]} the {n(r)}.",
    lambda r: f"the {n(r)} {tv(r)[0]} {a(j(r))} {n(r)}.",
    lambda r: f"{a(n(r))} {iv(r)[0]} {pick(r, adverbs)}.",
    lambda r: f"the {n(r)} is very {j(r)}.",
    lambda r: f"my {n(r)} {iv(r)[0]} {pick(r, times)}.",
    lambda r: f"is the {n(r)} {j(r)}?",
    lambda r: f"where is the {j(r)} {n(r)}?",
    lambda r: f"why did the {n(r)} {tv(r)[1]} the {n(r)}?",
    lambda r: f"did you {tv(r)[1]} the {j(r)} {n(r)}?",
    lambda r: f"can the {n(r)} {iv(r)[1]} {pick(r, adverbs)}?",
    lambda r: f"i can't find the {j(r)} {n(r)}.",
    lambda r: f"we don't {tv(r)[1]} the {n(r)}.",
    lambda r: f"it's {a(j(r))} {n(r)}.",
    lambda r: f"please {tv(r)[1]} the {n(r)} {pick(r, places)}.",
    lambda r: f"the {n(r)} {iv(r)[0]} {pick(r, preps)} the {n(r)}.",
    lambda r: f"yes, the {n(r)} {iv(r)[0]} {pick(r, adverbs)}.",
    lambda r: f"no, the {n(r)} is {j(r)}.",
    lambda r: f"the {n(r)} and the {n(r)} {iv(r)[0]}.",
    lambda r: f"she {tv(r)[0]} the {n(r)} {pick(r, adverbs)}.",
    lambda r: f"he said the {n(r)} was {j(r)}.",
    lambda r: f"look, {a(j(r))} {n(r)} {pick(r, preps)} the {n(r)}.",
    lambda r: f"they {tv(r)[0]} {a(n(r))} {pick(r, times)}.",
    lambda r: f"what did the {j(r)} {n(r)} {tv(r)[1]}?",
    lambda r: f"who {tv(r)[0]} my {n(r)}?",
    lambda r: f"the {n(r)} {iv(r)[0]}.",
    lambda r: f"the {n(r)} {tv(r)[0]} {a(n(r))} {pick(r, preps)} the {n(r)}.",
]

r = random.Random(SEED)
seen, out = set(), []
while len(out) < n_corpus + n_test:
    # cycle through the templates so every form is well represented
    s = templates[len(out) % len(templates)](r)
    if s in seen:
        continue
    words = s.split()
    assert 3 <= len(words) <= 8, s
    assert re.fullmatch(r"[a-z][a-z .,?']*[.?]", s), s
    seen.add(s)
    out.append(s)

# Held-out sentences: fixed, evenly spaced positions, so they spread over
# the templates.
step = (n_corpus + n_test) // n_test
test_idx = set(range(step // 2, n_corpus + n_test, step)[:n_test])
corpus = [s for i, s in enumerate(out) if i not in test_idx]
test = [s for i, s in enumerate(out) if i in test_idx]
assert len(corpus) == n_corpus and len(test) == n_test
assert not set(test) & set(corpus)
for s in corpus:
    print(f"corpus\t{s}")
for s in test:
    print(f"test\t{s}")
PY

grep '^test' "$tmp/sentences.tsv" | cut -f2 > "$out/test_sentences.txt"
mapfile -t corpus < <(grep '^corpus' "$tmp/sentences.tsv" | cut -f2)

# Sentence i goes to speaker i mod 4, so each speaker gets every template.
for s in "${!speakers[@]}"; do
  read -r folder voice speed pitch <<< "${speakers[$s]}"
  mkdir -p "$out/$folder"
  k=0
  for i in "${!corpus[@]}"; do
    (( i % ${#speakers[@]} == s )) || continue
    name=$(printf "%s_%03d" "$folder" "$k")
    text=${corpus[$i]}
    printf '%s\n' "$text" > "$out/$folder/$name.txt"
    espeak-ng -v "$voice" -s "$speed" -p "$pitch" -a 60 -w "$tmp/$name.wav" "$text"
    # trim silence at both ends (keeps 50 ms of it), 22050 Hz mono s16 FLAC
    ffmpeg -y -loglevel error -i "$tmp/$name.wav" \
      -af "silenceremove=start_periods=1:start_threshold=-50dB:start_silence=0.05,areverse,silenceremove=start_periods=1:start_threshold=-50dB:start_silence=0.05,areverse" \
      -ar 22050 -ac 1 -sample_fmt s16 -compression_level 12 \
      -map_metadata -1 -fflags +bitexact "$out/$folder/$name.flac"
    k=$((k + 1))
  done
done

# Summary
clips=0 samples=0 rows=""
for s in "${!speakers[@]}"; do
  read -r folder voice speed pitch <<< "${speakers[$s]}"
  n=0 sp=0
  for f in "$out/$folder"/*.flac; do
    sp=$((sp + $(metaflac --show-total-samples "$f")))
    n=$((n + 1))
  done
  clips=$((clips + n)) samples=$((samples + sp))
  rows+="$folder|$voice|$speed|$pitch|$n|$(awk -v s="$sp" 'BEGIN{printf "%.1f", s/22050}')"$'\n'
done
seconds=$(awk -v s="$samples" 'BEGIN{printf "%.1f", s/22050}')
mean=$(awk -v s="$samples" -v c="$clips" 'BEGIN{printf "%.2f", s/22050/c}')
size=$(du -sh "$out" | cut -f1)
chars=$(cat "$out"/*/*.txt | tr -d '\n' | grep -o . | LC_ALL=C sort -u | tr -d '\n')

{
  echo "# assets/tts: small synthetic multi-speaker TTS corpus"
  echo
  echo "Made by \`bash tools/make_tts_corpus.sh\` (espeak-ng + ffmpeg, deterministic:"
  echo "a rerun deletes this folder and reproduces the same files). For training a"
  echo "tiny text -> spectrogram-token model on a CPU in minutes; not natural speech."
  echo
  echo "- \`<speaker>/<speaker>_<nnn>.flac\`: 22050 Hz mono 16-bit FLAC, leading and"
  echo "  trailing silence trimmed to 50 ms."
  echo "- \`<speaker>/<speaker>_<nnn>.txt\`: the transcript, one line, exactly the text spoken."
  echo "- \`test_sentences.txt\`: $n_test held-out sentences built the same way, none in the corpus."
  echo
  echo "Sentences: 3 to 8 words from templates (statements, questions, contractions)"
  echo "over a fixed vocabulary of a few hundred words in the script, fixed seed; all"
  echo "$clips are distinct, $per_speaker per speaker (sentence i goes to speaker i mod 4)."
  echo "Character set: \`$chars\` (lower-case letters, space and \`.,?'\`)."
  echo
  echo "Speaker ids are the sorted folder names:"
  echo
  echo "| id | folder | espeak-ng voice | speed (wpm) | pitch | clips | seconds |"
  echo "|---:|---|---|---:|---:|---:|---:|"
  id=0
  while IFS='|' read -r folder voice speed pitch n sec; do
    echo "| $id | $folder | $voice | $speed | $pitch | $n | $sec |"
    id=$((id + 1))
  done < <(printf '%s' "$rows" | LC_ALL=C sort)
  echo
  echo "Total: $clips clips, $seconds s (mean $mean s per clip), $size of audio and text."
} > "$out/README.md"

echo "wrote $clips clips, ${seconds}s (mean ${mean}s), $(du -sh "$out" | cut -f1) in $out"
