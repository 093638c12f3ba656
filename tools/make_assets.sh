#!/usr/bin/env bash
# Regenerates the bundled speech corpus in assets/speech/ (run by hand).
#
# Synthetic speech from espeak-ng, 24 kHz mono FLAC, one folder per voice
# (assets/speech/<voice>/<voice>_s<k>.flac) and a voices.tsv listing each
# voice's language, variant, pitch, speed and role. It is what the
# quickstart trains and evaluates on (docs/models/mel_vae.md).
#
# A voice is a (language, espeak-ng variant, pitch, speed) combination:
# - 46 training voices: 14 languages x 3 variants, each speaking 3 of its
#   language's 4 training sentences (s0..s3), and four of them again at
#   espeak-ng pitch 95 (<voice>-p95, the same sentences and floor), so the
#   training voices' median pitch spans about 86-370 Hz rather than 86-266
#   Hz: a voice above the range training covers comes back at the range's
#   top (docs/models/mel_vae.md, "The pitch range the corpus teaches");
# - 8 held-out voices, never heard in training: 5 in training languages with
#   variants no training voice uses, speaking that language's held-out
#   sentences (s4, s5), and 3 in languages training never hears (s0, s1).
# So the held-out set is speaker-disjoint and utterance-disjoint. The
# configs name the held-out voices (data.split_by: directory,
# data.held_out: [...]); keep that list in step with the "held-out" rows here.
#
# Each voice also has a recording floor, since real audio is never digitally
# silent between words (and espeak-ng's is): `digital` (espeak-ng's zeros
# kept), `dither` (sox's TPDF dither at 16 bits), or pink or white noise
# mixed in at a level (`pink:0.001` is about -60 dBFS). A model trained on
# one kind of silence reconstructs another badly, so training and held-out
# voices cover all of them. sox runs with -R, so the noise is the same on
# every run. Speech is scaled by 0.9 (espeak-ng peaks at full scale).
#
# Needs espeak-ng and sox (Debian: apt-get install espeak-ng sox).
#
# For probes (docs/models/mel_vae.md, "The pitch range the corpus
# teaches"): OUT=DIR writes the corpus there instead,
# PITCH="de-f1=80 nl-f1=70" gives those voices another espeak-ng pitch,
# and EXTRA="de-f1=80" adds a copy of a voice at another pitch as a new
# voice (de-f1-p80: the same language, variant, speed, floor, role and
# sentences; that is how the four -p95 voices below were first tried).
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in espeak-ng sox soxi; do
  command -v "$tool" >/dev/null || { echo "$tool is missing (apt-get install espeak-ng sox)" >&2; exit 1; }
