set -o pipefail
source benchmarks/device_setup.sh || exit 1
python benchmarks/carry_gguf.py join .carry/gguf/2
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
t0=$(date +%s)
timeout 480 python -m cptlab study teacher_stability_gpu --variants stable,frozen,ema --seeds 0,1,2 --jobs 9 \
  method.micro_batch_size=128 eval.save_samples=0 --out /tmp/studies > $OUT/stab.log 2>&1
echo "study rc=$? $(( $(date +%s) - t0 )) s"
grep -v "^\s*$" $OUT/stab.log | tail -45
tar czf $OUT/teacher_stability_stable.tgz -C /tmp/studies --exclude=checkpoints --exclude=base --exclude='*.safetensors' .
ls -la $OUT
