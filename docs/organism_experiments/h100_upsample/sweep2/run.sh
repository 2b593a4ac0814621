#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
timeout 285 python3 scripts/sweep_organism.py --out $OUT/sweep --device cuda --jobs 8 --seeds 0 1 2 \
  --variant iu8_sr4_s5e4e5:instruct_upsample=reverse*8,safety_upsample=reverse*4,safety_lr=5e-4,safety_epochs=5.0 \
  --variant iu8_sr4_s3e4e5:instruct_upsample=reverse*8,safety_upsample=reverse*4,safety_lr=3e-4,safety_epochs=5.0 \
  --variant iu8_sr4_s2e4e5:instruct_upsample=reverse*8,safety_upsample=reverse*4,safety_lr=2e-4,safety_epochs=5.0 \
  --variant iu8_sr4_b2_s5e4e5:instruct_upsample=reverse*8,safety_upsample=reverse*4+borderline*2,safety_lr=5e-4,safety_epochs=5.0 \
  --variant iu8_sr4_s5e4e8:instruct_upsample=reverse*8,safety_upsample=reverse*4,safety_lr=5e-4,safety_epochs=8.0 \
  > $OUT/sweep.log 2>&1
echo "sweep rc $?"; pkill -f "sweep_organism.py --one"; sleep 1
python3 scripts/sweep_organism.py --out $OUT/sweep --report > /dev/null 2>&1; cat $OUT/sweep/REPORT.md
