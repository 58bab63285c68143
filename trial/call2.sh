set -o pipefail
source benchmarks/device_setup.sh || exit 1
F=$(python benchmarks/carry_gguf.py join .carry/gguf/1 | tail -1); echo "gguf: $F"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
t0=$(date +%s)
python benchmarks/calibrate_base.py --model $F model.gguf_cache_dir=/tmp/cptlab-gguf/cache \
  --domains-file benchmarks/smollm2_candidates.yaml --n 256 --device cuda --out $OUT/calibration_smollm2.json \
  > $OUT/calibration.log 2>&1; echo "calibration rc=$? $(( $(date +%s) - t0 )) s"
tail -40 $OUT/calibration.log
for m in grpo sdpo; do
  python -m cptlab run trial/smollm2_trial.yaml method.name=$m run.name=trial_$m --out /tmp/runs/trial_$m > $OUT/trial_$m.log 2>&1 &
done; wait; echo "trials done $(( $(date +%s) - t0 )) s"
tail -5 $OUT/trial_grpo.log $OUT/trial_sdpo.log
tar czf $OUT/trial.tgz -C /tmp/runs --exclude=checkpoints --exclude=base .
