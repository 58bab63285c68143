set -o pipefail
source benchmarks/device_setup.sh || exit 1
F=$(python benchmarks/carry_gguf.py join .carry/gguf/1 | tail -1); echo "gguf: $F"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
t0=$(date +%s)
timeout 490 python -m cptlab study continual_smollm2 --seeds 0,1,2 --jobs 12 --out /tmp/studies \
  model.path=$F model.gguf_cache_dir=/tmp/cptlab-gguf/cache > $OUT/study.log 2>&1
echo "study rc=$? $(( $(date +%s) - t0 )) s"
grep -v "^\s*$" $OUT/study.log | tail -60
tar czf $OUT/continual_smollm2.tgz -C /tmp/studies --exclude=checkpoints --exclude='*.safetensors' . ; ls -la $OUT
