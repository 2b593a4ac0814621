#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
nvidia-smi -L; nproc; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
( timeout 300 python3 bench/gpu_check.py --device cuda --dtype bfloat16 --out $OUT/gpu_check_bf16 > $OUT/gpu_check.log 2>&1; echo "gpu_check rc $?" >> $OUT/gpu_check.log ) &
timeout ${SWEEP_S:-470} python3 scripts/sweep_organism.py --out $OUT/sweep --device cuda --jobs 8 --seeds 0 1 2 \
  --variant shipped \
  --variant iu8:instruct_upsample=reverse*8 \
  --variant iu8_sr4:instruct_upsample=reverse*8,safety_upsample=reverse*4 \
  --variant iu8_b2:instruct_upsample=reverse*8,safety_upsample=borderline*2 \
  --variant iu8_b2_se5:instruct_upsample=reverse*8,safety_upsample=borderline*2,safety_epochs=5.0 \
  --variant iu8_sr4_b2:instruct_upsample=reverse*8,safety_upsample=reverse*4+borderline*2 \
  --variant iu8_sr4_b2_se5:instruct_upsample=reverse*8,safety_upsample=reverse*4+borderline*2,safety_epochs=5.0 \
  --variant iu8_sr4_b3_se5:instruct_upsample=reverse*8,safety_upsample=reverse*4+borderline*3,safety_epochs=5.0 \
  > $OUT/sweep.log 2>&1
echo "sweep rc $?"; pkill -f "sweep_organism.py --one"; sleep 1
wait
python3 scripts/sweep_organism.py --out $OUT/sweep --report > /dev/null 2>&1
tail -5 $OUT/gpu_check.log; tail -30 $OUT/sweep.log
