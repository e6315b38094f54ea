#!/usr/bin/env bash
# Reproduce the committed tiny digits EDM (raylab/assets/edm-digits/) and its sample grid
# (docs/edm-digits-samples.png): the `tiny` preset's edm.* recipe (16 channels, channel_mult 1,2,2, batch 32,
# lr 4e-3, P_mean 0, 40 kimg; see raylab/config.py) trained on the embedded digits with Ray Train, one CPU worker.
#
#   scripts/train_tiny_edm.sh [RUN_ROOT]      # default RUN_ROOT: runs/tiny-edm;  PYTHON=... picks the interpreter
#
# One worker is what makes the weights reproducible byte for byte: the per-rank noise streams depend on the
# number of workers, so `resources.num_workers=2` trains faster on 2 cores but gives different (equally good)
# weights. Rerunning with the same RUN_ROOT resumes the run, or finds it finished. If the new model.pt is not
# byte-identical to the committed one, the new weights and their network.json replace the committed pair.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
ROOT="${1:-runs/tiny-edm}"
ASSET=raylab/assets/edm-digits
mkdir -p "$ROOT"

"$PY" -m raylab edm train --preset tiny --set resources.num_workers=1 --set tracking.root="$ROOT" \
    | tee "$ROOT/train.log"
NET="$(sed -n 's/^network: //p' "$ROOT/train.log")"
NEW="$(sha256sum "$NET/model.pt" | cut -d' ' -f1)"
OLD="$("$PY" -c "import json; print(json.load(open('$ASSET/network.json'))['model_sha256'])")"
if [ "$NEW" = "$OLD" ]; then
    echo "reproduced: $NET/model.pt is byte-identical to $ASSET/model.pt ($NEW)"
else
    echo "NOT byte-identical (new $NEW, committed $OLD): installing the new weights"
    cp "$NET/model.pt" "$NET/network.json" "$ASSET/"
fi
"$PY" -m raylab edm sample --num 100 --steps 18 --seed 0 --out "$ROOT/samples"
cp "$ROOT/samples/samples.png" docs/edm-digits-samples.png