done
out=${OUT:-assets/speech}
declare -A pitch_of
for p in ${PITCH:-}; do
  pitch_of[${p%%=*}]=${p#*=}
done
rm -rf "$out"
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

declare -A S
# Training languages: s0..s3 for training voices, s4..s5 for held-out ones.
S[en-us,0]="The quiet river carried seven paper boats past the old mill."
S[en-us,1]="Please measure the flour twice before you pour it into the bowl."
S[en-us,2]="Every morning the baker sings while the bread rises in the oven."
S[en-us,3]="Could you read the last line of the poem once more, slowly?"
S[en-us,4]="My neighbour painted her fence a shade of green nobody liked."
S[en-us,5]="Thunder rolled over the hills just as the concert began."
S[en-gb,0]="Bright orange lanterns swung gently above the crowded market square."
S[en-gb,1]="A sudden gust of wind scattered the letters across the wooden floor."
S[en-gb,2]="The train to Edinburgh was late again, so we shared a pot of tea."
S[en-gb,3]="Nobody remembered who had left the umbrella by the garden gate."
S[de,0]="Der alte Hafen liegt still im Nebel, und die Boote schaukeln leise."
S[de,1]="Kannst du mir bitte sagen, wann der nächste Zug nach Berlin fährt?"
S[de,2]="Meine Großmutter backt jeden Sonntag einen Kuchen mit frischen Äpfeln."
S[de,3]="Im Winter gehen wir oft im Wald spazieren, wenn der Schnee glitzert."
S[de,4]="Das kleine Mädchen zählte die Sterne, bis es endlich einschlief."
S[de,5]="Nach dem Regen roch die ganze Straße nach nassem Gras."
S[fr-fr,0]="Le petit chat dort au soleil sur le rebord de la fenêtre."
S[fr-fr,1]="Nous avons marché le long de la plage jusqu'au coucher du soleil."
S[fr-fr,2]="Pourriez-vous m'indiquer le chemin de la gare, s'il vous plaît?"
S[fr-fr,3]="Ma sœur prépare une soupe aux légumes chaque mercredi soir."
S[fr-fr,4]="Le vent du nord a soufflé toute la nuit sur les toits du village."
S[fr-fr,5]="Il a oublié ses clés dans la voiture pour la troisième fois."
S[es,0]="El mercado de la plaza abre muy temprano todos los sábados."
S[es,1]="Mi hermano toca la guitarra mientras cantamos en el jardín."
S[es,2]="¿Sabes a qué hora sale el autobús para la ciudad?"
S[es,3]="Las montañas estaban cubiertas de nieve al final del invierno."
S[es,4]="La abuela guarda las fotos antiguas en una caja de madera."
S[es,5]="Después de la lluvia, los niños saltaron en los charcos."
S[it,0]="Il fornaio del paese prepara il pane prima dell'alba."
S[it,1]="Domani andremo al mare se il tempo sarà bello."
S[it,2]="Mia zia coltiva pomodori e basilico sul balcone di casa."
S[it,3]="Scusi, sa dirmi dove si trova la biblioteca comunale?"
S[it,4]="Il gatto nero si è nascosto sotto il divano tutto il giorno."
S[it,5]="Abbiamo cenato tardi e poi abbiamo guardato le stelle."
S[pt,0]="O barco dos pescadores voltou ao porto ao fim da tarde."
S[pt,1]="A minha vizinha rega as flores todas as manhãs."
S[pt,2]="Podes fechar a janela, por favor? Está muito frio."
S[pt,3]="No verão passámos duas semanas numa aldeia perto do rio."
S[nl,0]="De fietsers reden langs de dijk terwijl de zon onderging."
S[nl,1]="Mijn opa vertelt altijd verhalen over de oude haven."
S[nl,2]="Wil je de boodschappen op de keukentafel zetten?"
S[nl,3]="In de herfst vallen de gele bladeren in de gracht."
S[pl,0]="Na rynku sprzedają świeże truskawki i młode ziemniaki."
S[pl,1]="Mój brat codziennie jeździ rowerem do pracy."
S[pl,2]="Czy możesz mi powiedzieć, która jest godzina?"
S[pl,3]="Zimą jezioro zamarza i dzieci jeżdżą na łyżwach."
S[sv,0]="Vi plockade blåbär i skogen hela eftermiddagen."
S[sv,1]="Min syster har köpt en röd cykel med korg."
S[sv,2]="Kan du hjälpa mig att bära de här lådorna?"
S[sv,3]="På vintern är nätterna långa och mörka i norr."
S[cs,0]="Na náměstí hraje muzikant na starou harmoniku."
S[cs,1]="Můj děda každé ráno čte noviny u kávy."
S[cs,2]="Můžete mi prosím říct, kde je nádraží?"
S[cs,3]="V lese jsme našli spoustu hub po dešti."
S[fi,0]="Järven rannalla on pieni punainen mökki."
S[fi,1]="Äiti leipoo pullaa joka lauantai aamulla."
S[fi,2]="Voisitko sulkea oven, täällä vetää kovasti?"
S[fi,3]="Talvella hiihdämme metsässä lumisia polkuja pitkin."
S[ro,0]="Bunica mea face cele mai bune plăcinte din sat."
S[ro,1]="Am mers cu trenul până la munte și am urcat pe jos."
S[ro,2]="Poți să-mi spui unde este farmacia cea mai apropiată?"
S[ro,3]="Toamna, frunzele copacilor devin galbene și roșii."
S[tr,0]="Sabah erkenden balıkçılar denize açıldı."
S[tr,1]="Annem her pazar sofraya taze ekmek koyar."
S[tr,2]="Bana istasyonun yolunu gösterebilir misiniz?"
S[tr,3]="Kışın dağlara kar yağınca köy çok sessiz olur."
# Languages only held-out voices speak.
S[hu,0]="A kis piros hajó lassan átúszott a tavon."
S[hu,1]="Holnap reggel korán indulunk a nagymamához."
S[id,0]="Setiap pagi ayah minum kopi di teras rumah."
S[id,1]="Anak-anak bermain bola di lapangan dekat sekolah."
S[hr,0]="Ljeti često plivamo u moru kod starog svjetionika."
S[hr,1]="Moja sestra svira klavir svake večeri."

# voice language variant pitch speed floor role sentences
voices=(
  "en-us-m1     en-us  m1       45 160 digital     train 0 1 2"
  "en-us-f2     en-us  f2       55 150 dither      train 1 2 3"
  "en-us-andy   en-us  Andy     40 170 pink:0.001  train 0 2 3"
  "en-gb-m3     en-gb  m3       50 155 white:0.0003 train 0 1 3"
  "en-gb-f4     en-gb  f4       60 145 dither      train 0 1 2"
  "en-gb-david  en-gb  david    35 160 digital     train 1 2 3"
  "de-m2        de     m2       40 150 pink:0.003  train 0 1 2"
  "de-f1        de     f1       65 145 dither      train 1 2 3"
  "de-max       de     max      50 165 digital     train 0 2 3"
  "fr-fr-m4     fr-fr  m4       45 160 white:0.001 train 0 1 3"
  "fr-fr-f3     fr-fr  f3       60 150 pink:0.0005 train 0 1 2"
  "fr-fr-michel fr-fr  michel   35 155 dither      train 1 2 3"
  "es-m5        es     m5       50 165 digital     train 0 2 3"
  "es-f5        es     f5       70 155 pink:0.002  train 0 1 3"
  "es-pablo     es     pablo    40 150 dither      train 0 1 2"
  "it-m6        it     m6       55 150 white:0.0001 train 1 2 3"
  "it-f2        it     f2       45 160 digital     train 0 2 3"
  "it-mario     it     Mario    30 170 dither      train 0 1 3"
  "pt-m7        pt     m7       50 145 pink:0.001  train 0 1 2"
  "pt-f4        pt     f4       75 155 digital     train 1 2 3"
  "pt-pedro     pt     pedro    40 160 white:0.0005 train 0 2 3"
  "nl-m1        nl     m1       60 150 dither      train 0 1 3"
  "nl-f1        nl     f1       50 165 pink:0.004  train 0 1 2"
  "nl-john      nl     john     35 145 digital     train 1 2 3"
  "pl-m3        pl     m3       45 155 dither      train 0 2 3"
  "pl-f3        pl     f3       55 145 white:0.0002 train 0 1 3"
  "pl-boris     pl     boris    30 160 pink:0.0007 train 0 1 2"
  "sv-m4        sv     m4       55 160 digital     train 1 2 3"
  "sv-f5        sv     f5       45 150 dither      train 0 2 3"
  "sv-linda     sv     linda    65 155 pink:0.0015 train 0 1 3"
  "cs-m5        cs     m5       40 145 white:0.0007 train 0 1 2"
  "cs-f2        cs     f2       60 160 digital     train 1 2 3"
  "cs-steph     cs     steph    50 150 dither      train 0 2 3"
  "fi-m6        fi     m6       35 155 pink:0.0003 train 0 1 3"
  "fi-f4        fi     f4       55 165 dither      train 0 1 2"
  "fi-quincy    fi     quincy   45 150 digital     train 1 2 3"
  "ro-m7        ro     m7       60 160 white:0.002 train 0 2 3"
  "ro-f1        ro     f1       40 150 dither      train 0 1 3"
  "ro-robert    ro     robert   50 145 pink:0.002  train 0 1 2"
  "tr-m2        tr     m2       55 155 digital     train 1 2 3"
  "tr-f3        tr     f3       70 160 dither      train 0 2 3"
  "tr-travis    tr     travis   35 150 pink:0.0008 train 0 1 3"
  "es-f5-p95    es     f5       95 155 pink:0.002  train 0 1 3"
  "pt-f4-p95    pt     f4       95 155 digital     train 1 2 3"
  "sv-linda-p95 sv     linda    95 155 pink:0.0015 train 0 1 3"
  "tr-f3-p95    tr     f3       95 160 dither      train 0 2 3"
  "en-us-alicia en-us  Alicia   50 155 dither      held-out 4 5"
  "de-gene      de     Gene     40 160 digital     held-out 4 5"
  "fr-fr-annie  fr-fr  Annie    55 150 pink:0.001  held-out 4 5"
  "es-m8        es     m8       45 155 dither      held-out 4 5"
  "it-belinda   it     belinda  60 145 white:0.0005 held-out 4 5"
  "hu-m1        hu     m1       50 150 digital     held-out 0 1"
  "id-f2        id     f2       60 155 pink:0.002  held-out 0 1"
  "hr-zac       hr     zac      40 160 dither      held-out 0 1"
)
for e in ${EXTRA:-}; do
  for row in "${voices[@]}"; do
    read -r name rest <<<"$row"
    if [ "$name" = "${e%%=*}" ]; then
      read -r lang variant _ speed floor role sents <<<"$rest"
      voices+=("$name-p${e#*=} $lang $variant ${e#*=} $speed $floor $role $sents")
    fi
  done
done
printf "voice\tlanguage\tvariant\tpitch\tspeed\tfloor\trole\tsentences\n" >"$out/voices.tsv"
for row in "${voices[@]}"; do
  read -r name lang variant pitch speed floor role sents <<<"$row"
  pitch=${pitch_of[$name]:-$pitch}
  mkdir -p "$out/$name"
  for k in $sents; do
    text=${S[$lang,$k]}
    espeak-ng -v "$lang+$variant" -p "$pitch" -s "$speed" -w "$tmp/x.wav" "$text"
    dest="$out/$name/${name}_s$k.flac"
    case $floor in
      digital) sox -R -v 0.9 "$tmp/x.wav" -D -r 24000 -b 16 -c 1 "$dest" ;;
      dither) sox -R -v 0.9 "$tmp/x.wav" -r 24000 -b 16 -c 1 "$dest" ;;
      pink:* | white:*)
        sox -R -n -r 22050 -b 16 -c 1 "$tmp/n.wav" synth "$(soxi -D "$tmp/x.wav")" \
          "${floor%%:*}noise" vol "${floor#*:}"
        sox -R -m -v 0.9 "$tmp/x.wav" -v 1 "$tmp/n.wav" -r 24000 -b 16 -c 1 "$dest"
        ;;
      *) echo "unknown floor $floor" >&2 && exit 1 ;;
    esac
  done
  printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$name" "$lang" "$variant" "$pitch" "$speed" \
    "$floor" "$role" "$(echo "$sents" | sed 's/\([0-9]\)/s\1/g')" >>"$out/voices.tsv"
done
echo "wrote $(find "$out" -name '*.flac' | wc -l) clips in $(find "$out" -mindepth 1 -type d | wc -l) voices, $(du -sh "$out" | cut -f1)"
