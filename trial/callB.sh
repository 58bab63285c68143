set -o pipefail
source benchmarks/device_setup.sh || exit 1
F=$(python benchmarks/carry_gguf.py join .carry/gguf/1 | tail -1); echo "gguf: $F"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
t0=$(date +%s)
python benchmarks/calibrate_base.py trial/smollm2_trial.yaml --domains-file benchmarks/smollm2_candidates.yaml \
  --variants boxed --n 256 --max-new-tokens 128 --device cuda --out $OUT/calib_warm.json > $OUT/calib_warm.log 2>&1
echo "calib warm rc=$? $(( $(date +%s) - t0 )) s"; grep -A30 "^domain " $OUT/calib_warm.log
for m in grpo sdpo; do
  python -m cptlab run trial/smollm2_trial.yaml method.name=$m run.name=trial_$m --out /tmp/runs/trial_$m > $OUT/trial_$m.log 2>&1 &
done
python benchmarks/calibrate_base.py trial/smollm2_trial.yaml warmup.pretrained=false --domains-file benchmarks/smollm2_candidates.yaml \
  --variants boxed,boxed_example --n 256 --max-new-tokens 256 --device cuda --out $OUT/calib_raw.json > $OUT/calib_raw.log 2>&1
echo "calib raw rc=$? $(( $(date +%s) - t0 )) s"; grep -A30 "^domain " $OUT/calib_raw.log
wait; echo "trials done $(( $(date +%s) - t0 )) s"
for m in grpo sdpo; do tail -n 4 $OUT/trial_$m.log; done
tar czf $OUT/trial.tgz -C /tmp/runs --exclude=checkpoints --exclude=base .
